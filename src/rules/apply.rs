//! The only module that starts `iptables*` and `ip` processes: backend detection, atomic apply
//! with `iptables-restore --noflush --wait`, the hybrid-order guard, start-up and exit cleanup,
//! EdgeMesh leftover removal, `check`, and the proxy address on the listen device.
//!
//! What it owns: the chains in [`OWN_CHAINS`] and the jumps into them from `PREROUTING` and
//! `OUTPUT` (nat), plus the proxy address when it added it. It never flushes a table, never
//! touches a chain it does not own (the `--edgemesh` cleanup excepted, which removes only
//! EdgeMesh's chain names), and never decides *what* the rules are (that is `render`).
//!
//! Every change is one `iptables-restore --noflush` transaction per family. It remembers the
//! content of each chain it last put in the kernel; a sync declares (`:CHAIN - [0:0]` creates or
//! flushes) and refills only the chains whose content changed, and reads nothing. A full
//! rewrite (every chain, with the jumps read and fixed in the same input: `-D` of misplaced
//! copies by spec, then `-I <from> 1`) happens on the first sync, after a failure, on a guard
//! repair and on the periodic resync. A failed restore leaves the kernel as it was (the input is
//! one transaction); the error names the failing input line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::ops::Range;
use std::process::{Command, Output, Stdio};

