//! The applier against the real iptables binaries, both backends, each test in namespaces it
//! creates: install and follow changes (one restore each), the hybrid-order guard, a restore
//! that fails halfway, the xtables lock, and cleanup leaving the table as it was.
mod support;

use std::time::{Duration, Instant};

use edgeproxy::config::Config;
use edgeproxy::model::{Kind, ObjectKey};
use edgeproxy::rules::applier::Applier;
use edgeproxy::rules::iptables::{ApplyError, Binaries, LEGACY, NFT};
use edgeproxy::rules::{RuleSet, TableRules};
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::state::{Change, State, StateConfig};
use support::netns::{require_root, Netns};

use support::fixtures::read as fixture;

fn fixture_state() -> State {
    let mut st = State::new(StateConfig::from(&Config::defaults()));
    for (file, kind) in [("services.json", Kind::Service), ("endpointslices.json", Kind::EndpointSlice)] {
        let bytes = fixture(file);
        let d = decode_document(&bytes, Some(kind));
        assert!(d.document_error.is_none());
        st.apply(Change::Replace(kind, d.objects));
    }
    st
}

fn dump(ns: &Netns, b: &Binaries, table: &str) -> String {
    ns.save_dump(b.save, table)
}

fn chain(ns: &Netns, b: &Binaries, chain: &str) -> Vec<String> {
    ns.ok(&[b.cmd, "-t", "nat", "-S", chain]).lines().filter(|l| l.starts_with("-A")).map(str::to_string).collect()
}

