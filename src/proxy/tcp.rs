//! TCP: the listener every TCP service port is DNATed to, the per-connection dial, and the relay.
//!
//! The accept loop only accepts, reads the original destination and looks it up; everything
//! that can wait (dialling, copying) runs in a task of its own, so one slow backend never stalls
//! another connection. Refusals (not a service port, a loop, no backend, every dial failed) close
//! the client with an RST (SO_LINGER 0), as the kernel would for a closed port.
//!
//! The relay (both directions of a connection, buffers and splice) is `relay.rs`.

use std::future::{poll_fn, Future as _};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::admission::Refusal;
use super::limits::is_fd_exhaustion;
use super::relay::Relay;
use super::shared::{mark_upstream, stopped, ProxyConfig, Shared, TcpAdmitted};
use super::stats::{Counter, Outcome, ServiceCounters};
use super::table::{ProxyTable, ServiceEntry};
use crate::ratelog::{summary, Every};

/// How long accepting pauses when the process or system is out of file descriptors.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);
/// TCP keepalive on both legs of every proxied connection: a peer that vanished (a pod deleted
/// without a FIN, a router rebooted) is found after 60 s idle + 6 probes 10 s apart, and both
/// sockets are closed, instead of holding two descriptors for ever. Idle but alive peers are not
/// disturbed (no idle timeout, like kube-proxy's kernel path).
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// The client's leg has keepalive from the listener for free; the upstream leg gets it (four
/// setsockopt calls) only once the connection has lived this long, so the short connections of
/// request/response traffic never pay for it. A dead upstream is then found at most this much
/// later than with keepalive from the start.
const UPSTREAM_KEEPALIVE_AFTER: Duration = Duration::from_secs(10);

/// Where a worker's listeners sit among the workers' (the same for both families).
#[derive(Clone, Copy, Debug)]
pub(super) struct Seat {
    /// The worker's index (its counters).
    pub worker: usize,
    /// Several workers listen on the address: SO_REUSEPORT.
    pub shared_port: bool,
    /// The CPU the worker is pinned to (`pinWorkers`): SO_INCOMING_CPU then makes the kernel
    /// prefer this listener for connections whose SYN that CPU handled, so a connection stays
    /// on one CPU from its first packet (no wake-up of a thread on another CPU).
    pub cpu: Option<usize>,
}

/// Bind a worker's IPv4 listener (required). Bound on the caller's thread, so a failure stops
/// the start; the worker registers it with its runtime ([`serve_v4`]).
pub(super) fn bind_v4(cfg: &ProxyConfig, seat: Seat) -> io::Result<std::net::TcpListener> {
    let v4 = SocketAddr::from((cfg.listen_v4, cfg.tcp_port));
    listen(v4, seat).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {v4}: {e}")))
}

/// Serve a listener bound by [`bind_v4`] on the worker this runs on.
pub(super) async fn serve_v4(
    listener: std::net::TcpListener,
    seat: Seat,
    tables: watch::Receiver<Arc<ProxyTable>>,
    shared: Arc<Shared>,
) {
    match TcpListener::from_std(listener) {
        Ok(l) => accept_loop(l, seat.worker, tables, shared).await,
        Err(e) => log::error!("a proxy worker cannot take its IPv4 listener: {e}; the others serve"),
    }
}

/// How long the IPv6 listener is retried when its address is not usable yet (tentative, or
/// still being added), and how often.
const V6_RETRY_FOR: Duration = Duration::from_secs(30);
const V6_RETRY_EVERY: Duration = Duration::from_millis(250);

/// Bind the IPv6 listener and serve it; retried for a while when the address is not usable
/// yet (a warning when it never becomes so: IPv6 services are then refused).
pub(super) async fn serve_v6(
    addr: SocketAddr,
    seat: Seat,
    tables: watch::Receiver<Arc<ProxyTable>>,
    shared: Arc<Shared>,
) {
    let started = tokio::time::Instant::now();
    let mut stopping = shared.stopping.clone();
    let listener = loop {
        match listen(addr, seat).and_then(TcpListener::from_std) {
            Ok(l) => break l,
            Err(e) if started.elapsed() >= V6_RETRY_FOR => {
                log::warn!("no IPv6 TCP listener on {addr} ({e}); IPv6 services are refused");
                return;
            }
            Err(e) => {
                log::debug!("IPv6 TCP listener on {addr}: {e}; retrying");
                let nap = tokio::time::sleep(V6_RETRY_EVERY);
                tokio::pin!(nap);
                let stop = stopped(&mut stopping);
                tokio::pin!(stop);
                let stopped_now = poll_fn(|cx| {
                    if stop.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(true);
                    }
                    nap.as_mut().poll(cx).map(|()| false)
                })
                .await;
                if stopped_now {
                    return;
                }
            }
        }
    };
    if started.elapsed() > V6_RETRY_EVERY {
        log::info!("IPv6 TCP listener on {addr} after {:?}", started.elapsed());
    }
    accept_loop(listener, seat.worker, tables, shared).await;
}

