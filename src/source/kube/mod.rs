pub mod client;
pub mod error;
pub mod kubeconfig;
pub mod names;
pub mod objects;
pub mod reflector;
pub mod secret;
pub mod settings;
