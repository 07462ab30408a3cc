//! Decoding the API server's JSON into `model` types.
//!
//! Lenient with what we do not use (unknown fields, `managedFields`, status), strict with what we
//! do: a bad field makes that one object an [`ObjectError`] naming kind, namespace/name, field and
//! why, and the rest of the document still counts. A document cut short keeps the items decoded
//! before the cut.
//!
//! Accepted shapes: a single object, a typed list (`ServiceList`, `EndpointSliceList`,
//! `EndpointsList`), kubectl's `List`, and watch events (one JSON object per line).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::names;
use crate::model::{
    Endpoint, EndpointGroup, EndpointPort, EndpointSet, EndpointSource, Kind, Labels, Object, ObjectKey, Protocol,
    Service, ServicePort, ServiceType, TargetPort,
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

/// A `metav1.Status`, as returned with 4xx/5xx responses and in watch `ERROR` events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Status {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

impl Status {
    /// `410 Gone` / `Expired`: the resourceVersion is too old; relist.
    pub fn is_expired(&self) -> bool {
        self.code == 410 || self.reason == "Expired" || self.reason == "Gone"
    }
}

/// One watch event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Added(Object),
    Modified(Object),
    /// Only the key is decoded: a delete must go through even for an object we could not parse.
    Deleted(Kind, ObjectKey),
    Bookmark,
    Error(Status),
}

/// A decoded watch line: the event and the resourceVersion it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchLine {
    pub event: WatchEvent,
    pub resource_version: Option<String>,
}

// ---- raw shapes: only the fields we read -------------------------------------------------------
//
// Strings that are read once per item borrow from the input (`Text`): a copy is made only for
// what is kept, or when the JSON string has escapes.

/// A JSON string, borrowed from the input unless it has escapes. (serde's own `Cow` support
/// borrows only for a field that is exactly `Cow<str>`, not inside `Option`, `Vec` or maps.)
#[derive(Default, PartialEq, Eq, PartialOrd, Ord)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawMeta<'a> {
    #[serde(borrow)]
    name: Text<'a>,
    #[serde(borrow)]
    namespace: Text<'a>,
    resource_version: Option<String>,
    #[serde(borrow)]
    labels: Option<BTreeMap<Text<'a>, Text<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawListMeta {
    resource_version: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort<'a> {
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
    #[serde(default, borrow)]
    protocol: Option<Text<'a>>,
    port: i64,
    #[serde(default)]
    target_port: Option<IntOrString>,
    #[serde(default)]
    node_port: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawClientIp {
    #[serde(rename = "timeoutSeconds")]
    timeout_seconds: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<RawClientIp>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawServiceSpec<'a> {
    #[serde(rename = "type")]
    service_type: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(borrow)]
    ports: Option<Vec<RawServicePort<'a>>>,
    session_affinity: Option<String>,
    session_affinity_config: Option<RawAffinityConfig>,
    internal_traffic_policy: Option<String>,
}

#[derive(Deserialize)]
struct RawService<'a> {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    metadata: RawMeta<'a>,
    #[serde(default, borrow)]
    spec: RawServiceSpec<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSliceEndpoint<'a> {
    #[serde(default, borrow)]
    addresses: Addresses<'a>,
    #[serde(default)]
    conditions: RawConditions,
    #[serde(default, borrow)]
    node_name: Option<Text<'a>>,
    #[serde(default, borrow)]
    zone: Option<Text<'a>>,
}

/// An endpoint's `addresses`: almost always exactly one, so the first is kept inline and only
/// further ones (informational, but still validated) take an allocation.
#[derive(Default)]
struct Addresses<'a> {
    first: Option<Text<'a>>,
    rest: Vec<Text<'a>>,
}

