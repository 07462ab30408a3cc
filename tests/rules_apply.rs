//! The applier against the real iptables binaries, both backends, each test in namespaces it
//! creates: install and follow changes (one restore each), the hybrid-order guard, a restore
//! that fails halfway, the xtables lock, and cleanup leaving the table as it was.
mod support;

use std::time::{Duration, Instant};

use edgeproxy::config::Config;
use edgeproxy::kube::objects::decode_document;
use edgeproxy::model::{Kind, ObjectKey};
use edgeproxy::rules::apply::{Applier, ApplyError, Binaries, LEGACY, NFT};
use edgeproxy::rules::RuleSet;
use edgeproxy::state::{Change, State, StateConfig};
use support::netns::{require_root, Netns};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/monitoring-cluster");

fn fixture_state() -> State {
    let mut st = State::new(StateConfig::from(&Config::defaults()));
    for (file, kind) in [("services.json", Kind::Service), ("endpointslices.json", Kind::EndpointSlice)] {
        let bytes = std::fs::read(format!("{FIXTURES}/{file}")).expect("fixture");
        let d = decode_document(&bytes, Some(kind));
        assert!(d.document_error.is_none());
        st.apply(Change::Replace(kind, d.objects));
    }
    st
}

/// `iptables-save -t <table>` without comments and counters: comparable across time.
fn dump(ns: &Netns, b: &Binaries, table: &str) -> String {
    let out = ns.ok(&[b.save, "-t", table]);
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.rfind(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn chain(ns: &Netns, b: &Binaries, chain: &str) -> Vec<String> {
    ns.ok(&[b.cmd, "-t", "nat", "-S", chain]).lines().filter(|l| l.starts_with("-A")).map(str::to_string).collect()
}

fn backends() -> [(Binaries, &'static str); 2] {
    [(NFT, "nft"), (LEGACY, "leg")]
}

#[test]
fn install_then_changes_each_in_one_restore_and_guard_never_churns() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("ap{tag}"));
        let name = ns.name.clone();
        let result = ns
            .thread(move || {
                let mut st = fixture_state();
                let mut a = Applier::with_binaries(b).expect("backend");
                let plan = st.plan();
                let r = a.apply(&plan.rules).expect("first apply");
                assert_eq!((r.restores, a.restores()), (1, 1), "{}: one restore for the install", b.name);
                // The same set again: no process at all.
                a.apply(&plan.rules).unwrap();
                assert_eq!(a.restores(), 1, "unchanged set must not restore");
                // Guard with everything in place: never churns.
                for _ in 0..3 {
                    let g = a.guard().unwrap();
                    assert!(g.repaired.is_empty(), "{:?}", g.repaired);
                }
                assert_eq!(a.restores(), 1, "guard restored although everything was in place");
                // Remove a service: one restore.
                st.apply(Change::Delete(Kind::Service, ObjectKey::new("edge-apps", "web-frontend")));
                a.apply(&st.plan().rules).unwrap();
                assert_eq!(a.restores(), 2);
                // Remove the endpoints of a service (it now rejects): one restore.
                let slices: Vec<_> = st
                    .snapshot()
                    .endpoints
                    .values()
                    .filter(|e| &*e.service.name == "inventory")
                    .map(|e| e.key.clone())
                    .collect();
                for k in slices {
                    st.apply(Change::Delete(Kind::EndpointSlice, k));
                }
                a.apply(&st.plan().rules).unwrap();
                assert_eq!(a.restores(), 3);
                // Back as before: one restore.
                let mut full = fixture_state();
                a.apply(&full.plan().rules).unwrap();
                assert_eq!(a.restores(), 4);
                (a.restores(), st.plan().rules, full.plan().rules)
            })
            .join();
        let (_, _, full) = result.unwrap_or_else(|_| panic!("{name}: applier thread panicked"));
        let host = chain(&ns, &b, "KUBE-PORTALS-HOST");
        assert_eq!(
            host,
            full.v4.rules.iter().filter(|r| r.starts_with("-A KUBE-PORTALS-HOST")).cloned().collect::<Vec<_>>()
        );
        assert!(host.iter().any(|r| r.contains("edge-apps/web-frontend:http") && r.contains("10.96.85.103/32")));
        assert!(host
            .iter()
            .any(|r| r.contains("edge-apps/reports") && r.contains("has no endpoints") && r.ends_with(":15000")));
        assert_eq!(chain(&ns, &b, "PREROUTING")[0], format!("-A PREROUTING {}", full.v4.jumps[0].spec));
        assert_eq!(chain(&ns, &b, "OUTPUT")[0], format!("-A OUTPUT {}", full.v4.jumps[1].spec));
    }
}

