//! The only module that starts iptables processes: backend detection, atomic apply with
//! `iptables-restore --noflush --wait`, the hybrid-order guard, cleanup and `check`.

use std::process::Command;

use crate::config::Backend;

/// The binaries of one iptables backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binaries {
    pub save: &'static str,
    pub restore: &'static str,
    pub save6: &'static str,
    pub restore6: &'static str,
    pub name: &'static str,
}

pub const NFT: Binaries = Binaries {
    save: "iptables-nft-save",
    restore: "iptables-nft-restore",
    save6: "ip6tables-nft-save",
    restore6: "ip6tables-nft-restore",
    name: "nft",
};
pub const LEGACY: Binaries = Binaries {
    save: "iptables-legacy-save",
    restore: "iptables-legacy-restore",
    save6: "ip6tables-legacy-save",
    restore6: "ip6tables-legacy-restore",
    name: "legacy",
};

fn save_nat(bin: &str) -> Option<String> {
    let out = Command::new(bin).args(["-t", "nat"]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pick the backend as kube-proxy's iptables wrapper does: the one holding kubelet's or
/// kube-proxy's chains, else the one with more rules, else nft.
pub fn detect(backend: Backend) -> Binaries {
    match backend {
        Backend::Nft => NFT,
        Backend::Legacy => LEGACY,
        Backend::Auto => {
            let nft = save_nat(NFT.save).unwrap_or_default();
            let legacy = save_nat(LEGACY.save).unwrap_or_default();
            let kube = |s: &str| s.contains(":KUBE-SERVICES") || s.contains(":KUBE-KUBELET-CANARY");
            let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A")).count();
            if kube(&legacy) && !kube(&nft) || rules(&legacy) > rules(&nft) {
                LEGACY
            } else {
                NFT
            }
        }
    }
}

/// Is kube-proxy's `KUBE-SERVICES` chain in the nat table? `None` when the table cannot be read.
pub fn kube_proxy_present(backend: Backend) -> Option<bool> {
    save_nat(detect(backend).save).map(|s| {
        s.lines()
            .any(|l| l == ":KUBE-SERVICES - [0:0]" || l.starts_with(":KUBE-SERVICES "))
    })
}
