//! The offline cache: the last known good Services and endpoints, on disk, for a start without
//! the cloud (a reboot while the uplink is down).
//!
//! The file (`<stateDir>/cache.json`) is a JSON object: `edgeproxyCache` (the format version),
//! `checksum` (FNV-1a 64 of the exact bytes of `list`), `written` (RFC 3339) and `list`, a
//! kubectl-style `List` of the objects as the API server would send them, so that reading it
//! back goes through the same decoder and the same validation as any source (a cache is never
//! trusted blindly: a wrong version, a bad checksum, a broken document are refused whole, with
//! the reason, and a bad item is skipped like any bad object). `edgeproxy rules --from` reads the
//! `list` too, for a look at what a node would serve offline.
//!
//! Written atomically (a temporary file, fsync, rename, fsync of the directory), only from a
//! complete view, and bounded in size. Encoding is pure; [`write`] and [`read`] are the I/O.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::kube::objects::decode_document;
use crate::model::{EndpointSet, EndpointSource, Object, Protocol, Service, ServiceType, Snapshot, TargetPort};

/// The format version this binary writes and reads.
pub const VERSION: u32 = 1;
/// The file's name in the state directory.
pub const FILE: &str = "cache.json";
/// The largest cache written or read (10,000 Services and slices take about 8 MB).
pub const MAX_BYTES: u64 = 64 << 20;

/// Why a cache was not used.
#[derive(Debug)]
pub enum CacheError {
    Missing,
    Io(std::io::Error),
    /// Not a cache of this format (another program's file, another version).
    Foreign(String),
    /// The bytes do not match their checksum (a torn or edited file).
    Corrupt(String),
    TooBig(u64),
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Missing => f.write_str("no cache yet"),
            CacheError::Io(e) => write!(f, "cannot read or write it: {e}"),
            CacheError::Foreign(why) => write!(f, "not an edgeproxy cache of version {VERSION}: {why}"),
            CacheError::Corrupt(why) => write!(f, "corrupt: {why}"),
            CacheError::TooBig(n) => write!(f, "{n} bytes, more than the {MAX_BYTES} a cache may hold"),
        }
    }
}

impl std::error::Error for CacheError {}

/// A cache read back: the objects, what was skipped, and when it was written.
#[derive(Debug)]
pub struct Cached {
    pub objects: Vec<Object>,
    /// Items that did not decode (each named); the rest are used.
    pub skipped: Vec<String>,
    pub written: String,
}

/// FNV-1a, 64 bits: enough to tell a torn or edited file from a whole one.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The file's text for `snapshot`, written at `written` (RFC 3339).
pub fn encode(snapshot: &Snapshot, written: &str) -> String {
    let items: Vec<Value> =
        snapshot.services.values().map(service_json).chain(snapshot.endpoints.values().map(endpoints_json)).collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}).to_string();
    let sum = format!("{:016x}", checksum(list.as_bytes()));
    format!("{{\"edgeproxyCache\":{VERSION},\"checksum\":\"{sum}\",\"written\":{},\"list\":{list}}}\n", json!(written))
}

/// Read back what [`encode`] wrote (from any source: the bytes are checked, then decoded).
pub fn decode(bytes: &[u8]) -> Result<Cached, CacheError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct File<'a> {
        edgeproxy_cache: Option<u32>,
        checksum: Option<String>,
        written: Option<String>,
        #[serde(borrow)]
        list: Option<&'a RawValue>,
    }
    let file: File<'_> = serde_json::from_slice(bytes).map_err(|e| CacheError::Foreign(format!("not JSON: {e}")))?;
    match file.edgeproxy_cache {
        Some(VERSION) => {}
        Some(v) => return Err(CacheError::Foreign(format!("version {v}"))),
        None => return Err(CacheError::Foreign("no edgeproxyCache field".into())),
    }
    let list = file.list.ok_or_else(|| CacheError::Foreign("no list".into()))?;
    let want = file.checksum.ok_or_else(|| CacheError::Foreign("no checksum".into()))?;
    let got = format!("{:016x}", checksum(list.get().as_bytes()));
    if got != want {
        return Err(CacheError::Corrupt(format!("checksum {got}, the file says {want}")));
    }
    let decoded = decode_document(list.get().as_bytes(), None);
    if let Some(e) = decoded.document_error {
        return Err(CacheError::Corrupt(e));
    }
    Ok(Cached {
        objects: decoded.objects,
        skipped: decoded.errors.iter().map(ToString::to_string).collect(),
        written: file.written.unwrap_or_default(),
    })
}

