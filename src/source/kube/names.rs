//! Kubernetes' own validation of the names and addresses edgeproxy puts into rules and dials,
//! applied at decode time to every object from every source (API server, MetaServer, file).
//!
//! The API server enforces these rules on what it stores, so a valid cluster never trips them;
//! they matter when the input is not what an API server would have accepted (a hand-written or
//! tampered file, a MetaServer's cache, a hostile peer posing as the API). A name that passes is
//! made only of `[a-z0-9.-]`, so it cannot end a quoted iptables comment, start a line or name a
//! table. (The renderer refuses such characters again on its own: defence in depth.)
//!
//! What Kubernetes checks, and so what we check:
//! - namespace and Service names: DNS-1123 labels (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63);
//!   Kubernetes is stricter for Service names (DNS-1035: must start with a letter); we accept the
//!   DNS-1123 superset, which is as safe for the rules.
//! - EndpointSlice and Endpoints object names: DNS-1123 subdomains (labels joined by dots, <= 253).
//! - service and endpoint port names: DNS-1123 labels (`ValidateServicePort`,
//!   `validateEndpointPort`); a named `targetPort`: IANA_SVC_NAME (<= 15, at least one letter,
//!   no `--`).
//! - cluster IPs and endpoint addresses: not unspecified, loopback, link-local or multicast
//!   (`ValidateNonSpecialIP`), and for IPv4 not the broadcast address. The proxy's own address is
//!   configuration, not an object property: `state` refuses it when it resolves backends.

use std::net::IpAddr;

/// Why a name is not a DNS-1123 label (`None`: it is one).
pub fn dns1123_label(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 63 {
        return Some(format!("is {} characters long; at most 63 (a DNS-1123 label)", s.len()));
    }
    label_chars(s)
}

/// Why a name is not a DNS-1123 subdomain (`None`: it is one).
pub fn dns1123_subdomain(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 253 {
        return Some(format!("is {} characters long; at most 253 (a DNS-1123 subdomain)", s.len()));
    }
    s.split('.').find_map(|part| {
        if part.is_empty() {
            Some(format!("{} has an empty label between dots (a DNS-1123 subdomain)", shown(s)))
        } else {
            label_chars(part).map(|why| why.replacen("a DNS-1123 label", "a DNS-1123 subdomain", 1))
        }
    })
}

fn label_chars(s: &str) -> Option<String> {
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Some(format!("{} contains {c:?}; only a-z, 0-9 and '-' (a DNS-1123 label)", shown(s)));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some(format!("{} must start and end with a letter or digit (a DNS-1123 label)", shown(s)));
    }
    None
}

/// Why a name is not an IANA service name (`None`: it is one): a named `targetPort`.
pub fn iana_svc_name(s: &str) -> Option<String> {
    if s.len() > 15 {
        return Some(format!("{} is {} characters long; at most 15 (IANA_SVC_NAME)", shown(s), s.len()));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Some(format!("{} contains {c:?}; only a-z, 0-9 and '-' (IANA_SVC_NAME)", shown(s)));
    }
    if !s.chars().any(|c| c.is_ascii_lowercase()) {
        return Some(format!("{} must contain at least one letter (IANA_SVC_NAME)", shown(s)));
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Some(format!("{} must not start or end with '-' nor contain '--' (IANA_SVC_NAME)", shown(s)));
    }
    None
}

/// Why an address cannot be a cluster IP or an endpoint (`None`: it can).
pub fn special_ip(ip: &IpAddr) -> Option<&'static str> {
    let why = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => "the unspecified address",
        IpAddr::V4(v4) if v4.is_loopback() => "a loopback address",
        IpAddr::V4(v4) if v4.is_link_local() => "a link-local address",
        IpAddr::V4(v4) if v4.is_multicast() => "a multicast address",
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address",
        IpAddr::V6(v6) if v6.is_unspecified() => "the unspecified address",
        IpAddr::V6(v6) if v6.is_loopback() => "a loopback address",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => "a link-local address",
        IpAddr::V6(v6) if v6.is_multicast() => "a multicast address",
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // An IPv4-mapped address is another spelling of an IPv4 one: judge that one.
            Some(v4) => return special_ip(&IpAddr::V4(v4)).or(Some("an IPv4-mapped IPv6 address")),
            None => return None,
        },
        IpAddr::V4(_) => return None,
    };
    Some(why)
}

/// A name for messages and logs: as it is when it is harmless, else escaped and cut, so that a
/// hostile name cannot forge log lines or flood them.
pub fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let plain = s.len() <= MAX && s.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
    if plain {
        return format!("{s:?}");
    }
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_default).collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_as_kubernetes_validates_them() {
        for ok in ["a", "web", "kube-dns", "a1", "1a", &"x".repeat(63)] {
            assert_eq!(dns1123_label(ok), None, "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "q\"uote", "back\\slash", "x\n-A INPUT", &"x".repeat(64), "ä"] {
            assert!(dns1123_label(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn subdomains_allow_dots_but_not_empty_labels() {
        for ok in ["web-abc12", "a.b.c", &format!("{}.{}", "a".repeat(63), "b".repeat(63))] {
            assert_eq!(dns1123_subdomain(ok), None, "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "A.b", "a.-b", &"a.".repeat(127)] {
            assert!(dns1123_subdomain(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn iana_service_names() {
        for ok in ["http", "https-metrics", "dns-tcp", "x1"] {
            assert_eq!(iana_svc_name(ok), None, "{ok}");
        }
        for bad in ["", "123", "a--b", "-a", "toolongservicename", "HTTP"] {
            assert!(iana_svc_name(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn special_addresses_are_named() {
        for (ip, want) in [
            ("0.0.0.0", Some("the unspecified address")),
            ("127.0.0.5", Some("a loopback address")),
            ("169.254.96.16", Some("a link-local address")),
            ("224.0.0.1", Some("a multicast address")),
            ("255.255.255.255", Some("the broadcast address")),
            ("::", Some("the unspecified address")),
            ("::1", Some("a loopback address")),
            ("fe80::1", Some("a link-local address")),
            ("ff02::1", Some("a multicast address")),
            ("::ffff:127.0.0.1", Some("a loopback address")),
            ("::ffff:10.0.0.1", Some("an IPv4-mapped IPv6 address")),
            ("10.96.0.10", None),
            ("fd00::10", None),
            ("2001:db8::1", None),
        ] {
            assert_eq!(special_ip(&ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn shown_escapes_and_cuts() {
        assert_eq!(shown("web"), "\"web\"");
        assert_eq!(shown("a\"b\nc"), "\"a\\\"b\\nc\"");
        let long = shown(&"x".repeat(500));
        assert!(long.len() < 100 && long.ends_with("...\""), "{long}");
    }
}
