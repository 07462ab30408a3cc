//! The programs the benchmark runs and what it reads about them: edgeproxy and the HAProxies
//! started in a namespace with their output to a log, the release build of edgeproxy, a
//! process's RSS and CPU time from `/proc`, the throwaway second instance with 1,000 services for
//! the memory figure, and the machine facts printed with the results.
//!
//! It never sends traffic and never measures a path; processes it starts are [`Proc`]s, stopped
//! on drop and by the emergency cleanup.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::paths::{self, Path};
use crate::topo::{self, Ns, Proc, Res};

/// `edgeproxy run --source file:FILE` in `node`, its lock and records beside FILE.
pub fn spawn_edgeproxy(
    node: &Ns,
    bin: &std::path::Path,
    file: &std::path::Path,
    config: Option<&std::path::Path>,
    log: &std::path::Path,
) -> Res<Proc> {
    let source = format!("file:{}", file.display());
    let bin = bin.display().to_string();
    // The agent's lock and records live beside its inputs, never in the host's /run/edgeproxy.
    let run_dir = file.with_extension("run").display().to_string();
    let mut argv = vec![
        bin.as_str(),
        "--log-level",
        "warn",
        "run",
        "--run-dir",
        &run_dir,
        "--state-dir",
        "",
        "--source",
        &source,
        "--node-name",
        "node",
        "--metrics-address",
        "",
        "--iptables-backend",
        "nft",
    ];
    let config = config.map(|c| c.display().to_string());
    if let Some(c) = &config {
        argv.extend(["--config", c.as_str()]);
    }
    spawn_logged(node, &argv, log)
}

/// HAProxy with config `cfg` in `node` (either HAProxy path: the config says which).
pub fn spawn_haproxy(node: &Ns, cfg: &std::path::Path, log: &std::path::Path) -> Res<Proc> {
    // Started through a symlink named `bench-haproxy`, so the process name is not `haproxy`:
    // an admin's `pkill haproxy` or `systemctl stop haproxy` for the packaged daemon must not
    // end the benchmark's HAProxy mid-run. Every HAProxy of a run shares the one link.
    let dir = cfg.parent().ok_or("config without a directory")?;
    let link = dir.join("bench-haproxy");
    if !link.exists() {
        let real = which("haproxy").ok_or("haproxy not found")?;
        std::os::unix::fs::symlink(&real, &link).map_err(|e| format!("symlink {}: {e}", link.display()))?;
    }
    spawn_logged(node, &[&link.display().to_string(), "-db", "-f", &cfg.display().to_string()], log)
}

/// Start a process in `ns` with stdout and stderr to `log`; errors quote the log's tail if it
/// is gone 200 ms later.
pub fn spawn_logged(ns: &Ns, argv: &[&str], log: &std::path::Path) -> Res<Proc> {
    let log_file = std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err_file = log_file.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
    let mut c = ns.cmd(argv);
    c.stdin(std::process::Stdio::null()).stdout(log_file).stderr(err_file);
    let child = c.spawn().map_err(|e| format!("cannot start {argv:?}: {e}"))?;
    let mut p = Proc::adopt(child);
    p.log = Some(log.to_path_buf());
    std::thread::sleep(Duration::from_millis(200));
    if !p.alive() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(format!("{} exited at start: {}", argv[0], tail.into_iter().rev().collect::<Vec<_>>().join(" | ")));
    }
    Ok(p)
}

/// Start a second instance of path `p`'s proxy (edgeproxy, or either HAProxy with its own
/// threads setting) alone in a fresh namespace with `n` services, wait until it has loaded them,
/// read its RSS.
pub fn rss_with_services(
    p: Path,
    n: usize,
    binary: Option<&PathBuf>,
    config: Option<&std::path::Path>,
    work: &std::path::Path,
) -> Res<f64> {
    let ns = Ns::new("rss")?;
    let mut proc = match p {
        Path::Edgeproxy => {
            let bin = binary.ok_or("no edgeproxy binary")?;
            let file = work.join("generated.json");
            write(&file, &paths::generated_cluster_json(n))?;
            spawn_edgeproxy(&ns, bin, &file, config, &work.join("edgeproxy-1000.log"))?
        }
        Path::Haproxy | Path::HaproxyMt => {
            let ip = p.haproxy_ip().ok_or("an HAProxy path without an address")?;
            ns.ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
            let cfg = work.join(format!("{}-{n}.cfg", p.name()));
            write(&cfg, &paths::haproxy_generated_config(p, n))?;
            spawn_haproxy(&ns, &cfg, &work.join(format!("{}-{n}.log", p.name())))?
        }
        _ => return Err("not a proxy".into()),
    };
    let last = paths::generated_ip(n - 1).to_string();
    let start = Instant::now();
    loop {
        if !proc.alive() {
            return Err("the proxy exited while loading".into());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("not loaded after 30 s".into());
        }
        let loaded = match p {
            // Loaded when its rules for the last service are in the nat table.
            Path::Edgeproxy => ns.ok(&["iptables-nft-save", "-t", "nat"]).map(|s| s.contains(&last)).unwrap_or(false),
            // Loaded when it listens on the last port.
            _ => ns
                .ok(&["ss", "-Htln", &format!("sport = :{}", 20000 + n - 1)])
                .map(|s| !s.trim().is_empty())
                .unwrap_or(false),
        };
        if loaded {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let kib = rss_kib(proc.pid())?;
    proc.stop();
    Ok(kib)
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Res<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))
}

