//! The ops endpoint over real loopback TCP: routes, readiness, bounded and timed-out requests,
//! and `promtool check metrics` on a populated `/metrics` (promtool comes from Debian's
//! `prometheus` package; tests/setup.sh installs it. Without it this test fails).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use edgeproxy::ops::{Ops, Server, MAX_REQUEST};

fn start(ops: Arc<Ops>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    Server::serve(l, ops).unwrap()
}

/// Send raw bytes, read the whole answer (the server closes after one response).
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let resp = raw(addr, format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
    split(&resp)
}

fn split(resp: &str) -> (u16, String, String) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head end in {resp:?}"));
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (status, head.to_string(), body.to_string())
}

fn populated() -> Arc<Ops> {
    let ops = Ops::new();
    let m = &ops.metrics;
    let web = ops.proxy.service("default/web:http");
    web.tcp.store(true, std::sync::atomic::Ordering::Relaxed);
    web.tcp_ok.add(2);
    web.tcp_dial_failed.inc();
    web.dial_failures.add(3);
    web.bytes_to_backend.add(1200);
    web.bytes_to_client.add(98_765);
    web.tcp_active.inc();
    let dns = ops.proxy.service("kube-system/\"odd\"\\name\n:dns");
    dns.tcp.store(true, std::sync::atomic::Ordering::Relaxed);
    dns.tcp_no_endpoints.inc();
    ops.proxy.tcp_refused_not_service.inc();
    ops.proxy.total.udp_flows_created.add(4);
    m.sync_ok(Duration::from_millis(7), Some(false), SystemTime::now());
    m.sync_failed(Duration::from_millis(1300));
    ops.proxy.dial_duration.observe(Duration::from_millis(2));
    ops.proxy.endpoint("default/web:http", "192.0.2.1:8080".parse().unwrap()).ok.inc();
    m.guard_repairs.inc();
    m.watch_restart("endpointslices");
    m.relist("services");
    ops.set_source_synced(true);
    ops.set_rules_installed(true);
    ops
}

#[test]
#[ignore = "needs promtool (tests/setup.sh installs it)"]
fn metrics_pass_promtool_check() {
    let server = start(populated());
    let (status, head, body) = get(server.local_addr(), "/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"), "{head}");
    for needle in [
        "edgeproxy_connections_total{namespace=\"default\",service=\"web\",port=\"http\",outcome=\"ok\"} 2",
        "edgeproxy_connections_total{namespace=\"default\",service=\"web\",port=\"http\",outcome=\"dial_failed\"} 1",
        "edgeproxy_dial_failures_total{namespace=\"default\",service=\"web\",port=\"http\"} 3",
        "edgeproxy_bytes_total{namespace=\"default\",service=\"web\",port=\"http\",direction=\"to_client\"} 98765",
        "edgeproxy_active_connections{namespace=\"default\",service=\"web\",port=\"http\"} 1",
        "outcome=\"no_endpoints\"} 1",
        "edgeproxy_connections_refused_total{reason=\"not_a_service\"} 1",
        "edgeproxy_udp_flow_events_total{event=\"created\"} 4",
        "service=\"\\\"odd\\\"\\\\name\\n\",port=\"dns\"",
        "edgeproxy_endpoint_dials_total{namespace=\"default\",service=\"web\",port=\"http\",endpoint=\"192.0.2.1:8080\",result=\"ok\"} 1",
        "edgeproxy_dial_duration_seconds_count 1",
        "edgeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
        "edgeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.01\"} 1",
        "edgeproxy_sync_proxy_rules_duration_seconds_count 2",
        "edgeproxy_sync_partial_proxy_rules_duration_seconds_count 1",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "edgeproxy_guard_repairs_total 1",
        "edgeproxy_watch_restarts_total{resource=\"endpointslices\"} 1",
        "edgeproxy_relists_total{resource=\"services\"} 1",
        "edgeproxy_rules_installed 1",
        "edgeproxy_source_synced 1",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
    let ts: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("edgeproxy_sync_proxy_rules_last_timestamp_seconds "))
        .expect("last sync gauge")
        .parse()
        .unwrap();
    assert!(ts > 1.7e9, "last sync {ts} is a Unix time");

    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed for this test ({e}); install Debian's `prometheus` package (tests/setup.sh)")
        });
    let mut child = promtool;
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- input ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool also prints lint findings (e.g. naming advice) while exiting 0: we want none.
    let lint = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(lint.trim().is_empty(), "promtool lint findings:\n{lint}");
}

