//! `edgeproxy rules` as a live dry run against the test API server.
mod support;

use std::process::Command;

use support::apiserver::ApiServer;

fn rules(s: &ApiServer, ca: &str, extra: &[&str]) -> std::process::Output {
    let ca = s.path(ca);
    let token = s.path("token");
    Command::new(env!("CARGO_BIN_EXE_edgeproxy"))
        .args(["rules", "--server", &s.url, "--ca-file", ca.to_str().unwrap(), "--token-file", token.to_str().unwrap()])
        .args(["--kube-proxy", "absent"])
        .args(extra)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

#[test]
fn rules_lists_the_cluster_and_explains() {
    let s = ApiServer::start();
    let out = rules(&s, "ca.crt", &["--explain"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("listed ") && stderr.contains(&s.url), "{stderr}");
    // The fixture README: at RV 512, EdgeMesh's FilterIfLabelExists (the default v1.17 profile)
    // without kube-proxy proxies 17 of 26.
    assert!(stdout.contains("17 of 26 services proxied"), "{stdout}");
    assert!(!stderr.contains("test-token"), "a secret reached the output: {stderr}");
}

#[test]
fn rules_prints_restore_text_from_the_cluster() {
    let s = ApiServer::start();
    let out = rules(&s, "ca.crt", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("*nat") && stdout.contains("COMMIT"), "{stdout}");
}

#[test]
fn rules_with_the_wrong_ca_fails_clearly() {
    let s = ApiServer::start();
    let out = rules(&s, "other-ca.crt", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS handshake failed") && stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(s.requests().is_empty());
}
