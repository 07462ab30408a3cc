//! A stand-in for systemd's notification socket: bind a datagram socket, hand its name to a
//! process as `$NOTIFY_SOCKET`, collect what it sends with a deadline.
//!
//! ```ignore
//! let l = NotifyListener::bind();
//! let child = Command::new(bin).env("NOTIFY_SOCKET", l.env_value()).spawn()?;
//! l.wait_for("READY=1", Duration::from_secs(10)).expect("READY=1 after the first sync");
//! ```
#![allow(dead_code)]

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One listening notification socket; the socket file (if any) goes away on drop.
pub struct NotifyListener {
    sock: UnixDatagram,
    /// The value to put in `$NOTIFY_SOCKET`.
    value: OsString,
    dir: Option<PathBuf>,
    /// Every message received so far, in order.
    pub received: Vec<String>,
}

impl NotifyListener {
    /// A path socket in a fresh directory under the temp dir.
    pub fn bind() -> NotifyListener {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ep-notify-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        NotifyListener { sock, value: path.into_os_string(), dir: Some(dir), received: Vec::new() }
    }

    /// An abstract-namespace socket (`$NOTIFY_SOCKET` = `@name`).
    pub fn bind_abstract() -> NotifyListener {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("ep-notify-{}-{n}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let sock = UnixDatagram::bind_addr(&addr).unwrap_or_else(|e| panic!("cannot bind @{name}: {e}"));
        NotifyListener { sock, value: format!("@{name}").into(), dir: None, received: Vec::new() }
    }

    /// The value for `$NOTIFY_SOCKET`.
    pub fn env_value(&self) -> OsString {
        self.value.clone()
    }

    /// Receive one datagram, waiting at most `timeout`; `None` when none came.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<String> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(timeout)).expect("set_read_timeout");
        let mut buf = vec![0u8; 64 * 1024];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.received.push(msg.clone());
                Some(msg)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("notify socket recv: {e}"),
        }
    }

    /// Wait until a message has a line equal to `line` (e.g. `READY=1`). Returns every message
    /// received by this call on success; on timeout, `Err` with them, for the failure message.
    pub fn wait_for(&mut self, line: &str, within: Duration) -> Result<Vec<String>, Vec<String>> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(got);
            }
            if let Some(m) = self.recv_timeout(left) {
                let hit = m.lines().any(|l| l == line);
                got.push(m);
                if hit {
                    return Ok(got);
                }
            }
        }
    }

    /// Collect everything that arrives during `window`.
    pub fn collect(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            if let Some(m) = self.recv_timeout(left) {
                got.push(m);
            }
        }
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
