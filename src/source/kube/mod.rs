//! The Kubernetes API source: everything that speaks the API server's language, from finding
//! the server to turning its JSON into `model` types and its list/watch into [`SourceEvent`]s.
//!
//! From the bottom up:
//! - `names`: Kubernetes' own validation of names and addresses (pure);
//! - `raw`, `objects`, `watch`: decoding documents, list items and watch lines into `model`
//!   (pure; also what the file source and `edgeproxy rules --from` decode with);
//! - `secret`, `kubeconfig`, `settings`: where to connect and how to authenticate (kubeconfig,
//!   in-cluster, MetaServer, explicit flags), with secrets kept out of logs;
//! - `error`, `client`: the ureq + rustls HTTP client and how it fails;
//! - `lines`, `reflector`: splitting a watch stream into lines, and the list/watch state machine
//!   (pure: no I/O, no clock);
//! - `driver`: the threads that run the machines with the client, and the one-shot list.
//!
//! [`SourceEvent`]: crate::source::SourceEvent

pub mod client;
pub mod driver;
pub mod error;
pub mod kubeconfig;
pub mod lines;
pub mod names;
pub mod objects;
mod raw;
pub mod reflector;
pub mod secret;
pub mod settings;
pub mod watch;
