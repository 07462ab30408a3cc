//! Operations: health, readiness and Prometheus metrics, served over a tiny HTTP/1.1 endpoint.
//!
//! This module owns the metrics registry ([`Registry`]: counters, gauges and histograms with
//! label sets, rendered in the Prometheus text exposition format 0.0.4), the edgeproxy metric
//! set built on it ([`Metrics`], [`ServiceMetrics`]), the readiness flags ([`Health`]) and the
//! HTTP server ([`Server`]: one std thread, one request per connection, bounded reads, timeouts;
//! `/healthz`, `/readyz`, `/metrics`).
//! Connections are served one at a time: a client that stalls
//! holds the next one back for at most [`IO_TIMEOUT`].
//!
//! Updating a metric is one atomic operation on a handle (`Arc<Counter>` and friends) that the
//! caller creates once, e.g. per service when the proxy table is swapped; only creating or
//! removing a label set and rendering take a lock. This module never decides what the numbers
//! mean: the agent, the rules applier and the proxy update them; it never touches the network
//! beyond its own listener.

use crate::proxy::stats::ProxyStats;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ----------------------------------------------------------------------------------------------
// Metric values

/// A monotonically increasing integer: the same atomic the proxy counts with.
pub use crate::proxy::stats::Counter;

/// A value that goes up and down (an `f64` kept as bits in an atomic).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn add(&self, d: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((f64::from_bits(b) + d).to_bits()));
    }
    pub fn inc(&self) {
        self.add(1.0);
    }
    pub fn dec(&self) {
        self.add(-1.0);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into fixed buckets (upper bounds, ascending), plus sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[f64]>,
    /// Per bucket (not cumulative); the last slot is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum: Gauge,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: Gauge::default(),
            count: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.add(v);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    pub fn sum(&self) -> f64 {
        self.sum.get()
    }
}

// ----------------------------------------------------------------------------------------------
// Registry

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
enum Value {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

/// One label set (values in `label_names` order) and its value.
type Series = (Box<[Box<str>]>, Value);

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    label_names: &'static [&'static str],
    bounds: &'static [f64],
    /// Label values (in `label_names` order) -> value, in creation order.
    series: Mutex<Vec<Series>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the data consistent (every update is one push or
    // one remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Family {
    fn get_or_create(&self, values: &[&str]) -> Value {
        assert_eq!(values.len(), self.label_names.len(), "{}: wrong number of label values", self.name);
        let mut series = lock(&self.series);
        if let Some((_, v)) = series.iter().find(|(k, _)| k.iter().map(|s| &**s).eq(values.iter().copied())) {
            return v.clone();
        }
        let v = match self.kind {
            Kind::Counter => Value::Counter(Arc::default()),
            Kind::Gauge => Value::Gauge(Arc::default()),
            Kind::Histogram => Value::Histogram(Arc::new(Histogram::new(self.bounds))),
        };
        series.push((values.iter().map(|s| Box::from(*s)).collect(), v.clone()));
        v
    }

    /// Drop every series whose label values satisfy `pred`.
    fn remove_where(&self, pred: impl Fn(&[Box<str>]) -> bool) {
        lock(&self.series).retain(|(k, _)| !pred(k));
    }
}

/// A set of metric families, rendered together. Families are registered at start-up by code
/// (names and help text are constants); label *values* may come from the cluster and are
/// escaped when rendered.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<Family>>>,
}

/// A counter family; [`CounterVec::with`] gives the handle for one label set.
#[derive(Debug, Clone)]
pub struct CounterVec(Arc<Family>);
/// A gauge family.
#[derive(Debug, Clone)]
pub struct GaugeVec(Arc<Family>);
/// A histogram family.
#[derive(Debug, Clone)]
pub struct HistogramVec(Arc<Family>);

impl CounterVec {
    /// The counter for these label values (created at 0 the first time).
    pub fn with(&self, values: &[&str]) -> Arc<Counter> {
        match self.0.get_or_create(values) {
            Value::Counter(c) => c,
            _ => unreachable!("a counter family holds counters"),
        }
    }
    /// Forget the series whose value of label `label` is `value`.
    pub fn remove_matching(&self, label: &str, value: &str) {
        remove_matching(&self.0, label, value)
    }
}

impl GaugeVec {
    pub fn with(&self, values: &[&str]) -> Arc<Gauge> {
        match self.0.get_or_create(values) {
            Value::Gauge(g) => g,
            _ => unreachable!("a gauge family holds gauges"),
        }
    }
    pub fn remove_matching(&self, label: &str, value: &str) {
        remove_matching(&self.0, label, value)
    }
}

impl HistogramVec {
    pub fn with(&self, values: &[&str]) -> Arc<Histogram> {
        match self.0.get_or_create(values) {
            Value::Histogram(h) => h,
            _ => unreachable!("a histogram family holds histograms"),
        }
    }
}

