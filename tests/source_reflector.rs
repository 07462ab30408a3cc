//! The reflectors against the in-process HTTPS API server replaying the real captures, with
//! faults. After each, the reflected state must equal the API's final state (the lists taken
//! after the watch), and no intermediate state may drop an object that still exists.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeproxy::config::Config;
use edgeproxy::model::{Kind, Object, ObjectKey};
use edgeproxy::source::kube::client::ClientOptions;
use edgeproxy::source::kube::driver;
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::source::kube::reflector::ReflectorOptions;
use edgeproxy::source::kube::settings::Env;
use edgeproxy::source::{Sink, SourceEvent};
use edgeproxy::source::{SourceConfig, SourceKind};
use edgeproxy::state::Change;
use edgeproxy::stop::Stop;
use support::apiserver::{fixture, ApiServer, Cluster, Personality, Reply};

type Held = BTreeMap<(Kind, ObjectKey), Object>;

fn cfg_for(s: &ApiServer) -> SourceConfig {
    let mut c = Config::defaults().source;
    c.server = Some(s.url.clone());
    c.ca_file = Some(s.path("ca.crt"));
    c.token_file = Some(s.path("token"));
    c
}

fn opts() -> ReflectorOptions {
    ReflectorOptions {
        client: ClientOptions { connect_timeout: Duration::from_secs(2), idle_timeout: Duration::from_secs(2) },
        page_limit: 5,
        backoff_initial: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        env: Env::default(),
        seed: Some(7),
        ..ReflectorOptions::default()
    }
}

/// The API's final state: the lists taken right after the watch.
fn oracle() -> Held {
    let mut out = Held::new();
    for (file, kind) in [
        ("list-services-after-watch-raw.json", Kind::Service),
        ("list-endpointslices-after-watch-raw.json", Kind::EndpointSlice),
    ] {
        let d = decode_document(&fixture(file), Some(kind));
        assert!(d.errors.is_empty() && d.document_error.is_none(), "{file}: {:?}", d.errors);
        for o in d.objects {
            out.insert((kind, o.key().clone()), o);
        }
    }
    out
}

struct Run {
    stop: Stop,
    handles: Vec<std::thread::JoinHandle<()>>,
    events: Arc<Mutex<Vec<SourceEvent>>>,
}

impl Run {
    fn start(cfg: &SourceConfig, opts: ReflectorOptions) -> Run {
        let events: Arc<Mutex<Vec<SourceEvent>>> = Arc::default();
        let e = events.clone();
        let sink: Sink = Arc::new(move |ev| e.lock().unwrap().push(ev));
        let stop = Stop::new();
        let handles = driver::spawn_with(cfg, opts, sink, stop.clone()).expect("spawn");
        Run { stop, handles, events }
    }

    fn events(&self) -> Vec<SourceEvent> {
        self.events.lock().unwrap().clone()
    }

