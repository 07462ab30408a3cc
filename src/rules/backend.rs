//! The seam between what every layout shares (the planned [`RuleSet`], the worker's scheduling,
//! the guard's rhythm, the reports) and what each backend does: [`Applier`] writes the iptables
//! layouts with `iptables-restore`, [`NftApplier`] the `nftables` layout with `nft -f`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::applier::{Applier, SyncReport};
use super::iptables::ApplyError;
use super::nftables::apply::NftApplier;
use super::RuleSet;

/// The applier of the configured layout.
pub enum Backend {
    Iptables(Box<Applier>),
    Nftables(NftApplier),
}

impl Backend {
    /// For logs: which backend and binary.
    pub fn describe(&self) -> String {
        match self {
            Backend::Iptables(a) => format!("iptables {} ({})", a.binaries().name, a.binaries().restore),
            Backend::Nftables(_) => "nftables (nft, tables ip/ip6 edgeproxy at priority dstnat - 1)".into(),
        }
    }

    /// The set is the worker's `Arc`: the nftables applier keeps it to diff the next one with.
    pub fn apply(&mut self, set: &Arc<RuleSet>) -> Result<SyncReport, ApplyError> {
        match self {
            Backend::Iptables(a) => a.apply(set),
            Backend::Nftables(n) => n.apply(set),
        }
    }

    pub fn reapply(&mut self, set: &Arc<RuleSet>) -> Result<SyncReport, ApplyError> {
        match self {
            Backend::Iptables(a) => a.reapply(set),
            Backend::Nftables(n) => n.reapply(set),
        }
    }

    pub fn guard(&mut self) -> Result<SyncReport, ApplyError> {
        match self {
            Backend::Iptables(a) => a.guard(),
            Backend::Nftables(n) => n.guard(),
        }
    }

    pub fn cleanup(&mut self) -> Result<SyncReport, ApplyError> {
        match self {
            Backend::Iptables(a) => a.cleanup(),
            Backend::Nftables(n) => n.cleanup(),
        }
    }

    pub fn adopt(&mut self) -> Result<bool, ApplyError> {
        match self {
            Backend::Iptables(a) => a.adopt(),
            Backend::Nftables(n) => n.adopt(),
        }
    }

    pub fn kube_proxy_jump_present(&self) -> Result<bool, ApplyError> {
        match self {
            Backend::Iptables(a) => a.kube_proxy_jump_present(),
            Backend::Nftables(n) => n.kube_proxy_jump_present(),
        }
    }

    /// Processes run so far (`iptables-restore` or `nft` transactions).
    pub fn restores(&self) -> u64 {
        match self {
            Backend::Iptables(a) => a.restores(),
            Backend::Nftables(n) => n.restores(),
        }
    }

    pub fn refused(&self) -> &BTreeMap<String, u64> {
        match self {
            Backend::Iptables(a) => a.refused(),
            Backend::Nftables(n) => n.refused(),
        }
    }
}
