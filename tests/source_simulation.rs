//! A seeded simulation of the source and the state, in the style of sozu's UDP simulation: a
//! model API server (objects, resourceVersions, an event history that gets compacted) answers
//! the real reflector machine's actions (list pages, watches) with real JSON, through the real
//! decoders, while the cluster changes at random: creates, updates, deletes, objects that fail
//! validation (hostile names and port names, special addresses), garbage lines, bookmarks,
//! dropped and expired watches, failed and expired list pages. Every change the source emits is
//! applied to the real `State`, and checked against the model:
//!
//! - at every step, the state never drops an object that still exists in the cluster (the last
//!   good version of an object whose new version fails validation stays);
//! - at every step, every object in the state is a valid version the cluster really had;
//! - once the cluster is quiet and the watch has caught up, the state holds exactly the
//!   current valid version of every object, a previous valid version of every object whose
//!   current version is invalid (or nothing, if it never had one the source could see), and
//!   nothing that was deleted.
//!
//! Deterministic per seed (`SIM_SEED=n` replays one; `SIM_SEEDS=n` runs more seeds); no clock,
//! no network, no root.

use std::collections::{BTreeMap, BTreeSet};

use edgeproxy::config::Config;
use edgeproxy::model::Kind;
use edgeproxy::rand::{self, XorShift};
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::source::kube::reflector::{Action, Machine, ReflectorOptions, Reply, WatchEnd, WatchItem};
use edgeproxy::source::kube::watch::decode_watch_line;
use edgeproxy::source::SourceEvent;
use edgeproxy::state::{Change, State, StateConfig};

