//! The metrics registry: counters, gauges and histograms with label sets, rendered in the
//! Prometheus text exposition format 0.0.4. Updating a metric is one atomic operation on a
//! handle (`Arc<Counter>` and friends) that the caller creates once; only creating a label set
//! and rendering take a lock.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use portable_atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A monotonically increasing integer: the same atomic the proxy counts with.
pub use crate::proxy::stats::Counter;

/// A value that goes up and down (an `f64` kept as bits in an atomic).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// A count as a gauge value: exact below 2^53, which any count of things in memory is.
    #[allow(clippy::cast_precision_loss)]
    pub fn count(n: usize) -> f64 {
        n as f64
    }

    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn add(&self, d: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((f64::from_bits(b) + d).to_bits()));
    }
    pub fn inc(&self) {
        self.add(1.0);
    }
    pub fn dec(&self) {
        self.add(-1.0);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into fixed buckets (upper bounds, ascending), plus sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[f64]>,
    /// Per bucket (not cumulative); the last slot is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum: Gauge,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: Gauge::default(),
            count: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.add(v);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    pub fn sum(&self) -> f64 {
        self.sum.get()
    }
}

// ----------------------------------------------------------------------------------------------
// Registry
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
enum Value {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

/// One label set (values in `label_names` order) and its value.
type Series = (Box<[Box<str>]>, Value);

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    label_names: &'static [&'static str],
    bounds: &'static [f64],
    /// Label values (in `label_names` order) -> value, in creation order.
    series: Mutex<Vec<Series>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the data consistent (every update is one push or
    // one remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Family {
    fn get_or_create(&self, values: &[&str]) -> Value {
        assert_eq!(values.len(), self.label_names.len(), "{}: wrong number of label values", self.name);
        let mut series = lock(&self.series);
        if let Some((_, v)) = series.iter().find(|(k, _)| k.iter().map(|s| &**s).eq(values.iter().copied())) {
            return v.clone();
        }
        let v = match self.kind {
            Kind::Counter => Value::Counter(Arc::default()),
            Kind::Gauge => Value::Gauge(Arc::default()),
            Kind::Histogram => Value::Histogram(Arc::new(Histogram::new(self.bounds))),
        };
        series.push((values.iter().map(|s| Box::from(*s)).collect(), v.clone()));
        v
    }
}

/// A set of metric families, rendered together. Families are registered at start-up by code
/// (names and help text are constants); label *values* may come from the cluster and are
/// escaped when rendered.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<Family>>>,
}

/// A counter family; [`CounterVec::with`] gives the handle for one label set.
#[derive(Debug, Clone)]
pub struct CounterVec(Arc<Family>);

/// A gauge family.
#[derive(Debug, Clone)]
pub struct GaugeVec(Arc<Family>);

/// A histogram family.
#[derive(Debug, Clone)]
pub struct HistogramVec(Arc<Family>);

impl CounterVec {
    /// The counter for these label values (created at 0 the first time).
    pub fn with(&self, values: &[&str]) -> Arc<Counter> {
        match self.0.get_or_create(values) {
            Value::Counter(c) => c,
            _ => unreachable!("a counter family holds counters"),
        }
    }
}

impl GaugeVec {
    pub fn with(&self, values: &[&str]) -> Arc<Gauge> {
        match self.0.get_or_create(values) {
            Value::Gauge(g) => g,
            _ => unreachable!("a gauge family holds gauges"),
        }
    }
}

impl HistogramVec {
    pub fn with(&self, values: &[&str]) -> Arc<Histogram> {
        match self.0.get_or_create(values) {
            Value::Histogram(h) => h,
            _ => unreachable!("a histogram family holds histograms"),
        }
    }
}

