//! The iptables binaries and the processes the rules run: which flavour (nft or legacy) to use,
//! as kube-proxy's iptables wrapper decides it; listing a table or a chain; and the one error
//! type of the rules' I/O, [`ApplyError`], each variant naming the binary (or device) involved.

use std::fmt;
use std::process::Output;

use super::listing::{has_canary, has_kube_proxy_chain, has_kube_proxy_jump, rule_count};
use super::restore::{jump_fix_from, JumpFix};
use super::{Family, Flavour, Jump, OWN_CHAINS};
use crate::exec;

/// The binaries of one iptables backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binaries {
    pub save: &'static str,
    pub restore: &'static str,
    pub save6: &'static str,
    pub restore6: &'static str,
    /// The plain `iptables` command of this backend (listing single chains).
    pub cmd: &'static str,
    pub cmd6: &'static str,
    pub name: &'static str,
}

pub const NFT: Binaries = Binaries {
    save: "iptables-nft-save",
    restore: "iptables-nft-restore",
    save6: "ip6tables-nft-save",
    restore6: "ip6tables-nft-restore",
    cmd: "iptables-nft",
    cmd6: "ip6tables-nft",
    name: "nft",
};

pub const LEGACY: Binaries = Binaries {
    save: "iptables-legacy-save",
    restore: "iptables-legacy-restore",
    save6: "ip6tables-legacy-save",
    restore6: "ip6tables-legacy-restore",
    cmd: "iptables-legacy",
    cmd6: "ip6tables-legacy",
    name: "legacy",
};

impl Binaries {
    pub fn save_bin(&self, f: Family) -> &'static str {
        if f == Family::V4 {
            self.save
        } else {
            self.save6
        }
    }
    pub fn restore_bin(&self, f: Family) -> &'static str {
        if f == Family::V4 {
            self.restore
        } else {
            self.restore6
        }
    }
    pub fn cmd_bin(&self, f: Family) -> &'static str {
        if f == Family::V4 {
            self.cmd
        } else {
            self.cmd6
        }
    }
}

/// Seconds `iptables-restore --wait` waits for the xtables lock before giving up.
pub const LOCK_WAIT_SECS: u32 = 30;

