//! The cluster as edgeproxy sees it: plain, compact types with no I/O.
//!
//! These are *validated* views of Services, EndpointSlices and core/v1 Endpoints. Decoding from the
//! API server's JSON (lenient with fields we do not use, strict with those we do) lives in
//! `kube::objects`; everything downstream (filter, state, render, proxy) works on these types only.
//!
//! Strings are `Box<str>` rather than `String`: an edge agent holds thousands of these for hours,
//! and the spare capacity of a `String` is memory nobody uses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// `namespace/name` of a Service (or of the object an endpoint set belongs to).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Box<str>,
    pub name: Box<str>,
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
    /// May be empty for a single-port service.
    pub name: Box<str>,
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
    /// Sorted by key.
    pub labels: Vec<(Box<str>, Box<str>)>,
}

impl Service {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|i| &*self.labels[i].1)
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Box<str>>,
    pub zone: Option<Box<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: Box<str>,
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
    /// The Service it belongs to (`kubernetes.io/service-name`, or the Endpoints' own name).
    pub service: ObjectKey,
    pub groups: Vec<EndpointGroup>,
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
