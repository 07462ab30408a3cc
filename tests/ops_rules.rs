//! The operations material in `ops/` against promtool, the metric contract and a real Prometheus:
//! `promtool check rules` and `promtool test rules` pass on the alerts; every dashboard query
//! parses as PromQL (promtool, as recording rules) and names only metrics of the README's metrics
//! table (which tests/docs.rs holds to `/metrics`), and every metric there has a panel; every alert has summary, description and a runbook entry in
//! `ops/README.md`, and a unit test where it fires and one where it does not. As root, the live
//! test runs the real agent in a network namespace with a file source, sends traffic through its
//! ClusterIPs to a backend behind a veth, scrapes it with a real Prometheus started in the same
//! namespace (Debian's `prometheus` package, tests/setup.sh), and evaluates every panel's query
//! (non-empty) and loads `ops/alerts.yml` (every group healthy, the dial-failure alert pending for
//! the service whose backend refuses).
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::{self, count, exit_code, fetch, serve, signal, wait_for};
use support::netns::{require_root, veth, Netns};
use yaml_rust2::{Yaml, YamlLoader};

// ----------------------------------------------------------------------------------------------
// The contract: the metric names edgeproxy exports
/// The README's metrics table (name -> type), which `tests/docs.rs` holds to what `/metrics`
/// serves: the one list of names the dashboard and the alerts may use.
fn contract() -> BTreeMap<String, String> {
    let listed = support::readme::metrics_table();
    assert!(listed.len() >= 40, "README's metrics table has only {} rows: {listed:?}", listed.len());
    listed
}

fn histograms(c: &BTreeMap<String, String>) -> Vec<&str> {
    c.iter().filter(|(_, k)| *k == "histogram").map(|(n, _)| n.as_str()).collect()
}

/// Metrics only an API-server source produces: with `--source file:` (the live test) they may
/// have no series at all, and the panels that read only them may be empty.
const API_SOURCE_ONLY: &[&str] = &[
    "edgeproxy_rest_client_requests_total",
    "edgeproxy_rest_client_request_duration_seconds",
    "edgeproxy_watch_restarts_total",
    "edgeproxy_relists_total",
];

/// The alerts of ops/alerts.yml, in order.
const ALERTS: &[&str] = &[
    "EdgeproxySyncStale",
    "EdgeproxySyncFailing",
    "EdgeproxyGuardRepairLoop",
    "EdgeproxyDialFailureRatioHigh",
    "EdgeproxyFdsNearLimit",
    "EdgeproxyNotReady",
    "EdgeproxyServingOfflineCache",
];

/// The edgeproxy and process metric names a PromQL expression reads, the samples of the
/// histograms in `c` by their base name. String literals (label values, `$variables`) are skipped.
fn metric_names(expr: &str, c: &BTreeMap<String, String>) -> BTreeSet<String> {
    let hist = histograms(c);
    let mut code = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => {
                quote = Some(c);
                code.push(' ');
            }
            None => code.push(c),
        }
    }
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("edgeproxy_") || w.starts_with("process_"))
        .map(|w| {
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = w.strip_suffix(suffix) {
                    if hist.contains(&base) {
                        return base.to_string();
                    }
                }
            }
            w.to_string()
        })
        .collect()
}

// ----------------------------------------------------------------------------------------------
// The files
fn ops_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops").join(file)
}

fn read(file: &str) -> String {
    let p = ops_path(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn yaml(file: &str) -> Yaml {
    let docs = YamlLoader::load_from_str(&read(file)).unwrap_or_else(|e| panic!("ops/{file}: {e}"));
    docs.into_iter().next().unwrap_or_else(|| panic!("ops/{file} is empty"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("dashboard.json")).unwrap_or_else(|e| panic!("ops/dashboard.json is not JSON: {e}"))
}

/// Every panel that is not a row, nested rows' panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("a panels array") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// (panel title, expression) for every query of the dashboard.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets")) {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("a target of {title:?} has no expr"));
            out.push((title.clone(), expr.to_string()));
        }
    }
    out
}

/// An expression as Grafana would send it with every instance selected, the test's namespace
/// and a one-minute rate interval.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
        .replace("$namespace", "t")
}

/// Every alerting rule of ops/alerts.yml.
fn alert_rules() -> Vec<Yaml> {
    let doc = yaml("alerts.yml");
    let groups = doc["groups"].as_vec().expect("alerts.yml: a groups list");
    groups.iter().flat_map(|g| g["rules"].as_vec().expect("a group has rules").iter().cloned()).collect()
}

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool").args(args).output().unwrap_or_else(|e| {
        panic!("promtool is needed for this test ({e}); install Debian's `prometheus` package (tests/setup.sh)")
    })
}

