//! The list/watch reflector: one per resource (Services; EndpointSlices or core/v1 Endpoints),
//! each on its own thread, turning the API server into [`SourceEvent`]s.
//!
//! Two halves:
//! - [`Machine`], a pure state machine (no I/O, no clock; randomness from a seeded generator it
//!   owns). It is fed [`Input`]s (a list page, a watch line, a failure) and answers with the next
//!   [`Action`] (list a page, watch from a resourceVersion, sleep) while emitting events.
//! - A thin blocking driver ([`spawn`]) that performs the actions with [`Client`].
//!
//! Guarantees ("last known good"): nothing but a real `DELETED` event, or a *complete* list that
//! lacks an object, ever removes one. Failed or partial lists, broken or silent watches, garbage
//! lines, bad objects and oversized objects change nothing; they are reported as
//! [`SourceEvent::Error`] (and logged at warn level by the driver) and the reflector recovers by
//! itself: relist on `410 Gone`/`Expired`, exponential backoff with jitter otherwise, resuming the
//! watch from the last resourceVersion (bookmarks advance it).
//!
//! A complete list becomes one `Change::Replace`; a list with items that failed to decode
//! becomes upserts of the rest plus one `Change::Retain` naming every listed key, so the state
//! drops only what the list really lacks. The reflector holds no copy of the keys it delivered.
//!
//! It never touches the state machine or the rules: it only calls the [`Sink`].

use std::collections::{BTreeSet, HashMap};
use std::io::Read;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{Kind, Object, ObjectKey};
use crate::rand::{self, XorShift};
use crate::ratelog::{summary, Every};
use crate::source::kube::client::{self, Client, ClientOptions};
use crate::source::kube::error::{ClientError, ErrorKind};
use crate::source::kube::objects::{decode_document, ObjectError};
use crate::source::kube::settings::{Env, Settings};
use crate::source::kube::watch::{decode_watch_line, LineError, Status, WatchEvent, WatchLine};
use crate::source::{EndpointsApi, SourceConfig};
use crate::source::{Sink, SourceEvent};
use crate::state::Change;
use crate::stop::Stop;

// ---- options -----------------------------------------------------------------------------------

/// Tunables of the reflectors. [`Default`] is what `edgeproxy run` uses.
#[derive(Clone, Debug)]
pub struct ReflectorOptions {
    pub client: ClientOptions,
    /// `limit` of each list request.
    pub page_limit: u32,
    /// A watch line (one event) longer than this is skipped, never buffered whole.
    pub max_line_bytes: usize,
    /// A list page body larger than this fails the list (and is retried with backoff).
    pub max_page_bytes: usize,
    /// A watch event or list page that is still incomplete this long after its first byte means
    /// the server is stalling (trickling bytes just fast enough to beat the idle timeout): the
    /// connection is dropped and the request retried.
    pub stall_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_cap: Duration,
    /// `timeoutSeconds` of each watch is drawn from this range (client-go uses 300-600 s).
    pub watch_timeout_secs: (u32, u32),
    /// How long past its `timeoutSeconds` a watch may stay silent before it counts as dead (the
    /// server closes it at `timeoutSeconds`; a quiet resource sends nothing until then).
    pub watch_close_margin: Duration,
    /// The process environment for connection resolution (tests replace it).
    pub env: Env,
    /// Seed for jitter and watch timeouts; `None` = from the clock.
    pub seed: Option<u64>,
}

impl Default for ReflectorOptions {
    fn default() -> Self {
        ReflectorOptions {
            client: ClientOptions::default(),
            page_limit: 500,
            max_line_bytes: 16 << 20,
            max_page_bytes: 128 << 20,
            stall_timeout: Duration::from_secs(300),
            backoff_initial: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            watch_timeout_secs: (300, 600),
            watch_close_margin: Duration::from_secs(30),
            env: Env::from_process(),
            seed: None,
        }
    }
}

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

// ---- the pure machine --------------------------------------------------------------------------

/// What the driver should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// GET one list page (`continue_token` None = from the start).
    List { continue_token: Option<String> },
    /// Open a watch from this resourceVersion.
    Watch { resource_version: String, timeout_seconds: u32 },
    /// Wait, then feed [`Input::Woke`].
    Sleep(Duration),
}

/// How a watch stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The server closed it cleanly (`timeoutSeconds` reached, or it just closed).
    Closed,
    /// Nothing arrived within the idle timeout.
    Idle,
    /// The connection broke or stalled (message says how; includes "ended mid-line").
    Broken(String),
}

