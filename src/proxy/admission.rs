//! Who may open a connection or a flow: per-client-address caps and the descriptor budget.
//! Pure bookkeeping (no socket, no clock): the accept loop and the UDP ports ask, and tell when
//! something closes.
//!
//! Why: every proxied TCP connection holds two descriptors and every UDP flow one, and the
//! descriptors are shared with what keeps the node's rules alive (the API connection, the
//! `iptables-restore` pipes, the ops endpoint, splice pipes). Without bounds one client can take
//! them all: 12,000 idle connections from one pod left other services accepted by the kernel and
//! never served; one client with 6,000 source ports took every UDP flow.
//!
//! The rules:
//! - TCP: at most `max_tcp_per_source` open connections per client address, and no new one when
//!   the connections and flows would use more than the budget (the soft `RLIMIT_NOFILE` minus
//!   [`FD_RESERVE`]). A refused connection is accepted and reset at once (the reserve makes sure
//!   accept itself still has a descriptor), so a client sees a clean refusal, never a hang.
//! - UDP: at most `max_flows_per_source` flows per client address (a datagram beyond is dropped
//!   and counted); at the global cap the least recently active flow gives way to the new one, so
//!   a flood of one-shot flows cannot lock out other clients. [`FlowTable`] keeps the flows by
//!   (service port, client) together with the per-address counts, so the two cannot drift.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Descriptors kept free of proxied connections and flows: for accept to refuse cleanly, for
/// splice pipes, and for the agent's own work (API connection, iptables-restore, ops endpoint).
pub const FD_RESERVE: u64 = 1024;

/// Why a connection or flow was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client address has its share open already.
    PerSource,
    /// Open connections and flows would use the descriptors kept for everything else.
    FdBudget,
}

/// TCP admission: open connections per client address and in total.
#[derive(Debug)]
pub struct TcpAdmission {
    max_per_source: u32,
    per_source: HashMap<IpAddr, u32>,
    open: u64,
}

impl TcpAdmission {
    pub fn new(max_per_source: usize) -> TcpAdmission {
        TcpAdmission {
            max_per_source: u32::try_from(max_per_source).unwrap_or(u32::MAX),
            per_source: HashMap::new(),
            open: 0,
        }
    }

    /// Admit one connection from `src`, given the descriptor budget and the UDP flows open.
    /// On `Ok` the connection counts until [`TcpAdmission::release`].
    pub fn admit(&mut self, src: IpAddr, fd_budget: u64, udp_flows: u64) -> Result<(), Refusal> {
        if (self.open + 1) * 2 + udp_flows > fd_budget {
            return Err(Refusal::FdBudget);
        }
        let n = self.per_source.entry(src).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Refusal::PerSource);
        }
        *n += 1;
        self.open += 1;
        Ok(())
    }

    /// A connection admitted for `src` has closed.
    pub fn release(&mut self, src: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&src);
            }
            self.open -= 1;
        }
    }

    pub fn open(&self) -> u64 {
        self.open
    }

    pub fn from_source(&self, src: IpAddr) -> u32 {
        self.per_source.get(&src).copied().unwrap_or(0)
    }
}

/// The descriptor budget of proxied connections and flows under a soft open-file limit.
pub fn fd_budget(soft_limit: u64) -> u64 {
    soft_limit.saturating_sub(FD_RESERVE)
}

/// The UDP flows of every service port, keyed by (proxy port, client address), with the number
/// of flows per client address kept alongside.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<(u16, SocketAddr), V>,
    per_source: HashMap<IpAddr, u32>,
}

impl<V> Default for FlowTable<V> {
    fn default() -> Self {
        FlowTable { flows: HashMap::new(), per_source: HashMap::new() }
    }
}

impl<V> FlowTable<V> {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn get(&self, port: u16, client: SocketAddr) -> Option<&V> {
        self.flows.get(&(port, client))
    }

    pub fn from_source(&self, src: IpAddr) -> u32 {
        self.per_source.get(&src).copied().unwrap_or(0)
    }

    /// Insert (or replace) the flow of `client` on `port`.
    pub fn insert(&mut self, port: u16, client: SocketAddr, v: V) -> Option<V> {
        let old = self.flows.insert((port, client), v);
        if old.is_none() {
            *self.per_source.entry(client.ip()).or_insert(0) += 1;
        }
        old
    }

    pub fn remove(&mut self, port: u16, client: SocketAddr) -> Option<V> {
        let v = self.flows.remove(&(port, client))?;
        self.forget_one(client.ip());
        Some(v)
    }

    /// Remove the flow only if `pred` holds for it (e.g. it is still the same flow).
    pub fn remove_if(&mut self, port: u16, client: SocketAddr, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        match self.flows.get(&(port, client)) {
            Some(v) if pred(v) => self.remove(port, client),
            _ => None,
        }
    }

    /// Remove every flow whose (port, client) matches (a port's socket closed).
    pub fn remove_where(&mut self, pred: impl Fn(u16, SocketAddr) -> bool) -> Vec<V> {
        let keys: Vec<(u16, SocketAddr)> = self.flows.keys().filter(|(p, c)| pred(*p, *c)).copied().collect();
        keys.into_iter().filter_map(|(p, c)| self.remove(p, c)).collect()
    }

