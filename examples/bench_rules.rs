//! Rule sync benchmark (not a test): run as root, `cargo run --release --example bench_rules`.
//!
//! In throwaway network namespaces, for both backends: full-sync time for 1,000 / 5,000 / 10,000
//! service ports (portals layout: two DNAT rules per port), the time from one endpoint change to
//! rules in the kernel (plan + sync) for a change that flips a rule (a service loses its last
//! endpoint: one reject DNAT in EDGEPROXY-NO-ENDPOINTS) and for one that flips nothing (a
//! service gains a second endpoint), the cost of one guard check with everything in place (when
//! the kernel's canary changed, so the guard lists; and when it did not), and
//! the same work done EdgeMesh's way (one `iptables -C` then `-A` process per rule). The per-process part is
//! measured on 1,000 rules and extrapolated linearly (a lower bound: each call copies the whole
//! table, so the real cost grows with the table).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use edgeproxy::config::Config;
use edgeproxy::model::{Kind, ObjectKey};
use edgeproxy::rules::applier::{Applier, SyncReport};
use edgeproxy::rules::iptables::{Binaries, LEGACY, NFT};
use edgeproxy::rules::nftables::apply::NftApplier;
use edgeproxy::rules::render::Layout;
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::state::{Change, State, StateConfig};

fn cluster(n: usize) -> State {
    cluster_with(n, Layout::Portals)
}

