//! `edgeproxy run`: the agent loop that wires source -> state -> rules (and, later, the proxy).
//!
//! One tokio `current_thread` runtime runs the control task. Sources run on their own threads
//! and send [`SourceEvent`]s; the rules applier runs on its own thread (it starts processes and
//! blocks) and reports [`worker::Event`]s; signals arrive as inputs too. The control task owns
//! the [`State`]: it applies every input, then plans once per batch, hands the [`RuleSet`] to the
//! applier when it changed, and publishes the [`ProxyTable`] through a `watch` channel.
//!
//! Start: pick the backend, remove what a previous run left, put the proxy address on the
//! listen device, then install once the source has delivered its first complete list.
//! SIGTERM/SIGINT: stop the source, remove every rule and chain we own, remove the address if we
//! added it, return `Ok`. This module starts no process itself (`rules::apply` does) and
//! holds no proxy code: see [`start_proxy`], the hook where the proxy is started.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::address::{self, AddressError};
use crate::config::Config;
use crate::model::Kind;
use crate::notify::Notifier;
use crate::ops::{self, Gauge, Ops};
use crate::proxy::stats::ProxyStats;
use crate::proxy::table::ProxyTable;
use crate::proxy::{self, ProxyConfig, ProxyEvent};
use crate::rules::applier::Applier;
use crate::rules::iptables::ApplyError;
use crate::rules::worker::{self, WorkerConfig};
use crate::rules::RuleSet;
use crate::source::kube::driver;
use crate::source::SourceKind;
use crate::source::{file, Sink, SourceEvent};
use crate::state::{Change, State, StateConfig};
use crate::stop::Stop;

/// Why the agent could not start or stop cleanly.
#[derive(Debug)]
pub enum AgentError {
    /// Backend detection or the start-up cleanup failed.
    Rules(ApplyError),
    /// The exit cleanup failed: our rules may still be in the kernel.
    Cleanup(Arc<ApplyError>),
    /// The proxy address could not be put on the listen device.
    Address(AddressError),
    /// The proxy stopped with an error (its IPv4 listener could not be bound).
    Proxy(std::io::Error),
    /// The configured source cannot be used.
    Source(String),
    /// The runtime or a signal handler could not be set up.
    Runtime(std::io::Error),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Rules(e) => write!(f, "rules: {e}"),
            AgentError::Cleanup(e) => write!(f, "could not remove the rules: {e}"),
            AgentError::Proxy(e) => write!(f, "proxy: {e}"),
            AgentError::Address(e) => write!(f, "proxy address: {e}"),
            AgentError::Source(m) => write!(f, "source: {m}"),
            AgentError::Runtime(e) => write!(f, "runtime: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Everything the control task reacts to.
enum Input {
    Source(SourceEvent),
    Rules(worker::Event),
    Proxy(ProxyEvent),
    ProxyFailed(std::io::Error),
    Signal(&'static str),
    /// Time to tell systemd's watchdog we are alive.
    Tick,
}

/// How often the file source looks at its file.
const FILE_POLL: Duration = Duration::from_secs(1);
/// How long the control task waits for the rest of a burst of source events before planning.
const SOURCE_DEBOUNCE: Duration = Duration::from_millis(10);

/// Run the agent until SIGTERM or SIGINT.
pub fn run(config: Config, notifier: Notifier) -> Result<(), AgentError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::Runtime)?;
    rt.block_on(control(config, notifier))
}

/// Start the proxy on this runtime. It reads the newest table for every new connection or flow;
/// its events come back to the control task as [`Input::Proxy`]. Dropping the returned sender
/// (or sending on it) stops the proxy.
fn start_proxy(
    config: &Config,
    table: watch::Receiver<Arc<ProxyTable>>,
    stats: Arc<ProxyStats>,
    tx: mpsc::UnboundedSender<Input>,
) -> oneshot::Sender<()> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<ProxyEvent>();
    let forward = tx.clone();
    tokio::spawn(async move {
        while let Some(e) = events_rx.recv().await {
            if forward.send(Input::Proxy(e)).is_err() {
                break;
            }
        }
    });
    let cfg = ProxyConfig::from(config);
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stop_rx.await;
        };
        if let Err(e) = proxy::run(cfg, table, events_tx, stats, shutdown).await {
            let _ = tx.send(Input::ProxyFailed(e));
        }
    });
    stop_tx
}

