//! The `nftables` layout (pure): what the tables hold and the `nft -f` input that puts them
//! there. The [`NftApplier`](apply::NftApplier) runs it.
//!
//! Why a layout of its own: the kernel keeps the nat base chains of a hook, whoever wrote them
//! (iptables-legacy, iptables-nft, native nftables, kube-proxy's nftables mode, OpenWrt's fw4),
//! in one list ordered by priority, and a new connection stops at the first chain that binds a
//! NAT mapping. Our chains sit at priority `dstnat - 1` (-101): ahead of every kube-proxy by
//! construction, with no jump to keep at rule 1 and nothing to fight over. A service port we do
//! not proxy needs no rule: it does not match and goes on to whoever comes next.
//!
//! Per family one table (`ip edgeproxy`, `ip6 edgeproxy`) with one verdict-free map, `services`:
//! (ClusterIP, protocol, port) -> (proxy address, proxy port), one lookup whatever the number of
//! services; a port without endpoints maps to the reject port, where nothing listens, so the
//! kernel refuses at once. Two base chains, `prerouting` and `output`, each one `dnat` through
//! the map; `output` first lets the proxy's own (marked) upstream packets pass.
//!
//! A sync changes only map elements (`delete element` / `add element` in one transaction):
//! what changed, never the table. A full write (at start, after a failure, a repair, the
//! periodic resync) creates, deletes and recreates the table in one transaction, so a reader
//! never sees it half written. Both go to the kernel as nf_tables netlink batches written by
//! the binary (`batch`); the `nft -f` text here is what `edgeproxy rules` prints, what writes
//! kernel-path chains, and the fallback when a batch is refused.

pub mod apply;
pub mod batch;
pub mod listing;

use std::fmt::Write as _;

use super::render::{comment_text, endpoint_id};
use super::Family;
pub use super::{NftKernel, NftKey as Key, NftRules, NftTable, NftTarget as Target};

/// The tables' name in each family.
pub const TABLE: &str = "edgeproxy";
/// The map's name.
pub const MAP: &str = "services";
/// Priority of our nat chains: one ahead of `dstnat` (-100), where iptables' nat PREROUTING and
/// OUTPUT and kube-proxy's nftables chains sit. Not -100 itself: equal priorities run in the
/// order they were registered.
pub const PRIORITY: i32 = -101;

/// `ip` or `ip6`: the table family, and the keyword of address matches and `dnat`.
pub fn keyword(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// `10.96.0.10 . tcp . 80`
fn key_text(out: &mut String, (ip, proto, port): &Key) {
    let _ = write!(out, "{ip} . {} . {port}", proto.as_str());
}

/// `10.96.0.10 . tcp . 80 comment "t/web:http" : 169.254.96.16 . 15001`. Names pass through
/// [`comment_text`], which leaves no quote, backslash or newline.
fn element_text(out: &mut String, key: &Key, t: &Target) {
    key_text(out, key);
    let _ = write!(out, " comment \"{}\" : {} . {}", comment(&t.name), t.addr, t.port);
}

/// nft keeps at most 128 bytes of a comment, its NUL included.
pub const MAX_COMMENT: usize = 127;

/// An element's comment: [`comment_text`] (ASCII only), cut to [`MAX_COMMENT`] bytes. A
/// Kubernetes service port name may reach 143 (namespace 63, name 63, port 15).
pub fn comment(name: &str) -> String {
    let mut c = comment_text(name).into_owned();
    c.truncate(MAX_COMMENT);
    c
}

fn elements_text<'a>(items: impl Iterator<Item = (&'a Key, &'a Target)>) -> String {
    let mut out = String::new();
    for (i, (k, t)) in items.enumerate() {
        if i > 0 {
            out.push_str(",\n\t\t\t");
        }
        element_text(&mut out, k, t);
    }
    out
}

/// Write one family's table whole: created if missing, deleted and created again, in the
/// caller's transaction (so a reader never sees it half written).
pub fn full_text(out: &mut String, f: Family, table: &NftTable, mark: u32) {
    let kw = keyword(f);
    let _ = writeln!(out, "table {kw} {TABLE} {{}}\ndelete table {kw} {TABLE}\ntable {kw} {TABLE} {{");
    let _ = writeln!(
        out,
        "\tmap {MAP} {{\n\t\ttype {} . inet_proto . inet_service : {} . inet_service",
        addr_type(f),
        addr_type(f)
    );
    if !table.elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements_text(table.elements.iter()));
    }
    out.push_str("\t}\n");
    kernel_text(out, f, &table.kernel);
    let kernel = if table.kernel.is_empty() { String::new() } else { format!("\t\tjump {KERNEL_CHAIN}\n") };
    let dnat = format!("dnat {kw} to {kw} daddr . meta l4proto . th dport map @{MAP}");
    let _ = writeln!(
        out,
        "\tchain prerouting {{\n\t\ttype nat hook prerouting priority {PRIORITY}; policy accept;\n{kernel}\t\t{dnat}\n\t}}"
    );
    let _ = writeln!(out, "\tchain output {{\n\t\ttype nat hook output priority {PRIORITY}; policy accept;");
    if mark != 0 {
        let _ = writeln!(out, "\t\tmeta mark & {mark:#010x} == {mark:#010x} return");
    }
    let _ = writeln!(out, "{kernel}\t\t{dnat}\n\t}}\n}}");
}

