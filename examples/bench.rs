//! Side-by-side benchmark of edgeproxy against a direct connection, the kernel's DNAT path
//! (kube-proxy style) and HAProxy (one thread, and its default threads), on one topology of
//! network namespaces. Needs root.
//!
//! ```text
//! sudo cargo run --release --example bench -- [--quick] [--json FILE] [--paths a,b,...] [--edgemesh BIN]
//! ```
//!
//! Topology: `client` (10.77.1.2) -- `node` (10.77.1.1 | 10.77.2.1, forwarding on) --
//! `backend` (10.77.2.2: TCP/UDP echo on 7000, iperf3 on 5201). Each path has its own
//! ClusterIP, all installed at once in the node namespace:
//! - direct: the client dials 10.77.2.2;
//! - kernel-dnat: 10.96.77.10, kube-proxy-shaped SERVICES -> SVC -> SEP chains, DNAT to the backend;
//! - edgeproxy: 10.96.77.20, the release binary's `edgeproxy run --source file:` in the node;
//! - haproxy: 10.96.77.30, DNAT to HAProxy, 1 thread (mode tcp, nbthread 1) on 169.254.96.17 in
//!   the node;
//! - edgeproxy-kernel: 10.96.77.40, a service of the same edgeproxy annotated
//!   `edgeproxy.io/data-path: kernel`: its own DNAT straight to the backend, no proxy hop;
//! - haproxy-mt: 10.96.77.50, DNAT to a second HAProxy with its default threads (no nbthread
//!   line: HAProxy starts one thread per CPU it may use) on 169.254.96.18 in the node; its own
//!   process, config and log. Neither HAProxy proxies UDP;
//! - edgemesh (only with `--edgemesh PATH`): 10.96.77.60, EdgeMesh's edgemesh-agent (proxy module
//!   only) in a node namespace of its own, `em` (10.77.3.1 | 10.77.4.1), because its chains are
//!   the `KUBE-PORTALS-*` chains edgeproxy owns; the client routes only this ClusterIP through it
//!   and it dials the backend's second address, 10.77.4.2 (`edgemesh`).
//!
//! Owns the orchestration only: set up, run every figure for every path in each round (the path
//! order rotates per round), collect, report. The report judges edgeproxy against each peer
//! that ran (either HAProxy, EdgeMesh); a "better than" verdict passes only when edgeproxy's
//! median is better AND it won a strict majority of the rounds (`report`). Everything it
//! creates (namespaces, processes, files under a temporary directory) is removed at the end,
//! also on error, panic or Ctrl-C. It never changes the root namespace's routes, iptables or
//! sysctls.

#[path = "bench/edgemesh.rs"]
mod edgemesh;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/paired.rs"]
mod paired;
#[path = "bench/paths.rs"]
mod paths;
#[path = "bench/programs.rs"]
mod programs;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/topo.rs"]
mod topo;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use argh::FromArgs;
use serde_json::{json, Value};

use paths::Path;
use programs::{cpu_seconds, rss_kib, spawn_edgeproxy, spawn_haproxy, which, write};
use report::Results;
use topo::{Ns, Proc, Res, Topology};

