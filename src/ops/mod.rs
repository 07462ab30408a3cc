//! Operations: health, readiness and Prometheus metrics, served over a tiny HTTP/1.1 endpoint.
//!
//! - `registry`: counters, gauges and histograms with label sets, the text format.
//! - `metrics`: the edgeproxy metric set ([`Metrics`]) and the proxy's counters at scrape time.
//! - `state`: [`Ops`], what the endpoint serves, and the readiness flags ([`Health`]).
//! - `http`: the server ([`Server`]): `/healthz`, `/readyz`, `/metrics`.
//!
//! Updating a metric is one atomic operation on a handle (`Arc<Counter>` and friends) that the
//! caller creates once, e.g. per service when the proxy table is swapped; only creating or
//! removing a label set and rendering take a lock. This module never decides what the numbers
//! mean: the agent, the rules applier and the proxy update them; it never touches the network
//! beyond its own listener.

pub mod http;
pub mod metrics;
pub mod process;
pub mod proxy_metrics;
pub mod registry;
pub mod state;

pub use http::{parse_head, Request, Server, IO_TIMEOUT, MAX_CONNECTIONS, MAX_REQUEST};
pub use metrics::{Metrics, PlanCounts, SYNC_BUCKETS};
pub use proxy_metrics::render_proxy;
pub use registry::{escape_label, Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramVec, Registry};
pub use state::{Health, Ops};
