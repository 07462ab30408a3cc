//! Counters of the data path, for logs, tests and the metrics endpoint.
//!
//! Owns plain atomics (relaxed: they are statistics, not synchronisation). Per-service counters
//! live in a map keyed by the service port's name; a connection or flow looks its counters up
//! once, at its start, and keeps the `Arc`. This module never does I/O and never formats text.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use portable_atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A monotonic counter or a gauge.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// For gauges.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds (seconds) of [`Latencies`]: dials take ~0.1 ms on a LAN to the dial timeout;
/// connections live from milliseconds to days.
pub const LATENCY_BOUNDS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 60.0, 600.0];

/// A histogram of durations in fixed buckets: one atomic add per bucket and one for the sum per
/// observation (rendered cumulatively by the metrics endpoint).
#[derive(Debug, Default)]
pub struct Latencies {
    /// Per bucket of [`LATENCY_BOUNDS`] (not cumulative), then +Inf.
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Latencies {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BOUNDS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bound (then +Inf, the total), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                acc += c.load(Ordering::Relaxed);
                acc
            })
            .collect();
        // Microseconds to seconds: a float of a count of microseconds.
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, sum)
    }
}

/// A service port's name and one of its endpoints.
pub type EndpointKey = (Box<str>, SocketAddr);

/// Dials to one endpoint of one service port.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    pub ok: Counter,
    pub failed: Counter,
    /// Set aside by the passive health check (its last dial failed).
    pub set_aside: AtomicBool,
}

/// Why a TCP connection ended the way it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Dialled a backend and relayed.
    Ok,
    /// The service port has no usable backend (the reject rule normally catches these first).
    NoEndpoints,
    /// Every dial attempt failed or timed out.
    DialFailed,
}

/// Counters of one service port (`namespace/name[:port]`).
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// TCP connections by outcome.
    pub tcp_ok: Counter,
    pub tcp_no_endpoints: Counter,
    pub tcp_dial_failed: Counter,
    /// Failed dial attempts (a connection that succeeds on its second attempt counts one).
    pub dial_failures: Counter,
    /// Open relayed TCP connections (gauge).
    pub tcp_active: Counter,
    /// Bytes client -> backend and backend -> client (TCP payload and UDP datagrams).
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
    pub udp_flows_created: Counter,
    /// A TCP port (the TCP series are rendered for it; a UDP-only port has none).
    pub tcp: AtomicBool,
}

impl ServiceCounters {
    pub fn outcome(&self, o: Outcome) -> &Counter {
        match o {
            Outcome::Ok => &self.tcp_ok,
            Outcome::NoEndpoints => &self.tcp_no_endpoints,
            Outcome::DialFailed => &self.tcp_dial_failed,
        }
    }
}

/// What one worker (event loop) handled: each worker adds to its own, so these never bounce
/// between cores; the totals elsewhere are their sums.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Connections its listener accepted.
    pub connections: Counter,
    /// Datagrams its UDP service sockets received from clients.
    pub datagrams: Counter,
}

/// Everything the proxy counts.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted on the TCP listener(s).
    pub tcp_accepted: Counter,
    /// Refused: the original destination is not a proxied service port (a direct connection to
    /// the proxy port, a stale DNAT, no conntrack entry).
    pub tcp_refused_not_service: Counter,
    /// Refused: the chosen backend is the proxy's own address (a loop).
    pub tcp_refused_loop: Counter,
    /// Refused: the client address had `tcp.maxConnectionsPerSource` connections open.
    pub tcp_refused_per_source: Counter,
    /// Refused: connections and flows would use the descriptors kept in reserve.
    pub tcp_refused_fd_budget: Counter,
    /// Connections closed after `tcp.idleTimeout` without a byte either way.
    pub tcp_idle_closed: Counter,
    /// Active probes (`tcp.probeInterval`) that reached their endpoint, and that did not.
    pub probes_ok: Counter,
    pub probes_failed: Counter,
    /// Sums over all services, so the totals survive a service's removal.
    pub total: ServiceCounters,
    /// Times accepting paused because the process or system ran out of file descriptors.
    pub accept_fd_exhausted: Counter,
    pub udp_flows_active: Counter,
    pub udp_flows_expired: Counter,
    /// Datagrams that would have opened a flow beyond the cap.
    pub udp_flows_dropped_at_cap: Counter,
    /// Datagrams that would have opened a flow beyond `udp.maxFlowsPerSource`.
    pub udp_flows_dropped_per_source: Counter,
    /// Flows ended early to make room at the cap (the least recently active one each time).
    pub udp_flows_evicted: Counter,
    /// Datagrams dropped for any other reason (no backend, send buffer full, socket error).
    pub udp_datagrams_dropped: Counter,
    services: Mutex<HashMap<Box<str>, Arc<ServiceCounters>>>,
    /// Successful dials.
    pub dial_duration: Latencies,
    /// Relayed TCP connections, from the dial's success to the end.
    pub connection_duration: Latencies,
    /// Dials per (service port, endpoint): bounded by the table, pruned with it.
    endpoints: Mutex<HashMap<EndpointKey, Arc<EndpointCounters>>>,
    /// Per worker, in worker order (as many as the proxy started).
    workers: Mutex<Vec<Arc<WorkerCounters>>>,
}

impl ProxyStats {
    pub fn new() -> ProxyStats {
        ProxyStats::default()
    }

    /// The counters of one service port, created on first use.
    pub fn service(&self, name: &str) -> Arc<ServiceCounters> {
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(name) {
            return c.clone();
        }
        let c = Arc::new(ServiceCounters::default());
        map.insert(name.into(), c.clone());
        c
    }

    /// A copy of the per-service map (for the metrics endpoint and tests).
    pub fn services(&self) -> Vec<(Box<str>, Arc<ServiceCounters>)> {
        let map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, c)| (k.clone(), c.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Drop the counters of services no longer in the table and with nothing open.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, c| keep(name) || c.tcp_active.get() > 0 || Arc::strong_count(c) > 1);
    }

    /// The dial counters of one endpoint of a service port, created on first use.
    pub fn endpoint(&self, service: &str, addr: SocketAddr) -> Arc<EndpointCounters> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((service.into(), addr)).or_default().clone()
    }

    /// A copy of the per-endpoint map, sorted (for the metrics endpoint).
    pub fn endpoints(&self) -> Vec<(EndpointKey, Arc<EndpointCounters>)> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, c)| (k.clone(), c.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Drop the counters of endpoints that are no longer upstreams of a service port.
    pub fn retain_endpoints(&self, keep: impl Fn(&str, SocketAddr) -> bool) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(name, addr), _| keep(name, *addr));
    }

    /// The counters of worker `i`, created (with those before it) on first use.
    pub fn worker(&self, i: usize) -> Arc<WorkerCounters> {
        let mut v = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        while v.len() <= i {
            v.push(Arc::default());
        }
        v[i].clone()
    }

    /// Every worker's counters, in worker order (for the metrics endpoint and tests).
    pub fn workers(&self) -> Vec<Arc<WorkerCounters>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Count one finished connection setup, per service and in total.
    pub(crate) fn outcome(&self, svc: &ServiceCounters, o: Outcome) {
        svc.outcome(o).inc();
        self.total.outcome(o).inc();
    }
}
