//! Configuration: a JSON file shaped like EdgeMesh's `edgeProxy` options, then flags on top, then
//! validation into the runtime [`Config`], then each domain's own settings (`StateConfig`,
//! `ApplierConfig`, `ProxyConfig`, `SourceConfig`, `ListenConfig`).
//!
//! This module is the top floor: it reads the domains' types, and no domain reads it (the house
//! test holds that). Precedence: built-in defaults ([`defaults`]) < config file < command-line
//! flags. The file is strict: an unknown or invalid field fails with its path
//! (`udp.idleTimeout: invalid duration "5 parsecs"`). Every value is checked once, here, against
//! its range; the domains trust what they are given. Secrets (tokens) never live here: only the
//! *paths* of token and key files do.

pub mod defaults;
mod file;
mod into;
mod values;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::filter::{DefaultIgnores, FilterConfig, FilterMode, Profile};
use crate::listen::ListenConfig;
use crate::model::DataPath;
use crate::proxy::table::LbPolicy;
use crate::proxy::Workers;
use crate::rules::render::Layout;
use crate::rules::Flavour;
use crate::source::{EndpointsApi, SourceConfig, SourceKind};
pub use file::FileConfig;
use file::{apply_override, IptablesFile, ListenFile, SourceFile, TcpFile, UdpFile};
use values::{check_listen_ip, dur_in, num_in, parse_or, parse_range, HOUR, MILLI, MINUTE, SECOND};
pub use values::{parse_cidr, parse_duration};

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
    /// `dataPath`: the path of proxied services without their own annotation.
    pub data_path: DataPath,
    /// `workers`: the proxy's event loops.
    pub workers: Workers,
    /// `pinWorkers`: each worker on a CPU of its own.
    pub pin_workers: bool,
    pub dial_timeout: Duration,
    pub dial_attempts: u32,
    pub tcp_buffer: usize,
    pub udp_idle_timeout: Duration,
    pub udp_max_flows: usize,
    /// Open TCP connections per client address (`tcp.maxConnectionsPerSource`).
    pub tcp_max_per_source: usize,
    /// `tcp.idleTimeout`: `None` (the default) never closes an idle connection.
    pub tcp_idle_timeout: Option<Duration>,
    /// Active probes of every TCP endpoint (`None`: off).
    pub probe_interval: Option<Duration>,
    pub probes_per_second: u32,
    /// UDP flows per client address (`udp.maxFlowsPerSource`).
    pub udp_max_flows_per_source: usize,
    pub iptables: Flavour,
    pub min_sync_period: Duration,
    pub guard_period: Duration,
    pub resync_period: Duration,
    pub metrics_address: Option<SocketAddr>,
    /// `None`: no offline cache.
    pub state_dir: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub offline_after: Duration,
}

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

/// The config file to read: the one given, else [`defaults::PATH`] when it exists, else none
/// (the built-in defaults). Every command finds its file this one way.
pub fn file_path(given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| Path::new(defaults::PATH).exists().then(|| defaults::PATH.into()))
}

/// Turns a field's message into a [`ConfigError`] naming the flag that set it, else the file.
struct Blame<'a> {
    origin: &'a str,
    flag_of: Vec<(&'static str, &'static str)>,
}

impl Blame<'_> {
    fn err(&self, path: &'static str, message: String) -> ConfigError {
        match self.flag_of.iter().rev().find(|(p, _)| *p == path) {
            Some((_, flag)) => ConfigError { origin: format!("--{flag}"), path: String::new(), message },
            None => ConfigError { origin: self.origin.to_string(), path: path.to_string(), message },
        }
    }

    /// `r`'s error, blamed on `path`.
    fn at<T>(&self, path: &'static str, r: Result<T, String>) -> Result<T, ConfigError> {
        r.map_err(|m| self.err(path, m))
    }
}

