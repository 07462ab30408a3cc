//! The benchmark's topology: three network namespaces (client, node, backend) joined by veth
//! pairs, plus throwaway extra namespaces for the resource figures.
//!
//! Owns every namespace the benchmark creates and removes them all at the end: on drop of
//! [`Topology`], on a panic (panic hook; the release profile aborts, so drop guards alone would
//! not run) and on SIGINT/SIGTERM/SIGHUP (a watcher thread). It never touches the root
//! namespace's routes, iptables or sysctls: every command runs through `ip netns exec`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// Every namespace created by this process, for the emergency cleanup.
static CREATED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Every child process started by this process (pid), for the emergency cleanup.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub type Res<T> = Result<T, String>;

/// Addresses of the topology. The client reaches the backend's subnet through the node.
pub const CLIENT_IP: &str = "10.77.1.2";
pub const NODE_CLIENT_SIDE: &str = "10.77.1.1";
pub const NODE_BACKEND_SIDE: &str = "10.77.2.1";
pub const BACKEND_IP: &str = "10.77.2.2";

/// A network namespace owned by the benchmark; deleted (with everything inside) on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(role: &str) -> Res<Ns> {
        let name = format!("epbench-{}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        lock(&CREATED).push(name.clone());
        let ns = Ns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Run inside the namespace; error with stderr unless it succeeds. Returns stdout.
    pub fn ok(&self, argv: &[&str]) -> Res<String> {
        run(&mut self.cmd(argv))
    }

    /// Set a sysctl inside this namespace (per-namespace sysctls only).
    pub fn sysctl(&self, key: &str, value: &str) -> Res<()> {
        self.ok(&["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Start a long-running process inside the namespace. `ip netns exec` execs the program, so
    /// the child's pid is the program's pid.
    pub fn spawn(&self, argv: &[&str], quiet: bool) -> Res<Proc> {
        let mut c = self.cmd(argv);
        c.stdin(Stdio::null());
        if quiet {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = c.spawn().map_err(|e| format!("cannot start {argv:?} in {}: {e}", self.name))?;
        Ok(Proc::adopt(child))
    }

    /// Path of the namespace file, for `setns`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Run `f` on a new thread inside this namespace.
    pub fn thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Res<std::thread::JoinHandle<T>> {
        let path = self.path();
        let file = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    // Never run a client or server in the wrong namespace.
                    eprintln!("setns({path}): {}", std::io::Error::last_os_error());
                    std::process::abort();
                }
                f()
            })
            .map_err(|e| format!("cannot start a thread: {e}"))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        delete_ns(&self.name);
        lock(&CREATED).retain(|n| n != &self.name);
    }
}

/// A child process; SIGTERM, then SIGKILL after 2 s, on drop.
pub struct Proc {
    pub child: Child,
    /// Where its stdout and stderr go, when they go to a file.
    pub log: Option<std::path::PathBuf>,
}

impl Proc {
    /// Own a child started elsewhere (it is killed by the emergency cleanup too).
    pub fn adopt(child: Child) -> Proc {
        lock(&CHILDREN).push(child.id());
        Proc { child, log: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it did.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// Is it still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait up to 5 s (so edgeproxy can remove its rules), then SIGKILL.
    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(pid_t(self.child.id()), libc::SIGTERM) };
        for _ in 0..100 {
            if !self.alive() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        lock(&CHILDREN).retain(|p| *p != pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// client -- node -- backend, forwarding on in the node, routes both ways.
pub struct Topology {
    pub client: Ns,
    pub node: Ns,
    pub backend: Ns,
}

impl Topology {
    pub fn build(congestion_control: Option<&str>) -> Res<Topology> {
        let client = Ns::new("client")?;
        let node = Ns::new("node")?;
        let backend = Ns::new("backend")?;
        veth(&client, "c0", &format!("{CLIENT_IP}/24"), &node, "n0", &format!("{NODE_CLIENT_SIDE}/24"))?;
        veth(&node, "n1", &format!("{NODE_BACKEND_SIDE}/24"), &backend, "b0", &format!("{BACKEND_IP}/24"))?;
        client.ok(&["ip", "route", "add", "default", "via", NODE_CLIENT_SIDE])?;
        backend.ok(&["ip", "route", "add", "default", "via", NODE_BACKEND_SIDE])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // Many short connections: a wide port range and TIME_WAIT reuse on both connecting sides
        // (client, and the node where proxies dial the backend). Same for every path.
        for ns in [&client, &node] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        // The congestion control of every TCP socket in the benchmark (default: what new
        // namespaces inherit from the machine). Pacing ones (bbr) cost a timer per burst.
        if let Some(cc) = congestion_control {
            for ns in [&client, &node, &backend] {
                ns.sysctl("net.ipv4.tcp_congestion_control", cc).map_err(|e| {
                    format!("{e} (a namespace may only pick one of net.ipv4.tcp_allowed_congestion_control)")
                })?;
            }
        }
        Ok(Topology { client, node, backend })
    }
}

/// Connect two namespaces with a veth pair.
pub fn veth(a: &Ns, a_if: &str, a_cidr: &str, b: &Ns, b_if: &str, b_cidr: &str) -> Res<()> {
    // Created inside `a` directly, so no name ever appears in the root namespace.
    a.ok(&["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    for (ns, ifname, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        ns.ok(&["ip", "addr", "add", cidr, "dev", ifname])?;
        ns.ok(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Run a command; error (with its stderr) unless it succeeds. Returns stdout.
pub fn run(c: &mut Command) -> Res<String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{c:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn delete_ns(name: &str) {
    // Kill whatever still runs inside, then delete the namespace.
    if let Ok(o) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                if u32::try_from(pid).ok() != Some(std::process::id()) {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kill our children and delete our namespaces: for panics and signals.
pub fn emergency_cleanup() {
    for pid in lock(&CHILDREN).drain(..) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid_t(pid), libc::SIGKILL) };
    }
    let names: Vec<String> = lock(&CREATED).drain(..).collect();
    for n in names {
        delete_ns(&n);
    }
    // The work directory (see `tempdir` in bench.rs); exit() skips its drop guard.
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("epbench-{}", std::process::id())));
    }
}

/// Delete `epbench-<pid>-*` namespaces left by earlier runs whose process is gone.
pub fn remove_stale() {
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("epbench-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale namespace {name}");
            delete_ns(name);
        }
    }
}

static SIG_PIPE_W: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_PIPE_W.load(std::sync::atomic::Ordering::Relaxed);
    let b = u8::try_from(sig).unwrap_or(u8::MAX);
    // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Panic hook and signal watcher that run [`emergency_cleanup`] before the process dies.
pub fn install_cleanup_handlers() -> Res<()> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        prev(info);
        emergency_cleanup();
    }));
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    SIG_PIPE_W.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    let read_fd = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: read(2) into a local byte from our own pipe.
        let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            eprintln!("\nsignal {b}: removing the benchmark namespaces");
            emergency_cleanup();
            std::process::exit(128 + i32::from(b));
        }
    });
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls write(2).
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    Ok(())
}

/// A process id as the kernel's `pid_t` (ids are below 2^22).
fn pid_t(id: u32) -> libc::pid_t {
    libc::pid_t::try_from(id).unwrap_or(libc::pid_t::MAX)
}
