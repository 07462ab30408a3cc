//! The source wing: where Services and endpoints come from, and what every source hands to the
//! agent loop.
//!
//! Sources run on their own threads and never touch the state directly: they send
//! [`SourceEvent`]s through a [`Sink`], and the agent loop applies them to `state::State`. This
//! file holds that interface and the source settings ([`SourceConfig`], [`SourceKind`],
//! [`EndpointsApi`]); the sources are its children:
//! - `kube`: the Kubernetes API server or KubeEdge's MetaServer: connection settings, the HTTP
//!   client, decoding objects and watch lines, the list/watch reflectors (a pure machine and the
//!   threads that drive it);
//! - `file`: a static JSON file, polled, for gateways without an API server (it decodes with
//!   `source::kube::objects`, so a file is held to the API server's rules).
//!
//! The children import this file, never the other way round.

pub mod cache;
pub mod file;
pub mod kube;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::model::Kind;
use crate::state::Change;

/// One message from a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Something to apply to the state.
    Change(Change),
    /// The first complete list of this kind has been delivered (readiness).
    Synced(Kind),
    /// A watch ended (timeout, disconnect, idle) and was resumed from the last resourceVersion.
    WatchRestarted(Kind),
    /// A full relist happened (410 Gone, expired watch, or a poll).
    Relisted(Kind),
    /// A failure the source is recovering from by itself (backoff, retry); for logs and metrics.
    Error { kind: Option<Kind>, message: String },
    /// An API request came back (`code`; `None`: no response) after `duration`: for metrics.
    Request { verb: &'static str, code: Option<u16>, duration: std::time::Duration },
}

/// Where a source sends its events. Callable from any thread.
pub type Sink = Arc<dyn Fn(SourceEvent) + Send + Sync>;

/// Where Services and endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// Explicit server / kubeconfig / in-cluster / MetaServer, first that applies.
    Kube,
    MetaServer,
    File(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointsApi {
    Auto,
    EndpointSlices,
    Endpoints,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub kubeconfig: Option<PathBuf>,
    pub server: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub meta_server: String,
    pub watch: bool,
    pub poll_interval: Duration,
    pub endpoints_api: EndpointsApi,
}
