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
use crate::listen::ListenConfig;
use crate::model::{EndpointSet, EndpointSource, Kind, Object, ObjectKey, Protocol, Service, ServicePort, Snapshot};
use crate::proxy::table::{Backend, LbPolicy, ProxyTable, ServiceEntry};
use crate::rules::render::{self, Ignored, Layout, PlannedPort, RenderInput};
use crate::rules::RuleSet;

/// The parts of [`Config`] the state machine needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateConfig {
    pub filter: FilterConfig,
    pub layout: Layout,
    pub listen: ListenConfig,
    pub service_cidrs: Vec<(IpAddr, u8)>,
    pub node_name: Option<String>,
    pub lb_policy: LbPolicy,
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
}

/// Per service port, what the plan decided (for `--explain` and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortReport {
    /// `namespace/name[:portName]` (see [`port_comment`]); the same allocation as the proxy
    /// table entry's name.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
    pub backends: usize,
    /// Endpoints refused because they are a ClusterIP:port this node proxies (a loop).
    pub loops: usize,
    pub note: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceReport {
    pub key: ObjectKey,
    pub verdict: Verdict,
    pub ports: Vec<PortReport>,
}

/// Everything derived from the state at one moment.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub reports: Vec<ServiceReport>,
    pub rules: RuleSet,
    pub table: ProxyTable,
}

impl Plan {
    /// Endpoints left out because they would loop back into the proxy, over every service port.
    pub fn refused_loops(&self) -> usize {
        self.reports.iter().flat_map(|r| &r.ports).map(|p| p.loops).sum()
    }

    pub fn proxied(&self) -> impl Iterator<Item = &ObjectKey> {
        self.reports.iter().filter(|r| r.verdict.is_proxied()).map(|r| &r.key)
    }
}

type UdpKey = (ObjectKey, u16);

/// Shared copies of strings that recur across objects. Deterministic (a `BTreeSet`), and pruned
/// of strings nothing else holds any more once it has doubled since the last pruning, so it
/// never holds more than about twice what is in use.
#[derive(Default)]
struct Interner {
    set: BTreeSet<Arc<str>>,
    prune_at: usize,
}

impl Interner {
    /// Point `s` at the shared copy of its text (making it the shared copy if there is none).
    fn share(&mut self, s: &mut Arc<str>) {
        match self.set.get(&**s) {
            Some(shared) => {
                if !Arc::ptr_eq(shared, s) {
                    *s = shared.clone();
                }
            }
            None => {
                self.set.insert(s.clone());
            }
        }
    }

    fn share_opt(&mut self, s: &mut Option<Arc<str>>) {
        if let Some(s) = s {
            self.share(s);
        }
    }

    fn prune(&mut self) {
        if self.set.len() > self.prune_at {
            self.set.retain(|s| Arc::strong_count(s) > 1);
            self.prune_at = (self.set.len() * 2).max(64);
        }
    }

    fn service(&mut self, svc: &mut Service) {
        self.share(&mut svc.key.namespace);
        for p in &mut svc.ports {
            self.share(&mut p.name);
        }
    }

