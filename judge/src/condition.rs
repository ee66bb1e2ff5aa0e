//! The joining condition: its TOML form, defaults and validation.

use serde::{Deserialize, Serialize};

/// One latency quantile and how much slower than v1's v2's may be there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyLimit {
    /// The quantile, in (0, 1): 0.5 is the median, 0.999 is p99.9.
    pub quantile: f64,
    /// Largest allowed ratio of v2's quantile to v1's (1.10 = at most 10% slower).
    pub max_ratio: f64,
}

impl LatencyLimit {
    /// The quantile's usual short name: `p50`, `p99`, `p99.9`.
    pub fn name(&self) -> String {
        let percent = self.quantile * 100.0;
        let rounded = (percent * 1000.0).round() / 1000.0;
        format!("p{rounded}")
    }

    /// Pairs needed before this quantile is judged: enough for `min_tail_exceedances` jobs beyond it.
    pub fn floor_jobs(&self, min_tail_exceedances: u64) -> u64 {
        (min_tail_exceedances as f64 / (1.0 - self.quantile)).ceil() as u64
    }
}

fn default_latency() -> Vec<LatencyLimit> {
    vec![
        LatencyLimit {
            quantile: 0.5,
            max_ratio: 1.10,
        },
        LatencyLimit {
            quantile: 0.99,
            max_ratio: 1.10,
        },
        LatencyLimit {
            quantile: 0.999,
            max_ratio: 1.5,
        },
    ]
}

/// The joining condition, in the TOML form used in cluster and scenario files
/// (`[services.NAME.condition]` or a file given to `understudy judge --condition`).
///
/// Every field has a default (see `Condition::default`), so an empty table is the default condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Condition {
    /// Pairs ignored at the start while v2 warms up (caches, JIT, connection pools); they still
    /// feed the latency thresholds but never the tests.
    pub warmup_jobs: u64,
    /// Pairs (after warm-up) before any decision; fewer is "not enough data", never "fail".
    pub min_jobs: u64,
    /// Latency quantiles judged, each with its largest allowed v2/v1 ratio.
    pub latency: Vec<LatencyLimit>,
    /// Largest allowed median of the per-job ratio v2/v1 (the paired shift, tested with a
    /// sequential sign test): on the same job, v2 may typically be at most this much slower.
    pub max_paired_ratio: f64,
    /// A quantile q is judged only after `min_tail_exceedances / (1 - q)` pairs: p99.9 with the
    /// default 5 needs 5000 pairs, so a tail verdict is never claimed from 200 jobs.
    pub min_tail_exceedances: u64,
    /// Largest allowed increase of v2's error rate over v1's on the same jobs (0.005 = half a point).
    pub max_error_rate_increase: f64,
    /// An error-rate increase this large is a hard failure: roll back at once.
    pub hard_error_rate_increase: f64,
    /// Largest allowed rate of answers that differ from v1's (over the control's when a control
    /// is required).
    pub max_mismatch_rate: f64,
    /// Pairs per window: a pass is checked at the end of each window.
    pub window_jobs: u64,
    /// Consecutive window ends at which every test must show v2 within limits before it passes.
    pub consecutive_passes: u32,
    /// Chance of rolling back a v2 that meets the condition (alpha), over the whole rollout,
    /// however often the verdict is looked at.
    pub false_fail_rate: f64,
    /// Chance of passing a v2 that breaks the condition on some metric (beta).
    pub false_pass_rate: f64,
    /// Require an A/A control (v1 in simulation) and judge v2's differences against the control's.
    pub require_control: bool,
    /// What each v2 answer is paired with, job by job (the live controller forms the pairs).
    pub baseline: Baseline,
}

/// The v1 answer a v2 answer is paired with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The control: the v1 machine in the simulation configuration that got a copy of the same job
    /// at the same moment through the same mirror path as v2. Whatever the path adds (mirror
    /// queueing, its runtime, a busy neighbour during a burst) hits both halves alike and cancels.
    /// Falls back to `active` for a service without a control machine.
    #[default]
    Control,
    /// The active v1 machine that served the caller.
    Active,
}

impl Baseline {
    pub fn as_str(self) -> &'static str {
        match self {
            Baseline::Control => "control",
            Baseline::Active => "active",
        }
    }
}

impl Default for Condition {
    fn default() -> Self {
        Condition {
            warmup_jobs: 300,
            min_jobs: 200,
            latency: default_latency(),
            max_paired_ratio: 1.10,
            min_tail_exceedances: 2,
            max_error_rate_increase: 0.005,
            hard_error_rate_increase: 0.05,
            max_mismatch_rate: 0.005,
            window_jobs: 100,
            consecutive_passes: 2,
            false_fail_rate: 0.01,
            false_pass_rate: 0.05,
            require_control: false,
            baseline: Baseline::Control,
        }
    }
}

