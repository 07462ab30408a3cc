//! Configuration: a JSON file shaped like EdgeMesh's `edgeProxy` options, then flags on top, then
//! validation into the runtime [`Config`].
//!
//! Precedence: built-in defaults < config file < command-line flags. The file is strict: an
//! unknown or invalid field fails with its path (`udp.idleTimeout: invalid duration "5 parsecs"`).
//! Secrets (tokens) never live here: only the *paths* of token and key files do.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::filter::{DefaultIgnores, FilterConfig, FilterMode, Profile};
use crate::proxy::table::LbPolicy;
use crate::rules::render::Layout;

/// Where a config error was found and why.
#[derive(Debug)]
pub struct ConfigError {
    /// The file, or `--flag`, the problem is in.
    pub origin: String,
    /// Dotted path of the field (`udp.idleTimeout`); empty for whole-file problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path.is_empty() {
            true => write!(f, "{}: {}", self.origin, self.message),
            false => write!(f, "{}: {}: {}", self.origin, self.path, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

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
    pub tcp: Option<TcpFile>,
    pub udp: Option<UdpFile>,
    pub iptables: Option<IptablesFile>,
    /// `127.0.0.1:10551`, or "" for none.
    pub metrics_address: Option<String>,
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

/// Which binaries apply the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Nft,
    Legacy,
}

/// Where Services and endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// Explicit server / kubeconfig / in-cluster / MetaServer, first that applies.
    Kube,
    MetaServer,
    File(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointsApi {
    Auto,
    EndpointSlices,
    Endpoints,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub kubeconfig: Option<PathBuf>,
    pub server: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub meta_server: String,
    pub watch: bool,
    pub poll_interval: Duration,
    pub endpoints_api: EndpointsApi,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenConfig {
    pub ip: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub device: String,
    pub tcp_port: u16,
    pub udp_ports: (u16, u16),
    pub reject_port: u16,
    /// SO_MARK of upstream sockets, matched by the first rule of our OUTPUT-side chain (0: off).
    pub mark: u32,
}

/// The default [`ListenConfig::mark`]: bit 20. Chosen clear of kube-proxy (0x4000, 0x8000),
/// Cilium (0x0F00), OpenWrt's mwan3 (0x3F00), Istio (1337) and Tailscale (0x40000, 0x80000);
/// Calico may use any bit of 0xffff0000, so on Calico nodes pick a bit outside its mask.
pub const DEFAULT_MARK: u32 = 0x0010_0000;

impl ListenConfig {
    pub fn ip_for(&self, v6: bool) -> IpAddr {
        match v6 {
            false => IpAddr::V4(self.ip),
            true => IpAddr::V6(self.ipv6),
        }
    }
}

/// The validated runtime configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The EdgeMesh generation the defaults came from.
    pub profile: Profile,
    pub filter: FilterConfig,
    pub layout: Layout,
    pub service_cidrs: Vec<(IpAddr, u8)>,
    pub node_name: Option<String>,
    pub listen: ListenConfig,
    pub source: SourceConfig,
    pub lb_policy: LbPolicy,
    pub dial_timeout: Duration,
    pub dial_attempts: u32,
    pub tcp_buffer: usize,
    pub udp_idle_timeout: Duration,
    pub udp_max_flows: usize,
    /// Open TCP connections per client address (`tcp.maxConnectionsPerSource`).
    pub tcp_max_per_source: usize,
    /// `tcp.idleTimeout`: `None` (the default) never closes an idle connection.
    pub tcp_idle_timeout: Option<Duration>,
    /// UDP flows per client address (`udp.maxFlowsPerSource`).
    pub udp_max_flows_per_source: usize,
    pub backend: Backend,
    pub min_sync_period: Duration,
    pub guard_period: Duration,
    pub resync_period: Duration,
    pub metrics_address: Option<SocketAddr>,
}

/// Default location of the config file for `run` and `check-config`.
pub const DEFAULT_PATH: &str = "/etc/edgeproxy/config.json";

/// Values from command-line flags; each `Some` overrides the file. Kept as strings so that a bad
/// flag is reported with the same checks, naming the flag.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub values: Vec<(&'static str, String)>,
}

impl Overrides {
    pub fn set(&mut self, flag: &'static str, value: Option<impl Into<String>>) {
        if let Some(v) = value {
            self.values.push((flag, v.into()));
        }
    }
}

impl Config {
    /// Parse config text (what `load` reads from a file); `origin` names it in errors.
    pub fn from_text(text: &str, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::build(parse_file(text, origin)?, origin, overrides)
    }

