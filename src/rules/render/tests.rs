//! Unit tests of the renderer: EdgeMesh's shapes, hostile names, the small chains.
use super::*;
use crate::config::Config;

fn port(comment: &str, ip: &str, protocol: Protocol, port: u16, proxy_port: u16, has_endpoints: bool) -> PlannedPort {
    PlannedPort::proxied(comment, ip, protocol, port, proxy_port, has_endpoints)
}

fn render_with(layout: Layout, ports: &[PlannedPort], ignored: &[Ignored]) -> RuleSet {
    let cfg = Config::defaults();
    render(&RenderInput { layout, listen: &cfg.listen, service_cidrs: &cfg.service_cidrs, ports, ignored })
}

/// Property: whatever text reaches the renderer as a name, every rendered line has exactly
/// the structure of the line rendered for a harmless name (same chain, matches and target),
/// and the quoted comment holds only safe characters, so nothing can end it, escape it,
/// start another rule or name another table. Seeded, so a failure reproduces.
#[test]
fn no_name_can_leave_its_comment() {
    const PIECES: &[&str] = &[
        "\"",
        "\\",
        "\n",
        "\r",
        "\t",
        " ",
        "'",
        "-A INPUT -j ACCEPT",
        "COMMIT",
        "*filter",
        "#",
        "\0",
        "-j",
        "ä",
        "\u{202e}",
        "x",
        "web",
        "/",
        ":",
        "$(id)",
        "`",
        ";",
        "--comment",
        "\\\"",
    ];
    let mut rng = crate::rand::XorShift::new(0x9e37_79b9_7f4a_7c15);

    let structure = |line: &str| -> (String, String) {
        let open = line.find("--comment \"").map(|i| i + "--comment \"".len());
        match open {
            None => (line.to_string(), String::new()),
            Some(o) => {
                let close = o + line[o..].find('"').expect("comment closes");
                (format!("{}\"{}", &line[..o], &line[close..]), line[o..close].to_string())
            }
        }
    };
    for round in 0..2000 {
        let len = rng.index(12);
        let name: String = (0..len).map(|_| PIECES[rng.index(PIECES.len())]).collect();
        for layout in [Layout::Portals, Layout::RootChain] {
            let ports = |c: &str| {
                vec![
                    port(c, "10.96.0.20", Protocol::Tcp, 80, 15001, false),
                    port(c, "fd00::1", Protocol::Udp, 53, 15002, true),
                ]
            };
            let ignored = |n: &str| {
                vec![Ignored {
                    key: ObjectKey { namespace: "ns".into(), name: n.into() },
                    ips: vec!["10.96.0.9".parse().unwrap()],
                }]
            };
            let hostile = render_with(layout, &ports(&name), &ignored(&name));
            let benign = render_with(layout, &ports("x"), &ignored("x"));
            for (h, b) in [(&hostile.v4, &benign.v4), (&hostile.v6, &benign.v6)] {
                assert_eq!(h.rules.len(), b.rules.len(), "round {round}: {name:?}");
                for (hl, bl) in h.rules.iter().zip(&b.rules) {
                    assert!(!hl.contains(['\n', '\r', '\0']), "round {round}: line break in {hl:?}");
                    let (hs, text) = structure(hl);
                    let (bs, _) = structure(bl);
                    assert_eq!(hs, bs, "round {round}: {name:?} changed the rule's structure");
                    assert!(
                        text.chars().all(|c| c.is_ascii_alphanumeric() || " ._:/-".contains(c)),
                        "round {round}: unsafe comment {text:?}"
                    );
                    assert!(text.len() <= 255, "round {round}: comment of {} bytes", text.len());
                }
            }
        }
    }
}

