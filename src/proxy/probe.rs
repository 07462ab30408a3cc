//! Active probes (opt-in: `tcp.probeInterval`): a TCP connect to each endpoint of each TCP
//! service port, every interval, feeding the passive health check ([`super::health`]) as a
//! dial would. So an endpoint that dies is set aside before a client meets it, and one that
//! comes back is used again without waiting for a client's trial connection.
//!
//! Bounded: at most `tcp.probesPerSecond` probes start per second, one per tick, whatever the
//! number of endpoints (with more endpoints than `interval x rate`, each is probed less often
//! than the interval says: never a storm). A probe is a connect with the dial timeout, closed at
//! once, from a socket carrying the proxy's mark (so our rules let it pass).
//!
//! [`ProbePlan`] (pure, time passed in) picks the next (service port, endpoint) due; the task
//! around it dials.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::shared::Shared;
use super::table::{ProxyTable, ServiceEntry};
use crate::model::ServicePortName;

/// Which probe is due next: every (TCP service port, endpoint) pair of the table in a stable
/// order, each at most once per interval (the Service's own, else the configured one; a pair
/// with neither is not probed).
#[derive(Debug, Default)]
pub struct ProbePlan {
    last: HashMap<(ServicePortName, SocketAddr), Instant>,
    /// Where the last pick was in the table's order (resumed from there: fairness).
    cursor: usize,
}

impl ProbePlan {
    /// The next pair due at `now` (not probed within its interval), or `None` when none is.
    /// `default`: the interval of service ports without their own (`None`: those are not probed).
    pub fn next(
        &mut self,
        table: &ProxyTable,
        now: Instant,
        default: Option<Duration>,
    ) -> Option<(Arc<ServiceEntry>, SocketAddr)> {
        let mut pairs: Vec<(&Arc<ServiceEntry>, SocketAddr)> = probed(table)
            .filter(|e| e.probe_interval.or(default).is_some())
            .flat_map(|e| e.upstreams.iter().map(move |u| (e, u.addr)))
            .collect();
        if pairs.is_empty() {
            return None;
        }
        pairs.sort_by(|a, b| (&*a.0.name, a.1).cmp(&(&*b.0.name, b.1)));
        pairs.dedup_by(|a, b| a.0.name == b.0.name && a.1 == b.1);
        let n = pairs.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let (entry, addr) = pairs[i];
            let interval = entry.probe_interval.or(default).unwrap_or(Duration::MAX);
            let key = (entry.name.clone(), addr);
            let due = self.last.get(&key).is_none_or(|t| now.saturating_duration_since(*t) >= interval);
            if due {
                self.last.insert(key, now);
                self.cursor = (i + 1) % n;
                return Some((entry.clone(), addr));
            }
        }
        None
    }

    /// Forget pairs no longer in the table.
    pub fn retain(&mut self, table: &ProxyTable) {
        let present: std::collections::HashSet<(&str, SocketAddr)> =
            probed(table).flat_map(|e| e.upstreams.iter().map(move |u| (&*e.name, u.addr))).collect();
        self.last.retain(|(name, addr), _| present.contains(&(&**name, *addr)));
    }
}

/// The service ports whose endpoints are probed: the proxied TCP ones and the kernel-path ones.
pub fn probed(table: &ProxyTable) -> impl Iterator<Item = &Arc<ServiceEntry>> {
    table.tcp.values().chain(&table.kernel)
}

