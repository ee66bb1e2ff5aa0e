//! The cluster file read into typed settings. Every table of the file has its type here, so the
//! features that use a table import it from below instead of the cluster model importing them.

pub mod balancer;
pub mod cluster;
pub mod hub;
pub mod monitor;
pub mod notify;
pub mod operators;
pub mod predict;
pub mod source;
pub mod store;
pub mod toml_spans;