/// Write `text` as the cache in `dir`: a temporary file, fsync, rename over the old one, fsync
/// of the directory. A crash at any point leaves the old cache or the new one, never a mix.
pub fn write(dir: &Path, text: &str) -> Result<PathBuf, CacheError> {
    let len = u64::try_from(text.len()).unwrap_or(u64::MAX);
    if len > MAX_BYTES {
        return Err(CacheError::TooBig(len));
    }
    std::fs::create_dir_all(dir).map_err(CacheError::Io)?;
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.new"));
    let mut f = std::fs::File::create(&tmp).map_err(CacheError::Io)?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(CacheError::Io)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(CacheError::Io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(CacheError::Io)?;
    Ok(path)
}

/// Read and check the cache in `dir`.
pub fn read(dir: &Path) -> Result<Cached, CacheError> {
    let path = dir.join(FILE);
    match crate::capped::read(&path, MAX_BYTES) {
        Ok(bytes) => decode(&bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CacheError::Missing),
        Err(e) => Err(CacheError::Io(e)),
    }
}

/// A protocol as the API spells it.
fn api_protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn metadata(key: &crate::model::ObjectKey, labels: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(&*key.name));
    m.insert("namespace".into(), json!(&*key.namespace));
    if let Some(l) = labels {
        m.insert("labels".into(), l);
    }
    Value::Object(m)
}

fn service_json(s: &Service) -> Value {
    let labels: Map<String, Value> = s.labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| {
            let mut o = json!({"name": &*p.name, "protocol": api_protocol(p.protocol), "port": p.port});
            o["targetPort"] = match &p.target_port {
                TargetPort::Number(n) => json!(n),
                TargetPort::Name(n) => json!(&**n),
            };
            if let Some(n) = p.node_port {
                o["nodePort"] = json!(n);
            }
            o
        })
        .collect();
    let ips: Vec<String> = s.cluster_ips.iter().map(ToString::to_string).collect();
    let mut spec = json!({
        "type": match s.service_type {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        },
        "ports": ports,
        "internalTrafficPolicy": if s.internal_local { "Local" } else { "Cluster" },
    });
    if s.headless {
        spec["clusterIP"] = json!("None");
    } else if !ips.is_empty() {
        spec["clusterIPs"] = json!(ips);
    }
    if let Some(t) = s.affinity_timeout {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    let mut meta = metadata(&s.key, Some(Value::Object(labels)));
    let mut annotations = Map::new();
    if let Some(p) = s.data_path {
        annotations.insert(crate::model::DATA_PATH_ANNOTATION.into(), json!(p.as_str()));
    }
    if let Some(i) = s.probe_interval {
        annotations.insert(crate::model::PROBE_INTERVAL_ANNOTATION.into(), json!(format!("{}ms", i.as_millis())));
    }
    if !annotations.is_empty() {
        meta["annotations"] = Value::Object(annotations);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec})
}

fn endpoint_ports(ports: &[crate::model::EndpointPort]) -> Vec<Value> {
    ports.iter().map(|p| json!({"name": &*p.name, "protocol": api_protocol(p.protocol), "port": p.port})).collect()
}

fn endpoints_json(e: &EndpointSet) -> Value {
    match e.source {
        EndpointSource::Slice => {
            let labels = json!({"kubernetes.io/service-name": &*e.service.name});
            let group = e.groups.first();
            let address_type = match group.and_then(|g| g.endpoints.first()) {
                _ if e.groups.is_empty() => "FQDN",
                Some(ep) if ep.address.is_ipv6() => "IPv6",
                _ => "IPv4",
            };
            let endpoints: Vec<Value> = group
                .map(|g| &g.endpoints[..])
                .unwrap_or_default()
                .iter()
                .map(|ep| {
                    let mut o = json!({
                        "addresses": [ep.address.to_string()],
                        "conditions": {"ready": ep.ready, "serving": ep.serving, "terminating": ep.terminating},
                    });
                    if let Some(n) = &ep.node_name {
                        o["nodeName"] = json!(&**n);
                    }
                    if let Some(z) = &ep.zone {
                        o["zone"] = json!(&**z);
                    }
                    o
                })
                .collect();
            let mut meta = metadata(&e.key, Some(labels));
            if let Some(ms) = e.trigger_ms {
                meta["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time":
                    crate::logging::rfc3339(std::time::Duration::from_millis(ms))});
            }
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": meta,
                "addressType": address_type,
                "endpoints": endpoints,
                "ports": group.map(|g| endpoint_ports(&g.ports)).unwrap_or_default(),
            })
        }
        EndpointSource::Endpoints => {
            let subsets: Vec<Value> = e
                .groups
                .iter()
                .map(|g| {
                    let address = |ep: &crate::model::Endpoint| {
                        let mut o = json!({"ip": ep.address.to_string()});
                        if let Some(n) = &ep.node_name {
                            o["nodeName"] = json!(&**n);
                        }
                        o
                    };
                    let ready: Vec<Value> = g.endpoints.iter().filter(|ep| ep.ready).map(address).collect();
                    let not_ready: Vec<Value> = g.endpoints.iter().filter(|ep| !ep.ready).map(address).collect();
                    json!({"addresses": ready, "notReadyAddresses": not_ready, "ports": endpoint_ports(&g.ports)})
                })
                .collect();
            json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": metadata(&e.key, None), "subsets": subsets})
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
