//! The applier thread (the rules worker): owns an [`Applier`] and keeps the kernel in line with the latest desired
//! [`RuleSet`].
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

/// Timers of the applier thread.
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

/// What the applier thread reports.
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
    /// Shutdown finished: rules removed (`error` is `None`) or not.
    Stopped { error: Option<Arc<ApplyError>> },
}

enum Msg {
    Desired(Arc<RuleSet>),
    Shutdown,
}

/// The handle of a running applier thread.
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
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Msg::Shutdown);
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
        .spawn(move || run(applier, cfg, rx, report))
        .expect("spawning the rules thread");
    Handle { tx, join: Some(join) }
}

fn run(mut applier: Applier, cfg: WorkerConfig, rx: mpsc::Receiver<Msg>, report: impl Fn(Event)) {
    let start = Instant::now();
    let mut pending: Option<Arc<RuleSet>> = None;
    let mut current: Option<Arc<RuleSet>> = None;
    let mut last_sync: Option<Instant> = None;
    let mut next_guard = start + cfg.guard_period;
    let mut next_resync = start + cfg.resync_period;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = cfg.backoff_start;
    let mut kube_proxy: Option<bool> = None;

    let mut note_kube_proxy = |seen: bool, report: &dyn Fn(Event)| {
        if kube_proxy != Some(seen) {
            kube_proxy = Some(seen);
            report(Event::KubeProxy(seen));
        }
    };
    let fail = |e: ApplyError, started: Instant, backoff: &mut Duration, report: &dyn Fn(Event)| -> Instant {
        let retry_in = *backoff;
        report(Event::Failed { error: Arc::new(e), duration: started.elapsed(), retry_in });
        *backoff = (*backoff * 2).min(cfg.backoff_max);
        Instant::now() + retry_in
    };

    loop {
        let now = Instant::now();
        let mut deadline = next_guard.min(next_resync);
        if pending.is_some() {
            let mut due = last_sync.map_or(now, |t| t + cfg.min_sync_period);
            if let Some(r) = retry_at {
                due = due.max(r);
            }
            deadline = deadline.min(due);
        }
        let mut shutdown = false;
        match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(Msg::Desired(set)) => pending = Some(set),
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => shutdown = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        // Keep only the newest of a burst.
        while !shutdown {
            match rx.try_recv() {
                Ok(Msg::Desired(set)) => pending = Some(set),
                Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => shutdown = true,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if shutdown {
            let error = applier.cleanup().err().map(Arc::new);
            report(Event::Stopped { error });
            return;
        }

        let now = Instant::now();
        let due = last_sync.is_none_or(|t| now >= t + cfg.min_sync_period) && retry_at.is_none_or(|r| now >= r);
        if pending.is_some() && due {
            let set = pending.take().expect("checked");
            let t = Instant::now();
            match applier.apply(&set) {
                Ok(r) => {
                    let restores = r.restores;
                    if !r.repaired.is_empty() {
                        report(Event::Repaired { what: r.repaired });
                    }
                    note_kube_proxy(r.kube_proxy, &report);
                    report(Event::Applied {
                        duration: t.elapsed(),
                        restores,
                        rules: r.rules,
                        total_restores: applier.restores(),
                    });
                    current = Some(set);
                    retry_at = None;
                    backoff = cfg.backoff_start;
                    last_sync = Some(now);
                    next_guard = Instant::now() + cfg.guard_period;
                }
                Err(e) => {
                    retry_at = Some(fail(e, t, &mut backoff, &report));
                    pending = Some(set);
                    last_sync = Some(now);
                }
            }
            continue;
        }
        if now >= next_resync {
            next_resync = now + cfg.resync_period;
            if let (Some(set), None) = (&current, &pending) {
                let t = Instant::now();
                match applier.reapply(set) {
                    Ok(r) => {
                        note_kube_proxy(r.kube_proxy, &report);
                        log::debug!("full resync: {} restore(s) in {:?}", r.restores, t.elapsed());
                        last_sync = Some(now);
                    }
                    Err(e) => {
                        retry_at = Some(fail(e, t, &mut backoff, &report));
                        pending = current.take();
                    }
                }
            }
        }
        if now >= next_guard {
            next_guard = now + cfg.guard_period;
            if current.is_some() && pending.is_none() {
                match applier.guard() {
                    Ok(r) => {
                        note_kube_proxy(r.kube_proxy, &report);
                        if !r.repaired.is_empty() {
                            report(Event::Repaired { what: r.repaired });
                        }
                    }
                    Err(e) => {
                        retry_at = Some(fail(e, now, &mut backoff, &report));
                        pending = current.take();
                    }
                }
            } else if let Ok(seen) = applier.kube_proxy_jump_present() {
                note_kube_proxy(seen, &report);
            }
        }
    }
}