    /// Read `path` (if given) and apply `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let origin = path.map_or_else(|| "defaults".to_string(), |p| p.display().to_string());
        Config::build(file, &origin, overrides)
    }

    /// Defaults only (tests, `rules --from` without a config).
    pub fn defaults() -> Config {
        Config::build(FileConfig::default(), "defaults", &Overrides::default()).expect("built-in defaults are valid")
    }

    fn build(mut f: FileConfig, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        // Flags are folded into the file shape first, so one set of checks covers both.
        let mut flag_of: Vec<(&'static str, &'static str)> = Vec::new();
        for (flag, value) in &overrides.values {
            let path = apply_override(&mut f, flag, value).map_err(|message| ConfigError {
                origin: format!("--{flag}"),
                path: String::new(),
                message,
            })?;
            flag_of.push((path, flag));
        }
        let err = |path: &'static str, message: String| {
            let origin = flag_of
                .iter()
                .rev()
                .find(|(p, _)| *p == path)
                .map_or_else(|| origin.to_string(), |(_, flag)| format!("--{flag}"));
            let path = if origin.starts_with("--") { String::new() } else { path.to_string() };
            ConfigError { origin, path, message }
        };

        let profile = match f.edgemesh.as_deref() {
            None => Profile::V1_17,
            Some(s) => Profile::parse(s)
                .ok_or_else(|| err("edgemesh", format!("unknown value {s:?}; accepted values: v1.17, v1.9")))?,
        };
        let (profile_mode, profile_no_proxy) = profile.filter_defaults();
        let mode = match f.service_filter_mode.as_deref() {
            None => profile_mode,
            Some(s) => FilterMode::parse(s).ok_or_else(|| {
                err(
                    "serviceFilterMode",
                    format!(
                        "unknown value {s:?}; accepted values: FilterIfLabelExists, FilterIfLabelDoesNotExists, None"
                    ),
                )
            })?,
        };
        let default_ignores = match f.default_ignores.as_deref() {
            None => DefaultIgnores::Auto,
            Some(s) => DefaultIgnores::parse(s)
                .ok_or_else(|| err("defaultIgnores", format!("unknown value {s:?}; accepted values: auto, on, off")))?,
        };
        let no_proxy_label = f.no_proxy_label.unwrap_or(profile_no_proxy);
        let filter = FilterConfig { mode, no_proxy_label, default_ignores };
        let layout = match f.layout.as_deref() {
            None if profile == Profile::V1_9 => Layout::RootChain,
            None => Layout::Portals,
            Some(s) => Layout::parse(s)
                .ok_or_else(|| err("layout", format!("unknown value {s:?}; accepted values: portals, root-chain")))?,
        };
        let mut service_cidrs = Vec::new();
        for c in f.service_cidrs.clone().unwrap_or_else(|| vec!["10.96.0.0/12".into()]) {
            service_cidrs.push(parse_cidr(&c).map_err(|m| err("serviceCIDRs", m))?);
        }
        let node_name = f.node_name.clone().filter(|s| !s.is_empty());

