//! Benchmark of the pure core (not a test): decode and plan/render a generated cluster.
//!
//! `cargo run --release --example bench_core` prints, for 1,000 / 5,000 / 10,000 services (5
//! endpoints each, so 50,000 at the top size), the decode time, the plan+render time, the rule
//! count and the peak RSS, so that linearity can be read off the table. Target at 10,000
//! services / 50,000 endpoints: decode and render each under 100 ms.

use std::fmt::Write as _;
use std::time::Instant;

use edgeproxy::config::Config;
use edgeproxy::model::Kind;
use edgeproxy::source::kube::objects::decode_document;
use edgeproxy::state::{Change, State, StateConfig};

fn generate(services: usize, endpoints_per: usize) -> (String, String) {
    let mut svcs = String::with_capacity(services * 400);
    let mut slices = String::with_capacity(services * (300 + endpoints_per * 150));
    svcs.push_str(r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":["#);
    slices.push_str(r#"{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"1"},"items":["#);
    for i in 0..services {
        let sep = if i == 0 { "" } else { "," };
        let ip = format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 255, i & 255);
        let udp = if i % 10 == 0 { r#",{"name":"dns","protocol":"UDP","port":53,"targetPort":5353}"# } else { "" };
        let _ = write!(
            svcs,
            r#"{sep}{{"metadata":{{"name":"svc-{i}","namespace":"ns-{}","labels":{{"app":"svc-{i}"}}}},"spec":{{"type":"ClusterIP","clusterIP":"{ip}","clusterIPs":["{ip}"],"ports":[{{"name":"http","protocol":"TCP","port":80,"targetPort":8080}}{udp}],"sessionAffinity":"None","internalTrafficPolicy":"Cluster"}}}}"#,
            i % 50
        );
        let _ = write!(
            slices,
            r#"{sep}{{"metadata":{{"name":"svc-{i}-abcde","namespace":"ns-{}","labels":{{"kubernetes.io/service-name":"svc-{i}"}}}},"addressType":"IPv4","endpoints":["#,
            i % 50
        );
        for e in 0..endpoints_per {
            let sep = if e == 0 { "" } else { "," };
            let n = i * endpoints_per + e;
            let _ = write!(
                slices,
                r#"{sep}{{"addresses":["172.{}.{}.{}"],"conditions":{{"ready":{},"serving":true,"terminating":false}},"nodeName":"node-{}","zone":"z{}"}}"#,
                16 + (n >> 16),
                (n >> 8) & 255,
                n & 255,
                e != 4,
                n % 100,
                n % 3
            );
        }
        slices.push_str(
            r#"],"ports":[{"name":"http","protocol":"TCP","port":8080},{"name":"dns","protocol":"UDP","port":5353}]}"#,
        );
    }
    svcs.push_str("]}");
    slices.push_str("]}");
    (svcs, slices)
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut cfg = Config::defaults();
    // 10,000 services with every tenth on UDP need more than the default range.
    cfg.listen.udp_ports = (20000, 29999);
    println!(
        "edgeproxy core benchmark: decode + plan/render ({} build)",
        if cfg!(debug_assertions) { "DEBUG" } else { "release" }
    );
    println!(
        "{:>9} {:>10} {:>8} {:>11} {:>11} {:>9} {:>11}",
        "services", "endpoints", "MB json", "decode ms", "render ms", "rules", "peak RSS"
    );
    for &n in &[1_000usize, 5_000, 10_000] {
        let (svcs, slices) = generate(n, 5);
        // Bytes as a float: exact far beyond any document here.
        #[allow(clippy::cast_precision_loss)]
        let mb = (svcs.len() + slices.len()) as f64 / 1e6;
        let mut best_decode = f64::MAX;
        let mut best_render = f64::MAX;
        let mut rules = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let a = decode_document(svcs.as_bytes(), Some(Kind::Service));
            let b = decode_document(slices.as_bytes(), Some(Kind::EndpointSlice));
            let decode = t.elapsed().as_secs_f64() * 1e3;
            assert!(a.errors.is_empty() && b.errors.is_empty());
            let mut st = State::new(StateConfig::from(&cfg));
            st.apply(Change::Replace(Kind::Service, a.objects));
            st.apply(Change::Replace(Kind::EndpointSlice, b.objects));
            let t = Instant::now();
            let plan = st.plan();
            let text = plan.rules.v4.restore_text();
            let render = t.elapsed().as_secs_f64() * 1e3;
            rules = plan.rules.v4.rules.len();
            assert!(text.len() > rules * 100);
            best_decode = best_decode.min(decode);
            best_render = best_render.min(render);
        }
        println!(
            "{n:>9} {:>10} {mb:>8.1} {best_decode:>11.1} {best_render:>11.1} {rules:>9} {:>8} MiB",
            n * 5,
            peak_rss_kib() / 1024
        );
    }
    println!("decode = JSON -> validated model (both lists); render = state -> verdicts, backends, proxy table and iptables-restore text; best of 3.");
}
