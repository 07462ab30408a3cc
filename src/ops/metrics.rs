//! The edgeproxy metric set on the [`Registry`]: rule syncs, the guard, the source's watches and
//! relists, readiness gauges; and the proxy's counters, rendered from `ProxyStats` at scrape
//! time so that the data path pays one atomic add per event and nothing else.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::registry::{escape_label, Counter, CounterVec, Gauge, Histogram, Registry};
use crate::proxy::stats::ProxyStats;

// ----------------------------------------------------------------------------------------------
// The edgeproxy metric set
/// Bucket bounds (seconds) for rule sync durations: iptables-restore takes ~5 ms to seconds.
pub const SYNC_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric edgeproxy exports, registered in [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    rule_syncs_ok: Arc<Counter>,
    rule_syncs_failed: Arc<Counter>,
    rule_sync_duration: Arc<Histogram>,
    /// Times the guard found our rules missing or changed and put them back.
    pub guard_repairs: Arc<Counter>,
    watch_restarts: CounterVec,
    relists: CounterVec,
    last_sync: Arc<Gauge>,
    pub(super) rules_installed: Arc<Gauge>,
    pub(super) source_synced: Arc<Gauge>,
    /// Endpoints left out of the current plan because they would loop back into the proxy.
    pub endpoints_refused_loop: Arc<Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let info =
            r.gauge_vec("edgeproxy_build_info", "Version and target of this binary; always 1.", &["version", "target"]);
        let target = option_env!("EDGEPROXY_TARGET").unwrap_or("unknown");
        info.with(&[env!("CARGO_PKG_VERSION"), target]).set(1.0);
        let syncs =
            r.counter_vec("edgeproxy_rule_syncs_total", "Rule syncs (iptables-restore runs) by result.", &["result"]);
        Metrics {
            rule_syncs_ok: syncs.with(&["ok"]),
            rule_syncs_failed: syncs.with(&["error"]),
            rule_sync_duration: r.histogram(
                "edgeproxy_rule_sync_duration_seconds",
                "Time one rule sync took, successful or not.",
                SYNC_BUCKETS,
            ),
            guard_repairs: r.counter(
                "edgeproxy_guard_repairs_total",
                "Times the guard found edgeproxy's rules missing or changed and restored them.",
            ),
            watch_restarts: r.counter_vec(
                "edgeproxy_watch_restarts_total",
                "Watches of the API server that ended and were started again, by resource.",
                &["resource"],
            ),
            relists: r.counter_vec(
                "edgeproxy_relists_total",
                "Full lists after the first one (expired resourceVersion, errors, poll mode), by resource.",
                &["resource"],
            ),
            last_sync: r.gauge(
                "edgeproxy_last_successful_sync_timestamp_seconds",
                "Unix time of the last rule sync that succeeded; 0 before the first.",
            ),
            rules_installed: r.gauge("edgeproxy_rules_installed", "1 when the nat rules are installed."),
            source_synced: r.gauge(
                "edgeproxy_source_synced",
                "1 when the source has delivered a complete view of Services and endpoints.",
            ),
            endpoints_refused_loop: r.gauge(
                "edgeproxy_endpoints_refused_loop",
                "Endpoints left out of the current plan because they are the proxy's own address or a \
                 ClusterIP:port this node proxies (they would loop back into the proxy).",
            ),
            registry: r,
        }
    }

    /// One rule sync succeeded. `at` is the wall-clock time, recorded as the last successful sync.
    pub fn rule_sync_ok(&self, took: Duration, at: SystemTime) {
        self.rule_sync_duration.observe_duration(took);
        self.rule_syncs_ok.inc();
        self.last_sync.set(at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    }

    /// One rule sync failed after `took` (the previous rules stay in force).
    pub fn rule_sync_failed(&self, took: Duration) {
        self.rule_sync_duration.observe_duration(took);
        self.rule_syncs_failed.inc();
    }

    /// A watch of `resource` (`services`, `endpointslices`, `endpoints`) ended and restarts.
    pub fn watch_restart(&self, resource: &str) {
        self.watch_restarts.with(&[resource]).inc();
    }

    /// `resource` is listed again from scratch.
    pub fn relist(&self, resource: &str) {
        self.relists.with(&[resource]).inc();
    }
}

