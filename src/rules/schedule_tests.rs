//! The rules worker's timing rules on a virtual clock.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn cfg() -> WorkerConfig {
    WorkerConfig {
        min_sync_period: 200 * MS,
        guard_period: 2000 * MS,
        resync_period: 60_000 * MS,
        backoff_start: 500 * MS,
        backoff_max: 4000 * MS,
    }
}

fn set(n: usize) -> Arc<RuleSet> {
    let mut s = RuleSet::default();
    s.v4.rules.push(format!("-A X -j Y{n}"));
    Arc::new(s)
}

/// Runs every due job at `t` (each taking no time) with the given outcome; the jobs run.
fn run(s: &mut Schedule, t: Instant, ok: impl Fn(&Job) -> bool) -> Vec<Job> {
    let mut jobs = Vec::new();
    while let Some(job) = s.due(t) {
        let good = ok(&job);
        s.finished(&job, good, t, t);
        jobs.push(job);
        assert!(jobs.len() < 10, "no end of jobs at one instant: {jobs:?}");
    }
    jobs
}

#[test]
fn a_burst_is_one_sync_of_the_newest_and_the_first_goes_out_at_once() {
    let t0 = Instant::now();
    let mut s = Schedule::new(cfg(), t0);
    for n in 0..5 {
        s.desired(set(n));
    }
    assert_eq!(s.next_deadline(t0), t0, "the first sync is due at once");
    assert_eq!(run(&mut s, t0, |_| true), [Job::Sync(set(4))]);
    assert!(run(&mut s, t0, |_| true).is_empty());
}

#[test]
fn the_next_sync_waits_for_the_min_sync_period() {
    let t0 = Instant::now();
    let mut s = Schedule::new(cfg(), t0);
    s.desired(set(1));
    run(&mut s, t0, |_| true);
    s.desired(set(2));
    s.desired(set(3));
    assert!(run(&mut s, t0 + 50 * MS, |_| true).is_empty(), "too soon");
    assert_eq!(s.next_deadline(t0 + 50 * MS), t0 + 200 * MS);
    assert_eq!(run(&mut s, t0 + 200 * MS, |_| true), [Job::Sync(set(3))]);
}

#[test]
fn failures_back_off_doubling_to_the_cap_and_a_success_resets() {
    let t0 = Instant::now();
    let mut s = Schedule::new(cfg(), t0);
    s.desired(set(1));
    let mut t = t0;
    let mut waits = Vec::new();
    let mut at = Vec::new();
    // The next sync attempt (kube-proxy probes of the guard's period in between are run too).
    let next_sync = |s: &mut Schedule, t: &mut Instant| loop {
        match s.due(*t) {
            Some(Job::ProbeKubeProxy) => {}
            Some(job) => return job,
            None => *t = s.next_deadline(*t),
        }
    };
    for _ in 0..6 {
        let job = next_sync(&mut s, &mut t);
        assert_eq!(job, Job::Sync(set(1)));
        at.push(t - t0);
        waits.push(s.finished(&job, false, t, t).unwrap());
    }
    assert_eq!(waits, [500 * MS, 1000 * MS, 2000 * MS, 4000 * MS, 4000 * MS, 4000 * MS]);
    assert_eq!(
        at,
        [Duration::ZERO, 500 * MS, 1500 * MS, 3500 * MS, 7500 * MS, 11_500 * MS],
        "each retry after its backoff"
    );
    let job = next_sync(&mut s, &mut t);
    assert_eq!(s.finished(&job, true, t, t), None);
    // The next failure starts from the beginning again.
    s.desired(set(2));
    let t = t + 200 * MS;
    let job = s.due(t).unwrap();
    assert_eq!(s.finished(&job, false, t, t), Some(500 * MS));
}

#[test]
fn the_guard_never_runs_while_a_set_is_pending() {
    let t0 = Instant::now();
    let mut s = Schedule::new(cfg(), t0);
    s.desired(set(1));
    run(&mut s, t0, |_| true);
    // The guard finds something wrong: the installed set becomes pending again.
    let t = t0 + 2000 * MS;
    assert_eq!(run(&mut s, t, |j| !matches!(j, Job::Guard)), [Job::Guard]);
    assert!(s.pending());
    // Every later wake-up: only the retried sync, never a guard, until it succeeds.
    for k in 1..=4 {
        let t = t + k * 2000 * MS;
        let jobs = run(&mut s, t, |j| !matches!(j, Job::Sync(_)));
        assert!(jobs.iter().all(|j| !matches!(j, Job::Guard | Job::Resync(_))), "{jobs:?}");
    }
    let t = t + 20_000 * MS;
    let jobs = run(&mut s, t, |_| true);
    assert_eq!(jobs[0], Job::Sync(set(1)));
    assert!(!s.pending());
}

#[test]
fn idle_means_a_guard_every_guard_period_and_a_resync_every_resync_period() {
    let t0 = Instant::now();
    let mut s = Schedule::new(cfg(), t0);
    // Nothing installed yet: the guard only probes for kube-proxy.
    assert_eq!(run(&mut s, t0 + 2000 * MS, |_| true), [Job::ProbeKubeProxy]);
    s.desired(set(1));
    run(&mut s, t0 + 2000 * MS, |_| true);
    let mut guards = 0;
    let mut resyncs = 0;
    let mut t = t0 + 2000 * MS;
    while t < t0 + 120_000 * MS {
        t = s.next_deadline(t);
        for j in run(&mut s, t, |_| true) {
            match j {
                Job::Guard => guards += 1,
                Job::Resync(_) => resyncs += 1,
                other => panic!("{other:?} while idle"),
            }
        }
    }
    assert_eq!(resyncs, 2, "at 60 s and 120 s");
    assert!((58..=60).contains(&guards), "{guards} guards in 118 s");
}
