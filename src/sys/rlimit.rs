//! RLIMIT_NOFILE: read it, set it.

use std::io;

/// The open-file limit as (soft, hard).
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // `rlim_t` is 32 bits on some 32-bit targets, 64 elsewhere: widening only.
    #[allow(clippy::useless_conversion)]
    Ok((u64::from(rl.rlim_cur), u64::from(rl.rlim_max)))
}

/// Set the open-file limit (raising the soft limit up to the hard one needs no privilege).
pub fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let conv = |v: u64| libc::rlim_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let want = libc::rlimit { rlim_cur: conv(soft)?, rlim_max: conv(hard)? };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
