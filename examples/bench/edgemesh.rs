//! EdgeMesh's edge proxy as a benchmark path (`--edgemesh PATH`): its own node namespace, a
//! stand-in API server for it, its configuration, its start.
//!
//! EdgeMesh (v1.12 and later) runs kube-proxy's userspace proxier and owns the
//! `KUBE-PORTALS-*` chains, the same chains edgeproxy's compatible layout owns, so it cannot share
//! the `node` namespace with edgeproxy. It gets a namespace of its own wired like `node`: a veth to
//! the client (10.77.3.0/24) and one to the backend (10.77.4.0/24; the backend answers on
//! 10.77.4.2, the endpoint EdgeMesh is given). The client routes only EdgeMesh's ClusterIP
//! (10.96.77.60) through it, so every other path is unchanged.
//!
//! The API server is ours: plain HTTP on that namespace's loopback, client-go's list and watch of
//! Services, v1 Endpoints (EdgeMesh never reads EndpointSlices) and Istio DestinationRules (none),
//! from fixed JSON; a watch stays open with nothing to say until its timeout. EdgeMesh runs with
//! its proxy module alone (no DNS, tunnel or CNI): the endpoints carry no node name, so it dials
//! them directly, as it does endpoints on its own node. Nothing here measures; the process is a
//! [`Proc`] like the others.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::load::{ECHO_PORT, IPERF_PORT};
use crate::paths::{self, Path};
use crate::topo::{veth, Ns, Proc, Res, Topology};

const CLIENT_SIDE: &str = "10.77.3.2";
const NODE_CLIENT_SIDE: &str = "10.77.3.1";
const NODE_BACKEND_SIDE: &str = "10.77.4.1";
/// The backend's address on its link to EdgeMesh's node: the endpoint EdgeMesh dials.
pub const BACKEND_SIDE: &str = "10.77.4.2";
/// The node name EdgeMesh is started with (`NODE_NAME`).
const NODE_NAME: &str = "edgemesh-node";

/// EdgeMesh's node namespace, wired to the client and the backend.
pub fn node(topo: &Topology, congestion_control: Option<&str>) -> Res<Ns> {
    let em = Ns::new("em")?;
    veth(&topo.client, "c1", &format!("{CLIENT_SIDE}/24"), &em, "e0", &format!("{NODE_CLIENT_SIDE}/24"))?;
    veth(&em, "e1", &format!("{NODE_BACKEND_SIDE}/24"), &topo.backend, "b1", &format!("{BACKEND_SIDE}/24"))?;
    let cip = format!("{}/32", Path::Edgemesh.target());
    topo.client.ok(&["ip", "route", "add", &cip, "via", NODE_CLIENT_SIDE])?;
    // The same connecting-side settings as `node` (see `Topology::build`).
    em.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    em.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    if let Some(cc) = congestion_control {
        em.sysctl("net.ipv4.tcp_congestion_control", cc)?;
    }
    Ok(em)
}