/// Benchmark edgeproxy against direct, kernel DNAT and HAProxy paths (needs root).
#[derive(FromArgs)]
struct Args {
    /// short run (2 rounds, short windows; under a minute) for development
    #[argh(switch)]
    quick: bool,
    /// where to write the JSON results (default bench-results/latest.json)
    #[argh(option, default = "PathBuf::from(\"bench-results/latest.json\")")]
    json: PathBuf,
    /// number of rounds (default 5, or 2 with --quick)
    #[argh(option)]
    rounds: Option<usize>,
    /// comma-separated paths to run (default direct,kernel-dnat,edgeproxy,edgeproxy-kernel,haproxy,
    /// haproxy-mt)
    #[argh(option)]
    paths: Option<String>,
    /// the edgeproxy binary (default: build and use target/release/edgeproxy)
    #[argh(option)]
    edgeproxy: Option<PathBuf>,
    /// the edgemesh-agent of EdgeMesh (v1.12 or later; README "Benchmarks" says how to build one):
    /// adds the edgemesh path, in a node namespace of its own
    #[argh(option)]
    edgemesh: Option<PathBuf>,
    /// a config file for the edgeproxy under test (for tuning experiments; default none)
    #[argh(option)]
    edgeproxy_config: Option<PathBuf>,
    /// the edgeproxy under test's `workers` (auto, the default, or a number; with
    /// --edgeproxy-config that file's setting counts)
    #[argh(option)]
    edgeproxy_workers: Option<String>,
    /// comma-separated figure groups to measure, for profiling (throughput, latency, rate,
    /// conns, udp; default all, plus the resource figures)
    #[argh(option)]
    figures: Option<String>,
    /// TCP congestion control for every namespace of the benchmark (default: the machine's
    /// default, which new namespaces inherit; one of net.ipv4.tcp_allowed_congestion_control)
    #[argh(option)]
    congestion_control: Option<String>,
    /// seconds per measurement window, for profiling (default 4 for iperf3 and 1.5 for the
    /// others, or 1 and 0.3 with --quick)
    #[argh(option)]
    window: Option<f64>,
}

/// The figure groups `--figures` selects from.
const FIGURE_GROUPS: [&str; 5] = ["throughput", "latency", "rate", "conns", "udp"];

/// How long each measurement window lasts.
#[derive(Clone)]
struct Windows {
    rounds: usize,
    /// Figure groups to measure (FIGURE_GROUPS); the resource figures only when all are.
    groups: Vec<&'static str>,
    throughput: u32,
    rr: Duration,
    conns: Duration,
    udp: Duration,
}

impl Windows {
    /// The same windows, one figure group only.
    fn only(&self, group: &'static str) -> Windows {
        Windows { groups: vec![group], ..self.clone() }
    }
}

const IDLE_CONNS: usize = 5000;
/// Idle connections opened first to count the proxy's descriptors per connection.
const FD_PROBE_CONNS: usize = 1000;
/// HAProxy needs 2 fds per connection and refuses to start above the hard limit (20000 here).
const HAPROXY_MAXCONN: usize = 9000;
const GENERATED_SERVICES: usize = 1000;

fn main() {
    let args: Args = argh::from_env();
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("bench: {e}");
            topo::emergency_cleanup();
            std::process::exit(1);
        }
    }
}

/// The paths and figure groups asked for, and the measuring windows.
fn selection(args: &Args) -> Res<(Vec<Path>, Windows)> {
    let paths: Vec<Path> = match &args.paths {
        None => Path::ALL.into_iter().filter(|p| *p != Path::Edgemesh || args.edgemesh.is_some()).collect(),
        Some(list) => list
            .split(',')
            .map(|s| Path::parse(s.trim()).ok_or_else(|| format!("--paths: unknown path {s:?} ({})", Path::names())))
            .collect::<Res<_>>()?,
    };
    if !paths.contains(&Path::Kernel) {
        return Err("--paths must include kernel-dnat: every figure is a ratio to it".into());
    }
    if paths.contains(&Path::Edgemesh) && args.edgemesh.is_none() {
        return Err("--paths edgemesh needs --edgemesh PATH (an edgemesh-agent binary)".into());
    }
    let groups: Vec<&'static str> = match &args.figures {
        None => FIGURE_GROUPS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|g| {
                FIGURE_GROUPS
                    .iter()
                    .copied()
                    .find(|k| *k == g.trim())
                    .ok_or_else(|| format!("--figures: unknown group {g:?} ({})", FIGURE_GROUPS.join(", ")))
            })
            .collect::<Res<_>>()?,
    };
    let mut w = if args.quick {
        Windows {
            groups: groups.clone(),
            rounds: args.rounds.unwrap_or(2),
            throughput: 1,
            rr: Duration::from_millis(300),
            conns: Duration::from_millis(300),
            udp: Duration::from_millis(300),
        }
    } else {
        Windows {
            groups: groups.clone(),
            rounds: args.rounds.unwrap_or(5),
            throughput: 4,
            rr: Duration::from_millis(1500),
            conns: Duration::from_millis(1500),
            udp: Duration::from_millis(1500),
        }
    };
    if let Some(secs) = args.window {
        if !(secs > 0.0 && secs <= 600.0) {
            return Err(format!("--window {secs}: must be within (0, 600] seconds"));
        }
        w.throughput = load::whole_seconds(secs);
        (w.rr, w.conns, w.udp) =
            (Duration::from_secs_f64(secs), Duration::from_secs_f64(secs), Duration::from_secs_f64(secs));
    }
    Ok((paths, w))
}

