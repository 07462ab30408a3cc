//! The state machine: what the cluster holds (last known good), and what that means for the
//! kernel (a [`RuleSet`]) and for the proxy (a [`ProxyTable`]).
//!
//! Pure: no I/O, no clock, no randomness. Sources feed it [`Change`]s; `plan` derives everything
//! else. Only explicit deletes and replacements remove objects: a failed list or a broken watch
//! simply sends nothing, so the held state (and with it the installed rules) stays as it was.
//!
//! Memory: it holds the whole cluster for hours, so on insert it interns the strings that recur
//! across objects (namespaces, node names, zones, port names) in a map it owns, and points an
//! endpoint set's service key at the Service's own name when that Service is held. Interning
//! changes no value, only which allocation holds it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::filter::{self, FilterConfig, Verdict};
use crate::intern::Interner;
use crate::listen::ListenConfig;
use crate::model::{
    DataPath, EndpointSet, EndpointSource, Kind, Object, ObjectKey, Protocol, Service, ServicePort, ServicePortName,
    Snapshot,
};
use crate::proxy::table::{LbPolicy, ProxyTable, ServiceEntry, Upstream};
use crate::rules::render::{self, Ignored, Layout, PlannedPort, RenderInput};

/// The parts of [`Config`] the state machine needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateConfig {
    pub filter: FilterConfig,
    pub layout: Layout,
    pub listen: ListenConfig,
    pub service_cidrs: Vec<(IpAddr, u8)>,
    pub node_name: Option<String>,
    pub lb_policy: LbPolicy,
    /// The path of proxied services without their own annotation.
    pub data_path: DataPath,
}

/// An input to the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// ADDED or MODIFIED.
    Upsert(Object),
    /// A real DELETED event.
    Delete(Kind, ObjectKey),
    /// A complete list of one kind (a relist, a poll, a file reload): objects of that kind not in
    /// it are removed, the others replaced.
    Replace(Kind, Vec<Object>),
    /// A list of one kind that could not be decoded whole: objects of that kind whose keys are
    /// not here are removed, the others stay as they are (what did decode arrives as upserts).
    Retain(Kind, Vec<ObjectKey>),
    /// Whether kube-proxy's chains exist on this node (feeds `defaultIgnores: auto`).
    KubeProxy(bool),
    /// The proxy could not bind this UDP port; allocate another.
    UdpPortUnavailable(u16),
    /// Every endpoint the proxy's health check holds set aside now (its probes or failed
    /// dials): kernel-path rules leave them out.
    SetAside(Vec<(ServicePortName, SocketAddr)>),
}

mod kernel;
mod report;
pub use report::{Plan, PortReport, ServiceReport};

type UdpKey = (ObjectKey, u16);

/// What pass 1 of a plan found: the reports, the ignored services (root-chain layout), the UDP
/// service ports wanted, and per proxied port (report index, port index) its upstreams.
struct Judged {
    reports: Vec<ServiceReport>,
    ignored: Vec<Ignored>,
    wanted_udp: Vec<UdpKey>,
    resolved: Vec<(usize, usize, Vec<Upstream>)>,
}

/// Share a Service's recurring strings.
fn share_service(strings: &mut Interner, svc: &mut Service) {
    strings.share(&mut svc.key.namespace);
    for p in &mut svc.ports {
        strings.share(&mut p.name);
    }
}

/// `services`: the held Services, whose names the set's service key may share.
fn share_endpoints(strings: &mut Interner, set: &mut EndpointSet, services: &BTreeMap<ObjectKey, Service>) {
    strings.share(&mut set.key.namespace);
    if set.service.namespace == set.key.namespace {
        set.service.namespace = set.key.namespace.clone();
    } else {
        strings.share(&mut set.service.namespace);
    }
    if let Some((held, _)) = services.get_key_value(&set.service) {
        set.service.name = held.name.clone();
    }
    for g in &mut set.groups {
        for p in &mut g.ports {
            strings.share(&mut p.name);
        }
        for e in &mut g.endpoints {
            strings.share_opt(&mut e.node_name);
            strings.share_opt(&mut e.zone);
        }
    }
}

pub struct State {
    cfg: StateConfig,
    snapshot: Snapshot,
    kube_proxy: bool,
    /// Sticky UDP proxy port per (service, service port number).
    udp_ports: BTreeMap<UdpKey, u16>,
    /// Ports the proxy reported it cannot bind.
    unusable_udp: BTreeSet<u16>,
    /// Endpoints the proxy's health check holds set aside (kernel-path rules leave them out).
    set_aside: BTreeSet<(ServicePortName, SocketAddr)>,
    strings: Interner,
}

