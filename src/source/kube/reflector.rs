//! The list/watch reflector's state machine: one [`Machine`] per resource (Services;
//! EndpointSlices or core/v1 Endpoints), pure, with no I/O and no clock (randomness from a seeded
//! generator it owns). `driver` performs what it asks for.
//!
//! It is fed [`Reply`]s (what a list or watch request came to: a list page, a failure, the end of
//! a watch, a sleep that is over) and [`WatchItem`]s (a line from inside an open watch), and
//! answers with the next [`Action`] (list a page, watch from a resourceVersion, sleep) while
//! emitting [`SourceEvent`]s.
//!
//! Guarantees ("last known good"): nothing but a real `DELETED` event, or a *complete* list that
//! lacks an object, ever removes one. Failed or partial lists, broken or silent watches, garbage
//! lines, bad objects and oversized objects change nothing; they are reported as
//! [`SourceEvent::Error`] (the driver logs them at warn level) and the machine recovers by itself:
//! relist on `410 Gone`/`Expired`, exponential backoff with jitter otherwise, resuming the watch
//! from the last resourceVersion (bookmarks advance it).
//!
//! A complete list becomes one `Change::Replace`; a list with items that failed to decode
//! becomes upserts of the rest plus one `Change::Retain` naming every listed key, so the state
//! drops only what the list really lacks. The machine holds no copy of the keys it delivered.
//!
//! It never touches the state or the rules: it only emits events. [`ReflectorOptions`] tunes the
//! machine and its driver alike (its `Default` takes the process environment, for the settings).

use std::collections::BTreeSet;
use std::time::Duration;

use super::client::ClientOptions;
use super::objects::ObjectError;
use super::settings::Env;
use super::watch::{LineError, WatchEvent, WatchLine};
use crate::model::{Kind, Object, ObjectKey};
use crate::rand::XorShift;
use crate::source::SourceEvent;
use crate::state::Change;

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
    /// The process environment the connection settings are read from (tests replace it).
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

// ---- the pure machine --------------------------------------------------------------------------

/// What the driver should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// GET one list page (`continue_token` None = from the start).
    List { continue_token: Option<String> },
    /// Open a watch from this resourceVersion.
    Watch { resource_version: String, timeout_seconds: u32 },
    /// Wait, then feed [`Reply::Woke`].
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

/// What a list or watch request came to (or that a sleep is over): fed to [`Machine::step`],
/// outside an open watch stream ([`WatchItem`]s come from inside one).
#[derive(Debug)]
pub enum Reply {
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

/// What came out of an open watch stream, fed to [`Machine::on_watch`]: a decoded line, or the
/// length of one too long to read.
#[derive(Debug)]
pub enum WatchItem {
    Line(Result<WatchLine, LineError>),
    /// A line longer than the limit was skipped (its length).
    Oversized(usize),
}

/// The list being read, page by page, until its last page completes it.
struct PendingList {
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
    listing: Option<PendingList>,
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
        self.listing = Some(PendingList { objects: Vec::new(), bad: BTreeSet::new(), unnamed_bad: false });
        Action::List { continue_token: None }
    }

    /// The delay for the current failure count: exponential, capped, jittered into [d/2, d].
    pub fn backoff(&mut self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(20);
        let d = self.backoff_initial.saturating_mul(1 << exp).min(self.backoff_cap);
        let frac = (self.rng.next_u64() % 1000) as u32;
        d / 2 + d / 2 * frac / 1000
    }

    /// Count a failure of a request the machine did not ask for (the driver's endpoints-API
    /// probe) and return the delay before trying again: [`Machine::backoff`] after it.
    pub fn backoff_after_failure(&mut self) -> Duration {
        self.failures += 1;
        self.backoff()
    }

    fn sleep_then(&mut self, then: Action) -> Action {
        self.after_sleep = Some(then);
        let d = self.backoff();
        Action::Sleep(d)
    }

    fn watch_action(&mut self) -> Action {
        let (lo, hi) = self.watch_timeout_secs;
        let span = u64::from(hi.saturating_sub(lo)) + 1;
        // Below `span`, so at most `hi - lo`: it fits a u32, and `lo` plus it stays within `hi`.
        let timeout_seconds = lo + u32::try_from(self.rng.next_u64() % span).unwrap_or(0);
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

    /// Feed what a request came to, outside an open watch stream.
    pub fn step(&mut self, reply: Reply, emit: &mut dyn FnMut(SourceEvent)) -> Action {
        match reply {
            Reply::Woke => match self.after_sleep.take() {
                Some(a) => a,
                None => self.begin_list(),
            },
            Reply::Page { objects, errors, resource_version, continue_token } => {
                let listing = self.listing.get_or_insert_with(|| PendingList {
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
            Reply::ListFailed { expired, message } => {
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
            Reply::WatchRefused { status, expired, message } => {
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
            Reply::WatchEnded(end) => {
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
        let PendingList { objects, bad, unnamed_bad } = self.listing.take().expect("listing in progress");
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

    /// Feed an item from inside an open watch. `None`: keep reading. `Some(action)`: drop the
    /// stream and do that instead.
    pub fn on_watch(&mut self, item: WatchItem, emit: &mut dyn FnMut(SourceEvent)) -> Option<Action> {
        match item {
            WatchItem::Oversized(n) => {
                self.error(emit, format!("watch: skipped an event of {n} bytes (over the line limit); the object keeps its last good version"));
                None
            }
            WatchItem::Line(Err(LineError::Garbage(m))) => {
                self.error(emit, format!("watch: skipped an unusable line: {m}"));
                None
            }
            WatchItem::Line(Err(LineError::Object(e))) => {
                self.error(
                    emit,
                    format!("watch: skipped an event with a bad object (its last good version stays): {e}"),
                );
                None
            }
            WatchItem::Line(Ok(WatchLine { event, resource_version })) => {
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

/// API path of a resource's collection.
pub fn collection_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "/api/v1/services",
        Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        Kind::Endpoints => "/api/v1/endpoints",
    }
}

#[cfg(test)]
#[path = "reflector_tests.rs"]
mod tests;