fn backends() -> [(Binaries, &'static str); 2] {
    [(NFT, "nft"), (LEGACY, "leg")]
}

/// What the kernel holds in each of `want`'s chains equals what `want` puts there. Runs on a
/// thread inside the namespace (processes it starts inherit the namespace).
fn assert_kernel_holds(b: &Binaries, want: &TableRules, what: &str) {
    for chain in &want.chains {
        let out = std::process::Command::new(b.cmd).args(["-t", "nat", "-S", chain]).output().unwrap();
        assert!(out.status.success(), "{what}: {chain}: {}", String::from_utf8_lossy(&out.stderr));
        let got: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect();
        let expected: Vec<String> =
            want.rules.iter().filter(|r| r.starts_with(&format!("-A {chain} "))).cloned().collect();
        assert_eq!(got, expected, "{}: {what}: chain {chain}", b.name);
    }
}

/// Packet counter of the one `-A` line of `iptables-save -c -t nat` that contains `needle`.
fn packets(b: &Binaries, needle: &str) -> u64 {
    let out = std::process::Command::new(b.save).args(["-c", "-t", "nat"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle) && l.contains("] -A ")).collect();
    assert_eq!(lines.len(), 1, "{needle}: {lines:?}");
    lines[0][1..lines[0].find(':').unwrap()].parse().unwrap()
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn install_then_changes_each_in_one_restore_and_guard_never_churns() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("ap{tag}"));
        // Local traffic to the service range gets a route; the proxy address is on lo with no
        // listener, so a DNATed connection is refused at once (and counted by the rule).
        ns.sh("ip route add local 10.96.0.0/12 dev lo && ip addr add 169.254.96.16/32 dev lo");
        let name = ns.name.clone();
        let result = ns
            .thread(move || {
                let mut st = fixture_state();
                let mut a = Applier::with_binaries(b).expect("backend");
                let plan = st.plan();
                let r = a.apply(&plan.rules).expect("first apply");
                assert_eq!((r.restores, a.restores()), (1, 1), "{}: one restore for the install", b.name);
                assert!(r.full, "the first sync is a full rewrite");
                assert_eq!(r.chains, plan.rules.v4.chains);
                assert_kernel_holds(&b, &plan.rules.v4, "install");
                // The same set again: no process at all.
                let r = a.apply(&plan.rules).unwrap();
                assert_eq!((a.restores(), r.restores, r.chains.len()), (1, 0, 0), "unchanged set must not restore");
                // Guard with everything in place: never churns.
                for _ in 0..3 {
                    let g = a.guard().unwrap();
                    assert!(g.repaired.is_empty(), "{:?}", g.repaired);
                }
                assert_eq!(a.restores(), 1, "guard restored although everything was in place");
                // A connection to web-frontend through the host chain: its rule counts a packet.
                let web = "\"edge-apps/web-frontend:http\" -m tcp --dport 80";
                let _ = std::process::Command::new("curl").args(["-s", "-m", "2", "http://10.96.85.103/"]).output();
                let web_host = format!("-A KUBE-PORTALS-HOST -d 10.96.85.103/32 -p tcp -m comment --comment {web}");
                assert_eq!(packets(&b, &web_host), 1, "{}: the connection did not pass the host chain", b.name);
                // Remove the endpoints of a service (it now rejects): one restore, and only the small
                // chain is written; the portals chains (and their counters) stay as they were.
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
                let flipped = st.plan().rules;
                let r = a.apply(&flipped).unwrap();
                assert_eq!((a.restores(), r.restores, r.full), (2, 1, false));
                assert_eq!(r.chains, vec!["EDGEPROXY-NO-ENDPOINTS"], "{}: an endpoint flip rewrote more", b.name);
                assert_kernel_holds(&b, &flipped.v4, "inventory lost its endpoints");
                assert!(flipped.v4.rules.iter().any(|r| r.starts_with("-A EDGEPROXY-NO-ENDPOINTS ")
                    && r.contains("edge-apps/inventory:http has no endpoints")));
                assert_eq!(packets(&b, &web_host), 1, "{}: the host chain was rewritten (counter reset)", b.name);
                // Remove a service: one restore, both portals chains (it had endpoints).
                st.apply(Change::Delete(Kind::Service, ObjectKey::new("edge-apps", "web-frontend")));
                let removed = st.plan().rules;
                let r = a.apply(&removed).unwrap();
                assert_eq!((a.restores(), r.restores), (3, 1));
                assert_eq!(r.chains, vec!["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"]);
                assert_kernel_holds(&b, &removed.v4, "web-frontend removed");
                // Back as before: one restore.
                let mut full = fixture_state();
                let r = a.apply(&full.plan().rules).unwrap();
                assert_eq!((a.restores(), r.restores), (4, 1));
                assert_eq!(r.chains, full.plan().rules.v4.chains, "service and endpoints back: all three chains");
                assert_kernel_holds(&b, &full.plan().rules.v4, "back as before");
                // The periodic resync rewrites everything even though nothing changed.
                let r = a.reapply(&full.plan().rules).unwrap();
                assert_eq!((a.restores(), r.restores, r.full), (5, 1, true));
                assert_kernel_holds(&b, &full.plan().rules.v4, "resync");
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
        assert!(chain(&ns, &b, "EDGEPROXY-NO-ENDPOINTS")
            .iter()
            .any(|r| r.contains("edge-apps/reports") && r.contains("has no endpoints") && r.ends_with(":15000")));
        assert_eq!(chain(&ns, &b, "PREROUTING")[0], format!("-A PREROUTING {}", full.v4.jumps[0].spec));
        assert_eq!(chain(&ns, &b, "OUTPUT")[0], format!("-A OUTPUT {}", full.v4.jumps[1].spec));
    }
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
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
        let found = step("no-endpoints chain flushed", &format!("{ipt} -t nat -F EDGEPROXY-NO-ENDPOINTS"));
        assert!(found.iter().any(|f| f.contains("EDGEPROXY-NO-ENDPOINTS")), "{found:?}");
        assert!(chain(&ns, &b, "EDGEPROXY-NO-ENDPOINTS").iter().any(|r| r.contains("has no endpoints")));
        let found = step(
            "a reject rule edited",
            &format!("{ipt} -t nat -R EDGEPROXY-NO-ENDPOINTS 1 -p tcp -j DNAT --to-destination 192.0.2.99:80"),
        );
        assert!(found.iter().any(|f| f.contains("EDGEPROXY-NO-ENDPOINTS was flushed or edited")), "{found:?}");
        assert!(!chain(&ns, &b, "EDGEPROXY-NO-ENDPOINTS").iter().any(|r| r.contains("192.0.2.99")));
        step("everything flushed and deleted (fw4 flush)", &format!("{ipt} -t nat -F && {ipt} -t nat -X"));
        drop(tx);
        worker.join().expect("guard thread");
    }
}