        let l = f.listen.take().unwrap_or_default();
        let ip = parse_or(l.ip.as_deref(), Ipv4Addr::new(169, 254, 96, 16)).map_err(|m| err("listen.ip", m))?;
        let ipv6 = parse_or(l.ipv6.as_deref(), "fd00:e16e::16".parse::<Ipv6Addr>().expect("literal"))
            .map_err(|m| err("listen.ipv6", m))?;
        let tcp_port = l.tcp_port.unwrap_or(15001);
        let udp_ports = match l.udp_ports.as_deref() {
            None => (15002, 15999),
            Some(s) => parse_range(s).map_err(|m| err("listen.udpPorts", m))?,
        };
        let reject_port = l.reject_port.unwrap_or(15000);
        if tcp_port == 0 {
            return Err(err("listen.tcpPort", "must not be 0".into()));
        }
        if reject_port == 0 {
            return Err(err("listen.rejectPort", "must not be 0 (accepted range 1..=65535)".into()));
        }
        if udp_ports.0 == 0 {
            return Err(err("listen.udpPorts", "must not include port 0".into()));
        }
        check_listen_ip(IpAddr::V4(ip), &service_cidrs).map_err(|m| err("listen.ip", m))?;
        check_listen_ip(IpAddr::V6(ipv6), &service_cidrs).map_err(|m| err("listen.ipv6", m))?;
        if reject_port == tcp_port || (udp_ports.0..=udp_ports.1).contains(&reject_port) {
            return Err(err("listen.rejectPort", "must differ from the TCP port and lie outside udpPorts".into()));
        }
        if (udp_ports.0..=udp_ports.1).contains(&tcp_port) {
            return Err(err("listen.tcpPort", "must lie outside udpPorts".into()));
        }
        let listen = ListenConfig {
            ip,
            ipv6,
            device: l.device.unwrap_or_else(|| "lo".into()),
            tcp_port,
            udp_ports,
            reject_port,
            mark: l.mark.unwrap_or(DEFAULT_MARK),
        };

        let s = f.source.take().unwrap_or_default();
        let kind = match s.kind.as_deref() {
            None | Some("kube") => SourceKind::Kube,
            Some("metaserver") => SourceKind::MetaServer,
            Some(k) if k.starts_with("file:") && k.len() > 5 => SourceKind::File(PathBuf::from(&k[5..])),
            Some(k) => {
                return Err(err(
                    "source.kind",
                    format!("unknown value {k:?}; accepted values: kube, metaserver, file:PATH"),
                ))
            }
        };
        let endpoints_api = match s.endpoints_api.as_deref() {
            None | Some("auto") => EndpointsApi::Auto,
            Some("endpointslices") => EndpointsApi::EndpointSlices,
            Some("endpoints") => EndpointsApi::Endpoints,
            Some(v) => {
                return Err(err(
                    "source.endpointsApi",
                    format!("unknown value {v:?}; accepted values: auto, endpointslices, endpoints"),
                ))
            }
        };
        let meta_server = s.meta_server.unwrap_or_else(|| "http://127.0.0.1:10550".into());
        if !(meta_server.starts_with("http://") || meta_server.starts_with("https://")) {
            return Err(err("source.metaServer", format!("{meta_server:?} is not an http:// or https:// URL")));
        }
        if let Some(server) = &s.server {
            if !(server.starts_with("http://") || server.starts_with("https://")) {
                return Err(err("source.server", format!("{server:?} is not an http:// or https:// URL")));
            }
        }
        let source = SourceConfig {
            kind,
            kubeconfig: s.kubeconfig.map(PathBuf::from),
            server: s.server,
            token_file: s.token_file.map(PathBuf::from),
            ca_file: s.ca_file.map(PathBuf::from),
            client_cert: s.client_cert.map(PathBuf::from),
            client_key: s.client_key.map(PathBuf::from),
            meta_server,
            watch: s.watch.unwrap_or(true),
            poll_interval: dur_in(s.poll_interval.as_deref(), Duration::from_secs(30), SECOND, HOUR)
                .map_err(|m| err("source.pollInterval", m))?,
            endpoints_api,
        };
        if source.client_cert.is_some() != source.client_key.is_some() {
            return Err(err("source.clientCert", "clientCert and clientKey go together".into()));
        }

