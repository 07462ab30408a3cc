//! Is this stop a restart? Then the rules and the proxy address stay for the next agent, which
//! adopts them (see `Applier::adopt`): ClusterIP connections arriving in between are refused
//! at once by the kernel (nothing listens on the proxy port for those milliseconds) instead of
//! finding no rule at all, and none is lost to a half-installed table.
//!
//! A stop is a restart when
//! - `<runDir>/restart` exists and is at most a minute old (written by the OpenWrt init script's
//!   `restart` and `reload`, or by hand before a SIGTERM); it is consumed, or
//! - under systemd, the unit this process runs in has a `restart` job queued (`systemctl
//!   restart`, or `try-restart` / `reload-or-restart`), as `systemctl list-jobs` shows it.
//!
//! Anything else (`systemctl stop`, SIGTERM or SIGINT by hand, a shutdown of the machine) is a
//! stop: connections end, then the rules and the address go.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use crate::exec;

/// The marker a restart leaves in the run directory.
pub const MARKER: &str = "restart";
/// How old a marker may be and still count.
const MARKER_FRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Decide, now that a stop has begun, whether it is a restart.
pub fn restart_pending(run_dir: &Path) -> bool {
    let marker = run_dir.join(MARKER);
    // Only a fresh marker counts: one left by a reload that restarted nothing must not turn a
    // later stop into a restart.
    let age = std::fs::metadata(&marker).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
    if std::fs::remove_file(&marker).is_ok() {
        if age.is_some_and(|a| a <= MARKER_FRESH) {
            log::info!("{} found: this stop is a restart", marker.display());
            return true;
        }
        log::info!("{} is older than {MARKER_FRESH:?}: ignored", marker.display());
    }
    let Some(unit) = own_unit() else {
        return false;
    };
    // Under a unit with the default KillMode=control-group, systemd's stop sends SIGTERM to
    // every process of the cgroup, again and again while new ones appear: this `systemctl` can
    // be killed before it answers (the shipped unit has KillMode=mixed, but a unit written by
    // hand may not). Asked again then: the kill loop ends as soon as it finds no new process.
    let mut jobs = None;
    for _ in 0..5 {
        match exec::run("systemctl", &["list-jobs", "--no-legend", "--plain", "--full"], None) {
            Ok(o) if o.status.success() => {
                jobs = Some(String::from_utf8_lossy(&o.stdout).into_owned());
                break;
            }
            Ok(o) if o.status.signal().is_some() => {
                log::warn!("systemctl list-jobs was killed ({}): asking again", o.status);
            }
            Ok(o) => {
                log::warn!(
                    "systemctl list-jobs: {}: {}: taken as a stop",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return false;
            }
            Err(e) => {
                log::warn!("systemctl list-jobs: {e}: taken as a stop");
                return false;
            }
        }
    }
    let Some(jobs) = jobs else {
        log::warn!("systemctl list-jobs was killed five times: taken as a stop");
        return false;
    };
    let restarting = restart_job(&jobs, &unit);
    if restarting {
        log::info!("systemd restarts {unit}: the rules and the address stay for the next agent");
    } else {
        log::info!("no restart job queued for {unit}: a stop");
    }
    restarting
}

/// The systemd unit this process runs in, from its cgroup (`0::/system.slice/edgeproxy.service`);
/// `None` outside a service unit.
fn own_unit() -> Option<String> {
    std::env::var_os("INVOCATION_ID")?;
    let text = crate::capped::read_text(Path::new("/proc/self/cgroup"), 64 * 1024).ok()?;
    unit_of_cgroup(&text)
}

fn unit_of_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/').rev().find(|c| c.ends_with(".service")).map(str::to_string)
}

/// Does `systemctl list-jobs --no-legend --plain` list a restart job for `unit`?
fn restart_job(listing: &str, unit: &str) -> bool {
    listing.lines().any(|l| {
        let mut words = l.split_whitespace();
        let (_id, u, kind) = (words.next(), words.next(), words.next());
        u == Some(unit) && matches!(kind, Some("restart" | "try-restart" | "reload-or-restart"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_is_read_from_the_cgroup_and_its_restart_job_from_the_listing() {
        assert_eq!(unit_of_cgroup("0::/system.slice/edgeproxy.service\n"), Some("edgeproxy.service".into()));
        assert_eq!(unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"), None);
        let jobs = "123 edgeproxy.service restart running\n124 other.service start waiting\n";
        assert!(restart_job(jobs, "edgeproxy.service"));
        assert!(!restart_job(jobs, "other.service"));
        assert!(!restart_job("125 edgeproxy.service stop running\n", "edgeproxy.service"));
    }

    #[test]
    fn the_marker_is_consumed() {
        let d = std::env::temp_dir().join(format!("ep-handover-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(MARKER), "").unwrap();
        assert!(restart_pending(&d));
        assert!(!d.join(MARKER).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
