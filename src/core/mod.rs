//! Pure decisions: no tokio, SQLite, axum or hyper. The runtime gathers a snapshot, asks these
//! modules what to do, and performs it.

pub mod consequences;
pub mod evidence;
pub mod fields;
pub mod lease;
pub mod mirror;
pub mod monitor;
pub mod pairing;
pub mod plan;
pub mod roles;
pub mod rollout;
pub mod step;
pub mod verdict;
