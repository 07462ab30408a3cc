//! What a plan decided, per service and port (for `--explain`, logs and metrics), and the plan
//! itself.

use crate::filter::Verdict;
use crate::model::{DataPath, ObjectKey, Protocol, ServicePortName};
use crate::proxy::table::ProxyTable;
use crate::rules::RuleSet;

/// Per service port, what the plan decided (for `--explain` and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortReport {
    /// The same allocation as the proxy
    /// table entry's name.
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub port: u16,
    pub backends: usize,
    /// Endpoints refused because they are a ClusterIP:port this node proxies (a loop).
    pub loops: usize,
    /// `internalTrafficPolicy: Local` and no usable endpoint (on this node).
    pub no_local_endpoints: bool,
    /// Through the proxy, or DNATed in the kernel straight to endpoints.
    pub path: DataPath,
    /// Kernel path: endpoints left out of the rules because the health check set them aside.
    pub left_out: usize,
    pub note: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceReport {
    pub key: ObjectKey,
    pub verdict: Verdict,
    pub ports: Vec<PortReport>,
}

/// Everything derived from the state at one moment.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub reports: Vec<ServiceReport>,
    pub rules: RuleSet,
    pub table: ProxyTable,
}

impl Plan {
    /// Endpoints left out because they would loop back into the proxy, over every service port.
    pub fn refused_loops(&self) -> usize {
        self.reports.iter().flat_map(|r| &r.ports).map(|p| p.loops).sum()
    }

    pub fn proxied(&self) -> impl Iterator<Item = &ObjectKey> {
        self.reports.iter().filter(|r| r.verdict.is_proxied()).map(|r| &r.key)
    }
}
