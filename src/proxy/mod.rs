//! The data path: a single-threaded (tokio `current_thread`) TCP and UDP proxy.
//!
//! Owns the sockets of the proxy address: one TCP listener per family on `<listen ip>:<tcp
//! port>` (every TCP service port is DNATed there; the service is recovered from the original
//! destination), and one UDP socket per UDP service port (the port *is* the service). It reads
//! the current [`ProxyTable`] from a `watch` channel for every new connection or flow, so a new
//! table takes effect at once without stopping anything; open connections run on.
//!
//! What it never does: it never touches iptables, routes or addresses (the rules applier and the
//! agent put the proxy address on its device before [`run`]); it never blocks the loop (dials
//! are per-connection tasks with a timeout); it never relays to a destination that is not a
//! proxied service port (no open relay).
//!
//! Layout: `tcp` (listener, dial, relay), `udp` (port sockets, flows), `lb` (pure load
//! balancing), `stats` (counters), `limits` (RLIMIT_NOFILE), `table` (what `state` builds).

pub mod admission;
pub mod lb;
pub mod limits;
pub mod stats;
pub mod table;
mod tcp;
mod udp;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::rand::{self, XorShift};
use lb::Balancer;
use stats::ProxyStats;
use table::{ProxyTable, ServiceEntry};

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
}

impl ProxyConfig {
    /// Would a connection to `addr` come straight back into the proxy?
    fn is_own(&self, addr: SocketAddr) -> bool {
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
}

/// What every task of the proxy shares. Single-threaded, so the mutexes are never contended;
/// no lock is held across an `await`.
pub(crate) struct Shared {
    pub cfg: ProxyConfig,
    pub stats: Arc<ProxyStats>,
    lb: Mutex<(Balancer, XorShift)>,
    /// Time base for the compact per-flow timestamps.
    pub epoch: Instant,
    /// Open TCP connections per client address and in total.
    pub tcp_admission: Mutex<admission::TcpAdmission>,
    /// Descriptors proxied connections and flows may use (soft limit minus the reserve).
    pub fd_budget: u64,
    /// Every UDP flow of every port.
    udp_flows: udp::FlowMap,
}

impl Shared {
    pub fn pick(&self, entry: &ServiceEntry, client: IpAddr, tried: &[SocketAddr]) -> Option<SocketAddr> {
        let mut guard = self.lb.lock().unwrap_or_else(|p| p.into_inner());
        let (lb, rng) = &mut *guard;
        lb.pick(entry, client, tried, Instant::now(), &mut || rng.next_u64())
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
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Put the proxy's mark on an upstream socket. Needs CAP_NET_ADMIN (the agent has it); without
/// it the socket goes unmarked (said once): `state` already keeps loops out of the table, the
/// mark is the second guard.
pub(crate) fn mark_upstream(sock: socket2::SockRef<'_>, mark: u32) {
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
pub(crate) struct TcpAdmitted {
    shared: Arc<Shared>,
    src: IpAddr,
}

impl Drop for TcpAdmitted {
    fn drop(&mut self) {
        self.shared.tcp_admission.lock().unwrap_or_else(|p| p.into_inner()).release(self.src);
    }
}

/// Run the proxy until `shutdown` resolves; open connections and flows are dropped then.
///
/// Must be called inside a tokio runtime (meant for a `current_thread` one; a `LocalSet` is
/// fine). Fails only when the IPv4 TCP listener cannot be bound. `tables` delivers the current
/// table; `events` receives [`ProxyEvent`]s (a closed receiver is ignored); `stats` is updated
/// as traffic flows.
pub async fn run(
    cfg: ProxyConfig,
    tables: watch::Receiver<Arc<ProxyTable>>,
    events: mpsc::UnboundedSender<ProxyEvent>,
    stats: Arc<ProxyStats>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let soft = match limits::raise_nofile() {
        Ok(l) if l.before < l.soft => {
            log::info!("open-file limit raised from {} to {} (hard limit {})", l.before, l.soft, l.hard);
            l.soft
        }
        Ok(l) => {
            log::info!("open-file limit {} (hard limit {})", l.soft, l.hard);
            l.soft
        }
        Err(e) => {
            log::warn!("cannot raise the open-file limit, carrying on: {e}");
            1024
        }
    };
    let fd_budget = admission::fd_budget(soft);
    let seed = rand::seed(0);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        stats,
        lb: Mutex::new((Balancer::new(), XorShift::new(seed))),
        epoch: Instant::now(),
        tcp_admission: Mutex::new(admission::TcpAdmission::new(cfg.tcp_max_per_source)),
        fd_budget,
        udp_flows: Mutex::default(),
    });

    let listeners = tcp::bind(&cfg)?;
    let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    log::info!(
        "proxy listening on {} (TCP); per client address at most {} connections and {} UDP flows; UDP idle timeout {:?}, at most {} flows; {} descriptors for connections and flows; dial timeout {:?} x {} attempts",
        addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        cfg.tcp_max_per_source,
        cfg.udp_max_flows_per_source,
        cfg.udp_idle_timeout,
        cfg.udp_max_flows,
        fd_budget,
        cfg.dial_timeout,
        cfg.dial_attempts
    );
    let mut tasks = JoinSet::new();
    for l in listeners {
        tasks.spawn(tcp::accept_loop(l, tables.clone(), shared.clone()));
    }
    tasks.spawn(udp::reconcile_loop(tables.clone(), events.clone(), shared.clone()));
    tasks.spawn(housekeeping(tables, shared));
    let _ = events.send(ProxyEvent::Listening(addrs));

    shutdown.await;
    // Dropping the tasks drops the listeners, the UDP sockets and every connection task.
    tasks.shutdown().await;
    Ok(())
}

/// Forget load-balancing and counter state of removed services; expire ClientIP affinity.
async fn housekeeping(mut tables: watch::Receiver<Arc<ProxyTable>>, shared: Arc<Shared>) {
    let mut closed = false;
    loop {
        let changed = match closed {
            true => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
            false => match tokio::time::timeout(Duration::from_secs(1), tables.changed()).await {
                Ok(Ok(())) => true,
                Ok(Err(_)) => {
                    closed = true;
                    false
                }
                Err(_) => false,
            },
        };
        let table = tables.borrow().clone();
        let timeouts: HashMap<&str, Option<Duration>> =
            table.tcp.values().chain(table.udp.values()).map(|e| (&*e.name, e.affinity)).collect();
        let mut guard = shared.lb.lock().unwrap_or_else(|p| p.into_inner());
        if changed {
            guard.0.retain(timeouts.keys().copied());
            shared.stats.retain(|n| timeouts.contains_key(n));
        }
        guard.0.expire(Instant::now(), |name| timeouts.get(name).copied().flatten());
    }
}