#[test]
fn portals_dnat_has_edgemesh_shape() {
    let ports = [port("default/nginx:http", "10.96.100.10", Protocol::Tcp, 80, 15001, true)];
    let rs = render_with(Layout::Portals, &ports, &[]);
    assert_eq!(
        rs.v4.rules,
        vec![
            "-A KUBE-PORTALS-CONTAINER -m comment --comment \"service ports without endpoints\" -j EDGEPROXY-NO-ENDPOINTS",
            "-A KUBE-PORTALS-CONTAINER -d 10.96.100.10/32 -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:15001",
            "-A KUBE-PORTALS-HOST -m mark --mark 0x100000/0x100000 -m comment --comment \"proxy upstream connections pass\" -j RETURN",
            "-A KUBE-PORTALS-HOST -m comment --comment \"service ports without endpoints\" -j EDGEPROXY-NO-ENDPOINTS",
            "-A KUBE-PORTALS-HOST -d 10.96.100.10/32 -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:15001",
        ]
    );
    assert_eq!(rs.v4.chains, vec!["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", NO_ENDPOINTS_CHAIN]);
    assert!(rs.v6.is_empty());
    assert_eq!(rs.v4.jumps[0].spec, format!("-m comment --comment \"{PORTALS_COMMENT}\" -j KUBE-PORTALS-CONTAINER"));
    for c in &rs.v4.chains {
        assert!(crate::rules::OWN_CHAINS.contains(c), "{c} not in OWN_CHAINS");
    }
}

/// `listen.mark: 0` turns the own-traffic rule off in both layouts.
#[test]
fn mark_zero_renders_no_mark_rule() {
    let mut cfg = Config::defaults();
    cfg.listen.mark = 0;
    let ports = [port("a/b", "10.96.0.10", Protocol::Tcp, 80, 15001, true)];
    for layout in [Layout::Portals, Layout::RootChain] {
        let rs = render(&RenderInput {
            layout,
            listen: &cfg.listen,
            service_cidrs: &cfg.service_cidrs,
            ports: &ports,
            ignored: &[],
        });
        assert!(!rs.v4.rules.iter().any(|r| r.contains("-m mark")), "{layout:?}");
    }
}

#[test]
fn no_endpoints_goes_to_its_own_chain_and_v6() {
    let ports = [
        port("a/b", "fd00::10", Protocol::Udp, 53, 15002, false),
        port("a/c", "fd00::11", Protocol::Tcp, 80, 15001, true),
    ];
    let rs = render_with(Layout::Portals, &ports, &[]);
    // The IPv4 table is there (the jumps into the small one, the own-traffic rule) without ports.
    assert_eq!(rs.v4.rules.len(), 3);
    assert!(
        rs.v4.rules.iter().all(|r| r.ends_with("-j EDGEPROXY-NO-ENDPOINTS") || r.contains("-m mark")),
        "{:?}",
        rs.v4.rules
    );
    assert_eq!(
        rs.v6.rules,
        vec![
            "-A KUBE-PORTALS-CONTAINER -m comment --comment \"service ports without endpoints\" -j EDGEPROXY-NO-ENDPOINTS",
            "-A KUBE-PORTALS-CONTAINER -d fd00::10/128 -p udp -m comment --comment \"a/b\" -m udp --dport 53 -j DNAT --to-destination [fd00:e16e::16]:15002",
            "-A KUBE-PORTALS-CONTAINER -d fd00::11/128 -p tcp -m comment --comment \"a/c\" -m tcp --dport 80 -j DNAT --to-destination [fd00:e16e::16]:15001",
            "-A KUBE-PORTALS-HOST -m mark --mark 0x100000/0x100000 -m comment --comment \"proxy upstream connections pass\" -j RETURN",
            "-A KUBE-PORTALS-HOST -m comment --comment \"service ports without endpoints\" -j EDGEPROXY-NO-ENDPOINTS",
            "-A KUBE-PORTALS-HOST -d fd00::10/128 -p udp -m comment --comment \"a/b\" -m udp --dport 53 -j DNAT --to-destination [fd00:e16e::16]:15002",
            "-A KUBE-PORTALS-HOST -d fd00::11/128 -p tcp -m comment --comment \"a/c\" -m tcp --dport 80 -j DNAT --to-destination [fd00:e16e::16]:15001",
            "-A EDGEPROXY-NO-ENDPOINTS -d fd00::10/128 -p udp -m comment --comment \"a/b has no endpoints\" -m udp --dport 53 -j DNAT --to-destination [fd00:e16e::16]:15000",
        ]
    );
}

