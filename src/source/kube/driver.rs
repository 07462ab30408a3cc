//! The blocking driver of the reflectors: one thread per resource, each performing what its
//! [`Machine`] asks for with a [`Client`], until the stop.
//!
//! Owns: connecting ([`connect`]: settings, client, their warnings logged), the threads
//! ([`spawn`]), which endpoints API to reflect (as configured, or under `auto` what
//! [`probe_endpoints_api`] finds, asked again at every relist), list pages and watch streams as
//! requests (paths, `limit`/`continue`, `timeoutSeconds`, body size limits, stall deadlines),
//! feeding their outcome to the machine as [`Reply`]s and [`WatchItem`]s, and logging the
//! machine's errors at a bounded rate. Every decision of a running reflector (retry, backoff,
//! relist, what to emit) is its machine's; the driver does the I/O and reads the clock.
//!
//! Also the one-shot list of `edgeproxy rules` ([`list_all`]: every page of each kind, listed
//! again from the start on an expired `continue` token). A source that cannot start at all
//! (unusable settings) is a [`SourceError`]; every runtime failure is an event and a retry.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::{self, Client};
use super::error::{ClientError, ErrorKind};
use super::lines::{LineSplitter, Piece};
use super::objects::{decode_document, document_kind, kind_of};
use super::reflector::{collection_path, Action, Machine, ReflectorOptions, Reply, WatchEnd, WatchItem};
use super::settings::Settings;
use super::watch::{decode_watch_line, Status};
use crate::model::{Kind, Object};
use crate::rand;
use crate::ratelog::{summary, Every};
use crate::source::{EndpointsApi, Sink, SourceConfig, SourceEvent};
use crate::state::Change;
use crate::stop::Stop;

/// The source cannot start at all (bad settings). Runtime failures are never errors: they
/// become [`SourceEvent::Error`]s and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    pub message: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SourceError {}

impl From<ClientError> for SourceError {
    fn from(e: ClientError) -> Self {
        SourceError { message: e.message }
    }
}

/// A machine's seed: the options' seed mixed with `salt` when one is set, else from the clock.
fn seed(opts: &ReflectorOptions, salt: u64) -> u64 {
    opts.seed.map_or_else(|| rand::seed(salt), |base| rand::mix(base, salt))
}

/// The settings of the source config ([`Settings::from_source`]), their warnings logged, and a
/// client for them.
pub fn connect(cfg: &SourceConfig, opts: &ReflectorOptions) -> Result<Client, SourceError> {
    let settings = Settings::from_source(cfg, &opts.env)?;
    for w in &settings.warnings {
        log::warn!("{w}");
    }
    let c = Client::new(&settings, &opts.client)?;
    log::info!("API source: {} ({})", c.server(), c.origin());
    Ok(c)
}

/// Start the reflectors with default options. See [`spawn_with`].
pub fn spawn(cfg: &SourceConfig, sink: Sink, stop: Stop) -> Result<Vec<JoinHandle<()>>, SourceError> {
    spawn_with(cfg, ReflectorOptions::default(), sink, stop)
}

/// Start one thread per resource (Services, and EndpointSlices or Endpoints); a stop also
/// interrupts the requests in flight. Fails only on unusable settings.
pub fn spawn_with(
    cfg: &SourceConfig,
    opts: ReflectorOptions,
    sink: Sink,
    stop: Stop,
) -> Result<Vec<JoinHandle<()>>, SourceError> {
    let to_sink = sink.clone();
    let client = connect(cfg, &opts)?.observed(Arc::new(move |verb, code, duration| {
        to_sink(SourceEvent::Request { verb, code, duration });
    }));
    let poll = (!cfg.watch).then_some(cfg.poll_interval);
    let shared = Shared { client, opts: Arc::new(opts), sink, stop, poll };
    let spawn_err = |e: std::io::Error| SourceError { message: format!("cannot start a reflector thread: {e}") };
    let mut handles = Vec::new();
    let services = shared.clone();
    handles.push(thread("watch-services", move || services.reflect_services(1)).map_err(spawn_err)?);
    let (endpoints, api) = (shared.clone(), cfg.endpoints_api);
    handles.push(thread("watch-endpoints", move || endpoints.reflect_endpoints(api, 2)).map_err(spawn_err)?);
    // A stop interrupts the requests in flight (a watch may be blocked in a read).
    let c = shared.client.clone();
    shared.stop.on_stop(move || c.shutdown());
    Ok(handles)
}

