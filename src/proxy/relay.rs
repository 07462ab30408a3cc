//! The relay of one TCP connection: it copies both ways with half-close: when one side's read ends,
//! writing is shut down on the other and the opposite direction carries on until it ends too. An
//! error on either side (a reset) resets the other. Small messages are copied through a buffer of
//! `tcp_buffer` bytes; once a read fills the whole buffer (a bulk transfer), that direction
//! switches to splice(2) through a kernel pipe (socket -> pipe -> socket, no copy to user space)
//! until a splice moves less than a buffer's worth again. When no pipe can be had (out of
//! descriptors) it copies. Memory and descriptors are bounded: a pipe or buffer per direction only
//! while data is in flight, none while idle (both go back to small per-thread pools, capped per
//! process and emptied of what went unused for a trim period), and backpressure comes from not
//! reading while the pipe or buffer is unwritten.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;

use super::stats::{Counter, ProxyStats, ServiceCounters};
use crate::sys::pipe::{splice, Pipe};

/// Idle pipes kept for reuse, per process: a worker's pool keeps its share (see
/// [`share_pools`]), so more workers never mean more idle descriptors.
const POOL_PIPES: usize = 64;
/// Idle buffer bytes kept for reuse, per process, shared the same way: 64 buffers of the
/// default 16 KiB, one of the largest `tcp.bufferSize` (1 MiB).
const POOL_BYTES: usize = 1 << 20;
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

/// Both directions of one connection.
pub(super) struct Relay<'a> {
    /// Client -> backend.
    up: Direction,
    /// Backend -> client.
    down: Direction,
    size: usize,
    svc: &'a ServiceCounters,
    stats: &'a ProxyStats,
}

