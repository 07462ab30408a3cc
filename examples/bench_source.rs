//! Benchmark: list and hold N Services and N EndpointSlices (default 10,000 each) from the test
//! API server over HTTPS, then print the time to the first complete state, peak RSS (VmHWM) and
//! the RSS held after the list (VmRSS).
//!
//! `cargo run --release --example bench_source [-- N]`
//!
//! The server runs in a child process (this binary with `--serve`), so the figures are the
//! agent side only: two reflector threads, the channel, and a `state::State` holding everything.
//! Objects are generated from real captured items (with managedFields, as a real API server sends
//! them), pages of 500.

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
#[path = "common/cluster.rs"]
mod cluster;
#[path = "../tests/support/fixtures.rs"]
mod fixtures;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use edgeproxy::config::Config;
use edgeproxy::source::kube::driver;
use edgeproxy::source::{Sink, SourceEvent};
use edgeproxy::state::{Plan, State, StateConfig};

/// Counts live heap bytes, so the report can tell data from allocator slack.
struct Counting;
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Live allocations: each costs allocator bookkeeping on top of its bytes.
static BLOCKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> String {
    format!("{} kB in {} blocks", LIVE.load(Ordering::Relaxed) / 1024, BLOCKS.load(Ordering::Relaxed))
}

fn proc_status(field: &str) -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(field)).map(|l| l[field.len()..].trim().to_string()).unwrap_or_default()
}

/// RSS by kind of mapping: the binary's own pages, brk heap, anonymous maps (malloc's groups,
/// large blocks, thread stacks), to tell heap slack from code.
fn rss_breakdown() -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut file, mut heap, mut anon, mut anon_maps) = (0u64, 0u64, 0u64, 0u32);
    let mut current = "";
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let name = line.split_whitespace().nth(5).unwrap_or("");
            current = if name == "[heap]" {
                "heap"
            } else if name.starts_with('/') {
                "file"
            } else {
                "anon"
            };
            if current == "anon" {
                anon_maps += 1;
            }
        } else if let Some(kb) = line.strip_prefix("Rss:") {
            let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            match current {
                "heap" => heap += kb,
                "file" => file += kb,
                _ => anon += kb,
            }
        }
    }
    format!("binary {file} kB, brk heap {heap} kB, anonymous {anon} kB in {anon_maps} maps")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        cluster::serve(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000));
        return;
    }
    let n: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--serve", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let (url, dir) = (parts.next().unwrap().to_string(), std::path::PathBuf::from(parts.next().unwrap()));
    println!("server {url}: {n} services + {n} EndpointSlices, pages of 500");
    println!("before: VmRSS {}, VmHWM {}", proc_status("VmRSS:"), proc_status("VmHWM:"));

    let config = Config::defaults();
    let mut cfg = config.source.clone();
    cfg.server = Some(url);
    cfg.ca_file = Some(dir.join("ca.crt"));
    cfg.token_file = Some(dir.join("token"));
    let (tx, rx) = mpsc::channel::<SourceEvent>();
    let tx = std::sync::Mutex::new(tx);
    let sink: Sink = Arc::new(move |ev| {
        let _ = tx.lock().unwrap().send(ev);
    });
    let stop = edgeproxy::stop::Stop::new();
    let mut state = State::new(StateConfig::from(&config));
    let t0 = Instant::now();
    let handles = driver::spawn(&cfg, sink, stop.clone()).unwrap();
    let mut synced = 0;
    while synced < 2 {
        match rx.recv_timeout(Duration::from_secs(120)).expect("no event in 120 s") {
            SourceEvent::Change(c) => {
                state.apply(c);
            }
            SourceEvent::Synced(_) => synced += 1,
            SourceEvent::Error { message, .. } => eprintln!("error: {message}"),
            _ => {}
        }
    }
    let took = t0.elapsed();
    let snap = state.snapshot();
    let services = snap.services.len();
    let slices = snap.endpoints.len();
    assert_eq!((services, slices), (n, n), "incomplete state");
    println!("first complete state: {took:.2?} ({services} services, {slices} EndpointSlices held)");
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "after the list: VmRSS {} (held), VmHWM {} (peak); live heap {}",
        proc_status("VmRSS:"),
        proc_status("VmHWM:"),
        live()
    );
    println!("  RSS by mapping: {}", rss_breakdown());
    // The plan (rules + proxy table) is the next consumer; report its cost too.
    let t1 = Instant::now();
    let plan = state.plan();
    let took = t1.elapsed();
    let rule_bytes: usize =
        [&plan.rules.v4, &plan.rules.v6].iter().flat_map(|t| t.rules.iter()).map(|r| r.capacity()).sum();
    println!(
        "plan: {took:.2?}, {} services proxied; VmRSS {}, VmHWM {}; live heap {} (rule text {} kB)",
        plan.proxied().count(),
        proc_status("VmRSS:"),
        proc_status("VmHWM:"),
        live(),
        rule_bytes / 1024,
    );
    // The agent re-plans on every change while the previous plan is still in use; entries that
    // did not change are shared with it.
    let (t2, before) = (Instant::now(), LIVE.load(Ordering::Relaxed));
    let replan = state.plan_reusing(&plan.table);
    println!(
        "re-plan with nothing changed: {:.2?}; while both exist, +{} kB live heap (rules {} kB of it); VmRSS {}",
        t2.elapsed(),
        (LIVE.load(Ordering::Relaxed) - before) / 1024,
        [&replan.rules.v4, &replan.rules.v6].iter().flat_map(|t| t.rules.iter()).map(|r| r.capacity()).sum::<usize>()
            / 1024,
        proc_status("VmRSS:"),
    );
    drop(replan);
    // What each part of the plan holds (live heap freed by dropping it).
    let mut parts = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    let Plan { reports, rules, table } = plan;
    drop(reports);
    parts.push(format!("reports {} kB", (before - LIVE.load(Ordering::Relaxed)) / 1024));
    let before = LIVE.load(Ordering::Relaxed);
    drop(table);
    parts.push(format!("proxy table {} kB", (before - LIVE.load(Ordering::Relaxed)) / 1024));
    let before = LIVE.load(Ordering::Relaxed);
    drop(rules);
    parts.push(format!("rules {} kB", (before - LIVE.load(Ordering::Relaxed)) / 1024));
    println!("  the plan holds: {}; after dropping it VmRSS {}", parts.join(", "), proc_status("VmRSS:"));
    stop.stop();
    for h in handles {
        let _ = h.join();
    }
    println!("reflectors stopped (their buffers freed): live heap {} (the state alone)", live());
    drop(child.stdin.take());
    let _ = child.wait();
}
