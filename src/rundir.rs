//! The agent's run directory (`runDir`, default `/run/edgeproxy`, systemd's
//! `RuntimeDirectory=`): the instance lock, and the record of the proxy addresses the agent
//! added.
//!
//! **One instance.** `run` takes an exclusive `flock` on `<runDir>/lock` before it touches
//! anything; a second `run` (or a `cleanup` while an agent runs) finds it taken and stops with a
//! message naming the holder's pid. The kernel drops the lock when the holder dies, however it
//! dies, so a crash never leaves a stale lock.
//!
//! **Addresses.** `<runDir>/addresses` lists the addresses the agent put on a device (`device
//! address` per line). An agent killed with SIGKILL leaves them; the next agent (or `cleanup`)
//! reads the record and knows them for its own, instead of taking them for an operator's. The
//! directory is a tmpfs, emptied at reboot, as the addresses are.
//!
//! **Notes for `check`.** `serving-cache` (the agent serves its offline cache) and `set-aside`
//! (endpoints the proxy's passive health check sets aside) are written by the running agent
//! and read by `check` without the lock; an agent removes them at start and at its stop.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// In the run directory while the agent serves the offline cache: when the cache was written.
pub const SERVING_CACHE: &str = "serving-cache";

/// What a running agent noted for `check` (readable without the lock): the offline cache it
/// serves, if any (when that cache was written).
pub fn serving_cache(dir: &Path) -> Option<String> {
    crate::capped::read_text(&dir.join(SERVING_CACHE), 4096).ok()
}

/// In the run directory while the proxy's passive health check sets endpoints aside: one
/// `<service port> <endpoint>` per line.
pub const SET_ASIDE: &str = "set-aside";

/// What a running agent noted for `check`: the endpoints its proxy sets aside now (`service
/// port`, `endpoint` per line; empty when none or no agent runs).
pub fn set_aside(dir: &Path) -> Vec<String> {
    crate::capped::read_text(&dir.join(SET_ASIDE), 1 << 20)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Why the run directory cannot be used.
#[derive(Debug)]
pub enum RunDirError {
    /// Another process holds the lock.
    Running {
        lock: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl fmt::Display for RunDirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunDirError::Running { lock, pid } => {
                let who = pid.map_or_else(|| "another edgeproxy".to_string(), |p| format!("edgeproxy (pid {p})"));
                write!(
                    f,
                    "{who} holds {}: it is already running; stop it first (systemctl stop edgeproxy), \
                     or give this one its own --run-dir",
                    lock.display()
                )
            }
            RunDirError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for RunDirError {}

/// The run directory with its lock held (released when dropped, or when the process ends).
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |error| RunDirError::Io { path: path.to_path_buf(), error }
}

impl RunDir {
    /// Create `dir` if needed and take its lock, or say who holds it. Changes nothing else.
    pub fn lock(dir: &Path) -> Result<RunDir, RunDirError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("lock");
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(RunDirError::Running { lock: path, pid: text.trim().parse().ok() });
            }
            Err(TryLockError::Error(error)) => return Err(RunDirError::Io { path, error }),
        }
        // The holder's pid, for the message a second instance prints.
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        write!(file, "{}", std::process::id()).map_err(io(&path))?;
        Ok(RunDir { dir: dir.to_path_buf(), _lock: file })
    }

    fn addresses_path(&self) -> PathBuf {
        self.dir.join("addresses")
    }

    /// The addresses a previous agent recorded as added (`(device, address)`); none when there
    /// is no record or it cannot be read (then nothing is taken for ours).
    pub fn added_addresses(&self) -> Vec<(String, IpAddr)> {
        let text = crate::capped::read_text(&self.addresses_path(), 64 * 1024).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (dev, ip) = l.split_once(' ')?;
                Some((dev.to_string(), ip.trim().parse().ok()?))
            })
            .collect()
    }

    /// Record the addresses this agent added (replacing any record).
    pub fn record_addresses(&self, added: &[(String, IpAddr)]) -> Result<(), RunDirError> {
        let path = self.addresses_path();
        if added.is_empty() {
            return self.forget_addresses();
        }
        let text: String = added.iter().map(|(d, ip)| format!("{d} {ip}\n")).collect();
        let tmp = self.dir.join("addresses.new");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Note (for `check`) that the agent serves the offline cache written at `written`, or
    /// (`None`) that it no longer does.
    pub fn note_serving_cache(&self, written: Option<&str>) {
        let path = self.dir.join(SERVING_CACHE);
        let _ = match written {
            Some(w) => std::fs::write(&path, w),
            None => std::fs::remove_file(&path),
        };
    }

    /// Note the endpoints the proxy sets aside (none: the note goes).
    pub fn note_set_aside(&self, lines: &[String]) {
        let path = self.dir.join(SET_ASIDE);
        let _ = if lines.is_empty() {
            std::fs::remove_file(&path)
        } else {
            let tmp = self.dir.join(".set-aside.tmp");
            std::fs::write(&tmp, lines.join("\n") + "\n").and_then(|()| std::fs::rename(&tmp, &path))
        };
    }

    pub fn forget_addresses(&self) -> Result<(), RunDirError> {
        let path = self.addresses_path();
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RunDirError::Io { path, error: e }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ep-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let d = tempdir("lock");
        let first = RunDir::lock(&d).unwrap();
        let err = RunDir::lock(&d).unwrap_err();
        match &err {
            RunDirError::Running { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("already running"), "{err}");
        drop(first);
        let again = RunDir::lock(&d).unwrap();
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn added_addresses_are_recorded_and_forgotten() {
        let d = tempdir("addr");
        let r = RunDir::lock(&d).unwrap();
        assert!(r.added_addresses().is_empty());
        let added =
            vec![("lo".to_string(), "169.254.96.16".parse().unwrap()), ("lo".into(), "fd00:e16e::16".parse().unwrap())];
        r.record_addresses(&added).unwrap();
        assert_eq!(r.added_addresses(), added);
        r.forget_addresses().unwrap();
        assert!(r.added_addresses().is_empty());
        drop(r);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
