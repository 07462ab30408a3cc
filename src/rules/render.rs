//! Rule layouts -> `iptables-restore` text. Pure and deterministic: the same plan always renders
//! the same bytes, which is what lets `apply` skip a restore when nothing changed.
//!
//! Two EdgeMesh-compatible layouts:
//! - `portals` (EdgeMesh v1.12+): `KUBE-PORTALS-CONTAINER` (from PREROUTING) and
//!   `KUBE-PORTALS-HOST` (from OUTPUT), one DNAT per proxied service port and cluster IP.
//! - `root-chain` (EdgeMesh v1.8/v1.9): `EDGE-MESH` with a RETURN per ignored service, then a
//!   jump per protocol for the service CIDR into `EDGE-MESH-TCP` / `EDGE-MESH-UDP`, which hold
//!   the DNATs.
//!
//! Every DNAT points at the proxy's address: the one TCP listener for TCP (the proxy reads the
//! original destination back with SO_ORIGINAL_DST), the service port's own UDP socket for UDP.
//! A service port with no usable endpoint additionally gets a DNAT to the reject port, where
//! nothing listens, so the kernel refuses the connection at once. Those reject DNATs live in a
//! small chain of our own, `EDGEPROXY-NO-ENDPOINTS`, jumped to from the first rule of every
//! chain that holds DNATs (`KUBE-PORTALS-CONTAINER`/`-HOST`; `EDGE-MESH-TCP`/`-UDP`), so it is
//! matched first. The big chains then depend only on services and ports, never on endpoints:
//! a service port losing or regaining its last endpoint changes only the small chain, and
//! `apply` rewrites only chains whose content changed.
//!
//! In the root-chain layout the jump sits at the top of `EDGE-MESH-TCP` and `EDGE-MESH-UDP`
//! rather than once in `EDGE-MESH`: that way the reject DNATs see exactly the packets the
//! proxy DNATs see (service CIDR, right protocol, ignored services already returned), and
//! `EDGE-MESH` keeps EdgeMesh v1.9's exact shape (RETURNs, then one jump per protocol).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{Family, Jump, NftRules, NftTarget, RuleSet, TableRules, NO_ENDPOINTS_CHAIN};
use crate::listen::{host_prefix, ListenConfig};
use crate::model::{ObjectKey, Protocol, ServicePortName};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Portals,
    RootChain,
    /// Native nftables tables at priority `dstnat - 1` (`rules::nftables`).
    Nftables,
}

pub const PORTALS_COMMENT: &str = "handle ClusterIPs; NOTE: this must be before the NodePort rules";
pub const ROOT_COMMENT: &str = "edgemesh root chain";

/// Comment of the jump into [`NO_ENDPOINTS_CHAIN`].
pub const NO_ENDPOINTS_COMMENT: &str = "service ports without endpoints";

/// One proxied service port on one of its cluster IPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPort {
    pub name: ServicePortName,
    pub cluster_ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// The proxy's port: the TCP listener, or this service port's UDP socket.
    pub proxy_port: u16,
    /// `false`: no usable endpoint, so a DNAT to the reject port in [`NO_ENDPOINTS_CHAIN`]
    /// comes first.
    pub has_endpoints: bool,
}

/// An ignored service and the addresses its RETURN rules match (root-chain layout only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
}

/// Everything the renderer needs.
pub struct RenderInput<'a> {
    pub layout: Layout,
    pub listen: &'a ListenConfig,
    pub service_cidrs: &'a [(IpAddr, u8)],
    pub ports: &'a [PlannedPort],
    pub ignored: &'a [Ignored],
}

pub fn render(input: &RenderInput<'_>) -> RuleSet {
    if input.layout == Layout::Nftables {
        return RuleSet { nft: Some(render_nftables(input.ports, input.listen)), ..RuleSet::default() };
    }
    RuleSet { v4: render_family(input, Family::V4), v6: render_family(input, Family::V6), nft: None }
}

fn family_of(ip: &IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The longest comment text we write from object names; iptables keeps at most 255 bytes, and the
/// suffixes we add (" has no endpoints", "ignore ... service") fit in what is left.
const MAX_COMMENT_NAME: usize = 200;

/// Text from objects as it may stand inside a quoted iptables comment. Decoding already refuses
/// names that Kubernetes would refuse, so this changes nothing for valid input; it is the
/// renderer's own guarantee, whatever the source: every character outside `[A-Za-z0-9._:/-]`
/// becomes `_` (no quote can end the comment, no backslash escape it, no newline start a rule
/// or a table), and the text is cut to [`MAX_COMMENT_NAME`] bytes.
pub fn comment_text(s: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-');
    if s.len() <= MAX_COMMENT_NAME && s.chars().all(safe) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if safe(c) { c } else { '_' }).take(MAX_COMMENT_NAME).collect())
}

