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

use super::{comment, Key, NftTable, Target, MAP, PRIORITY, TABLE};
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

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NLM_F_APPEND: u16 = 0x800;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFT_SET_MAP: u32 = 0x8;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
/// `NF_ACCEPT`, the chains' policy.
const NF_ACCEPT: u32 = 1;
/// `NFT_RETURN`.
const NFT_RETURN: i32 = -5;
/// `NF_INET_PRE_ROUTING`, `NF_INET_LOCAL_OUT`.
const HOOK_PREROUTING: u32 = 0;
const HOOK_OUTPUT: u32 = 3;
/// Registers: `NFT_REG_1` (16 bytes; its first 4 are `NFT_REG32_00`), then 4-byte ones
/// (`NFT_REG32_01` = 9, ...). A concatenation takes consecutive 4-byte registers.
const REG_1: u32 = 1;
/// nft's user data of the map (key and data byte order, and the `type` of each part), as
/// `nft -f` writes it for `type <addr> . inet_proto . inet_service : <addr> . inet_service`,
/// so that `nft list` prints it the same.
const MAP_USERDATA: [u8; 38] = [
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00,
    0x00, 0x01, 0x00, 0x04, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
];
/// The map's id within the batch (the lookup expressions name it by name and id).
const MAP_ID: u32 = 1;

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
        let family = nfproto(f);
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

    /// A message of the nf_tables subsystem for `f`, acknowledged.
    fn object(&mut self, kind: u16, extra: u16, f: Family, body: impl FnOnce(&mut Vec<u8>)) {
        let flags = NLM_F_REQUEST | NLM_F_ACK | extra;
        self.message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, nfproto(f), body);
    }

    /// Our table of `f` removed if it is there (created, then deleted: no error when it is not),
    /// as [`super::removal_text`] does.
    pub fn remove_table(&mut self, f: Family) {
        self.object(NFT_MSG_NEWTABLE, NLM_F_CREATE, f, table_attrs);
        self.object(NFT_MSG_DELTABLE, 0, f, |b| attr(b, NFTA_TABLE_NAME, &cstr(TABLE)));
    }

    /// Our table of `f` written whole, in this batch's one transaction: removed if there, then
    /// created with the map, its elements and the two base chains, exactly what
    /// [`super::full_text`] has `nft -f` write for a table without kernel-path ports (a test
    /// compares the two listings). Without the `nft` process, whose parsing of 10,000
    /// elements alone costs ~100 ms here.
    pub fn full_table(&mut self, f: Family, table: &NftTable, mark: u32) {
        self.remove_table(f);
        self.object(NFT_MSG_NEWTABLE, NLM_F_CREATE, f, table_attrs);
        self.object(NFT_MSG_NEWSET, NLM_F_CREATE, f, |b| {
            let (key_type, key_len, data_type, data_len) = match f {
                Family::V4 => (0x730d, 12, 0x1cd, 8),
                Family::V6 => (0x830d, 24, 0x20d, 20),
            };
            attr(b, NFTA_SET_TABLE, &cstr(TABLE));
            attr(b, NFTA_SET_NAME, &cstr(MAP));
            attr(b, NFTA_SET_FLAGS, &NFT_SET_MAP.to_be_bytes());
            attr(b, NFTA_SET_KEY_TYPE, &u32::to_be_bytes(key_type));
            attr(b, NFTA_SET_KEY_LEN, &u32::to_be_bytes(key_len));
            attr(b, NFTA_SET_DATA_TYPE, &u32::to_be_bytes(data_type));
            attr(b, NFTA_SET_DATA_LEN, &u32::to_be_bytes(data_len));
            attr(b, NFTA_SET_ID, &MAP_ID.to_be_bytes());
            attr(b, NFTA_SET_USERDATA, &MAP_USERDATA);
        });
        for (name, hook) in [("prerouting", HOOK_PREROUTING), ("output", HOOK_OUTPUT)] {
            self.object(NFT_MSG_NEWCHAIN, NLM_F_CREATE, f, |b| {
                attr(b, NFTA_CHAIN_TABLE, &cstr(TABLE));
                attr(b, NFTA_CHAIN_NAME, &cstr(name));
                attr(b, NFTA_CHAIN_TYPE, &cstr("nat"));
                attr(b, NFTA_CHAIN_POLICY, &NF_ACCEPT.to_be_bytes());
                nested(b, NFTA_CHAIN_HOOK, |b| {
                    attr(b, NFTA_HOOK_HOOKNUM, &hook.to_be_bytes());
                    attr(b, NFTA_HOOK_PRIORITY, &PRIORITY.to_be_bytes());
                });
            });
        }
        self.rule(f, "prerouting", |b| dnat_through_map(b, f));
        if mark != 0 {
            self.rule(f, "output", |b| mark_return(b, mark));
        }
        self.rule(f, "output", |b| dnat_through_map(b, f));
        let items: Vec<(&Key, &Target)> = table.elements.iter().collect();
        self.add(f, &items);
    }

    /// One rule appended to `chain`: `exprs` writes its expressions.
    fn rule(&mut self, f: Family, chain: &str, exprs: impl FnOnce(&mut Vec<u8>)) {
        self.object(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, f, |b| {
            attr(b, NFTA_RULE_TABLE, &cstr(TABLE));
            attr(b, NFTA_RULE_CHAIN, &cstr(chain));
            nested(b, NFTA_RULE_EXPRESSIONS, exprs);
        });
    }

    /// The sequence number after this batch's end marker (the next batch's first).
    pub fn next_seq(&self) -> u32 {
        self.seq.wrapping_add(1)
    }

    /// The whole batch, its end marker written.
    pub fn finish(mut self) -> (Vec<u8>, Vec<u32>) {
        self.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, |_| {});
        (self.buf, self.acked)
    }
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

