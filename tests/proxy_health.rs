//! The proxy's passive health check, end to end in namespaces (`proxy_support` has the
//! topology): service `t/slow` (10.96.0.13:80) has two endpoints, 10.20.1.3 (in b1's
//! namespace, whose SYNs are dropped) and b2. The tests' dial timeout is 300 ms. The last test
//! turns the active probes on.
mod proxy_support;
mod support;

use std::time::{Duration, Instant};

use edgeproxy::state::Change;
use proxy_support::*;

const DEAD: &str = "10.20.1.3:8080";
const DIAL_TIMEOUT: Duration = Duration::from_millis(300);

/// Connect from the pod, read the greeting: (which backend, how long until the greeting).
fn timed_who(t: &Topo) -> (String, Duration) {
    let started = Instant::now();
    let id = who(&t.pod, SLOW);
    (id, started.elapsed())
}

/// The passive health gauge of `endpoint` of `t/slow`, as `/metrics` shows it.
fn set_aside(t: &Topo, endpoint: &str) -> bool {
    let addr: std::net::SocketAddr = endpoint.parse().unwrap();
    t.stats
        .endpoints()
        .iter()
        .find(|((name, a), _)| name.starts_with("t/slow") && *a == addr)
        .is_some_and(|(_, c)| c.set_aside.load(std::sync::atomic::Ordering::Relaxed))
}

/// Let the black-holed address answer: lift the DROP and serve the echo backend on it.
fn revive(t: &Topo) {
    t.backends[0].sh("iptables -D INPUT -d 10.20.1.3 -p tcp -j DROP");
    serve_tcp_echo(&t.backends[0], DEAD, "b1x");
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_black_holed_endpoint_costs_at_most_two_of_a_hundred_connections() {
    let t = Topo::new(test_config());
    let started = Instant::now();
    let runs: Vec<(String, Duration)> = (0..100).map(|_| timed_who(&t)).collect();
    let took = started.elapsed();
    let waited: Vec<usize> = (0..100).filter(|&i| runs[i].1 >= DIAL_TIMEOUT).collect();
    eprintln!("100 connections in {took:?}; waited a dial timeout: {waited:?}");
    assert!(waited.len() <= 2, "{} of 100 waited for a dial timeout: {waited:?}", waited.len());
    assert!(runs.iter().all(|(id, _)| id == "b2"), "every connection is served by the live endpoint");
    assert!(set_aside(&t, DEAD), "the dead endpoint shows as set aside");
    assert!(!set_aside(&t, "10.20.2.2:8080"));
    // Without the health check, round robin sends every other connection to the dead endpoint.
    assert!(t.stats.total.dial_failures.get() <= 2, "{}", t.stats.total.dial_failures.get());
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn an_endpoint_that_answers_again_gets_its_share_after_its_backoff() {
    let t = Topo::new(test_config());
    let (id, took) = timed_who(&t);
    assert_eq!(id, "b2");
    assert!(took >= DIAL_TIMEOUT, "the first connection meets the dead endpoint: {took:?}");
    assert!(set_aside(&t, DEAD));
    revive(&t);
    // Still inside its backoff (at most 1 s after one failure): avoided, nobody waits.
    for _ in 0..5 {
        let (id, took) = timed_who(&t);
        assert_eq!(id, "b2");
        assert!(took < DIAL_TIMEOUT, "{took:?}");
    }
    // After the backoff one connection tries it, succeeds, and round robin includes it again.
    std::thread::sleep(Duration::from_millis(1100));
    let ids: Vec<String> = (0..6)
        .map(|_| {
            let (id, took) = timed_who(&t);
            assert!(took < DIAL_TIMEOUT, "{took:?}");
            id
        })
        .collect();
    assert!(ids.iter().any(|i| i == "b1x") && ids.iter().any(|i| i == "b2"), "{ids:?}");
    assert!(!set_aside(&t, DEAD), "cleared by the successful trial");
    assert_eq!(t.stats.total.dial_failures.get(), 1);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn when_every_endpoint_is_set_aside_they_are_tried_anyway() {
    let mut t = Topo::new(test_config());
    t.apply(Change::Upsert(slice_object(&slice("slow", "1", &["10.20.1.3"], 8080, "TCP"))));
    wait_for(|| t.table().tcp.values().any(|e| e.upstreams.len() == 1 && e.name.starts_with("t/slow")), "new table");
    // Its only endpoint is dead: the connection is dropped after the dial timeout.
    for round in 0..2 {
        let started = Instant::now();
        let r = connect(&t.pod, SLOW).and_then(|(mut s, _)| greeting(&mut s));
        let took = started.elapsed();
        assert!(r.is_err(), "round {round}: {r:?}");
        // The second round, inside the backoff, still dials it (fail open): it waits, it is not refused.
        assert!(took >= DIAL_TIMEOUT, "round {round}: gave up after {took:?} without dialling");
    }
    assert!(set_aside(&t, DEAD));
    // It comes back: served at once, inside its backoff, because it is the only one.
    revive(&t);
    let (id, took) = timed_who(&t);
    assert_eq!(id, "b1x");
    assert!(took < DIAL_TIMEOUT, "{took:?}");
    assert!(!set_aside(&t, DEAD));
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn probes_set_a_dead_endpoint_aside_before_any_client_and_bring_it_back() {
    let mut cfg = test_config();
    cfg.probe_interval = Some(Duration::from_millis(200));
    cfg.probes_per_second = 50;
    let t = Topo::new(cfg);
    // No client yet: the probes find the dead endpoint.
    wait_for(|| set_aside(&t, DEAD), "the probes set the dead endpoint aside");
    assert_eq!(t.stats.total.dial_failures.get(), 0, "no client has dialled");
    // So not even the first connection waits.
    for i in 0..20 {
        let (id, took) = timed_who(&t);
        assert_eq!(id, "b2");
        assert!(took < DIAL_TIMEOUT, "connection {i} took {took:?}");
    }
    assert_eq!(t.stats.total.dial_failures.get(), 0);
    // It comes back: a probe clears it, no client trial needed.
    revive(&t);
    wait_for(|| !set_aside(&t, DEAD), "a probe found it answering again");
    let ids: Vec<String> = (0..4).map(|_| timed_who(&t).0).collect();
    assert!(ids.iter().any(|i| i == "b1x"), "{ids:?}");
    assert!(t.stats.probes_ok.get() > 0 && t.stats.probes_failed.get() > 0);
}
