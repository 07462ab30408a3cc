//! How talking to the API server fails: [`ClientError`], with a coarse [`ErrorKind`].
//!
//! Shared by the connection settings (unusable settings are [`ErrorKind::Config`]) and the HTTP
//! client (TLS, transport, timeouts, statuses, bodies). The kind is all the driver needs to pick
//! relist, backoff or resume; the message says what failed, names the server or file, and never
//! holds a secret.

use std::fmt;

/// What went wrong, coarsely: enough for the reflector to pick relist, backoff or resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Settings are unusable (missing CA, unreadable key, bad URL). Retrying will not help
    /// until a file changes.
    Config,
    /// The TLS handshake failed (unknown CA, bad certificate, rejected client certificate).
    Tls,
    /// Could not connect, or the connection broke.
    Transport,
    /// Nothing arrived within the idle (per-read) or connect timeout.
    Timeout,
    /// The server answered with a non-2xx status.
    Status(u16),
    /// A response body broke the rules (too large, truncated).
    Body,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ClientError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ClientError {
        ClientError { kind, message: message.into() }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}
