//! An in-process Kubernetes API server for tests: HTTPS (or plain HTTP, like the MetaServer) on
//! 127.0.0.1:0, std threads, one connection per request (`Connection: close`).
//!
//! TLS material is made at start with rcgen: a CA, a server certificate for IP 127.0.0.1, and a
//! client certificate, all written to a temp dir with a bearer token file. Every request must
//! carry the token or present the client certificate, or it gets a 401 `Status`.
//!
//! Responses come from a [`Cluster`] that replays the real captures in
//! `../shared/fixtures/monitoring-cluster` (see `fixtures`): lists (paginated by `limit`/`continue`), the watch
//! streams from the list RV (filtered by resourceVersion when a client resumes), and the lists
//! taken after the watch for relists. [`Faults`] inject trouble; [`ApiServer::route`] overrides
//! any request with a scripted [`Reply`].
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;

pub use super::fixtures::read as fixture;

/// One parsed request.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub query: Vec<(String, String)>,
    pub token: Option<String>,
    pub client_cert: bool,
}

impl Request {
    pub fn param(&self, k: &str) -> Option<&str> {
        self.query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }
}

/// How a streamed body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Terminating chunk and TLS close_notify.
    Clean,
    /// Drop the connection without ending the body.
    Abort,
    /// Keep the connection open (sending nothing) this long, then end cleanly.
    Hold(Duration),
}

/// A response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    /// Write the body in pieces of at most this many bytes, flushing each (0 = one piece).
    pub split: usize,
    /// Pause between pieces.
    pub delay: Duration,
    pub end: End,
}

impl Reply {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply { status, body: body.into(), split: 0, delay: Duration::ZERO, end: End::Clean }
    }
    pub fn status(code: u16, reason: &str, message: &str) -> Reply {
        let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code});
        Reply::json(code, body.to_string())
    }
}

/// Fault knobs for the fixture cluster. Counters count down as faults are served.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Watch requests (any resource) answered with the captured expired stream (200 + ERROR 410).
    pub expired_watches: usize,
    /// Second-page list requests answered with the captured `continue` 410.
    pub expired_continues: usize,
    /// Watch streams from the list RV that send this many lines, then half of the next, then drop.
    pub cut_after_lines: Option<usize>,
    pub cuts: usize,
    /// Write watch streams one byte per chunk, flushing each.
    pub byte_chunks: bool,
    /// Extra lines inserted into the first Services watch stream after line `inject_at`.
    pub inject_at: usize,
    pub inject: Vec<Vec<u8>>,
    /// Trickle the first N watch streams at one byte per `trickle_every`.
    pub trickles: usize,
    pub trickle_every: Duration,
    /// After the watch, how long a caught-up watch stays open.
    pub hold: Duration,
}

/// The fixture cluster: before the watch (RV 512) and after it (RV 553).
pub struct Cluster {
    /// Per resource path: list before, list after, watch lines.
    resources: Vec<Resource>,
    pub faults: Faults,
    pub personality: Personality,
}

/// Which server the test server plays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Personality {
    /// kube-apiserver: discovery, bookmarks, 404 for unknown paths.
    #[default]
    ApiServer,
    /// KubeEdge's MetaServer (`edge/pkg/metamanager/metaserver`), as the edge-proxy issue
    /// describes it: every path that is not a resource request answers 500 except /version,
    /// /healthz, /livez and /readyz (so no API discovery); watches carry no bookmarks;
    /// `old_kinds`: older releases call an EndpointSlice list `EndpointslicList`.
    MetaServer { old_kinds: bool },
}

struct Resource {
    path: &'static str,
    before: (String, Vec<Value>),
    after: (String, Vec<Value>),
    watch: Vec<Vec<u8>>,
    /// Set once the whole watch stream from the list RV has been served.
    watched: bool,
}

fn list_items(raw: &[u8]) -> (String, Vec<Value>) {
    let v: Value = serde_json::from_slice(raw).expect("fixture list");
    let rv = v["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
    let items = v["items"].as_array().cloned().unwrap_or_default();
    (rv, items)
}

fn lines(raw: &[u8]) -> Vec<Vec<u8>> {
    raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| [l, b"\n"].concat()).collect()
}

