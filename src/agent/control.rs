//! The agent's decisions, as a machine with no I/O, no clock and no threads of its own: inputs
//! in ([`Control::input`], then [`Control::settle`] once per batch), effects out. The shell in
//! `agent/mod.rs` feeds it what the sources, the rules worker, the proxy, signals and the
//! watchdog timer say, and carries out what it asks.
//!
//! It holds the readiness contract: [`Effect::Ready`] once, and only when the source has
//! delivered a complete list of both kinds, the rules are in the kernel and the proxy listens.
//! It plans once per batch of inputs, and only after the source synced (so a partial view never
//! reaches the kernel); it hands the worker a rule set only when it differs from the last one,
//! and the proxy a table only when it differs.

use std::sync::Arc;

use std::collections::BTreeSet;

use crate::model::{Kind, Object, Protocol};
use crate::ops::PlanCounts;
use crate::proxy::table::ProxyTable;
use crate::proxy::ProxyEvent;
use crate::rules::worker;
use crate::rules::RuleSet;
use crate::source::cache::Cached;
use crate::source::SourceEvent;
use crate::state::{Change, State, StateConfig};

/// Everything the agent reacts to.
#[derive(Debug)]
pub enum Input {
    Source(SourceEvent),
    Rules(worker::Event),
    Proxy(ProxyEvent),
    ProxyFailed(std::io::Error),
    Signal(&'static str),
    /// Time to tell systemd's watchdog we are alive.
    Tick,
    /// `offlineAfter` has passed since the start.
    OfflineTimeout,
    /// Time to write the offline cache if the state changed since the last write.
    CacheTick,
    /// SIGHUP; the shell replaces it with the state machine's new settings (`None`: the new
    /// configuration was invalid, nothing changes).
    Reload(Option<Box<StateConfig>>),
}

/// What the shell must do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Hand this set to the rules worker.
    Rules(Arc<RuleSet>),
    /// Publish this table to the proxy.
    Table(Arc<ProxyTable>),
    /// The source has delivered a complete list of both kinds (for `/readyz` and metrics).
    SourceSynced,
    /// Ready: tell systemd and `/readyz`.
    Ready,
    Watchdog,
    /// What the new plan holds (for the gauges).
    Counts(PlanCounts),
    /// Endpoints changes (their trigger times, unix ms) are now in force.
    Programmed(Vec<u64>),
    /// Stop (for this reason): clean up and exit.
    Stop(&'static str),
    /// The source did not deliver in time: serving the offline cache written at this time.
    ServingCache(String),
    /// Write the offline cache from the current state.
    WriteCache,
    /// The proxy's passive health check: every endpoint set aside now (for `check`).
    SetAside(Vec<(crate::model::ServicePortName, std::net::SocketAddr)>),
}

pub struct Control {
    state: State,
    /// The kinds of which the source delivered a complete list.
    source_kinds: BTreeSet<Kind>,
    /// The source delivered a complete view (Services and an endpoints kind).
    source_synced: bool,
    /// Planning may go on: the source synced, or the offline cache stands in for it.
    synced: bool,
    /// The offline cache read at start, until it is used or the source syncs.
    cache: Option<Cached>,
    /// Kinds the state holds from the cache (replaced when the source syncs).
    from_cache: BTreeSet<Kind>,
    /// The state changed since the cache was last written (only from a complete source view).
    cache_dirty: bool,
    /// The worker reported a set in the kernel.
    installed: bool,
    listening: bool,
    ready: bool,
    /// The state changed since the last plan.
    dirty: bool,
    /// The set last handed to the worker (the allocation the worker holds).
    sent: Option<Arc<RuleSet>>,
    /// The table last published.
    table: Arc<ProxyTable>,
    refused_loops: usize,
    /// Trigger times of endpoints changes not yet planned, and of those whose rules are on their
    /// way to the kernel (network programming latency).
    triggers_queued: Vec<u64>,
    triggers_in_flight: Vec<u64>,
    /// Set once a stop was asked for (the first reason wins).
    stopping: Option<&'static str>,
    /// The proxy's error, if that is why it stops.
    proxy_error: Option<std::io::Error>,
}

impl Control {
    pub fn new(state: State) -> Control {
        Control {
            state,
            source_kinds: BTreeSet::new(),
            source_synced: false,
            synced: false,
            cache: None,
            from_cache: BTreeSet::new(),
            cache_dirty: false,
            installed: false,
            listening: false,
            ready: false,
            dirty: false,
            sent: None,
            table: Arc::new(ProxyTable::default()),
            refused_loops: 0,
            triggers_queued: Vec::new(),
            triggers_in_flight: Vec::new(),
            stopping: None,
            proxy_error: None,
        }
    }

    /// The offline cache to fall back on when the source is silent for `offlineAfter`.
    pub fn with_cache(mut self, cache: Option<Cached>) -> Control {
        self.cache = cache;
        self
    }

