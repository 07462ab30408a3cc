//! Every `unsafe` of the crate: thin, safe wrappers over the few system calls that neither std
//! nor socket2 offer. Each function states what it wraps; each `unsafe` block says why it is
//! sound. Nothing here holds state or policy: callers decide what to do with a failure.
//!
//! The rest of the crate is compiled with `#![deny(unsafe_code)]` (see `lib.rs`).

pub mod affinity;
pub mod netfilter;
pub mod pipe;
pub mod rlimit;
pub mod sockopt;

/// Is this process running as root (effective uid 0)?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Let SIGPIPE end the process again, as for any command-line tool (Rust ignores it, so a
/// write to a closed pipe, `edgeproxy rules | head`, would panic instead). Not for the agent,
/// whose sockets must see EPIPE as an error.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no memory preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