    /// `services`: the held Services, whose names the set's service key may share.
    fn endpoints(&mut self, set: &mut EndpointSet, services: &BTreeMap<ObjectKey, Service>) {
        self.share(&mut set.key.namespace);
        if set.service.namespace == set.key.namespace {
            set.service.namespace = set.key.namespace.clone();
        } else {
            self.share(&mut set.service.namespace);
        }
        if let Some((held, _)) = services.get_key_value(&set.service) {
            set.service.name = held.name.clone();
        }
        for g in &mut set.groups {
            for p in &mut g.ports {
                self.share(&mut p.name);
            }
            for e in &mut g.endpoints {
                self.share_opt(&mut e.node_name);
                self.share_opt(&mut e.zone);
            }
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
            strings: Interner::default(),
        }
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
                    self.strings.service(&mut s);
                    self.snapshot.services.insert(s.key.clone(), s);
                    true
                }
            },
            Change::Upsert(Object::Endpoints(mut e)) => {
                let k = (e.source, e.key.clone());
                match self.snapshot.endpoints.get(&k) {
                    Some(old) if *old == e => false,
                    _ => {
                        self.strings.endpoints(&mut e, &self.snapshot.services);
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
                            strings.service(&mut s);
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
                            strings.endpoints(&mut e, services);
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
        }
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
        let mut by_service: HashMap<&ObjectKey, Vec<&EndpointSet>> = HashMap::new();
        for set in self.snapshot.endpoints.values() {
            by_service.entry(&set.service).or_default().push(set);
        }
        let cfg = &self.cfg;
        let mut reports = Vec::with_capacity(self.snapshot.services.len());
        let mut planned: Vec<PlannedPort> = Vec::new();
        let mut ignored: Vec<Ignored> = Vec::new();
        let mut table = ProxyTable::default();
        let mut wanted_udp: Vec<UdpKey> = Vec::new();
        let mut resolved: Vec<(usize, usize, Vec<Backend>)> = Vec::new();
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
                let (backends, loops) = resolve(svc, sp, sets, cfg, &proxied);
                let name: Arc<str> = port_comment(&svc.key, sp).into();
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
                if sp.protocol == Protocol::Udp {
                    wanted_udp.push((svc.key.clone(), sp.port));
                }
                ports.push(PortReport {
                    name,
                    protocol: sp.protocol,
                    port: sp.port,
                    backends: backends.len(),
                    loops,
                    note,
                });
                resolved.push((idx, pi, backends));
            }
            reports.push(ServiceReport { key: svc.key.clone(), verdict, ports });
        }

        // UDP ports: keep what is still wanted, then hand out the lowest free ones.
        let wanted: BTreeSet<&UdpKey> = wanted_udp.iter().collect();
        self.udp_ports.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<u16> = self.udp_ports.values().copied().collect();
        let mut next = cfg.listen.udp_ports.0;
        for k in &wanted_udp {
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

        for (idx, pi, backends) in resolved {
            let svc = &self.snapshot.services[&reports[idx].key];
            let sp = &svc.ports[pi];
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
                backends,
                affinity: svc.affinity_timeout.map(|t| Duration::from_secs(t.into())),
                policy: cfg.lb_policy,
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
                    comment: name.to_string(),
                    cluster_ip: *ip,
                    protocol: sp.protocol,
                    port: sp.port,
                    proxy_port,
                    has_endpoints,
                });
                if sp.protocol == Protocol::Tcp {
                    table.tcp.insert(SocketAddr::new(*ip, sp.port), entry.clone());
                }
            }
            if sp.protocol == Protocol::Udp {
                table.udp.insert(proxy_port, entry);
            }
        }

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
}

type EndpointMap = BTreeMap<(EndpointSource, ObjectKey), EndpointSet>;

fn source_of(kind: Kind) -> EndpointSource {
    match kind {
        Kind::Endpoints => EndpointSource::Endpoints,
        _ => EndpointSource::Slice,
    }
}

