//! The real API-server captures the tests replay: `../shared/fixtures/monitoring-cluster` beside
//! the checkout (CI lays `shared/` there), or the folder named by `EDGEPROXY_FIXTURES`. The one
//! place tests and examples find them; a missing fixture fails the test with the path it tried.
#![allow(dead_code)]

use std::path::PathBuf;

/// The monitoring-cluster capture folder.
pub fn dir() -> PathBuf {
    match std::env::var_os("EDGEPROXY_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/monitoring-cluster"),
    }
}

/// The path of one capture file.
pub fn path(name: &str) -> PathBuf {
    dir().join(name)
}

/// The bytes of one capture file; panics naming the path (CI puts ../shared beside the checkout).
pub fn read(name: &str) -> Vec<u8> {
    let p = path(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!("fixture {}: {e} (../shared must lie beside the checkout, or set EDGEPROXY_FIXTURES)", p.display())
    })
}
