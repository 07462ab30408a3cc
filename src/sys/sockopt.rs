//! Socket options socket2 does not offer.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

/// SO_RCVBUFFORCE: a receive buffer of `bytes` past net.core.rmem_max (needs CAP_NET_ADMIN).
pub fn force_recv_buffer(socket: &impl AsFd, bytes: usize) -> io::Result<()> {
    force_buffer(socket, libc::SO_RCVBUFFORCE, bytes)
}

/// SO_SNDBUFFORCE: a send buffer of `bytes` past net.core.wmem_max (needs CAP_NET_ADMIN); a
/// netlink message must fit the sender's buffer whole.
pub fn force_send_buffer(socket: &impl AsFd, bytes: usize) -> io::Result<()> {
    force_buffer(socket, libc::SO_SNDBUFFORCE, bytes)
}

fn force_buffer(socket: &impl AsFd, option: libc::c_int, bytes: usize) -> io::Result<()> {
    let want = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("an int's size fits");
    // SAFETY: setsockopt on a descriptor the caller owns, with a pointer to a c_int that outlives
    // the call and its size.
    let rc = unsafe {
        libc::setsockopt(socket.as_fd().as_raw_fd(), libc::SOL_SOCKET, option, (&raw const want).cast(), len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
