//! Reading what `iptables-save` and `iptables -S` print (pure): which chain a rule is in, where
//! a rule jumps, a table's chains and their rules, kubelet's canaries and kube-proxy's jump,
//! and whose `KUBE-PORTALS-*` chains these are.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::TableRules;

/// The chain a `-A CHAIN ...` line appends to.
pub(super) fn chain_of(rule: &str) -> Option<&str> {
    let rest = rule.strip_prefix("-A ")?;
    // A byte search: this runs for every rule on every sync.
    let name = rest.split(' ').next()?;
    (!name.is_empty()).then_some(name)
}

/// The target of a `-A CHAIN ... -j TARGET` (or `-g TARGET`) line.
pub(super) fn jump_target(line: &str) -> Option<&str> {
    let idx = line.rfind(" -j ").or_else(|| line.rfind(" -g "))?;
    line[idx + 4..].split_whitespace().next()
}

/// The rules of `t` that go into `chain`, in order.
pub(super) fn rules_of<'a>(t: &'a TableRules, chain: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    t.rules.iter().filter(move |r| chain_of(r) == Some(chain))
}

/// One table as `iptables-save` printed it: declared chains and their `-A` lines.
pub(super) struct Listing<'a> {
    chains: BTreeMap<&'a str, Vec<String>>,
}

impl<'a> Listing<'a> {
    pub(super) fn parse(save: &'a str) -> Listing<'a> {
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
    pub(super) fn chain(&self, name: &str) -> Option<&[String]> {
        self.chains.get(name).map(Vec::as_slice)
    }
}

/// The user chains of an `iptables-save` table text that `pick` selects.
pub(super) fn chains_in(save: &str, pick: impl Fn(&str) -> bool) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| pick(c))
        .map(str::to_string)
        .collect()
}

pub(super) fn has_canary(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY "))
}

pub(super) fn has_kube_proxy_chain(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":KUBE-SERVICES ") || l.starts_with(":KUBE-PROXY-CANARY "))
}

/// kube-proxy serves ClusterIPs on this node: its `KUBE-SERVICES` chain is jumped to from
/// PREROUTING or OUTPUT (a chain left behind without its jumps serves nothing). The one
/// definition used by the agent, `rules --kube-proxy auto` and `check`.
pub(super) fn has_kube_proxy_jump(save: &str) -> bool {
    save.lines().any(|l| {
        (l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT ")) && jump_target(l) == Some("KUBE-SERVICES")
    })
}

pub(super) fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Do `KUBE-PORTALS-*`/`KUBE-NODEPORT-*` hold rules of kube-proxy's userspace mode (a
/// `REDIRECT`, or a DNAT to an address other than the proxy's)?
pub(super) fn userspace_owned(nat: &str, proxy_ips: &[IpAddr]) -> bool {
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

/// From `iptables -S EDGEPROXY-NO-ENDPOINTS -v`: per service port (the rule's comment, less its
/// " has no endpoints"), the packets its reject rule matched. NAT sees only a connection's first
/// packet, so these are refused connections (TCP) or flows (UDP).
pub(super) fn refusal_counts(listing: &str) -> Vec<(String, u64)> {
    listing
        .lines()
        .filter(|l| l.starts_with("-A "))
        .filter_map(|l| {
            let comment = l.split("--comment \"").nth(1)?.split('"').next()?;
            let name = comment.strip_suffix(" has no endpoints")?;
            let packets = l.split(" -c ").nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((name.to_string(), packets))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_counts_are_read_from_the_verbose_listing() {
        let l = "-N EDGEPROXY-NO-ENDPOINTS\n-A EDGEPROXY-NO-ENDPOINTS -d 10.96.0.51/32 -p tcp -m comment --comment \"t/quiet:http has no endpoints\" -m tcp --dport 80 -c 7 420 -j DNAT --to-destination 169.254.96.16:15000\n-A EDGEPROXY-NO-ENDPOINTS -m comment --comment \"other\" -c 1 1 -j RETURN\n";
        assert_eq!(refusal_counts(l), [("t/quiet:http".to_string(), 7)]);
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
