//! Any text as an HTTP request head to the ops endpoint: never a panic; a parsed path is a
//! prefix of the request target.
#![no_main]
use edgeproxy::ops::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(req) = parse_head(text) {
            assert!(text.contains(req.path) && !req.method.contains(' '));
        }
    }
});
