//! The `nftables` layout end to end: the real agent in a namespace the test creates, next to
//! kube-proxy-shaped rules that DNAT the same ClusterIP with their jump at rule 1 (in
//! iptables-legacy, in iptables-nft, and as a kube-proxy-nftables-shaped table at priority
//! `dstnat`). Our tables at `dstnat - 1` take the services we proxy, and the kube-proxy rules
//! the others, with no repair ever needed; `nft flush ruleset` is repaired within the guard
//! period; SIGTERM leaves the ruleset as it was; IPv6 too.
mod support;

use std::time::{Duration, Instant};

use support::agent::{self, count, exit_code, fetch, serve, signal, wait_for, Agent, BIN};
use support::netns::{require_root, veth, Netns};

/// Proxied by us (and DNATed by kube-proxy's rules too, to the wrong backend).
const OURS: &str = "10.96.0.50:80";
/// Labelled for kube-proxy: not ours.
const THEIRS: &str = "10.96.0.60:80";
const OURS6: &str = "[fd00:10::50]:80";

fn cluster() -> String {
    use support::cluster::{list, service, slice};
    let labelled = service("theirs", "10.96.0.60").replace(
        r#""namespace":"t"}"#,
        r#""namespace":"t","labels":{"service.edgemesh.kubeedge.io/service-proxy-name":""}}"#,
    );
    let v6 = r#"{"kind":"Service","apiVersion":"v1","metadata":{"name":"six","namespace":"t"},
        "spec":{"clusterIP":"fd00:10::50","ipFamilies":["IPv6"],"ports":[{"name":"http","port":80,"targetPort":8080}]}}"#;
    let v6_slice = r#"{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"six-1","namespace":"t",
        "labels":{"kubernetes.io/service-name":"six"}},"addressType":"IPv6",
        "endpoints":[{"addresses":["fd00:20::2"],"conditions":{"ready":true}}],"ports":[{"name":"http","port":8080,"protocol":"TCP"}]}"#;
    list(&[
        service("ours", "10.96.0.50"),
        slice("ours", 8080, None),
        labelled,
        slice("theirs", 8080, None),
        v6.to_string(),
        v6_slice.to_string(),
    ])
}

