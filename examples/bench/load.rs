//! Load generators (the client side) and the echo backends (the server side).
//!
//! Owns the traffic the benchmark sends: TCP and UDP echo servers for the backend namespace, and
//! the client measurements (persistent-connection ping-pong, concurrent request rate, new
//! connections, UDP ping-pong, idle connections). Every measurement is bounded by a duration and
//! a sample cap, and returns an error (never panics) when the path misbehaves. It never sets up
//! namespaces or rules; callers run these functions on threads inside the right namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::topo::{Ns, Res};

/// The echo port (TCP and UDP) of the backend.
pub const ECHO_PORT: u16 = 7000;
/// iperf3's port on the backend.
pub const IPERF_PORT: u16 = 5201;
/// How many server threads the backend runs (SO_REUSEPORT), one per core here.
pub const BACKEND_THREADS: usize = 2;
/// Per-connection echo buffer in the backend: small, so 5,000 idle connections stay cheap.
const ECHO_BUF: usize = 8 * 1024;
/// Upper bound on latency samples kept per measurement (memory stays bounded).
const MAX_SAMPLES: usize = 2_000_000;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn reuseport_socket(ty: Type, proto: Protocol, port: u16) -> Res<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(proto)).map_err(|e| format!("socket: {e}"))?;
    s.set_reuse_port(true).map_err(|e| format!("SO_REUSEPORT: {e}"))?;
    s.set_reuse_address(true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    let addr: SocketAddr = ([0, 0, 0, 0], port).into();
    s.bind(&addr.into()).map_err(|e| format!("bind {addr}: {e}"))?;
    Ok(s)
}

/// TCP echo server on 0.0.0.0:`port`: one current-thread tokio runtime, one task per
/// connection. Call from a thread inside the backend namespace; runs forever.
pub fn tcp_echo_server(port: u16, ready: Arc<Barrier>) -> Res<()> {
    let s = reuseport_socket(Type::STREAM, Protocol::TCP, port)?;
    s.listen(4096).map_err(|e| format!("listen: {e}"))?;
    s.set_nonblocking(true).map_err(|e| format!("nonblocking: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std::net::TcpListener::from(s))
            .map_err(|e| format!("tokio listener: {e}"))?;
        ready.wait();
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                // EMFILE and friends: back off a little instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = conn.set_nodelay(true);
            tokio::task::spawn(async move {
                let mut buf = vec![0u8; ECHO_BUF];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

/// UDP echo server on 0.0.0.0:`port` (blocking, one socket per thread with SO_REUSEPORT).
pub fn udp_echo_server(port: u16, ready: &Barrier) -> Res<()> {
    let s = reuseport_socket(Type::DGRAM, Protocol::UDP, port)?;
    let sock = UdpSocket::from(s);
    ready.wait();
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

pub fn connect(addr: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| format!("timeout: {e}"))?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| format!("timeout: {e}"))?;
    Ok(s)
}

/// One request/response: write `buf`, read the same number of bytes back.
pub fn roundtrip(s: &mut TcpStream, buf: &mut [u8], addr: SocketAddr) -> Res<()> {
    s.write_all(buf).map_err(|e| format!("write to {addr}: {e}"))?;
    s.read_exact(buf).map_err(|e| format!("read from {addr}: {e}"))
}

/// Latency samples, in nanoseconds, and how long they took.
pub struct Samples {
    pub ns: Vec<u64>,
    pub elapsed: Duration,
}

impl Samples {
    /// The `p`-quantile (0..1) in microseconds; `ns` must be sorted.
    pub fn quantile_us(&self, p: f64) -> f64 {
        if self.ns.is_empty() {
            return f64::NAN;
        }
        let rank = float_to_index((p * float(self.ns.len())).ceil()).clamp(1, self.ns.len());
        float(self.ns[rank - 1]) / 1000.0
    }

    pub fn rate(&self) -> f64 {
        float(self.ns.len()) / self.elapsed.as_secs_f64()
    }
}

/// Sequential request/response of `size` bytes over one persistent connection for `dur`.
pub fn pingpong(addr: SocketAddr, size: usize, dur: Duration) -> Res<Samples> {
    let mut s = connect(addr)?;
    let mut buf = vec![0x5au8; size];
    for _ in 0..200 {
        roundtrip(&mut s, &mut buf, addr)?;
    }
    let mut ns = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < dur && ns.len() < MAX_SAMPLES {
        let t = Instant::now();
        roundtrip(&mut s, &mut buf, addr)?;
        ns.push(nanos(t.elapsed()));
    }
    let elapsed = start.elapsed();
    ns.sort_unstable();
    Ok(Samples { ns, elapsed })
}

/// Run `n` workers on threads (in the calling thread's namespace: threads inherit it), start
/// them together, stop them after `dur`, and collect their samples.
fn workers<F>(n: usize, dur: Duration, f: F) -> Res<Samples>
where
    F: Fn(usize, &AtomicBool, &mut Vec<u64>) -> Res<()> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let (f, stop) = (f.clone(), stop.clone());
        let h = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut ns = Vec::with_capacity(1 << 14);
                let r = f(i, &stop, &mut ns);
                (r, ns)
            })
            .map_err(|e| format!("thread: {e}"))?;
        handles.push(h);
    }
    std::thread::sleep(dur);
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok((Ok(()), ns)) => all.extend(ns),
            Ok((Err(e), _)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a load thread panicked".to_string());
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    Ok(Samples { ns: all, elapsed })
}

/// `conns` persistent connections, each doing sequential 1-byte request/response, for `dur`.
pub fn concurrent_rr(addr: SocketAddr, conns: usize, dur: Duration) -> Res<Samples> {
    // Connect everything first so the measured window holds requests only.
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = connect(addr)?;
        let mut b = [1u8];
        for _ in 0..50 {
            roundtrip(&mut s, &mut b, addr)?;
        }
        streams.push(std::sync::Mutex::new(Some(s)));
    }
    let streams = Arc::new(streams);
    workers(conns, dur, move |i, stop, ns| {
        let Some(mut s) = streams[i].lock().map_err(|_| "poisoned")?.take() else {
            return Err("stream taken twice".into());
        };
        let mut b = [1u8];
        while !stop.load(Ordering::Relaxed) && ns.len() < MAX_SAMPLES / 16 {
            let t = Instant::now();
            roundtrip(&mut s, &mut b, addr)?;
            ns.push(nanos(t.elapsed()));
        }
        Ok(())
    })
}

