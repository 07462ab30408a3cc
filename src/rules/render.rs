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
//! original destination back with SO_ORIGINAL_DST), the service port's own UDP socket for UDP,
//! and for a service port with no usable endpoint the reject port, where nothing listens, so
//! the kernel refuses the connection at once.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::{Family, Jump, RuleSet, TableRules};
use crate::config::ListenConfig;
use crate::model::{ObjectKey, Protocol};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Portals,
    RootChain,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "portals" => Some(Layout::Portals),
            "root-chain" => Some(Layout::RootChain),
            _ => None,
        }
    }
}

pub const PORTALS_COMMENT: &str = "handle ClusterIPs; NOTE: this must be before the NodePort rules";
pub const ROOT_COMMENT: &str = "edgemesh root chain";

/// Where one proxied service port on one cluster IP goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The proxy's port: the TCP listener, or this service port's UDP socket.
    Proxy(u16),
    /// No usable endpoint: the reject port.
    Reject,
}

/// One DNAT: a proxied service port on one of its cluster IPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPort {
    /// `namespace/name[:portName]`.
    pub comment: String,
    pub cluster_ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub target: Target,
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
    RuleSet { v4: render_family(input, Family::V4), v6: render_family(input, Family::V6) }
}

fn family_of(ip: &IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// One DNAT rule in EdgeMesh's argument order (`iptablesCommonPortalArgs` as iptables-save
/// prints it).
fn dnat_rule(out: &mut String, chain: &str, p: &PlannedPort, listen: &ListenConfig) {
    let proto = p.protocol.as_str();
    let (port, comment_suffix) = match p.target {
        Target::Proxy(port) => (port, ""),
        Target::Reject => (listen.reject_port, " has no endpoints"),
    };
    let to = match p.cluster_ip {
        IpAddr::V4(_) => format!("{}:{port}", listen.ip),
        IpAddr::V6(_) => format!("[{}]:{port}", listen.ipv6),
    };
    let _ = write!(
        out,
        "-A {chain} -d {} -p {proto} -m comment --comment \"{}{comment_suffix}\" -m {proto} --dport {} -j DNAT --to-destination {to}",
        host_prefix(&p.cluster_ip),
        p.comment,
        p.port,
    );
}

fn render_family(input: &RenderInput<'_>, family: Family) -> TableRules {
    let ports: Vec<&PlannedPort> = input.ports.iter().filter(|p| family_of(&p.cluster_ip) == family).collect();
    match input.layout {
        Layout::Portals => portals(input, &ports, family),
        Layout::RootChain => root_chain(input, &ports, family),
    }
}

fn portals(input: &RenderInput<'_>, ports: &[&PlannedPort], family: Family) -> TableRules {
    // An IPv6 table exists only when there is something to put in it.
    if family == Family::V6 && ports.is_empty() {
        return TableRules::default();
    }
    let mut rules = Vec::with_capacity(ports.len() * 2);
    for chain in ["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"] {
        for p in ports {
            let mut line = String::with_capacity(192);
            dnat_rule(&mut line, chain, p, input.listen);
            rules.push(line);
        }
    }
    let spec = |target: &str| format!("-m comment --comment \"{PORTALS_COMMENT}\" -j {target}");
    TableRules {
        chains: vec!["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"],
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

    let mut rules = Vec::with_capacity(returns.len() + ports.len() + 2);
    for (ip, key) in &returns {
        rules.push(format!(
            "-A EDGE-MESH -d {} -m comment --comment \"ignore {key} service\" -j RETURN",
            host_prefix(ip)
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
    for d in &cidrs {
        rules.push(format!("-A EDGE-MESH {d}-p tcp -m comment --comment \"tcp service proxy\" -j EDGE-MESH-TCP"));
        if has_udp {
            rules.push(format!("-A EDGE-MESH {d}-p udp -m comment --comment \"udp service proxy\" -j EDGE-MESH-UDP"));
        }
    }
    // Grouped by chain, as iptables-save would list them.
    for (chain, proto) in [("EDGE-MESH-TCP", Protocol::Tcp), ("EDGE-MESH-UDP", Protocol::Udp)] {
        for p in ports.iter().filter(|p| p.protocol == proto) {
            let mut line = String::with_capacity(192);
            dnat_rule(&mut line, chain, p, input.listen);
            rules.push(line);
        }
    }
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

    fn port(comment: &str, ip: &str, protocol: Protocol, port: u16, target: Target) -> PlannedPort {
        PlannedPort { comment: comment.into(), cluster_ip: ip.parse().unwrap(), protocol, port, target }
    }

    #[test]
    fn portals_dnat_has_edgemesh_shape() {
        let cfg = Config::defaults();
        let ports = [port("default/nginx:http", "10.96.100.10", Protocol::Tcp, 80, Target::Proxy(15001))];
        let rs = render(&RenderInput {
            layout: Layout::Portals,
            listen: &cfg.listen,
            service_cidrs: &cfg.service_cidrs,
            ports: &ports,
            ignored: &[],
        });
        assert_eq!(
            rs.v4.rules[0],
            "-A KUBE-PORTALS-CONTAINER -d 10.96.100.10/32 -p tcp -m comment --comment \"default/nginx:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:15001"
        );
        assert_eq!(rs.v4.rules.len(), 2);
        assert!(rs.v6.is_empty());
        assert_eq!(
            rs.v4.jumps[0].spec,
            format!("-m comment --comment \"{PORTALS_COMMENT}\" -j KUBE-PORTALS-CONTAINER")
        );
    }

    #[test]
    fn reject_and_v6() {
        let cfg = Config::defaults();
        let ports = [port("a/b", "fd00::10", Protocol::Udp, 53, Target::Reject)];
        let rs = render(&RenderInput {
            layout: Layout::Portals,
            listen: &cfg.listen,
            service_cidrs: &cfg.service_cidrs,
            ports: &ports,
            ignored: &[],
        });
        assert!(rs.v4.rules.is_empty());
        assert_eq!(
            rs.v6.rules[1],
            "-A KUBE-PORTALS-HOST -d fd00::10/128 -p udp -m comment --comment \"a/b has no endpoints\" -m udp --dport 53 -j DNAT --to-destination [fd00:e16e::16]:15000"
        );
    }

    #[test]
    fn root_chain_returns_come_first_and_sorted() {
        let cfg = Config::defaults();
        let ports = [port("x/y", "10.96.0.20", Protocol::Tcp, 80, Target::Proxy(15001))];
        let ignored = [
            Ignored { key: ObjectKey::new("m", "z"), ips: vec!["10.96.0.9".parse().unwrap()] },
            Ignored {
                key: ObjectKey::new("a", "b"),
                ips: vec!["10.96.0.3".parse().unwrap(), "10.96.0.2".parse().unwrap()],
            },
        ];
        let rs = render(&RenderInput {
            layout: Layout::RootChain,
            listen: &cfg.listen,
            service_cidrs: &cfg.service_cidrs,
            ports: &ports,
            ignored: &ignored,
        });
        assert_eq!(
            rs.v4.rules,
            vec![
                "-A EDGE-MESH -d 10.96.0.2/32 -m comment --comment \"ignore a/b service\" -j RETURN",
                "-A EDGE-MESH -d 10.96.0.3/32 -m comment --comment \"ignore a/b service\" -j RETURN",
                "-A EDGE-MESH -d 10.96.0.9/32 -m comment --comment \"ignore m/z service\" -j RETURN",
                "-A EDGE-MESH -d 10.96.0.0/12 -p tcp -m comment --comment \"tcp service proxy\" -j EDGE-MESH-TCP",
                "-A EDGE-MESH-TCP -d 10.96.0.20/32 -p tcp -m comment --comment \"x/y\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:15001",
            ]
        );
        assert_eq!(rs.v4.chains, vec!["EDGE-MESH", "EDGE-MESH-TCP"]);
    }
}
