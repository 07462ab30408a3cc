//! Results: per-round figures, ratios to the kernel DNAT path, the stdout table, the targets and
//! the JSON file.
//!
//! Owns the arithmetic on measured numbers (min/median/max, per-round ratios) and their
//! presentation. It never measures and never touches the system.
//!
//! Beside edgeproxy's own targets, it judges edgeproxy against every peer that ran ([`PEERS`]:
//! HAProxy with 1 thread, HAProxy with its default threads, EdgeMesh when given), one row per
//! figure per peer plus the resource rows. A "better than" row passes only when edgeproxy is ahead
//! beyond the noise: its median is better (per-round ratios to kernel DNAT compared when both have
//! them, else the medians) AND it won a strict majority of the rounds, counted from the per-round
//! values (3 of 5, 2 of 2); a lead won in 2 of 5 rounds is a MISS. [`VERDICT_RULE`] says so in the
//! output.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::paths::Path;

/// One measured quantity.
#[derive(Clone, Copy)]
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

const fn fig(key: &'static str, label: &'static str, unit: &'static str, higher: bool) -> Figure {
    Figure { key, label, unit, higher_is_better: higher }
}

pub const FIGURES: &[Figure] = &[
    fig("tcp_1_stream", "TCP throughput, 1 stream", "Gbit/s", true),
    fig("tcp_8_streams", "TCP throughput, 8 streams", "Gbit/s", true),
    fig("rr_1b_p50", "req/resp 1 B, p50", "us", false),
    fig("rr_1b_p99", "req/resp 1 B, p99", "us", false),
    fig("rr_1b_p999", "req/resp 1 B, p99.9", "us", false),
    fig("rr_4k_p50", "req/resp 4 KiB, p50", "us", false),
    fig("rr_4k_p99", "req/resp 4 KiB, p99", "us", false),
    fig("rr_4k_p999", "req/resp 4 KiB, p99.9", "us", false),
    fig("rr_16_conns", "req/resp rate, 16 conns", "req/s", true),
    fig("new_conns", "new connections", "conn/s", true),
    fig("new_conn_p99", "connect-to-first-byte p99", "us", false),
    fig("udp_rr", "UDP req/resp rate, 8 flows", "req/s", true),
    fig("udp_p99", "UDP req/resp p99", "us", false),
    fig("paired_rr_mean", "paired: req/resp 1 B, mean", "us", false),
    fig("paired_rr_p99", "paired: req/resp 1 B, p99", "us", false),
    fig("paired_conn_mean", "paired: new connection, mean", "us", false),
    fig("paired_udp_mean", "paired: UDP req/resp, mean", "us", false),
    fig("paired_udp_p99", "paired: UDP req/resp, p99", "us", false),
    fig("cpu_per_gb", "proxy CPU per GB moved", "CPU-s/GB", false),
    fig("cpu_per_req", "proxy CPU per request (16 conns)", "CPU-us", false),
    fig("cpu_per_conn", "proxy CPU per new connection", "CPU-us", false),
    fig("cpu_per_udp_req", "proxy CPU per UDP request", "CPU-us", false),
];

/// A resource figure, measured once per run per proxy; lower is better.
pub struct Resource {
    pub key: &'static str,
    pub label: &'static str,
    /// The unit shown.
    pub unit: &'static str,
    /// The unit of the stored value (the JSON's).
    pub raw_unit: &'static str,
    /// Shown value = stored value x scale.
    pub scale: f64,
}

/// A memory figure: stored in KiB (as /proc says), shown in MiB.
const fn kib(key: &'static str, label: &'static str) -> Resource {
    Resource { key, label, unit: "MiB", raw_unit: "KiB", scale: 1.0 / 1024.0 }
}

/// A count of open descriptors.
const fn fds(key: &'static str, label: &'static str) -> Resource {
    Resource { key, label, unit: "fds", raw_unit: "fds", scale: 1.0 }
}

pub const RESOURCES: &[Resource] = &[
    kib("rss_idle", "RSS idle (the bench service)"),
    kib("rss_after_load", "RSS idle after the rounds"),
    kib("rss_1000_services", "RSS idle, 1,000 services loaded"),
    kib("rss_5000_conns", "RSS with 5,000 idle connections"),
    fds("fds_after_load", "descriptors idle after the rounds"),
    fds("fds_per_idle_conn", "descriptors per idle connection"),
];

