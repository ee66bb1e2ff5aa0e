//! The I/O shell around the pure core: the reconcile loop and its state, the balancer client, the
//! hub host, machine registration, the monitor tick, live predictions and metrics.

pub mod balancer;
pub mod clock;
pub mod controller;
pub mod hub;
pub mod leader;
pub mod machines;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod predictions;
