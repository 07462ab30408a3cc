//! Kernel pipes and splice(2), for the TCP relay's zero-copy path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Both ends of a non-blocking, close-on-exec kernel pipe.
#[derive(Debug)]
pub struct Pipe {
    pub r: OwnedFd,
    pub w: OwnedFd,
}

impl Pipe {
    /// pipe2(O_NONBLOCK | O_CLOEXEC).
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two new descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        Ok(unsafe { Pipe { r: OwnedFd::from_raw_fd(fds[0]), w: OwnedFd::from_raw_fd(fds[1]) } })
    }

    /// F_SETPIPE_SZ: the kernel may refuse (over fs.pipe-max-size or the user's pipe budget).
    pub fn set_capacity(&self, bytes: usize) -> io::Result<()> {
        let arg = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fcntl on a descriptor this pipe owns.
        match unsafe { libc::fcntl(self.w.as_raw_fd(), libc::F_SETPIPE_SZ, arg) } {
            n if n >= 0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// F_GETPIPE_SZ.
    pub fn capacity(&self) -> io::Result<usize> {
        // SAFETY: fcntl on a descriptor this pipe owns.
        let n = unsafe { libc::fcntl(self.w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// splice(2) of up to `len` bytes between a socket and a pipe, never blocking on the pipe.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: the caller keeps both descriptors open for the call (they are owned by its streams
    // and pipe; a closed one fails with EBADF, nothing worse); null offsets are required for
    // sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