        let lb_policy = match f.load_balancer.as_deref() {
            None | Some("roundRobin") | Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
            Some("random") | Some("RANDOM") => LbPolicy::Random,
            Some(v) => {
                return Err(err("loadBalancer", format!("unknown value {v:?}; accepted values: roundRobin, random")))
            }
        };
        let tcp = f.tcp.take().unwrap_or_default();
        let udp = f.udp.take().unwrap_or_default();
        let ipt = f.iptables.take().unwrap_or_default();
        let backend = match ipt.backend.as_deref() {
            None | Some("auto") => Backend::Auto,
            Some("nft") => Backend::Nft,
            Some("legacy") => Backend::Legacy,
            Some(v) => {
                return Err(err("iptables.backend", format!("unknown value {v:?}; accepted values: auto, nft, legacy")))
            }
        };
        let tcp_buffer = tcp.buffer_size.unwrap_or(16 * 1024);
        if !(1024..=1024 * 1024).contains(&tcp_buffer) {
            return Err(err("tcp.bufferSize", format!("{tcp_buffer} is outside 1024..=1048576")));
        }
        let metrics_address = match f.metrics_address.as_deref() {
            None | Some("") => None,
            Some(a) => Some(
                a.parse::<SocketAddr>().map_err(|_| err("metricsAddress", format!("{a:?} is not an address:port")))?,
            ),
        };
        Ok(Config {
            profile,
            filter,
            layout,
            service_cidrs,
            node_name,
            listen,
            source,
            lb_policy,
            dial_timeout: dur_in(tcp.dial_timeout.as_deref(), Duration::from_secs(2), 10 * MILLI, 60 * SECOND)
                .map_err(|m| err("tcp.dialTimeout", m))?,
            dial_attempts: num_in(tcp.dial_attempts, 3, 1, 10).map_err(|m| err("tcp.dialAttempts", m))?,
            tcp_buffer,
            udp_idle_timeout: dur_in(udp.idle_timeout.as_deref(), Duration::from_secs(30), 100 * MILLI, HOUR)
                .map_err(|m| err("udp.idleTimeout", m))?,
            udp_max_flows: num_in(udp.max_flows, 4096, 1, 1 << 20).map_err(|m| err("udp.maxFlows", m))?,
            tcp_max_per_source: num_in(tcp.max_connections_per_source, 2048, 1, 1 << 20)
                .map_err(|m| err("tcp.maxConnectionsPerSource", m))?,
            // Absent: off. Present: held to its range like every other duration.
            tcp_idle_timeout: tcp
                .idle_timeout
                .as_deref()
                .map(|v| dur_in(Some(v), Duration::ZERO, 100 * MILLI, 7 * 24 * HOUR))
                .transpose()
                .map_err(|m| err("tcp.idleTimeout", m))?,
            udp_max_flows_per_source: num_in(udp.max_flows_per_source, 1024, 1, 1 << 20)
                .map_err(|m| err("udp.maxFlowsPerSource", m))?,
            backend,
            min_sync_period: dur_in(ipt.min_sync_period.as_deref(), Duration::from_millis(200), 10 * MILLI, 5 * MINUTE)
                .map_err(|m| err("iptables.minSyncPeriod", m))?,
            guard_period: dur_in(ipt.guard_period.as_deref(), Duration::from_secs(2), 100 * MILLI, HOUR)
                .map_err(|m| err("iptables.guardPeriod", m))?,
            resync_period: dur_in(ipt.resync_period.as_deref(), Duration::from_secs(60), 5 * SECOND, 24 * HOUR)
                .map_err(|m| err("iptables.resyncPeriod", m))?,
            metrics_address,
        })
    }
}