/// The regular chain the base chains jump to first when there are kernel-path ports.
pub const KERNEL_CHAIN: &str = "kernel";

/// Kernel-path ports (`dataPath: kernel`) as kube-proxy's nftables mode writes them: per port
/// a `numgen random` verdict map over one chain per endpoint, which DNATs; with ClientIP
/// affinity, per endpoint a set of clients (with the timeout) that the endpoint's chain
/// refreshes and that sends a client seen within the timeout to it again. Chain and set names
/// are hashes ([`endpoint_id`]), never object text.
fn kernel_text(out: &mut String, f: Family, ports: &[NftKernel]) {
    if ports.is_empty() {
        return;
    }
    let kw = keyword(f);
    let (mut sets, mut chains, mut main) = (String::new(), String::new(), String::new());
    for k in ports {
        let (ip, proto, port) = k.key;
        let matches = format!("{kw} daddr {ip} meta l4proto {} th dport {port}", proto.as_str());
        let ids: Vec<String> = k.endpoints.iter().map(|e| endpoint_id(&k.name, ip, *e)).collect();
        for (id, ep) in ids.iter().zip(&k.endpoints) {
            let _ = writeln!(chains, "\tchain ep-{id} {{");
            if let Some(t) = k.affinity {
                let _ = writeln!(chains, "\t\tupdate @aff-{id} {{ {kw} saddr }}");
                let _ = writeln!(
                    sets,
                    "\tset aff-{id} {{\n\t\ttype {}\n\t\tflags dynamic,timeout\n\t\ttimeout {t}s\n\t}}",
                    addr_type(f)
                );
                let _ = writeln!(main, "\t\t{matches} {kw} saddr @aff-{id} goto ep-{id}");
            }
            let _ = writeln!(chains, "\t\tmeta l4proto {} dnat {kw} to {ep}\n\t}}", proto.as_str());
        }
        let _ = write!(main, "\t\t{matches} numgen random mod {} vmap {{ ", ids.len());
        for (i, id) in ids.iter().enumerate() {
            let sep = if i > 0 { ", " } else { "" };
            let _ = write!(main, "{sep}{i} : goto ep-{id}");
        }
        let _ = writeln!(main, " }} comment \"{}\"", comment(&k.name));
    }
    let _ = write!(out, "{sets}{chains}\tchain {KERNEL_CHAIN} {{\n{main}\t}}\n");
}

/// Remove one family's table if it is there (create-then-delete: no error when it is not).
pub fn removal_text(out: &mut String, f: Family) {
    let kw = keyword(f);
    let _ = writeln!(out, "table {kw} {TABLE} {{}}\ndelete table {kw} {TABLE}");
}

/// The elements to delete and to add to go from `old` to `new`: a changed target is deleted and
/// added again.
pub struct Changes<'a> {
    pub gone: Vec<&'a Key>,
    pub added: Vec<(&'a Key, &'a Target)>,
}

impl<'a> Changes<'a> {
    /// One merge pass over both sorted maps (no lookups): a sync of 10,000 elements that
    /// changes one costs a walk, not 20,000 searches.
    pub fn between(old: &'a NftTable, new: &'a NftTable) -> Changes<'a> {
        let (mut gone, mut added) = (Vec::new(), Vec::new());
        let (mut o, mut n) = (old.elements.iter().peekable(), new.elements.iter().peekable());
        loop {
            match (o.peek(), n.peek()) {
                (None, None) => break,
                (Some((ok, _)), None) => {
                    gone.push(*ok);
                    o.next();
                }
                (None, Some(&(nk, nt))) => {
                    added.push((nk, nt));
                    n.next();
                }
                (Some(&(ok, ot)), Some(&(nk, nt))) => match ok.cmp(nk) {
                    std::cmp::Ordering::Less => {
                        gone.push(ok);
                        o.next();
                    }
                    std::cmp::Ordering::Greater => {
                        added.push((nk, nt));
                        n.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ot != nt {
                            gone.push(ok);
                            added.push((nk, nt));
                        }
                        o.next();
                        n.next();
                    }
                },
            }
        }
        Changes { gone, added }
    }

    pub fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.added.is_empty()
    }
}

/// The element changes from `old` to `new` as `nft -f` input (deletions first). Empty when
/// nothing changed. Returns the number of elements deleted and added.
pub fn delta_text(out: &mut String, f: Family, old: &NftTable, new: &NftTable) -> usize {
    let kw = keyword(f);
    let Changes { gone, added } = Changes::between(old, new);
    let n = gone.len() + added.len();
    if !gone.is_empty() {
        let _ = write!(out, "delete element {kw} {TABLE} {MAP} {{ ");
        for (i, k) in gone.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            key_text(out, k);
        }
        out.push_str(" }\n");
    }
    if !added.is_empty() {
        let _ = writeln!(out, "add element {kw} {TABLE} {MAP} {{ {} }}", elements_text(added.into_iter()));
    }
    n
}

/// What `edgeproxy rules` prints for this layout: the whole input of a first sync.
pub fn script(rules: &NftRules) -> String {
    let mut out = String::new();
    for f in [Family::V4, Family::V6] {
        if f == Family::V4 || !rules.v6.is_empty() {
            full_text(&mut out, f, rules.family(f), rules.mark);
        }
    }
    out
}

#[cfg(test)]
mod tests;
