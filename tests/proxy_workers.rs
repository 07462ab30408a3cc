//! The proxy's workers, end to end in namespaces: with `workers: 2` connections and UDP flows
//! are spread over two event loops by the kernel (SO_REUSEPORT), every one is served, a UDP
//! flow's datagrams stay on one worker; with `workers: 1` no worker thread exists (the single
//! loop runs on the caller's thread, as before workers); with `pinWorkers` each worker runs on
//! a CPU of its own. Own binary: it reads this process's threads.
mod proxy_support;
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroU16;
use std::time::Duration;

use edgeproxy::proxy::Workers;
use proxy_support::*;

/// Names of this process's threads that are proxy workers.
fn worker_threads() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("proxy-worker"))
        .collect()
}

fn with_workers(n: u16) -> Topo {
    let mut cfg = test_config();
    cfg.workers = Workers::Count(NonZeroU16::new(n).unwrap());
    // test_config's small flow caps are for the cap tests; here every client gets its flow.
    (cfg.udp_max_flows, cfg.udp_max_flows_per_source) = (1024, 1024);
    Topo::new(cfg)
}

/// `n` connections from the node, each from its own source port: all answered and echoed.
fn tcp_round(t: &Topo, n: usize) {
    let served = Topo::in_ns(&t.node, move || {
        let mut served = 0;
        for i in 0..n {
            let (mut s, _) = connect_timeout(WEB);
            let id = greeting(&mut s).expect("greeting");
            let msg = format!("m{i}");
            s.write_all(msg.as_bytes()).unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, msg.as_bytes(), "echo through {id}");
            served += 1;
        }
        served
    });
    assert_eq!(served, n);
}

fn connect_timeout(addr: &str) -> (std::net::TcpStream, ()) {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (s, ())
}

/// `flows` UDP clients (each its own source port) send `each` datagrams and read every echo.
fn udp_round(t: &Topo, flows: usize, each: usize) {
    let addr: SocketAddr = DNS.parse().unwrap();
    let answered = Topo::in_ns(&t.node, move || {
        let mut answered = 0;
        for f in 0..flows {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            for d in 0..each {
                s.send(format!("flow {f} datagram {d}").as_bytes()).unwrap();
                let mut buf = [0u8; 512];
                if s.recv(&mut buf).is_ok() {
                    answered += 1;
                }
            }
        }
        answered
    });
    assert_eq!(answered, flows * each, "every datagram answered");
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn two_workers_share_connections_and_flows_one_worker_starts_no_thread_pinned_ones_keep_their_cpu() {
    {
        let t = with_workers(2);
        // A thread names itself once it runs: give it that moment.
        let two = BTreeSet::from(["proxy-worker-0".to_string(), "proxy-worker-1".to_string()]);
        wait_for(|| worker_threads() == two, "two worker threads, named");
        tcp_round(&t, 64);
        let per_worker: Vec<u64> = t.stats.workers().iter().map(|w| w.connections.get()).collect();
        assert_eq!(per_worker.len(), 2, "{per_worker:?}");
        assert_eq!(per_worker.iter().sum::<u64>(), t.stats.tcp_accepted.get(), "the workers' sum is the total");
        assert_eq!(t.stats.tcp_accepted.get(), 64);
        // 64 source ports hashed over two listeners: both get some (all on one: p = 2^-63).
        assert!(per_worker.iter().all(|n| *n > 0), "connections per worker: {per_worker:?}");

        udp_round(&t, 24, 5);
        let datagrams: Vec<u64> = t.stats.workers().iter().map(|w| w.datagrams.get()).collect();
        assert_eq!(datagrams.iter().sum::<u64>(), 24 * 5, "{datagrams:?}");
        assert!(datagrams.iter().all(|n| *n > 0), "datagrams per worker: {datagrams:?}");
        // Each flow's five datagrams reached one worker: every worker's count is a multiple of 5.
        assert!(datagrams.iter().all(|n| n % 5 == 0), "a flow was split over workers: {datagrams:?}");
        assert_eq!(t.stats.total.udp_flows_created.get(), 24, "one flow per client");
    }
    // The Topo's drop stopped the proxy: its threads are gone.
    wait_for(|| worker_threads().is_empty(), "worker threads end with the proxy");

    {
        let t = with_workers(1);
        assert!(worker_threads().is_empty(), "one worker runs on the caller's thread: {:?}", worker_threads());
        tcp_round(&t, 8);
        udp_round(&t, 4, 3);
        let w = t.stats.workers();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].connections.get(), w[0].datagrams.get()), (8, 12));
    }

    // pinWorkers: worker i runs on the i-th CPU this process may use, and still serves.
    let allowed = cpus_allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let mut cfg = test_config();
    cfg.workers = Workers::Count(NonZeroU16::new(2).unwrap());
    cfg.pin_workers = true;
    (cfg.udp_max_flows, cfg.udp_max_flows_per_source) = (1024, 1024);
    let t = Topo::new(cfg);
    wait_for(|| worker_threads().len() == 2, "two worker threads");
    let want: Vec<Vec<usize>> = (0..2).map(|i| vec![allowed[i % allowed.len()]]).collect();
    // Each thread pins itself as it starts: give it that moment.
    wait_for(|| worker_affinities() == want, "each worker on its CPU");
    assert_eq!(worker_affinities(), want, "allowed CPUs {allowed:?}");
    tcp_round(&t, 16);
    udp_round(&t, 4, 3);
}

/// `Cpus_allowed_list:` of a /proc status file, expanded (`0-2,5` -> 0, 1, 2, 5).
fn cpus_allowed(status: &str) -> Vec<usize> {
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list").trim();
    list.split(',')
        .flat_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()
        })
        .collect()
}

/// The allowed CPUs of each proxy worker thread, in worker order.
fn worker_affinities() -> Vec<Vec<usize>> {
    let mut v: Vec<(String, Vec<usize>)> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?.trim().to_string();
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            name.starts_with("proxy-worker").then(|| (name, cpus_allowed(&status)))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, c)| c).collect()
}
