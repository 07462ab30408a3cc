//! The agent's metric set on the [`Registry`], named after kube-proxy's where kube-proxy has the
//! concept (`edgeproxy_` + kube-proxy's suffix), so its dashboards and alerts carry over: rule
//! syncs (every one, full and partial, the last one and the last queued change), restore
//! failures, the rules we own, network programming latency, the guard, the source (watches,
//! relists, API requests), readiness, and what the current plan holds.
//!
//! The agent feeds it (this module decides nothing); the proxy's counters and the process's own
//! figures are rendered at scrape time by `proxy_metrics` and `process`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::registry::{Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramVec, Registry};

/// Bucket bounds (seconds) for rule sync durations: iptables-restore takes ~5 ms to seconds.
pub const SYNC_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bucket bounds (seconds) for network programming latency (kube-proxy's, shortened).
pub const PROGRAMMING_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
/// Bucket bounds (seconds) for API requests (a watch lasts its timeoutSeconds).
pub const REQUEST_BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 600.0];

/// What the current plan holds, for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanCounts {
    pub services_proxied: usize,
    pub services_ignored: usize,
    pub ports_tcp: usize,
    pub ports_udp: usize,
    pub ports_sctp: usize,
    /// Usable upstreams over all proxied ports.
    pub endpoints: usize,
    pub endpoints_refused_loop: usize,
    /// Ports of `internalTrafficPolicy: Local` services with no endpoint on this node.
    pub no_local_endpoints: usize,
    pub rules_v4: usize,
    pub rules_v6: usize,
}

/// The rule sync families, kube-proxy's names with our prefix.
#[derive(Debug)]
struct SyncFamilies {
    sync_duration: Arc<Histogram>,
    sync_full: Arc<Histogram>,
    sync_partial: Arc<Histogram>,
    last_sync: Arc<Gauge>,
    last_queued: Arc<Gauge>,
    restore_failures: Arc<Counter>,
    rules: GaugeVec,
    programming: Arc<Histogram>,
    guard_checks: Arc<Counter>,
}

impl SyncFamilies {
    fn register(r: &Registry) -> SyncFamilies {
        SyncFamilies {
            sync_duration: r.histogram(
                "edgeproxy_sync_proxy_rules_duration_seconds",
                "Time one rule sync took (a change, the periodic resync, a retry), successful or not.",
                SYNC_BUCKETS,
            ),
            sync_full: r.histogram(
                "edgeproxy_sync_full_proxy_rules_duration_seconds",
                "Time a full rewrite of the rules took (start, resync, after a failure or a repair).",
                SYNC_BUCKETS,
            ),
            sync_partial: r.histogram(
                "edgeproxy_sync_partial_proxy_rules_duration_seconds",
                "Time a sync of only the chains that changed took.",
                SYNC_BUCKETS,
            ),
            last_sync: r.gauge(
                "edgeproxy_sync_proxy_rules_last_timestamp_seconds",
                "Unix time the rules were last known to be right: a sync, the periodic resync, or a guard \
                     check that found them in place; 0 before the first.",
            ),
            last_queued: r.gauge(
                "edgeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "Unix time a change of the rules was last handed to the rules worker; later than the last \
                     sync while it waits.",
            ),
            restore_failures: r.counter(
                "edgeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "Rule syncs that failed (iptables-restore refused the input, or could not run).",
            ),
            rules: r.gauge_vec(
                "edgeproxy_sync_proxy_rules_iptables",
                "Rules edgeproxy owns in the nat table, by family and layout.",
                &["family", "layout"],
            ),
            programming: r.histogram(
                "edgeproxy_network_programming_duration_seconds",
                "From an endpoints change (the EndpointSlice's last-change-trigger-time) to it being in force.",
                PROGRAMMING_BUCKETS,
            ),
            guard_checks: r.counter(
                "edgeproxy_guard_checks_total",
                "Guard checks of edgeproxy's jumps and chains (every guard period while rules are installed).",
            ),
        }
    }
}