async fn control(config: Config, notifier: Notifier) -> Result<(), AgentError> {
    let ops = Ops::new();
    let _ops_server = match config.metrics_address {
        Some(addr) => {
            let server = ops::Server::start(addr, ops.clone()).map_err(AgentError::Runtime)?;
            log::info!("/healthz, /readyz and /metrics on http://{addr}");
            Some(server)
        }
        None => None,
    };
    let mut rules = Applier::new(config.iptables).map_err(AgentError::Rules)?;
    log::info!("iptables backend: {} ({})", rules.binaries().name, rules.binaries().restore);
    rules.startup_cleanup().map_err(AgentError::Rules)?;
    let kube_proxy = rules.kube_proxy_jump_present().map_err(AgentError::Rules)?;

    let added = add_addresses(&config)?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    for (kind, name) in [
        (tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
        (tokio::signal::unix::SignalKind::interrupt(), "SIGINT"),
    ] {
        let mut sig = tokio::signal::unix::signal(kind).map_err(AgentError::Runtime)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            if sig.recv().await.is_some() {
                let _ = tx.send(Input::Signal(name));
            }
        });
    }

    let rules_tx = tx.clone();
    let handle = worker::spawn(rules, WorkerConfig::from(&config), move |e| {
        let _ = rules_tx.send(Input::Rules(e));
    });

    let stop = Stop::new();
    let source_tx = tx.clone();
    let sink: Sink = Arc::new(move |e| {
        let _ = source_tx.send(Input::Source(e));
    });
    let sources: Vec<std::thread::JoinHandle<()>> = match &config.source.kind {
        SourceKind::File(path) => vec![file::spawn(path.clone(), FILE_POLL, sink, stop.clone())
            .map_err(|e| AgentError::Source(format!("cannot start the file source thread: {e}")))?],
        SourceKind::Kube | SourceKind::MetaServer => {
            driver::spawn(&config.source, sink, stop.clone()).map_err(|e| AgentError::Source(e.to_string()))?
        }
    };

    let (table_tx, table_rx) = watch::channel(Arc::new(ProxyTable::default()));
    let proxy_stop = start_proxy(&config, table_rx, ops.proxy.clone(), tx.clone());
    // The watchdog is fed from this loop, so a wedged loop really trips it.
    if let Some(every) = notifier.watchdog_interval() {
        let tick = tx.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                if tick.send(Input::Tick).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut state = State::new(StateConfig::from(&config));
    state.apply(Change::KubeProxy(kube_proxy));
    log::info!("kube-proxy {}", if kube_proxy { "present: filtered services fall through to it" } else { "absent" });
    let mut synced = false;
    // The last rule set handed to the applier: the same allocation the applier holds.
    let mut sent: Option<Arc<RuleSet>> = None;
    let mut installed = false;
    let mut ready_logged = false;
    let mut dirty = false;
    let mut signal = None;
    let mut listening = false;
    let mut proxy_error: Option<std::io::Error> = None;

    let mut synced_kinds = [false; 2];
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut from_source = false;
        loop {
            let Some(input) = next else {
                // A source delivers one reload as several events (one per kind): give the rest
                // of the burst a moment to arrive, so it becomes one plan and one restore.
                if std::mem::take(&mut from_source) {
                    tokio::time::sleep(SOURCE_DEBOUNCE).await;
                    next = rx.try_recv().ok();
                    continue;
                }
                break;
            };
            match input {
                Input::Source(SourceEvent::Change(c)) => {
                    from_source = true;
                    dirty |= state.apply(c);
                }
                Input::Source(SourceEvent::Synced(kind)) => {
                    synced_kinds[usize::from(kind != Kind::Service)] = true;
                    if !synced && synced_kinds == [true, true] {
                        synced = true;
                        dirty = true;
                        ops.set_source_synced(true);
                    }
                }
                Input::Source(SourceEvent::Error { message, .. }) => {
                    log::debug!("source: {message}")
                }
                Input::Source(SourceEvent::WatchRestarted(kind)) => ops.metrics.watch_restart(resource(kind)),
                Input::Source(SourceEvent::Relisted(kind)) => ops.metrics.relist(resource(kind)),
                Input::Tick => {
                    let _ = notifier.watchdog();
                }
                Input::Rules(e) => {
                    record(&ops, &e);
                    if let Some(present) = on_rules_event(e, &mut installed) {
                        if state.apply(Change::KubeProxy(present)) {
                            log::info!("kube-proxy {}", if present { "appeared" } else { "went away" });
                            dirty = true;
                        }
                    }
                }
                Input::Proxy(ProxyEvent::UdpPortUnavailable(port)) => {
                    log::warn!("UDP proxy port {port} is taken by another process; moving its service to another port");
                    dirty |= state.apply(Change::UdpPortUnavailable(port));
                }
                Input::Proxy(ProxyEvent::Listening(addrs)) => {
                    log::info!("proxy listening on {addrs:?}");
                    listening = true;
                }
                Input::Proxy(other) => log::debug!("proxy: {other:?}"),
                Input::ProxyFailed(e) => {
                    log::error!("proxy failed: {e}");
                    proxy_error = Some(e);
                    signal = Some("proxy failure");
                }
                Input::Signal(name) => signal = Some(name),
            }
            next = rx.try_recv().ok();
        }
        if signal.is_some() {
            break;
        }
        if installed && synced && listening && !ready_logged {
            ready_logged = true;
            ops.set_rules_installed(true);
            log::info!("ready: source synced, rules installed, proxy listening");
            let _ = notifier.ready("source synced, rules installed, proxy listening");
        }
        if dirty && synced {
            dirty = false;
            // Entries that did not change stay the very ones the proxy is using.
            let current = table_tx.borrow().clone();
            let plan = state.plan_reusing(&current);
            drop(current);
            let proxied = plan.proxied().count();
            let loops = plan.refused_loops();
            if ops.metrics.endpoints_refused_loop.get() != Gauge::count(loops) {
                if loops > 0 {
                    let names: Vec<&str> = plan
                        .reports
                        .iter()
                        .flat_map(|r| &r.ports)
                        .filter(|p| p.loops > 0)
                        .map(|p| &*p.name)
                        .take(5)
                        .collect();
                    log::warn!(
                        "{loops} endpoints refused: they are ClusterIP:ports this node proxies (a loop); in {}",
                        names.join(", ")
                    );
                }
                ops.metrics.endpoints_refused_loop.set(Gauge::count(loops));
            }
            if sent.as_deref() != Some(&plan.rules) {
                log::info!("plan: {proxied} of {} services proxied", plan.reports.len());
                let rules = Arc::new(plan.rules);
                sent = Some(rules.clone());
                handle.send(rules);
            }
            if **table_tx.borrow() != plan.table {
                table_tx.send_replace(Arc::new(plan.table));
            }
        }
    }

    log::info!("{}: removing rules and exiting", signal.unwrap_or("all inputs closed"));
    let _ = notifier.stopping();
    ops.set_rules_installed(false);
    stop.stop();
    let _ = proxy_stop.send(());
    handle.shutdown();
    let mut result = Ok(());
    while let Ok(input) = rx.try_recv() {
        if let Input::Rules(worker::Event::Stopped { error }) = input {
            match error {
                None => log::info!("rules removed"),
                Some(e) => {
                    log::error!("could not remove the rules: {e}");
                    result = Err(AgentError::Cleanup(e));
                }
            }
        }
    }
    remove_addresses(&config, &added);
    for source in sources {
        let _ = source.join();
    }
    match proxy_error {
        Some(e) => Err(AgentError::Proxy(e)),
        None => result,
    }
}