/// The planned ports as map elements: to the proxy's port, or to the reject port without
/// endpoints.
pub fn render_nftables(ports: &[PlannedPort], listen: &ListenConfig) -> NftRules {
    let mut r = NftRules { mark: listen.mark, ..NftRules::default() };
    for p in ports {
        let v6 = p.cluster_ip.is_ipv6();
        let port = if p.has_endpoints { p.proxy_port } else { listen.reject_port };
        let target = NftTarget { addr: listen.ip_for(v6), port, name: p.name.to_string() };
        let table = if v6 { &mut r.v6 } else { &mut r.v4 };
        table.elements.insert((p.cluster_ip, p.protocol, p.port), target);
    }
    r
}

/// One DNAT rule in EdgeMesh's argument order (`iptablesCommonPortalArgs` as iptables-save
/// prints it): to the proxy, or (`reject`) to the reject port.
fn dnat_rule(chain: &str, p: &PlannedPort, listen: &ListenConfig, reject: bool) -> String {
    let mut out = String::with_capacity(192);
    let proto = p.protocol.as_str();
    let (port, comment_suffix) = if reject { (listen.reject_port, " has no endpoints") } else { (p.proxy_port, "") };
    let to = match p.cluster_ip {
        IpAddr::V4(_) => format!("{}:{port}", listen.ip),
        IpAddr::V6(_) => format!("[{}]:{port}", listen.ipv6),
    };
    let _ = write!(
        out,
        "-A {chain} -d {} -p {proto} -m comment --comment \"{}{comment_suffix}\" -m {proto} --dport {} -j DNAT --to-destination {to}",
        host_prefix(&p.cluster_ip),
        comment_text(&p.name),
        p.port,
    );
    out
}

/// Comment of the rule that lets the proxy's own (marked) upstream packets pass.
pub const OWN_TRAFFIC_COMMENT: &str = "proxy upstream connections pass";

/// The first rule of the chain the node's own traffic enters (`-j` from OUTPUT): packets of the
/// proxy's upstream sockets carry `mark` and leave our chains untouched, so whatever the table
/// says, the proxy never dials itself. None when the mark is off.
fn own_traffic_rule(chain: &str, mark: u32) -> Option<String> {
    (mark != 0).then(|| {
        format!(
            "-A {chain} -m mark --mark {mark:#x}/{mark:#x} -m comment --comment \"{OWN_TRAFFIC_COMMENT}\" -j RETURN"
        )
    })
}

/// The first rule of a chain holding DNATs: into [`NO_ENDPOINTS_CHAIN`].
fn no_endpoints_jump(chain: &str) -> String {
    format!("-A {chain} -m comment --comment \"{NO_ENDPOINTS_COMMENT}\" -j {NO_ENDPOINTS_CHAIN}")
}

/// The reject DNATs of the ports without endpoints, in port order.
fn no_endpoints_rules<'a>(ports: &'a [&PlannedPort], listen: &'a ListenConfig) -> impl Iterator<Item = String> + 'a {
    ports.iter().filter(|p| !p.has_endpoints).map(move |p| dnat_rule(NO_ENDPOINTS_CHAIN, p, listen, true))
}

fn render_family(input: &RenderInput<'_>, family: Family) -> TableRules {
    let ports: Vec<&PlannedPort> = input.ports.iter().filter(|p| family_of(&p.cluster_ip) == family).collect();
    match input.layout {
        Layout::Portals => portals(input, &ports, family),
        Layout::RootChain => root_chain(input, &ports, family),
        Layout::Nftables => TableRules::default(),
    }
}

