//! `iptables-restore --test` accepts every rendered rule set, for both the nft and the legacy
//! backend, inside a network namespace this test creates (nothing is committed either way),
//! also with hostile objects among the real ones.

mod support;

use std::io::Write;
use std::process::Stdio;

use edgeproxy::config::{Config, Overrides};
use edgeproxy::model::Kind;
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::state::{Change, State, StateConfig};
use support::netns::{require_root, Netns};

use support::fixtures::read as fixture;

/// A dual-stack service, so the ip6tables side is exercised too.
const DUAL_STACK: &str = r#"{"kind":"List","items":[
  {"kind":"Service","metadata":{"name":"dual","namespace":"v6"},"spec":{"clusterIP":"10.96.7.7","clusterIPs":["10.96.7.7","fd00:10:96::7"],
   "ports":[{"name":"http","port":80},{"name":"dns","protocol":"UDP","port":53}]}},
  {"kind":"Service","metadata":{"name":"opted-in","namespace":"v6","labels":{"service.edgemesh.kubeedge.io/service-proxy-name":""}},"spec":{"clusterIP":"fd00:10:96::9","clusterIPs":["fd00:10:96::9"],"ports":[{"port":443}]}},
  {"kind":"Service","metadata":{"name":"ignored","namespace":"v6","labels":{"noproxy":"edgemesh"}},"spec":{"clusterIP":"fd00:10:96::8","clusterIPs":["fd00:10:96::8"],"ports":[{"port":80}]}},
  {"kind":"EndpointSlice","metadata":{"name":"dual-v6","namespace":"v6","labels":{"kubernetes.io/service-name":"dual"}},"addressType":"IPv6",
   "endpoints":[{"addresses":["fd00:200::1"]}],"ports":[{"name":"http","port":8080},{"name":"dns","protocol":"UDP","port":53}]}]}"#;

/// Hostile documents from the fuzz seeds: injection names, quotes and backslashes, loops,
/// special addresses.
const HOSTILE: &[&str] = &["injection.json", "quote-backslash.json", "loops.json", "special-ips.json"];

fn seed_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode_render")
}

fn restore_test(ns: &Netns, bin: &str, text: &str) {
    let mut child = ns
        .cmd(&[bin, "--test", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (apt-get install iptables)"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{bin} --test rejected the rule set: {}\n--- input ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn every_rendered_rule_set_passes_iptables_restore_test_on_both_backends() {
    require_root();
    let ns = Netns::new("rst");
    let snapshots: [&[&str]; 2] = [
        &["list-services-raw.json", "list-endpointslices-raw.json"],
        &["list-services-after-watch-raw.json", "list-endpointslices-after-watch-raw.json"],
    ];
    let mut checked = 0;
    for files in snapshots {
        for mode in ["FilterIfLabelExists", "FilterIfLabelDoesNotExists"] {
            for layout in ["portals", "root-chain"] {
                for kube_proxy in [true, false] {
                    let mut o = Overrides::default();
                    o.set("service-filter-mode", Some(mode));
                    o.set("layout", Some(layout));
                    o.set("service-cidr", Some("10.96.0.0/16,fd00:10:96::/112"));
                    let cfg = Config::load(None, &o).unwrap();
                    let mut st = State::new(StateConfig::from(&cfg));
                    st.apply(Change::KubeProxy(kube_proxy));
                    for f in files {
                        for obj in decode_document(&fixture(f), None).objects {
                            st.apply(Change::Upsert(obj));
                        }
                    }
                    let d = decode_document(DUAL_STACK.as_bytes(), Some(Kind::Service));
                    assert!(d.errors.is_empty(), "{:?}", d.errors);
                    for obj in d.objects {
                        st.apply(Change::Upsert(obj));
                    }
                    // The probes of the injection report beside them: refused, and what remains
                    // restores (one bad name never blocks the others).
                    let mut refused = 0;
                    for doc in HOSTILE {
                        let d = decode_document(&std::fs::read(seed_dir().join(doc)).unwrap(), None);
                        refused += d.errors.len();
                        for obj in d.objects {
                            st.apply(Change::Upsert(obj));
                        }
                    }
                    assert!(refused >= 9, "the hostile seeds must hold refused objects ({refused})");
                    let plan = st.plan();
                    assert!(!plan.rules.v6.is_empty(), "the dual-stack service renders an ip6tables set");
                    for backend in ["nft", "legacy"] {
                        restore_test(&ns, &format!("iptables-{backend}-restore"), &plan.rules.v4.restore_text());
                        restore_test(&ns, &format!("ip6tables-{backend}-restore"), &plan.rules.v6.restore_text());
                        // The jumps, as a restore would insert them.
                        for (family, t) in [("iptables", &plan.rules.v4), ("ip6tables", &plan.rules.v6)] {
                            let mut text = t.restore_text().replace("COMMIT\n", "");
                            for j in &t.jumps {
                                text.push_str(&format!("-I {} 1 {}\n", j.from, j.spec));
                            }
                            text.push_str("COMMIT\n");
                            restore_test(&ns, &format!("{family}-{backend}-restore"), &text);
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 32);
    // Nothing was committed: --test leaves the table as it was.
    let saved = ns.ok(&["iptables-nft-save", "-t", "nat"]);
    assert!(!saved.contains("KUBE-PORTALS") && !saved.contains("EDGE-MESH"), "{saved}");
}
