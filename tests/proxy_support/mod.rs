//! The end-to-end topology of the proxy tests, built in throwaway namespaces:
//!
//! ```text
//!  pod (10.10.0.2) --veth-- node (10.10.0.1; proxy on 169.254.96.16, lo) --veth-- b1 (10.20.1.2, +10.20.1.3 SYN-dropped)
//!                                                                       --veth-- b2 (10.20.2.2)
//!                                                                       --veth-- b3 (10.20.3.2)
//! ```
//!
//! The node namespace gets exactly what the agent would install: the rules of `state::plan()`
//! (restored with `iptables-restore --noflush`, jumps inserted at position 1), the proxy address
//! on `lo`, and the proxy itself, running `edgeproxy::proxy::run` on its own current_thread
//! runtime in a thread inside the namespace. Behind our jumps sits a kube-proxy-like
//! `KUBE-SERVICES` chain that DNATs the filtered service `t/kp` (10.96.0.30:80) to b3.
//!
//! Backends run in-process, one thread per connection:
//! - TCP 8080: writes `<id>\n`, echoes until EOF, then writes `<id> bye\n` and closes.
//! - TCP 8081: reads one chunk, then resets the connection (SO_LINGER 0).
//! - TCP 8082 (b3 only): writes `h\n` and holds the connection open, one thread for all.
//! - UDP 5353: answers each datagram with `<id>:` + the datagram.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Stdio;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use edgeproxy::config::Config;
use edgeproxy::model::Kind;
use edgeproxy::proxy::stats::ProxyStats;
use edgeproxy::proxy::table::ProxyTable;
use edgeproxy::proxy::{run, ProxyConfig, ProxyEvent};
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::state::{Change, State, StateConfig};
use tokio::sync::{mpsc, oneshot, watch};

use crate::support::netns::{require_root, veth, Netns};

pub const WEB: &str = "10.96.0.10:80";
pub const STICKY: &str = "10.96.0.11:80";
pub const RST: &str = "10.96.0.12:80";
pub const SLOW: &str = "10.96.0.13:80";
pub const EMPTY: &str = "10.96.0.14:80";
pub const CHANGE: &str = "10.96.0.15:80";
pub const DNS: &str = "10.96.0.20:53";
pub const KP: &str = "10.96.0.30:80";
pub const HOLD: &str = "10.96.0.16:80";
pub const PROXY_PORT: &str = "169.254.96.16:15001";

/// A Service `t/<name>` with one port named `p` (`sticky` gets ClientIP affinity).
pub fn svc(name: &str, ip: &str, port: u16, proto: &str, target: u16, extra: &str) -> String {
    format!(
        r#"{{"metadata":{{"name":"{name}","namespace":"t"{extra}}},"spec":{{"clusterIP":"{ip}","ports":[{{"name":"p","protocol":"{proto}","port":{port},"targetPort":{target}}}]{aff}}}}}"#,
        aff = if name == "sticky" {
            r#","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":60}}"#
        } else {
            ""
        },
    )
}