fn thread(name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(body)
}

/// What each reflector thread holds: the client (clones share one connection pool), the
/// options, the sink, the stop, and the poll interval (`None`: list once, then watch).
#[derive(Clone)]
struct Shared {
    client: Client,
    opts: Arc<ReflectorOptions>,
    sink: Sink,
    stop: Stop,
    poll: Option<Duration>,
}

impl Shared {
    /// The Services thread: one machine, driven until the stop.
    fn reflect_services(&self, salt: u64) {
        let mut machine = Machine::new(Kind::Service, self.poll, &self.opts, seed(&self.opts, salt));
        drive(&mut machine, &self.client, &self.opts, &self.sink, &self.stop);
    }

    /// The endpoints thread: a machine for the endpoint kind `api` says (or the server serves),
    /// and under `auto` a fresh one whenever a relist finds that the server switched.
    fn reflect_endpoints(&self, api: EndpointsApi, salt: u64) {
        let (client, opts, sink, stop) = (&self.client, &*self.opts, &self.sink, &self.stop);
        let Some(mut kind) = endpoints_kind(client, api, opts, sink, stop, salt) else { return };
        loop {
            let mut machine = Machine::new(kind, self.poll, opts, seed(opts, salt));
            // Under `auto`, each relist asks again which API the server serves (a MetaServer
            // or an upgraded server may start serving EndpointSlices, an old one stop).
            let recheck = || match probe_endpoints_api(client) {
                Ok(k) if k != kind => Some(k),
                _ => None,
            };
            let switch = match api {
                EndpointsApi::Auto => drive_with(&mut machine, client, opts, sink, stop, Some(&recheck)),
                _ => drive_with(&mut machine, client, opts, sink, stop, None),
            };
            let Some(next) = switch else { return };
            log::info!("the server now serves {}; switching from {}", collection_path(next), collection_path(kind));
            // What the old API delivered goes; the new one lists from scratch.
            sink(SourceEvent::Change(Change::Replace(kind, Vec::new())));
            kind = next;
        }
    }
}

/// Which endpoint kind to reflect: as configured, or (auto) what [`probe_endpoints_api`] finds.
/// `None` when stopped before deciding.
fn endpoints_kind(
    client: &Client,
    api: EndpointsApi,
    opts: &ReflectorOptions,
    sink: &Sink,
    stop: &Stop,
    salt: u64,
) -> Option<Kind> {
    match api {
        EndpointsApi::EndpointSlices => return Some(Kind::EndpointSlice),
        EndpointsApi::Endpoints => return Some(Kind::Endpoints),
        EndpointsApi::Auto => {}
    }
    let mut m = Machine::new(Kind::EndpointSlice, None, opts, seed(opts, salt));
    loop {
        match probe_endpoints_api(client) {
            Ok(k) => {
                log::info!("endpoints from {}", collection_path(k));
                return Some(k);
            }
            Err(message) => {
                log::warn!("{message}");
                sink(SourceEvent::Error { kind: None, message });
                let d = m.backoff_after_failure();
                if !stop.sleep(d) {
                    return None;
                }
            }
        }
    }
}