#[derive(Default)]
pub struct Results {
    /// figure key -> path name -> one value per round (NaN when that round failed).
    pub rounds: BTreeMap<&'static str, BTreeMap<&'static str, Vec<f64>>>,
    /// resource key -> path name -> KiB.
    pub resources: BTreeMap<&'static str, BTreeMap<&'static str, f64>>,
    /// What failed, for the report.
    pub errors: Vec<String>,
}

impl Results {
    pub fn push(&mut self, key: &'static str, path: Path, round: usize, v: f64) {
        let vals = self.rounds.entry(key).or_default().entry(path.name()).or_default();
        while vals.len() <= round {
            vals.push(f64::NAN);
        }
        vals[round] = v;
    }

    /// A resource figure in its shown unit (RSS in MiB).
    fn resource(&self, key: &str, path: &str) -> Option<f64> {
        let scale = RESOURCES.iter().find(|r| r.key == key).map_or(1.0, |r| r.scale);
        self.resources.get(key).and_then(|m| m.get(path)).map(|v| v * scale)
    }

    fn values(&self, key: &str, path: &str) -> Vec<f64> {
        self.rounds.get(key).and_then(|m| m.get(path)).cloned().unwrap_or_default()
    }

    /// Per-round ratios of `path` to the kernel DNAT path (same round).
    fn ratios(&self, key: &str, path: &str) -> Vec<f64> {
        let v = self.values(key, path);
        let k = self.values(key, Path::Kernel.name());
        v.iter().zip(k.iter()).map(|(a, b)| a / b).filter(|r| r.is_finite()).collect()
    }
}

/// (min, median, max) of the finite values; None when there are none.
pub fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some((v[0], med, v[n - 1]))
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{:.0}", x)
    } else if a >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

/// One target line: what, the measured value, the bound, PASS/MISS.
pub struct Target {
    pub name: String,
    pub value: Option<f64>,
    pub bound: String,
    pub pass: Option<bool>,
    /// How the rounds spread (a ratio's range, or in how many rounds edgeproxy won), so a
    /// verdict inside the noise reads as such.
    pub rounds: String,
    /// For a "better than" row: the peer's path name.
    pub peer: Option<&'static str>,
    /// For a "better than" row of a per-round figure: (rounds edgeproxy won, rounds compared).
    pub won: Option<(usize, usize)>,
}

/// The peers edgeproxy is judged against (each when it ran), with the label of their rows.
pub const PEERS: [(Path, &str); 3] =
    [(Path::Haproxy, "HAProxy 1 thread"), (Path::HaproxyMt, "HAProxy default threads"), (Path::Edgemesh, "EdgeMesh")];

/// How the "better than" rows are decided; printed above the targets, kept in the JSON.
pub const VERDICT_RULE: [&str; 3] = [
    "A \"better than\" row: value = edgeproxy / that peer, from the medians of the per-round ratios to kernel DNAT when both have them, else the medians.",
    "PASS only when edgeproxy's median is better AND it won a strict majority of the rounds (more than half: 3 of 5, 2 of 2); a lead inside the noise is a MISS.",
    "Resource rows are one measurement each: PASS when edgeproxy's is lower.",
];

