//! [`Secret`]: bytes that must never be printed (bearer tokens, private keys).
//!
//! The one wrapper every secret travels in, from the kubeconfig reader and the connection
//! settings to the HTTP client: its `Debug` says `Secret(<redacted>)`, it has no `Display`, and
//! the bytes come out only through [`Secret::expose`], for TLS or an `Authorization` header.

use std::fmt;

/// Bytes that must never be printed: tokens, private keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes.into_boxed_slice())
    }

    /// The secret itself. Only for handing it to TLS or to an `Authorization` header.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
