//! Passive endpoint health (pure: time and randomness are passed in).
//!
//! A failed dial (timeout, refused, unreachable) sets the endpoint aside for a backoff: 1 s,
//! doubling with each further failure up to 30 s, jittered into its upper half so that many
//! proxies do not retry at once. New connections avoid it while another endpoint of the service
//! port is usable; when its backoff ends, one connection (its trial) may use it, and the others
//! keep avoiding it until that dial is over: a success clears it, a failure sets it aside
//! again, longer. When every endpoint is set aside the balancer tries them anyway (fail open:
//! better a slow dial than a refusal while they may be back).
//!
//! State is keyed by (service port name, endpoint), so it survives table swaps; endpoints that
//! leave the table are forgotten ([`Health::retain`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::model::ServicePortName;

pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Aside {
    failures: u32,
    /// Set aside until then.
    until: Instant,
    /// A trial connection is dialling it until then.
    trial_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Health {
    aside: HashMap<(ServicePortName, SocketAddr), Aside>,
}

impl Health {
    /// Should a new connection avoid `addr` now?
    pub fn avoid(&self, name: &ServicePortName, addr: SocketAddr, now: Instant) -> bool {
        match self.aside.get(&(name.clone(), addr)) {
            None => false,
            Some(a) if now < a.until => true,
            // Backoff over: avoided only while its trial is under way.
            Some(a) => a.trial_until.is_some_and(|t| now < t),
        }
    }

    /// A connection chose `addr`; if it is set aside with its backoff over, this connection is
    /// its trial (for at most `trial_for`).
    pub fn chosen(&mut self, name: &ServicePortName, addr: SocketAddr, now: Instant, trial_for: Duration) {
        if let Some(a) = self.aside.get_mut(&(name.clone(), addr)) {
            if now >= a.until && a.trial_until.is_none_or(|t| now >= t) {
                a.trial_until = Some(now + trial_for);
            }
        }
    }

    /// A dial of `addr` failed at `now`; returns how long it is set aside. `random` jitters.
    pub fn failed(&mut self, name: &ServicePortName, addr: SocketAddr, now: Instant, random: u64) -> Duration {
        let a = self.aside.entry((name.clone(), addr)).or_insert(Aside { failures: 0, until: now, trial_until: None });
        a.failures = a.failures.saturating_add(1);
        let exp = a.failures.saturating_sub(1).min(16);
        let full = BACKOFF_START.saturating_mul(1 << exp).min(BACKOFF_MAX);
        // Into [full/2, full]: `random % 1000` thousandths of the upper half.
        let half = full / 2;
        let jitter = half.mul_f64(f64::from(u32::try_from(random % 1000).unwrap_or(0)) / 1000.0);
        let backoff = half + jitter;
        a.until = now + backoff;
        a.trial_until = None;
        backoff
    }

    /// A dial of `addr` succeeded: it is healthy again. Returns whether it had been set aside.
    pub fn succeeded(&mut self, name: &ServicePortName, addr: SocketAddr) -> bool {
        self.aside.remove(&(name.clone(), addr)).is_some()
    }

    /// Forget endpoints that are no longer upstreams of their service port.
    pub fn retain(&mut self, keep: impl Fn(&str, SocketAddr) -> bool) {
        self.aside.retain(|(name, addr), _| keep(name, *addr));
    }

    /// Is `addr` set aside (its last dial failed), whether or not its backoff is over?
    pub fn is_set_aside(&self, name: &ServicePortName, addr: SocketAddr) -> bool {
        self.aside.contains_key(&(name.clone(), addr))
    }

    /// Every endpoint set aside (its last dial failed), sorted.
    pub fn set_aside(&self) -> Vec<(ServicePortName, SocketAddr)> {
        let mut v: Vec<_> = self.aside.keys().cloned().collect();
        v.sort_by(|a, b| (&*a.0, a.1).cmp(&(&*b.0, b.1)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_failure_sets_aside_a_trial_follows_the_backoff_and_a_success_clears() {
        let mut h = Health::default();
        let (name, addr): (ServicePortName, SocketAddr) = ("a/b:http".into(), "192.0.2.1:80".parse().unwrap());
        let t0 = Instant::now();
        assert!(!h.avoid(&name, addr, t0));
        // random 999: the top of the jitter range, the full second.
        let d = h.failed(&name, addr, t0, 999);
        assert!(d > S * 99 / 100 && d <= S, "{d:?}");
        assert!(h.avoid(&name, addr, t0 + S / 2));
        // Backoff over: not avoided; the first connection to choose it is the trial...
        let t1 = t0 + S * 2;
        assert!(!h.avoid(&name, addr, t1));
        h.chosen(&name, addr, t1, S);
        // ... and the others avoid it meanwhile.
        assert!(h.avoid(&name, addr, t1 + S / 10));
        // The trial fails: set aside again, for longer (2 s, jittered into [1 s, 2 s]).
        let d2 = h.failed(&name, addr, t1, 0);
        assert_eq!(d2, S);
        let d3 = h.failed(&name, addr, t1, 999);
        assert!(d3 > S * 3 && d3 <= S * 4, "{d3:?}");
        // A success clears it.
        assert!(h.succeeded(&name, addr));
        assert!(!h.avoid(&name, addr, t1));
        assert!(!h.succeeded(&name, addr));
    }

    #[test]
    fn the_backoff_is_capped_and_endpoints_out_of_the_table_are_forgotten() {
        let mut h = Health::default();
        let (name, addr): (ServicePortName, SocketAddr) = ("a/b:http".into(), "192.0.2.1:80".parse().unwrap());
        let t0 = Instant::now();
        let longest = (0..20).map(|_| h.failed(&name, addr, t0, 999)).max().unwrap();
        assert!(longest <= BACKOFF_MAX && longest > BACKOFF_MAX * 99 / 100, "{longest:?}");
        assert_eq!(h.set_aside(), vec![(name.clone(), addr)]);
        assert!(h.is_set_aside(&name, addr));
        h.retain(|_, _| false);
        assert!(h.set_aside().is_empty());
    }
}