/// The largest config file read (real ones are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let origin = path.display().to_string();
    let text = crate::capped::read_text(path, MAX_CONFIG_BYTES).map_err(|e| ConfigError {
        origin: origin.clone(),
        path: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse_file(&text, &origin)
}

fn parse_file(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    let origin = origin.to_string();
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigError { origin, path: if path == "." { String::new() } else { path }, message: inner.to_string() }
    })
}

/// Fold one `--flag value` into the file shape; returns the file path it stands for.
fn apply_override(f: &mut FileConfig, flag: &str, v: &str) -> Result<&'static str, String> {
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
    let listen = || ListenFile::default();
    let source = || SourceFile::default();
    let s = v.to_string();
    Ok(match flag {
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
        "listen-ip" => {
            f.listen.get_or_insert_with(listen).ip = Some(s);
            "listen.ip"
        }
        "tcp-port" => {
            f.listen.get_or_insert_with(listen).tcp_port = Some(num(v)?);
            "listen.tcpPort"
        }
        "source" => {
            f.source.get_or_insert_with(source).kind = Some(s);
            "source.kind"
        }
        "kubeconfig" => {
            f.source.get_or_insert_with(source).kubeconfig = Some(s);
            "source.kubeconfig"
        }
        "server" => {
            f.source.get_or_insert_with(source).server = Some(s);
            "source.server"
        }
        "token-file" => {
            f.source.get_or_insert_with(source).token_file = Some(s);
            "source.tokenFile"
        }
        "ca-file" => {
            f.source.get_or_insert_with(source).ca_file = Some(s);
            "source.caFile"
        }
        "client-cert" => {
            f.source.get_or_insert_with(source).client_cert = Some(s);
            "source.clientCert"
        }
        "client-key" => {
            f.source.get_or_insert_with(source).client_key = Some(s);
            "source.clientKey"
        }
        "metaserver" => {
            f.source.get_or_insert_with(source).meta_server = Some(s);
            "source.metaServer"
        }
        "watch" => {
            f.source.get_or_insert_with(source).watch = Some(boolean(v)?);
            "source.watch"
        }
        "poll-interval" => {
            f.source.get_or_insert_with(source).poll_interval = Some(s);
            "source.pollInterval"
        }
        "endpoints-api" => {
            f.source.get_or_insert_with(source).endpoints_api = Some(s);
            "source.endpointsApi"
        }
        "load-balancer" => {
            f.load_balancer = Some(s);
            "loadBalancer"
        }
        "iptables-backend" => {
            f.iptables.get_or_insert_with(IptablesFile::default).backend = Some(s);
            "iptables.backend"
        }
        "metrics-address" => {
            f.metrics_address = Some(s);
            "metricsAddress"
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

fn parse_or<T: std::str::FromStr>(v: Option<&str>, default: T) -> Result<T, String> {
    match v {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("{s:?} is not a valid address")),
    }
}

/// A duration setting: `default` when absent, else parsed and held to `min..=max` (a zero guard or
/// resync period would run iptables-save back to back; a zero timeout would refuse everything).
fn dur_in(v: Option<&str>, default: Duration, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = v.map_or(Ok(default), parse_duration)?;
    if d < min || d > max {
        return Err(format!("{} is outside the accepted range {}..={}", show_dur(d), show_dur(min), show_dur(max)));
    }
    Ok(d)
}

fn show_dur(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 1000 != 0 || ms == 0 => format!("{ms}ms"),
        ms => format!("{}s", ms / 1000),
    }
}

/// A whole-number setting held to `min..=max` (no silent clamping).
fn num_in<T: PartialOrd + fmt::Display + Copy>(v: Option<T>, default: T, min: T, max: T) -> Result<T, String> {
    let n = v.unwrap_or(default);
    if n < min || n > max {
        return Err(format!("{n} is outside the accepted range {min}..={max}"));
    }
    Ok(n)
}

/// Where the proxy may listen: an address of this node that no ClusterIP, client or peer uses.
fn check_listen_ip(ip: IpAddr, service_cidrs: &[(IpAddr, u8)]) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(format!(
            "{ip} cannot be the proxy's address (unspecified, loopback, multicast or broadcast); \
             use a link-local or private address of the node, default 169.254.96.16 / fd00:e16e::16"
        ));
    }
    if let Some((net, len)) = service_cidrs.iter().find(|(net, len)| cidr_contains(*net, *len, ip)) {
        return Err(format!("{ip} lies inside serviceCIDRs {net}/{len}: the proxy's address cannot be a ClusterIP"));
    }
    Ok(())
}

fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

const MILLI: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (use e.g. 250ms, 5s, 2m)");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range like 15002-15999");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// `10.96.0.0/12` -> (network address, prefix length).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not a CIDR like 10.96.0.0/12");
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(text: &str) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let f: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| ConfigError {
            origin: "test".into(),
            path: e.path().to_string(),
            message: e.into_inner().to_string(),
        })?;
        Config::build(f, "test", &Overrides::default())
    }

    #[test]
    fn defaults_are_edgemesh_like() {
        let c = Config::defaults();
        // The newest EdgeMesh generation (v1.17): noproxy=edgemesh is gone since v1.10.
        assert_eq!(c.profile, Profile::V1_17);
        assert_eq!(c.filter.mode, FilterMode::FilterIfLabelExists);
        assert!(!c.filter.no_proxy_label);
        assert_eq!(c.filter.default_ignores, DefaultIgnores::Auto);
        assert_eq!(c.layout, Layout::Portals);
        assert_eq!(c.listen.ip, Ipv4Addr::new(169, 254, 96, 16));
        assert_eq!(c.source.meta_server, "http://127.0.0.1:10550");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let e = from_json(r#"{"udp": {"idleTimeot": "5s"}}"#).unwrap_err();
        assert_eq!(e.path, "udp.idleTimeot");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_filter_mode_lists_accepted_values() {
        let e = from_json(r#"{"serviceFilterMode": "FilterAll"}"#).unwrap_err();
        assert_eq!(e.path, "serviceFilterMode");
        assert!(e.message.contains("FilterIfLabelExists, FilterIfLabelDoesNotExists"), "{e}");
    }

    #[test]
    fn bad_duration_names_field() {
        let e = from_json(r#"{"udp": {"idleTimeout": "5 parsecs"}}"#).unwrap_err();
        assert_eq!(e.to_string(), r#"test: udp.idleTimeout: invalid duration "5 parsecs" (use e.g. 250ms, 5s, 2m)"#);
    }

    #[test]
    fn wrong_type_names_field() {
        let e = from_json(r#"{"listen": {"tcpPort": "http"}}"#).unwrap_err();
        assert_eq!(e.path, "listen.tcpPort");
    }

    #[test]
    fn flags_override_file_and_name_the_flag() {
        let mut o = Overrides::default();
        o.set("layout", Some("root-chain"));
        let c = Config::build(FileConfig::default(), "f", &o).unwrap();
        assert_eq!(c.layout, Layout::RootChain);
        let mut o = Overrides::default();
        o.set("service-filter-mode", Some("nope"));
        let e = Config::build(FileConfig::default(), "f", &o).unwrap_err();
        assert_eq!(e.origin, "--service-filter-mode");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }

    /// Settings that parse but make no sense are refused with the field and the accepted range
    /// (a zero guard period would run iptables-save back to back; maxFlows 0 used to become 1).
    #[test]
    fn absurd_values_are_refused_with_field_and_range() {
        for (json, path, msg) in [
            (
                r#"{"iptables":{"guardPeriod":"0s"}}"#,
                "iptables.guardPeriod",
                "0ms is outside the accepted range 100ms..=3600s",
            ),
            (r#"{"iptables":{"resyncPeriod":"0"}}"#, "iptables.resyncPeriod", "outside the accepted range 5s..=86400s"),
            (
                r#"{"iptables":{"minSyncPeriod":"0ms"}}"#,
                "iptables.minSyncPeriod",
                "outside the accepted range 10ms..=300s",
            ),
            (r#"{"tcp":{"dialTimeout":"0s"}}"#, "tcp.dialTimeout", "outside the accepted range 10ms..=60s"),
            (r#"{"tcp":{"dialAttempts":0}}"#, "tcp.dialAttempts", "0 is outside the accepted range 1..=10"),
            (r#"{"udp":{"idleTimeout":"10ms"}}"#, "udp.idleTimeout", "10ms is outside"),
            (r#"{"udp":{"maxFlows":0}}"#, "udp.maxFlows", "0 is outside the accepted range 1..=1048576"),
            (r#"{"source":{"pollInterval":"0"}}"#, "source.pollInterval", "outside the accepted range 1s..=3600s"),
            (r#"{"listen":{"rejectPort":0}}"#, "listen.rejectPort", "must not be 0"),
            (r#"{"listen":{"ip":"0.0.0.0"}}"#, "listen.ip", "cannot be the proxy's address"),
            (r#"{"listen":{"ip":"127.0.0.1"}}"#, "listen.ip", "cannot be the proxy's address"),
            (r#"{"listen":{"ip":"10.96.0.10"}}"#, "listen.ip", "lies inside serviceCIDRs 10.96.0.0/12"),
            (r#"{"listen":{"ipv6":"::"}}"#, "listen.ipv6", "cannot be the proxy's address"),
        ] {
            let e = from_json(json).expect_err(json);
            assert_eq!(e.path, path, "{json}: {e}");
            assert!(e.message.contains(msg), "{json}: {e}");
        }
        // The edges of each range are accepted.
        let c = from_json(r#"{"iptables":{"guardPeriod":"100ms","resyncPeriod":"5s"},"udp":{"maxFlows":1}}"#).unwrap();
        assert_eq!(
            (c.guard_period, c.resync_period, c.udp_max_flows),
            (Duration::from_millis(100), Duration::from_secs(5), 1)
        );
    }

    #[test]
    fn timing_flags_take_the_checked_path_and_name_the_flag() {
        let mut o = Overrides::default();
        o.set("guard-period", Some("0s"));
        let e = Config::build(FileConfig::default(), "test", &o).unwrap_err();
        assert_eq!(e.origin, "--guard-period", "{e}");
        assert!(e.message.contains("outside the accepted range"), "{e}");
    }

    /// A profile sets the defaults of its generation; each setting still overrides its part.
    #[test]
    fn a_profile_sets_defaults_and_each_setting_overrides_them() {
        let c = from_json(r#"{"edgemesh":"v1.9"}"#).unwrap();
        assert_eq!(
            (c.profile, c.layout, c.filter.mode, c.filter.no_proxy_label),
            (Profile::V1_9, Layout::RootChain, FilterMode::None, true)
        );
        let c = from_json(
            r#"{"edgemesh":"v1.9","layout":"portals","noProxyLabel":false,"serviceFilterMode":"FilterIfLabelExists"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.layout, c.filter.mode, c.filter.no_proxy_label),
            (Layout::Portals, FilterMode::FilterIfLabelExists, false)
        );
        let c = from_json(r#"{"edgemesh":"v1.17","noProxyLabel":true}"#).unwrap();
        assert!(c.filter.no_proxy_label);
        let e = from_json(r#"{"edgemesh":"v1.11"}"#).unwrap_err();
        assert_eq!(e.path, "edgemesh");
        assert!(e.message.contains("accepted values: v1.17, v1.9"), "{e}");
    }
}
