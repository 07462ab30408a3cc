//! The [`Applier`]: puts a rule set into the kernel with `iptables-restore --noflush --wait`
//! and keeps it there (the hybrid-order guard), and removes it (start-up and exit cleanup,
//! EdgeMesh's leftovers). It runs the processes of `iptables.rs`, reads with `listing.rs` and
//! writes with `restore.rs`.
//!
//! What it owns: the chains in [`OWN_CHAINS`] and the jumps into them from `PREROUTING` and
//! `OUTPUT` (nat), It never flushes a table, never
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

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::iptables::{self, jump_fix, list_chain, run, save_table, ApplyError, Binaries, LEGACY, LOCK_WAIT_SECS, NFT};
use super::listing::{chains_in, jump_target, refusal_counts, rules_of, userspace_owned, Listing};
use super::restore::{blame, carry_over, changed_chains, compare_chain, jump_fix_from, removal_input, restore_input};
use super::{Family, Flavour, RuleSet, TableRules, NO_ENDPOINTS_CHAIN, OWN_CHAINS};
use crate::sys::netfilter::{nft_generation, xt_info, XtInfo};

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
    /// Per family: rules of an earlier run may be in the kernel (see [`Applier::adopt`]); the
    /// next sync replaces them, chains of another layout included.
    adopting: [bool; 2],
    /// Connections refused by the reject rules, per service port, summed over the counts read
    /// from the kernel just before each rewrite of the no-endpoints chain (which zeroes them).
    refused: BTreeMap<String, u64>,
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
        let bins = iptables::detect(flavour);
        Applier::with_binaries(bins)
    }

    /// Use these binaries; fails clearly when they are missing or the nat table is unavailable.
    pub fn with_binaries(bins: Binaries) -> Result<Applier, ApplyError> {
        match run(bins.save, &["-t", "nat"], None) {
            Err(ApplyError::Spawn { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                let other = if bins.name == NFT.name { LEGACY } else { NFT };
                let other_exists = crate::exec::run(other.save, &["--version"], None).is_ok();
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
            adopting: [false, false],
            refused: BTreeMap::new(),
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

    /// Connections refused by the kernel for service ports without endpoints, per port, so far.
    pub fn refused(&self) -> &BTreeMap<String, u64> {
        &self.refused
    }

    /// Add what the reject rules counted since the chain was written (before it is rewritten).
    fn collect_refusals(&mut self, family: Family) {
        let bin = self.bins.cmd_bin(family);
        match run(bin, &["-t", "nat", "-S", NO_ENDPOINTS_CHAIN, "-v"], None) {
            Ok(out) if out.status.success() => {
                for (name, n) in refusal_counts(&String::from_utf8_lossy(&out.stdout)) {
                    *self.refused.entry(name).or_default() += n;
                }
            }
            _ => log::debug!("{bin}: the no-endpoints chain's counters could not be read"),
        }
    }

    fn restore(&mut self, family: Family, text: &str) -> Result<(), ApplyError> {
        if text.contains(&format!("\n:{NO_ENDPOINTS_CHAIN} ")) {
            self.collect_refusals(family);
        }
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
            if self.last[i].is_some() || self.adopting[i] {
                if self.remove_family(family).inspect_err(|_| self.full_next[i] = true)? {
                    report.restores += 1;
                }
                self.last[i] = None;
                self.adopting[i] = false;
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
            // Whatever an earlier run may have left: declaring a chain creates it if it is not
            // there, so deleting it after is safe either way.
            _ if self.adopting[i] => OWN_CHAINS.iter().copied().filter(|c| !want.chains.contains(c)).collect(),
            Some(last) => last.chains.iter().copied().filter(|c| !want.chains.contains(c)).collect(),
            None => Vec::new(),
        };
        self.restore(family, &restore_input(want, &want.chains, &fix.lines, &stale))?;
        self.adopting[i] = false;
        if self.last[i].is_some() {
            // Logged once, by whoever reads the report (the agent: "rules repaired: ...").
            for f in &fix.found {
                log::debug!("rules guard ({}): {f}", family.name());
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
        let canary = if legacy {
            xt_info(family == Family::V6, "nat").map(Canary::Legacy)
        } else {
            nft_generation().map(Canary::Nft)
        };
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
            log::debug!("rules guard ({}): {f}; repaired", family.name());
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

    /// Start-up: keep whatever an earlier run left in force (its jumps still send ClusterIP
    /// traffic to the proxy address, where the new proxy listens again within moments) and have
    /// the first sync replace it in one transaction per family, chains of another layout and
    /// stray jumps included: a restart leaves no window without rules. Returns whether rules of
    /// an earlier run were found (IPv4 jumps into our chains).
    pub fn adopt(&mut self) -> Result<bool, ApplyError> {
        self.full_next = [true, true];
        self.adopting = [true, true];
        let mut found = false;
        for from in ["PREROUTING", "OUTPUT"] {
            let listed = list_chain(&self.bins, Family::V4, from)?.unwrap_or_default();
            found |= listed.iter().any(|l| jump_target(l).is_some_and(|t| OWN_CHAINS.contains(&t)));
        }
        if found {
            log::info!("rules of an earlier run are in place: kept until the first sync replaces them");
        }
        Ok(found)
    }

    /// Returns whether anything was there to remove.
    fn remove_family(&mut self, family: Family) -> Result<bool, ApplyError> {
        let save = match save_table(&self.bins, family, "nat") {
            Ok(s) => s,
            // IPv6 may be unavailable entirely; then there is nothing of ours in it.
            Err(_) if family == Family::V6 => return Ok(false),
            Err(e) => return Err(e),
        };
        let input = removal_input("nat", &save, |c| OWN_CHAINS.contains(&c));
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
                    family.name()
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
            if let Some(text) = removal_input("nat", &nat, pick_nat) {
                self.restore(family, &text)?;
                notes.push(format!("{}: removed from nat: {}", family.name(), chains_in(&nat, pick_nat).join(", ")));
            }
            let Ok(filter) = save_table(&self.bins, family, "filter") else {
                continue;
            };
            let pick_filter =
                |c: &str| c == "EDGEMESH-NODEPORT-NON-LOCAL" || (!kube_userspace && c == "KUBE-NODEPORT-NON-LOCAL");
            if let Some(text) = removal_input("filter", &filter, pick_filter) {
                self.restore(family, &text)?;
                notes.push(format!(
                    "{}: removed from filter: {}",
                    family.name(),
                    chains_in(&filter, pick_filter).join(", ")
                ));
            }
        }
        Ok(notes)
    }
}

/// What the guard reads first to learn whether anything changed since its last check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Canary {
    Legacy(XtInfo),
    /// The nftables ruleset generation of this network namespace.
    Nft(u32),
}
