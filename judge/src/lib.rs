//! The judge: decides from mirrored job pairs whether v2 may join (the joining condition).
//!
//! Every mirrored job ran on v1 (active) and v2 (simulation) at the same moment with the same
//! input, so the judge works on *pairs*: per pair it forms bounded statistics whose mean says how
//! much worse v2 is (error difference, mismatch, tail exceedance difference at a scaled v1
//! quantile), and tests each with a pair of sequential tests by betting (see [`sequential`]).
//! The verdict is valid however often it is looked at: a v2 that meets the condition is rolled
//! back with probability at most `false_fail_rate`, a v2 that breaks it passes with probability at
//! most `false_pass_rate`. See docs/judge.md for the statistics and the condition's TOML form.

pub mod bench;
mod condition;
mod fields;
pub mod sequential;
pub mod unpaired;
pub mod window;

use std::collections::{BTreeMap, VecDeque};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub use condition::{
    read_toml, Baseline, Condition, ConditionError, FailBudget, LatencyLimit, Sharing,
};
pub use fields::{
    AnswerFields, FieldClass, FieldReport, FieldTests, FieldValues, FieldsReport, ValuePair,
    MAX_FIELDS, OTHER_FIELD,
};
use sequential::{Alphas, MarginTest};
pub use sequential::{Betting, Evidence, MarginReport};
pub use window::{judge_window, QuantileComparison, WindowOutcomes, WindowVerdict};

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

impl Decision {
    /// The name used in JSON and tables: `pass`, `fail`, `not_enough_data`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Pass => "pass",
            Decision::Fail => "fail",
            Decision::NotEnoughData => "not_enough_data",
        }
    }
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

/// One test of the condition by name (`errors`, `latency p99`, ...) and its evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestReport {
    pub name: String,
    pub report: MarginReport,
}

/// Latencies are recorded up to an hour; two significant digits keep quantile look-ups cheap.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
const HISTOGRAM_SIGFIG: u8 = 2;
/// Paired ratios v2/v1 are recorded in thousandths.
const RATIO_SCALE: f64 = 1000.0;

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, HISTOGRAM_SIGFIG)
        .expect("static histogram bounds are valid")
}

/// Finer buckets (0.1%) for the sources of the thresholds: the thresholds decide, the other
/// histograms only report.
fn threshold_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("static histogram bounds are valid")
}

/// One metric's statistic, optionally differenced against the A/A control stream: the i-th v2
/// value is paired with the i-th control value, and the test sees `v2 - control`.
#[derive(Debug, Clone)]
struct ControlledStream {
    test: MarginTest,
    differenced: bool,
    pending_v2: VecDeque<f64>,
    pending_control: VecDeque<f64>,
    control_count: u64,
    control_sum: f64,
}

impl ControlledStream {
    /// `bounds` (low, high) bound the per-pair statistic; differencing doubles the range.
    fn new(
        condition: &Condition,
        margin: f64,
        (low, high): (f64, f64),
        fail_alpha: f64,
        betting: Betting,
    ) -> Self {
        let differenced = condition.require_control;
        let (low, high) = if differenced {
            (low - high, high - low)
        } else {
            (low, high)
        };
        let alphas = Alphas {
            fail: fail_alpha,
            pass: condition.false_pass_rate,
            interval: condition.false_fail_rate,
        };
        ControlledStream {
            test: MarginTest::with_betting(margin, low, high, alphas, betting),
            differenced,
            pending_v2: VecDeque::new(),
            pending_control: VecDeque::new(),
            control_count: 0,
            control_sum: 0.0,
        }
    }

    fn push_v2(&mut self, x: f64) {
        if !self.differenced {
            self.test.observe(x);
        } else if let Some(control) = self.pending_control.pop_front() {
            self.test.observe(x - control);
        } else {
            push_bounded(&mut self.pending_v2, x);
        }
    }

    fn push_control(&mut self, x: f64) {
        self.control_count += 1;
        self.control_sum += x;
        if !self.differenced {
            return;
        }
        if let Some(v2) = self.pending_v2.pop_front() {
            self.test.observe(v2 - x);
        } else {
            push_bounded(&mut self.pending_control, x);
        }
    }

    /// The test's report once it shows v2 beyond its margin.
    fn failed(&self) -> Option<MarginReport> {
        (self.test.evidence() == Evidence::Fail).then(|| self.test.report())
    }

    fn control_mean(&self) -> Option<f64> {
        (self.control_count > 0).then(|| self.control_sum / self.control_count as f64)
    }
}