impl State {
    pub fn new(cfg: StateConfig) -> State {
        State {
            cfg,
            snapshot: Snapshot::default(),
            kube_proxy: false,
            udp_ports: BTreeMap::new(),
            unusable_udp: BTreeSet::new(),
            set_aside: BTreeSet::new(),
            strings: Interner::default(),
        }
    }

    /// New settings (a reload); returns whether they differ. The next plan uses them.
    pub fn set_config(&mut self, cfg: StateConfig) -> bool {
        let changed = cfg != self.cfg;
        self.cfg = cfg;
        changed
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn kube_proxy(&self) -> bool {
        self.kube_proxy
    }

    /// Apply one change; returns whether anything the plan depends on changed.
    pub fn apply(&mut self, change: Change) -> bool {
        let changed = self.apply_inner(change);
        self.strings.prune();
        changed
    }

    fn apply_inner(&mut self, change: Change) -> bool {
        match change {
            Change::Upsert(Object::Service(mut s)) => match self.snapshot.services.get(&s.key) {
                Some(old) if *old == s => false,
                _ => {
                    share_service(&mut self.strings, &mut s);
                    self.snapshot.services.insert(s.key.clone(), s);
                    true
                }
            },
            Change::Upsert(Object::Endpoints(mut e)) => {
                let k = (e.source, e.key.clone());
                match self.snapshot.endpoints.get(&k) {
                    Some(old) if *old == e => false,
                    _ => {
                        share_endpoints(&mut self.strings, &mut e, &self.snapshot.services);
                        self.snapshot.endpoints.insert((e.source, e.key.clone()), e);
                        true
                    }
                }
            }
            Change::Delete(Kind::Service, key) => self.snapshot.services.remove(&key).is_some(),
            Change::Delete(kind, key) => self.snapshot.endpoints.remove(&(source_of(kind), key)).is_some(),
            Change::Replace(Kind::Service, objects) => {
                // `collect` sorts and then fills every B-tree node; inserting one by one would
                // leave sorted input in half-empty nodes.
                let strings = &mut self.strings;
                let new: BTreeMap<ObjectKey, Service> = objects
                    .into_iter()
                    .filter_map(|o| match o {
                        Object::Service(mut s) => {
                            share_service(strings, &mut s);
                            Some((s.key.clone(), s))
                        }
                        Object::Endpoints(_) => None,
                    })
                    .collect();
                let changed = new != self.snapshot.services;
                self.snapshot.services = new;
                changed
            }
            Change::Replace(kind, objects) => {
                let source = source_of(kind);
                let (old, mut others): (EndpointMap, EndpointMap) =
                    std::mem::take(&mut self.snapshot.endpoints).into_iter().partition(|((s, _), _)| *s == source);
                let (strings, services) = (&mut self.strings, &self.snapshot.services);
                let mut new: EndpointMap = objects
                    .into_iter()
                    .filter_map(|o| match o {
                        Object::Endpoints(mut e) if e.source == source => {
                            share_endpoints(strings, &mut e, services);
                            Some(((e.source, e.key.clone()), e))
                        }
                        _ => None,
                    })
                    .collect();
                let changed = new != old;
                drop(old);
                // `append` rebuilds from both sorted sequences into full nodes.
                others.append(&mut new);
                self.snapshot.endpoints = others;
                changed
            }
            Change::Retain(kind, mut keys) => {
                keys.sort();
                let keep = |k: &ObjectKey| keys.binary_search(k).is_ok();
                match kind {
                    Kind::Service => {
                        let before = self.snapshot.services.len();
                        self.snapshot.services.retain(|k, _| keep(k));
                        self.snapshot.services.len() != before
                    }
                    kind => {
                        let (source, before) = (source_of(kind), self.snapshot.endpoints.len());
                        self.snapshot.endpoints.retain(|(s, k), _| *s != source || keep(k));
                        self.snapshot.endpoints.len() != before
                    }
                }
            }
            Change::KubeProxy(present) => std::mem::replace(&mut self.kube_proxy, present) != present,
            Change::UdpPortUnavailable(port) => {
                let fresh = self.unusable_udp.insert(port);
                self.udp_ports.retain(|_, p| *p != port);
                fresh
            }
            Change::SetAside(endpoints) => {
                let new: BTreeSet<(ServicePortName, SocketAddr)> = endpoints.into_iter().collect();
                // Only kernel-path ports' rules depend on it.
                let kernel_ports: HashSet<ServicePortName> = self
                    .snapshot
                    .services
                    .values()
                    .filter(|s| self.kernel_path(s))
                    .flat_map(|s| s.ports.iter().map(|p| ServicePortName::new(&s.key, &p.name)))
                    .collect();
                let matters = |set: &BTreeSet<(ServicePortName, SocketAddr)>| -> Vec<(ServicePortName, SocketAddr)> {
                    set.iter().filter(|(n, _)| kernel_ports.contains(n)).cloned().collect()
                };
                let changed = matters(&new) != matters(&self.set_aside);
                self.set_aside = new;
                changed
            }
        }
    }

    /// Does `svc` take the kernel path (its annotation, else the configured `dataPath`)?
    fn kernel_path(&self, svc: &Service) -> bool {
        svc.data_path.unwrap_or(self.cfg.data_path) == DataPath::Kernel
    }

    /// Derive verdicts, rules and the proxy table. `&mut` only for the UDP port allocation,
    /// which must be stable across plans.
    pub fn plan(&mut self) -> Plan {
        self.plan_reusing(&ProxyTable::default())
    }

    /// [`State::plan`], with every proxy table entry that equals the one `previous` has for
    /// the same address (or UDP proxy port) taken from `previous` (the same `Arc`), so the table
    /// in use and the new one share what did not change: a re-plan costs memory for what
    /// changed only, and comparing the two tables is cheap.
    pub fn plan_reusing(&mut self, previous: &ProxyTable) -> Plan {
        let mut judged = self.judge();
        self.allocate_udp_ports(&judged.wanted_udp);
        let (planned, table) = self.entries(&mut judged.reports, judged.resolved, previous);
        let cfg = &self.cfg;
        let reports = judged.reports;
        let ignored = judged.ignored;
        let mut rules = render::render(&RenderInput {
            layout: cfg.layout,
            listen: &cfg.listen,
            service_cidrs: &cfg.service_cidrs,
            ports: &planned,
            ignored: &ignored,
        });
        drop((planned, ignored));
        // The rule set is kept (by the agent and the applier) until the next change: no spare
        // capacity in its lines. A no-op for lines that are already exact.
        for line in rules.v4.rules.iter_mut().chain(rules.v6.rules.iter_mut()) {
            line.shrink_to_fit();
        }
        Plan { reports, rules, table }
    }

    /// Pass 1: every service's verdict, and for the proxied ones each port's usable upstreams.
    fn judge(&self) -> Judged {
        let mut by_service: HashMap<&ObjectKey, Vec<&EndpointSet>> = HashMap::new();
        for set in self.snapshot.endpoints.values() {
            by_service.entry(&set.service).or_default().push(set);
        }
        let cfg = &self.cfg;
        let mut reports = Vec::with_capacity(self.snapshot.services.len());
        let mut ignored: Vec<Ignored> = Vec::new();
        let mut wanted_udp: Vec<UdpKey> = Vec::new();
        let mut resolved: Vec<(usize, usize, Vec<Upstream>)> = Vec::new();
        // Every ClusterIP:port this node proxies: a backend there would send the proxy's own
        // upstream connection back into the proxy (an endpoint that is a ClusterIP, or two
        // services pointing at each other), so such backends are refused.
        // Each service's verdict, decided once (in snapshot order).
        let verdicts: Vec<Verdict> =
            self.snapshot.services.values().map(|svc| filter::verdict(svc, &cfg.filter, self.kube_proxy)).collect();
        let proxied: HashSet<(IpAddr, u16, Protocol)> = self
            .snapshot
            .services
            .values()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_proxied())
            .flat_map(|(svc, _)| {
                svc.cluster_ips.iter().flat_map(move |ip| svc.ports.iter().map(move |sp| (*ip, sp.port, sp.protocol)))
            })
            .collect();

        for (svc, &verdict) in self.snapshot.services.values().zip(&verdicts) {
            let sets = by_service.get(&svc.key).map(Vec::as_slice).unwrap_or(&[]);
            if !verdict.is_proxied() {
                if cfg.layout == Layout::RootChain {
                    let ips = if svc.headless { endpoint_ips(sets) } else { svc.cluster_ips.clone() };
                    if !ips.is_empty() {
                        ignored.push(Ignored { key: svc.key.clone(), ips });
                    }
                }
                reports.push(ServiceReport { key: svc.key.clone(), verdict, ports: Vec::new() });
                continue;
            }
            let idx = reports.len();
            let mut ports = Vec::with_capacity(svc.ports.len());
            for (pi, sp) in svc.ports.iter().enumerate() {
                let (backends, loops) = usable_upstreams(svc, sp, sets, cfg, &proxied);
                let name = ServicePortName::new(&svc.key, &sp.name);
                let note = match sp.protocol {
                    Protocol::Sctp => Some("SCTP is not proxied"),
                    _ if backends.is_empty() && loops > 0 => {
                        Some("every usable endpoint is a ClusterIP this node proxies (a loop): connections are refused")
                    }
                    _ if backends.is_empty() => Some("no usable endpoint: connections are refused"),
                    _ if svc
                        .cluster_ips
                        .iter()
                        .any(|ip| !backends.iter().any(|b| b.addr.is_ipv6() == ip.is_ipv6())) =>
                    {
                        Some("no usable endpoint of one ClusterIP's family: connections to that ClusterIP are refused")
                    }
                    _ => None,
                };
                let path = if self.kernel_path(svc) { DataPath::Kernel } else { DataPath::Proxy };
                if sp.protocol == Protocol::Udp && path == DataPath::Proxy {
                    wanted_udp.push((svc.key.clone(), sp.port));
                }
                ports.push(PortReport {
                    name,
                    protocol: sp.protocol,
                    port: sp.port,
                    backends: backends.len(),
                    loops,
                    no_local_endpoints: svc.internal_local && backends.is_empty(),
                    path,
                    left_out: 0,
                    note,
                });
                resolved.push((idx, pi, backends));
            }
            reports.push(ServiceReport { key: svc.key.clone(), verdict, ports });
        }

        Judged { reports, ignored, wanted_udp, resolved }
    }

