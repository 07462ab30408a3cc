//! The kernel path (`edgeproxy.io/data-path: kernel`), end to end: the real agent
//! (`run --source file:`) in a node namespace, a pod namespace behind it and the endpoints in a
//! third, for each layout (portals on iptables-nft, root-chain on iptables-legacy, nftables):
//! connections spread over the endpoints, ClientIP affinity keeps a client on one, a port
//! without endpoints is refused at once, the active probes (asked for by one Service's
//! `edgeproxy.io/probe-interval`, off in the config) take a dead endpoint out of the kernel
//! rules and put it back when it answers again; `check` names the kernel-path ports; a
//! SIGTERM leaves no rule.
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::agent::{self, count, exit_code, fetch, serve, signal, wait_for, Agent};
use support::netns::{require_root, veth, Netns};
use support::tempdir::TempDir;

const SPREAD: &str = "10.96.0.20:80";
const STICKY: &str = "10.96.0.21:80";
const NONE: &str = "10.96.0.22:80";
const PRUNED: &str = "10.96.0.23:80";
/// Black-holed (its SYNs dropped) until revived.
const DEAD: &str = "192.0.2.67";

struct Case {
    layout: &'static str,
    backend: &'static str,
    /// Lists what holds our rules, for the "is the endpoint in the kernel rules" question.
    listing: &'static str,
}

const CASES: [Case; 3] = [
    Case { layout: "portals", backend: "nft", listing: "iptables-nft-save -t nat" },
    Case { layout: "root-chain", backend: "legacy", listing: "iptables-legacy-save -t nat" },
    Case { layout: "nftables", backend: "auto", listing: "nft list table ip edgeproxy" },
];

/// A kernel-path Service; `probe`: its own `edgeproxy.io/probe-interval`.
fn service(name: &str, ip: &str, affinity: bool, probe: Option<&str>) -> serde_json::Value {
    let mut spec = serde_json::json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    if affinity {
        spec["sessionAffinity"] = "ClientIP".into();
        spec["sessionAffinityConfig"] = serde_json::json!({"clientIP": {"timeoutSeconds": 60}});
    }
    let mut annotations = serde_json::json!({"edgeproxy.io/data-path": "kernel"});
    if let Some(p) = probe {
        annotations["edgeproxy.io/probe-interval"] = p.into();
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "t", "annotations": annotations},
        "spec": spec})
}

fn slice(name: &str, addrs: &[&str]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> =
        addrs.iter().map(|a| serde_json::json!({"addresses": [a], "conditions": {"ready": true}})).collect();
    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "t", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn write_cluster(path: &Path) {
    let items = vec![
        service("spread", "10.96.0.20", false, None),
        slice("spread", &["192.0.2.65", "192.0.2.66"]),
        service("sticky", "10.96.0.21", true, None),
        slice("sticky", &["192.0.2.65", "192.0.2.66"]),
        service("none", "10.96.0.22", false, None),
        slice("none", &[]),
        service("pruned", "10.96.0.23", false, Some("200ms")),
        slice("pruned", &["192.0.2.65", DEAD]),
    ];
    let doc = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(path, serde_json::to_vec(&doc).unwrap()).unwrap();
}

/// `n` connections from `ns` to `addr`: the endpoints' answers.
fn answers(ns: &Netns, addr: &'static str, n: usize) -> Vec<String> {
    (0..n).map(|_| fetch(ns, addr)).collect()
}

fn tally(answers: &[String], who: &str) -> usize {
    answers.iter().filter(|a| a.as_str() == who).count()
}

fn endpoint_in_rules(node: &Netns, c: &Case, ip: &str) -> bool {
    node.sh(c.listing).contains(&format!("{ip}:8080"))
}

/// The settings `run` and `check` share: the config file, the layout, the iptables backend.
fn layout_args<'a>(c: &'a Case, config: &'a Path) -> [&'a str; 6] {
    ["--config", config.to_str().unwrap(), "--layout", c.layout, "--iptables-backend", c.backend]
}