/// How the kube-proxy-shaped rules are written.
#[derive(Clone, Copy, Debug)]
enum KubeProxy {
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

/// kube-proxy's DNATs of both ClusterIPs to 10.20.0.3 ("kube"), hooked in first.
fn install_kube_proxy(node: &Netns, shape: KubeProxy) {
    let iptables = |bin: &str| {
        node.sh(&format!(
            "{bin} -t nat -N KUBE-SERVICES \
             && {bin} -t nat -A KUBE-SERVICES -d 10.96.0.50/32 -p tcp --dport 80 -j DNAT --to-destination 10.20.0.3:8080 \
             && {bin} -t nat -A KUBE-SERVICES -d 10.96.0.60/32 -p tcp --dport 80 -j DNAT --to-destination 10.20.0.3:8080 \
             && {bin} -t nat -I PREROUTING 1 -j KUBE-SERVICES && {bin} -t nat -I OUTPUT 1 -j KUBE-SERVICES"
        ));
    };
    match shape {
        KubeProxy::IptablesLegacy => iptables("iptables-legacy"),
        KubeProxy::IptablesNft => iptables("iptables-nft"),
        KubeProxy::Nftables => {
            let table = "table ip kube-proxy {
                chain services {
                    ip daddr 10.96.0.50 tcp dport 80 dnat to 10.20.0.3:8080
                    ip daddr 10.96.0.60 tcp dport 80 dnat to 10.20.0.3:8080
                }
                chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }
                # nft 1.0.6 refuses the name dstnat on the output hook: -100 is the same.
                chain nat-output { type nat hook output priority -100; policy accept; jump services; }
            }";
            let path = std::env::temp_dir().join(format!("ep-kp-{}-{}.nft", node.name, std::process::id()));
            std::fs::write(&path, table).unwrap();
            node.ok(&["nft", "-f", path.to_str().unwrap()]);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The whole netfilter state a test compares before and after: the nft ruleset (iptables-nft's
/// tables included) and the legacy nat table.
fn ruleset(node: &Netns) -> String {
    format!("{}\n{}", node.ok(&["nft", "list", "ruleset"]), node.save_dump("iptables-legacy-save", "nat"))
}

fn scenario(tag: &str, shape: KubeProxy) {
    require_root();
    let mut node = Netns::new(&format!("nf{tag}"));
    let backend = Netns::new(&format!("nb{tag}"));
    veth(&node, "be0", "10.20.0.1/24", &backend, "eth0", "10.20.0.2/24");
    node.ok(&["ip", "route", "add", "default", "via", "10.20.0.2"]);
    backend.ok(&["ip", "addr", "add", "10.20.0.3/24", "dev", "eth0"]);
    node.ok(&["ip", "-6", "addr", "add", "fd00:20::1/64", "dev", "be0", "nodad"]);
    backend.ok(&["ip", "-6", "addr", "add", "fd00:20::2/64", "dev", "eth0", "nodad"]);
    node.ok(&["ip", "-6", "route", "add", "default", "via", "fd00:20::2"]);
    serve(&backend, "10.20.0.2:8080", "ours\n");
    serve(&backend, "10.20.0.3:8080", "kube\n");
    serve(&backend, "[fd00:20::2]:8080", "six\n");
    install_kube_proxy(&node, shape);
    assert_eq!(fetch(&node, OURS), "kube\n", "{shape:?}: before the agent, kube-proxy's rules answer");
    let before = ruleset(&node);

    let dir = std::env::temp_dir().join(format!("ep-nft-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.json");
    std::fs::write(&file, cluster()).unwrap();
    let source = format!("file:{}", file.display());
    let args = ["--source", &source, "--layout", "nftables", "--guard-period", "1s", "--metrics-address", ""];
    let a: Agent = agent::start(&mut node, &args);
    wait_for("ready", Duration::from_secs(20), || count(&a.log, "ready: source synced") >= 1);
    assert_eq!(fetch(&node, OURS), "ours\n", "{shape:?}: our table at dstnat - 1 runs first");
    assert_eq!(fetch(&node, THEIRS), "kube\n", "{shape:?}: a service we do not proxy goes on to kube-proxy");
    assert_eq!(fetch(&node, OURS6), "six\n", "{shape:?}: IPv6");
    let check = node.exec(&[BIN, "check", "--layout", "nftables", "--run-dir", &node.dir("run")]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{shape:?}: check:\n{out}{}", String::from_utf8_lossy(&check.stderr));
    assert!(out.contains("ip edgeproxy: chain prerouting on prerouting at priority -101"), "{out}");
    // A few guard periods: nothing to repair, kube-proxy's jump at rule 1 notwithstanding.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(count(&a.log, "rules repaired"), 0, "{shape:?}: no repair needed");

    // Somebody flushes the whole ruleset: back within the guard period.
    node.ok(&["nft", "flush", "ruleset"]);
    let flushed = Instant::now();
    wait_for("the repair", Duration::from_secs(5), || count(&a.log, "rules repaired") >= 1);
    let took = flushed.elapsed();
    assert_eq!(fetch(&node, OURS), "ours\n", "{shape:?}: served again after the repair");
    eprintln!("{shape:?}: repaired {took:?} after nft flush ruleset");

    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut node, &a), Some(0));
    let after = ruleset(&node);
    assert!(!after.contains("edgeproxy"), "{shape:?}: our tables are gone:\n{after}");
    let _ = std::fs::remove_dir_all(&dir);
    // The flush took the kube-proxy rules of nft away; compare the rest as it was otherwise.
    if matches!(shape, KubeProxy::IptablesLegacy) {
        assert_eq!(after.trim(), before.trim(), "{shape:?}: the ruleset is as before");
    }
}

/// SIGTERM without a flush in between: the ruleset is exactly as before, whatever the shape.
fn stop_leaves_the_ruleset(tag: &str, shape: KubeProxy) {
    require_root();
    let mut node = Netns::new(&format!("ns{tag}"));
    install_kube_proxy(&node, shape);
    let before = ruleset(&node);
    let dir = std::env::temp_dir().join(format!("ep-nfts-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.json");
    std::fs::write(&file, cluster()).unwrap();
    let source = format!("file:{}", file.display());
    let a = agent::start(&mut node, &["--source", &source, "--layout", "nftables", "--metrics-address", ""]);
    wait_for("ready", Duration::from_secs(20), || count(&a.log, "ready: source synced") >= 1);
    assert!(node.ok(&["nft", "list", "tables"]).contains("table ip edgeproxy"));
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut node, &a), Some(0));
    assert_eq!(ruleset(&node).trim(), before.trim(), "{shape:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn ahead_of_kube_proxy_in_iptables_legacy() {
    scenario("leg", KubeProxy::IptablesLegacy);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn ahead_of_kube_proxy_in_iptables_nft() {
    scenario("ipn", KubeProxy::IptablesNft);
    stop_leaves_the_ruleset("ipn", KubeProxy::IptablesNft);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn ahead_of_kube_proxy_in_nftables_mode() {
    scenario("knf", KubeProxy::Nftables);
    stop_leaves_the_ruleset("knf", KubeProxy::Nftables);
}

/// The elements of a listed map, one normalised line each, sorted (listing order is the
/// kernel's hash order).
fn elements(listing: &str) -> Vec<String> {
    let Some(start) = listing.find("elements = {") else {
        return Vec::new();
    };
    let body = &listing[start + "elements = {".len()..];
    let body = &body[..body.find('}').unwrap()];
    let mut v: Vec<String> = body.split(',').map(|e| e.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn element_changes_over_netlink_leave_the_map_a_full_write_would() {
    use edgeproxy::model::Protocol;
    use edgeproxy::rules::nftables::apply::{netfilter_socket, send_batch, NftApplier};
    use edgeproxy::rules::nftables::batch::Batch;
    use edgeproxy::rules::{Family, NftRules, NftTarget, RuleSet};
    use std::sync::Arc;
    require_root();
    let ns = Netns::new("nfnl");
    let target = |ip: &str, port: u16, name: &str| NftTarget { addr: ip.parse().unwrap(), port, name: name.into() };
    let set = |rules: NftRules| Arc::new(RuleSet { nft: Some(rules), ..RuleSet::default() });
    let mut a = NftRules { mark: 0x0010_0000, ..NftRules::default() };
    for i in 0..50u16 {
        let key = (format!("10.96.1.{}", i + 1).parse().unwrap(), Protocol::Tcp, 80);
        a.v4.elements.insert(key, target("169.254.96.16", 15001, &format!("t/s{i}:http")));
    }
    a.v6.elements
        .insert(("fd00:10::1".parse().unwrap(), Protocol::Tcp, 80), target("fd00:e16e::16", 15001, "t/six:http"));
    let mut b = a.clone();
    b.v4.elements.remove(&("10.96.1.1".parse().unwrap(), Protocol::Tcp, 80));
    b.v4.elements
        .insert(("10.96.1.2".parse().unwrap(), Protocol::Tcp, 80), target("169.254.96.16", 15000, "t/s1:http"));
    b.v4.elements.insert(
        ("10.96.2.1".parse().unwrap(), Protocol::Udp, 53),
        target("169.254.96.16", 15002, "kube-system/dns:dns"),
    );
    b.v6.elements
        .insert(("fd00:10::2".parse().unwrap(), Protocol::Tcp, 443), target("fd00:e16e::16", 15001, "t/six:https"));
    let (set_a, set_b) = (set(a), set(b.clone()));
    let list = |ns: &Netns| {
        (
            ns.ok(&["nft", "list", "map", "ip", "edgeproxy", "services"]),
            ns.ok(&["nft", "list", "map", "ip6", "edgeproxy", "services"]),
        )
    };

    // A full write of A, then the changes to B: one small transaction over netlink.
    let (report, changed) = ns
        .thread(move || {
            let mut ap = NftApplier::new().unwrap();
            ap.apply(&set_a).unwrap();
            assert_eq!(ap.full_batches(), 1, "the full write went over netlink");
            let runs = ap.restores();
            let r = ap.apply(&set_b).unwrap();
            (r, ap.restores() - runs)
        })
        .join()
        .unwrap();
    assert_eq!((report.restores, report.full, changed), (1, false, 1));
    let (v4, v6) = list(&ns);
    // B written whole by nft, elsewhere.
    let fresh = Netns::new("nfnf");
    fresh.thread(move || NftApplier::new().unwrap().apply(&set(b)).unwrap()).join().unwrap();
    let (v4_full, v6_full) = list(&fresh);
    assert_eq!(elements(&v4), elements(&v4_full), "{v4}\n---\n{v4_full}");
    assert_eq!(elements(&v6), elements(&v6_full), "{v6}\n---\n{v6_full}");
    assert!(v4.contains("10.96.2.1 . udp . 53 comment \"kube-system/dns:dns\" : 169.254.96.16 . 15002"), "{v4}");

    // The encoder alone, against the kernel: an element with a comment, and a refusal.
    let err = ns
        .thread(|| {
            let k = ("10.96.9.9".parse().unwrap(), Protocol::Tcp, 8080);
            let t = NftTarget { addr: "169.254.96.16".parse().unwrap(), port: 15001, name: "t/direct:web".into() };
            let mut b = Batch::new(1000);
            b.add(Family::V4, &[(&k, &t)]);
            let (bytes, acked) = b.finish();
            let sock = netfilter_socket().unwrap();
            send_batch(&sock, &bytes, &acked).unwrap();
            // Deleting an element that is not there: the kernel refuses the whole batch.
            let gone = ("10.96.9.10".parse().unwrap(), Protocol::Tcp, 1);
            let mut b = Batch::new(2000);
            b.delete(Family::V4, &[&gone]);
            let (bytes, acked) = b.finish();
            send_batch(&sock, &bytes, &acked).unwrap_err()
        })
        .join()
        .unwrap();
    assert!(err.contains("No such file"), "{err}");
    let (v4, _) = list(&ns);
    assert!(v4.contains("10.96.9.9 . tcp . 8080 comment \"t/direct:web\" : 169.254.96.16 . 15001"), "{v4}");
}

/// The full write over netlink leaves the very tables `nft -f` of the layout's text leaves
/// (listed whole: map type, elements with comments, chains, priorities, rules), with and
/// without the mark rule, both families.
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_full_write_over_netlink_lists_as_nft_f_of_the_text() {
    use edgeproxy::model::Protocol;
    use edgeproxy::rules::nftables::apply::{netfilter_socket, send_batch};
    use edgeproxy::rules::nftables::batch::Batch;
    use edgeproxy::rules::nftables::full_text;
    use edgeproxy::rules::{Family, NftRules, NftTarget};
    require_root();
    for mark in [0x0010_0000u32, 0] {
        let mut r = NftRules { mark, ..NftRules::default() };
        let target = |ip: &str, port: u16, name: &str| NftTarget { addr: ip.parse().unwrap(), port, name: name.into() };
        for i in 0..300u16 {
            let key = (format!("10.96.{}.{}", i / 200, i % 200 + 1).parse().unwrap(), Protocol::Tcp, 80 + i % 3);
            r.v4.elements.insert(key, target("169.254.96.16", 15001, &format!("ns-{i}/svc-{i}:http")));
        }
        r.v4.elements
            .insert(("10.96.9.1".parse().unwrap(), Protocol::Udp, 53), target("169.254.96.16", 15002, "k/dns:dns"));
        r.v6.elements
            .insert(("fd00:10::1".parse().unwrap(), Protocol::Tcp, 443), target("fd00:e16e::16", 15000, "t/six"));
        let by_nft = Netns::new("nffn");
        let mut text = String::new();
        for f in [Family::V4, Family::V6] {
            full_text(&mut text, f, r.family(f), r.mark);
        }
        let file = std::env::temp_dir().join(format!("ep-full-{}-{mark}.nft", std::process::id()));
        std::fs::write(&file, &text).unwrap();
        by_nft.ok(&["nft", "-f", file.to_str().unwrap()]);
        std::fs::remove_file(&file).unwrap();
        let by_netlink = Netns::new("nffb");
        let r2 = r.clone();
        by_netlink
            .thread(move || {
                let mut b = Batch::new(1);
                for f in [Family::V4, Family::V6] {
                    b.full_table(f, r2.family(f), r2.mark);
                }
                let (bytes, acked) = b.finish();
                let sock = netfilter_socket().unwrap();
                edgeproxy::sys::sockopt::force_send_buffer(&sock, bytes.len() + 65536).unwrap();
                send_batch(&sock, &bytes, &acked).unwrap();
                // Written twice: the second replaces the first in one transaction.
                send_batch(&sock, &bytes, &acked).unwrap();
            })
            .join()
            .unwrap();
        for fam in ["ip", "ip6"] {
            let a = by_nft.ok(&["nft", "list", "table", fam, "edgeproxy"]);
            let b = by_netlink.ok(&["nft", "list", "table", fam, "edgeproxy"]);
            assert_eq!(a, b, "mark {mark:#x}, {fam}");
        }
    }
}