/// The metric name of a resource.
fn resource(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices",
        Kind::Endpoints => "endpoints",
    }
}

/// Count an applier event in the metrics.
fn record(ops: &Ops, e: &worker::Event) {
    match e {
        worker::Event::Applied { duration, restores, .. } if *restores > 0 => {
            ops.metrics.rule_sync_ok(*duration, std::time::SystemTime::now())
        }
        worker::Event::Failed { duration, .. } => ops.metrics.rule_sync_failed(*duration),
        worker::Event::Repaired { .. } => ops.metrics.guard_repairs.inc(),
        _ => {}
    }
}

/// Log an applier event; returns kube-proxy presence when it changed.
fn on_rules_event(e: worker::Event, installed: &mut bool) -> Option<bool> {
    match e {
        worker::Event::Applied { duration, restores, rules, total_restores } => {
            *installed = true;
            if restores > 0 {
                log::info!(
                    "rules applied: {rules} rules, {restores} restore(s) in {} ms (restores so far: {total_restores})",
                    duration.as_millis()
                );
            } else {
                log::debug!("rules unchanged: no restore");
            }
        }
        worker::Event::Failed { error, retry_in, .. } => {
            log::error!(
                "rules sync failed, previous rules still in force; retry in {} ms: {error}",
                retry_in.as_millis()
            );
        }
        worker::Event::Repaired { what } => log::warn!("rules repaired: {}", what.join("; ")),
        worker::Event::KubeProxy(present) => return Some(present),
        worker::Event::Stopped { .. } => {}
    }
    None
}

fn add_addresses(config: &Config) -> Result<Vec<IpAddr>, AgentError> {
    let dev = &config.listen.device;
    if dev.is_empty() {
        return Ok(Vec::new());
    }
    let mut added = Vec::new();
    let v4 = IpAddr::V4(config.listen.ip);
    if address::ensure_address(dev, v4).map_err(AgentError::Address)? {
        log::info!("added {v4} to {dev}");
        added.push(v4);
    }
    let v6 = IpAddr::V6(config.listen.ipv6);
    match address::ensure_address(dev, v6) {
        Ok(true) => added.push(v6),
        Ok(false) => {}
        Err(e) => log::warn!("IPv6 proxy address not set ({e}); IPv6 services will be refused"),
    }
    Ok(added)
}

fn remove_addresses(config: &Config, added: &[IpAddr]) {
    for ip in added {
        match address::remove_address(&config.listen.device, *ip) {
            Ok(()) => log::info!("removed {ip} from {}", config.listen.device),
            Err(e) => log::warn!("{e}"),
        }
    }
}
