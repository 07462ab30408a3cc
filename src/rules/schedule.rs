//! When the rules worker does what (pure: time is passed in, nothing is run here).
//!
//! The worker hands over every new desired set ([`Schedule::desired`]), asks what is due now
//! ([`Schedule::due`]), runs that job on the `Applier`, and reports how it went
//! ([`Schedule::finished`]); between jobs it sleeps until [`Schedule::next_deadline`] or the
//! next message. The rules it keeps:
//! - a burst of sets becomes one sync of the newest; the first sync goes out at once, the next
//!   no sooner than `min_sync_period` after the previous one;
//! - a failed job is retried (as a sync of the set that should be in the kernel) after a
//!   backoff that doubles from `backoff_start` to `backoff_max`, and returns to the start after
//!   a success;
//! - every `resync_period` a full rewrite of the set in the kernel, every `guard_period` the
//!   guard; neither while a set waits to be synced (that sync comes first and puts everything
//!   right anyway); with nothing installed, the guard only looks for kube-proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A job for the worker to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// Make the kernel hold this set (a minimal sync, or a full one after a failure).
    Sync(Arc<RuleSet>),
    /// Rewrite the set in the kernel whole.
    Resync(Arc<RuleSet>),
    /// The hybrid-order guard.
    Guard,
    /// Nothing installed: only see whether kube-proxy's jump is there.
    ProbeKubeProxy,
}

#[derive(Debug)]
pub struct Schedule {
    cfg: WorkerConfig,
    /// The newest set not yet in the kernel.
    pending: Option<Arc<RuleSet>>,
    /// The set in the kernel.
    current: Option<Arc<RuleSet>>,
    last_sync: Option<Instant>,
    next_guard: Instant,
    next_resync: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Schedule {
    pub fn new(cfg: WorkerConfig, now: Instant) -> Schedule {
        Schedule {
            cfg,
            pending: None,
            current: None,
            last_sync: None,
            next_guard: now + cfg.guard_period,
            next_resync: now + cfg.resync_period,
            retry_at: None,
            backoff: cfg.backoff_start,
        }
    }

    /// A new desired set; it replaces any not yet synced.
    pub fn desired(&mut self, set: Arc<RuleSet>) {
        self.pending = Some(set);
    }

    /// New timings (a reload): from the next decision on.
    pub fn configure(&mut self, cfg: WorkerConfig) {
        self.cfg = cfg;
    }

    /// When the pending set may be synced.
    fn sync_due(&self, now: Instant) -> Instant {
        let mut due = self.last_sync.map_or(now, |t| t + self.cfg.min_sync_period);
        if let Some(r) = self.retry_at {
            due = due.max(r);
        }
        due
    }

    /// The job to run now, if any (call again after each finishes).
    pub fn due(&mut self, now: Instant) -> Option<Job> {
        if let Some(set) = &self.pending {
            if now >= self.sync_due(now) {
                return Some(Job::Sync(set.clone()));
            }
        }
        if now >= self.next_resync {
            self.next_resync = now + self.cfg.resync_period;
            if let (Some(set), None) = (&self.current, &self.pending) {
                return Some(Job::Resync(set.clone()));
            }
        }
        if now >= self.next_guard {
            self.next_guard = now + self.cfg.guard_period;
            return Some(match (&self.current, &self.pending) {
                (Some(_), None) => Job::Guard,
                _ => Job::ProbeKubeProxy,
            });
        }
        None
    }

    /// `job`, started at `started`, ended at `now`: `ok` or not. Returns the retry delay after a
    /// failure.
    pub fn finished(&mut self, job: &Job, ok: bool, started: Instant, now: Instant) -> Option<Duration> {
        match (job, ok) {
            (Job::Sync(set), true) => {
                if self.pending.as_ref().is_some_and(|p| Arc::ptr_eq(p, set)) {
                    self.pending = None;
                }
                self.current = Some(set.clone());
                self.retry_at = None;
                self.backoff = self.cfg.backoff_start;
                self.last_sync = Some(started);
                self.next_guard = now + self.cfg.guard_period;
                None
            }
            (Job::Sync(_), false) => {
                self.last_sync = Some(started);
                Some(self.fail(now))
            }
            (Job::Resync(_), true) => {
                self.last_sync = Some(started);
                None
            }
            (Job::Resync(_) | Job::Guard, false) => {
                // Put right by a full sync of what should be there, first thing.
                if self.pending.is_none() {
                    self.pending = self.current.take();
                }
                Some(self.fail(now))
            }
            (Job::Guard | Job::ProbeKubeProxy, _) => None,
        }
    }

    fn fail(&mut self, now: Instant) -> Duration {
        let retry_in = self.backoff;
        self.retry_at = Some(now + retry_in);
        self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
        retry_in
    }

    /// When to wake up next with no message.
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let deadline = self.next_guard.min(self.next_resync);
        match self.pending {
            Some(_) => deadline.min(self.sync_due(now)),
            None => deadline,
        }
    }

    /// A set is waiting to be synced.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
