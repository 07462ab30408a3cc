//! The config file as written: every field optional, `deny_unknown_fields` everywhere, EdgeMesh-like
//! names. Flags are folded into this same shape (`apply_override`), so one set of checks covers
//! both and an error names the flag it came from.

use serde::Deserialize;

/// The file as written. Every field optional; `deny_unknown_fields` everywhere.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    /// `v1.17` (default) | `v1.9`: the EdgeMesh generation whose filter and layout defaults
    /// to take; every setting below still overrides its part.
    pub edgemesh: Option<String>,
    /// `FilterIfLabelExists` | `FilterIfLabelDoesNotExists` (EdgeMesh's key and values) | `None`
    /// (the label means nothing, as in EdgeMesh v1.9). Default from `edgemesh`.
    pub service_filter_mode: Option<String>,
    /// Honour the old opt-out label `noproxy=edgemesh` (default from `edgemesh`: v1.17 no,
    /// v1.9 yes).
    pub no_proxy_label: Option<bool>,
    /// `auto` | `on` | `off`: ignore default/kubernetes and kube-system kube-dns services.
    pub default_ignores: Option<String>,
    /// `portals` | `root-chain`.
    pub layout: Option<String>,
    /// Service CIDRs, used by the `root-chain` layout's catch rule. Spelled `serviceCIDRs`, as
    /// the README, the messages and Kubernetes (`--service-cluster-ip-range`'s docs) write it.
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Option<Vec<String>>,
    /// This node's name (`NODE_NAME` in EdgeMesh), for `internalTrafficPolicy: Local`.
    pub node_name: Option<String>,
    pub listen: Option<ListenFile>,
    pub source: Option<SourceFile>,
    pub load_balancer: Option<String>,
    /// `proxy` | `kernel`: how proxied services reach endpoints (a Service's annotation wins).
    pub data_path: Option<String>,
    /// `"auto"` or a number: the proxy's event loops.
    pub workers: Option<CountOrWord>,
    /// Pin each worker to a CPU of its own (default false).
    pub pin_workers: Option<bool>,
    pub tcp: Option<TcpFile>,
    pub udp: Option<UdpFile>,
    pub iptables: Option<IptablesFile>,
    /// `127.0.0.1:10551`, or "" for none.
    pub metrics_address: Option<String>,
    /// Where the last known good Services and endpoints are kept for a start without the cloud
    /// (`cache.json`); "" for no cache.
    pub state_dir: Option<String>,
    /// Where the instance lock and the record of the addresses the agent added live.
    pub run_dir: Option<String>,
    /// How long a start waits for the source's first complete list before it installs from the
    /// cache.
    pub offline_after: Option<String>,
}