/// Which endpoints API the server serves, asked the way every server answers: a one-item list
/// of EndpointSlices (`?limit=1`), not API discovery, which KubeEdge's MetaServer does not serve
/// (it answers 500 for every path that is not a resource request).
///
/// - 200 with an EndpointSlice list (KubeEdge's older `EndpointslicList` counts) -> EndpointSlices;
/// - 200 with anything else, 404 (no discovery.k8s.io/v1), 400/405/500/501 (a server that cannot
///   list them) -> core/v1 Endpoints;
/// - 401/403, 429, 502-504 and transport errors -> `Err`, retried with back-off: those say
///   nothing about what the server serves.
pub fn probe_endpoints_api(client: &Client) -> Result<Kind, String> {
    let path = "/apis/discovery.k8s.io/v1/endpointslices?limit=1";
    let r = client.get(path).map_err(|e| format!("endpoints API probe: {e}"))?;
    let fallback = |why: String| {
        log::info!("endpoints API probe: {why}; using core/v1 Endpoints");
        Ok(Kind::Endpoints)
    };
    match r.status {
        200 => {
            let body = r.read_limited(4 << 20).map_err(|e| format!("endpoints API probe: {e}"))?;
            let kind = document_kind(&body);
            match kind.as_deref().and_then(kind_of) {
                Some(Kind::EndpointSlice) => Ok(Kind::EndpointSlice),
                _ => fallback(format!("{path} answered a list of kind {kind:?}")),
            }
        }
        s @ (400 | 404 | 405 | 500 | 501) => {
            let st = r.status_body();
            fallback(format!("{path}: HTTP {s} {}", st.message))
        }
        s => {
            let st = r.status_body();
            Err(format!("endpoints API probe: HTTP {s}: {}", st.message))
        }
    }
}

/// Forwards events to the sink and logs errors, each kind of message at most once per 10 s
/// (a stream of garbage lines or bad objects must not flood the log; every event still reaches
/// the sink and its counters). "Kind of message": its first 40 characters, digits left out.
fn emit_to(sink: &Sink) -> impl FnMut(SourceEvent) + '_ {
    let mut limits: HashMap<String, Every> = HashMap::new();
    move |ev: SourceEvent| {
        if let SourceEvent::Error { kind, message } = &ev {
            let shape: String = message.chars().filter(|c| !c.is_ascii_digit()).take(40).collect();
            if limits.len() >= 64 && !limits.contains_key(&shape) {
                limits.clear();
            }
            let every = limits.entry(shape).or_insert_with(|| Every::new(Duration::from_secs(10)));
            if let Some(more) = every.due(Instant::now()) {
                match kind {
                    Some(k) => log::warn!("{k}: {message}{}", summary(more)),
                    None => log::warn!("{message}{}", summary(more)),
                }
            }
        }
        sink(ev)
    }
}

/// Run a machine until `stop`.
pub fn drive(machine: &mut Machine, client: &Client, opts: &ReflectorOptions, sink: &Sink, stop: &Stop) {
    drive_with(machine, client, opts, sink, stop, None);
}

/// [`drive`], asking `recheck` before every relist (a list from the start once a first list is
/// complete): `Some(kind)` stops driving, so that the caller reflects that kind instead.
fn drive_with(
    machine: &mut Machine,
    client: &Client,
    opts: &ReflectorOptions,
    sink: &Sink,
    stop: &Stop,
    recheck: Option<&dyn Fn() -> Option<Kind>>,
) -> Option<Kind> {
    let mut emit = emit_to(sink);
    let mut action = machine.start();
    while !stop.is_stopped() {
        action = match action {
            Action::List { continue_token: None } if machine.resource_version().is_some() => {
                if let Some(next) = recheck.and_then(|f| f()) {
                    return Some(next);
                }
                let reply = list_page(client, machine.kind(), None, opts, stop);
                machine.step(reply, &mut emit)
            }
            Action::List { continue_token } => {
                let reply = list_page(client, machine.kind(), continue_token.as_deref(), opts, stop);
                machine.step(reply, &mut emit)
            }
            Action::Watch { resource_version, timeout_seconds } => {
                watch(machine, client, &resource_version, timeout_seconds, opts, stop, &mut emit)
            }
            Action::Sleep(d) => {
                if !stop.sleep(d) {
                    return None;
                }
                machine.step(Reply::Woke, &mut emit)
            }
        };
    }
    None
}