/// Memory with many idle connections and with many services, per process.
fn measure_resources(
    topo: &Topology,
    procs: &[(Path, Proc)],
    (binary, edgemesh_bin): (Option<&PathBuf>, Option<&PathBuf>),
    args: &Args,
    work: &std::path::Path,
    results: &mut Results,
) -> Res<()> {
    for (p, proc) in procs {
        eprintln!("{}: {IDLE_CONNS} idle connections", p.name());
        let addr = p.echo();
        let pid = proc.pid();
        // Descriptors per connection from the first FD_PROBE_CONNS (before any limit bites),
        // then RSS with all of them.
        let fds0 = programs::fd_count(pid)?;
        let first = match in_ns(&topo.client, move || load::idle_conns(addr, FD_PROBE_CONNS)) {
            Ok(conns) => conns,
            Err(e) => {
                results.errors.push(format!("{}: {FD_PROBE_CONNS} idle connections: {e}", p.name()));
                continue;
            }
        };
        std::thread::sleep(Duration::from_millis(300));
        let per_conn = load::float(programs::fd_count(pid)?.saturating_sub(fds0)) / load::float(FD_PROBE_CONNS);
        results.resources.entry("fds_per_idle_conn").or_default().insert(p.name(), per_conn);
        match in_ns(&topo.client, move || load::idle_conns(addr, IDLE_CONNS - FD_PROBE_CONNS)) {
            Ok(rest) => {
                std::thread::sleep(Duration::from_millis(300));
                let rss = rss_kib(pid)?;
                results.resources.entry("rss_5000_conns").or_default().insert(p.name(), rss);
                drop(rest);
            }
            Err(e) => results
                .errors
                .push(format!("{}: {IDLE_CONNS} idle connections ({per_conn:.1} descriptors each), after the first {FD_PROBE_CONNS}: {e}", p.name())),
        }
        drop(first);
    }
    for (p, _) in procs {
        eprintln!("{}: {GENERATED_SERVICES} services", p.name());
        let got = match (p, edgemesh_bin) {
            (Path::Edgemesh, Some(bin)) => edgemesh::rss_with_services(GENERATED_SERVICES, bin, work),
            _ => {
                programs::rss_with_services(*p, GENERATED_SERVICES, binary, Some(&edgeproxy_config(args, work)?), work)
            }
        };
        match got {
            Ok(kib) => {
                results.resources.entry("rss_1000_services").or_default().insert(p.name(), kib);
            }
            Err(e) => results.errors.push(format!("{}: {GENERATED_SERVICES} services: {e}", p.name())),
        }
    }
    Ok(())
}