/// Unmatched values kept while one stream (v2 or control) runs ahead of the other.
const MAX_PENDING: usize = 65_536;

/// Keeps memory bounded when one stream stalls: the oldest unmatched value is dropped. Which
/// values get matched depends only on arrival order, never on their values, so the tests stay valid.
fn push_bounded(queue: &mut VecDeque<f64>, x: f64) {
    if queue.len() == MAX_PENDING {
        queue.pop_front();
    }
    queue.push_back(x);
}

/// The paired tail test for one quantile q with limit r: at the threshold c = r x (v1's q-quantile
/// so far), each pair gives `[v2 > c] - [r x v1 > c]`, whose mean is positive exactly when v2's
/// quantile at that level is more than r times v1's. Jobs slow on both versions cancel out.
#[derive(Debug, Clone)]
struct LatencyTest {
    limit: LatencyLimit,
    name: String,
    floor_jobs: u64,
    threshold_us: f64,
    stream: ControlledStream,
    v2_only_exceed: u64,
    v1_only_exceed: u64,
}

impl LatencyTest {
    /// A test with no threshold yet (the first refresh sets it), fed through `stream`.
    fn new(limit: &LatencyLimit, min_tail_exceedances: u64, stream: ControlledStream) -> Self {
        LatencyTest {
            limit: limit.clone(),
            name: limit.name(),
            // Decisions wait for `min_jobs` anyway; the floor only keeps a tail test from
            // betting before enough jobs reach that far into the tail.
            floor_jobs: limit.floor_jobs(min_tail_exceedances),
            threshold_us: f64::INFINITY,
            stream,
            v2_only_exceed: 0,
            v1_only_exceed: 0,
        }
    }

