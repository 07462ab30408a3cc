use super::*;
use crate::listen::ListenConfig;
use crate::model::{Protocol, ServicePortName};
use crate::rules::render::{render_nftables as render, PlannedPort};

fn listen() -> ListenConfig {
    ListenConfig {
        ip: "169.254.96.16".parse().unwrap(),
        ipv6: "fd00:e16e::16".parse().unwrap(),
        device: "lo".into(),
        tcp_port: 15001,
        udp_ports: (15002, 15999),
        reject_port: 15000,
        mark: 0x0010_0000,
    }
}

fn port(name: &str, ip: &str, protocol: Protocol, port: u16, proxy_port: u16, has_endpoints: bool) -> PlannedPort {
    PlannedPort::proxied(name, ip, protocol, port, proxy_port, has_endpoints)
}

fn ports() -> Vec<PlannedPort> {
    vec![
        port("t/web:http", "10.96.0.10", Protocol::Tcp, 80, 15001, true),
        port("t/dns:dns", "10.96.0.20", Protocol::Udp, 53, 15002, true),
        port("t/empty:http", "10.96.0.14", Protocol::Tcp, 80, 15001, false),
        port("t/web6:http", "fd00:10::10", Protocol::Tcp, 80, 15001, true),
    ]
}

#[test]
fn ports_become_elements_to_the_proxy_or_the_reject_port() {
    let r = render(&ports(), &listen());
    assert_eq!(r.v4.elements.len(), 3);
    assert_eq!(r.v6.elements.len(), 1);
    let web = &r.v4.elements[&("10.96.0.10".parse().unwrap(), Protocol::Tcp, 80)];
    assert_eq!((web.addr.to_string(), web.port), ("169.254.96.16".into(), 15001));
    let dns = &r.v4.elements[&("10.96.0.20".parse().unwrap(), Protocol::Udp, 53)];
    assert_eq!(dns.port, 15002, "a UDP port goes to its own socket");
    let empty = &r.v4.elements[&("10.96.0.14".parse().unwrap(), Protocol::Tcp, 80)];
    assert_eq!(empty.port, 15000, "no endpoints: the reject port");
    let web6 = r.v6.elements.values().next().unwrap();
    assert_eq!(web6.addr.to_string(), "fd00:e16e::16", "each family to the proxy address of its own");
}

