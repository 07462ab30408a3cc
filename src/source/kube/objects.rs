//! Decoding the API server's JSON into `model` types.
//!
//! Lenient with what we do not use (unknown fields, `managedFields`, status), strict with what we
//! do: a bad field makes that one object an [`ObjectError`] naming kind, namespace/name, field and
//! why, and the rest of the document still counts. A document cut short keeps the items decoded
//! before the cut. The serde shapes are in `raw`; watch lines in `watch`, which decodes their
//! objects here.
//!
//! Accepted shapes: a single object, a typed list (`ServiceList`, `EndpointSliceList`,
//! `EndpointsList`), and kubectl's `List`.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeSeed;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::names;
use super::raw::{
    IntOrString, KindOnly, MetaOnly, RawEndpoints, RawMeta, RawPort, RawService, RawSlice, Text, Top, TopSeed,
};
use crate::intern::Interner;
use crate::model::{
    DataPath, Endpoint, EndpointGroup, EndpointPort, EndpointSet, EndpointSource, Kind, Labels, Object, ObjectKey,
    Protocol, Service, ServicePort, ServiceType, TargetPort, DATA_PATH_ANNOTATION, PROBE_INTERVAL_ANNOTATION,
};

/// The largest object decoded, from any source: the API server refuses requests over 3 MiB, so
/// no stored object is larger (etcd's default limit is 1.5 MiB).
pub const MAX_OBJECT_BYTES: usize = 3 << 20;

/// One object that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    pub kind: Option<Kind>,
    /// `namespace/name` for messages (escaped when not a plain name), or `items[i]` when even
    /// the name could not be read.
    pub object: String,
    /// The object's key as its metadata says (whatever its validity), when that could be read:
    /// the reflector keeps the last good version of exactly this key.
    pub key: Option<ObjectKey>,
    /// JSON path of the offending field (`spec.ports[1].port`), empty for the whole object.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(k) => write!(f, "{k} {}", self.object)?,
            None => write!(f, "object {}", self.object)?,
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ObjectError {}

/// What a document held.
#[derive(Debug, Default)]
pub struct Decoded {
    pub objects: Vec<Object>,
    pub errors: Vec<ObjectError>,
    /// `metadata.resourceVersion` of a list.
    pub resource_version: Option<String>,
    /// `metadata.continue` of a list page.
    pub continue_token: Option<String>,
    /// Set when the document itself is broken (truncated, not JSON): says where. Objects decoded
    /// before the break are still in `objects`.
    pub document_error: Option<String>,
}

/// The top-level `kind` of a document, as written (`None` when it is not JSON or has none).
pub fn document_kind(doc: &[u8]) -> Option<String> {
    serde_json::from_slice::<KindOnly>(doc).ok().and_then(|k| k.kind)
}

/// Map a kind name (`Service`, `ServiceList`, `EndpointSlice`, ...) to the item kind.
pub fn kind_of(name: &str) -> Option<Kind> {
    match name.strip_suffix("List").unwrap_or(name) {
        "Service" => Some(Kind::Service),
        // `EndpointslicList`: what older KubeEdge MetaServers call an EndpointSlice list.
        "EndpointSlice" | "Endpointslic" => Some(Kind::EndpointSlice),
        "Endpoints" => Some(Kind::Endpoints),
        _ => None,
    }
}

/// Decode a whole document: one object or a list. `expect` is the kind to assume when neither
/// the document nor its items say (typed list items carry no `kind`).
pub fn decode_document(input: &[u8], expect: Option<Kind>) -> Decoded {
    let mut top = Top::default();
    let mut out = Decoded::default();
    let mut de = serde_json::Deserializer::from_slice(input);
    let result = TopSeed(&mut top).deserialize(&mut de).and_then(|()| de.end());
    if let Err(e) = result {
        out.document_error = Some(describe_json_error(&e, top.items.len()));
    }
    out.resource_version = top.meta.resource_version.filter(|s| !s.is_empty());
    out.continue_token = top.meta.continue_token.filter(|s| !s.is_empty());
    let doc_kind = top.kind.as_deref().and_then(kind_of).or(expect);

    if !top.has_items {
        // A single object (or nothing usable).
        if out.document_error.is_none() {
            match top.kind.as_deref() {
                Some("Status") => out.document_error = Some("the document is a Status, not an object".into()),
                _ => match std::str::from_utf8(input).ok().and_then(|s| serde_json::from_str::<&RawValue>(s).ok()) {
                    Some(raw) => push(&mut out, decode_item(raw, doc_kind, "the document")),
                    None => out.document_error = Some("not a JSON object".into()),
                },
            }
        }
        return out;
    }
    let list_kind = top.kind.as_deref().and_then(kind_of);
    out.objects.reserve(top.items.len());
    // A list comes sorted by namespace: consecutive items share one namespace string.
    // The strings that recur across the items of one document (namespaces, port names, node
    // names, zones) are allocated once per document (`state::State` shares them across
    // documents with an interner of its own).
    let mut ns = Interner::default();
    for (i, raw) in top.items.iter().enumerate() {
        // kubectl's `List` mixes kinds and every item says its own.
        let kind = match list_kind {
            Some(k) => Some(k),
            None => serde_json::from_str::<KindOnly>(raw.get())
                .ok()
                .and_then(|k| k.kind)
                .and_then(|k| kind_of(&k))
                .or(expect),
        };
        push(&mut out, decode_item_with(raw, kind, &|| format!("items[{i}]"), &mut ns));
    }
    out
}