    fn indicator(&self, pair: &PairSample) -> (f64, bool, bool) {
        let v2_exceeds = pair.v2_latency_us as f64 > self.threshold_us;
        // `>=` on v1's side: with tied (bucketed, integer) latencies an exact copy of v1 then
        // counts as "not worse", and the statistic's mean can only err towards v1.
        let v1_exceeds = pair.v1_latency_us as f64 * self.limit.max_ratio >= self.threshold_us;
        (
            f64::from(u8::from(v2_exceeds)) - f64::from(u8::from(v1_exceeds)),
            v1_exceeds,
            v2_exceeds,
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct OutcomeCounts {
    v1_errors: u64,
    v2_errors: u64,
    v1_ok_v2_error: u64,
    v1_error_v2_ok: u64,
    compared: u64,
    mismatched: u64,
}

/// Whether the answers matched, counted only when both versions answered successfully: a failed
/// job is the error test's to judge, and counting it as a mismatch too would charge it twice.
fn compared_answers(pair: &PairSample) -> Option<bool> {
    pair.matched.filter(|_| pair.v1_ok && pair.v2_ok)
}

impl OutcomeCounts {
    fn add(&mut self, pair: &PairSample) {
        self.v1_errors += u64::from(!pair.v1_ok);
        self.v2_errors += u64::from(!pair.v2_ok);
        self.v1_ok_v2_error += u64::from(pair.v1_ok && !pair.v2_ok);
        self.v1_error_v2_ok += u64::from(!pair.v1_ok && pair.v2_ok);
        if let Some(matched) = compared_answers(pair) {
            self.compared += 1;
            self.mismatched += u64::from(!matched);
        }
    }
}

/// The statistical choices `judge-bench`'s ablations vary; the default is what the controller
/// runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuning {
    pub sharing: Sharing,
    pub betting: Betting,
}

/// Sequential judge fed pairs in arrival order.
#[derive(Debug, Clone)]
pub struct Judge {
    condition: Condition,
    budget: FailBudget,
    jobs: u64,
    judged_jobs: u64,
    control_jobs: u64,
    judged_control_jobs: u64,
    /// Every v1 latency, warm-up included: v1 is warm, and its quantiles set the thresholds.
    v1_thresholds_source: Histogram<u64>,
    next_threshold_refresh: u64,
    /// With a required control: the control's latencies and per-job ratios (control / v1), whose
    /// quantiles replace v1's as the reference.
    control_thresholds_source: Histogram<u64>,
    control_ratio_source: Histogram<u64>,
    control_median_ratio: f64,
    v1_judged: Histogram<u64>,
    v2_judged: Histogram<u64>,
    control_judged: Histogram<u64>,
    paired_ratio: Histogram<u64>,
    counts: OutcomeCounts,
    control_counts: OutcomeCounts,
    errors: ControlledStream,
    hard_errors: ControlledStream,
    mismatches: ControlledStream,
    /// Answers compared field by field (see `fields.rs`): then the mismatch rule's test.
    fields: Option<FieldTests>,
    /// Sign test of v2 against `max_paired_ratio` x v1 on each job: its mean is positive exactly
    /// when the median per-job ratio v2/v1 exceeds the limit.
    paired_shift: ControlledStream,
    latency: Vec<LatencyTest>,
    consecutive_passes: u32,
    final_verdict: Option<Verdict>,
}

impl Judge {
    /// A judge for `condition`, which should have been validated (`Condition::validate`); an
    /// invalid condition still judges, with its values clamped by the statistics. The judge's
    /// tests take the whole false-fail rate: see [`Judge::with_sharing`].
    pub fn new(condition: Condition) -> Self {
        Judge::with_sharing(condition, Sharing::default())
    }

    /// A judge whose tests share the condition's false-fail rate with the rules in `sharing`
    /// (the prediction rule's test), as [`Condition::fail_budget`] splits it.
    pub fn with_sharing(condition: Condition, sharing: Sharing) -> Self {
        Judge::tuned(
            condition,
            Tuning {
                sharing,
                ..Tuning::default()
            },
        )
    }

    /// A judge with the choices `judge-bench`'s ablations vary.
    pub fn tuned(condition: Condition, tuning: Tuning) -> Self {
        // Any failing test rolls back, so the false-fail budget is split among them; a pass
        // needs every pass test, so each may use the whole false-pass budget.
        let budget = condition.fail_budget(tuning.sharing);
        let stream = |margin: f64, low: f64, high: f64, alpha: f64| {
            ControlledStream::new(&condition, margin, (low, high), alpha, tuning.betting)
        };
        let errors = stream(condition.max_error_rate_increase, -1.0, 1.0, budget.errors);
        // The hard test fails only when the error test fails too (see `failing_reason`), so it
        // spends no budget of its own: it may use the error test's share.
        let hard_errors = stream(condition.hard_error_rate_increase, -1.0, 1.0, budget.errors);
        let mismatches = stream(condition.max_mismatch_rate, 0.0, 1.0, budget.mismatches);
        // Latency statistics against a control compare v2 with the control directly: each side
        // is an indicator in [0, 1] (see `observe_control`); without one they are in [-1, 1].
        let (side_low, side_high) = if condition.require_control {
            (0.0, 1.0)
        } else {
            (-1.0, 1.0)
        };
        let paired_shift = stream(0.0, side_low, side_high, budget.paired_shift);
        let latency = condition
            .latency
            .iter()
            .zip(&budget.latency)
            .map(|(limit, &alpha)| {
                let stream = stream(0.0, side_low, side_high, alpha);
                LatencyTest::new(limit, condition.min_tail_exceedances, stream)
            })
            .collect();
        Judge {
            budget,
            jobs: 0,
            judged_jobs: 0,
            control_jobs: 0,
            judged_control_jobs: 0,
            v1_thresholds_source: threshold_histogram(),
            next_threshold_refresh: 1,
            control_thresholds_source: threshold_histogram(),
            control_ratio_source: threshold_histogram(),
            control_median_ratio: f64::INFINITY,
            v1_judged: latency_histogram(),
            v2_judged: latency_histogram(),
            control_judged: latency_histogram(),
            paired_ratio: latency_histogram(),
            counts: OutcomeCounts::default(),
            control_counts: OutcomeCounts::default(),
            errors,
            hard_errors,
            mismatches,
            fields: None,
            paired_shift,
            latency,
            consecutive_passes: 0,
            final_verdict: None,
            condition,
        }
    }

    pub fn condition(&self) -> &Condition {
        &self.condition
    }

    /// Pairs fed so far (warm-up included).
    pub fn jobs(&self) -> u64 {
        self.jobs
    }

    /// Whether Pass or Fail has been reached. A fail never changes afterwards; a pass is still
    /// watched (see [`Judge::observe`]) and turns into a fail if a fail test crosses later.
    pub fn is_final(&self) -> bool {
        self.final_verdict.is_some()
    }

    /// Whether the judge failed v2: nothing it is fed changes anything any more.
    fn has_failed(&self) -> bool {
        self.final_verdict
            .as_ref()
            .is_some_and(|v| v.decision == Decision::Fail)
    }

    /// Feeds one v1-active / v2-simulation pair. After a pass the pairs are still judged (a v2
    /// that awaits approval keeps being compared): each fail test is an e-process whose
    /// false-fail bound holds over the whole unbounded sequence, so watching on after the pass
    /// spends no more than the budget already granted to it.
    pub fn observe(&mut self, pair: &PairSample) {
        if self.has_failed() {
            return;
        }
        self.jobs += 1;
        self.v1_thresholds_source
            .saturating_record(pair.v1_latency_us.max(1));
        if self.jobs >= self.next_threshold_refresh {
            self.refresh_thresholds();
        }
        if self.jobs <= self.condition.warmup_jobs {
            return;
        }
        self.judged_jobs += 1;
        self.v1_judged.saturating_record(pair.v1_latency_us.max(1));
        self.v2_judged.saturating_record(pair.v2_latency_us.max(1));
        let ratio = pair.v2_latency_us.max(1) as f64 / pair.v1_latency_us.max(1) as f64;
        self.paired_ratio
            .saturating_record(((ratio * RATIO_SCALE).round() as u64).max(1));
        self.counts.add(pair);

        let error_increase = f64::from(u8::from(!pair.v2_ok)) - f64::from(u8::from(!pair.v1_ok));
        self.errors.push_v2(error_increase);
        self.hard_errors.push_v2(error_increase);
        if let Some(matched) = compared_answers(pair) {
            self.mismatches.push_v2(f64::from(u8::from(!matched)));
        }
        let max_paired_ratio = self.condition.max_paired_ratio;
        if !self.condition.require_control {
            self.paired_shift
                .push_v2(paired_sign(pair, max_paired_ratio));
        } else if self.control_median_ratio.is_finite() {
            // v2's per-job ratio beyond r x the control's median per-job ratio.
            let beyond = ratio > max_paired_ratio * self.control_median_ratio;
            self.paired_shift.push_v2(f64::from(u8::from(beyond)));
        }
        let judged = self.judged_jobs;
        let require_control = self.condition.require_control;
        for test in &mut self.latency {
            if judged > test.floor_jobs && test.threshold_us.is_finite() {
                let (x, v1_exceeds, v2_exceeds) = test.indicator(pair);
                test.v1_only_exceed += u64::from(v1_exceeds && !v2_exceeds);
                test.v2_only_exceed += u64::from(v2_exceeds && !v1_exceeds);
                if require_control {
                    // Against the control the threshold is r x the control's quantile, and the
                    // control supplies the other side of the statistic.
                    test.stream.push_v2(f64::from(u8::from(v2_exceeds)));
                } else {
                    test.stream.push_v2(x);
                }
            }
        }
        self.decide();
    }

    /// Feeds one v1-active / v1-simulation pair (A/A control, the noise baseline).
    pub fn observe_control(&mut self, pair: &PairSample) {
        if self.has_failed() {
            return;
        }
        self.control_jobs += 1;
        if self.control_jobs <= self.condition.warmup_jobs {
            return;
        }
        self.judged_control_jobs += 1;
        self.control_judged
            .saturating_record(pair.v2_latency_us.max(1));
        self.control_counts.add(pair);
        let error_increase = f64::from(u8::from(!pair.v2_ok)) - f64::from(u8::from(!pair.v1_ok));
        self.errors.push_control(error_increase);
        self.hard_errors.push_control(error_increase);
        if let Some(matched) = compared_answers(pair) {
            self.mismatches.push_control(f64::from(u8::from(!matched)));
        }
        let ratio = pair.v2_latency_us.max(1) as f64 / pair.v1_latency_us.max(1) as f64;
        self.control_thresholds_source
            .saturating_record(pair.v2_latency_us.max(1));
        self.control_ratio_source
            .saturating_record(((ratio * RATIO_SCALE).round() as u64).max(1));
        let max_paired_ratio = self.condition.max_paired_ratio;
        if !self.condition.require_control {
            // Only summarised (the noise baseline in the details).
            self.paired_shift
                .push_control(paired_sign(pair, max_paired_ratio));
        } else if self.control_median_ratio.is_finite() {
            // The control's side: its per-job ratio at or beyond its own median, the level the
            // v2 side is compared at (times r).
            let at_or_beyond = ratio >= self.control_median_ratio;
            self.paired_shift
                .push_control(f64::from(u8::from(at_or_beyond)));
        }
        let judged = self.judged_control_jobs;
        let require_control = self.condition.require_control;
        for test in &mut self.latency {
            if judged > test.floor_jobs && test.threshold_us.is_finite() {
                if require_control {
                    // The control scaled by r reaching the threshold r x (control's quantile).
                    let reaches =
                        pair.v2_latency_us as f64 * test.limit.max_ratio >= test.threshold_us;
                    test.stream.push_control(f64::from(u8::from(reaches)));
                } else {
                    let (x, _, _) = test.indicator(pair);
                    test.stream.push_control(x);
                }
            }
        }
        // A control pair can complete a differenced observation, so it may decide too.
        if self.condition.require_control {
            self.decide();
        }
    }

    /// The current verdict; once Pass or Fail is reached it stays (the decision is final).
    pub fn verdict(&self) -> Verdict {
        if let Some(verdict) = &self.final_verdict {
            return verdict.clone();
        }
        Verdict {
            decision: Decision::NotEnoughData,
            hard: false,
            rule: self.waiting_reason(),
            jobs: self.jobs,
            details: self.details(),
        }
    }

    /// The decision as it stands (cheap: no details are built).
    pub fn decision(&self) -> Decision {
        self.final_verdict
            .as_ref()
            .map_or(Decision::NotEnoughData, |v| v.decision)
    }

    /// The decision as it stands, with the numbers as they are now (a pass's own `details` and
    /// `jobs` are those of the moment it was reached; these go on moving while it is watched).
    pub fn live_verdict(&self) -> Verdict {
        match &self.final_verdict {
            Some(decided) if decided.decision == Decision::Pass => Verdict {
                jobs: self.jobs,
                details: self.details(),
                ..decided.clone()
            },
            _ => self.verdict(),
        }
    }

    /// Each latency quantile of the condition by name (`p99`), as it stands now.
    pub fn quantiles(&self) -> Vec<(String, QuantileReport)> {
        self.latency
            .iter()
            .map(|test| (test.name.clone(), self.latency_details(test)))
            .collect()
    }

    /// Every test of the condition and where its evidence stands now, in a fixed order.
    pub fn tests(&self) -> Vec<TestReport> {
        let named = |name: &str, stream: &ControlledStream| TestReport {
            name: name.to_string(),
            report: stream.test.report(),
        };
        let mut tests = vec![
            named("errors", &self.errors),
            named("hard errors", &self.hard_errors),
            TestReport {
                name: "mismatches".to_string(),
                report: self.mismatch_test().report(),
            },
            named("paired shift", &self.paired_shift),
        ];
        tests.extend(
            self.latency
                .iter()
                .map(|t| named(&format!("latency {}", t.name), &t.stream)),
        );
        tests
    }

    /// Thresholds move on a geometric schedule (every 1/16 more pairs, at least every 32), so
    /// the quantile look-ups cost O(1) amortised per pair. A threshold depends on past pairs
    /// only, which keeps each bet predictable and the tests valid.
    fn refresh_thresholds(&mut self) {
        // The reference is v1-active, or with a required control the control (v1 in simulation).
        let source = if self.condition.require_control {
            &self.control_thresholds_source
        } else {
            &self.v1_thresholds_source
        };
        for test in &mut self.latency {
            // The bucket's lowest value: a reference job at the quantile then counts as reaching
            // it, so even a bounded, bucketed sample shows the reference's side of the tail.
            test.threshold_us = if source.is_empty() {
                f64::INFINITY
            } else {
                let quantile = source.value_at_quantile(test.limit.quantile);
                test.limit.max_ratio * source.lowest_equivalent(quantile) as f64
            };
        }
        let ratios = &self.control_ratio_source;
        self.control_median_ratio = if ratios.is_empty() {
            f64::INFINITY
        } else {
            ratios.lowest_equivalent(ratios.value_at_quantile(0.5)) as f64 / RATIO_SCALE
        };
        self.next_threshold_refresh = self.jobs + (self.jobs / 16).max(32);
    }

    /// The first test that shows v2 beyond its limit, most severe first: whether the failure is
    /// hard, and the rule in words.
    fn failing_reason(&self) -> Option<(bool, String)> {
        if let (Some(report), Some(_)) = (self.hard_errors.failed(), self.errors.failed()) {
            return Some((true, self.error_rate_reason("hard failure", &report)));
        }
        if let Some(report) = self.errors.failed() {
            return Some((false, self.error_rate_reason("errors", &report)));
        }
        if let Some(rule) = self.mismatch_reason() {
            return Some((false, rule));
        }
        if let Some(report) = self.paired_shift.failed() {
            return Some((false, self.paired_shift_reason(&report)));
        }
        self.latency.iter().find_map(|test| {
            let report = test.stream.failed()?;
            Some((false, self.latency_reason(test, &report)))
        })
    }

    /// The rule of a failed error-rate test (`kind`: "hard failure" or "errors").
    fn error_rate_reason(&self, kind: &str, report: &MarginReport) -> String {
        format!(
            "{kind}: v2's error rate is more than {:.2} points above {} \
             (estimated increase {:.2} points, evidence {} >= {:.0})",
            report.margin * 100.0,
            self.baseline_name(),
            report.estimate * 100.0,
            evidence_text(report.fail_evidence),
            report.fail_threshold
        )
    }

    fn paired_shift_reason(&self, report: &MarginReport) -> String {
        format!(
            "paired shift: on the same jobs v2 is typically more than {:.2} x slower than \
             {} (v2 beyond the limit in {:.1}% more jobs than below it, evidence {} >= {:.0})",
            self.condition.max_paired_ratio,
            if self.condition.require_control {
                "the control"
            } else {
                "v1"
            },
            report.estimate * 100.0,
            evidence_text(report.fail_evidence),
            report.fail_threshold
        )
    }

    fn latency_reason(&self, test: &LatencyTest, report: &MarginReport) -> String {
        format!(
            "latency {}: v2's {} is more than {:.2} x {} (v2 beyond {:.0} us in \
             {} more pairs than v1 scaled, evidence {} >= {:.0})",
            test.name,
            test.name,
            test.limit.max_ratio,
            self.baseline_name(),
            test.threshold_us,
            test.v2_only_exceed as i64 - test.v1_only_exceed as i64,
            evidence_text(report.fail_evidence),
            report.fail_threshold
        )
    }

    fn baseline_name(&self) -> &'static str {
        if self.condition.require_control {
            "the A/A control's"
        } else {
            "v1's"
        }
    }

    /// Whether every test currently shows v2 within its limit.
    fn all_within_limits(&self) -> bool {
        let stream_passes = |stream: &ControlledStream| stream.test.evidence() == Evidence::Pass;
        let no_answers_compared = self.counts.compared == 0 && self.control_counts.compared == 0;
        let mismatches_pass =
            no_answers_compared || self.mismatch_test().evidence() == Evidence::Pass;
        stream_passes(&self.errors)
            && mismatches_pass
            && stream_passes(&self.paired_shift)
            && self.latency.iter().all(|test| stream_passes(&test.stream))
    }

    /// The one place a decision is taken: a fail is final; a pass stands until a fail test
    /// crosses.
    fn decide(&mut self) {
        if let Some(decided) = &self.final_verdict {
            if decided.decision == Decision::Pass {
                if let Some((hard, rule)) = self.failing_reason() {
                    let rule = format!("fail after passing: {rule}");
                    self.conclude(Decision::Fail, hard, rule);
                }
            }
            return;
        }
        if self.judged_jobs < self.condition.min_jobs {
            return;
        }
        if let Some((hard, rule)) = self.failing_reason() {
            self.conclude(Decision::Fail, hard, format!("fail: {rule}"));
            return;
        }
        if !self.judged_jobs.is_multiple_of(self.condition.window_jobs) {
            return;
        }
        if self.all_within_limits() {
            self.consecutive_passes += 1;
        } else {
            self.consecutive_passes = 0;
        }
        if self.consecutive_passes >= self.condition.consecutive_passes {
            let rule = format!(
                "pass: every test ({} latency quantiles, paired shift, errors, mismatches) showed v2 within its \
                 limit at {} consecutive window ends of {} jobs",
                self.latency.len(),
                self.consecutive_passes,
                self.condition.window_jobs
            );
            self.conclude(Decision::Pass, false, rule);
        }
    }

    fn conclude(&mut self, decision: Decision, hard: bool, rule: String) {
        self.final_verdict = Some(Verdict {
            decision,
            hard,
            rule,
            jobs: self.jobs,
            details: self.details(),
        });
    }

    fn waiting_reason(&self) -> String {
        if self.jobs <= self.condition.warmup_jobs {
            return format!(
                "not enough data: warming up ({} of {} warm-up jobs)",
                self.jobs, self.condition.warmup_jobs
            );
        }
        if self.judged_jobs < self.condition.min_jobs {
            return format!(
                "not enough data: {} of {} minimum jobs after warm-up",
                self.judged_jobs, self.condition.min_jobs
            );
        }
        if self.condition.require_control && self.judged_control_jobs == 0 {
            return "not enough data: the condition requires an A/A control and none was observed"
                .to_string();
        }
        let mut waiting = Vec::new();
        for test in &self.latency {
            if self.judged_jobs <= test.floor_jobs {
                waiting.push(format!("{} (needs {} jobs)", test.name, test.floor_jobs));
            } else if test.stream.test.evidence() != Evidence::Pass {
                waiting.push(test.name.clone());
            }
        }
        if self.paired_shift.test.evidence() != Evidence::Pass {
            waiting.push("paired shift".to_string());
        }
        if self.errors.test.evidence() != Evidence::Pass {
            waiting.push("errors".to_string());
        }
        if self.counts.compared > 0 && self.mismatch_test().evidence() != Evidence::Pass {
            waiting.push("mismatches".to_string());
        }
        if waiting.is_empty() {
            format!(
                "not enough data: every test within limits, {} of {} consecutive window ends",
                self.consecutive_passes, self.condition.consecutive_passes
            )
        } else {
            format!(
                "not enough data: evidence still open for {}",
                waiting.join(", ")
            )
        }
    }

    fn details(&self) -> serde_json::Value {
        let latency: BTreeMap<String, QuantileReport> = self
            .latency
            .iter()
            .map(|test| (test.name.clone(), self.latency_details(test)))
            .collect();
        let details = Details {
            jobs: self.jobs,
            judged_jobs: self.judged_jobs,
            warmup_jobs: self.condition.warmup_jobs,
            min_jobs: self.condition.min_jobs,
            control_jobs: self.control_jobs,
            require_control: self.condition.require_control,
            false_fail_rate: self.condition.false_fail_rate,
            false_pass_rate: self.condition.false_pass_rate,
            per_test_false_fail_rate: self.budget.smallest_share(),
            fail_budget: self.budget.clone(),
            window_jobs: self.condition.window_jobs,
            consecutive_passes: self.consecutive_passes,
            consecutive_passes_needed: self.condition.consecutive_passes,
            errors: self.error_details(),
            mismatches: self.mismatch_details(),
            latency,
            paired_ratio: self.paired_ratio_details(),
        };
        serde_json::to_value(details).expect("details serialize to JSON")
    }

    fn latency_details(&self, test: &LatencyTest) -> QuantileReport {
        let q = test.limit.quantile;
        let v1 = quantile_with_interval(&self.v1_judged, q);
        let v2 = quantile_with_interval(&self.v2_judged, q);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        QuantileReport {
            quantile: q,
            max_ratio: test.limit.max_ratio,
            floor_jobs: test.floor_jobs,
            judged: self.judged_jobs > test.floor_jobs,
            v1_us: v1.0,
            v2_us: v2.0,
            ratio: ratio(v2.0, v1.0),
            ratio_interval: [ratio(v2.1, v1.2), ratio(v2.2, v1.1)],
            control_us: (self.judged_control_jobs > 0)
                .then(|| self.control_judged.value_at_quantile(q) as f64),
            threshold_us: test.threshold_us.is_finite().then_some(test.threshold_us),
            v2_only_exceed: test.v2_only_exceed,
            v1_only_exceed: test.v1_only_exceed,
            control_exceedance_difference: test.stream.control_mean(),
            test: test.stream.test.report(),
        }
    }

    fn error_details(&self) -> ErrorDetails {
        ErrorDetails {
            v1_errors: self.counts.v1_errors,
            v2_errors: self.counts.v2_errors,
            v1_ok_v2_error: self.counts.v1_ok_v2_error,
            v1_error_v2_ok: self.counts.v1_error_v2_ok,
            v1_rate: rate(self.counts.v1_errors, self.judged_jobs),
            v2_rate: rate(self.counts.v2_errors, self.judged_jobs),
            control_rate: (self.judged_control_jobs > 0)
                .then(|| rate(self.control_counts.v2_errors, self.judged_control_jobs)),
            increase: self.errors.test.report(),
            hard: self.hard_errors.test.report(),
        }
    }

    fn mismatch_details(&self) -> MismatchDetails {
        MismatchDetails {
            compared: self.counts.compared,
            mismatched: self.counts.mismatched,
            rate: rate(self.counts.mismatched, self.counts.compared),
            control_rate: (self.control_counts.compared > 0)
                .then(|| rate(self.control_counts.mismatched, self.control_counts.compared)),
            test: self.mismatch_test().report(),
            fields: self.fields(),
        }
    }

    /// Quantiles of the per-job ratio; `None` before any judged pair.
    fn paired_ratio_details(&self) -> Option<PairedRatio> {
        if self.paired_ratio.is_empty() {
            return None;
        }
        Some(PairedRatio {
            p10: self.paired_ratio.value_at_quantile(0.1) as f64 / RATIO_SCALE,
            p50: self.paired_ratio.value_at_quantile(0.5) as f64 / RATIO_SCALE,
            p90: self.paired_ratio.value_at_quantile(0.9) as f64 / RATIO_SCALE,
            max_ratio: self.condition.max_paired_ratio,
            test: self.paired_shift.test.report(),
        })
    }
}

/// `count / total`, 0 when there is nothing to count.
fn rate(count: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        count as f64 / total as f64
    }
}