/// Everything that can go wrong here; every variant names the binary (or device) involved.
#[derive(Debug)]
pub enum ApplyError {
    /// Neither backend's binaries could be started.
    NoBinaries(String),
    /// The binary runs but cannot read the nat table (no kernel support, no permission).
    NatUnavailable { binary: String, stderr: String },
    /// A process could not be started.
    Spawn { binary: String, error: std::io::Error },
    /// `iptables-restore` refused the input; nothing of it was applied.
    Restore {
        binary: String,
        /// 1-based line of the input iptables blamed (or that we matched from its message).
        line: Option<usize>,
        /// That line and a few around it, the failing one marked with `>`.
        context: String,
        stderr: String,
    },
    /// A listing (`iptables-save`, `iptables -S`) failed.
    Read { binary: String, stderr: String },
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::NoBinaries(tried) => write!(
                f,
                "no usable iptables backend: cannot run {tried} (install iptables, or iptables-nft / iptables-legacy)"
            ),
            ApplyError::NatUnavailable { binary, stderr } => {
                write!(f, "{binary}: the nat table is not available (kernel module or permission?): {}", stderr.trim())
            }
            ApplyError::Spawn { binary, error } => write!(f, "cannot run {binary}: {error}"),
            ApplyError::Restore { binary, line, context, stderr } => {
                let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                match line {
                    Some(n) => write!(f, "{binary} failed at input line {n}: {first}\n{context}"),
                    None => write!(f, "{binary} failed: {}", stderr.trim()),
                }
            }
            ApplyError::Read { binary, stderr } => write!(f, "{binary}: cannot list the nat table: {}", stderr.trim()),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Run one binary of the rules (see [`exec::run`]); a failure to start it names it.
pub(super) fn run(binary: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, ApplyError> {
    exec::run(binary, args, stdin).map_err(|error| ApplyError::Spawn { binary: binary.to_string(), error })
}

pub(super) fn stdout_of(binary: &str, args: &[&str]) -> Result<String, ApplyError> {
    let out = run(binary, args, None)?;
    if !out.status.success() {
        return Err(ApplyError::Read { binary: binary.into(), stderr: String::from_utf8_lossy(&out.stderr).into() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn save_table(bins: &Binaries, family: Family, table: &str) -> Result<String, ApplyError> {
    stdout_of(bins.save_bin(family), &["-t", table])
}

/// `bin -t nat` when it succeeds (a quiet probe: no error when it cannot run).
pub(super) fn save_nat(bin: &str) -> Option<String> {
    exec::stdout_if_ok(bin, &["-t", "nat"])
}

/// Pick the backend as kube-proxy's iptables wrapper does: the one holding kubelet's canary
/// chains (`KUBE-IPTABLES-HINT`, `KUBE-KUBELET-CANARY`; nft's mangle table first, then legacy),
/// then the one holding kube-proxy's chains, then the one with more rules; nft by default.
/// Legacy is only read with plain `-t nat`, which never creates a table that was not there.
pub fn detect(flavour: Flavour) -> Binaries {
    match flavour {
        Flavour::Nft => NFT,
        Flavour::Legacy => LEGACY,
        Flavour::Auto => {
            let mangle = |bin: &str| exec::stdout_if_ok(bin, &["-t", "mangle"]).unwrap_or_default();
            if has_canary(&mangle(NFT.save)) || has_canary(&mangle(NFT.save6)) {
                return NFT;
            }
            let legacy_all = exec::stdout_if_ok(LEGACY.save, &[]).unwrap_or_default();
            if has_canary(&legacy_all) {
                return LEGACY;
            }
            let nft = save_nat(NFT.save).unwrap_or_default();
            let legacy = save_nat(LEGACY.save).unwrap_or_default();
            match (has_kube_proxy_chain(&nft), has_kube_proxy_chain(&legacy)) {
                (true, false) => NFT,
                (false, true) => LEGACY,
                _ if rule_count(&legacy) > rule_count(&nft) => LEGACY,
                _ => NFT,
            }
        }
    }
}

/// Does kube-proxy serve ClusterIPs here (its jump into `KUBE-SERVICES`)? `None` when the nat
/// table cannot be read.
pub fn kube_proxy_present(flavour: Flavour) -> Option<bool> {
    save_nat(detect(flavour).save).map(|s| has_kube_proxy_jump(&s))
}

/// One listed chain: `iptables -t nat -S <chain>` without the `-P`/`-N` line, as `-A` lines.
pub(super) fn list_chain(bins: &Binaries, family: Family, chain: &str) -> Result<Option<Vec<String>>, ApplyError> {
    let bin = bins.cmd_bin(family);
    let out = run(bin, &["-t", "nat", "-S", chain], None)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stderr.contains("No chain") || stderr.contains("does not exist") || stderr.contains("doesn't exist") {
            return Ok(None);
        }
        // iptables-nft 1.8.9 says a chain of ours is "incompatible" right after `-F`/`-X` of the
        // whole table removed it; ours are rewritten whole anyway, so treat it as missing.
        if stderr.contains("incompatible") && OWN_CHAINS.contains(&chain) {
            return Ok(None);
        }
        return Err(ApplyError::Read { binary: bin.into(), stderr });
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect(),
    ))
}

/// Compare the built-in chains' listings with the wanted jumps: each must be rule 1 of its
/// chain, once; any other jump into one of our chains (a duplicate, the other layout's) goes.
pub(super) fn jump_fix(bins: &Binaries, family: Family, wanted: &[Jump]) -> Result<JumpFix, ApplyError> {
    let pre = list_chain(bins, family, "PREROUTING")?.unwrap_or_default();
    let out = list_chain(bins, family, "OUTPUT")?.unwrap_or_default();
    Ok(jump_fix_from(&pre, &out, wanted))
}
