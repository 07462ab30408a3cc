//! Memory per idle proxied connection: 1 000 connections that have each carried a little data
//! and then sit idle. Measured two ways, in its own test binary so nothing else allocates:
//! live heap bytes (a counting global allocator) and the process's RSS.
mod proxy_support;
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use proxy_support::*;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(isize::try_from(l.size()).unwrap_or(isize::MAX), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(isize::try_from(l.size()).unwrap_or(isize::MAX), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn rss_kib() -> isize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn idle_connections_cost_little_memory() {
    const N: usize = 1000;
    let t = Topo::new(test_config());
    // Warm up: the first connections create per-service state and the buffer pool. (The hold
    // backend never closes, so these stay open, half-closed once dropped: part of the baseline.)
    let warm: Vec<TcpStream> = open(&t, 64);
    wait_for(|| t.stats.total.tcp_active.get() == 64, "warm-up connections relayed");
    std::thread::sleep(Duration::from_millis(50));

    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss_kib());
    let conns = open(&t, N);
    wait_for(|| t.stats.total.tcp_active.get() == (N + 64) as u64, "all connections relayed");
    std::thread::sleep(Duration::from_millis(50));
    let (heap1, rss1) = (LIVE.load(Ordering::Relaxed), rss_kib());
    let n = isize::try_from(N).unwrap();
    let heap_per = (heap1 - heap0) / n;
    let rss_per = (rss1 - rss0) * 1024 / n;
    eprintln!(
        "{N} idle proxied connections: heap +{} KiB ({heap_per} B each), RSS +{} KiB ({rss_per} B each); \
         includes the test's own client and backend sockets",
        (heap1 - heap0) / 1024,
        rss1 - rss0
    );
    // Two 16 KiB buffers held per connection would be 32 KiB each; idle connections hold none.
    assert!(heap_per < 4096, "{heap_per} heap bytes per idle connection");
    assert!(rss_per < 8192, "{rss_per} RSS bytes per idle connection");
    drop((conns, warm));
}

/// `n` connections to the hold service from the pod, each having read the backend's greeting.
fn open(t: &Topo, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = HOLD.parse().unwrap();
    Topo::in_ns(&t.pod, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                assert_eq!(greeting(&mut s).unwrap(), "h");
                s
            })
            .collect()
    })
}
