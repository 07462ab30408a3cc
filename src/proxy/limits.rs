//! Process limits the proxy depends on: the open-file limit, and recognising its exhaustion.
//!
//! Owns `RLIMIT_NOFILE` handling only. It never exits the process and never retries anything
//! itself: callers decide (the accept loop pauses briefly on EMFILE/ENFILE).

use std::io;

use crate::sys::rlimit;

/// The open-file limits after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimits {
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before raising.
    pub before: u64,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Each proxied TCP connection holds two
/// descriptors and each UDP flow one, so the usual soft limit of 1024 caps the proxy at about
/// 500 connections for no reason.
pub fn raise_nofile() -> io::Result<FileLimits> {
    let (before, hard) = rlimit::nofile()?;
    if before < hard {
        rlimit::set_nofile(hard, hard)
            .map_err(|e| io::Error::new(e.kind(), format!("setrlimit(RLIMIT_NOFILE, {hard}): {e}")))?;
    }
    Ok(FileLimits { soft: before.max(hard), hard, before })
}

/// EMFILE (this process) or ENFILE (the whole system) out of descriptors.
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let l = raise_nofile().unwrap();
        assert_eq!(l.soft, l.hard);
        assert!(l.before <= l.soft);
    }

    #[test]
    fn exhaustion_is_recognised() {
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }
}
