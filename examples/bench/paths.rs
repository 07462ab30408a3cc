//! The data paths under test and how each is installed in the node namespace.
//!
//! Owns the inputs each path needs: the kube-proxy-style DNAT rules (kernel path and the
//! HAProxy paths' redirects), the cluster file for `edgeproxy run --source file:`, the HAProxy
//! configurations (one thread, and HAProxy's default threads), and the generated 1,000-service
//! cluster for the memory figure. Every path has
//! its own ClusterIP, so all are installed at once and none switches the others off. It never
//! measures anything.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

use crate::load::{ECHO_PORT, IPERF_PORT};
use crate::topo::{Ns, Res, BACKEND_IP};

/// Chain names deliberately not `KUBE-*`: edgeproxy reads `KUBE-SERVICES` to detect kube-proxy,
/// and the benchmark must not change what it does.
const CHAIN_PREFIX: &str = "BENCH";
/// Where HAProxy (1 thread) listens in the node namespace (on `lo`); ClusterIP traffic is
/// DNATed to it.
pub const HAPROXY_IP: &str = "169.254.96.17";
/// Where HAProxy with its default threads listens in the node namespace (on `lo`).
pub const HAPROXY_MT_IP: &str = "169.254.96.18";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    Direct,
    Kernel,
    Edgeproxy,
    /// The same edgeproxy process, a service annotated `edgeproxy.io/data-path: kernel`.
    EdgeproxyKernel,
    /// HAProxy, 1 thread (`nbthread 1`).
    Haproxy,
    /// HAProxy with its default threads (no `nbthread`: one thread per CPU it may use).
    HaproxyMt,
    /// EdgeMesh's edge proxy (`--edgemesh PATH`), in a node namespace of its own (`edgemesh`).
    Edgemesh,
}

impl Path {
    /// Every path, in the order they run; all by default, EdgeMesh only when a binary is given.
    pub const ALL: [Path; 7] = [
        Path::Direct,
        Path::Kernel,
        Path::Edgeproxy,
        Path::EdgeproxyKernel,
        Path::Haproxy,
        Path::HaproxyMt,
        Path::Edgemesh,
    ];
    /// The HAProxy paths, each its own process.
    pub const HAPROXIES: [Path; 2] = [Path::Haproxy, Path::HaproxyMt];

    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Kernel => "kernel-dnat",
            Path::Edgeproxy => "edgeproxy",
            Path::EdgeproxyKernel => "edgeproxy-kernel",
            Path::Haproxy => "haproxy",
            Path::HaproxyMt => "haproxy-mt",
            Path::Edgemesh => "edgemesh",
        }
    }

    /// Every path's name, for messages: "direct, kernel-dnat, ...".
    pub fn names() -> String {
        Path::ALL.map(Path::name).join(", ")
    }

    pub fn parse(s: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == s || (s == "kernel" && *p == Path::Kernel))
    }

    /// The address the client dials for this path.
    pub fn target(self) -> Ipv4Addr {
        match self {
            Path::Direct => BACKEND_IP.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            Path::Kernel => Ipv4Addr::new(10, 96, 77, 10),
            Path::Edgeproxy => Ipv4Addr::new(10, 96, 77, 20),
            Path::Haproxy => Ipv4Addr::new(10, 96, 77, 30),
            Path::EdgeproxyKernel => Ipv4Addr::new(10, 96, 77, 40),
            Path::HaproxyMt => Ipv4Addr::new(10, 96, 77, 50),
            Path::Edgemesh => Ipv4Addr::new(10, 96, 77, 60),
        }
    }

    /// An HAProxy path's listen address in the node namespace (None for the other paths).
    pub fn haproxy_ip(self) -> Option<&'static str> {
        match self {
            Path::Haproxy => Some(HAPROXY_IP),
            Path::HaproxyMt => Some(HAPROXY_MT_IP),
            _ => None,
        }
    }

    pub fn echo(self) -> SocketAddr {
        (self.target(), ECHO_PORT).into()
    }

    pub fn iperf(self) -> SocketAddr {
        (self.target(), IPERF_PORT).into()
    }

    /// HAProxy 2.6 has no UDP proxying.
    pub fn has_udp(self) -> bool {
        self.haproxy_ip().is_none()
    }
}

