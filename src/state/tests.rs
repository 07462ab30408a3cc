//! The state machine's unit tests.

use super::*;
use crate::config::Config;
use crate::source::kube::objects::decode_document;

fn state(json_svcs: &str, json_slices: &str) -> State {
    let mut st = State::new(StateConfig::from(&Config::defaults()));
    for (doc, kind) in [(json_svcs, Kind::Service), (json_slices, Kind::EndpointSlice)] {
        let d = decode_document(doc.as_bytes(), Some(kind));
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        st.apply(Change::Replace(kind, d.objects));
    }
    st
}

const SVCS: &str = r#"{"kind":"ServiceList","items":[
  {"metadata":{"name":"web","namespace":"a"},"spec":{"clusterIP":"10.96.0.20","ports":[{"name":"http","port":80,"targetPort":"http"}]}},
  {"metadata":{"name":"dns","namespace":"a"},"spec":{"clusterIP":"10.96.0.21","ports":[{"name":"dns","protocol":"UDP","port":53}]}}]}"#;
const SLICES: &str = r#"{"kind":"EndpointSliceList","items":[
  {"metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
   "endpoints":[{"addresses":["192.0.2.1"],"conditions":{"ready":true}},
                {"addresses":["192.0.2.2"],"conditions":{"ready":false,"serving":true,"terminating":true}}],
   "ports":[{"name":"http","port":8080,"protocol":"TCP"}]}]}"#;

#[test]
fn ready_backends_and_reject_without_endpoints() {
    let mut st = state(SVCS, SLICES);
    let plan = st.plan();
    let web = &plan.table.tcp[&"10.96.0.20:80".parse().unwrap()];
    assert_eq!(web.upstreams, vec![Upstream { addr: "192.0.2.1:8080".parse().unwrap(), local: false }]);
    // No endpoints: a reject DNAT in the small chain, ahead of the DNAT to its UDP port.
    let dns: Vec<&String> = plan.rules.v4.rules.iter().filter(|r| r.contains("a/dns:dns")).collect();
    assert_eq!(dns.len(), 3, "{dns:?}");
    assert!(dns[..2].iter().all(|r| r.starts_with("-A KUBE-PORTALS-") && r.ends_with(":15002")), "{dns:?}");
    assert!(
        dns[2].starts_with("-A EDGEPROXY-NO-ENDPOINTS ")
            && dns[2].contains("has no endpoints")
            && dns[2].ends_with(":15000"),
        "{dns:?}"
    );
    assert_eq!(plan.table.udp.keys().copied().collect::<Vec<_>>(), vec![15002]);
}