#[test]
fn guard_puts_jumps_first_again_and_recreates_chains() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("gd{tag}"));
        let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(u64, Vec<String>)>();
        let worker = ns.thread(move || {
            let mut a = Applier::with_binaries(b).expect("backend");
            let rules = fixture_state().plan().rules;
            a.apply(&rules).unwrap();
            done_tx.send((0, Vec::new())).unwrap();
            // Each message: something was done to the table; run the guard twice.
            while let Ok(what) = rx.recv() {
                let before = a.restores();
                let first = a.guard().unwrap_or_else(|e| panic!("{what}: {e}"));
                let second = a.guard().unwrap();
                assert!(second.repaired.is_empty(), "{what}: second guard still found {:?}", second.repaired);
                done_tx.send((a.restores() - before, first.repaired)).unwrap();
            }
        });
        done_rx.recv_timeout(Duration::from_secs(30)).expect("installed");
        let step = |what: &'static str, script: &str| {
            ns.sh(script);
            tx.send(what).unwrap();
            let (restores, repaired) = done_rx.recv_timeout(Duration::from_secs(30)).expect("guard answered");
            assert_eq!(restores, 1, "{}: {what}: one repair restore, found {repaired:?}", b.name);
            assert!(!repaired.is_empty(), "{what}: nothing reported");
            let pre = chain(&ns, &b, "PREROUTING");
            let out = chain(&ns, &b, "OUTPUT");
            assert!(pre[0].ends_with("-j KUBE-PORTALS-CONTAINER"), "{what}: {pre:?}");
            assert!(out[0].ends_with("-j KUBE-PORTALS-HOST"), "{what}: {out:?}");
            assert_eq!(pre.iter().filter(|l| l.contains("KUBE-PORTALS")).count(), 1, "{what}: {pre:?}");
            assert!(chain(&ns, &b, "KUBE-PORTALS-HOST").len() > 10, "{what}: chain content back");
            repaired
        };
        let ipt = b.cmd;
        let found = step(
            "kube-proxy inserted ahead",
            &format!(
                "{ipt} -t nat -N KUBE-SERVICES && {ipt} -t nat -I PREROUTING 1 -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES && {ipt} -t nat -I OUTPUT 1 -j KUBE-SERVICES"
            ),
        );
        assert!(found.iter().any(|f| f.contains("KUBE-SERVICES") && f.contains("ahead")), "{found:?}");
        // kube-proxy's jump is still there, now second.
        assert!(chain(&ns, &b, "PREROUTING")[1].ends_with("-j KUBE-SERVICES"));
        step("jump deleted", &format!("{ipt} -t nat -D OUTPUT 1"));
        step("chain flushed", &format!("{ipt} -t nat -F KUBE-PORTALS-HOST"));
        step("everything flushed and deleted (fw4 flush)", &format!("{ipt} -t nat -F && {ipt} -t nat -X"));
        drop(tx);
        worker.join().expect("guard thread");
    }
}

#[test]
fn restore_failing_halfway_keeps_previous_rules_and_names_the_line() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("bd{tag}"));
        let before_bad;
        let good = fixture_state().plan().rules;
        let mut bad: RuleSet = good.clone();
        // A different set (one service less) with a broken rule in the middle.
        bad.v4.rules.retain(|r| !r.contains("edge-apps/shop"));
        let mid = bad.v4.rules.len() / 2;
        bad.v4.rules.insert(mid, "-A KUBE-PORTALS-HOST -d 10.96.9.9/32 -p tcp -j NO-SUCH-CHAIN".into());
        {
            let g = good.clone();
            ns.thread(move || Applier::with_binaries(b).unwrap().apply(&g).map(|_| ()).unwrap()).join().unwrap();
            before_bad = dump(&ns, &b, "nat");
        }
        let err = ns
            .thread(move || {
                let mut a = Applier::with_binaries(b).unwrap();
                a.apply(&good).unwrap(); // same as in the kernel
                a.apply(&bad).map(|_| ()).unwrap_err()
            })
            .join()
            .unwrap();
        match &err {
            ApplyError::Restore { line: Some(n), context, .. } => {
                // Input: *nat, 2 chain lines, then the rules.
                assert_eq!(*n, mid + 4, "{}: {err}", b.name);
                assert!(context.contains("> ") && context.contains("NO-SUCH-CHAIN"), "{context}");
            }
            other => panic!("{}: expected a restore error naming the line, got {other}", b.name),
        }
        assert!(err.to_string().contains("NO-SUCH-CHAIN"), "{err}");
        assert_eq!(dump(&ns, &b, "nat"), before_bad, "{}: the failed restore changed the table", b.name);
        assert!(chain(&ns, &b, "KUBE-PORTALS-HOST").iter().any(|r| r.contains("edge-apps/shop")));
    }
}

