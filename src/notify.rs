//! systemd's notification protocol (sd_notify(3)) without libsystemd: `READY=1`, `WATCHDOG=1`,
//! `STOPPING=1` and `STATUS=` datagrams to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path,
//! or `@name` for the Linux abstract namespace), and the watchdog interval from `$WATCHDOG_USEC`
//! / `$WATCHDOG_PID`.
//!
//! This module owns reading and *removing* those variables (so `iptables-restore` and other
//! children never inherit them) and sending the datagrams. It never decides *when* to send:
//! the agent sends READY after the first sync, WATCHDOG from its loop tick (so a wedged loop
//! really trips the watchdog) and STOPPING on SIGTERM. Without `$NOTIFY_SOCKET` every send is a
//! no-op, so the same binary runs under systemd, procd or a shell.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// The environment variables this module reads (and [`Notifier::from_env`] removes).
pub const ENV_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// A bad value in one of the notification variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyError {
    /// The variable, e.g. `WATCHDOG_USEC`.
    pub var: &'static str,
    pub message: String,
}

impl fmt::Display for NotifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}: {}", self.var, self.message)
    }
}

impl std::error::Error for NotifyError {}

/// Where the datagrams go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    /// Abstract namespace name, without the leading `@`.
    Abstract(Vec<u8>),
}

/// A connection to the service manager, or none (every send is then a no-op).
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Read `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`, then remove all three from
    /// the environment so child processes do not inherit them (like `sd_notify(unset_environment
    /// = 1)`). Call it early in `main`, before other threads start: changing the environment
    /// races with C code reading it on other threads. The variables are removed even when their
    /// values are bad.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let get = |k: &str| std::env::var_os(k);
        let (socket, usec, pid) = (get(ENV_VARS[0]), get(ENV_VARS[1]), get(ENV_VARS[2]));
        for k in ENV_VARS {
            std::env::remove_var(k);
        }
        Notifier::from_parts(socket.as_deref(), usec.as_deref(), pid.as_deref(), std::process::id())
    }

    /// The pure part of [`Notifier::from_env`]: the variables' values and our own pid.
    pub fn from_parts(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        our_pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let socket = match notify_socket.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => {
                let target = parse_target(s)?;
                let sock = UnixDatagram::unbound().map_err(|e| NotifyError {
                    var: "NOTIFY_SOCKET",
                    message: format!("cannot create a datagram socket: {e}"),
                })?;
                Some((sock, target))
            }
        };
        let watchdog = parse_watchdog(watchdog_usec, watchdog_pid, our_pid)?;
        Ok(Notifier { socket, watchdog })
    }

    /// Whether a service manager listens (`$NOTIFY_SOCKET` was set).
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Where datagrams go, if anywhere.
    pub fn target(&self) -> Option<&Target> {
        self.socket.as_ref().map(|(_, t)| t)
    }

    /// The watchdog timeout systemd enforces (`WatchdogSec=`), when it is meant for us.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// How often to send `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) advises.
    /// `None` when no watchdog is armed for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|t| t / 2)
    }

    /// Send one raw notification (`KEY=VALUE` lines). A no-op without `$NOTIFY_SOCKET`.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let Some((sock, target)) = &self.socket else {
            return Ok(());
        };
        let sent = match target {
            Target::Path(p) => sock.send_to(message.as_bytes(), p)?,
            Target::Abstract(name) => sock.send_to_addr(message.as_bytes(), &SocketAddr::from_abstract_name(name)?)?,
        };
        if sent != message.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram to $NOTIFY_SOCKET"));
        }
        Ok(())
    }

    /// `READY=1` with a status line: startup is done (first sync applied).
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: the main loop is alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `RELOADING=1`: a reload began (SIGHUP); `READY=1` ends it.
    pub fn reloading(&self) -> io::Result<()> {
        self.notify("RELOADING=1")
    }

    /// `STOPPING=1`: shutdown began (SIGTERM).
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// `STATUS=...`: free text shown by `systemctl status`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }
}

/// A status must stay on one line, or the rest would be read as further assignments.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn parse_target(s: &OsStr) -> Result<Target, NotifyError> {
    let bytes = s.as_bytes();
    let err = |message: String| NotifyError { var: "NOTIFY_SOCKET", message };
    match bytes.first() {
        Some(b'@') if bytes.len() > 1 => Ok(Target::Abstract(bytes[1..].to_vec())),
        Some(b'/') => {
            // sun_path holds 108 bytes including the terminating NUL.
            if bytes.len() > 107 {
                return Err(err(format!("{:?} is longer than a unix socket path may be (107 bytes)", s)));
            }
            Ok(Target::Path(PathBuf::from(s)))
        }
        _ => Err(err(format!("{:?} is neither an absolute path nor @name (vsock: is not supported)", s))),
    }
}