/// An EndpointSlice of service `t/<service>` with ready endpoints `addrs` on `port`.
pub fn slice(service: &str, suffix: &str, addrs: &[&str], port: u16, proto: &str) -> String {
    let eps: Vec<String> =
        addrs.iter().map(|a| format!(r#"{{"addresses":["{a}"],"conditions":{{"ready":true}}}}"#)).collect();
    format!(
        r#"{{"metadata":{{"name":"{service}-{suffix}","namespace":"t","labels":{{"kubernetes.io/service-name":"{service}"}}}},"addressType":"IPv4","endpoints":[{}],"ports":[{{"name":"p","port":{port},"protocol":"{proto}"}}]}}"#,
        eps.join(",")
    )
}

fn services_json() -> String {
    let filtered = r#","labels":{"service.edgemesh.kubeedge.io/service-proxy-name":""}"#;
    let items = [
        svc("web", "10.96.0.10", 80, "TCP", 8080, ""),
        svc("sticky", "10.96.0.11", 80, "TCP", 8080, ""),
        svc("rst", "10.96.0.12", 80, "TCP", 8081, ""),
        svc("slow", "10.96.0.13", 80, "TCP", 8080, ""),
        svc("empty", "10.96.0.14", 80, "TCP", 8080, ""),
        svc("change", "10.96.0.15", 80, "TCP", 8080, ""),
        svc("dns", "10.96.0.20", 53, "UDP", 5353, ""),
        svc("kp", "10.96.0.30", 80, "TCP", 8080, filtered),
        svc("hold", "10.96.0.16", 80, "TCP", 8082, ""),
    ];
    format!(r#"{{"kind":"ServiceList","items":[{}]}}"#, items.join(","))
}

fn slices_json() -> String {
    let items = [
        slice("web", "1", &["10.20.1.2", "10.20.2.2", "10.20.3.2"], 8080, "TCP"),
        slice("sticky", "1", &["10.20.1.2", "10.20.2.2"], 8080, "TCP"),
        slice("rst", "1", &["10.20.1.2"], 8081, "TCP"),
        // 10.20.1.3 drops SYNs; it sorts first, so round robin tries it first.
        slice("slow", "1", &["10.20.1.3", "10.20.2.2"], 8080, "TCP"),
        slice("change", "1", &["10.20.1.2"], 8080, "TCP"),
        slice("dns", "1", &["10.20.1.2", "10.20.2.2"], 5353, "UDP"),
        slice("kp", "1", &["10.20.1.2"], 8080, "TCP"),
        slice("hold", "1", &["10.20.3.2"], 8082, "TCP"),
    ];
    format!(r#"{{"kind":"EndpointSliceList","items":[{}]}}"#, items.join(","))
}

pub struct Topo {
    pub node: Netns,
    pub pod: Netns,
    pub backends: Vec<Netns>,
    pub state: State,
    pub stats: Arc<ProxyStats>,
    pub events: mpsc::UnboundedReceiver<ProxyEvent>,
    tables: watch::Sender<Arc<ProxyTable>>,
    stop: Option<oneshot::Sender<()>>,
    proxy: Option<JoinHandle<io::Result<()>>>,
}

/// The proxy configuration the tests use: short timeouts so the suite stays fast.
pub fn test_config() -> ProxyConfig {
    let mut cfg = ProxyConfig::from(&Config::defaults());
    cfg.dial_timeout = Duration::from_millis(300);
    cfg.dial_attempts = 3;
    cfg.udp_idle_timeout = Duration::from_millis(500);
    cfg.udp_max_flows = 8;
    cfg.udp_max_flows_per_source = 6;
    cfg
}

impl Topo {
    pub fn new(cfg: ProxyConfig) -> Topo {
        require_root();
        let node = Netns::new("pn");
        let pod = Netns::new("pp");
        veth(&pod, "eth0", "10.10.0.2/24", &node, "vpod", "10.10.0.1/24");
        pod.ok(&["ip", "route", "add", "default", "via", "10.10.0.1"]);
        let mut backends = Vec::new();
        for i in 1..=3 {
            let b = Netns::new(&format!("pb{i}"));
            veth(&b, "eth0", &format!("10.20.{i}.2/24"), &node, &format!("vb{i}"), &format!("10.20.{i}.1/24"));
            b.ok(&["ip", "route", "add", "default", "via", &format!("10.20.{i}.1")]);
            let id = format!("b{i}");
            serve_tcp_echo(&b, &format!("10.20.{i}.2:8080"), &id);
            serve_tcp_reset(&b, &format!("10.20.{i}.2:8081"));
            serve_udp_echo(&b, &format!("10.20.{i}.2:5353"), &id);
            if i == 3 {
                serve_tcp_hold(&b, "10.20.3.2:8082");
            }
            backends.push(b);
        }
        // An address that never answers a SYN.
        backends[0].sh("ip addr add 10.20.1.3/24 dev eth0 && iptables -A INPUT -d 10.20.1.3 -p tcp -j DROP");
        node.sh("sysctl -qw net.ipv4.ip_forward=1 && ip addr add 169.254.96.16/32 dev lo \
             && ip route add 10.96.0.0/12 dev vpod");
        // kube-proxy's chain, hooked in first so that ours end up in front of it.
        node.sh(
            "iptables -t nat -N KUBE-SERVICES \
             && iptables -t nat -A KUBE-SERVICES -d 10.96.0.30/32 -p tcp --dport 80 -j DNAT --to-destination 10.20.3.2:8080 \
             && iptables -t nat -A PREROUTING -j KUBE-SERVICES && iptables -t nat -A OUTPUT -j KUBE-SERVICES",
        );

        let mut state = State::new(StateConfig::from(&Config::defaults()));
        for (doc, kind) in [(services_json(), Kind::Service), (slices_json(), Kind::EndpointSlice)] {
            let d = decode_document(doc.as_bytes(), Some(kind));
            assert!(d.errors.is_empty(), "{:?}", d.errors);
            state.apply(Change::Replace(kind, d.objects));
        }
        let plan = state.plan();
        restore(&node, &plan.rules.v4.restore_text());
        for j in &plan.rules.v4.jumps {
            node.sh(&format!("iptables -t nat -I {} 1 {}", j.from, j.spec));
        }

        let (tables, rx) = watch::channel(Arc::new(plan.table));
        let (ev_tx, mut events) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let stats = Arc::new(ProxyStats::new());
        let s = stats.clone();
        let proxy = node.thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run(cfg, rx, ev_tx, s, async {
                let _ = stop_rx.await;
            }))
        });
        // Ready when the TCP listener is bound and the first UDP reconcile is done.
        let mut listening = false;
        loop {
            match events.blocking_recv() {
                Some(ProxyEvent::Listening(_)) => listening = true,
                Some(ProxyEvent::UdpPorts(p)) if listening && !p.is_empty() => break,
                Some(_) => {}
                None => panic!("proxy ended at start: {:?}", proxy.join()),
            }
        }
        Topo { node, pod, backends, state, stats, events, tables, stop: Some(stop), proxy: Some(proxy) }
    }

    /// Apply a change as the agent would: new rules into the node, new table into the proxy.
    pub fn apply(&mut self, change: Change) {
        self.state.apply(change);
        let plan = self.state.plan();
        restore(&self.node, &plan.rules.v4.restore_text());
        self.tables.send_replace(Arc::new(plan.table));
    }

    /// Hand the proxy a table of the test's own making, bypassing `state` (and its checks): the
    /// rules stay as the last `apply` left them.
    pub fn publish(&self, table: ProxyTable) {
        self.tables.send_replace(Arc::new(table));
    }

    /// The table the proxy is using now.
    pub fn table(&self) -> ProxyTable {
        (**self.tables.borrow()).clone()
    }

    /// Run `f` on a thread inside `ns` and wait for it.
    pub fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
        ns.thread(f).join().expect("client thread panicked")
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(p) = self.proxy.take() {
            let r = p.join();
            if !std::thread::panicking() {
                r.expect("proxy thread panicked").expect("proxy failed");
            }
        }
    }
}