fn assert_promtool_ok(args: &[&str]) -> String {
    let out = promtool(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    text
}

// ----------------------------------------------------------------------------------------------
// promtool
#[test]
#[ignore = "needs promtool (tests/setup.sh installs it)"]
fn the_alerts_pass_promtool_check_rules() {
    let alerts = ops_path("alerts.yml");
    let text = assert_promtool_ok(&["check", "rules", alerts.to_str().unwrap()]);
    assert!(text.contains(&format!("{} rules found", ALERTS.len())), "{text}");
}

#[test]
#[ignore = "needs promtool (tests/setup.sh installs it)"]
fn the_alerts_pass_their_promtool_unit_tests() {
    let tests = ops_path("alerts_test.yml");
    assert_promtool_ok(&["test", "rules", tests.to_str().unwrap()]);
}

/// Every dashboard query through Prometheus's own parser: as recording rules for `promtool check
/// rules`, with Grafana's variables substituted.
#[test]
#[ignore = "needs promtool (tests/setup.sh installs it)"]
fn every_dashboard_query_parses_as_promql() {
    let queries = dashboard_queries(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in queries.iter().enumerate() {
        let quoted = serde_json::to_string(&substitute(expr)).unwrap();
        rules.push_str(&format!("      # {title}\n      - record: dashboard:query_{i}\n        expr: {quoted}\n"));
    }
    let file = std::env::temp_dir().join(format!("ep-ops-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, &rules).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "a dashboard query does not parse:\n{text}\n--- as rules ---\n{rules}");
    assert!(text.contains(&format!("{} rules found", queries.len())), "{text}");
}

// ----------------------------------------------------------------------------------------------
// Pure checks
#[test]
fn the_dashboard_is_grafana_json_over_the_contract_metrics() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars: Vec<&Value> = d["templating"]["list"].as_array().expect("templating.list").iter().collect();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).copied();
    let ds = var("datasource").expect("a datasource variable");
    assert_eq!((ds["type"].as_str(), ds["query"].as_str()), (Some("datasource"), Some("prometheus")));
    for name in ["instance", "namespace"] {
        let v = var(name).unwrap_or_else(|| panic!("a {name} variable"));
        assert_eq!(v["type"], "query", "{name}");
        assert!(v["definition"].as_str().unwrap_or("").contains("label_values("), "{name}: {v}");
    }
    let contract = contract();
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("a panel without an id: {}", p["title"]));
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("gridPos.x"), g["w"].as_u64().expect("gridPos.w"));
        assert!(x + w <= 24 && g["h"].as_u64().is_some() && g["y"].as_u64().is_some(), "gridPos of {}", p["title"]);
    }
    for p in panels(&d) {
        let title = &p["title"];
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        assert!(p["description"].as_str().is_some_and(|s| !s.is_empty()), "panel {title} has no description");
    }
    for (title, expr) in dashboard_queries(&d) {
        assert!(expr.contains("instance=~\"$instance\""), "{title}: {expr} ignores the instance variable");
        if expr.contains("service, port") {
            assert!(expr.contains("namespace=~\"$namespace\""), "{title}: {expr} ignores the namespace variable");
        }
        for name in metric_names(&expr, &contract) {
            assert!(contract.contains_key(&name), "{title}: {name} is not in README's metrics table ({expr})");
            used.insert(name);
        }
    }
    let unused: Vec<&String> = contract.keys().filter(|m| !used.contains(*m)).collect();
    assert!(unused.is_empty(), "metrics with no panel: {unused:?}");
}

#[test]
fn every_alert_is_annotated_documented_tested_and_on_the_contract() {
    let readme = read("README.md");
    let contract = contract();
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(names, ALERTS, "the alerts in ops/alerts.yml");
    for r in &rules {
        let name = r["alert"].as_str().unwrap();
        let a = &r["annotations"];
        for key in ["summary", "description", "runbook"] {
            assert!(a[key].as_str().is_some_and(|s| !s.trim().is_empty()), "{name}: no {key} annotation");
        }
        assert_eq!(a["runbook"].as_str(), Some(format!("ops/README.md#{}", name.to_lowercase()).as_str()), "{name}");
        assert!(readme.contains(&format!("\n### {name}\n")), "ops/README.md has no `### {name}` section");
        assert!(r["labels"]["severity"].as_str().is_some(), "{name}: no severity label");
        let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
        for m in metric_names(expr, &contract) {
            assert!(contract.contains_key(&m), "{name}: {m} is not in README's metrics table");
        }
    }
    // Each alert fires in some case and stays quiet in another.
    let tests = yaml("alerts_test.yml");
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for t in tests["tests"].as_vec().expect("alerts_test.yml: a tests list") {
        for case in t["alert_rule_test"].as_vec().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            match case["exp_alerts"].as_vec().is_some_and(|v| !v.is_empty()) {
                true => fires.insert(name),
                false => quiet.insert(name),
            };
        }
    }
    for name in ALERTS {
        assert!(fires.contains(*name), "alerts_test.yml: no case where {name} fires");
        assert!(quiet.contains(*name), "alerts_test.yml: no case where {name} stays quiet");
    }
}