    fn errors(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                SourceEvent::Error { message, .. } => Some(message),
                _ => None,
            })
            .collect()
    }

    /// Wait until the replayed events equal `want`; check the no-drop invariant on every event.
    fn converge(&self, want: &Held, timeout: Duration) -> Vec<SourceEvent> {
        let start = Instant::now();
        loop {
            let ev = self.events();
            let held = replay(&ev, want);
            if held == *want {
                return ev;
            }
            if start.elapsed() > timeout {
                let have: BTreeSet<_> = held.keys().collect();
                let need: BTreeSet<_> = want.keys().collect();
                panic!(
                    "not converged after {timeout:?}.\nmissing: {:?}\nextra: {:?}\ndiffering: {:?}\nerrors: {:#?}",
                    need.difference(&have).collect::<Vec<_>>(),
                    have.difference(&need).collect::<Vec<_>>(),
                    want.iter()
                        .filter(|(k, v)| held.get(*k).is_some_and(|h| h != *v))
                        .map(|(k, _)| k)
                        .collect::<Vec<_>>(),
                    self.errors()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> Duration {
        let t = Instant::now();
        self.stop.stop();
        for h in self.handles {
            h.join().expect("reflector thread panicked");
        }
        t.elapsed()
    }
}

/// Apply the events in order, as the state machine would. Panics if an object that exists at
/// the end disappears after it first appeared (no intermediate state drops a living object).
fn replay(events: &[SourceEvent], fin: &Held) -> Held {
    let mut held = Held::new();
    let mut seen: BTreeSet<(Kind, ObjectKey)> = BTreeSet::new();
    for (i, ev) in events.iter().enumerate() {
        let SourceEvent::Change(c) = ev else { continue };
        match c {
            Change::Upsert(o) => {
                held.insert((o.kind(), o.key().clone()), o.clone());
            }
            Change::Delete(k, key) => {
                held.remove(&(*k, key.clone()));
            }
            Change::Replace(k, objs) => {
                held.retain(|(kind, _), _| kind != k);
                for o in objs {
                    held.insert((o.kind(), o.key().clone()), o.clone());
                }
            }
            Change::Retain(k, keys) => held.retain(|(kind, key), _| kind != k || keys.contains(key)),
            other => panic!("unexpected change {other:?}"),
        }
        for k in held.keys() {
            if fin.contains_key(k) {
                seen.insert(k.clone());
            }
        }
        for k in &seen {
            assert!(held.contains_key(k), "event {i} ({ev:?}) dropped {k:?}, which still exists");
        }
    }
    held
}

fn count(ev: &[SourceEvent], f: impl Fn(&SourceEvent) -> bool) -> usize {
    ev.iter().filter(|e| f(e)).count()
}

#[test]
fn https_token_paginated_list_then_watch_converges() {
    let s = ApiServer::start();
    let run = Run::start(&cfg_for(&s), opts());
    let ev = run.converge(&oracle(), Duration::from_secs(10));
    assert_eq!(count(&ev, |e| matches!(e, SourceEvent::Synced(_))), 2);
    // Lists were paginated with limit=5 and continue tokens; watches asked for bookmarks.
    let reqs = s.requests();
    assert!(reqs.iter().any(|r| r.param("continue").is_some()), "no paginated list");
    assert!(reqs.iter().filter(|r| r.is_watch()).all(|r| r.param("allowWatchBookmarks") == Some("true")
        && r.param("timeoutSeconds").and_then(|t| t.parse::<u32>().ok()).is_some_and(|t| (300..=600).contains(&t))));
    assert!(reqs.iter().all(|r| r.token.as_deref() == Some("test-token-0123456789")));
    let took = run.stop();
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
}

#[test]
fn client_certificate_auth() {
    let s = ApiServer::start();
    let mut cfg = cfg_for(&s);
    cfg.token_file = None;
    cfg.client_cert = Some(s.path("client.crt"));
    cfg.client_key = Some(s.path("client.key"));
    let run = Run::start(&cfg, opts());
    run.converge(&oracle(), Duration::from_secs(10));
    assert!(s.requests().iter().all(|r| r.client_cert && r.token.is_none()));
    run.stop();
}

#[test]
fn disconnect_mid_line_resumes_from_last_rv() {
    let s = ApiServer::start();
    {
        let mut c = s.cluster();
        c.faults.cut_after_lines = Some(3);
        c.faults.cuts = 2;
    }
    let run = Run::start(&cfg_for(&s), opts());
    let ev = run.converge(&oracle(), Duration::from_secs(10));
    assert!(run.errors().iter().any(|m| m.contains("watch broke")), "{:?}", run.errors());
    assert!(count(&ev, |e| matches!(e, SourceEvent::WatchRestarted(_))) >= 2);
    // Resumed from an RV past the list RV, not relisted.
    assert!(s.requests().iter().any(|r| r.is_watch() && r.param("resourceVersion").is_some_and(|v| v != "512")));
    assert_eq!(count(&ev, |e| matches!(e, SourceEvent::Relisted(_))), 0);
    run.stop();
}

#[test]
fn watch_stream_split_at_every_byte() {
    let s = ApiServer::start();
    s.cluster().faults.byte_chunks = true;
    let run = Run::start(&cfg_for(&s), opts());
    run.converge(&oracle(), Duration::from_secs(20));
    assert!(run.errors().is_empty(), "{:?}", run.errors());
    run.stop();
}

#[test]
fn storm_of_410s_relists_with_backoff_and_converges() {
    let s = ApiServer::start();
    {
        let mut c = s.cluster();
        c.faults.expired_watches = 8;
        c.faults.expired_continues = 3;
    }
    let run = Run::start(&cfg_for(&s), opts());
    let ev = run.converge(&oracle(), Duration::from_secs(15));
    assert!(count(&ev, |e| matches!(e, SourceEvent::Relisted(_))) >= 4, "{ev:?}");
    assert!(run.errors().iter().any(|m| m.contains("too old resource version")), "{:?}", run.errors());
    assert!(run.errors().iter().any(|m| m.contains("HTTP 410")), "{:?}", run.errors());
    run.stop();
}

const ERROR_500: &str = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"etcdserver: request timed out","reason":"InternalError","code":500}}"#;

#[test]
fn error_event_backs_off_and_resumes() {
    let s = ApiServer::start();
    {
        let mut c = s.cluster();
        c.faults.inject_at = 4;
        c.faults.inject = vec![format!("{ERROR_500}\n").into_bytes()];
    }
    let run = Run::start(&cfg_for(&s), opts());
    run.converge(&oracle(), Duration::from_secs(10));
    assert!(run.errors().iter().any(|m| m.contains("etcdserver: request timed out")), "{:?}", run.errors());
    run.stop();
}

/// A MODIFIED event for edge-apps/web-frontend whose object is replaced by `object`.
fn modified_web_frontend(object: &serde_json::Value) -> Vec<u8> {
    format!("{}\n", serde_json::json!({"type": "MODIFIED", "object": object})).into_bytes()
}

fn web_frontend() -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_slice(&fixture("list-services-raw.json")).unwrap();
    let mut o =
        list["items"].as_array().unwrap().iter().find(|i| i["metadata"]["name"] == "web-frontend").unwrap().clone();
    o["metadata"]["resourceVersion"] = "520".into();
    o
}

