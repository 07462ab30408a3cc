//! What a restore transaction says (pure): which chains changed since the last sync, the input
//! that rewrites them (or all of them, with the jumps fixed), the input that removes chains, how
//! the jumps of a listing must be fixed, and which input line a failed restore blames.
//!
//! Every input is written by [`Transaction`](super::Transaction), the one writer of restore text.

use std::collections::BTreeMap;
use std::ops::Range;

use super::listing::{chain_of, chains_in, jump_target, rules_of};
use super::{Jump, TableRules, Transaction, OWN_CHAINS};

/// What the restore input must do to the jumps of one family.
#[derive(Debug, Default)]
pub(super) struct JumpFix {
    /// `-D`/`-I` lines, in order.
    pub(super) lines: Vec<String>,
    /// Human-readable findings, for the log.
    pub(super) found: Vec<String>,
    /// kube-proxy's jump into KUBE-SERVICES is in PREROUTING or OUTPUT.
    pub(super) kube_proxy: bool,
}

/// [`jump_fix`] on listings already read (`-A` lines of PREROUTING and OUTPUT).
pub(super) fn jump_fix_from(pre: &[String], out: &[String], wanted: &[Jump]) -> JumpFix {
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

/// The chains of `want` whose content differs from `last` or that `last` did not have, and the
/// chains of `last` that `want` no longer has.
pub(super) fn changed_chains(last: &TableRules, want: &TableRules) -> (Vec<&'static str>, Vec<&'static str>) {
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
pub(super) fn carry_over(mut last: TableRules, want: &TableRules, changed: &[&'static str]) -> TableRules {
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
pub(super) fn restore_input(
    want: &TableRules,
    chains: &[&'static str],
    jump_lines: &[String],
    stale: &[&str],
) -> String {
    let written = |r: &&String| chain_of(r).is_some_and(|c| chains.contains(&c));
    let mut t = Transaction::new("nat", want.rules.iter().filter(written).map(|r| r.len() + 1).sum());
    // Declared in the set's order, whatever the order of `chains`.
    want.chains.iter().filter(|c| chains.contains(c)).chain(stale).for_each(|c| t.declare(c));
    want.rules.iter().filter(written).for_each(|r| t.line(r));
    jump_lines.iter().for_each(|l| t.line(l));
    stale.iter().for_each(|c| t.delete_chain(c));
    t.commit()
}

/// Compare one chain's listing (`None`: it does not exist) with what `want` puts in it.
pub(super) fn compare_chain(chain: &str, listed: Option<&[String]>, want: &TableRules, found: &mut Vec<String>) {
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

/// A restore input for `table` that deletes every rule jumping into a picked chain from a chain
/// not picked, flushes the picked chains and deletes them. `None` when none of them is present.
pub(super) fn removal_input(table: &str, save: &str, pick: impl Fn(&str) -> bool) -> Option<String> {
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
    let mut t = Transaction::new(table, deletes.iter().map(|d| d.len() + 1).sum());
    chains.iter().for_each(|c| t.declare(c));
    deletes.iter().for_each(|d| t.line(d));
    chains.iter().for_each(|c| t.delete_chain(c));
    Some(t.commit())
}

/// The input line a restore failed on, and a few lines of context around it.
///
/// iptables says `Error occurred at line: N`. iptables-nft checks some errors (an unknown
/// target chain) only at `COMMIT` and then blames that line; in that case the name it quotes in
/// its message is looked up in the input to find the rule at fault.
pub(super) fn blame(input: &str, stderr: &str) -> (Option<usize>, String) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::listing::Listing;

    fn set(container: &[&str], no_endpoints: &[&str]) -> TableRules {
        let mut rules: Vec<String> = container.iter().map(|r| format!("-A KUBE-PORTALS-CONTAINER {r}")).collect();
        rules.extend(no_endpoints.iter().map(|r| format!("-A EDGEPROXY-NO-ENDPOINTS {r}")));
        TableRules { chains: vec!["KUBE-PORTALS-CONTAINER", "EDGEPROXY-NO-ENDPOINTS"], rules, jumps: Vec::new() }
    }

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
        let text = removal_input("nat", save, |c| OWN_CHAINS.contains(&c)).unwrap();
        assert_eq!(
            text,
            "*nat\n:EDGE-MESH - [0:0]\n:EDGE-MESH-TCP - [0:0]\n-D PREROUTING -m comment --comment \"edgemesh root chain\" -j EDGE-MESH\n-X EDGE-MESH\n-X EDGE-MESH-TCP\nCOMMIT\n"
        );
        assert!(removal_input("nat", "*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", |c| OWN_CHAINS.contains(&c)).is_none());
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
