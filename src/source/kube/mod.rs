//! Everything that speaks the Kubernetes API: decoding objects, and (with the source issue) the
//! HTTP client, kubeconfig handling and the list/watch reflector.

pub mod client;
pub mod kubeconfig;
pub mod names;
pub mod objects;
pub mod reflector;