#[test]
fn garbage_lines_and_bad_objects_are_skipped() {
    let s = ApiServer::start();
    let mut bad = web_frontend();
    bad["spec"]["ports"][0]["port"] = 70000.into();
    {
        let mut c = s.cluster();
        c.faults.inject_at = 2;
        c.faults.inject = vec![
            b"this is not json at all\n".to_vec(),
            b"{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":\n".to_vec(),
            b"{\"type\":\"SURPRISE\",\"object\":{}}\n".to_vec(),
            modified_web_frontend(&bad),
        ];
    }
    let run = Run::start(&cfg_for(&s), opts());
    run.converge(&oracle(), Duration::from_secs(10));
    let errors = run.errors();
    assert!(errors.iter().filter(|m| m.contains("skipped an unusable line")).count() >= 3, "{errors:?}");
    assert!(errors.iter().any(|m| m.contains("edge-apps/web-frontend") && m.contains("70000")), "{errors:?}");
    run.stop();
}

#[test]
fn a_20mb_object_is_skipped_and_never_clears_state() {
    let s = ApiServer::start();
    let mut huge = web_frontend();
    huge["metadata"]["annotations"] = serde_json::json!({"blob": "x".repeat(20 << 20)});
    {
        let mut c = s.cluster();
        c.faults.inject_at = 2;
        c.faults.inject = vec![modified_web_frontend(&huge)];
    }
    let run = Run::start(&cfg_for(&s), opts());
    // 20 MB through TLS: seconds natively, much longer under qemu on a loaded machine.
    run.converge(&oracle(), Duration::from_secs(60));
    assert!(run.errors().iter().any(|m| m.contains("over the line limit")), "{:?}", run.errors());
    run.stop();
}

#[test]
fn a_trickling_server_is_dropped_and_the_watch_resumed() {
    let s = ApiServer::start();
    {
        let mut c = s.cluster();
        c.faults.trickles = 1;
        c.faults.trickle_every = Duration::from_secs(1);
    }
    let mut o = opts();
    o.client.idle_timeout = Duration::from_secs(2);
    o.stall_timeout = Duration::from_secs(3);
    let run = Run::start(&cfg_for(&s), o);
    run.converge(&oracle(), Duration::from_secs(12));
    assert!(run.errors().iter().any(|m| m.contains("stalling")), "{:?}", run.errors());
    run.stop();
}