/// What happened, fed to [`Machine::step`] (outside a watch) or [`Machine::on_watch`] (inside).
#[derive(Debug)]
pub enum Input {
    /// A list page was read and decoded completely.
    Page {
        objects: Vec<Object>,
        errors: Vec<ObjectError>,
        resource_version: Option<String>,
        continue_token: Option<String>,
    },
    /// A list page could not be had. `expired`: HTTP 410 (`continue` token or RV too old).
    ListFailed { expired: bool, message: String },
    /// The watch request was answered with something other than 200, or failed to connect.
    WatchRefused { status: Option<u16>, expired: bool, message: String },
    /// A watch stream ended.
    WatchEnded(WatchEnd),
    /// A sleep is over.
    Woke,
}

/// An input from inside an open watch stream.
#[derive(Debug)]
pub enum WatchInput {
    Line(Result<WatchLine, LineError>),
    /// A line longer than the limit was skipped (its length).
    Oversized(usize),
}

struct Listing {
    objects: Vec<Object>,
    /// Keys of list items that failed to decode: present in the API, so not deleted.
    bad: BTreeSet<ObjectKey>,
    /// Some bad item had no readable name: delete nothing on this list.
    unnamed_bad: bool,
}

/// The reflector state machine for one resource.
pub struct Machine {
    kind: Kind,
    poll: Option<Duration>,
    backoff_initial: Duration,
    backoff_cap: Duration,
    watch_timeout_secs: (u32, u32),
    rng: XorShift,
    /// Last resourceVersion seen (list, event or bookmark).
    rv: Option<String>,
    synced: bool,
    listing: Option<Listing>,
    /// Consecutive failures without progress (drives the backoff).
    failures: u32,
    /// Consecutive expirations (410) without progress.
    expirations: u32,
    /// Whether the current watch delivered anything.
    watch_progress: bool,
    /// What to do after a sleep.
    after_sleep: Option<Action>,
}