/// The run's settings, as recorded in the JSON report.
fn settings_json(args: &Args, w: &Windows, paths: &[Path]) -> Value {
    json!({
        "quick": args.quick,
        "rounds": w.rounds,
        "throughput_seconds": w.throughput,
        "rr_seconds": w.rr.as_secs_f64(),
        "conns_seconds": w.conns.as_secs_f64(),
        "udp_seconds": w.udp.as_secs_f64(),
        "new_conn_threads": NEW_CONN_THREADS,
        "udp_flows": UDP_FLOWS,
        "idle_connections": IDLE_CONNS,
        "generated_services": GENERATED_SERVICES,
        "paths": paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "edgeproxy_workers": args.edgeproxy_workers.as_deref().unwrap_or("auto"),
        "edgemesh": "EdgeMesh edgemesh-agent (--edgemesh), proxy module only, in a node namespace of its own (10.77.3.1 | 10.77.4.1) against a stand-in API server; ClusterIP 10.96.77.60 redirected by its own KUBE-PORTALS-CONTAINER rule to its listener on 169.254.96.16",
        "haproxy": "HAProxy, 1 thread: mode tcp, nbthread 1, default buffers, no splice; reached by DNAT of its ClusterIP to 169.254.96.17 in the node namespace",
        "haproxy_mt": format!(
            "HAProxy, default threads: mode tcp, no nbthread line (HAProxy starts one thread per CPU it may use: {} here), \
             default buffers, no splice; reached by DNAT of its ClusterIP to 169.254.96.18 in the node namespace",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        ),
    })
}

fn run(args: &Args) -> Res<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (network namespaces, iptables): sudo cargo run --release --example bench".into());
    }
    for tool in ["ip", "iperf3", "haproxy", "iptables-nft-restore"] {
        if which(tool).is_none() {
            return Err(format!("{tool} not found in PATH (apt-get install iproute2 iperf3 haproxy iptables)"));
        }
    }
    topo::install_cleanup_handlers()?;
    topo::remove_stale();
    programs::raise_nofile(2 * IDLE_CONNS + 1000)?;
    let (paths, w) = selection(args)?;
    let all_figures = w.groups.len() == FIGURE_GROUPS.len();
    let started = Instant::now();
    let binary = if paths.contains(&Path::Edgeproxy) || paths.contains(&Path::EdgeproxyKernel) {
        Some(programs::edgeproxy_binary(args.edgeproxy.as_ref())?)
    } else {
        None
    };
    let mut facts = programs::machine_facts(binary.as_ref());
    let edgemesh_bin = match &args.edgemesh {
        Some(b) if paths.contains(&Path::Edgemesh) => Some(edgemesh::binary(b)?),
        _ => None,
    };
    if let Some(b) = &edgemesh_bin {
        let size = std::fs::metadata(b).map(|m| m.len()).unwrap_or(0);
        facts.push(("edgemesh".into(), format!("{} ({size} bytes)", b.display())));
    }
    let work = tempdir()?;

    let topo = Topology::build(args.congestion_control.as_deref())?;
    let cc = topo.node.ok(&["sysctl", "-n", "net.ipv4.tcp_congestion_control"])?;
    facts.push(("tcp congestion control".into(), cc.trim().to_string()));
    paths::kernel_rules(&topo.node)?;
    for ip in Path::HAPROXIES.iter().filter_map(|p| p.haproxy_ip()) {
        topo.node.ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    }
    load::start_backend(&topo.backend)?;
    let _iperf = topo.backend.spawn(&["iperf3", "-s", "-p", &load::IPERF_PORT.to_string()], true)?;

    let mut results = Results::default();
    let (mut procs, em) = start_proxies(&topo, &paths, (binary.as_ref(), edgemesh_bin.as_ref()), args, &work.0)?;
    for p in &paths {
        let (tcp, udp) = (p.echo(), p.has_udp().then(|| p.echo()));
        in_ns(&topo.client, move || load::probe(tcp, udp, Duration::from_secs(15)))
            .map_err(|e| format!("{}: {e}", p.name()))?;
    }
    std::thread::sleep(Duration::from_millis(300));
    for (p, proc) in &procs {
        results.resources.entry("rss_idle").or_default().insert(p.name(), rss_kib(proc.pid())?);
    }

    rounds(&topo, &paths, &mut procs, &w, started, &mut results)?;
    // What each proxy keeps once the load is gone (its pools and caches).
    std::thread::sleep(Duration::from_millis(500));
    for (p, proc) in &mut procs {
        if proc.alive() {
            results.resources.entry("rss_after_load").or_default().insert(p.name(), rss_kib(proc.pid())?);
            let fds = load::float(programs::fd_count(proc.pid())?);
            results.resources.entry("fds_after_load").or_default().insert(p.name(), fds);
        }
    }

    if all_figures {
        measure_resources(&topo, &procs, (binary.as_ref(), edgemesh_bin.as_ref()), args, &work.0, &mut results)?;
    }
    for (p, proc) in &mut procs {
        if let Some(st) = proc.exit_status() {
            let why = proc.log.as_deref().map(programs::last_words).unwrap_or_default();
            results.errors.push(format!("{} exited during the benchmark ({st}): {why}", p.name()));
        }
        proc.stop();
    }
    drop(procs);
    drop(em);
    drop(topo);

    facts.push(("load after".into(), programs::loadavg()));
    facts.push(("rounds".into(), w.rounds.to_string()));
    facts.push(("duration".into(), format!("{:.0} s", started.elapsed().as_secs_f64())));
    print!("\n{}", report::table(&results, &paths, &facts));
    let settings = settings_json(args, &w, &paths);
    let doc = report::json(&results, &paths, &facts, &settings);
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(|e| format!("json: {e}"))?;
    write(&args.json, &text)?;
    let md = args.json.with_extension("md");
    write(&md, &report::markdown(&results, &paths, &facts))?;
    println!("\nJSON: {}\nMarkdown table: {}", args.json.display(), md.display());
    Ok(())
}