fn line_rv(line: &[u8]) -> u64 {
    let v: Value = serde_json::from_slice(line).unwrap_or(Value::Null);
    v["object"]["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

impl Cluster {
    /// Services and EndpointSlices (and core/v1 Endpoints, list only) from the captures.
    pub fn fixtures() -> Cluster {
        let svc = Resource {
            path: "/api/v1/services",
            before: list_items(&fixture("list-services-raw.json")),
            after: list_items(&fixture("list-services-after-watch-raw.json")),
            watch: lines(&fixture("watch-services.jsonl")),
            watched: false,
        };
        let eps = Resource {
            path: "/apis/discovery.k8s.io/v1/endpointslices",
            before: list_items(&fixture("list-endpointslices-raw.json")),
            after: list_items(&fixture("list-endpointslices-after-watch-raw.json")),
            watch: lines(&fixture("watch-endpointslices.jsonl")),
            watched: false,
        };
        let endpoints = list_items(&fixture("list-endpoints-raw.json"));
        let ep = Resource {
            path: "/api/v1/endpoints",
            before: endpoints.clone(),
            after: endpoints,
            watch: Vec::new(),
            watched: true,
        };
        Cluster {
            resources: vec![svc, eps, ep],
            faults: Faults { hold: Duration::from_millis(300), ..Faults::default() },
            personality: Personality::ApiServer,
        }
    }

    /// Move the cluster to its state after the watch (lists answer with RV 553).
    pub fn advance(&mut self) {
        for r in &mut self.resources {
            r.watched = true;
        }
    }

    fn list_kind(&self, path: &str) -> &'static str {
        match path {
            "/api/v1/services" => "ServiceList",
            "/api/v1/endpoints" => "EndpointsList",
            _ if self.personality == (Personality::MetaServer { old_kinds: true }) => "EndpointslicList",
            _ => "EndpointSliceList",
        }
    }

    /// Answer a request for a known resource path; `None` = 404.
    pub fn answer(&mut self, req: &Request) -> Option<Reply> {
        if let Personality::MetaServer { .. } = self.personality {
            let known = self.resources.iter().any(|r| r.path == req.path);
            let special = ["/version", "/healthz", "/livez", "/readyz"].contains(&req.path.as_str());
            if !known && !special {
                return Some(Reply::status(500, "InternalError", &format!("no resource for {}", req.path)));
            }
        }
        if req.path == "/apis/discovery.k8s.io/v1" {
            return Some(Reply::json(
                200,
                r#"{"kind":"APIResourceList","groupVersion":"discovery.k8s.io/v1","resources":[]}"#,
            ));
        }
        let idx = self.resources.iter().position(|r| r.path == req.path)?;
        if req.is_watch() {
            return Some(self.watch(idx, req));
        }
        let limit: usize = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX).max(1);
        let start: usize = match req.param("continue") {
            None => 0,
            Some(tok) => {
                if self.faults.expired_continues > 0 {
                    self.faults.expired_continues -= 1;
                    return Some(Reply::json(410, fixture("list-services-continue-expired.json")));
                }
                match tok.strip_prefix("offset-").and_then(|n| n.parse().ok()) {
                    Some(n) => n,
                    None => return Some(Reply::status(400, "BadRequest", "bad continue token")),
                }
            }
        };
        let r = &self.resources[idx];
        let (rv, items) = if r.watched { &r.after } else { &r.before };
        let end = (start.saturating_add(limit)).min(items.len());
        let mut meta = serde_json::json!({"resourceVersion": rv});
        if end < items.len() {
            meta["continue"] = Value::String(format!("offset-{end}"));
            meta["remainingItemCount"] = Value::from(items.len() - end);
        }
        let body = serde_json::json!({"kind": self.list_kind(r.path), "apiVersion": "v1", "metadata": meta,
            "items": items.get(start..end).unwrap_or(&[])});
        Some(Reply::json(200, body.to_string()))
    }

    fn watch(&mut self, idx: usize, req: &Request) -> Reply {
        let faults = &mut self.faults;
        if faults.expired_watches > 0 {
            faults.expired_watches -= 1;
            return Reply::json(200, fixture("watch-expired.jsonl"));
        }
        let r = &mut self.resources[idx];
        let from: u64 = req.param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let list_rv: u64 = r.before.0.parse().unwrap_or(0);
        let final_rv: u64 = r.after.0.parse().unwrap_or(0);
        let pending: Vec<&Vec<u8>> =
            if from < list_rv { Vec::new() } else { r.watch.iter().filter(|l| line_rv(l) > from).collect() };
        let caught_up = pending.is_empty() || from >= final_rv;
        if from < list_rv {
            return Reply::status(410, "Expired", &format!("too old resource version: {from} ({list_rv})"));
        }
        if caught_up {
            r.watched = true;
            let kind = if r.path == "/api/v1/services" { "Service" } else { "EndpointSlice" };
            let bookmark = format!(
                "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{kind}\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"{}\"}}}}}}\n",
                from.max(final_rv)
            );
            let body = match self.personality {
                Personality::ApiServer => bookmark,
                Personality::MetaServer { .. } => String::new(), // no bookmarks there
            };
            let mut reply = Reply::json(200, body);
            reply.end = End::Hold(faults.hold);
            return reply;
        }
        let mut body: Vec<u8> = Vec::new();
        let mut end = End::Clean;
        for (i, l) in pending.iter().enumerate() {
            if let Some(n) = faults.cut_after_lines.filter(|_| faults.cuts > 0) {
                if i == n {
                    body.extend_from_slice(&l[..l.len() / 2]);
                    end = End::Abort;
                    faults.cuts -= 1;
                    break;
                }
            }
            body.extend_from_slice(l);
            if i + 1 == faults.inject_at && !faults.inject.is_empty() && r.path == "/api/v1/services" {
                for x in std::mem::take(&mut faults.inject) {
                    body.extend_from_slice(&x);
                }
            }
        }
        if end == End::Clean {
            r.watched = true;
        }
        let mut reply = Reply::json(200, body);
        reply.end = end;
        if faults.byte_chunks {
            reply.split = 1;
        }
        if faults.trickles > 0 {
            faults.trickles -= 1;
            reply.split = 1;
            reply.delay = faults.trickle_every;
        }
        reply
    }
}

