//! Throwaway network namespaces for tests that touch iptables, routes or ClusterIP traffic.
//!
//! Every namespace is created here and deleted on drop, so nothing ever lands in the root
//! namespace. Tests that need this call [`require_root`] first: without root (or without `ip`)
//! they fail loudly, never skip.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fail loudly unless we can create namespaces and run iptables.
pub fn require_root() {
    assert!(edgeproxy::sys::is_root(), "this test needs root (network namespaces); CI runs it as root");
    let ok = Command::new("ip").arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "this test needs iproute2's `ip`; apt-get install iproute2");
}

/// A network namespace that lives as long as this value.
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    /// `ip netns add ep<prefix>-<pid>-<n>` with loopback up.
    pub fn new(prefix: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("ep{prefix}-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name, children: Vec::new() };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A directory of this namespace's own under /tmp (`--run-dir`, `--state-dir` of an agent
    /// run here: the host's /run/edgeproxy and /var/lib/edgeproxy are never used by tests).
    /// Removed with the namespace.
    pub fn dir(&self, what: &str) -> String {
        let d = std::env::temp_dir().join(format!("{}-{what}", self.name));
        std::fs::create_dir_all(&d).unwrap();
        d.to_str().unwrap().to_string()
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Run inside the namespace and return the output, whatever the exit status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.cmd(argv).output().unwrap_or_else(|e| panic!("cannot run {argv:?} in {}: {e}", self.name))
    }

    /// Run inside the namespace; panic with stderr unless it succeeds. Returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c script` inside the namespace; panics unless it succeeds. Returns stdout.
    pub fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-c", script])
    }

    /// `<save> -t <table>` (e.g. `iptables-nft-save`) without comments and counters, so that two
    /// dumps taken at different times compare equal when the rules are the same.
    pub fn save_dump(&self, save: &str, table: &str) -> String {
        self.ok(&[save, "-t", table])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                Some(i) if l.starts_with(':') => l[..i].to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Start a long-running process inside the namespace; it is killed when the namespace drops.
    /// Returns its index for [`Netns::child`].
    pub fn spawn(&mut self, mut cmd: Command) -> usize {
        let child = cmd.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot spawn in {}: {e}", self.name));
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i]
    }

    /// Run `f` on a new thread whose network namespace is this one: sockets it creates (and
    /// processes it starts) live here. Use it for in-process servers and clients.
    pub fn thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Move the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Kill anything else still running inside before deleting the namespace.
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        for what in ["run", "state"] {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{}-{what}", self.name)));
        }
    }
}

/// Connect two namespaces with a veth pair: `a_if` (address `a_cidr`) in `a`, `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) {
    // Created in the root namespace first, so the name must be unique across processes.
    let tmp = format!("v{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
    let tmp_peer = format!("{tmp}p");
    run(Command::new("ip").args(["link", "add", &tmp, "type", "veth", "peer", "name", &tmp_peer]));
    run(Command::new("ip").args(["link", "set", &tmp, "netns", &a.name, "name", a_if]));
    run(Command::new("ip").args(["link", "set", &tmp_peer, "netns", &b.name, "name", b_if]));
    for (ns, ifname, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        ns.ok(&["ip", "addr", "add", cidr, "dev", ifname]);
        ns.ok(&["ip", "link", "set", ifname, "up"]);
    }
}

fn run(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(out.status.success(), "{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
