//! The `edgeproxy` binary: parse arguments, set up logging, dispatch. Everything else is in the
//! library.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use edgeproxy::address;
use edgeproxy::agent::AgentError;
use edgeproxy::cli::{CheckCmd, CheckConfigCmd, CleanupCmd, Cli, Command, RulesCmd, RunCmd};
use edgeproxy::config::{self, Config, ConfigError, Overrides};
use edgeproxy::logging;
use edgeproxy::notify::NotifyError;
use edgeproxy::rules::applier::Applier;
use edgeproxy::rules::iptables::{self, ApplyError};
use edgeproxy::rules::render::Layout;
use edgeproxy::rules::{check, Family, Flavour};
use edgeproxy::rundir::{RunDir, RunDirError};
use edgeproxy::source::kube::driver::SourceError;
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::state::{Change, State, StateConfig};

/// Why a command failed: each command's own errors, folded here so that `main` prints one line
/// and picks the exit code in one place.
#[derive(Debug)]
enum MainError {
    Config(ConfigError),
    Rules(ApplyError),
    Source(SourceError),
    Notify(NotifyError),
    Agent(AgentError),
    /// An agent runs (the run directory's lock is taken).
    Instance(RunDirError),
    /// A file given on the command line could not be read.
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A flag value the command does not accept.
    Usage(String),
}

impl fmt::Display for MainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MainError::Config(e) => e.fmt(f),
            MainError::Rules(e) => e.fmt(f),
            MainError::Source(e) => write!(f, "source: {e}"),
            MainError::Notify(e) => e.fmt(f),
            MainError::Agent(e) => e.fmt(f),
            MainError::Instance(e) => e.fmt(f),
            MainError::Read { path, error } => write!(f, "{}: cannot read: {error}", path.display()),
            MainError::Usage(m) => f.write_str(m),
        }
    }
}

