//! Command-line shape (argh). Only parsing lives here; `main.rs` dispatches.

use std::path::PathBuf;

use argh::FromArgs;

use crate::config::Overrides;

/// The connection flags of a command that has them (`rules`, `run`), with their names.
macro_rules! connection_flags {
    ($cmd:expr) => {
        [
            ("kubeconfig", &$cmd.kubeconfig),
            ("server", &$cmd.server),
            ("token-file", &$cmd.token_file),
            ("ca-file", &$cmd.ca_file),
            ("client-cert", &$cmd.client_cert),
            ("client-key", &$cmd.client_key),
            ("metaserver", &$cmd.metaserver),
            ("endpoints-api", &$cmd.endpoints_api),
        ]
    };
}

/// edgeproxy: Kubernetes ClusterIP Services for edge machines, EdgeMesh-compatible.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// print the version and the build target, then exit
    #[argh(switch)]
    pub version: bool,
    /// log level: error, warn, info (default), debug, trace
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,
    /// where log lines go: auto (default: the journal with priorities when stderr is the
    /// journal, else stderr with timestamps), journal, stderr, syslog (/dev/log), syslog:/PATH
    #[argh(option, default = "String::from(\"auto\")")]
    pub log_target: String,
    #[argh(subcommand)]
    pub command: Option<Command>,
}

// Parsed once at start; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Rules(RulesCmd),
    Run(RunCmd),
    Check(CheckCmd),
    Cleanup(CleanupCmd),
    CheckConfig(CheckConfigCmd),
}

/// Print the nat rules edgeproxy would install (a dry run; touches nothing).
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "rules",
    error_code(1, "an error that stops it: a config, flag or source it cannot use"),
    error_code(3, "some objects could not be used (each named on stderr); the others' rules are printed")
)]
pub struct RulesCmd {
    /// JSON file(s) with Services and EndpointSlices or Endpoints (objects, lists, kubectl List)
    #[argh(option)]
    pub from: Vec<PathBuf>,
    /// config file (JSON)
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// rule layout: portals (default), root-chain or nftables
    #[argh(option)]
    pub layout: Option<String>,
    /// proxy (default) or kernel, for services without their own annotation
    #[argh(option)]
    pub data_path: Option<String>,
    /// the EdgeMesh generation whose filter and layout defaults to take: v1.17 (default) or v1.9
    #[argh(option)]
    pub edgemesh: Option<String>,
    /// service filter mode: FilterIfLabelExists (default) or FilterIfLabelDoesNotExists
    #[argh(option)]
    pub service_filter_mode: Option<String>,
    /// is kube-proxy on this node: auto (read the nat table), present, absent
    #[argh(option, default = "String::from(\"auto\")")]
    pub kube_proxy: String,
    /// this node's name, for internalTrafficPolicy: Local
    #[argh(option)]
    pub node_name: Option<String>,
    /// print, per service, proxied or ignored and why, instead of the rules
    #[argh(switch)]
    pub explain: bool,
    /// list from the cluster through this kubeconfig (a live dry run)
    #[argh(option)]
    pub kubeconfig: Option<String>,
    /// list from this API server URL (a live dry run)
    #[argh(option)]
    pub server: Option<String>,
    /// bearer token file for --server / the kubeconfig
    #[argh(option)]
    pub token_file: Option<String>,
    /// cluster CA bundle (PEM)
    #[argh(option)]
    pub ca_file: Option<String>,
    /// client certificate (PEM)
    #[argh(option)]
    pub client_cert: Option<String>,
    /// client key (PEM)
    #[argh(option)]
    pub client_key: Option<String>,
    /// list from the KubeEdge MetaServer at this URL (a live dry run)
    #[argh(option)]
    pub metaserver: Option<String>,
    /// auto (default), endpointslices or endpoints
    #[argh(option)]
    pub endpoints_api: Option<String>,
}

impl RulesCmd {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set("layout", self.layout.clone());
        o.set("data-path", self.data_path.clone());
        o.set("edgemesh", self.edgemesh.clone());
        o.set("service-filter-mode", self.service_filter_mode.clone());
        o.set("node-name", self.node_name.clone());
        if self.metaserver.is_some() {
            o.set("source", Some("metaserver"));
        }
        connection_flags(&mut o, connection_flags!(self));
        o
    }

    /// Whether a flag asks for a live list from the cluster.
    pub fn live(&self) -> bool {
        [&self.kubeconfig, &self.server, &self.token_file, &self.ca_file, &self.client_cert, &self.metaserver]
            .iter()
            .any(|f| f.is_some())
    }
}