/// With chains too big to list every guard period (here: a limit of 0 rules), nft's guard checks
/// only the jumps, and a flushed big chain comes back with the resync; legacy's guard reads the
/// whole table in one `iptables-legacy-save` anyway and repairs it at once.
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn big_chain_contents_on_nft_are_left_to_the_resync() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("rs{tag}"));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(u64, Vec<String>, u64)>();
        let worker = ns.thread(move || {
            let mut a = Applier::with_binaries(b).expect("backend");
            a.content_check_max_rules = 0;
            let rules = fixture_state().plan().rules;
            a.apply(&rules).unwrap();
            done_tx.send((0, Vec::new(), 0)).unwrap();
            rx.recv().unwrap();
            let before = a.restores();
            let g = a.guard().unwrap();
            let guarded = a.restores() - before;
            let r = a.reapply(&rules).unwrap();
            assert_eq!(r.restores, 1);
            done_tx.send((guarded, g.repaired, a.restores() - before)).unwrap();
        });
        done_rx.recv_timeout(Duration::from_secs(30)).expect("installed");
        let full = chain(&ns, &b, "KUBE-PORTALS-HOST");
        ns.ok(&[b.cmd, "-t", "nat", "-F", "KUBE-PORTALS-HOST"]);
        tx.send(()).unwrap();
        let (guarded, repaired, total) = done_rx.recv_timeout(Duration::from_secs(30)).expect("guard answered");
        worker.join().expect("worker");
        if b.name == "legacy" {
            assert_eq!(guarded, 1, "legacy: the guard repairs a flushed chain");
            assert!(repaired.iter().any(|f| f.contains("KUBE-PORTALS-HOST was flushed or edited")), "{repaired:?}");
        } else {
            assert_eq!((guarded, repaired.len()), (0, 0), "nft: the guard must not list big chains: {repaired:?}");
        }
        assert_eq!(total, guarded + 1, "{}: the resync is one more restore", b.name);
        assert_eq!(chain(&ns, &b, "KUBE-PORTALS-HOST"), full, "{}: the resync put the chain back", b.name);
    }
}

/// Root-chain layout: an endpoint flip writes only the small chain; the last UDP service going
/// away deletes EDGE-MESH-UDP in the same (minimal) restore, and coming back recreates it.
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn root_chain_minimal_syncs_create_and_delete_chains() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("rc{tag}"));
        ns.thread(move || {
            let mut cfg = Config::defaults();
            cfg.layout = edgeproxy::rules::render::Layout::RootChain;
            let load = || {
                let mut st = State::new(StateConfig::from(&cfg));
                for (file, kind) in [("services.json", Kind::Service), ("endpointslices.json", Kind::EndpointSlice)] {
                    let d = decode_document(&fixture(file), Some(kind));
                    st.apply(Change::Replace(kind, d.objects));
                }
                st
            };
            let mut st = load();
            let mut a = Applier::with_binaries(b).unwrap();
            let all = st.plan().rules;
            assert!(all.v4.chains.contains(&"EDGE-MESH-UDP"));
            a.apply(&all).unwrap();
            assert_kernel_holds(&b, &all.v4, "root-chain install");
            // inventory loses its endpoints.
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
            let flipped = st.plan().rules;
            let r = a.apply(&flipped).unwrap();
            assert_eq!((r.restores, r.chains.as_slice()), (1, &["EDGEPROXY-NO-ENDPOINTS"][..]), "{}", b.name);
            assert_kernel_holds(&b, &flipped.v4, "root-chain flip");
            // Every service with a UDP port goes.
            let udp: Vec<ObjectKey> = st
                .snapshot()
                .services
                .values()
                .filter(|s| s.ports.iter().any(|p| p.protocol == edgeproxy::model::Protocol::Udp))
                .map(|s| s.key.clone())
                .collect();
            assert!(!udp.is_empty());
            for k in &udp {
                st.apply(Change::Delete(Kind::Service, k.clone()));
            }
            let no_udp = st.plan().rules;
            assert!(!no_udp.v4.chains.contains(&"EDGE-MESH-UDP"));
            let r = a.apply(&no_udp).unwrap();
            assert_eq!(r.restores, 1);
            assert!(!r.full && r.chains.contains(&"EDGE-MESH") && !r.chains.contains(&"EDGE-MESH-UDP"), "{r:?}");
            assert_kernel_holds(&b, &no_udp.v4, "UDP services gone");
            let out = std::process::Command::new(b.cmd).args(["-t", "nat", "-S", "EDGE-MESH-UDP"]).output().unwrap();
            assert!(!out.status.success(), "{}: EDGE-MESH-UDP still exists", b.name);
            // Back: the chain is created again, in one restore.
            let r = a.apply(&flipped).unwrap();
            assert_eq!(r.restores, 1);
            assert!(!r.full && r.chains.contains(&"EDGE-MESH-UDP"), "{r:?}");
            assert_kernel_holds(&b, &flipped.v4, "UDP services back");
        })
        .join()
        .unwrap_or_else(|_| panic!("{}: root-chain thread panicked", b.name));
    }
}