fn listen(addr: SocketAddr, seat: Seat) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
    s.set_reuse_address(true)?;
    if seat.shared_port {
        // Every worker's listener on the same address: the kernel spreads connections over them.
        s.set_reuse_port(true)?;
    }
    if let Some(cpu) = seat.cpu {
        if let Err(e) = s.set_cpu_affinity(cpu) {
            log::warn!("SO_INCOMING_CPU {cpu} on a listener of {addr}: {e}; connections are spread by hash");
        }
    }
    // Accepted connections inherit TCP_NODELAY from the listener: one setsockopt per listener
    // instead of one per connection.
    s.set_tcp_nodelay(true)?;
    // Likewise SO_KEEPALIVE and its three timings (the kernel clones the listener's socket).
    s.set_tcp_keepalive(&keepalive())?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Dial `addr` from a socket carrying the proxy's mark (set before the SYN leaves).
pub(super) async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    mark_upstream(&SockRef::from(&sock), mark);
    sock.connect(addr).await
}

/// Close with an RST instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// The destination the client dialled, before the DNAT to the listener (`v6`: the listener's
/// family, known without asking the socket).
fn original_dst(s: &TcpStream, v6: bool) -> io::Result<SocketAddr> {
    let sock = SockRef::from(s);
    let addr = match v6 {
        false => sock.original_dst_v4()?,
        true => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP"))
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    worker: usize,
    tables: watch::Receiver<Arc<ProxyTable>>,
    shared: Arc<Shared>,
) {
    let stats = &shared.stats;
    let mine = stats.worker(worker);
    let mut conns = JoinSet::new();
    let v6 = listener.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut refusal_log = Every::new(std::time::Duration::from_secs(10));
    let mut exhausted_log = Every::new(std::time::Duration::from_secs(10));
    let mut stopping = shared.stopping.clone();
    let stop = stopped(&mut stopping);
    tokio::pin!(stop);
    loop {
        let accepted = poll_fn(|cx| match stop.as_mut().poll(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => listener.poll_accept(cx).map(Some),
        })
        .await;
        let Some(accepted) = accepted else {
            break;
        };
        let (client, peer) = match accepted {
            Ok(c) => c,
            Err(e) if is_fd_exhaustion(&e) => {
                stats.accept_fd_exhausted.inc();
                if let Some(more) = exhausted_log.due(std::time::Instant::now()) {
                    log::warn!("accept: {e}; pausing {FD_EXHAUSTED_PAUSE:?}{}", summary(more));
                }
                tokio::time::sleep(FD_EXHAUSTED_PAUSE).await;
                continue;
            }
            Err(e) => {
                log::debug!("accept: {e}");
                continue;
            }
        };
        stats.tcp_accepted.inc();
        mine.connections.inc();
        while conns.try_join_next().is_some() {}
        let orig = match original_dst(&client, v6) {
            Ok(o) => o,
            Err(e) => {
                log::debug!("{peer}: no original destination ({e}); refused");
                stats.tcp_refused_not_service.inc();
                reset(&client);
                continue;
            }
        };
        let entry = match shared.cfg.is_own(orig) {
            true => None,
            false => tables.borrow().tcp.get(&orig).cloned(),
        };
        let Some(entry) = entry else {
            log::debug!("{peer} -> {orig}: not a proxied service port; refused");
            stats.tcp_refused_not_service.inc();
            reset(&client);
            continue;
        };
        let admitted = match shared.admit_tcp(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                let (counter, why) = match refusal {
                    Refusal::PerSource => {
                        (&stats.tcp_refused_per_source, "its address has tcp.maxConnectionsPerSource open")
                    }
                    Refusal::FdBudget => {
                        (&stats.tcp_refused_fd_budget, "connections and flows use every descriptor but the reserve")
                    }
                };
                counter.inc();
                if let Some(more) = refusal_log.due(std::time::Instant::now()) {
                    log::warn!("{peer} -> {orig} ({}): refused, {why}{}", entry.name, summary(more));
                }
                reset(&client);
                continue;
            }
        };
        conns.spawn(serve(client, peer, entry, shared.clone(), admitted));
    }
    // Stopping: no new connections (the listener closes), and the open ones end (`serve`).
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Observes a relayed connection's duration when dropped (however it ends).
struct Lifetime<'a>(std::time::Instant, &'a super::stats::Latencies);