/// `namespace/name[:portName]`, EdgeMesh's rule comment (`ServicePortName.String()`).
pub fn port_comment(key: &ObjectKey, sp: &ServicePort) -> String {
    match sp.name.is_empty() {
        true => key.to_string(),
        false => format!("{key}:{}", sp.name),
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
fn resolve(
    svc: &Service,
    sp: &ServicePort,
    sets: &[&EndpointSet],
    cfg: &StateConfig,
    proxied: &HashSet<(IpAddr, u16, Protocol)>,
) -> (Vec<Backend>, usize) {
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
        .map(|(addr, c)| Backend { addr, local: c.local })
        .collect();
    (backends, loops.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::source::kube::objects::decode_document;

    fn state(json_svcs: &str, json_slices: &str) -> State {
        let mut st = State::new(StateConfig::from(&Config::defaults()));
        for (doc, kind) in [(json_svcs, Kind::Service), (json_slices, Kind::EndpointSlice)] {
            let d = decode_document(doc.as_bytes(), Some(kind));
            assert!(d.errors.is_empty(), "{:?}", d.errors);
            st.apply(Change::Replace(kind, d.objects));
        }
        st
    }

    const SVCS: &str = r#"{"kind":"ServiceList","items":[
      {"metadata":{"name":"web","namespace":"a"},"spec":{"clusterIP":"10.96.0.20","ports":[{"name":"http","port":80,"targetPort":"http"}]}},
      {"metadata":{"name":"dns","namespace":"a"},"spec":{"clusterIP":"10.96.0.21","ports":[{"name":"dns","protocol":"UDP","port":53}]}}]}"#;
    const SLICES: &str = r#"{"kind":"EndpointSliceList","items":[
      {"metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
       "endpoints":[{"addresses":["192.0.2.1"],"conditions":{"ready":true}},
                    {"addresses":["192.0.2.2"],"conditions":{"ready":false,"serving":true,"terminating":true}}],
       "ports":[{"name":"http","port":8080,"protocol":"TCP"}]}]}"#;

    #[test]
    fn ready_backends_and_reject_without_endpoints() {
        let mut st = state(SVCS, SLICES);
        let plan = st.plan();
        let web = &plan.table.tcp[&"10.96.0.20:80".parse().unwrap()];
        assert_eq!(web.backends, vec![Backend { addr: "192.0.2.1:8080".parse().unwrap(), local: false }]);
        // No endpoints: a reject DNAT in the small chain, ahead of the DNAT to its UDP port.
        let dns: Vec<&String> = plan.rules.v4.rules.iter().filter(|r| r.contains("a/dns:dns")).collect();
        assert_eq!(dns.len(), 3, "{dns:?}");
        assert!(dns[..2].iter().all(|r| r.starts_with("-A KUBE-PORTALS-") && r.ends_with(":15002")), "{dns:?}");
        assert!(
            dns[2].starts_with("-A EDGEPROXY-NO-ENDPOINTS ")
                && dns[2].contains("has no endpoints")
                && dns[2].ends_with(":15000"),
            "{dns:?}"
        );
        assert_eq!(plan.table.udp.keys().copied().collect::<Vec<_>>(), vec![15002]);
    }

    #[test]
    fn terminating_used_only_when_none_ready() {
        let slices = SLICES.replace(r#""conditions":{"ready":true}"#, r#""conditions":{"ready":false}"#);
        let mut st = state(SVCS, &slices);
        let plan = st.plan();
        let web = &plan.table.tcp[&"10.96.0.20:80".parse().unwrap()];
        assert_eq!(web.backends[0].addr, "192.0.2.2:8080".parse().unwrap());
    }

    #[test]
    fn udp_ports_are_sticky_and_unchanged_input_is_no_change() {
        let mut st = state(SVCS, SLICES);
        let first = st.plan().rules;
        let d = decode_document(SVCS.as_bytes(), Some(Kind::Service));
        assert!(!st.apply(Change::Replace(Kind::Service, d.objects)));
        assert_eq!(st.plan().rules, first);
        assert!(st.apply(Change::UdpPortUnavailable(15002)));
        assert_eq!(st.plan().table.udp.keys().copied().collect::<Vec<_>>(), vec![15003]);
    }

    #[test]
    fn recurring_strings_are_shared_and_unused_ones_pruned() {
        let slices = r#"{"kind":"EndpointSliceList","items":[
          {"metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
           "endpoints":[{"addresses":["192.0.2.1"],"nodeName":"n1","zone":"z"},{"addresses":["192.0.2.2"],"nodeName":"n1","zone":"z"}],
           "ports":[{"name":"http","port":8080}]},
          {"metadata":{"name":"web-2","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
           "endpoints":[{"addresses":["192.0.2.3"],"nodeName":"n1","zone":"z"}],"ports":[{"name":"http","port":8080}]}]}"#;
        let mut st = state(SVCS, slices);
        let snap = st.snapshot();
        let web = snap.services.get_key_value(&ObjectKey::new("a", "web")).unwrap();
        let sets: Vec<&EndpointSet> = snap.endpoints.values().collect();
        let eps: Vec<&crate::model::Endpoint> = sets.iter().flat_map(|s| s.groups[0].endpoints.iter()).collect();
        for e in &eps[1..] {
            assert!(Arc::ptr_eq(eps[0].node_name.as_ref().unwrap(), e.node_name.as_ref().unwrap()));
            assert!(Arc::ptr_eq(eps[0].zone.as_ref().unwrap(), e.zone.as_ref().unwrap()));
        }
        for set in &sets {
            assert!(Arc::ptr_eq(&set.key.namespace, &web.0.namespace), "namespace shared with the Service");
            assert!(Arc::ptr_eq(&set.service.name, &web.1.key.name), "service name shared with the Service");
            assert!(Arc::ptr_eq(&set.groups[0].ports[0].name, &web.1.ports[0].name), "port name shared");
        }
        assert_eq!(st.plan().table.tcp[&"10.96.0.20:80".parse().unwrap()].backends.len(), 3);

        // Everything gone: strings nothing holds any more do not stay forever.
        for (kind, n) in [(Kind::Service, 0), (Kind::EndpointSlice, 0)] {
            st.apply(Change::Replace(kind, Vec::with_capacity(n)));
        }
        for i in 0..200 {
            let doc = SVCS.replace("\"namespace\":\"a\"", &format!("\"namespace\":\"ns-{i}\""));
            let d = decode_document(doc.as_bytes(), Some(Kind::Service));
            st.apply(Change::Replace(Kind::Service, d.objects));
        }
        assert_eq!(st.snapshot().services.len(), 2);
        let held = st.strings.set.len();
        assert!(held <= 2 * 3 + 64, "interner holds {held} strings for 3 in use");
        assert!(st.strings.set.iter().any(|s| &**s == "ns-199"));
        assert!(!st.strings.set.iter().any(|s| &**s == "ns-0"), "a namespace no object uses was kept");
    }

    #[test]
    fn retain_removes_only_unlisted_objects_of_its_kind() {
        let mut st = state(SVCS, SLICES);
        let web = ObjectKey::new("a", "web");
        // A slice list that kept only an unknown key: web-1 goes, services stay.
        assert!(st.apply(Change::Retain(Kind::EndpointSlice, vec![ObjectKey::new("a", "other")])));
        assert!(st.snapshot().endpoints.is_empty());
        assert_eq!(st.snapshot().services.len(), 2);
        assert!(!st.apply(Change::Retain(Kind::Endpoints, vec![])), "no core/v1 Endpoints held: no change");
        assert!(!st.apply(Change::Retain(Kind::Service, vec![ObjectKey::new("a", "dns"), web.clone()])));
        assert!(st.apply(Change::Retain(Kind::Service, vec![web.clone()])));
        assert_eq!(st.snapshot().services.keys().collect::<Vec<_>>(), vec![&web]);
    }

    #[test]
    fn a_replan_shares_unchanged_entries_with_the_previous_table() {
        let mut st = state(SVCS, SLICES);
        let first = st.plan().table;
        let again = st.plan_reusing(&first);
        let (web, dns) = ("10.96.0.20:80".parse().unwrap(), 15002);
        assert!(Arc::ptr_eq(&first.tcp[&web], &again.table.tcp[&web]));
        assert!(Arc::ptr_eq(&first.udp[&dns], &again.table.udp[&dns]));
        assert!(Arc::ptr_eq(&again.reports[1].ports[0].name, &first.tcp[&web].name), "report shares the name");
        assert_eq!(again.table, first);
        // web's endpoints change: its entry is new, dns's is still shared.
        let slices = SLICES.replace("192.0.2.1", "192.0.2.9");
        let d = decode_document(slices.as_bytes(), Some(Kind::EndpointSlice));
        assert!(st.apply(Change::Replace(Kind::EndpointSlice, d.objects)));
        let changed = st.plan_reusing(&first).table;
        assert!(!Arc::ptr_eq(&first.tcp[&web], &changed.tcp[&web]));
        assert_eq!(changed.tcp[&web].backends[0].addr, "192.0.2.9:8080".parse().unwrap());
        assert!(Arc::ptr_eq(&first.udp[&dns], &changed.udp[&dns]));
        // Equal to a plan from scratch.
        assert_eq!(changed, st.plan().table);
    }

    /// PreferDualStack with endpoints of both families: each ClusterIP is served (no reject
    /// rule); with IPv4 endpoints only, the IPv6 ClusterIP is refused at once; an IPv4-only
    /// service whose only slice is IPv6 is refused at once (it was accepted, then reset).
    #[test]
    fn each_cluster_ip_is_served_by_its_own_family_only() {
        let svcs = r#"{"kind":"ServiceList","items":[
          {"metadata":{"name":"dual","namespace":"f"},"spec":{"ipFamilyPolicy":"PreferDualStack","clusterIP":"10.96.0.30","clusterIPs":["10.96.0.30","fd00:10:96::30"],"ports":[{"name":"http","port":80}]}},
          {"metadata":{"name":"half","namespace":"f"},"spec":{"ipFamilyPolicy":"PreferDualStack","clusterIP":"10.96.0.31","clusterIPs":["10.96.0.31","fd00:10:96::31"],"ports":[{"name":"http","port":80}]}},
          {"metadata":{"name":"v4svc","namespace":"f"},"spec":{"clusterIP":"10.96.0.32","ports":[{"name":"http","port":80}]}}]}"#;
        let slice = |name: &str, svc: &str, family: &str, addr: &str| {
            format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"f","labels":{{"kubernetes.io/service-name":"{svc}"}}}},"addressType":"{family}","endpoints":[{{"addresses":["{addr}"]}}],"ports":[{{"name":"http","port":8080}}]}}"#
            )
        };
        let slices = format!(
            r#"{{"kind":"EndpointSliceList","items":[{},{},{},{}]}}"#,
            slice("dual-4", "dual", "IPv4", "10.244.0.5"),
            slice("dual-6", "dual", "IPv6", "fd00:244::5"),
            slice("half-4", "half", "IPv4", "10.244.0.6"),
            slice("v4svc-6", "v4svc", "IPv6", "fd00:244::7"),
        );
        let mut st = state(svcs, &slices);
        let plan = st.plan();
        let rejects: Vec<&String> = plan
            .rules
            .v4
            .rules
            .iter()
            .chain(&plan.rules.v6.rules)
            .filter(|r| r.starts_with("-A EDGEPROXY-NO-ENDPOINTS "))
            .collect();
        let rejected = |ip: &str| rejects.iter().any(|r| r.contains(&format!("-d {ip}/")));
        assert!(!rejected("10.96.0.30") && !rejected("fd00:10:96::30"), "{rejects:?}");
        assert!(!rejected("10.96.0.31") && rejected("fd00:10:96::31"), "{rejects:?}");
        assert!(rejected("10.96.0.32"), "{rejects:?}");
        let note = |name: &str| {
            plan.reports.iter().find(|r| &*r.key.name == name).and_then(|r| r.ports[0].note).unwrap_or_default()
        };
        assert!(note("half").contains("one ClusterIP's family"), "{}", note("half"));
        assert!(note("v4svc").contains("one ClusterIP's family"), "{}", note("v4svc"));
        assert_eq!(note("dual"), "");
    }
}