/// The proxies' processes, and EdgeMesh's namespace and stand-in API server when it runs.
type Started = (Vec<(Path, Proc)>, Option<(Ns, edgemesh::ApiServer)>);

/// The proxies under test, each in its namespace: edgeproxy, the HAProxies asked for, and
/// EdgeMesh in a node namespace of its own with its stand-in API server (returned, so both live
/// to the end of the run).
fn start_proxies(
    topo: &Topology,
    paths: &[Path],
    (binary, edgemesh_bin): (Option<&PathBuf>, Option<&PathBuf>),
    args: &Args,
    work: &std::path::Path,
) -> Res<Started> {
    let mut procs: Vec<(Path, Proc)> = Vec::new();
    if let Some(bin) = binary {
        let file = work.join("cluster.json");
        write(&file, &paths::bench_cluster_json())?;
        let cfg = edgeproxy_config(args, work)?;
        procs
            .push((Path::Edgeproxy, spawn_edgeproxy(&topo.node, bin, &file, Some(&cfg), &work.join("edgeproxy.log"))?));
    }
    for p in Path::HAPROXIES.into_iter().filter(|p| paths.contains(p)) {
        // haproxy.cfg / haproxy.log, haproxy-mt.cfg / haproxy-mt.log.
        let cfg = work.join(format!("{}.cfg", p.name()));
        write(&cfg, &paths::haproxy_bench_config(p, HAPROXY_MAXCONN))?;
        procs.push((p, spawn_haproxy(&topo.node, &cfg, &work.join(format!("{}.log", p.name())))?));
    }
    let mut em = None;
    if let Some(bin) = edgemesh_bin {
        let ns = edgemesh::node(topo, args.congestion_control.as_deref())?;
        let (proc, api) = edgemesh::spawn(&ns, bin, edgemesh::Lists::bench(), work, "bench", Duration::from_secs(60))?;
        procs.push((Path::Edgemesh, proc));
        em = Some((ns, api));
    }
    Ok((procs, em))
}