#[test]
fn terminating_used_only_when_none_ready() {
    let slices = SLICES.replace(r#""conditions":{"ready":true}"#, r#""conditions":{"ready":false}"#);
    let mut st = state(SVCS, &slices);
    let plan = st.plan();
    let web = &plan.table.tcp[&"10.96.0.20:80".parse().unwrap()];
    assert_eq!(web.upstreams[0].addr, "192.0.2.2:8080".parse().unwrap());
}

#[test]
fn udp_ports_are_sticky_and_unchanged_input_is_no_change() {
    let mut st = state(SVCS, SLICES);
    let first = st.plan().rules;
    let d = decode_document(SVCS.as_bytes(), Some(Kind::Service));
    assert!(!st.apply(Change::Replace(Kind::Service, d.objects)));
    assert_eq!(st.plan().rules, first);
    assert!(st.apply(Change::UdpPortUnavailable(15002)));
    assert_eq!(st.plan().table.udp.keys().copied().collect::<Vec<_>>(), vec![15003]);
}

#[test]
fn recurring_strings_are_shared_and_unused_ones_pruned() {
    let slices = r#"{"kind":"EndpointSliceList","items":[
      {"metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
       "endpoints":[{"addresses":["192.0.2.1"],"nodeName":"n1","zone":"z"},{"addresses":["192.0.2.2"],"nodeName":"n1","zone":"z"}],
       "ports":[{"name":"http","port":8080}]},
      {"metadata":{"name":"web-2","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
       "endpoints":[{"addresses":["192.0.2.3"],"nodeName":"n1","zone":"z"}],"ports":[{"name":"http","port":8080}]}]}"#;
    let mut st = state(SVCS, slices);
    let snap = st.snapshot();
    let web = snap.services.get_key_value(&ObjectKey::new("a", "web")).unwrap();
    let sets: Vec<&EndpointSet> = snap.endpoints.values().collect();
    let eps: Vec<&crate::model::Endpoint> = sets.iter().flat_map(|s| s.groups[0].endpoints.iter()).collect();
    for e in &eps[1..] {
        assert!(Arc::ptr_eq(eps[0].node_name.as_ref().unwrap(), e.node_name.as_ref().unwrap()));
        assert!(Arc::ptr_eq(eps[0].zone.as_ref().unwrap(), e.zone.as_ref().unwrap()));
    }
    for set in &sets {
        assert!(Arc::ptr_eq(&set.key.namespace, &web.0.namespace), "namespace shared with the Service");
        assert!(Arc::ptr_eq(&set.service.name, &web.1.key.name), "service name shared with the Service");
        assert!(Arc::ptr_eq(&set.groups[0].ports[0].name, &web.1.ports[0].name), "port name shared");
    }
    assert_eq!(st.plan().table.tcp[&"10.96.0.20:80".parse().unwrap()].upstreams.len(), 3);

    // Everything gone: strings nothing holds any more do not stay forever.
    for (kind, n) in [(Kind::Service, 0), (Kind::EndpointSlice, 0)] {
        st.apply(Change::Replace(kind, Vec::with_capacity(n)));
    }
    for i in 0..200 {
        let doc = SVCS.replace("\"namespace\":\"a\"", &format!("\"namespace\":\"ns-{i}\""));
        let d = decode_document(doc.as_bytes(), Some(Kind::Service));
        st.apply(Change::Replace(Kind::Service, d.objects));
    }
    assert_eq!(st.snapshot().services.len(), 2);
    let held = st.strings.len();
    assert!(held <= 2 * 3 + 64, "interner holds {held} strings for 3 in use");
    assert!(st.strings.iter().any(|s| &**s == "ns-199"));
    assert!(!st.strings.iter().any(|s| &**s == "ns-0"), "a namespace no object uses was kept");
}

#[test]
fn retain_removes_only_unlisted_objects_of_its_kind() {
    let mut st = state(SVCS, SLICES);
    let web = ObjectKey::new("a", "web");
    // A slice list that kept only an unknown key: web-1 goes, services stay.
    assert!(st.apply(Change::Retain(Kind::EndpointSlice, vec![ObjectKey::new("a", "other")])));
    assert!(st.snapshot().endpoints.is_empty());
    assert_eq!(st.snapshot().services.len(), 2);
    assert!(!st.apply(Change::Retain(Kind::Endpoints, vec![])), "no core/v1 Endpoints held: no change");
    assert!(!st.apply(Change::Retain(Kind::Service, vec![ObjectKey::new("a", "dns"), web.clone()])));
    assert!(st.apply(Change::Retain(Kind::Service, vec![web.clone()])));
    assert_eq!(st.snapshot().services.keys().collect::<Vec<_>>(), vec![&web]);
}

#[test]
fn a_replan_shares_unchanged_entries_with_the_previous_table() {
    let mut st = state(SVCS, SLICES);
    let first = st.plan().table;
    let again = st.plan_reusing(&first);
    let (web, dns) = ("10.96.0.20:80".parse().unwrap(), 15002);
    assert!(Arc::ptr_eq(&first.tcp[&web], &again.table.tcp[&web]));
    assert!(Arc::ptr_eq(&first.udp[&dns], &again.table.udp[&dns]));
    assert!(again.reports[1].ports[0].name.shares(&first.tcp[&web].name), "report shares the name");
    assert_eq!(again.table, first);
    // web's endpoints change: its entry is new, dns's is still shared.
    let slices = SLICES.replace("192.0.2.1", "192.0.2.9");
    let d = decode_document(slices.as_bytes(), Some(Kind::EndpointSlice));
    assert!(st.apply(Change::Replace(Kind::EndpointSlice, d.objects)));
    let changed = st.plan_reusing(&first).table;
    assert!(!Arc::ptr_eq(&first.tcp[&web], &changed.tcp[&web]));
    assert_eq!(changed.tcp[&web].upstreams[0].addr, "192.0.2.9:8080".parse().unwrap());
    assert!(Arc::ptr_eq(&first.udp[&dns], &changed.udp[&dns]));
    // Equal to a plan from scratch.
    assert_eq!(changed, st.plan().table);
}