fn push(out: &mut Decoded, r: Result<Object, ObjectError>) {
    match r {
        Ok(o) => out.objects.push(o),
        Err(e) => out.errors.push(e),
    }
}

fn describe_json_error(e: &serde_json::Error, items_before: usize) -> String {
    let what = if e.is_eof() { "the document ends early (truncated)" } else { "the document is not valid JSON" };
    format!(
        "{what} at line {} column {}: {e}; {items_before} item(s) before that point were read",
        e.line(),
        e.column()
    )
}

/// A present, non-empty text, shared.
fn shared_opt(ns: &mut Interner, s: Option<Text<'_>>) -> Option<Arc<str>> {
    s.filter(|s| !s.is_empty()).map(|s| ns.get(&s))
}

/// Decode one object of a known (or guessed) kind.
pub fn decode_item(raw: &RawValue, kind: Option<Kind>, position: &str) -> Result<Object, ObjectError> {
    decode_item_with(raw, kind, &|| position.to_string(), &mut Interner::default())
}

fn decode_item_with(
    raw: &RawValue,
    kind: Option<Kind>,
    position: &dyn Fn() -> String,
    ns: &mut Interner,
) -> Result<Object, ObjectError> {
    let kind = match kind {
        Some(k) => k,
        None => {
            let own = serde_json::from_str::<KindOnly>(raw.get()).ok().and_then(|k| k.kind);
            let key = key_as_given(raw);
            return Err(ObjectError {
                kind: None,
                object: key.as_ref().map_or_else(position, shown_key),
                key,
                field: "kind".into(),
                message: match own {
                    Some(k) => format!("kind {k:?} is not a Service, EndpointSlice or Endpoints"),
                    None => "no kind given and none expected here".into(),
                },
            });
        }
    };
    let fail = |field: String, message: String| {
        let key = key_as_given(raw);
        ObjectError { kind: Some(kind), object: key.as_ref().map_or_else(position, shown_key), key, field, message }
    };
    if raw.get().len() > MAX_OBJECT_BYTES {
        let size = raw.get().len();
        return Err(fail(
            String::new(),
            format!("the object is {size} bytes; at most {MAX_OBJECT_BYTES} (the API server's own request limit)"),
        ));
    }
    let check_kind = |own: &Option<String>| match own {
        Some(own) if kind_of(own) != Some(kind) => Err(("kind".to_string(), format!("expected {kind}, found {own:?}"))),
        _ => Ok(()),
    };
    let result = match kind {
        Kind::Service => typed::<RawService>(raw)
            .and_then(|r| check_kind(&r.kind).map(|()| r))
            .and_then(|r| service(r, ns))
            .map(Object::Service),
        Kind::EndpointSlice => typed::<RawSlice>(raw)
            .and_then(|r| check_kind(&r.kind).map(|()| r))
            .and_then(|r| slice(r, ns))
            .map(Object::Endpoints),
        Kind::Endpoints => typed::<RawEndpoints>(raw)
            .and_then(|r| check_kind(&r.kind).map(|()| r))
            .and_then(|r| endpoints(r, ns))
            .map(Object::Endpoints),
    };
    result.map_err(|(field, message)| fail(field, message))
}

/// `namespace/name` of an object, if its metadata can be read at all.
/// The key as the metadata gives it, unvalidated (for bookkeeping, never for rules).
fn key_as_given(raw: &RawValue) -> Option<ObjectKey> {
    let m = serde_json::from_str::<MetaOnly>(raw.get()).ok()?.metadata;
    (!m.name.is_empty()).then(|| ObjectKey::new(&m.namespace, &m.name))
}