/// A wealth for a rule text: whole numbers when small, scientific notation when large.
fn evidence_text(value: f64) -> String {
    if value < 1e6 {
        format!("{value:.0}")
    } else {
        format!("{value:.1e}")
    }
}

/// A quantile's estimate and a distribution-free 99% interval from order statistics (pointwise:
/// for explanation, not for the decision).
fn quantile_with_interval(histogram: &Histogram<u64>, quantile: f64) -> (f64, f64, f64) {
    if histogram.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let n = histogram.len() as f64;
    let spread = 2.576 * (quantile * (1.0 - quantile) / n).sqrt();
    let at = |q: f64| histogram.value_at_quantile(q.clamp(0.0, 1.0)) as f64;
    (at(quantile), at(quantile - spread), at(quantile + spread))
}

#[derive(Serialize)]
struct Details {
    jobs: u64,
    judged_jobs: u64,
    warmup_jobs: u64,
    min_jobs: u64,
    control_jobs: u64,
    require_control: bool,
    false_fail_rate: f64,
    false_pass_rate: f64,
    /// The smallest test's share of the false-fail rate.
    per_test_false_fail_rate: f64,
    /// The false-fail rate's share of each test.
    fail_budget: FailBudget,
    window_jobs: u64,
    consecutive_passes: u32,
    consecutive_passes_needed: u32,
    errors: ErrorDetails,
    mismatches: MismatchDetails,
    latency: BTreeMap<String, QuantileReport>,
    paired_ratio: Option<PairedRatio>,
}