/// PreferDualStack with endpoints of both families: each ClusterIP is served (no reject
/// rule); with IPv4 endpoints only, the IPv6 ClusterIP is refused at once; an IPv4-only
/// service whose only slice is IPv6 is refused at once (it was accepted, then reset).
#[test]
fn each_cluster_ip_is_served_by_its_own_family_only() {
    let svcs = r#"{"kind":"ServiceList","items":[
      {"metadata":{"name":"dual","namespace":"f"},"spec":{"ipFamilyPolicy":"PreferDualStack","clusterIP":"10.96.0.30","clusterIPs":["10.96.0.30","fd00:10:96::30"],"ports":[{"name":"http","port":80}]}},
      {"metadata":{"name":"half","namespace":"f"},"spec":{"ipFamilyPolicy":"PreferDualStack","clusterIP":"10.96.0.31","clusterIPs":["10.96.0.31","fd00:10:96::31"],"ports":[{"name":"http","port":80}]}},
      {"metadata":{"name":"v4svc","namespace":"f"},"spec":{"clusterIP":"10.96.0.32","ports":[{"name":"http","port":80}]}}]}"#;
    let slice = |name: &str, svc: &str, family: &str, addr: &str| {
        format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"f","labels":{{"kubernetes.io/service-name":"{svc}"}}}},"addressType":"{family}","endpoints":[{{"addresses":["{addr}"]}}],"ports":[{{"name":"http","port":8080}}]}}"#
        )
    };
    let slices = format!(
        r#"{{"kind":"EndpointSliceList","items":[{},{},{},{}]}}"#,
        slice("dual-4", "dual", "IPv4", "10.244.0.5"),
        slice("dual-6", "dual", "IPv6", "fd00:244::5"),
        slice("half-4", "half", "IPv4", "10.244.0.6"),
        slice("v4svc-6", "v4svc", "IPv6", "fd00:244::7"),
    );
    let mut st = state(svcs, &slices);
    let plan = st.plan();
    let rejects: Vec<&String> = plan
        .rules
        .v4
        .rules
        .iter()
        .chain(&plan.rules.v6.rules)
        .filter(|r| r.starts_with("-A EDGEPROXY-NO-ENDPOINTS "))
        .collect();
    let rejected = |ip: &str| rejects.iter().any(|r| r.contains(&format!("-d {ip}/")));
    assert!(!rejected("10.96.0.30") && !rejected("fd00:10:96::30"), "{rejects:?}");
    assert!(!rejected("10.96.0.31") && rejected("fd00:10:96::31"), "{rejects:?}");
    assert!(rejected("10.96.0.32"), "{rejects:?}");
    let note = |name: &str| {
        plan.reports.iter().find(|r| &*r.key.name == name).and_then(|r| r.ports[0].note).unwrap_or_default()
    };
    assert!(note("half").contains("one ClusterIP's family"), "{}", note("half"));
    assert!(note("v4svc").contains("one ClusterIP's family"), "{}", note("v4svc"));
    assert_eq!(note("dual"), "");
}

const KERNEL_SVCS: &str = r#"{"kind":"ServiceList","items":[
  {"metadata":{"name":"web","namespace":"a","annotations":{"edgeproxy.io/data-path":"kernel"}},
   "spec":{"clusterIP":"10.96.0.20","ports":[{"name":"http","port":80,"targetPort":"http"}],
           "sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":60}}}},
  {"metadata":{"name":"dns","namespace":"a","annotations":{"edgeproxy.io/data-path":"kernel"}},
   "spec":{"clusterIP":"10.96.0.21","ports":[{"name":"dns","protocol":"UDP","port":53}]}}]}"#;
const KERNEL_SLICES: &str = r#"{"kind":"EndpointSliceList","items":[
  {"metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
   "endpoints":[{"addresses":["192.0.2.1"],"conditions":{"ready":true}},
                {"addresses":["192.0.2.2"],"conditions":{"ready":true}}],
   "ports":[{"name":"http","port":8080,"protocol":"TCP"}]}]}"#;

fn kernel_lines(plan: &Plan) -> Vec<&str> {
    plan.rules.v4.rules.iter().filter(|r| r.starts_with("-A EDGEPROXY-KERNEL ")).map(String::as_str).collect()
}

