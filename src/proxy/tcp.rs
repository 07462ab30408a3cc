//! TCP: the listener every TCP service port is DNATed to, the per-connection dial, and the relay.
//!
//! The accept loop only accepts, reads the original destination and looks it up; everything
//! that can wait (dialling, copying) runs in a task of its own, so one slow backend never stalls
//! another connection. Refusals (not a service port, a loop, no backend, every dial failed) close
//! the client with an RST (SO_LINGER 0), as the kernel would for a closed port.
//!
//! The relay copies both ways with half-close: when one side's read ends, writing is shut down
//! on the other and the opposite direction carries on until it ends too. An error on either side
//! (a reset) resets the other. Small messages are copied through a buffer of `tcp_buffer` bytes;
//! once a read fills the whole buffer (a bulk transfer), that direction switches to splice(2)
//! through a kernel pipe (socket -> pipe -> socket, no copy to user space) until a splice moves
//! less than a buffer's worth again. When no pipe can be had (out of descriptors) it copies. Memory and descriptors are bounded: a pipe or
//! buffer per direction only while data is in flight, none while idle (both go back to small
//! per-thread pools), and backpressure comes from not reading while the pipe or buffer is
//! unwritten.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use std::pin::Pin;

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::tcp::ReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::admission::Refusal;
use super::limits::is_fd_exhaustion;
use super::stats::{Counter, Outcome, ServiceCounters};
use super::table::{ProxyTable, ServiceEntry};
use super::{ProxyConfig, Shared, TcpAdmitted};
use crate::ratelog::{summary, Every};

/// How long accepting pauses when the process or system is out of file descriptors.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);
/// Idle buffers (and idle pipes) kept per thread for reuse.
const POOL_MAX: usize = 64;
/// Most bytes one splice(2) moves; the pipe's capacity caps it further.
const SPLICE_MAX: usize = 1 << 20;
/// The capacity asked for the kernel pipes of bulk transfers: the default fs.pipe-max-size.
/// Measured with the benchmark (single stream, 2 rounds): 64 KiB (the kernel default) 0.63x of
/// kernel DNAT at 0.49 CPU-s/GB, 256 KiB 0.75x at 0.45, 1 MiB 0.89x at 0.38.
const PIPE_SIZE: usize = 1 << 20;
/// Pipes of `PIPE_SIZE` alive at once (in use or pooled); others keep the kernel's default
/// (64 KiB). 16 x 1 MiB is 4,096 pages, a quarter of the default fs.pipe-user-pages-soft, a
/// budget the kernel shares among all processes of the user: past it, processes of that user
/// without CAP_SYS_RESOURCE get 2-page pipes. Sixteen concurrent bulk transfers is plenty on
/// an edge machine; more still splice, through smaller pipes.
const BIG_PIPES_MAX: usize = 16;
static BIG_PIPES: AtomicUsize = AtomicUsize::new(0);

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