#[derive(Serialize)]
struct ErrorDetails {
    v1_errors: u64,
    v2_errors: u64,
    v1_ok_v2_error: u64,
    v1_error_v2_ok: u64,
    v1_rate: f64,
    v2_rate: f64,
    control_rate: Option<f64>,
    /// Test of the paired error increase (v2 error - v1 error per pair) against the margin.
    increase: MarginReport,
    /// The same statistic against the hard-failure margin.
    hard: MarginReport,
}

#[derive(Serialize)]
struct MismatchDetails {
    compared: u64,
    mismatched: u64,
    rate: f64,
    control_rate: Option<f64>,
    test: MarginReport,
    /// Per field, in fields mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<FieldsReport>,
}

/// One latency quantile of the condition: v1's and v2's values, their ratio with its interval,
/// and the test's evidence (in verdict details under `latency`, and [`Judge::quantiles`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantileReport {
    pub quantile: f64,
    pub max_ratio: f64,
    pub floor_jobs: u64,
    pub judged: bool,
    pub v1_us: f64,
    pub v2_us: f64,
    pub ratio: f64,
    pub ratio_interval: [f64; 2],
    pub control_us: Option<f64>,
    pub threshold_us: Option<f64>,
    pub v2_only_exceed: u64,
    pub v1_only_exceed: u64,
    pub control_exceedance_difference: Option<f64>,
    pub test: MarginReport,
}

/// Quantiles of the per-job ratio v2/v1: the paired shift (p50 is the typical per-job slowdown).
#[derive(Serialize)]
struct PairedRatio {
    p10: f64,
    p50: f64,
    p90: f64,
    max_ratio: f64,
    /// The sign test: `sign(v2 - max_ratio x v1)` per job against 0.
    test: MarginReport,
}

/// `+1` when v2 is slower than `max_ratio` x v1 on this job, `-1` when faster, `0` on a tie.
fn paired_sign(pair: &PairSample, max_ratio: f64) -> f64 {
    let scaled_v1 = pair.v1_latency_us as f64 * max_ratio;
    let v2 = pair.v2_latency_us as f64;
    if v2 > scaled_v1 {
        1.0
    } else if v2 < scaled_v1 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests;
