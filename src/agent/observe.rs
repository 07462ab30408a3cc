//! What inputs say, counted and logged (the decisions are [`Control`](super::control::Control)'s).

use super::control::Input;
use crate::model::Kind;
use crate::ops::Ops;
use crate::rules::worker;
use crate::source::SourceEvent;

/// Count and log what an input says (the decisions are [`Control`]'s).
pub(super) fn observe(ops: &Ops, input: &Input) {
    match input {
        Input::Source(SourceEvent::WatchRestarted(kind)) => ops.metrics.watch_restart(resource(*kind)),
        Input::Source(SourceEvent::Relisted(kind)) => ops.metrics.relist(resource(*kind)),
        Input::Source(SourceEvent::Request { verb, code, duration }) => ops.metrics.request(verb, *code, *duration),
        Input::Rules(worker::Event::Applied { duration, restores, rules, total_restores, full }) => {
            let now = std::time::SystemTime::now();
            ops.metrics.sync_ok(*duration, (*restores > 0).then_some(*full), now);
            ops.health.updated(now);
            if *restores > 0 {
                log::info!(
                    "rules applied: {rules} rules, {restores} restore(s) in {} ms (restores so far: {total_restores})",
                    duration.as_millis()
                );
            } else {
                log::debug!("rules unchanged: no restore");
            }
        }
        Input::Rules(worker::Event::Confirmed { resync, duration }) => {
            let now = std::time::SystemTime::now();
            ops.metrics.sync_confirmed(*resync, *duration, now);
            ops.health.updated(now);
        }
        Input::Rules(worker::Event::Failed { error, duration, retry_in }) => {
            ops.metrics.sync_failed(*duration);
            log::error!(
                "rules sync failed, previous rules still in force; retry in {} ms: {error}",
                retry_in.as_millis()
            );
        }
        Input::Rules(worker::Event::Refused(sums)) => ops.metrics.refused(sums),
        Input::Rules(worker::Event::Repaired { what }) => {
            ops.metrics.guard_repairs.inc();
            log::warn!("rules repaired: {}", what.join("; "));
        }
        _ => {}
    }
}

/// The metric name of a resource.
fn resource(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices",
        Kind::Endpoints => "endpoints",
    }
}

/// The layout's name, as the config spells it (a metric label).
pub(super) fn layout_name(layout: crate::rules::render::Layout) -> &'static str {
    match layout {
        crate::rules::render::Layout::Portals => "portals",
        crate::rules::render::Layout::RootChain => "root-chain",
        crate::rules::render::Layout::Nftables => "nftables",
    }
}