/// New connections from `threads` threads for `dur`: connect, send 1 byte, read it back, close.
/// Samples are connect-to-first-byte times.
pub fn new_conns(addr: SocketAddr, threads: usize, dur: Duration) -> Res<Samples> {
    let failures = Arc::new(AtomicU64::new(0));
    let f2 = failures.clone();
    let r = workers(threads, dur, move |_, stop, ns| {
        let mut consecutive = 0;
        while !stop.load(Ordering::Relaxed) && ns.len() < MAX_SAMPLES / 4 {
            let t = Instant::now();
            let one = (|| -> Res<()> {
                let mut s = connect(addr)?;
                let mut b = [7u8];
                roundtrip(&mut s, &mut b, addr)
            })();
            match one {
                Ok(()) => {
                    ns.push(nanos(t.elapsed()));
                    consecutive = 0;
                }
                Err(e) => {
                    f2.fetch_add(1, Ordering::Relaxed);
                    consecutive += 1;
                    if consecutive > 20 {
                        return Err(format!("new connections keep failing: {e}"));
                    }
                }
            }
        }
        Ok(())
    })?;
    let failed = failures.load(Ordering::Relaxed);
    if failed * 100 > r.ns.len() as u64 {
        return Err(format!("{failed} of {} new connections to {addr} failed", r.ns.len() as u64 + failed));
    }
    Ok(r)
}

