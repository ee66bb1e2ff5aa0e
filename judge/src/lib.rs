//! The judge: decides from mirrored job pairs whether v2 may join (the joining condition).
//!
//! PUBLIC API SKELETON fixed by the lead so the controller can build against it; the judge
//! helper fills in the bodies and may ADD items, but keeps these names and signatures.

use serde::{Deserialize, Serialize};

/// One mirrored job: the active (v1) answer and the simulation (v2 or A/A control) answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairSample {
    pub v1_latency_us: u64,
    pub v1_ok: bool,
    pub v2_latency_us: u64,
    pub v2_ok: bool,
    /// Whether the answers matched; `None` when not compared.
    pub matched: Option<bool>,
}

/// The joining condition, in the TOML form used in cluster and scenario files
/// (`[services.NAME.condition]` or a file given to `understudy judge --condition`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    // fields defined by the judge helper; every field has a serde default
}

impl Default for Condition {
    fn default() -> Self {
        todo!()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConditionError {
    #[error("condition field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl Condition {
    /// Checks ranges and coherence; the error names the field.
    pub fn validate(&self) -> Result<(), ConditionError> {
        todo!()
    }
}

/// What the judge concludes at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// v2 meets the condition: it may join.
    Pass,
    /// v2 is worse than allowed: roll back.
    Fail,
    /// Not enough evidence yet either way; never a failure.
    NotEnoughData,
}

/// A decision with the numbers behind it (serialized into the API, metrics and reports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub decision: Decision,
    /// A failure so clear that the rollout rolls back at once.
    pub hard: bool,
    /// The rule that decided, in words.
    pub rule: String,
    /// Pairs seen when this verdict was reached.
    pub jobs: u64,
    /// Numbers behind the verdict (estimates, intervals, counts), free-form but stable keys.
    pub details: serde_json::Value,
}

/// Sequential judge fed pairs in arrival order.
#[derive(Debug, Clone)]
pub struct Judge {}

impl Judge {
    pub fn new(condition: Condition) -> Self {
        let _ = condition;
        todo!()
    }

    /// Feeds one v1-active / v2-simulation pair.
    pub fn observe(&mut self, pair: &PairSample) {
        let _ = pair;
        todo!()
    }

    /// Feeds one v1-active / v1-simulation pair (A/A control, the noise baseline).
    pub fn observe_control(&mut self, pair: &PairSample) {
        let _ = pair;
        todo!()
    }

    /// The current verdict; once Pass or Fail is reached it stays (the decision is final).
    pub fn verdict(&self) -> Verdict {
        todo!()
    }
}