impl<'a> Addresses<'a> {
    fn iter(&self) -> impl Iterator<Item = &Text<'a>> {
        self.first.iter().chain(self.rest.iter())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Addresses<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Addresses<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of addresses")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Addresses<'a>, S::Error> {
                let mut out = Addresses { first: seq.next_element()?, rest: Vec::new() };
                while let Some(a) = seq.next_element()? {
                    out.rest.push(a);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawPort<'a> {
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
    #[serde(default, borrow)]
    protocol: Option<Text<'a>>,
    #[serde(default)]
    port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSlice<'a> {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    metadata: RawMeta<'a>,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default, borrow)]
    endpoints: Option<Vec<RawSliceEndpoint<'a>>>,
    #[serde(default, borrow)]
    ports: Option<Vec<RawPort<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAddress<'a> {
    #[serde(borrow)]
    ip: Text<'a>,
    #[serde(default, borrow)]
    node_name: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawSubset<'a> {
    #[serde(borrow)]
    addresses: Option<Vec<RawAddress<'a>>>,
    #[serde(borrow)]
    not_ready_addresses: Option<Vec<RawAddress<'a>>>,
    #[serde(borrow)]
    ports: Option<Vec<RawPort<'a>>>,
}

#[derive(Deserialize)]
struct RawEndpoints<'a> {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    metadata: RawMeta<'a>,
    #[serde(default, borrow)]
    subsets: Option<Vec<RawSubset<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct KindOnly {
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MetaOnly<'a> {
    #[serde(borrow)]
    metadata: RawMeta<'a>,
}

// ---- documents ---------------------------------------------------------------------------------

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

/// Top-level fields collected while streaming through a document; items are borrowed from the
/// input and kept even when the document breaks off later.
#[derive(Default)]
struct Top<'a> {
    kind: Option<String>,
    meta: RawListMeta,
    items: Vec<&'a RawValue>,
    has_items: bool,
}

struct TopSeed<'t, 'a>(&'t mut Top<'a>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for TopSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for TopSeed<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object or list")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<&str>()? {
            match key {
                "kind" => self.0.kind = map.next_value()?,
                "metadata" => self.0.meta = map.next_value()?,
                "items" => {
                    self.0.has_items = true;
                    map.next_value_seed(ItemsSeed(&mut self.0.items))?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct ItemsSeed<'t, 'a>(&'t mut Vec<&'a RawValue>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for ItemsSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ItemsSeed<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of items")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(()) // "items": null
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(item) = seq.next_element::<&RawValue>()? {
            self.0.push(item);
        }
        Ok(())
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
    let mut ns = Strings::default();
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

/// The strings that recur across the items of one document (namespaces, port names, node
/// names, zones), each allocated once per document instead of once per use. Local to one
/// document: no global state (`state::State` shares them across documents).
#[derive(Default)]
struct Strings {
    set: BTreeSet<Arc<str>>,
}

impl Strings {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.set.insert(a.clone());
        a
    }

    fn get_opt(&mut self, s: Option<Text<'_>>) -> Option<Arc<str>> {
        s.filter(|s| !s.is_empty()).map(|s| self.get(&s))
    }
}

/// Decode one object of a known (or guessed) kind.
pub fn decode_item(raw: &RawValue, kind: Option<Kind>, position: &str) -> Result<Object, ObjectError> {
    decode_item_with(raw, kind, &|| position.to_string(), &mut Strings::default())
}

fn decode_item_with(
    raw: &RawValue,
    kind: Option<Kind>,
    position: &dyn Fn() -> String,
    ns: &mut Strings,
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

type FieldResult<T> = Result<T, (String, String)>;

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
fn key_of(meta: &RawMeta, ns: &mut Strings, name_rule: fn(&str) -> Option<String>) -> FieldResult<ObjectKey> {
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

fn service(mut raw: RawService, ns: &mut Strings) -> FieldResult<Service> {
    let key = key_of(&raw.metadata, ns, names::dns1123_label)?;
    let labels = labels(&mut raw.metadata)?;
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
            if !(1..=86400).contains(&t) {
                return Err((
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    format!("{t} is outside 1-86400"),
                ));
            }
            Some(t as u32)
        }
        Some(s) => return Err(("spec.sessionAffinity".into(), format!("unknown value {s:?} (None or ClientIP)"))),
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(s) => {
            return Err(("spec.internalTrafficPolicy".into(), format!("unknown value {s:?} (Cluster or Local)")))
        }
    };
    Ok(Service { key, service_type, headless, cluster_ips, ports, affinity_timeout, internal_local, labels })
}

fn endpoint_ports(raw: Option<Vec<RawPort>>, prefix: &str, ns: &mut Strings) -> FieldResult<Vec<EndpointPort>> {
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

fn slice(mut raw: RawSlice, ns: &mut Strings) -> FieldResult<EndpointSet> {
    let key = key_of(&raw.metadata, ns, names::dns1123_subdomain)?;
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
            return Ok(EndpointSet { source: EndpointSource::Slice, key, service, groups: Vec::new() });
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
            node_name: ns.get_opt(e.node_name),
            zone: ns.get_opt(e.zone),
        });
    }
    endpoints.shrink_to_fit();
    Ok(EndpointSet { source: EndpointSource::Slice, key, service, groups: vec![EndpointGroup { ports, endpoints }] })
}

fn endpoints(raw: RawEndpoints, ns: &mut Strings) -> FieldResult<EndpointSet> {
    let key = key_of(&raw.metadata, ns, names::dns1123_subdomain)?;
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
                    node_name: ns.get_opt(a.node_name),
                    zone: None,
                });
            }
        }
        endpoints.shrink_to_fit();
        groups.push(EndpointGroup { ports, endpoints });
    }
    groups.shrink_to_fit();
    Ok(EndpointSet { source: EndpointSource::Endpoints, service: key.clone(), key, groups })
}