/// UDP request/response: `flows` sockets (one client port each), sequential 32-byte datagrams
/// with a sequence number; a reply lost for 200 ms counts as lost, not as a sample.
pub fn udp_rr(addr: SocketAddr, flows: usize, dur: Duration) -> Res<(Samples, u64)> {
    let lost = Arc::new(AtomicU64::new(0));
    let l2 = lost.clone();
    let r = workers(flows, dur, move |_, stop, ns| {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
        s.connect(addr).map_err(|e| format!("udp connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| format!("timeout: {e}"))?;
        let mut out = [0u8; 32];
        let mut inb = [0u8; 64];
        let mut seq = 0u64;
        let mut consecutive = 0;
        while !stop.load(Ordering::Relaxed) && ns.len() < MAX_SAMPLES / 8 {
            seq += 1;
            out[..8].copy_from_slice(&seq.to_le_bytes());
            let t = Instant::now();
            if s.send(&out).is_err() {
                l2.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            loop {
                match s.recv(&mut inb) {
                    Ok(n) if n >= 8 && inb[..8] == seq.to_le_bytes() => {
                        ns.push(nanos(t.elapsed()));
                        consecutive = 0;
                        break;
                    }
                    Ok(_) => continue, // a late reply to an earlier datagram
                    Err(e) => {
                        l2.fetch_add(1, Ordering::Relaxed);
                        consecutive += 1;
                        if consecutive > 10 {
                            return Err(format!("UDP {addr}: no replies ({e})"));
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok((r, lost.load(Ordering::Relaxed)))
}

/// Open `n` connections, each proven end to end by a 1-byte echo, and keep them open.
pub fn idle_conns(addr: SocketAddr, n: usize) -> Res<Vec<TcpStream>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect(addr).map_err(|e| format!("idle connection {i}: {e}"))?;
        let mut b = [3u8];
        roundtrip(&mut s, &mut b, addr).map_err(|e| format!("idle connection {i}: {e}"))?;
        v.push(s);
    }
    Ok(v)
}

/// A single TCP echo and UDP echo through `addr`, retried for up to `wait`: "is this path up?".
pub fn probe(tcp: SocketAddr, udp: Option<SocketAddr>, wait: Duration) -> Res<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < wait {
        let t = (|| -> Res<()> {
            let mut s = connect(tcp)?;
            let mut b = [9u8; 16];
            roundtrip(&mut s, &mut b, tcp)
        })();
        let u = match (t.is_ok(), udp) {
            (true, Some(u)) => (|| -> Res<()> {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
                s.send_to(b"probe", u).map_err(|e| format!("udp {u}: {e}"))?;
                let mut b = [0u8; 16];
                s.recv(&mut b).map_err(|e| format!("udp {u}: {e}"))?;
                Ok(())
            })(),
            _ => Ok(()),
        };
        match (t, u) {
            (Ok(()), Ok(())) => return Ok(()),
            (Err(e), _) | (_, Err(e)) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("path not up after {wait:?}: {last}"))
}

/// A count or a nanosecond figure as a float for statistics: exact below 2^53, far above any
/// count or duration a benchmark round produces.
#[allow(clippy::cast_precision_loss)]
pub fn float(n: impl TryInto<u64>) -> f64 {
    n.try_into().unwrap_or(u64::MAX) as f64
}

/// A non-negative rank computed in floating point, as an index.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn float_to_index(x: f64) -> usize {
    x.max(0.0) as usize
}

/// A duration in nanoseconds (saturating: 584 years).
pub fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A window in seconds, rounded up to whole seconds (for iperf3's `-t`).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn whole_seconds(secs: f64) -> u32 {
    secs.ceil().clamp(1.0, f64::from(u32::MAX)) as u32
}

/// iperf3 from the client to `target`: (bits/s received, bytes received).
pub fn iperf(client: &Ns, target: SocketAddr, streams: u32, secs: u32) -> Res<(f64, f64)> {
    let mut last = String::new();
    for _attempt in 0..4 {
        let out = client
            .cmd(&[
                "iperf3",
                "-c",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
                "-t",
                &secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ])
            .output()
            .map_err(|e| format!("iperf3: {e}"))?;
        let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
            Ok(v) => v,
            Err(e) => {
                last = format!("iperf3 output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr));
                std::thread::sleep(Duration::from_millis(300));
                continue;
            }
        };
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            // "the server is busy" right after the previous test: wait and retry.
            last = format!("iperf3 to {target}: {err}");
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        let sum = &v["end"]["sum_received"];
        let (Some(bps), Some(bytes)) = (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) else {
            return Err(format!("iperf3 to {target}: no end.sum_received in its JSON"));
        };
        return Ok((bps, bytes));
    }
    Err(last)
}

/// The backend's echo servers (TCP and UDP, `BACKEND_THREADS` of each), listening once this
/// returns.
pub fn start_backend(backend: &Ns) -> Res<()> {
    let ready = Arc::new(Barrier::new(2 * BACKEND_THREADS + 1));
    for _ in 0..BACKEND_THREADS {
        let r = ready.clone();
        backend.thread(move || {
            if let Err(e) = tcp_echo_server(ECHO_PORT, r) {
                eprintln!("backend TCP echo: {e}");
                std::process::abort();
            }
        })?;
        let r = ready.clone();
        backend.thread(move || {
            if let Err(e) = udp_echo_server(ECHO_PORT, &r) {
                eprintln!("backend UDP echo: {e}");
                std::process::abort();
            }
        })?;
    }
    ready.wait();
    Ok(())
}
