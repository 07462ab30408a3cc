//! `edgeproxy run --source file:` as a real process in namespaces the test creates, both
//! backends: the hybrid proxy end to end (kube-proxy inserted after start, guard puts our jumps
//! first again, proxied traffic reaches an endpoint through the proxy, filtered traffic falls through to the
//! KUBE-SERVICES DNAT, from the node and from a pod), file changes followed with one restore
//! each, SIGTERM leaving nat and filter as before, SIGKILL then start leaving no duplicates.
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::agent::{self, count, exit_code, fetch, serve, signal, wait_for, Agent};
use support::netns::{require_root, veth, Netns};

use support::fixtures::read as fixture;
/// edge-apps/web-frontend port http: proxied (no filter label).
const PROXIED: &str = "10.96.85.103:80";
/// monitoring/alertmanager-main port web: carries service.edgemesh.kubeedge.io/service-proxy-name.
const FILTERED: &str = "10.96.118.106:9093";

struct Backend {
    name: &'static str,
    cmd: &'static str,
    save: &'static str,
}
const BACKENDS: [Backend; 2] = [
    Backend { name: "nft", cmd: "iptables-nft", save: "iptables-nft-save" },
    Backend { name: "legacy", cmd: "iptables-legacy", save: "iptables-legacy-save" },
];

/// Services and slices of the fixture cluster in one kubectl `List`, minus `drop` services.
fn write_source(path: &Path, drop: &[&str]) {
    let mut items = Vec::new();
    for f in ["services.json", "endpointslices.json"] {
        let v: serde_json::Value = serde_json::from_slice(&fixture(f)).unwrap();
        for item in v["items"].as_array().unwrap() {
            let name = item["metadata"]["name"].as_str().unwrap_or("");
            let svc = item["metadata"]["labels"]["kubernetes.io/service-name"].as_str().unwrap_or(name);
            if !drop.contains(&svc) {
                items.push(item.clone());
            }
        }
    }
    let doc = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&doc).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ep-agent-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn dump(ns: &Netns, b: &Backend, table: &str) -> String {
    ns.save_dump(b.save, table)
}

fn chain(ns: &Netns, b: &Backend, chain: &str) -> Vec<String> {
    let out = ns.exec(&[b.cmd, "-t", "nat", "-S", chain]);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A")).map(str::to_string).collect()
}