pub fn targets(r: &Results, paths: &[Path]) -> Vec<Target> {
    let ep = Path::Edgeproxy.name();
    let med_ratio = |key: &str| spread(&r.ratios(key, ep)).map(|s| s.1);
    let med = |key: &str, p: &str| spread(&r.values(key, p)).map(|s| s.1);
    let mut t = Vec::new();
    let mut ratio_target = |name: &str, key: &str, min: Option<f64>, max: Option<f64>| {
        let v = med_ratio(key);
        let pass = v.map(|v| min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m));
        let rounds = spread(&r.ratios(key, ep)).map(|(lo, _, hi)| format!("{lo:.2}-{hi:.2}")).unwrap_or_default();
        let bound = match (min, max) {
            (Some(m), _) => format!(">= {m}x kernel DNAT"),
            (_, Some(m)) => format!("<= {m}x kernel DNAT"),
            _ => String::new(),
        };
        t.push(Target { name: name.into(), value: v, bound, pass, rounds, peer: None, won: None });
    };
    if !paths.contains(&Path::Edgeproxy) || !paths.contains(&Path::Kernel) {
        return Vec::new();
    }
    ratio_target("single-stream throughput", "tcp_1_stream", Some(0.9), None);
    ratio_target("req/resp p50 latency, 1 B", "rr_1b_p50", None, Some(1.8));
    ratio_target("req/resp p50 latency, 4 KiB", "rr_4k_p50", None, Some(1.8));
    ratio_target("req/resp rate, 16 conns", "rr_16_conns", Some(0.7), None);
    ratio_target("new connections/s", "new_conns", Some(0.6), None);
    ratio_target("UDP req/resp rate", "udp_rr", Some(0.6), None);
    let cpu = med("cpu_per_gb", ep);
    t.push(Target {
        name: "proxy CPU per GB".into(),
        value: cpu,
        bound: "<= 0.25 CPU-s/GB".into(),
        pass: cpu.map(|c| c <= 0.25),
        rounds: spread(&r.values("cpu_per_gb", ep)).map(|(lo, _, hi)| format!("{lo:.2}-{hi:.2}")).unwrap_or_default(),
        peer: None,
        won: None,
    });
    for (key, bound_mib) in [("rss_1000_services", 8.0), ("rss_5000_conns", 40.0)] {
        let v = r.resource(key, ep);
        t.push(Target {
            name: format!("{key} (MiB)"),
            value: v,
            bound: format!("< {bound_mib} MiB"),
            pass: v.map(|v| v < bound_mib),
            rounds: "one measurement".into(),
            peer: None,
            won: None,
        });
    }
    if paths.contains(&Path::EdgeproxyKernel) {
        // The kernel path is kernel DNAT (one rule chain of ours instead of kube-proxy's three):
        // within 5 % of it on every figure it has.
        let kp = Path::EdgeproxyKernel.name();
        for f in FIGURES {
            let Some(v) = med_ratio_of(r, f.key, kp) else { continue };
            let pass = if f.higher_is_better { v >= 0.95 } else { v <= 1.0 / 0.95 };
            let rounds = spread(&r.ratios(f.key, kp)).map(|(lo, _, hi)| format!("{lo:.2}-{hi:.2}")).unwrap_or_default();
            let bound = if f.higher_is_better { ">= 0.95x kernel DNAT" } else { "<= 1.05x kernel DNAT" };
            t.push(Target {
                name: format!("kernel path: {}", f.label),
                value: Some(v),
                bound: bound.into(),
                pass: Some(pass),
                rounds,
                peer: None,
                won: None,
            });
        }
    }
    for (peer, label) in PEERS {
        if paths.contains(&peer) {
            peer_targets(r, peer, label, &mut t);
        }
    }
    t
}

/// edgeproxy against one peer: a row per figure both have, then the resource rows. A row passes
/// when edgeproxy's median is better and it won a strict majority of the rounds.
fn peer_targets(r: &Results, peer: Path, label: &str, t: &mut Vec<Target>) {
    let (ep, pn) = (Path::Edgeproxy.name(), peer.name());
    let med = |key: &str, p: &str| spread(&r.values(key, p)).map(|s| s.1);
    for f in FIGURES {
        // Compare the per-round ratios to kernel DNAT (each proxy against the same round's
        // kernel figure, so load drift between rounds cancels); proxy-only figures (CPU)
        // have no kernel value and compare their medians directly.
        let pair = match (med_ratio_of(r, f.key, ep), med_ratio_of(r, f.key, pn)) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => med(f.key, ep).zip(med(f.key, pn)),
        };
        let Some((a, b)) = pair else {
            continue;
        };
        let better = |a: f64, b: f64| if f.higher_is_better { a > b } else { a < b };
        // Both proxies run in every round: count the rounds edgeproxy won outright.
        let (e, h) = (r.values(f.key, ep), r.values(f.key, pn));
        let pairs: Vec<(f64, f64)> =
            e.iter().zip(h.iter()).map(|(a, b)| (*a, *b)).filter(|(a, b)| a.is_finite() && b.is_finite()).collect();
        let won = pairs.iter().filter(|(a, b)| better(*a, *b)).count();
        let n = pairs.len();
        t.push(Target {
            name: format!("better than {label}: {}", f.label),
            value: Some(a / b),
            bound: format!("{} {label}, won > half the rounds", if f.higher_is_better { ">" } else { "<" }),
            pass: Some(better(a, b) && 2 * won > n),
            rounds: format!("won {won} of {n} rounds"),
            peer: Some(pn),
            won: Some((won, n)),
        });
    }
    for Resource { key, .. } in RESOURCES {
        let get = |p: &str| r.resource(key, p);
        if let (Some(a), Some(b)) = (get(ep), get(pn)) {
            t.push(Target {
                name: format!("better than {label}: {key}"),
                value: Some(a / b),
                bound: format!("< {label}"),
                pass: Some(a < b),
                rounds: "one measurement".into(),
                peer: Some(pn),
                won: None,
            });
        }
    }
}