    /// Serving from the offline cache (the source has not synced since the start).
    pub fn serving_cache(&self) -> bool {
        !self.from_cache.is_empty()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The proxy's error, when it is why the agent stopped (taken once).
    pub fn take_proxy_error(&mut self) -> Option<std::io::Error> {
        self.proxy_error.take()
    }

    /// Take one input. Effects that cannot wait for the end of the batch (the watchdog, a stop)
    /// are pushed at once; planning waits for [`Control::settle`].
    pub fn input(&mut self, input: Input, out: &mut Vec<Effect>) {
        match input {
            Input::Source(SourceEvent::Change(c)) => {
                let triggers = self.new_triggers(&c);
                if self.state.apply(c) {
                    self.triggers_queued.extend(triggers);
                    self.dirty = true;
                    self.cache_dirty |= self.source_synced;
                }
            }
            Input::Source(SourceEvent::Synced(kind)) => self.source_synced(kind, out),
            Input::OfflineTimeout => self.offline_timeout(out),
            Input::Reload(Some(cfg)) => {
                if self.state.set_config(*cfg) {
                    log::info!("reload: the filter or rule settings changed");
                    self.dirty = true;
                }
            }
            Input::Reload(None) => {}
            Input::CacheTick => {
                if std::mem::take(&mut self.cache_dirty) {
                    out.push(Effect::WriteCache);
                }
            }
            Input::Source(SourceEvent::Error { message, .. }) => log::debug!("source: {message}"),
            // Counted by the shell.
            Input::Source(SourceEvent::WatchRestarted(_) | SourceEvent::Relisted(_) | SourceEvent::Request { .. }) => {}
            Input::Tick => out.push(Effect::Watchdog),
            Input::Rules(worker::Event::Applied { .. }) => {
                self.installed = true;
                if !self.triggers_in_flight.is_empty() {
                    out.push(Effect::Programmed(std::mem::take(&mut self.triggers_in_flight)));
                }
            }
            Input::Rules(worker::Event::KubeProxy(present)) => {
                if self.state.apply(Change::KubeProxy(present)) {
                    log::info!("kube-proxy {}", if present { "appeared" } else { "went away" });
                    self.dirty = true;
                }
            }
            Input::Rules(_) => {}
            Input::Proxy(ProxyEvent::UdpPortUnavailable(port)) => {
                log::warn!("UDP proxy port {port} is taken by another process; moving its service to another port");
                self.dirty |= self.state.apply(Change::UdpPortUnavailable(port));
            }
            Input::Proxy(ProxyEvent::Listening(addrs)) => {
                log::info!("proxy listening on {addrs:?}");
                self.listening = true;
            }
            Input::Proxy(ProxyEvent::SetAside(endpoints)) => {
                // Kernel-path rules leave out what the health check set aside.
                if self.state.apply(Change::SetAside(endpoints.clone())) {
                    log::info!("kernel path: the endpoints set aside changed; rewriting its rules");
                    self.dirty = true;
                }
                out.push(Effect::SetAside(endpoints));
            }
            Input::Proxy(other) => log::debug!("proxy: {other:?}"),
            Input::ProxyFailed(e) => {
                log::error!("proxy failed: {e}");
                self.proxy_error = Some(e);
                self.stop("proxy failure", out);
            }
            Input::Signal(name) => self.stop(name, out),
        }
    }

    /// The trigger times (network programming latency) of endpoint sets a change brings that
    /// the state does not hold yet; none before the first complete view (its objects changed
    /// long ago, not now).
    fn new_triggers(&self, c: &Change) -> Vec<u64> {
        if !self.source_synced {
            return Vec::new();
        }
        let objects = match c {
            Change::Upsert(o) => std::slice::from_ref(o),
            Change::Replace(_, objects) => objects.as_slice(),
            _ => &[],
        };
        let held = &self.state.snapshot().endpoints;
        objects
            .iter()
            .filter_map(|o| match o {
                Object::Endpoints(e) => e
                    .trigger_ms
                    .filter(|t| held.get(&(e.source, e.key.clone())).is_none_or(|old| old.trigger_ms != Some(*t))),
                Object::Service(_) => None,
            })
            .collect()
    }

    fn source_synced(&mut self, kind: Kind, out: &mut Vec<Effect>) {
        self.source_kinds.insert(kind);
        let complete = self.source_kinds.contains(&Kind::Service)
            && (self.source_kinds.contains(&Kind::EndpointSlice) || self.source_kinds.contains(&Kind::Endpoints));
        if self.source_synced || !complete {
            return;
        }
        self.source_synced = true;
        self.synced = true;
        self.dirty = true;
        self.cache = None;
        // What the cache stood in for and the source does not list goes (a cache of slices, a
        // source of core/v1 Endpoints).
        for kind in std::mem::take(&mut self.from_cache) {
            if !self.source_kinds.contains(&kind) {
                self.state.apply(Change::Replace(kind, Vec::new()));
            }
        }
        // The first complete view is worth keeping at once.
        self.cache_dirty = true;
        out.push(Effect::SourceSynced);
    }

    /// The source has not delivered within `offlineAfter`: serve the cache, if there is one.
    fn offline_timeout(&mut self, out: &mut Vec<Effect>) {
        if self.source_synced || self.stopping.is_some() {
            return;
        }
        let Some(cache) = self.cache.take() else {
            // Rules an earlier run left would send its services to a proxy that knows none of
            // them: better to let them fall through to kube-proxy (if any) until the source
            // syncs.
            log::warn!("the source has not synced and there is no offline cache: no rules until it does");
            let none = Arc::new(RuleSet::default());
            self.sent = Some(none.clone());
            out.push(Effect::Rules(none));
            return;
        };
        let mut by_kind: std::collections::BTreeMap<Kind, Vec<Object>> = std::collections::BTreeMap::new();
        for o in cache.objects {
            by_kind.entry(o.kind()).or_default().push(o);
        }
        for (kind, objects) in by_kind {
            self.from_cache.insert(kind);
            self.state.apply(Change::Replace(kind, objects));
        }
        self.synced = true;
        self.dirty = true;
        out.push(Effect::ServingCache(cache.written));
    }

    fn stop(&mut self, reason: &'static str, out: &mut Vec<Effect>) {
        if self.stopping.is_none() {
            self.stopping = Some(reason);
            out.push(Effect::Stop(reason));
        }
    }

    /// The end of a batch of inputs: readiness, then one plan if anything changed.
    pub fn settle(&mut self, out: &mut Vec<Effect>) {
        if self.stopping.is_some() {
            return;
        }
        if self.installed && self.synced && self.listening && !self.ready {
            self.ready = true;
            out.push(Effect::Ready);
        }
        if !(self.dirty && self.synced) {
            return;
        }
        self.dirty = false;
        // Entries that did not change stay the very ones the proxy is using.
        let plan = self.state.plan_reusing(&self.table);
        let loops = plan.refused_loops();
        out.push(Effect::Counts(counts(&plan)));
        if loops != self.refused_loops {
            if loops > 0 {
                let names: Vec<&str> = plan
                    .reports
                    .iter()
                    .flat_map(|r| &r.ports)
                    .filter(|p| p.loops > 0)
                    .map(|p| &*p.name)
                    .take(5)
                    .collect();
                log::warn!(
                    "{loops} endpoints refused: they are ClusterIP:ports this node proxies (a loop); in {}",
                    names.join(", ")
                );
            }
            self.refused_loops = loops;
        }
        if self.sent.as_deref() != Some(&plan.rules) {
            log::info!("plan: {} of {} services proxied", plan.proxied().count(), plan.reports.len());
            let rules = Arc::new(plan.rules);
            self.sent = Some(rules.clone());
            out.push(Effect::Rules(rules));
            // In force once the worker has applied them.
            self.triggers_in_flight.append(&mut self.triggers_queued);
        } else if !self.triggers_queued.is_empty() {
            // The rules did not change: the new table (published below) puts it in force.
            out.push(Effect::Programmed(std::mem::take(&mut self.triggers_queued)));
        }
        if *self.table != plan.table {
            self.table = Arc::new(plan.table);
            out.push(Effect::Table(self.table.clone()));
        }
    }
}

/// The gauges' figures of a plan.
fn counts(plan: &crate::state::Plan) -> PlanCounts {
    let mut c = PlanCounts { endpoints_refused_loop: plan.refused_loops(), ..PlanCounts::default() };
    for r in &plan.reports {
        match r.verdict.is_proxied() {
            true => c.services_proxied += 1,
            false => c.services_ignored += 1,
        }
        for p in &r.ports {
            match p.protocol {
                Protocol::Tcp => c.ports_tcp += 1,
                Protocol::Udp => c.ports_udp += 1,
                Protocol::Sctp => c.ports_sctp += 1,
            }
            c.endpoints += p.backends;
            c.no_local_endpoints += usize::from(p.no_local_endpoints);
        }
    }
    // The nftables layout owns one map element per service port and cluster IP.
    match &plan.rules.nft {
        Some(nft) => {
            (c.rules_v4, c.rules_v6) =
                (nft.v4.elements.len() + nft.v4.kernel.len(), nft.v6.elements.len() + nft.v6.kernel.len())
        }
        None => (c.rules_v4, c.rules_v6) = (plan.rules.v4.rules.len(), plan.rules.v6.rules.len()),
    }
    c
}

#[cfg(test)]
#[path = "control_tests.rs"]
mod tests;
