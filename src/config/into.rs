//! Each domain's settings, cut from the validated [`Config`]. The domains never see `Config`:
//! they take only what they use, already checked against its range.

use super::Config;
use crate::proxy::ProxyConfig;
use crate::rules::schedule::{self, WorkerConfig};
use crate::state::StateConfig;

impl From<&Config> for StateConfig {
    fn from(c: &Config) -> Self {
        StateConfig {
            filter: c.filter,
            layout: c.layout,
            listen: c.listen.clone(),
            service_cidrs: c.service_cidrs.clone(),
            node_name: c.node_name.clone(),
            lb_policy: c.lb_policy,
            data_path: c.data_path,
        }
    }
}

impl From<&Config> for WorkerConfig {
    fn from(c: &Config) -> Self {
        WorkerConfig {
            min_sync_period: c.min_sync_period,
            guard_period: c.guard_period,
            resync_period: c.resync_period,
            backoff_start: schedule::BACKOFF_START,
            backoff_max: schedule::BACKOFF_MAX,
        }
    }
}

impl From<&Config> for ProxyConfig {
    fn from(c: &Config) -> Self {
        ProxyConfig {
            listen_v4: c.listen.ip,
            listen_v6: Some(c.listen.ipv6),
            tcp_port: c.listen.tcp_port,
            dial_timeout: c.dial_timeout,
            dial_attempts: c.dial_attempts,
            tcp_buffer: c.tcp_buffer,
            udp_idle_timeout: c.udp_idle_timeout,
            udp_max_flows: c.udp_max_flows,
            tcp_max_per_source: c.tcp_max_per_source,
            udp_max_flows_per_source: c.udp_max_flows_per_source,
            mark: c.listen.mark,
            tcp_idle_timeout: c.tcp_idle_timeout,
            probe_interval: c.probe_interval,
            probes_per_second: c.probes_per_second,
            workers: c.workers,
            pin_workers: c.pin_workers,
        }
    }
}