impl Machine {
    /// `poll`: `Some(interval)` for poll mode (full lists, no watch).
    pub fn new(kind: Kind, poll: Option<Duration>, opts: &ReflectorOptions, seed: u64) -> Machine {
        Machine {
            kind,
            poll,
            backoff_initial: opts.backoff_initial,
            backoff_cap: opts.backoff_cap,
            watch_timeout_secs: opts.watch_timeout_secs,
            rng: XorShift::new(seed),
            rv: None,
            synced: false,
            listing: None,
            failures: 0,
            expirations: 0,
            watch_progress: false,
            after_sleep: None,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.rv.as_deref()
    }

    pub fn is_polling(&self) -> bool {
        self.poll.is_some()
    }

    /// The first action.
    pub fn start(&mut self) -> Action {
        self.begin_list()
    }

    fn begin_list(&mut self) -> Action {
        self.listing = Some(Listing { objects: Vec::new(), bad: BTreeSet::new(), unnamed_bad: false });
        Action::List { continue_token: None }
    }

    /// The delay for the current failure count: exponential, capped, jittered into [d/2, d].
    pub fn backoff(&mut self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(20);
        let d = self.backoff_initial.saturating_mul(1 << exp).min(self.backoff_cap);
        let frac = (self.rng.next_u64() % 1000) as u32;
        d / 2 + d / 2 * frac / 1000
    }

    fn sleep_then(&mut self, then: Action) -> Action {
        self.after_sleep = Some(then);
        let d = self.backoff();
        Action::Sleep(d)
    }

    fn watch_action(&mut self) -> Action {
        let (lo, hi) = self.watch_timeout_secs;
        let span = u64::from(hi.saturating_sub(lo)) + 1;
        let timeout_seconds = lo + (self.rng.next_u64() % span) as u32;
        self.watch_progress = false;
        match &self.rv {
            Some(rv) => Action::Watch { resource_version: rv.clone(), timeout_seconds },
            // Cannot happen: a watch only follows a list that produced an RV.
            None => self.begin_list(),
        }
    }

    fn error(&self, emit: &mut dyn FnMut(SourceEvent), message: String) {
        emit(SourceEvent::Error { kind: Some(self.kind), message });
    }

    /// Relist after an expiry: at once the first time, with backoff when they repeat (a 410 storm).
    fn relist(&mut self) -> Action {
        self.expirations += 1;
        let a = self.begin_list();
        if self.expirations > 1 {
            self.failures += 1;
            self.sleep_then(a)
        } else {
            a
        }
    }

    /// Feed an input that arrives outside an open watch stream.
    pub fn step(&mut self, input: Input, emit: &mut dyn FnMut(SourceEvent)) -> Action {
        match input {
            Input::Woke => match self.after_sleep.take() {
                Some(a) => a,
                None => self.begin_list(),
            },
            Input::Page { objects, errors, resource_version, continue_token } => {
                let listing = self.listing.get_or_insert_with(|| Listing {
                    objects: Vec::new(),
                    bad: BTreeSet::new(),
                    unnamed_bad: false,
                });
                listing.objects.extend(objects);
                for e in &errors {
                    match &e.key {
                        Some(key) => {
                            listing.bad.insert(key.clone());
                        }
                        None => listing.unnamed_bad = true,
                    }
                }
                for e in errors {
                    self.error(emit, format!("list: skipped object: {e}"));
                }
                if let Some(token) = continue_token {
                    return Action::List { continue_token: Some(token) };
                }
                self.finish_list(resource_version, emit)
            }
            Input::ListFailed { expired, message } => {
                self.error(emit, format!("list failed: {message}"));
                if expired {
                    // A continue token (or RV) that is too old: the pages so far are unusable.
                    return self.relist();
                }
                self.failures += 1;
                // Retry from the start: a page failure may be a server that changed its mind.
                let a = self.begin_list();
                self.sleep_then(a)
            }
            Input::WatchRefused { status, expired, message } => {
                if expired {
                    self.error(emit, format!("watch: resourceVersion expired ({message}); relisting"));
                    return self.relist();
                }
                if matches!(status, Some(400 | 404 | 405 | 501)) && self.poll.is_none() {
                    // The server cannot watch (old or limited MetaServer): poll instead.
                    let interval = Duration::from_secs(30);
                    self.error(
                        emit,
                        format!(
                            "watch not supported ({message}); polling with full lists every {}s",
                            interval.as_secs()
                        ),
                    );
                    self.poll = Some(interval);
                    self.after_sleep = Some(Action::List { continue_token: None });
                    self.listing = None;
                    return Action::Sleep(interval);
                }
                self.failures += 1;
                self.error(emit, format!("watch failed: {message}"));
                let a = self.watch_action();
                self.sleep_then(a)
            }
            Input::WatchEnded(end) => {
                match &end {
                    // The server ends every watch at its timeoutSeconds: normal, not a restart.
                    WatchEnd::Closed => log::debug!("{}: watch closed by the server; watching on", self.kind),
                    WatchEnd::Idle => {
                        self.error(emit, "watch: silent past its timeout; reconnecting".into());
                        emit(SourceEvent::WatchRestarted(self.kind));
                    }
                    WatchEnd::Broken(m) => {
                        self.error(emit, format!("watch broke: {m}"));
                        emit(SourceEvent::WatchRestarted(self.kind));
                    }
                }
                let progressed = self.watch_progress_was_made(&end);
                let a = self.watch_action();
                if progressed {
                    a
                } else {
                    // Ended without delivering anything: do not hammer the server.
                    self.failures += 1;
                    self.sleep_then(a)
                }
            }
        }
    }

    fn watch_progress_was_made(&self, end: &WatchEnd) -> bool {
        // An idle end is by definition without recent progress, but is not the server failing.
        self.watch_progress || *end == WatchEnd::Idle
    }

    fn finish_list(&mut self, resource_version: Option<String>, emit: &mut dyn FnMut(SourceEvent)) -> Action {
        let Listing { objects, bad, unnamed_bad } = self.listing.take().expect("listing in progress");
        if bad.is_empty() && !unnamed_bad {
            emit(SourceEvent::Change(Change::Replace(self.kind, objects)));
        } else {
            // Some items failed to decode: they exist, so their last good version must stay.
            // Upsert what decoded; then only what the list really lacks goes (the state knows
            // what it holds, so the reflector keeps no copy of the keys).
            let mut keys: Vec<ObjectKey> = objects.iter().map(|o| o.key().clone()).collect();
            keys.extend(bad);
            for o in objects {
                emit(SourceEvent::Change(Change::Upsert(o)));
            }
            if unnamed_bad {
                self.error(emit, "list had an unreadable item; nothing is deleted on this list".into());
            } else {
                emit(SourceEvent::Change(Change::Retain(self.kind, keys)));
            }
        }
        if self.synced {
            emit(SourceEvent::Relisted(self.kind));
        } else {
            self.synced = true;
            emit(SourceEvent::Synced(self.kind));
        }
        self.failures = 0;
        self.rv = resource_version.or_else(|| self.rv.take());
        if let Some(interval) = self.poll {
            self.after_sleep = Some(Action::List { continue_token: None });
            self.listing = None;
            return Action::Sleep(interval);
        }
        if self.rv.is_none() {
            let interval = Duration::from_secs(30);
            self.error(
                emit,
                format!(
                    "list carried no resourceVersion, so it cannot be watched; polling every {}s",
                    interval.as_secs()
                ),
            );
            self.poll = Some(interval);
            self.after_sleep = Some(Action::List { continue_token: None });
            return Action::Sleep(interval);
        }
        self.watch_action()
    }

    /// Feed an input from inside an open watch. `None`: keep reading. `Some(action)`: drop the
    /// stream and do that instead.
    pub fn on_watch(&mut self, input: WatchInput, emit: &mut dyn FnMut(SourceEvent)) -> Option<Action> {
        match input {
            WatchInput::Oversized(n) => {
                self.error(emit, format!("watch: skipped an event of {n} bytes (over the line limit); the object keeps its last good version"));
                None
            }
            WatchInput::Line(Err(LineError::Garbage(m))) => {
                self.error(emit, format!("watch: skipped an unusable line: {m}"));
                None
            }
            WatchInput::Line(Err(LineError::Object(e))) => {
                self.error(
                    emit,
                    format!("watch: skipped an event with a bad object (its last good version stays): {e}"),
                );
                None
            }
            WatchInput::Line(Ok(WatchLine { event, resource_version })) => {
                match event {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                        if o.kind() != self.kind {
                            self.error(emit, format!("watch: skipped a {} in a {} watch", o.kind(), self.kind));
                            return None;
                        }
                        emit(SourceEvent::Change(Change::Upsert(o)));
                    }
                    WatchEvent::Deleted(_, key) => {
                        emit(SourceEvent::Change(Change::Delete(self.kind, key)));
                    }
                    WatchEvent::Bookmark => {}
                    WatchEvent::Error(status) => {
                        if status.is_expired() {
                            self.error(emit, format!("watch: {} ({}); relisting", status.message, status.reason));
                            return Some(self.relist());
                        }
                        self.failures += 1;
                        self.error(
                            emit,
                            format!("watch: ERROR event {} {}: {}", status.code, status.reason, status.message),
                        );
                        emit(SourceEvent::WatchRestarted(self.kind));
                        let a = self.watch_action();
                        return Some(self.sleep_then(a));
                    }
                }
                if let Some(rv) = resource_version.filter(|rv| !rv.is_empty()) {
                    self.rv = Some(rv);
                }
                self.watch_progress = true;
                self.failures = 0;
                self.expirations = 0;
                None
            }
        }
    }
}

