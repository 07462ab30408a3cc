//! The real `edgeproxy run` as a process in a test's namespace: started with its log collected
//! line by line (and echoed, prefixed with its pid), signalled, awaited; plus the small servers
//! and clients the agent tests talk through. Every agent gets the namespace's own run and state
//! directories unless the test passes its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::Netns;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgeproxy");

/// A running agent with its log collected line by line.
pub struct Agent {
    pub index: usize,
    pub pid: u32,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// `edgeproxy --log-level debug run ARGS` in `ns`, with `--run-dir` (the namespace's) and
/// `--state-dir ""` unless `args` has them.
pub fn command(ns: &Netns, args: &[&str]) -> Command {
    let run_dir = ns.dir("run");
    let mut argv = vec![BIN, "--log-level", "debug", "run"];
    if !args.contains(&"--run-dir") {
        argv.extend(["--run-dir", &run_dir]);
    }
    if !args.contains(&"--state-dir") {
        argv.extend(["--state-dir", ""]);
    }
    argv.extend_from_slice(args);
    ns.cmd(&argv)
}

/// Start [`command`] in `ns`, its standard error collected as the log.
pub fn start(ns: &mut Netns, args: &[&str]) -> Agent {
    let cmd = command(ns, args);
    start_command(ns, cmd)
}

/// Start an agent's command line of the test's own making (it must exec the agent, so that the
/// pid is the agent's), its standard error collected as the log.
pub fn start_command(ns: &mut Netns, mut cmd: Command) -> Agent {
    cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    let index = ns.spawn(cmd);
    let child = ns.child(index);
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[agent {pid}] {line}");
            sink.lock().unwrap().push(line);
        }
    });
    Agent { index, pid, log }
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn count(log: &Arc<Mutex<Vec<String>>>, needle: &str) -> usize {
    log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// Wait (up to 20 s) for the agent to exit; its exit code.
pub fn exit_code(ns: &mut Netns, a: &Agent) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(st) = ns.child(a.index).try_wait().unwrap() {
            return st.code();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "agent did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Answer every connection with `reply`.
pub fn serve(ns: &Netns, addr: &'static str, reply: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.thread(move || {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tx.send(()).unwrap();
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.write_all(reply.as_bytes());
        }
    });
    rx.recv().unwrap();
}

/// Connect to `addr` and read to the end (3 s each); the text, or the error as text.
pub fn fetch(ns: &Netns, addr: &'static str) -> String {
    ns.thread(move || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| format!("read {addr}: {e}"))?;
        Ok::<_, String>(out)
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| e)
}
