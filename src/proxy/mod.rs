//! The data path: a TCP and UDP proxy of one or more event loops, each single-threaded (tokio
//! `current_thread`).
//!
//! Owns the sockets of the proxy address: per worker, one TCP listener per family on `<listen
//! ip>:<tcp port>` (every TCP service port is DNATed there; the service is recovered from the
//! original destination), and one UDP socket per UDP service port (the port *is* the service);
//! with several workers each of those is bound once per worker with SO_REUSEPORT (see
//! `workers`). It reads the current [`ProxyTable`] from a `watch` channel for every new
//! connection or flow, so a new table takes effect at once without stopping anything; open
//! connections run on.
//!
//! What it never does: it never touches iptables, routes or addresses (the rules applier and the
//! agent put the proxy address on its device before [`run`]); it never blocks a loop (dials
//! are per-connection tasks with a timeout); it never relays to a destination that is not a
//! proxied service port (no open relay).
//!
//! Layout: `shared` (the settings, the events and what every task shares), `workers` (the
//! event loops), `tcp` (listener, dial), `relay` (both directions of a connection: buffers,
//! splice), `udp` (port sockets), `flow` (a UDP flow and the table of all of them), `admission`
//! (pure: who may open a connection or flow), `lb` (pure load balancing), `stats` (counters),
//! `limits` (RLIMIT_NOFILE), `table` (what `state` builds).

pub mod admission;
mod flow;
pub mod health;
pub mod lb;
pub mod limits;
pub mod probe;
mod relay;
mod shared;
pub mod stats;
pub mod table;
mod tcp;
mod udp;
pub mod workers;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::rand::{self, XorShift};
use health::Health;
use lb::Balancer;
use shared::Shared;
pub use shared::{ProxyConfig, ProxyEvent};
use stats::ProxyStats;
use table::ProxyTable;
pub use workers::Workers;

/// How long a stop waits for relayed connections to end cleanly (see `tcp::serve`) before it
/// drops what is left.
pub const DRAIN: Duration = Duration::from_secs(2);

/// How long an ending connection waits for the client's FIN after sending its own: a stop
/// waits (the rules and the address go after), a restart does not (they stay, and the next
/// agent should listen again as soon as possible).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinWait(pub Duration);

/// A plain stop.
impl From<()> for FinWait {
    fn from((): ()) -> Self {
        FinWait(Duration::from_secs(1))
    }
}

/// Run the proxy until `shutdown` resolves. Then the listeners close, every relayed TCP
/// connection ends (a FIN both ways where nothing is in flight, a reset otherwise: see
/// `tcp::serve`) while the rules and the address that carry its packets are still in place, the
/// UDP sockets close, and this returns: the caller removes rules and addresses after.
///
/// Must be called inside a tokio runtime (meant for a `current_thread` one; a `LocalSet` is
/// fine). With `workers: 1` that runtime is the one worker; with more, every worker is a thread
/// of its own and this runtime keeps the UDP reconciliation, the probes and the housekeeping.
/// Fails only when the IPv4 TCP listener cannot be bound or a worker thread cannot start. `tables`
/// delivers the current table; `events` receives [`ProxyEvent`]s (a closed receiver is
/// ignored); `stats` is updated as traffic flows.
pub async fn run(
    cfg: ProxyConfig,
    tables: watch::Receiver<Arc<ProxyTable>>,
    events: mpsc::UnboundedSender<ProxyEvent>,
    stats: Arc<ProxyStats>,
    shutdown: impl Future<Output = impl Into<FinWait>>,
) -> std::io::Result<()> {
    let soft = match limits::raise_nofile() {
        Ok(l) if l.before < l.soft => {
            log::info!("open-file limit raised from {} to {} (hard limit {})", l.before, l.soft, l.hard);
            l.soft
        }
        Ok(l) => {
            log::info!("open-file limit {} (hard limit {})", l.soft, l.hard);
            l.soft
        }
        Err(e) => {
            log::warn!("cannot raise the open-file limit, carrying on: {e}");
            1024
        }
    };
    let fd_budget = admission::fd_budget(soft);
    let seed = rand::seed(0);
    let (stop_tx, stopping) = watch::channel(None);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        stats,
        lb: Mutex::new((Balancer::new(), XorShift::new(seed), Health::default())),
        epoch: Instant::now(),
        tcp_admission: Mutex::new(admission::TcpAdmission::new(cfg.tcp_max_per_source)),
        fd_budget,
        udp_flows: Mutex::default(),
        stopping,
        events: events.clone(),
    });

    let n = cfg.workers.resolve();
    let shared_port = n > 1;
    let cpus = pinned_cpus(&cfg, n);
    let seats: Vec<tcp::Seat> =
        (0..n).map(|worker| tcp::Seat { worker, shared_port, cpu: cpus.as_ref().map(|c| c[worker]) }).collect();
    let v4s = seats.iter().map(|s| tcp::bind_v4(&cfg, *s)).collect::<std::io::Result<Vec<_>>>()?;
    let mut addrs: Vec<SocketAddr> = v4s[0].local_addr().into_iter().collect();
    let v6 = cfg.listen_v6.map(|ip| SocketAddr::from((ip, cfg.tcp_port)));
    addrs.extend(v6);
    let pool = workers::Pool::start(n, cpus.as_deref())?;
    // Every worker's counters exist from the start (a scrape shows the idle ones as 0).
    let _ = shared.stats.worker(n - 1);
    log::info!(
        "proxy listening on {} (TCP) with {n} worker(s) (workers: {}); per client address at most {} connections and {} UDP flows; UDP idle timeout {:?}, at most {} flows; {} descriptors for connections and flows; dial timeout {:?} x {} attempts",
        addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        cfg.workers,
        cfg.tcp_max_per_source,
        cfg.udp_max_flows_per_source,
        cfg.udp_idle_timeout,
        cfg.udp_max_flows,
        fd_budget,
        cfg.dial_timeout,
        cfg.dial_attempts
    );
    // The TCP side ends by itself at a stop (listeners close, connections end); the rest runs
    // until it is dropped.
    let mut tcp_tasks = JoinSet::new();
    for (seat, v4) in seats.into_iter().zip(v4s) {
        let rt = pool.handle(seat.worker);
        tcp_tasks.spawn_on(tcp::serve_v4(v4, seat, tables.clone(), shared.clone()), rt);
        if let Some(v6) = v6 {
            tcp_tasks.spawn_on(tcp::serve_v6(v6, seat, tables.clone(), shared.clone()), rt);
        }
    }
    let mut tasks = JoinSet::new();
    // Every relaying thread gives back the pipes and buffers its pools did not need.
    for rt in pool.handles() {
        tasks.spawn_on(relay::trim_pools_every(), rt);
    }
    tasks.spawn(udp::reconcile_loop(tables.clone(), events.clone(), shared.clone(), pool.handles().to_vec()));
    tasks.spawn(probe::probe_loop(tables.clone(), shared.clone()));
    tasks.spawn(housekeeping(tables, shared));
    let _ = events.send(ProxyEvent::Listening(addrs));

    let FinWait(fin_wait) = shutdown.await.into();
    let _ = stop_tx.send(Some(fin_wait));
    // The accept loops close their listeners and wait for their connections to end.
    let drained = tokio::time::timeout(DRAIN, async { while tcp_tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        log::warn!("connections still open {DRAIN:?} after the stop: dropped");
    }
    // What is left (stragglers, the UDP loops with their flows, housekeeping) is dropped with
    // its sockets.
    tcp_tasks.shutdown().await;
    tasks.shutdown().await;
    // The worker threads end with whatever they still run (their UDP flows).
    drop(pool);
    Ok(())
}