/// Bind the IPv4 listener (required) and the IPv6 one (when its address is usable).
pub(super) fn bind(cfg: &ProxyConfig) -> io::Result<Vec<TcpListener>> {
    let v4 = SocketAddr::from((cfg.listen_v4, cfg.tcp_port));
    let mut out = vec![listen(v4).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {v4}: {e}")))?];
    if let Some(ip) = cfg.listen_v6 {
        let v6 = SocketAddr::from((ip, cfg.tcp_port));
        match listen(v6) {
            Ok(l) => out.push(l),
            Err(e) => {
                log::info!("no IPv6 TCP listener on {v6} ({e}); IPv6 services are not proxied")
            }
        }
    }
    Ok(out)
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
    s.set_reuse_address(true)?;
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
    TcpListener::from_std(s.into())
}

/// Dial `addr` from a socket carrying the proxy's mark (set before the SYN leaves).
async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    super::mark_upstream(SockRef::from(&sock), mark);
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

pub(super) async fn accept_loop(listener: TcpListener, tables: watch::Receiver<Arc<ProxyTable>>, shared: Arc<Shared>) {
    let stats = &shared.stats;
    let mut conns = JoinSet::new();
    let v6 = listener.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut refusal_log = Every::new(std::time::Duration::from_secs(10));
    let mut exhausted_log = Every::new(std::time::Duration::from_secs(10));
    loop {
        let (client, peer) = match listener.accept().await {
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
    let upstream = match dial(&entry, peer, &shared, &svc).await {
        Ok(u) => u,
        Err(outcome) => {
            stats.outcome(&svc, outcome);
            reset(&client);
            return;
        }
    };
    stats.outcome(&svc, Outcome::Ok);
    // The client's socket has TCP_NODELAY and keepalive from the listener.
    let _ = upstream.set_nodelay(true);
    let _ = SockRef::from(&upstream).set_tcp_keepalive(&keepalive());
    stats.total.tcp_active.inc();
    svc.tcp_active.inc();
    let _active = Active(&stats.total.tcp_active, &svc.tcp_active);
    let mut relay = Relay { up: Pipe::default(), down: Pipe::default(), size: shared.cfg.tcp_buffer, svc: &svc, stats };
    let (mut client, mut upstream) = (client, upstream);
    let result = {
        // Read halves read through tokio's `poll_read`, which knows that a short read drained
        // the socket: no extra read that only returns EAGAIN per message.
        let (mut client_r, _) = client.split();
        let (mut upstream_r, _) = upstream.split();
        match shared.cfg.tcp_idle_timeout {
            None => poll_fn(|cx| relay.poll(cx, &mut client_r, &mut upstream_r)).await,
            Some(idle) => {
                // One timer, looked at only when it fires: traffic since it was set pushes it on
                // by another `idle` (so an idle connection ends between one and two timeouts
                // after its last byte), and no byte costs a clock read or a timer reset.
                let timer = tokio::time::sleep(idle);
                tokio::pin!(timer);
                let mut seen = 0;
                poll_fn(|cx| {
                    if let Poll::Ready(r) = relay.poll(cx, &mut client_r, &mut upstream_r) {
                        return Poll::Ready(r.map(|()| false));
                    }
                    while std::future::Future::poll(timer.as_mut(), cx).is_ready() {
                        if relay.moved() == seen {
                            return Poll::Ready(Ok(true));
                        }
                        seen = relay.moved();
                        timer.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                    Poll::Pending
                })
                .await
                .map(|idle_ended| {
                    if idle_ended {
                        stats.tcp_idle_closed.inc();
                        log::debug!("{peer} ({}): idle for {idle:?}; closed", entry.name);
                        // A FIN both ways: the peers see an orderly close.
                        let _ = SockRef::from(&client).shutdown(Shutdown::Both);
                        let _ = SockRef::from(&upstream).shutdown(Shutdown::Both);
                    }
                })
            }
        }
    };
    if let Err(e) = result {
        log::debug!("{peer} ({}): relay ended: {e}", entry.name);
        reset(&client);
        reset(&upstream);
    }
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
        let err = match tokio::time::timeout(shared.cfg.dial_timeout, connect_marked(addr, shared.cfg.mark)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", shared.cfg.dial_timeout),
        };
        stats.total.dial_failures.inc();
        svc.dial_failures.inc();
        log::debug!("{peer} ({}): dial {addr}: {err}", entry.name);
    }
    Err(match tried.is_empty() {
        true => Outcome::NoEndpoints,
        false => Outcome::DialFailed,
    })
}

/// Both directions of one connection.
struct Relay<'a> {
    /// Client -> backend.
    up: Pipe,
    /// Backend -> client.
    down: Pipe,
    size: usize,
    svc: &'a ServiceCounters,
    stats: &'a super::stats::ProxyStats,
}

impl Relay<'_> {
    /// Bytes moved either way so far.
    fn moved(&self) -> u64 {
        self.up.moved + self.down.moved
    }

    /// Ready(Ok) once both directions have ended cleanly; Ready(Err) at the first error.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut ReadHalf<'_>,
        upstream: &mut ReadHalf<'_>,
    ) -> Poll<io::Result<()>> {
        let up = self.up.poll(
            cx,
            client,
            upstream.as_ref(),
            self.size,
            [&self.svc.bytes_to_backend, &self.stats.total.bytes_to_backend],
        );
        if let Poll::Ready(Err(e)) = up {
            return Poll::Ready(Err(e));
        }
        let down = self.down.poll(
            cx,
            upstream,
            client.as_ref(),
            self.size,
            [&self.svc.bytes_to_client, &self.stats.total.bytes_to_client],
        );
        if let Poll::Ready(Err(e)) = down {
            return Poll::Ready(Err(e));
        }
        match up.is_ready() && down.is_ready() {
            true => Poll::Ready(Ok(())),
            false => Poll::Pending,
        }
    }
}

