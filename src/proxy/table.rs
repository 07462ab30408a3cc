//! What the proxy loop looks up per connection. Built by `state` (pure), swapped into the loop
//! whole; a new table takes effect for the next connection or flow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{Protocol, ServicePortName};

/// One usable backend of a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// On this node (`nodeName` equals `--node-name`).
    pub local: bool,
}

/// How a service port spreads new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
}

/// One proxied service port, as the proxy needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Also the key of load-balancing state that must survive a table swap. Shared with the
    /// plan's report.
    pub name: ServicePortName,
    pub protocol: Protocol,
    /// Usable backends in a stable order: ready ones, or serving-but-terminating ones when none
    /// is ready; node-local only under `internalTrafficPolicy: Local`. Empty means "refuse".
    pub upstreams: Vec<Upstream>,
    /// `sessionAffinity: ClientIP` with its timeout.
    pub affinity: Option<Duration>,
    pub policy: LbPolicy,
    /// The Service's own active-probe interval (its annotation), over `tcp.probeInterval`.
    pub probe_interval: Option<Duration>,
}

/// The whole lookup table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyTable {
    /// Original destination (ClusterIP:port, as recovered with SO_ORIGINAL_DST) -> service port.
    pub tcp: HashMap<SocketAddr, Arc<ServiceEntry>>,
    /// Local UDP proxy port (one per UDP service port) -> service port.
    pub udp: HashMap<u16, Arc<ServiceEntry>>,
    /// Kernel-path TCP service ports: no connection reaches the proxy, so nothing looks them up;
    /// the active probes watch their endpoints (and the rules leave out the dead ones).
    pub kernel: Vec<Arc<ServiceEntry>>,
}
