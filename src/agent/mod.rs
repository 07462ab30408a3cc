//! `edgeproxy run`: the agent that wires source -> state -> rules and proxy.
//!
//! One tokio `current_thread` runtime runs the control task and the proxy. Sources run on their
//! own threads and send [`SourceEvent`]s; the rules worker runs on its own thread (it starts
//! processes and blocks) and reports [`worker::Event`]s; signals and the watchdog timer arrive
//! as inputs too. What to do with each is decided by the pure [`Control`] machine
//! (`control.rs`): this shell only collects a batch of inputs, hands them over, and carries out
//! the effects (a rule set to the worker, a table to the proxy through a `watch` channel,
//! READY=1, the watchdog, the stop).
//!
//! Start: pick the backend, remove what a previous run left, put the proxy address on the
//! listen device, then install once the source has delivered its first complete list.
//! SIGTERM/SIGINT: stop the source, remove every rule and chain we own, remove the address if we
//! added it, return `Ok`. This module starts no process itself (`rules` and `address` do) and
//! holds no proxy code: see [`start_proxy`], the hook where the proxy is started.

mod control;
mod handover;
mod observe;
mod offline;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::address::{self, AddressError};
use crate::config::Config;
use crate::notify::Notifier;
use crate::ops::{self, Ops};
use crate::proxy::stats::ProxyStats;
use crate::proxy::table::ProxyTable;
use crate::proxy::{self, ProxyConfig, ProxyEvent};
use crate::rules::applier::Applier;
use crate::rules::backend::Backend;
use crate::rules::iptables::ApplyError;
use crate::rules::nftables::apply::{remove_leftovers as nft_leftovers, NftApplier};
use crate::rules::render::Layout;
use crate::rules::schedule::WorkerConfig;
use crate::rules::worker;
use crate::rundir::{RunDir, RunDirError};
use crate::source::kube::driver;
use crate::source::SourceKind;
use crate::source::{file, Sink, SourceEvent};
use crate::state::{Change, State, StateConfig};
use crate::stop::Stop;
pub use control::{Control, Effect, Input};
use observe::{layout_name, observe};
use offline::{read_cache, write_cache, CACHE_PERIOD};

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
    /// Another agent runs (or the run directory cannot be used).
    Instance(RunDirError),
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
            AgentError::Instance(e) => e.fmt(f),
            AgentError::Runtime(e) => write!(f, "runtime: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// How often the file source looks at its file.
const FILE_POLL: Duration = Duration::from_secs(1);
/// How long the control task waits for the rest of a burst of source events before planning.
const SOURCE_DEBOUNCE: Duration = Duration::from_millis(10);

/// Reads the configuration again (SIGHUP): the same file and flags as at start.
pub type Reload = Box<dyn Fn() -> Result<Config, String>>;

/// Run the agent until SIGTERM or SIGINT.
pub fn run(config: Config, reload: Reload, notifier: Notifier) -> Result<(), AgentError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::Runtime)?;
    rt.block_on(run_until(config, reload, notifier, std::future::pending::<()>()))
}

/// Start the proxy on this runtime. It reads the newest table for every new connection or flow;
/// its events come back to the control task as [`Input::Proxy`]. Dropping the returned sender
/// (or sending on it) stops the proxy.
fn start_proxy(
    config: &Config,
    table: watch::Receiver<Arc<ProxyTable>>,
    stats: Arc<ProxyStats>,
    tx: mpsc::UnboundedSender<Input>,
) -> (oneshot::Sender<proxy::FinWait>, tokio::task::JoinHandle<()>) {
    let (stop_tx, stop_rx) = oneshot::channel::<proxy::FinWait>();
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
    let task = tokio::spawn(async move {
        let shutdown = async { stop_rx.await.unwrap_or(proxy::FinWait(Duration::ZERO)) };
        if let Err(e) = proxy::run(cfg, table, events_tx, stats, shutdown).await {
            let _ = tx.send(Input::ProxyFailed(e));
        }
    });
    (stop_tx, task)
}