#[test]
fn an_endpoint_flip_changes_only_the_no_endpoints_chain() {
    let chain_of = |r: &str| r.split_whitespace().nth(1).unwrap().to_string();
    for layout in [Layout::Portals, Layout::RootChain] {
        let mut ports = vec![
            port("a/tcp", "10.96.0.10", Protocol::Tcp, 80, 15001, true),
            port("a/udp", "10.96.0.11", Protocol::Udp, 53, 15002, true),
        ];
        let before = render_with(layout, &ports, &[]).v4;
        ports[1].has_endpoints = false;
        let after = render_with(layout, &ports, &[]).v4;
        assert_eq!(before.chains, after.chains, "{layout:?}");
        assert_eq!(before.jumps, after.jumps, "{layout:?}");
        let only = |t: &TableRules, no: bool| -> Vec<String> {
            t.rules.iter().filter(|r| (chain_of(r) == NO_ENDPOINTS_CHAIN) == no).cloned().collect()
        };
        assert_eq!(only(&before, false), only(&after, false), "{layout:?}: a big chain changed");
        assert!(only(&before, true).is_empty());
        assert_eq!(
            only(&after, true),
            vec!["-A EDGEPROXY-NO-ENDPOINTS -d 10.96.0.11/32 -p udp -m comment --comment \"a/udp has no endpoints\" -m udp --dport 53 -j DNAT --to-destination 169.254.96.16:15000"],
            "{layout:?}"
        );
    }
}

#[test]
fn root_chain_returns_come_first_and_sorted() {
    let ports = [
        port("x/y", "10.96.0.20", Protocol::Tcp, 80, 15001, true),
        port("x/z", "10.96.0.21", Protocol::Tcp, 81, 15001, false),
    ];
    let ignored = [
        Ignored { key: ObjectKey::new("m", "z"), ips: vec!["10.96.0.9".parse().unwrap()] },
        Ignored {
            key: ObjectKey::new("a", "b"),
            ips: vec!["10.96.0.3".parse().unwrap(), "10.96.0.2".parse().unwrap()],
        },
    ];
    let rs = render_with(Layout::RootChain, &ports, &ignored);
    assert_eq!(
        rs.v4.rules,
        vec![
            "-A EDGE-MESH -m mark --mark 0x100000/0x100000 -m comment --comment \"proxy upstream connections pass\" -j RETURN",
            "-A EDGE-MESH -d 10.96.0.2/32 -m comment --comment \"ignore a/b service\" -j RETURN",
            "-A EDGE-MESH -d 10.96.0.3/32 -m comment --comment \"ignore a/b service\" -j RETURN",
            "-A EDGE-MESH -d 10.96.0.9/32 -m comment --comment \"ignore m/z service\" -j RETURN",
            "-A EDGE-MESH -d 10.96.0.0/12 -p tcp -m comment --comment \"tcp service proxy\" -j EDGE-MESH-TCP",
            "-A EDGE-MESH-TCP -m comment --comment \"service ports without endpoints\" -j EDGEPROXY-NO-ENDPOINTS",
            "-A EDGE-MESH-TCP -d 10.96.0.20/32 -p tcp -m comment --comment \"x/y\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:15001",
            "-A EDGE-MESH-TCP -d 10.96.0.21/32 -p tcp -m comment --comment \"x/z\" -m tcp --dport 81 -j DNAT --to-destination 169.254.96.16:15001",
            "-A EDGEPROXY-NO-ENDPOINTS -d 10.96.0.21/32 -p tcp -m comment --comment \"x/z has no endpoints\" -m tcp --dport 81 -j DNAT --to-destination 169.254.96.16:15000",
        ]
    );
    assert_eq!(rs.v4.chains, vec!["EDGE-MESH", "EDGE-MESH-TCP", NO_ENDPOINTS_CHAIN]);
}