/// kube-proxy's shape (SERVICES -> SVC -> SEP with the DNAT) for the kernel path, and the same
/// jump for each HAProxy path, whose DNAT goes to that HAProxy's listen address instead.
pub fn kernel_rules(node: &Ns) -> Res<()> {
    let p = CHAIN_PREFIX;
    let mut t = String::from("*nat\n");
    let _ = writeln!(t, ":{p}-SERVICES - [0:0]");
    let kernel = Path::Kernel.target();
    let mut body = String::new();
    for (proto, port) in [("tcp", ECHO_PORT), ("tcp", IPERF_PORT), ("udp", ECHO_PORT)] {
        let tag = format!("{}{port}", proto.to_uppercase());
        let _ = writeln!(t, ":{p}-SVC-{tag} - [0:0]\n:{p}-SEP-{tag} - [0:0]");
        let _ = writeln!(
            body,
            "-A {p}-SERVICES -d {kernel}/32 -p {proto} -m comment --comment \"bench/kernel:{tag} cluster IP\" -m {proto} --dport {port} -j {p}-SVC-{tag}\n\
             -A {p}-SVC-{tag} -m comment --comment \"bench/kernel:{tag} -> {BACKEND_IP}:{port}\" -j {p}-SEP-{tag}\n\
             -A {p}-SEP-{tag} -p {proto} -m comment --comment \"bench/kernel:{tag}\" -m {proto} -j DNAT --to-destination {BACKEND_IP}:{port}"
        );
        for ha in Path::HAPROXIES.into_iter().filter(|_| proto == "tcp") {
            let (cip, lip, name) = (ha.target(), ha.haproxy_ip().unwrap_or(HAPROXY_IP), ha.name());
            let _ = writeln!(
                body,
                "-A {p}-SERVICES -d {cip}/32 -p tcp -m comment --comment \"bench/{name}:{tag}\" -m tcp --dport {port} -j DNAT --to-destination {lip}:{port}"
            );
        }
    }
    t.push_str(&body);
    let _ = writeln!(t, "-A PREROUTING -j {p}-SERVICES\n-A OUTPUT -j {p}-SERVICES\nCOMMIT");
    restore(node, &t)
}

fn restore(node: &Ns, text: &str) -> Res<()> {
    use std::io::Write;
    let mut c = node.cmd(&["iptables-nft-restore", "--noflush"]);
    c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("iptables-nft-restore: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(|e| format!("iptables-nft-restore stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("iptables-nft-restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iptables-nft-restore in {} failed: {}\ninput:\n{text}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Two ClusterIP services for edgeproxy, each echo TCP+UDP and iperf3 to the backend: `bench`
/// through the proxy, `bench-kernel` annotated for the kernel path.
pub fn bench_cluster_json() -> String {
    let ports = [
        ("echo", "TCP", ECHO_PORT, ECHO_PORT),
        ("iperf", "TCP", IPERF_PORT, IPERF_PORT),
        ("echo-udp", "UDP", ECHO_PORT, ECHO_PORT),
    ];
    let targets = [("echo", "TCP", ECHO_PORT), ("iperf", "TCP", IPERF_PORT), ("echo-udp", "UDP", ECHO_PORT)];
    let kernel = service_json("bench", "bench-kernel", &Path::EdgeproxyKernel.target().to_string(), &ports).replacen(
        "\"resourceVersion\":\"1\"",
        "\"resourceVersion\":\"1\",\"annotations\":{\"edgeproxy.io/data-path\":\"kernel\"}",
        1,
    );
    let items = [
        service_json("bench", "bench", &Path::Edgeproxy.target().to_string(), &ports),
        slice_json("bench", "bench", &[BACKEND_IP], &targets),
        kernel,
        slice_json("bench", "bench-kernel", &[BACKEND_IP], &targets),
    ];
    list_json(&items)
}

/// ClusterIP of the `i`-th generated service (10.97.0.0/16).
pub fn generated_ip(i: usize) -> Ipv4Addr {
    let [.., hi, lo] = u32::try_from(i).expect("a service index fits 16 bits").to_be_bytes();
    Ipv4Addr::new(10, 97, hi, lo)
}

/// `n` services, TCP 80 -> 8080 each, plus UDP 53 -> 5353 on every tenth, two endpoints each
/// (unreachable addresses: only the loaded state is measured, not traffic).
pub fn generated_cluster_json(n: usize) -> String {
    let mut items = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = format!("svc-{i}");
        let mut ports = vec![("http", "TCP", 80u16, 8080u16)];
        let mut tports = vec![("http", "TCP", 8080u16)];
        if i % 10 == 0 {
            ports.push(("dns", "UDP", 53, 5353));
            tports.push(("dns", "UDP", 5353));
        }
        items.push(service_json("gen", &name, &generated_ip(i).to_string(), &ports));
        let [a, b] = generated_endpoints(i);
        items.push(slice_json("gen", &name, &[&a, &b], &tports));
    }
    list_json(&items)
}

/// The two endpoint addresses of the `i`-th generated service (10.78.0.0/16, unreachable).
pub fn generated_endpoints(i: usize) -> [String; 2] {
    [2 * i, 2 * i + 1].map(|k| format!("10.78.{}.{}", k >> 8 & 255, k & 255))
}

fn list_json(items: &[String]) -> String {
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"metadata\":{{\"resourceVersion\":\"1\"}},\"items\":[{}]}}\n",
        items.join(",\n")
    )
}

fn service_json(ns: &str, name: &str, ip: &str, ports: &[(&str, &str, u16, u16)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, proto, port, target)| {
            format!("{{\"name\":\"{n}\",\"protocol\":\"{proto}\",\"port\":{port},\"targetPort\":{target}}}")
        })
        .collect();
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\",\"resourceVersion\":\"1\"}},\
         \"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"{ip}\",\"clusterIPs\":[\"{ip}\"],\"ipFamilies\":[\"IPv4\"],\"ports\":[{}],\
         \"sessionAffinity\":\"None\",\"internalTrafficPolicy\":\"Cluster\"}}}}",
        ports.join(",")
    )
}

