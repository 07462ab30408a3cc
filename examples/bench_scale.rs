//! What the number of services costs a new connection (not a test): run as root,
//! `cargo run --release --example bench_scale -- [--sizes 10,1000,10000] [--idle 60]`.
//!
//! On the bench's topology (client -- node -- backend namespaces), for N services, the rate of
//! new connections (the bench's figure: connect, one byte there and back, close; 4 client
//! threads, 2 s, median of 3 rounds) to the **first** and the **last** of the N ClusterIPs, side by side for:
//! - kernel DNAT: kube-proxy-shaped iptables-nft chains (`KUBE-SERVICES` with one match per
//!   service, a `KUBE-SVC-*` chain each, DNAT to the backend): the kernel path;
//! - edgeproxy with the `portals` layout (iptables-nft; one DNAT per service in each chain);
//! - edgeproxy with the `nftables` layout (one map lookup).
//!
//! Each edgeproxy is the release binary's `run --source file:` in the node namespace. With
//! `--idle SECONDS` it also measures the agent's CPU time while idle with 2,000 services, both
//! layouts (the default resync period, 60 s, falls inside a 60 s window).

// Counts and seconds become f64 only to be printed as rates: a rounding far below the noise.
#![allow(clippy::cast_precision_loss)]

#[path = "bench/load.rs"]
#[allow(dead_code)]
mod load;
#[path = "bench/topo.rs"]
#[allow(dead_code)]
mod topo;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use topo::{Ns, Proc, Res, Topology, BACKEND_IP};

fn service_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