    /// Pass 2: UDP proxy ports, sticky while their service port exists.
    fn allocate_udp_ports(&mut self, wanted_udp: &[UdpKey]) {
        let cfg = &self.cfg;
        // UDP ports: keep what is still wanted, then hand out the lowest free ones.
        let wanted: BTreeSet<&UdpKey> = wanted_udp.iter().collect();
        self.udp_ports.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<u16> = self.udp_ports.values().copied().collect();
        let mut next = cfg.listen.udp_ports.0;
        for k in wanted_udp {
            if self.udp_ports.contains_key(k) {
                continue;
            }
            while next <= cfg.listen.udp_ports.1 && (used.contains(&next) || self.unusable_udp.contains(&next)) {
                next += 1;
            }
            if next > cfg.listen.udp_ports.1 {
                break; // exhausted: reported below
            }
            self.udp_ports.insert(k.clone(), next);
            used.insert(next);
        }
    }

    /// Pass 3: the planned ports (for the rules) and the proxy table, reusing `previous`'s
    /// entries that did not change.
    fn entries(
        &self,
        reports: &mut [ServiceReport],
        resolved: Vec<(usize, usize, Vec<Upstream>)>,
        previous: &ProxyTable,
    ) -> (Vec<PlannedPort>, ProxyTable) {
        let cfg = &self.cfg;
        let mut planned: Vec<PlannedPort> = Vec::new();
        let mut table = ProxyTable::default();
        for (idx, pi, backends) in resolved {
            let svc = &self.snapshot.services[&reports[idx].key];
            let sp = &svc.ports[pi];
            if reports[idx].ports[pi].path == DataPath::Kernel {
                if sp.protocol != Protocol::Sctp {
                    let report = &mut reports[idx].ports[pi];
                    let entry =
                        kernel::entries(svc, sp, report, backends, &self.set_aside, cfg.lb_policy, &mut planned);
                    if sp.protocol == Protocol::Tcp {
                        table.kernel.push(entry);
                    }
                }
                continue;
            }
            let proxy_port = match sp.protocol {
                Protocol::Sctp => continue,
                Protocol::Tcp => cfg.listen.tcp_port,
                Protocol::Udp => match self.udp_ports.get(&(svc.key.clone(), sp.port)) {
                    Some(p) => *p,
                    None => {
                        reports[idx].ports[pi].note = Some("UDP proxy port range exhausted: not proxied");
                        continue;
                    }
                },
            };
            // Each ClusterIP is served by endpoints of its own family only (as kube-proxy does);
            // a family without any is refused at once, like a service without endpoints.
            let has_family = |ip: &IpAddr| backends.iter().any(|b| b.addr.is_ipv6() == ip.is_ipv6());
            let families: Vec<bool> = svc.cluster_ips.iter().map(has_family).collect();
            let entry = ServiceEntry {
                name: reports[idx].ports[pi].name.clone(),
                protocol: sp.protocol,
                upstreams: backends,
                affinity: svc.affinity_timeout.map(|t| Duration::from_secs(t.into())),
                policy: cfg.lb_policy,
                probe_interval: svc.probe_interval,
            };
            let old = match sp.protocol {
                Protocol::Tcp => {
                    svc.cluster_ips.first().and_then(|ip| previous.tcp.get(&SocketAddr::new(*ip, sp.port)))
                }
                _ => previous.udp.get(&proxy_port),
            };
            let entry = match old {
                Some(old) if **old == entry => {
                    reports[idx].ports[pi].name = old.name.clone();
                    old.clone()
                }
                _ => Arc::new(entry),
            };
            let name = &entry.name;
            for (ip, has_endpoints) in svc.cluster_ips.iter().zip(families) {
                planned.push(PlannedPort {
                    name: name.clone(),
                    cluster_ip: *ip,
                    protocol: sp.protocol,
                    port: sp.port,
                    proxy_port,
                    has_endpoints,
                    kernel: None,
                });
                if sp.protocol == Protocol::Tcp {
                    table.tcp.insert(SocketAddr::new(*ip, sp.port), entry.clone());
                }
            }
            if sp.protocol == Protocol::Udp {
                table.udp.insert(proxy_port, entry);
            }
        }

        (planned, table)
    }
}

