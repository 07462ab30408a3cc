use std::net::Ipv4Addr;

use super::*;

fn from_json(text: &str) -> Result<Config, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let f: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| ConfigError {
        origin: "test".into(),
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })?;
    Config::build(f, "test", &Overrides::default())
}

#[test]
fn defaults_are_edgemesh_like() {
    let c = Config::defaults();
    // The newest EdgeMesh generation (v1.17): noproxy=edgemesh is gone since v1.10.
    assert_eq!(c.profile, Profile::V1_17);
    assert_eq!(c.filter.mode, FilterMode::FilterIfLabelExists);
    assert!(!c.filter.no_proxy_label);
    assert_eq!(c.filter.default_ignores, DefaultIgnores::Auto);
    assert_eq!(c.layout, Layout::Portals);
    assert_eq!(c.listen.ip, Ipv4Addr::new(169, 254, 96, 16));
    assert_eq!(c.source.meta_server, "http://127.0.0.1:10550");
}

#[test]
fn unknown_field_names_its_path() {
    let e = from_json(r#"{"udp": {"idleTimeot": "5s"}}"#).unwrap_err();
    assert_eq!(e.path, "udp.idleTimeot");
    assert!(e.message.contains("unknown field"), "{e}");
}

#[test]
fn bad_filter_mode_lists_accepted_values() {
    let e = from_json(r#"{"serviceFilterMode": "FilterAll"}"#).unwrap_err();
    assert_eq!(e.path, "serviceFilterMode");
    assert!(e.message.contains("FilterIfLabelExists, FilterIfLabelDoesNotExists"), "{e}");
}

#[test]
fn bad_duration_names_field() {
    let e = from_json(r#"{"udp": {"idleTimeout": "5 parsecs"}}"#).unwrap_err();
    assert_eq!(e.to_string(), r#"test: udp.idleTimeout: invalid duration "5 parsecs" (use e.g. 250ms, 5s, 2m)"#);
}

#[test]
fn wrong_type_names_field() {
    let e = from_json(r#"{"listen": {"tcpPort": "http"}}"#).unwrap_err();
    assert_eq!(e.path, "listen.tcpPort");
}

#[test]
fn flags_override_file_and_name_the_flag() {
    let mut o = Overrides::default();
    o.set("layout", Some("root-chain"));
    let c = Config::build(FileConfig::default(), "f", &o).unwrap();
    assert_eq!(c.layout, Layout::RootChain);
    let mut o = Overrides::default();
    o.set("service-filter-mode", Some("nope"));
    let e = Config::build(FileConfig::default(), "f", &o).unwrap_err();
    assert_eq!(e.origin, "--service-filter-mode");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("s").is_err());
}

/// Settings that parse but make no sense are refused with the field and the accepted range
/// (a zero guard period would run iptables-save back to back; maxFlows 0 used to become 1).
#[test]
fn absurd_values_are_refused_with_field_and_range() {
    for (json, path, msg) in [
        (
            r#"{"iptables":{"guardPeriod":"0s"}}"#,
            "iptables.guardPeriod",
            "0ms is outside the accepted range 100ms..=3600s",
        ),
        (r#"{"iptables":{"resyncPeriod":"0"}}"#, "iptables.resyncPeriod", "outside the accepted range 5s..=86400s"),
        (r#"{"iptables":{"minSyncPeriod":"0ms"}}"#, "iptables.minSyncPeriod", "outside the accepted range 10ms..=300s"),
        (r#"{"tcp":{"dialTimeout":"0s"}}"#, "tcp.dialTimeout", "outside the accepted range 10ms..=60s"),
        (r#"{"tcp":{"dialAttempts":0}}"#, "tcp.dialAttempts", "0 is outside the accepted range 1..=10"),
        (r#"{"udp":{"idleTimeout":"10ms"}}"#, "udp.idleTimeout", "10ms is outside"),
        (r#"{"udp":{"maxFlows":0}}"#, "udp.maxFlows", "0 is outside the accepted range 1..=1048576"),
        (r#"{"source":{"pollInterval":"0"}}"#, "source.pollInterval", "outside the accepted range 1s..=3600s"),
        (r#"{"listen":{"rejectPort":0}}"#, "listen.rejectPort", "must not be 0"),
        (r#"{"listen":{"ip":"0.0.0.0"}}"#, "listen.ip", "cannot be the proxy's address"),
        (r#"{"listen":{"ip":"127.0.0.1"}}"#, "listen.ip", "cannot be the proxy's address"),
        (r#"{"listen":{"ip":"10.96.0.10"}}"#, "listen.ip", "lies inside serviceCIDRs 10.96.0.0/12"),
        (r#"{"listen":{"ipv6":"::"}}"#, "listen.ipv6", "cannot be the proxy's address"),
    ] {
        let e = from_json(json).expect_err(json);
        assert_eq!(e.path, path, "{json}: {e}");
        assert!(e.message.contains(msg), "{json}: {e}");
    }
    // The edges of each range are accepted.
    let c = from_json(r#"{"iptables":{"guardPeriod":"100ms","resyncPeriod":"5s"},"udp":{"maxFlows":1}}"#).unwrap();
    assert_eq!(
        (c.guard_period, c.resync_period, c.udp_max_flows),
        (Duration::from_millis(100), Duration::from_secs(5), 1)
    );
}

#[test]
fn timing_flags_take_the_checked_path_and_name_the_flag() {
    let mut o = Overrides::default();
    o.set("guard-period", Some("0s"));
    let e = Config::build(FileConfig::default(), "test", &o).unwrap_err();
    assert_eq!(e.origin, "--guard-period", "{e}");
    assert!(e.message.contains("outside the accepted range"), "{e}");
}

/// A profile sets the defaults of its generation; each setting still overrides its part.
#[test]
fn a_profile_sets_defaults_and_each_setting_overrides_them() {
    let c = from_json(r#"{"edgemesh":"v1.9"}"#).unwrap();
    assert_eq!(
        (c.profile, c.layout, c.filter.mode, c.filter.no_proxy_label),
        (Profile::V1_9, Layout::RootChain, FilterMode::None, true)
    );
    let c = from_json(
        r#"{"edgemesh":"v1.9","layout":"portals","noProxyLabel":false,"serviceFilterMode":"FilterIfLabelExists"}"#,
    )
    .unwrap();
    assert_eq!(
        (c.layout, c.filter.mode, c.filter.no_proxy_label),
        (Layout::Portals, FilterMode::FilterIfLabelExists, false)
    );
    let c = from_json(r#"{"edgemesh":"v1.17","noProxyLabel":true}"#).unwrap();
    assert!(c.filter.no_proxy_label);
    let e = from_json(r#"{"edgemesh":"v1.11"}"#).unwrap_err();
    assert_eq!(e.path, "edgemesh");
    assert!(e.message.contains("accepted values: v1.17, v1.9"), "{e}");
}

#[test]
fn the_tcp_port_may_take_the_default_udp_range_once_that_moves() {
    let c = from_json(r#"{"listen": {"udpPorts": "20000-20999", "tcpPort": 15500}}"#).unwrap();
    assert_eq!((c.listen.tcp_port, c.listen.udp_ports), (15500, (20000, 20999)));
    let e = from_json(r#"{"listen": {"udpPorts": "20000-20999", "tcpPort": 20500}}"#).unwrap_err();
    assert_eq!(e.path, "listen.tcpPort");
    assert!(from_json(r#"{"listen": {"tcpPort": 15500}}"#).is_err(), "inside the default UDP range");
}

#[test]
fn workers_are_auto_or_a_count_in_range_written_either_way() {
    use crate::proxy::Workers;
    use std::num::NonZeroU16;
    assert_eq!(Config::defaults().workers, Workers::Auto);
    assert_eq!(from_json(r#"{"workers": "auto"}"#).unwrap().workers, Workers::Auto);
    let two = Workers::Count(NonZeroU16::new(2).unwrap());
    assert_eq!(from_json(r#"{"workers": 2}"#).unwrap().workers, two);
    assert_eq!(from_json(r#"{"workers": "2"}"#).unwrap().workers, two);
    let mut o = Overrides::default();
    o.set("workers", Some("2"));
    assert_eq!(Config::from_text("{}", "test", &o).unwrap().workers, two);
    for (text, says) in [
        (r#"{"workers": 0}"#, "0 is outside the accepted range 1..=64 (or auto)"),
        (r#"{"workers": 65}"#, "65 is outside the accepted range 1..=64"),
        (r#"{"workers": "many\u001b"}"#, r#""many\u{1b}" is neither auto nor a number"#),
    ] {
        let e = from_json(text).unwrap_err();
        assert_eq!(e.path, "workers", "{text}: {e}");
        assert!(e.message.contains(says), "{text}: {e}");
    }
    assert!(!Config::defaults().pin_workers);
    assert!(from_json(r#"{"pinWorkers": true}"#).unwrap().pin_workers);
    // Neither a number nor a word: refused by the file's shape, naming the field.
    let e = from_json(r#"{"workers": true}"#).unwrap_err();
    assert_eq!(e.path, "workers", "{e}");
}