/// One direction: read from `from` into the buffer, write it all to `to`, repeat; at EOF shut
/// down writing on `to`.
#[derive(Default)]
struct Pipe {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// The kernel pipe bytes are spliced through, held while `in_pipe > 0` (and between a
    /// readiness wake-up and the splice that follows it).
    kpipe: Option<KernelPipe>,
    /// Bytes in `kpipe`, read from `from` and not yet written to `to`.
    in_pipe: usize,
    /// The last read filled the buffer: move the next bytes with splice.
    bulk: bool,
    eof: bool,
    done: bool,
    /// Bytes written on so far (the idle timeout watches it).
    moved: u64,
}

impl Pipe {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from_half: &mut ReadHalf<'_>,
        to: &TcpStream,
        size: usize,
        counters: [&Counter; 2],
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                let pipe_r = self.kpipe.as_ref().expect("bytes in the pipe imply a pipe").r.as_raw_fd();
                let len = self.in_pipe;
                match to.try_io(Interest::WRITABLE, || splice(pipe_r, to.as_raw_fd(), len)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.moved += n as u64;
                        counters.iter().for_each(|c| c.add(n as u64));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.start < self.end {
                ready!(to.poll_write_ready(cx))?;
                let buf = self.buf.as_deref().expect("data pending implies a buffer");
                match to.try_write(&buf[self.start..self.end]) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.start += n;
                        self.moved += n as u64;
                        counters.iter().for_each(|c| c.add(n as u64));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.eof {
                self.done = true;
                pool_put(self.buf.take());
                pipe_put(self.kpipe.take());
                // ENOTCONN: the peer is already gone; the other direction will see it.
                match SockRef::from(to).shutdown(Shutdown::Write) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOTCONN) => return Poll::Ready(Err(e)),
                    _ => return Poll::Ready(Ok(())),
                }
            }
            // Nothing is pending here: hand back whichever of buffer and pipe this read won't use.
            if self.bulk {
                ready!(from_half.as_ref().poll_read_ready(cx))?;
                pool_put(self.buf.take());
                if self.kpipe.is_none() {
                    self.kpipe = pipe_take();
                }
            } else {
                pipe_put(self.kpipe.take());
            }
            if let Some(p) = &self.kpipe {
                let pipe_w = p.w.as_raw_fd();
                match from_half
                    .as_ref()
                    .try_io(Interest::READABLE, || splice(from_half.as_ref().as_raw_fd(), pipe_w, SPLICE_MAX))
                {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.in_pipe = n;
                        self.bulk = n >= size;
                    }
                    // Nothing to read: this direction is idle, so it holds no pipe.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe_put(self.kpipe.take()),
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            let buf = self.buf.get_or_insert_with(|| pool_take(size));
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *from_half).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                    } else {
                        self.start = 0;
                        self.end = n;
                        self.bulk = n == buf.len();
                    }
                }
                // Nothing to read: this direction is idle, so it holds no buffer.
                Poll::Pending => {
                    pool_put(self.buf.take());
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        pool_put(self.buf.take());
        // A pipe with bytes still in it is closed, never reused.
        if self.in_pipe == 0 {
            pipe_put(self.kpipe.take());
        }
    }
}

