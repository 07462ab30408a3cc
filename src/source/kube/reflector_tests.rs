//! Unit tests of the reflector's machine: list pages, watch events, expiry, backoff, last known
//! good, polling; no I/O, no clock.

use super::*;
use crate::config::Config;
use crate::model::{EndpointSet, EndpointSource, Service, ServiceType};
use crate::source::kube::watch::Status;

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
        data_path: None,
        probe_interval: None,
    })
}

fn opts() -> ReflectorOptions {
    ReflectorOptions { env: Env::default(), ..ReflectorOptions::default() }
}

fn machine() -> Machine {
    Machine::new(Kind::Service, None, &opts(), 42)
}

fn page(objects: Vec<Object>, rv: &str, cont: Option<&str>) -> Reply {
    Reply::Page { objects, errors: vec![], resource_version: Some(rv.into()), continue_token: cont.map(Into::into) }
}

fn line(event: WatchEvent, rv: &str) -> WatchItem {
    WatchItem::Line(Ok(WatchLine { event, resource_version: Some(rv.into()) }))
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
    let a = m.step(Reply::ListFailed { expired: true, message: "410".into() }, &mut e);
    assert_eq!(a, Action::List { continue_token: None });
    let a = m.step(Reply::ListFailed { expired: true, message: "410".into() }, &mut e);
    assert!(matches!(a, Action::Sleep(_)), "{a:?}");
    assert_eq!(m.step(Reply::Woke, &mut e), Action::List { continue_token: None });
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
    assert_eq!(m.on_watch(WatchItem::Line(Err(LineError::Garbage("x".into()))), &mut e), None);
    assert_eq!(m.on_watch(WatchItem::Oversized(20 << 20), &mut e), None);
    assert_eq!(m.resource_version(), Some("9"));
    // A clean end (the server's timeoutSeconds) resumes from the last RV at once, and is no
    // restart: the normal life of a watch.
    let a = m.step(Reply::WatchEnded(WatchEnd::Closed), &mut e);
    assert!(matches!(&a, Action::Watch { resource_version, .. } if resource_version == "9"), "{a:?}");
    assert!(!ev.borrow().contains(&SourceEvent::WatchRestarted(Kind::Service)));
    // ERROR Expired -> relist.
    let st = Status { code: 410, reason: "Expired".into(), message: "too old resource version: 9 (12)".into() };
    let a = m.on_watch(WatchItem::Line(Ok(WatchLine { event: WatchEvent::Error(st), resource_version: None })), &mut e);
    assert_eq!(a, Some(Action::List { continue_token: None }));
    m.step(page(vec![svc("b")], "12", None), &mut e);
    assert!(ev.borrow().contains(&SourceEvent::Relisted(Kind::Service)));
    // A broken stream is a restart.
    m.step(Reply::WatchEnded(WatchEnd::Broken("reset".into())), &mut e);
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
        let a = m.step(Reply::WatchRefused { status: Some(500), expired: false, message: "boom".into() }, &mut e);
        let Action::Sleep(d) = a else { panic!("{a:?}") };
        let full = Duration::from_millis(500).saturating_mul(1 << (i - 1)).min(Duration::from_secs(30));
        assert!(d >= full / 2 && d <= full, "attempt {i}: {d:?} not in [{:?}, {full:?}]", full / 2);
        last = d;
        let a = m.step(Reply::Woke, &mut e);
        assert!(matches!(&a, Action::Watch { resource_version, .. } if resource_version == "5"), "{a:?}");
    }
    assert!(last >= Duration::from_secs(15));
    // Progress resets the backoff.
    m.on_watch(line(WatchEvent::Bookmark, "6"), &mut e);
    let Action::Sleep(d) = m.step(Reply::WatchRefused { status: None, expired: false, message: "x".into() }, &mut e)
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
    m.step(Reply::WatchEnded(WatchEnd::Broken("x".into())), &mut e);
    m.step(Reply::Woke, &mut e);
    m.step(Reply::ListFailed { expired: true, message: "410".into() }, &mut e);
    let bad = ObjectError {
        kind: Some(Kind::Service),
        object: "ns/b".into(),
        key: Some(ObjectKey::new("ns", "b")),
        field: "spec.ports[0].port".into(),
        message: "x".into(),
    };
    m.step(
        Reply::Page {
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
    let mut st = crate::state::State::new(crate::state::StateConfig::from(&Config::defaults()));
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
    let a = m.step(Reply::WatchRefused { status: Some(405), expired: false, message: "HTTP 405".into() }, &mut e);
    assert_eq!(a, Action::Sleep(Duration::from_secs(30)));
    assert!(m.is_polling());
    assert_eq!(m.step(Reply::Woke, &mut e), Action::List { continue_token: None });
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
        trigger_ms: None,
    });
    assert_eq!(m.step(page(vec![set.clone()], "5", None), &mut e), Action::Sleep(Duration::from_secs(7)));
    assert_eq!(m.step(Reply::Woke, &mut e), Action::List { continue_token: None });
    assert_eq!(m.step(page(vec![set.clone()], "6", None), &mut e), Action::Sleep(Duration::from_secs(7)));
    assert_eq!(ev.iter().filter(|x| matches!(x, SourceEvent::Relisted(_))).count(), 1);
}
