//! The agent as OpenWrt's procd runs it with `procd-ujail` (openwrt/edgeproxy/files): an
//! unprivileged user holding only CAP_NET_ADMIN and CAP_NET_RAW (ambient, so that
//! `iptables-restore` keeps them). Everything must still work: the rules, the proxy address
//! (rtnetlink), the proxy's listeners and its marked upstream sockets, and the clean stop.
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use support::agent::{count, exit_code, fetch, serve, signal, wait_for, Agent, BIN};
use support::netns::{require_root, veth, Netns};

/// nobody:nogroup on Debian.
const UID: &str = "65534";
const CAPS: &str = "-all,+net_admin,+net_raw";

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn the_agent_serves_as_an_unprivileged_user_with_two_capabilities() {
    require_root();
    let mut node = Netns::new("lpn");
    let backend = Netns::new("lpb");
    veth(&node, "be0", "10.20.0.1/24", &backend, "eth0", "10.20.0.2/24");
    node.ok(&["ip", "route", "add", "default", "via", "10.20.0.2"]);
    serve(&backend, "10.20.0.2:8080", "hello\n");

    // The binary, the cluster file and the run directory where that user can reach them (the
    // test binary's own directory may sit under a home directory it cannot enter).
    let dir = PathBuf::from(format!("/tmp/ep-least-privilege-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("edgeproxy");
    std::fs::copy(BIN, &bin).unwrap();
    use support::cluster::{list, service, slice};
    let file = dir.join("cluster.json");
    std::fs::write(&file, list(&[service("web", "10.96.0.50"), slice("web", 8080, None)])).unwrap();
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let chown = std::process::Command::new("chown").args([&format!("{UID}:{UID}"), run_dir.to_str().unwrap()]).status();
    assert!(chown.unwrap().success());

    let source = format!("file:{}", file.display());
    let argv = [
        "setpriv",
        "--reuid",
        UID,
        "--regid",
        UID,
        "--clear-groups",
        "--inh-caps",
        CAPS,
        "--ambient-caps",
        CAPS,
        "--bounding-set",
        CAPS,
        bin.to_str().unwrap(),
        "--log-level",
        "debug",
        "run",
        "--source",
        &source,
        "--iptables-backend",
        "nft",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--state-dir",
        "",
        "--metrics-address",
        "",
    ];
    let cmd = node.cmd(&argv);
    let a: Agent = support::agent::start_command(&mut node, cmd);
    wait_for("ready", Duration::from_secs(20), || count(&a.log, "ready: source synced") >= 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", a.pid)).unwrap_or_default();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == UID), "runs as {UID}: {uid_line}");
    assert_eq!(fetch(&node, "10.96.0.50:80"), "hello\n", "the service is served");
    let lo = node.ok(&["ip", "-o", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("169.254.96.16/32"), "the proxy address was added over rtnetlink: {lo}");
    assert!(node.save_dump("iptables-nft-save", "nat").contains("KUBE-PORTALS-HOST"));
    let warnings: Vec<String> =
        a.log.lock().unwrap().iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).cloned().collect();
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut node, &a), Some(0), "a clean stop");
    assert!(!node.save_dump("iptables-nft-save", "nat").contains("KUBE-PORTALS"), "the rules went with it");
    let lo = node.ok(&["ip", "-o", "addr", "show", "dev", "lo"]);
    assert!(!lo.contains("169.254.96.16"), "so did the address: {lo}");
    assert!(warnings.is_empty(), "nothing to warn about without root: {warnings:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