/// Both ends of a non-blocking kernel pipe.
struct KernelPipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Grown to `PIPE_SIZE` (counted in `BIG_PIPES`).
    big: bool,
}

impl Drop for KernelPipe {
    fn drop(&mut self) {
        if self.big {
            BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// splice(2) between a socket and a pipe, never blocking on the pipe.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (owned by the caller's streams and
    // pipe); null offsets are required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    match n {
        n if n >= 0 => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

/// An empty pipe from the pool, or a new one; None when none can be made (out of
/// descriptors): the caller copies through a buffer instead.
fn pipe_take() -> Option<KernelPipe> {
    if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
        return Some(p);
    }
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        log::debug!("pipe2: {}; copying through a buffer", io::Error::last_os_error());
        return None;
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let mut p = unsafe { KernelPipe { r: OwnedFd::from_raw_fd(fds[0]), w: OwnedFd::from_raw_fd(fds[1]), big: false } };
    // A bigger pipe moves more per splice (fewer calls and wake-ups per GB). It holds no memory
    // of its own (pages are the sockets' and are freed as they leave), but the kernel counts
    // its capacity against the user's fs.pipe-user-pages-soft, so only BIG_PIPES_MAX grow.
    // Refused (over fs.pipe-max-size or that limit): it keeps the default size.
    if BIG_PIPES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < BIG_PIPES_MAX).then_some(n + 1)).is_ok() {
        // SAFETY: fcntl on a descriptor owned by `p`.
        match unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) } >= 0 {
            true => p.big = true,
            false => {
                BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
                log::debug!("F_SETPIPE_SZ {PIPE_SIZE}: {}; default size", io::Error::last_os_error());
            }
        }
    }
    Some(p)
}

/// Return an empty pipe to the pool (or close it when the pool is full).
fn pipe_put(p: Option<KernelPipe>) {
    if let Some(p) = p {
        let _ = PIPES.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(p);
            }
        });
    }
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static PIPES: RefCell<Vec<KernelPipe>> = const { RefCell::new(Vec::new()) };
}

fn pool_take(size: usize) -> Box<[u8]> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        while let Some(b) = p.pop() {
            if b.len() == size {
                return b;
            }
        }
        vec![0u8; size].into_boxed_slice()
    })
}

fn pool_put(buf: Option<Box<[u8]>>) {
    if let Some(b) = buf {
        // try_with: during thread teardown the pool may already be gone; then just free.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(p: &KernelPipe) -> libc::c_int {
        // SAFETY: fcntl on a descriptor owned by `p`.
        unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_GETPIPE_SZ) }
    }

    /// Accepted sockets carry TCP_NODELAY and keepalive (with our timings) from the listener.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        rt.block_on(async {
            let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
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

    #[test]
    fn only_a_bounded_number_of_pipes_grow() {
        // More pipes than the budget, none returned to the pool (so every one is new).
        let pipes: Vec<KernelPipe> = (0..BIG_PIPES_MAX + 4).map(|_| pipe_take().expect("pipe2")).collect();
        let big: Vec<&KernelPipe> = pipes.iter().filter(|p| p.big).collect();
        assert!(big.len() <= BIG_PIPES_MAX, "{} big pipes", big.len());
        assert_eq!(BIG_PIPES.load(Ordering::Relaxed), big.len());
        for p in &pipes {
            match p.big {
                true => assert_eq!(capacity(p), PIPE_SIZE as libc::c_int),
                false => assert!(capacity(p) < PIPE_SIZE as libc::c_int, "{}", capacity(p)),
            }
        }
        // As root (CI), where fs.pipe-max-size allows 1 MiB, the whole budget is used.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(big.len(), BIG_PIPES_MAX);
        }
        drop(pipes);
        assert_eq!(BIG_PIPES.load(Ordering::Relaxed), 0);
    }
}
