//! Unit tests of `objects`: single objects, lists, bad fields named by path, truncated
//! documents, and the strings a document shares between its items.

use super::*;

const SVC: &str = r#"{"metadata":{"name":"a","namespace":"n","labels":{"z":"1","b":"2"}},
        "spec":{"clusterIP":"10.96.0.5","ports":[{"name":"http","port":80,"targetPort":"web"},
        {"name":"dns","protocol":"UDP","port":53,"targetPort":5353}],"sessionAffinity":"ClientIP"}}"#;

#[test]
fn single_service() {
    let d = decode_document(SVC.as_bytes(), Some(Kind::Service));
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let Object::Service(s) = &d.objects[0] else { panic!() };
    assert_eq!(s.cluster_ips, vec!["10.96.0.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.ports[0].target_port, TargetPort::Name("web".into()));
    assert_eq!(s.ports[1].protocol, Protocol::Udp);
    assert_eq!(s.affinity_timeout, Some(10800));
    assert_eq!(s.label("b"), Some("2"));
}

#[test]
fn bad_port_names_object_and_field() {
    let doc = r#"{"kind":"ServiceList","items":[
            {"metadata":{"name":"ok","namespace":"n"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":1}]}},
            {"metadata":{"name":"bad","namespace":"n"},"spec":{"clusterIP":"10.0.0.2","ports":[{"port":70000}]}}]}"#;
    let d = decode_document(doc.as_bytes(), None);
    assert_eq!(d.objects.len(), 1);
    assert_eq!(d.errors[0].to_string(), "Service n/bad: spec.ports[0].port: port 70000 is out of range 1-65535");
}

#[test]
fn truncated_list_keeps_earlier_items() {
    let doc = r#"{"kind":"ServiceList","metadata":{"resourceVersion":"7"},"items":[
            {"metadata":{"name":"ok","namespace":"n"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":1}]}},
            {"metadata":{"name":"cut","namespace":"n"},"spec":{"clus"#;
    let d = decode_document(doc.as_bytes(), None);
    assert_eq!(d.objects.len(), 1);
    assert!(d.document_error.as_deref().unwrap().contains("truncated"), "{:?}", d.document_error);
}

#[test]
fn endpoint_keeps_its_first_address_and_validates_the_rest() {
    let doc = r#"{"metadata":{"name":"s-1","namespace":"n","labels":{"kubernetes.io/service-name":"s"}},
            "addressType":"IPv4","endpoints":[{"addresses":["192.0.2.1","192.0.2.2"],"nodeName":"node-1","zone":"z"},
            {"addresses":[]},{"addresses":["192.0.2.3"],"nodeName":"node-1","zone":"z"}],"ports":[{"name":"http","port":80}]}"#;
    let d = decode_document(doc.as_bytes(), Some(Kind::EndpointSlice));
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let Object::Endpoints(set) = &d.objects[0] else { panic!() };
    let eps = &set.groups[0].endpoints;
    let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(addrs, ["192.0.2.1", "192.0.2.3"], "the address-less endpoint is not kept");
    assert_eq!((eps[0].node_name.as_deref(), eps[0].zone.as_deref()), (Some("node-1"), Some("z")));
    assert!(Arc::ptr_eq(eps[0].node_name.as_ref().unwrap(), eps[1].node_name.as_ref().unwrap()));
    assert!(Arc::ptr_eq(eps[0].zone.as_ref().unwrap(), eps[1].zone.as_ref().unwrap()));
    assert_eq!(set.service, ObjectKey::new("n", "s"));
    assert!(Arc::ptr_eq(&set.key.namespace, &set.service.namespace));
    let bad = doc.replace(r#""192.0.2.2""#, r#""fd00::2""#);
    let d = decode_document(bad.as_bytes(), Some(Kind::EndpointSlice));
    assert_eq!(
        d.errors[0].to_string(),
        "EndpointSlice n/s-1: endpoints[0].addresses[1]: fd00::2 does not match addressType"
    );
}

#[test]
fn label_with_nul_is_refused_by_name() {
    let doc = r#"{"metadata":{"name":"a","namespace":"n","labels":{"ok":"1","bad":"x\u0000y"}},"spec":{"clusterIP":"10.0.0.1"}}"#;
    let d = decode_document(doc.as_bytes(), Some(Kind::Service));
    assert_eq!(d.errors[0].to_string(), r#"Service n/a: metadata.labels: label "bad" contains a NUL character"#);
}

#[test]
fn a_list_shares_recurring_strings_between_items() {
    let doc = r#"{"kind":"ServiceList","items":[
            {"metadata":{"name":"a","namespace":"n"},"spec":{"clusterIP":"10.0.0.1"}},
            {"metadata":{"name":"b","namespace":"n"},"spec":{"clusterIP":"10.0.0.2"}},
            {"metadata":{"name":"c","namespace":"m"},"spec":{"clusterIP":"10.0.0.3"}},
            {"metadata":{"name":"d","namespace":"n"},"spec":{"clusterIP":"10.0.0.4","ports":[{"name":"http","port":80}]}},
            {"metadata":{"name":"e","namespace":"m"},"spec":{"clusterIP":"10.0.0.5","ports":[{"name":"http","port":80}]}}]}"#;
    let d = decode_document(doc.as_bytes(), None);
    let ns: Vec<&Arc<str>> = d.objects.iter().map(|o| &o.key().namespace).collect();
    assert!(Arc::ptr_eq(ns[0], ns[1]) && Arc::ptr_eq(ns[0], ns[3]) && Arc::ptr_eq(ns[2], ns[4]));
    assert_eq!((&**ns[0], &**ns[2]), ("n", "m"));
    let port = |i: usize| match &d.objects[i] {
        Object::Service(s) => s.ports[0].name.clone(),
        _ => unreachable!(),
    };
    assert!(Arc::ptr_eq(&port(3), &port(4)));
}

#[test]
fn every_address_is_validated_with_its_path_but_only_the_first_kept() {
    let doc = r#"{"metadata":{"name":"s-1","namespace":"n","labels":{"kubernetes.io/service-name":"s"}},
            "addressType":"IPv4","endpoints":[{"addresses":["192.0.2.1","192.0.2.2",7]}]}"#;
    let d = decode_document(doc.as_bytes(), Some(Kind::EndpointSlice));
    assert_eq!(d.errors.len(), 1);
    assert!(
        d.errors[0].to_string().starts_with("EndpointSlice n/s-1: endpoints[0].addresses[2]: invalid type"),
        "{}",
        d.errors[0]
    );
    let null = doc.replace(r#"["192.0.2.1","192.0.2.2",7]"#, "null");
    let d = decode_document(null.as_bytes(), Some(Kind::EndpointSlice));
    assert!(d.errors[0].to_string().contains("endpoints[0].addresses: invalid type: null"), "{}", d.errors[0]);
}

/// `edgeproxy.io/data-path`: proxy or kernel; anything else refuses the Service, naming the
/// annotation (the others still count).
#[test]
fn the_data_path_annotation() {
    let with =
        |v: &str| SVC.replace(r#""labels""#, &format!(r#""annotations":{{"edgeproxy.io/data-path":"{v}"}},"labels""#));
    for (v, want) in [("kernel", Some(DataPath::Kernel)), ("proxy", Some(DataPath::Proxy))] {
        let d = decode_document(with(v).as_bytes(), Some(Kind::Service));
        let Object::Service(s) = &d.objects[0] else { panic!("{:?}", d.errors) };
        assert_eq!(s.data_path, want);
    }
    let d = decode_document(SVC.as_bytes(), Some(Kind::Service));
    let Object::Service(s) = &d.objects[0] else { panic!() };
    assert_eq!(s.data_path, None);
    let d = decode_document(with("Kernel\\\" -j ACCEPT").as_bytes(), Some(Kind::Service));
    assert!(d.objects.is_empty());
    assert_eq!(
        d.errors[0].to_string(),
        r#"Service n/a: metadata.annotations[edgeproxy.io/data-path]: unknown value "Kernel\" -j ACCEPT" (proxy or kernel)"#
    );
}

/// `edgeproxy.io/probe-interval`: a duration in 100ms-1h; anything else refuses the Service.
#[test]
fn the_probe_interval_annotation() {
    let with = |v: &str| {
        SVC.replace(r#""labels""#, &format!(r#""annotations":{{"edgeproxy.io/probe-interval":"{v}"}},"labels""#))
    };
    for (v, ms) in [("5s", 5_000), ("100ms", 100), ("2m", 120_000), ("1h", 3_600_000)] {
        let d = decode_document(with(v).as_bytes(), Some(Kind::Service));
        let Object::Service(s) = &d.objects[0] else { panic!("{v}: {:?}", d.errors) };
        assert_eq!(s.probe_interval, Some(Duration::from_millis(ms)), "{v}");
    }
    for v in ["", "5", "99ms", "2h", "s", "-1s", "1.5s", "99999999999999999999s", "5 s"] {
        let d = decode_document(with(v).as_bytes(), Some(Kind::Service));
        assert!(d.objects.is_empty(), "{v:?} accepted");
        assert!(
            d.errors[0].to_string().contains("metadata.annotations[edgeproxy.io/probe-interval]: "),
            "{}",
            d.errors[0]
        );
    }
}