/// What one guard check reads with everything in place: nothing (no process) while the kernel's
/// canary (nft: ruleset generation; legacy: the nat table's summary) is unchanged since the last
/// check; when anything changed (even a rule not ours), nft lists PREROUTING, OUTPUT and the
/// small chains, legacy runs one `iptables-legacy-save`.
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn guard_reads_little_when_nothing_changed() {
    require_root();
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("gr{tag}"));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<(u32, u32, usize)>>();
        let worker = ns.thread(move || {
            let mut a = Applier::with_binaries(b).expect("backend");
            let rules = fixture_state().plan().rules;
            a.apply(&rules).unwrap();
            let mut g = || {
                let r = a.guard().unwrap();
                (r.reads, r.restores, r.repaired.len())
            };
            let before = vec![g(), g(), g()];
            done_tx.send(before).unwrap();
            rx.recv().unwrap();
            done_tx.send(vec![g(), g()]).unwrap();
            rules
        });
        let first = done_rx.recv_timeout(Duration::from_secs(30)).expect("guards ran");
        // Somebody else's rule, elsewhere in the nat table.
        ns.ok(&[b.cmd, "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE"]);
        tx.send(()).unwrap();
        let second = done_rx.recv_timeout(Duration::from_secs(30)).expect("guards ran");
        let rules = worker.join().expect("worker");
        // legacy: one save; nft: PREROUTING, OUTPUT and (the fixture's are small) all our chains.
        let reads = if b.name == "legacy" { 1 } else { 2 + u32::try_from(rules.v4.chains.len()).unwrap() };
        assert_eq!(
            first,
            vec![(reads, 0, 0), (0, 0, 0), (0, 0, 0)],
            "{}: a check after the install, then none",
            b.name
        );
        assert_eq!(second, vec![(reads, 0, 0), (0, 0, 0)], "{}: a foreign change costs one check, no repair", b.name);
    }
}