/// `namespace/name` for messages: escaped when it holds anything but `[a-z0-9.-/]`, so a hostile
/// name cannot forge log lines.
fn shown_key(key: &ObjectKey) -> String {
    let full = key.to_string();
    let plain =
        full.len() <= 320 && full.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-./".contains(&b));
    if plain {
        full
    } else {
        names::shown(&full)
    }
}

pub(super) type FieldResult<T> = Result<T, (String, String)>;

fn typed<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> FieldResult<T> {
    // Fast path without path tracking; only a failure pays for a second pass that names the field.
    if let Ok(v) = serde_json::from_str(raw.get()) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends "at line 1 column N"; the field path says more.
        let msg = inner.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        (if path == "." { String::new() } else { path }, msg)
    })
}

/// The object's key; `name_rule` is Kubernetes' rule for this kind's names.
pub(super) fn key_of(
    meta: &RawMeta,
    ns: &mut Interner,
    name_rule: fn(&str) -> Option<String>,
) -> FieldResult<ObjectKey> {
    if meta.name.is_empty() {
        return Err(("metadata.name".into(), "missing".into()));
    }
    if meta.namespace.is_empty() {
        return Err(("metadata.namespace".into(), "missing".into()));
    }
    if let Some(why) = names::dns1123_label(&meta.namespace) {
        return Err(("metadata.namespace".into(), why));
    }
    if let Some(why) = name_rule(&meta.name) {
        return Err(("metadata.name".into(), why));
    }
    Ok(ObjectKey { namespace: ns.get(&meta.namespace), name: (*meta.name).into() })
}

/// A port name: empty, or a DNS-1123 label (Kubernetes' rule for service and endpoint ports).
fn port_name(name: Option<&str>, field: impl FnOnce() -> String) -> FieldResult<&str> {
    match name.unwrap_or_default() {
        "" => Ok(""),
        n => match names::dns1123_label(n) {
            None => Ok(n),
            Some(why) => Err((field(), why)),
        },
    }
}

fn port_number(v: i64, field: impl FnOnce() -> String) -> FieldResult<u16> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err((field(), format!("port {v} is out of range 1-65535"))),
    }
}

fn protocol(v: Option<&str>, field: impl FnOnce() -> String) -> FieldResult<Protocol> {
    match v {
        None | Some("") => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s).ok_or_else(|| (field(), format!("unknown protocol {s:?} (TCP, UDP or SCTP)"))),
    }
}

/// A cluster IP or endpoint address: an IP, and none that Kubernetes refuses as special.
fn ip(v: &str, field: impl FnOnce() -> String) -> FieldResult<IpAddr> {
    let Ok(addr) = v.parse::<IpAddr>() else {
        return Err((field(), format!("{} is not an IP address", names::shown(v))));
    };
    match names::special_ip(&addr) {
        None => Ok(addr),
        Some(why) => Err((field(), format!("{addr} is {why}, which cannot be a cluster IP or endpoint"))),
    }
}

fn labels(meta: &mut RawMeta) -> FieldResult<Labels> {
    Labels::new(meta.labels.take().unwrap_or_default())
        .map_err(|e| ("metadata.labels".into(), format!("label {:?} contains a NUL character", e.key)))
}

/// `spec.internalTrafficPolicy`: `Local`?
fn internal_local(policy: Option<&str>) -> FieldResult<bool> {
    match policy {
        None | Some("") | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(s) => Err(("spec.internalTrafficPolicy".into(), format!("unknown value {s:?} (Cluster or Local)"))),
    }
}

/// The annotation [`PROBE_INTERVAL_ANNOTATION`]: `<number><ms|s|m|h>`, 100ms-1h (the range of
/// `tcp.probeInterval`).
fn probe_interval(meta: &RawMeta) -> FieldResult<Option<Duration>> {
    let Some(v) = meta.annotations.as_ref().and_then(|a| a.get(PROBE_INTERVAL_ANNOTATION)) else {
        return Ok(None);
    };
    let v: &str = v;
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    match n.parse::<u64>().ok().filter(|_| ms_per > 0).map(|n| n.saturating_mul(ms_per)) {
        Some(ms) if (100..=3_600_000).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
        _ => Err((
            format!("metadata.annotations[{PROBE_INTERVAL_ANNOTATION}]"),
            format!("{} is not a duration in 100ms-1h (e.g. 5s)", names::shown(v)),
        )),
    }
}

