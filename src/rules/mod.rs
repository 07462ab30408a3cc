//! The nat rule set: what we want in the kernel and the code that puts it there.
//!
//! - `render` (pure): the EdgeMesh layouts, a plan's ports -> [`RuleSet`].
//! - `listing` (pure): reading `iptables-save` / `iptables -S` text.
//! - `restore` (pure): what changed since the last sync and the restore input for it.
//! - `iptables`: the flavour (nft or legacy) and its binaries, the processes, [`iptables::ApplyError`].
//! - `applier`: [`applier::Applier`], which applies, guards and removes a set (blocking).
//! - `nftables`: the `nftables` layout (pure: the map and the `nft -f` input) and its applier.
//! - `backend`: [`backend::Backend`], the applier of the configured layout, for the worker.
//! - `worker`: the thread that owns the `Backend`: coalescing, resync, guard timer, backoff.
//! - `check`: `edgeproxy check`.
//!
//! This file holds the types they share, and [`Transaction`], the one writer of restore text.

pub mod applier;
pub mod backend;
pub mod check;
pub mod iptables;
mod listing;
pub mod nftables;
pub mod render;
mod restore;
pub mod schedule;
pub mod worker;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::model::Protocol;

/// Every chain edgeproxy may own, in any layout. Cleanup removes exactly these (and the jumps to
/// them); nothing else in the nat table is ever touched.
pub const OWN_CHAINS: &[&str] = &[
    "KUBE-PORTALS-CONTAINER",
    "KUBE-PORTALS-HOST",
    "EDGE-MESH",
    "EDGE-MESH-TCP",
    "EDGE-MESH-UDP",
    NO_ENDPOINTS_CHAIN,
    KERNEL_CHAIN,
];

/// The small chain of DNATs to the reject port (service ports without endpoints), jumped to
/// first from every chain that holds DNATs.
pub const NO_ENDPOINTS_CHAIN: &str = "EDGEPROXY-NO-ENDPOINTS";

/// The chain of kernel-path service ports' DNATs straight to endpoints (`dataPath: kernel`),
/// jumped to right after [`NO_ENDPOINTS_CHAIN`] from every chain that holds DNATs, and only
/// when there is such a port.
pub const KERNEL_CHAIN: &str = "EDGEPROXY-KERNEL";

/// Which iptables binaries apply the rules: `iptables-nft` or `iptables-legacy` (kube-proxy's
/// "mode" of its iptables wrapper), or whichever the node already uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Auto,
    Nft,
    Legacy,
}

/// IP family of a table (`iptables` vs `ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

/// A jump from a built-in chain into one of ours. It must sit at position 1 of `from`, so it is
/// not part of the restore text (which only appends); `apply` inserts and guards it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jump {
    /// `PREROUTING` or `OUTPUT`.
    pub from: &'static str,
    /// Our chain it jumps to.
    pub target: &'static str,
    /// The rule's match and target arguments exactly as `iptables-save` prints them after
    /// `-A <from> `, e.g. `-m comment --comment "edgemesh root chain" -j EDGE-MESH`.
    pub spec: String,
}

/// The rules of one family's nat table that edgeproxy owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRules {
    /// Our chains, in the order they are declared.
    pub chains: Vec<&'static str>,
    /// Complete rule lines (`-A CHAIN ...`), in order.
    pub rules: Vec<String>,
    /// Jumps from built-in chains, in the order they must appear (each at position 1 of `from`).
    pub jumps: Vec<Jump>,
}

impl TableRules {
    /// The `iptables-restore --noflush` input that rewrites our chains and nothing else:
    /// each `:CHAIN - [0:0]` line creates or flushes one of our chains, then the rules follow.
    pub fn restore_text(&self) -> String {
        let mut t = Transaction::new("nat", self.rules.iter().map(|r| r.len() + 1).sum());
        self.chains.iter().for_each(|c| t.declare(c));
        self.rules.iter().for_each(|r| t.line(r));
        t.commit()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }
}

impl Family {
    /// `IPv4` or `IPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Both families: iptables chains (the `portals` and `root-chain` layouts), or the tables of
/// the `nftables` layout (`nft`; then `v4` and `v6` are empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub v4: TableRules,
    pub v6: TableRules,
    pub nft: Option<NftRules>,
}

impl RuleSet {
    pub fn family(&self, family: Family) -> &TableRules {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// The `nftables` layout's map key: a service port on one of its cluster IPs.
pub type NftKey = (IpAddr, Protocol, u16);

/// Where an [`NftKey`] is sent, and the service port's name (the element's comment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftTarget {
    pub addr: IpAddr,
    pub port: u16,
    pub name: String,
}

/// A kernel-path service port with endpoints, in the `nftables` layout: DNATed in the kernel
/// straight to one of `endpoints` (at random; the client's last one within `affinity` seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftKernel {
    pub key: NftKey,
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    pub affinity: Option<u32>,
}

/// One family's table of the `nftables` layout (`rules::nftables`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftTable {
    pub elements: BTreeMap<NftKey, NftTarget>,
    /// Kernel-path ports, in plan order (not in `elements`, unless without endpoints).
    pub kernel: Vec<NftKernel>,
}

impl NftTable {
    pub const EMPTY: NftTable = NftTable { elements: BTreeMap::new(), kernel: Vec::new() };

    /// Nothing to put in the table.
    pub fn is_empty(&self) -> bool {
        self.elements.is_empty() && self.kernel.is_empty()
    }
}

/// Both families' tables, and the mark of the proxy's own upstream packets (0: no such rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftRules {
    pub v4: NftTable,
    pub v6: NftTable,
    pub mark: u32,
}

impl NftRules {
    /// No element, no mark.
    pub const EMPTY: NftRules = NftRules { v4: NftTable::EMPTY, v6: NftTable::EMPTY, mark: 0 };

    /// Map elements and kernel-path ports, both families.
    pub fn entries(&self) -> usize {
        [&self.v4, &self.v6].iter().map(|t| t.elements.len() + t.kernel.len()).sum()
    }

    pub fn family(&self, f: Family) -> &NftTable {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// One `iptables-restore` transaction being written: `*table`, chain declarations (each
/// `:CHAIN - [0:0]` creates the chain or, under `--noflush`, flushes it), lines, `COMMIT`.
/// Every restore input of the crate is written through it.
pub struct Transaction {
    text: String,
}

impl Transaction {
    /// `size`: a hint of the bytes of lines to come.
    pub fn new(table: &str, size: usize) -> Transaction {
        let mut text = String::with_capacity(64 + size);
        text.push('*');
        text.push_str(table);
        text.push('\n');
        Transaction { text }
    }

    pub fn declare(&mut self, chain: &str) {
        self.text.push(':');
        self.text.push_str(chain);
        self.text.push_str(" - [0:0]\n");
    }

    /// A rule or command line as `iptables-restore` reads it (`-A …`, `-D …`, `-I …`, `-X …`).
    pub fn line(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }

    /// `-X CHAIN`: delete a (flushed, unreferenced) chain.
    pub fn delete_chain(&mut self, chain: &str) {
        self.text.push_str("-X ");
        self.line(chain);
    }

    pub fn commit(mut self) -> String {
        self.text.push_str("COMMIT\n");
        self.text
    }
}
