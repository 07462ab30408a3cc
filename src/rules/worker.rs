//! The rules worker, a thread of its own: owns a [`Backend`] (the applier of the layout) and keeps the kernel in line with the
//! latest desired [`RuleSet`].
//!
//! It receives rule sets over a channel and keeps only the newest (a burst becomes one restore:
//! the first change goes out at once, later ones wait until `min_sync_period` has passed since
//! the last sync); a sync writes only the chains that changed. Every `guard_period` it runs the
//! hybrid-order guard (the jumps always, chain contents where that is cheap: see
//! [`super::applier::Applier::guard`]), every `resync_period` a full rewrite, which also puts right any edit to
//! a chain the guard does not read; a failed sync is retried with exponential backoff, as a full
//! rewrite. Outcomes go to a callback,
//! never to the caller's state: the agent turns them into log lines, metrics and readiness.
//! On shutdown it removes every rule and chain edgeproxy owns, reports, and ends.
//!
//! It never decides what the rules are, and it never blocks the proxy loop (it is a plain thread).
//! Rule sets arrive as `Arc`s: the caller keeps the same allocation to compare the next plan
//! with, so the desired set exists once, not once per holder.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backend::Backend;
use super::iptables::ApplyError;
use super::schedule::{Job, Schedule, WorkerConfig};
use super::RuleSet;

/// What the rules worker reports.
#[derive(Clone, Debug)]
pub enum Event {
    /// A desired set is now in the kernel. `restores` is 0 when nothing had changed; `full`: a
    /// full rewrite (else only the chains that changed).
    Applied { duration: Duration, restores: u32, rules: usize, total_restores: u64, full: bool },
    /// The periodic full rewrite (`resync`), or a guard check (`!resync`) found or put
    /// everything in place: the rules are as they should be at this moment.
    Confirmed { resync: bool, duration: Duration },
    /// A sync failed; the previous rules are still in force. Retried after `retry_in`.
    Failed { error: Arc<ApplyError>, duration: Duration, retry_in: Duration },
    /// The guard (or a sync) found something out of place and put it right.
    Repaired { what: Vec<String> },
    /// kube-proxy's jump into KUBE-SERVICES appeared or went away.
    KubeProxy(bool),
    /// Connections refused so far by the kernel's reject rules, per service port (sums that
    /// only grow; reported when they changed).
    Refused(Vec<(String, u64)>),
    /// Shutdown finished: rules removed (`removed`, `error` is `None`), left in place for the
    /// next agent (`removed` false), or an attempt to remove them failed.
    Stopped { removed: bool, error: Option<Arc<ApplyError>> },
}

enum Msg {
    Desired(Arc<RuleSet>),
    /// Stop; `true`: remove every rule we own first, `false`: leave them for the next agent.
    Shutdown(bool),
    /// New timings (a reload).
    Configure(WorkerConfig),
}

/// The handle of a running rules worker.
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    join: Option<JoinHandle<()>>,
}

impl Handle {
    /// Hand over a new desired set (it replaces any not yet applied). Keep a clone of the `Arc`
    /// to compare with: it costs nothing.
    pub fn send(&self, set: Arc<RuleSet>) {
        let _ = self.tx.send(Msg::Desired(set));
    }

    /// Ask the thread to remove our rules and stop, and wait for it.
    pub fn shutdown(self) {
        self.stop(true);
    }

    /// New timings (a reload): they apply from the next wake-up.
    pub fn configure(&self, cfg: WorkerConfig) {
        let _ = self.tx.send(Msg::Configure(cfg));
    }

    /// Stop and leave the rules in the kernel for the next agent (a restart), and wait.
    pub fn leave(self) {
        self.stop(false);
    }

