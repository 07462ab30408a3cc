//! The agent through stops, restarts, crashes and outages, as a real process in namespaces the
//! test creates (nft backend): SIGTERM ends an idle relayed connection with a FIN before the
//! rules go and leaves the nat table as it was; a second `run` is refused and changes nothing; a
//! restart keeps the rules and refuses new connections only for the listener gap (measured); a
//! SIGKILLed agent's addresses are taken over by the next one and removed by `cleanup`; the
//! offline cache serves when the source is silent; SIGHUP with a bad config keeps serving;
//! journal priorities and the IPv6 listener in a fresh namespace; syslog priorities and a syslog
//! daemon that restarts; a dead endpoint set aside, as metrics and `check` show it.
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::agent::{self, count, exit_code, fetch, serve, signal, wait_for, Agent, BIN};
use support::netns::{require_root, veth, Netns};

/// The test cluster: `t/web` (10.96.0.50:80 -> 10.20.0.2:8080) and `t/quiet` (10.96.0.51:80 ->
/// 10.20.0.2:9090, a backend that accepts and never writes).
const WEB: &str = "10.96.0.50:80";
const QUIET: &str = "10.96.0.51:80";

fn cluster() -> String {
    use support::cluster::{list, service, slice};
    list(&[
        service("web", "10.96.0.50"),
        service("quiet", "10.96.0.51"),
        slice("web", 8080, None),
        slice("quiet", 9090, None),
    ])
}

/// A node namespace with the cluster file, and a backend namespace behind a veth.
struct Setup {
    node: Netns,
    _backend: Netns,
    dir: PathBuf,
    source: String,
}