fn slice_json(ns: &str, svc: &str, addrs: &[&str], ports: &[(&str, &str, u16)]) -> String {
    let eps: Vec<String> = addrs
        .iter()
        .map(|a| {
            format!("{{\"addresses\":[\"{a}\"],\"conditions\":{{\"ready\":true,\"serving\":true,\"terminating\":false}},\"nodeName\":\"backend\"}}")
        })
        .collect();
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, proto, port)| format!("{{\"name\":\"{n}\",\"protocol\":\"{proto}\",\"port\":{port}}}"))
        .collect();
    format!(
        "{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\"metadata\":{{\"name\":\"{svc}-bench\",\"namespace\":\"{ns}\",\
         \"labels\":{{\"kubernetes.io/service-name\":\"{svc}\"}},\"resourceVersion\":\"1\"}},\"addressType\":\"IPv4\",\
         \"endpoints\":[{}],\"ports\":[{}]}}",
        eps.join(","),
        ports.join(",")
    )
}

/// HAProxy in TCP mode for path `p` (an HAProxy path), listening on its address: for
/// [`Path::Haproxy`] one thread (`nbthread 1`), for [`Path::HaproxyMt`] no `nbthread` line, so
/// HAProxy starts one thread per CPU it may use; its default buffers (16 KiB), no splicing (not
/// its default). `listens` = (bind port, server address).
pub fn haproxy_config(p: Path, listens: &[(u16, String)], maxconn: usize) -> String {
    let threads = if p == Path::Haproxy { "    nbthread 1\n" } else { "" };
    let ip = p.haproxy_ip().unwrap_or(HAPROXY_IP);
    let mut c = format!(
        "global\n{threads}    maxconn {maxconn}\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n"
    );
    for (port, server) in listens {
        let _ = writeln!(c, "listen l{port}\n    bind {ip}:{port}\n    server s1 {server}\n");
    }
    c
}

/// HAProxy for benchmark path `p`: echo and iperf3 ports to the backend.
pub fn haproxy_bench_config(p: Path, maxconn: usize) -> String {
    haproxy_config(
        p,
        &[(ECHO_PORT, format!("{BACKEND_IP}:{ECHO_PORT}")), (IPERF_PORT, format!("{BACKEND_IP}:{IPERF_PORT}"))],
        maxconn,
    )
}

/// HAProxy (path `p`'s threads and address) with the same 1,000 services as
/// [`generated_cluster_json`] (one listener each).
pub fn haproxy_generated_config(p: Path, n: usize) -> String {
    let listens: Vec<(u16, String)> = (0..n)
        .map(|i| {
            let [a, _] = generated_endpoints(i);
            let a = format!("{a}:8080");
            (20000 + u16::try_from(i).expect("a port index fits u16"), a)
        })
        .collect();
    haproxy_config(p, &listens, 1000)
}