use super::Flavour;
use super::{Family, Jump, RuleSet, TableRules, OWN_CHAINS};

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
    /// `ip addr` failed.
    Address { message: String },
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
            ApplyError::Address { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for ApplyError {}

fn run(binary: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, ApplyError> {
    let spawn_err = |error| ApplyError::Spawn { binary: binary.to_string(), error };
    let mut cmd = Command::new(binary);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A write error (the process died early) shows up in its exit status and stderr.
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait_with_output().map_err(spawn_err)
}

fn stdout_of(binary: &str, args: &[&str]) -> Result<String, ApplyError> {
    let out = run(binary, args, None)?;
    if !out.status.success() {
        return Err(ApplyError::Read { binary: binary.into(), stderr: String::from_utf8_lossy(&out.stderr).into() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn save_table(bins: &Binaries, family: Family, table: &str) -> Result<String, ApplyError> {
    stdout_of(bins.save_bin(family), &["-t", table])
}

fn save_nat(bin: &str) -> Option<String> {
    let out = Command::new(bin).args(["-t", "nat"]).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn has_canary(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY "))
}

fn has_kube_proxy_chain(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":KUBE-SERVICES ") || l.starts_with(":KUBE-PROXY-CANARY "))
}

/// kube-proxy serves ClusterIPs on this node: its `KUBE-SERVICES` chain is jumped to from
/// PREROUTING or OUTPUT (a chain left behind without its jumps serves nothing). The one
/// definition used by the agent, `rules --kube-proxy auto` and `check`.
fn has_kube_proxy_jump(save: &str) -> bool {
    save.lines().any(|l| {
        (l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT ")) && jump_target(l) == Some("KUBE-SERVICES")
    })
}

fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
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
            let mangle = |bin: &str| {
                Command::new(bin)
                    .args(["-t", "mangle"])
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            if has_canary(&mangle(NFT.save)) || has_canary(&mangle(NFT.save6)) {
                return NFT;
            }
            let legacy_all = Command::new(LEGACY.save)
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
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
fn list_chain(bins: &Binaries, family: Family, chain: &str) -> Result<Option<Vec<String>>, ApplyError> {
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

/// What the restore input must do to the jumps of one family.
#[derive(Debug, Default)]
struct JumpFix {
    /// `-D`/`-I` lines, in order.
    lines: Vec<String>,
    /// Human-readable findings, for the log.
    found: Vec<String>,
    /// kube-proxy's jump into KUBE-SERVICES is in PREROUTING or OUTPUT.
    kube_proxy: bool,
}

/// The target of a `-A CHAIN ... -j TARGET` (or `-g TARGET`) line.
fn jump_target(line: &str) -> Option<&str> {
    let idx = line.rfind(" -j ").or_else(|| line.rfind(" -g "))?;
    line[idx + 4..].split_whitespace().next()
}

/// Compare the built-in chains' listings with the wanted jumps: each must be rule 1 of its
/// chain, once; any other jump into one of our chains (a duplicate, the other layout's) goes.
fn jump_fix(bins: &Binaries, family: Family, wanted: &[Jump]) -> Result<JumpFix, ApplyError> {
    let pre = list_chain(bins, family, "PREROUTING")?.unwrap_or_default();
    let out = list_chain(bins, family, "OUTPUT")?.unwrap_or_default();
    Ok(jump_fix_from(&pre, &out, wanted))
}

/// [`jump_fix`] on listings already read (`-A` lines of PREROUTING and OUTPUT).
fn jump_fix_from(pre: &[String], out: &[String], wanted: &[Jump]) -> JumpFix {
    let mut fix = JumpFix::default();
    let mut deletes = Vec::new();
    let mut inserts = Vec::new();
    for (from, listed) in [("PREROUTING", pre), ("OUTPUT", out)] {
        fix.kube_proxy |= listed.iter().any(|l| jump_target(l) == Some("KUBE-SERVICES"));
        let want = wanted.iter().find(|j| j.from == from);
        let want_line = want.map(|j| format!("-A {from} {}", j.spec));
        let first_ok = want_line.as_ref().is_some_and(|w| listed.first() == Some(w));
        for (i, line) in listed.iter().enumerate() {
            let ours = jump_target(line).is_some_and(|t| OWN_CHAINS.contains(&t));
            if !ours {
                continue;
            }
            let keep = i == 0 && first_ok;
            if !keep {
                let spec = &line[3 + from.len() + 1..];
                deletes.push(format!("-D {from} {spec}"));
                // Our own jump found lower down is moved back, not removed: said below.
                if want_line.as_deref() != Some(line.as_str()) {
                    fix.found.push(format!("{from}: removed `{line}` (rule {})", i + 1));
                }
            }
        }
        if let (Some(j), Some(w)) = (want, &want_line) {
            if !first_ok {
                match listed.iter().position(|l| l == w) {
                    None => {
                        fix.found.push(format!("{from}: jump to {} was missing; inserted as rule 1", j.target));
                    }
                    Some(pos) => fix.found.push(format!(
                        "{from}: `{}` was ahead of our jump to {}; moved it back from rule {} to rule 1",
                        listed.first().map(String::as_str).unwrap_or("?"),
                        j.target,
                        pos + 1
                    )),
                }
                inserts.push(format!("-I {from} 1 {}", j.spec));
            }
        }
    }
    fix.lines = deletes;
    fix.lines.extend(inserts);
    fix
}

/// What one `apply` or `guard` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Number of `iptables-restore` processes run.
    pub restores: u32,
    /// Per family, rules now in our chains (after a restore) or unchanged.
    pub rules: usize,
    /// Repairs made (jumps moved back, chains recreated), for the log.
    pub repaired: Vec<String>,
    /// kube-proxy's jump seen in PREROUTING/OUTPUT (IPv4), as last read (a minimal sync reads
    /// nothing and reports the last guard's or full sync's finding).
    pub kube_proxy: bool,
    /// The chains the restores rewrote (flushed and refilled), both families.
    pub chains: Vec<&'static str>,
    /// Listing processes run (`iptables -S`, `iptables-save`), both families.
    pub reads: u32,
    /// Some restore rewrote every chain of its family and fixed the jumps (start, after a
    /// failure, a guard repair, the periodic resync).
    pub full: bool,
}

/// Chains with at most this many rules are listed and compared in full by the guard on the nft
/// backend (a listing costs about 30 us per rule of the chain there); see [`Applier::guard`].
pub const CONTENT_CHECK_MAX_RULES: usize = 256;

/// Puts a [`RuleSet`] into the kernel and keeps it there. Blocking; use from one thread.
pub struct Applier {
    bins: Binaries,
    /// Per family, the set the kernel holds since our last successful restore.
    last: [Option<TableRules>; 2],
    /// Per family: the next sync rewrites everything (a restore or read failed since).
    full_next: [bool; 2],
    /// kube-proxy's jump, as last read.
    kube_proxy: bool,
    /// The kernel's change marker when the guard last found everything in place (`None` after
    /// any restore of ours, or when it cannot be read).
    canary: [Option<Canary>; 2],
    restores: u64,
    /// `--wait` seconds for the xtables lock (default [`LOCK_WAIT_SECS`]).
    pub wait_secs: u32,
    /// nft backend: the guard compares the content of chains up to this many rules every guard
    /// period (default [`CONTENT_CHECK_MAX_RULES`]); bigger ones are put right by the resync.
    pub content_check_max_rules: usize,
}

fn idx(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Applier {
    /// Pick the backend (see [`detect`]) and check that its nat table can be read.
    pub fn new(flavour: Flavour) -> Result<Applier, ApplyError> {
        let bins = detect(flavour);
        Applier::with_binaries(bins)
    }

    /// Use these binaries; fails clearly when they are missing or the nat table is unavailable.
    pub fn with_binaries(bins: Binaries) -> Result<Applier, ApplyError> {
        match run(bins.save, &["-t", "nat"], None) {
            Err(ApplyError::Spawn { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                let other = if bins.name == NFT.name { LEGACY } else { NFT };
                let other_exists = Command::new(other.save).arg("--version").output().is_ok();
                return Err(ApplyError::NoBinaries(if other_exists {
                    format!("{} (the {} backend was asked for; {} exists)", bins.save, bins.name, other.save)
                } else {
                    format!("{} or {}", NFT.save, LEGACY.save)
                }));
            }
            Err(e) => return Err(e),
            Ok(out) if !out.status.success() => {
                return Err(ApplyError::NatUnavailable {
                    binary: bins.save.into(),
                    stderr: String::from_utf8_lossy(&out.stderr).into(),
                })
            }
            Ok(_) => {}
        }
        Ok(Applier {
            bins,
            last: [None, None],
            full_next: [false, false],
            kube_proxy: false,
            canary: [None, None],
            restores: 0,
            wait_secs: LOCK_WAIT_SECS,
            content_check_max_rules: CONTENT_CHECK_MAX_RULES,
        })
    }

    pub fn binaries(&self) -> Binaries {
        self.bins
    }

    /// `iptables-restore` processes run so far (apply, guard repairs, cleanup).
    pub fn restores(&self) -> u64 {
        self.restores
    }

    /// Is any family installed (applied and not cleaned up)?
    pub fn installed(&self) -> bool {
        self.last.iter().any(Option::is_some)
    }

    fn restore(&mut self, family: Family, text: &str) -> Result<(), ApplyError> {
        self.canary[idx(family)] = None;
        let bin = self.bins.restore_bin(family);
        let wait = format!("--wait={}", self.wait_secs);
        self.restores += 1;
        let out = run(bin, &["--noflush", &wait], Some(text))?;
        if out.status.success() {
            log::debug!("{bin}: applied {} input lines", text.lines().count());
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let (line, context) = blame(text, &stderr);
        let err = ApplyError::Restore { binary: bin.into(), line, context, stderr };
        log::error!("{err}");
        Err(err)
    }

    /// Make the kernel hold `set`: one restore per family that changed (none when nothing did).
    ///
    /// A minimal sync (the usual case) writes only the chains whose content changed since the
    /// last successful restore (`:CHAIN - [0:0]` flushes just that chain under `--noflush`, as
    /// kube-proxy's MinimizeIPTablesRestore does) and reads nothing from the kernel: the guard
    /// watches the jumps. A full rewrite (every chain, plus the jumps read and put back at
    /// position 1 in the same transaction) happens on the first sync, after any failure, and in
    /// [`Applier::reapply`]. IPv6 is only touched when it has rules or had them.
    pub fn apply(&mut self, set: &RuleSet) -> Result<SyncReport, ApplyError> {
        let mut report = SyncReport::default();
        for family in [Family::V4, Family::V6] {
            self.sync_family(family, set.family(family), false, &mut report)?;
        }
        report.kube_proxy = self.kube_proxy;
        Ok(report)
    }

    /// Like [`Applier::apply`] but a full rewrite of every family even when nothing changed
    /// (the periodic resync, which also repairs edits to the insides of our chains).
    pub fn reapply(&mut self, set: &RuleSet) -> Result<SyncReport, ApplyError> {
        let mut report = SyncReport::default();
        for family in [Family::V4, Family::V6] {
            self.sync_family(family, set.family(family), true, &mut report)?;
        }
        report.kube_proxy = self.kube_proxy;
        Ok(report)
    }

    fn sync_family(
        &mut self,
        family: Family,
        want: &TableRules,
        force: bool,
        report: &mut SyncReport,
    ) -> Result<(), ApplyError> {
        let i = idx(family);
        if want.is_empty() {
            if self.last[i].is_some() {
                self.remove_family(family).inspect_err(|_| self.full_next[i] = true)?;
                report.restores += 1;
                self.last[i] = None;
            }
            self.full_next[i] = false;
            return Ok(());
        }
        let minimal = !force && !self.full_next[i];
        if let Some(last) = self.last[i].as_ref().filter(|l| minimal && l.jumps == want.jumps) {
            let (changed, stale) = changed_chains(last, want);
            report.rules += want.rules.len();
            if changed.is_empty() && stale.is_empty() {
                return Ok(());
            }
            let input = restore_input(want, &changed, &[], &stale);
            self.restore(family, &input).inspect_err(|_| self.full_next[i] = true)?;
            report.restores += 1;
            let last = self.last[i].take().expect("checked above");
            self.last[i] = Some(carry_over(last, want, &changed));
            report.chains.extend(changed);
            return Ok(());
        }
        self.full_sync(family, want, report).inspect_err(|_| self.full_next[i] = true)
    }

    /// Rewrite every chain of `want`, fix the jumps, delete chains `want` no longer has.
    fn full_sync(&mut self, family: Family, want: &TableRules, report: &mut SyncReport) -> Result<(), ApplyError> {
        let i = idx(family);
        let fix = jump_fix(&self.bins, family, &want.jumps)?;
        report.reads += 2;
        if family == Family::V4 {
            self.kube_proxy = fix.kube_proxy;
        }
        let stale: Vec<&'static str> = match &self.last[i] {
            Some(last) => last.chains.iter().copied().filter(|c| !want.chains.contains(c)).collect(),
            None => Vec::new(),
        };
        self.restore(family, &restore_input(want, &want.chains, &fix.lines, &stale))?;
        if self.last[i].is_some() {
            // Logged once, by whoever reads the report (the agent: "rules repaired: ...").
            for f in &fix.found {
                log::debug!("rules guard ({}): {f}", family_name(family));
            }
            report.repaired.extend(fix.found.iter().cloned());
        }
        report.restores += 1;
        report.rules += want.rules.len();
        report.chains.extend(want.chains.iter().copied());
        report.full = true;
        self.last[i] = Some(want.clone());
        self.full_next[i] = false;
        Ok(())
    }

    /// The hybrid-order guard, run every guard period: our jumps first in PREROUTING and OUTPUT,
    /// once, and our chains present with the content we put there, as far as that is cheap.
    ///
    /// First a canary, read in microseconds without starting a process: on nft the ruleset
    /// generation (`NFT_MSG_GETGEN`, bumped by every nftables transaction in the namespace), on
    /// legacy the kernel's summary of the nat table (`IPT_SO_GET_INFO`: entry count, size,
    /// built-in chain offsets). Unchanged since the last check that found everything in place:
    /// nothing else is read. Otherwise:
    ///
    /// - legacy: one `iptables-legacy-save -t nat`. Any legacy listing copies the whole table
    ///   out of the kernel, so this costs about what `-S PREROUTING` alone does, and it holds
    ///   every chain: all of them are compared in full. (An edit that keeps every size and
    ///   offset, say a rule replaced by one of the same length, waits for the resync.)
    /// - nft: `-S PREROUTING` and `-S OUTPUT` (cheap: nft fetches only the listed chain), and
    ///   every chain of ours with at most [`Applier::content_check_max_rules`] rules listed and
    ///   compared in full (always `EDGEPROXY-NO-ENDPOINTS`, which changes most, while it is
    ///   small). Listing even one rule of a 10,000-rule chain costs ~0.3 s on nft, so the big
    ///   chains are left to the periodic resync ([`Applier::reapply`]). A big chain cannot be
    ///   deleted while our jumps lead to it, so only a flush or an edit of one goes unseen
    ///   until then.
    ///
    /// Anything out of place is put right by a full rewrite of that family (one restore); no
    /// restore runs when everything is in place.
    pub fn guard(&mut self) -> Result<SyncReport, ApplyError> {
        let mut report = SyncReport::default();
        for family in [Family::V4, Family::V6] {
            let i = idx(family);
            let Some(want) = self.last[i].take() else {
                continue;
            };
            let result = self.guard_family(family, &want, &mut report);
            self.last[i] = Some(want);
            result.inspect_err(|_| self.full_next[i] = true)?;
        }
        report.kube_proxy = self.kube_proxy;
        Ok(report)
    }

    fn guard_family(&mut self, family: Family, want: &TableRules, report: &mut SyncReport) -> Result<(), ApplyError> {
        let mut found = Vec::new();
        let legacy = self.bins.name == LEGACY.name;
        let canary =
            if legacy { xt_info(family, "nat").map(Canary::Legacy) } else { nft_generation().map(Canary::Nft) };
        if canary.is_some() && canary == self.canary[idx(family)] {
            report.rules += want.rules.len();
            return Ok(());
        }
        let fix = if legacy {
            let save = save_table(&self.bins, family, "nat")?;
            report.reads += 1;
            let listing = Listing::parse(&save);
            for chain in &want.chains {
                compare_chain(chain, listing.chain(chain), want, &mut found);
            }
            jump_fix_from(
                listing.chain("PREROUTING").unwrap_or(&[]),
                listing.chain("OUTPUT").unwrap_or(&[]),
                &want.jumps,
            )
        } else {
            let fix = jump_fix(&self.bins, family, &want.jumps)?;
            report.reads += 2;
            for chain in &want.chains {
                if rules_of(want, chain).count() <= self.content_check_max_rules {
                    let listed = list_chain(&self.bins, family, chain)?;
                    report.reads += 1;
                    compare_chain(chain, listed.as_deref(), want, &mut found);
                }
            }
            fix
        };
        if family == Family::V4 {
            self.kube_proxy = fix.kube_proxy;
        }
        if fix.lines.is_empty() && found.is_empty() {
            // Read before the listing: a change after it shows up as a different summary.
            self.canary[idx(family)] = canary;
            report.rules += want.rules.len();
            return Ok(());
        }
        found.extend(fix.found);
        self.restore(family, &restore_input(want, &want.chains, &fix.lines, &[]))?;
        for f in &found {
            log::debug!("rules guard ({}): {f}; repaired", family_name(family));
        }
        report.restores += 1;
        report.rules += want.rules.len();
        report.chains.extend(want.chains.iter().copied());
        report.full = true;
        report.repaired.extend(found);
        Ok(())
    }

    /// Is kube-proxy's jump into `KUBE-SERVICES` in PREROUTING or OUTPUT (IPv4)?
    pub fn kube_proxy_jump_present(&self) -> Result<bool, ApplyError> {
        for from in ["PREROUTING", "OUTPUT"] {
            let listed = list_chain(&self.bins, Family::V4, from)?.unwrap_or_default();
            if listed.iter().any(|l| jump_target(l) == Some("KUBE-SERVICES")) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Remove every chain in [`OWN_CHAINS`] and every jump into them, both families, in one
    /// restore per family that has any. Used at start (leftovers of a killed run, or of the
    /// other layout) and at exit.
    pub fn cleanup(&mut self) -> Result<SyncReport, ApplyError> {
        let mut report = SyncReport::default();
        for family in [Family::V4, Family::V6] {
            self.last[idx(family)] = None;
            self.full_next[idx(family)] = false;
            if self.remove_family(family)? {
                report.restores += 1;
            }
        }
        Ok(report)
    }

    /// [`Applier::cleanup`] before the first install; logs what it found.
    pub fn startup_cleanup(&mut self) -> Result<SyncReport, ApplyError> {
        let r = self.cleanup()?;
        if r.restores > 0 {
            log::info!("removed rules left by a previous run ({} restore(s))", r.restores);
        }
        Ok(r)
    }

    /// Returns whether anything was there to remove.
    fn remove_family(&mut self, family: Family) -> Result<bool, ApplyError> {
        let save = match save_table(&self.bins, family, "nat") {
            Ok(s) => s,
            // IPv6 may be unavailable entirely; then there is nothing of ours in it.
            Err(_) if family == Family::V6 => return Ok(false),
            Err(e) => return Err(e),
        };
        let input = removal_input(&save, |c| OWN_CHAINS.contains(&c));
        match input {
            None => Ok(false),
            Some(text) => {
                self.restore(family, &text)?;
                Ok(true)
            }
        }
    }

    /// `edgeproxy cleanup --edgemesh`: our own rules plus EdgeMesh's chains in nat
    /// (`EDGE-MESH*`, `EDGEMESH-PORTALS-*`, `EDGEMESH-NODEPORT-*`, `KUBE-PORTALS-*`,
    /// `KUBE-NODEPORT-*`) and filter (`KUBE-NODEPORT-NON-LOCAL`, `EDGEMESH-NODEPORT-NON-LOCAL`),
    /// with every jump into them.
    ///
    /// `KUBE-PORTALS-*`/`KUBE-NODEPORT-*` are also the chains of kube-proxy's old userspace mode.
    /// They are EdgeMesh's (or ours) when every DNAT in them goes to `proxy_ips` (EdgeMesh's
    /// 169.254.96.16 bridge address, which is also our default); kube-proxy's userspace mode
    /// binds 0.0.0.0 and so writes `REDIRECT` rules or DNATs to the node's own address. When any
    /// rule in them is of that kind they are kept (with `KUBE-NODEPORT-NON-LOCAL` in filter) and
    /// the returned notes say so.
    pub fn cleanup_edgemesh(&mut self, proxy_ips: &[IpAddr]) -> Result<Vec<String>, ApplyError> {
        let mut notes = Vec::new();
        for family in [Family::V4, Family::V6] {
            self.last[idx(family)] = None;
            let nat = match save_table(&self.bins, family, "nat") {
                Ok(s) => s,
                Err(_) if family == Family::V6 => continue,
                Err(e) => return Err(e),
            };
            let kube_userspace = userspace_owned(&nat, proxy_ips);
            if kube_userspace {
                notes.push(format!(
                    "{}: KUBE-PORTALS-*/KUBE-NODEPORT-* hold rules that do not point at {proxy_ips:?}: \
                     kept (kube-proxy's userspace mode owns them)",
                    family_name(family)
                ));
            }
            let pick_nat = |c: &str| {
                let kube_named = c.starts_with("KUBE-PORTALS-") || c.starts_with("KUBE-NODEPORT-");
                if kube_named {
                    return !kube_userspace;
                }
                OWN_CHAINS.contains(&c)
                    || c.starts_with("EDGE-MESH")
                    || c.starts_with("EDGEMESH-PORTALS-")
                    || c.starts_with("EDGEMESH-NODEPORT-")
            };
            if let Some(text) = removal_input(&nat, pick_nat) {
                self.restore(family, &text)?;
                notes.push(format!(
                    "{}: removed from nat: {}",
                    family_name(family),
                    chains_in(&nat, pick_nat).join(", ")
                ));
            }
            let Ok(filter) = save_table(&self.bins, family, "filter") else {
                continue;
            };
            let pick_filter =
                |c: &str| c == "EDGEMESH-NODEPORT-NON-LOCAL" || (!kube_userspace && c == "KUBE-NODEPORT-NON-LOCAL");
            if let Some(text) = removal_input(&filter, pick_filter) {
                self.restore(family, &text.replacen("*nat", "*filter", 1))?;
                notes.push(format!(
                    "{}: removed from filter: {}",
                    family_name(family),
                    chains_in(&filter, pick_filter).join(", ")
                ));
            }
        }
        Ok(notes)
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// What the guard reads first to learn whether anything changed since its last check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Canary {
    Legacy(XtInfo),
    /// The nftables ruleset generation of this network namespace.
    Nft(u32),
}

/// The nftables ruleset generation (`NFT_MSG_GETGEN` over netfilter netlink, as `nft` and
/// iptables-nft read it). Every committed transaction in the namespace bumps it, ours and
/// anybody else's; listings do not. `None` when it cannot be read.
fn nft_generation() -> Option<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_GEN_ID: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    // SAFETY: plain socket(2); the descriptor is owned (and closed) by `fd` below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // nlmsghdr (16 bytes) + nfgenmsg (4 bytes: family AF_UNSPEC, version 0, res_id 0).
    let mut req = [0u8; 20];
    req[0..4].copy_from_slice(&20u32.to_ne_bytes());
    req[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: `req` is valid for reads of its length; the kernel is the default destination.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent != req.len() as isize {
        return None;
    }
    let mut buf = [0u8; 512];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let msg = buf.get(..usize::try_from(n).ok()?)?;
    let u16_at = |b: &[u8], i: usize| Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?));
    let len = u32::from_ne_bytes(msg.get(0..4)?.try_into().ok()?) as usize;
    let kind = u16_at(msg, 4)?;
    if kind == NLMSG_ERROR || kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return None;
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
    None
}

/// The x_tables (iptables-legacy) kernel's summary of one table, `struct ipt_getinfo` (the same
/// layout as `ip6t_getinfo`). Every rule or chain added, removed or moved changes the entry
/// count, the size or a built-in chain's offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct XtInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// `getsockopt(IPT_SO_GET_INFO)` (or IPv6's) on a raw socket, as libiptc does first; no copy of
/// the rules. `None` when it cannot be read (no module, no permission): callers then list.
fn xt_info(family: Family, table: &str) -> Option<XtInfo> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    /// `IPT_SO_GET_INFO` and `IP6T_SO_GET_INFO` (`IPT_BASE_CTL`, linux/netfilter_ipv4/ip_tables.h).
    const SO_GET_INFO: libc::c_int = 64;
    let (domain, level) = match family {
        Family::V4 => (libc::AF_INET, libc::SOL_IP),
        Family::V6 => (libc::AF_INET6, libc::SOL_IPV6),
    };
    let mut info =
        XtInfo { name: [0; 32], valid_hooks: 0, hook_entry: [0; 5], underflow: [0; 5], num_entries: 0, size: 0 };
    let name = table.as_bytes();
    if name.len() >= info.name.len() {
        return None;
    }
    info.name[..name.len()].copy_from_slice(name);
    // SAFETY: plain socket(2); the descriptor is owned (and closed) by `fd` below.
    let raw = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut len = std::mem::size_of::<XtInfo>() as libc::socklen_t;
    // SAFETY: `info` is a repr(C) `ipt_getinfo` of `len` bytes, valid for writes.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, SO_GET_INFO, (&mut info as *mut XtInfo).cast(), &mut len) };
    (rc == 0 && len as usize == std::mem::size_of::<XtInfo>()).then_some(info)
}

/// The chain a `-A CHAIN ...` line appends to.
fn chain_of(rule: &str) -> Option<&str> {
    let rest = rule.strip_prefix("-A ")?;
    // A byte search: this runs for every rule on every sync.
    let name = rest.split(' ').next()?;
    (!name.is_empty()).then_some(name)
}

/// The rules of `t` that go into `chain`, in order.
fn rules_of<'a>(t: &'a TableRules, chain: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    t.rules.iter().filter(move |r| chain_of(r) == Some(chain))
}

/// The chains of `want` whose content differs from `last` or that `last` did not have, and the
/// chains of `last` that `want` no longer has.
fn changed_chains(last: &TableRules, want: &TableRules) -> (Vec<&'static str>, Vec<&'static str>) {
    let stale = last.chains.iter().copied().filter(|c| !want.chains.contains(c)).collect();
    // The usual case (rendered sets): compare slices, no allocation per rule.
    if let (Some(old), Some(new)) = (chain_ranges(last), chain_ranges(want)) {
        let changed = new
            .iter()
            .filter(|(c, r)| match old.iter().find(|(o, _)| o == c) {
                Some((_, or)) => last.rules[or.clone()] != want.rules[r.clone()],
                None => true,
            })
            .map(|(c, _)| *c)
            .collect();
        return (changed, stale);
    }
    fn group(t: &TableRules) -> BTreeMap<&str, Vec<&str>> {
        let mut m: BTreeMap<&str, Vec<&str>> = t.chains.iter().map(|c| (*c, Vec::new())).collect();
        for r in &t.rules {
            if let Some(c) = chain_of(r) {
                m.entry(c).or_default().push(r);
            }
        }
        m
    }
    let (old, new) = (group(last), group(want));
    let changed = want.chains.iter().copied().filter(|c| old.get(c) != new.get(c)).collect();
    (changed, stale)
}

/// Where each chain's rules sit in `t.rules` (empty range: no rules), when every chain's rules
/// are contiguous, as `render` makes them; `None` otherwise.
fn chain_ranges(t: &TableRules) -> Option<Vec<(&'static str, Range<usize>)>> {
    let mut out: Vec<(&'static str, Range<usize>)> = t.chains.iter().map(|c| (*c, 0..0)).collect();
    let mut i = 0;
    while i < t.rules.len() {
        let chain = chain_of(&t.rules[i])?;
        let start = i;
        while i < t.rules.len() && chain_of(&t.rules[i]) == Some(chain) {
            i += 1;
        }
        let slot = out.iter_mut().find(|(c, _)| *c == chain)?;
        if !slot.1.is_empty() {
            return None; // a second run of the same chain
        }
        slot.1 = start..i;
    }
    Some(out)
}

/// `want` as an owned set, reusing `last`'s strings for the chains not in `changed` (they are
/// equal): after an endpoint flip only the small chain is copied.
fn carry_over(mut last: TableRules, want: &TableRules, changed: &[&'static str]) -> TableRules {
    let (Some(old), Some(new)) = (chain_ranges(&last), chain_ranges(want)) else {
        return want.clone();
    };
    let mut rules = Vec::with_capacity(want.rules.len());
    for (chain, range) in new {
        match old.iter().find(|(c, _)| *c == chain).filter(|_| !changed.contains(&chain)) {
            Some((_, or)) => rules.extend(last.rules[or.clone()].iter_mut().map(std::mem::take)),
            None => rules.extend_from_slice(&want.rules[range]),
        }
    }
    TableRules { chains: want.chains.clone(), rules, jumps: want.jumps.clone() }
}

/// One restore transaction: `chains` declared (created, or flushed) and refilled with their
/// rules from `want`, `stale` chains flushed, the jump fixes, then the `stale` chains deleted.
/// With `chains` = all of `want.chains` this is the full rewrite.
fn restore_input(want: &TableRules, chains: &[&'static str], jump_lines: &[String], stale: &[&str]) -> String {
    let written = |r: &&String| chain_of(r).is_some_and(|c| chains.contains(&c));
    let mut s = String::with_capacity(64 + want.rules.iter().filter(written).map(|r| r.len() + 1).sum::<usize>());
    s.push_str("*nat\n");
    // Declared in the set's order, whatever the order of `chains`.
    for c in want.chains.iter().filter(|c| chains.contains(c)).chain(stale) {
        s.push(':');
        s.push_str(c);
        s.push_str(" - [0:0]\n");
    }
    for r in want.rules.iter().filter(written) {
        s.push_str(r);
        s.push('\n');
    }
    for l in jump_lines {
        s.push_str(l);
        s.push('\n');
    }
    for c in stale {
        s.push_str("-X ");
        s.push_str(c);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// One table as `iptables-save` printed it: declared chains and their `-A` lines.
struct Listing<'a> {
    chains: BTreeMap<&'a str, Vec<String>>,
}

impl<'a> Listing<'a> {
    fn parse(save: &'a str) -> Listing<'a> {
        let mut chains: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for line in save.lines() {
            if let Some(name) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next()) {
                chains.entry(name).or_default();
            } else if let Some(name) = chain_of(line) {
                chains.entry(name).or_default().push(line.to_string());
            }
        }
        Listing { chains }
    }

    /// The chain's rules; `None` when the chain does not exist.
    fn chain(&self, name: &str) -> Option<&[String]> {
        self.chains.get(name).map(Vec::as_slice)
    }
}

/// Compare one chain's listing (`None`: it does not exist) with what `want` puts in it.
fn compare_chain(chain: &str, listed: Option<&[String]>, want: &TableRules, found: &mut Vec<String>) {
    match listed {
        None => found.push(format!("chain {chain} was deleted")),
        Some(got) if !got.iter().eq(rules_of(want, chain)) => found.push(format!(
            "chain {chain} was flushed or edited ({} rules, {} expected)",
            got.len(),
            rules_of(want, chain).count()
        )),
        Some(_) => {}
    }
}

/// The user chains of an `iptables-save` table text that `pick` selects.
fn chains_in(save: &str, pick: impl Fn(&str) -> bool) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| pick(c))
        .map(str::to_string)
        .collect()
}

/// A restore input that deletes every rule jumping into a picked chain from a chain not picked,
/// flushes the picked chains and deletes them. `None` when none of them is present.
fn removal_input(save: &str, pick: impl Fn(&str) -> bool) -> Option<String> {
    let chains = chains_in(save, &pick);
    let mut deletes = Vec::new();
    for line in save.lines().filter(|l| l.starts_with("-A ")) {
        let mut words = line.split_whitespace();
        let _ = words.next();
        let Some(from) = words.next() else { continue };
        if pick(from) {
            continue; // goes with the flush
        }
        if jump_target(line).is_some_and(&pick) {
            deletes.push(format!("-D {}", &line[3..]));
        }
    }
    if chains.is_empty() && deletes.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for c in &chains {
        s.push_str(&format!(":{c} - [0:0]\n"));
    }
    for d in &deletes {
        s.push_str(d);
        s.push('\n');
    }
    for c in &chains {
        s.push_str(&format!("-X {c}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Do `KUBE-PORTALS-*`/`KUBE-NODEPORT-*` hold rules of kube-proxy's userspace mode (a
/// `REDIRECT`, or a DNAT to an address other than the proxy's)?
fn userspace_owned(nat: &str, proxy_ips: &[IpAddr]) -> bool {
    nat.lines().filter(|l| l.starts_with("-A KUBE-PORTALS-") || l.starts_with("-A KUBE-NODEPORT-")).any(|l| {
        if l.contains(" -j REDIRECT") {
            return true;
        }
        match l.split(" --to-destination ").nth(1).and_then(|t| t.split_whitespace().next()) {
            None => false,
            Some(dest) => {
                let host = dest.rsplit_once(':').map_or(dest, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                !proxy_ips.iter().any(|ip| ip.to_string() == host)
            }
        }
    })
}

/// The input line a restore failed on, and a few lines of context around it.
///
/// iptables says `Error occurred at line: N`. iptables-nft checks some errors (an unknown
/// target chain) only at `COMMIT` and then blames that line; in that case the name it quotes in
/// its message is looked up in the input to find the rule at fault.
fn blame(input: &str, stderr: &str) -> (Option<usize>, String) {
    let lines: Vec<&str> = input.lines().collect();
    let reported = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Error occurred at line: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|n| *n >= 1 && *n <= lines.len());
    let mut line = reported;
    if let Some(n) = reported {
        if lines[n - 1].trim() == "COMMIT" {
            if let Some(name) = quoted(stderr) {
                if let Some(pos) =
                    lines.iter().position(|l| l.starts_with('-') && l.split_whitespace().any(|w| w == name))
                {
                    line = Some(pos + 1);
                }
            }
        }
    }
    let Some(n) = line else {
        return (None, String::new());
    };
    let from = n.saturating_sub(3);
    let to = (n + 2).min(lines.len());
    let mut ctx = String::new();
    for (i, l) in lines.iter().enumerate().take(to).skip(from) {
        let mark = if i + 1 == n { '>' } else { ' ' };
        ctx.push_str(&format!("{mark} {:>5} | {l}\n", i + 1));
    }
    (Some(n), ctx.trim_end().to_string())
}

/// The first `'name'` or `` `name' `` quoted in an iptables message.
fn quoted(msg: &str) -> Option<&str> {
    let first = msg.lines().next()?;
    let start = first.find(['\'', '`'])? + 1;
    let len = first[start..].find('\'')?;
    Some(&first[start..start + len]).filter(|s| !s.is_empty())
}

// ---- `edgeproxy check` ----------------------------------------------------------------------

/// Exit codes of `edgeproxy check`, for scripts.
pub mod exit {
    /// Our chains are present and our jumps are first in PREROUTING and OUTPUT.
    pub const OK: u8 = 0;
    /// Our jumps are not there (edgeproxy is not running, or the rules were removed).
    pub const NOT_INSTALLED: u8 = 3;
    /// Installed, but something (kube-proxy's KUBE-SERVICES, say) is ahead of a jump.
    pub const NOT_FIRST: u8 = 4;
    /// Installed and first, but leftovers exist: EdgeMesh's chains, chains of our other
    /// layout, duplicate jumps.
    pub const LEFTOVERS: u8 = 5;
    /// The nat table cannot be read (no binary, no kernel support, no permission).
    pub const CANNOT_READ: u8 = 6;
}

/// What `edgeproxy check` found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub backend: &'static str,
    pub kube_proxy: bool,
    pub lines: Vec<String>,
    pub code: u8,
}

/// Read the live nat table (IPv4, and IPv6 when it holds any of our chains) and judge it
/// against the jumps `expected` (from rendering an empty plan with the configured layout).
pub fn check(bins: Binaries, expected: &RuleSet) -> CheckReport {
    let mut r = CheckReport { backend: bins.name, ..Default::default() };
    let v4 = match save_table(&bins, Family::V4, "nat") {
        Ok(s) => s,
        Err(e) => {
            r.lines.push(format!("cannot read the nat table: {e}"));
            r.code = exit::CANNOT_READ;
            return r;
        }
    };
    r.lines.push(format!("backend: {} ({})", bins.name, bins.save));
    let mut installed = true;
    let mut first = true;
    let mut leftovers = Vec::new();
    let mut judge = |save: &str, want: &TableRules, family: Family, r: &mut CheckReport| {
        let name = family_name(family);
        let present: BTreeSet<String> = chains_in(save, |_| true).into_iter().collect();
        for c in &want.chains {
            if !present.contains(*c) {
                installed = false;
                r.lines.push(format!("{name}: chain {c} missing"));
            }
        }
        for j in &want.jumps {
            let rules: Vec<&str> = save.lines().filter(|l| l.starts_with(&format!("-A {} ", j.from))).collect();
            let wanted = format!("-A {} {}", j.from, j.spec);
            let copies = rules.iter().filter(|l| **l == wanted).count();
            match rules.iter().position(|l| *l == wanted) {
                None => {
                    installed = false;
                    r.lines.push(format!("{name}: no jump from {} to {}", j.from, j.target));
                }
                Some(0) => r.lines.push(format!("{name}: jump {} -> {} is first", j.from, j.target)),
                Some(p) => {
                    first = false;
                    r.lines.push(format!(
                        "{name}: jump {} -> {} is rule {} behind `{}`",
                        j.from,
                        j.target,
                        p + 1,
                        rules[0]
                    ));
                }
            }
            if copies > 1 {
                leftovers.push(format!("{name}: {copies} copies of the jump {} -> {}", j.from, j.target));
            }
        }
        for c in OWN_CHAINS.iter().filter(|c| present.contains(**c) && !want.chains.contains(c)) {
            leftovers.push(format!("{name}: chain {c} of the other layout"));
        }
        for c in present.iter().filter(|c| {
            c.starts_with("EDGEMESH-") || (c.starts_with("KUBE-NODEPORT-") && !OWN_CHAINS.contains(&c.as_str()))
        }) {
            leftovers.push(format!("{name}: EdgeMesh chain {c}"));
        }
    };
    r.kube_proxy = has_kube_proxy_jump(&v4);
    judge(&v4, &expected.v4, Family::V4, &mut r);
    if let Ok(v6) = save_table(&bins, Family::V6, "nat") {
        if OWN_CHAINS.iter().any(|c| v6.lines().any(|l| l.starts_with(&format!(":{c} ")))) {
            let want = if expected.v6.is_empty() { &expected.v4 } else { &expected.v6 };
            judge(&v6, want, Family::V6, &mut r);
        }
    }
    r.lines.push(format!("kube-proxy: {}", if r.kube_proxy { "present (KUBE-SERVICES)" } else { "absent" }));
    for l in &leftovers {
        r.lines.push(format!("leftover: {l}"));
    }
    r.code = if !installed {
        exit::NOT_INSTALLED
    } else if !first {
        exit::NOT_FIRST
    } else if !leftovers.is_empty() {
        exit::LEFTOVERS
    } else {
        exit::OK
    };
    r
}

// ---- the proxy address ----------------------------------------------------------------------

fn prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Put `ip` (/32 or /128) on `device`. Returns `true` when it was added now, `false` when it was
/// already there (then it is not ours to remove).
pub fn ensure_address(device: &str, ip: IpAddr) -> Result<bool, ApplyError> {
    let fam = if ip.is_ipv4() { "-4" } else { "-6" };
    let shown = run("ip", &[fam, "-o", "addr", "show", "dev", device], None)?;
    if !shown.status.success() {
        return Err(ApplyError::Address {
            message: format!("device {device:?}: {}", String::from_utf8_lossy(&shown.stderr).trim()),
        });
    }
    let want = prefix(ip);
    if String::from_utf8_lossy(&shown.stdout).split_whitespace().any(|w| w == want) {
        return Ok(false);
    }
    let out = run("ip", &["addr", "add", &want, "dev", device], None)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("File exists") {
            return Ok(false);
        }
        return Err(ApplyError::Address { message: format!("ip addr add {want} dev {device}: {}", stderr.trim()) });
    }
    Ok(true)
}

/// Take `ip` off `device` (at exit, when [`ensure_address`] added it).
pub fn remove_address(device: &str, ip: IpAddr) -> Result<(), ApplyError> {
    let want = prefix(ip);
    let out = run("ip", &["addr", "del", &want, "dev", device], None)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("Cannot assign") {
            return Err(ApplyError::Address { message: format!("ip addr del {want} dev {device}: {}", stderr.trim()) });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A jump pushed down by kube-proxy is reported once, as moved back, not as removed.
    #[test]
    fn a_pushed_down_jump_is_reported_as_moved_back() {
        let spec = "-m comment --comment \"x\" -j KUBE-PORTALS-CONTAINER".to_string();
        let wanted = [Jump { from: "PREROUTING", target: "KUBE-PORTALS-CONTAINER", spec: spec.clone() }];
        let pre = vec!["-A PREROUTING -j KUBE-SERVICES".to_string(), format!("-A PREROUTING {spec}")];
        let fix = jump_fix_from(&pre, &[], &wanted);
        assert_eq!(fix.found.len(), 1, "{:?}", fix.found);
        assert!(
            fix.found[0].contains("was ahead of our jump")
                && fix.found[0].contains("moved it back from rule 2 to rule 1"),
            "{:?}",
            fix.found
        );
        assert!(!fix.found[0].contains("removed"));
        assert_eq!(fix.lines, vec![format!("-D PREROUTING {spec}"), format!("-I PREROUTING 1 {spec}")]);
        // A stale duplicate of ours is removed, and said so.
        let pre = vec![
            format!("-A PREROUTING {spec}"),
            "-A PREROUTING -j OTHER".to_string(),
            "-A PREROUTING -j KUBE-PORTALS-CONTAINER".to_string(),
        ];
        let fix = jump_fix_from(&pre, &[], &wanted);
        assert_eq!(
            fix.found,
            vec!["PREROUTING: removed `-A PREROUTING -j KUBE-PORTALS-CONTAINER` (rule 3)".to_string()]
        );
    }

    #[test]
    fn kube_proxy_is_its_jump_not_a_leftover_chain() {
        let leftover = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\nCOMMIT\n";
        assert!(!has_kube_proxy_jump(leftover));
        let serving = "*nat\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n";
        assert!(has_kube_proxy_jump(serving));
        assert!(!has_kube_proxy_jump("-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X\n"));
    }

    #[test]
    fn blame_finds_reported_line_and_commit_fallback() {
        let input = "*nat\n:A - [0:0]\n-A A -d 10.0.0.1/32 -j RETURN\n-A A -d 10.0.0.2/32 -j NOPE\nCOMMIT\n";
        let (line, ctx) = blame(
            input,
            "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE'\n\nError occurred at line: 4\n",
        );
        assert_eq!(line, Some(4));
        assert!(ctx.contains(">     4 | -A A -d 10.0.0.2/32 -j NOPE"), "{ctx}");
        let (line, _) = blame(
            input,
            "iptables-nft-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\nError occurred at line: 5\n",
        );
        assert_eq!(line, Some(4));
        assert_eq!(blame(input, "garbage").0, None);
    }

    #[test]
    fn removal_input_deletes_jumps_before_chains() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:EDGE-MESH - [0:0]\n:EDGE-MESH-TCP - [0:0]\n:KUBE-SERVICES - [0:0]\n\
            -A PREROUTING -m comment --comment \"edgemesh root chain\" -j EDGE-MESH\n-A PREROUTING -j KUBE-SERVICES\n\
            -A EDGE-MESH -p tcp -j EDGE-MESH-TCP\nCOMMIT\n";
        let text = removal_input(save, |c| OWN_CHAINS.contains(&c)).unwrap();
        assert_eq!(
            text,
            "*nat\n:EDGE-MESH - [0:0]\n:EDGE-MESH-TCP - [0:0]\n-D PREROUTING -m comment --comment \"edgemesh root chain\" -j EDGE-MESH\n-X EDGE-MESH\n-X EDGE-MESH-TCP\nCOMMIT\n"
        );
        assert!(removal_input("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", |c| OWN_CHAINS.contains(&c)).is_none());
    }

    #[test]
    fn userspace_ownership() {
        let ip: IpAddr = "169.254.96.16".parse().unwrap();
        let em = "-A KUBE-PORTALS-HOST -d 10.96.0.1/32 -p tcp -m comment --comment \"a/b\" -m tcp --dport 80 -j DNAT --to-destination 169.254.96.16:36906\n";
        assert!(!userspace_owned(em, &[ip]));
        let kp = "-A KUBE-PORTALS-CONTAINER -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 40000\n";
        assert!(userspace_owned(kp, &[ip]));
        let kp2 =
            "-A KUBE-PORTALS-HOST -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.0.2.11:40000\n";
        assert!(userspace_owned(kp2, &[ip]));
    }
}

#[cfg(test)]
mod minimal_tests {
    use super::*;

    fn set(container: &[&str], no_endpoints: &[&str]) -> TableRules {
        let mut rules: Vec<String> = container.iter().map(|r| format!("-A KUBE-PORTALS-CONTAINER {r}")).collect();
        rules.extend(no_endpoints.iter().map(|r| format!("-A EDGEPROXY-NO-ENDPOINTS {r}")));
        TableRules { chains: vec!["KUBE-PORTALS-CONTAINER", "EDGEPROXY-NO-ENDPOINTS"], rules, jumps: Vec::new() }
    }

    #[test]
    fn only_changed_chains_are_written() {
        let last = set(&["-j A", "-j B"], &[]);
        let want = set(&["-j A", "-j B"], &["-j R"]);
        let (changed, stale) = changed_chains(&last, &want);
        assert_eq!((changed.as_slice(), stale.as_slice()), (&["EDGEPROXY-NO-ENDPOINTS"][..], &[][..]));
        assert_eq!(
            restore_input(&want, &changed, &[], &stale),
            "*nat\n:EDGEPROXY-NO-ENDPOINTS - [0:0]\n-A EDGEPROXY-NO-ENDPOINTS -j R\nCOMMIT\n"
        );
        // Emptying a chain still writes it (the flush is the change).
        let (changed, _) = changed_chains(&want, &last);
        assert_eq!(changed, vec!["EDGEPROXY-NO-ENDPOINTS"]);
        assert_eq!(restore_input(&last, &changed, &[], &[]), "*nat\n:EDGEPROXY-NO-ENDPOINTS - [0:0]\nCOMMIT\n");
        // Order within a chain matters.
        let (changed, _) = changed_chains(&last, &set(&["-j B", "-j A"], &[]));
        assert_eq!(changed, vec!["KUBE-PORTALS-CONTAINER"]);
        assert_eq!(changed_chains(&last, &last.clone()), (vec![], vec![]));
    }

    #[test]
    fn ranges_and_carry_over() {
        let last = set(&["-j A", "-j B"], &[]);
        let want = set(&["-j A", "-j B"], &["-j R"]);
        assert_eq!(
            chain_ranges(&want).unwrap(),
            vec![("KUBE-PORTALS-CONTAINER", 0..2), ("EDGEPROXY-NO-ENDPOINTS", 2..3)]
        );
        assert_eq!(chain_ranges(&last).unwrap()[1], ("EDGEPROXY-NO-ENDPOINTS", 0..0));
        assert_eq!(carry_over(last.clone(), &want, &["EDGEPROXY-NO-ENDPOINTS"]), want);
        assert_eq!(carry_over(want.clone(), &last, &["EDGEPROXY-NO-ENDPOINTS"]), last);
        // Not contiguous (not what render makes): found all the same, by grouping.
        let mut split = want.clone();
        split.rules.push("-A KUBE-PORTALS-CONTAINER -j C".into());
        assert!(chain_ranges(&split).is_none());
        assert_eq!(changed_chains(&want, &split).0, vec!["KUBE-PORTALS-CONTAINER"]);
        assert_eq!(carry_over(want.clone(), &split, &["KUBE-PORTALS-CONTAINER"]), split);
        // A rule of an undeclared chain.
        let mut odd = want.clone();
        odd.rules.push("-A ELSEWHERE -j C".into());
        assert!(chain_ranges(&odd).is_none());
    }

    #[test]
    fn a_chain_gone_from_the_set_is_flushed_then_deleted() {
        let mut last = set(&["-j A"], &[]);
        last.chains.push("EDGE-MESH-UDP");
        last.rules.push("-A EDGE-MESH-UDP -j U".into());
        let want = set(&["-j A"], &[]);
        let (changed, stale) = changed_chains(&last, &want);
        assert_eq!((changed.len(), stale.as_slice()), (0, &["EDGE-MESH-UDP"][..]));
        assert_eq!(
            restore_input(&want, &changed, &["-I OUTPUT 1 -j X".into()], &stale),
            "*nat\n:EDGE-MESH-UDP - [0:0]\n-I OUTPUT 1 -j X\n-X EDGE-MESH-UDP\nCOMMIT\n"
        );
    }

    #[test]
    fn listing_and_compare() {
        let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:EDGEPROXY-NO-ENDPOINTS - [0:0]\n:KUBE-PORTALS-CONTAINER - [0:0]\n\
            -A PREROUTING -j KUBE-PORTALS-CONTAINER\n-A KUBE-PORTALS-CONTAINER -j A\n-A KUBE-PORTALS-CONTAINER -j B\nCOMMIT\n";
        let l = Listing::parse(save);
        assert_eq!(l.chain("PREROUTING").unwrap(), ["-A PREROUTING -j KUBE-PORTALS-CONTAINER"]);
        assert_eq!(l.chain("EDGEPROXY-NO-ENDPOINTS").unwrap().len(), 0);
        assert!(l.chain("EDGE-MESH").is_none());
        let mut found = Vec::new();
        let want = set(&["-j A", "-j B"], &[]);
        compare_chain("KUBE-PORTALS-CONTAINER", l.chain("KUBE-PORTALS-CONTAINER"), &want, &mut found);
        compare_chain("EDGEPROXY-NO-ENDPOINTS", l.chain("EDGEPROXY-NO-ENDPOINTS"), &want, &mut found);
        assert!(found.is_empty(), "{found:?}");
        let want = set(&["-j A"], &["-j R"]);
        compare_chain("KUBE-PORTALS-CONTAINER", l.chain("KUBE-PORTALS-CONTAINER"), &want, &mut found);
        compare_chain("EDGEPROXY-NO-ENDPOINTS", l.chain("EDGEPROXY-NO-ENDPOINTS"), &want, &mut found);
        compare_chain("EDGE-MESH", l.chain("EDGE-MESH"), &want, &mut found);
        assert_eq!(
            found,
            vec![
                "chain KUBE-PORTALS-CONTAINER was flushed or edited (2 rules, 1 expected)",
                "chain EDGEPROXY-NO-ENDPOINTS was flushed or edited (0 rules, 1 expected)",
                "chain EDGE-MESH was deleted",
            ]
        );
    }
}
