//! UDP through the proxy, end to end in namespaces. One test, run step by step: it counts this
//! process's file descriptors, so nothing else may run beside it (hence its own test binary).
mod proxy_support;
mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use edgeproxy::model::Kind;
use edgeproxy::proxy::ProxyEvent;
use edgeproxy::state::Change;
use proxy_support::*;
use support::netns::Netns;

/// A UDP socket inside `ns`, connected to `addr`: it only accepts datagrams from `addr`, so
/// every reply it receives proves the reply came from the ClusterIP:port the client used.
fn client(ns: &Netns, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    Topo::in_ns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
        s
    })
}

fn ask(s: &UdpSocket, q: &[u8]) -> Option<Vec<u8>> {
    s.send(q).unwrap();
    let mut buf = vec![0u8; 70_000];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn udp_request_response_volume_expiry_and_cap() {
    let mut t = Topo::new(test_config());
    request_response_on_both_paths(&t);
    big_datagrams_and_volume(&t);
    flows_expire(&t);
    per_source_and_global_caps(&t);
    a_flow_follows_its_backend(&mut t);
    an_unbindable_port_moves(&mut t);
    a_burst_is_served_whole(&t);
    let stats = t.stats.clone();
    let total = stats.services().into_iter().find(|(n, _)| &**n == "t/dns:p").expect("per-service counters").1;
    assert!(total.udp_flows_created.get() >= 15);
}

fn request_response_on_both_paths(t: &Topo) {
    // Request/response from both paths; round robin over b1, b2 per new flow.
    let mut ids = Vec::new();
    for ns in [&t.node, &t.pod] {
        let s = client(ns, DNS);
        let r = ask(&s, b"query example.org").unwrap_or_else(|| {
            panic!("no answer via {}: {:?}\n{}", ns.name, t.stats, t.node.ok(&["iptables-save", "-t", "nat", "-c"]))
        });
        let text = String::from_utf8(r).unwrap();
        let (id, rest) = text.split_once(':').unwrap();
        assert_eq!(rest, "query example.org");
        ids.push(id.to_string());
    }
    ids.sort();
    assert_eq!(ids, ["b1", "b2"]);
}

fn big_datagrams_and_volume(t: &Topo) {
    // The largest datagrams pass whole (EdgeMesh cut them at 4 KiB).
    let s = client(&t.pod, DNS);
    let big: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    let r = ask(&s, &big).expect("answer to a 65 000-byte datagram");
    assert_eq!(r.len(), 3 + big.len());
    assert_eq!(&r[3..], &big[..]);

    // 10 000 datagrams request/response on one flow, none lost.
    let mut lost = 0;
    let mut buf = vec![0u8; 2048];
    for i in 0..10_000u32 {
        let q = format!("q{i:05}-{}", "x".repeat((i % 512) as usize));
        s.send(q.as_bytes()).unwrap();
        match s.recv(&mut buf) {
            Ok(n) if &buf[3..n] == q.as_bytes() => {}
            Ok(n) => panic!("answer {i} is {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => lost += 1,
        }
    }
    assert_eq!(lost, 0, "datagrams lost out of 10 000");
    drop(s);
}

fn flows_expire(t: &Topo) {
    let stats = t.stats.clone();
    // Flows expire after the idle timeout (500 ms here) and take their sockets with them.
    wait_for(|| stats.udp_flows_active.get() == 0, "flows expire");
    let expired = stats.udp_flows_expired.get();
    assert_eq!(expired, stats.total.udp_flows_created.get());
    let clients: Vec<UdpSocket> = (0..4).map(|_| client(&t.pod, DNS)).collect();
    let before = fds();
    for c in &clients {
        assert!(ask(c, b"hello").is_some());
    }
    assert_eq!(stats.udp_flows_active.get(), 4);
    assert_eq!(fds(), before + 4, "one upstream socket per flow");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats.udp_flows_active.get(), 4, "not idle long enough yet");
    wait_for(|| stats.udp_flows_active.get() == 0, "flows expire");
    assert_eq!(stats.udp_flows_expired.get(), expired + 4);
    wait_for(|| fds() == before, "expired flows close their sockets");
    drop(clients);
}

fn per_source_and_global_caps(t: &Topo) {
    let stats = t.stats.clone();
    // Per client address at most 6 flows (test_config): the node's seventh is dropped, counted.
    let clients: Vec<UdpSocket> = (0..7).map(|_| client(&t.node, DNS)).collect();
    for c in &clients {
        c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    }
    let answered = clients.iter().filter(|c| ask(c, b"capped").is_some()).count();
    assert_eq!(answered, 6);
    assert_eq!(stats.udp_flows_dropped_per_source.get(), 1);
    // The global cap (8 flows): the pod's first two fit; its third makes the least recently
    // active flow (the node's first) give way, so one address cannot lock out the others.
    let pod_clients: Vec<UdpSocket> = (0..3).map(|_| client(&t.pod, DNS)).collect();
    for c in &pod_clients {
        assert!(ask(c, b"room").is_some(), "a new client is served at the cap");
    }
    assert_eq!(stats.udp_flows_evicted.get(), 1);
    assert_eq!(stats.udp_flows_dropped_at_cap.get(), 0);
    wait_for(|| stats.udp_flows_active.get() == 8, "the evicted flow ends");
    // The flow just made is kept at the cap: asking again opens no new flow. (Older ones may
    // expire meanwhile, 500 ms here; which one gives way is `admission`'s unit test.)
    let created = stats.total.udp_flows_created.get();
    assert!(ask(&pod_clients[2], b"still here").is_some());
    assert_eq!(stats.total.udp_flows_created.get(), created, "a recent flow was replaced");
    wait_for(|| stats.udp_flows_active.get() == 0, "flows expire");
    assert!(ask(&clients[6], b"room again").is_some());
    drop((clients, pod_clients));
}

fn a_flow_follows_its_backend(t: &mut Topo) {
    // The backends change: a flow whose backend left is replaced on the client's next datagram.
    let s = client(&t.pod, DNS);
    let first = String::from_utf8(ask(&s, b"who").unwrap()).unwrap();
    let other = if first.starts_with("b1") { ("10.20.2.2", "b2") } else { ("10.20.1.2", "b1") };
    t.apply(Change::Upsert(slice_object(&slice("dns", "1", &[other.0], 5353, "UDP"))));
    let again = String::from_utf8(ask(&s, b"who").unwrap()).unwrap();
    assert_eq!(again, format!("{}:who", other.1), "was {first}");
}

fn an_unbindable_port_moves(t: &mut Topo) {
    // A UDP port that cannot be bound is reported; the state allocates another and it works.
    let squatter = Topo::in_ns(&t.node, || UdpSocket::bind("169.254.96.16:15003").unwrap());
    while t.events.try_recv().is_ok() {}
    let dns2 = svc("dns2", "10.96.0.21", 53, "UDP", 5353, "");
    t.apply(Change::Upsert(object(Kind::Service, &dns2)));
    t.apply(Change::Upsert(slice_object(&slice("dns2", "1", &["10.20.3.2"], 5353, "UDP"))));
    let mut unavailable = None;
    while unavailable.is_none() {
        match t.events.blocking_recv() {
            Some(ProxyEvent::UdpPortUnavailable(p)) => unavailable = Some(p),
            Some(_) => {}
            None => panic!("proxy gone"),
        }
    }
    assert_eq!(unavailable, Some(15003));
    t.apply(Change::UdpPortUnavailable(15003));
    loop {
        match t.events.blocking_recv() {
            Some(ProxyEvent::UdpPorts(p)) if p == [15002, 15004] => break,
            Some(_) => {}
            None => panic!("proxy gone"),
        }
    }
    let s2 = client(&t.node, "10.96.0.21:53");
    assert_eq!(ask(&s2, b"moved").as_deref(), Some(&b"b3:moved"[..]));
    drop(squatter);
}

fn a_burst_is_served_whole(t: &Topo) {
    // A burst: 1,000 datagrams sent back to back before reading any answer (the probe got 256
    // answers with default buffers). The client's and backends' buffers are large here, so what
    // is measured is the proxy's own service and flow sockets.
    let burst = client(&t.pod, DNS);
    force_rcvbuf(&burst, 8 << 20);
    burst.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    for i in 0..1000u32 {
        burst.send(format!("burst {i:04} {}", "x".repeat(64)).as_bytes()).unwrap();
    }
    let mut answers = 0;
    let mut buf = vec![0u8; 2048];
    while burst.recv(&mut buf).is_ok() {
        answers += 1;
    }
    eprintln!("UDP burst: {answers} answers to 1000 datagrams");
    assert_eq!(answers, 1000, "datagrams of a burst were dropped");
    drop(burst);
}