/// The crate's own generator, with the one helper the model needs.
struct Rng(XorShift);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One version of a Service in the model: its port identifies the version (ports are unique
/// per resourceVersion), `valid` says whether edgeproxy must accept it.
#[derive(Clone, Debug)]
struct Version {
    name: String,
    port: u16,
    ip: &'static str,
    port_name: &'static str,
    valid: bool,
}

impl Version {
    /// The object as the API server would send it, at resourceVersion `rv`.
    fn json(&self, rv: u64) -> String {
        let j = |s: &str| serde_json::to_string(s).unwrap();
        format!(
            r#"{{"kind":"Service","apiVersion":"v1","metadata":{{"name":{},"namespace":"sim","resourceVersion":"{rv}"}},"spec":{{"clusterIP":"{}","ports":[{{"name":{},"port":{}}}]}}}}"#,
            j(&self.name),
            self.ip,
            j(self.port_name),
            self.port
        )
    }
}

/// Names: mostly valid, a few hostile (never valid, whatever the rest says).
const NAMES: &[&str] = &["web", "api", "db", "cache", "mqtt", "dns", "q\"uote", "back\\slash", "Upper", "a/b"];

fn name_ok(name: &str) -> bool {
    name.chars().all(|c| c.is_ascii_lowercase())
}

fn version(rng: &mut Rng, name: &str, port: u16) -> Version {
    // An otherwise valid object is made invalid one time in eight, in a way decode must refuse.
    let (ip, port_name, spoiled) = match rng.below(8) {
        0 => ("127.0.0.1", "http", true),
        1 => ("10.96.0.300", "http", true),
        2 => ("10.96.1.1", "x\" -j RETURN\nCOMMIT\n*filter", true),
        _ => ("10.96.1.1", "http", false),
    };
    Version { name: name.to_string(), port, ip, port_name, valid: name_ok(name) && !spoiled }
}

#[derive(Clone, Debug)]
enum Event {
    Upsert {
        added: bool,
        v: Version,
    },
    /// The object as it was, sent with the deletion's resourceVersion.
    Deleted {
        v: Version,
    },
}

/// The model API server (Services of one namespace).
struct Cluster {
    rv: u64,
    /// name -> (resourceVersion of its last change, version).
    objects: BTreeMap<String, (u64, Version)>,
    /// (rv, event), oldest first; events at or below `compacted` are gone.
    history: Vec<(u64, Event)>,
    compacted: u64,
    /// Every valid version each name has ever had (ports are unique, so a port names a version).
    ever_valid: BTreeMap<String, BTreeSet<u16>>,
    /// A list in progress: its resourceVersion and snapshot.
    listing: Option<(u64, Vec<(u64, Version)>)>,
}

impl Cluster {
    fn mutate(&mut self, rng: &mut Rng) {
        let name = NAMES[rng.0.index(NAMES.len())].to_string();
        self.rv += 1;
        let rv = self.rv;
        let exists = self.objects.contains_key(&name);
        if exists && rng.chance(30) {
            let (_, old) = self.objects.remove(&name).unwrap();
            self.history.push((rv, Event::Deleted { v: old }));
            return;
        }
        assert!(rv < 60_000, "ports encode the resourceVersion");
        let port = 1 + u16::try_from(rv).expect("below 60,000");
        let v = version(rng, &name, port);
        if v.valid {
            self.ever_valid.entry(name.clone()).or_default().insert(port);
        }
        self.objects.insert(name, (rv, v.clone()));
        self.history.push((rv, Event::Upsert { added: !exists, v }));
    }

    fn list_document(items: &[(u64, Version)], rv: u64, cont: Option<&str>) -> String {
        let items: Vec<String> = items.iter().map(|(rv, v)| v.json(*rv)).collect();
        let cont = cont.map(|c| format!(r#","continue":"{c}""#)).unwrap_or_default();
        format!(
            r#"{{"kind":"ServiceList","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"{cont}}},"items":[{}]}}"#,
            items.join(",")
        )
    }

    fn event_line(ev: &Event, rv: u64) -> String {
        match ev {
            Event::Upsert { added, v } => {
                format!(r#"{{"type":"{}","object":{}}}"#, if *added { "ADDED" } else { "MODIFIED" }, v.json(rv))
            }
            Event::Deleted { v } => format!(r#"{{"type":"DELETED","object":{}}}"#, v.json(rv)),
        }
    }
}

/// What the state holds: name -> port (the version).
fn held_versions(state: &State) -> BTreeMap<String, u16> {
    state.snapshot().services.iter().map(|(k, s)| (k.name.to_string(), s.ports.first().map_or(0, |p| p.port))).collect()
}

/// The checks the state must pass at every step.
struct Observer {
    /// What the state held after the previous step: name -> port (the version).
    held: BTreeMap<String, u16>,
}

impl Observer {
    fn after(&mut self, state: &State, cluster: &Cluster, seed: u64, step: usize) {
        let now = held_versions(state);
        for (name, port) in &self.held {
            if !now.contains_key(name) {
                // Allowed only if the cluster deleted the name after the version held was written
                // (ports are resourceVersion + 1 here, see `Cluster::mutate`).
                let written = u64::from(*port) - 1;
                let deleted = cluster
                    .history
                    .iter()
                    .any(|(rv, ev)| *rv > written && matches!(ev, Event::Deleted { v } if v.name == *name));
                assert!(deleted, "seed {seed} step {step}: the state dropped {name}, which the cluster still has");
            }
        }
        for (name, port) in &now {
            assert!(name_ok(name), "seed {seed} step {step}: an invalid name reached the state: {name:?}");
            assert!(
                cluster.ever_valid.get(name).is_some_and(|h| h.contains(port)),
                "seed {seed} step {step}: {name} with port {port} is no valid version the cluster had"
            );
        }
        self.held = now;
    }
}

fn trace(e: &SourceEvent) {
    if std::env::var("SIM_TRACE").is_ok() {
        let text = match e {
            SourceEvent::Change(Change::Upsert(o)) => format!("upsert {}", o.key()),
            SourceEvent::Change(Change::Delete(_, k)) => format!("delete {k}"),
            SourceEvent::Change(Change::Replace(_, v)) => {
                format!("replace {:?}", v.iter().map(|o| o.key().to_string()).collect::<Vec<_>>())
            }
            SourceEvent::Change(Change::Retain(_, v)) => {
                format!("retain {:?}", v.iter().map(|k| k.to_string()).collect::<Vec<_>>())
            }
            other => format!("{other:?}"),
        };
        eprintln!("  -> {}", text.chars().take(200).collect::<String>());
    }
}

/// Apply what the source emitted to the state, then check the state against the model.
fn deliver(
    events: &mut Vec<SourceEvent>,
    state: &mut State,
    observer: &mut Observer,
    cluster: &Cluster,
    (seed, step): (u64, usize),
) {
    for e in events.drain(..) {
        trace(&e);
        if let SourceEvent::Change(c) = e {
            state.apply(c);
        }
    }
    observer.after(state, cluster, seed, step);
}

/// One simulated run: the model cluster, the real machine and state, and the run's progress.
struct Sim {
    seed: u64,
    rng: Rng,
    cluster: Cluster,
    machine: Machine,
    state: State,
    observer: Observer,
    events: Vec<SourceEvent>,
    /// No more changes: the source must converge.
    quiet: bool,
    caught_up_at: Option<usize>,
}

impl Sim {
    fn step(&mut self, reply: Reply) -> Action {
        let events = &mut self.events;
        self.machine.step(reply, &mut |e| events.push(e))
    }

    fn on_line(&mut self, line: &[u8]) -> Option<Action> {
        let events = &mut self.events;
        self.machine.on_watch(WatchItem::Line(decode_watch_line(line, Kind::Service)), &mut |e| events.push(e))
    }

    fn deliver(&mut self, step: usize) {
        deliver(&mut self.events, &mut self.state, &mut self.observer, &self.cluster, (self.seed, step));
    }

    /// A list page (or a failure to get one).
    fn list(&mut self, continue_token: Option<&str>) -> Action {
        if !self.quiet && self.rng.chance(5) {
            return self.step(Reply::ListFailed { expired: false, message: "HTTP 500".into() });
        }
        let cluster = &mut self.cluster;
        let offset: usize = match continue_token {
            None => {
                cluster.listing = Some((cluster.rv, cluster.objects.values().cloned().collect()));
                0
            }
            Some(t) => t.parse().unwrap(),
        };
        let (rv, items) = cluster.listing.clone().expect("a list in progress");
        if offset > 0 && !self.quiet && self.rng.chance(10) {
            // The continue token expired between pages: 410.
            return self.step(Reply::ListFailed { expired: true, message: "HTTP 410".into() });
        }
        let page: Vec<(u64, Version)> = items.iter().skip(offset).take(3).cloned().collect();
        let next = offset + page.len();
        let cont = (next < items.len()).then(|| next.to_string());
        let doc = Cluster::list_document(&page, rv, cont.as_deref());
        let d = decode_document(doc.as_bytes(), Some(Kind::Service));
        assert!(d.document_error.is_none(), "{:?}", d.document_error);
        self.step(Reply::Page {
            objects: d.objects,
            errors: d.errors,
            resource_version: d.resource_version.clone(),
            continue_token: d.continue_token.clone(),
        })
    }

    /// A watch from `from`: refused when compacted, else changes happen, events flow, and the
    /// stream ends somehow.
    fn watch(&mut self, from: u64, step: usize) -> Action {
        if from < self.cluster.compacted {
            return self.step(Reply::WatchRefused { status: Some(410), expired: true, message: "too old".into() });
        }
        let mut cursor = from;
        for _ in 0..50 {
            if !self.quiet && self.rng.chance(35) {
                self.cluster.mutate(&mut self.rng);
            }
            if !self.quiet && self.rng.chance(3) {
                // The server compacts its history; a watch still open gets 410.
                self.cluster.compacted = self.cluster.rv;
                let line = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","code":410,"message":"too old resource version"}}"#;
                if let Some(a) = self.on_line(line) {
                    return a;
                }
                return self.end_watch();
            }
            if let Some(line) = self.next_line(&mut cursor) {
                let a = self.on_line(&line);
                if std::env::var("SIM_TRACE").is_ok() {
                    eprintln!("line {}", String::from_utf8_lossy(&line).chars().take(150).collect::<String>());
                }
                self.deliver(step);
                if let Some(a) = a {
                    return a;
                }
            }
            if self.quiet && cursor >= self.cluster.history.last().map_or(0, |h| h.0) {
                self.caught_up_at.get_or_insert(step);
            }
            if !self.quiet && self.rng.chance(6) {
                break; // the stream ends
            }
        }
        self.end_watch()
    }

    /// The next line of the stream after `cursor`: garbage, a bookmark or the next event.
    fn next_line(&mut self, cursor: &mut u64) -> Option<Vec<u8>> {
        let cluster = &self.cluster;
        let pending = cluster.history.iter().any(|(rv, _)| *rv > *cursor);
        if !self.quiet && self.rng.chance(4) {
            Some(b"{not json at all".to_vec())
        } else if self.rng.chance(5) {
            // A bookmark claims only what was delivered: everything, if nothing is pending, up
            // to the newest resourceVersion.
            if !pending {
                *cursor = (*cursor).max(cluster.rv);
            }
            let bm = format!(
                r#"{{"type":"BOOKMARK","object":{{"kind":"Service","metadata":{{"resourceVersion":"{cursor}"}}}}}}"#
            );
            Some(bm.into_bytes())
        } else {
            cluster.history.iter().find(|(rv, _)| *rv > *cursor).map(|(rv, ev)| {
                *cursor = *rv;
                Cluster::event_line(ev, *rv).into_bytes()
            })
        }
    }

    fn end_watch(&mut self) -> Action {
        let end = match self.rng.below(3) {
            0 => WatchEnd::Closed,
            1 => WatchEnd::Broken("connection reset".into()),
            _ => WatchEnd::Idle,
        };
        self.step(Reply::WatchEnded(end))
    }
}

fn simulate(seed: u64) {
    let mut rng = Rng(XorShift::new(rand::mix(seed, 0)));
    let mut cluster = Cluster {
        rv: 100,
        objects: BTreeMap::new(),
        history: Vec::new(),
        compacted: 100,
        ever_valid: BTreeMap::new(),
        listing: None,
    };
    for _ in 0..6 {
        cluster.mutate(&mut rng);
    }
    let opts = ReflectorOptions { seed: Some(seed), ..ReflectorOptions::default() };
    let mut sim = Sim {
        seed,
        rng,
        cluster,
        machine: Machine::new(Kind::Service, None, &opts, seed),
        state: State::new(StateConfig::from(&Config::defaults())),
        observer: Observer { held: BTreeMap::new() },
        events: Vec::new(),
        quiet: false,
        caught_up_at: None,
    };
    let mut action = sim.machine.start();
    let steps = 400;
    for step in 0..steps * 4 {
        if step == steps {
            sim.quiet = true;
        }
        action = match action {
            Action::Sleep(_) => sim.step(Reply::Woke),
            Action::List { continue_token } => sim.list(continue_token.as_deref()),
            Action::Watch { resource_version, .. } => sim.watch(resource_version.parse().unwrap(), step),
        };
        sim.deliver(step);
        if sim.caught_up_at.is_some() {
            break;
        }
    }
    let (state, cluster, caught_up_at) = (sim.state, sim.cluster, sim.caught_up_at);
    assert!(caught_up_at.is_some(), "seed {seed}: the source never caught up once the cluster was quiet");

    // Converged: the current valid version of each object, else an earlier valid one (or none).
    let held = held_versions(&state);
    for (name, (_, v)) in &cluster.objects {
        match (v.valid, held.get(name)) {
            (true, Some(p)) => assert_eq!(*p, v.port, "seed {seed}: {name} is not at its current version"),
            (true, None) => panic!("seed {seed}: {name} exists with a valid version but is missing"),
            // The last good version stays (possibly of an earlier incarnation of the name, which
            // a relist cannot tell apart from this one).
            (false, Some(p)) => assert!(
                cluster.ever_valid.get(name).is_some_and(|h| h.contains(p)),
                "seed {seed}: {name} holds port {p}, no valid version of it"
            ),
            (false, None) => {}
        }
    }
    let gone: BTreeSet<&String> = held.keys().filter(|n| !cluster.objects.contains_key(*n)).collect();
    assert!(gone.is_empty(), "seed {seed}: deleted objects still held: {gone:?}");
}

#[test]
fn source_and_state_against_a_model_cluster() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        simulate(seed);
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    for seed in 1..=seeds {
        simulate(seed);
    }
}