/// The proxy's counters in the text format: per service port (`namespace/name[:port]`) and in
/// total. Rendered from [`ProxyStats`] at scrape time, so the data path pays one atomic add per
/// event and nothing else.
pub fn render_proxy(stats: &ProxyStats, out: &mut String) {
    use std::fmt::Write as _;
    let services = stats.services();
    let mut family = |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let svc = |n: &str| format!("service=\"{}\"", escape_label(n));
    family(
        "edgeproxy_connections_total",
        "counter",
        "Proxied TCP connections by service port and outcome (ok, no_endpoints, dial_failed).",
        &mut services.iter().flat_map(|(n, c)| {
            [
                ("ok", c.tcp_ok.get()),
                ("no_endpoints", c.tcp_no_endpoints.get()),
                ("dial_failed", c.tcp_dial_failed.get()),
            ]
            .map(|(o, v)| (format!("{{{},outcome=\"{o}\"}}", svc(n)), v))
        }),
    );
    family(
        "edgeproxy_connections_refused_total",
        "counter",
        "TCP connections refused by the proxy itself: not a proxied service port, a loop, the client address's connection cap, or the descriptor reserve.",
        &mut [
            ("not_a_service", stats.tcp_refused_not_service.get()),
            ("loop", stats.tcp_refused_loop.get()),
            ("per_source", stats.tcp_refused_per_source.get()),
            ("fd_budget", stats.tcp_refused_fd_budget.get()),
        ]
            .into_iter()
            .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), v)),
    );
    family(
        "edgeproxy_connections_idle_closed_total",
        "counter",
        "TCP connections closed after tcp.idleTimeout without a byte either way (off unless set).",
        &mut std::iter::once((String::new(), stats.tcp_idle_closed.get())),
    );
    family(
        "edgeproxy_bytes_total",
        "counter",
        "Bytes relayed by service port and direction (to_backend, to_client), TCP and UDP.",
        &mut services.iter().flat_map(|(n, c)| {
            [("to_backend", c.bytes_to_backend.get()), ("to_client", c.bytes_to_client.get())]
                .map(|(d, v)| (format!("{{{},direction=\"{d}\"}}", svc(n)), v))
        }),
    );
    family(
        "edgeproxy_active_connections",
        "gauge",
        "Open relayed TCP connections by service port.",
        &mut services.iter().map(|(n, c)| (format!("{{{}}}", svc(n)), c.tcp_active.get())),
    );
    family(
        "edgeproxy_dial_failures_total",
        "counter",
        "Failed attempts to reach a backend, by service port (one connection may make several).",
        &mut services.iter().map(|(n, c)| (format!("{{{}}}", svc(n)), c.dial_failures.get())),
    );
    family(
        "edgeproxy_udp_flows",
        "gauge",
        "Live UDP flows (one per client address and service port).",
        &mut std::iter::once((String::new(), stats.udp_flows_active.get())),
    );
    family(
        "edgeproxy_udp_flow_events_total",
        "counter",
        "UDP flows created, expired, evicted to make room at the cap, and refused (per client address cap; no descriptor left).",
        &mut [
            ("created", stats.total.udp_flows_created.get()),
            ("expired", stats.udp_flows_expired.get()),
            ("evicted", stats.udp_flows_evicted.get()),
            ("dropped_per_source", stats.udp_flows_dropped_per_source.get()),
            ("dropped_at_cap", stats.udp_flows_dropped_at_cap.get()),
        ]
        .into_iter()
        .map(|(e, v)| (format!("{{event=\"{e}\"}}"), v)),
    );
    family(
        "edgeproxy_accept_paused_total",
        "counter",
        "Times accepting paused because file descriptors ran out.",
        &mut std::iter::once((String::new(), stats.accept_fd_exhausted.get())),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_counters_render_per_service() {
        let stats = ProxyStats::new();
        stats.service("a/b:http").tcp_ok.add(3);
        let mut out = String::new();
        render_proxy(&stats, &mut out);
        assert!(out.contains("edgeproxy_connections_total{service=\"a/b:http\",outcome=\"ok\"} 3"), "{out}");
        assert!(out.contains("# TYPE edgeproxy_active_connections gauge"));
    }
}
