//! The [`NftApplier`]: puts the `nftables` layout into the kernel, one transaction per sync,
//! and keeps it there.
//!
//! A sync sends only the map elements that changed since the last successful one; a full write
//! (every table of ours, created, deleted and created again in the same transaction) happens on
//! the first sync, after a failure, on a repair and on the periodic resync. Both are nf_tables
//! netlink batches (`batch`) over one socket kept for the applier's life; `nft -f -` writes
//! kernel-path chains and is the fallback when a batch is refused. The guard reads the
//! ruleset generation first (microseconds, no process); only when it moved does it list the
//! ruleset's chains (`nft -j list chains`: a few ms whatever the number of services, where any
//! listing of our table costs ~70 ms at 10,000 elements, because nft fetches them all) and look
//! for our two chains, nat, on their hooks, at our priority. A flushed map or an edited rule
//! inside our chains is put right by the resync.
//!
//! It owns the tables `ip edgeproxy` and `ip6 edgeproxy` and nothing else: it never flushes
//! the ruleset and never touches another table.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::batch::Batch;
use super::{delta_text, full_text, removal_text, Changes, NftRules, TABLE};
use crate::address::netlink::{parse as parse_netlink, Message};
use crate::rules::applier::SyncReport;
use crate::rules::iptables::ApplyError;
use crate::rules::{Family, RuleSet};
use crate::sys::netfilter::nft_generation;

use super::listing::{kube_proxy_present, list_chains, missing_chains, run, NFT};

/// Puts [`NftRules`] into the kernel and keeps them there. Blocking; use from one thread.
pub struct NftApplier {
    /// The rules the kernel holds since our last successful transaction (the worker's set,
    /// shared: a 10,000-element map is not copied per sync).
    last: Option<Arc<RuleSet>>,
    /// The next sync writes everything (a transaction failed, or an earlier run's tables may
    /// be there).
    full_next: bool,
    /// The ruleset generation when everything was last known in place: right after our own
    /// transaction, or when the guard last found it so. Nothing can have changed while the
    /// generation stays there (every nftables transaction, anybody's, moves it).
    canary: Option<u32>,
    /// `nft` transactions run.
    runs: u64,
    /// The nftables layout counts no refusals yet (see README); always empty.
    refused: BTreeMap<String, u64>,
    /// kube-proxy's presence as the last probe found it (listings of other tables cost time
    /// that grows with the whole ruleset: probed on the worker's own schedule, not per sync).
    kube_proxy: std::cell::Cell<bool>,
    /// When the guard last probed for kube-proxy.
    kube_proxy_probed: Option<std::time::Instant>,
    /// The nftables generation and the legacy nat table's summary at that probe.
    kube_proxy_seen: Option<(Option<u32>, Option<crate::sys::netfilter::XtInfo>)>,
    /// The next netlink sequence number.
    seq: u32,
    /// The netfilter netlink socket of the batches and the generation reads (see
    /// [`netfilter_socket`]); opened when first needed, dropped after an error.
    netlink: Option<socket2::Socket>,
    /// The biggest batch the socket's send buffer holds (a netlink message goes in whole).
    send_capacity: usize,
    /// Full writes that went over netlink (the others through `nft -f`).
    full_batches: u64,
}

/// Batches up to this size fit a socket's default send buffer (~208 KiB); the buffer of the kept
/// socket is grown (SO_SNDBUFFORCE) for a bigger one (a full write of thousands of elements).
const DEFAULT_SEND_CAPACITY: usize = 128 << 10;

/// Send one nf_tables batch and wait for the acknowledgement of every message that asked for
/// one; the first error (the kernel then applied nothing of the batch) names its errno.
pub fn send_batch(sock: &socket2::Socket, bytes: &[u8], acked: &[u32]) -> Result<(), String> {
    use std::io::Read as _;
    sock.send(bytes).map_err(|e| format!("send: {e}"))?;
    let mut waiting: std::collections::BTreeSet<u32> = acked.iter().copied().collect();
    let mut buf = vec![0u8; 64 * 1024];
    while !waiting.is_empty() {
        let n = (&*sock).read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        for m in parse_netlink(&buf[..n]).map_err(|e| e.to_string())? {
            if let Message::Ack { seq, errno } = m {
                if errno != 0 {
                    return Err(format!("message {seq}: {}", std::io::Error::from_raw_os_error(errno)));
                }
                waiting.remove(&seq);
            }
        }
    }
    Ok(())
}

