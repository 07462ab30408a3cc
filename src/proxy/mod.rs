//! The data path: a single-threaded (tokio `current_thread`) TCP and UDP proxy.

pub mod table;
