//! The proxy's counters in the text format, rendered from [`ProxyStats`] at scrape time (the
//! data path pays one atomic add per event and nothing else). Per service port the labels are
//! `namespace`, `service` and `port` (the port's name, "" when unnamed), as kube-state-metrics
//! has them; the TCP series are written only for ports that carry TCP.

use std::fmt::Write as _;

use super::registry::escape_label;
use crate::proxy::stats::{Latencies, ProxyStats, ServiceCounters, LATENCY_BOUNDS};

/// `namespace="…",service="…",port="…"` for a service port's name (`namespace/name[:port]`).
pub fn port_labels(name: &str) -> String {
    let (ns, rest) = name.split_once('/').unwrap_or(("", name));
    let (svc, port) = rest.split_once(':').unwrap_or((rest, ""));
    format!("namespace=\"{}\",service=\"{}\",port=\"{}\"", escape_label(ns), escape_label(svc), escape_label(port))
}

/// Writes families of `(labels, value)` rows.
struct Out<'a>(&'a mut String);

impl Out<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str, rows: impl IntoIterator<Item = (String, u64)>) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(self.0, "{name}{labels} {v}");
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Latencies) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} histogram");
        let (cumulative, sum) = h.snapshot();
        for (bound, n) in LATENCY_BOUNDS.iter().zip(&cumulative) {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let total = cumulative.last().copied().unwrap_or(0);
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {total}\n{name}_sum {sum}\n{name}_count {total}");
    }
}

fn tcp(c: &ServiceCounters) -> bool {
    c.tcp.load(std::sync::atomic::Ordering::Relaxed)
}

/// Per endpoint of the current table: dials and the passive health check.
fn render_endpoints(o: &mut Out<'_>, stats: &ProxyStats) {
    let endpoints = stats.endpoints();
    o.family(
        "edgeproxy_endpoint_dials_total",
        "counter",
        "Dials by service port, endpoint and result (ok, failed); endpoints of the current table only.",
        endpoints.iter().flat_map(|((n, addr), c)| {
            [("ok", &c.ok), ("failed", &c.failed)]
                .map(|(r, v)| (format!("{{{},endpoint=\"{addr}\",result=\"{r}\"}}", port_labels(n)), v.get()))
        }),
    );
    o.family(
        "edgeproxy_endpoint_set_aside",
        "gauge",
        "1 while the passive health check sets an endpoint aside (its last dial failed; new connections avoid it while others answer).",
        endpoints.iter().map(|((n, addr), c)| {
            let v = u64::from(c.set_aside.load(std::sync::atomic::Ordering::Relaxed));
            (format!("{{{},endpoint=\"{addr}\"}}", port_labels(n)), v)
        }),
    );
}