impl Drop for Lifetime<'_> {
    fn drop(&mut self) {
        self.1.observe(self.0.elapsed());
    }
}

/// Decrements a gauge when dropped (also when the task is aborted at shutdown).
struct Active<'a>(&'a Counter, &'a Counter);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.dec();
        self.1.dec();
    }
}

async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    entry: Arc<ServiceEntry>,
    shared: Arc<Shared>,
    _admitted: TcpAdmitted,
) {
    let stats = &shared.stats;
    let svc = stats.service(&entry.name);
    svc.tcp.store(true, std::sync::atomic::Ordering::Relaxed);
    let upstream = match dial(&entry, peer, &shared, &svc).await {
        Ok(u) => u,
        Err(outcome) => {
            stats.outcome(&svc, outcome);
            reset(&client);
            return;
        }
    };
    stats.outcome(&svc, Outcome::Ok);
    // The client's socket has TCP_NODELAY and keepalive from the listener; the upstream's
    // keepalive comes later (`UPSTREAM_KEEPALIVE_AFTER`, in `relay_until`).
    let _ = upstream.set_nodelay(true);
    stats.total.tcp_active.inc();
    svc.tcp_active.inc();
    let _active = Active(&stats.total.tcp_active, &svc.tcp_active);
    let _lifetime = Lifetime(std::time::Instant::now(), &stats.connection_duration);
    let mut relay = Relay::new(shared.cfg.tcp_buffer, &svc, stats);
    let (mut client, mut upstream) = (client, upstream);
    let mut stopping = shared.stopping.clone();
    let idle = shared.cfg.tcp_idle_timeout;
    match relay_until(&mut relay, &mut client, &mut upstream, idle, &mut stopping).await {
        Ok(End::Done) => {}
        Ok(End::Idle) => {
            stats.tcp_idle_closed.inc();
            log::debug!("{peer} ({}): idle for {idle:?}; closed", entry.name);
            // A FIN both ways: the peers see an orderly close.
            let _ = SockRef::from(&client).shutdown(Shutdown::Both);
            let _ = SockRef::from(&upstream).shutdown(Shutdown::Both);
        }
        Ok(End::Stop(_)) if relay.in_flight() => {
            // Bytes are on their way: an orderly close would claim they arrived. A reset says
            // they did not, and the client retries elsewhere at once.
            log::debug!("{peer} ({}): proxy stopping with bytes in flight; reset", entry.name);
            reset(&client);
            reset(&upstream);
        }
        Ok(End::Stop(fin_wait)) => {
            // Nothing in flight: a FIN both ways (the client sees an ordinary end of stream),
            // then a moment for the client's own FIN, while the rules and the address that carry
            // its packets are still in place.
            let _ = SockRef::from(&client).shutdown(Shutdown::Write);
            let _ = SockRef::from(&upstream).shutdown(Shutdown::Write);
            let _ = tokio::time::timeout(fin_wait, read_to_end(&mut client)).await;
        }
        Err(e) => {
            log::debug!("{peer} ({}): relay ended: {e}", entry.name);
            reset(&client);
            reset(&upstream);
        }
    }
}

/// How a relay ended.
enum End {
    /// Both directions ended (EOF both ways).
    Done,
    /// `tcp.idleTimeout` passed without a byte.
    Idle,
    /// The proxy is stopping (with this FIN wait).
    Stop(Duration),
}

