//! The agent's control machine, driven by hand: readiness, batching, stopping.

use std::time::Duration;

use super::*;
use crate::config::Config;
use crate::source::kube::objects::decode_document;
use crate::state::StateConfig;

const SVCS: &str = r#"{"kind":"ServiceList","items":[
  {"metadata":{"name":"web","namespace":"a"},"spec":{"clusterIP":"10.96.0.20","ports":[{"name":"http","port":80}]}}]}"#;
const SLICES: &str = r#"{"kind":"EndpointSliceList","items":[
  {"metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
   "endpoints":[{"addresses":["192.0.2.1"],"conditions":{"ready":true}}],
   "ports":[{"name":"http","port":8080,"protocol":"TCP"}]}]}"#;

fn control() -> Control {
    Control::new(State::new(StateConfig::from(&Config::defaults())))
}

fn feed(c: &mut Control, inputs: Vec<Input>) -> Vec<Effect> {
    let mut out = Vec::new();
    for i in inputs {
        c.input(i, &mut out);
    }
    c.settle(&mut out);
    out
}

fn list(kind: Kind, doc: &str) -> Vec<Input> {
    let objects = decode_document(doc.as_bytes(), Some(kind)).objects;
    vec![Input::Source(SourceEvent::Change(Change::Replace(kind, objects))), Input::Source(SourceEvent::Synced(kind))]
}

fn applied() -> Input {
    Input::Rules(worker::Event::Applied {
        duration: Duration::ZERO,
        restores: 1,
        rules: 1,
        total_restores: 1,
        full: true,
    })
}

fn listening() -> Input {
    Input::Proxy(ProxyEvent::Listening(vec!["169.254.96.16:15001".parse().unwrap()]))
}

/// Join lists of inputs (they are not `Clone`).
fn join(parts: impl IntoIterator<Item = Vec<Input>>) -> Vec<Input> {
    parts.into_iter().flatten().collect()
}

fn rules_sent(out: &[Effect]) -> usize {
    out.iter().filter(|e| matches!(e, Effect::Rules(_))).count()
}

#[test]
fn nothing_is_planned_before_both_kinds_synced() {
    let mut c = control();
    let out = feed(&mut c, list(Kind::Service, SVCS));
    assert_eq!(rules_sent(&out), 0, "{out:?}");
    let out = feed(&mut c, list(Kind::EndpointSlice, SLICES));
    assert!(out.contains(&Effect::SourceSynced), "{out:?}");
    assert_eq!(rules_sent(&out), 1, "{out:?}");
    assert!(out.iter().any(|e| matches!(e, Effect::Table(t) if t.tcp.len() == 1)), "{out:?}");
}

#[test]
fn ready_only_after_sync_rules_and_listening_and_only_once() {
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
        let mut c = control();
        let mut readies = 0;
        for step in order {
            let inputs = match step {
                0 => join([list(Kind::Service, SVCS), list(Kind::EndpointSlice, SLICES)]),
                1 => vec![applied()],
                _ => vec![listening()],
            };
            let out = feed(&mut c, inputs);
            readies += out.iter().filter(|e| **e == Effect::Ready).count();
        }
        assert_eq!(readies, 1, "order {order:?}");
        assert!(c.is_ready());
        // Nothing more arrives: no second READY.
        assert!(!feed(&mut c, vec![applied(), listening()]).contains(&Effect::Ready));
    }
    // Rules and listening without a synced source: not ready.
    let mut c = control();
    let out = feed(&mut c, join([vec![applied(), listening()], list(Kind::Service, SVCS)]));
    assert!(!out.contains(&Effect::Ready) && !c.is_ready());
}

#[test]
fn a_burst_is_one_plan_and_an_unchanged_state_sends_nothing() {
    let mut c = control();
    let mut burst = join([list(Kind::Service, SVCS), list(Kind::EndpointSlice, SLICES)]);
    burst.extend(list(Kind::EndpointSlice, SLICES));
    burst.extend(list(Kind::Service, SVCS));
    assert_eq!(rules_sent(&feed(&mut c, burst)), 1);
    // The same objects again: the plan equals the last one, nothing goes out.
    let out = feed(&mut c, list(Kind::Service, SVCS));
    assert_eq!(rules_sent(&out), 0, "{out:?}");
    assert!(!out.iter().any(|e| matches!(e, Effect::Table(_))), "{out:?}");
}

#[test]
fn kube_proxy_appearing_replans() {
    let mut c = control();
    feed(&mut c, join([list(Kind::Service, SVCS), list(Kind::EndpointSlice, SLICES)]));
    let out = feed(&mut c, vec![Input::Rules(worker::Event::KubeProxy(true))]);
    // default/kubernetes-style ignores do not apply to a/web: the rules are the same, but the
    // state changed, so a plan ran (and found nothing new to send).
    assert_eq!(rules_sent(&out), 0, "{out:?}");
    assert!(c.state().kube_proxy());
}

#[test]
fn a_signal_stops_once_and_nothing_is_planned_after_it() {
    let mut c = control();
    let mut inputs = list(Kind::Service, SVCS);
    inputs.push(Input::Signal("SIGTERM"));
    inputs.extend(list(Kind::EndpointSlice, SLICES));
    inputs.push(Input::Signal("SIGINT"));
    let out = feed(&mut c, inputs);
    assert_eq!(out.iter().filter(|e| matches!(e, Effect::Stop(_))).count(), 1, "{out:?}");
    assert!(out.contains(&Effect::Stop("SIGTERM")));
    assert_eq!(rules_sent(&out), 0, "{out:?}");
}

#[test]
fn a_proxy_failure_stops_and_keeps_its_error() {
    let mut c = control();
    let out = feed(&mut c, vec![Input::ProxyFailed(std::io::Error::other("bind"))]);
    assert_eq!(out, vec![Effect::Stop("proxy failure")]);
    assert_eq!(c.take_proxy_error().map(|e| e.to_string()), Some("bind".into()));
}

#[test]
fn the_watchdog_tick_is_passed_on_at_once() {
    let mut c = control();
    let mut out = Vec::new();
    c.input(Input::Tick, &mut out);
    assert_eq!(out, vec![Effect::Watchdog]);
}

#[test]
fn an_endpoints_change_after_the_sync_is_timed_from_its_trigger() {
    let mut c = control();
    feed(&mut c, join([list(Kind::Service, SVCS), list(Kind::EndpointSlice, SLICES)]));
    let changed = SLICES.replace("192.0.2.1", "192.0.2.7").replace(
        r#""namespace":"a","#,
        r#""namespace":"a","annotations":{"endpoints.kubernetes.io/last-change-trigger-time":"2026-12-01T00:00:00Z"},"#,
    );
    let objects = decode_document(changed.as_bytes(), Some(Kind::EndpointSlice)).objects;
    // A relist (Replace) carries it, as the file source does; the rules do not change (only the
    // proxy table does), so it is in force at once.
    let out = feed(&mut c, vec![Input::Source(SourceEvent::Change(Change::Replace(Kind::EndpointSlice, objects)))]);
    assert!(out.contains(&Effect::Programmed(vec![1_796_083_200_000])), "{out:?}");
    // The same version again is no new change.
    let objects = decode_document(changed.as_bytes(), Some(Kind::EndpointSlice)).objects;
    let out = feed(&mut c, vec![Input::Source(SourceEvent::Change(Change::Replace(Kind::EndpointSlice, objects)))]);
    assert!(!out.iter().any(|e| matches!(e, Effect::Programmed(_))), "{out:?}");
}