/// `s` as one of `values` (a spelling, then its value; a value's first spelling is the one the
/// error lists, later ones are accepted aliases), or an error listing them.
fn one_of<T: Copy + PartialEq>(s: &str, values: &[(&str, T)]) -> Result<T, String> {
    values.iter().find(|(name, _)| *name == s).map(|(_, v)| *v).ok_or_else(|| {
        let mut names: Vec<&str> = Vec::new();
        for (k, (name, v)) in values.iter().enumerate() {
            if !values[..k].iter().any(|(_, w)| w == v) {
                names.push(name);
            }
        }
        format!("unknown value {s:?}; accepted values: {}", names.join(", "))
    })
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
        let mut blame = Blame { origin, flag_of: Vec::new() };
        for (flag, value) in &overrides.values {
            let path = apply_override(&mut f, flag, value).map_err(|message| ConfigError {
                origin: format!("--{flag}"),
                path: String::new(),
                message,
            })?;
            blame.flag_of.push((path, flag));
        }
        let b = &blame;
        let (profile, filter, layout) = filter_settings(&f, b)?;
        let mut service_cidrs = Vec::new();
        for c in f.service_cidrs.clone().unwrap_or_else(|| vec![defaults::SERVICE_CIDR.into()]) {
            service_cidrs.push(b.at("serviceCIDRs", parse_cidr(&c))?);
        }
        let listen = listen_settings(f.listen.take().unwrap_or_default(), &service_cidrs, b)?;
        let source = source_settings(f.source.take().unwrap_or_default(), b)?;
        let lb_policy = match f.load_balancer.as_deref() {
            None => LbPolicy::RoundRobin,
            Some(s) => b.at(
                "loadBalancer",
                one_of(
                    s,
                    &[
                        ("roundRobin", LbPolicy::RoundRobin),
                        ("random", LbPolicy::Random),
                        ("ROUND_ROBIN", LbPolicy::RoundRobin),
                        ("RANDOM", LbPolicy::Random),
                    ],
                ),
            )?,
        };
        let data_path = match f.data_path.as_deref() {
            None => DataPath::Proxy,
            Some(s) => b.at("dataPath", one_of(s, &[("proxy", DataPath::Proxy), ("kernel", DataPath::Kernel)]))?,
        };
        let workers = b.at("workers", workers(f.workers.as_ref()))?;
        let metrics_address = match f.metrics_address.as_deref() {
            None | Some("") => None,
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .map_err(|_| b.err("metricsAddress", format!("{a:?} is not an address:port")))?,
            ),
        };
        let mut config = Config {
            profile,
            filter,
            layout,
            service_cidrs,
            node_name: f.node_name.clone().filter(|s| !s.is_empty()),
            listen,
            source,
            lb_policy,
            data_path,
            workers,
            pin_workers: f.pin_workers.unwrap_or(defaults::PIN_WORKERS),
            dial_timeout: defaults::DIAL_TIMEOUT,
            dial_attempts: defaults::DIAL_ATTEMPTS,
            tcp_buffer: defaults::TCP_BUFFER,
            udp_idle_timeout: defaults::UDP_IDLE_TIMEOUT,
            udp_max_flows: defaults::UDP_MAX_FLOWS,
            tcp_max_per_source: defaults::TCP_MAX_PER_SOURCE,
            tcp_idle_timeout: None,
            probe_interval: None,
            probes_per_second: defaults::PROBES_PER_SECOND,
            udp_max_flows_per_source: defaults::UDP_MAX_FLOWS_PER_SOURCE,
            iptables: Flavour::Auto,
            min_sync_period: defaults::MIN_SYNC_PERIOD,
            guard_period: defaults::GUARD_PERIOD,
            resync_period: defaults::RESYNC_PERIOD,
            metrics_address,
            state_dir: match f.state_dir.as_deref() {
                None => Some(defaults::STATE_DIR.into()),
                Some("") => None,
                Some(d) => Some(b.at("stateDir", absolute(d))?),
            },
            run_dir: match f.run_dir.as_deref() {
                None => defaults::RUN_DIR.into(),
                Some(d) => b.at("runDir", absolute(d))?,
            },
            offline_after: b.at(
                "offlineAfter",
                dur_in(f.offline_after.as_deref(), defaults::OFFLINE_AFTER, Duration::ZERO, HOUR),
            )?,
        };
        proxy_settings(&mut config, &f.tcp.take().unwrap_or_default(), &f.udp.take().unwrap_or_default(), b)?;
        iptables_settings(&mut config, &f.iptables.take().unwrap_or_default(), b)?;
        Ok(config)
    }
}

