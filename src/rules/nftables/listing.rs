//! Reading the ruleset with the `nft` binary (the guard's chain listing, `check`, looking for
//! kube-proxy), and the pure parsing of what it prints. The applier writes; this reads.

use std::collections::BTreeMap;

use super::{keyword, KERNEL_CHAIN, PRIORITY, TABLE};
use crate::rules::iptables::{self, ApplyError};
use crate::rules::{Family, Flavour};

/// The binary.
pub const NFT: &str = "nft";

/// `nft ARGS` (with `stdin`), as one process.
pub(super) fn run(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, ApplyError> {
    crate::exec::run(NFT, args, stdin).map_err(|error| ApplyError::Spawn { binary: NFT.into(), error })
}

/// kube-proxy's nftables tables (`ip kube-proxy`), its iptables-nft `KUBE-SERVICES` chain, or its
/// jump in iptables-legacy: two processes, however big the ruleset.
pub fn kube_proxy_present() -> bool {
    // kube-proxy's nftables mode, and its iptables-nft chains, are in the nftables ruleset.
    let in_nft = list_chains()
        .is_ok_and(|c| c.iter().any(|c| c.table == "kube-proxy" || (c.table == "nat" && c.name == "KUBE-SERVICES")));
    in_nft || iptables::kube_proxy_present(Flavour::Legacy).unwrap_or(false)
}

/// Every chain of the ruleset (`nft -j list chains`: cheap, no rules, no set elements).
pub fn list_chains() -> Result<Vec<ListedChain>, ApplyError> {
    let out = run(&["-j", "list", "chains"], None)?;
    if !out.status.success() {
        return Err(ApplyError::Read { binary: NFT.into(), stderr: String::from_utf8_lossy(&out.stderr).into() });
    }
    Ok(parse_chains(&String::from_utf8_lossy(&out.stdout)))
}

/// What is missing of our chains in `listed` for `families`: each nat, on its hook, at our
/// priority (empty: all in place).
pub fn missing_chains(listed: &[ListedChain], families: &[Family]) -> Vec<String> {
    let mut missing = Vec::new();
    for f in families {
        let kw = keyword(*f);
        for hook in ["prerouting", "output"] {
            let ok = listed.iter().any(|c| {
                c.family == kw
                    && c.table == TABLE
                    && c.name == hook
                    && c.hook.as_deref() == Some(hook)
                    && c.kind.as_deref() == Some("nat")
                    && c.prio == i64::from(PRIORITY)
            });
            if !ok {
                missing.push(format!("{kw} {TABLE}: nat chain {hook} at priority {PRIORITY} missing"));
            }
        }
    }
    missing
}

/// `edgeproxy check` for this layout: our tables and their chains, and every other nat chain on
/// prerouting or output at a priority that runs before ours.
pub fn check_lines() -> Result<(Vec<String>, bool, Vec<String>), ApplyError> {
    let chains = list_chains()?;
    let mut lines = Vec::new();
    let mut ahead = Vec::new();
    let mut installed = true;
    for (fam, hook) in [("ip", "prerouting"), ("ip", "output")] {
        match chains.iter().find(|c| c.family == fam && c.table == TABLE && c.hook.as_deref() == Some(hook)) {
            Some(c) => lines.push(format!("{fam} {TABLE}: chain {} on {hook} at priority {}", c.name, c.prio)),
            None => {
                installed = false;
                lines.push(format!("{fam} {TABLE}: no chain on {hook}"));
            }
        }
    }
    for c in &chains {
        let nat = c.kind.as_deref() == Some("nat");
        let hooked = matches!(c.hook.as_deref(), Some("prerouting" | "output"));
        if nat
            && hooked
            && c.table != TABLE
            && c.prio <= i64::from(PRIORITY)
            && matches!(c.family.as_str(), "ip" | "ip6" | "inet")
        {
            ahead.push(format!(
                "{} {} chain {} on {} at priority {}: runs before ours",
                c.family,
                c.table,
                c.name,
                c.hook.as_deref().unwrap_or("?"),
                c.prio
            ));
        }
    }
    lines.push(format!("kube-proxy: {}", if kube_proxy_present() { "present" } else { "absent" }));
    Ok((lines, installed, ahead))
}

/// `check`: the kernel-path service ports in our tables' `kernel` chains, and their endpoints.
pub fn kernel_path_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for f in [Family::V4, Family::V6] {
        let kw = keyword(f);
        let Ok(out) = run(&["list", "table", kw, TABLE], None) else { continue };
        if out.status.success() {
            lines.extend(kernel_ports_in(&String::from_utf8_lossy(&out.stdout)));
        }
    }
    lines
}

