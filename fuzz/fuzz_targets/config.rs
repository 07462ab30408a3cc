//! Any text as edgeproxy's config file: never a panic; an accepted config holds its ranges.
#![no_main]
use edgeproxy::config::{Config, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Config::from_text(text, "fuzz", &Overrides::default()) {
            assert!(!c.guard_period.is_zero() && !c.resync_period.is_zero() && !c.dial_timeout.is_zero());
            assert!(c.udp_max_flows >= 1 && c.listen.tcp_port != 0 && c.listen.reject_port != 0);
            assert!(!c.listen.ip.is_unspecified() && !c.listen.ip.is_loopback());
        }
    }
});