/// Relay until both directions end, the idle timeout passes, or the proxy stops.
async fn relay_until(
    relay: &mut Relay<'_>,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Option<Duration>,
    stopping: &mut watch::Receiver<Option<Duration>>,
) -> io::Result<End> {
    // Read halves read through tokio's `poll_read`, which knows that a short read drained the
    // socket: no extra read that only returns EAGAIN per message.
    let (mut client_r, _) = client.split();
    let (mut upstream_r, _) = upstream.split();
    let stop = stopped(stopping);
    tokio::pin!(stop);
    let arm_keepalive = tokio::time::sleep(UPSTREAM_KEEPALIVE_AFTER);
    tokio::pin!(arm_keepalive);
    let mut keepalive_set = false;
    // One timer, looked at only when it fires: traffic since it was set pushes it on by another
    // `idle` (so an idle connection ends between one and two timeouts after its last byte), and
    // no byte costs a clock read or a timer reset.
    let mut timer = idle.map(|d| Box::pin(tokio::time::sleep(d)));
    let mut seen = 0;
    poll_fn(|cx| {
        if let Poll::Ready(fin_wait) = stop.as_mut().poll(cx) {
            return Poll::Ready(Ok(End::Stop(fin_wait)));
        }
        if let Poll::Ready(r) = relay.poll(cx, &mut client_r, &mut upstream_r) {
            return Poll::Ready(r.map(|()| End::Done));
        }
        if !keepalive_set && arm_keepalive.as_mut().poll(cx).is_ready() {
            keepalive_set = true;
            let _ = SockRef::from(upstream_r.as_ref()).set_tcp_keepalive(&keepalive());
        }
        if let (Some(t), Some(d)) = (timer.as_mut(), idle) {
            while t.as_mut().poll(cx).is_ready() {
                if relay.moved() == seen {
                    return Poll::Ready(Ok(End::Idle));
                }
                seen = relay.moved();
                t.as_mut().reset(tokio::time::Instant::now() + d);
            }
        }
        Poll::Pending
    })
    .await
}

/// Read and drop what a client still sends, until its FIN.
async fn read_to_end(s: &mut TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 1024];
    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Dial a backend: bounded attempts, each with a timeout, each on a backend not tried yet.
async fn dial(
    entry: &ServiceEntry,
    peer: SocketAddr,
    shared: &Shared,
    svc: &ServiceCounters,
) -> Result<TcpStream, Outcome> {
    let stats = &shared.stats;
    let mut tried: Vec<SocketAddr> = Vec::new();
    for _ in 0..shared.cfg.dial_attempts {
        let Some(addr) = shared.pick(entry, peer.ip(), &tried) else {
            break;
        };
        tried.push(addr);
        if shared.cfg.is_own(addr) {
            // `state` never puts such a backend in the table; refuse rather than loop.
            stats.tcp_refused_loop.inc();
            log::warn!("{}: backend {addr} is the proxy itself; refused", entry.name);
            continue;
        }
        let started = std::time::Instant::now();
        let endpoint = stats.endpoint(&entry.name, addr);
        let err = match tokio::time::timeout(shared.cfg.dial_timeout, connect_marked(addr, shared.cfg.mark)).await {
            Ok(Ok(s)) => {
                stats.dial_duration.observe(started.elapsed());
                endpoint.ok.inc();
                shared.dialled(entry, addr, None);
                return Ok(s);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", shared.cfg.dial_timeout),
        };
        endpoint.failed.inc();
        shared.dialled(entry, addr, Some(&err));
        stats.total.dial_failures.inc();
        svc.dial_failures.inc();
        log::debug!("{peer} ({}): dial {addr}: {err}", entry.name);
    }
    Err(match tried.is_empty() {
        true => Outcome::NoEndpoints,
        false => Outcome::DialFailed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets carry TCP_NODELAY and keepalive (with our timings) from the listener.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        rt.block_on(async {
            let alone = Seat { worker: 0, shared_port: false, cpu: None };
            let l = TcpListener::from_std(listen("127.0.0.1:0".parse().unwrap(), alone).unwrap()).unwrap();
            let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (a, _) = l.accept().await.unwrap();
            let s = SockRef::from(&a);
            assert!(s.tcp_nodelay().unwrap());
            assert!(s.keepalive().unwrap());
            assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
            assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
            assert_eq!(s.tcp_keepalive_retries().unwrap(), 6);
        });
    }
}
