//! Bad input through the real `edgeproxy rules` command: each bad object gives one clear message
//! naming it (kind, namespace/name, field, why), and every other object still renders.

use std::process::Command;

fn rules(files: &[(&str, &str)], extra: &[&str]) -> (i32, String, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("edgeproxy-bad-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeproxy"));
    cmd.args(["rules", "--kube-proxy", "absent"]).args(extra);
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        cmd.arg("--from").arg(&p);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn svc(name: &str, ip: &str, ports: &str) -> String {
    format!(r#"{{"metadata":{{"name":"{name}","namespace":"t"}},"spec":{{"clusterIP":"{ip}","ports":[{ports}]}}}}"#)
}

fn list(items: &[String]) -> String {
    format!(
        r#"{{"kind":"ServiceList","apiVersion":"v1","metadata":{{"resourceVersion":"1"}},"items":[{}]}}"#,
        items.join(",")
    )
}

fn good() -> String {
    svc("good", "10.96.0.2", r#"{"name":"http","port":80}"#)
}

/// One bad object among good ones: exit code 3, exactly one message naming it, the good one renders.
fn one_bad(bad: String, expect_msg: &str) {
    let (code, out, err) =
        rules(&[("in.json", &list(&[good(), bad, svc("good2", "10.96.0.3", r#"{"port":81}"#)]))], &[]);
    assert_eq!(code, 3, "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("note:")).collect();
    assert_eq!(lines.len(), 1, "exactly one message, got: {err}");
    assert!(lines[0].contains(expect_msg), "message {:?} lacks {expect_msg:?}", lines[0]);
    assert!(out.contains("\"t/good:http has no endpoints\""), "good service missing:\n{out}");
    assert!(out.contains("\"t/good2 has no endpoints\""), "good2 missing:\n{out}");
}

#[test]
fn invalid_cluster_ip() {
    one_bad(
        svc("bad", "10.96.0.300", r#"{"port":80}"#),
        r#"Service t/bad: spec.clusterIP[0]: "10.96.0.300" is not an IP address"#,
    );
}

#[test]
fn port_out_of_range() {
    one_bad(
        svc("bad", "10.96.0.4", r#"{"port":65536}"#),
        "Service t/bad: spec.ports[0].port: port 65536 is out of range 1-65535",
    );
}

#[test]
fn target_port_out_of_range() {
    one_bad(
        svc("bad", "10.96.0.4", r#"{"port":80,"targetPort":-1}"#),
        "Service t/bad: spec.ports[0].targetPort: port -1",
    );
}

#[test]
fn duplicate_ports() {
    one_bad(
        svc("bad", "10.96.0.4", r#"{"name":"a","port":80},{"name":"b","port":80}"#),
        "Service t/bad: spec.ports[1]: duplicate port 80/TCP (also spec.ports[0])",
    );
}

#[test]
fn missing_port_field() {
    one_bad(svc("bad", "10.96.0.4", r#"{"name":"a"}"#), "Service t/bad: spec.ports[0]: missing field `port`");
}

#[test]
fn wrong_type() {
    one_bad(
        svc("bad", "10.96.0.4", r#"{"port":"eighty"}"#),
        "Service t/bad: spec.ports[0].port: invalid type: string \"eighty\"",
    );
}

#[test]
fn missing_name() {
    one_bad(
        r#"{"metadata":{"namespace":"t"},"spec":{"clusterIP":"10.96.0.9"}}"#.to_string(),
        "Service items[1]: metadata.name: missing",
    );
}

#[test]
fn unknown_protocol() {
    one_bad(
        svc("bad", "10.96.0.4", r#"{"port":80,"protocol":"QUIC"}"#),
        r#"Service t/bad: spec.ports[0].protocol: unknown protocol "QUIC""#,
    );
}

#[test]
fn wrong_kind_in_kubectl_list() {
    let doc = format!(
        r#"{{"kind":"List","apiVersion":"v1","items":[{},{{"kind":"Pod","apiVersion":"v1","metadata":{{"name":"p","namespace":"t"}}}}]}}"#,
        good().replacen('{', r#"{"kind":"Service","apiVersion":"v1","#, 1)
    );
    let (code, out, err) = rules(&[("kinds.json", &doc)], &[]);
    assert_eq!(code, 3);
    assert!(err.contains(r#"object t/p: kind: kind "Pod" is not a Service, EndpointSlice or Endpoints"#), "{err}");
    assert!(out.contains("t/good:http"));
}

#[test]
fn slice_with_invalid_address_and_missing_service_label() {
    let slices = r#"{"kind":"EndpointSliceList","items":[
      {"metadata":{"name":"good-1","namespace":"t","labels":{"kubernetes.io/service-name":"good"}},"addressType":"IPv4",
       "endpoints":[{"addresses":["192.0.2.1"]}],"ports":[{"name":"http","port":8080}]},
      {"metadata":{"name":"bad-1","namespace":"t","labels":{"kubernetes.io/service-name":"good2"}},"addressType":"IPv4",
       "endpoints":[{"addresses":["192.0.2.999"]}],"ports":[{"port":8080}]},
      {"metadata":{"name":"orphan","namespace":"t"},"addressType":"IPv4","endpoints":[],"ports":[]}]}"#;
    let (code, out, err) = rules(
        &[("svcs.json", &list(&[good(), svc("good2", "10.96.0.3", r#"{"port":81}"#)])), ("slices.json", slices)],
        &[],
    );
    assert_eq!(code, 3);
    assert!(
        err.contains(r#"EndpointSlice t/bad-1: endpoints[0].addresses[0]: "192.0.2.999" is not an IP address"#),
        "{err}"
    );
    assert!(err.contains("EndpointSlice t/orphan: metadata.labels: no kubernetes.io/service-name label"), "{err}");
    assert!(out.contains("\"t/good:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:15001"), "{out}");
}

#[test]
fn truncated_json_keeps_earlier_objects_and_says_where() {
    let full = list(&[good(), svc("good2", "10.96.0.3", r#"{"port":81}"#)]);
    let cut = &full[..full.len() - 30];
    let (code, out, err) = rules(&[("cut.json", cut)], &[]);
    assert_eq!(code, 3);
    assert!(err.contains("cut.json: the document ends early (truncated) at line 1"), "{err}");
    assert!(err.contains("1 item(s) before that point were read"), "{err}");
    assert!(out.contains("t/good:http"), "{out}");
}

#[test]
fn a_broken_file_does_not_stop_the_others() {
    let (code, out, err) = rules(&[("a.json", "this is not json"), ("b.json", &list(&[good()]))], &[]);
    assert_eq!(code, 3);
    assert!(err.contains("a.json: the document is not valid JSON"), "{err}");
    assert!(out.contains("t/good:http"));
}

#[test]
fn explain_names_every_verdict() {
    let (code, out, _) = rules(
        &[("e.json", &list(&[good(), svc("hl", "None", r#"{"port":80}"#)]))],
        &["--explain", "--service-filter-mode", "FilterIfLabelExists"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("t/good: proxied: no ignore rule applies"), "{out}");
    assert!(out.contains("t/hl: ignored: headless service (clusterIP: None)"), "{out}");
    assert!(out.contains("1 of 2 services proxied"), "{out}");
}

#[test]
fn bad_flag_value_is_a_config_error_naming_the_flag() {
    let (code, _, err) = rules(&[("f.json", &list(&[good()]))], &["--service-filter-mode", "FilterAll"]);
    assert_eq!(code, 1);
    assert!(err.contains("--service-filter-mode: unknown value \"FilterAll\"; accepted values: FilterIfLabelExists, FilterIfLabelDoesNotExists"), "{err}");
}

/// A Service with any name, namespace or port name (JSON-escaped here; hostile once decoded).
fn svc_named(ns: &str, name: &str, port_name: &str, ip: &str) -> String {
    let j = |s: &str| serde_json::to_string(s).unwrap();
    format!(
        r#"{{"metadata":{{"name":{},"namespace":{}}},"spec":{{"clusterIP":"{ip}","ports":[{{"name":{},"port":80}}]}}}}"#,
        j(name),
        j(ns),
        j(port_name)
    )
}

/// Every line of `rules` output stays in the nat table and in our chains.
fn only_our_nat_rules(out: &str) {
    const OURS: &[&str] = &["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", "EDGEPROXY-NO-ENDPOINTS", "EDGE-MESH"];
    for line in out.lines() {
        let ok = line == "*nat"
            || line == "COMMIT"
            || line.starts_with('#')
            || line.starts_with(':') && OURS.iter().any(|c| line[1..].starts_with(c))
            || line.starts_with("-A ") && OURS.iter().any(|c| line[3..].starts_with(c))
            || line.starts_with("-I PREROUTING ") && line.contains("-j KUBE-PORTALS-CONTAINER")
            || line.starts_with("-I OUTPUT ") && line.contains("-j KUBE-PORTALS-HOST");
        assert!(ok, "a line outside our nat chains: {line:?}\n{out}");
    }
}

/// The probes of the injection report: a quote, a backslash, a whole second table in a name, a
/// namespace and a port name. Each such object is refused by name at decode time with the field
/// that failed; the healthy services still render, and nothing reaches another table.
#[test]
fn names_that_would_inject_rules_are_refused_and_the_rest_render() {
    let inject = "x\" -j RETURN\nCOMMIT\n*filter\n-A INPUT -m comment --comment ADV-INJECTED -j ACCEPT\nCOMMIT\n*nat\n";
    let hostile = [
        (svc_named("t", "q\"uote", "http", "10.96.0.10"), "metadata.name"),
        (svc_named("t", "back\\slash", "http", "10.96.0.11"), "metadata.name"),
        (svc_named("t", inject, "http", "10.96.0.12"), "metadata.name"),
        (svc_named(inject, "web", "http", "10.96.0.13"), "metadata.namespace"),
        (svc_named("t", "web2", inject, "10.96.0.14"), "spec.ports[0].name"),
        (svc_named("t", "Upper", "http", "10.96.0.15"), "metadata.name"),
        (svc_named("t", &"x".repeat(64), "http", "10.96.0.16"), "at most 63"),
    ];
    let mut items = vec![good()];
    items.extend(hostile.iter().map(|(s, _)| s.clone()));
    items.push(svc("good2", "10.96.0.3", r#"{"port":81}"#));
    let (code, out, err) = rules(&[("in.json", &list(&items))], &[]);
    assert_eq!(code, 3, "stderr: {err}");
    let msgs: Vec<&str> = err.lines().filter(|l| !l.starts_with("note:")).collect();
    assert_eq!(msgs.len(), hostile.len(), "one message per hostile object:\n{err}");
    for (m, (_, field)) in msgs.iter().zip(&hostile) {
        assert!(m.contains(": Service ") && m.contains(field), "{m:?} lacks {field:?}");
        assert!(!m.contains('\n') && !m.contains("x\" -j RETURN"), "message not escaped: {m:?}");
    }
    assert!(out.contains("\"t/good:http has no endpoints\""), "good missing:\n{out}");
    assert!(out.contains("\"t/good2 has no endpoints\""), "good2 missing:\n{out}");
    assert!(!out.contains("ADV-INJECTED") && !out.contains("*filter"), "{out}");
    only_our_nat_rules(&out);
}

/// Endpoints that would send the proxy back into itself: a ClusterIP:port this node proxies (two
/// services pointing at each other), refused in the plan and named by --explain; special
/// addresses (loopback, link-local, unspecified) refused at decode time.
#[test]
fn endpoints_that_loop_or_are_special_are_refused() {
    let slice = |name: &str, svc: &str, addr: &str, port: u16| {
        format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"t","labels":{{"kubernetes.io/service-name":"{svc}"}}}},"addressType":"IPv4","endpoints":[{{"addresses":["{addr}"]}}],"ports":[{{"port":{port}}}]}}"#
        )
    };
    let slices = format!(
        r#"{{"kind":"EndpointSliceList","items":[{},{},{},{}]}}"#,
        slice("a-1", "a", "10.96.0.3", 81),
        slice("b-1", "b", "10.96.0.2", 80),
        slice("c-1", "c", "192.0.2.7", 82),
        slice("lo-1", "c", "127.0.0.1", 82),
    );
    let svcs = list(&[
        svc("a", "10.96.0.2", r#"{"port":80}"#),
        svc("b", "10.96.0.3", r#"{"port":81}"#),
        svc("c", "10.96.0.4", r#"{"port":82}"#),
        svc("d", "169.254.1.1", r#"{"port":83}"#),
    ]);
    let (code, out, err) = rules(&[("s.json", &svcs), ("e.json", &slices)], &["--explain"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("EndpointSlice t/lo-1: endpoints[0].addresses[0]: 127.0.0.1 is a loopback address"), "{err}");
    assert!(err.contains("Service t/d: spec.clusterIP[0]: 169.254.1.1 is a link-local address"), "{err}");
    assert!(
        out.contains("t/a 80/TCP: 0 endpoint(s), proxy path (every usable endpoint is a ClusterIP this node proxies"),
        "{out}"
    );
    assert!(out.contains("t/b 81/TCP: 0 endpoint(s), proxy path"), "{out}");
    assert!(out.contains("(1 endpoint(s) refused: a ClusterIP:port this node proxies, a loop)"), "{out}");
    assert!(out.contains("t/c 82/TCP: 1 endpoint(s), proxy path\n"), "{out}");
}

/// An object over the API server's own 3 MiB request limit is refused by size, from any source;
/// the others render.
#[test]
fn an_oversized_object_is_refused_by_size() {
    let big = format!(
        r#"{{"metadata":{{"name":"big","namespace":"t","annotations":{{"blob":"{}"}}}},"spec":{{"clusterIP":"10.96.0.9","ports":[{{"port":80}}]}}}}"#,
        "x".repeat(4 << 20)
    );
    one_bad(big, "Service t/big: the object is 4194");
}