/// The EdgeMesh profile, the service filter and the layout (the profile gives their defaults).
fn filter_settings(f: &FileConfig, b: &Blame) -> Result<(Profile, FilterConfig, Layout), ConfigError> {
    let profile = match f.edgemesh.as_deref() {
        None => Profile::V1_17,
        Some(s) => b.at(
            "edgemesh",
            one_of(
                s,
                &[("v1.17", Profile::V1_17), ("v1.9", Profile::V1_9), ("1.17", Profile::V1_17), ("1.9", Profile::V1_9)],
            ),
        )?,
    };
    let (profile_mode, profile_no_proxy) = profile.filter_defaults();
    let mode = match f.service_filter_mode.as_deref() {
        None => profile_mode,
        Some(s) => b.at(
            "serviceFilterMode",
            one_of(
                s,
                &[
                    ("FilterIfLabelExists", FilterMode::FilterIfLabelExists),
                    ("FilterIfLabelDoesNotExists", FilterMode::FilterIfLabelDoesNotExists),
                    ("None", FilterMode::None),
                ],
            ),
        )?,
    };
    let default_ignores = match f.default_ignores.as_deref() {
        None => DefaultIgnores::Auto,
        Some(s) => b.at(
            "defaultIgnores",
            one_of(s, &[("auto", DefaultIgnores::Auto), ("on", DefaultIgnores::On), ("off", DefaultIgnores::Off)]),
        )?,
    };
    let no_proxy_label = f.no_proxy_label.unwrap_or(profile_no_proxy);
    let layout = match f.layout.as_deref() {
        None if profile == Profile::V1_9 => Layout::RootChain,
        None => Layout::Portals,
        Some(s) => b.at(
            "layout",
            one_of(
                s,
                &[("portals", Layout::Portals), ("root-chain", Layout::RootChain), ("nftables", Layout::Nftables)],
            ),
        )?,
    };
    Ok((profile, FilterConfig { mode, no_proxy_label, default_ignores }, layout))
}

fn listen_settings(l: ListenFile, service_cidrs: &[(IpAddr, u8)], b: &Blame) -> Result<ListenConfig, ConfigError> {
    let ip = b.at("listen.ip", parse_or(l.ip.as_deref(), defaults::LISTEN_IP))?;
    let ipv6 = b.at("listen.ipv6", parse_or(l.ipv6.as_deref(), defaults::LISTEN_IPV6))?;
    let tcp_port = l.tcp_port.unwrap_or(defaults::TCP_PORT);
    let udp_ports = match l.udp_ports.as_deref() {
        None => defaults::UDP_PORTS,
        Some(s) => b.at("listen.udpPorts", parse_range(s))?,
    };
    let reject_port = l.reject_port.unwrap_or(defaults::REJECT_PORT);
    if tcp_port == 0 {
        return Err(b.err("listen.tcpPort", "must not be 0".into()));
    }
    if reject_port == 0 {
        return Err(b.err("listen.rejectPort", "must not be 0 (accepted range 1..=65535)".into()));
    }
    if udp_ports.0 == 0 {
        return Err(b.err("listen.udpPorts", "must not include port 0".into()));
    }
    b.at("listen.ip", check_listen_ip(IpAddr::V4(ip), service_cidrs))?;
    b.at("listen.ipv6", check_listen_ip(IpAddr::V6(ipv6), service_cidrs))?;
    if reject_port == tcp_port || (udp_ports.0..=udp_ports.1).contains(&reject_port) {
        return Err(b.err("listen.rejectPort", "must differ from the TCP port and lie outside udpPorts".into()));
    }
    if (udp_ports.0..=udp_ports.1).contains(&tcp_port) {
        return Err(b.err("listen.tcpPort", "must lie outside udpPorts".into()));
    }
    Ok(ListenConfig {
        ip,
        ipv6,
        device: l.device.unwrap_or_else(|| defaults::LISTEN_DEVICE.into()),
        tcp_port,
        udp_ports,
        reject_port,
        mark: l.mark.unwrap_or(defaults::MARK),
    })
}