/// The annotation [`DATA_PATH_ANNOTATION`]: a Service's own data path, if it says one.
fn data_path(meta: &RawMeta) -> FieldResult<Option<DataPath>> {
    let Some(v) = meta.annotations.as_ref().and_then(|a| a.get(DATA_PATH_ANNOTATION)) else {
        return Ok(None);
    };
    match DataPath::parse(v) {
        Some(p) => Ok(Some(p)),
        None => Err((
            format!("metadata.annotations[{DATA_PATH_ANNOTATION}]"),
            format!("unknown value {} (proxy or kernel)", names::shown(v)),
        )),
    }
}

fn service(mut raw: RawService, ns: &mut Interner) -> FieldResult<Service> {
    let key = key_of(&raw.metadata, ns, names::dns1123_label)?;
    let labels = labels(&mut raw.metadata)?;
    let data_path = data_path(&raw.metadata)?;
    let probe_interval = probe_interval(&raw.metadata)?;
    let spec = raw.spec;
    let service_type = match spec.service_type.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(t) => return Err(("spec.type".into(), format!("unknown service type {t:?}"))),
    };
    let mut headless = false;
    let (field, list): (&str, Vec<String>) = match (spec.cluster_ips, spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips),
        (_, Some(ip)) => ("spec.clusterIP", vec![ip]),
        _ => ("spec.clusterIP", Vec::new()),
    };
    let mut cluster_ips = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        match s.as_str() {
            "None" => headless = true,
            "" => {}
            s if service_type == ServiceType::ExternalName => {
                // ExternalName services have no cluster IP; tolerate leftovers, never use them.
                let _ = s;
            }
            s => cluster_ips.push(ip(s, || format!("{field}[{i}]"))?),
        }
    }
    if cluster_ips.len() == 2 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4() || cluster_ips.len() > 2 {
        return Err((field.into(), "at most one cluster IP per family".into()));
    }
    let raw_ports = spec.ports.unwrap_or_default();
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw_ports.len());
    // Duplicates are found in linear time (a Service may carry very many ports).
    let mut seen_port: HashMap<(u16, Protocol), usize> = HashMap::with_capacity(raw_ports.len());
    let mut seen_name: HashMap<Arc<str>, usize> = HashMap::with_capacity(raw_ports.len());
    for (i, p) in raw_ports.into_iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        let port = port_number(p.port, || at("port"))?;
        let proto = protocol(p.protocol.as_deref(), || at("protocol"))?;
        let target_port = match p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(n, || at("targetPort"))?),
            Some(IntOrString::Str(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::Str(s)) => match names::iana_svc_name(&s) {
                None => TargetPort::Name(s.into()),
                Some(why) => return Err((at("targetPort"), why)),
            },
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(n, || at("nodePort"))?),
        };
        let name = ns.get(port_name(p.name.as_deref(), || at("name"))?);
        if let Some(j) = seen_port.insert((port, proto), i) {
            return Err((format!("spec.ports[{i}]"), format!("duplicate port {port}/{proto} (also spec.ports[{j}])")));
        }
        if let Some(j) = seen_name.insert(name.clone(), i) {
            return Err((
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {name:?} (also spec.ports[{j}])"),
            ));
        }
        ports.push(ServicePort { name, protocol: proto, port, target_port, node_port });
    }
    // Held for hours: no spare capacity.
    cluster_ips.shrink_to_fit();
    ports.shrink_to_fit();
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => None,
        Some("ClientIP") => {
            let t =
                spec.session_affinity_config.and_then(|c| c.client_ip).and_then(|c| c.timeout_seconds).unwrap_or(10800);
            match u32::try_from(t) {
                Ok(secs) if (1..=86400).contains(&secs) => Some(secs),
                _ => {
                    return Err((
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{t} is outside 1-86400"),
                    ))
                }
            }
        }
        Some(s) => return Err(("spec.sessionAffinity".into(), format!("unknown value {s:?} (None or ClientIP)"))),
    };
    let internal_local = internal_local(spec.internal_traffic_policy.as_deref())?;
    Ok(Service {
        key,
        service_type,
        headless,
        cluster_ips,
        ports,
        affinity_timeout,
        internal_local,
        labels,
        data_path,
        probe_interval,
    })
}

fn endpoint_ports(raw: Option<Vec<RawPort>>, prefix: &str, ns: &mut Interner) -> FieldResult<Vec<EndpointPort>> {
    let raw = raw.unwrap_or_default();
    let mut ports = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("{prefix}[{i}].{f}");
        // A port without a number is "unrestricted"; kube-proxy skips those, so do we.
        let Some(n) = p.port else { continue };
        let port = port_number(n, || at("port"))?;
        let protocol = protocol(p.protocol.as_deref(), || at("protocol"))?;
        let name = port_name(p.name.as_deref(), || at("name"))?;
        ports.push(EndpointPort { name: ns.get(name), protocol, port });
    }
    ports.shrink_to_fit();
    Ok(ports)
}