/// Everything the proxy counts.
pub fn render_proxy(stats: &ProxyStats, out: &mut String) {
    let services = stats.services();
    let tcp_services = || services.iter().filter(|(_, c)| tcp(c));
    let mut o = Out(out);
    o.family(
        "edgeproxy_connections_total",
        "counter",
        "Proxied TCP connections by service port and outcome (ok, no_endpoints, dial_failed).",
        tcp_services().flat_map(|(n, c)| {
            [("ok", &c.tcp_ok), ("no_endpoints", &c.tcp_no_endpoints), ("dial_failed", &c.tcp_dial_failed)]
                .map(|(o, v)| (format!("{{{},outcome=\"{o}\"}}", port_labels(n)), v.get()))
        }),
    );
    o.family(
        "edgeproxy_connections_refused_total",
        "counter",
        "TCP connections refused by the proxy itself: not a proxied service port, a loop, the client address's connection cap, or the descriptor reserve.",
        [
            ("not_a_service", &stats.tcp_refused_not_service),
            ("loop", &stats.tcp_refused_loop),
            ("per_source", &stats.tcp_refused_per_source),
            ("fd_budget", &stats.tcp_refused_fd_budget),
        ]
        .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), v.get())),
    );
    o.family(
        "edgeproxy_connections_idle_closed_total",
        "counter",
        "TCP connections closed after tcp.idleTimeout without a byte either way (off unless set).",
        [(String::new(), stats.tcp_idle_closed.get())],
    );
    o.family(
        "edgeproxy_probes_total",
        "counter",
        "Active probes of endpoints (tcp.probeInterval; off unless set) by result: ok, failed.",
        [
            ("{result=\"ok\"}".to_string(), stats.probes_ok.get()),
            ("{result=\"failed\"}".to_string(), stats.probes_failed.get()),
        ],
    );
    o.family(
        "edgeproxy_bytes_total",
        "counter",
        "Bytes relayed by service port and direction (to_backend, to_client), TCP and UDP.",
        services.iter().flat_map(|(n, c)| {
            [("to_backend", &c.bytes_to_backend), ("to_client", &c.bytes_to_client)]
                .map(|(d, v)| (format!("{{{},direction=\"{d}\"}}", port_labels(n)), v.get()))
        }),
    );
    o.family(
        "edgeproxy_active_connections",
        "gauge",
        "Open relayed TCP connections by service port.",
        tcp_services().map(|(n, c)| (format!("{{{}}}", port_labels(n)), c.tcp_active.get())),
    );
    o.family(
        "edgeproxy_dial_failures_total",
        "counter",
        "Failed attempts to reach an endpoint, by service port (one connection may make several).",
        tcp_services().map(|(n, c)| (format!("{{{}}}", port_labels(n)), c.dial_failures.get())),
    );
    render_endpoints(&mut o, stats);
    o.histogram("edgeproxy_dial_duration_seconds", "Time a successful dial of an endpoint took.", &stats.dial_duration);
    o.histogram(
        "edgeproxy_connection_duration_seconds",
        "How long relayed TCP connections lasted, from the dial to the end.",
        &stats.connection_duration,
    );
    o.family(
        "edgeproxy_udp_flows",
        "gauge",
        "Live UDP flows (one per client address and service port).",
        [(String::new(), stats.udp_flows_active.get())],
    );
    o.family(
        "edgeproxy_udp_flow_events_total",
        "counter",
        "UDP flows created, expired, evicted to make room at the cap, and refused (per client address cap; no descriptor left).",
        [
            ("created", &stats.total.udp_flows_created),
            ("expired", &stats.udp_flows_expired),
            ("evicted", &stats.udp_flows_evicted),
            ("dropped_per_source", &stats.udp_flows_dropped_per_source),
            ("dropped_at_cap", &stats.udp_flows_dropped_at_cap),
        ]
        .map(|(e, v)| (format!("{{event=\"{e}\"}}"), v.get())),
    );
    o.family(
        "edgeproxy_accept_paused_total",
        "counter",
        "Times accepting paused because file descriptors ran out.",
        [(String::new(), stats.accept_fd_exhausted.get())],
    );
    render_workers(&mut o, stats);
}

/// Per worker (event loop): what each accepted and received.
fn render_workers(o: &mut Out<'_>, stats: &ProxyStats) {
    let workers = stats.workers();
    o.family(
        "edgeproxy_worker_connections_total",
        "counter",
        "TCP connections accepted per proxy worker (event loop); the kernel spreads them (SO_REUSEPORT).",
        workers.iter().enumerate().map(|(i, w)| (format!("{{worker=\"{i}\"}}"), w.connections.get())),
    );
    o.family(
        "edgeproxy_worker_datagrams_total",
        "counter",
        "UDP datagrams received from clients per proxy worker (event loop).",
        workers.iter().enumerate().map(|(i, w)| (format!("{{worker=\"{i}\"}}"), w.datagrams.get())),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_port_labels_and_no_tcp_series_for_udp_ports() {
        let stats = ProxyStats::new();
        let web = stats.service("a/b:http");
        web.tcp.store(true, std::sync::atomic::Ordering::Relaxed);
        web.tcp_ok.add(3);
        stats.service("a/dns").bytes_to_client.add(7);
        stats.endpoint("a/b:http", "192.0.2.1:80".parse().unwrap()).failed.inc();
        stats.dial_duration.observe(std::time::Duration::from_millis(3));
        let mut out = String::new();
        render_proxy(&stats, &mut out);
        assert!(
            out.contains("edgeproxy_connections_total{namespace=\"a\",service=\"b\",port=\"http\",outcome=\"ok\"} 3"),
            "{out}"
        );
        assert!(
            !out.contains("edgeproxy_connections_total{namespace=\"a\",service=\"dns\""),
            "a UDP port has no TCP series"
        );
        assert!(
            out.contains("edgeproxy_bytes_total{namespace=\"a\",service=\"dns\",port=\"\",direction=\"to_client\"} 7")
        );
        assert!(out.contains("endpoint=\"192.0.2.1:80\",result=\"failed\"} 1"));
        assert!(out.contains("edgeproxy_dial_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(out.contains("edgeproxy_dial_duration_seconds_count 1"));
        assert!(out.contains("# TYPE edgeproxy_active_connections gauge"));
    }
}