type Route = Box<dyn FnMut(&Request) -> Option<Reply> + Send>;

struct Shared {
    cluster: Mutex<Cluster>,
    route: Mutex<Option<Route>>,
    token: Mutex<String>,
    log: Mutex<Vec<Request>>,
    stop: AtomicBool,
    connections: AtomicUsize,
    /// HTTPS checks credentials; plain HTTP is the MetaServer, which has none.
    auth: bool,
}

/// The running server. Stops (and removes its temp dir) on drop.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub url: String,
    /// ca.crt, client.crt, client.key, token, other-ca.crt (a CA that signed nothing here).
    pub dir: PathBuf,
    shared: Arc<Shared>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl ApiServer {
    /// HTTPS with the fixture cluster.
    pub fn start() -> ApiServer {
        Self::start_with(Cluster::fixtures(), true)
    }

    pub fn start_with(cluster: Cluster, tls: bool) -> ApiServer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir =
            std::env::temp_dir().join(format!("ep-api-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let token = "test-token-0123456789".to_string();
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        let tls_config = tls.then(|| Arc::new(make_pki(&dir)));
        let shared = Arc::new(Shared {
            cluster: Mutex::new(cluster),
            route: Mutex::new(None),
            token: Mutex::new(token),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            auth: tls,
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (s, cfg) = (s.clone(), tls_config.clone());
                        s.connections.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || serve(tcp, cfg, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let scheme = if tls { "https" } else { "http" };
        ApiServer { addr, url: format!("{scheme}://{addr}"), dir, shared }
    }

    pub fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.shared.cluster.lock().unwrap()
    }

    /// Answer requests with `f` first; `None` falls through to the cluster.
    pub fn route(&self, f: impl FnMut(&Request) -> Option<Reply> + Send + 'static) {
        *self.shared.route.lock().unwrap() = Some(Box::new(f));
    }

    /// Change the token the server accepts.
    pub fn set_token(&self, t: &str) {
        *self.shared.token.lock().unwrap() = t.to_string();
    }

    /// Requests that got past TLS, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_pki(dir: &Path) -> rustls::ServerConfig {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "edgeproxy-test-ca");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, "system:edgeproxy");
    let client = client_params.signed_by(&client_key, &ca).unwrap();

    let other_key = KeyPair::generate().unwrap();
    let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    other_params.distinguished_name.push(DnType::CommonName, "some-other-ca");
    let other = CertifiedIssuer::self_signed(other_params, other_key).unwrap();

    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("other-ca.crt"), other.pem()).unwrap();
    std::fs::write(dir.join("client.crt"), client.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated().build().unwrap();
    rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap()
}

trait Stream: Read + Write + Send {
    fn peer_cert(&self) -> bool;
    fn close(&mut self);
}

impl Stream for TcpStream {
    fn peer_cert(&self) -> bool {
        false
    }
    fn close(&mut self) {
        let _ = self.flush();
    }
}

impl Stream for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn peer_cert(&self) -> bool {
        self.conn.peer_certificates().is_some_and(|c| !c.is_empty())
    }
    fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
    }
}

fn serve(tcp: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, s: &Shared) {
    tcp.set_nonblocking(false).ok();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let stream: Box<dyn Stream> = match tls {
        Some(cfg) => Box::new(rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), tcp)),
        None => Box::new(tcp),
    };
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return; // TLS handshake failed (wrong CA on the client side, say)
    }
    let mut token = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                token = v.trim().strip_prefix("Bearer ").map(str::to_string);
            }
        }
    }
    let mut stream = reader.into_inner();
    let target = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect();
    let req = Request { path: path.to_string(), query, token, client_cert: stream.peer_cert() };
    s.log.lock().unwrap().push(req.clone());
    let authorized = !s.auth || req.client_cert || req.token.as_deref() == Some(s.token.lock().unwrap().as_str());
    let reply = if !authorized {
        Reply::status(401, "Unauthorized", "Unauthorized")
    } else {
        let routed = s.route.lock().unwrap().as_mut().and_then(|f| f(&req));
        routed.or_else(|| s.cluster.lock().unwrap().answer(&req)).unwrap_or_else(|| {
            Reply::status(404, "NotFound", &format!("the server could not find the requested resource ({})", req.path))
        })
    };
    write_reply(&mut *stream, &reply, &s.stop);
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_reply(stream: &mut dyn Stream, r: &Reply, stop: &AtomicBool) {
    let reason = match r.status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        410 => "Gone",
        _ => "Status",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        r.status
    );
    if stream.write_all(head.as_bytes()).and_then(|_| stream.flush()).is_err() {
        return;
    }
    let pieces: VecDeque<&[u8]> = if r.split == 0 { [&r.body[..]].into() } else { r.body.chunks(r.split).collect() };
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 && !r.delay.is_zero() {
            std::thread::sleep(r.delay);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if p.is_empty() {
            continue;
        }
        let mut chunk = format!("{:x}\r\n", p.len()).into_bytes();
        chunk.extend_from_slice(p);
        chunk.extend_from_slice(b"\r\n");
        if stream.write_all(&chunk).and_then(|_| stream.flush()).is_err() {
            return; // the client went away
        }
    }
    match r.end {
        End::Abort => {}
        End::Clean => {
            let _ = stream.write_all(b"0\r\n\r\n");
            stream.close();
        }
        End::Hold(d) => {
            let until = Instant::now() + d;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = stream.write_all(b"0\r\n\r\n");
            stream.close();
        }
    }
}