/// N services, each with the backend as its one endpoint (a kubectl List).
fn cluster(n: usize) -> String {
    let mut items = Vec::with_capacity(2 * n);
    for i in 0..n {
        let ip = service_ip(i);
        items.push(format!(r#"{{"kind":"Service","apiVersion":"v1","metadata":{{"name":"s{i}","namespace":"bench"}},"spec":{{"clusterIP":"{ip}","ports":[{{"name":"http","port":80,"targetPort":8080}}]}}}}"#));
        items.push(format!(r#"{{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{{"name":"s{i}-x","namespace":"bench","labels":{{"kubernetes.io/service-name":"s{i}"}}}},"addressType":"IPv4","endpoints":[{{"addresses":["{BACKEND_IP}"],"conditions":{{"ready":true}}}}],"ports":[{{"name":"http","port":8080,"protocol":"TCP"}}]}}"#));
    }
    format!(r#"{{"kind":"List","apiVersion":"v1","items":[{}]}}"#, items.join(","))
}

/// kube-proxy's shape for N services, as `iptables-nft-restore` input.
fn kube_proxy_rules(n: usize) -> String {
    let mut t = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..n {
        t.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
    }
    for i in 0..n {
        t.push_str(&format!("-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n", service_ip(i)));
        t.push_str(&format!("-A KUBE-SVC-{i} -p tcp -j DNAT --to-destination {BACKEND_IP}:8080\n"));
    }
    t.push_str("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n");
    t
}

/// The backend: the bench's TCP echo server on 8080.
fn serve_backend(backend: &Ns) -> Res<()> {
    let ready = Arc::new(Barrier::new(2));
    let r = ready.clone();
    let _server = backend.thread(move || load::tcp_echo_server(8080, r))?;
    ready.wait();
    Ok(())
}

/// New connections per second from the client to `addr`: the bench's own figure (4 threads,
/// `window`; connect, one byte there and back, close: the client closes first).
fn rate(client: &Ns, addr: SocketAddr, window: Duration) -> Res<f64> {
    client.thread(move || load::new_conns(addr, 4, window))?.join().map_err(|_| "client thread")?.map(|s| s.rate())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (first, last) connection rates, median of `rounds`.
fn first_and_last(client: &Ns, n: usize, rounds: usize) -> Res<(f64, f64)> {
    let first: SocketAddr = format!("{}:80", service_ip(0)).parse().unwrap();
    let last: SocketAddr = format!("{}:80", service_ip(n - 1)).parse().unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(rate(client, first, Duration::from_secs(2))?);
        b.push(rate(client, last, Duration::from_secs(2))?);
    }
    Ok((median(a), median(b)))
}

/// Start the agent with `layout` over `file`; ready when its log says so.
fn agent(node: &Ns, bin: &str, file: &str, layout: &str, dir: &std::path::Path) -> Res<Proc> {
    let log = dir.join(format!("agent-{layout}.log"));
    let run_dir = dir.join(format!("run-{layout}"));
    let source = format!("file:{file}");
    let argv = [
        bin,
        "run",
        "--source",
        &source,
        "--layout",
        layout,
        "--iptables-backend",
        "nft",
        "--metrics-address",
        "",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--state-dir",
        "",
    ];
    let mut c = node.cmd(&argv);
    let f = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    c.stderr(f).stdout(std::process::Stdio::null()).stdin(std::process::Stdio::null());
    let p = Proc::adopt(c.spawn().map_err(|e| format!("start agent: {e}"))?);
    let until = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("ready: source synced") {
        if Instant::now() > until {
            return Err(format!("agent ({layout}) not ready: {}", std::fs::read_to_string(&log).unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(p)
}

/// CPU seconds (user + system) of `pid` and its finished children so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime, stime, and cutime, cstime: the waited-for children (iptables-restore, nft) count.
    let ticks: f64 = (11..15).filter_map(|i| f.get(i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn main() -> Res<()> {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root (it creates network namespaces)");
    topo::install_cleanup_handlers()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let sizes: Vec<usize> =
        value("--sizes").unwrap_or_else(|| "10,1000,10000".into()).split(',').filter_map(|s| s.parse().ok()).collect();
    let idle: Option<u64> = value("--idle").and_then(|s| s.parse().ok());
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bin = format!("{target}/release/edgeproxy");
    assert!(Command::new("cargo")
        .args(["build", "--release", "--locked", "--bin", "edgeproxy"])
        .status()
        .unwrap()
        .success());
    let t = Topology::build(None)?;
    serve_backend(&t.backend)?;
    let dir = std::env::temp_dir().join(format!("ep-bench-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    println!("new connections/s from a client namespace to the first and the last of N services (connect, 1 byte echoed, close; 4 threads, 2 s, median of 3)");
    println!("{:<22} {:>7} {:>12} {:>12} {:>11}", "path", "N", "first /s", "last /s", "last/first");
    for &n in &sizes {
        let file = dir.join(format!("cluster-{n}.json"));
        std::fs::write(&file, cluster(n)).map_err(|e| e.to_string())?;
        let file = file.to_str().unwrap().to_string();
        // The kernel path.
        let mut c = t.node.cmd(&["iptables-nft-restore", "--noflush"]);
        c.stdin(std::process::Stdio::piped());
        let mut child = c.spawn().map_err(|e| e.to_string())?;
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), kube_proxy_rules(n).as_bytes())
            .map_err(|e| e.to_string())?;
        drop(child.stdin.take());
        assert!(child.wait().map_err(|e| e.to_string())?.success());
        let (f, l) = first_and_last(&t.client, n, 3)?;
        println!("{:<22} {:>7} {:>12.0} {:>12.0} {:>10.2}x", "kernel DNAT (kube-proxy)", n, f, l, l / f);
        t.node.ok(&["sh", "-c", "iptables-nft -t nat -F PREROUTING && iptables-nft -t nat -F OUTPUT && iptables-nft -t nat -F && iptables-nft -t nat -X"])?;
        for layout in ["portals", "nftables"] {
            let mut p = agent(&t.node, &bin, &file, layout, &dir)?;
            let (f, l) = first_and_last(&t.client, n, 3)?;
            println!("{:<22} {:>7} {:>12.0} {:>12.0} {:>10.2}x", format!("edgeproxy {layout}"), n, f, l, l / f);
            p.stop();
        }
    }
    if let Some(secs) = idle {
        let file = dir.join("cluster-2000.json");
        std::fs::write(&file, cluster(2000)).map_err(|e| e.to_string())?;
        println!("\nidle CPU with 2,000 services over {secs} s (the default 60 s resync included)");
        for layout in ["portals", "nftables"] {
            let mut p = agent(&t.node, &bin, file.to_str().unwrap(), layout, &dir)?;
            let before = cpu_seconds(p.pid());
            std::thread::sleep(Duration::from_secs(secs));
            let used = cpu_seconds(p.pid()) - before;
            println!("edgeproxy {layout:<9} {:.3} CPU-s per minute", used * 60.0 / secs as f64);
            p.stop();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