type EndpointMap = BTreeMap<(EndpointSource, ObjectKey), EndpointSet>;

fn source_of(kind: Kind) -> EndpointSource {
    match kind {
        Kind::Endpoints => EndpointSource::Endpoints,
        _ => EndpointSource::Slice,
    }
}

/// The endpoint sets to use for a service: its EndpointSlices when it has any, else its core/v1
/// Endpoints (never both, so nothing is counted twice).
fn chosen_sets<'a>(sets: &'a [&'a EndpointSet]) -> impl Iterator<Item = &'a EndpointSet> + 'a {
    let any_slice = sets.iter().any(|s| s.source == EndpointSource::Slice);
    sets.iter().copied().filter(move |s| (s.source == EndpointSource::Slice) == any_slice)
}

fn endpoint_ips(sets: &[&EndpointSet]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> =
        chosen_sets(sets).flat_map(|s| s.groups.iter()).flat_map(|g| g.endpoints.iter()).map(|e| e.address).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The usable backends of one service port, in a stable order.
///
/// Kubernetes semantics: ready endpoints; when none is ready, serving-and-terminating ones; under
/// `internalTrafficPolicy: Local` (and a known node name) only endpoints on this node. The same
/// address in two slices (a mirrored and a hand-made one) counts once. An endpoint that is the
/// proxy's own address, or a ClusterIP:port in `proxied`, would loop back into the proxy: it is
/// left out and counted (the second value).
fn usable_upstreams(
    svc: &Service,
    sp: &ServicePort,
    sets: &[&EndpointSet],
    cfg: &StateConfig,
    proxied: &HashSet<(IpAddr, u16, Protocol)>,
) -> (Vec<Upstream>, usize) {
    #[derive(Clone, Copy)]
    struct Candidate {
        ready: bool,
        fallback: bool,
        local: bool,
    }
    let mut found: BTreeMap<SocketAddr, Candidate> = BTreeMap::new();
    let mut loops: BTreeSet<SocketAddr> = BTreeSet::new();
    let node = cfg.node_name.as_deref();
    for set in chosen_sets(sets) {
        for group in &set.groups {
            let Some(port) = group.ports.iter().find(|p| *p.name == *sp.name && p.protocol == sp.protocol) else {
                continue;
            };
            for ep in &group.endpoints {
                let ip = &ep.address;
                if *ip == cfg.listen.ip_for(ip.is_ipv6())
                    || ip.is_unspecified()
                    || proxied.contains(&(*ip, port.port, sp.protocol))
                {
                    loops.insert(SocketAddr::new(*ip, port.port));
                    continue; // would loop back into the proxy
                }
                let local = node.is_some() && ep.node_name.as_deref() == node;
                let c = Candidate { ready: ep.ready, fallback: ep.serving && ep.terminating, local };
                found
                    .entry(SocketAddr::new(*ip, port.port))
                    .and_modify(|o| {
                        o.ready |= c.ready;
                        o.fallback |= c.fallback;
                        o.local |= c.local;
                    })
                    .or_insert(c);
            }
        }
    }
    let local_only = svc.internal_local && node.is_some();
    let eligible = |c: &Candidate| !local_only || c.local;
    let any_ready = found.values().any(|c| c.ready && eligible(c));
    let backends = found
        .into_iter()
        .filter(|(_, c)| eligible(c) && if any_ready { c.ready } else { c.fallback })
        .map(|(addr, c)| Upstream { addr, local: c.local })
        .collect();
    (backends, loops.len())
}

#[cfg(test)]
#[path = "state/tests.rs"]
mod tests;