fn source_settings(s: SourceFile, b: &Blame) -> Result<SourceConfig, ConfigError> {
    let kind = match s.kind.as_deref() {
        None | Some("kube") => SourceKind::Kube,
        Some("metaserver") => SourceKind::MetaServer,
        Some(k) if k.starts_with("file:") && k.len() > 5 => SourceKind::File(PathBuf::from(&k[5..])),
        Some(k) => {
            return Err(
                b.err("source.kind", format!("unknown value {k:?}; accepted values: kube, metaserver, file:PATH"))
            )
        }
    };
    let endpoints_api = match s.endpoints_api.as_deref() {
        None => EndpointsApi::Auto,
        Some(v) => b.at(
            "source.endpointsApi",
            one_of(
                v,
                &[
                    ("auto", EndpointsApi::Auto),
                    ("endpointslices", EndpointsApi::EndpointSlices),
                    ("endpoints", EndpointsApi::Endpoints),
                ],
            ),
        )?,
    };
    let meta_server = s.meta_server.unwrap_or_else(|| defaults::META_SERVER.into());
    let is_url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    if !is_url(&meta_server) {
        return Err(b.err("source.metaServer", format!("{meta_server:?} is not an http:// or https:// URL")));
    }
    if let Some(server) = s.server.as_deref().filter(|s| !is_url(s)) {
        return Err(b.err("source.server", format!("{server:?} is not an http:// or https:// URL")));
    }
    if s.client_cert.is_some() != s.client_key.is_some() {
        return Err(b.err("source.clientCert", "clientCert and clientKey go together".into()));
    }
    Ok(SourceConfig {
        kind,
        kubeconfig: s.kubeconfig.map(PathBuf::from),
        server: s.server,
        token_file: s.token_file.map(PathBuf::from),
        ca_file: s.ca_file.map(PathBuf::from),
        client_cert: s.client_cert.map(PathBuf::from),
        client_key: s.client_key.map(PathBuf::from),
        meta_server,
        watch: s.watch.unwrap_or(defaults::WATCH),
        poll_interval: b
            .at("source.pollInterval", dur_in(s.poll_interval.as_deref(), defaults::POLL_INTERVAL, SECOND, HOUR))?,
        endpoints_api,
    })
}

/// `workers`: `auto`, or a count (a number, or a number written as a word, as a flag gives it).
fn workers(v: Option<&file::CountOrWord>) -> Result<Workers, String> {
    let n = match v {
        None => return Ok(defaults::WORKERS),
        Some(file::CountOrWord::Word(w)) if w == "auto" => return Ok(Workers::Auto),
        Some(file::CountOrWord::Word(w)) => {
            w.parse::<u64>().map_err(|_| format!("{w:?} is neither auto nor a number"))?
        }
        Some(file::CountOrWord::Count(n)) => *n,
    };
    u16::try_from(n)
        .ok()
        .filter(|n| *n <= crate::proxy::workers::MAX)
        .and_then(std::num::NonZeroU16::new)
        .map(Workers::Count)
        .ok_or_else(|| format!("{n} is outside the accepted range 1..={} (or auto)", crate::proxy::workers::MAX))
}