fn med_ratio_of(r: &Results, key: &str, path: &str) -> Option<f64> {
    spread(&r.ratios(key, path)).map(|s| s.1)
}

/// The stdout table. Every column is as wide as its widest cell, so all paths (eight columns)
/// stay aligned.
pub fn table(r: &Results, paths: &[Path], facts: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in facts {
        s.push_str(&format!("{k:<12} {v}\n"));
    }
    s.push_str("\nEach cell: median [min-max] over rounds, then the median per-round ratio to kernel-dnat.\n\n");
    // Rows of cells; an empty row is a blank line.
    let mut rows: Vec<Vec<String>> = Vec::new();
    let head = ["figure".to_string(), "unit".to_string()];
    rows.push(head.into_iter().chain(paths.iter().map(|p| p.name().to_string())).collect());
    for f in FIGURES {
        let mut row = vec![f.label.to_string(), f.unit.to_string()];
        for p in paths {
            row.push(match spread(&r.values(f.key, p.name())) {
                None => "n/a".to_string(),
                Some((lo, med, hi)) => {
                    let ratio = spread(&r.ratios(f.key, p.name())).map(|x| format!(" {:.2}x", x.1)).unwrap_or_default();
                    format!("{} [{}-{}]{ratio}", num(med), num(lo), num(hi))
                }
            });
        }
        rows.push(row);
    }
    rows.push(Vec::new());
    for res in RESOURCES {
        let mut row = vec![res.label.to_string(), res.unit.to_string()];
        row.extend(
            paths.iter().map(|p| r.resource(res.key, p.name()).map_or_else(|| "n/a".into(), |v| format!("{v:.2}"))),
        );
        rows.push(row);
    }
    s.push_str(&aligned(&rows));
    let t = targets(r, paths);
    if !t.is_empty() {
        s.push_str("\nTargets (edgeproxy; ratios are medians of per-round ratios):\n");
        if t.iter().any(|t| t.peer.is_some()) {
            for line in VERDICT_RULE {
                s.push_str(&format!("  {line}\n"));
            }
        }
        let name_w = t.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let bound_w = t.iter().map(|t| t.bound.len()).max().unwrap_or(0);
        for t in &t {
            let mark = match t.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "n/a ",
            };
            let v = t.value.map(num).unwrap_or_else(|| "n/a".into());
            let line = format!("  {mark}  {:<name_w$} {v:>8}   target {:<bound_w$}   {}", t.name, t.bound, t.rounds);
            s.push_str(line.trim_end());
            s.push('\n');
        }
    }
    if !r.errors.is_empty() {
        s.push_str("\nErrors:\n");
        for e in &r.errors {
            s.push_str(&format!("  {e}\n"));
        }
    }
    s
}