/// A netfilter netlink socket, kept by the applier for its life: closing one right after a
/// transaction that removed elements waits in the kernel for 10-25 ms here (measured with
/// `strace -T`; most likely the transaction's deferred release), which a sync would otherwise pay.
pub fn netfilter_socket() -> Result<socket2::Socket, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    const NETLINK_NETFILTER: i32 = 12;
    let sock = Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(NETLINK_NETFILTER)))
        .map_err(|e| format!("netfilter netlink socket: {e}"))?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(|e| e.to_string())?;
    Ok(sock)
}

/// How often at most the guard looks for kube-proxy (its appearance changes which services are
/// ours under `defaultIgnores: auto`), once a change marker moved.
const KUBE_PROXY_PROBE: std::time::Duration = std::time::Duration::from_secs(30);
/// ... and at least this often, whatever the change markers say.
const KUBE_PROXY_PROBE_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// The nftables rules of a set (none: empty tables).
fn nft(set: &RuleSet) -> &NftRules {
    static EMPTY: NftRules = NftRules::EMPTY;
    set.nft.as_ref().unwrap_or(&EMPTY)
}

/// The 1-based input line nft blames (`/dev/stdin:12:5-20: Error: ...`).
fn blamed_line(stderr: &str) -> Option<usize> {
    let rest = &stderr[stderr.find("stdin:")? + "stdin:".len()..];
    rest.split(':').next()?.parse().ok()
}