fn start(node: &mut Netns, c: &Case, source: &Path, config: &Path) -> Agent {
    let src = format!("file:{}", source.display());
    let mut args = vec!["--source", &src, "--guard-period", "300ms", "--min-sync-period", "100ms"];
    args.extend(layout_args(c, config));
    agent::start(node, &args)
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn kernel_path_spreads_keeps_affinity_refuses_and_follows_the_probes() {
    require_root();
    for c in &CASES {
        let dir = TempDir::new("kp", c.layout);
        let source = dir.path().join("cluster.json");
        let config = dir.path().join("config.json");
        write_cluster(&source);
        // Probes off in the config: only t/pruned asks for them (its annotation, every 200 ms).
        std::fs::write(&config, r#"{"tcp": {"dialTimeout": "300ms"}}"#).unwrap();

        let mut node = Netns::new("kpn");
        let pod = Netns::new("kpp");
        let eps = Netns::new("kpe");
        veth(&node, "pod0", "10.0.1.1/24", &pod, "eth0", "10.0.1.2/24");
        veth(&node, "up0", "10.0.2.1/24", &eps, "eth0", "10.0.2.2/24");
        pod.ok(&["ip", "route", "add", "default", "via", "10.0.1.1"]);
        eps.ok(&["ip", "route", "add", "default", "via", "10.0.2.1"]);
        node.ok(&["ip", "route", "add", "default", "via", "10.0.2.2"]);
        node.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (ip, who) in [("192.0.2.65", "a"), ("192.0.2.66", "b")] {
            eps.ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
            serve(&eps, if who == "a" { "192.0.2.65:8080" } else { "192.0.2.66:8080" }, who);
        }
        eps.ok(&["ip", "addr", "add", &format!("{DEAD}/32"), "dev", "lo"]);
        eps.sh(&format!("iptables-nft -A INPUT -d {DEAD} -p tcp -j DROP"));

        let agent = start(&mut node, c, &source, &config);
        wait_for("rules applied", Duration::from_secs(20), || count(&agent.log, "rules applied") >= 1);

        // Spread: both endpoints, from the node (OUTPUT) and from a pod (PREROUTING).
        let from_node = answers(&node, SPREAD, 200);
        let (a, b) = (tally(&from_node, "a"), tally(&from_node, "b"));
        eprintln!("{}: spread from the node: a {a}, b {b}", c.layout);
        assert_eq!(a + b, 200, "{}: {from_node:?}", c.layout);
        assert!(a >= 50 && b >= 50, "{}: a {a}, b {b} of 200", c.layout);
        let from_pod = answers(&pod, SPREAD, 40);
        assert_eq!(tally(&from_pod, "a") + tally(&from_pod, "b"), 40, "{}: {from_pod:?}", c.layout);
        assert!(tally(&from_pod, "a") > 0 && tally(&from_pod, "b") > 0, "{}: {from_pod:?}", c.layout);
        // The proxy saw none of it: no DNAT of these ports to its address.
        let listing = node.sh(c.listing);
        let to_proxy = listing.lines().filter(|l| l.contains("10.96.0.20") && l.contains("169.254.96.16")).count();
        assert_eq!(to_proxy, 0, "{}: {listing}", c.layout);

        // Affinity: each client stays on one endpoint.
        for (who, ns) in [("node", &node), ("pod", &pod)] {
            let sticky = answers(ns, STICKY, 30);
            assert!(
                sticky.iter().all(|s| *s == sticky[0]) && (sticky[0] == "a" || sticky[0] == "b"),
                "{}: {who}: {sticky:?}",
                c.layout
            );
        }

        // No endpoints: refused at once.
        let t = Instant::now();
        let refused = fetch(&node, NONE);
        assert!(refused.contains("refused"), "{}: {refused}", c.layout);
        assert!(t.elapsed() < Duration::from_secs(1), "{}: {:?}", c.layout, t.elapsed());

        // The probes take the dead endpoint out of the kernel rules ...
        let t = Instant::now();
        wait_for("the dead endpoint out of the rules", Duration::from_secs(15), || !endpoint_in_rules(&node, c, DEAD));
        eprintln!("{}: dead endpoint out of the rules {:?} after the first check", c.layout, t.elapsed());
        assert!(endpoint_in_rules(&node, c, "192.0.2.65"), "{}", c.layout);
        for _ in 0..30 {
            let t = Instant::now();
            assert_eq!(fetch(&node, PRUNED), "a", "{}", c.layout);
            assert!(t.elapsed() < Duration::from_millis(1000), "{}: {:?}", c.layout, t.elapsed());
        }
        // `check` names the kernel-path ports and the endpoints they go to.
        let run_dir = node.dir("run");
        let mut argv = vec![agent::BIN, "check", "--run-dir", &run_dir];
        argv.extend(layout_args(c, &config));
        let check = node.exec(&argv);
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(
            text.contains("kernel path: t/pruned:http") && text.contains("kernel path: t/sticky:http"),
            "{}: {text}",
            c.layout
        );

        // ... and put it back once it answers.
        eps.sh(&format!("iptables-nft -D INPUT -d {DEAD} -p tcp -j DROP"));
        serve(&eps, "192.0.2.67:8080", "c");
        wait_for("the revived endpoint back in the rules", Duration::from_secs(45), || {
            endpoint_in_rules(&node, c, DEAD)
        });
        let back = answers(&node, PRUNED, 60);
        assert!(tally(&back, "c") > 0 && tally(&back, "a") > 0, "{}: {back:?}", c.layout);

        signal(agent.pid, "-TERM");
        assert_eq!(exit_code(&mut node, &agent), Some(0), "{}", c.layout);
        assert!(!node
            .sh("iptables-nft-save -t nat; iptables-legacy-save -t nat; nft list ruleset")
            .contains("EDGEPROXY-KERNEL"));
        assert!(!node.sh("nft list ruleset").contains("edgeproxy"), "{}", c.layout);
    }
}
