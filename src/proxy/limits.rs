//! Process limits the proxy depends on: the open-file limit, and recognising its exhaustion.
//!
//! Owns `RLIMIT_NOFILE` handling only. It never exits the process and never retries anything
//! itself: callers decide (the accept loop pauses briefly on EMFILE/ENFILE).

use std::io;

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
// `rlim_t` is 32 bits on some 32-bit targets, so the casts are not always no-ops.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile() -> io::Result<FileLimits> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = rl.rlim_cur as u64;
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising soft up to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("setrlimit(RLIMIT_NOFILE, {}): {e}", rl.rlim_max)));
        }
        rl = want;
    }
    Ok(FileLimits { soft: rl.rlim_cur as u64, hard: rl.rlim_max as u64, before })
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
