//! What every task of the proxy shares: its settings ([`ProxyConfig`]), what it tells the agent
//! ([`ProxyEvent`]), and [`Shared`]: the balancer, the admission counts, the descriptor budget
//! and the UDP flow table. Also the one way an upstream socket is marked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::admission;
use super::flow::FlowMap;
use super::health::Health;
use super::lb::Balancer;
use super::stats::ProxyStats;
use super::table::ServiceEntry;
use crate::model::ServicePortName;
use crate::rand::XorShift;

/// What the proxy needs from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The proxy's IPv4 address (must already be on a local device).
    pub listen_v4: Ipv4Addr,
    /// The proxy's IPv6 address; skipped (with a log line) when it cannot be bound.
    pub listen_v6: Option<Ipv6Addr>,
    /// The one TCP port every TCP service port is DNATed to.
    pub tcp_port: u16,
    /// Per attempt; a dial that has not completed by then is abandoned.
    pub dial_timeout: Duration,
    /// Attempts per connection, each on a different backend.
    pub dial_attempts: u32,
    /// Bytes of user-space buffer per direction of a connection that is moving data. Idle
    /// connections hold none: buffers come from a small per-thread pool when data arrives.
    pub tcp_buffer: usize,
    /// A UDP flow (client address -> its upstream socket) ends after this long without a
    /// datagram either way. The default (30 s, from `config`) suits DNS and more: it outlives a
    /// stub resolver's retries on the same socket (glibc: 5 s per try, 2 tries), so a slow
    /// answer still finds its flow, and it equals the kernel's `nf_conntrack_udp_timeout`, past
    /// which the DNAT mapping that makes replies come from the ClusterIP is gone anyway.
    /// EdgeMesh's 250 ms drops any answer slower than that and cuts every longer-lived UDP
    /// exchange (syslog, QUIC, game and VoIP streams). The cost of a long timeout is one socket
    /// per idle flow, bounded by `udp_max_flows`.
    pub udp_idle_timeout: Duration,
    /// At most this many UDP flows at once (all ports); datagrams that would open more are
    /// dropped and counted.
    pub udp_max_flows: usize,
    /// Open TCP connections per client address; more are reset at once (see `admission`).
    pub tcp_max_per_source: usize,
    /// UDP flows per client address; datagrams that would open more are dropped and counted.
    pub udp_max_flows_per_source: usize,
    /// SO_MARK of every upstream socket (0: none); the rules let marked packets pass our
    /// chains, so the proxy cannot dial itself whatever its table says.
    pub mark: u32,
    /// Close a TCP connection after this long without a byte either way (`None`, the default:
    /// never, like kube-proxy's kernel path; keepalive still finds dead peers).
    pub tcp_idle_timeout: Option<Duration>,
    /// Active probes: every TCP endpoint this often (`None`, the default: off; see `probe`).
    pub probe_interval: Option<Duration>,
    /// At most this many probes start per second.
    pub probes_per_second: u32,
    /// How many event loops serve connections and datagrams (see `workers`).
    pub workers: super::workers::Workers,
    /// Pin each worker to a CPU of its own (`pinWorkers`; see `workers::cpus_for`).
    pub pin_workers: bool,
}

impl ProxyConfig {
    /// Would a connection to `addr` come straight back into the proxy?
    pub(super) fn is_own(&self, addr: SocketAddr) -> bool {
        match addr.ip() {
            IpAddr::V4(ip) => {
                ip == self.listen_v4 || ip.is_unspecified() || ip.is_loopback() && addr.port() == self.tcp_port
            }
            IpAddr::V6(ip) => {
                Some(ip) == self.listen_v6 || ip.is_unspecified() || ip.is_loopback() && addr.port() == self.tcp_port
            }
        }
    }
}

/// What the proxy tells the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyEvent {
    /// The TCP listeners are bound (readiness): these addresses.
    Listening(Vec<SocketAddr>),
    /// A UDP port of the table could not be bound; the state machine should allocate another
    /// (`state::Change::UdpPortUnavailable`).
    UdpPortUnavailable(u16),
    /// After each table change: the UDP proxy ports now bound, sorted.
    UdpPorts(Vec<u16>),
    /// The passive health check set an endpoint aside or cleared one: every endpoint set aside
    /// now (its last dial failed), sorted.
    SetAside(Vec<(ServicePortName, SocketAddr)>),
}

/// What every task of every worker shares. Each mutex is held for a short computation, never
/// across an `await`; with one worker they are never contended.
pub(super) struct Shared {
    pub cfg: ProxyConfig,
    pub stats: Arc<ProxyStats>,
    pub(super) lb: Mutex<(Balancer, XorShift, Health)>,
    /// Time base for the compact per-flow timestamps.
    pub epoch: Instant,
    /// Open TCP connections per client address and in total.
    pub tcp_admission: Mutex<admission::TcpAdmission>,
    /// Descriptors proxied connections and flows may use (soft limit minus the reserve).
    pub fd_budget: u64,
    /// Every UDP flow of every port.
    pub(super) udp_flows: FlowMap,
    /// Becomes `Some(how long an ending connection waits for the client's FIN)` when the proxy
    /// stops: listeners close, connections end (see `tcp::serve`).
    pub(super) stopping: tokio::sync::watch::Receiver<Option<std::time::Duration>>,
    /// To the agent (a closed receiver is ignored).
    pub(super) events: tokio::sync::mpsc::UnboundedSender<ProxyEvent>,
}