impl<'a> Relay<'a> {
    pub(super) fn new(size: usize, svc: &'a ServiceCounters, stats: &'a ProxyStats) -> Relay<'a> {
        Relay { up: Direction::default(), down: Direction::default(), size, svc, stats }
    }

    /// Bytes read from one side and not yet written to the other, either way.
    pub(super) fn in_flight(&self) -> bool {
        [&self.up, &self.down].iter().any(|d| d.start < d.end || d.in_pipe > 0)
    }

    /// Bytes moved either way so far.
    pub(super) fn moved(&self) -> u64 {
        self.up.moved + self.down.moved
    }

    /// Ready(Ok) once both directions have ended cleanly; Ready(Err) at the first error.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut ReadHalf<'_>,
        upstream: &mut ReadHalf<'_>,
    ) -> Poll<io::Result<()>> {
        let up = self.up.poll(
            cx,
            (client, upstream.as_ref()),
            self.down.done,
            self.size,
            [&self.svc.bytes_to_backend, &self.stats.total.bytes_to_backend],
        );
        if let Poll::Ready(Err(e)) = up {
            return Poll::Ready(Err(e));
        }
        let down = self.down.poll(
            cx,
            (upstream, client.as_ref()),
            self.up.done,
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
struct Direction {
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

impl Direction {
    /// `other_done`: the opposite direction has ended (its EOF read), so once this one ends
    /// too both sockets are closed at once, and a close sends the FIN a shutdown would.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        (from_half, to): (&mut ReadHalf<'_>, &TcpStream),
        other_done: bool,
        size: usize,
        counters: [&Counter; 2],
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                let pipe_r = self.kpipe.as_ref().expect("bytes in the pipe imply a pipe").pipe.r.as_raw_fd();
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
                if other_done {
                    // Everything `to` sent has been read (its EOF too): closing it, which comes
                    // next, sends a FIN, not a reset; the shutdown would be one more syscall.
                    return Poll::Ready(Ok(()));
                }
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
                let pipe_w = p.pipe.w.as_raw_fd();
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

impl Drop for Direction {
    fn drop(&mut self) {
        pool_put(self.buf.take());
        // A pipe with bytes still in it is closed, never reused.
        if self.in_pipe == 0 {
            pipe_put(self.kpipe.take());
        }
    }
}

/// A kernel pipe of the pool, and whether it was grown to [`PIPE_SIZE`].
struct KernelPipe {
    pipe: Pipe,
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

/// An empty pipe from the pool, or a new one; None when none can be made (out of
/// descriptors): the caller copies through a buffer instead.
fn pipe_take() -> Option<KernelPipe> {
    let pooled = PIPES.with(|p| {
        let mut p = p.borrow_mut();
        let pipe = p.pop();
        note_low(|low| low.0 = low.0.min(p.len()));
        pipe
    });
    if let Some(p) = pooled {
        return Some(p);
    }
    let pipe = match Pipe::new() {
        Ok(p) => p,
        Err(e) => {
            log::debug!("pipe2: {e}; copying through a buffer");
            return None;
        }
    };
    let mut p = KernelPipe { pipe, big: false };
    // A bigger pipe moves more per splice (fewer calls and wake-ups per GB). It holds no memory
    // of its own (pages are the sockets' and are freed as they leave), but the kernel counts
    // its capacity against the user's fs.pipe-user-pages-soft, so only BIG_PIPES_MAX grow.
    // Refused (over fs.pipe-max-size or that limit): it keeps the default size.
    if take_big_pipe() {
        match p.pipe.set_capacity(PIPE_SIZE) {
            Ok(()) => p.big = true,
            Err(e) => {
                BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
                log::debug!("F_SETPIPE_SZ {PIPE_SIZE}: {e}; default size");
            }
        }
    }
    Some(p)
}

/// One of the BIG_PIPES_MAX places for a big pipe, if one is free. (A compare-exchange loop:
/// `fetch_update` is deprecated on nightly, its successor not stable at our MSRV.)
fn take_big_pipe() -> bool {
    let mut n = BIG_PIPES.load(Ordering::Relaxed);
    while n < BIG_PIPES_MAX {
        match BIG_PIPES.compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => n = now,
        }
    }
    false
}

/// Return an empty pipe to the pool (or close it when the pool is full).
fn pipe_put(p: Option<KernelPipe>) {
    if let Some(p) = p {
        let _ = PIPES.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < share().0 {
                pool.push(p);
            }
        });
    }
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static PIPES: RefCell<Vec<KernelPipe>> = const { RefCell::new(Vec::new()) };
    /// This thread's share of the process's pool caps: (pipes, buffer bytes).
    static SHARE: Cell<(usize, usize)> = const { Cell::new((POOL_PIPES, POOL_BYTES)) };
    /// The fewest (pipes, buffers) the pools held since the last trim: that many went unused.
    static LOW: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// How often each relaying thread gives back what its pools did not need: a pooled pipe or
/// buffer that sat unused for a whole period is closed or freed, so an idle proxy returns to
/// its idle descriptors and memory within two periods of the last traffic.
pub(super) const POOL_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

fn note_low(f: impl FnOnce(&mut (usize, usize))) {
    let _ = LOW.try_with(|l| {
        let mut v = l.get();
        f(&mut v);
        l.set(v);
    });
}

/// Close the pooled pipes and free the pooled buffers of this thread that were not needed since
/// the last trim (the pools' low-water marks); returns how many (pipes, buffers) went.
fn trim_pools() -> (usize, usize) {
    let (low_pipes, low_bufs) = LOW.with(Cell::get);
    let (pipes, pipes_left) = PIPES.with(|p| drain_unused(&mut p.borrow_mut(), low_pipes));
    let (bufs, bufs_left) = POOL.with(|p| drain_unused(&mut p.borrow_mut(), low_bufs));
    LOW.with(|l| l.set((pipes_left, bufs_left)));
    (pipes, bufs)
}

/// Drop the `low` items at the bottom of a pool (a stack: they waited longest); (dropped, left).
fn drain_unused<T>(pool: &mut Vec<T>, low: usize) -> (usize, usize) {
    let n = low.min(pool.len());
    pool.drain(..n);
    (n, pool.len())
}

/// Trim this thread's pools every [`POOL_TRIM_EVERY`]; spawned on every relaying runtime.
pub(super) async fn trim_pools_every() {
    loop {
        tokio::time::sleep(POOL_TRIM_EVERY).await;
        let (pipes, bufs) = trim_pools();
        if pipes + bufs > 0 {
            log::debug!("relay pools: {pipes} idle pipes closed, {bufs} idle buffers freed");
        }
    }
}

/// This thread is one of `workers` threads that relay: its pools keep a `1/workers` share of
/// the process's caps (at least one pipe and one buffer's worth), so the idle memory and
/// descriptors of the pools stay those of one loop whatever `workers` says. A thread that
/// never calls it (the single loop on the agent's thread) keeps the whole caps.
pub(super) fn share_pools(workers: usize) {
    let n = workers.max(1);
    SHARE.with(|s| s.set(((POOL_PIPES / n).max(1), (POOL_BYTES / n).max(1))));
}

/// This thread's (pipes, buffer bytes) share; the whole caps while the thread is torn down.
fn share() -> (usize, usize) {
    SHARE.try_with(Cell::get).unwrap_or((POOL_PIPES, POOL_BYTES))
}

/// How many idle buffers of `size` bytes this thread keeps.
fn buffers_kept(size: usize) -> usize {
    (share().1 / size.max(1)).max(1)
}

fn pool_take(size: usize) -> Box<[u8]> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        while let Some(b) = p.pop() {
            note_low(|low| low.1 = low.1.min(p.len()));
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
            if p.len() < buffers_kept(b.len()) {
                p.push(b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pools filled past their caps on a thread of `workers`: (idle pipes, idle buffers of
    /// `size`) it keeps. Plain pipes (not grown), so the big-pipe budget is not touched.
    fn kept_on_a_worker(workers: Option<usize>, size: usize) -> (usize, usize) {
        std::thread::spawn(move || {
            if let Some(n) = workers {
                share_pools(n);
            }
            for _ in 0..POOL_PIPES + 8 {
                pipe_put(Some(KernelPipe { pipe: Pipe::new().expect("pipe2"), big: false }));
            }
            for _ in 0..POOL_BYTES / size + 8 {
                pool_put(Some(vec![0u8; size].into_boxed_slice()));
            }
            (PIPES.with(|p| p.borrow().len()), POOL.with(|p| p.borrow().len()))
        })
        .join()
        .expect("the pool thread")
    }

    #[test]
    fn trims_give_back_what_went_unused() {
        std::thread::spawn(|| {
            let pipes = || PIPES.with(|p| p.borrow().len());
            let bufs = || POOL.with(|p| p.borrow().len());
            for _ in 0..10 {
                pipe_put(Some(KernelPipe { pipe: Pipe::new().expect("pipe2"), big: false }));
                pool_put(Some(vec![0u8; 1024].into_boxed_slice()));
            }
            // The first trim only marks: nothing was watched yet.
            assert_eq!(trim_pools(), (0, 0));
            // Three of each are needed in this period (and come back).
            let taken: Vec<_> = (0..3).map(|_| (pipe_take().expect("pooled"), pool_take(1024))).collect();
            assert_eq!((pipes(), bufs()), (7, 7));
            for (p, b) in taken {
                pipe_put(Some(p));
                pool_put(Some(b));
            }
            // Seven sat unused the whole period: they go, the three in use stay.
            assert_eq!(trim_pools(), (7, 7));
            assert_eq!((pipes(), bufs()), (3, 3));
            // A period without traffic: the rest go.
            assert_eq!(trim_pools(), (3, 3));
            assert_eq!((pipes(), bufs()), (0, 0));
        })
        .join()
        .expect("the pool thread");
    }

    #[test]
    fn workers_share_the_pool_caps_of_one_loop() {
        const KIB16: usize = 16 * 1024;
        // The single loop (no share set) keeps the whole caps: 64 pipes, 1 MiB of buffers.
        assert_eq!(kept_on_a_worker(None, KIB16), (64, 64));
        assert_eq!(kept_on_a_worker(Some(1), KIB16), (64, 64));
        // Each of 4 workers keeps a quarter, so the process keeps what one loop did.
        assert_eq!(kept_on_a_worker(Some(4), KIB16), (16, 16));
        // 64 workers: still at least one of each per worker.
        assert_eq!(kept_on_a_worker(Some(64), KIB16), (1, 1));
        // The largest buffers (1 MiB): one per thread, never 64 MiB.
        assert_eq!(kept_on_a_worker(None, 1 << 20), (64, 1));
        assert_eq!(kept_on_a_worker(Some(2), 1 << 20), (32, 1));
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
                true => assert_eq!(p.pipe.capacity().unwrap(), PIPE_SIZE),
                false => assert!(p.pipe.capacity().unwrap() < PIPE_SIZE, "{:?}", p.pipe.capacity()),
            }
        }
        // As root (CI), where fs.pipe-max-size allows 1 MiB, the whole budget is used.
        if crate::sys::is_root() {
            assert_eq!(big.len(), BIG_PIPES_MAX);
        }
        drop(pipes);
        assert_eq!(BIG_PIPES.load(Ordering::Relaxed), 0);
    }
}