/// Both families: the IPv6 set follows an endpoint flip with one small-chain restore, and the
/// guard's content comparison (ip6tables listings vs rendered rules) never churns.
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn ipv6_flip_and_guard() {
    require_root();
    const DUAL: &str = r#"{"kind":"List","items":[
      {"kind":"Service","metadata":{"name":"dual","namespace":"v6"},"spec":{"clusterIP":"10.96.7.7","clusterIPs":["10.96.7.7","fd00:10:96::7"],
       "ports":[{"name":"http","port":80},{"name":"dns","protocol":"UDP","port":53}]}},
      {"kind":"EndpointSlice","metadata":{"name":"dual-v6","namespace":"v6","labels":{"kubernetes.io/service-name":"dual"}},"addressType":"IPv6",
       "endpoints":[{"addresses":["fd00:200::1"]}],"ports":[{"name":"http","port":8080},{"name":"dns","protocol":"UDP","port":53}]}]}"#;
    for (b, tag) in backends() {
        let ns = Netns::new(&format!("v6{tag}"));
        ns.thread(move || {
            let mut st = State::new(StateConfig::from(&Config::defaults()));
            for obj in decode_document(DUAL.as_bytes(), None).objects {
                st.apply(Change::Upsert(obj));
            }
            let mut a = Applier::with_binaries(b).unwrap();
            let rules = st.plan().rules;
            assert!(!rules.v6.is_empty() && !rules.v6.rules.iter().any(|r| r.contains("has no endpoints")));
            // Each ClusterIP is served by its own family only: the IPv4 one has no IPv4 endpoint,
            // so it is refused from the start.
            assert_eq!(rules.v4.rules.iter().filter(|r| r.contains("has no endpoints")).count(), 2);
            a.apply(&rules).unwrap();
            for _ in 0..2 {
                let g = a.guard().unwrap();
                assert!(g.repaired.is_empty() && g.restores == 0, "{}: {:?}", b.name, g.repaired);
            }
            st.apply(Change::Delete(Kind::EndpointSlice, ObjectKey::new("v6", "dual-v6")));
            let flipped = st.plan().rules;
            let r = a.apply(&flipped).unwrap();
            // Only the IPv6 family changed: one restore, of the IPv6 small chain.
            assert_eq!((r.restores, r.chains.as_slice()), (1, &["EDGEPROXY-NO-ENDPOINTS"][..]), "{}", b.name);
            let out = std::process::Command::new(b.cmd6).args(["-t", "nat", "-S", "EDGEPROXY-NO-ENDPOINTS"]).output();
            let listed = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
            let want: Vec<&String> =
                flipped.v6.rules.iter().filter(|r| r.starts_with("-A EDGEPROXY-NO-ENDPOINTS ")).collect();
            assert_eq!(want.len(), 2, "{want:?}");
            for w in want {
                assert!(listed.lines().any(|l| l == w), "{}: {w} not in\n{listed}", b.name);
            }
            for _ in 0..2 {
                let g = a.guard().unwrap();
                assert!(g.repaired.is_empty() && g.restores == 0, "{}: {:?}", b.name, g.repaired);
            }
            a.cleanup().unwrap();
        })
        .join()
        .unwrap_or_else(|_| panic!("{}: IPv6 thread panicked", b.name));
    }
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
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
        let g = good.clone();
        let (err, mut a) = ns
            .thread(move || {
                let mut a = Applier::with_binaries(b).unwrap();
                a.apply(&g).unwrap(); // same as in the kernel
                (a.apply(&bad).map(|_| ()).unwrap_err(), a)
            })
            .join()
            .unwrap();
        assert_eq!(dump(&ns, &b, "nat"), before_bad, "{}: the failed restore changed the table", b.name);
        // After a failure the next sync is a full rewrite, even of the set the kernel holds.
        let after = ns.thread(move || a.apply(&good).unwrap()).join().unwrap();
        assert!(after.full && after.restores == 1, "{}: {after:?}", b.name);
        assert_eq!(after.chains, vec!["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", "EDGEPROXY-NO-ENDPOINTS"]);
        match &err {
            ApplyError::Restore { line: Some(n), context, .. } => {
                // A minimal restore: *nat, the 2 changed chains (shop is gone from both portals
                // chains; the small chain is unchanged), then their rules in order (the rules of
                // the small chain come last in the set, after `mid`).
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
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
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
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
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
            // A new run with the other layout: it adopts what it finds, and its first sync
            // replaces the portals chains in the same transaction.
            let mut cfg = Config::defaults();
            cfg.layout = edgeproxy::rules::render::Layout::RootChain;
            let mut st = State::new(StateConfig::from(&cfg));
            for (file, kind) in [("services.json", Kind::Service), ("endpointslices.json", Kind::EndpointSlice)] {
                let d = decode_document(&fixture(file), Some(kind));
                st.apply(Change::Replace(kind, d.objects));
            }
            let mut a2 = Applier::with_binaries(b).unwrap();
            a2.adopt().unwrap();
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