/// What a log says about why its process ended: its last line naming a panic or a fatal error
/// (Go's `panic:`, klog's `F<date>`), else its last line.
pub fn last_words(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let telling = lines.iter().rev().find(|l| l.starts_with("panic:") || l.contains("fatal") || is_klog_fatal(l));
    telling.or(lines.last()).map_or_else(|| format!("{} is empty", log.display()), |l| (*l).to_string())
}

fn is_klog_fatal(line: &str) -> bool {
    line.strip_prefix('F').is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// How many descriptors a process has open.
pub fn fd_count(pid: u32) -> Res<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?.count())
}

/// utime + stime of a process (all its threads), seconds.
pub fn cpu_seconds(pid: u32) -> Res<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = s.rsplit_once(')').map(|x| x.1).ok_or("bad /proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    let (Some(u), Some(s)) = (ticks(14), ticks(15)) else {
        return Err(format!("/proc/{pid}/stat: no utime/stime"));
    };
    // SAFETY: sysconf has no preconditions.
    let hz = f64::from(i32::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100));
    Ok((u + s) / hz)
}

/// The release edgeproxy: `--edgeproxy PATH`, or build `target/release/edgeproxy` now.
pub fn edgeproxy_binary(given: Option<&PathBuf>) -> Res<PathBuf> {
    if let Some(p) = given {
        return p.canonicalize().map_err(|e| format!("--edgeproxy {}: {e}", p.display()));
    }
    let manifest = env!("CARGO_MANIFEST_DIR");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the release edgeproxy (cargo build --release --bin edgeproxy)");
    let mut c = std::process::Command::new(&cargo);
    c.current_dir(manifest).args(["build", "--release", "--bin", "edgeproxy"]);
    // `cargo run` sets CARGO_PKG_* and friends for us; build scripts that watch such variables
    // would see a different environment than a plain `cargo build` and rebuild every time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR") || k == "OUT_DIR" {
            c.env_remove(&*k);
        }
    }
    topo::run(&mut c)?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{manifest}/target"));
    let bin = PathBuf::from(target).join("release/edgeproxy");
    if !bin.exists() {
        return Err(format!("{} not found after the build", bin.display()));
    }
    Ok(bin)
}

/// What the results are printed with: date, commit, CPU, kernel, load, tool versions.
pub fn machine_facts(bin: Option<&PathBuf>) -> Vec<(String, String)> {
    let cmd = |argv: &[&str]| {
        std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default();
    let manifest = env!("CARGO_MANIFEST_DIR");
    let commit = cmd(&["git", "-C", manifest, "rev-parse", "--short", "HEAD"]);
    let dirty = !cmd(&["git", "-C", manifest, "status", "--porcelain", "--untracked-files=no"]).is_empty();
    let mut v = vec![
        ("date".to_string(), cmd(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])),
        ("commit".into(), format!("{commit}{}", if dirty { " (dirty)" } else { "" })),
        ("cpu".into(), format!("{} x {cpu}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0))),
        ("kernel".into(), cmd(&["uname", "-r"])),
        ("load before".into(), loadavg()),
        ("haproxy".into(), cmd(&["haproxy", "-v"]).lines().next().unwrap_or("").to_string()),
        ("iperf3".into(), cmd(&["iperf3", "--version"]).lines().next().unwrap_or("").to_string()),
    ];
    if let Some(b) = bin {
        let size = std::fs::metadata(b).map(|m| m.len()).unwrap_or(0);
        v.push(("edgeproxy".into(), format!("{} ({size} bytes)", b.display())));
    }
    v
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A program in PATH (or /usr/sbin, /sbin).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(tool)).find(|p| p.exists())
}

pub fn write(path: &std::path::Path, text: &str) -> Res<()> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Raise our soft open-file limit to the hard limit (children inherit it); error when that is
/// below `need`.
pub fn raise_nofile(need: usize) -> Res<()> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        l.rlim_cur = l.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    if usize::try_from(l.rlim_cur).unwrap_or(usize::MAX) < need {
        return Err(format!("open-file limit {} is too low: the benchmark needs {need}", l.rlim_cur));
    }
    Ok(())
}
