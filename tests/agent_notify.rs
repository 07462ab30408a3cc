//! `edgeproxy run` under a NOTIFY_SOCKET this test listens on, as systemd would run it
//! (Type=notify, WatchdogSec): READY=1 only once the first sync put the rules in the kernel,
//! WATCHDOG=1 while it runs, STOPPING=1 on SIGTERM, then a clean exit with the rules gone.
//! The agent runs in a network namespace the test creates (the socket is a path, which crosses
//! namespaces; an abstract one would not).

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::netns::{require_root, Netns};
use support::notify_listener::NotifyListener;

const CLUSTER: &str = r#"{"kind":"List","items":[
 {"kind":"Service","metadata":{"name":"web","namespace":"n"},"spec":{"clusterIP":"10.96.0.80","ports":[{"name":"http","port":80}]}},
 {"kind":"EndpointSlice","metadata":{"name":"web-1","namespace":"n","labels":{"kubernetes.io/service-name":"web"}},
  "addressType":"IPv4","endpoints":[{"addresses":["10.244.1.10"]}],"ports":[{"name":"http","port":8080}]}]}"#;

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn ready_after_first_sync_watchdog_while_running_stopping_on_sigterm() {
    require_root();
    let mut ns = Netns::new("ntf");
    let dir = std::env::temp_dir().join(format!("ep-notify-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("cluster.json");
    std::fs::write(&source, CLUSTER).unwrap();

    let mut listener = NotifyListener::bind();
    let mut cmd = support::agent::command(&ns, &["--metrics-address", ""]);
    cmd.arg("--source")
        .arg(format!("file:{}", source.display()))
        .env("NOTIFY_SOCKET", listener.env_value())
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = ns.spawn(cmd);
    let pid = ns.child(agent).id();

    let got = listener.wait_for("READY=1", Duration::from_secs(20)).unwrap_or_else(|m| panic!("no READY=1: {m:?}"));
    // READY comes after the first sync: the rules are in the kernel by now.
    let saved = ns.ok(&["iptables-save", "-t", "nat"]);
    assert!(saved.contains("\"n/web:http\""), "READY=1 before the rules were installed: {got:?}\n{saved}");
    assert!(!got.iter().any(|m| m.contains("STOPPING=1")));

    // WatchdogSec=0.4s: the loop must keep saying it is alive (every 200 ms).
    let alive = listener.collect(Duration::from_millis(1200));
    let beats = alive.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(beats >= 3, "expected WATCHDOG=1 every 200 ms, got {alive:?}");

    let rc = unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    listener.wait_for("STOPPING=1", Duration::from_secs(10)).unwrap_or_else(|m| panic!("no STOPPING=1: {m:?}"));
    let status = ns.child(agent).wait().unwrap();
    assert!(status.success(), "agent exit: {status}");
    let saved = ns.ok(&["iptables-save", "-t", "nat"]);
    assert!(!saved.contains("KUBE-PORTALS"), "rules left after SIGTERM:\n{saved}");
    let _ = std::fs::remove_dir_all(&dir);
}
