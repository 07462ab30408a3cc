//! The generated cluster the benchmarks list: N Services and N EndpointSlices made from real
//! captured items (with managedFields, as a real API server sends them), served by the test API
//! server in pages. Shared by `bench_source` and `bench_agent` (included with `#[path]`).

use std::io::Read;
use std::time::Duration;

use crate::apiserver::{self, fixture, ApiServer, Cluster, Reply, Request};
use serde_json::Value;

fn template(file: &str, name: &str) -> Value {
    let list: Value = serde_json::from_slice(&fixture(file)).unwrap();
    list["items"].as_array().unwrap().iter().find(|i| i["metadata"]["name"] == name).unwrap().clone()
}

fn service(t: &Value, i: usize) -> Value {
    let mut o = t.clone();
    o["metadata"]["name"] = format!("svc-{i}").into();
    o["metadata"]["namespace"] = format!("ns-{}", i % 50).into();
    o["metadata"]["uid"] = format!("00000000-0000-0000-0000-{i:012}").into();
    let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
    o["spec"]["clusterIP"] = ip.clone().into();
    o["spec"]["clusterIPs"] = serde_json::json!([ip]);
    o
}

fn slice(t: &Value, i: usize) -> Value {
    let mut o = t.clone();
    o["metadata"]["name"] = format!("svc-{i}-x7k2p").into();
    o["metadata"]["namespace"] = format!("ns-{}", i % 50).into();
    o["metadata"]["labels"]["kubernetes.io/service-name"] = format!("svc-{i}").into();
    o["metadata"]["uid"] = format!("10000000-0000-0000-0000-{i:012}").into();
    if let Some(eps) = o["endpoints"].as_array_mut() {
        for (j, e) in eps.iter_mut().enumerate() {
            e["addresses"] = serde_json::json!([format!("10.244.{}.{}", (i * 3 + j) / 256 % 256, (i * 3 + j) % 256)]);
        }
    }
    o
}

fn page(req: &Request, n: usize, kind: &str, make: &dyn Fn(usize) -> Value) -> Reply {
    let limit: usize = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(n).max(1);
    let start: usize = req.param("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let end = (start + limit).min(n);
    let mut meta = serde_json::json!({"resourceVersion": "1000"});
    if end < n {
        meta["continue"] = end.to_string().into();
    }
    let items: Vec<Value> = (start..end).map(make).collect();
    Reply::json(
        200,
        serde_json::json!({"kind": kind, "apiVersion": "v1", "metadata": meta, "items": items}).to_string(),
    )
}

pub fn serve(n: usize) {
    let server = ApiServer::start_with(Cluster::fixtures(), true);
    let st = template("list-services-raw.json", "web-frontend");
    let et = template("list-endpointslices-raw.json", "web-frontend-r42sq");
    server.route(move |req| {
        if req.is_watch() {
            let kind = if req.path.contains("endpointslices") { "EndpointSlice" } else { "Service" };
            let mut r = Reply::json(
                200,
                format!("{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{kind}\",\"metadata\":{{\"resourceVersion\":\"1000\"}}}}}}\n"),
            );
            r.end = apiserver::End::Hold(Duration::from_secs(600));
            return Some(r);
        }
        match req.path.as_str() {
            "/api/v1/services" => Some(page(req, n, "ServiceList", &|i| service(&st, i))),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(page(req, n, "EndpointSliceList", &|i| slice(&et, i))),
            _ => None,
        }
    });
    println!("{} {}", server.url, server.dir.display());
    // Serve until the parent closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
