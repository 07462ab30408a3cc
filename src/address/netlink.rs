//! The rtnetlink messages the address code needs, written and read as bytes (pure: no socket).
//!
//! Four requests: add an address (`RTM_NEWADDR`, create + exclusive, with an acknowledgement),
//! delete one (`RTM_DELADDR`), and dump every address (`RTM_GETADDR`) or every link
//! (`RTM_GETLINK`, for the names of interface indexes). Replies are read defensively: a kernel
//! answer is trusted no more than any other input, so a truncated or inconsistent message is an
//! error naming what was wrong, never a panic or a read past the buffer.
//!
//! Netlink is in host byte order (big-endian on `mips`): every integer goes through
//! `to_ne_bytes` / `from_ne_bytes`. Layouts (from `linux/netlink.h`, `linux/if_addr.h`,
//! `linux/rtnetlink.h`): `nlmsghdr` is 16 bytes (len u32, type u16, flags u16, seq u32, pid
//! u32); `ifaddrmsg` 8 (family, prefixlen, flags, scope: u8; index: u32); `ifinfomsg` 16
//! (family u8, pad u8, type u16, index i32, flags u32, change u32); attributes are (len u16,
//! type u16, payload), each padded to 4 bytes.

use std::fmt;
use std::net::IpAddr;

use crate::netlink::{self as wire, align4};

const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDRLEN: usize = 4;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;

const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFLA_IFNAME: u16 = 3;
/// No duplicate address detection: an IPv6 address usable at once, never "tentative".
const IFA_F_NODAD: u32 = 0x02;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A request being written: the header, then the family message, then attributes; the length
/// is filled in by [`Request::finish`].
struct Request(Vec<u8>);

impl Request {
    fn new(kind: u16, flags: u16, seq: u32) -> Request {
        let mut b = Vec::with_capacity(64);
        wire::start_message(&mut b, kind, flags | wire::NLM_F_REQUEST, seq);
        Request(b)
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        wire::attr(&mut self.0, kind, payload);
    }

    fn finish(mut self) -> Vec<u8> {
        wire::finish_message(&mut self.0, 0);
        self.0
    }
}

fn family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Add (`add`) or delete `ip` as a host address (/32, /128) on interface `index`. IPv6
/// addresses are added without duplicate address detection.
pub fn address_request(add: bool, index: u32, ip: IpAddr, seq: u32) -> Vec<u8> {
    let (kind, flags) =
        if add { (RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL) } else { (RTM_DELADDR, NLM_F_ACK) };
    let mut r = Request::new(kind, flags, seq);
    let prefix: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let nodad = add && ip.is_ipv6();
    // ifa_flags is a u8; IFA_F_NODAD (0x02) fits, and goes in the IFA_FLAGS attribute too.
    let ifa_flags: u8 = if nodad { 0x02 } else { 0 };
    r.0.extend_from_slice(&[family(&ip), prefix, ifa_flags, 0]);
    r.0.extend_from_slice(&index.to_ne_bytes());
    let bytes = octets(&ip);
    r.attr(IFA_LOCAL, &bytes);
    r.attr(IFA_ADDRESS, &bytes);
    if nodad {
        r.attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
    }
    r.finish()
}

/// Dump every address of every interface (both families).
pub fn dump_addresses_request(seq: u32) -> Vec<u8> {
    let mut r = Request::new(RTM_GETADDR, NLM_F_DUMP, seq);
    r.0.extend_from_slice(&[0u8; IFADDRMSG_LEN]);
    r.finish()
}

/// Dump every link (for the names of interface indexes).
pub fn dump_links_request(seq: u32) -> Vec<u8> {
    let mut r = Request::new(RTM_GETLINK, NLM_F_DUMP, seq);
    r.0.extend_from_slice(&[0u8; IFINFOMSG_LEN]);
    r.finish()
}

/// A reply that does not parse: what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed netlink reply: {}", self.0)
    }
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// An acknowledgement (errno 0) or an error (a positive errno), for request `seq`.
    Ack { seq: u32, errno: i32 },
    /// The end of a dump.
    Done { seq: u32 },
    /// An address of interface `index`.
    Address { seq: u32, index: u32, ip: IpAddr, prefix: u8 },
    /// Interface `index` is called `name`.
    Link { seq: u32, index: u32, name: String },
    /// Anything else (other message types are skipped).
    Other { seq: u32 },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `b`: (type, payload) pairs.