impl NftApplier {
    /// Check that `nft` runs and can list the ruleset (kernel support, permission); a clear
    /// error naming the iptables layouts otherwise.
    pub fn new() -> Result<NftApplier, ApplyError> {
        match run(&["list", "tables"], None) {
            Err(ApplyError::Spawn { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ApplyError::NoBinaries(
                    "nft (the nftables layout needs it: install nftables, or use layout portals or root-chain)".into(),
                ));
            }
            Err(e) => return Err(e),
            Ok(out) if !out.status.success() => {
                return Err(ApplyError::NatUnavailable {
                    binary: NFT.into(),
                    stderr: format!(
                        "{} (the nftables layout needs nf_tables; the iptables layouts portals and root-chain may still work)",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                })
            }
            Ok(_) => {}
        }
        Ok(NftApplier {
            last: None,
            full_next: true,
            canary: None,
            runs: 0,
            refused: BTreeMap::new(),
            kube_proxy: std::cell::Cell::new(false),
            kube_proxy_probed: None,
            kube_proxy_seen: None,
            seq: 1,
            netlink: None,
            send_capacity: DEFAULT_SEND_CAPACITY,
            full_batches: 0,
        })
    }

    /// `nft` transactions run so far.
    pub fn restores(&self) -> u64 {
        self.runs
    }

    pub fn refused(&self) -> &BTreeMap<String, u64> {
        &self.refused
    }

    /// The ruleset generation, over the kept socket when there is one.
    fn generation(&mut self) -> Option<u32> {
        match &self.netlink {
            Some(s) => crate::sys::netfilter::nft_generation_on(s),
            None => nft_generation(),
        }
    }

    /// One batch, one transaction, over the kept socket (opened if needed, its send buffer
    /// grown to hold the batch; dropped after an error). An error means nothing was applied.
    fn send(&mut self, batch: Batch) -> Result<(), String> {
        self.seq = batch.next_seq();
        let (bytes, acked) = batch.finish();
        if self.netlink.is_none() {
            self.netlink = Some(netfilter_socket()?);
            self.send_capacity = DEFAULT_SEND_CAPACITY;
        }
        let sock = self.netlink.as_ref().ok_or("no netfilter socket")?;
        if bytes.len() > self.send_capacity {
            let grown = bytes.len() + (64 << 10);
            crate::sys::sockopt::force_send_buffer(sock, grown)
                .map_err(|e| format!("send buffer of {} bytes: {e}", bytes.len()))?;
            self.send_capacity = grown;
        }
        send_batch(sock, &bytes, &acked).inspect_err(|_| self.netlink = None)?;
        self.runs += 1;
        // Read after our transaction: if another came in between, the guard looks.
        self.canary = self.generation();
        Ok(())
    }

    fn transaction(&mut self, text: &str) -> Result<(), ApplyError> {
        self.canary = None;
        self.runs += 1;
        let out = run(&["-f", "-"], Some(text))?;
        if out.status.success() {
            log::debug!("nft: applied {} input lines", text.lines().count());
            // Read after our transaction: if another came in between, the guard looks.
            self.canary = self.generation();
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = blamed_line(&stderr);
        let context = match line {
            Some(n) => text
                .lines()
                .enumerate()
                .skip(n.saturating_sub(3))
                .take(5)
                .map(|(i, l)| format!("{} {:>5} {l}", if i + 1 == n { ">" } else { " " }, i + 1))
                .collect::<Vec<_>>()
                .join("\n"),
            None => String::new(),
        };
        let err = ApplyError::Restore { binary: NFT.into(), line, context, stderr };
        log::error!("{err}");
        Err(err)
    }

    /// Whether `family` has a table of ours in `rules` (IPv4 always; IPv6 with elements).
    fn wanted(rules: &NftRules, f: Family) -> bool {
        f == Family::V4 || !rules.v6.is_empty()
    }

    fn full_input(rules: &NftRules, had_v6: bool) -> String {
        let mut text = String::new();
        for f in [Family::V4, Family::V6] {
            if Self::wanted(rules, f) {
                full_text(&mut text, f, rules.family(f), rules.mark);
            } else if had_v6 {
                removal_text(&mut text, f);
            }
        }
        text
    }

    /// Everything in one netlink batch (no `nft` process). An error means nothing was applied.
    fn full_batch(&mut self, rules: &NftRules, had_v6: bool) -> Result<(), String> {
        let mut batch = Batch::new(self.seq);
        for f in [Family::V4, Family::V6] {
            if Self::wanted(rules, f) {
                batch.full_table(f, rules.family(f), rules.mark);
            } else if had_v6 {
                batch.remove_table(f);
            }
        }
        self.send(batch)?;
        self.full_batches += 1;
        Ok(())
    }

    /// How many full writes went over netlink (the rest through `nft -f`).
    pub fn full_batches(&self) -> u64 {
        self.full_batches
    }

    fn write_all(&mut self, set: &Arc<RuleSet>, report: &mut SyncReport) -> Result<(), ApplyError> {
        let rules = nft(set);
        // After a failure or at start, an IPv6 table of an earlier run may be there.
        let had_v6 = self.full_next || self.last.as_ref().is_some_and(|l| Self::wanted(nft(l), Family::V6));
        // Kernel-path ports have chains of their own, which only `nft -f` writes (they are few).
        let kernel = !rules.v4.kernel.is_empty() || !rules.v6.kernel.is_empty();
        let batched = !kernel
            && self
                .full_batch(rules, had_v6)
                .inspect_err(|e| log::debug!("full write over netlink: {e}; through nft -f"))
                .is_ok();
        if !batched {
            let text = Self::full_input(rules, had_v6);
            self.transaction(&text).inspect_err(|_| self.full_next = true)?;
        }
        self.full_next = false;
        self.last = Some(set.clone());
        report.restores += 1;
        report.full = true;
        report.rules = rules.entries();
        Ok(())
    }

    /// Make the kernel hold the set's tables: the elements that changed (nothing when none
    /// did), or everything on the first sync and after a failure.
    pub fn apply(&mut self, set: &Arc<RuleSet>) -> Result<SyncReport, ApplyError> {
        let mut report = SyncReport { kube_proxy: self.kube_proxy.get(), ..SyncReport::default() };
        let rules = nft(set);
        let last_set = self.last.clone().filter(|l| !self.full_next && nft(l).mark == rules.mark);
        let Some(last_set) = last_set else {
            self.write_all(set, &mut report)?;
            return Ok(report);
        };
        if Arc::ptr_eq(&last_set, set) {
            report.rules = rules.entries();
            return Ok(report);
        }
        let last = nft(&last_set);
        if Self::wanted(last, Family::V6) != Self::wanted(rules, Family::V6) {
            self.write_all(set, &mut report)?;
            return Ok(report);
        }
        report.rules = rules.entries();
        let families: Vec<Family> = [Family::V4, Family::V6].into_iter().filter(|f| Self::wanted(rules, *f)).collect();
        // Kernel-path ports are chains: a change there rewrites the table (they are few).
        if families.iter().any(|f| last.family(*f).kernel != rules.family(*f).kernel) {
            self.write_all(set, &mut report)?;
            return Ok(report);
        }
        let changes: Vec<(Family, Changes)> =
            families.iter().map(|f| (*f, Changes::between(last.family(*f), rules.family(*f)))).collect();
        if changes.iter().all(|(_, c)| c.is_empty()) {
            return Ok(report);
        }
        // The changes as one netlink batch (costs what changed); `nft -f` when that fails.
        let mut batch = Batch::new(self.seq);
        for (f, c) in &changes {
            batch.delete(*f, &c.gone);
            batch.add(*f, &c.added);
        }
        if let Err(e) = self.send(batch) {
            log::debug!("nf_tables batch: {e}; through nft -f instead");
            let mut text = String::new();
            for f in &families {
                delta_text(&mut text, *f, last.family(*f), rules.family(*f));
            }
            self.transaction(&text).inspect_err(|_| self.full_next = true)?;
        }
        self.last = Some(set.clone());
        report.restores = 1;
        Ok(report)
    }

    /// Everything written again (the periodic resync; it also repairs edited map elements and
    /// rules the guard does not read), unless the ruleset generation has not moved since
    /// everything was last known in place: then nothing can differ, and nothing is written.
    pub fn reapply(&mut self, set: &Arc<RuleSet>) -> Result<SyncReport, ApplyError> {
        let mut report = SyncReport { kube_proxy: self.kube_proxy.get(), ..SyncReport::default() };
        let unchanged = self.last.as_ref().is_some_and(|l| Arc::ptr_eq(l, set) || **l == **set);
        let generation = self.generation();
        if unchanged && !self.full_next && generation.is_some() && generation == self.canary {
            report.rules = nft(set).entries();
            return Ok(report);
        }
        self.write_all(set, &mut report)?;
        Ok(report)
    }

    /// Are our tables there with our chains on their hooks at our priority? The generation
    /// first; the chain listing only when it moved; a full write when anything is missing.
    pub fn guard(&mut self) -> Result<SyncReport, ApplyError> {
        let generation = self.generation();
        // kube-proxy can only have come or gone if the nftables ruleset or the legacy nat table
        // moved since the last look: then look (at most every 30 s; every 10 min regardless),
        // else start no process at all.
        let seen = (generation, crate::sys::netfilter::xt_info(false, "nat"));
        let since = self.kube_proxy_probed.map(|t| t.elapsed());
        let due = since
            .is_none_or(|s| s >= KUBE_PROXY_PROBE_MAX || (s >= KUBE_PROXY_PROBE && self.kube_proxy_seen != Some(seen)));
        if due {
            self.kube_proxy_probed = Some(std::time::Instant::now());
            self.kube_proxy_seen = Some(seen);
            self.kube_proxy.set(kube_proxy_present());
        }
        let mut report = SyncReport { kube_proxy: self.kube_proxy.get(), ..SyncReport::default() };
        let Some(want) = self.last.clone() else {
            return Ok(report);
        };
        if generation.is_some() && generation == self.canary {
            return Ok(report);
        }
        let listed = list_chains()?;
        report.reads += 1;
        let families: Vec<Family> =
            [Family::V4, Family::V6].into_iter().filter(|f| Self::wanted(nft(&want), *f)).collect();
        let found = missing_chains(&listed, &families);
        if found.is_empty() {
            self.canary = generation;
            return Ok(report);
        }
        self.write_all(&want, &mut report)?;
        report.repaired = found;
        Ok(report)
    }

    /// Remove our tables (both families; no error when they are not there).
    pub fn cleanup(&mut self) -> Result<SyncReport, ApplyError> {
        self.last = None;
        let mut text = String::new();
        removal_text(&mut text, Family::V4);
        removal_text(&mut text, Family::V6);
        self.transaction(&text)?;
        Ok(SyncReport { restores: 1, ..SyncReport::default() })
    }

    /// Start-up: tables of an earlier run stay in force until the first sync rewrites them
    /// (whole, in one transaction). Returns whether there were any.
    pub fn adopt(&mut self) -> Result<bool, ApplyError> {
        self.full_next = true;
        let found = list_chains()?.iter().any(|c| c.table == TABLE);
        if found {
            log::info!("nftables rules of an earlier run are in place: kept until the first sync replaces them");
        }
        Ok(found)
    }

    /// Whether kube-proxy runs here: its iptables jump, or its nftables table.
    pub fn kube_proxy_jump_present(&self) -> Result<bool, ApplyError> {
        self.kube_proxy.set(kube_proxy_present());
        Ok(self.kube_proxy.get())
    }
}

/// Tables of ours left by the nftables layout, found while another layout starts (they would
/// run before its rules): removed. `Ok(false)` when there are none or `nft` is not installed.
pub fn remove_leftovers() -> Result<bool, ApplyError> {
    let listed = match list_chains() {
        Err(ApplyError::Spawn { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        other => other?,
    };
    if !listed.iter().any(|c| c.table == TABLE) {
        return Ok(false);
    }
    NftApplier::new()?.cleanup()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_errors_name_their_line() {
        let stderr = "/dev/stdin:12:5-20: Error: Could not process rule: No such file or directory\nadd element ...";
        assert_eq!(blamed_line(stderr), Some(12));
        assert_eq!(blamed_line("Error: syntax error"), None);
    }

    #[test]
    fn a_first_sync_writes_everything_and_removes_an_old_ipv6_table() {
        let rules = NftRules::default();
        let text = NftApplier::full_input(&rules, true);
        assert!(text.contains("table ip edgeproxy {\n"));
        assert!(text.ends_with("table ip6 edgeproxy {}\ndelete table ip6 edgeproxy\n"), "{text}");
    }
}
