//! `edgeproxy::notify` against the test helper `support::notify_listener` (path and abstract
//! sockets), and the promise that children do not inherit `$NOTIFY_SOCKET`.

mod support;

use std::process::Command;
use std::time::Duration;

use edgeproxy::notify::Notifier;
use support::notify_listener::NotifyListener;

#[test]
fn path_listener_sees_ready_watchdog_stopping_in_order() {
    let mut l = NotifyListener::bind();
    let value = l.env_value();
    let n = Notifier::from_parts(Some(&value), Some("4000000".as_ref()), None, std::process::id()).unwrap();
    assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
    n.ready("2 services").unwrap();
    n.watchdog().unwrap();
    n.stopping().unwrap();
    let got = l.wait_for("STOPPING=1", Duration::from_secs(5)).expect("STOPPING=1 within 5 s");
    assert_eq!(got, ["READY=1\nSTATUS=2 services", "WATCHDOG=1", "STOPPING=1"]);
}

#[test]
fn abstract_listener_sees_ready() {
    let mut l = NotifyListener::bind_abstract();
    let value = l.env_value();
    assert!(value.to_string_lossy().starts_with('@'));
    let n = Notifier::from_parts(Some(&value), None, None, 1).unwrap();
    n.ready("ok").unwrap();
    l.wait_for("READY=1", Duration::from_secs(5)).expect("READY=1 within 5 s");
}

#[test]
fn wait_for_times_out_with_what_it_saw() {
    let mut l = NotifyListener::bind();
    let n = Notifier::from_parts(Some(&l.env_value()), None, None, 1).unwrap();
    n.status("starting").unwrap();
    let seen = l.wait_for("READY=1", Duration::from_millis(300)).unwrap_err();
    assert_eq!(seen, ["STATUS=starting"]);
}

/// The only test in this file that touches the process environment.
#[test]
fn from_env_reads_then_unsets_so_children_do_not_inherit() {
    let mut l = NotifyListener::bind_abstract();
    std::env::set_var("NOTIFY_SOCKET", l.env_value());
    std::env::set_var("WATCHDOG_USEC", "10000000");
    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
    let n = Notifier::from_env().unwrap();
    for var in edgeproxy::notify::ENV_VARS {
        assert!(std::env::var_os(var).is_none(), "{var} still set");
    }
    let out = Command::new("sh")
        .args(["-c", "echo \"${NOTIFY_SOCKET-unset} ${WATCHDOG_USEC-unset} ${WATCHDOG_PID-unset}\""])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unset unset unset");
    assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
    n.watchdog().unwrap();
    l.wait_for("WATCHDOG=1", Duration::from_secs(5)).expect("WATCHDOG=1 within 5 s");
}