fn remove_matching(f: &Family, label: &str, value: &str) {
    if let Some(i) = f.label_names.iter().position(|l| *l == label) {
        f.remove_where(|k| &*k[i] == value);
    }
}

fn valid_name(s: &str, colon_ok: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon_ok && c == ':');
    matches!(chars.next(), Some(c) if first_ok(c)) && chars.all(|c| first_ok(c) || c.is_ascii_digit())
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn register(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        label_names: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Arc<Family> {
        // Names are constants in our code, so a bad one is a programming error, not input.
        assert!(valid_name(name, true), "invalid metric name {name:?}");
        for l in label_names {
            assert!(valid_name(l, false) && !l.starts_with("__"), "invalid label name {l:?} in {name}");
            assert!(!(kind == Kind::Histogram && *l == "le"), "{name}: `le` is reserved for histograms");
        }
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{name}: bucket bounds must ascend");
        let mut families = lock(&self.families);
        assert!(families.iter().all(|f| f.name != name), "metric {name} registered twice");
        let f = Arc::new(Family { name, help, kind, label_names, bounds, series: Mutex::new(Vec::new()) });
        families.push(f.clone());
        f
    }

    pub fn counter_vec(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) -> CounterVec {
        CounterVec(self.register(name, help, Kind::Counter, labels, &[]))
    }
    pub fn gauge_vec(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) -> GaugeVec {
        GaugeVec(self.register(name, help, Kind::Gauge, labels, &[]))
    }
    pub fn histogram_vec(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> HistogramVec {
        HistogramVec(self.register(name, help, Kind::Histogram, labels, bounds))
    }
    /// A counter without labels.
    pub fn counter(&self, name: &'static str, help: &'static str) -> Arc<Counter> {
        self.counter_vec(name, help, &[]).with(&[])
    }
    /// A gauge without labels.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Arc<Gauge> {
        self.gauge_vec(name, help, &[]).with(&[])
    }
    /// A histogram without labels.
    pub fn histogram(&self, name: &'static str, help: &'static str, bounds: &'static [f64]) -> Arc<Histogram> {
        self.histogram_vec(name, help, &[], bounds).with(&[])
    }

    /// Everything, in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let families: Vec<Arc<Family>> = lock(&self.families).clone();
        let mut out = String::with_capacity(4096);
        for f in families {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            let series = lock(&f.series).clone();
            for (values, v) in series {
                let labels = label_text(f.label_names, &values, None);
                match v {
                    Value::Counter(c) => {
                        let _ = writeln!(out, "{}{labels} {}", f.name, c.get());
                    }
                    Value::Gauge(g) => {
                        let _ = writeln!(out, "{}{labels} {}", f.name, fmt_f64(g.get()));
                    }
                    Value::Histogram(h) => render_histogram(&mut out, &f, &values, &h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, f: &Family, values: &[Box<str>], h: &Histogram) {
    // Read the buckets first and derive the count from them, so `_count` always equals the
    // `+Inf` bucket even while other threads observe.
    let mut cumulative = 0u64;
    for (i, b) in h.buckets.iter().enumerate() {
        cumulative += b.load(Ordering::Relaxed);
        let le = h.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| fmt_f64(*b));
        let labels = label_text(f.label_names, values, Some(&le));
        let _ = writeln!(out, "{}_bucket{labels} {cumulative}", f.name);
    }
    let labels = label_text(f.label_names, values, None);
    let _ = writeln!(out, "{}_sum{labels} {}", f.name, fmt_f64(h.sum()));
    let _ = writeln!(out, "{}_count{labels} {cumulative}", f.name);
}

fn label_text(names: &[&str], values: &[Box<str>], le: Option<&str>) -> String {
    if names.is_empty() && le.is_none() {
        return String::new();
    }
    let mut s = String::from("{");
    let mut first = true;
    let pairs = names.iter().copied().zip(values.iter().map(|v| &**v)).chain(le.map(|le| ("le", le)));
    for (n, v) in pairs {
        if !first {
            s.push(',');
        }
        first = false;
        let _ = write!(s, "{n}=\"{}\"", escape_label(v));
    }
    s.push('}');
    s
}

/// Label values: backslash, double quote and line feed are escaped (format 0.0.4).
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text: backslash and line feed are escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust's shortest round-trip form: "1", "0.25", "1e-7", all valid Go ParseFloat input.
        format!("{v}")
    }
}

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
    rules_installed: Arc<Gauge>,
    source_synced: Arc<Gauge>,
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

    /// One rule sync ended. `at` is the wall-clock time, recorded as the last successful sync.
    pub fn rule_sync(&self, ok: bool, took: Duration, at: SystemTime) {
        self.rule_sync_duration.observe_duration(took);
        if ok {
            self.rule_syncs_ok.inc();
            let t = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            self.last_sync.set(t);
        } else {
            self.rule_syncs_failed.inc();
        }
    }

    /// One rule sync failed (the previous rules stay in force).
    pub fn rule_sync_failed(&self) {
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

// ----------------------------------------------------------------------------------------------
// Readiness

/// The two conditions `/readyz` checks.
#[derive(Debug, Default)]
pub struct Health {
    rules_installed: AtomicBool,
    source_synced: AtomicBool,
}

impl Health {
    pub fn set_rules_installed(&self, v: bool) {
        self.rules_installed.store(v, Ordering::Relaxed);
    }
    pub fn set_source_synced(&self, v: bool) {
        self.source_synced.store(v, Ordering::Relaxed);
    }
    /// `Ok` when ready, else the reasons.
    pub fn ready(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if !self.source_synced.load(Ordering::Relaxed) {
            why.push("source not synced");
        }
        if !self.rules_installed.load(Ordering::Relaxed) {
            why.push("rules not installed");
        }
        match why.is_empty() {
            true => Ok(()),
            false => Err(why.join(", ")),
        }
    }
}

/// What the endpoint serves: the metrics, the proxy's counters and the readiness flags.
#[derive(Debug, Default)]
pub struct Ops {
    pub metrics: Metrics,
    /// The data path's counters, rendered at scrape time (the proxy owns and updates them).
    pub proxy: Arc<ProxyStats>,
    pub health: Health,
}

impl Ops {
    pub fn new() -> Arc<Ops> {
        Arc::new(Ops::default())
    }
    pub fn set_rules_installed(&self, v: bool) {
        self.health.set_rules_installed(v);
        self.metrics.rules_installed.set(if v { 1.0 } else { 0.0 });
    }
    pub fn set_source_synced(&self, v: bool) {
        self.health.set_source_synced(v);
        self.metrics.source_synced.set(if v { 1.0 } else { 0.0 });
    }
}

// ----------------------------------------------------------------------------------------------
// HTTP

/// Largest request head we read; anything longer is refused with 431.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request head, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; one more is closed at once (and counted at debug level). Each
/// lives at most 2 x [`IO_TIMEOUT`], so slow clients cannot hold up a health probe: every
/// connection is its own task, none waits for another.
pub const MAX_CONNECTIONS: usize = 512;

/// A running endpoint. Dropping it (or [`Server::shutdown`]) stops the thread.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind `addr` (e.g. `127.0.0.1:10551`) and serve `ops` from a new thread.
    pub fn start(addr: SocketAddr, ops: Arc<Ops>) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("metrics address {addr}: cannot listen: {e}")))?;
        Server::serve(listener, ops)
    }

    /// Serve on an already bound listener (tests bind port 0).
    pub fn serve(listener: TcpListener, ops: Arc<Ops>) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        listener.set_nonblocking(true)?;
        // Its own thread and single-threaded runtime: a slow scrape never touches the proxy loop.
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        let thread = std::thread::Builder::new().name("ops-http".into()).spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return log::error!("ops endpoint: {e}"),
                };
                let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                loop {
                    let conn = listener.accept().await;
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok((stream, peer)) => {
                            if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                                log::debug!("ops endpoint: {MAX_CONNECTIONS} connections open; closed {peer}");
                                continue;
                            }
                            active.fetch_add(1, Ordering::Relaxed);
                            let (ops, active) = (ops.clone(), active.clone());
                            tokio::spawn(async move {
                                match tokio::time::timeout(2 * IO_TIMEOUT, handle(stream, &ops)).await {
                                    Ok(Err(e)) => log::debug!("ops endpoint: {peer}: {e}"),
                                    Err(_) => log::debug!("ops endpoint: {peer}: too slow to take the answer"),
                                    Ok(Ok(())) => {}
                                }
                                active.fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            log::warn!("ops endpoint: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })?;
        Ok(Server { addr, stop, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and join the thread.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
        }
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

/// Parse the head (up to and without the blank line). `Err` carries status and reason.
pub fn parse_head(head: &str) -> Result<Request<'_>, (u16, &'static str)> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((400, "only HTTP/1.x is spoken here"));
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    Ok(Request { method, path })
}

/// The response for a request: status, content type, body.
fn route(req: &Request<'_>, ops: &Ops) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method != "GET" && req.method != "HEAD" {
        return (405, TEXT, "only GET and HEAD\n".into());
    }
    match req.path {
        "/healthz" => (200, TEXT, "ok\n".into()),
        "/readyz" => match ops.health.ready() {
            Ok(()) => (200, TEXT, "ready\n".into()),
            Err(why) => (503, TEXT, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let mut text = ops.metrics.registry.render();
            render_proxy(&ops.proxy, &mut text);
            (200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        _ => (404, TEXT, "not found; try /healthz, /readyz or /metrics\n".into()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Read one request head with a size and a time bound.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Result<String, (u16, &'static str)> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| (400, "request head is not UTF-8"));
        }
        // Some clients (and people with nc) end lines with a bare LF.
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| (400, "request head is not UTF-8"));
        }
        if buf.len() >= MAX_REQUEST {
            return Err((431, "request head too large"));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err((408, "request head not received in time")),
            Ok(Ok(0)) => return Err((400, "connection closed before the request head ended")),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return Err((400, "read error")),
        }
    }
}

async fn handle(mut stream: tokio::net::TcpStream, ops: &Ops) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (status, ctype, body, head_only) = match read_head(&mut stream).await {
        Ok(head) => match parse_head(&head) {
            Ok(req) => {
                let (s, c, b) = route(&req, ops);
                (s, c, b, req.method == "HEAD")
            }
            Err((s, why)) => (s, "text/plain; charset=utf-8", format!("{why}\n"), false),
        },
        Err((s, why)) => (s, "text/plain; charset=utf-8", format!("{why}\n"), false),
    };
    let mut resp = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_and_gauge_render_with_help_type_and_labels() {
        let r = Registry::new();
        let c = r.counter_vec("t_requests_total", "Requests.", &["path"]);
        c.with(&["/a"]).add(3);
        c.with(&["/a"]).inc();
        let g = r.gauge("t_temp", "Temperature\\ with \nnewline.");
        g.set(-1.5);
        assert_eq!(
            r.render(),
            "# HELP t_requests_total Requests.\n# TYPE t_requests_total counter\nt_requests_total{path=\"/a\"} 4\n\
             # HELP t_temp Temperature\\\\ with \\nnewline.\n# TYPE t_temp gauge\nt_temp -1.5\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let r = Registry::new();
        r.counter_vec("t_total", "x", &["service"]).with(&["ns/we\"ird\n"]).inc();
        assert!(r.render().contains("t_total{service=\"ns/we\\\"ird\\n\"} 1\n"), "{}", r.render());
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_inf() {
        let r = Registry::new();
        let h = r.histogram("t_seconds", "x", &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let text = r.render();
        for line in [
            "t_seconds_bucket{le=\"0.1\"} 1",
            "t_seconds_bucket{le=\"1\"} 2",
            "t_seconds_bucket{le=\"+Inf\"} 3",
            "t_seconds_sum 5.55",
            "t_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn same_labels_same_handle_and_remove_matching() {
        let r = Registry::new();
        let v = r.counter_vec("t_total", "x", &["resource"]);
        let a = v.with(&["services"]);
        let b = v.with(&["services"]);
        a.inc();
        b.inc();
        assert_eq!(a.get(), 2);
        assert!(r.render().contains("t_total{resource=\"services\"} 2"));
        v.remove_matching("resource", "services");
        assert!(!r.render().contains("services"));
    }

    #[test]
    fn proxy_counters_render_per_service() {
        let stats = ProxyStats::new();
        stats.service("a/b:http").tcp_ok.add(3);
        let mut out = String::new();
        render_proxy(&stats, &mut out);
        assert!(out.contains("edgeproxy_connections_total{service=\"a/b:http\",outcome=\"ok\"} 3"), "{out}");
        assert!(out.contains("# TYPE edgeproxy_active_connections gauge"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_family_is_a_programming_error() {
        let r = Registry::new();
        r.counter("t_total", "x");
        r.counter("t_total", "x");
    }

    #[test]
    fn readiness_reasons() {
        let ops = Ops::new();
        assert_eq!(ops.health.ready(), Err("source not synced, rules not installed".into()));
        ops.set_source_synced(true);
        assert_eq!(ops.health.ready(), Err("rules not installed".into()));
        ops.set_rules_installed(true);
        assert_eq!(ops.health.ready(), Ok(()));
    }

    #[test]
    fn request_lines() {
        assert_eq!(parse_head("GET /metrics?x=1 HTTP/1.1\r\nHost: a"), Ok(Request { method: "GET", path: "/metrics" }));
        assert_eq!(parse_head("GET /metrics").unwrap_err().0, 400);
        assert_eq!(parse_head("GET / HTTP/2 extra").unwrap_err().0, 400);
        assert_eq!(parse_head("GET / SPDY/3").unwrap_err().0, 400);
        assert_eq!(parse_head("").unwrap_err().0, 400);
    }

    #[test]
    fn floats_render_for_prometheus() {
        assert_eq!(fmt_f64(1.0), "1");
        assert_eq!(fmt_f64(0.005), "0.005");
        assert_eq!(fmt_f64(f64::INFINITY), "+Inf");
        assert_eq!(fmt_f64(f64::NAN), "NaN");
        assert_eq!(fmt_f64(1_763_740_800.25), "1763740800.25");
    }
}
