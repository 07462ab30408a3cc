//! `edgeproxy check` exit codes and `edgeproxy cleanup --edgemesh` on tables seeded with
//! EdgeMesh's exact rules (v1.8/v1.9 root chain, v1.10/v1.11 EDGEMESH-*, v1.12+ KUBE-PORTALS-*),
//! both backends, in namespaces the test creates.
mod support;

use edgeproxy::config::Config;
use edgeproxy::rules::applier::Applier;
use edgeproxy::rules::check::exit;
use edgeproxy::rules::iptables::{Binaries, LEGACY, NFT};
use edgeproxy::state::{State, StateConfig};
use support::netns::{require_root, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_edgeproxy");

/// kube-proxy (iptables mode) on the node before anything else.
const KUBE_PROXY: &str = "*nat\n:KUBE-SERVICES - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\nCOMMIT\n\
*filter\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";

/// EdgeMesh v1.12+ (edgemesh-behaviour.md B.4), inserted before kube-proxy's jump, plus v1.10's
/// EDGEMESH-* names (B.3) and v1.9's root chain (B.2).
const EDGEMESH: &str = "*nat\n:KUBE-NODEPORT-CONTAINER - [0:0]\n:KUBE-NODEPORT-HOST - [0:0]\n:KUBE-PORTALS-CONTAINER - [0:0]\n:KUBE-PORTALS-HOST - [0:0]\n\
:EDGEMESH-PORTALS-CONTAINER - [0:0]\n:EDGEMESH-PORTALS-HOST - [0:0]\n:EDGE-MESH - [0:0]\n:EDGE-MESH-TCP - [0:0]\n\
-I PREROUTING 1 -m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\" -j KUBE-PORTALS-CONTAINER\n\
-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment \"handle service NodePorts; NOTE: this must be the last rule in the chain\" -j KUBE-NODEPORT-CONTAINER\n\
-I OUTPUT 1 -m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\" -j KUBE-PORTALS-HOST\n\
-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment \"handle service NodePorts; NOTE: this must be the last rule in the chain\" -j KUBE-NODEPORT-HOST\n\
-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 30080 -j DNAT --to-destination 169.254.96.16:36906\n\
-A KUBE-NODEPORT-HOST -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 30080 -j DNAT --to-destination 169.254.96.16:36906\n\
-A KUBE-PORTALS-CONTAINER -d 10.96.100.10/32 -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:36906\n\
-A KUBE-PORTALS-CONTAINER -d 10.96.0.53/32 -p udp -m comment --comment \"default/dns-udp\" -m udp --dport 53 -j DNAT --to-destination 169.254.96.16:41234\n\
-A KUBE-PORTALS-HOST -d 10.96.100.10/32 -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:36906\n\
-A PREROUTING -m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\" -j EDGEMESH-PORTALS-CONTAINER\n\
-A OUTPUT -m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\" -j EDGEMESH-PORTALS-HOST\n\
-A PREROUTING -m comment --comment \"edgemesh root chain\" -j EDGE-MESH\n\
-A OUTPUT -m comment --comment \"edgemesh root chain\" -j EDGE-MESH\n\
-A EDGE-MESH -d 10.96.0.1/32 -m comment --comment \"ignore default/kubernetes service\" -j RETURN\n\
-A EDGE-MESH -d 10.96.0.0/12 -p tcp -m comment --comment \"tcp service proxy\" -j EDGE-MESH-TCP\n\
-A EDGE-MESH-TCP -p tcp -j DNAT --to-destination 169.254.96.16:40001\n\
COMMIT\n*filter\n:KUBE-NODEPORT-NON-LOCAL - [0:0]\n\
-I INPUT 1 -m comment --comment \"Ensure that non-local NodePort traffic can flow\" -j KUBE-NODEPORT-NON-LOCAL\n\
-A KUBE-NODEPORT-NON-LOCAL -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 36906 -m state --state NEW -j ACCEPT\n\
COMMIT\n";

fn seed(ns: &Netns, b: &Binaries, text: &str) {
    let path = std::env::temp_dir().join(format!("ep-seed-{}-{}.txt", std::process::id(), ns.name));
    std::fs::write(&path, text).unwrap();
    ns.ok(&[b.restore, "--noflush", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
}

fn dump(ns: &Netns, b: &Binaries, table: &str) -> String {
    ns.save_dump(b.save, table)
}

fn edgeproxy(ns: &Netns, b: &Binaries, args: &[&str]) -> (Option<i32>, String) {
    let mut argv = vec![BIN];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--iptables-backend", b.name]);
    let run_dir = ns.dir("run");
    if args[0] == "cleanup" {
        argv.extend_from_slice(&["--run-dir", &run_dir]);
    }
    let out = ns.exec(&argv);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn check_codes_and_cleanup_edgemesh() {
    require_root();
    for (b, tag) in [(NFT, "nft"), (LEGACY, "leg")] {
        let ns = Netns::new(&format!("ck{tag}"));
        seed(&ns, &b, KUBE_PROXY);
        let nat0 = dump(&ns, &b, "nat");
        let filter0 = dump(&ns, &b, "filter");

        let (code, out) = edgeproxy(&ns, &b, &["check"]);
        assert_eq!(code, Some(exit::NOT_INSTALLED.into()), "{out}");
        assert!(out.contains("kube-proxy: present") && out.contains(&format!("backend: {}", b.name)), "{out}");

        seed(&ns, &b, EDGEMESH);
        let (code, out) = edgeproxy(&ns, &b, &["check"]);
        // EdgeMesh v1.12+'s portal jumps look exactly like ours, but it has no
        // EDGEPROXY-NO-ENDPOINTS chain: that is EdgeMesh, not us. Its other chains are listed.
        assert_eq!(code, Some(exit::NOT_INSTALLED.into()), "{out}");
        assert!(out.contains("IPv4: chain EDGEPROXY-NO-ENDPOINTS missing"), "{out}");
        assert!(out.contains("IPv4: jump OUTPUT -> KUBE-PORTALS-HOST is first"), "{out}");
        assert!(out.contains("EdgeMesh chain EDGEMESH-PORTALS-HOST") && out.contains("KUBE-NODEPORT-HOST"), "{out}");
        assert!(out.contains("chain EDGE-MESH of the other layout"), "{out}");

        let (code, out) = edgeproxy(&ns, &b, &["cleanup", "--edgemesh"]);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(dump(&ns, &b, "nat"), nat0, "{}: nat after cleanup --edgemesh:\n{out}", b.name);
        assert_eq!(dump(&ns, &b, "filter"), filter0, "{}: filter after cleanup --edgemesh", b.name);

        // Installed by us and first: 0. kube-proxy re-inserted ahead: 4.
        ns.thread(move || {
            let rules = State::new(StateConfig::from(&Config::defaults())).plan().rules;
            Applier::with_binaries(b).unwrap().apply(&rules).unwrap();
        })
        .join()
        .unwrap();
        let (code, out) = edgeproxy(&ns, &b, &["check"]);
        assert_eq!(code, Some(exit::OK.into()), "{out}");
        // Installed and first, with an EdgeMesh chain left over: 5.
        ns.ok(&[b.cmd, "-t", "nat", "-N", "EDGEMESH-PORTALS-HOST"]);
        let (code, out) = edgeproxy(&ns, &b, &["check"]);
        assert_eq!(code, Some(exit::LEFTOVERS.into()), "{out}");
        assert!(out.contains("leftover: IPv4: EdgeMesh chain EDGEMESH-PORTALS-HOST"), "{out}");
        ns.ok(&[b.cmd, "-t", "nat", "-X", "EDGEMESH-PORTALS-HOST"]);
        ns.ok(&[b.cmd, "-t", "nat", "-I", "OUTPUT", "1", "-j", "KUBE-SERVICES"]);
        let (code, out) = edgeproxy(&ns, &b, &["check"]);
        assert_eq!(code, Some(exit::NOT_FIRST.into()), "{out}");
        assert!(out.contains("behind `-A OUTPUT -j KUBE-SERVICES`"), "{out}");
        ns.ok(&[b.cmd, "-t", "nat", "-D", "OUTPUT", "1"]);

        // kube-proxy's userspace mode owning KUBE-PORTALS-* (REDIRECT): kept by --edgemesh.
        let (code, _) = edgeproxy(&ns, &b, &["cleanup"]);
        assert_eq!(code, Some(0));
        assert_eq!(dump(&ns, &b, "nat"), nat0);
        seed(
            &ns,
            &b,
            "*nat\n:KUBE-PORTALS-CONTAINER - [0:0]\n-A KUBE-PORTALS-CONTAINER -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 40000\nCOMMIT\n",
        );
        let (code, out) = edgeproxy(&ns, &b, &["cleanup", "--edgemesh"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("kept"), "{out}");
        assert!(dump(&ns, &b, "nat").contains("-j REDIRECT --to-ports 40000"));

        // No iptables at all: cannot read the table.
        let out = ns.cmd(&["env", "PATH=/nonexistent", BIN, "check", "--iptables-backend", b.name]).output().unwrap();
        assert_eq!(out.status.code(), Some(exit::CANNOT_READ.into()), "{}", String::from_utf8_lossy(&out.stdout));
    }
}
