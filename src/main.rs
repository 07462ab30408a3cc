//! The `edgeproxy` binary: parse arguments, set up logging, dispatch. Everything else is in the
//! library.

use std::path::Path;
use std::process::ExitCode;

use edgeproxy::cli::{CheckCmd, CheckConfigCmd, CleanupCmd, Cli, Command, RulesCmd, RunCmd};
use edgeproxy::config::{Backend, Config, Overrides, DEFAULT_PATH};
use edgeproxy::kube::objects::decode_document;
use edgeproxy::rules::{apply, Family};
use edgeproxy::state::{Change, State, StateConfig};

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
    // ureq logs the wire unredacted (Authorization headers included) at trace: never go past debug.
    let quiet = level.min(log::LevelFilter::Debug);
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_module_level("ureq", quiet)
        .with_module_level("ureq_proto", quiet)
        .with_module_level("rustls", quiet)
        .init();
    let result = match cli.command {
        None => {
            eprintln!("edgeproxy: no command given; see edgeproxy --help");
            return ExitCode::from(2);
        }
        Some(Command::Rules(cmd)) => rules(&cmd),
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
fn rules(cmd: &RulesCmd) -> Result<ExitCode, String> {
    let config = Config::load(cmd.config.as_deref(), &cmd.overrides()).map_err(|e| e.to_string())?;
    // Files, the cluster (a live dry run), or both.
    let live = cmd.live() || cmd.from.is_empty();
    let mut state = State::new(StateConfig::from(&config));
    let kube_proxy = match cmd.kube_proxy.as_str() {
        "present" => true,
        "absent" => false,
        "auto" => apply::kube_proxy_present(Backend::Auto).unwrap_or_else(|| {
            eprintln!(
                "note: cannot read the nat table; assuming kube-proxy is absent (use --kube-proxy present|absent)"
            );
            false
        }),
        other => return Err(format!("--kube-proxy: {other:?} is not one of auto, present, absent")),
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
        let listed = edgeproxy::kube::reflector::list_all(&config.source).map_err(|e| format!("rules: {e}"))?;
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
                println!("    {} {}/{}: {} endpoint(s){note}", p.name, p.port, p.protocol, p.backends);
            }
        }
        let n = plan.proxied().count();
        println!(
            "{n} of {} services proxied (kube-proxy {})",
            plan.reports.len(),
            if kube_proxy { "present" } else { "absent" }
        );
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
fn load_file(state: &mut State, path: &Path) -> Result<usize, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
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

/// The given config path, else the default one when it exists.
fn config_path(given: Option<&Path>) -> Option<std::path::PathBuf> {
    given.map(Path::to_path_buf).or_else(|| Path::new(DEFAULT_PATH).exists().then(|| DEFAULT_PATH.into()))
}

/// `edgeproxy run`: the agent, until SIGTERM/SIGINT.
fn run(cmd: &RunCmd) -> Result<ExitCode, String> {
    let path = config_path(cmd.config.as_deref());
    let config = Config::load(path.as_deref(), &cmd.overrides()).map_err(|e| e.to_string())?;
    // Read (and unset, so that iptables children do not inherit them) systemd's variables first.
    let notifier = edgeproxy::notify::Notifier::from_env().map_err(|e| e.to_string())?;
    edgeproxy::agent::run(config, notifier).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn backend_overrides(backend: &Option<String>) -> Overrides {
    let mut o = Overrides::default();
    o.set("iptables-backend", backend.clone());
    o
}

/// `edgeproxy check`: exit codes in `rules::apply::exit`.
fn check(cmd: &CheckCmd) -> Result<ExitCode, String> {
    let path = config_path(cmd.config.as_deref());
    let config = Config::load(path.as_deref(), &backend_overrides(&cmd.iptables_backend)).map_err(|e| e.to_string())?;
    // The jumps and chains an installed edgeproxy has, whatever the services: an empty plan.
    let expected = State::new(StateConfig::from(&config)).plan().rules;
    let report = apply::check(apply::detect(config.backend), &expected);
    for line in &report.lines {
        println!("{line}");
    }
    Ok(ExitCode::from(report.code))
}

/// `edgeproxy cleanup [--edgemesh]`.
fn cleanup(cmd: &CleanupCmd) -> Result<ExitCode, String> {
    let path = config_path(cmd.config.as_deref());
    let config = Config::load(path.as_deref(), &backend_overrides(&cmd.iptables_backend)).map_err(|e| e.to_string())?;
    let mut applier = apply::Applier::new(config.backend).map_err(|e| e.to_string())?;
    if cmd.edgemesh {
        // Ours and EdgeMesh's together (KUBE-PORTALS-* are kept if kube-proxy's userspace mode owns them).
        let ips = [std::net::IpAddr::V4(config.listen.ip), std::net::IpAddr::V6(config.listen.ipv6)];
        let notes = applier.cleanup_edgemesh(&ips).map_err(|e| e.to_string())?;
        if notes.is_empty() {
            println!("nothing to remove");
        }
        for n in notes {
            println!("{n}");
        }
    } else {
        let r = applier.cleanup().map_err(|e| e.to_string())?;
        println!("edgeproxy rules: {}", if r.restores > 0 { "removed" } else { "none found" });
    }
    Ok(ExitCode::SUCCESS)
}

/// `edgeproxy check-config`: validate and exit (for ExecStartPre).
fn check_config(cmd: &CheckConfigCmd) -> Result<ExitCode, String> {
    let path = cmd.config.clone().unwrap_or_else(|| DEFAULT_PATH.into());
    Config::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())?;
    println!("{}: ok", path.display());
    Ok(ExitCode::SUCCESS)
}
