//! Out of file descriptors: the proxy pauses accepting (100 ms at a time) instead of spinning,
//! and serves the waiting connection once descriptors are free again. Its own test binary,
//! because it lowers this process's RLIMIT_NOFILE.
mod proxy_support;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use proxy_support::*;
use socket2::{Domain, Socket, Type};

fn set_soft_limit(n: u64) {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = n.min(rl.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn accept_pauses_on_emfile_and_recovers() {
    let t = Topo::new(test_config());
    let addr: SocketAddr = WEB.parse().unwrap();
    let sock = Topo::in_ns(&t.pod, || Socket::new(Domain::IPV4, Type::STREAM, None).unwrap());
    // The next descriptor number; with the soft limit there, no new descriptor can be opened.
    let next = std::fs::File::open("/dev/null").map(|f| std::os::fd::AsRawFd::as_raw_fd(&f)).unwrap();
    set_soft_limit(u64::try_from(next).unwrap());
    // connect() needs no new descriptor; the proxy's accept() does, and fails with EMFILE.
    sock.connect(&addr.into()).unwrap();
    std::thread::sleep(Duration::from_millis(550));
    let pauses = t.stats.accept_fd_exhausted.get();
    set_soft_limit(u64::MAX);
    assert!((3..=8).contains(&pauses), "{pauses} EMFILE pauses in 550 ms: expected one per 100 ms");
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let id = greeting(&mut s).unwrap();
    assert!(["b1", "b2", "b3"].contains(&id.as_str()), "{id}");
    assert_eq!(t.stats.total.tcp_ok.get(), 1);
}