/// Which tests share the condition's false-fail rate beside the judge's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sharing {
    /// The rule `prediction` may roll back (the `[predict]` section's `rollback`): its test takes
    /// a share of the budget.
    pub prediction: bool,
    /// Every test the same share instead of the weighted split (an ablation).
    pub equal_split: bool,
}

/// How the condition's false-fail rate (alpha) is shared among the tests that can roll back a v2
/// that meets the condition. Any test crossing rolls back, so the shares add up to at most alpha
/// (a weighted Bonferroni split); weights favour the tests whose statistic is rarest (errors,
/// answers), which need the most jobs per unit of evidence. The hard-error test shares the error
/// test's share: it can only fail when the error test fails too.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailBudget {
    pub errors: f64,
    pub mismatches: f64,
    pub paired_shift: f64,
    /// One share per latency quantile, in the condition's order.
    pub latency: Vec<f64>,
    /// The prediction rule's share; 0 when it cannot roll back.
    pub prediction: f64,
}

/// Relative weights of the shares (see [`FailBudget`]).
const ERRORS_WEIGHT: f64 = 0.35;
const MISMATCHES_WEIGHT: f64 = 0.15;
const PAIRED_SHIFT_WEIGHT: f64 = 0.05;
const LATENCY_WEIGHT: f64 = 0.35;
const PREDICTION_WEIGHT: f64 = 0.10;

impl FailBudget {
    /// The sum of the shares: never more than the condition's false-fail rate.
    pub fn total(&self) -> f64 {
        self.errors
            + self.mismatches
            + self.paired_shift
            + self.latency.iter().sum::<f64>()
            + self.prediction
    }

