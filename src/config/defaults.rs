//! Every default of the config, named once. The code uses these; `tests/docs.rs` holds the flag
//! help and the README's config block to them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Where `run`, `check`, `cleanup`, `rules` and `check-config` look for a config file when no
/// `--config` is given (used only when it exists).
pub const PATH: &str = "/etc/edgeproxy/config.json";

/// `stateDir`: systemd's `StateDirectory=edgeproxy`.
pub const STATE_DIR: &str = "/var/lib/edgeproxy";
/// `runDir`: systemd's `RuntimeDirectory=edgeproxy` (emptied at reboot, as addresses are).
pub const RUN_DIR: &str = "/run/edgeproxy";
pub const OFFLINE_AFTER: Duration = Duration::from_secs(10);

pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// EdgeMesh's `bridgeDeviceIP`.
pub const LISTEN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 96, 16);
pub const LISTEN_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe16e, 0, 0, 0, 0, 0, 0x16);
pub const LISTEN_DEVICE: &str = "lo";
pub const TCP_PORT: u16 = 15001;
pub const UDP_PORTS: (u16, u16) = (15002, 15999);
pub const REJECT_PORT: u16 = 15000;
/// Bit 20. Chosen clear of kube-proxy (0x4000, 0x8000), Cilium (0x0F00), OpenWrt's mwan3
/// (0x3F00), Istio (1337) and Tailscale (0x40000, 0x80000); Calico may use any bit of
/// 0xffff0000, so on Calico nodes pick a bit outside its mask.
pub const MARK: u32 = 0x0010_0000;

pub const META_SERVER: &str = "http://127.0.0.1:10550";
pub const WATCH: bool = true;
pub const POLL_INTERVAL: Duration = Duration::from_secs(30);

/// `workers`: one event loop per usable CPU, capped (see `proxy::workers`).
pub const WORKERS: crate::proxy::Workers = crate::proxy::Workers::Auto;
/// `pinWorkers`: off; the scheduler places the workers.
pub const PIN_WORKERS: bool = false;
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
pub const DIAL_ATTEMPTS: u32 = 3;
/// Active probes started per second at most (when `tcp.probeInterval` turns them on).
pub const PROBES_PER_SECOND: u32 = 20;
pub const TCP_BUFFER: usize = 16 * 1024;
pub const TCP_MAX_PER_SOURCE: usize = 2048;
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const UDP_MAX_FLOWS: usize = 4096;
pub const UDP_MAX_FLOWS_PER_SOURCE: usize = 1024;

pub const MIN_SYNC_PERIOD: Duration = Duration::from_millis(200);
pub const GUARD_PERIOD: Duration = Duration::from_secs(2);
pub const RESYNC_PERIOD: Duration = Duration::from_secs(60);
