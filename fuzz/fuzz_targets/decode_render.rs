//! Any bytes as an API document (object, typed list, kubectl List), through decode, the state
//! and the plan: never a panic, and every rendered rule stays inside our own nat chains with its
//! comment closed (the injection property, for every input the fuzzer finds).
#![no_main]
use edgeproxy::config::Config;
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::model::Kind;
use edgeproxy::state::{Change, State, StateConfig};
use libfuzzer_sys::fuzz_target;

const OURS: &[&str] = &[
    "KUBE-PORTALS-CONTAINER ",
    "KUBE-PORTALS-HOST ",
    "EDGEPROXY-NO-ENDPOINTS ",
    "EDGE-MESH ",
    "EDGE-MESH-TCP ",
    "EDGE-MESH-UDP ",
];

fuzz_target!(|data: &[u8]| {
    let decoded = decode_document(data, None);
    let mut state = State::new(StateConfig::from(&Config::defaults()));
    let mut by_kind: Vec<(Kind, Vec<_>)> =
        vec![(Kind::Service, vec![]), (Kind::EndpointSlice, vec![]), (Kind::Endpoints, vec![])];
    for o in decoded.objects {
        let k = o.kind();
        by_kind.iter_mut().find(|(kind, _)| *kind == k).expect("three kinds").1.push(o);
    }
    for (kind, objects) in by_kind {
        state.apply(Change::Replace(kind, objects));
    }
    let plan = state.plan();
    for line in plan.rules.v4.rules.iter().chain(&plan.rules.v6.rules) {
        assert!(!line.contains(['\n', '\r', '\0']), "line break in {line:?}");
        let rest = line.strip_prefix("-A ").unwrap_or_else(|| panic!("not an append: {line:?}"));
        assert!(OURS.iter().any(|c| rest.starts_with(c)), "outside our chains: {line:?}");
        assert_eq!(line.matches('"').count() % 2, 0, "unbalanced quotes: {line:?}");
        assert!(!line.contains('\\'), "backslash in {line:?}");
    }
});