fn restore(ns: &Netns, text: &str) {
    let mut child = ns
        .cmd(&["iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "iptables-restore: {}\n{text}", String::from_utf8_lossy(&out.stderr));
}

pub fn serve_tcp_echo(ns: &Netns, addr: &str, id: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let id = id.to_string();
    let l = ns.thread(move || TcpListener::bind(addr)).join().unwrap().expect("bind echo");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let id = id.clone();
            std::thread::spawn(move || echo_conn(s, &id));
        }
    });
}

fn echo_conn(mut s: TcpStream, id: &str) -> io::Result<()> {
    s.write_all(format!("{id}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    s.write_all(format!("{id} bye\n").as_bytes())?;
    s.shutdown(Shutdown::Write)
}

fn serve_tcp_reset(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = ns.thread(move || TcpListener::bind(addr)).join().unwrap().expect("bind reset");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    });
}

fn serve_tcp_hold(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = ns.thread(move || TcpListener::bind(addr)).join().unwrap().expect("bind hold");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"h\n");
            held.push(s);
        }
    });
}

/// Give a test socket a large receive buffer (as root, past net.core.rmem_max), so a burst test
/// measures the proxy's buffers, not the test's own.
pub fn force_rcvbuf(s: &impl std::os::fd::AsRawFd, bytes: i32) {
    // SAFETY: setsockopt on a descriptor the caller owns, with a pointer to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<i32>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
}

fn serve_udp_echo(ns: &Netns, addr: &str, id: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let prefix = format!("{id}:").into_bytes();
    let s = ns.thread(move || UdpSocket::bind(addr)).join().unwrap().expect("bind udp");
    force_rcvbuf(&s, 8 << 20);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut out = Vec::with_capacity(65_600);
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            out.clear();
            out.extend_from_slice(&prefix);
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from);
        }
    });
}

/// Connect from inside `ns`; returns the stream and how long connect() took.
pub fn connect(ns: &Netns, addr: &str) -> io::Result<(TcpStream, Duration)> {
    let addr: SocketAddr = addr.parse().unwrap();
    Topo::in_ns(ns, move || {
        let t = std::time::Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok((s, t.elapsed()))
    })
}

/// Read the backend's greeting line (its id).
pub fn greeting(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF after {line:?}"))),
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}

/// Connect and read the greeting: which backend answered.
pub fn who(ns: &Netns, addr: &str) -> String {
    let (mut s, _) = connect(ns, addr).unwrap_or_else(|e| panic!("connect {addr} from {}: {e}", ns.name));
    greeting(&mut s).unwrap_or_else(|e| panic!("greeting from {addr} via {}: {e}", ns.name))
}

/// Decode one EndpointSlice (as JSON text) into an object for `Change::Upsert`.
pub fn slice_object(json: &str) -> edgeproxy::model::Object {
    object(Kind::EndpointSlice, json)
}

/// Decode one object of `kind` (as JSON text) for `Change::Upsert`.
pub fn object(kind: Kind, json: &str) -> edgeproxy::model::Object {
    let doc = format!(r#"{{"kind":"{kind}List","items":[{json}]}}"#);
    let mut d = decode_document(doc.as_bytes(), Some(kind));
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    d.objects.remove(0)
}

/// Poll `cond` for up to 2 s.
pub fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(std::time::Instant::now() < until, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
