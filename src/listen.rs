//! Where the proxy listens: its addresses, the device they live on, its ports and the mark on its
//! upstream sockets. Read by the renderer (DNAT targets, the own-traffic rule), the state machine
//! (UDP port allocation) and the proxy (listeners, upstream sockets).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenConfig {
    pub ip: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub device: String,
    pub tcp_port: u16,
    pub udp_ports: (u16, u16),
    pub reject_port: u16,
    /// SO_MARK of upstream sockets, matched by the first rule of our OUTPUT-side chain (0: off).
    pub mark: u32,
}

impl ListenConfig {
    pub fn ip_for(&self, v6: bool) -> IpAddr {
        match v6 {
            false => IpAddr::V4(self.ip),
            true => IpAddr::V6(self.ipv6),
        }
    }
}

/// `ip` as a host prefix (`/32` or `/128`), as iptables prints a rule's address and `ip addr`
/// an address.
pub fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}