fn setup(tag: &str) -> Setup {
    let node = Netns::new(&format!("lc{tag}"));
    let backend = Netns::new(&format!("lb{tag}"));
    veth(&node, "be0", "10.20.0.1/24", &backend, "eth0", "10.20.0.2/24");
    // ClusterIPs must be routable for a local connect() to reach the OUTPUT chain's DNAT.
    node.ok(&["ip", "route", "add", "default", "via", "10.20.0.2"]);
    serve(&backend, "10.20.0.2:8080", "hello\n");
    backend.thread(|| {
        let l = TcpListener::bind("10.20.0.2:9090").unwrap();
        let mut held = Vec::new();
        for s in l.incoming().map_while(Result::ok) {
            held.push(s); // accepted, never answered, never closed
        }
    });
    let dir = std::env::temp_dir().join(format!("ep-lifecycle-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.json");
    std::fs::write(&file, cluster()).unwrap();
    let source = format!("file:{}", file.display());
    Setup { node, _backend: backend, dir, source }
}

fn start(s: &mut Setup, extra: &[&str]) -> Agent {
    let source = s.source.clone();
    let mut args = vec!["--source", &source, "--iptables-backend", "nft", "--metrics-address", ""];
    args.extend_from_slice(extra);
    agent::start(&mut s.node, &args)
}

fn ready(a: &Agent) {
    wait_for("ready", Duration::from_secs(20), || count(&a.log, "ready: source synced") >= 1);
}

fn nat(ns: &Netns) -> String {
    ns.save_dump("iptables-nft-save", "nat")
}

fn lo_addresses(ns: &Netns) -> String {
    ns.ok(&["ip", "-o", "addr", "show", "dev", "lo"])
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn sigterm_ends_an_idle_connection_with_a_fin_then_leaves_the_table_as_before() {
    require_root();
    let mut s = setup("term");
    let nat0 = nat(&s.node);
    let lo0 = lo_addresses(&s.node);
    // Journal mode: stderr is a file whose device:inode JOURNAL_STREAM names.
    let a = start(&mut s, &[]);
    ready(&a);
    assert_eq!(fetch(&s.node, WEB), "hello\n");
    // A client waits on a backend that never answers: an idle relayed connection.
    let waiting = s.node.thread(|| {
        let mut c = TcpStream::connect(QUIET).unwrap();
        c.write_all(b"anyone?").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf).map_err(|e| e.kind());
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    signal(a.pid, "-TERM");
    let (read, waited) = waiting.join().unwrap();
    eprintln!("the client saw {read:?} {:?} after SIGTERM", t.elapsed());
    assert_eq!(read, Ok(0), "an orderly end of stream (FIN), not a reset or a hang");
    assert!(waited < Duration::from_secs(5), "the client waited {waited:?}");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    assert_eq!(nat(&s.node), nat0, "the nat table after the stop");
    assert_eq!(lo_addresses(&s.node), lo0, "the addresses on lo after the stop");
    assert!(count(&a.log, "connections end, then the rules and the address go") == 1);
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_second_run_is_refused_and_changes_nothing() {
    require_root();
    let mut s = setup("two");
    let first = start(&mut s, &[]);
    ready(&first);
    let nat1 = nat(&s.node);
    let t = Instant::now();
    let second = start(&mut s, &[]);
    let code = exit_code(&mut s.node, &second);
    assert_eq!(code, Some(1), "the second agent's exit code");
    assert!(t.elapsed() < Duration::from_secs(5), "refused after {:?}", t.elapsed());
    assert_eq!(count(&second.log, "already running"), 1, "{:?}", second.log.lock().unwrap());
    assert_eq!(count(&second.log, &format!("pid {}", first.pid)), 1);
    assert_eq!(nat(&s.node), nat1, "the second agent changed the nat table");
    assert_eq!(fetch(&s.node, WEB), "hello\n", "the first agent still serves");
    signal(first.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &first), Some(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Connect to `addr` every 5 ms until `stop`; (the longest run of failed attempts, failures,
/// attempts).
fn connect_loop(
    ns: &Netns,
    addr: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Duration, usize, usize)> {
    ns.thread(move || {
        let (mut longest, mut failures, mut attempts) = (Duration::ZERO, 0, 0);
        let mut failing_since: Option<Instant> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            attempts += 1;
            let ok = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut out = String::new();
                c.read_to_string(&mut out)?;
                Ok(out == "hello\n")
            });
            match ok {
                Ok(true) => {
                    if let Some(t) = failing_since.take() {
                        longest = longest.max(t.elapsed());
                    }
                }
                _ => {
                    failures += 1;
                    failing_since.get_or_insert_with(Instant::now);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(t) = failing_since {
            longest = longest.max(t.elapsed());
        }
        (longest, failures, attempts)
    })
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_restart_keeps_the_rules_and_refuses_only_for_the_listener_gap() {
    require_root();
    let mut s = setup("rst");
    let nat0 = nat(&s.node);
    let old = start(&mut s, &[]);
    ready(&old);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = connect_loop(&s.node, WEB, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // A restart: the marker the OpenWrt init script (or an operator) leaves, then SIGTERM.
    std::fs::write(Path::new(&s.node.dir("run")).join("restart"), "").unwrap();
    signal(old.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &old), Some(0));
    assert_eq!(count(&old.log, "rules left in place for the next agent"), 1);
    let kept = nat(&s.node);
    assert!(kept.contains("KUBE-PORTALS-HOST") && kept.contains("10.96.0.50/32"), "rules kept:\n{kept}");
    assert!(lo_addresses(&s.node).contains("169.254.96.16/32"), "the address is kept");
    let new = start(&mut s, &[]);
    ready(&new);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (longest, failures, attempts) = load.join().unwrap();
    eprintln!("restart under load: {failures} of {attempts} connections failed, the longest stretch {longest:?}");
    assert!(longest <= Duration::from_millis(500), "connections failed for {longest:?} in a row");
    assert_eq!(count(&new.log, "rules of an earlier run are in place"), 1);
    assert_eq!(count(&new.log, "was added by an earlier edgeproxy: taken over"), 2, "IPv4 and IPv6");
    // The stop after it is a real stop: everything goes.
    signal(new.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &new), Some(0));
    assert_eq!(nat(&s.node), nat0);
    assert!(!lo_addresses(&s.node).contains("169.254.96.16"));
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_killed_agents_addresses_are_taken_over_or_removed_by_cleanup() {
    require_root();
    let mut s = setup("kill");
    let nat0 = nat(&s.node);
    let a = start(&mut s, &[]);
    ready(&a);
    signal(a.pid, "-KILL");
    let _ = exit_code(&mut s.node, &a);
    assert!(lo_addresses(&s.node).contains("169.254.96.16/32"), "SIGKILL leaves the address");
    let run_dir = s.node.dir("run");
    let out = s.node.exec(&[BIN, "cleanup", "--run-dir", &run_dir, "--iptables-backend", "nft"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("removed 169.254.96.16 from lo"), "{text}");
    assert!(!lo_addresses(&s.node).contains("169.254.96.16"), "cleanup removes the recorded address");
    assert_eq!(nat(&s.node), nat0, "cleanup removes the rules");
    // EdgeMesh's bridge left behind with the proxy address (a veth here: no bridge needed).
    s.node.ok(&["ip", "link", "add", "edgemesh0", "type", "veth", "peer", "name", "em-peer"]);
    s.node.ok(&["ip", "addr", "add", "169.254.96.16/24", "dev", "edgemesh0"]);
    let out = s.node.exec(&[BIN, "check", "--iptables-backend", "nft", "--run-dir", &run_dir]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("169.254.96.16 is on device edgemesh0"), "{text}");
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn the_offline_cache_serves_when_the_source_is_silent() {
    require_root();
    let mut s = setup("off");
    let state = s.node.dir("state");
    let a = start(&mut s, &["--state-dir", &state]);
    ready(&a);
    let cache = Path::new(&state).join("cache.json");
    wait_for("the cache written", Duration::from_secs(15), || cache.exists());
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    // A reboot with the cloud unreachable: an API server nobody answers for.
    let b = agent::start(
        &mut s.node,
        &[
            "--server",
            "http://127.0.0.1:9",
            "--state-dir",
            &state,
            "--offline-after",
            "1s",
            "--iptables-backend",
            "nft",
            "--metrics-address",
            "127.0.0.1:10551",
        ],
    );
    wait_for("served from the cache", Duration::from_secs(20), || count(&b.log, "serving the offline cache") >= 1);
    wait_for("ready", Duration::from_secs(20), || count(&b.log, "ready: source synced") >= 1);
    assert_eq!(fetch(&s.node, WEB), "hello\n", "a ClusterIP served from the cache");
    let readyz = s.node.ok(&["curl", "-s", "http://127.0.0.1:10551/readyz"]);
    assert!(readyz.contains("offline cache"), "{readyz}");
    let run_dir = s.node.dir("run");
    let check = s.node.exec(&[BIN, "check", "--iptables-backend", "nft", "--run-dir", &run_dir]);
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(check.contains("serving the offline cache written"), "{check}");
    signal(b.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &b), Some(0));
    // A cache that is not ours is refused with the reason.
    std::fs::write(&cache, br#"{"edgeproxyCache":1,"checksum":"0000000000000000","list":{"kind":"List","items":[]}}"#)
        .unwrap();
    let c =
        agent::start(&mut s.node, &["--server", "http://127.0.0.1:9", "--state-dir", &state, "--offline-after", "1s"]);
    wait_for("the bad cache refused", Duration::from_secs(10), || count(&c.log, "corrupt: checksum") >= 1);
    wait_for("no rules without a cache", Duration::from_secs(10), || count(&c.log, "there is no offline cache") >= 1);
    signal(c.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &c), Some(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn sighup_with_a_bad_config_keeps_serving_and_a_good_one_applies() {
    require_root();
    let mut s = setup("hup");
    let config = s.dir.join("config.json");
    std::fs::write(&config, r#"{"serviceFilterMode": "FilterIfLabelExists"}"#).unwrap();
    let cfg = config.display().to_string();
    let a = start(&mut s, &["--config", &cfg]);
    ready(&a);
    std::fs::write(&config, r#"{"bogus": true}"#).unwrap();
    signal(a.pid, "-HUP");
    wait_for("the bad config refused", Duration::from_secs(10), || {
        count(&a.log, "reload:") >= 1 && count(&a.log, "the running configuration stays") >= 1
    });
    assert!(count(&a.log, "config.json") >= 1);
    assert_eq!(fetch(&s.node, WEB), "hello\n", "still serving");
    // A good one that proxies only labelled services: t/web is not labelled, so it goes.
    std::fs::write(&config, r#"{"serviceFilterMode": "FilterIfLabelDoesNotExists"}"#).unwrap();
    signal(a.pid, "-HUP");
    wait_for("the new filter applied", Duration::from_secs(10), || !nat(&s.node).contains("10.96.0.50/32"));
    assert_eq!(count(&a.log, "reload: the filter or rule settings changed"), 1);
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn journal_priorities_and_the_ipv6_listener_in_a_fresh_namespace() {
    require_root();
    let mut s = setup("log");
    // Standard error is a file; JOURNAL_STREAM names its device and inode, as systemd does.
    let log = s.dir.join("stderr");
    let file = std::fs::File::create(&log).unwrap();
    let meta = std::os::unix::fs::MetadataExt::dev(&file.metadata().unwrap());
    let ino = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap());
    let source = s.source.clone();
    let mut cmd = agent::command(&s.node, &["--source", &source, "--iptables-backend", "nft", "--metrics-address", ""]);
    cmd.env("JOURNAL_STREAM", format!("{meta}:{ino}")).stderr(file).stdout(std::process::Stdio::null());
    let i = s.node.spawn(cmd);
    let pid = s.node.child(i).id();
    wait_for("ready", Duration::from_secs(20), || std::fs::read_to_string(&log).unwrap().contains("ready: source"));
    // The guard repairs a flushed PREROUTING: a warning.
    s.node.ok(&["iptables-nft", "-t", "nat", "-F", "PREROUTING"]);
    wait_for("a repair", Duration::from_secs(10), || std::fs::read_to_string(&log).unwrap().contains("rules repaired"));
    let ss = s.node.ok(&["ss", "-ltnH"]);
    signal(pid, "-TERM");
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        assert!(
            line.starts_with("<3>") || line.starts_with("<4>") || line.starts_with("<6>") || line.starts_with("<7>"),
            "{line}"
        );
    }
    assert!(text.lines().any(|l| l.starts_with("<6>ready: source synced")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("<4>rules repaired")), "{text}");
    assert!(ss.contains("[fd00:e16e::16]:15001"), "the IPv6 listener in a fresh namespace (nodad):\n{ss}\n{text}");
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_restart_with_a_broken_config_runs_the_last_good_one() {
    require_root();
    let mut s = setup("bad");
    let config = s.dir.join("config.json");
    std::fs::write(&config, r#"{"serviceFilterMode": "FilterIfLabelExists"}"#).unwrap();
    let (cfg, state) = (config.display().to_string(), s.node.dir("state"));
    let a = start(&mut s, &["--config", &cfg, "--state-dir", &state]);
    ready(&a);
    std::fs::write(&config, r#"{"serviceFilterMode": "Sometimes"}"#).unwrap();
    std::fs::write(Path::new(&s.node.dir("run")).join("restart"), "").unwrap();
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    let b = start(&mut s, &["--config", &cfg, "--state-dir", &state]);
    ready(&b);
    assert_eq!(count(&b.log, "serviceFilterMode"), 1, "the error names the field");
    assert_eq!(count(&b.log, "running with the last configuration that loaded"), 1);
    assert_eq!(fetch(&s.node, WEB), "hello\n");
    signal(b.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &b), Some(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn refusals_of_ports_without_endpoints_are_counted() {
    require_root();
    let mut s = setup("ref");
    // t/quiet loses its endpoints: the kernel refuses its connections.
    let file = s.dir.join("cluster.json");
    use support::cluster::{list, service, slice};
    let quiet = slice("quiet", 9090, None).replace(r#""ready":true"#, r#""ready":false"#);
    let text = list(&[service("web", "10.96.0.50"), service("quiet", "10.96.0.51"), slice("web", 8080, None), quiet]);
    assert_ne!(text, cluster());
    std::fs::write(&file, text).unwrap();
    let source = s.source.clone();
    let a = agent::start(
        &mut s.node,
        &[
            "--source",
            &source,
            "--iptables-backend",
            "nft",
            "--resync-period",
            "5s",
            "--metrics-address",
            "127.0.0.1:10552",
        ],
    );
    ready(&a);
    for _ in 0..3 {
        let r = s
            .node
            .thread(|| {
                TcpStream::connect_timeout(&QUIET.parse().unwrap(), Duration::from_secs(2)).map_err(|e| e.kind())
            })
            .join()
            .unwrap();
        assert_eq!(r.err(), Some(std::io::ErrorKind::ConnectionRefused));
    }
    let want = "edgeproxy_no_endpoints_refused_total{namespace=\"t\",service=\"quiet\",port=\"http\"} 3";
    wait_for("the refusals counted (at the resync)", Duration::from_secs(15), || {
        s.node.ok(&["curl", "-s", "http://127.0.0.1:10552/metrics"]).contains(want)
    });
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn a_dead_endpoint_is_set_aside_and_shown_by_metrics_and_check() {
    require_root();
    let mut s = setup("dead");
    // t/web gets a second endpoint, 10.20.0.3, whose SYNs the backend drops.
    s._backend.sh("ip addr add 10.20.0.3/24 dev eth0 && iptables -A INPUT -d 10.20.0.3 -p tcp -j DROP");
    let live = r#"{"addresses":["10.20.0.2"],"conditions":{"ready":true}}"#;
    let both = format!(r#"{live},{{"addresses":["10.20.0.3"],"conditions":{{"ready":true}}}}"#);
    std::fs::write(s.dir.join("cluster.json"), cluster().replacen(live, &both, 1)).unwrap();
    let source = s.source.clone();
    let args = ["--source", &source, "--iptables-backend", "nft", "--metrics-address", "127.0.0.1:10553"];
    let a = agent::start(&mut s.node, &args);
    ready(&a);
    // Round robin meets the dead endpoint within two connections; every one is still served.
    for _ in 0..4 {
        assert_eq!(fetch(&s.node, WEB), "hello\n");
    }
    let run_dir = s.node.dir("run");
    let want = "proxy: endpoint 10.20.0.3:8080 of t/web:http set aside";
    wait_for("check names the endpoint", Duration::from_secs(5), || {
        let out = s.node.exec(&[BIN, "check", "--iptables-backend", "nft", "--run-dir", &run_dir]);
        String::from_utf8_lossy(&out.stdout).contains(want)
    });
    let metrics = s.node.ok(&["curl", "-s", "http://127.0.0.1:10553/metrics"]);
    let gauge =
        "edgeproxy_endpoint_set_aside{namespace=\"t\",service=\"web\",port=\"http\",endpoint=\"10.20.0.3:8080\"} 1";
    assert!(metrics.contains(gauge), "{metrics}");
    let live_gauge =
        "edgeproxy_endpoint_set_aside{namespace=\"t\",service=\"web\",port=\"http\",endpoint=\"10.20.0.2:8080\"} 0";
    assert!(metrics.contains(live_gauge), "{metrics}");
    assert_eq!(count(&a.log, "endpoint 10.20.0.3:8080 set aside"), 1, "said once, at warning level");
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    let out = s.node.exec(&[BIN, "check", "--iptables-backend", "nft", "--run-dir", &run_dir]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("set aside"), "the note goes with the agent");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Datagrams on `sock` until one contains `needle` (up to `timeout`); all of them.
fn syslog_until(sock: &std::os::unix::net::UnixDatagram, needle: &str, timeout: Duration) -> Vec<String> {
    let until = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if got.last().is_some_and(|l| l.contains(needle)) {
                return got;
            }
        }
    }
    panic!("no syslog message with {needle:?} within {timeout:?}; got {got:#?}");
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn syslog_lines_carry_their_priorities_and_survive_a_syslog_restart() {
    require_root();
    let mut s = setup("sys");
    let path = s.dir.join("log");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let (source, run_dir, target) = (s.source.clone(), s.node.dir("run"), format!("syslog:{}", path.display()));
    let argv = [BIN, "--log-target", &target, "run", "--source", &source, "--iptables-backend", "nft"];
    let mut argv = argv.to_vec();
    argv.extend(["--run-dir", &run_dir, "--state-dir", "", "--metrics-address", ""]);
    let cmd = s.node.cmd(&argv);
    let a = agent::start_command(&mut s.node, cmd);
    let lines = syslog_until(&sock, "ready: source synced", Duration::from_secs(20));
    let prefix = format!("edgeproxy[{}]: ", a.pid);
    for l in &lines {
        assert!(l.starts_with("<30>") || l.starts_with("<28>") || l.starts_with("<27>"), "facility daemon: {l}");
        assert!(l.contains(&prefix), "{l}");
    }
    assert!(lines.iter().any(|l| l.starts_with(&format!("<30>{prefix}ready: source synced"))), "{lines:#?}");
    assert!(a.log.lock().unwrap().is_empty(), "nothing on stderr: {:?}", a.log.lock().unwrap());
    // logd restarts: a new socket at the same path. The agent connects again.
    drop(sock);
    std::fs::remove_file(&path).unwrap();
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    s.node.ok(&["iptables-nft", "-t", "nat", "-F", "PREROUTING"]);
    let lines = syslog_until(&sock, "rules repaired", Duration::from_secs(10));
    assert!(lines.last().unwrap().starts_with(&format!("<28>{prefix}rules repaired")), "a warning: {lines:#?}");
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut s.node, &a), Some(0));
    let _ = std::fs::remove_dir_all(&s.dir);
}