/// A watch that stays silent past its timeoutSeconds (plus the margin) is a server that failed to
/// close it, or a dead connection: dropped, resumed, counted.
#[test]
fn idle_watch_is_dropped_and_resumed() {
    let s = ApiServer::start();
    s.cluster().faults.hold = Duration::from_secs(5);
    let mut o = opts();
    o.client.idle_timeout = Duration::from_millis(300);
    o.watch_timeout_secs = (1, 1);
    o.watch_close_margin = Duration::from_millis(400);
    let run = Run::start(&cfg_for(&s), o);
    run.converge(&oracle(), Duration::from_secs(10));
    let start = Instant::now();
    while !run.errors().iter().any(|m| m.contains("silent past its timeout")) {
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", run.errors());
        std::thread::sleep(Duration::from_millis(50));
    }
    run.converge(&oracle(), Duration::from_secs(1));
    run.stop();
}

/// A quiet resource: the server sends nothing (after a bookmark) until it closes the watch at its
/// timeoutSeconds. That is the normal life of a watch: no error, no restart counted, even with an
/// idle timeout shorter than the silence (it was one WARN and one restart every 90 s).
#[test]
fn a_quiet_watch_lasts_its_timeout_without_errors_or_restarts() {
    let s = ApiServer::start();
    s.cluster().faults.hold = Duration::from_millis(1200); // silent, then closed
    let mut o = opts();
    o.client.idle_timeout = Duration::from_millis(300);
    o.watch_timeout_secs = (1, 1);
    o.watch_close_margin = Duration::from_secs(2); // the client waits 3 s, the server closes at 1.2 s
    let run = Run::start(&cfg_for(&s), o);
    run.converge(&oracle(), Duration::from_secs(10));
    let errors_before = run.errors().len();
    std::thread::sleep(Duration::from_secs(4));
    let ev = run.events();
    assert_eq!(count(&ev, |e| matches!(e, SourceEvent::WatchRestarted(_))), 0, "{:?}", run.errors());
    assert_eq!(run.errors().len(), errors_before, "{:?}", run.errors());
    let watches = s.requests().iter().filter(|r| r.is_watch()).count();
    assert!(watches >= 3, "the watches went on ({watches})");
    assert!(s.requests().iter().filter(|r| r.is_watch()).all(|r| r.param("allowWatchBookmarks") == Some("true")));
    run.stop();
}

#[test]
fn wrong_ca_fails_clearly_and_never_connects_unverified() {
    let s = ApiServer::start();
    let mut cfg = cfg_for(&s);
    cfg.ca_file = Some(s.path("other-ca.crt"));
    let run = Run::start(&cfg, opts());
    std::thread::sleep(Duration::from_millis(800));
    let ev = run.events();
    assert_eq!(count(&ev, |e| matches!(e, SourceEvent::Change(_) | SourceEvent::Synced(_))), 0, "{ev:?}");
    let errors = run.errors();
    assert!(
        errors.iter().any(|m| m.contains("TLS handshake failed")
            && m.contains("UnknownIssuer")
            && m.contains("does not fall back")),
        "{errors:?}"
    );
    assert!(s.requests().is_empty(), "a request got through: {:?}", s.requests());
    run.stop();
    let e = driver::list_all_with(&cfg, &opts()).unwrap_err();
    assert!(e.message.contains("TLS handshake failed"), "{e}");
}