/// Start `bin` (edgemesh-agent) in `ns` against a stand-in API server with `lists` (services,
/// endpoints), and wait until the nat table has its rules for every service's ClusterIP.
pub fn spawn(ns: &Ns, bin: &FsPath, lists: Lists, work: &FsPath, tag: &str, wait: Duration) -> Res<(Proc, ApiServer)> {
    let api = ApiServer::start(ns, lists)?;
    let cfg = work.join(format!("edgemesh-{tag}.yaml"));
    crate::programs::write(&cfg, &config(api.port))?;
    let log = work.join(format!("edgemesh-{tag}.log"));
    let (bin, cfg) = (bin.display().to_string(), cfg.display().to_string());
    // `env` execs the agent, so the child's pid is EdgeMesh's (CPU and RSS are read from it).
    let argv = ["env", &format!("NODE_NAME={NODE_NAME}"), "NAMESPACE=kubeedge", bin.as_str(), "--config-file", &cfg];
    let mut p = crate::programs::spawn_logged(ns, &argv, &log)?;
    let start = Instant::now();
    loop {
        if let Some(st) = p.exit_status() {
            return Err(format!("edgemesh-agent exited ({st}): {}", crate::programs::last_words(&log)));
        }
        // EdgeMesh runs the `iptables` the machine's alternatives name; read the same one.
        let missing = ns.ok(&["iptables-save", "-t", "nat"]).map_or(api.cluster_ips.len(), |s| api.missing(&s));
        if missing == 0 {
            return Ok((p, api));
        }
        if start.elapsed() > wait {
            return Err(format!(
                "edgemesh-agent has no rule for {missing} of {} ClusterIPs after {wait:?}; its log ends: {}",
                api.cluster_ips.len(),
                crate::programs::last_words(&log)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// edgemesh-agent's configuration: API server at `port` on loopback (manual mode, JSON), the
/// proxy module only. YAML is a superset of JSON; EdgeMesh reads it with sigs.k8s.io/yaml.
fn config(port: u16) -> String {
    let c = json!({
        "apiVersion": "agent.edgemesh.config.kubeedge.io/v1alpha1",
        "kind": "EdgeMeshAgent",
        "kubeAPIConfig": {"master": format!("http://127.0.0.1:{port}"), "contentType": "application/json"},
        "modules": {
            "edgeDNS": {"enable": false},
            "edgeProxy": {"enable": true},
            "edgeTunnel": {"enable": false},
            "edgeCNI": {"enable": false}
        }
    });
    format!("{c:#}\n")
}

/// What the stand-in API server answers: the Service and Endpoints lists.
pub struct Lists {
    services: Vec<Value>,
    endpoints: Vec<Value>,
}

impl Lists {
    /// The benchmark's service: echo TCP and UDP and iperf3, to the backend.
    pub fn bench() -> Lists {
        let ports = [("echo", "TCP", ECHO_PORT), ("iperf", "TCP", IPERF_PORT), ("echo-udp", "UDP", ECHO_PORT)];
        Lists {
            services: vec![service("bench-edgemesh", Path::Edgemesh.target(), &ports)],
            endpoints: vec![endpoints("bench-edgemesh", &[BACKEND_SIDE.to_string()], &ports)],
        }
    }

    /// The same `n` services as [`paths::generated_cluster_json`] (for the memory figure).
    pub fn generated(n: usize) -> Lists {
        let mut l = Lists { services: Vec::with_capacity(n), endpoints: Vec::with_capacity(n) };
        for i in 0..n {
            let name = format!("svc-{i}");
            let mut ports = vec![("http", "TCP", 80u16)];
            if i % 10 == 0 {
                ports.push(("dns", "UDP", 53));
            }
            l.services.push(service(&name, paths::generated_ip(i), &ports));
            let eps = paths::generated_endpoints(i);
            let targets: Vec<(&str, &str, u16)> =
                ports.iter().map(|&(n, p, port)| (n, p, if port == 80 { 8080 } else { 5353 })).collect();
            l.endpoints.push(endpoints(&name, &eps, &targets));
        }
        l
    }
}

fn service(name: &str, ip: Ipv4Addr, ports: &[(&str, &str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port, "targetPort": port}))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-svc-{name}"), "resourceVersion": "1"},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ipFamilies": ["IPv4"], "ports": ports, "sessionAffinity": "None"}
    })
}

fn endpoints(name: &str, addrs: &[String], ports: &[(&str, &str, u16)]) -> Value {
    let addrs: Vec<Value> = addrs.iter().map(|a| json!({"ip": a})).collect();
    let ports: Vec<Value> =
        ports.iter().map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port})).collect();
    json!({
        "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-ep-{name}"), "resourceVersion": "1"},
        "subsets": [{"addresses": addrs, "ports": ports}]
    })
}

/// The stand-in API server: a thread in the namespace accepting on 127.0.0.1, a thread per
/// request. Stops accepting, and ends held watches, on drop.
pub struct ApiServer {
    pub port: u16,
    /// Every service's ClusterIP, as `iptables-save` spells a destination (`-d IP/32`).
    cluster_ips: Vec<String>,
    stop: Arc<AtomicBool>,
}

struct Bodies {
    services: String,
    endpoints: String,
    rules: String,
}

