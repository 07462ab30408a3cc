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
use std::net::{IpAddr, SocketAddr};

use super::{Family, Jump, NftKernel, NftRules, NftTarget, RuleSet, TableRules, KERNEL_CHAIN, NO_ENDPOINTS_CHAIN};
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
    /// `Some`: the kernel path (`dataPath: kernel`): no DNAT to the proxy, but straight to an
    /// endpoint ([`KERNEL_CHAIN`]; `proxy_port` unused).
    pub kernel: Option<KernelRoute>,
}

#[cfg(test)]
impl PlannedPort {
    /// A proxy-path port (the renderers' tests).
    pub fn proxied(name: &str, ip: &str, protocol: Protocol, port: u16, proxy_port: u16, has_endpoints: bool) -> Self {
        let cluster_ip = ip.parse().expect("a test address");
        PlannedPort { name: name.into(), cluster_ip, protocol, port, proxy_port, has_endpoints, kernel: None }
    }
}

/// Where a kernel-path service port on one ClusterIP goes: one of `endpoints` (of the
/// ClusterIP's family) at random, or for `affinity` seconds the one a client had last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    pub endpoints: Vec<SocketAddr>,
    pub affinity: Option<u32>,
}

/// Comment of the jump into [`KERNEL_CHAIN`].
pub const KERNEL_COMMENT: &str = "kernel path service ports";

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
        let table = if v6 { &mut r.v6 } else { &mut r.v4 };
        let key = (p.cluster_ip, p.protocol, p.port);
        if let (Some(k), true) = (&p.kernel, p.has_endpoints) {
            let name = p.name.to_string();
            table.kernel.push(NftKernel { key, name, endpoints: k.endpoints.clone(), affinity: k.affinity });
            continue;
        }
        let port = if p.has_endpoints { p.proxy_port } else { listen.reject_port };
        let target = NftTarget { addr: listen.ip_for(v6), port, name: p.name.to_string() };
        table.elements.insert(key, target);
    }
    r
}

/// A short stable name for one endpoint of one kernel-path service port on one ClusterIP
/// (FNV-1a, 64 bits, in hex): the `recent` list of its ClientIP affinity, the nftables chain
/// and set names. Names from objects never reach the kernel's name space this way.
pub fn endpoint_id(name: &str, cluster_ip: IpAddr, endpoint: SocketAddr) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{name}|{cluster_ip}|{endpoint}");
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// `--probability` as `iptables-save` prints it back: the kernel keeps `p x 2^31` as an
/// integer, and the listing shows that with 11 decimals. Rendering the same text lets the guard
/// compare a listing with the set.
fn probability(one_in: usize) -> String {
    let n = f64::from(u32::try_from(one_in).unwrap_or(u32::MAX));
    let fixed = (2_147_483_648.0 / n).round();
    format!("{:.11}", fixed / 2_147_483_648.0)
}

/// The DNATs of one kernel-path port straight to its endpoints, as kube-proxy spreads them:
/// endpoint i of n taken with probability 1/(n-i), the last always; with ClientIP affinity, a
/// client seen within the timeout goes to its endpoint again first (`recent`, per endpoint).
fn kernel_rules(p: &PlannedPort, route: &KernelRoute, out: &mut Vec<String>) {
    let proto = p.protocol.as_str();
    let base = format!(
        "-A {KERNEL_CHAIN} -d {} -p {proto} -m comment --comment \"{}\" -m {proto} --dport {}",
        host_prefix(&p.cluster_ip),
        comment_text(&p.name),
        p.port
    );
    let mask = match p.cluster_ip {
        IpAddr::V4(_) => "255.255.255.255",
        IpAddr::V6(_) => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    };
    let recent =
        |ep: &SocketAddr| format!("--name EPK-{} --mask {mask} --rsource", endpoint_id(&p.name, p.cluster_ip, *ep));
    if let Some(t) = route.affinity {
        for ep in &route.endpoints {
            out.push(format!(
                "{base} -m recent --update --seconds {t} --reap {} -j DNAT --to-destination {ep}",
                recent(ep)
            ));
        }
    }
    let n = route.endpoints.len();
    for (i, ep) in route.endpoints.iter().enumerate() {
        let mut line = base.clone();
        if i + 1 < n {
            let _ = write!(line, " -m statistic --mode random --probability {}", probability(n - i));
        }
        if route.affinity.is_some() {
            let _ = write!(line, " -m recent --set {}", recent(ep));
        }
        let _ = write!(line, " -j DNAT --to-destination {ep}");
        out.push(line);
    }
}

/// [`KERNEL_CHAIN`]'s rules for `ports` (kernel-path ports with endpoints).
fn kernel_chain(ports: &[&PlannedPort]) -> Vec<String> {
    let mut out = Vec::new();
    for p in ports {
        if let (Some(route), true) = (&p.kernel, p.has_endpoints) {
            kernel_rules(p, route, &mut out);
        }
    }
    out
}

/// The jump into [`KERNEL_CHAIN`], right after the one into [`NO_ENDPOINTS_CHAIN`].
fn kernel_jump(chain: &str) -> String {
    format!("-A {chain} -m comment --comment \"{KERNEL_COMMENT}\" -j {KERNEL_CHAIN}")
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
    let kernel = kernel_chain(ports);
    let mut rules = Vec::with_capacity(ports.len() * 2 + 2 + kernel.len());
    for chain in ["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"] {
        if chain == "KUBE-PORTALS-HOST" {
            rules.extend(own_traffic_rule(chain, input.listen.mark));
        }
        rules.push(no_endpoints_jump(chain));
        if !kernel.is_empty() {
            rules.push(kernel_jump(chain));
        }
        rules.extend(ports.iter().filter(|p| p.kernel.is_none()).map(|p| dnat_rule(chain, p, input.listen, false)));
    }
    rules.extend(no_endpoints_rules(ports, input.listen));
    let mut chains = vec!["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", NO_ENDPOINTS_CHAIN];
    if !kernel.is_empty() {
        chains.push(KERNEL_CHAIN);
        rules.extend(kernel);
    }
    let spec = |target: &str| format!("-m comment --comment \"{PORTALS_COMMENT}\" -j {target}");
    TableRules {
        chains,
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
    let kernel = kernel_chain(ports);
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
        if ports.iter().any(|p| p.protocol == proto && p.kernel.is_some() && p.has_endpoints) {
            rules.push(kernel_jump(chain));
        }
        rules.extend(
            ports
                .iter()
                .filter(|p| p.protocol == proto && p.kernel.is_none())
                .map(|p| dnat_rule(chain, p, input.listen, false)),
        );
    }
    rules.extend(no_endpoints_rules(ports, input.listen));
    if !kernel.is_empty() {
        chains.push(KERNEL_CHAIN);
        rules.extend(kernel);
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
#[path = "render/tests.rs"]
mod tests;
