//! The one way a thread of ours is told to stop: a flag, a condition variable the sleeping
//! threads wait on (so a stop wakes them at once, with no polling loop), and hooks run once at
//! the stop (e.g. shutting a client's connections, which wakes a thread blocked in a read).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

type Hook = Box<dyn FnOnce() + Send>;

/// A stop signal shared by the agent and its threads. Cloning shares it.
#[derive(Clone, Default)]
pub struct Stop(Arc<Inner>);

#[derive(Default)]
struct Inner {
    stopped: AtomicBool,
    /// Guards the wait (and the hooks not yet run); `stopped` is set while holding it.
    hooks: Mutex<Vec<Hook>>,
    woken: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Stop: every waiter wakes, every hook runs (once, on this thread).
    pub fn stop(&self) {
        let hooks = {
            let mut hooks = lock(&self.0.hooks);
            self.0.stopped.store(true, Ordering::Release);
            std::mem::take(&mut *hooks)
        };
        self.0.woken.notify_all();
        for hook in hooks {
            hook();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    /// Sleep for `d` unless stopped first. Returns whether to go on (`false`: stopped).
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        let mut guard = lock(&self.0.hooks);
        loop {
            if self.is_stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            guard = self.0.woken.wait_timeout(guard, end - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Run `hook` when the stop comes (at once if it already came).
    pub fn on_stop(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = lock(&self.0.hooks);
        if self.is_stopped() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop").field("stopped", &self.is_stopped()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_runs_its_course_unless_stopped() {
        let stop = Stop::new();
        assert!(stop.sleep(Duration::from_millis(5)));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let started = Instant::now();
            let went_on = s.sleep(Duration::from_secs(30));
            (went_on, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(20));
        stop.stop();
        let (went_on, took) = t.join().unwrap();
        assert!(!went_on);
        assert!(took < Duration::from_secs(5), "woke after {took:?}");
        assert!(!stop.sleep(Duration::from_secs(30)), "a stopped Stop does not sleep");
    }

    #[test]
    fn hooks_run_once_at_the_stop_or_at_once_after_it() {
        let stop = Stop::new();
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = runs.clone();
        stop.on_stop(move || {
            r.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(runs.load(Ordering::Relaxed), 0);
        stop.stop();
        stop.stop();
        assert_eq!(runs.load(Ordering::Relaxed), 1);
        let r = runs.clone();
        stop.on_stop(move || {
            r.fetch_add(10, Ordering::Relaxed);
        });
        assert_eq!(runs.load(Ordering::Relaxed), 11);
    }
}