impl ApiServer {
    fn start(ns: &Ns, lists: Lists) -> Res<ApiServer> {
        let cluster_ips: Vec<String> = lists
            .services
            .iter()
            .map(|s| format!("-d {}/32 ", s["spec"]["clusterIP"].as_str().unwrap_or("")))
            .collect();
        let list = |kind: &str, api: &str, items: Vec<Value>| {
            json!({"kind": kind, "apiVersion": api, "metadata": {"resourceVersion": "1"}, "items": items}).to_string()
        };
        let bodies = Arc::new(Bodies {
            services: list("ServiceList", "v1", lists.services),
            endpoints: list("EndpointsList", "v1", lists.endpoints),
            rules: list("DestinationRuleList", "networking.istio.io/v1alpha3", vec![]),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        ns.thread(move || {
            let l = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("stand-in API server: bind 127.0.0.1:0: {e}")));
                    return;
                }
            };
            let _ = tx.send(l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()));
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let (b, f) = (bodies.clone(), flag.clone());
                        std::thread::spawn(move || answer(&c, &b, &f));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        let port = rx.recv_timeout(Duration::from_secs(5)).map_err(|e| format!("stand-in API server: {e}"))??;
        Ok(ApiServer { port, cluster_ips, stop })
    }

    /// How many ClusterIPs have no rule in `save` (an `iptables-save` of the nat table).
    fn missing(&self, save: &str) -> usize {
        let have: std::collections::HashSet<&str> = save
            .lines()
            .filter_map(|l| l.find("-d ").map(|i| &l[i..]))
            .filter_map(|d| d.get(..d.find("/32 ")? + 4))
            .collect();
        self.cluster_ips.iter().filter(|ip| !have.contains(ip.as_str())).count()
    }
}

/// A second EdgeMesh alone in a fresh namespace with `n` services (the same as edgeproxy's
/// memory figure loads): its RSS once every service has its rules.
pub fn rss_with_services(n: usize, bin: &FsPath, work: &FsPath) -> Res<f64> {
    let ns = Ns::new("emrss")?;
    // One `iptables` process per rule and check: loading 1,000 services takes EdgeMesh a while.
    let (mut p, _api) = spawn(&ns, bin, Lists::generated(n), work, &n.to_string(), Duration::from_secs(600))?;
    std::thread::sleep(Duration::from_millis(500));
    let kib = crate::programs::rss_kib(p.pid())?;
    p.stop();
    Ok(kib)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request: a list gets its body, a watch a chunked stream that says nothing until its
/// `timeoutSeconds` (at most 10 minutes) or until the server stops; anything else a 404.
fn answer(c: &TcpStream, b: &Bodies, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut r = BufReader::new(c);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    // The head's other lines (client-go sends no body with a GET).
    let mut h = String::new();
    while r.read_line(&mut h).is_ok_and(|n| n > 2) {
        h.clear();
    }
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
    let body = match path {
        "/api/v1/services" => &b.services,
        "/api/v1/endpoints" => &b.endpoints,
        "/apis/networking.istio.io/v1alpha3/destinationrules" => &b.rules,
        _ => {
            let s =
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            return reply(c, "404 Not Found", &s.to_string());
        }
    };
    if param("watch") == Some("true") {
        let secs = param("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).unwrap_or(300).min(600);
        let mut w = c;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = w.write_all(b"0\r\n\r\n");
    } else {
        reply(c, "200 OK", body);
    }
}

fn reply(mut c: &TcpStream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = c.write_all(head.as_bytes()).and_then(|()| c.write_all(body.as_bytes()));
}

/// `--edgemesh PATH`, checked to be a file we can run.
pub fn binary(given: &FsPath) -> Res<PathBuf> {
    let p = given.canonicalize().map_err(|e| format!("--edgemesh {}: {e}", given.display()))?;
    let out = std::process::Command::new(&p)
        .arg("--version")
        .output()
        .map_err(|e| format!("--edgemesh {}: cannot run it: {e}", p.display()))?;
    if !String::from_utf8_lossy(&out.stdout).contains("KubeEdge") {
        return Err(format!("--edgemesh {}: `--version` does not print a KubeEdge version", p.display()));
    }
    Ok(p)
}