fn status_message(status: u16, st: &Status) -> String {
    let hint = match status {
        401 => " (unauthorized: check the token or client certificate)",
        403 => " (forbidden: the identity lacks list/watch permission)",
        _ => "",
    };
    let msg = if st.message.is_empty() { String::new() } else { format!(": {}", st.message) };
    format!("HTTP {status}{hint}{msg}")
}

/// Read a whole body with a size limit and a stall deadline.
fn read_body(mut r: client::Response, limit: usize, stall: Duration, stop: &Stop) -> Result<Vec<u8>, ClientError> {
    let server = r.server().to_string();
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).map_err(|e| client::describe_io(&server, e))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > limit {
            return Err(ClientError::new(ErrorKind::Body, format!("the body is larger than the {limit}-byte limit")));
        }
        out.extend_from_slice(&buf[..n]);
        if started.elapsed() > stall {
            return Err(ClientError::new(ErrorKind::Timeout, format!("the body stalled: incomplete after {stall:?}")));
        }
        if stop.is_stopped() {
            return Err(ClientError::new(ErrorKind::Transport, "stopping"));
        }
    }
}

fn list_page(client: &Client, kind: Kind, cont: Option<&str>, opts: &ReflectorOptions, stop: &Stop) -> Reply {
    let mut path = format!("{}?limit={}", collection_path(kind), opts.page_limit);
    if let Some(c) = cont {
        path.push_str("&continue=");
        path.push_str(&encode(c));
    }
    let failed = |expired: bool, message: String| Reply::ListFailed { expired, message };
    let resp = match client.get(&path) {
        Ok(r) => r,
        Err(e) => return failed(false, e.message),
    };
    if resp.status != 200 {
        let status = resp.status;
        let st = resp.status_body();
        return failed(status == 410 || st.is_expired(), status_message(status, &st));
    }
    let body = match read_body(resp, opts.max_page_bytes, opts.stall_timeout, stop) {
        Ok(b) => b,
        Err(e) => return failed(false, format!("reading the list page: {}", e.message)),
    };
    let d = decode_document(&body, Some(kind));
    drop(body);
    if let Some(e) = d.document_error {
        return failed(false, format!("the list page is unusable: {e}"));
    }
    Reply::Page {
        objects: d.objects,
        errors: d.errors,
        resource_version: d.resource_version,
        continue_token: d.continue_token,
    }
}

