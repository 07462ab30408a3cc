//! The proxy's address on its device (`lo` by default): added at start unless it is there
//! already, removed at exit when we added it. Spoken over rtnetlink by the binary itself, so the
//! agent needs no `ip` at run time (OpenWrt images may not have iproute2); `netlink` writes and
//! reads the messages, this file sends them (a `NETLINK_ROUTE` socket through socket2: no
//! `unsafe`).

pub mod netlink;

use std::collections::HashMap;
use std::fmt;
use std::io::Read as _;
use std::net::IpAddr;
use std::time::Duration;

use netlink::Message;
use socket2::{Domain, Protocol, Socket, Type};

use crate::listen::host_prefix;

/// The kernel did not do what was asked, or could not be asked; the message names the address,
/// the device and the request.
#[derive(Debug)]
pub struct AddressError {
    pub message: String,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AddressError {}

fn error(message: String) -> AddressError {
    AddressError { message }
}

/// How long the kernel may take to answer one request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A `NETLINK_ROUTE` socket and the sequence numbers of its requests.
struct Route {
    socket: Socket,
    seq: u32,
}

impl Route {
    fn open() -> Result<Route, AddressError> {
        let socket = Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(libc::NETLINK_ROUTE)))
            .map_err(|e| error(format!("cannot open a netlink socket: {e}")))?;
        socket.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| error(format!("netlink socket: {e}")))?;
        Ok(Route { socket, seq: 0 })
    }

    /// Send what `build` writes for the next sequence number; the messages of the reply up to
    /// its end (the acknowledgement, or the end of the dump), those of other requests left out.
    fn ask(&mut self, what: &str, build: impl Fn(u32) -> Vec<u8>) -> Result<Vec<Message>, AddressError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&build(seq)).map_err(|e| error(format!("{what}: netlink send: {e}")))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        loop {
            let n = (&self.socket).read(&mut buf).map_err(|e| error(format!("{what}: netlink receive: {e}")))?;
            for m in netlink::parse(&buf[..n]).map_err(|e| error(format!("{what}: {e}")))? {
                let (of, end) = match &m {
                    Message::Ack { seq: s, .. } | Message::Done { seq: s } => (*s, true),
                    Message::Address { seq: s, .. } | Message::Link { seq: s, .. } | Message::Other { seq: s } => {
                        (*s, false)
                    }
                };
                if of != seq {
                    continue;
                }
                out.push(m);
                if end {
                    return Ok(out);
                }
            }
        }
    }

    /// The interfaces by index.
    fn links(&mut self) -> Result<HashMap<u32, String>, AddressError> {
        let reply = self.ask("list interfaces", netlink::dump_links_request)?;
        acked("list interfaces", &reply)?;
        Ok(reply
            .into_iter()
            .filter_map(|m| match m {
                Message::Link { index, name, .. } => Some((index, name)),
                _ => None,
            })
            .collect())
    }

    fn index_of(&mut self, device: &str) -> Result<u32, AddressError> {
        self.links()?
            .into_iter()
            .find_map(|(i, name)| (name == device).then_some(i))
            .ok_or_else(|| error(format!("device {device:?}: no such device")))
    }

    /// Add (`add`) or delete `ip` on `device`: the errno of the kernel's answer (0: done).
    fn change(&mut self, add: bool, device: &str, ip: IpAddr) -> Result<i32, AddressError> {
        let index = self.index_of(device)?;
        let what = format!("{} {} {device}", if add { "add" } else { "delete" }, host_prefix(&ip));
        let reply = self.ask(&what, |seq| netlink::address_request(add, index, ip, seq))?;
        match reply.last() {
            Some(Message::Ack { errno, .. }) => Ok(*errno),
            _ => Err(error(format!("{what}: the kernel did not acknowledge"))),
        }
    }
}

/// A dump ends with `Done`; an `Ack` with an errno instead is the kernel refusing it.
fn acked(what: &str, reply: &[Message]) -> Result<(), AddressError> {
    match reply.last() {
        Some(Message::Ack { errno, .. }) if *errno != 0 => {
            Err(error(format!("{what}: {}", std::io::Error::from_raw_os_error(*errno))))
        }
        _ => Ok(()),
    }
}

/// Put `ip` (/32 or /128; IPv6 without duplicate address detection, so that it is usable at
/// once) on `device`. Returns `true` when it was added now, `false` when it was already there
/// (then it is not ours to remove).
pub fn ensure_address(device: &str, ip: IpAddr) -> Result<bool, AddressError> {
    match Route::open()?.change(true, device, ip)? {
        0 => Ok(true),
        libc::EEXIST => Ok(false),
        errno => {
            Err(error(format!("add {} to {device}: {}", host_prefix(&ip), std::io::Error::from_raw_os_error(errno))))
        }
    }
}

/// Take `ip` off `device` (at exit, when [`ensure_address`] added it). Not there: nothing to do.
pub fn remove_address(device: &str, ip: IpAddr) -> Result<(), AddressError> {
    match Route::open()?.change(false, device, ip)? {
        0 | libc::EADDRNOTAVAIL => Ok(()),
        errno => Err(error(format!(
            "remove {} from {device}: {}",
            host_prefix(&ip),
            std::io::Error::from_raw_os_error(errno)
        ))),
    }
}

/// The devices that hold `ip` (any prefix length).
pub fn devices_holding(ip: IpAddr) -> Result<Vec<String>, AddressError> {
    let mut route = Route::open()?;
    let names = route.links()?;
    let reply = route.ask("list addresses", netlink::dump_addresses_request)?;
    acked("list addresses", &reply)?;
    Ok(holders(&reply, &names, ip))
}

/// The names of the interfaces whose addresses in `reply` include `ip`, in order, once each.
fn holders(reply: &[Message], names: &HashMap<u32, String>, ip: IpAddr) -> Vec<String> {
    let mut devices: Vec<String> = Vec::new();
    for m in reply {
        if let Message::Address { index, ip: a, .. } = m {
            if *a == ip {
                let name = names.get(index).cloned().unwrap_or_else(|| format!("interface #{index}"));
                if !devices.contains(&name) {
                    devices.push(name);
                }
            }
        }
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_named_by_index_once_each() {
        let a = |index, ip: &str| Message::Address { seq: 1, index, ip: ip.parse().unwrap(), prefix: 32 };
        let reply = [
            a(1, "127.0.0.1"),
            a(1, "169.254.96.16"),
            a(7, "169.254.96.16"),
            a(1, "fd00:e16e::16"),
            a(9, "169.254.96.16"),
        ];
        let names: HashMap<u32, String> = [(1, "lo".to_string()), (7, "edgemesh0".to_string())].into();
        assert_eq!(holders(&reply, &names, "169.254.96.16".parse().unwrap()), ["lo", "edgemesh0", "interface #9"]);
        assert_eq!(holders(&reply, &names, "fd00:e16e::16".parse().unwrap()), ["lo"]);
        assert!(holders(&reply, &names, "10.0.0.1".parse().unwrap()).is_empty());
    }
}
