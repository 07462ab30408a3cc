//! The rules worker, a thread of its own: owns an [`Applier`] and keeps the kernel in line with the
//! latest desired [`RuleSet`].
//!
//! It receives rule sets over a channel and keeps only the newest (a burst becomes one restore:
//! the first change goes out at once, later ones wait until `min_sync_period` has passed since
//! the last sync); a sync writes only the chains that changed. Every `guard_period` it runs the
//! hybrid-order guard (the jumps always, chain contents where that is cheap: see
//! [`Applier::guard`]), every `resync_period` a full rewrite, which also puts right any edit to
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

use super::applier::Applier;
use super::iptables::ApplyError;
use super::RuleSet;

/// Timers of the rules worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Minimum time between two syncs (bursts are coalesced).
    pub min_sync_period: Duration,
    /// How often the guard checks our jumps (and the chains it can read cheaply).
    pub guard_period: Duration,
    /// How often everything is rewritten even when nothing changed (catches edits inside chains
    /// too big for the guard to read every period).
    pub resync_period: Duration,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_start: Duration,
    pub backoff_max: Duration,
}

/// The first retry delay after a failed sync; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the rules worker reports.
#[derive(Clone, Debug)]
pub enum Event {
    /// A desired set is now in the kernel. `restores` is 0 when nothing had changed.
    Applied { duration: Duration, restores: u32, rules: usize, total_restores: u64 },
    /// A sync failed; the previous rules are still in force. Retried after `retry_in`.
    Failed { error: Arc<ApplyError>, duration: Duration, retry_in: Duration },
    /// The guard (or a sync) found something out of place and put it right.
    Repaired { what: Vec<String> },
    /// kube-proxy's jump into KUBE-SERVICES appeared or went away.
    KubeProxy(bool),
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
pub fn spawn(applier: Applier, cfg: WorkerConfig, report: impl Fn(Event) + Send + 'static) -> Handle {
    let (tx, rx) = mpsc::channel();
    let join = std::thread::Builder::new()
        .name("rules".into())
        .spawn(move || run(applier, cfg, &rx, &report))
        .expect("spawning the rules thread");
    Handle { tx, join: Some(join) }
}

fn run(applier: Applier, cfg: WorkerConfig, rx: &mpsc::Receiver<Msg>, report: &dyn Fn(Event)) {
    let start = Instant::now();
    let mut w = Worker {
        applier,
        cfg,
        report,
        pending: None,
        current: None,
        last_sync: None,
        next_guard: start + cfg.guard_period,
        next_resync: start + cfg.resync_period,
        retry_at: None,
        backoff: cfg.backoff_start,
        kube_proxy: None,
    };
    loop {
        let now = Instant::now();
        let mut deadline = w.next_guard.min(w.next_resync);
        if w.pending.is_some() {
            let mut due = w.last_sync.map_or(now, |t| t + w.cfg.min_sync_period);
            if let Some(r) = w.retry_at {
                due = due.max(r);
            }
            deadline = deadline.min(due);
        }
        let mut shutdown: Option<bool> = None;
        match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(Msg::Desired(set)) => w.pending = Some(set),
            Ok(Msg::Configure(c)) => w.cfg = c,
            Ok(Msg::Shutdown(r)) => shutdown = Some(r),
            Err(RecvTimeoutError::Disconnected) => shutdown = Some(true),
            Err(RecvTimeoutError::Timeout) => {}
        }
        // Keep only the newest of a burst.
        while shutdown.is_none() {
            match rx.try_recv() {
                Ok(Msg::Desired(set)) => w.pending = Some(set),
                Ok(Msg::Configure(c)) => w.cfg = c,
                Ok(Msg::Shutdown(r)) => shutdown = Some(r),
                Err(mpsc::TryRecvError::Disconnected) => shutdown = Some(true),
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if let Some(remove) = shutdown {
            let error = match remove {
                true => w.applier.cleanup().err().map(Arc::new),
                false => None,
            };
            report(Event::Stopped { removed: remove, error });
            return;
        }
        let now = Instant::now();
        let due = w.last_sync.is_none_or(|t| now >= t + w.cfg.min_sync_period) && w.retry_at.is_none_or(|r| now >= r);
        if w.pending.is_some() && due {
            w.sync_pending(now);
            continue;
        }
        if now >= w.next_resync {
            w.resync(now);
        }
        if now >= w.next_guard {
            w.guard(now);
        }
    }
}

/// The thread's state between wake-ups.
struct Worker<'r> {
    applier: Applier,
    cfg: WorkerConfig,
    report: &'r dyn Fn(Event),
    /// The newest set not yet in the kernel.
    pending: Option<Arc<RuleSet>>,
    /// The set in the kernel.
    current: Option<Arc<RuleSet>>,
    last_sync: Option<Instant>,
    next_guard: Instant,
    next_resync: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
    kube_proxy: Option<bool>,
}

impl Worker<'_> {
    fn note_kube_proxy(&mut self, seen: bool) {
        if self.kube_proxy != Some(seen) {
            self.kube_proxy = Some(seen);
            (self.report)(Event::KubeProxy(seen));
        }
    }

    /// Report a failure that began at `started`; the next attempt waits for the backoff.
    fn fail(&mut self, e: ApplyError, started: Instant) {
        let retry_in = self.backoff;
        (self.report)(Event::Failed { error: Arc::new(e), duration: started.elapsed(), retry_in });
        self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
        self.retry_at = Some(Instant::now() + retry_in);
    }

    fn sync_pending(&mut self, now: Instant) {
        let set = self.pending.take().expect("checked by the caller");
        let t = Instant::now();
        match self.applier.apply(&set) {
            Ok(r) => {
                let restores = r.restores;
                if !r.repaired.is_empty() {
                    (self.report)(Event::Repaired { what: r.repaired });
                }
                self.note_kube_proxy(r.kube_proxy);
                (self.report)(Event::Applied {
                    duration: t.elapsed(),
                    restores,
                    rules: r.rules,
                    total_restores: self.applier.restores(),
                });
                self.current = Some(set);
                self.retry_at = None;
                self.backoff = self.cfg.backoff_start;
                self.last_sync = Some(now);
                self.next_guard = Instant::now() + self.cfg.guard_period;
            }
            Err(e) => {
                self.fail(e, t);
                self.pending = Some(set);
                self.last_sync = Some(now);
            }
        }
    }

    fn resync(&mut self, now: Instant) {
        self.next_resync = now + self.cfg.resync_period;
        let (Some(set), None) = (self.current.clone(), &self.pending) else {
            return;
        };
        let t = Instant::now();
        match self.applier.reapply(&set) {
            Ok(r) => {
                self.note_kube_proxy(r.kube_proxy);
                log::debug!("full resync: {} restore(s) in {:?}", r.restores, t.elapsed());
                self.last_sync = Some(now);
            }
            Err(e) => {
                self.fail(e, t);
                self.pending = self.current.take();
            }
        }
    }

    fn guard(&mut self, now: Instant) {
        self.next_guard = now + self.cfg.guard_period;
        if self.current.is_some() && self.pending.is_none() {
            match self.applier.guard() {
                Ok(r) => {
                    self.note_kube_proxy(r.kube_proxy);
                    if !r.repaired.is_empty() {
                        (self.report)(Event::Repaired { what: r.repaired });
                    }
                }
                Err(e) => {
                    self.fail(e, now);
                    self.pending = self.current.take();
                }
            }
        } else if let Ok(seen) = self.applier.kube_proxy_jump_present() {
            self.note_kube_proxy(seen);
        }
    }
}
