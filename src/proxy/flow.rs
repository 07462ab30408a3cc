//! A UDP flow (a client address, its connected upstream socket and its last activity) and the
//! one table that holds every flow of every port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::admission::FlowTable;
use super::stats::ServiceCounters;

/// A socket connected to a backend for a client, plus its bookkeeping.
pub(super) struct Flow {
    pub(super) upstream: UdpSocket,
    pub(super) backend: SocketAddr,
    /// Last datagram either way, in ms since `Shared::epoch`.
    pub(super) last: portable_atomic::AtomicU64,
    pub(super) svc: Arc<ServiceCounters>,
}

impl Flow {
    pub(super) fn touch(&self, now: u64) {
        self.last.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn last(&self) -> u64 {
        self.last.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Every flow of every port (`Shared::udp_flows`): one table, so the global cap can make the least
/// recently active flow anywhere give way, and the per-address counts cover all ports.
pub(super) type FlowMap = Mutex<FlowTable<(Arc<Flow>, AbortHandle)>>;