fn kernel_port(name: &str, ip: &str, protocol: Protocol, number: u16, endpoints: &[&str]) -> PlannedPort {
    let endpoints: Vec<SocketAddr> = endpoints.iter().map(|e| e.parse().unwrap()).collect();
    PlannedPort {
        has_endpoints: !endpoints.is_empty(),
        kernel: Some(KernelRoute { endpoints, affinity: None }),
        ..port(name, ip, protocol, number, 0, true)
    }
}

/// The kernel chain is jumped to right after the no-endpoints chain, only where kernel-path
/// ports of that protocol exist, and kernel-path ports get no DNAT to the proxy.
#[test]
fn kernel_path_ports_go_to_their_own_chain_in_both_layouts() {
    let ports = [
        port("x/p", "10.96.0.20", Protocol::Tcp, 80, 15001, true),
        kernel_port("x/k", "10.96.0.21", Protocol::Tcp, 80, &["192.0.2.1:8080", "192.0.2.2:8080", "192.0.2.3:8080"]),
        kernel_port("x/u", "10.96.0.22", Protocol::Udp, 53, &[]),
    ];
    let rs = render_with(Layout::RootChain, &ports, &[]);
    let r = &rs.v4.rules;
    let pos = |s: &str| r.iter().position(|l| l == s).unwrap_or_else(|| panic!("{s} not in {r:#?}"));
    assert_eq!(
        pos("-A EDGE-MESH-TCP -m comment --comment \"kernel path service ports\" -j EDGEPROXY-KERNEL"),
        pos("-A EDGE-MESH-TCP -m comment --comment \"service ports without endpoints\" -j EDGEPROXY-NO-ENDPOINTS") + 1
    );
    assert!(!r.iter().any(|l| l.starts_with("-A EDGE-MESH-UDP") && l.contains("EDGEPROXY-KERNEL")), "{r:#?}");
    assert!(!r.iter().any(|l| l.contains("x/k") && l.contains("169.254.96.16")), "{r:#?}");
    assert!(r.iter().any(|l| l.starts_with("-A EDGEPROXY-NO-ENDPOINTS") && l.contains("x/u")), "{r:#?}");
    let k: Vec<&String> = r.iter().filter(|l| l.starts_with("-A EDGEPROXY-KERNEL")).collect();
    assert_eq!(k.len(), 3);
    assert!(k[0].contains("--probability 0.33333333349"), "{k:?}");
    assert!(k[1].contains("--probability 0.50000000000"), "{k:?}");
    assert_eq!(rs.v4.chains.last(), Some(&KERNEL_CHAIN));
    // `check` reads the same rules back.
    let save: String = r.iter().map(|l| format!("{l}\n")).collect();
    assert_eq!(
        crate::rules::check::kernel_path_lines(&save),
        ["kernel path: x/k on 10.96.0.21/32 -> 192.0.2.1:8080 192.0.2.2:8080 192.0.2.3:8080"]
    );
    let portals = render_with(Layout::Portals, &ports, &[]).v4;
    assert_eq!(portals.rules.iter().filter(|l| l.ends_with("-j EDGEPROXY-KERNEL")).count(), 2);
    // Without kernel-path ports nothing of it is rendered.
    let plain = render_with(Layout::Portals, &ports[..1], &[]).v4;
    assert!(!plain.chains.contains(&KERNEL_CHAIN) && !plain.rules.iter().any(|l| l.contains("KERNEL")));
}
