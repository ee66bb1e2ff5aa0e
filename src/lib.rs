//! Understudy's controller: cluster model, release plans, rollouts, admin endpoint, scenario runner.
//! See ARCHITECTURE.md for how the parts fit.

pub mod cli;
pub mod judge_cli;
pub mod predict_cli;
pub mod scenario;
pub mod telemetry;
