//! What the endpoint serves: the metric set, the proxy's counters and the readiness flags that
//! `/readyz` checks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl Health {
    pub fn set_rules_installed(&self, v: bool) {
        self.rules_installed.store(v, Ordering::Relaxed);
    }
    pub fn set_source_synced(&self, v: bool) {
        self.source_synced.store(v, Ordering::Relaxed);
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
}