    /// The smallest share among the judge's own tests.
    pub fn smallest_share(&self) -> f64 {
        self.latency
            .iter()
            .copied()
            .chain([self.errors, self.mismatches, self.paired_shift])
            .fold(f64::INFINITY, f64::min)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConditionError {
    #[error("condition field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("condition: {0}")]
    Parse(String),
}

/// Reads TOML text (a condition, or a file that holds one): a value that does not fit is named by
/// its path (`field `latency[1].quantile``) and its line and column.
pub fn read_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConditionError> {
    understudy_tomlread::read(text).map_err(|e| ConditionError::Parse(e.to_string()))
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConditionError {
    ConditionError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Condition {
    /// Parses a condition table from TOML text (the table's fields at top level) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Condition, ConditionError> {
        let condition: Condition = read_toml(text)?;
        condition.validate()?;
        Ok(condition)
    }

    /// The false-fail rate shared among the tests that can roll back (see [`FailBudget`]).
    pub fn fail_budget(&self, sharing: Sharing) -> FailBudget {
        if sharing.equal_split {
            return self.equal_fail_budget(sharing);
        }
        let prediction_weight = if sharing.prediction {
            PREDICTION_WEIGHT
        } else {
            0.0
        };
        let total_weight = ERRORS_WEIGHT
            + MISMATCHES_WEIGHT
            + PAIRED_SHIFT_WEIGHT
            + LATENCY_WEIGHT
            + prediction_weight;
        let share = |weight: f64| self.false_fail_rate * weight / total_weight;
        // Within latency, a quantile's share grows with how rare its tail is (-ln(1 - q): p50
        // 0.7, p99 4.6, p99.9 6.9): a tail test sees one informative pair in 1/(1 - q).
        let rarity = |limit: &LatencyLimit| -(1.0 - limit.quantile).ln();
        let total_rarity: f64 = self.latency.iter().map(rarity).sum();
        FailBudget {
            errors: share(ERRORS_WEIGHT),
            mismatches: share(MISMATCHES_WEIGHT),
            paired_shift: share(PAIRED_SHIFT_WEIGHT),
            latency: self
                .latency
                .iter()
                .map(|limit| share(LATENCY_WEIGHT) * rarity(limit) / total_rarity)
                .collect(),
            prediction: share(prediction_weight),
        }
    }

    /// Every test the same share (plain Bonferroni; the ablation in `judge-bench`).
    fn equal_fail_budget(&self, sharing: Sharing) -> FailBudget {
        let tests = 3 + self.latency.len() + usize::from(sharing.prediction);
        let share = self.false_fail_rate / tests as f64;
        FailBudget {
            errors: share,
            mismatches: share,
            paired_shift: share,
            latency: vec![share; self.latency.len()],
            prediction: if sharing.prediction { share } else { 0.0 },
        }
    }

    /// Checks ranges and coherence; the error names the field.
    pub fn validate(&self) -> Result<(), ConditionError> {
        // The checks run in this order so the first bad field is the one named.
        self.validate_latency()?;
        self.validate_sample_sizes()?;
        self.validate_error_margins()?;
        if self.require_control && self.baseline == Baseline::Control {
            // v2 would be differenced against the control twice.
            return Err(invalid(
                "require_control",
                "differences v2-vs-active against control-vs-active; with baseline = \"control\" v2 is \
                 already judged against the control job by job: set baseline = \"active\" to use it",
            ));
        }
        if !rate_in_range(self.max_mismatch_rate) {
            return Err(invalid(
                "max_mismatch_rate",
                format!("{} is not in [0, 1)", self.max_mismatch_rate),
            ));
        }
        self.validate_windows()?;
        self.validate_error_probabilities()
    }

    /// The quantiles (at least one, each in (0, 1) with a ratio >= 1, none twice) and the
    /// paired ratio.
    fn validate_latency(&self) -> Result<(), ConditionError> {
        if self.latency.is_empty() {
            // Without any quantile the judge would pass a v2 whose latency is arbitrarily bad.
            return Err(invalid("latency", "at least one quantile must be judged"));
        }
        for (index, limit) in self.latency.iter().enumerate() {
            validate_limit(index, limit, &self.latency[..index])?;
        }
        if !(self.max_paired_ratio.is_finite() && self.max_paired_ratio >= 1.0) {
            return Err(invalid(
                "max_paired_ratio",
                format!("{} must be a finite ratio >= 1", self.max_paired_ratio),
            ));
        }
        Ok(())
    }

    fn validate_sample_sizes(&self) -> Result<(), ConditionError> {
        if self.min_jobs == 0 {
            return Err(invalid("min_jobs", "must be at least 1"));
        }
        if self.min_tail_exceedances == 0 {
            return Err(invalid("min_tail_exceedances", "must be at least 1"));
        }
        Ok(())
    }

    /// The error-rate margin, and the hard margin strictly above it.
    fn validate_error_margins(&self) -> Result<(), ConditionError> {
        if !rate_in_range(self.max_error_rate_increase) {
            return Err(invalid(
                "max_error_rate_increase",
                format!("{} is not in [0, 1)", self.max_error_rate_increase),
            ));
        }
        if !(self.hard_error_rate_increase.is_finite()
            && self.hard_error_rate_increase > self.max_error_rate_increase
            && self.hard_error_rate_increase < 1.0)
        {
            return Err(invalid(
                "hard_error_rate_increase",
                format!(
                    "{} must be above max_error_rate_increase ({}) and below 1",
                    self.hard_error_rate_increase, self.max_error_rate_increase
                ),
            ));
        }
        Ok(())
    }

    fn validate_windows(&self) -> Result<(), ConditionError> {
        if self.window_jobs == 0 {
            return Err(invalid("window_jobs", "must be at least 1"));
        }
        if self.consecutive_passes == 0 {
            return Err(invalid("consecutive_passes", "must be at least 1"));
        }
        Ok(())
    }

    /// The false-fail and false-pass rates (alpha and beta).
    fn validate_error_probabilities(&self) -> Result<(), ConditionError> {
        let probability_ok = |value: f64| value.is_finite() && value > 0.0 && value <= 0.5;
        if !probability_ok(self.false_fail_rate) {
            return Err(invalid(
                "false_fail_rate",
                format!("{} is not in (0, 0.5]", self.false_fail_rate),
            ));
        }
        if !probability_ok(self.false_pass_rate) {
            return Err(invalid(
                "false_pass_rate",
                format!("{} is not in (0, 0.5]", self.false_pass_rate),
            ));
        }
        Ok(())
    }
}

/// A rate margin: finite and in [0, 1).
fn rate_in_range(value: f64) -> bool {
    value.is_finite() && (0.0..1.0).contains(&value)
}

/// One latency limit, `earlier` being the limits listed before it.
fn validate_limit(
    index: usize,
    limit: &LatencyLimit,
    earlier: &[LatencyLimit],
) -> Result<(), ConditionError> {
    if !(limit.quantile > 0.0 && limit.quantile < 1.0) {
        return Err(invalid(
            "latency.quantile",
            format!(
                "latency[{index}]: {} is not strictly between 0 and 1",
                limit.quantile
            ),
        ));
    }
    if !(limit.max_ratio.is_finite() && limit.max_ratio >= 1.0) {
        return Err(invalid(
            "latency.max_ratio",
            format!(
                "latency[{index}] ({}): {} must be a finite ratio >= 1",
                limit.name(),
                limit.max_ratio
            ),
        ));
    }
    if earlier.iter().any(|other| other.quantile == limit.quantile) {
        return Err(invalid(
            "latency.quantile",
            format!(
                "latency[{index}]: quantile {} is listed twice",
                limit.quantile
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "condition_tests.rs"]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_empty_table_is_default() {
        Condition::default().validate().unwrap();
        assert_eq!(Condition::from_toml_str("").unwrap(), Condition::default());
    }

    #[test]
    fn toml_form_round_trips() {
        let text = r#"
            warmup_jobs = 100
            min_jobs = 500
            latency = [ { quantile = 0.5, max_ratio = 1.05 }, { quantile = 0.999, max_ratio = 2.0 } ]
            max_error_rate_increase = 0.01
            require_control = true
            baseline = "active"
        "#;
        let condition = Condition::from_toml_str(text).unwrap();
        assert_eq!(condition.min_jobs, 500);
        assert_eq!(condition.latency.len(), 2);
        assert_eq!(condition.latency[1].name(), "p99.9");
        assert!(condition.require_control);
        assert_eq!(condition.false_fail_rate, 0.01);
    }

    #[test]
    fn a_required_control_needs_the_active_baseline() {
        let err = Condition::from_toml_str("require_control = true").unwrap_err();
        assert!(err.to_string().contains("`require_control`"), "{err}");
        let both = Condition::from_toml_str("require_control = true\nbaseline = \"active\"");
        assert_eq!(both.unwrap().baseline, Baseline::Active);
        let err = Condition::from_toml_str("baseline = \"standby\"").unwrap_err();
        assert!(err.to_string().contains("standby"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let err = Condition::from_toml_str("min_job = 3").unwrap_err();
        assert!(err.to_string().contains("min_job"), "{err}");
    }

    #[test]
    fn validation_errors_name_the_field() {
        type Spoil = Box<dyn Fn(&mut Condition)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("min_jobs", Box::new(|c| c.min_jobs = 0)),
            (
                "max_paired_ratio",
                Box::new(|c| c.max_paired_ratio = f64::NAN),
            ),
            ("latency", Box::new(|c| c.latency.clear())),
            (
                "latency.quantile",
                Box::new(|c| c.latency[0].quantile = 1.0),
            ),
            (
                "latency.quantile",
                Box::new(|c| c.latency[1].quantile = 0.5),
            ),
            (
                "latency.max_ratio",
                Box::new(|c| c.latency[2].max_ratio = 0.9),
            ),
            (
                "max_error_rate_increase",
                Box::new(|c| c.max_error_rate_increase = -0.1),
            ),
            (
                "hard_error_rate_increase",
                Box::new(|c| c.hard_error_rate_increase = 0.001),
            ),
            ("max_mismatch_rate", Box::new(|c| c.max_mismatch_rate = 1.5)),
            ("window_jobs", Box::new(|c| c.window_jobs = 0)),
            ("consecutive_passes", Box::new(|c| c.consecutive_passes = 0)),
            ("false_fail_rate", Box::new(|c| c.false_fail_rate = 0.0)),
            ("false_pass_rate", Box::new(|c| c.false_pass_rate = 0.9)),
            (
                "min_tail_exceedances",
                Box::new(|c| c.min_tail_exceedances = 0),
            ),
        ];
        for (field, spoil) in cases {
            let mut condition = Condition::default();
            spoil(&mut condition);
            match condition.validate() {
                Err(ConditionError::Invalid { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: expected an invalid-field error, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_budget_adds_up_to_the_false_fail_rate() {
        let condition = Condition::default();
        for prediction in [false, true] {
            for equal_split in [false, true] {
                let sharing = Sharing {
                    prediction,
                    equal_split,
                };
                let budget = condition.fail_budget(sharing);
                assert!((budget.total() - condition.false_fail_rate).abs() < 1e-12);
                assert_eq!(budget.latency.len(), condition.latency.len());
                assert_eq!(budget.prediction > 0.0, prediction);
            }
        }
    }

    #[test]
    fn floors_grow_with_the_quantile() {
        let limits = default_latency();
        assert_eq!(limits[0].floor_jobs(5), 10);
        assert_eq!(limits[1].floor_jobs(5), 500);
        assert_eq!(limits[2].floor_jobs(5), 5000);
    }
}
