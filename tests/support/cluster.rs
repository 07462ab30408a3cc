//! Small clusters for the agent tests, as the API server writes them: Services in namespace
//! `t` with one port `http` (80 -> targetPort `http`), and EndpointSlices with one ready
//! endpoint at 10.20.0.2 (a backend behind a veth).

/// A Service `t/NAME` at ClusterIP `ip`.
pub fn service(name: &str, ip: &str) -> String {
    format!(
        r#"{{"kind":"Service","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"t"}},
          "spec":{{"clusterIP":"{ip}","ports":[{{"name":"http","port":80,"targetPort":"http"}}]}}}}"#
    )
}

/// The EndpointSlice `t/NAME-1` of Service `t/NAME`: 10.20.0.2:`port`, ready; with the
/// last-change-trigger-time annotation `at` when given.
pub fn slice(name: &str, port: u16, at: Option<&str>) -> String {
    let annotations = at.map_or_else(String::new, |at| {
        format!(r#","annotations":{{"endpoints.kubernetes.io/last-change-trigger-time":"{at}"}}"#)
    });
    format!(
        r#"{{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{{"name":"{name}-1","namespace":"t",
          "labels":{{"kubernetes.io/service-name":"{name}"}}{annotations}}},"addressType":"IPv4",
          "endpoints":[{{"addresses":["10.20.0.2"],"conditions":{{"ready":true}}}}],
          "ports":[{{"name":"http","port":{port},"protocol":"TCP"}}]}}"#
    )
}

/// A kubectl `List` of these items.
pub fn list(items: &[String]) -> String {
    format!(r#"{{"kind":"List","apiVersion":"v1","items":[{}]}}"#, items.join(","))
}