fn table_attrs(b: &mut Vec<u8>) {
    attr(b, NFTA_TABLE_NAME, &cstr(TABLE));
    attr(b, NFTA_TABLE_FLAGS, &0u32.to_be_bytes());
}

/// One expression: its name and its attributes (each a big-endian u32, or nested data).
fn expr(b: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    nested(b, NFTA_LIST_ELEM, |b| {
        attr(b, NFTA_EXPR_NAME, &cstr(name));
        nested(b, NFTA_EXPR_DATA, data);
    });
}

fn be(b: &mut Vec<u8>, kind: u16, v: u32) {
    attr(b, kind, &v.to_be_bytes());
}

/// `dnat <f> to <f> daddr . meta l4proto . th dport map @services`: the key's parts loaded into
/// consecutive 4-byte registers, looked up, the address and port of the value handed to `nat`.
fn dnat_through_map(b: &mut Vec<u8>, f: Family) {
    // (daddr offset, length), the registers of the protocol and the port, nat's family.
    let (offset, len, proto_reg, port_reg, nat_family) = match f {
        Family::V4 => (16, 4, 9, 10, u32::from(NFPROTO_IPV4)),
        Family::V6 => (24, 16, 2, 13, u32::from(NFPROTO_IPV6)),
    };
    // payload: 1 dreg, 2 base (1 network, 2 transport header), 3 offset, 4 len.
    expr(b, "payload", |b| {
        be(b, 1, REG_1);
        be(b, 2, 1);
        be(b, 3, offset);
        be(b, 4, len);
    });
    // meta: 2 key (16: l4proto), 1 dreg.
    expr(b, "meta", |b| {
        be(b, 2, 16);
        be(b, 1, proto_reg);
    });
    expr(b, "payload", |b| {
        be(b, 1, port_reg);
        be(b, 2, 2);
        be(b, 3, 2);
        be(b, 4, 2);
    });
    // lookup: 2 sreg, 3 dreg, 1 set, 4 set id.
    expr(b, "lookup", |b| {
        be(b, 2, REG_1);
        be(b, 3, REG_1);
        attr(b, 1, &cstr(MAP));
        be(b, 4, MAP_ID);
    });
    // nat: 1 type (1: dnat), 2 family, 3 address register, 5 port register.
    expr(b, "nat", |b| {
        be(b, 1, 1);
        be(b, 2, nat_family);
        be(b, 3, REG_1);
        be(b, 5, proto_reg);
    });
}

/// `meta mark & M == M return` (the proxy's own upstream packets pass).
fn mark_return(b: &mut Vec<u8>, mark: u32) {
    // meta: 2 key (3: mark), 1 dreg.
    expr(b, "meta", |b| {
        be(b, 2, 3);
        be(b, 1, REG_1);
    });
    // bitwise: 1 sreg, 2 dreg, 6 op (0: mask and xor), 3 len, 4 mask, 5 xor (data values, the
    // mark in host order as the packet's meta holds it).
    expr(b, "bitwise", |b| {
        be(b, 1, REG_1);
        be(b, 2, REG_1);
        be(b, 6, 0);
        be(b, 3, 4);
        nested(b, 4, |b| attr(b, NFTA_DATA_VALUE, &mark.to_ne_bytes()));
        nested(b, 5, |b| attr(b, NFTA_DATA_VALUE, &0u32.to_ne_bytes()));
    });
    // cmp: 1 sreg, 2 op (0: eq), 3 data.
    expr(b, "cmp", |b| {
        be(b, 1, REG_1);
        be(b, 2, 0);
        nested(b, 3, |b| attr(b, NFTA_DATA_VALUE, &mark.to_ne_bytes()));
    });
    // immediate: 1 dreg (0: the verdict), 2 data: a verdict, `return`.
    expr(b, "immediate", |b| {
        be(b, 1, 0);
        nested(b, 2, |b| nested(b, NFTA_DATA_VERDICT, |b| attr(b, NFTA_VERDICT_CODE, &NFT_RETURN.to_be_bytes())));
    });
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
