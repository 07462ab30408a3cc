//! The kernel path's plan for one service port (`dataPath: kernel`): what the rules DNAT to.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::report::PortReport;
use crate::model::{Service, ServicePort, ServicePortName};
use crate::proxy::table::{LbPolicy, ServiceEntry, Upstream};
use crate::rules::render::{KernelRoute, PlannedPort};

/// Per ClusterIP the endpoints of its family the rules DNAT to (those in `set_aside` left out,
/// unless that would leave none: fail open, as the proxy does), pushed to `planned`. Returns
/// the port's entry for the probes, with every usable endpoint (so a dead one is probed until it
/// is back).
pub(super) fn entries(
    svc: &Service,
    sp: &ServicePort,
    report: &mut PortReport,
    backends: Vec<Upstream>,
    set_aside: &BTreeSet<(ServicePortName, SocketAddr)>,
    policy: LbPolicy,
    planned: &mut Vec<PlannedPort>,
) -> Arc<ServiceEntry> {
    let name = report.name.clone();
    for ip in &svc.cluster_ips {
        let family: Vec<SocketAddr> = backends.iter().map(|b| b.addr).filter(|a| a.is_ipv6() == ip.is_ipv6()).collect();
        let alive: Vec<SocketAddr> =
            family.iter().copied().filter(|a| !set_aside.contains(&(name.clone(), *a))).collect();
        let endpoints = match alive.is_empty() {
            true => family,
            false => {
                report.left_out += family.len() - alive.len();
                alive
            }
        };
        planned.push(PlannedPort {
            name: name.clone(),
            cluster_ip: *ip,
            protocol: sp.protocol,
            port: sp.port,
            proxy_port: 0,
            has_endpoints: !endpoints.is_empty(),
            kernel: Some(KernelRoute { endpoints, affinity: svc.affinity_timeout }),
        });
    }
    Arc::new(ServiceEntry {
        name,
        protocol: sp.protocol,
        upstreams: backends,
        affinity: svc.affinity_timeout.map(|t| Duration::from_secs(t.into())),
        policy,
        probe_interval: svc.probe_interval,
    })
}
