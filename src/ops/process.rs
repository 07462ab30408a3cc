//! The process's own figures with the standard names every exporter uses (`process_*`), read
//! from `/proc/self` at scrape time: CPU time, resident and virtual memory, open and maximum
//! file descriptors, start time. A figure that cannot be read is left out.

use std::fmt::Write as _;
use std::path::Path;

/// Linux reports times in `/proc` in clock ticks of `USER_HZ`, 100 on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

fn read(path: &str) -> Option<String> {
    crate::capped::read_text(Path::new(path), 1 << 20).ok()
}

/// The fields of `/proc/self/stat` after the command name (field 3 onwards), 0-based from there.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default()
}

/// Seconds since the epoch the system booted (`btime` of `/proc/stat`).
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// `Max open files` soft limit of `/proc/self/limits`.
fn max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A count as a metric value (exact below 2^53).
#[allow(clippy::cast_precision_loss)]
fn float(n: u64) -> f64 {
    n as f64
}

/// `process_*` in the text format.
pub fn render_process(out: &mut String) {
    let mut gauge = |name: &str, kind: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    };
    let stat = read("/proc/self/stat").unwrap_or_default();
    let f = stat_fields(&stat);
    // After the name: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19) vsize(20) rss(21).
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    let cpu = num(11).zip(num(12)).map(|(u, s)| float(u + s) / TICKS_PER_SECOND);
    gauge("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
    gauge("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", num(20).map(float));
    gauge(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        num(21).map(|p| float(p * PAGE_SIZE)),
    );
    let open = std::fs::read_dir("/proc/self/fd").ok().map(|d| float(u64::try_from(d.count()).unwrap_or(0)));
    gauge("process_open_fds", "gauge", "Number of open file descriptors.", open);
    let max = read("/proc/self/limits").as_deref().and_then(max_fds).map(float);
    gauge("process_max_fds", "gauge", "Maximum number of open file descriptors.", max);
    let start = read("/proc/stat")
        .as_deref()
        .and_then(boot_time)
        .zip(num(19))
        .map(|(boot, ticks)| float(boot) + float(ticks) / TICKS_PER_SECOND);
    gauge("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figures_are_read_from_proc() {
        assert_eq!(stat_fields("12 (a (b) c) S 1 2")[..2], ["S", "1"]);
        assert_eq!(boot_time("cpu 1 2\nbtime 1700000000\n"), Some(1_700_000_000));
        assert_eq!(max_fds("Limit  Soft Limit  Hard Limit  Units\nMax open files  1024  4096  files\n"), Some(1024));
        let mut out = String::new();
        render_process(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name} missing:\n{out}");
        }
    }
}