macro_rules! from_errors {
    ($($variant:ident($t:ty)),*) => {$(
        impl From<$t> for MainError {
            fn from(e: $t) -> Self {
                MainError::$variant(e)
            }
        }
    )*};
}
from_errors!(
    Config(ConfigError),
    Rules(ApplyError),
    Source(SourceError),
    Notify(NotifyError),
    Agent(AgentError),
    Instance(RunDirError)
);

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("edgeproxy {} ({})", env!("CARGO_PKG_VERSION"), env!("EDGEPROXY_TARGET"));
        return ExitCode::SUCCESS;
    }
    let level = match cli.log_level.parse::<log::LevelFilter>() {
        Ok(l) => l,
        Err(_) => {
            eprintln!("--log-level: {:?} is not one of error, warn, info, debug, trace", cli.log_level);
            return ExitCode::from(2);
        }
    };
    let Some((target, syslog)) = logging::Target::parse(&cli.log_target) else {
        eprintln!("--log-target: {:?} is not one of auto, journal, stderr, syslog, syslog:/PATH", cli.log_target);
        return ExitCode::from(2);
    };
    logging::init(level, target, syslog);
    let result = match cli.command {
        None => {
            eprintln!("edgeproxy: no command given; see edgeproxy --help");
            return ExitCode::from(2);
        }
        Some(Command::Rules(cmd)) => {
            edgeproxy::sys::default_sigpipe();
            rules(&cmd)
        }
        Some(Command::Run(cmd)) => run(&cmd),
        Some(Command::Check(cmd)) => check(&cmd),
        Some(Command::Cleanup(cmd)) => cleanup(&cmd),
        Some(Command::CheckConfig(cmd)) => check_config(&cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgeproxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// `edgeproxy rules`: decode the files, run the state machine once, print.
fn rules(cmd: &RulesCmd) -> Result<ExitCode, MainError> {
    let config = Config::load(config::file_path(cmd.config.as_deref()).as_deref(), &cmd.overrides())?;
    // Files, the cluster (a live dry run), or both.
    let live = cmd.live() || cmd.from.is_empty();
    let mut state = State::new(StateConfig::from(&config));
    let kube_proxy = match cmd.kube_proxy.as_str() {
        "present" => true,
        "absent" => false,
        "auto" => iptables::kube_proxy_present(Flavour::Auto).unwrap_or_else(|| {
            eprintln!(
                "note: cannot read the nat table; assuming kube-proxy is absent (use --kube-proxy present|absent)"
            );
            false
        }),
        other => return Err(MainError::Usage(format!("--kube-proxy: {other:?} is not one of auto, present, absent"))),
    };
    state.apply(Change::KubeProxy(kube_proxy));
    let mut bad = 0usize;
    for path in &cmd.from {
        bad += load_file(&mut state, path)?;
    }
    if live {
        if !cmd.live() {
            eprintln!(
                "note: no --from and no source flag: listing from the cluster the settings name \
                 ($KUBECONFIG or ~/.kube/config, in-cluster, else the MetaServer at {})",
                config.source.meta_server
            );
        }
        let listed = edgeproxy::source::kube::driver::list_all(&config.source)?;
        eprintln!("listed {} objects from {}", listed.objects.len(), listed.origin);
        for e in &listed.errors {
            eprintln!("{}: {e} (skipped)", listed.origin);
        }
        bad += listed.errors.len();
        for o in listed.objects {
            state.apply(Change::Upsert(o));
        }
    }
    let plan = state.plan();
    if cmd.explain {
        let f = &config.filter;
        println!(
            "settings: edgemesh {} profile; layout {:?}, serviceFilterMode {:?}, noProxyLabel {}, defaultIgnores {:?}",
            config.profile, config.layout, f.mode, f.no_proxy_label, f.default_ignores
        );
        for r in &plan.reports {
            println!("{}: {}", r.key, r.verdict);
            for p in &r.ports {
                let mut note = p.note.map(|n| format!(" ({n})")).unwrap_or_default();
                if p.loops > 0 {
                    note.push_str(&format!(
                        " ({} endpoint(s) refused: a ClusterIP:port this node proxies, a loop)",
                        p.loops
                    ));
                }
                if p.left_out > 0 {
                    note.push_str(&format!(" ({} set aside by the health check, left out)", p.left_out));
                }
                println!(
                    "    {} {}/{}: {} endpoint(s), {} path{note}",
                    p.name,
                    p.port,
                    p.protocol,
                    p.backends,
                    p.path.as_str()
                );
            }
        }
        let n = plan.proxied().count();
        println!(
            "{n} of {} services proxied (kube-proxy {})",
            plan.reports.len(),
            if kube_proxy { "present" } else { "absent" }
        );
    } else if let Some(nft) = &plan.rules.nft {
        println!("# nft -f - input (one transaction):");
        print!("{}", edgeproxy::rules::nftables::script(nft));
    } else {
        for family in [Family::V4, Family::V6] {
            let t = plan.rules.family(family);
            if t.is_empty() {
                continue;
            }
            let tool = if family == Family::V4 { "iptables" } else { "ip6tables" };
            println!("# {tool}: jumps, each inserted at position 1 of its chain");
            for j in &t.jumps {
                println!("# -I {} 1 {}", j.from, j.spec);
            }
            println!("# {tool}-restore --noflush --wait input:");
            print!("{}", t.restore_text());
        }
    }
    Ok(if bad > 0 { ExitCode::from(3) } else { ExitCode::SUCCESS })
}

/// Decode one file into the state; returns the number of bad objects (each already reported).
fn load_file(state: &mut State, path: &Path) -> Result<usize, MainError> {
    let bytes = std::fs::read(path).map_err(|error| MainError::Read { path: path.to_path_buf(), error })?;
    let decoded = decode_document(&bytes, None);
    let mut bad = decoded.errors.len();
    for e in &decoded.errors {
        eprintln!("{}: {e} (skipped)", path.display());
    }
    if let Some(e) = &decoded.document_error {
        eprintln!("{}: {e}", path.display());
        bad += 1;
    }
    for o in decoded.objects {
        state.apply(Change::Upsert(o));
    }
    Ok(bad)
}

/// `edgeproxy run`: the agent, until SIGTERM/SIGINT.
fn run(cmd: &RunCmd) -> Result<ExitCode, MainError> {
    let path = config::file_path(cmd.config.as_deref());
    let overrides = cmd.overrides();
    let config = match Config::load(path.as_deref(), &overrides) {
        Ok(c) => {
            keep_last_good(path.as_deref(), &c);
            c
        }
        Err(e) => match last_good(&overrides) {
            Some((saved, c)) => {
                log::error!("{e}");
                log::warn!("running with the last configuration that loaded, {}", saved.display());
                c
            }
            None => return Err(e.into()),
        },
    };
    // Read (and unset, so that iptables children do not inherit them) systemd's variables first.
    let notifier = edgeproxy::notify::Notifier::from_env()?;
    let reload = Box::new(move || Config::load(path.as_deref(), &overrides).map_err(|e| e.to_string()));
    edgeproxy::agent::run(config, reload, notifier)?;
    Ok(ExitCode::SUCCESS)
}

/// The last config file that loaded, kept in the state directory: a restart with a broken file
/// runs with it (and says so) instead of leaving the node without a proxy.
const LAST_GOOD: &str = "config.last-good.json";

fn keep_last_good(path: Option<&Path>, config: &Config) {
    let (Some(path), Some(dir)) = (path, &config.state_dir) else {
        return;
    };
    let Ok(text) = edgeproxy::capped::read_text(path, config::MAX_CONFIG_BYTES) else {
        return;
    };
    let saved = dir.join(LAST_GOOD);
    let tmp = dir.join(format!("{LAST_GOOD}.new"));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &saved));
    if let Err(e) = written {
        log::warn!("cannot keep the config as {}: {e}", saved.display());
    }
}