fn portals(input: &RenderInput<'_>, ports: &[&PlannedPort], family: Family) -> TableRules {
    // An IPv6 table exists only when there is something to put in it.
    if family == Family::V6 && ports.is_empty() {
        return TableRules::default();
    }
    let mut rules = Vec::with_capacity(ports.len() * 2 + 2);
    for chain in ["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"] {
        if chain == "KUBE-PORTALS-HOST" {
            rules.extend(own_traffic_rule(chain, input.listen.mark));
        }
        rules.push(no_endpoints_jump(chain));
        rules.extend(ports.iter().map(|p| dnat_rule(chain, p, input.listen, false)));
    }
    rules.extend(no_endpoints_rules(ports, input.listen));
    let spec = |target: &str| format!("-m comment --comment \"{PORTALS_COMMENT}\" -j {target}");
    TableRules {
        chains: vec!["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", NO_ENDPOINTS_CHAIN],
        rules,
        jumps: vec![
            Jump { from: "PREROUTING", target: "KUBE-PORTALS-CONTAINER", spec: spec("KUBE-PORTALS-CONTAINER") },
            Jump { from: "OUTPUT", target: "KUBE-PORTALS-HOST", spec: spec("KUBE-PORTALS-HOST") },
        ],
    }
}

fn root_chain(input: &RenderInput<'_>, ports: &[&PlannedPort], family: Family) -> TableRules {
    let mut returns: Vec<(IpAddr, &ObjectKey)> = Vec::new();
    for ign in input.ignored {
        for ip in ign.ips.iter().filter(|ip| family_of(ip) == family) {
            returns.push((*ip, &ign.key));
        }
    }
    if family == Family::V6 && ports.is_empty() && returns.is_empty() {
        return TableRules::default();
    }
    // Stable order: by service, then address (EdgeMesh's own order was map order, i.e. random).
    returns.sort_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(&b.0)));
    returns.dedup();

    let mut rules = Vec::with_capacity(returns.len() + ports.len() + 3);
    // Both PREROUTING and OUTPUT enter EDGE-MESH; only local sockets carry the mark.
    rules.extend(own_traffic_rule("EDGE-MESH", input.listen.mark));
    for (ip, key) in &returns {
        rules.push(format!(
            "-A EDGE-MESH -d {} -m comment --comment \"ignore {} service\" -j RETURN",
            host_prefix(ip),
            comment_text(&key.to_string()),
        ));
    }
    let cidrs: Vec<String> = input
        .service_cidrs
        .iter()
        .filter(|(ip, _)| family_of(ip) == family)
        .map(|(ip, len)| format!("-d {ip}/{len} "))
        .collect();
    // Without a configured CIDR of this family the catch rule matches every destination; the
    // per-port DNATs inside still decide, so that only costs rule evaluations.
    let cidrs = if cidrs.is_empty() { vec![String::new()] } else { cidrs };
    let mut chains = vec!["EDGE-MESH", "EDGE-MESH-TCP"];
    let has_udp = ports.iter().any(|p| p.protocol == Protocol::Udp);
    if has_udp {
        chains.push("EDGE-MESH-UDP");
    }
    chains.push(NO_ENDPOINTS_CHAIN);
    for d in &cidrs {
        rules.push(format!("-A EDGE-MESH {d}-p tcp -m comment --comment \"tcp service proxy\" -j EDGE-MESH-TCP"));
        if has_udp {
            rules.push(format!("-A EDGE-MESH {d}-p udp -m comment --comment \"udp service proxy\" -j EDGE-MESH-UDP"));
        }
    }
    // Grouped by chain, as iptables-save would list them.
    for (chain, proto) in [("EDGE-MESH-TCP", Protocol::Tcp), ("EDGE-MESH-UDP", Protocol::Udp)] {
        if proto == Protocol::Udp && !has_udp {
            continue;
        }
        rules.push(no_endpoints_jump(chain));
        rules.extend(ports.iter().filter(|p| p.protocol == proto).map(|p| dnat_rule(chain, p, input.listen, false)));
    }
    rules.extend(no_endpoints_rules(ports, input.listen));
    let spec = format!("-m comment --comment \"{ROOT_COMMENT}\" -j EDGE-MESH");
    TableRules {
        chains,
        rules,
        jumps: vec![
            Jump { from: "PREROUTING", target: "EDGE-MESH", spec: spec.clone() },
            Jump { from: "OUTPUT", target: "EDGE-MESH", spec },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn port(
        comment: &str,
        ip: &str,
        protocol: Protocol,
        port: u16,
        proxy_port: u16,
        has_endpoints: bool,
    ) -> PlannedPort {
        PlannedPort { name: comment.into(), cluster_ip: ip.parse().unwrap(), protocol, port, proxy_port, has_endpoints }
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
        assert_eq!(
            rs.v4.jumps[0].spec,
            format!("-m comment --comment \"{PORTALS_COMMENT}\" -j KUBE-PORTALS-CONTAINER")
        );
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
}