fn slice(mut raw: RawSlice, ns: &mut Interner) -> FieldResult<EndpointSet> {
    let key = key_of(&raw.metadata, ns, names::dns1123_subdomain)?;
    let trigger_ms = trigger_time(&raw.metadata);
    let service_name = raw
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ("metadata.labels".to_string(), "no kubernetes.io/service-name label".to_string()))?;
    if let Some(why) = names::dns1123_label(service_name) {
        return Err(("metadata.labels[kubernetes.io/service-name]".into(), why));
    }
    let service = ObjectKey { namespace: key.namespace.clone(), name: (**service_name).into() };
    let v6 = match raw.address_type.as_deref() {
        Some("IPv4") => false,
        Some("IPv6") => true,
        // FQDN slices are valid but no proxy can use them.
        Some("FQDN") => {
            return Ok(EndpointSet { source: EndpointSource::Slice, key, service, groups: Vec::new(), trigger_ms });
        }
        other => return Err(("addressType".into(), format!("unknown address type {other:?} (IPv4, IPv6 or FQDN)"))),
    };
    let ports = endpoint_ports(raw.ports.take(), "ports", ns)?;
    let raw_endpoints = raw.endpoints.take().unwrap_or_default();
    let mut endpoints = Vec::with_capacity(raw_endpoints.len());
    for (i, e) in raw_endpoints.into_iter().enumerate() {
        // Every address must be valid, but only the first is the endpoint's (the others are
        // informational, and Kubernetes tells consumers to ignore them).
        let mut first = None;
        for (j, a) in e.addresses.iter().enumerate() {
            let addr = ip(a, || format!("endpoints[{i}].addresses[{j}]"))?;
            if addr.is_ipv6() != v6 {
                return Err((format!("endpoints[{i}].addresses[{j}]"), format!("{a} does not match addressType")));
            }
            first = first.or(Some(addr));
        }
        let Some(address) = first else {
            continue; // an endpoint without an address cannot be used
        };
        let ready = e.conditions.ready.unwrap_or(true);
        endpoints.push(Endpoint {
            address,
            ready,
            serving: e.conditions.serving.unwrap_or(ready),
            terminating: e.conditions.terminating.unwrap_or(false),
            node_name: shared_opt(ns, e.node_name),
            zone: shared_opt(ns, e.zone),
        });
    }
    endpoints.shrink_to_fit();
    Ok(EndpointSet {
        source: EndpointSource::Slice,
        key,
        service,
        groups: vec![EndpointGroup { ports, endpoints }],
        trigger_ms,
    })
}

/// The `endpoints.kubernetes.io/last-change-trigger-time` annotation, when present and valid
/// (informational: a bad one is ignored, never an error).
fn trigger_time(meta: &RawMeta) -> Option<u64> {
    let text = meta.annotations.as_ref()?.get("endpoints.kubernetes.io/last-change-trigger-time")?;
    crate::logging::parse_rfc3339_ms(text)
}

fn endpoints(raw: RawEndpoints, ns: &mut Interner) -> FieldResult<EndpointSet> {
    let key = key_of(&raw.metadata, ns, names::dns1123_subdomain)?;
    let trigger_ms = trigger_time(&raw.metadata);
    let mut groups = Vec::new();
    for (i, s) in raw.subsets.unwrap_or_default().into_iter().enumerate() {
        let ports = endpoint_ports(s.ports, &format!("subsets[{i}].ports"), ns)?;
        let mut endpoints = Vec::new();
        for (field, list, ready) in
            [("addresses", s.addresses, true), ("notReadyAddresses", s.not_ready_addresses, false)]
        {
            for (j, a) in list.unwrap_or_default().into_iter().enumerate() {
                let addr = ip(&a.ip, || format!("subsets[{i}].{field}[{j}].ip"))?;
                endpoints.push(Endpoint {
                    address: addr,
                    ready,
                    serving: ready,
                    terminating: false,
                    node_name: shared_opt(ns, a.node_name),
                    zone: None,
                });
            }
        }
        endpoints.shrink_to_fit();
        groups.push(EndpointGroup { ports, endpoints });
    }
    groups.shrink_to_fit();
    Ok(EndpointSet { source: EndpointSource::Endpoints, service: key.clone(), key, groups, trigger_ms })
}

#[cfg(test)]
#[path = "objects_tests.rs"]
mod tests;