#[test]
fn the_full_text_writes_the_table_whole_in_one_transaction() {
    let r = render(&ports(), &listen());
    let text = script(&r);
    let expected_v4 = "table ip edgeproxy {}
delete table ip edgeproxy
table ip edgeproxy {
\tmap services {
\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
\t\telements = { 10.96.0.10 . tcp . 80 comment \"t/web:http\" : 169.254.96.16 . 15001,
\t\t\t10.96.0.14 . tcp . 80 comment \"t/empty:http\" : 169.254.96.16 . 15000,
\t\t\t10.96.0.20 . udp . 53 comment \"t/dns:dns\" : 169.254.96.16 . 15002 }
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority -101; policy accept;
\t\tdnat ip to ip daddr . meta l4proto . th dport map @services
\t}
\tchain output {
\t\ttype nat hook output priority -101; policy accept;
\t\tmeta mark & 0x00100000 == 0x00100000 return
\t\tdnat ip to ip daddr . meta l4proto . th dport map @services
\t}
}
";
    assert!(text.starts_with(expected_v4), "{text}");
    let v6 = &text[expected_v4.len()..];
    assert!(v6.starts_with("table ip6 edgeproxy {}\ndelete table ip6 edgeproxy\n"), "{v6}");
    assert!(v6.contains("type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service"), "{v6}");
    assert!(v6.contains("fd00:10::10 . tcp . 80 comment \"t/web6:http\" : fd00:e16e::16 . 15001"), "{v6}");
    assert!(v6.contains("dnat ip6 to ip6 daddr . meta l4proto . th dport map @services"), "{v6}");
    // No IPv6 service: no IPv6 table; no mark: no return rule.
    let mut l = listen();
    l.mark = 0;
    let only_v4 = script(&render(&ports()[..1], &l));
    assert!(!only_v4.contains("ip6") && !only_v4.contains("meta mark"), "{only_v4}");
}

#[test]
fn a_sync_changes_only_the_elements_that_changed() {
    let old = render(&ports(), &listen());
    let mut ps = ports();
    ps[2].has_endpoints = true; // t/empty gains an endpoint
    ps.remove(1); // t/dns goes
    ps.push(port("t/new:http", "10.96.0.30", Protocol::Tcp, 8080, 15001, true));
    let new = render(&ps, &listen());
    let mut out = String::new();
    let n = delta_text(&mut out, Family::V4, &old.v4, &new.v4);
    assert_eq!(
        out,
        "delete element ip edgeproxy services { 10.96.0.14 . tcp . 80, 10.96.0.20 . udp . 53 }
add element ip edgeproxy services { 10.96.0.14 . tcp . 80 comment \"t/empty:http\" : 169.254.96.16 . 15001,
\t\t\t10.96.0.30 . tcp . 8080 comment \"t/new:http\" : 169.254.96.16 . 15001 }
"
    );
    assert_eq!(n, 4);
    let mut none = String::new();
    assert_eq!(delta_text(&mut none, Family::V6, &old.v6, &new.v6), 0);
    assert!(none.is_empty());
}

#[test]
fn hostile_names_cannot_leave_their_comment() {
    let mut ps = ports();
    ps[0].name = ServicePortName::from("t/x\" } ; flush ruleset ; add rule ip filter input accept # \\\n");
    let text = script(&render(&ps, &listen()));
    let line = text.lines().find(|l| l.contains("10.96.0.10 . tcp")).unwrap();
    assert!(line.contains("comment \"t/x______flush_ruleset___add_rule_ip_filter_input_accept_____\""), "{line}");
    assert!(!text.contains("\nflush"), "{text}");
    assert_eq!(text.matches('"').count() % 2, 0);
}

#[test]
fn comments_fit_what_nft_keeps() {
    let long = format!("{}/{}:{}", "n".repeat(63), "s".repeat(63), "p".repeat(15));
    assert_eq!(long.len(), 143);
    assert_eq!(comment(&long).len(), MAX_COMMENT);
    assert_eq!(comment("t/web:http"), "t/web:http");
}

/// `check`'s reading of a listed table: each kernel-path port and its endpoints' DNATs.
#[test]
fn kernel_ports_are_read_back_from_a_listing() {
    let listing = "table ip edgeproxy {
	chain ep-1 {
		update @aff-1 { ip saddr }
		meta l4proto tcp dnat to 10.244.1.5:8080
	}
	chain ep-2 {
		meta l4proto tcp dnat to 10.244.1.6:8080
	}
	chain kernel {
		ip daddr 10.96.0.10 tcp dport 80 ip saddr @aff-1 goto ep-1
		ip daddr 10.96.0.10 tcp dport 80 numgen random mod 2 vmap { 0 : goto ep-1, 1 : goto ep-2 } comment \"t/web:http\"
	}
}";
    assert_eq!(
        super::listing::kernel_ports_in(listing),
        ["kernel path: t/web:http on ip daddr 10.96.0.10 tcp dport 80 -> 10.244.1.5:8080 10.244.1.6:8080"]
    );
}

/// The merge pass finds exactly what a lookup per element finds (seeded random tables).
#[test]
fn changes_by_merge_equal_changes_by_lookup() {
    let mut rng = crate::rand::XorShift::new(7);
    let table = |rng: &mut crate::rand::XorShift| {
        let mut t = NftTable::default();
        for _ in 0..rng.index(40) {
            let k: Key = (format!("10.96.0.{}", rng.index(30)).parse().unwrap(), Protocol::Tcp, 80);
            let port = 15000 + u16::try_from(rng.index(2)).unwrap();
            t.elements.insert(k, Target { addr: "169.254.96.16".parse().unwrap(), port, name: "a/b".into() });
        }
        t
    };
    for _ in 0..500 {
        let (old, new) = (table(&mut rng), table(&mut rng));
        let c = Changes::between(&old, &new);
        let gone: Vec<&Key> =
            old.elements.iter().filter(|(k, t)| new.elements.get(*k) != Some(*t)).map(|(k, _)| k).collect();
        let added: Vec<(&Key, &Target)> =
            new.elements.iter().filter(|(k, t)| old.elements.get(*k) != Some(*t)).collect();
        assert_eq!((c.gone, c.added), (gone, added));
    }
}