#[test]
fn sync_waits_for_the_xtables_lock_and_succeeds() {
    require_root();
    for (b, tag) in backends() {
        let mut ns = Netns::new(&format!("lk{tag}"));
        // Make sure the table exists before the lock is taken.
        ns.ok(&[b.cmd, "-t", "nat", "-S"]);
        let mut holder = std::process::Command::new("flock");
        holder.args(["/run/xtables.lock", "sleep", "3"]);
        let i = ns.spawn(holder);
        std::thread::sleep(Duration::from_millis(300)); // let flock take the lock
        let t = Instant::now();
        let r = ns
            .thread(move || Applier::with_binaries(b).unwrap().apply(&fixture_state().plan().rules).map(|r| r.restores))
            .join()
            .unwrap();
        let waited = t.elapsed();
        assert_eq!(r.expect("sync succeeded after the lock was released"), 1);
        if b.name == "legacy" {
            // iptables-legacy takes the lock: the sync must have waited for it.
            assert!(waited >= Duration::from_secs(2), "legacy sync did not wait for the lock: {waited:?}");
        }
        let _ = ns.child(i).wait();
        assert!(chain(&ns, &b, "KUBE-PORTALS-HOST").len() > 10);
        eprintln!("{}: sync under a held xtables lock took {waited:?}", b.name);
    }
}

#[test]
fn cleanup_leaves_the_table_as_before_and_layout_switch_removes_the_old() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("cl{tag}"));
        let ipt = b.cmd;
        ns.sh(&format!(
            "{ipt} -t nat -N KUBE-SERVICES && {ipt} -t nat -A PREROUTING -j KUBE-SERVICES && {ipt} -t nat -A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE && {ipt} -t filter -A INPUT -p tcp --dport 22 -j ACCEPT"
        ));
        let nat0 = dump(&ns, &b, "nat");
        let filter0 = dump(&ns, &b, "filter");
        ns.thread(move || {
            let mut a = Applier::with_binaries(b).unwrap();
            a.apply(&fixture_state().plan().rules).unwrap();
            // A new run with the other layout: start-up cleanup removes the portals chains.
            let mut cfg = Config::defaults();
            cfg.layout = edgeproxy::rules::render::Layout::RootChain;
            let mut st = State::new(StateConfig::from(&cfg));
            for (file, kind) in [("services.json", Kind::Service), ("endpointslices.json", Kind::EndpointSlice)] {
                let d = decode_document(&std::fs::read(format!("{FIXTURES}/{file}")).unwrap(), Some(kind));
                st.apply(Change::Replace(kind, d.objects));
            }
            let mut a2 = Applier::with_binaries(b).unwrap();
            a2.startup_cleanup().unwrap();
            a2.apply(&st.plan().rules).unwrap();
        })
        .join()
        .unwrap();
        let nat = dump(&ns, &b, "nat");
        assert!(!nat.contains("KUBE-PORTALS"), "{}: old layout left: {nat}", b.name);
        assert!(
            nat.contains(":EDGE-MESH-TCP")
                && nat.contains("-A PREROUTING -m comment --comment \"edgemesh root chain\" -j EDGE-MESH")
        );
        ns.thread(move || Applier::with_binaries(b).unwrap().cleanup().unwrap()).join().unwrap();
        assert_eq!(dump(&ns, &b, "nat"), nat0, "{}: nat table differs after cleanup", b.name);
        assert_eq!(dump(&ns, &b, "filter"), filter0, "{}: filter table differs after cleanup", b.name);
    }
}