/// The kept config (with today's flags), when the current file does not load.
fn last_good(overrides: &Overrides) -> Option<(PathBuf, Config)> {
    let dir = Config::load(None, overrides).ok()?.state_dir?;
    let saved = dir.join(LAST_GOOD);
    let text = edgeproxy::capped::read_text(&saved, config::MAX_CONFIG_BYTES).ok()?;
    let origin = saved.display().to_string();
    match Config::from_text(&text, &origin, overrides) {
        Ok(c) => Some((saved, c)),
        Err(e) => {
            log::warn!("{e}");
            None
        }
    }
}

fn backend_overrides(backend: Option<&String>) -> Overrides {
    let mut o = Overrides::default();
    o.set("iptables-backend", backend.cloned());
    o
}

/// `edgeproxy check`: exit codes in `rules::check::exit`.
fn check(cmd: &CheckCmd) -> Result<ExitCode, MainError> {
    let path = config::file_path(cmd.config.as_deref());
    let mut overrides = backend_overrides(cmd.iptables_backend.as_ref());
    overrides.set("run-dir", cmd.run_dir.clone());
    overrides.set("layout", cmd.layout.clone());
    let config = Config::load(path.as_deref(), &overrides)?;
    // The jumps and chains an installed edgeproxy has, whatever the services: an empty plan.
    let expected = State::new(StateConfig::from(&config)).plan().rules;
    let mut report = if config.layout == Layout::Nftables {
        check::check_nftables(iptables::detect(config.iptables))
    } else {
        check::check(iptables::detect(config.iptables), &expected)
    };
    // A device other than ours holding the proxy address (EdgeMesh's edgemesh0 bridge, left
    // behind) takes the traffic meant for the proxy.
    for ip in [IpAddr::V4(config.listen.ip), IpAddr::V6(config.listen.ipv6)] {
        match address::devices_holding(ip) {
            Ok(devices) => {
                for dev in devices.iter().filter(|d| **d != config.listen.device) {
                    report.leftover(&format!(
                        "{ip} is on device {dev}, not {}: an EdgeMesh bridge left behind? (ip link del {dev})",
                        config.listen.device
                    ));
                }
            }
            Err(e) => report.lines.push(format!("cannot list addresses: {e}")),
        }
    }
    if let Some(written) = edgeproxy::rundir::serving_cache(&config.run_dir) {
        report.lines.push(format!("source: not synced since the start; serving the offline cache written {written}"));
    }
    for line in edgeproxy::rundir::set_aside(&config.run_dir) {
        if let Some((service, endpoint)) = line.split_once(' ') {
            report.lines.push(format!("proxy: endpoint {endpoint} of {service} set aside (its last dial failed; new connections use the others while they answer)"));
        }
    }
    for line in &report.lines {
        println!("{line}");
    }
    Ok(ExitCode::from(report.code))
}

/// `edgeproxy cleanup [--edgemesh]`.
fn cleanup(cmd: &CleanupCmd) -> Result<ExitCode, MainError> {
    let path = config::file_path(cmd.config.as_deref());
    let mut overrides = backend_overrides(cmd.iptables_backend.as_ref());
    overrides.set("run-dir", cmd.run_dir.clone());
    let config = Config::load(path.as_deref(), &overrides)?;
    // Not while an agent runs: it would put everything back at once, or lose its rules.
    let run = RunDir::lock(&config.run_dir)?;
    // Without iptables (an nftables-only system, the nftables layout) only our tables go.
    let applier = match Applier::new(config.iptables) {
        Err(e @ ApplyError::NoBinaries(_)) => {
            println!("{e}; only the nftables tables are looked at");
            None
        }
        other => Some(other?),
    };
    for (dev, ip) in run.added_addresses() {
        match address::remove_address(&dev, ip) {
            Ok(()) => println!("removed {ip} from {dev} (added by an edgeproxy that did not remove it)"),
            Err(e) => eprintln!("{e}"),
        }
    }
    run.forget_addresses()?;
    if let Some(mut applier) = applier {
        if cmd.edgemesh {
            // Ours and EdgeMesh's together (KUBE-PORTALS-* are kept if kube-proxy's userspace mode owns them).
            let ips = [std::net::IpAddr::V4(config.listen.ip), std::net::IpAddr::V6(config.listen.ipv6)];
            let notes = applier.cleanup_edgemesh(&ips)?;
            if notes.is_empty() {
                println!("nothing to remove");
            }
            for n in notes {
                println!("{n}");
            }
        } else {
            let r = applier.cleanup()?;
            println!("edgeproxy rules: {}", if r.restores > 0 { "removed" } else { "none found" });
        }
    }
    if edgeproxy::rules::nftables::apply::remove_leftovers()? {
        println!("edgeproxy nftables tables: removed");
    }
    Ok(ExitCode::SUCCESS)
}

/// `edgeproxy check-config`: validate and exit (for ExecStartPre).
fn check_config(cmd: &CheckConfigCmd) -> Result<ExitCode, MainError> {
    match config::file_path(cmd.config.as_deref()) {
        Some(path) => {
            Config::load(Some(&path), &Overrides::default())?;
            println!("{}: ok", path.display());
        }
        None => println!("no config file at {}: the built-in defaults apply", config::defaults::PATH),
    }
    Ok(ExitCode::SUCCESS)
}