fn parse_watchdog(usec: Option<&OsStr>, pid: Option<&OsStr>, our_pid: u32) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let text = usec.to_string_lossy();
    let n: u64 = text.trim().parse().map_err(|_| NotifyError {
        var: "WATCHDOG_USEC",
        message: format!("{text:?} is not a number of microseconds"),
    })?;
    if n == 0 {
        return Err(NotifyError { var: "WATCHDOG_USEC", message: "0 is not a watchdog timeout".into() });
    }
    if let Some(pid) = pid.filter(|s| !s.is_empty()) {
        let text = pid.to_string_lossy();
        let p: u32 = text
            .trim()
            .parse()
            .map_err(|_| NotifyError { var: "WATCHDOG_PID", message: format!("{text:?} is not a process id") })?;
        if p != our_pid {
            // Meant for another process (e.g. our parent when we are a child): not ours.
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    fn recv(l: &UnixDatagram) -> String {
        l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = l.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn path_socket_receives_ready_watchdog_stopping() {
        let dir = std::env::temp_dir().join(format!("ep-notify-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_parts(Some(path.as_os_str()), None, None, 1).unwrap();
        assert!(n.enabled());
        assert_eq!(n.target(), Some(&Target::Path(path.clone())));
        n.ready("synced 3 services\nline two").unwrap();
        assert_eq!(recv(&listener), "READY=1\nSTATUS=synced 3 services line two");
        n.watchdog().unwrap();
        assert_eq!(recv(&listener), "WATCHDOG=1");
        n.stopping().unwrap();
        assert_eq!(recv(&listener), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_socket_receives() {
        let name = format!("ep-notify-unit-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_parts(os(&format!("@{name}")), None, None, 1).unwrap();
        assert_eq!(n.target(), Some(&Target::Abstract(name.clone().into_bytes())));
        n.status("hello").unwrap();
        assert_eq!(recv(&listener), "STATUS=hello");
    }

    #[test]
    fn without_socket_sends_nothing_and_succeeds() {
        let n = Notifier::from_parts(None, None, None, 1).unwrap();
        assert!(!n.enabled());
        n.ready("x").unwrap();
        let n = Notifier::from_parts(os(""), None, None, 1).unwrap();
        assert!(!n.enabled());
    }

    #[test]
    fn missing_listener_is_an_error_not_a_panic() {
        let n = Notifier::from_parts(os("/nonexistent/edgeproxy/notify.sock"), None, None, 1).unwrap();
        assert!(n.ready("x").is_err());
    }

    #[test]
    fn bad_socket_values_are_named() {
        let e = Notifier::from_parts(os("relative/path"), None, None, 1).unwrap_err();
        assert_eq!(e.var, "NOTIFY_SOCKET");
        assert!(e.to_string().contains("neither an absolute path nor @name"), "{e}");
        assert!(Notifier::from_parts(os("@"), None, None, 1).is_err());
        assert!(Notifier::from_parts(os("vsock:2:1234"), None, None, 1).is_err());
        let long = format!("/{}", "a".repeat(120));
        assert!(Notifier::from_parts(os(&long), None, None, 1).is_err());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        let n = Notifier::from_parts(None, os("30000000"), None, 7).unwrap();
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::from_parts(None, os("30000000"), os("7"), 7).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        assert_eq!(Notifier::from_parts(None, None, None, 7).unwrap().watchdog_interval(), None);
    }

    #[test]
    fn watchdog_for_another_pid_is_not_ours() {
        let n = Notifier::from_parts(None, os("30000000"), os("8"), 7).unwrap();
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn bad_watchdog_values_are_named() {
        let e = Notifier::from_parts(None, os("30s"), None, 7).unwrap_err();
        assert_eq!(e.to_string(), "$WATCHDOG_USEC: \"30s\" is not a number of microseconds");
        assert_eq!(Notifier::from_parts(None, os("0"), None, 7).unwrap_err().var, "WATCHDOG_USEC");
        assert_eq!(Notifier::from_parts(None, os("10"), os("me"), 7).unwrap_err().var, "WATCHDOG_PID");
    }
}
