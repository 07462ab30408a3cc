//! UDP: one socket per UDP service port on the proxy address, and a flow per client address.
//!
//! A flow is a socket connected to the backend chosen for that client. Datagrams from the client
//! go out on it; datagrams from the backend go back to the client from the service port's
//! listening socket, so conntrack rewrites their source to the ClusterIP:port the client used.
//! A flow ends after `udp_idle_timeout` without traffic either way, and its socket with it;
//! at `udp_max_flows` new flows are dropped and counted. A flow whose backend has left the
//! service is replaced on the client's next datagram.
//!
//! Datagrams are read into one 64 KiB per-thread buffer and sent on at once (dropped and
//! counted if the socket's send buffer is full), so memory does not grow with the flow count
//! beyond the sockets themselves. This module never chooses which ports exist: it binds the
//! ports of the table it is given and reports the ones it cannot bind.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::admission::{new_flow, NewFlow, Refusal};
use super::flow::Flow;
use super::shared::{mark_upstream, ProxyEvent, Shared};
use super::table::ProxyTable;
use crate::ratelog::{summary, Every};
use crate::sys::sockopt;

/// Larger than any UDP payload (65 507 bytes over IPv4, 65 527 over IPv6 without jumbograms).
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams handled per wake-up of one socket before other tasks get a turn.
const BATCH: usize = 64;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// Keeps the bound UDP ports equal to the table's, binding and dropping as tables change. Every
/// port gets one socket per worker (SO_REUSEPORT when there are several), served on that
/// worker's runtime; the kernel's 4-tuple hash keeps a client's datagrams on one of them.
pub(super) async fn reconcile_loop(
    mut tables: watch::Receiver<Arc<ProxyTable>>,
    events: mpsc::UnboundedSender<ProxyEvent>,
    shared: Arc<Shared>,
    workers: Vec<Handle>,
) {
    let mut ports: BTreeMap<u16, Vec<AbortHandle>> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let table = tables.borrow_and_update().clone();
        ports.retain(|port, handles| {
            let keep = table.udp.contains_key(port);
            if !keep {
                handles.iter().for_each(AbortHandle::abort);
                log::info!("UDP port {port} closed");
            }
            keep
        });
        for &port in table.udp.keys() {
            if ports.contains_key(&port) {
                continue;
            }
            match bind(&shared, port, workers.len()) {
                Ok(socks) => {
                    let handles = socks
                        .into_iter()
                        .map(|(i, s)| {
                            let serve = serve_std(s, (port, i), tables.clone(), shared.clone());
                            tasks.spawn_on(serve, &workers[i])
                        })
                        .collect();
                    ports.insert(port, handles);
                }
                Err(e) => {
                    log::warn!("cannot bind UDP proxy port {port}: {e}; asking for another port");
                    let _ = events.send(ProxyEvent::UdpPortUnavailable(port));
                }
            }
        }
        while tasks.try_join_next().is_some() {}
        let _ = events.send(ProxyEvent::UdpPorts(ports.keys().copied().collect()));
        if tables.changed().await.is_err() {
            // No more tables: keep serving the last one until shutdown.
            std::future::pending::<()>().await;
        }
    }
}

