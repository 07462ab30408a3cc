//! One event loop per core: the proxy's workers.
//!
//! With one worker, it is the agent's own thread (its `current_thread` runtime), as before
//! workers existed. With more, every worker is a thread of its own, each running a
//! `current_thread` tokio runtime that does nothing until the proxy hands it tasks: an accept
//! loop on its own TCP listener, one task per UDP service socket. The agent's thread then keeps
//! only what is not traffic (planning, the UDP ports' reconciliation, probes, housekeeping), so
//! a long plan of a big cluster never stalls a connection. The kernel spreads the load: every
//! worker's listener and UDP socket is bound to the same address and port with SO_REUSEPORT,
//! and the kernel picks one per connection or datagram by a hash of the 4-tuple, so a UDP
//! flow's datagrams always reach the same worker (as long as the set of sockets does not
//! change). A connection or flow lives on the worker that accepted it, with its
//! timers and buffers; nothing moves between workers.
//!
//! Shared by all (behind `Shared`): the read-only proxy table (a `watch`), the balancer and the
//! health state, the admission counts, the descriptor budget, the UDP flow table and the
//! counters (atomics). Each is one short lock or one atomic add per connection, flow or read,
//! never held across an `await`.
//!
//! `workers: 1` starts no thread and binds no socket with SO_REUSEPORT: the proxy is exactly the
//! single loop it was.

use std::io;
use std::num::NonZeroU16;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How many event loops the proxy runs (`workers` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// One per usable CPU (affinity and cgroup quota count), at most [`AUTO_CAP`].
    Auto,
    /// Exactly this many.
    Count(NonZeroU16),
}

/// `auto` never runs more loops than this: an edge machine's other cores are for its
/// workloads, and past a handful of cores the kernel's own work per packet dominates anyway.
pub const AUTO_CAP: usize = 4;

/// The most `workers` accepts.
pub const MAX: u16 = 64;

impl Workers {
    /// The number of loops, given the CPUs this process may use (`None`: unknown, one).
    pub fn count(self, usable_cpus: Option<usize>) -> usize {
        match self {
            Workers::Auto => usable_cpus.unwrap_or(1).clamp(1, AUTO_CAP),
            Workers::Count(n) => usize::from(n.get()),
        }
    }

    /// The number of loops on this machine.
    pub fn resolve(self) -> usize {
        self.count(std::thread::available_parallelism().ok().map(std::num::NonZeroUsize::get))
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Count(n) => write!(f, "{n}"),
        }
    }
}

/// The CPUs to pin `n` workers to (`pinWorkers`): worker `i` to the `i`-th CPU this process may
/// use (affinity and cpusets narrow the set), wrapping round when there are fewer CPUs than
/// workers. `None` for a single worker (it is the agent's thread, which is not pinned).
pub fn cpus_for(n: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    if n <= 1 || allowed.is_empty() {
        return None;
    }
    Some((0..n).map(|i| allowed[i % allowed.len()]).collect())
}

/// Stack of a worker thread: only the poll of one task at a time lives there (tasks' states
/// are on the heap), so a small one bounds what each worker can cost.
const STACK: usize = 512 * 1024;