/// A setting written as a number or as a word (`"workers": 2` or `"workers": "auto"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CountOrWord {
    Count(u64),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenFile {
    /// The proxy's IPv4 address (EdgeMesh's `bridgeDeviceIP`, default 169.254.96.16).
    pub ip: Option<String>,
    pub ipv6: Option<String>,
    /// Interface the addresses are put on (default `lo`); "" to manage them yourself.
    pub device: Option<String>,
    /// The one TCP listener every TCP DNAT points at.
    pub tcp_port: Option<u16>,
    /// `first-last`: one UDP socket per UDP service port is allocated from here.
    pub udp_ports: Option<String>,
    /// Firewall mark on the proxy's upstream sockets; the chain the node's own traffic enters
    /// lets marked packets pass first, so the proxy can never dial itself. 0 turns it off.
    pub mark: Option<u32>,
    /// A port nothing listens on: DNAT target for service ports without endpoints, so the
    /// kernel refuses them at once.
    pub reject_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceFile {
    /// `kube` (default: flags, kubeconfig, in-cluster, then MetaServer), `metaserver`, or
    /// `file:PATH`.
    pub kind: Option<String>,
    pub kubeconfig: Option<String>,
    pub server: Option<String>,
    pub token_file: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub meta_server: Option<String>,
    /// `false`: poll with full lists instead of watching.
    pub watch: Option<bool>,
    pub poll_interval: Option<String>,
    /// `auto` | `endpointslices` | `endpoints`.
    pub endpoints_api: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpFile {
    pub dial_timeout: Option<String>,
    pub dial_attempts: Option<u32>,
    pub buffer_size: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    /// Absent: connections are never closed for being idle.
    pub idle_timeout: Option<String>,
    /// Absent: no active probes.
    pub probe_interval: Option<String>,
    pub probes_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct UdpFile {
    pub idle_timeout: Option<String>,
    pub max_flows: Option<usize>,
    pub max_flows_per_source: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IptablesFile {
    /// `auto` | `nft` | `legacy`.
    pub backend: Option<String>,
    pub min_sync_period: Option<String>,
    pub guard_period: Option<String>,
    pub resync_period: Option<String>,
}

/// Fold one `--flag value` into the file shape; returns the file path it stands for.
pub(super) fn apply_override(f: &mut FileConfig, flag: &str, v: &str) -> Result<&'static str, String> {
    if let Some(path) = top_level_flag(f, flag, v)? {
        return Ok(path);
    }
    if let Some(path) = source_flag(f.source.get_or_insert_with(SourceFile::default), flag, v)? {
        return Ok(path);
    }
    let s = v.to_string();
    Ok(match flag {
        "listen-ip" => {
            f.listen.get_or_insert_with(ListenFile::default).ip = Some(s);
            "listen.ip"
        }
        "tcp-port" => {
            f.listen.get_or_insert_with(ListenFile::default).tcp_port = Some(num(v)?);
            "listen.tcpPort"
        }
        "iptables-backend" => {
            f.iptables.get_or_insert_with(IptablesFile::default).backend = Some(s);
            "iptables.backend"
        }
        "min-sync-period" => {
            f.iptables.get_or_insert_with(IptablesFile::default).min_sync_period = Some(s);
            "iptables.minSyncPeriod"
        }
        "guard-period" => {
            f.iptables.get_or_insert_with(IptablesFile::default).guard_period = Some(s);
            "iptables.guardPeriod"
        }
        "resync-period" => {
            f.iptables.get_or_insert_with(IptablesFile::default).resync_period = Some(s);
            "iptables.resyncPeriod"
        }
        other => return Err(format!("edgeproxy does not know the flag --{other}")),
    })
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{v:?} is not a valid number"))
}

fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not true or false")),
    }
}

/// The flags of the file's top-level fields.
fn top_level_flag(f: &mut FileConfig, flag: &str, v: &str) -> Result<Option<&'static str>, String> {
    let s = v.to_string();
    Ok(Some(match flag {
        "edgemesh" => {
            f.edgemesh = Some(s);
            "edgemesh"
        }
        "service-filter-mode" => {
            f.service_filter_mode = Some(s);
            "serviceFilterMode"
        }
        "no-proxy-label" => {
            f.no_proxy_label = Some(boolean(v)?);
            "noProxyLabel"
        }
        "default-ignores" => {
            f.default_ignores = Some(s);
            "defaultIgnores"
        }
        "layout" => {
            f.layout = Some(s);
            "layout"
        }
        "service-cidr" => {
            f.service_cidrs = Some(v.split(',').map(str::to_string).collect());
            "serviceCIDRs"
        }
        "node-name" => {
            f.node_name = Some(s);
            "nodeName"
        }
        "load-balancer" => {
            f.load_balancer = Some(s);
            "loadBalancer"
        }
        "data-path" => {
            f.data_path = Some(s);
            "dataPath"
        }
        "workers" => {
            f.workers = Some(CountOrWord::Word(s));
            "workers"
        }
        "state-dir" => {
            f.state_dir = Some(s);
            "stateDir"
        }
        "run-dir" => {
            f.run_dir = Some(s);
            "runDir"
        }
        "offline-after" => {
            f.offline_after = Some(s);
            "offlineAfter"
        }
        "metrics-address" => {
            f.metrics_address = Some(s);
            "metricsAddress"
        }
        _ => return Ok(None),
    }))
}

/// The flags of `source.*`.
fn source_flag(src: &mut SourceFile, flag: &str, v: &str) -> Result<Option<&'static str>, String> {
    let s = v.to_string();
    Ok(Some(match flag {
        "source" => {
            src.kind = Some(s);
            "source.kind"
        }
        "kubeconfig" => {
            src.kubeconfig = Some(s);
            "source.kubeconfig"
        }
        "server" => {
            src.server = Some(s);
            "source.server"
        }
        "token-file" => {
            src.token_file = Some(s);
            "source.tokenFile"
        }
        "ca-file" => {
            src.ca_file = Some(s);
            "source.caFile"
        }
        "client-cert" => {
            src.client_cert = Some(s);
            "source.clientCert"
        }
        "client-key" => {
            src.client_key = Some(s);
            "source.clientKey"
        }
        "metaserver" => {
            src.meta_server = Some(s);
            "source.metaServer"
        }
        "watch" => {
            src.watch = Some(boolean(v)?);
            "source.watch"
        }
        "poll-interval" => {
            src.poll_interval = Some(s);
            "source.pollInterval"
        }
        "endpoints-api" => {
            src.endpoints_api = Some(s);
            "source.endpointsApi"
        }
        _ => return Ok(None),
    }))
}
