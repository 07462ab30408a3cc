//! Map element changes as one nf_tables netlink batch (pure: bytes in, bytes out), what `nft`
//! itself sends for `delete element` / `add element`, without the `nft` process: that process
//! first loads the whole ruleset into its cache, elements included (10-17 ms with a
//! 10,000-element map, whatever the change), where the batch costs what changed.
//!
//! A batch is `NFNL_MSG_BATCH_BEGIN`, then `NFT_MSG_DELSETELEM` and `NFT_MSG_NEWSETELEM`
//! messages (elements in chunks, each message acknowledged), then `NFNL_MSG_BATCH_END`: the
//! kernel applies all of it or none. Layouts (`linux/netfilter/nf_tables.h`, `nfnetlink.h`): an
//! `nfgenmsg` (family, version 0, resource id, big-endian) after each 16-byte `nlmsghdr`;
//! attributes as in rtnetlink, nested ones flagged `NLA_F_NESTED`. A concatenated key or value
//! puts each part in 4-byte registers: `ipv4_addr . inet_proto . inet_service` is the address
//! (4 or 16 bytes, network order), the protocol (1 byte, 3 of padding) and the port (2 bytes
//! big-endian, 2 of padding); the value `ipv4_addr . inet_service` the same way. The comment
//! travels as libnftnl's user data: type 0 (comment), length, the text and its NUL.

use super::{comment, Key, Target, MAP, TABLE};
use crate::model::Protocol;
use crate::netlink::{attr, finish_message, nested, start_message, NLM_F_REQUEST};
use crate::rules::Family;
use std::net::IpAddr;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
/// libnftnl's user data type of an element's comment.
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// Elements per message: a message stays well under a page-sized chunk of the socket buffer.
const CHUNK: usize = 256;

/// A batch being written. Every message gets the next sequence number.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Sequence numbers of the messages that ask for an acknowledgement.
    pub acked: Vec<u32>,
}

impl Batch {
    pub fn new(first_seq: u32) -> Batch {
        let mut b = Batch { buf: Vec::with_capacity(4096), seq: first_seq, acked: Vec::new() };
        b.message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, |_| {});
        b
    }

    /// One message: header, nfgenmsg, then what `body` writes; the length is filled in after.
    fn message(&mut self, kind: u16, flags: u16, family: u8, body: impl FnOnce(&mut Vec<u8>)) {
        let start = start_message(&mut self.buf, kind, flags, self.seq);
        // nfgenmsg: family, version, resource id (big-endian): the subsystem for the batch
        // markers, 0 for the messages inside.
        let res_id: u16 =
            if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END { NFNL_SUBSYS_NFTABLES } else { 0 };
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        body(&mut self.buf);
        finish_message(&mut self.buf, start);
        if flags & NLM_F_ACK != 0 {
            self.acked.push(self.seq);
        }
        self.seq = self.seq.wrapping_add(1);
    }

    /// Delete (`add` false, keys only) or add elements of one family's map, in chunks.
    fn elements(&mut self, f: Family, add: bool, items: &[(&Key, Option<&Target>)]) {
        let family = match f {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        };
        let (kind, flags) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        };
        for chunk in items.chunks(CHUNK) {
            let subsys_kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
            self.message(subsys_kind, flags, family, |b| {
                attr(b, NFTA_SET_ELEM_LIST_TABLE, &cstr(TABLE));
                attr(b, NFTA_SET_ELEM_LIST_SET, &cstr(MAP));
                nested(b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    for (key, target) in chunk {
                        nested(b, NFTA_LIST_ELEM, |b| {
                            nested(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, &key_bytes(key)));
                            if let Some(t) = target {
                                nested(b, NFTA_SET_ELEM_DATA, |b| attr(b, NFTA_DATA_VALUE, &value_bytes(t)));
                                attr(b, NFTA_SET_ELEM_USERDATA, &comment_udata(&t.name));
                            }
                        });
                    }
                });
            });
        }
    }

    pub fn delete(&mut self, f: Family, keys: &[&Key]) {
        let items: Vec<(&Key, Option<&Target>)> = keys.iter().map(|k| (*k, None)).collect();
        self.elements(f, false, &items);
    }

    pub fn add(&mut self, f: Family, items: &[(&Key, &Target)]) {
        let items: Vec<(&Key, Option<&Target>)> = items.iter().map(|(k, t)| (*k, Some(*t))).collect();
        self.elements(f, true, &items);
    }

    /// The whole batch, its end marker written.
    pub fn finish(mut self) -> (Vec<u8>, Vec<u32>) {
        self.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, |_| {});
        (self.buf, self.acked)
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn address(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
    }
}

/// `address . protocol . port`, each part in 4-byte registers.
pub fn key_bytes((ip, proto, port): &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    address(&mut out, ip);
    let p: u8 = match proto {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    };
    out.extend_from_slice(&[p, 0, 0, 0]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// `address . port` of the DNAT target, each part in 4-byte registers.
pub fn value_bytes(t: &Target) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    address(&mut out, &t.addr);
    out.extend_from_slice(&t.port.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// The comment as libnftnl's user data TLV (what `nft list` shows as `comment "..."`).
fn comment_udata(name: &str) -> Vec<u8> {
    let text = cstr(&comment(name));
    let mut out = vec![NFTNL_UDATA_SET_ELEM_COMMENT, u8::try_from(text.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(&text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, proto: Protocol, port: u16) -> Key {
        (ip.parse().unwrap(), proto, port)
    }

    #[test]
    fn keys_and_values_sit_in_4_byte_registers_in_network_order() {
        assert_eq!(key_bytes(&key("10.96.0.10", Protocol::Tcp, 80)), [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(key_bytes(&key("10.96.0.10", Protocol::Udp, 5353)), [10, 96, 0, 10, 17, 0, 0, 0, 0x14, 0xe9, 0, 0]);
        assert_eq!(key_bytes(&key("fd00::1", Protocol::Tcp, 443)).len(), 24);
        let t = Target { addr: "169.254.96.16".parse().unwrap(), port: 15001, name: "t/web:http".into() };
        assert_eq!(value_bytes(&t), [169, 254, 96, 16, 0x3a, 0x99, 0, 0]);
        assert_eq!(comment_udata("t/web:http"), [&[0u8, 11][..], b"t/web:http\0"].concat());
    }

    #[test]
    fn a_batch_is_begin_messages_end_with_lengths_that_add_up() {
        let t = Target { addr: "169.254.96.16".parse().unwrap(), port: 15001, name: "t/web:http".into() };
        let k1 = key("10.96.0.10", Protocol::Tcp, 80);
        let keys: Vec<Key> = (0..300u16).map(|i| key("10.96.0.11", Protocol::Tcp, i + 1)).collect();
        let mut b = Batch::new(100);
        b.delete(Family::V4, &[&k1]);
        let adds: Vec<(&Key, &Target)> = keys.iter().map(|k| (k, &t)).collect();
        b.add(Family::V4, &adds);
        let (bytes, acked) = b.finish();
        // Begin (100), one delete (101), 300 adds in two chunks (102, 103), end (104).
        assert_eq!(acked, vec![101, 102, 103]);
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap()));
            assert_eq!(len % 4, 0);
            at += len;
        }
        assert_eq!(at, bytes.len());
        let new = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
        let del = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM;
        assert_eq!(kinds, vec![NFNL_MSG_BATCH_BEGIN, del, new, new, NFNL_MSG_BATCH_END]);
        // The batch markers name the subsystem (big-endian) in their nfgenmsg.
        assert_eq!(&bytes[18..20], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
    }
}
