//! The cluster as edgeproxy sees it: plain, compact types with no I/O.
//!
//! These are *validated* views of Services, EndpointSlices and core/v1 Endpoints. Decoding from the
//! API server's JSON (lenient with fields we do not use, strict with those we do) lives in
//! `source::kube::objects`; everything downstream (filter, state, render, proxy) works on these
//! types only.
//!
//! An edge agent holds tens of thousands of these for hours, so they are built to be small:
//! strings are `Box<str>` (no spare capacity) or, where the same text recurs across objects
//! (namespaces, names held in several maps, node names, zones, port names), `Arc<str>` so that
//! `state::State` can intern them and every holder shares one allocation. Cloning an
//! [`ObjectKey`] never allocates. Nothing here interns by itself: this module has no global state.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// `namespace/name` of a Service (or of the object an endpoint set belongs to).
///
/// Both parts are shared strings: a key is held by the object, by the map it sits in, by the
/// reflector's set of delivered keys and by plan reports, all pointing at the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case, as iptables spells it (`-p tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The API's spelling (`TCP`); an absent protocol means TCP.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// May be empty for a single-port service. Shared: few distinct names per cluster.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub service_type: ServiceType,
    /// `spec.clusterIP: None`.
    pub headless: bool,
    /// `spec.clusterIPs` (or `spec.clusterIP`), both families; empty when headless or ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `Some(timeout in seconds)` when `sessionAffinity: ClientIP`.
    pub affinity_timeout: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    pub labels: Labels,
    /// The annotation [`DATA_PATH_ANNOTATION`], when set: this service's own choice of path.
    pub data_path: Option<DataPath>,
    /// The annotation [`PROBE_INTERVAL_ANNOTATION`], when set: probe this service's TCP
    /// endpoints this often, over the configured `tcp.probeInterval` (or with probes off).
    pub probe_interval: Option<Duration>,
}

/// A Service's own active-probe interval (`edgeproxy.io/probe-interval: 5s`; 100ms-1h).
pub const PROBE_INTERVAL_ANNOTATION: &str = "edgeproxy.io/probe-interval";

/// A Service's own choice of data path (`edgeproxy.io/data-path: proxy | kernel`), over the
/// configured `dataPath`.
pub const DATA_PATH_ANNOTATION: &str = "edgeproxy.io/data-path";

/// How a proxied service port's connections reach an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DataPath {
    /// Through the proxy (the project's design): dial retry, passive health, per-connection
    /// metrics.
    #[default]
    Proxy,
    /// DNATed in the kernel straight to an endpoint (as kube-proxy does): no user-space hop.
    Kernel,
}

impl DataPath {
    pub fn parse(s: &str) -> Option<DataPath> {
        match s {
            "proxy" => Some(DataPath::Proxy),
            "kernel" => Some(DataPath::Kernel),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Proxy => "proxy",
            DataPath::Kernel => "kernel",
        }
    }
}

impl Service {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key)
    }
}

/// A Service's labels, sorted by key, in one allocation: `key NUL value NUL key NUL value`.
///
/// Kubernetes label keys and values never contain NUL (the decoder rejects one that does), so
/// the separator cannot be confused with text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<str>);

/// A label key or value contains a NUL character.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NulInLabel {
    pub key: String,
}

impl Labels {
    /// From `(key, value)` pairs in any order; when a key repeats, the last value counts.
    pub fn new<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Labels, NulInLabel> {
        let mut pairs: Vec<(K, V)> = pairs.into_iter().collect();
        // Stable: of equal keys the last stays last, and only the last of a run is kept.
        if !pairs.is_sorted_by(|a, b| a.0.as_ref() <= b.0.as_ref()) {
            pairs.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        }
        let len: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2).sum();
        let mut text = String::with_capacity(len.saturating_sub(1));
        for (i, (k, v)) in pairs.iter().enumerate() {
            let (k, v) = (k.as_ref(), v.as_ref());
            if pairs.get(i + 1).is_some_and(|n| n.0.as_ref() == k) {
                continue;
            }
            if k.contains('\0') || v.contains('\0') {
                return Err(NulInLabel { key: k.to_string() });
            }
            if !text.is_empty() {
                text.push('\0');
            }
            text.push_str(k);
            text.push('\0');
            text.push_str(v);
        }
        Ok(Labels(text.into_boxed_str()))
    }

    /// The value of `key`, if the label exists (its value may be empty).
    pub fn get(&self, key: &str) -> Option<&str> {
        for (k, v) in self.iter() {
            match k.cmp(key) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Some(v),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }

    /// `(key, value)` pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut parts = (!self.0.is_empty()).then(|| self.0.split('\0')).into_iter().flatten();
        std::iter::from_fn(move || Some((parts.next()?, parts.next().unwrap_or(""))))
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Which API object an endpoint set came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointSource {
    /// `discovery.k8s.io/v1` EndpointSlice.
    Slice,
    /// core/v1 Endpoints (old MetaServers, or when configured).
    Endpoints,
}

/// One endpoint. Kubernetes lets consumers use only the first of an endpoint's addresses, so
/// only that one is kept (an endpoint without any address is not kept at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared: few distinct node names per cluster.
    pub node_name: Option<Arc<str>>,
    /// Shared: few distinct zones per cluster.
    pub zone: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// Shared: few distinct names per cluster.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// Endpoints that share one port list: one EndpointSlice, or one subset of a core/v1 Endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointGroup {
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// One EndpointSlice or one core/v1 Endpoints object, tied to its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub source: EndpointSource,
    /// The object's own namespace/name (a slice's generated name, or the Endpoints' name).
    pub key: ObjectKey,
    /// The Service it belongs to (`kubernetes.io/service-name`, or the Endpoints' own name);
    /// always in the set's own namespace.
    pub service: ObjectKey,
    pub groups: Vec<EndpointGroup>,
    /// `endpoints.kubernetes.io/last-change-trigger-time` (unix milliseconds): when the change
    /// this version carries happened in the cluster (network programming latency).
    pub trigger_ms: Option<u64>,
}