/// The workers' runtimes, and how to stop their threads.
pub(super) struct Pool {
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Pool {
    /// One worker (`n` <= 1): the caller's runtime, no thread. More: `n` threads, worker `i`
    /// pinned to `cpus[i]` when `cpus` is given. Must be called inside the caller's runtime.
    pub fn start(n: usize, cpus: Option<&[usize]>) -> io::Result<Pool> {
        if n <= 1 {
            return Ok(Pool { handles: vec![Handle::current()], threads: Vec::new() });
        }
        let mut pool = Pool { handles: Vec::new(), threads: Vec::new() };
        for i in 0..n {
            let named = |e: io::Error| {
                // A thread cap (systemd's TasksMax, ulimit -u) shows up here: say which setting.
                io::Error::new(e.kind(), format!("cannot start proxy worker {i} of {n} (setting workers): {e}"))
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(named)?;
            pool.handles.push(rt.handle().clone());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let cpu = cpus.and_then(|c| c.get(i)).copied();
            let thread =
                std::thread::Builder::new().name(format!("proxy-worker-{i}")).stack_size(STACK).spawn(move || {
                    super::relay::share_pools(n);
                    if let Some(cpu) = cpu {
                        if let Err(e) = crate::sys::affinity::pin_current_thread(cpu) {
                            log::warn!("proxy worker {i}: cannot pin it to CPU {cpu}: {e}; it runs unpinned");
                        }
                    }
                    // Runs the tasks handed to it until told to stop (or the sender is gone);
                    // dropping the runtime then drops whatever tasks are left, with their sockets.
                    let _ = rt.block_on(stop_rx);
                    drop(rt);
                });
            match thread {
                Ok(t) => pool.threads.push((stop_tx, t)),
                Err(e) => {
                    pool.stop();
                    return Err(named(e));
                }
            }
        }
        Ok(pool)
    }

    /// The runtime of worker `i`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
    }

    /// Every worker's runtime, in order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stop the worker threads and wait for them: their remaining tasks are dropped.
    pub fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            if thread.join().is_err() {
                log::warn!("a proxy worker thread panicked");
            }
        }
        self.handles.clear();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_usable_cpus_up_to_the_cap() {
        assert_eq!(Workers::Auto.count(Some(1)), 1);
        assert_eq!(Workers::Auto.count(Some(2)), 2);
        assert_eq!(Workers::Auto.count(Some(64)), AUTO_CAP);
        assert_eq!(Workers::Auto.count(None), 1);
        let three = Workers::Count(NonZeroU16::new(3).unwrap());
        assert_eq!(three.count(Some(1)), 3);
        assert_eq!(three.to_string(), "3");
        assert_eq!(Workers::Auto.to_string(), "auto");
    }

    #[test]
    fn pinned_workers_take_the_allowed_cpus_in_turn() {
        assert_eq!(cpus_for(1, &[0, 1]), None, "one worker is the agent's thread");
        assert_eq!(cpus_for(2, &[]), None);
        assert_eq!(cpus_for(2, &[2, 5]), Some(vec![2, 5]));
        assert_eq!(cpus_for(3, &[2, 5]), Some(vec![2, 5, 2]));
        // A pinned worker runs on its CPU only.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let last = *crate::sys::affinity::allowed_cpus().unwrap().last().unwrap();
        rt.block_on(async {
            let pool = Pool::start(2, Some(&[last, last])).unwrap();
            let mut set = tokio::task::JoinSet::new();
            set.spawn_on(async { crate::sys::affinity::allowed_cpus().unwrap() }, pool.handle(1));
            assert_eq!(set.join_next().await.unwrap().unwrap(), vec![last]);
        });
    }

    #[test]
    fn tasks_run_on_their_worker_and_stop_drops_what_is_left() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let here = std::thread::current().id();
            // One worker: the caller's own loop.
            let one = Pool::start(1, None).unwrap();
            let mut set = tokio::task::JoinSet::new();
            set.spawn_on(async { std::thread::current().id() }, one.handle(0));
            assert_eq!(set.join_next().await.unwrap().unwrap(), here);
            drop(one);
            // More: a thread each, none of them the caller's.
            let mut pool = Pool::start(3, None).unwrap();
            assert_eq!(pool.handles().len(), 3);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..3 {
                let task = async move {
                    let me = std::thread::current();
                    (i, me.name().map(str::to_string), me.id() == here)
                };
                set.spawn_on(task, pool.handle(i));
            }
            let mut seen = Vec::new();
            while let Some(r) = set.join_next().await {
                seen.push(r.unwrap());
            }
            seen.sort();
            for (i, got) in seen.into_iter().enumerate() {
                assert_eq!(got, (i, Some(format!("proxy-worker-{i}")), false));
            }
            // A task that never ends is dropped when its worker stops.
            let (tx, rx) = oneshot::channel::<()>();
            pool.handle(1).spawn(async move {
                let _keep = tx;
                std::future::pending::<()>().await;
            });
            pool.stop();
            assert!(rx.await.is_err(), "the pending task was dropped with its runtime");
            assert!(pool.handles().is_empty());
        });
    }
}
