//! Load balancing: which backend of a service port a new connection or UDP flow goes to.
//!
//! Pure: no sockets, no clock, no randomness of its own. The caller passes `now` and a source of
//! random numbers, so every decision is reproducible in tests. State (the round-robin position
//! and the ClientIP affinity table) is keyed by [`ServiceEntry::name`], so it survives a table
//! swap; a service that leaves the table loses its state on the next [`Balancer::retain`].
//!
//! What it never does: it never chooses a backend that is not in the entry it is given, so a
//! removed endpoint gets no new connections (open ones are not its business).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::table::{LbPolicy, ServiceEntry};
use crate::model::ServicePortName;

/// Per service port: where round robin stands, and who is stuck to which backend.
#[derive(Debug, Default)]
struct ServiceState {
    next: usize,
    /// Client IP (without port, as Kubernetes does) -> backend and last use.
    affinity: HashMap<IpAddr, (SocketAddr, Instant)>,
}

/// The load-balancing state of every service port.
#[derive(Debug, Default)]
pub struct Balancer {
    services: HashMap<ServicePortName, ServiceState>,
}

impl Balancer {
    pub fn new() -> Balancer {
        Balancer::default()
    }

    /// Choose a backend for a new connection from `client`, skipping `tried` (backends a
    /// previous attempt of the same connection failed to reach) and, while any other is left,
    /// those `avoid` names (set aside by the passive health check: when all are, they are tried
    /// anyway). `None` when nothing is left.
    ///
    /// Under `sessionAffinity: ClientIP` a client keeps its backend while that backend is still
    /// in the entry, not in `tried`, and the client was last seen less than the timeout ago; any
    /// new choice becomes the client's backend.
    pub fn pick(
        &mut self,
        entry: &ServiceEntry,
        client: IpAddr,
        tried: &[SocketAddr],
        now: Instant,
        random: &mut dyn FnMut() -> u64,
        avoid: &dyn Fn(SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        let n = entry.upstreams.len();
        if n == 0 {
            return None;
        }
        let state = match self.services.get_mut(&*entry.name) {
            Some(s) => s,
            None => self.services.entry(entry.name.clone()).or_default(),
        };
        if let Some(timeout) = entry.affinity {
            if let Some((addr, seen)) = state.affinity.get_mut(&client) {
                let fresh = now.saturating_duration_since(*seen) < timeout;
                if fresh
                    && !tried.contains(addr)
                    && !avoid(*addr)
                    && addr.is_ipv6() == client.is_ipv6()
                    && entry.upstreams.iter().any(|b| b.addr == *addr)
                {
                    *seen = now;
                    return Some(*addr);
                }
            }
        }
        // Only backends of the client's family: a client reached an IPv4 ClusterIP over IPv4 (and
        // an IPv6 one over IPv6), and kube-proxy serves each ClusterIP from its own family only.
        let same_family = |a: &SocketAddr| a.is_ipv6() == client.is_ipv6();
        let usable = |i: usize| {
            let a = &entry.upstreams[i].addr;
            same_family(a) && !tried.contains(a)
        };
        let start = match entry.policy {
            LbPolicy::RoundRobin => state.next % n,
            // `n` fits a u64 and the remainder is below `n`: both conversions are exact.
            LbPolicy::Random => usize::try_from(random() % n as u64).unwrap_or(0),
        };
        let order = || (0..n).map(|k| (start + k) % n);
        let i =
            order().find(|&i| usable(i) && !avoid(entry.upstreams[i].addr)).or_else(|| order().find(|&i| usable(i)))?;
        if entry.policy == LbPolicy::RoundRobin {
            state.next = (i + 1) % n;
        }
        let addr = entry.upstreams[i].addr;
        if entry.affinity.is_some() {
            state.affinity.insert(client, (addr, now));
        }
        Some(addr)
    }

    /// Forget services that are no longer in the table.
    pub fn retain<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let keep: HashSet<&str> = names.into_iter().collect();
        self.services.retain(|name, _| keep.contains(&**name));
    }