#[test]
fn unauthorized_then_the_token_file_rotates() {
    let s = ApiServer::start();
    s.set_token("rotated-token");
    let run = Run::start(&cfg_for(&s), opts());
    let start = Instant::now();
    while !run.errors().iter().any(|m| m.contains("HTTP 401 (unauthorized")) {
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", run.errors());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count(&run.events(), |e| matches!(e, SourceEvent::Change(_))), 0);
    std::fs::write(s.path("token"), "rotated-token\n").unwrap();
    run.converge(&oracle(), Duration::from_secs(10));
    assert!(s.requests().iter().any(|r| r.token.as_deref() == Some("rotated-token")));
    run.stop();
}

#[test]
fn metaserver_over_plain_http() {
    let s = ApiServer::start_with(Cluster::fixtures(), false);
    let mut cfg = Config::defaults().source;
    cfg.kind = SourceKind::MetaServer;
    cfg.meta_server = s.url.clone();
    let run = Run::start(&cfg, opts());
    run.converge(&oracle(), Duration::from_secs(10));
    assert!(s.requests().iter().all(|r| r.token.is_none()));
    run.stop();
}

/// KubeEdge's MetaServer answers 500 for every non-resource path (no API discovery) and sends no
/// bookmarks; older releases call the slice list `EndpointslicList`. The default settings
/// (`endpointsApi: auto`) become ready against both, on EndpointSlices.
#[test]
fn metaserver_personality_with_the_default_settings_converges_on_endpointslices() {
    for old_kinds in [false, true] {
        let mut cluster = Cluster::fixtures();
        cluster.personality = Personality::MetaServer { old_kinds };
        let s = ApiServer::start_with(cluster, false);
        let mut cfg = Config::defaults().source;
        assert_eq!(cfg.endpoints_api, edgeproxy::source::EndpointsApi::Auto);
        cfg.kind = SourceKind::MetaServer;
        cfg.meta_server = s.url.clone();
        let run = Run::start(&cfg, opts());
        let ev = run.converge(&oracle(), Duration::from_secs(10));
        assert!(ev.contains(&SourceEvent::Synced(Kind::EndpointSlice)), "old kinds {old_kinds}");
        assert!(s.requests().iter().all(|r| r.path != "/apis/discovery.k8s.io/v1"), "no discovery request");
        assert!(s.requests().iter().all(|r| r.path != "/api/v1/endpoints"), "no fallback to core/v1 Endpoints");
        run.stop();
    }
}

/// A server that cannot list EndpointSlices (404: no discovery.k8s.io/v1; 500: a MetaServer
/// without them) is read through core/v1 Endpoints.
#[test]
fn no_endpointslices_means_core_endpoints() {
    for status in [404, 500] {
        let s = ApiServer::start();
        s.route(move |r| {
            (r.path == "/apis/discovery.k8s.io/v1/endpointslices").then(|| Reply::status(status, "NotFound", "no"))
        });
        let run = Run::start(&cfg_for(&s), opts());
        let mut want: Held = oracle().into_iter().filter(|((k, _), _)| *k == Kind::Service).collect();
        for o in decode_document(&fixture("list-endpoints-raw.json"), Some(Kind::Endpoints)).objects {
            want.insert((Kind::Endpoints, o.key().clone()), o);
        }
        run.converge(&want, Duration::from_secs(10));
        run.stop();
    }
}

/// Answers that say nothing about which API the server serves (401, 503) are retried, never
/// taken as "no EndpointSlices".
#[test]
fn an_unavailable_server_is_retried_not_taken_for_an_old_one() {
    let s = ApiServer::start();
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(2));
    let f = failures.clone();
    s.route(move |r| {
        let probe = r.path == "/apis/discovery.k8s.io/v1/endpointslices" && r.param("limit") == Some("1");
        (probe && f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok())
            .then(|| Reply::status(503, "ServiceUnavailable", "starting"))
    });
    let run = Run::start(&cfg_for(&s), opts());
    run.converge(&oracle(), Duration::from_secs(15));
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(s.requests().iter().all(|r| r.path != "/api/v1/endpoints"));
    run.stop();
}

#[test]
fn poll_mode_lists_on_an_interval_and_follows_changes() {
    let s = ApiServer::start();
    let mut cfg = cfg_for(&s);
    cfg.watch = false;
    cfg.poll_interval = Duration::from_millis(150);
    let run = Run::start(&cfg, opts());
    std::thread::sleep(Duration::from_millis(500));
    s.cluster().advance();
    let ev = run.converge(&oracle(), Duration::from_secs(5));
    assert!(count(&ev, |e| matches!(e, SourceEvent::Relisted(_))) >= 2);
    assert!(s.requests().iter().all(|r| !r.is_watch()));
    run.stop();
}

