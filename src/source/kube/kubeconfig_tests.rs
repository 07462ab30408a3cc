//! Unit tests of `kubeconfig`: the files kubeadm, k3s and EdgeMesh write, relative paths,
//! redaction, unsupported users, merging, and YAML bombs.

use super::*;

fn b64e(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn kubeadm_admin_conf() {
    // The shape `kubeadm init` writes to /etc/kubernetes/admin.conf.
    let text = format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {}
    server: https://192.168.56.10:6443
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: kubernetes-admin
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
kind: Config
preferences: {{}}
users:
- name: kubernetes-admin
  user:
    client-certificate-data: {}
    client-key-data: {}
",
        b64e("-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"),
        b64e("-----BEGIN CERTIFICATE-----\nCRT\n-----END CERTIFICATE-----\n"),
        b64e("-----BEGIN RSA PRIVATE KEY-----\nKEY\n-----END RSA PRIVATE KEY-----\n"),
    );
    let s = from_str(&text, Path::new("/etc/kubernetes")).unwrap();
    assert_eq!(s.server, "https://192.168.56.10:6443");
    assert_eq!(s.ca, Some(PemSource::Data(b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".to_vec())));
    assert!(matches!(&s.client_cert, Some(PemSource::Data(d)) if d.starts_with(b"-----BEGIN CERTIFICATE-----\nCRT")));
    let Some(KeySource::Data(key)) = &s.client_key else { panic!("{:?}", s.client_key) };
    assert!(key.expose().starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
    assert!(!s.insecure);
    assert!(s.warnings.is_empty());
    // The key never shows in Debug output.
    let dbg = format!("{s:?}");
    assert!(!dbg.contains("RSA PRIVATE KEY") && !dbg.contains(&b64e("-----BEGIN RSA")), "{dbg}");
}

#[test]
fn k3s_yaml() {
    // /etc/rancher/k3s/k3s.yaml: everything named `default`, EC keys, loopback server.
    let text = format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {}
    client-key-data: {}
",
        b64e("ca"),
        b64e("crt"),
        b64e("-----BEGIN EC PRIVATE KEY-----\nk\n-----END EC PRIVATE KEY-----\n")
    );
    let s = from_str(&text, Path::new("/etc/rancher/k3s")).unwrap();
    assert_eq!(s.server, "https://127.0.0.1:6443");
    assert_eq!(s.ca, Some(PemSource::Data(b"ca".to_vec())));
    assert_eq!(s.origin, "context \"default\"");
}

#[test]
fn token_file_user_with_relative_paths() {
    let text = "apiVersion: v1
kind: Config
clusters:
- name: edge
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority: pki/ca.crt
users:
- name: agent
  user:
    tokenFile: /var/run/secrets/tokens/edgeproxy
- name: other
  user:
    token: abc.def.ghi
contexts:
- name: edge
  context: {cluster: edge, user: agent, namespace: kube-system}
current-context: edge
";
    let s = from_str(text, Path::new("/etc/edgeproxy")).unwrap();
    assert_eq!(s.ca, Some(PemSource::File("/etc/edgeproxy/pki/ca.crt".into())));
    assert_eq!(s.token_file, Some(PathBuf::from("/var/run/secrets/tokens/edgeproxy")));
    assert_eq!(s.token, None);
}

#[test]
fn inline_token_is_redacted() {
    let text = "clusters: [{name: c, cluster: {server: 'https://h:6443', certificate-authority: /ca}}]
users: [{name: u, user: {token: sekret-token-value}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
";
    let s = from_str(text, Path::new("/")).unwrap();
    assert_eq!(s.token.as_ref().unwrap().expose(), b"sekret-token-value");
    assert!(!format!("{s:?}").contains("sekret"));
}

#[test]
fn metaserver_kubeconfig_as_edgemesh_writes_it() {
    // EdgeMesh's agent writes this when it talks to edgecore's MetaServer.
    let text = "apiVersion: v1
clusters:
- cluster:
    server: http://127.0.0.1:10550
  name: kubeedge-cluster
contexts:
- context:
    cluster: kubeedge-cluster
    user: edgemesh
  name: kubeedge-context
current-context: kubeedge-context
kind: Config
users:
- name: edgemesh
";
    // With and without the empty `user: {}` that client-go writes for an empty AuthInfo.
    for text in [text.to_string(), text.replace("- name: edgemesh\n", "- name: edgemesh\n  user: {}\n")] {
        let s = from_str(&text, Path::new("/")).unwrap();
        assert_eq!(s.server, "http://127.0.0.1:10550");
        assert_eq!((s.ca, s.token, s.token_file, s.client_cert, s.insecure), (None, None, None, None, false));
    }
    let e =
        from_str(&text.replace("- name: edgemesh\n", "- name: edgemesh\n  user: [1]\n"), Path::new("/")).unwrap_err();
    assert!(e.contains("users[0] (edgemesh): `user` is not a mapping"), "{e}");
}

#[test]
fn exec_plugin_is_not_supported() {
    let text =
        "clusters: [{name: eks, cluster: {server: 'https://x.eks.amazonaws.com', certificate-authority-data: Y2E=}}]
contexts: [{name: eks, context: {cluster: eks, user: aws}}]
current-context: eks
users:
- name: aws
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: aws
      args: [eks, get-token, --cluster-name, prod]
";
    let e = from_str(text, Path::new("/")).unwrap_err();
    assert!(e.contains("user \"aws\" uses an exec credential plugin (aws)"), "{e}");
    assert!(e.contains("does not support"), "{e}");
    let gcp = text.replace(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n      args: [eks, get-token, --cluster-name, prod]\n",
        "    auth-provider:\n      name: gcp\n",
    );
    let e = from_str(&gcp, Path::new("/")).unwrap_err();
    assert!(e.contains("auth-provider plugin \"gcp\""), "{e}");
}

#[test]
fn insecure_only_when_written_and_warned() {
    let base = "clusters: [{name: c, cluster: {server: 'https://h:6443'INSECURE}}]
contexts: [{name: x, context: {cluster: c}}]
current-context: x
";
    let s = from_str(&base.replace("INSECURE", ""), Path::new("/")).unwrap();
    assert!(!s.insecure && s.warnings.is_empty());
    let s = from_str(&base.replace("INSECURE", ", insecure-skip-tls-verify: true"), Path::new("/")).unwrap();
    assert!(s.insecure);
    assert!(s.warnings[0].contains("NOT verified"), "{:?}", s.warnings);
    let e =
        from_str(&base.replace("INSECURE", ", insecure-skip-tls-verify: 'yes please'"), Path::new("/")).unwrap_err();
    assert!(e.contains("insecure-skip-tls-verify: not true or false"), "{e}");
}

#[test]
fn errors_name_the_entry() {
    let e = from_str("current-context: nope\ncontexts: []\n", Path::new("/")).unwrap_err();
    assert!(e.contains("current-context \"nope\" is not among the contexts"), "{e}");
    let e = from_str(
        "clusters: [{name: c, cluster: {server: 'https://h', certificate-authority-data: '%%%'}}]\ncontexts: [{name: x, context: {cluster: c}}]\n",
        Path::new("/"),
    )
    .unwrap_err();
    assert!(e.contains("cluster \"c\".certificate-authority-data: not valid base64"), "{e}");
    let e = from_str("clusters: [\n", Path::new("/")).unwrap_err();
    assert!(e.starts_with("not valid YAML"), "{e}");
}

#[test]
fn merged_files_first_wins() {
    let dir = std::env::temp_dir().join(format!("ep-kc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::write(&a, "current-context: two\nclusters: [{name: c, cluster: {server: 'http://first'}}]\n").unwrap();
    std::fs::write(
        &b,
        "current-context: one\nclusters: [{name: c, cluster: {server: 'http://second'}}]\ncontexts: [{name: two, context: {cluster: c}}]\n",
    )
    .unwrap();
    let s = load(&[a.clone(), dir.join("missing"), b.clone()]).unwrap();
    assert_eq!(s.server, "http://first");
    let e = load(&[dir.join("missing")]).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn yaml_bombs_are_refused_before_any_tree_is_built() {
    // "Billion laughs": nine levels of ten aliases each; the loader would copy 10^9 nodes.
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (prev, c) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        bomb.push_str(&format!("{c}: &{c} [{}]\n", vec![format!("*{prev}"); 9].join(",")));
    }
    let t = std::time::Instant::now();
    let err = from_str(&bomb, Path::new("/")).unwrap_err();
    assert!(err.contains("alias") && err.contains("line 2"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "took {:?}", t.elapsed());
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    assert!(from_str(&deep, Path::new("/")).unwrap_err().contains("deeper than 32"));
    let wide = format!("x: [{}]", vec!["1"; 30_000].join(","));
    assert!(from_str(&wide, Path::new("/")).unwrap_err().contains("more than 20000 YAML nodes"));
    let big = format!("x: \"{}\"", "a".repeat(MAX_KUBECONFIG_BYTES));
    assert!(from_str(&big, Path::new("/")).unwrap_err().contains("at most 1048576"));
}