#[test]
fn the_metric_name_scanner_reads_names_not_strings() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(edgeproxy_dial_duration_seconds_bucket{instance=~"edgeproxy_x"}[1m])))
           / on (job) process_open_fds"#,
        &contract(),
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["edgeproxy_dial_duration_seconds", "process_open_fds"]);
}

// ----------------------------------------------------------------------------------------------
// The live test: a real agent scraped by a real Prometheus
const METRICS_ADDR: &str = "127.0.0.1:10551";
const PROM_ADDR: &str = "127.0.0.1:19090";
const WEB: &str = "10.96.0.50:80";
const BROKEN: &str = "10.96.0.51:80";
const LATE: &str = "10.96.0.52:80";
const EMPTY: &str = "10.96.0.53:80";

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("ep-opsrules-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `t/web` (10.96.0.50:80 -> 10.20.0.2:8080, answers), `t/broken` (10.96.0.51:80 -> :8081,
/// refuses), `t/empty` (10.96.0.53:80, no endpoints: the kernel refuses) and, with `late`,
/// `t/late` (10.96.0.52:80 -> :8080) and `t/empty2` (10.96.0.54:80, no endpoints: the reject
/// chain is rewritten, its counters read). The slices carry the last-change-trigger-time `at`
/// (network programming latency).
fn cluster(at: &str, late: bool) -> String {
    use support::cluster::{list, service, slice};
    let mut items = vec![
        service("web", "10.96.0.50"),
        service("broken", "10.96.0.51"),
        slice("web", 8080, Some(at)),
        slice("broken", 8081, Some(at)),
        service("empty", "10.96.0.53"),
    ];
    if late {
        items.extend([service("late", "10.96.0.52"), slice("late", 8080, Some(at)), service("empty2", "10.96.0.54")]);
    }
    list(&items)
}

/// The current time as Kubernetes writes it (RFC 3339, UTC, seconds).
fn now_rfc3339() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().expect("date");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Start Prometheus in `ns`: scrapes the agent every second, evaluates ops/alerts.yml every
/// second, keeps its data in `dir`. Returns the child's index in `ns`.
fn start_prometheus(ns: &mut Netns, dir: &Path) -> usize {
    let prometheus = Path::new("/usr/bin/prometheus");
    assert!(prometheus.exists(), "this test needs /usr/bin/prometheus: apt-get install prometheus (tests/setup.sh)");
    let config = dir.join("prometheus.yml");
    let alerts = ops_path("alerts.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: edgeproxy\n    honor_labels: true\n    static_configs:\n      \
             - targets: [\"{METRICS_ADDR}\"]\n",
            alerts.display()
        ),
    )
    .unwrap();
    let data = dir.join("data");
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut cmd = ns.cmd(&[
        prometheus.to_str().unwrap(),
        &format!("--config.file={}", config.display()),
        &format!("--storage.tsdb.path={}", data.display()),
        &format!("--web.listen-address={PROM_ADDR}"),
        "--log.level=warn",
    ]);
    cmd.stdout(Stdio::null()).stderr(log);
    ns.spawn(cmd)
}