/// Every metric of the agent, registered in [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    sync: SyncFamilies,
    /// Times the guard found our rules missing or changed and put them back.
    pub guard_repairs: Arc<Counter>,
    watch_restarts: CounterVec,
    relists: CounterVec,
    requests: CounterVec,
    request_duration: HistogramVec,
    pub(super) rules_installed: Arc<Gauge>,
    pub(super) source_synced: Arc<Gauge>,
    pub(super) serving_cache: Arc<Gauge>,
    services: GaugeVec,
    ports: GaugeVec,
    endpoints: Arc<Gauge>,
    /// Endpoints left out of the current plan because they would loop back into the proxy.
    pub endpoints_refused_loop: Arc<Gauge>,
    no_local_endpoints: Arc<Gauge>,
    refused: CounterVec,
    /// The sums last reported per service port, so that the counters move by the difference.
    refused_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn unix(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let info =
            r.gauge_vec("edgeproxy_build_info", "Version and target of this binary; always 1.", &["version", "target"]);
        let target = option_env!("EDGEPROXY_TARGET").unwrap_or("unknown");
        info.with(&[env!("CARGO_PKG_VERSION"), target]).set(1.0);
        let no_local = r.gauge_vec(
            "edgeproxy_sync_proxy_rules_no_local_endpoints",
            "Service ports with internalTrafficPolicy: Local and no endpoint on this node (refused).",
            &["traffic_policy"],
        );
        Metrics {
            sync: SyncFamilies::register(&r),
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
            requests: r.counter_vec(
                "edgeproxy_rest_client_requests_total",
                "Requests to the API server or MetaServer, by verb (LIST, WATCH) and HTTP code (\"<error>\": none).",
                &["verb", "code"],
            ),
            request_duration: r.histogram_vec(
                "edgeproxy_rest_client_request_duration_seconds",
                "Time to an API request's response head, by verb.",
                &["verb"],
                REQUEST_BUCKETS,
            ),
            rules_installed: r.gauge("edgeproxy_rules_installed", "1 when the nat rules are installed."),
            source_synced: r.gauge(
                "edgeproxy_source_synced",
                "1 when the source has delivered a complete view of Services and endpoints.",
            ),
            serving_cache: r.gauge(
                "edgeproxy_serving_offline_cache",
                "1 while the agent serves the offline cache because the source has not synced since the start.",
            ),
            services: r.gauge_vec("edgeproxy_services", "Services held, by verdict (proxied, ignored).", &["verdict"]),
            ports: r.gauge_vec("edgeproxy_service_ports", "Proxied service ports, by protocol.", &["protocol"]),
            endpoints: r.gauge("edgeproxy_endpoints", "Usable upstreams over all proxied service ports."),
            endpoints_refused_loop: r.gauge(
                "edgeproxy_endpoints_refused_loop",
                "Endpoints left out of the current plan because they are the proxy's own address or a \
                 ClusterIP:port this node proxies (they would loop back into the proxy).",
            ),
            no_local_endpoints: no_local.with(&["internal"]),
            refused: r.counter_vec(
                "edgeproxy_no_endpoints_refused_total",
                "Connections the kernel refused because their service port had no endpoint, read from the \
                 reject rules' counters whenever their chain is rewritten (at the latest every resync period).",
                &["namespace", "service", "port"],
            ),
            refused_seen: std::sync::Mutex::default(),
            registry: r,
        }
    }

    /// A sync ended well at `at`: `full` a full rewrite, `Some(false)` a minimal one, `None`
    /// nothing needed writing.
    pub fn sync_ok(&self, took: Duration, full: Option<bool>, at: SystemTime) {
        self.sync.sync_duration.observe_duration(took);
        match full {
            Some(true) => self.sync.sync_full.observe_duration(took),
            Some(false) => self.sync.sync_partial.observe_duration(took),
            None => {}
        }
        self.sync.last_sync.set(unix(at));
    }

    /// The periodic resync (`resync`) or a guard check found or put the rules right at `at`.
    pub fn sync_confirmed(&self, resync: bool, took: Duration, at: SystemTime) {
        if resync {
            self.sync.sync_duration.observe_duration(took);
            self.sync.sync_full.observe_duration(took);
        } else {
            self.sync.guard_checks.inc();
        }
        self.sync.last_sync.set(unix(at));
    }

    /// One rule sync failed after `took` (the previous rules stay in force).
    pub fn sync_failed(&self, took: Duration) {
        self.sync.sync_duration.observe_duration(took);
        self.sync.restore_failures.inc();
    }

    /// A change was handed to the rules worker at `at`.
    pub fn queued(&self, at: SystemTime) {
        self.sync.last_queued.set(unix(at));
    }

    /// An endpoints change is in force, `took` after its trigger time.
    pub fn programmed(&self, took: Duration) {
        self.sync.programming.observe_duration(took);
    }

    /// A watch of `resource` (`services`, `endpointslices`, `endpoints`) ended and restarts.
    pub fn watch_restart(&self, resource: &str) {
        self.watch_restarts.with(&[resource]).inc();
    }

    /// `resource` is listed again from scratch.
    pub fn relist(&self, resource: &str) {
        self.relists.with(&[resource]).inc();
    }

    /// An API request: `code` is the HTTP status, `None` when none came back.
    pub fn request(&self, verb: &str, code: Option<u16>, took: Duration) {
        let code = code.map_or_else(|| "<error>".to_string(), |c| c.to_string());
        self.requests.with(&[verb, &code]).inc();
        self.request_duration.with(&[verb]).observe_duration(took);
    }

    /// The kernel's refusals so far per service port (sums that only grow).
    pub fn refused(&self, sums: &[(String, u64)]) {
        let mut seen = self.refused_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, sum) in sums {
            let before = seen.insert(name.clone(), *sum).unwrap_or(0);
            let (ns, rest) = name.split_once('/').unwrap_or(("", name));
            let (svc, port) = rest.split_once(':').unwrap_or((rest, ""));
            self.refused.with(&[ns, svc, port]).add(sum.saturating_sub(before));
        }
    }

    /// What the current plan holds.
    pub fn plan(&self, c: &PlanCounts, layout: &str) {
        self.services.with(&["proxied"]).set(Gauge::count(c.services_proxied));
        self.services.with(&["ignored"]).set(Gauge::count(c.services_ignored));
        self.ports.with(&["TCP"]).set(Gauge::count(c.ports_tcp));
        self.ports.with(&["UDP"]).set(Gauge::count(c.ports_udp));
        self.ports.with(&["SCTP"]).set(Gauge::count(c.ports_sctp));
        self.endpoints.set(Gauge::count(c.endpoints));
        self.endpoints_refused_loop.set(Gauge::count(c.endpoints_refused_loop));
        self.no_local_endpoints.set(Gauge::count(c.no_local_endpoints));
        self.sync.rules.with(&["ipv4", layout]).set(Gauge::count(c.rules_v4));
        self.sync.rules.with(&["ipv6", layout]).set(Gauge::count(c.rules_v6));
    }
}
