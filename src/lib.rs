//! Understudy's controller: cluster model, release plans, rollouts, admin endpoint, scenario runner.
//! See ARCHITECTURE.md for how the parts fit.

pub mod admin;
pub mod balancer;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod controller;
pub mod extract;
pub mod http_json;
pub mod hub_wiring;
pub mod judge_cli;
pub mod judge_record;
pub mod machines;
pub mod metrics;
pub mod openapi;
pub mod pairing;
pub mod plan;
pub mod predict_cli;
pub mod prediction;
pub mod rollout;
pub mod scenario;
pub mod step;
pub mod store;
pub mod table;
pub mod telemetry;
pub mod toml_spans;
