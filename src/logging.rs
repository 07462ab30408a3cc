//! Log lines as the place they end up wants them.
//!
//! - Under systemd, when `JOURNAL_STREAM` names the very file standard error is, each line starts
//!   with its sd-daemon priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug): journald
//!   stores it at that priority (`journalctl -p warning` shows warnings) and adds the time.
//! - Under procd (OpenWrt; the init script passes `--log-target syslog`), each line goes to
//!   syslog (`/dev/log`, facility daemon, the same priorities), so `logread` shows warnings as
//!   warnings; procd would log everything on standard error as an error. Without `/dev/log` the
//!   lines go to standard error.
//! - Anywhere else, on standard error, each line starts with an RFC 3339 UTC timestamp.
//!
//! ureq and rustls are held to `debug` at most: at `trace` ureq logs the wire, Authorization
//! headers included.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where log lines go (`--log-target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The journal if standard error is connected to it, else standard error with timestamps.
    Auto,
    Journal,
    Stderr,
    Syslog,
}

/// The syslog socket unless `--log-target syslog:PATH` names another.
pub const SYSLOG_SOCKET: &str = "/dev/log";

impl Target {
    /// `auto`, `journal`, `stderr`, `syslog` or `syslog:PATH`; with the syslog socket.
    pub fn parse(s: &str) -> Option<(Target, PathBuf)> {
        let target = match s {
            "auto" => Target::Auto,
            "journal" => Target::Journal,
            "stderr" => Target::Stderr,
            "syslog" => Target::Syslog,
            _ => match s.strip_prefix("syslog:") {
                Some(path) if path.starts_with('/') => return Some((Target::Syslog, PathBuf::from(path))),
                _ => return None,
            },
        };
        Some((target, PathBuf::from(SYSLOG_SOCKET)))
    }
}

/// The sd-daemon / syslog severity of a level.
pub fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Is standard error the journal stream `JOURNAL_STREAM` (`device:inode`) names?
fn stderr_is_journal() -> bool {
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = want.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// `2026-12-01T11:40:00.123Z` for a time since the Unix epoch (UTC, civil calendar).
pub fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// `2026-12-01T11:40:00Z`, with optional fractional seconds and a `Z` or `±HH:MM` offset, as
/// unix milliseconds; `None` when it is not such a time (or before 1970).
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut at = 19;
    let mut ms = 0;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        let frac = s.get(at + 1..at + 1 + digits.min(3))?;
        ms = frac.parse::<u64>().ok()? * [100, 10, 1][frac.len().saturating_sub(1).min(2)];
        at += 1 + digits;
    }
    let offset_s: i64 = match s.get(at..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let v = i64::try_from(num(at + 1..at + 3)? * 3600 + num(at + 4..at + 6)? * 60).ok()?;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let days = i64::try_from(days_from_civil(y, mo, d)).ok()?;
    let secs = days * 86_400 + i64::try_from(h * 3600 + mi * 60 + se).ok()? - offset_s;
    u64::try_from(secs).ok().map(|s| s * 1000 + ms)
}

/// (year, month, day) -> days since 1970-01-01 (Howard Hinnant's algorithm; years from 1970).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// Days since 1970-01-01 -> (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

enum Sink {
    Journal,
    Stderr,
    /// A datagram socket connected to the syslog socket at this path.
    Syslog(UnixDatagram, PathBuf),
}

struct Logger {
    level: LevelFilter,
    sink: Sink,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        let cap = match m.target() {
            t if t.starts_with("ureq") || t.starts_with("rustls") => self.level.min(LevelFilter::Debug),
            _ => self.level,
        };
        m.level() <= cap
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let sev = severity(r.level());
        // Module paths only where they help: debug and trace.
        let origin = match r.level() {
            Level::Debug | Level::Trace => format!("[{}] ", r.target()),
            _ => String::new(),
        };
        match &self.sink {
            Sink::Journal => {
                let _ = writeln!(std::io::stderr().lock(), "<{sev}>{origin}{}", r.args());
            }
            Sink::Stderr => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                let _ = writeln!(std::io::stderr().lock(), "{} {:<5} {origin}{}", rfc3339(now), r.level(), r.args());
            }
            Sink::Syslog(sock, path) => {
                // Facility daemon (3).
                let line = format!("<{}>edgeproxy[{}]: {origin}{}", 24 + u32::from(sev), std::process::id(), r.args());
                // A syslog daemon that restarted (OpenWrt's logd, after an upgrade) has a new
                // socket: connect again once; failing that, this line goes to standard error.
                let sent = sock.send(line.as_bytes()).is_ok()
                    || (sock.connect(path).is_ok() && sock.send(line.as_bytes()).is_ok());
                if !sent {
                    let _ = writeln!(std::io::stderr().lock(), "<{sev}>{origin}{}", r.args());
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Install the logger; returns where lines go (after `Auto` was resolved). `syslog`: the
/// socket of [`Target::Syslog`]; when it cannot be reached, lines go to standard error with
/// their priorities.
pub fn init(level: LevelFilter, target: Target, syslog: PathBuf) -> Target {
    let (sink, target) = match target {
        Target::Auto if stderr_is_journal() => (Sink::Journal, Target::Journal),
        Target::Auto | Target::Stderr => (Sink::Stderr, Target::Stderr),
        Target::Journal => (Sink::Journal, Target::Journal),
        Target::Syslog => match UnixDatagram::unbound().and_then(|s| s.connect(&syslog).map(|()| s)) {
            Ok(s) => (Sink::Syslog(s, syslog), Target::Syslog),
            Err(_) => (Sink::Journal, Target::Journal),
        },
    };
    if log::set_logger(Box::leak(Box::new(Logger { level, sink }))).is_ok() {
        log::set_max_level(level);
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(Duration::from_secs(1_796_083_200)), "2026-12-01T00:00:00.000Z");
        assert_eq!(rfc3339(Duration::from_secs(4_107_542_399)), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn rfc3339_reads_back() {
        for ms in [0u64, 951_782_400_123, 1_796_083_200_000, 4_107_542_399_000] {
            assert_eq!(parse_rfc3339_ms(&rfc3339(Duration::from_millis(ms))), Some(ms));
        }
        assert_eq!(parse_rfc3339_ms("2026-12-01T01:00:00+01:00"), Some(1_796_083_200_000));
        assert_eq!(parse_rfc3339_ms("2026-12-01T00:00:00.5Z"), Some(1_796_083_200_500));
        assert_eq!(parse_rfc3339_ms("2026-12-01T00:00:00.123456Z"), Some(1_796_083_200_123));
        for bad in [
            "",
            "2026-12-01",
            "2026-13-01T00:00:00Z",
            "2026-12-01T00:00:00",
            "yyyy-12-01T00:00:00Z",
            "2026-12-01T00:00:00+0100",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn targets_parse_with_their_syslog_socket() {
        assert_eq!(Target::parse("auto"), Some((Target::Auto, PathBuf::from("/dev/log"))));
        assert_eq!(Target::parse("syslog"), Some((Target::Syslog, PathBuf::from("/dev/log"))));
        assert_eq!(Target::parse("syslog:/var/run/log"), Some((Target::Syslog, PathBuf::from("/var/run/log"))));
        for bad in ["", "syslog:", "syslog:relative", "journald", "SYSLOG"] {
            assert_eq!(Target::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn priorities_are_sd_daemon_and_syslog_severities() {
        assert_eq!([Level::Error, Level::Warn, Level::Info, Level::Debug].map(severity), [3, 4, 6, 7]);
    }
}