/// Percent-encode a query value (continue tokens are base64url, but be safe).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn watch(
    machine: &mut Machine,
    client: &Client,
    rv: &str,
    timeout_seconds: u32,
    opts: &ReflectorOptions,
    stop: &Stop,
    emit: &mut dyn FnMut(SourceEvent),
) -> Action {
    let path = format!(
        "{}?watch=true&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={timeout_seconds}",
        collection_path(machine.kind()),
        encode(rv)
    );
    // A quiet resource sends nothing until `timeoutSeconds`, and the server then closes the
    // stream (a normal end): reads may be silent that long, plus a margin, before the stream
    // counts as dead. A longer silence is a server that failed to close (or a dead connection).
    let silence =
        opts.client.idle_timeout.max(Duration::from_secs(u64::from(timeout_seconds)) + opts.watch_close_margin);
    let mut resp = match client.get_with(&path, Some(silence)) {
        Ok(r) => r,
        Err(e) => {
            return machine.step(Reply::WatchRefused { status: None, expired: false, message: e.message }, emit);
        }
    };
    if resp.status != 200 {
        let status = resp.status;
        let st = resp.status_body();
        let expired = status == 410 || st.is_expired();
        return machine
            .step(Reply::WatchRefused { status: Some(status), expired, message: status_message(status, &st) }, emit);
    }
    let server = resp.server().to_string();
    let kind = machine.kind();
    let mut splitter = LineSplitter::new(opts.max_line_bytes);
    // Held for the whole life of a watch: one TLS record's worth is enough per read.
    let mut buf = vec![0u8; 16 * 1024];
    let mut line_started: Option<Instant> = None;
    loop {
        if stop.is_stopped() {
            return Action::Sleep(Duration::ZERO);
        }
        let n = match resp.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let e = client::describe_io(&server, e);
                let end = match e.kind {
                    ErrorKind::Timeout if !splitter.mid_line() => WatchEnd::Idle,
                    ErrorKind::Timeout => WatchEnd::Broken(format!("idle in the middle of an event: {}", e.message)),
                    _ => WatchEnd::Broken(e.message),
                };
                return machine.step(Reply::WatchEnded(end), emit);
            }
        };
        if n == 0 {
            let end = match splitter.mid_line() {
                true => WatchEnd::Broken("the stream ended in the middle of an event".into()),
                false => WatchEnd::Closed,
            };
            return machine.step(Reply::WatchEnded(end), emit);
        }
        let mut next: Option<Action> = None;
        splitter.feed(&buf[..n], &mut |piece| {
            let item = match piece {
                Piece::Line(l) => WatchItem::Line(decode_watch_line(l, kind)),
                Piece::Oversized(n) => WatchItem::Oversized(n),
            };
            next = machine.on_watch(item, emit);
            next.is_none()
        });
        if let Some(a) = next {
            return a;
        }
        if splitter.mid_line() {
            let started = *line_started.get_or_insert_with(Instant::now);
            if started.elapsed() > opts.stall_timeout {
                let m = format!("an event is still incomplete after {:?}: the server is stalling", opts.stall_timeout);
                return machine.step(Reply::WatchEnded(WatchEnd::Broken(m)), emit);
            }
        } else {
            line_started = None;
        }
    }
}

// ---- one-shot list -----------------------------------------------------------------------------

/// What a one-shot list found.
#[derive(Debug, Default)]
pub struct Listed {
    /// Where it came from (server and how it was chosen).
    pub origin: String,
    pub objects: Vec<Object>,
    /// Objects that could not be used, one message each.
    pub errors: Vec<String>,
}

/// List Services and endpoints (EndpointSlices, or Endpoints per `endpoints_api` / discovery)
/// once, completely. For `edgeproxy rules` (a live dry run).
pub fn list_all(cfg: &SourceConfig) -> Result<Listed, SourceError> {
    list_all_with(cfg, &ReflectorOptions::default())
}

pub fn list_all_with(cfg: &SourceConfig, opts: &ReflectorOptions) -> Result<Listed, SourceError> {
    let client = connect(cfg, opts)?;
    let ep_kind = match cfg.endpoints_api {
        EndpointsApi::EndpointSlices => Kind::EndpointSlice,
        EndpointsApi::Endpoints => Kind::Endpoints,
        EndpointsApi::Auto => probe_endpoints_api(&client).map_err(|message| SourceError { message })?,
    };
    let mut out = Listed { origin: format!("{} ({})", client.server(), client.origin()), ..Listed::default() };
    let stop = Stop::new();
    for kind in [Kind::Service, ep_kind] {
        let mut attempts = 0;
        let mut cont: Option<String> = None;
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        loop {
            match list_page(&client, kind, cont.as_deref(), opts, &stop) {
                Reply::Page { objects: o, errors: e, continue_token, .. } => {
                    objects.extend(o);
                    errors.extend(e.into_iter().map(|e| e.to_string()));
                    match continue_token {
                        Some(t) => cont = Some(t),
                        None => break,
                    }
                }
                Reply::ListFailed { expired: true, message } if attempts < 3 => {
                    log::warn!("{kind}: {message}; listing again from the start");
                    attempts += 1;
                    (cont, objects, errors) = (None, Vec::new(), Vec::new());
                }
                Reply::ListFailed { message, .. } => {
                    return Err(SourceError { message: format!("listing {}: {message}", collection_path(kind)) })
                }
                other => unreachable!("list_page returns pages or failures, not {other:?}"),
            }
        }
        out.objects.extend(objects);
        out.errors.extend(errors);
    }
    Ok(out)
}