fn cluster_with(n: usize, layout: Layout) -> State {
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        let ep = format!("192.0.{}.{}", (i / 250) % 250, i % 250 + 1);
        svcs.push(format!(r#"{{"kind":"Service","apiVersion":"v1","metadata":{{"name":"s{i}","namespace":"bench"}},"spec":{{"clusterIP":"{ip}","ports":[{{"name":"http","port":80,"targetPort":8080}}]}}}}"#));
        slices.push(format!(r#"{{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{{"name":"s{i}-x","namespace":"bench","labels":{{"kubernetes.io/service-name":"s{i}"}}}},"addressType":"IPv4","endpoints":[{{"addresses":["{ep}"],"conditions":{{"ready":true}}}}],"ports":[{{"name":"http","port":8080,"protocol":"TCP"}}]}}"#));
    }
    let mut cfg = Config::defaults();
    cfg.layout = layout;
    let mut st = State::new(StateConfig::from(&cfg));
    for (items, kind) in [(svcs, Kind::Service), (slices, Kind::EndpointSlice)] {
        let doc = format!(r#"{{"kind":"List","apiVersion":"v1","items":[{}]}}"#, items.join(","));
        let d = decode_document(doc.as_bytes(), None);
        assert!(d.errors.is_empty() && d.document_error.is_none());
        st.apply(Change::Replace(kind, d.objects));
    }
    st
}

/// Split an iptables-save rule line into argv (double quotes group words).
fn split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Row {
    backend: &'static str,
    ports: usize,
    rules: usize,
    full: Duration,
    noop: Duration,
    plan: Duration,
    change: Duration,
    flip_sync: Duration,
    nochange: Duration,
    guard: Duration,
    guard_canary: Duration,
    edgemesh_per_rule: Duration,
}

/// A second ready endpoint for service `s{i}` (same slice name: an update).
fn two_endpoints(i: usize) -> Change {
    let doc = format!(
        r#"{{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{{"name":"s{i}-x","namespace":"bench","labels":{{"kubernetes.io/service-name":"s{i}"}}}},"addressType":"IPv4","endpoints":[{{"addresses":["192.0.{}.{}"],"conditions":{{"ready":true}}}},{{"addresses":["198.51.100.7"],"conditions":{{"ready":true}}}}],"ports":[{{"name":"http","port":8080,"protocol":"TCP"}}]}}"#,
        (i / 250) % 250,
        i % 250 + 1
    );
    let d = decode_document(doc.as_bytes(), Some(Kind::EndpointSlice));
    assert!(d.errors.is_empty() && d.document_error.is_none());
    Change::Upsert(d.objects.into_iter().next().expect("one slice"))
}

/// Guard checks, everything in place: the first after the last write (the canary may have
/// moved, so it may list), and the median of the next three (the canary unchanged).
fn guard_times(mut guard: impl FnMut() -> SyncReport) -> (Duration, Duration) {
    let mut g: Vec<Duration> = (0..4)
        .map(|_| {
            let t = Instant::now();
            let r = guard();
            assert!(r.repaired.is_empty() && r.restores == 0, "{:?}", r.repaired);
            t.elapsed()
        })
        .collect();
    let first = g.remove(0);
    g.sort();
    (first, g[1])
}

fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("netns");
        // SAFETY: setns only changes this thread's network namespace.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .expect("bench thread")
}

fn bench(b: Binaries, n: usize, edgemesh_sample: usize) -> Row {
    let ns = format!("epbench-{}-{n}-{}", b.name, std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    let row = in_netns(&ns, move || {
        let mut st = cluster(n);
        let rules = st.plan().rules;
        let mut a = Applier::with_binaries(b).expect("backend");
        let t = Instant::now();
        a.apply(&rules).expect("full sync");
        let full = t.elapsed();
        let t = Instant::now();
        a.apply(&rules).expect("no-op sync");
        let noop = t.elapsed();
        // One endpoint change that changes the rules: a service loses its only endpoint.
        let t = Instant::now();
        st.apply(Change::Delete(Kind::EndpointSlice, ObjectKey::new("bench", &format!("s{}-x", n / 2))));
        let changed = st.plan().rules;
        let plan = t.elapsed();
        let t = Instant::now();
        let r = a.apply(&changed).expect("change");
        let flip_sync = t.elapsed();
        let change = plan + flip_sync;
        assert_eq!((r.restores, r.chains.as_slice()), (1, &["EDGEPROXY-NO-ENDPOINTS"][..]));
        // One endpoint change that changes no rule: another service gains an endpoint.
        let t = Instant::now();
        st.apply(two_endpoints(n / 3));
        let same = st.plan().rules;
        let r = a.apply(&same).expect("no-rule change");
        let nochange = t.elapsed();
        assert_eq!(r.restores, 0);
        let (guard, guard_canary) = guard_times(|| a.guard().expect("guard"));
        a.cleanup().unwrap();
        // EdgeMesh's way: -C then -A, one process each, per rule, onto an empty chain.
        let sample: Vec<&String> = rules
            .v4
            .rules
            .iter()
            .filter(|r| r.starts_with("-A KUBE-PORTALS-HOST") && r.contains(" -j DNAT "))
            .take(edgemesh_sample)
            .collect();
        Command::new(b.cmd).args(["-t", "nat", "-N", "KUBE-PORTALS-HOST"]).status().unwrap();
        let t = Instant::now();
        for r in &sample {
            let args = split(&r[3..]); // chain and its arguments
            let check = Command::new(b.cmd).args(["-w", "5", "-t", "nat", "-C"]).args(&args).output().unwrap();
            if !check.status.success() {
                let add = Command::new(b.cmd).args(["-w", "5", "-t", "nat", "-A"]).args(&args).output().unwrap();
                assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
            }
        }
        let edgemesh_per_rule = t.elapsed() / u32::try_from(sample.len().max(1)).unwrap_or(u32::MAX);
        Row {
            backend: b.name,
            ports: n,
            rules: rules.v4.rules.len(),
            full,
            noop,
            plan,
            change,
            flip_sync,
            nochange,
            guard,
            guard_canary,
            edgemesh_per_rule,
        }
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    row
}

/// The same measurements for the `nftables` layout (one map element per service port; a sync
/// sends only the elements that changed). No EdgeMesh column: EdgeMesh has no such layout.
fn bench_nftables(n: usize) -> Row {
    let ns = format!("epbench-nftables-{n}-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    let row = in_netns(&ns, move || {
        let mut st = cluster_with(n, Layout::Nftables);
        let rules = std::sync::Arc::new(st.plan().rules);
        let elements = rules.nft.as_ref().expect("the nftables layout").v4.elements.len();
        let mut a = NftApplier::new().expect("nft");
        let t = Instant::now();
        a.apply(&rules).expect("full sync");
        let full = t.elapsed();
        let t = Instant::now();
        let r = a.apply(&rules).expect("no-op sync");
        let noop = t.elapsed();
        assert_eq!(r.restores, 0);
        let t = Instant::now();
        st.apply(Change::Delete(Kind::EndpointSlice, ObjectKey::new("bench", &format!("s{}-x", n / 2))));
        let changed = std::sync::Arc::new(st.plan().rules);
        let plan = t.elapsed();
        let t = Instant::now();
        let r = a.apply(&changed).expect("change");
        let flip_sync = t.elapsed();
        assert_eq!((r.restores, r.full), (1, false), "one element changed: one small transaction");
        let t = Instant::now();
        st.apply(two_endpoints(n / 3));
        let same = std::sync::Arc::new(st.plan().rules);
        let r = a.apply(&same).expect("no-rule change");
        let nochange = t.elapsed();
        assert_eq!(r.restores, 0);
        let (guard, guard_canary) = guard_times(|| a.guard().expect("guard"));
        a.cleanup().unwrap();
        Row {
            backend: "nftables",
            ports: n,
            rules: elements,
            full,
            noop,
            plan,
            change: plan + flip_sync,
            flip_sync,
            nochange,
            guard,
            guard_canary,
            edgemesh_per_rule: Duration::ZERO,
        }
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    row
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root (it creates network namespaces)");
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1_000, 5_000, 10_000] } else { sizes };
    let sample = 1_000;
    println!("edgeproxy rule sync: the nftables layout (one map element per service port) and the portals layout on both iptables backends (2 rules per service port), IPv4; EdgeMesh way measured on {sample} rules, extrapolated");
    println!("1 flip ms / 1 same ms: an endpoint change to rules in the kernel (plan + sync), one that flips a rule / one that does not; flip sync ms: the sync part of 1 flip");
    println!(
        "{:<8} {:>7} {:>7} {:>13} {:>9} {:>8} {:>10} {:>13} {:>10} {:>9} {:>9} {:>20} {:>9}",
        "backend",
        "ports",
        "rules",
        "full sync ms",
        "no-op ms",
        "plan ms",
        "1 flip ms",
        "flip sync ms",
        "1 same ms",
        "guard ms",
        "canary us",
        "EdgeMesh way s (est)",
        "speed-up"
    );
    for &n in &sizes {
        print_row(&bench_nftables(n), None);
    }
    for b in [NFT, LEGACY] {
        for &n in &sizes {
            let r = bench(b, n, sample);
            // EdgeMesh's way: one -C/-A pair per DNAT, two per service port.
            print_row(&r, Some(r.edgemesh_per_rule * u32::try_from(2 * r.ports).unwrap_or(u32::MAX)));
        }
    }
}

/// One row of the table; `edgemesh`: the estimate of EdgeMesh's way for the same rules.
fn print_row(r: &Row, edgemesh: Option<Duration>) {
    let (em, speedup) = match edgemesh {
        Some(em) => (format!("{:.1}", em.as_secs_f64()), format!("{:.0}x", em.as_secs_f64() / r.full.as_secs_f64())),
        None => ("-".into(), "-".into()),
    };
    println!(
        "{:<8} {:>7} {:>7} {:>13} {:>9} {:>8} {:>10} {:>13} {:>10} {:>9} {:>9} {:>20} {:>9}",
        r.backend,
        r.ports,
        r.rules,
        ms(r.full),
        ms(r.noop),
        ms(r.plan),
        ms(r.change),
        ms(r.flip_sync),
        ms(r.nochange),
        ms(r.guard),
        format!("{:.0}", r.guard_canary.as_secs_f64() * 1e6),
        em,
        speedup
    );
}
