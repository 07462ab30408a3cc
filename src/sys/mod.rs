//! Every `unsafe` of the crate: thin, safe wrappers over the few system calls that neither std
//! nor socket2 offer. Each function states what it wraps; each `unsafe` block says why it is
//! sound. Nothing here holds state or policy: callers decide what to do with a failure.
//!
//! The rest of the crate is compiled with `#![deny(unsafe_code)]` (see `lib.rs`).

pub mod netfilter;
pub mod pipe;
pub mod rlimit;
pub mod sockopt;

/// Is this process running as root (effective uid 0)?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
