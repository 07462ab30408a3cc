//! Reading netfilter's change markers without starting a process: the nftables ruleset
//! generation over netfilter netlink, and the x_tables (iptables-legacy) kernel's summary of one
//! table. The rules guard compares them with the last ones it saw.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A raw socket owned by the returned descriptor; `None` when it cannot be had.
fn raw_socket(domain: libc::c_int, protocol: libc::c_int) -> Option<OwnedFd> {
    // SAFETY: plain socket(2); on success the new descriptor is owned by nobody else.
    let raw = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    // SAFETY: `raw` is a fresh descriptor (checked non-negative) that we now own.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The nftables ruleset generation (`NFT_MSG_GETGEN` over netfilter netlink, as `nft` and
/// iptables-nft read it). Every committed transaction in the namespace bumps it, ours and
/// anybody else's; listings do not. `None` when it cannot be read.
pub fn nft_generation() -> Option<u32> {
    const NETLINK_NETFILTER: libc::c_int = 12;
    let fd = raw_socket(libc::AF_NETLINK, NETLINK_NETFILTER)?;
    nft_generation_on(&fd)
}

/// [`nft_generation`] over a netfilter netlink socket the caller keeps open (closing one right
/// after a transaction that removed anything waits in the kernel, ~10-25 ms here; one kept open
/// never does). Replies to earlier requests still queued on it are skipped.
pub fn nft_generation_on(fd: &impl AsRawFd) -> Option<u32> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_GEN_ID: u16 = 1;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    /// Our request's sequence number, apart from the batches' (which count up from 1).
    const SEQ: u32 = 0x6e66_7467;
    // nlmsghdr (16 bytes) + nfgenmsg (4 bytes: family AF_UNSPEC, version 0, res_id 0).
    let mut req = [0u8; 20];
    req[0..4].copy_from_slice(&20u32.to_ne_bytes());
    req[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&SEQ.to_ne_bytes());
    // SAFETY: `req` is valid for reads of its length; the kernel is the default destination.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if usize::try_from(sent).ok() != Some(req.len()) {
        return None;
    }
    let u16_at = |b: &[u8], i: usize| Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?));
    for _ in 0..16 {
        let mut buf = [0u8; 512];
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let msg = buf.get(..usize::try_from(n).ok()?)?;
        let len = usize::try_from(u32::from_ne_bytes(msg.get(0..4)?.try_into().ok()?)).ok()?;
        let ours = msg.get(8..12)? == SEQ.to_ne_bytes();
        match u16_at(msg, 4)? {
            NLMSG_ERROR if ours => return None,
            kind if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN && ours => {}
            _ => continue, // a reply to an earlier request
        }
        // Attributes after the 16-byte header and the 4-byte nfgenmsg, each 4-byte aligned.
        let msg = msg.get(..len)?;
        let mut at = 20;
        while at + 4 <= msg.len() {
            let alen = usize::from(u16_at(msg, at)?);
            let atype = u16_at(msg, at + 2)? & 0x3fff;
            if alen < 4 {
                return None;
            }
            if atype == NFTA_GEN_ID && alen >= 8 {
                return Some(u32::from_be_bytes(msg.get(at + 4..at + 8)?.try_into().ok()?));
            }
            at += (alen + 3) & !3;
        }
        return None;
    }
    None
}

/// The x_tables (iptables-legacy) kernel's summary of one table, `struct ipt_getinfo` (the same
/// layout as `ip6t_getinfo`). Every rule or chain added, removed or moved changes the entry
/// count, the size or a built-in chain's offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XtInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// `getsockopt(IPT_SO_GET_INFO)` (or IPv6's) on a raw socket, as libiptc does first; no copy of
/// the rules. `None` when it cannot be read (no module, no permission): callers then list.
pub fn xt_info(v6: bool, table: &str) -> Option<XtInfo> {
    /// `IPT_SO_GET_INFO` and `IP6T_SO_GET_INFO` (`IPT_BASE_CTL`, linux/netfilter_ipv4/ip_tables.h).
    const SO_GET_INFO: libc::c_int = 64;
    let (domain, level) = if v6 { (libc::AF_INET6, libc::SOL_IPV6) } else { (libc::AF_INET, libc::SOL_IP) };
    let mut info =
        XtInfo { name: [0; 32], valid_hooks: 0, hook_entry: [0; 5], underflow: [0; 5], num_entries: 0, size: 0 };
    let name = table.as_bytes();
    if name.len() >= info.name.len() {
        return None;
    }
    info.name[..name.len()].copy_from_slice(name);
    let fd = raw_socket(domain, libc::IPPROTO_RAW)?;
    let size = std::mem::size_of::<XtInfo>();
    let mut len = libc::socklen_t::try_from(size).ok()?;
    // SAFETY: `info` is a repr(C) `ipt_getinfo` of `len` bytes, valid for writes.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, SO_GET_INFO, (&raw mut info).cast(), &mut len) };
    (rc == 0 && usize::try_from(len).ok() == Some(size)).then_some(info)
}