/// Run the agent on the current (current-thread) runtime until SIGTERM, SIGINT or `shutdown`
/// (tests run it in-process this way).
pub async fn run_until(
    config: Config,
    reload: Reload,
    notifier: Notifier,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    // First of all: one instance. A second `run` stops here, having changed nothing.
    let run_dir = RunDir::lock(&config.run_dir).map_err(AgentError::Instance)?;
    // Notes of an agent that did not stop cleanly describe a proxy that is gone.
    run_dir.note_serving_cache(None);
    run_dir.note_set_aside(&[]);
    let ops = Ops::new();
    // kube-proxy's healthz timeout is twice its sync period; ours, twice the resync period.
    ops.health.set_timeout(config.resync_period * 2);
    let _ops_server = config.metrics_address.map(|addr| serve_ops(addr, &ops)).transpose()?;
    let (rules, kube_proxy) = prepare_rules(&config)?;
    let added = add_addresses(&config, &run_dir)?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    forward_signals(&tx)?;
    let shutdown_tx = tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(Input::Signal("shutdown"));
    });
    let rules_tx = tx.clone();
    let worker = worker::spawn(rules, WorkerConfig::from(&config), move |e| {
        let _ = rules_tx.send(Input::Rules(e));
    });
    let stop = Stop::new();
    let sources = start_sources(&config, &tx, &stop)?;
    let (table_tx, table_rx) = watch::channel(Arc::new(ProxyTable::default()));
    let (proxy_stop, proxy_task) = start_proxy(&config, table_rx, ops.proxy.clone(), tx.clone());
    // The watchdog is fed from this loop, so a wedged loop really trips it.
    if let Some(period) = notifier.watchdog_interval() {
        tokio::spawn(every(period, || Input::Tick, tx.clone()));
    }
    tokio::spawn(after(config.offline_after, Input::OfflineTimeout, tx.clone()));
    if config.state_dir.is_some() {
        tokio::spawn(every(CACHE_PERIOD, || Input::CacheTick, tx.clone()));
    }
    drop(tx);

    let mut state = State::new(StateConfig::from(&config));
    state.apply(Change::KubeProxy(kube_proxy));
    log::info!("kube-proxy {}", if kube_proxy { "present: filtered services fall through to it" } else { "absent" });
    let control = Control::new(state).with_cache(read_cache(&config));
    let mut shell = Shell {
        config,
        reload,
        notifier,
        ops,
        run_dir,
        added,
        worker,
        table_tx,
        stop,
        sources,
        proxy_stop,
        proxy_task,
    };
    let (control, signal) = shell.serve(control, &mut rx).await;
    shell.finish(control, signal, &mut rx).await
}

/// What the agent holds while it runs, and carries out [`Control`]'s effects with.
struct Shell {
    config: Config,
    reload: Reload,
    notifier: Notifier,
    ops: Arc<Ops>,
    run_dir: RunDir,
    /// The addresses this agent put on the device (removed at a stop, kept for a restart).
    added: Vec<IpAddr>,
    worker: worker::Handle,
    table_tx: watch::Sender<Arc<ProxyTable>>,
    stop: Stop,
    sources: Vec<std::thread::JoinHandle<()>>,
    proxy_stop: oneshot::Sender<proxy::FinWait>,
    proxy_task: tokio::task::JoinHandle<()>,
}