/// `edgeproxy.io/data-path: kernel`: DNATs straight to the endpoints, no proxy table entry to
/// look up, no UDP proxy port; the probes still see the TCP port; no endpoints still refuses.
#[test]
fn a_kernel_path_service_is_dnated_to_its_endpoints() {
    let mut st = state(KERNEL_SVCS, KERNEL_SLICES);
    let plan = st.plan();
    assert!(plan.table.tcp.is_empty() && plan.table.udp.is_empty(), "{:?}", plan.table);
    assert_eq!(plan.table.kernel.len(), 1);
    assert_eq!(plan.table.kernel[0].upstreams.len(), 2);
    let web = kernel_lines(&plan);
    // Two affinity rules, then the spread: 1/2, then the last always.
    assert_eq!(web.len(), 4, "{web:?}");
    assert!(web[..2].iter().all(|r| r.contains("-m recent --update --seconds 60 --reap")), "{web:?}");
    assert!(web[2].contains("--probability 0.50000000000") && web[2].ends_with("192.0.2.1:8080"), "{web:?}");
    assert!(!web[3].contains("statistic") && web[3].ends_with("192.0.2.2:8080"), "{web:?}");
    // The UDP port has no endpoints: refused at once, not sent to the proxy.
    assert!(plan.rules.v4.rules.iter().any(|r| r.starts_with("-A EDGEPROXY-NO-ENDPOINTS") && r.contains("a/dns:dns")));
    assert!(!plan.rules.v4.rules.iter().any(|r| r.contains("15002")), "{:?}", plan.rules.v4.rules);
    let ports: Vec<DataPath> = plan.reports.iter().flat_map(|r| &r.ports).map(|p| p.path).collect();
    assert_eq!(ports, [DataPath::Kernel, DataPath::Kernel]);
    // The same through the configured default instead of the annotation.
    let plain = KERNEL_SVCS.replace(r#","annotations":{"edgeproxy.io/data-path":"kernel"}"#, "");
    let mut cfg = StateConfig::from(&Config::defaults());
    cfg.data_path = DataPath::Kernel;
    let mut st2 = state(&plain, KERNEL_SLICES);
    st2.set_config(cfg);
    assert_eq!(st2.plan().rules, plan.rules);
    // And an annotation `proxy` wins over a configured `kernel`.
    let proxy = KERNEL_SVCS.replace(r#"data-path":"kernel""#, r#"data-path":"proxy""#);
    let mut st3 = state(&proxy, KERNEL_SLICES);
    let mut cfg = StateConfig::from(&Config::defaults());
    cfg.data_path = DataPath::Kernel;
    st3.set_config(cfg);
    let p3 = st3.plan();
    assert!(kernel_lines(&p3).is_empty() && p3.table.tcp.len() == 1);
}

/// Endpoints the health check set aside leave the kernel rules, unless none would be left.
#[test]
fn set_aside_endpoints_leave_the_kernel_rules_but_never_all() {
    let mut st = state(KERNEL_SVCS, KERNEL_SLICES);
    let name = ServicePortName::from("a/web:http");
    let dead: SocketAddr = "192.0.2.2:8080".parse().unwrap();
    assert!(st.apply(Change::SetAside(vec![(name.clone(), dead)])));
    let plan = st.plan();
    let web = kernel_lines(&plan);
    assert!(web.iter().all(|r| !r.contains("192.0.2.2")), "{web:?}");
    assert_eq!(web.len(), 2, "{web:?}");
    assert_eq!(plan.reports.iter().flat_map(|r| &r.ports).map(|p| p.left_out).sum::<usize>(), 1);
    // The probes keep watching it.
    assert_eq!(plan.table.kernel[0].upstreams.len(), 2);
    // Both set aside: fail open, both in the rules.
    let alive: SocketAddr = "192.0.2.1:8080".parse().unwrap();
    assert!(st.apply(Change::SetAside(vec![(name.clone(), dead), (name.clone(), alive)])));
    assert_eq!(kernel_lines(&st.plan()).len(), 4);
    // Proxy-path endpoints set aside change nothing of the plan.
    assert!(st.apply(Change::SetAside(vec![])));
    assert!(!st.apply(Change::SetAside(vec![(ServicePortName::from("a/other:http"), alive)])));
}
