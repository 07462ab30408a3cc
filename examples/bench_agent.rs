//! Benchmark: the whole agent (`edgeproxy run`) against the test API server serving N Services
//! and N EndpointSlices (default 1,000 each, generated from real captured items): time to ready,
//! then VmRSS (held, idle) and VmHWM (peak) of the agent process once it has been idle a while.
//!
//! Needs root: the agent and the server run in a throwaway network namespace (iptables and the
//! proxy address never touch the root namespace). Build the agent binary for the same target
//! first; the example runs the `edgeproxy` binary next to itself:
//!
//! `cargo build --release --target x86_64-unknown-linux-musl --bin edgeproxy --example bench_agent`
//! `target/x86_64-unknown-linux-musl/release/examples/bench_agent [N] [idle seconds]`

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
#[path = "common/cluster.rs"]
mod cluster;
#[path = "../tests/support/fixtures.rs"]
mod fixtures;
#[path = "../tests/support/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn status_of(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l[field.len()..].trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        cluster::serve(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1_000));
        return;
    }
    netns::require_root();
    let n: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1_000);
    let idle: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(5);
    let exe = std::env::current_exe().unwrap();
    let agent = exe.parent().and_then(|d| d.parent()).map(|d| d.join("edgeproxy")).unwrap();
    assert!(agent.exists(), "{} is missing: build it with --bin edgeproxy for the same target", agent.display());

    let mut ns = netns::Netns::new("bench");
    // The server serves until its stdin closes, so it gets a pipe (not `Netns::spawn`'s null).
    let mut server = ns
        .cmd(&[exe.to_str().unwrap(), "--serve", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let (url, dir) = (parts.next().unwrap().to_string(), std::path::PathBuf::from(parts.next().unwrap()));
    println!("server {url}: {n} services + {n} EndpointSlices, pages of 500 (agent {})", agent.display());

    let (ca, token) = (dir.join("ca.crt"), dir.join("token"));
    let mut cmd = ns.cmd(&[
        agent.to_str().unwrap(),
        "run",
        "--run-dir",
        dir.join("run").to_str().unwrap(),
        "--state-dir",
        "",
        "--server",
        &url,
        "--ca-file",
        ca.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    let t0 = Instant::now();
    let ai = ns.spawn(cmd);
    let child = ns.child(ai);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("the agent did not get ready in 120 s");
        if line.contains("ERROR") || line.contains("WARN") {
            eprintln!("agent: {line}");
        }
        if line.contains("ready:") {
            break;
        }
    }
    let ready = t0.elapsed();
    // `ip netns exec` execs the agent, so the child's pid is the agent's.
    let pid = ns.child(ai).id();
    println!("ready after {ready:.2?}; VmRSS {} kB", status_of(pid, "VmRSS:"));
    std::thread::sleep(Duration::from_secs(idle));
    let (rss, hwm) = (status_of(pid, "VmRSS:"), status_of(pid, "VmHWM:"));
    println!("idle {idle} s: VmRSS {rss} kB (held), VmHWM {hwm} kB (peak)");
    // SIGTERM: the agent removes its rules; the namespace goes away on drop anyway.
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = ns.child(ai).wait();
    drop(server.stdin.take());
    let _ = server.wait();
}