#[test]
fn list_all_is_the_live_dry_run() {
    let s = ApiServer::start();
    let listed = driver::list_all_with(&cfg_for(&s), &opts()).unwrap();
    assert!(listed.errors.is_empty(), "{:?}", listed.errors);
    let services = listed.objects.iter().filter(|o| o.kind() == Kind::Service).count();
    let slices = listed.objects.iter().filter(|o| o.kind() == Kind::EndpointSlice).count();
    assert_eq!(services, 26);
    let want = decode_document(&fixture("list-endpointslices-raw.json"), Some(Kind::EndpointSlice)).objects.len();
    assert_eq!(slices, want);
    assert!(listed.origin.contains("--server"), "{}", listed.origin);
}

/// Every source setting becomes ready, against the API server and against the MetaServer (both
/// generations of its kinds): endpointsApi auto, endpointslices and endpoints, watch and poll.
#[test]
fn every_source_setting_becomes_ready_against_both_servers() {
    use edgeproxy::source::EndpointsApi;
    let personalities = [
        Personality::ApiServer,
        Personality::MetaServer { old_kinds: false },
        Personality::MetaServer { old_kinds: true },
    ];
    for personality in personalities {
        for api in [EndpointsApi::Auto, EndpointsApi::EndpointSlices, EndpointsApi::Endpoints] {
            for watch in [true, false] {
                let mut cluster = Cluster::fixtures();
                cluster.personality = personality;
                cluster.advance();
                let https = personality == Personality::ApiServer;
                let s = ApiServer::start_with(cluster, https);
                let mut cfg = if https { cfg_for(&s) } else { Config::defaults().source };
                if !https {
                    cfg.kind = SourceKind::MetaServer;
                    cfg.meta_server = s.url.clone();
                }
                cfg.endpoints_api = api;
                cfg.watch = watch;
                cfg.poll_interval = Duration::from_millis(200);
                let mut want: Held = oracle();
                let endpoints_kind = if api == EndpointsApi::Endpoints { Kind::Endpoints } else { Kind::EndpointSlice };
                if endpoints_kind == Kind::Endpoints {
                    want.retain(|(k, _), _| *k == Kind::Service);
                    for o in decode_document(&fixture("list-endpoints-raw.json"), Some(Kind::Endpoints)).objects {
                        want.insert((Kind::Endpoints, o.key().clone()), o);
                    }
                }
                let what = format!("{personality:?}, {api:?}, watch {watch}");
                let run = Run::start(&cfg, opts());
                let ev = run.converge(&want, Duration::from_secs(10));
                for kind in [Kind::Service, endpoints_kind] {
                    assert!(ev.contains(&SourceEvent::Synced(kind)), "{what}: {kind} never synced");
                }
                run.stop();
            }
        }
    }
}

/// Under `endpointsApi: auto` each relist asks again: a server that did not serve EndpointSlices
/// (404) and now does is followed at the next relist, and what core/v1 Endpoints delivered is
/// dropped, so no stale Endpoints object stays beside the slices.
#[test]
fn the_endpoints_api_is_asked_again_at_each_relist() {
    let s = ApiServer::start();
    let slices_served = Arc::new(AtomicBool::new(false));
    let served = slices_served.clone();
    let expired = Arc::new(AtomicBool::new(false));
    s.route(move |r| {
        let now_served = served.load(Ordering::SeqCst);
        if r.path == "/apis/discovery.k8s.io/v1/endpointslices" && !now_served {
            return Some(Reply::status(404, "NotFound", "not found"));
        }
        // Once slices are served, the next core/v1 Endpoints watch expires, so that reflector
        // relists (and asks again).
        (r.path == "/api/v1/endpoints" && r.is_watch() && now_served && !expired.swap(true, Ordering::SeqCst))
            .then(|| Reply::status(410, "Expired", "too old resource version"))
    });
    let run = Run::start(&cfg_for(&s), opts());
    let mut with_endpoints: Held = oracle().into_iter().filter(|((k, _), _)| *k == Kind::Service).collect();
    for o in decode_document(&fixture("list-endpoints-raw.json"), Some(Kind::Endpoints)).objects {
        with_endpoints.insert((Kind::Endpoints, o.key().clone()), o);
    }
    run.converge(&with_endpoints, Duration::from_secs(10));
    // The server starts serving EndpointSlices; the Endpoints watch then expires (see the route).
    slices_served.store(true, Ordering::SeqCst);
    run.converge(&oracle(), Duration::from_secs(15));
    run.stop();
}