    /// Drop affinity entries not used for longer than their service's timeout. `timeout_of`
    /// gives a service's current timeout (`None`: affinity is off now, drop all of its entries).
    pub fn expire(&mut self, now: Instant, timeout_of: impl Fn(&str) -> Option<std::time::Duration>) {
        for (name, state) in &mut self.services {
            match timeout_of(name) {
                None => state.affinity.clear(),
                Some(t) => state.affinity.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < t),
            }
        }
    }

    /// Number of affinity entries held (for tests and metrics).
    pub fn affinity_entries(&self) -> usize {
        self.services.values().map(|s| s.affinity.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::proxy::table::Upstream;
    use std::time::Duration;

    fn entry(name: &str, backends: &[&str], affinity: Option<u64>, policy: LbPolicy) -> ServiceEntry {
        ServiceEntry {
            name: name.into(),
            protocol: Protocol::Tcp,
            upstreams: backends.iter().map(|a| Upstream { addr: a.parse().unwrap(), local: false }).collect(),
            affinity: affinity.map(Duration::from_secs),
            policy,
            probe_interval: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn no_random() -> impl FnMut() -> u64 {
        || panic!("round robin must not draw random numbers")
    }

    /// A dual-stack entry: IPv4 clients get IPv4 backends and IPv6 clients IPv6 ones, never the
    /// other family; a family without backends has none to give.
    #[test]
    fn clients_get_backends_of_their_own_family() {
        let mut lb = Balancer::new();
        let e = entry(
            "a/dual",
            &["10.0.0.1:80", "[fd00::1]:80", "10.0.0.2:80", "[fd00::2]:80"],
            None,
            LbPolicy::RoundRobin,
        );
        let now = Instant::now();
        for _ in 0..8 {
            assert!(lb.pick(&e, ip("10.10.0.2"), &[], now, &mut no_random(), &|_| false).unwrap().is_ipv4());
            assert!(lb.pick(&e, ip("fd00:10::2"), &[], now, &mut no_random(), &|_| false).unwrap().is_ipv6());
        }
        let v6_only = entry("a/v6", &["[fd00::1]:80"], Some(10), LbPolicy::RoundRobin);
        assert_eq!(lb.pick(&v6_only, ip("10.10.0.2"), &[], now, &mut no_random(), &|_| false), None);
    }

    #[test]
    fn round_robin_cycles_and_survives_a_table_swap() {
        let mut lb = Balancer::new();
        let e = entry("a/web", &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], None, LbPolicy::RoundRobin);
        let now = Instant::now();
        let picks: Vec<SocketAddr> =
            (0..4).map(|_| lb.pick(&e, ip("1.1.1.1"), &[], now, &mut no_random(), &|_| false).unwrap()).collect();
        let want: Vec<SocketAddr> =
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(picks, want);
        // A new table (same name, one backend removed): the position carries on, the removed
        // backend is never chosen.
        let e2 = entry("a/web", &["10.0.0.1:80", "10.0.0.3:80"], None, LbPolicy::RoundRobin);
        for _ in 0..10 {
            let p = lb.pick(&e2, ip("1.1.1.1"), &[], now, &mut no_random(), &|_| false).unwrap();
            assert_ne!(p, "10.0.0.2:80".parse().unwrap());
        }
    }

    #[test]
    fn tried_backends_are_skipped_and_exhaustion_is_none() {
        let mut lb = Balancer::new();
        let e = entry("a/web", &["10.0.0.1:80", "10.0.0.2:80"], None, LbPolicy::RoundRobin);
        let now = Instant::now();
        let first = lb.pick(&e, ip("1.1.1.1"), &[], now, &mut no_random(), &|_| false).unwrap();
        let second = lb.pick(&e, ip("1.1.1.1"), &[first], now, &mut no_random(), &|_| false).unwrap();
        assert_ne!(first, second);
        assert_eq!(lb.pick(&e, ip("1.1.1.1"), &[first, second], now, &mut no_random(), &|_| false), None);
        let empty = entry("a/none", &[], None, LbPolicy::RoundRobin);
        assert_eq!(lb.pick(&empty, ip("1.1.1.1"), &[], now, &mut no_random(), &|_| false), None);
    }

    #[test]
    fn random_uses_the_injected_source() {
        let mut lb = Balancer::new();
        let e = entry("a/web", &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], None, LbPolicy::Random);
        let now = Instant::now();
        let mut seq = [2u64, 0, 4].into_iter();
        let mut rnd = move || seq.next().unwrap();
        let picks: Vec<u8> = (0..3)
            .map(|_| match lb.pick(&e, ip("1.1.1.1"), &[], now, &mut rnd, &|_| false).unwrap().ip() {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(picks, vec![3, 1, 2]);
    }

    #[test]
    fn client_ip_affinity_holds_until_timeout_and_follows_removal() {
        let mut lb = Balancer::new();
        let e = entry("a/web", &["10.0.0.1:80", "10.0.0.2:80"], Some(10), LbPolicy::RoundRobin);
        let t0 = Instant::now();
        let a = lb.pick(&e, ip("1.1.1.1"), &[], t0, &mut no_random(), &|_| false).unwrap();
        let b = lb.pick(&e, ip("2.2.2.2"), &[], t0, &mut no_random(), &|_| false).unwrap();
        assert_ne!(a, b, "round robin still spreads distinct clients");
        for s in 1..=9 {
            let t = t0 + Duration::from_secs(s);
            assert_eq!(lb.pick(&e, ip("1.1.1.1"), &[], t, &mut no_random(), &|_| false), Some(a));
        }
        // Used at t0+9 s, so it lives until t0+19 s; expire() keeps it at +18 and drops it at +19.
        lb.expire(t0 + Duration::from_secs(18), |_| Some(Duration::from_secs(10)));
        assert_eq!(lb.affinity_entries(), 1, "client 2 (last seen t0) expired, client 1 kept");
        lb.expire(t0 + Duration::from_secs(19), |_| Some(Duration::from_secs(10)));
        assert_eq!(lb.affinity_entries(), 0);
        // The backend a client sticks to disappears: it moves, and sticks to the new one.
        let a = lb.pick(&e, ip("1.1.1.1"), &[], t0, &mut no_random(), &|_| false).unwrap();
        let other = if a == e.upstreams[0].addr { e.upstreams[1].addr } else { e.upstreams[0].addr };
        let only_other = entry("a/web", &[&other.to_string()], Some(10), LbPolicy::RoundRobin);
        assert_eq!(lb.pick(&only_other, ip("1.1.1.1"), &[], t0, &mut no_random(), &|_| false), Some(other));
        assert_eq!(lb.pick(&e, ip("1.1.1.1"), &[], t0, &mut no_random(), &|_| false), Some(other));
    }

    #[test]
    fn retain_forgets_removed_services() {
        let mut lb = Balancer::new();
        let e = entry("a/web", &["10.0.0.1:80"], Some(10), LbPolicy::RoundRobin);
        lb.pick(&e, ip("1.1.1.1"), &[], Instant::now(), &mut no_random(), &|_| false);
        lb.retain(["a/other"]);
        assert_eq!(lb.affinity_entries(), 0);
    }

    #[test]
    fn set_aside_endpoints_are_avoided_while_others_are_left_and_tried_when_none_is() {
        let mut lb = Balancer::new();
        let now = Instant::now();
        let e = entry("a/b:http", &["192.0.2.1:80", "192.0.2.2:80"], None, LbPolicy::RoundRobin);
        let dead: SocketAddr = "192.0.2.1:80".parse().unwrap();
        for _ in 0..4 {
            let p = lb.pick(&e, ip("1.1.1.1"), &[], now, &mut no_random(), &|a| a == dead).unwrap();
            assert_ne!(p, dead, "a set-aside endpoint is skipped while another is usable");
        }
        // All set aside: fail open, round robin over them.
        let p = lb.pick(&e, ip("1.1.1.1"), &[], now, &mut no_random(), &|_| true);
        assert!(p.is_some());
        // Affinity does not stick a client to a set-aside endpoint.
        let sticky = entry("a/s:http", &["192.0.2.1:80", "192.0.2.2:80"], Some(60), LbPolicy::RoundRobin);
        let first = lb.pick(&sticky, ip("2.2.2.2"), &[], now, &mut no_random(), &|_| false).unwrap();
        let again = lb.pick(&sticky, ip("2.2.2.2"), &[], now, &mut no_random(), &|a| a == first).unwrap();
        assert_ne!(again, first);
    }
}