#[test]
#[ignore = "needs promtool (tests/setup.sh installs it)"]
fn promtool_rejects_broken_exposition() {
    // Guards the guard: the check above means something only if promtool fails bad input.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed for this test");
    child.stdin.take().unwrap().write_all(b"# TYPE x counter\nx{a=\"unterminated} 1\n").unwrap();
    assert!(!child.wait().unwrap().success());
}

#[test]
fn healthz_readyz_and_errors() {
    let ops = Ops::new();
    let server = start(ops.clone());
    let addr = server.local_addr();
    let (status, head, body) = get(addr, "/healthz");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(
        body.contains("\"lastUpdated\": ")
            && body.contains("\"currentTime\": ")
            && body.contains("\"nodeEligible\": true"),
        "{body}"
    );
    assert_eq!(get(addr, "/livez"), (200, get(addr, "/livez").1, "ok\n".to_string()));
    // A rules update queued ten minutes ago and never applied: unhealthy, as kube-proxy says it.
    ops.health.set_timeout(Duration::from_secs(120));
    ops.queued(SystemTime::now() - Duration::from_secs(600));
    assert_eq!(get(addr, "/healthz").0, 503);
    assert_eq!(get(addr, "/livez").0, 503);
    ops.health.updated(SystemTime::now());
    assert_eq!(get(addr, "/healthz").0, 200);
    let (status, _, body) = get(addr, "/readyz");
    assert_eq!((status, body.as_str()), (503, "not ready: source not synced, rules not installed\n"));
    ops.set_source_synced(true);
    let (status, _, body) = get(addr, "/readyz");
    assert_eq!((status, body.as_str()), (503, "not ready: rules not installed\n"));
    ops.set_rules_installed(true);
    assert_eq!(get(addr, "/readyz?verbose").0, 200);
    assert_eq!(get(addr, "/nope").0, 404);
    assert_eq!(split(&raw(addr, b"POST /metrics HTTP/1.1\r\n\r\n")).0, 405);
    assert_eq!(split(&raw(addr, b"garbage\r\n\r\n")).0, 400);
    // HEAD: the GET's headers (Content-Length of the GET body, "ok\n"), no body.
    let resp = raw(addr, b"HEAD /livez HTTP/1.1\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp:?}");
    assert!(resp.contains("Content-Length: 3\r\n") && resp.ends_with("\r\n\r\n"), "{resp:?}");
    // shutdown() wakes the accept loop and joins the thread. (Connecting afterwards proves
    // nothing: a parallel test may already have been given the same ephemeral port.)
    let t = Instant::now();
    server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(3), "shutdown took {:?}", t.elapsed());
}

#[test]
fn oversized_request_gets_431() {
    let server = start(Ops::new());
    let mut req = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', MAX_REQUEST * 2));
    // The server may close before reading all of it; only the answer matters.
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&req);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 431 "), "{out:?}");
}

/// The probe of the exhaustion report: 200 clients that send half a request and hang held
/// /healthz up for 34 s when connections were served one at a time. Now each is its own task.
#[test]
fn healthz_answers_within_a_second_while_200_slow_clients_hang() {
    let server = start(Ops::new());
    let addr = server.local_addr();
    let slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x").unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let (status, _, body) = get(addr, "/livez");
    let waited = started.elapsed();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    eprintln!("/healthz behind 200 slow clients: {waited:?}");
    assert!(waited < Duration::from_secs(1), "/healthz took {waited:?} behind 200 slow clients");
    // The slow ones are answered 408 once their time is up, not left open.
    for mut s in slow.into_iter().take(3) {
        let mut out = String::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out:?}");
    }
}

#[test]
fn silent_client_times_out_and_the_next_is_served_after_it() {
    let server = start(Ops::new());
    let addr = server.local_addr();
    let started = Instant::now();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap(); // never finishes the head
    let (status, _, _) = get(addr, "/healthz");
    assert_eq!(status, 200);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "second client waited {waited:?}");
    let mut out = String::new();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    idle.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408 "), "{out:?}");
}