    fn stop(mut self, remove: bool) {
        let _ = self.tx.send(Msg::Shutdown(remove));
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Start the thread. `report` is called from it for every [`Event`].
pub fn spawn(applier: Backend, cfg: WorkerConfig, report: impl Fn(Event) + Send + 'static) -> Handle {
    let (tx, rx) = mpsc::channel();
    let join = std::thread::Builder::new()
        .name("rules".into())
        .spawn(move || run(applier, cfg, &rx, &report))
        .expect("spawning the rules thread");
    Handle { tx, join: Some(join) }
}

fn run(mut applier: Backend, cfg: WorkerConfig, rx: &mpsc::Receiver<Msg>, report: &dyn Fn(Event)) {
    let mut schedule = Schedule::new(cfg, Instant::now());
    let mut kube_proxy: Option<bool> = None;
    loop {
        let now = Instant::now();
        let mut shutdown: Option<bool> = None;
        match rx.recv_timeout(schedule.next_deadline(now).saturating_duration_since(now)) {
            Ok(msg) => shutdown = take(&mut schedule, msg),
            Err(RecvTimeoutError::Disconnected) => shutdown = Some(true),
            Err(RecvTimeoutError::Timeout) => {}
        }
        // Keep only the newest of a burst.
        while shutdown.is_none() {
            match rx.try_recv() {
                Ok(msg) => shutdown = take(&mut schedule, msg),
                Err(mpsc::TryRecvError::Disconnected) => shutdown = Some(true),
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if let Some(remove) = shutdown {
            let error = match remove {
                true => applier.cleanup().err().map(Arc::new),
                false => None,
            };
            report(Event::Stopped { removed: remove, error });
            return;
        }
        let refused_before = applier.refused().values().sum::<u64>();
        while let Some(job) = schedule.due(Instant::now()) {
            let started = Instant::now();
            match execute(&mut applier, &job, started, report) {
                Ok(seen) => {
                    schedule.finished(&job, true, started, Instant::now());
                    if let Some(seen) = seen.filter(|s| kube_proxy != Some(*s)) {
                        kube_proxy = Some(seen);
                        report(Event::KubeProxy(seen));
                    }
                }
                Err(e) => {
                    let retry_in = schedule.finished(&job, false, started, Instant::now()).unwrap_or_default();
                    report(Event::Failed { error: Arc::new(e), duration: started.elapsed(), retry_in });
                }
            }
        }
        if applier.refused().values().sum::<u64>() != refused_before {
            report(Event::Refused(applier.refused().iter().map(|(k, v)| (k.clone(), *v)).collect()));
        }
    }
}

/// Apply a message to the schedule; `Some(remove)` for a shutdown.
fn take(schedule: &mut Schedule, msg: Msg) -> Option<bool> {
    match msg {
        Msg::Desired(set) => schedule.desired(set),
        Msg::Configure(c) => schedule.configure(c),
        Msg::Shutdown(remove) => return Some(remove),
    }
    None
}

/// Run one job; reports what it did (applied, repaired) and returns kube-proxy's presence as
/// seen.
fn execute(
    applier: &mut Backend,
    job: &Job,
    started: Instant,
    report: &dyn Fn(Event),
) -> Result<Option<bool>, ApplyError> {
    match job {
        Job::Sync(set) => {
            let r = applier.apply(set)?;
            if !r.repaired.is_empty() {
                report(Event::Repaired { what: r.repaired.clone() });
            }
            report(Event::Applied {
                duration: started.elapsed(),
                restores: r.restores,
                rules: r.rules,
                total_restores: applier.restores(),
                full: r.full,
            });
            Ok(Some(r.kube_proxy))
        }
        Job::Resync(set) => {
            let r = applier.reapply(set)?;
            log::debug!("full resync: {} restore(s) in {:?}", r.restores, started.elapsed());
            report(Event::Confirmed { resync: true, duration: started.elapsed() });
            Ok(Some(r.kube_proxy))
        }
        Job::Guard => {
            let r = applier.guard()?;
            if !r.repaired.is_empty() {
                report(Event::Repaired { what: r.repaired });
            }
            report(Event::Confirmed { resync: false, duration: started.elapsed() });
            Ok(Some(r.kube_proxy))
        }
        Job::ProbeKubeProxy => Ok(applier.kube_proxy_jump_present().ok()),
    }
}
