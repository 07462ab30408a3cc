//! Paired A/B measurements: two paths in the same window, by the same threads, one operation on
//! each in turn. On a shared 2-core machine the load drifts from one window to the next by more
//! than the differences between two kernel paths (the direct path, which does strictly less
//! work than kernel DNAT, measures anywhere from 0.9x to 1.3x of it window against window);
//! taking turns puts that drift on both sides alike, so their ratio shows the paths, not the
//! machine. Used for the kernel path against kube-proxy-shaped kernel DNAT.
//!
//! Each measurement returns both sides' samples (nanoseconds per operation); the caller reports
//! means and quantiles.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{connect, nanos, roundtrip};
use crate::topo::Res;

/// Both sides' samples, nanoseconds per operation.
#[derive(Default)]
pub struct Pair {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
}

impl Pair {
    fn extend(&mut self, other: Pair) {
        self.a.extend(other.a);
        self.b.extend(other.b);
    }

    /// Mean of one side, microseconds.
    pub fn mean_us(side: &[u64]) -> f64 {
        if side.is_empty() {
            return f64::NAN;
        }
        crate::load::float(side.iter().sum::<u64>()) / crate::load::float(side.len()) / 1000.0
    }

    /// The `p`-quantile of one side, microseconds.
    pub fn quantile_us(side: &mut [u64], p: f64) -> f64 {
        side.sort_unstable();
        crate::load::Samples { ns: side.to_vec(), elapsed: Duration::ZERO }.quantile_us(p)
    }
}

/// `n` threads, each running `f` until the window ends; their pairs merged.
fn threads<F>(n: usize, dur: Duration, f: F) -> Res<Pair>
where
    F: Fn(&AtomicBool, &mut Pair) -> Res<()> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let (f, stop) = (f.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut p = Pair::default();
            f(&stop, &mut p).map(|()| p)
        }));
    }
    std::thread::sleep(dur);
    stop.store(true, Ordering::SeqCst);
    let mut all = Pair::default();
    for h in handles {
        all.extend(h.join().map_err(|_| "a paired load thread panicked")??);
    }
    Ok(all)
}

/// One persistent connection to each of `a` and `b`; 1-byte requests, one on each in turn.
pub fn rr(a: SocketAddr, b: SocketAddr, dur: Duration) -> Res<Pair> {
    threads(1, dur, move |stop, p| {
        let (mut sa, mut sb) = (connect(a)?, connect(b)?);
        let mut buf = [1u8];
        for _ in 0..200 {
            roundtrip(&mut sa, &mut buf, a)?;
            roundtrip(&mut sb, &mut buf, b)?;
        }
        while !stop.load(Ordering::Relaxed) && p.a.len() < 1_000_000 {
            let t = Instant::now();
            roundtrip(&mut sa, &mut buf, a)?;
            p.a.push(nanos(t.elapsed()));
            let t = Instant::now();
            roundtrip(&mut sb, &mut buf, b)?;
            p.b.push(nanos(t.elapsed()));
        }
        Ok(())
    })
}

/// New connections (connect, 1-byte echo, close) from `n` threads, to `a` and `b` in turn.
pub fn new_conns(a: SocketAddr, b: SocketAddr, n: usize, dur: Duration) -> Res<Pair> {
    threads(n, dur, move |stop, p| {
        let mut failures = 0;
        while !stop.load(Ordering::Relaxed) && p.a.len() < 250_000 {
            for (addr, side) in [(a, &mut p.a), (b, &mut p.b)] {
                let t = Instant::now();
                let one = connect(addr).and_then(|mut s| roundtrip(&mut s, &mut [7u8], addr));
                match one {
                    Ok(()) => side.push(nanos(t.elapsed())),
                    Err(e) if failures > 20 => return Err(format!("paired new connections: {e}")),
                    Err(_) => failures += 1,
                }
            }
        }
        Ok(())
    })
}

/// `flows` threads, each with a UDP socket to `a` and one to `b`, 32-byte echoes in turn.
pub fn udp(a: SocketAddr, b: SocketAddr, flows: usize, dur: Duration) -> Res<Pair> {
    threads(flows, dur, move |stop, p| {
        let open = |addr: SocketAddr| -> Res<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
            s.connect(addr).map_err(|e| format!("udp connect {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| format!("timeout: {e}"))?;
            Ok(s)
        };
        let (sa, sb) = (open(a)?, open(b)?);
        let (mut seq, mut lost) = (0u64, 0);
        let mut inb = [0u8; 64];
        while !stop.load(Ordering::Relaxed) && p.a.len() < 250_000 {
            for (s, side) in [(&sa, &mut p.a), (&sb, &mut p.b)] {
                seq += 1;
                let mut out = [0u8; 32];
                out[..8].copy_from_slice(&seq.to_le_bytes());
                let t = Instant::now();
                s.send(&out).map_err(|e| format!("udp send: {e}"))?;
                loop {
                    match s.recv(&mut inb) {
                        Ok(n) if n >= 8 && inb[..8] == seq.to_le_bytes() => {
                            side.push(nanos(t.elapsed()));
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) if lost > 20 => return Err(format!("paired UDP: no replies ({e})")),
                        Err(_) => {
                            lost += 1;
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    })
}