/// The probe task: runs while the proxy runs. With probes off in the config and no Service
/// asking for them, it only waits for a table that does (no timer).
pub(super) async fn probe_loop(mut tables: watch::Receiver<Arc<ProxyTable>>, shared: Arc<Shared>) {
    let default = shared.cfg.probe_interval;
    let rate = shared.cfg.probes_per_second.max(1);
    let tick = Duration::from_secs(1) / rate;
    match default {
        Some(i) => log::info!("active probes: every endpoint every {i:?}, at most {rate} probes per second"),
        None => log::debug!("active probes: only for Services with the edgeproxy.io/probe-interval annotation"),
    }
    let mut plan = ProbePlan::default();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_retain = 0u32;
    loop {
        let table = tables.borrow().clone();
        if default.is_none() && !probed(&table).any(|e| e.probe_interval.is_some()) {
            if tables.changed().await.is_err() {
                return;
            }
            continue;
        }
        ticker.tick().await;
        since_retain += 1;
        if since_retain >= rate {
            since_retain = 0;
            plan.retain(&table);
        }
        let Some((entry, addr)) = plan.next(&table, Instant::now(), default) else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let dial = super::tcp::connect_marked(addr, shared.cfg.mark);
            let failure = match tokio::time::timeout(shared.cfg.dial_timeout, dial).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {:?}", shared.cfg.dial_timeout)),
            };
            match &failure {
                None => shared.stats.probes_ok.inc(),
                Some(_) => shared.stats.probes_failed.inc(),
            }
            shared.dialled(&entry, addr, failure.as_deref().map(|e| format!("probe: {e}")).as_deref());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::proxy::table::{LbPolicy, ServiceEntry, Upstream};

    fn table(services: &[(&str, &[&str])]) -> ProxyTable {
        let mut t = ProxyTable::default();
        for (i, (name, addrs)) in services.iter().enumerate() {
            let entry = ServiceEntry {
                name: ServicePortName::from(*name),
                protocol: Protocol::Tcp,
                upstreams: addrs.iter().map(|a| Upstream { addr: a.parse().unwrap(), local: false }).collect(),
                affinity: None,
                policy: LbPolicy::RoundRobin,
                probe_interval: None,
            };
            t.tcp.insert(format!("10.96.0.{}:80", i + 1).parse().unwrap(), Arc::new(entry));
        }
        t
    }

    #[test]
    fn every_pair_once_per_interval_in_a_stable_fair_order() {
        let t = table(&[("a/x:http", &["192.0.2.1:80", "192.0.2.2:80"]), ("a/y:http", &["192.0.2.1:80"])]);
        let mut p = ProbePlan::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let picks: Vec<(String, String)> = (0..3)
            .map(|_| {
                let (e, a) = p.next(&t, t0, Some(s * 10)).unwrap();
                (e.name.to_string(), a.to_string())
            })
            .collect();
        assert_eq!(
            picks,
            [("a/x:http", "192.0.2.1:80"), ("a/x:http", "192.0.2.2:80"), ("a/y:http", "192.0.2.1:80")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // All probed: nothing due until the interval has passed, then all again.
        assert!(p.next(&t, t0 + s, Some(s * 10)).is_none());
        assert!(p.next(&t, t0 + s * 10, Some(s * 10)).is_some());
        // A pair that leaves the table is forgotten.
        p.retain(&table(&[("a/x:http", &["192.0.2.1:80"])]));
        assert_eq!(p.last.len(), 1);
    }

    #[test]
    fn an_empty_table_has_nothing_to_probe() {
        assert!(ProbePlan::default()
            .next(&ProxyTable::default(), Instant::now(), Some(Duration::from_secs(1)))
            .is_none());
    }

    /// A Service's own interval wins; without a configured one only such Services are probed.
    #[test]
    fn a_services_own_interval_and_probes_off_elsewhere() {
        let mut t = table(&[("a/x:http", &["192.0.2.1:80"]), ("a/y:http", &["192.0.2.2:80"])]);
        let own = t.tcp.values().find(|e| &*e.name == "a/y:http").unwrap().clone();
        let key = t.tcp.iter().find(|(_, e)| e.name == own.name).map(|(k, _)| *k).unwrap();
        let mut e = (*own).clone();
        e.probe_interval = Some(Duration::from_secs(2));
        t.tcp.insert(key, Arc::new(e));
        let mut p = ProbePlan::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        // Probes off in the config: only a/y, every 2 s.
        assert_eq!(&*p.next(&t, t0, None).unwrap().0.name, "a/y:http");
        assert!(p.next(&t, t0 + s, None).is_none());
        assert_eq!(&*p.next(&t, t0 + s * 2, None).unwrap().0.name, "a/y:http");
        // Configured every 10 s: a/x joins, a/y keeps its own 2 s.
        let mut p = ProbePlan::default();
        let picks: Vec<String> = (0..2).map(|_| p.next(&t, t0, Some(s * 10)).unwrap().0.name.to_string()).collect();
        assert_eq!(picks, ["a/x:http", "a/y:http"]);
        assert_eq!(&*p.next(&t, t0 + s * 2, Some(s * 10)).unwrap().0.name, "a/y:http");
        assert!(p.next(&t, t0 + s * 3, Some(s * 10)).is_none());
    }
}