/// GET `path` of the Prometheus API in `ns` with `params` (curl, inside the namespace); the JSON
/// answer, or `Value::Null` when there is none.
fn prom_api(ns: &Netns, path: &str, params: &[(&str, &str)]) -> Value {
    let url = format!("http://{PROM_ADDR}{path}");
    let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut argv = vec!["curl", "-sS", "--max-time", "10", "-G"];
    for p in &params {
        argv.extend(["--data-urlencode", p]);
    }
    argv.push(&url);
    let out = ns.exec(&argv);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// An instant query's result vector; panics when Prometheus says the query is bad.
fn query(ns: &Netns, q: &str) -> Vec<Value> {
    let v = prom_api(ns, "/api/v1/query", &[("query", q)]);
    assert_eq!(v["status"], "success", "query {q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn prometheus_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
}

/// Connections through the ClusterIPs, spread over scrapes so that the counters' increases are
/// seen: the per-service series may appear only with the first connection.
fn drive_traffic(node: &Netns) {
    assert_eq!(fetch(node, WEB), "hello\n", "t/web through the proxy");
    let _ = fetch(node, BROKEN);
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..25 {
        let _ = fetch(node, BROKEN); // the backend refuses: dial failures
    }
    for _ in 0..10 {
        assert_eq!(fetch(node, WEB), "hello\n");
    }
    for _ in 0..3 {
        let _ = fetch(node, EMPTY); // refused by the kernel's reject rule
    }
}

/// Every rule group of ops/alerts.yml loaded into Prometheus and evaluated with health "ok".
fn check_rules_loaded(ns: &Netns, dir: &Path) {
    let mut last = Value::Null;
    let t = Instant::now();
    loop {
        let v = prom_api(ns, "/api/v1/rules", &[]);
        let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
        let rules: Vec<&Value> = groups.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()).collect();
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if !groups.is_empty() && rules.len() == ALERTS.len() && bad.is_empty() {
            let names: BTreeSet<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
            eprintln!("rule groups loaded, every rule healthy: {names:?}");
            return;
        }
        assert!(bad.iter().all(|b| !b.contains("\"err\"")), "rules with errors: {bad:?}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the rules did not all load healthy: {bad:?}\n{last}\n{}",
            prometheus_log(dir)
        );
        last = v;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The active alerts (pending or firing) as (name, labels).
fn active_alerts(ns: &Netns) -> Vec<(String, Value)> {
    let v = prom_api(ns, "/api/v1/alerts", &[]);
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| (a["labels"]["alertname"].as_str().unwrap_or("").to_string(), a["labels"].clone()))
        .collect()
}

/// Contract metrics with no series in Prometheus (histograms: no `_bucket` series).
fn missing_metrics(ns: &Netns, contract: &BTreeMap<String, String>) -> Vec<String> {
    let present: BTreeSet<String> = query(ns, r#"count by (__name__) ({__name__=~"edgeproxy_.+|process_.+"})"#)
        .iter()
        .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_string))
        .collect();
    let series = |(name, kind): (&String, &String)| match kind.as_str() {
        "histogram" => format!("{name}_bucket"),
        _ => name.clone(),
    };
    contract.iter().map(series).filter(|m| !present.contains(m)).collect()
}

/// Whether a metric (or a histogram's `_bucket` series) only an API-server source fills.
fn api_source_only(name: &str) -> bool {
    API_SOURCE_ONLY.iter().any(|a| name == *a || name.strip_suffix("_bucket") == Some(a))
}

/// Each query variable's values as Grafana asks for them: `label_values(SELECTOR, LABEL)` is
/// the label values API with `match[]=SELECTOR`.
fn variable_values(ns: &Netns) -> Vec<(String, Vec<String>)> {
    let d = dashboard();
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let def = v["definition"].as_str().unwrap();
        let args = def.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')')).expect(def);
        let (selector, label) = args.rsplit_once(',').expect(def);
        let answer =
            prom_api(ns, &format!("/api/v1/label/{}/values", label.trim()), &[("match[]", &substitute(selector))]);
        assert_eq!(answer["status"], "success", "{def}: {answer}");
        let values = answer["data"].as_array().unwrap().iter().filter_map(|x| x.as_str().map(str::to_string)).collect();
        out.push((v["name"].as_str().unwrap().to_string(), values));
    }
    out
}

/// Every dashboard query evaluated: (queries that are empty although they need no API server,
/// queries that are empty because only an API-server source fills them).
fn empty_panel_queries(ns: &Netns, contract: &BTreeMap<String, String>) -> (Vec<String>, Vec<String>) {
    let (mut empty, mut api_only) = (Vec::new(), Vec::new());
    for (title, expr) in dashboard_queries(&dashboard()) {
        let q = substitute(&expr);
        if query(ns, &q).is_empty() {
            let names = metric_names(&expr, contract);
            let line = format!("{title}: {q}");
            match names.iter().all(|m| API_SOURCE_ONLY.contains(&m.as_str())) {
                true => api_only.push(line),
                false => empty.push(line),
            }
        }
    }
    (empty, api_only)
}