impl Shared {
    /// A backend for a new connection (see `Balancer::pick`), avoiding endpoints the passive
    /// health check has set aside while others are left.
    pub fn pick(&self, entry: &ServiceEntry, client: IpAddr, tried: &[SocketAddr]) -> Option<SocketAddr> {
        let mut guard = self.lb.lock().unwrap_or_else(|p| p.into_inner());
        let (lb, rng, health) = &mut *guard;
        let now = Instant::now();
        let picked = lb.pick(entry, client, tried, now, &mut || rng.next_u64(), &|a| health.avoid(&entry.name, a, now));
        if let Some(addr) = picked {
            health.chosen(&entry.name, addr, now, self.cfg.dial_timeout + Duration::from_secs(1));
        }
        picked
    }

    /// A dial of `addr` for `entry` succeeded (`failure` None) or failed: the passive health
    /// check. The agent hears of every endpoint set aside or cleared.
    pub fn dialled(&self, entry: &ServiceEntry, addr: SocketAddr, failure: Option<&str>) {
        let mut guard = self.lb.lock().unwrap_or_else(|p| p.into_inner());
        let (_, rng, health) = &mut *guard;
        let counters = self.stats.endpoint(&entry.name, addr);
        let changed = match failure {
            None => {
                let was = health.succeeded(&entry.name, addr);
                if was {
                    log::info!("{}: endpoint {addr} answers again", entry.name);
                }
                was
            }
            Some(error) => {
                let was = health.is_set_aside(&entry.name, addr);
                let backoff = health.failed(&entry.name, addr, Instant::now(), rng.next_u64());
                if was {
                    log::debug!("{}: endpoint {addr} still fails ({error}); set aside for {backoff:?}", entry.name);
                } else {
                    log::warn!(
                        "{}: endpoint {addr} set aside for {backoff:?}: {error}; new connections use the others",
                        entry.name
                    );
                }
                !was
            }
        };
        counters.set_aside.store(failure.is_some(), std::sync::atomic::Ordering::Relaxed);
        if changed {
            self.report_set_aside(health);
        }
    }

    /// Tell the agent which endpoints are set aside now.
    pub(super) fn report_set_aside(&self, health: &Health) {
        let _ = self.events.send(ProxyEvent::SetAside(health.set_aside()));
    }

    /// Admit a TCP connection from `src`; the guard releases it when dropped.
    pub fn admit_tcp(self: &Arc<Self>, src: IpAddr) -> Result<TcpAdmitted, admission::Refusal> {
        let udp_flows = self.stats.udp_flows_active.get();
        let mut a = self.tcp_admission.lock().unwrap_or_else(|p| p.into_inner());
        a.admit(src, self.fd_budget, udp_flows)?;
        Ok(TcpAdmitted { shared: self.clone(), src })
    }

    /// Descriptors still free for flows under the budget.
    pub fn fds_free(&self) -> u64 {
        let tcp = self.tcp_admission.lock().unwrap_or_else(|p| p.into_inner()).open();
        self.fd_budget.saturating_sub(tcp * 2 + self.stats.udp_flows_active.get())
    }

    /// Milliseconds since `epoch`.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Resolves once the proxy is stopping (or whoever could stop it is gone), with the FIN wait.
pub(super) async fn stopped(stopping: &mut tokio::sync::watch::Receiver<Option<Duration>>) -> Duration {
    match stopping.wait_for(Option::is_some).await {
        Ok(d) => d.unwrap_or(Duration::ZERO),
        Err(_) => Duration::ZERO,
    }
}

/// Put the proxy's mark on an upstream socket. Needs CAP_NET_ADMIN (the agent has it); without
/// it the socket goes unmarked (said once): `state` already keeps loops out of the table, the
/// mark is the second guard.
pub(super) fn mark_upstream(sock: &socket2::SockRef<'_>, mark: u32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if mark == 0 {
        return;
    }
    if let Err(e) = sock.set_mark(mark) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!("cannot mark upstream sockets with {mark:#x} ({e}); the loop guard relies on the table alone");
        }
    }
}

/// An admitted TCP connection; releases its place when dropped (however the task ends).
pub(super) struct TcpAdmitted {
    shared: Arc<Shared>,
    src: IpAddr,
}

impl Drop for TcpAdmitted {
    fn drop(&mut self) {
        self.shared.tcp_admission.lock().unwrap_or_else(|p| p.into_inner()).release(self.src);
    }
}
