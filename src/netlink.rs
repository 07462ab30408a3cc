//! Netlink's wire format where rtnetlink (`address`) and nf_tables (`rules::nftables::batch`)
//! share it (pure): the 16-byte message header, attributes (length, type, payload, padded to 4
//! bytes) and nested attributes. Host byte order throughout, as netlink wants (big-endian on
//! `mips`).

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// Marks a nested attribute.
pub const NLA_F_NESTED: u16 = 0x8000;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Start a message: the header with its length left 0 (see [`finish_message`]).
pub fn start_message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    start
}

/// Fill in the length of the message begun at `start`.
pub fn finish_message(buf: &mut [u8], start: usize) {
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// One attribute, padded to 4 bytes. Payloads here are names, addresses and flags, far below
/// the 64 KiB an attribute length can say.
pub fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// A nested attribute: what `inner` writes, its length filled in after.
pub fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    inner(buf);
    let len = u16::try_from(buf.len() - start).unwrap_or(u16::MAX);
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}