#[test]
#[ignore = "needs root: network namespaces and prometheus (sudo tests/run-all.sh)"]
fn a_real_prometheus_evaluates_every_panel_and_loads_the_alerts() {
    require_root();
    let work = TempDir::new("live"); // declared first: dropped after the namespaces' processes
    let backend = Netns::new("ob");
    let mut node = Netns::new("on");
    veth(&node, "be0", "10.20.0.1/24", &backend, "eth0", "10.20.0.2/24");
    // ClusterIPs must be routable for a local connect() to reach the OUTPUT chain's DNAT.
    node.ok(&["ip", "route", "add", "default", "via", "10.20.0.2"]);
    serve(&backend, "10.20.0.2:8080", "hello\n");
    let file = work.0.join("cluster.json");
    std::fs::write(&file, cluster(&now_rfc3339(), false)).unwrap();
    let source = format!("file:{}", file.display());
    let a =
        agent::start(&mut node, &["--source", &source, "--iptables-backend", "nft", "--metrics-address", METRICS_ADDR]);
    wait_for("ready", Duration::from_secs(20), || count(&a.log, "ready: source synced") >= 1);

    let prom = start_prometheus(&mut node, &work.0);
    wait_for("three scrapes of the agent", Duration::from_secs(60), || {
        prom_api(&node, "/api/v1/query", &[("query", r#"count_over_time(up{job="edgeproxy"}[1m]) >= 3"#)])["data"]
            ["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    assert_eq!(query(&node, r#"up{job="edgeproxy"}"#)[0]["value"][1], "1", "the agent's scrape is up");

    drive_traffic(&node);
    // A change after the start: a new Service and slice (a partial sync, a programming latency),
    // and a new Service without endpoints (the reject chain rewritten: t/empty's refusals read).
    std::fs::write(&file, cluster(&now_rfc3339(), true)).unwrap();
    wait_for("t/late served", Duration::from_secs(20), || fetch(&node, LATE) == "hello\n");
    std::thread::sleep(Duration::from_secs(4)); // a few scrapes after the traffic
                                                // Series that appear late (the kernel's refusals, counted when their chain is rewritten).
    let contract = contract();
    let t = Instant::now();
    let mut missing = missing_metrics(&node, &contract);
    while missing.iter().any(|m| !api_source_only(m)) && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
        missing = missing_metrics(&node, &contract);
    }
    let (empty, api_only) = empty_panel_queries(&node, &contract);
    let variables = variable_values(&node);
    eprintln!("dashboard variables: {variables:?}");
    for h in histograms(&contract) {
        let n: Vec<String> = query(&node, &format!("{h}_count"))
            .iter()
            .map(|s| s["value"][1].as_str().unwrap_or("?").to_string())
            .collect();
        eprintln!("{h}_count: {n:?}");
    }
    eprintln!("contract metrics with no series: {missing:?}");
    eprintln!("panel queries empty with a file source (API server metrics): {api_only:#?}");
    eprintln!("panel queries empty: {empty:#?}");
    check_rules_loaded(&node, &work.0);
    let is_broken = |(n, l): &(String, Value)| n == "EdgeproxyDialFailureRatioHigh" && l["service"] == "broken";
    let t = Instant::now();
    let mut alerts = active_alerts(&node);
    while !alerts.iter().any(is_broken) && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
        alerts = active_alerts(&node);
    }
    eprintln!("active alerts: {alerts:?}");

    node.child(prom).kill().unwrap();
    let _ = node.child(prom).wait();
    signal(a.pid, "-TERM");
    assert_eq!(exit_code(&mut node, &a), Some(0), "the agent's exit");

    for (name, want) in [("instance", METRICS_ADDR), ("namespace", "t")] {
        let values = variables.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default();
        assert!(values.iter().any(|v| v == want), "the {name} variable's values {values:?} lack {want:?}");
    }
    let unexpected: Vec<&String> = missing.iter().filter(|m| !api_source_only(m)).collect();
    assert!(unexpected.is_empty(), "metrics the agent does not export: {unexpected:?}");
    assert!(empty.is_empty(), "dashboard queries with no result:\n{}", empty.join("\n"));
    let broken = alerts.iter().find(|a| is_broken(a));
    let broken =
        broken.unwrap_or_else(|| panic!("EdgeproxyDialFailureRatioHigh is not pending for t/broken: {alerts:?}"));
    assert_eq!((broken.1["namespace"].as_str(), broken.1["port"].as_str()), (Some("t"), Some("http")), "{broken:?}");
    let others: Vec<&(String, Value)> = alerts.iter().filter(|a| !is_broken(a)).collect();
    assert!(others.is_empty(), "alerts on a healthy agent: {others:?}");
}
