//! Helpers shared by the integration tests. Each test file includes this with `mod support;`.
#![allow(dead_code)]
pub mod agent;
pub mod apiserver;
pub mod cluster;
pub mod fixtures;
pub mod netns;
pub mod notify_listener;
pub mod readme;
pub mod tempdir;