/// Every round: each figure group for every path back to back.
fn rounds(
    topo: &Topology,
    paths: &[Path],
    procs: &mut [(Path, Proc)],
    w: &Windows,
    started: Instant,
    results: &mut Results,
) -> Res<()> {
    // Figure-major: each figure group is measured for every path back to back (the path order
    // rotating per round), so a ratio compares windows seconds apart, not a whole path's run.
    for round in 0..w.rounds {
        for group in w.groups.clone() {
            let wg = w.only(group);
            for i in 0..paths.len() {
                let p = paths[(i + round) % paths.len()];
                let pid = procs.iter().find(|(q, _)| *q == p).map(|(_, pr)| pr.pid());
                let at = started.elapsed().as_secs_f64();
                eprintln!("round {}/{} {group:<10} {:<16} ({at:.0}s)", round + 1, w.rounds, p.name());
                if let Some((_, proc)) = procs.iter_mut().find(|(q, _)| *q == p) {
                    if let Some(st) = proc.exit_status() {
                        return Err(format!("{} exited ({st}) before round {}", p.name(), round + 1));
                    }
                }
                if let Err(e) = measure(topo, p, pid, round, &wg, results) {
                    results.errors.push(format!("round {} {} {group}: {e}", round + 1, p.name()));
                    eprintln!("  error: {e}");
                }
            }
        }
        if paths.contains(&Path::Kernel) && paths.contains(&Path::EdgeproxyKernel) {
            eprintln!("round {}/{} paired     kernel-dnat|edgeproxy-kernel", round + 1, w.rounds);
            if let Err(e) = paired_round(topo, round, w, results) {
                results.errors.push(format!("round {} paired: {e}", round + 1));
                eprintln!("  error: {e}");
            }
        }
    }
    Ok(())
}

/// The kernel path against kernel DNAT taking turns in the same windows (`paired`): each side's
/// mean and p99 per operation, as figures of the two paths.
fn paired_round(topo: &Topology, round: usize, w: &Windows, r: &mut Results) -> Res<()> {
    let (a, b) = (Path::Kernel.echo(), Path::EdgeproxyKernel.echo());
    let mut put = |mean: &'static str, p99: Option<&'static str>, mut pair: paired::Pair| {
        r.push(mean, Path::Kernel, round, paired::Pair::mean_us(&pair.a));
        r.push(mean, Path::EdgeproxyKernel, round, paired::Pair::mean_us(&pair.b));
        if let Some(k) = p99 {
            r.push(k, Path::Kernel, round, paired::Pair::quantile_us(&mut pair.a, 0.99));
            r.push(k, Path::EdgeproxyKernel, round, paired::Pair::quantile_us(&mut pair.b, 0.99));
        }
    };
    if w.groups.contains(&"latency") {
        let d = w.rr;
        put("paired_rr_mean", Some("paired_rr_p99"), in_ns(&topo.client, move || paired::rr(a, b, d))?);
    }
    if w.groups.contains(&"conns") {
        let d = w.conns;
        put("paired_conn_mean", None, in_ns(&topo.client, move || paired::new_conns(a, b, NEW_CONN_THREADS, d))?);
    }
    if w.groups.contains(&"udp") {
        let d = w.udp;
        put("paired_udp_mean", Some("paired_udp_p99"), in_ns(&topo.client, move || paired::udp(a, b, UDP_FLOWS, d))?);
    }
    Ok(())
}

const NEW_CONN_THREADS: usize = 4;
const UDP_FLOWS: usize = 8;