fn start_agent(ns: &mut Netns, b: &Backend, source: &Path) -> Agent {
    let src = format!("file:{}", source.display());
    agent::start(
        ns,
        &["--source", &src, "--iptables-backend", b.name, "--guard-period", "300ms", "--min-sync-period", "100ms"],
    )
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn hybrid_proxy_end_to_end_with_kube_proxy_inserted_after_start() {
    require_root();
    for b in &BACKENDS {
        let dir = tmpdir(&format!("hy{}", b.name));
        let source = dir.join("cluster.json");
        write_source(&source, &[]);
        // node <-> pod, node <-> svc (where kube-proxy's DNAT for filtered services lands).
        let mut node = Netns::new("hyn");
        let pod = Netns::new("hyp");
        let svc = Netns::new("hys");
        veth(&node, "pod0", "10.0.1.1/24", &pod, "eth0", "10.0.1.2/24");
        veth(&node, "up0", "10.0.2.1/24", &svc, "eth0", "10.0.2.2/24");
        pod.ok(&["ip", "route", "add", "default", "via", "10.0.1.1"]);
        svc.ok(&["ip", "route", "add", "default", "via", "10.0.2.1"]);
        node.ok(&["ip", "route", "add", "default", "via", "10.0.2.2"]);
        node.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // The proxied service's three endpoints (web-frontend in the fixtures) live behind the
        // node's uplink and say "edgeproxy": only the proxy dials them. kube-proxy's DNAT target
        // says "kube-proxy".
        for (ip, addr) in [
            ("192.0.2.65", "192.0.2.65:8080"),
            ("192.0.2.129", "192.0.2.129:8080"),
            ("198.51.100.80", "198.51.100.80:8080"),
        ] {
            svc.ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
            serve(&svc, addr, "edgeproxy\n");
        }
        serve(&svc, "10.0.2.2:8080", "kube-proxy\n");

        let agent = start_agent(&mut node, b, &source);
        wait_for("rules applied", Duration::from_secs(20), || count(&agent.log, "rules applied") >= 1);
        assert!(node.ok(&["ip", "-4", "addr", "show", "dev", "lo"]).contains("169.254.96.16/32"));

        // kube-proxy starts after us and puts KUBE-SERVICES at position 1.
        let ipt = b.cmd;
        node.sh(&format!(
            "{ipt} -t nat -N KUBE-SERVICES && \
             {ipt} -t nat -A KUBE-SERVICES -d 10.96.118.106/32 -p tcp -m tcp --dport 9093 -j DNAT --to-destination 10.0.2.2:8080 && \
             {ipt} -t nat -A KUBE-SERVICES -d 10.96.85.103/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080 && \
             {ipt} -t nat -I PREROUTING 1 -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES && \
             {ipt} -t nat -I OUTPUT 1 -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES"
        ));
        let t = Instant::now();
        wait_for("our jumps first again", Duration::from_secs(5), || {
            chain(&node, b, "PREROUTING").first().is_some_and(|l| l.ends_with("-j KUBE-PORTALS-CONTAINER"))
                && chain(&node, b, "OUTPUT").first().is_some_and(|l| l.ends_with("-j KUBE-PORTALS-HOST"))
        });
        eprintln!("{}: jumps first again after {:?} (guard period 300ms)", b.name, t.elapsed());
        assert!(count(&agent.log, "rules guard") >= 1, "the repair was not logged");
        assert_eq!(chain(&node, b, "PREROUTING").iter().filter(|l| l.contains("KUBE-PORTALS")).count(), 1);

        // From the node itself (OUTPUT) and from a pod (PREROUTING).
        for (who, ns) in [("node", &node), ("pod", &pod)] {
            assert_eq!(fetch(ns, PROXIED), "edgeproxy\n", "{}: {who} -> proxied service", b.name);
            assert_eq!(fetch(ns, FILTERED), "kube-proxy\n", "{}: {who} -> filtered service", b.name);
        }

        // The guard does not churn once everything is in place.
        std::thread::sleep(Duration::from_millis(1000));
        let before = count(&agent.log, "rules guard");
        let restores = count(&agent.log, "applied ");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(count(&agent.log, "rules guard"), before, "guard repaired although nothing moved");
        assert_eq!(count(&agent.log, "applied "), restores, "restores ran although nothing changed");

        signal(agent.pid, "-TERM");
        assert_eq!(exit_code(&mut node, &agent), Some(0));
        assert!(!dump(&node, b, "nat").contains("KUBE-PORTALS"));
        assert!(!node.ok(&["ip", "-4", "addr", "show", "dev", "lo"]).contains("169.254.96.16"));
        // With our rules gone, kube-proxy serves the formerly proxied service.
        assert_eq!(fetch(&node, PROXIED), "kube-proxy\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn file_changes_one_restore_each_sigterm_restores_table_sigkill_no_duplicates() {
    require_root();
    for b in &BACKENDS {
        let dir = tmpdir(&format!("lc{}", b.name));
        let source = dir.join("cluster.json");
        write_source(&source, &[]);
        let mut node = Netns::new("lcn");
        let ipt = b.cmd;
        // A node that already has kube-proxy, a masquerade rule and a filter rule.
        node.sh(&format!(
            "{ipt} -t nat -N KUBE-SERVICES && {ipt} -t nat -A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES && \
             {ipt} -t nat -A OUTPUT -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES && \
             {ipt} -t nat -A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE && {ipt} -t filter -A INPUT -p tcp --dport 22 -j ACCEPT"
        ));
        let nat0 = dump(&node, b, "nat");
        let filter0 = dump(&node, b, "filter");

        let agent = start_agent(&mut node, b, &source);
        wait_for("rules applied", Duration::from_secs(20), || count(&agent.log, "rules applied") >= 1);
        let host = chain(&node, b, "KUBE-PORTALS-HOST");
        assert!(host.iter().any(|r| r.contains("edge-apps/web-frontend:http")));
        assert!(!host.iter().any(|r| r.contains("monitoring/alertmanager-main")), "filtered service proxied");

        // Remove a service: the rules follow, with exactly one more restore.
        write_source(&source, &["web-frontend"]);
        wait_for("web-frontend gone", Duration::from_secs(10), || {
            !chain(&node, b, "KUBE-PORTALS-HOST").iter().any(|r| r.contains("web-frontend"))
        });
        wait_for("second apply logged", Duration::from_secs(5), || count(&agent.log, "rules applied") >= 2);
        // Add it back.
        write_source(&source, &[]);
        wait_for("web-frontend back", Duration::from_secs(10), || {
            chain(&node, b, "KUBE-PORTALS-HOST").iter().any(|r| r.contains("web-frontend"))
        });
        std::thread::sleep(Duration::from_millis(700));
        let applied: Vec<String> =
            agent.log.lock().unwrap().iter().filter(|l| l.contains("rules applied")).cloned().collect();
        assert_eq!(applied.len(), 3, "{applied:?}");
        assert!(applied.iter().all(|l| l.contains(" 1 restore(s)")), "{applied:?}");

        // A bad file: logged, the last good state stays.
        std::fs::write(&source, b"{\"kind\":\"List\",\"items\":[{\"kind\":\"Serv").unwrap();
        wait_for("bad file logged", Duration::from_secs(5), || count(&agent.log, "keeping the last good state") >= 1);
        assert!(chain(&node, b, "KUBE-PORTALS-HOST").iter().any(|r| r.contains("web-frontend")));

        // SIGKILL, then start again: no duplicates.
        signal(agent.pid, "-KILL");
        let _ = exit_code(&mut node, &agent);
        assert!(dump(&node, b, "nat").contains("KUBE-PORTALS-HOST"), "rules should survive SIGKILL");
        write_source(&source, &[]);
        let agent2 = start_agent(&mut node, b, &source);
        wait_for("rules applied again", Duration::from_secs(20), || count(&agent2.log, "rules applied") >= 1);
        let nat = dump(&node, b, "nat");
        for jump in ["-j KUBE-PORTALS-CONTAINER", "-j KUBE-PORTALS-HOST"] {
            assert_eq!(nat.lines().filter(|l| l.ends_with(jump)).count(), 1, "{}: duplicate {jump}:\n{nat}", b.name);
        }
        let rules = chain(&node, b, "KUBE-PORTALS-HOST");
        let unique: std::collections::BTreeSet<_> = rules.iter().collect();
        assert_eq!(unique.len(), rules.len(), "duplicate rules after restart");

        signal(agent2.pid, "-TERM");
        assert_eq!(exit_code(&mut node, &agent2), Some(0));
        assert_eq!(dump(&node, b, "nat"), nat0, "{}: nat differs after SIGTERM", b.name);
        assert_eq!(dump(&node, b, "filter"), filter0, "{}: filter differs after SIGTERM", b.name);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