fn proxy_settings(c: &mut Config, tcp: &TcpFile, udp: &UdpFile, b: &Blame) -> Result<(), ConfigError> {
    c.tcp_buffer = tcp.buffer_size.unwrap_or(defaults::TCP_BUFFER);
    if !(1024..=1024 * 1024).contains(&c.tcp_buffer) {
        return Err(b.err("tcp.bufferSize", format!("{} is outside 1024..=1048576", c.tcp_buffer)));
    }
    c.dial_timeout =
        b.at("tcp.dialTimeout", dur_in(tcp.dial_timeout.as_deref(), defaults::DIAL_TIMEOUT, 10 * MILLI, 60 * SECOND))?;
    c.dial_attempts = b.at("tcp.dialAttempts", num_in(tcp.dial_attempts, defaults::DIAL_ATTEMPTS, 1, 10))?;
    c.udp_idle_timeout =
        b.at("udp.idleTimeout", dur_in(udp.idle_timeout.as_deref(), defaults::UDP_IDLE_TIMEOUT, 100 * MILLI, HOUR))?;
    c.udp_max_flows = b.at("udp.maxFlows", num_in(udp.max_flows, defaults::UDP_MAX_FLOWS, 1, 1 << 20))?;
    c.tcp_max_per_source = b.at(
        "tcp.maxConnectionsPerSource",
        num_in(tcp.max_connections_per_source, defaults::TCP_MAX_PER_SOURCE, 1, 1 << 20),
    )?;
    // Absent: off. Present: held to its range like every other duration.
    c.tcp_idle_timeout = b.at(
        "tcp.idleTimeout",
        tcp.idle_timeout.as_deref().map(|v| dur_in(Some(v), Duration::ZERO, 100 * MILLI, 7 * 24 * HOUR)).transpose(),
    )?;
    c.probe_interval = b.at(
        "tcp.probeInterval",
        tcp.probe_interval.as_deref().map(|v| dur_in(Some(v), Duration::ZERO, 100 * MILLI, HOUR)).transpose(),
    )?;
    c.probes_per_second =
        b.at("tcp.probesPerSecond", num_in(tcp.probes_per_second, defaults::PROBES_PER_SECOND, 1, 1000))?;
    c.udp_max_flows_per_source = b.at(
        "udp.maxFlowsPerSource",
        num_in(udp.max_flows_per_source, defaults::UDP_MAX_FLOWS_PER_SOURCE, 1, 1 << 20),
    )?;
    Ok(())
}

fn iptables_settings(c: &mut Config, ipt: &IptablesFile, b: &Blame) -> Result<(), ConfigError> {
    c.iptables = match ipt.backend.as_deref() {
        None => Flavour::Auto,
        Some(v) => b.at(
            "iptables.backend",
            one_of(v, &[("auto", Flavour::Auto), ("nft", Flavour::Nft), ("legacy", Flavour::Legacy)]),
        )?,
    };
    c.min_sync_period = b.at(
        "iptables.minSyncPeriod",
        dur_in(ipt.min_sync_period.as_deref(), defaults::MIN_SYNC_PERIOD, 10 * MILLI, 5 * MINUTE),
    )?;
    c.guard_period =
        b.at("iptables.guardPeriod", dur_in(ipt.guard_period.as_deref(), defaults::GUARD_PERIOD, 100 * MILLI, HOUR))?;
    c.resync_period = b.at(
        "iptables.resyncPeriod",
        dur_in(ipt.resync_period.as_deref(), defaults::RESYNC_PERIOD, 5 * SECOND, 24 * HOUR),
    )?;
    Ok(())
}

/// A directory setting: an absolute path.
fn absolute(d: &str) -> Result<PathBuf, String> {
    match d.starts_with('/') {
        true => Ok(PathBuf::from(d)),
        false => Err(format!("{d:?} is not an absolute path")),
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

#[cfg(test)]
mod tests;