// ---- watch events ------------------------------------------------------------------------------

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    object: Option<&'a RawValue>,
}

/// Why a watch line could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not a JSON watch event at all (garbage, truncated line).
    Garbage(String),
    /// A well-formed event whose object is bad; the event is skipped.
    Object(ObjectError),
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::Garbage(m) => write!(f, "unusable watch line: {m}"),
            LineError::Object(e) => write!(f, "skipped watch event: {e}"),
        }
    }
}

/// Decode one line of a watch stream of `kind` objects.
pub fn decode_watch_line(line: &[u8], kind: Kind) -> Result<WatchLine, LineError> {
    let text = std::str::from_utf8(line).map_err(|_| LineError::Garbage("not UTF-8".into()))?;
    let ev: RawEvent = serde_json::from_str(text).map_err(|e| LineError::Garbage(e.to_string()))?;
    let object = ev.object.ok_or_else(|| LineError::Garbage("event without an object".into()))?;
    let rv = || serde_json::from_str::<MetaOnly>(object.get()).ok().and_then(|m| m.metadata.resource_version);
    let event = match ev.event_type.as_str() {
        "ADDED" | "MODIFIED" => {
            let obj = decode_item(object, Some(kind), "the event object").map_err(LineError::Object)?;
            match ev.event_type.as_str() {
                "ADDED" => WatchEvent::Added(obj),
                _ => WatchEvent::Modified(obj),
            }
        }
        "DELETED" => {
            let meta = serde_json::from_str::<MetaOnly>(object.get())
                .map_err(|e| LineError::Garbage(format!("DELETED object without metadata: {e}")))?
                .metadata;
            let rule = if kind == Kind::Service { names::dns1123_label } else { names::dns1123_subdomain };
            let key = key_of(&meta, &mut Strings::default(), rule).map_err(|(field, message)| {
                LineError::Object(ObjectError {
                    kind: Some(kind),
                    object: "DELETED object".into(),
                    key: None,
                    field,
                    message,
                })
            })?;
            WatchEvent::Deleted(kind, key)
        }
        "BOOKMARK" => WatchEvent::Bookmark,
        "ERROR" => {
            let status: Status = serde_json::from_str(object.get())
                .map_err(|e| LineError::Garbage(format!("ERROR event without a Status: {e}")))?;
            return Ok(WatchLine { event: WatchEvent::Error(status), resource_version: None });
        }
        other => return Err(LineError::Garbage(format!("unknown event type {other:?}"))),
    };
    Ok(WatchLine { event, resource_version: rv() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = r#"{"metadata":{"name":"a","namespace":"n","labels":{"z":"1","b":"2"}},
        "spec":{"clusterIP":"10.96.0.5","ports":[{"name":"http","port":80,"targetPort":"web"},
        {"name":"dns","protocol":"UDP","port":53,"targetPort":5353}],"sessionAffinity":"ClientIP"}}"#;

    #[test]
    fn single_service() {
        let d = decode_document(SVC.as_bytes(), Some(Kind::Service));
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let Object::Service(s) = &d.objects[0] else { panic!() };
        assert_eq!(s.cluster_ips, vec!["10.96.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports[0].target_port, TargetPort::Name("web".into()));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.affinity_timeout, Some(10800));
        assert_eq!(s.label("b"), Some("2"));
    }

    #[test]
    fn bad_port_names_object_and_field() {
        let doc = r#"{"kind":"ServiceList","items":[
            {"metadata":{"name":"ok","namespace":"n"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":1}]}},
            {"metadata":{"name":"bad","namespace":"n"},"spec":{"clusterIP":"10.0.0.2","ports":[{"port":70000}]}}]}"#;
        let d = decode_document(doc.as_bytes(), None);
        assert_eq!(d.objects.len(), 1);
        assert_eq!(d.errors[0].to_string(), "Service n/bad: spec.ports[0].port: port 70000 is out of range 1-65535");
    }

    #[test]
    fn truncated_list_keeps_earlier_items() {
        let doc = r#"{"kind":"ServiceList","metadata":{"resourceVersion":"7"},"items":[
            {"metadata":{"name":"ok","namespace":"n"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":1}]}},
            {"metadata":{"name":"cut","namespace":"n"},"spec":{"clus"#;
        let d = decode_document(doc.as_bytes(), None);
        assert_eq!(d.objects.len(), 1);
        assert!(d.document_error.as_deref().unwrap().contains("truncated"), "{:?}", d.document_error);
    }

    #[test]
    fn bookmark_and_error_lines() {
        let b = br#"{"type":"BOOKMARK","object":{"kind":"Service","apiVersion":"v1","metadata":{"resourceVersion":"548","creationTimestamp":null},"spec":{},"status":{"loadBalancer":{}}}}"#;
        let l = decode_watch_line(b, Kind::Service).unwrap();
        assert_eq!(l.event, WatchEvent::Bookmark);
        assert_eq!(l.resource_version.as_deref(), Some("548"));
        let e = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 553 (563)","reason":"Expired","code":410}}"#;
        let WatchEvent::Error(s) = decode_watch_line(e, Kind::Service).unwrap().event else { panic!() };
        assert!(s.is_expired());
        assert!(matches!(decode_watch_line(b"{\"type\":", Kind::Service), Err(LineError::Garbage(_))));
    }

    #[test]
    fn endpoint_keeps_its_first_address_and_validates_the_rest() {
        let doc = r#"{"metadata":{"name":"s-1","namespace":"n","labels":{"kubernetes.io/service-name":"s"}},
            "addressType":"IPv4","endpoints":[{"addresses":["192.0.2.1","192.0.2.2"],"nodeName":"node-1","zone":"z"},
            {"addresses":[]},{"addresses":["192.0.2.3"],"nodeName":"node-1","zone":"z"}],"ports":[{"name":"http","port":80}]}"#;
        let d = decode_document(doc.as_bytes(), Some(Kind::EndpointSlice));
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let Object::Endpoints(set) = &d.objects[0] else { panic!() };
        let eps = &set.groups[0].endpoints;
        let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["192.0.2.1", "192.0.2.3"], "the address-less endpoint is not kept");
        assert_eq!((eps[0].node_name.as_deref(), eps[0].zone.as_deref()), (Some("node-1"), Some("z")));
        assert!(Arc::ptr_eq(eps[0].node_name.as_ref().unwrap(), eps[1].node_name.as_ref().unwrap()));
        assert!(Arc::ptr_eq(eps[0].zone.as_ref().unwrap(), eps[1].zone.as_ref().unwrap()));
        assert_eq!(set.service, ObjectKey::new("n", "s"));
        assert!(Arc::ptr_eq(&set.key.namespace, &set.service.namespace));
        let bad = doc.replace(r#""192.0.2.2""#, r#""fd00::2""#);
        let d = decode_document(bad.as_bytes(), Some(Kind::EndpointSlice));
        assert_eq!(
            d.errors[0].to_string(),
            "EndpointSlice n/s-1: endpoints[0].addresses[1]: fd00::2 does not match addressType"
        );
    }

    #[test]
    fn label_with_nul_is_refused_by_name() {
        let doc = r#"{"metadata":{"name":"a","namespace":"n","labels":{"ok":"1","bad":"x\u0000y"}},"spec":{"clusterIP":"10.0.0.1"}}"#;
        let d = decode_document(doc.as_bytes(), Some(Kind::Service));
        assert_eq!(d.errors[0].to_string(), r#"Service n/a: metadata.labels: label "bad" contains a NUL character"#);
    }

    #[test]
    fn a_list_shares_recurring_strings_between_items() {
        let doc = r#"{"kind":"ServiceList","items":[
            {"metadata":{"name":"a","namespace":"n"},"spec":{"clusterIP":"10.0.0.1"}},
            {"metadata":{"name":"b","namespace":"n"},"spec":{"clusterIP":"10.0.0.2"}},
            {"metadata":{"name":"c","namespace":"m"},"spec":{"clusterIP":"10.0.0.3"}},
            {"metadata":{"name":"d","namespace":"n"},"spec":{"clusterIP":"10.0.0.4","ports":[{"name":"http","port":80}]}},
            {"metadata":{"name":"e","namespace":"m"},"spec":{"clusterIP":"10.0.0.5","ports":[{"name":"http","port":80}]}}]}"#;
        let d = decode_document(doc.as_bytes(), None);
        let ns: Vec<&Arc<str>> = d.objects.iter().map(|o| &o.key().namespace).collect();
        assert!(Arc::ptr_eq(ns[0], ns[1]) && Arc::ptr_eq(ns[0], ns[3]) && Arc::ptr_eq(ns[2], ns[4]));
        assert_eq!((&**ns[0], &**ns[2]), ("n", "m"));
        let port = |i: usize| match &d.objects[i] {
            Object::Service(s) => s.ports[0].name.clone(),
            _ => unreachable!(),
        };
        assert!(Arc::ptr_eq(&port(3), &port(4)));
    }

    #[test]
    fn text_borrows_unless_escaped_also_inside_containers() {
        let m: BTreeMap<Text, Option<Text>> = serde_json::from_str(r#"{"plain":"v","esc\u0041":"x\ny"}"#).unwrap();
        let (k1, v1) = m.iter().find(|(k, _)| &***k == "plain").unwrap();
        assert!(matches!((&k1.0, &v1.as_ref().unwrap().0), (Cow::Borrowed(_), Cow::Borrowed("v"))));
        let (k2, v2) = m.iter().find(|(k, _)| &***k == "escA").unwrap();
        assert!(matches!((&k2.0, &v2.as_ref().unwrap().0), (Cow::Owned(_), Cow::Owned(_))));
        assert_eq!(&**v2.as_ref().unwrap(), "x\ny");
    }

    #[test]
    fn every_address_is_validated_with_its_path_but_only_the_first_kept() {
        let doc = r#"{"metadata":{"name":"s-1","namespace":"n","labels":{"kubernetes.io/service-name":"s"}},
            "addressType":"IPv4","endpoints":[{"addresses":["192.0.2.1","192.0.2.2",7]}]}"#;
        let d = decode_document(doc.as_bytes(), Some(Kind::EndpointSlice));
        assert_eq!(d.errors.len(), 1);
        assert!(
            d.errors[0].to_string().starts_with("EndpointSlice n/s-1: endpoints[0].addresses[2]: invalid type"),
            "{}",
            d.errors[0]
        );
        let null = doc.replace(r#"["192.0.2.1","192.0.2.2",7]"#, "null");
        let d = decode_document(null.as_bytes(), Some(Kind::EndpointSlice));
        assert!(d.errors[0].to_string().contains("endpoints[0].addresses: invalid type: null"), "{}", d.errors[0]);
    }
}