fn attributes(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, Malformed> {
    let mut out = Vec::new();
    while b.len() >= RTA_HDRLEN {
        let len = usize::from(u16_at(b, 0).ok_or(Malformed("attribute header"))?);
        let kind = u16_at(b, 2).ok_or(Malformed("attribute header"))?;
        if len < RTA_HDRLEN || len > b.len() {
            return Err(Malformed("attribute length out of bounds"));
        }
        // The nested-attribute and byte-order bits are not ours to read.
        out.push((kind & 0x3fff, &b[RTA_HDRLEN..len]));
        b = b.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

fn address_message(seq: u32, body: &[u8]) -> Result<Message, Malformed> {
    let head = body.get(..IFADDRMSG_LEN).ok_or(Malformed("short ifaddrmsg"))?;
    let (fam, prefix) = (head[0], head[1]);
    let index = u32_at(head, 4).ok_or(Malformed("short ifaddrmsg"))?;
    let attrs = attributes(&body[IFADDRMSG_LEN..])?;
    // IFA_LOCAL is the interface's own address (differs from IFA_ADDRESS on point-to-point
    // links); IPv6 sends only IFA_ADDRESS.
    let payload = attrs
        .iter()
        .find(|(k, _)| *k == IFA_LOCAL)
        .or_else(|| attrs.iter().find(|(k, _)| *k == IFA_ADDRESS))
        .map(|(_, p)| *p);
    let ip = match (fam, payload) {
        (AF_INET, Some(p)) => IpAddr::from(<[u8; 4]>::try_from(p).map_err(|_| Malformed("IPv4 address length"))?),
        (AF_INET6, Some(p)) => IpAddr::from(<[u8; 16]>::try_from(p).map_err(|_| Malformed("IPv6 address length"))?),
        _ => return Ok(Message::Other { seq }),
    };
    Ok(Message::Address { seq, index, ip, prefix })
}

fn link_message(seq: u32, body: &[u8]) -> Result<Message, Malformed> {
    let head = body.get(..IFINFOMSG_LEN).ok_or(Malformed("short ifinfomsg"))?;
    let index = u32_at(head, 4).ok_or(Malformed("short ifinfomsg"))?;
    let attrs = attributes(&body[IFINFOMSG_LEN..])?;
    let Some((_, name)) = attrs.iter().find(|(k, _)| *k == IFLA_IFNAME) else {
        return Ok(Message::Other { seq });
    };
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    Ok(Message::Link { seq, index, name: String::from_utf8_lossy(name).into_owned() })
}

/// Split one datagram of a reply into its messages.
pub fn parse(mut b: &[u8]) -> Result<Vec<Message>, Malformed> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = usize::try_from(u32_at(b, 0).ok_or(Malformed("short header"))?).unwrap_or(usize::MAX);
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(Malformed("message length out of bounds"));
        }
        let kind = u16_at(b, 4).ok_or(Malformed("short header"))?;
        let seq = u32_at(b, 8).ok_or(Malformed("short header"))?;
        let body = &b[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                // struct nlmsgerr: int error (negative errno, 0 for an acknowledgement), then
                // the request's header.
                let error = u32_at(body, 0).ok_or(Malformed("short error message"))?;
                Message::Ack { seq, errno: i32::from_ne_bytes(error.to_ne_bytes()).saturating_neg() }
            }
            NLMSG_DONE => Message::Done { seq },
            RTM_NEWADDR => address_message(seq, body)?,
            RTM_NEWLINK => link_message(seq, body)?,
            _ => Message::Other { seq },
        });
        b = b.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::NLM_F_REQUEST;

    fn header(b: &[u8]) -> (u32, u16, u16, u32) {
        (u32_at(b, 0).unwrap(), u16_at(b, 4).unwrap(), u16_at(b, 6).unwrap(), u32_at(b, 8).unwrap())
    }

    #[test]
    fn add_requests_carry_the_address_twice_and_nodad_for_ipv6() {
        let v4 = address_request(true, 1, "169.254.96.16".parse().unwrap(), 7);
        let (len, kind, flags, seq) = header(&v4);
        assert_eq!((len as usize, kind, seq), (v4.len(), RTM_NEWADDR, 7));
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        assert_eq!(&v4[16..20], &[AF_INET, 32, 0, 0]);
        assert_eq!(u32_at(&v4, 20), Some(1));
        let attrs = attributes(&v4[24..]).unwrap();
        assert_eq!(attrs, vec![(IFA_LOCAL, &[169, 254, 96, 16][..]), (IFA_ADDRESS, &[169, 254, 96, 16][..])]);

        let v6 = address_request(true, 1, "fd00:e16e::16".parse().unwrap(), 8);
        assert_eq!(&v6[16..20], &[AF_INET6, 128, 0x02, 0]);
        let attrs = attributes(&v6[24..]).unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[2], (IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes()[..]));
        assert_eq!(v6.len() % 4, 0);

        let del = address_request(false, 3, "fd00:e16e::16".parse().unwrap(), 9);
        assert_eq!(header(&del).1, RTM_DELADDR);
        assert_eq!(header(&del).2, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(del[18], 0, "no flags on a delete");
    }

    /// A reply datagram as the kernel writes it.
    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut r = Request::new(kind, 0, seq);
        r.0.truncate(NLMSG_HDRLEN);
        r.0.extend_from_slice(body);
        r.0.resize(align4(r.0.len()), 0);
        r.finish()
    }

    fn address_body(fam: u8, prefix: u8, index: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut r = Request(Vec::new());
        r.0.extend_from_slice(&[fam, prefix, 0, 0]);
        r.0.extend_from_slice(&index.to_ne_bytes());
        for (k, p) in attrs {
            r.attr(*k, p);
        }
        r.0
    }

    #[test]
    fn dump_replies_parse_into_addresses_links_acks_and_done() {
        let mut dgram = message(
            RTM_NEWADDR,
            5,
            &address_body(AF_INET, 24, 7, &[(IFA_ADDRESS, &[10, 0, 0, 255]), (IFA_LOCAL, &[10, 0, 0, 1])]),
        );
        let v6: [u8; 16] = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        dgram.extend(message(RTM_NEWADDR, 5, &address_body(AF_INET6, 64, 1, &[(IFA_ADDRESS, &v6)])));
        let mut link = vec![0u8; IFINFOMSG_LEN];
        link[4..8].copy_from_slice(&7u32.to_ne_bytes());
        let mut r = Request(link);
        r.attr(IFLA_IFNAME, b"edgemesh0\0");
        dgram.extend(message(RTM_NEWLINK, 6, &r.0));
        dgram.extend(message(NLMSG_ERROR, 9, &(-17i32).to_ne_bytes()));
        dgram.extend(message(NLMSG_DONE, 5, &[0, 0, 0, 0]));
        let got = parse(&dgram).unwrap();
        assert_eq!(
            got,
            vec![
                Message::Address { seq: 5, index: 7, ip: "10.0.0.1".parse().unwrap(), prefix: 24 },
                Message::Address { seq: 5, index: 1, ip: "fd00::1".parse().unwrap(), prefix: 64 },
                Message::Link { seq: 6, index: 7, name: "edgemesh0".into() },
                Message::Ack { seq: 9, errno: 17 },
                Message::Done { seq: 5 },
            ]
        );
    }

    #[test]
    fn truncated_or_lying_replies_are_errors_not_panics() {
        let good = message(RTM_NEWADDR, 1, &address_body(AF_INET, 32, 1, &[(IFA_LOCAL, &[1, 2, 3, 4])]));
        // Every truncation of a good message, and every length field set to every byte value.
        for cut in 1..good.len() {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        for at in [0usize, 1, 24, 25] {
            for v in 0..=255u8 {
                let mut bad = good.clone();
                bad[at] = v;
                let _ = parse(&bad);
            }
        }
        // An IPv4 address of the wrong length.
        let odd = message(RTM_NEWADDR, 1, &address_body(AF_INET, 32, 1, &[(IFA_LOCAL, &[1, 2, 3])]));
        assert_eq!(parse(&odd), Err(Malformed("IPv4 address length")));
        // An address message without an address is skipped.
        let none = message(RTM_NEWADDR, 1, &address_body(AF_INET, 32, 1, &[]));
        assert_eq!(parse(&none), Ok(vec![Message::Other { seq: 1 }]));
    }
}