/// From `nft list table` text (pure): per kernel-path port its endpoints, by following the
/// `kernel` chain's verdict maps to the `ep-` chains' DNATs.
pub fn kernel_ports_in(listing: &str) -> Vec<String> {
    let mut dnat_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut chain = "";
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ").and_then(|s| s.strip_suffix(" {")) {
            chain = name;
        } else if line.contains("dnat ") {
            dnat_of.insert(chain, line.rsplit(' ').next().unwrap_or("?"));
        }
    }
    let mut out = Vec::new();
    let mut in_kernel = false;
    for line in listing.lines().map(str::trim) {
        if line.starts_with("chain ") {
            in_kernel = line == format!("chain {} {{", KERNEL_CHAIN);
            continue;
        }
        if !in_kernel || !line.contains(" vmap ") {
            continue;
        }
        let name = line.split("comment \"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
        let dest = line.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
        let eps: Vec<&str> = line
            .split("goto ")
            .skip(1)
            .filter_map(|s| s.split([',', ' ', '}']).next())
            .map(|c| dnat_of.get(c).copied().unwrap_or("?"))
            .collect();
        out.push(format!("kernel path: {name} on {dest} -> {}", eps.join(" ")));
    }
    out
}

/// One base or regular chain of `nft -j list chains`.
#[derive(Debug, PartialEq, Eq)]
pub struct ListedChain {
    pub family: String,
    pub table: String,
    pub name: String,
    pub kind: Option<String>,
    pub hook: Option<String>,
    pub prio: i64,
}

/// The chains of `nft -j list chains` output (unknown or malformed entries are skipped).
pub fn parse_chains(json: &str) -> Vec<ListedChain> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let items = v.get("nftables").and_then(|n| n.as_array()).cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|i| i.get("chain"))
        .filter_map(|c| {
            let s = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            Some(ListedChain {
                family: s("family")?,
                table: s("table")?,
                name: s("name")?,
                kind: s("type"),
                hook: s("hook"),
                prio: c.get("prio").and_then(serde_json::Value::as_i64).unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_chains_parse_and_garbage_gives_none() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "edgeproxy", "name": "prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -101, "policy": "accept"}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "services", "handle": 2}}]}"#;
        let c = parse_chains(json);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].hook.as_deref(), c[0].prio), (Some("prerouting"), -101));
        assert_eq!(c[1].hook, None);
        assert!(parse_chains("not json").is_empty());
        assert!(parse_chains(r#"{"nftables": 3}"#).is_empty());
    }

    #[test]
    fn the_guard_wants_both_chains_nat_on_their_hooks_at_our_priority() {
        let chain = |family: &str, name: &str, prio: i64| ListedChain {
            family: family.into(),
            table: TABLE.into(),
            name: name.into(),
            kind: Some("nat".into()),
            hook: Some(name.into()),
            prio,
        };
        let good = vec![chain("ip", "prerouting", -101), chain("ip", "output", -101)];
        assert!(missing_chains(&good, &[Family::V4]).is_empty());
        assert_eq!(missing_chains(&good, &[Family::V4, Family::V6]).len(), 2, "no ip6 table");
        let moved = vec![chain("ip", "prerouting", -101), chain("ip", "output", 0)];
        assert_eq!(missing_chains(&moved, &[Family::V4]), ["ip edgeproxy: nat chain output at priority -101 missing"]);
        assert_eq!(missing_chains(&[], &[Family::V4]).len(), 2, "flushed");
    }
}