/// Per worker (its index, the socket): the IPv4 socket (required) and the IPv6 one (when the
/// IPv6 proxy address is usable).
fn bind(shared: &Shared, port: u16, workers: usize) -> io::Result<Vec<(usize, std::net::UdpSocket)>> {
    let shared_port = workers > 1;
    let mut out = Vec::with_capacity(2 * workers);
    for i in 0..workers {
        out.push((i, udp_socket(SocketAddr::from((shared.cfg.listen_v4, port)), shared_port)?));
    }
    if let Some(ip) = shared.cfg.listen_v6 {
        for i in 0..workers {
            match udp_socket(SocketAddr::from((ip, port)), shared_port) {
                Ok(s) => out.push((i, s)),
                Err(e) => {
                    log::debug!("no IPv6 socket for UDP port {port}: {e}");
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Receive buffer of a service socket: a burst of small datagrams (a resolver's retries from a
/// whole node) must queue, not drop. The kernel default (~208 KiB) holds ~256 small datagrams.
pub(super) const UDP_RCVBUF: usize = 4 << 20;

/// Ask for [`UDP_RCVBUF`]: with SO_RCVBUFFORCE when we have CAP_NET_ADMIN (as the agent does),
/// else SO_RCVBUF, which the kernel caps at net.core.rmem_max.
fn grow_receive_buffer(s: &Socket) {
    if sockopt::force_recv_buffer(s, UDP_RCVBUF).is_err() {
        let _ = s.set_recv_buffer_size(UDP_RCVBUF);
    }
}

/// A service socket (`shared_port`: with SO_REUSEPORT, one of the workers' group).
fn udp_socket(addr: SocketAddr, shared_port: bool) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking().cloexec(), None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if shared_port {
        s.set_reuse_port(true)?;
    }
    grow_receive_buffer(&s);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Serve a socket bound by [`bind`] for `port` on the worker (`worker`) this runs on.
async fn serve_std(
    sock: std::net::UdpSocket,
    (port, worker): (u16, usize),
    tables: watch::Receiver<Arc<ProxyTable>>,
    shared: Arc<Shared>,
) {
    match UdpSocket::from_std(sock) {
        Ok(s) => serve_port(Arc::new(s), (port, worker), tables, shared).await,
        Err(e) => log::warn!("UDP port {port}: a worker cannot take its socket: {e}"),
    }
}

/// Removes a socket's flows from the shared table however its task ends (a closed port aborts
/// it; its flow tasks are aborted with its `JoinSet`).
struct PortFlows {
    shared: Arc<Shared>,
    port: u16,
    v6: bool,
}

impl Drop for PortFlows {
    fn drop(&mut self) {
        let mut table = self.shared.udp_flows.lock().unwrap_or_else(|p| p.into_inner());
        for (_, handle) in table.remove_where(|p, c| p == self.port && c.is_ipv6() == self.v6) {
            handle.abort();
        }
    }
}

/// Serve one listening socket: route client datagrams into flows (creating them as needed).
/// Aborting this task drops the socket and every flow of it.
async fn serve_port(
    sock: Arc<UdpSocket>,
    (port, worker): (u16, usize),
    tables: watch::Receiver<Arc<ProxyTable>>,
    shared: Arc<Shared>,
) {
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let mine = shared.stats.worker(worker);
    let _flows = PortFlows { shared: shared.clone(), port, v6 };
    let mut flow_tasks: JoinSet<()> = JoinSet::new();
    let mut per_source_log = Every::new(Duration::from_secs(10));
    loop {
        if let Err(e) = sock.readable().await {
            log::warn!("UDP port {port}: {e}; closing it");
            return;
        }
        let mut drained = false;
        for _ in 0..BATCH {
            let more = BUF.with(|b| {
                let mut buf = b.borrow_mut();
                match sock.try_recv_from(&mut buf) {
                    Ok((n, client)) => {
                        mine.datagrams.inc();
                        let ctx = PortCtx { port, sock: &sock, tables: &tables, shared: &shared };
                        on_datagram(&buf[..n], client, &ctx, &mut flow_tasks, &mut per_source_log);
                        true
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(e) => {
                        log::debug!("UDP port {port}: receive: {e}");
                        true
                    }
                }
            });
            if !more {
                drained = true;
                break;
            }
        }
        while flow_tasks.try_join_next().is_some() {}
        // A full batch means more may be queued: let the other tasks run before reading on. An
        // emptied socket needs no yield; waiting for readiness gives the others their turn.
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// What every datagram of one service socket needs.
struct PortCtx<'a> {
    port: u16,
    sock: &'a Arc<UdpSocket>,
    tables: &'a watch::Receiver<Arc<ProxyTable>>,
    shared: &'a Arc<Shared>,
}

fn on_datagram(
    data: &[u8],
    client: SocketAddr,
    ctx: &PortCtx<'_>,
    flow_tasks: &mut JoinSet<()>,
    per_source_log: &mut Every,
) {
    let PortCtx { port, sock, tables, shared } = *ctx;
    let stats = &shared.stats;
    let now = shared.now_ms();
    let entry = tables.borrow().udp.get(&port).cloned();
    let Some(entry) = entry else {
        stats.udp_datagrams_dropped.inc();
        return;
    };
    let mut map = shared.udp_flows.lock().unwrap_or_else(|p| p.into_inner());
    // The flow's backend left the service: end the flow, this datagram opens a new one.
    if let Some((flow, handle)) = map.get(port, client) {
        if !entry.upstreams.iter().any(|b| b.addr == flow.backend) {
            handle.abort();
            map.remove(port, client);
        }
    }
    let flow = match map.get(port, client) {
        Some((flow, _)) => flow.clone(),
        None => {
            let cfg = &shared.cfg;
            // Only a new flow needs the descriptor count (no path holds `tcp_admission` while
            // taking `udp_flows`, so taking it here cannot deadlock).
            let fds_free = shared.fds_free();
            match new_flow(&map, client.ip(), cfg.udp_max_flows_per_source, cfg.udp_max_flows, fds_free, |(f, _)| {
                f.last()
            }) {
                NewFlow::Open => {}
                NewFlow::OpenEvicting((p, c)) => {
                    if let Some((_, handle)) = map.remove(p, c) {
                        handle.abort();
                    }
                    stats.udp_flows_evicted.inc();
                }
                NewFlow::Refuse(Refusal::PerSource) => {
                    stats.udp_flows_dropped_per_source.inc();
                    if let Some(more) = per_source_log.due(std::time::Instant::now()) {
                        let n = cfg.udp_max_flows_per_source;
                        log::warn!(
                            "{client} ({}): dropped, its address has {n} UDP flows (udp.maxFlowsPerSource){}",
                            entry.name,
                            summary(more)
                        );
                    }
                    return;
                }
                NewFlow::Refuse(Refusal::FdBudget) => {
                    stats.udp_flows_dropped_at_cap.inc();
                    return;
                }
            }
            let Some(backend) = shared.pick(&entry, client.ip(), &[]) else {
                stats.udp_datagrams_dropped.inc();
                return;
            };
            let upstream = match connect(backend, cfg.mark) {
                Ok(u) => u,
                Err(e) => {
                    log::debug!("{client} ({}): UDP socket to {backend}: {e}", entry.name);
                    stats.udp_datagrams_dropped.inc();
                    return;
                }
            };
            let svc = stats.service(&entry.name);
            let flow = Arc::new(Flow { upstream, backend, last: now.into(), svc });
            stats.udp_flows_active.inc();
            stats.total.udp_flows_created.inc();
            flow.svc.udp_flows_created.inc();
            let handle = flow_tasks.spawn(run_flow(flow.clone(), client, port, sock.clone(), shared.clone()));
            map.insert(port, client, (flow.clone(), handle));
            flow
        }
    };
    drop(map);
    flow.touch(now);
    // A plain non-blocking send: tokio's try_send would refuse until the new socket's first
    // writable event has been seen.
    match SockRef::from(&flow.upstream).send(data) {
        Ok(n) => {
            flow.svc.bytes_to_backend.add(n as u64);
            stats.total.bytes_to_backend.add(n as u64);
        }
        Err(e) => {
            log::debug!("{client} -> {}: {e}", flow.backend);
            stats.udp_datagrams_dropped.inc();
        }
    }
}

/// An unbound socket of the backend's family, carrying the proxy's mark, connected to it (no
/// packet is sent).
fn connect(backend: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let any: SocketAddr = match backend.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = Socket::new(Domain::for_address(backend), Type::DGRAM.nonblocking().cloexec(), None)?;
    // Replies to a burst queue here until the loop relays them.
    grow_receive_buffer(&s);
    mark_upstream(&SockRef::from(&s), mark);
    s.bind(&any.into())?;
    s.connect(&backend.into())?;
    UdpSocket::from_std(s.into())
}

/// Decrements the active-flow gauge however the flow ends.
struct ActiveFlow(Arc<Shared>);

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        self.0.stats.udp_flows_active.dec();
    }
}

/// Relay the backend's replies to the client until the flow is idle for the timeout.
async fn run_flow(flow: Arc<Flow>, client: SocketAddr, port: u16, listener: Arc<UdpSocket>, shared: Arc<Shared>) {
    let _active = ActiveFlow(shared.clone());
    let idle = shared.cfg.udp_idle_timeout;
    let stats = &shared.stats;
    // One timer per flow, moved only when it fires: traffic just updates `flow.last`, so a busy
    // flow costs no timer operation per datagram.
    let expiry = tokio::time::sleep_until((shared.epoch + Duration::from_millis(flow.last()) + idle).into());
    tokio::pin!(expiry);
    loop {
        let mut readable = std::pin::pin!(flow.upstream.readable());
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            expiry.as_mut().poll(cx).map(|()| None)
        })
        .await;
        match ready {
            None => {
                let last = flow.last();
                if shared.now_ms() >= last + u64::try_from(idle.as_millis()).unwrap_or(u64::MAX) {
                    let mut map = shared.udp_flows.lock().unwrap_or_else(|p| p.into_inner());
                    map.remove_if(port, client, |(f, _)| Arc::ptr_eq(f, &flow));
                    stats.udp_flows_expired.inc();
                    return;
                }
                expiry.as_mut().reset((shared.epoch + Duration::from_millis(last) + idle).into());
            }
            Some(Err(e)) => {
                log::debug!("{client} <- {}: {e}", flow.backend);
                return;
            }
            Some(Ok(())) => {
                for _ in 0..BATCH {
                    let more = BUF.with(|b| {
                        let mut buf = b.borrow_mut();
                        match flow.upstream.try_recv(&mut buf) {
                            Ok(n) => {
                                flow.touch(shared.now_ms());
                                match SockRef::from(&*listener).send_to(&buf[..n], &client.into()) {
                                    Ok(n) => {
                                        flow.svc.bytes_to_client.add(n as u64);
                                        stats.total.bytes_to_client.add(n as u64);
                                    }
                                    Err(_) => stats.udp_datagrams_dropped.inc(),
                                }
                                true
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                            // ICMP port unreachable from the backend: nothing to relay.
                            Err(_) => true,
                        }
                    });
                    if !more {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Service sockets get a large receive buffer: all of it as root (CAP_NET_ADMIN, the agent's
    /// case), at least the kernel's cap otherwise.
    #[test]
    fn service_sockets_get_a_large_receive_buffer() {
        let s = udp_socket("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let got = SockRef::from(&s).recv_buffer_size().unwrap();
        if crate::sys::is_root() {
            assert!(got >= UDP_RCVBUF, "root: {got} bytes");
        } else {
            let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
            assert!(got >= UDP_RCVBUF.min(cap), "{got} bytes, rmem_max {cap}");
        }
    }
}
