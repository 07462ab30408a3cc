//! edgeproxy: Kubernetes ClusterIP Services for edge machines, EdgeMesh-compatible.
//!
//! Data flows one way:
//!
//! ```text
//! source (kube, file)  ->  state (pure)  ->  rules::worker (iptables-restore)
//!        watch threads        |          ->  proxy (tokio current_thread loop)
//!                             +-- filter (pure), rules::render (pure)
//! ```
//!
//! `model` holds the validated cluster types, `source::kube::objects` decodes the API server's JSON
//! into them. `filter`, `state` and `rules::render` never do I/O and never read the clock; see
//! ARCHITECTURE.md for the map and the invariants.

#![deny(unsafe_code)]

pub mod address;
pub mod agent;
pub mod capped;
pub mod cli;
pub mod config;
pub mod exec;
pub mod filter;
pub mod intern;
pub mod listen;
pub mod logging;
pub mod model;
pub mod netlink;
pub mod notify;
pub mod ops;
pub mod proxy;
pub mod rand;
pub mod ratelog;
pub mod rules;
pub mod rundir;
pub mod source;
pub mod state;
pub mod stop;
// Every `unsafe` of the crate lives here (the house test checks it).
#[allow(unsafe_code)]
pub mod sys;