impl Shell {
    /// Feed [`Control`] batches of inputs and carry out its effects, until it says stop.
    async fn serve(
        &mut self,
        mut control: Control,
        rx: &mut mpsc::UnboundedReceiver<Input>,
    ) -> (Control, &'static str) {
        let mut effects = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut from_source = false;
            loop {
                let Some(input) = next else {
                    // A source delivers one reload as several events (one per kind): give the
                    // rest of the burst a moment to arrive, so it becomes one plan and one restore.
                    if std::mem::take(&mut from_source) {
                        tokio::time::sleep(SOURCE_DEBOUNCE).await;
                        next = rx.try_recv().ok();
                        continue;
                    }
                    break;
                };
                from_source |= matches!(input, Input::Source(SourceEvent::Change(_)));
                observe(&self.ops, &input);
                let input = match input {
                    Input::Reload(_) => self.reload(control.state().config()),
                    other => other,
                };
                control.input(input, &mut effects);
                next = rx.try_recv().ok();
            }
            control.settle(&mut effects);
            let mut stop = None;
            for effect in effects.drain(..) {
                stop = stop.or(self.carry_out(effect, &control));
            }
            if let Some(reason) = stop {
                return (control, reason);
            }
        }
        (control, "all inputs closed")
    }

    /// SIGHUP: read the configuration again. What the state machine uses applies now (the
    /// filter, the layout, serviceCIDRs, nodeName, the load balancer; the rules worker's timing);
    /// the rest (listen, source, proxy and directory settings) at the next restart, said in the
    /// log. An invalid configuration is logged and the running one stays.
    fn reload(&mut self, running: &StateConfig) -> Input {
        let _ = self.notifier.reloading();
        let new = match (self.reload)() {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload: {e}; the running configuration stays");
                let _ = self.notifier.ready("reload refused: invalid configuration");
                return Input::Reload(None);
            }
        };
        let restart_needed = new.listen != self.config.listen
            || new.source != self.config.source
            || ProxyConfig::from(&new) != ProxyConfig::from(&self.config)
            || new.iptables != self.config.iptables
            || new.metrics_address != self.config.metrics_address
            || new.state_dir != self.config.state_dir
            || new.run_dir != self.config.run_dir;
        if restart_needed {
            log::warn!("reload: listen, source, proxy, iptables backend or directory settings changed: they take effect at the next restart");
        }
        let mut state_cfg = StateConfig::from(&new);
        state_cfg.listen = running.listen.clone();
        self.worker.configure(WorkerConfig::from(&new));
        self.config.offline_after = new.offline_after;
        log::info!("reload: configuration read again");
        let _ = self.notifier.ready("configuration reloaded");
        Input::Reload(Some(Box::new(state_cfg)))
    }

    /// Carry out one effect; returns the reason when it is a stop.
    fn carry_out(&self, effect: Effect, control: &Control) -> Option<&'static str> {
        let ops = &self.ops;
        match effect {
            Effect::Rules(set) => {
                ops.queued(std::time::SystemTime::now());
                self.worker.send(set);
            }
            Effect::Table(table) => {
                self.table_tx.send_replace(table);
            }
            Effect::SourceSynced => {
                ops.set_source_synced(true);
                if ops.health.serving_cache() {
                    log::info!("the source synced: the offline cache is replaced");
                    ops.set_serving_cache(false);
                    self.run_dir.note_serving_cache(None);
                }
            }
            Effect::Ready => {
                ops.set_rules_installed(true);
                log::info!("ready: source synced, rules installed, proxy listening");
                let _ = self.notifier.ready("source synced, rules installed, proxy listening");
            }
            Effect::Watchdog => {
                let _ = self.notifier.watchdog();
            }
            Effect::Counts(c) => ops.metrics.plan(&c, layout_name(self.config.layout)),
            Effect::Programmed(triggers) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
                for t in triggers {
                    ops.metrics.programmed(Duration::from_millis(now_ms.saturating_sub(t)));
                }
            }
            Effect::ServingCache(written) => {
                log::warn!(
                    "the source has not synced within {:?}: serving the offline cache written {written}",
                    self.config.offline_after
                );
                ops.set_serving_cache(true);
                self.run_dir.note_serving_cache(Some(&written));
            }
            Effect::WriteCache => {
                if let Some(dir) = &self.config.state_dir {
                    write_cache(dir, control.state());
                }
            }
            Effect::SetAside(endpoints) => {
                let lines: Vec<String> = endpoints.iter().map(|(name, addr)| format!("{name} {addr}")).collect();
                self.run_dir.note_set_aside(&lines);
            }
            Effect::Stop(reason) => return Some(reason),
        }
        None
    }

    /// The stop: connections end, then (unless this is a restart) the rules and the address go.
    async fn finish(
        self,
        mut control: Control,
        reason: &'static str,
        rx: &mut mpsc::UnboundedReceiver<Input>,
    ) -> Result<(), AgentError> {
        let restart = reason.starts_with("SIG") && handover::restart_pending(&self.config.run_dir);
        match restart {
            true => log::info!("{reason}: restarting: connections end, the rules and the address stay"),
            false => log::info!("{reason}: connections end, then the rules and the address go"),
        }
        let _ = self.notifier.stopping();
        self.ops.set_rules_installed(false);
        self.stop.stop();
        // The proxy first: its connections end (FIN or reset) while the rules and the address
        // that carry their packets are still there; then the rules go, then the address. A
        // restart does not wait for clients' FINs: the next agent should listen at once.
        let fin_wait = if restart { proxy::FinWait(Duration::ZERO) } else { proxy::FinWait::from(()) };
        let _ = self.proxy_stop.send(fin_wait);
        if tokio::time::timeout(proxy::DRAIN + Duration::from_secs(1), self.proxy_task).await.is_err() {
            log::warn!("the proxy did not stop in time; going on");
        }
        match restart {
            true => self.worker.leave(),
            false => self.worker.shutdown(),
        }
        let mut result = Ok(());
        while let Ok(input) = rx.try_recv() {
            if let Input::Rules(worker::Event::Stopped { removed, error }) = input {
                match error {
                    None if removed => log::info!("rules removed"),
                    None => log::info!("rules left in place for the next agent"),
                    Some(e) => {
                        log::error!("could not remove the rules: {e}");
                        result = Err(AgentError::Cleanup(e));
                    }
                }
            }
        }
        if !restart {
            remove_addresses(&self.config, &self.run_dir, &self.added);
        }
        self.run_dir.note_serving_cache(None);
        self.run_dir.note_set_aside(&[]);
        for source in self.sources {
            let _ = source.join();
        }
        match control.take_proxy_error() {
            Some(e) => Err(AgentError::Proxy(e)),
            None => result,
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics` on `addr`, on a thread of their own.
fn serve_ops(addr: std::net::SocketAddr, ops: &Arc<Ops>) -> Result<ops::Server, AgentError> {
    let server = ops::Server::start(addr, ops.clone()).map_err(AgentError::Runtime)?;
    log::info!("/healthz, /readyz and /metrics on http://{addr}");
    Ok(server)
}

/// The applier for the configured flavour, what a previous run left removed, and whether
/// kube-proxy serves ClusterIPs here.
fn prepare_rules(config: &Config) -> Result<(Backend, bool), AgentError> {
    let mut rules = match config.layout {
        Layout::Nftables => {
            let nft = NftApplier::new().map_err(AgentError::Rules)?;
            // Chains of an iptables layout of ours would still DNAT services this one no longer
            // proxies (ours run first, but only for what they match).
            if let Ok(mut iptables) = Applier::new(config.iptables) {
                if iptables.cleanup().map_err(AgentError::Rules)?.restores > 0 {
                    log::info!("removed the iptables rules of an earlier layout (the layout is nftables now)");
                }
            }
            Backend::Nftables(nft)
        }
        Layout::Portals | Layout::RootChain => {
            let iptables = Applier::new(config.iptables).map_err(AgentError::Rules)?;
            // Tables of the nftables layout run before any iptables rule: they must go.
            if nft_leftovers().map_err(AgentError::Rules)? {
                log::info!("removed the nftables tables of an earlier layout (the layout is {:?} now)", config.layout);
            }
            Backend::Iptables(Box::new(iptables))
        }
    };
    log::info!("rules backend: {}", rules.describe());
    rules.adopt().map_err(AgentError::Rules)?;
    let kube_proxy = rules.kube_proxy_jump_present().map_err(AgentError::Rules)?;
    Ok((rules, kube_proxy))
}

/// SIGTERM and SIGINT become [`Input::Signal`]s, SIGHUP an [`Input::Reload`].
fn forward_signals(tx: &mpsc::UnboundedSender<Input>) -> Result<(), AgentError> {
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
    // SIGHUP, as often as it comes: read the configuration again.
    let mut hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(AgentError::Runtime)?;
    let tx = tx.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if tx.send(Input::Reload(None)).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// `input()` every `period`, until the control task is gone.
async fn every(period: Duration, input: fn() -> Input, tx: mpsc::UnboundedSender<Input>) {
    let mut interval = tokio::time::interval(period);
    loop {
        interval.tick().await;
        if tx.send(input()).is_err() {
            break;
        }
    }
}

/// `input` once, after `delay`.
async fn after(delay: Duration, input: Input, tx: mpsc::UnboundedSender<Input>) {
    tokio::time::sleep(delay).await;
    let _ = tx.send(input);
}

/// Start the configured source's threads; they send [`Input::Source`]s until `stop`.
fn start_sources(
    config: &Config,
    tx: &mpsc::UnboundedSender<Input>,
    stop: &Stop,
) -> Result<Vec<std::thread::JoinHandle<()>>, AgentError> {
    let source_tx = tx.clone();
    let sink: Sink = Arc::new(move |e| {
        let _ = source_tx.send(Input::Source(e));
    });
    match &config.source.kind {
        SourceKind::File(path) => Ok(vec![file::spawn(path.clone(), FILE_POLL, sink, stop.clone())
            .map_err(|e| AgentError::Source(format!("cannot start the file source thread: {e}")))?]),
        SourceKind::Kube | SourceKind::MetaServer => {
            driver::spawn(&config.source, sink, stop.clone()).map_err(|e| AgentError::Source(e.to_string()))
        }
    }
}

/// Put the proxy addresses on the listen device. An address that is already there is ours when
/// the run directory records that an earlier agent added it (killed before it could remove it);
/// else it is somebody else's and is left alone at exit. Returns the addresses to remove at exit
/// (recorded, so that a killed agent's successor knows them).
fn add_addresses(config: &Config, run: &RunDir) -> Result<Vec<IpAddr>, AgentError> {
    let dev = &config.listen.device;
    if dev.is_empty() {
        return Ok(Vec::new());
    }
    let recorded = run.added_addresses();
    let mut ours = Vec::new();
    for ip in [IpAddr::V4(config.listen.ip), IpAddr::V6(config.listen.ipv6)] {
        match address::ensure_address(dev, ip) {
            Ok(true) => {
                log::info!("added {ip} to {dev}");
                ours.push(ip);
            }
            Ok(false) if recorded.iter().any(|(d, r)| d == dev && *r == ip) => {
                log::info!("{ip} on {dev} was added by an earlier edgeproxy: taken over");
                ours.push(ip);
            }
            Ok(false) => log::info!("{ip} is already on {dev}: left in place at exit"),
            Err(e) if ip.is_ipv4() => return Err(AgentError::Address(e)),
            Err(e) => log::warn!("IPv6 proxy address not set ({e}); IPv6 services will be refused"),
        }
    }
    let record: Vec<(String, IpAddr)> = ours.iter().map(|ip| (dev.clone(), *ip)).collect();
    if let Err(e) = run.record_addresses(&record) {
        log::warn!("cannot record the added addresses ({e}); a successor will not know them for its own");
    }
    Ok(ours)
}

fn remove_addresses(config: &Config, run: &RunDir, added: &[IpAddr]) {
    for ip in added {
        match address::remove_address(&config.listen.device, *ip) {
            Ok(()) => log::info!("removed {ip} from {}", config.listen.device),
            Err(e) => log::warn!("{e}"),
        }
    }
    if let Err(e) = run.forget_addresses() {
        log::warn!("{e}");
    }
}
