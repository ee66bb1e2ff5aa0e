//! Predictive monitoring (issue 7): observe the update messages components exchange, work out each
//! object's state from them, learn per service and version how objects move between states (with
//! time decay), and predict from an object's current state the probability that it ends in a failure
//! ("artifact": error state failure, time threshold failure), so that an operator or the controller
//! acts before the failure happens.
//!
//! - [`config`]: message-to-state rules, artifacts, successes, alerting, dwell limits (TOML).
//! - [`chain`]: the absorbing Markov chain solved from a [`TransitionTable`].
//! - [`model`]: one service version's decayed transition counts and dwell times.
//! - [`predictor`]: the online part: tracks objects, records transitions, raises [`Alert`]s.
//! - [`mod@compare`]: the chain's picture of v2 against v1 from the start state (shown, and an
//!   early warning).
//! - [`signal`]: the rule `prediction`: an anytime-valid test of v2's failure probability from the
//!   start state against v1's, on ended objects paired as they start.
//! - [`bench`]: the rule on seeded calls, for `understudy judge-bench`.
//!
//! The crate is pure: no clocks (callers pass [`Timestamp`]s), no I/O.

pub mod bench;
pub mod chain;
pub mod compare;
pub mod config;
pub mod decay;
pub mod dwell;
pub mod model;
pub mod predictor;
pub mod signal;

pub use chain::{solve, Absorbing, Outlook, StateOutlook, StateRole, TransitionTable};
pub use compare::{compare, Comparison};
pub use config::{
    ConfigError, PredictConfig, Settings, ERROR_STATE_FAILURE, TIME_THRESHOLD_FAILURE,
};
pub use decay::{DecayedCount, HalfLife, Timestamp};
pub use dwell::{DwellStats, DwellSummary};
pub use model::{Model, ModelKey};
pub use predictor::{Alert, AlertCause, Observed, Predictor, Update};
pub use signal::{PairedFailureTest, Side, SignalReport};