// ---- the blocking driver -----------------------------------------------------------------------

/// API path of a resource's collection.
pub fn collection_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "/api/v1/services",
        Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        Kind::Endpoints => "/api/v1/endpoints",
    }
}

fn seed(opts: &ReflectorOptions, salt: u64) -> u64 {
    opts.seed.map_or_else(|| rand::seed(salt), |base| rand::mix(base, salt))
}

/// Resolve settings, build the client, log the settings' warnings.
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
    let client = connect(cfg, &opts)?;
    let poll = (!cfg.watch).then_some(cfg.poll_interval);
    let opts = Arc::new(opts);
    let mut handles = Vec::new();
    let spawn_one = |name: &str, endpoints: Option<EndpointsApi>, salt: u64| {
        let (client, opts, sink, stop) = (client.clone(), opts.clone(), sink.clone(), stop.clone());
        std::thread::Builder::new().name(name.into()).spawn(move || {
            let Some(api) = endpoints else {
                let mut machine = Machine::new(Kind::Service, poll, &opts, seed(&opts, salt));
                drive(&mut machine, &client, &opts, &sink, &stop);
                return;
            };
            let Some(mut kind) = endpoints_kind(&client, api, &opts, &sink, &stop, salt) else { return };
            loop {
                let mut machine = Machine::new(kind, poll, &opts, seed(&opts, salt));
                // Under `auto`, each relist asks again which API the server serves (a MetaServer
                // or an upgraded server may start serving EndpointSlices, an old one stop).
                let recheck = || match probe_endpoints_api(&client) {
                    Ok(k) if k != kind => Some(k),
                    _ => None,
                };
                let switch = match api {
                    EndpointsApi::Auto => drive_with(&mut machine, &client, &opts, &sink, &stop, Some(&recheck)),
                    _ => drive_with(&mut machine, &client, &opts, &sink, &stop, None),
                };
                let Some(next) = switch else { return };
                log::info!("the server now serves {}; switching from {}", collection_path(next), collection_path(kind));
                // What the old API delivered goes; the new one lists from scratch.
                sink(SourceEvent::Change(Change::Replace(kind, Vec::new())));
                kind = next;
            }
        })
    };
    let spawn_err = |e: std::io::Error| SourceError { message: format!("cannot start a reflector thread: {e}") };
    handles.push(spawn_one("watch-services", None, 1).map_err(spawn_err)?);
    handles.push(spawn_one("watch-endpoints", Some(cfg.endpoints_api), 2).map_err(spawn_err)?);
    // A stop interrupts the requests in flight (a watch may be blocked in a read).
    let c = client.clone();
    stop.on_stop(move || c.shutdown());
    Ok(handles)
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
                m.failures += 1;
                let d = m.backoff();
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
            let kind = crate::source::kube::objects::document_kind(&body);
            match kind.as_deref().and_then(crate::source::kube::objects::kind_of) {
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
                let input = list_page(client, machine.kind(), None, opts, stop);
                machine.step(input, &mut emit)
            }
            Action::List { continue_token } => {
                let input = list_page(client, machine.kind(), continue_token.as_deref(), opts, stop);
                machine.step(input, &mut emit)
            }
            Action::Watch { resource_version, timeout_seconds } => {
                watch(machine, client, &resource_version, timeout_seconds, opts, stop, &mut emit)
            }
            Action::Sleep(d) => {
                if !stop.sleep(d) {
                    return None;
                }
                machine.step(Input::Woke, &mut emit)
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

fn list_page(client: &Client, kind: Kind, cont: Option<&str>, opts: &ReflectorOptions, stop: &Stop) -> Input {
    let mut path = format!("{}?limit={}", collection_path(kind), opts.page_limit);
    if let Some(c) = cont {
        path.push_str("&continue=");
        path.push_str(&encode(c));
    }
    let failed = |expired: bool, message: String| Input::ListFailed { expired, message };
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
    Input::Page {
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

/// Splits a byte stream into lines, never holding more than `max` bytes of one line: a longer
/// line is skipped and reported with its length.
pub struct LineSplitter {
    max: usize,
    pending: Vec<u8>,
    /// `Some(n)`: inside an oversized line, `n` bytes so far.
    skipping: Option<usize>,
}

/// One item out of a [`LineSplitter`].
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Line(&'a [u8]),
    Oversized(usize),
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter { max, pending: Vec::new(), skipping: None }
    }

    /// Whether a line has started but not ended.
    pub fn mid_line(&self) -> bool {
        !self.pending.is_empty() || self.skipping.is_some()
    }

    /// Feed bytes; `f` is called for each complete line (without the newline; empty lines are
    /// dropped) and for each skipped oversized line. Stops early when `f` returns false.
    pub fn feed(&mut self, mut chunk: &[u8], f: &mut dyn FnMut(Piece<'_>) -> bool) -> bool {
        while !chunk.is_empty() {
            let nl = chunk.iter().position(|&b| b == b'\n');
            let (part, rest, ends) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &[][..], false),
            };
            chunk = rest;
            if let Some(n) = &mut self.skipping {
                *n += part.len() + usize::from(ends);
                if ends {
                    let n = *n;
                    self.skipping = None;
                    if !f(Piece::Oversized(n)) {
                        return false;
                    }
                }
                continue;
            }
            if self.pending.len() + part.len() > self.max {
                self.skipping = Some(self.pending.len() + part.len() + usize::from(ends));
                self.pending = Vec::new(); // release the memory now
                if ends {
                    let n = self.skipping.take().unwrap_or(0);
                    if !f(Piece::Oversized(n)) {
                        return false;
                    }
                }
                continue;
            }
            if !ends {
                self.pending.extend_from_slice(part);
                continue;
            }
            let go_on = if self.pending.is_empty() {
                part.is_empty() || f(Piece::Line(part))
            } else {
                self.pending.extend_from_slice(part);
                let line = std::mem::take(&mut self.pending);
                let r = f(Piece::Line(&line));
                if line.capacity() <= 1 << 20 {
                    self.pending = line;
                    self.pending.clear();
                }
                r
            };
            if !go_on {
                return false;
            }
        }
        true
    }
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
            return machine.step(Input::WatchRefused { status: None, expired: false, message: e.message }, emit);
        }
    };
    if resp.status != 200 {
        let status = resp.status;
        let st = resp.status_body();
        let expired = status == 410 || st.is_expired();
        return machine
            .step(Input::WatchRefused { status: Some(status), expired, message: status_message(status, &st) }, emit);
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
                return machine.step(Input::WatchEnded(end), emit);
            }
        };
        if n == 0 {
            let end = match splitter.mid_line() {
                true => WatchEnd::Broken("the stream ended in the middle of an event".into()),
                false => WatchEnd::Closed,
            };
            return machine.step(Input::WatchEnded(end), emit);
        }
        let mut next: Option<Action> = None;
        splitter.feed(&buf[..n], &mut |piece| {
            let input = match piece {
                Piece::Line(l) => WatchInput::Line(decode_watch_line(l, kind)),
                Piece::Oversized(n) => WatchInput::Oversized(n),
            };
            next = machine.on_watch(input, emit);
            next.is_none()
        });
        if let Some(a) = next {
            return a;
        }
        if splitter.mid_line() {
            let started = *line_started.get_or_insert_with(Instant::now);
            if started.elapsed() > opts.stall_timeout {
                let m = format!("an event is still incomplete after {:?}: the server is stalling", opts.stall_timeout);
                return machine.step(Input::WatchEnded(WatchEnd::Broken(m)), emit);
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
                Input::Page { objects: o, errors: e, continue_token, .. } => {
                    objects.extend(o);
                    errors.extend(e.into_iter().map(|e| e.to_string()));
                    match continue_token {
                        Some(t) => cont = Some(t),
                        None => break,
                    }
                }
                Input::ListFailed { expired: true, message } if attempts < 3 => {
                    log::warn!("{kind}: {message}; listing again from the start");
                    attempts += 1;
                    (cont, objects, errors) = (None, Vec::new(), Vec::new());
                }
                Input::ListFailed { message, .. } => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSet, EndpointSource, Service, ServiceType};

    fn svc(name: &str) -> Object {
        Object::Service(Service {
            key: ObjectKey::new("ns", name),
            service_type: ServiceType::ClusterIP,
            headless: false,
            cluster_ips: vec![],
            ports: vec![],
            affinity_timeout: None,
            internal_local: false,
            labels: Default::default(),
        })
    }

    fn opts() -> ReflectorOptions {
        ReflectorOptions { env: Env::default(), ..ReflectorOptions::default() }
    }

    fn machine() -> Machine {
        Machine::new(Kind::Service, None, &opts(), 42)
    }

    fn page(objects: Vec<Object>, rv: &str, cont: Option<&str>) -> Input {
        Input::Page { objects, errors: vec![], resource_version: Some(rv.into()), continue_token: cont.map(Into::into) }
    }

    fn line(event: WatchEvent, rv: &str) -> WatchInput {
        WatchInput::Line(Ok(WatchLine { event, resource_version: Some(rv.into()) }))
    }

    #[test]
    fn pages_then_replace_then_watch() {
        let mut m = machine();
        let mut ev = Vec::new();
        let mut e = |x| ev.push(x);
        assert_eq!(m.start(), Action::List { continue_token: None });
        assert_eq!(
            m.step(page(vec![svc("a")], "5", Some("t1")), &mut e),
            Action::List { continue_token: Some("t1".into()) }
        );
        let a = m.step(page(vec![svc("b")], "5", None), &mut e);
        let Action::Watch { resource_version, timeout_seconds } = a else { panic!("{a:?}") };
        assert_eq!(resource_version, "5");
        assert!((300..=600).contains(&timeout_seconds));
        assert_eq!(
            ev,
            vec![
                SourceEvent::Change(Change::Replace(Kind::Service, vec![svc("a"), svc("b")])),
                SourceEvent::Synced(Kind::Service),
            ]
        );
    }

    #[test]
    fn expired_continue_restarts_the_list_and_storms_back_off() {
        let mut m = machine();
        let mut ev = Vec::new();
        let mut e = |x| ev.push(x);
        m.start();
        m.step(page(vec![svc("a")], "5", Some("t1")), &mut e);
        let a = m.step(Input::ListFailed { expired: true, message: "410".into() }, &mut e);
        assert_eq!(a, Action::List { continue_token: None });
        let a = m.step(Input::ListFailed { expired: true, message: "410".into() }, &mut e);
        assert!(matches!(a, Action::Sleep(_)), "{a:?}");
        assert_eq!(m.step(Input::Woke, &mut e), Action::List { continue_token: None });
        m.step(page(vec![svc("b")], "9", None), &mut e);
        // Nothing was emitted before the complete list, and only "b" came from it.
        let changes: Vec<_> = ev.iter().filter(|x| matches!(x, SourceEvent::Change(_))).collect();
        assert_eq!(changes, vec![&SourceEvent::Change(Change::Replace(Kind::Service, vec![svc("b")]))]);
    }

    #[test]
    fn watch_events_bookmarks_and_expiry() {
        let mut m = machine();
        let ev = std::cell::RefCell::new(Vec::new());
        let mut e = |x| ev.borrow_mut().push(x);
        m.start();
        m.step(page(vec![svc("a")], "5", None), &mut e);
        assert_eq!(m.on_watch(line(WatchEvent::Added(svc("b")), "6"), &mut e), None);
        assert_eq!(m.on_watch(line(WatchEvent::Bookmark, "8"), &mut e), None);
        assert_eq!(m.resource_version(), Some("8"));
        assert_eq!(m.on_watch(line(WatchEvent::Deleted(Kind::Service, ObjectKey::new("ns", "a")), "9"), &mut e), None);
        let changes: Vec<Change> = ev
            .borrow()
            .iter()
            .filter_map(|x| if let SourceEvent::Change(c) = x { Some(c.clone()) } else { None })
            .collect();
        assert_eq!(
            changes,
            vec![
                Change::Replace(Kind::Service, vec![svc("a")]),
                Change::Upsert(svc("b")),
                Change::Delete(Kind::Service, ObjectKey::new("ns", "a"))
            ]
        );
        // Garbage and oversized lines change nothing.
        assert_eq!(m.on_watch(WatchInput::Line(Err(LineError::Garbage("x".into()))), &mut e), None);
        assert_eq!(m.on_watch(WatchInput::Oversized(20 << 20), &mut e), None);
        assert_eq!(m.resource_version(), Some("9"));
        // A clean end (the server's timeoutSeconds) resumes from the last RV at once, and is no
        // restart: the normal life of a watch.
        let a = m.step(Input::WatchEnded(WatchEnd::Closed), &mut e);
        assert!(matches!(&a, Action::Watch { resource_version, .. } if resource_version == "9"), "{a:?}");
        assert!(!ev.borrow().contains(&SourceEvent::WatchRestarted(Kind::Service)));
        // ERROR Expired -> relist.
        let st = Status { code: 410, reason: "Expired".into(), message: "too old resource version: 9 (12)".into() };
        let a = m
            .on_watch(WatchInput::Line(Ok(WatchLine { event: WatchEvent::Error(st), resource_version: None })), &mut e);
        assert_eq!(a, Some(Action::List { continue_token: None }));
        m.step(page(vec![svc("b")], "12", None), &mut e);
        assert!(ev.borrow().contains(&SourceEvent::Relisted(Kind::Service)));
        // A broken stream is a restart.
        m.step(Input::WatchEnded(WatchEnd::Broken("reset".into())), &mut e);
        assert!(ev.borrow().contains(&SourceEvent::WatchRestarted(Kind::Service)));
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
        let mut m = machine();
        let mut e = |_| {};
        m.start();
        m.step(page(vec![], "5", None), &mut e);
        let mut last = Duration::ZERO;
        for i in 1..=12 {
            let a = m.step(Input::WatchRefused { status: Some(500), expired: false, message: "boom".into() }, &mut e);
            let Action::Sleep(d) = a else { panic!("{a:?}") };
            let full = Duration::from_millis(500).saturating_mul(1 << (i - 1)).min(Duration::from_secs(30));
            assert!(d >= full / 2 && d <= full, "attempt {i}: {d:?} not in [{:?}, {full:?}]", full / 2);
            last = d;
            let a = m.step(Input::Woke, &mut e);
            assert!(matches!(&a, Action::Watch { resource_version, .. } if resource_version == "5"), "{a:?}");
        }
        assert!(last >= Duration::from_secs(15));
        // Progress resets the backoff.
        m.on_watch(line(WatchEvent::Bookmark, "6"), &mut e);
        let Action::Sleep(d) =
            m.step(Input::WatchRefused { status: None, expired: false, message: "x".into() }, &mut e)
        else {
            panic!()
        };
        assert!(d <= Duration::from_millis(500));
    }

    #[test]
    fn a_list_with_a_bad_item_keeps_its_last_good_version() {
        let mut m = machine();
        let ev = std::cell::RefCell::new(Vec::new());
        let mut e = |x| ev.borrow_mut().push(x);
        m.start();
        m.step(page(vec![svc("a"), svc("b"), svc("c")], "5", None), &mut e);
        ev.borrow_mut().clear();
        m.step(Input::WatchEnded(WatchEnd::Broken("x".into())), &mut e);
        m.step(Input::Woke, &mut e);
        m.step(Input::ListFailed { expired: true, message: "410".into() }, &mut e);
        let bad = ObjectError {
            kind: Some(Kind::Service),
            object: "ns/b".into(),
            key: Some(ObjectKey::new("ns", "b")),
            field: "spec.ports[0].port".into(),
            message: "x".into(),
        };
        m.step(
            Input::Page {
                objects: vec![svc("a")],
                errors: vec![bad],
                resource_version: Some("7".into()),
                continue_token: None,
            },
            &mut e,
        );
        let changes: Vec<_> = ev
            .borrow()
            .iter()
            .filter_map(|x| if let SourceEvent::Change(c) = x { Some(c.clone()) } else { None })
            .collect();
        // "b" failed to decode but exists: it stays; "c" is gone from the list: it goes.
        let keep = vec![ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b")];
        assert_eq!(changes, vec![Change::Upsert(svc("a")), Change::Retain(Kind::Service, keep.clone())]);
        let mut st = crate::state::State::new(crate::state::StateConfig::from(&crate::config::Config::defaults()));
        st.apply(Change::Replace(Kind::Service, vec![svc("a"), svc("b"), svc("c")]));
        for c in changes {
            st.apply(c);
        }
        assert_eq!(st.snapshot().services.keys().cloned().collect::<Vec<_>>(), keep);
    }

    #[test]
    fn unsupported_watch_falls_back_to_polling() {
        let mut m = Machine::new(Kind::Endpoints, None, &opts(), 1);
        let mut e = |_| {};
        m.start();
        m.step(page(vec![], "5", None), &mut e);
        let a = m.step(Input::WatchRefused { status: Some(405), expired: false, message: "HTTP 405".into() }, &mut e);
        assert_eq!(a, Action::Sleep(Duration::from_secs(30)));
        assert!(m.is_polling());
        assert_eq!(m.step(Input::Woke, &mut e), Action::List { continue_token: None });
        assert_eq!(m.step(page(vec![], "6", None), &mut e), Action::Sleep(Duration::from_secs(30)));
    }

    #[test]
    fn poll_mode_lists_on_an_interval() {
        let mut m = Machine::new(Kind::EndpointSlice, Some(Duration::from_secs(7)), &opts(), 1);
        let mut ev = Vec::new();
        let mut e = |x| ev.push(x);
        m.start();
        let set = Object::Endpoints(EndpointSet {
            source: EndpointSource::Slice,
            key: ObjectKey::new("ns", "s-1"),
            service: ObjectKey::new("ns", "s"),
            groups: vec![],
        });
        assert_eq!(m.step(page(vec![set.clone()], "5", None), &mut e), Action::Sleep(Duration::from_secs(7)));
        assert_eq!(m.step(Input::Woke, &mut e), Action::List { continue_token: None });
        assert_eq!(m.step(page(vec![set.clone()], "6", None), &mut e), Action::Sleep(Duration::from_secs(7)));
        assert_eq!(ev.iter().filter(|x| matches!(x, SourceEvent::Relisted(_))).count(), 1);
    }

    #[test]
    fn splitter_handles_any_chunking_and_skips_long_lines() {
        let input = b"{\"a\":1}\n\n{\"b\":2}\nxxxxxxxxxxxxxxxxxxxx\n{\"c\":3}\n";
        for chunk in 1..input.len() {
            let mut s = LineSplitter::new(10);
            let mut got: Vec<String> = Vec::new();
            for c in input.chunks(chunk) {
                s.feed(c, &mut |p| {
                    got.push(match p {
                        Piece::Line(l) => String::from_utf8(l.to_vec()).unwrap(),
                        Piece::Oversized(n) => format!("<{n}>"),
                    });
                    true
                });
            }
            assert_eq!(got, vec!["{\"a\":1}", "{\"b\":2}", "<21>", "{\"c\":3}"], "chunk size {chunk}");
            assert!(!s.mid_line());
        }
    }
}