/// The connection flags `rules` and `run` share (argh has no flattening, so each command
/// declares them), folded into overrides one way.
fn connection_flags(o: &mut Overrides, flags: [(&'static str, &Option<String>); 8]) {
    for (flag, value) in flags {
        o.set(flag, value.clone());
    }
}

/// Run the agent: source -> state -> rules -> proxy.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "run")]
pub struct RunCmd {
    /// config file (JSON); default /etc/edgeproxy/config.json when it exists
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// kube (default), metaserver, or file:PATH
    #[argh(option)]
    pub source: Option<String>,
    /// kubeconfig file
    #[argh(option)]
    pub kubeconfig: Option<String>,
    /// API server URL
    #[argh(option)]
    pub server: Option<String>,
    /// bearer token file (re-read when it changes)
    #[argh(option)]
    pub token_file: Option<String>,
    /// cluster CA bundle (PEM)
    #[argh(option)]
    pub ca_file: Option<String>,
    /// client certificate (PEM)
    #[argh(option)]
    pub client_cert: Option<String>,
    /// client key (PEM)
    #[argh(option)]
    pub client_key: Option<String>,
    /// the KubeEdge MetaServer URL (default http://127.0.0.1:10550)
    #[argh(option)]
    pub metaserver: Option<String>,
    /// watch (true, default) or poll with full lists (false)
    #[argh(option)]
    pub watch: Option<String>,
    /// interval between full lists in poll mode (default 30s)
    #[argh(option)]
    pub poll_interval: Option<String>,
    /// endpoints API: auto (default: EndpointSlices if the server lists them, else core/v1
    /// Endpoints), endpointslices or endpoints
    #[argh(option)]
    pub endpoints_api: Option<String>,
    /// rule layout: portals (default), root-chain or nftables
    #[argh(option)]
    pub layout: Option<String>,
    /// the EdgeMesh generation whose filter and layout defaults to take: v1.17 (default) or v1.9
    #[argh(option)]
    pub edgemesh: Option<String>,
    /// service filter mode: FilterIfLabelExists (default) or FilterIfLabelDoesNotExists
    #[argh(option)]
    pub service_filter_mode: Option<String>,
    /// this node's name, for internalTrafficPolicy: Local (default: $NODE_NAME)
    #[argh(option)]
    pub node_name: Option<String>,
    /// the proxy's IPv4 address (default 169.254.96.16)
    #[argh(option)]
    pub listen_ip: Option<String>,
    /// the proxy's TCP port (default 15001)
    #[argh(option)]
    pub tcp_port: Option<String>,
    /// roundRobin (default) or random
    #[argh(option)]
    pub load_balancer: Option<String>,
    /// proxy (default) or kernel: how proxied services reach endpoints (a Service's
    /// edgeproxy.io/data-path annotation wins)
    #[argh(option)]
    pub data_path: Option<String>,
    /// the proxy's event loops: auto (default: one per usable CPU, at most 4) or a number
    #[argh(option)]
    pub workers: Option<String>,
    /// auto (default), nft or legacy
    #[argh(option)]
    pub iptables_backend: Option<String>,
    /// address:port for /healthz, /readyz and /metrics ("" for none)
    #[argh(option)]
    pub metrics_address: Option<String>,
    /// where the offline cache is kept ("" for none; default /var/lib/edgeproxy)
    #[argh(option)]
    pub state_dir: Option<String>,
    /// where the instance lock and the record of added addresses live (default /run/edgeproxy)
    #[argh(option)]
    pub run_dir: Option<String>,
    /// how long a start waits for the source before installing from the cache (default 10s)
    #[argh(option)]
    pub offline_after: Option<String>,
    /// minimum time between two rule syncs; bursts are coalesced (default 200ms)
    #[argh(option)]
    pub min_sync_period: Option<String>,
    /// how often the guard checks our jumps are first and our chains exist (default 2s)
    #[argh(option)]
    pub guard_period: Option<String>,
    /// how often all rules are rewritten even when nothing changed (default 60s)
    #[argh(option)]
    pub resync_period: Option<String>,
}

impl RunCmd {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set("source", self.source.clone());
        connection_flags(&mut o, connection_flags!(self));
        o.set("watch", self.watch.clone());
        o.set("poll-interval", self.poll_interval.clone());
        o.set("layout", self.layout.clone());
        o.set("edgemesh", self.edgemesh.clone());
        o.set("service-filter-mode", self.service_filter_mode.clone());
        o.set("node-name", self.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok()));
        o.set("listen-ip", self.listen_ip.clone());
        o.set("tcp-port", self.tcp_port.clone());
        o.set("load-balancer", self.load_balancer.clone());
        o.set("data-path", self.data_path.clone());
        o.set("workers", self.workers.clone());
        o.set("iptables-backend", self.iptables_backend.clone());
        o.set("metrics-address", self.metrics_address.clone());
        o.set("state-dir", self.state_dir.clone());
        o.set("run-dir", self.run_dir.clone());
        o.set("offline-after", self.offline_after.clone());
        o.set("min-sync-period", self.min_sync_period.clone());
        o.set("guard-period", self.guard_period.clone());
        o.set("resync-period", self.resync_period.clone());
        o
    }
}

/// Read the live nat table and report our chains, kube-proxy and leftovers. Exit codes: 0 all
/// good, 3 not installed, 4 installed but not first, 5 leftovers (EdgeMesh's chains, the other
/// layout's, duplicate jumps), 6 cannot read the nat table, 1 bad arguments or config.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check")]
pub struct CheckCmd {
    /// config file (JSON), for the layout to expect
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// auto (default), nft or legacy
    #[argh(option)]
    pub iptables_backend: Option<String>,
    /// the agent's run directory (default /run/edgeproxy), where it notes serving the offline cache
    #[argh(option)]
    pub run_dir: Option<String>,
    /// the layout to expect: portals, root-chain or nftables (default: the config's)
    #[argh(option)]
    pub layout: Option<String>,
}

/// Remove every rule and chain edgeproxy owns (offline).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cleanup")]
pub struct CleanupCmd {
    /// also remove EdgeMesh's leftovers (EDGE-MESH*, EDGEMESH-*, KUBE-PORTALS-*/KUBE-NODEPORT-*)
    #[argh(switch)]
    pub edgemesh: bool,
    /// config file (JSON), for the proxy address; default /etc/edgeproxy/config.json when it exists
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// the agent's run directory (default /run/edgeproxy): refused while an agent holds its
    /// lock; the addresses recorded there are removed
    #[argh(option)]
    pub run_dir: Option<String>,
    /// auto (default), nft or legacy
    #[argh(option)]
    pub iptables_backend: Option<String>,
}

/// Validate the config file and exit (for ExecStartPre).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check-config")]
pub struct CheckConfigCmd {
    /// config file (JSON); default /etc/edgeproxy/config.json
    #[argh(option)]
    pub config: Option<PathBuf>,
}
