//! The nat rule set: what we want in the kernel (`render`, pure) and the code that puts it there
//! (`apply`, the only module that starts iptables processes).

pub mod applier;
pub mod apply;
pub mod render;

use std::fmt::Write as _;

/// Every chain edgeproxy may own, in any layout. Cleanup removes exactly these (and the jumps to
/// them); nothing else in the nat table is ever touched.
pub const OWN_CHAINS: &[&str] = &[
    "KUBE-PORTALS-CONTAINER",
    "KUBE-PORTALS-HOST",
    "EDGE-MESH",
    "EDGE-MESH-TCP",
    "EDGE-MESH-UDP",
    render::NO_ENDPOINTS_CHAIN,
];

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
        let mut out = String::with_capacity(64 + self.rules.iter().map(|r| r.len() + 1).sum::<usize>());
        out.push_str("*nat\n");
        for chain in &self.chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            out.push_str(rule);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        out
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }
}

/// Both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub v4: TableRules,
    pub v6: TableRules,
}

impl RuleSet {
    pub fn family(&self, family: Family) -> &TableRules {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}