fn valid_name(s: &str, colon_ok: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon_ok && c == ':');
    matches!(chars.next(), Some(c) if first_ok(c)) && chars.all(|c| first_ok(c) || c.is_ascii_digit())
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn register(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        label_names: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Arc<Family> {
        // Names are constants in our code, so a bad one is a programming error, not input.
        assert!(valid_name(name, true), "invalid metric name {name:?}");
        for l in label_names {
            assert!(valid_name(l, false) && !l.starts_with("__"), "invalid label name {l:?} in {name}");
            assert!(!(kind == Kind::Histogram && *l == "le"), "{name}: `le` is reserved for histograms");
        }
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{name}: bucket bounds must ascend");
        let mut families = lock(&self.families);
        assert!(families.iter().all(|f| f.name != name), "metric {name} registered twice");
        let f = Arc::new(Family { name, help, kind, label_names, bounds, series: Mutex::new(Vec::new()) });
        families.push(f.clone());
        f
    }

    pub fn counter_vec(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) -> CounterVec {
        CounterVec(self.register(name, help, Kind::Counter, labels, &[]))
    }
    pub fn gauge_vec(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) -> GaugeVec {
        GaugeVec(self.register(name, help, Kind::Gauge, labels, &[]))
    }
    pub fn histogram_vec(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> HistogramVec {
        HistogramVec(self.register(name, help, Kind::Histogram, labels, bounds))
    }
    /// A counter without labels.
    pub fn counter(&self, name: &'static str, help: &'static str) -> Arc<Counter> {
        self.counter_vec(name, help, &[]).with(&[])
    }
    /// A gauge without labels.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Arc<Gauge> {
        self.gauge_vec(name, help, &[]).with(&[])
    }
    /// A histogram without labels.
    pub fn histogram(&self, name: &'static str, help: &'static str, bounds: &'static [f64]) -> Arc<Histogram> {
        self.histogram_vec(name, help, &[], bounds).with(&[])
    }

    /// Everything, in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let families: Vec<Arc<Family>> = lock(&self.families).clone();
        let mut out = String::with_capacity(4096);
        for f in families {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            let series = lock(&f.series).clone();
            for (values, v) in series {
                let labels = label_text(f.label_names, &values, None);
                match v {
                    Value::Counter(c) => {
                        let _ = writeln!(out, "{}{labels} {}", f.name, c.get());
                    }
                    Value::Gauge(g) => {
                        let _ = writeln!(out, "{}{labels} {}", f.name, fmt_f64(g.get()));
                    }
                    Value::Histogram(h) => render_histogram(&mut out, &f, &values, &h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, f: &Family, values: &[Box<str>], h: &Histogram) {
    // Read the buckets first and derive the count from them, so `_count` always equals the
    // `+Inf` bucket even while other threads observe.
    let mut cumulative = 0u64;
    for (i, b) in h.buckets.iter().enumerate() {
        cumulative += b.load(Ordering::Relaxed);
        let le = h.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| fmt_f64(*b));
        let labels = label_text(f.label_names, values, Some(&le));
        let _ = writeln!(out, "{}_bucket{labels} {cumulative}", f.name);
    }
    let labels = label_text(f.label_names, values, None);
    let _ = writeln!(out, "{}_sum{labels} {}", f.name, fmt_f64(h.sum()));
    let _ = writeln!(out, "{}_count{labels} {cumulative}", f.name);
}

fn label_text(names: &[&str], values: &[Box<str>], le: Option<&str>) -> String {
    if names.is_empty() && le.is_none() {
        return String::new();
    }
    let mut s = String::from("{");
    let mut first = true;
    let pairs = names.iter().copied().zip(values.iter().map(|v| &**v)).chain(le.map(|le| ("le", le)));
    for (n, v) in pairs {
        if !first {
            s.push(',');
        }
        first = false;
        let _ = write!(s, "{n}=\"{}\"", escape_label(v));
    }
    s.push('}');
    s
}

/// Label values: backslash, double quote and line feed are escaped (format 0.0.4).
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text: backslash and line feed are escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

pub(super) fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust's shortest round-trip form: "1", "0.25", "1e-7", all valid Go ParseFloat input.
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_and_gauge_render_with_help_type_and_labels() {
        let r = Registry::new();
        let c = r.counter_vec("t_requests_total", "Requests.", &["path"]);
        c.with(&["/a"]).add(3);
        c.with(&["/a"]).inc();
        let g = r.gauge("t_temp", "Temperature\\ with \nnewline.");
        g.set(-1.5);
        assert_eq!(
            r.render(),
            "# HELP t_requests_total Requests.\n# TYPE t_requests_total counter\nt_requests_total{path=\"/a\"} 4\n\
             # HELP t_temp Temperature\\\\ with \\nnewline.\n# TYPE t_temp gauge\nt_temp -1.5\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let r = Registry::new();
        r.counter_vec("t_total", "x", &["service"]).with(&["ns/we\"ird\n"]).inc();
        assert!(r.render().contains("t_total{service=\"ns/we\\\"ird\\n\"} 1\n"), "{}", r.render());
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_inf() {
        let r = Registry::new();
        let h = r.histogram("t_seconds", "x", &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let text = r.render();
        for line in [
            "t_seconds_bucket{le=\"0.1\"} 1",
            "t_seconds_bucket{le=\"1\"} 2",
            "t_seconds_bucket{le=\"+Inf\"} 3",
            "t_seconds_sum 5.55",
            "t_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn same_labels_same_handle() {
        let r = Registry::new();
        let v = r.counter_vec("t_total", "x", &["resource"]);
        let a = v.with(&["services"]);
        let b = v.with(&["services"]);
        a.inc();
        b.inc();
        assert_eq!(a.get(), 2);
        assert!(r.render().contains("t_total{resource=\"services\"} 2"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_family_is_a_programming_error() {
        let r = Registry::new();
        r.counter("t_total", "x");
        r.counter("t_total", "x");
    }

    #[test]
    fn floats_render_for_prometheus() {
        assert_eq!(fmt_f64(1.0), "1");
        assert_eq!(fmt_f64(0.005), "0.005");
        assert_eq!(fmt_f64(f64::INFINITY), "+Inf");
        assert_eq!(fmt_f64(f64::NAN), "NaN");
        assert_eq!(fmt_f64(1_763_740_800.25), "1763740800.25");
    }
}
