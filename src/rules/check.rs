//! `edgeproxy check`: read the live nat table and judge it against what an installed edgeproxy
//! holds (our chains, our jumps first, no leftovers), with exit codes for scripts.

use std::collections::BTreeSet;

use super::iptables::{save_table, Binaries};
use super::listing::{chains_in, has_kube_proxy_jump};
use super::nftables::listing::check_lines;
use super::{Family, RuleSet, TableRules, KERNEL_CHAIN, OWN_CHAINS};

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

impl CheckReport {
    /// A leftover found outside the nat table (a device holding the proxy address): reported,
    /// and the exit code says leftovers unless something worse was found.
    pub fn leftover(&mut self, what: &str) {
        self.lines.push(format!("leftover: {what}"));
        if self.code == exit::OK {
            self.code = exit::LEFTOVERS;
        }
    }
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
        let name = family.name();
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
    r.lines.extend(kernel_path_lines(&v4));
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

/// `edgeproxy check` for the `nftables` layout: our tables and chains, any nat chain of another
/// table that runs before ours (`NOT_FIRST`), and iptables chains of ours or of EdgeMesh left
/// in the nat table (`LEFTOVERS`: they would DNAT what this layout no longer proxies).
/// Which service ports take the kernel path in an `iptables-save` listing of the nat table, and
/// to how many endpoints (from [`KERNEL_CHAIN`]'s DNATs and their comments). Pure.
pub fn kernel_path_lines(save: &str) -> Vec<String> {
    let mut ports: Vec<(String, BTreeSet<String>)> = Vec::new();
    let head = format!("-A {KERNEL_CHAIN} ");
    for line in save.lines().filter(|l| l.starts_with(&head)) {
        let name = line.split("--comment \"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
        let Some(to) = line.split("--to-destination ").nth(1).and_then(|s| s.split_whitespace().next()) else {
            continue;
        };
        let key = format!("{name} on {}", line.split_whitespace().nth(3).unwrap_or("?"));
        match ports.iter_mut().find(|(k, _)| *k == key) {
            Some((_, eps)) => {
                eps.insert(to.to_string());
            }
            None => ports.push((key, BTreeSet::from([to.to_string()]))),
        }
    }
    ports
        .into_iter()
        .map(|(k, eps)| format!("kernel path: {k} -> {}", eps.into_iter().collect::<Vec<_>>().join(" ")))
        .collect()
}

pub fn check_nftables(bins: Binaries) -> CheckReport {
    let mut r = CheckReport { backend: "nftables", ..Default::default() };
    let (lines, installed, ahead) = match check_lines() {
        Ok(x) => x,
        Err(e) => {
            r.lines.push(format!("cannot list the nftables ruleset: {e}"));
            r.code = exit::CANNOT_READ;
            return r;
        }
    };
    r.lines.push("layout: nftables (tables ip/ip6 edgeproxy)".into());
    r.lines.extend(lines);
    r.lines.extend(super::nftables::listing::kernel_path_lines());
    r.lines.extend(ahead.iter().map(|a| format!("ahead of ours: {a}")));
    let mut leftovers = Vec::new();
    if let Ok(v4) = save_table(&bins, Family::V4, "nat") {
        for c in chains_in(&v4, |c| OWN_CHAINS.contains(&c) || c.starts_with("EDGEMESH-")) {
            leftovers.push(format!("IPv4 iptables chain {c} (an iptables layout's or EdgeMesh's)"));
        }
    }
    for l in &leftovers {
        r.lines.push(format!("leftover: {l}"));
    }
    r.code = if !installed {
        exit::NOT_INSTALLED
    } else if !ahead.is_empty() {
        exit::NOT_FIRST
    } else if !leftovers.is_empty() {
        exit::LEFTOVERS
    } else {
        exit::OK
    };
    r
}