/// Which kind of object a decoded item or a watch event carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
        })
    }
}

/// A decoded API object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(Service),
    Endpoints(EndpointSet),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::Endpoints(e) if e.source == EndpointSource::Slice => Kind::EndpointSlice,
            Object::Endpoints(_) => Kind::Endpoints,
        }
    }

    pub fn key(&self) -> &ObjectKey {
        match self {
            Object::Service(s) => &s.key,
            Object::Endpoints(e) => &e.key,
        }
    }
}

/// Whole-cluster snapshot: what a list (or a set of files) says exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ObjectKey, Service>,
    /// Keyed by (source, object key): a slice and an Endpoints object may share a name.
    pub endpoints: BTreeMap<(EndpointSource, ObjectKey), EndpointSet>,
}

impl Snapshot {
    /// Insert (or replace) one object. Strings are stored as they come: interning is
    /// `state::State`'s job.
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Service(s) => {
                self.services.insert(s.key.clone(), s);
            }
            Object::Endpoints(e) => {
                self.endpoints.insert((e.source, e.key.clone()), e);
            }
        }
    }
}

/// EdgeMesh's name of a service port, `namespace/name[:portName]` (its `ServicePortName.String()`):
/// the rule comment, the proxy table's name (the key of load-balancing state that survives a
/// table swap) and the `service` label of the metrics. One allocation, shared by all of them.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName(Arc<str>);

impl ServicePortName {
    /// The name of the port `port_name` ("" for an unnamed port) of the Service `key`.
    pub fn new(key: &ObjectKey, port_name: &str) -> ServicePortName {
        match port_name.is_empty() {
            true => ServicePortName(key.to_string().into()),
            false => ServicePortName(format!("{key}:{port_name}").into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Is this the very allocation `other` holds (not just the same text)?
    pub fn shares(&self, other: &ServicePortName) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for ServicePortName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Maps keyed by the name are looked up with a `&str` (hashing and order are the text's).
impl std::borrow::Borrow<str> for ServicePortName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// For tests and tools that name a port directly.
impl From<&str> for ServicePortName {
    fn from(s: &str) -> Self {
        ServicePortName(s.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_sorted_last_value_wins_empty_values_kept() {
        let l = Labels::new([("z", "1"), ("b", ""), ("app", "web"), ("b", "2")]).unwrap();
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![("app", "web"), ("b", "2"), ("z", "1")]);
        assert_eq!(
            (l.get("b"), l.get("z"), l.get("a"), l.get("zz"), l.get("")),
            (Some("2"), Some("1"), None, None, None)
        );
        let e = Labels::new([("k", ""), ("x", "y")]).unwrap();
        assert_eq!((e.get("k"), e.len()), (Some(""), 2));
        let none = Labels::new(Vec::<(&str, &str)>::new()).unwrap();
        assert!(none.is_empty() && none.get("k").is_none() && none.iter().next().is_none());
        assert_eq!(none, Labels::default());
        assert_eq!(format!("{l:?}"), r#"{"app": "web", "b": "2", "z": "1"}"#);
    }

    #[test]
    fn labels_refuse_nul() {
        assert_eq!(Labels::new([("a\0b", "1")]), Err(NulInLabel { key: "a\0b".into() }));
        assert_eq!(Labels::new([("k", "v\0")]), Err(NulInLabel { key: "k".into() }));
    }
}