/// The CPUs the workers are pinned to, when `pinWorkers` asks for it (and says so).
fn pinned_cpus(cfg: &ProxyConfig, n: usize) -> Option<Vec<usize>> {
    if !cfg.pin_workers {
        return None;
    }
    let allowed = match crate::sys::affinity::allowed_cpus() {
        Ok(a) => a,
        Err(e) => {
            log::warn!("pinWorkers: cannot read this process's CPUs ({e}); workers run unpinned");
            return None;
        }
    };
    let cpus = workers::cpus_for(n, &allowed);
    match &cpus {
        Some(c) => log::info!("pinWorkers: workers on CPUs {c:?} in order; each TCP listener prefers its worker's CPU"),
        None => log::info!("pinWorkers: one worker (the agent's thread) is not pinned"),
    }
    cpus
}

/// Forget load-balancing and counter state of removed services; expire ClientIP affinity.
async fn housekeeping(mut tables: watch::Receiver<Arc<ProxyTable>>, shared: Arc<Shared>) {
    let mut closed = false;
    // The affinity timeouts of the table in use, rebuilt only when the table changes (a second's
    // tick over thousands of idle services then costs a lookup per affinity state held).
    let mut affinity: HashMap<crate::model::ServicePortName, Duration> = HashMap::new();
    let mut first = true;
    loop {
        let changed = match closed {
            true => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
            false => match tokio::time::timeout(Duration::from_secs(1), tables.changed()).await {
                Ok(Ok(())) => true,
                Ok(Err(_)) => {
                    closed = true;
                    false
                }
                Err(_) => false,
            },
        };
        let mut guard = shared.lb.lock().unwrap_or_else(|p| p.into_inner());
        if changed || std::mem::take(&mut first) {
            let table = tables.borrow().clone();
            let names: std::collections::HashSet<&str> =
                table.tcp.values().chain(table.udp.values()).map(|e| &*e.name).collect();
            affinity = table
                .tcp
                .values()
                .chain(table.udp.values())
                .filter_map(|e| e.affinity.map(|t| (e.name.clone(), t)))
                .collect();
            guard.0.retain(names.iter().copied());
            shared.stats.retain(|n| names.contains(n));
            let upstreams: std::collections::HashSet<(&str, SocketAddr)> =
                probe::probed(&table).flat_map(|e| e.upstreams.iter().map(move |u| (&*e.name, u.addr))).collect();
            shared.stats.retain_endpoints(|n, a| upstreams.contains(&(n, a)));
            let before = guard.2.set_aside().len();
            guard.2.retain(|n, a| upstreams.contains(&(n, a)));
            if guard.2.set_aside().len() != before {
                shared.report_set_aside(&guard.2);
            }
        }
        guard.0.expire(Instant::now(), |name| affinity.get(name).copied());
    }
}
