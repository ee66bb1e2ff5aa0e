//! Pure decisions: no tokio, SQLite, axum or hyper. The runtime gathers a snapshot, asks these
//! modules what to do, and performs it.

pub mod pairing;
pub mod plan;
pub mod rollout;
pub mod step;
pub mod monitor;
pub mod roles;
