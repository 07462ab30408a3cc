//! What the endpoint serves: the metric set, the proxy's counters and the readiness flags that
//! `/readyz` checks.

use std::sync::atomic::{AtomicBool, Ordering};

use portable_atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metrics::Metrics;
use crate::proxy::stats::ProxyStats;

// ----------------------------------------------------------------------------------------------
// Readiness
/// The two conditions `/readyz` checks.
#[derive(Debug, Default)]
pub struct Health {
    rules_installed: AtomicBool,
    source_synced: AtomicBool,
    /// Serving the offline cache: ready, and saying so.
    serving_cache: AtomicBool,
    /// Unix milliseconds: a rules update last queued, the rules last known right, and how long
    /// a queued update may wait before `/healthz` and `/livez` say unhealthy.
    queued_ms: AtomicU64,
    updated_ms: AtomicU64,
    timeout_ms: AtomicU64,
}

/// What `/healthz` reports.
#[derive(Debug, PartialEq, Eq)]
pub struct Freshness {
    pub stale: bool,
    pub last_updated: String,
    pub last_queued: String,
    pub current_time: String,
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rfc3339_ms(ms: u64) -> String {
    crate::logging::rfc3339(Duration::from_millis(ms))
}

impl Health {
    pub fn set_rules_installed(&self, v: bool) {
        self.rules_installed.store(v, Ordering::Relaxed);
    }
    pub fn set_source_synced(&self, v: bool) {
        self.source_synced.store(v, Ordering::Relaxed);
    }
    /// How long a queued rules update may wait before the agent counts as unhealthy.
    pub fn set_timeout(&self, t: Duration) {
        self.timeout_ms.store(u64::try_from(t.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn queued(&self, at: SystemTime) {
        self.queued_ms.store(millis(at), Ordering::Relaxed);
    }

    pub fn updated(&self, at: SystemTime) {
        self.updated_ms.store(millis(at), Ordering::Relaxed);
    }

    /// Stale: an update was queued after the last one applied, longer ago than the timeout.
    pub fn freshness(&self, now: SystemTime) -> Freshness {
        let (queued, updated) = (self.queued_ms.load(Ordering::Relaxed), self.updated_ms.load(Ordering::Relaxed));
        let timeout = self.timeout_ms.load(Ordering::Relaxed);
        let now = millis(now);
        Freshness {
            stale: queued > updated && now.saturating_sub(queued) > timeout,
            last_updated: rfc3339_ms(updated),
            last_queued: rfc3339_ms(queued),
            current_time: rfc3339_ms(now),
        }
    }

    pub fn set_serving_cache(&self, v: bool) {
        self.serving_cache.store(v, Ordering::Relaxed);
    }
    pub fn serving_cache(&self) -> bool {
        self.serving_cache.load(Ordering::Relaxed)
    }
    /// `Ok` when ready, else the reasons.
    pub fn ready(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if !self.source_synced.load(Ordering::Relaxed) && !self.serving_cache() {
            why.push("source not synced");
        }
        if !self.rules_installed.load(Ordering::Relaxed) {
            why.push("rules not installed");
        }
        match why.is_empty() {
            true => Ok(()),
            false => Err(why.join(", ")),
        }
    }
}

/// What the endpoint serves: the metrics, the proxy's counters and the readiness flags.
#[derive(Debug, Default)]
pub struct Ops {
    pub metrics: Metrics,
    /// The data path's counters, rendered at scrape time (the proxy owns and updates them).
    pub proxy: Arc<ProxyStats>,
    pub health: Health,
}

impl Ops {
    pub fn new() -> Arc<Ops> {
        Arc::new(Ops::default())
    }
    pub fn set_rules_installed(&self, v: bool) {
        self.health.set_rules_installed(v);
        self.metrics.rules_installed.set(if v { 1.0 } else { 0.0 });
    }
    pub fn set_source_synced(&self, v: bool) {
        self.health.set_source_synced(v);
        self.metrics.source_synced.set(if v { 1.0 } else { 0.0 });
    }
    pub fn set_serving_cache(&self, v: bool) {
        self.health.set_serving_cache(v);
        self.metrics.serving_cache.set(if v { 1.0 } else { 0.0 });
    }
    /// A rules update was handed to the rules worker at `at`.
    pub fn queued(&self, at: SystemTime) {
        self.health.queued(at);
        self.metrics.queued(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reasons() {
        let ops = Ops::new();
        assert_eq!(ops.health.ready(), Err("source not synced, rules not installed".into()));
        ops.set_source_synced(true);
        assert_eq!(ops.health.ready(), Err("rules not installed".into()));
        ops.set_rules_installed(true);
        assert_eq!(ops.health.ready(), Ok(()));
    }

    #[test]
    fn a_queued_update_that_waits_past_the_timeout_is_stale() {
        let h = Health::default();
        h.set_timeout(Duration::from_secs(120));
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        h.updated(t);
        h.queued(t + Duration::from_secs(1));
        assert!(!h.freshness(t + Duration::from_secs(60)).stale, "waiting, within the timeout");
        let f = h.freshness(t + Duration::from_secs(200));
        assert!(f.stale);
        assert_eq!(f.last_updated, "1970-01-12T13:46:40.000Z");
        h.updated(t + Duration::from_secs(201));
        assert!(!h.freshness(t + Duration::from_secs(300)).stale, "applied since");
    }
}
