//! Understudy's controller, as layers whose imports point one way (down this list):
//!
//! - [`config`]: the cluster file read into typed, validated settings;
//! - [`core`]: pure decisions, no I/O: the rollout state machine, release plans, the reconcile step,
//!   pairing, desired balancer configs, the monitor's desired-vs-actual comparison;
//! - [`store`]: SQLite: rollouts, transitions, pairs, machines, selections, monitor actions;
//! - [`runtime`]: the I/O shell: the reconcile loop, the balancer client, the hub host, machine
//!   registration, the monitor tick, live predictions, metrics;
//! - [`api`]: the admin router, its errors, its auth layer, and a typed client for it;
//! - [`app`]: the composition root that wires a running controller;
//! - [`scenario`]: whole clusters played on loopback;
//! - [`offline`]: `judge`, `judge-bench`, `predict` on recorded files;
//! - [`cli`]: the commands, their tables and exit codes.
//!
//! [`http_json`], [`table`] and [`telemetry`] are leaves any layer may use. See ARCHITECTURE.md.

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod core;
pub mod offline;
pub mod runtime;
pub mod scenario;
pub mod store;

pub mod http_json;
pub mod table;
pub mod telemetry;

#[cfg(test)]
pub(crate) mod testing;
