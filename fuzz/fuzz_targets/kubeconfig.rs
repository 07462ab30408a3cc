//! Any text as a kubeconfig: never a panic, never a memory bomb (aliases, depth, size refused).
#![no_main]
use edgeproxy::source::kube::kubeconfig::from_str;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = from_str(text, std::path::Path::new("/nonexistent"));
    }
});