/// Rows of cells, each column padded to its widest cell, one space between columns (two after
/// the unit, before the first path); an empty row is a blank line.
fn aligned(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|x| x.chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let sep = match c {
                0 => "",
                2 => "  ",
                _ => " ",
            };
            line.push_str(&format!("{sep}{cell:<w$}", w = widths[c]));
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

pub fn json(r: &Results, paths: &[Path], facts: &[(String, String)], settings: &Value) -> Value {
    let mut figures = serde_json::Map::new();
    for f in FIGURES {
        let mut per_path = serde_json::Map::new();
        for p in paths {
            let vals = r.values(f.key, p.name());
            let Some((lo, med, hi)) = spread(&vals) else {
                continue;
            };
            let ratios = r.ratios(f.key, p.name());
            let rs = spread(&ratios);
            per_path.insert(
                p.name().into(),
                json!({
                    "rounds": vals.iter().map(|v| if v.is_finite() { json!(v) } else { Value::Null }).collect::<Vec<_>>(),
                    "min": lo, "median": med, "max": hi,
                    "ratio_to_kernel_dnat": rs.map(|(a, b, c)| json!({"rounds": ratios, "min": a, "median": b, "max": c})),
                }),
            );
        }
        figures.insert(
            f.key.into(),
            json!({"label": f.label, "unit": f.unit, "higher_is_better": f.higher_is_better, "paths": per_path}),
        );
    }
    let mut resources = serde_json::Map::new();
    for res in RESOURCES {
        let m = r.resources.get(res.key).cloned().unwrap_or_default();
        resources.insert(res.key.into(), json!({"label": res.label, "unit": res.raw_unit, "paths": m}));
    }
    let targets: Vec<Value> = targets(r, paths)
        .into_iter()
        .map(|t| {
            let mut v =
                json!({"name": t.name, "value": t.value, "target": t.bound, "pass": t.pass, "rounds": t.rounds});
            if let Some(peer) = t.peer {
                v["peer"] = json!(peer);
            }
            if let Some((won, of)) = t.won {
                v["rounds_won"] = json!(won);
                v["rounds_compared"] = json!(of);
            }
            v
        })
        .collect();
    let machine: serde_json::Map<String, Value> =
        facts.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    json!({
        "machine": machine,
        "settings": settings,
        "figures": figures,
        "resources": resources,
        "targets": targets,
        "verdict_rule": VERDICT_RULE.join(" "),
        "errors": r.errors,
    })
}

/// The README table: one row per figure, one column per path ("median (ratio)"), then the
/// resources and the targets.
pub fn markdown(r: &Results, paths: &[Path], facts: &[(String, String)]) -> String {
    let get = |k: &str| facts.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str()).unwrap_or("");
    let mut s = format!(
        "Measured {} on {} (kernel {}, TCP congestion control {}), commit {}, load average {} before / {} \
         after. Each cell: the median of {} rounds [min-max over the rounds], then the median per-round ratio to kernel DNAT.\n\n",
        get("date"),
        get("cpu"),
        get("kernel"),
        get("tcp congestion control"),
        get("commit"),
        get("load before"),
        get("load after"),
        get("rounds"),
    );
    s.push_str("| figure | unit |");
    for p in paths {
        s.push_str(&format!(" {} |", p.name()));
    }
    s.push_str("\n|---|---|");
    for _ in paths {
        s.push_str("---:|");
    }
    s.push('\n');
    for f in FIGURES {
        s.push_str(&format!("| {} | {} |", f.label, f.unit));
        for p in paths {
            // As on stdout: the median, its range over the rounds, the median per-round ratio.
            let cell = match spread(&r.values(f.key, p.name())) {
                None => "n/a".to_string(),
                Some((lo, med, hi)) => {
                    let ratio = spread(&r.ratios(f.key, p.name())).map(|x| format!(" {:.2}x", x.1)).unwrap_or_default();
                    format!("{} [{}-{}]{ratio}", num(med), num(lo), num(hi))
                }
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    for res in RESOURCES {
        s.push_str(&format!("| {} | {} |", res.label, res.unit));
        for p in paths {
            let cell = r.resource(res.key, p.name()).map_or_else(|| "n/a".into(), |v| format!("{v:.1}"));
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    let t = targets(r, paths);
    if !t.is_empty() {
        if t.iter().any(|t| t.peer.is_some()) {
            s.push_str(&format!("\n{}\n", VERDICT_RULE.join(" ")));
        }
        s.push_str("\n| target (edgeproxy) | measured | bound | | rounds |\n|---|---:|---|---|---|\n");
        for t in &t {
            let mark = match t.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "n/a",
            };
            let v = t.value.map(num).unwrap_or_else(|| "n/a".into());
            s.push_str(&format!("| {} | {v} | {} | {mark} | {} |\n", t.name, t.bound, t.rounds));
        }
    }
    s
}