/// All figures of one path in one round.
fn measure(topo: &Topology, p: Path, pid: Option<u32>, round: usize, w: &Windows, r: &mut Results) -> Res<()> {
    let on = |g: &str| w.groups.contains(&g);
    if on("throughput") {
        // Throughput (iperf3) and the proxy's CPU time around it.
        let cpu = CpuSince::start(pid)?;
        let one = load::iperf(&topo.client, p.iperf(), 1, w.throughput)?;
        let eight = load::iperf(&topo.client, p.iperf(), 8, w.throughput)?;
        if let Some(used) = cpu.used()? {
            let gb = (one.1 + eight.1) / 1e9;
            r.push("cpu_per_gb", p, round, used / gb);
        }
        r.push("tcp_1_stream", p, round, one.0 / 1e9);
        r.push("tcp_8_streams", p, round, eight.0 / 1e9);
    }
    let (addr, dur) = (p.echo(), w.rr);
    if on("latency") {
        let s = in_ns(&topo.client, move || load::pingpong(addr, 1, dur))?;
        r.push("rr_1b_p50", p, round, s.quantile_us(0.5));
        r.push("rr_1b_p99", p, round, s.quantile_us(0.99));
        r.push("rr_1b_p999", p, round, s.quantile_us(0.999));
        let s = in_ns(&topo.client, move || load::pingpong(addr, 4096, dur))?;
        r.push("rr_4k_p50", p, round, s.quantile_us(0.5));
        r.push("rr_4k_p99", p, round, s.quantile_us(0.99));
        r.push("rr_4k_p999", p, round, s.quantile_us(0.999));
    }
    if on("rate") {
        let cpu = CpuSince::start(pid)?;
        let s = in_ns(&topo.client, move || load::concurrent_rr(addr, 16, dur))?;
        r.push("rr_16_conns", p, round, s.rate());
        if let Some(used) = cpu.used()? {
            r.push("cpu_per_req", p, round, used * 1e6 / load::float(s.ns.len()));
        }
    }
    if on("conns") {
        let dur = w.conns;
        let cpu = CpuSince::start(pid)?;
        let s = in_ns(&topo.client, move || load::new_conns(addr, NEW_CONN_THREADS, dur))?;
        r.push("new_conns", p, round, s.rate());
        if let Some(used) = cpu.used()? {
            r.push("cpu_per_conn", p, round, used * 1e6 / load::float(s.ns.len()));
        }
        r.push("new_conn_p99", p, round, s.quantile_us(0.99));
    }
    if on("udp") && p.has_udp() {
        let dur = w.udp;
        let cpu = CpuSince::start(pid)?;
        let (s, _lost) = in_ns(&topo.client, move || load::udp_rr(addr, UDP_FLOWS, dur))?;
        r.push("udp_rr", p, round, s.rate());
        if let Some(used) = cpu.used()? {
            r.push("cpu_per_udp_req", p, round, used * 1e6 / load::float(s.ns.len()));
        }
        r.push("udp_p99", p, round, s.quantile_us(0.99));
    }
    Ok(())
}

/// The proxy's CPU time (utime + stime) since a window began; nothing for a path without one.
struct CpuSince(Option<(u32, f64)>);

impl CpuSince {
    fn start(pid: Option<u32>) -> Res<CpuSince> {
        Ok(CpuSince(pid.map(|pid| cpu_seconds(pid).map(|c| (pid, c))).transpose()?))
    }

    /// Seconds of CPU used since `start`.
    fn used(&self) -> Res<Option<f64>> {
        self.0.map(|(pid, c0)| cpu_seconds(pid).map(|c| c - c0)).transpose()
    }
}

fn in_ns<T: Send + 'static>(ns: &Ns, f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    ns.thread(f)?.join().map_err(|_| "a benchmark thread panicked".to_string())?
}

/// `--edgeproxy-config`, else a config of the benchmark's own: the defaults, but one client
/// address may hold the 5,000 idle connections of the RSS figure (the default per-source cap is
/// 2,048, and every connection here comes from the one client).
fn edgeproxy_config(args: &Args, work: &std::path::Path) -> Res<PathBuf> {
    if let Some(c) = &args.edgeproxy_config {
        return Ok(c.clone());
    }
    let path = work.join("edgeproxy.json");
    let workers = args.edgeproxy_workers.as_deref().unwrap_or("auto");
    if workers != "auto" && workers.parse::<u16>().is_err() {
        return Err(format!("--edgeproxy-workers {workers:?}: auto or a number"));
    }
    write(
        &path,
        &format!("{{\"tcp\": {{\"maxConnectionsPerSource\": {}}}, \"workers\": \"{workers}\"}}\n", 2 * IDLE_CONNS),
    )?;
    Ok(path)
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> Res<TempDir> {
    let p = std::env::temp_dir().join(format!("epbench-{}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
    Ok(TempDir(p))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