    /// The flow whose `last` activity is oldest (the one to give way at the cap).
    pub fn oldest<K: Ord>(&self, last: impl Fn(&V) -> K) -> Option<(u16, SocketAddr)> {
        self.flows.iter().min_by_key(|(_, v)| last(v)).map(|(k, _)| *k)
    }

    fn forget_one(&mut self, src: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&src);
            }
        }
    }
}

/// What to do with a datagram that would open a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFlow<K> {
    Open,
    /// Open it after ending this (least recently active) flow.
    OpenEvicting(K),
    Refuse(Refusal),
}

/// Decide on a new flow for `src`: per-address cap first, then the global cap (`max_flows`, or
/// the descriptor budget if that is smaller), where the oldest flow gives way.
pub fn new_flow<V, K: Ord>(
    table: &FlowTable<V>,
    src: IpAddr,
    max_per_source: usize,
    max_flows: usize,
    fds_free: u64,
    last: impl Fn(&V) -> K,
) -> NewFlow<(u16, SocketAddr)> {
    if table.from_source(src) as usize >= max_per_source {
        return NewFlow::Refuse(Refusal::PerSource);
    }
    if table.len() < max_flows && fds_free > 0 {
        return NewFlow::Open;
    }
    match table.oldest(last) {
        Some(k) => NewFlow::OpenEvicting(k),
        None => NewFlow::Refuse(Refusal::FdBudget),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 10, 0, n])
    }

    fn sa(n: u8, port: u16) -> SocketAddr {
        SocketAddr::new(ip(n), port)
    }

    #[test]
    fn tcp_per_source_cap_and_release() {
        let mut a = TcpAdmission::new(2);
        assert_eq!(a.admit(ip(1), 1000, 0), Ok(()));
        assert_eq!(a.admit(ip(1), 1000, 0), Ok(()));
        assert_eq!(a.admit(ip(1), 1000, 0), Err(Refusal::PerSource));
        assert_eq!(a.admit(ip(2), 1000, 0), Ok(()), "another client is not affected");
        a.release(ip(1));
        assert_eq!(a.admit(ip(1), 1000, 0), Ok(()), "a closed connection frees its place");
        assert_eq!((a.open(), a.from_source(ip(1)), a.from_source(ip(2))), (3, 2, 1));
        a.release(ip(9)); // never admitted: no effect
        assert_eq!(a.open(), 3);
    }

    #[test]
    fn tcp_fd_budget_counts_both_sockets_and_the_flows() {
        let mut a = TcpAdmission::new(100);
        // Budget 10: four connections (8 descriptors) and 2 flows fill it.
        for _ in 0..4 {
            assert_eq!(a.admit(ip(1), 10, 2), Ok(()));
        }
        assert_eq!(a.admit(ip(2), 10, 2), Err(Refusal::FdBudget));
        assert_eq!(a.admit(ip(2), 10, 0), Ok(()), "fewer flows leave room");
        assert_eq!(fd_budget(20_000), 20_000 - FD_RESERVE);
        assert_eq!(fd_budget(100), 0);
    }

    #[test]
    fn flow_table_keeps_per_source_counts_with_every_removal_path() {
        let mut t: FlowTable<u64> = FlowTable::default();
        t.insert(53, sa(1, 1000), 5);
        t.insert(53, sa(1, 1001), 3);
        t.insert(123, sa(1, 1000), 9);
        t.insert(53, sa(2, 1000), 1);
        assert_eq!(t.insert(53, sa(2, 1000), 2), Some(1), "a replacement is not a second flow");
        assert_eq!((t.len(), t.from_source(ip(1)), t.from_source(ip(2))), (4, 3, 1));
        assert_eq!(t.oldest(|v| *v), Some((53, sa(2, 1000))));
        assert_eq!(t.remove_if(53, sa(1, 1000), |v| *v == 4), None, "not the same flow: kept");
        assert_eq!(t.remove_if(53, sa(1, 1000), |v| *v == 5), Some(5));
        assert_eq!(t.remove_where(|p, _| p == 53).len(), 2);
        assert_eq!((t.len(), t.from_source(ip(1)), t.from_source(ip(2))), (1, 1, 0));
        assert_eq!(t.remove(123, sa(1, 1000)), Some(9));
        assert!(t.is_empty() && t.per_source.is_empty());
    }

    #[test]
    fn new_flows_per_source_then_global_cap_with_eviction() {
        let mut t: FlowTable<u64> = FlowTable::default();
        for (i, port) in (1000..1003).enumerate() {
            t.insert(53, sa(1, port), i as u64 + 10);
        }
        // Per-source cap 3: a fourth flow from 10.10.0.1 is refused, others may open.
        assert_eq!(new_flow(&t, ip(1), 3, 8, 100, |v| *v), NewFlow::Refuse(Refusal::PerSource));
        assert_eq!(new_flow(&t, ip(2), 3, 8, 100, |v| *v), NewFlow::Open);
        // Global cap 3 reached: the least recently active flow gives way.
        assert_eq!(new_flow(&t, ip(2), 3, 3, 100, |v| *v), NewFlow::OpenEvicting((53, sa(1, 1000))));
        // No descriptor left: likewise.
        assert_eq!(new_flow(&t, ip(2), 3, 8, 0, |v| *v), NewFlow::OpenEvicting((53, sa(1, 1000))));
        let empty: FlowTable<u64> = FlowTable::default();
        assert_eq!(new_flow(&empty, ip(2), 3, 8, 0, |v| *v), NewFlow::Refuse(Refusal::FdBudget));
    }
}
