//! TCP through the proxy, end to end in namespaces: the OUTPUT path (client on the node) and the
//! PREROUTING path (client in the pod namespace, routed through the node). See
//! `proxy_support` for the topology.
mod proxy_support;
mod support;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use edgeproxy::state::Change;
use proxy_support::*;

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn echo_and_half_close_on_both_paths() {
    let t = Topo::new(test_config());
    for ns in [&t.node, &t.pod] {
        let (mut s, _) = connect(ns, WEB).unwrap();
        let id = greeting(&mut s).unwrap();
        assert!(["b1", "b2", "b3"].contains(&id.as_str()), "{id}");
        s.write_all(b"hello").unwrap();
        let mut echo = [0u8; 5];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"hello");
        // Half-close: we stop writing; the backend sees EOF and still answers.
        s.write_all(b" world").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, format!(" world{id} bye\n"), "via {}", ns.name);
    }
    assert_eq!(t.stats.total.tcp_ok.get(), 2);
    wait_for(|| t.stats.total.tcp_active.get() == 0, "both relays end when both sides have closed");
}

/// Deterministic data and an order-sensitive checksum over it.
struct Gen(u64);
impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes());
        }
    }
}
#[derive(Default, PartialEq, Debug, Clone, Copy)]
struct Sum(u64, u64);
impl Sum {
    fn add(&mut self, buf: &[u8]) {
        for chunk in buf.chunks_exact(8) {
            self.0 = self.0.wrapping_add(u64::from_le_bytes(chunk.try_into().unwrap()));
            self.1 = self.1.wrapping_add(self.0);
        }
    }
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn hundred_megabytes_keep_their_checksum() {
    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let t = Topo::new(test_config());
    let (mut s, _) = connect(&t.pod, WEB).unwrap();
    let id = greeting(&mut s).unwrap();
    let mut w = s.try_clone().unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let (mut g, mut sum, mut buf) = (Gen(0x1234_5678_9abc_def1), Sum::default(), vec![0u8; CHUNK]);
        for _ in 0..TOTAL / CHUNK {
            g.fill(&mut buf);
            sum.add(&buf);
            w.write_all(&buf).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let (mut got, mut sum, mut buf) = (0usize, Sum::default(), vec![0u8; CHUNK]);
    // Read exactly TOTAL bytes (whole words, so the checksum sees the same 8-byte units).
    while got < TOTAL {
        let want = (TOTAL - got).min(CHUNK);
        s.read_exact(&mut buf[..want]).unwrap();
        sum.add(&buf[..want]);
        got += want;
    }
    let sent = writer.join().unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("100 MiB echoed through the proxy (PREROUTING path) in {secs:.2} s");
    assert_eq!(sum, sent, "checksum of the echoed stream");
    assert_eq!(rest, format!("{id} bye\n"));
    assert_eq!(t.stats.total.bytes_to_backend.get(), TOTAL as u64);
    assert_eq!(t.stats.total.bytes_to_client.get(), (TOTAL + id.len() * 2 + 6) as u64);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_backend_reset_resets_the_client() {
    let t = Topo::new(test_config());
    for ns in [&t.node, &t.pod] {
        let (mut s, _) = connect(ns, RST).unwrap();
        s.write_all(b"x").unwrap();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        assert_eq!(r.map_err(|e| e.kind()).unwrap_err(), ErrorKind::ConnectionReset, "via {}", ns.name);
    }
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_silent_backend_times_out_and_the_next_serves_while_others_proceed() {
    let t = Topo::new(test_config());
    // Round robin starts at 10.20.1.3, which drops SYNs: this connection waits one dial timeout.
    let (mut slow, _) = connect(&t.pod, SLOW).unwrap();
    let started = Instant::now();
    let a = std::thread::spawn(move || {
        let id = greeting(&mut slow).unwrap();
        (id, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));
    // Meanwhile another connection to the same service gets the live backend at once.
    let t0 = Instant::now();
    let b = who(&t.node, SLOW);
    let b_took = t0.elapsed();
    let b_done = started.elapsed();
    let (a_id, a_took) = a.join().unwrap();
    assert_eq!(b, "b2");
    assert!(b_took < Duration::from_millis(250), "second connection took {b_took:?}");
    assert_eq!(a_id, "b2", "retried on the next endpoint");
    assert!(a_took >= Duration::from_millis(300), "first connection took only {a_took:?}");
    assert!(a_took < Duration::from_millis(1000), "first connection took {a_took:?}");
    assert!(b_done < a_took, "the second connection did not wait for the first");
    assert_eq!(t.stats.total.dial_failures.get(), 1);
    assert_eq!(t.stats.total.tcp_ok.get(), 2);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn no_endpoints_is_refused_at_once_on_both_paths() {
    let t = Topo::new(test_config());
    for ns in [&t.node, &t.pod] {
        let err = connect(ns, EMPTY).map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "via {}", ns.name);
        // connect() alone, timed inside the namespace thread; the best of three, so that a
        // scheduling hiccup of this busy test machine is not mistaken for a slow refusal.
        let took = Topo::in_ns(ns, || {
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let r = std::net::TcpStream::connect(EMPTY);
                    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionRefused);
                    t.elapsed()
                })
                .min()
                .unwrap()
        });
        assert!(took < Duration::from_millis(10), "refusal took {took:?} via {}", ns.name);
    }
    assert_eq!(t.stats.tcp_accepted.get(), 0, "the reject rule answers; the proxy never sees these");
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn endpoints_change_during_traffic() {
    let mut t = Topo::new(test_config());
    let (mut open, _) = connect(&t.pod, CHANGE).unwrap();
    assert_eq!(greeting(&mut open).unwrap(), "b1");
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();

    let moved = slice("change", "1", &["10.20.2.2"], 8080, "TCP");
    t.apply(Change::Upsert(slice_object(&moved)));

    // New connections go to the new endpoint only...
    for ns in [&t.node, &t.pod, &t.pod] {
        assert_eq!(who(ns, CHANGE), "b2");
    }
    // ...while the open one runs on to the removed endpoint until it closes.
    open.write_all(b"after!").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    open.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "b1 bye\n");

    // Endpoints gone altogether: the rules now reject.
    let none = r#"{"metadata":{"name":"change-1","namespace":"t","labels":{"kubernetes.io/service-name":"change"}},"addressType":"IPv4","endpoints":[],"ports":[{"name":"p","port":8080,"protocol":"TCP"}]}"#;
    t.apply(Change::Upsert(slice_object(none)));
    let err = connect(&t.pod, CHANGE).map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn round_robin_spreads_and_client_ip_affinity_sticks() {
    let t = Topo::new(test_config());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let ns = if i % 2 == 0 { &t.pod } else { &t.node };
        *seen.entry(who(ns, WEB)).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = [("b1", 10), ("b2", 10), ("b3", 10)].map(|(k, v)| (k.to_string(), v)).into();
    assert_eq!(seen, want);

    for ns in [&t.pod, &t.node] {
        let first = who(ns, STICKY);
        for _ in 0..10 {
            assert_eq!(who(ns, STICKY), first, "ClientIP affinity via {}", ns.name);
        }
    }
    let (pod, node) = (who(&t.pod, STICKY), who(&t.node, STICKY));
    assert_ne!(pod, node, "two clients, two backends: round robin for the first choice");
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn the_proxy_port_itself_is_not_an_open_relay() {
    let t = Topo::new(test_config());
    for ns in [&t.node, &t.pod] {
        // The reset may already be there when connect_timeout() checks SO_ERROR; else the first
        // read sees it. No write first: a failed write would consume the reset (then EOF).
        let r = connect(ns, PROXY_PORT).and_then(|(mut s, _)| s.read(&mut [0u8; 16]));
        assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset), "via {}", ns.name);
    }
    assert_eq!(t.stats.tcp_refused_not_service.get(), 2);
    assert_eq!(t.stats.total.tcp_ok.get(), 0);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_filtered_service_goes_through_kube_proxy_not_us() {
    let t = Topo::new(test_config());
    for ns in [&t.node, &t.pod] {
        assert_eq!(who(ns, KP), "b3", "kube-proxy's DNAT picks b3; ours would have picked b1");
    }
    assert_eq!(t.stats.tcp_accepted.get(), 0);
    let rules = t.node.ok(&["iptables", "-t", "nat", "-S", "OUTPUT"]);
    let ours = rules.find("KUBE-PORTALS-HOST").expect("our jump");
    let theirs = rules.find("KUBE-SERVICES").expect("kube-proxy's jump");
    assert!(ours < theirs, "our jump comes first:\n{rules}");
    // And proxied services still reach us with kube-proxy's chain behind.
    assert!(["b1", "b2", "b3"].contains(&who(&t.pod, WEB).as_str()));
    assert_eq!(t.stats.tcp_accepted.get(), 1);
}

/// One client address cannot take every descriptor: past `tcp.maxConnectionsPerSource` (4 here)
/// its connections are reset at once, counted, while other addresses are served; a closed
/// connection frees its place. (The probe: 12,000 idle connections from one pod left other
/// services accepted by the kernel and never served.)
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_client_address_is_held_to_its_connection_cap() {
    let mut cfg = test_config();
    cfg.tcp_max_per_source = 4;
    let t = Topo::new(cfg);
    let mut held: Vec<_> = (0..4)
        .map(|_| {
            let (mut s, _) = connect(&t.pod, WEB).unwrap();
            greeting(&mut s).expect("served under the cap");
            s
        })
        .collect();
    // The fifth is reset at once: while connecting (the reset can arrive before connect()
    // returns) or at its first read, never left waiting in the backlog.
    let started = Instant::now();
    let err = match connect(&t.pod, WEB) {
        Err(e) => e,
        Ok((mut fifth, _)) => greeting(&mut fifth).expect_err("the fifth is refused"),
    };
    assert!(matches!(err.kind(), ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not left waiting");
    assert_eq!(t.stats.tcp_refused_per_source.get(), 1);
    // Another address (the node itself) is served meanwhile.
    let _ = who(&t.node, WEB);
    // Closing one frees its place.
    drop(held.pop());
    wait_for(|| t.stats.total.tcp_active.get() == 3, "the closed connection ends");
    let _ = who(&t.pod, WEB);
    assert_eq!(t.stats.tcp_refused_per_source.get(), 1);
}

/// The second loop guard: even a table whose backend is the service's own ClusterIP:port (which
/// `state` never builds; published here directly) cannot make the proxy dial itself, because
/// its upstream sockets carry the mark and the chain the node's own traffic enters lets marked
/// packets pass. One client connection stays one connection: the dial goes out unproxied and
/// fails, the client is reset. (The probe: one connection fanned out into ~10,000.)
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_table_that_points_at_itself_cannot_make_the_proxy_dial_itself() {
    use edgeproxy::proxy::table::Upstream;
    let t = Topo::new(test_config());
    let web: std::net::SocketAddr = WEB.parse().unwrap();
    let mut table = t.table();
    let mut entry = (**table.tcp.get(&web).expect("web in the table")).clone();
    entry.upstreams = vec![Upstream { addr: web, local: false }];
    table.tcp.insert(web, std::sync::Arc::new(entry));
    t.publish(table);
    let accepted = t.stats.tcp_accepted.get();
    let result = connect(&t.pod, WEB).and_then(|(mut s, _)| greeting(&mut s));
    assert!(result.is_err(), "nothing can answer: {result:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.stats.tcp_accepted.get(), accepted + 1, "the proxy accepted its own upstream connection");
    assert_eq!(t.stats.total.tcp_dial_failed.get(), 1);

    // UDP likewise (the probe: one datagram filled the flow table): the service's backend is its
    // own ClusterIP:port; the flow's marked datagram leaves our chains alone, so one datagram
    // makes one flow.
    let dns: std::net::SocketAddr = DNS.parse().unwrap();
    let mut table = t.table();
    let port = *table.udp.iter().find(|(_, e)| e.name.starts_with("t/dns")).expect("dns in the table").0;
    let mut entry = (**table.udp.get(&port).unwrap()).clone();
    entry.upstreams = vec![Upstream { addr: dns, local: false }];
    table.udp.insert(port, std::sync::Arc::new(entry));
    t.publish(table);
    std::thread::sleep(Duration::from_millis(200));
    let created = t.stats.total.udp_flows_created.get();
    Topo::in_ns(&t.pod, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"who", dns).unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.stats.total.udp_flows_created.get(), created + 1, "one datagram, one flow");
}

/// `tcp.idleTimeout` (off by default): a connection with no byte either way for the timeout is
/// closed with a FIN both ways (between one and two timeouts after its last byte); one that keeps
/// talking is not.
#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn idle_connections_close_at_the_idle_timeout_busy_ones_do_not() {
    let mut cfg = test_config();
    cfg.tcp_idle_timeout = Some(Duration::from_millis(300));
    let t = Topo::new(cfg);
    // Idle: the hold backend greets once, then neither side says anything.
    let (mut idle, _) = connect(&t.pod, HOLD).unwrap();
    let mut b = [0u8; 2];
    idle.read_exact(&mut b).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let n = idle.read_to_end(&mut rest).expect("an orderly close, not a reset");
    let waited = started.elapsed();
    assert_eq!(n, 0);
    // Nominally 300-600 ms; the upper bound leaves room for a loaded machine.
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "closed after {waited:?}");
    assert_eq!(t.stats.tcp_idle_closed.get(), 1);
    // Busy: a byte every 100 ms for 1.2 s (four timeouts) keeps the connection.
    let (mut busy, _) = connect(&t.pod, WEB).unwrap();
    let _ = greeting(&mut busy).unwrap();
    for i in 0..12u8 {
        busy.write_all(&[b'a' + i]).unwrap();
        let mut echo = [0u8; 1];
        busy.read_exact(&mut echo).unwrap();
        assert_eq!(echo[0], b'a' + i);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(t.stats.tcp_idle_closed.get(), 1, "the busy connection was closed");
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn the_upstream_leg_gets_keepalive_only_once_the_connection_has_lived_ten_seconds() {
    let t = Topo::new(test_config());
    let (mut s, _) = connect(&t.node, WEB).unwrap();
    greeting(&mut s).unwrap();
    // The proxy's socket to the backend, as the node sees it (only the proxy dials backends).
    let upstream = || t.node.ok(&["ss", "-tnoH", "state", "established", "(", "dport", "=", ":8080", ")"]);
    let early = upstream();
    assert_eq!(early.lines().count(), 1, "one upstream socket: {early}");
    assert!(!early.contains("keepalive"), "no keepalive yet (short connections never pay for it): {early}");
    std::thread::sleep(Duration::from_millis(10_500));
    let later = upstream();
    assert!(later.contains("timer:(keepalive"), "keepalive after 10 s: {later}");
    // The client's leg had it from the start (inherited from the listener): the proxy's
    // accepted socket, seen from the node as the one whose local port is the proxy port.
    let client_leg = t.node.ok(&["ss", "-tnoH", "state", "established", "(", "sport", "=", ":15001", ")"]);
    assert!(client_leg.contains("timer:(keepalive"), "{client_leg}");
}
