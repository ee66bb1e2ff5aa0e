//! Window-level judging from two latency histograms and outcome counts (unpaired): the rule the
//! controller shows on dashboards and uses where only histograms are at hand. Its cost depends on
//! the histograms' bucket count, not on the number of jobs recorded in them.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{Condition, Decision, Verdict};

/// Outcome counts of one version over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowOutcomes {
    pub jobs: u64,
    pub errors: u64,
    /// Answers that differed from v1's (0 for v1 itself).
    pub mismatches: u64,
}

impl WindowOutcomes {
    fn error_rate(&self) -> f64 {
        if self.jobs == 0 {
            0.0
        } else {
            self.errors as f64 / self.jobs as f64
        }
    }
}

/// One quantile of both versions in a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantileComparison {
    pub name: String,
    pub quantile: f64,
    pub v1_us: u64,
    pub v2_us: u64,
    /// v2 / v1 (0 when v1 is 0).
    pub ratio: f64,
    pub max_ratio: f64,
    /// Whether the window held enough jobs to judge this quantile (its sample-size floor).
    pub judged: bool,
}

/// The window verdict and its per-quantile comparisons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowVerdict {
    pub quantiles: Vec<QuantileComparison>,
    pub verdict: Verdict,
}

/// Judges one window: `v1` (active) and `v2` (simulation) latency histograms in microseconds plus
/// their outcome counts. Point estimates against the condition's limits: a quantile beyond its
/// ratio fails, an error-rate increase beyond the margin fails (beyond the hard margin: hard),
/// a mismatch rate beyond its margin fails. Fewer than `min_jobs` on either side is not enough
/// data. Each quantile is judged only from its sample-size floor (`min_tail_exceedances / (1-q)`
/// jobs); quantiles below it are reported as not judged. Warm-up and the sequential rules do not
/// apply here: they belong to [`crate::Judge`].
pub fn judge_window(
    condition: &Condition,
    v1: &Histogram<u64>,
    v2: &Histogram<u64>,
    v1_outcomes: WindowOutcomes,
    v2_outcomes: WindowOutcomes,
) -> WindowVerdict {
    let jobs = v1_outcomes.jobs.min(v2_outcomes.jobs);
    let latency_jobs = v1.len().min(v2.len());
    let quantiles = compare_quantiles(condition, v1, v2, latency_jobs);
    let error_increase = v2_outcomes.error_rate() - v1_outcomes.error_rate();
    let mismatch_rate = if v2_outcomes.jobs == 0 {
        0.0
    } else {
        v2_outcomes.mismatches as f64 / v2_outcomes.jobs as f64
    };
    let details = serde_json::json!({
        "jobs": jobs,
        "min_jobs": condition.min_jobs,
        "v1": v1_outcomes,
        "v2": v2_outcomes,
        "v1_error_rate": v1_outcomes.error_rate(),
        "v2_error_rate": v2_outcomes.error_rate(),
        "error_rate_increase": error_increase,
        "max_error_rate_increase": condition.max_error_rate_increase,
        "hard_error_rate_increase": condition.hard_error_rate_increase,
        "mismatch_rate": mismatch_rate,
        "max_mismatch_rate": condition.max_mismatch_rate,
        "quantiles": quantiles,
    });
    let counts = WindowCounts {
        jobs,
        latency_jobs,
        error_increase,
        mismatch_rate,
    };
    let (decision, hard, rule) = window_rule(condition, &counts, &quantiles);
    let verdict = Verdict {
        decision,
        hard,
        rule,
        jobs,
        details,
    };
    WindowVerdict { quantiles, verdict }
}

/// Each configured quantile of both versions, with whether the window reached its floor.
fn compare_quantiles(
    condition: &Condition,
    v1: &Histogram<u64>,
    v2: &Histogram<u64>,
    latency_jobs: u64,
) -> Vec<QuantileComparison> {
    condition
        .latency
        .iter()
        .map(|limit| {
            let judged = latency_jobs >= limit.floor_jobs(condition.min_tail_exceedances)
                && latency_jobs > 0;
            let v1_us = value_at_quantile(v1, limit.quantile);
            let v2_us = value_at_quantile(v2, limit.quantile);
            QuantileComparison {
                name: limit.name(),
                quantile: limit.quantile,
                v1_us,
                v2_us,
                ratio: if v1_us == 0 {
                    0.0
                } else {
                    v2_us as f64 / v1_us as f64
                },
                max_ratio: limit.max_ratio,
                judged,
            }
        })
        .collect()
}

/// A histogram's quantile, 0 for an empty histogram (a side that recorded nothing).
fn value_at_quantile(histogram: &Histogram<u64>, quantile: f64) -> u64 {
    if histogram.is_empty() {
        0
    } else {
        histogram.value_at_quantile(quantile)
    }
}

/// The window's numbers the rules are checked against.
struct WindowCounts {
    /// Jobs of the version with fewer.
    jobs: u64,
    /// Latencies recorded by the version with fewer.
    latency_jobs: u64,
    error_increase: f64,
    mismatch_rate: f64,
}

/// The first rule that decides, in order of severity: too few jobs, a failure (see
/// `window_failure`), too few latencies, else a pass.
fn window_rule(
    condition: &Condition,
    counts: &WindowCounts,
    quantiles: &[QuantileComparison],
) -> (Decision, bool, String) {
    if counts.jobs < condition.min_jobs {
        return (
            Decision::NotEnoughData,
            false,
            format!(
                "not enough data: {} of {} minimum jobs",
                counts.jobs, condition.min_jobs
            ),
        );
    }
    if let Some((hard, rule)) = window_failure(condition, counts, quantiles) {
        return (Decision::Fail, hard, rule);
    }
    if counts.latency_jobs < condition.min_jobs {
        return (
            Decision::NotEnoughData,
            false,
            format!(
                "not enough data: {} latencies recorded of {} minimum",
                counts.latency_jobs, condition.min_jobs
            ),
        );
    }
    (Decision::Pass, false, pass_rule(quantiles))
}

/// The first limit the window breaks, most severe first: hard error increase, error increase,
/// mismatches, a judged quantile beyond its ratio. Whether it is hard, and the rule in words.
fn window_failure(
    condition: &Condition,
    counts: &WindowCounts,
    quantiles: &[QuantileComparison],
) -> Option<(bool, String)> {
    let (error_increase, mismatch_rate) = (counts.error_increase, counts.mismatch_rate);
    if error_increase > condition.hard_error_rate_increase {
        return Some((
            true,
            format!(
                "hard failure: error rate {:.2} points above v1's (hard margin {:.2})",
                error_increase * 100.0,
                condition.hard_error_rate_increase * 100.0
            ),
        ));
    }
    if error_increase > condition.max_error_rate_increase {
        return Some((
            false,
            format!(
                "fail: errors: error rate {:.2} points above v1's (margin {:.2})",
                error_increase * 100.0,
                condition.max_error_rate_increase * 100.0
            ),
        ));
    }
    if mismatch_rate > condition.max_mismatch_rate {
        return Some((
            false,
            format!(
                "fail: mismatches: {:.2}% of answers differ (margin {:.2}%)",
                mismatch_rate * 100.0,
                condition.max_mismatch_rate * 100.0
            ),
        ));
    }
    let slow = quantiles
        .iter()
        .find(|q| q.judged && q.ratio > q.max_ratio)?;
    Some((
        false,
        format!(
            "fail: latency {}: v2 {} us is {:.3} x v1's {} us (limit {:.2})",
            slow.name, slow.v2_us, slow.ratio, slow.v1_us, slow.max_ratio
        ),
    ))
}

/// The pass rule's words, naming the quantiles left unjudged for want of jobs.
fn pass_rule(quantiles: &[QuantileComparison]) -> String {
    let unjudged: Vec<&str> = quantiles
        .iter()
        .filter(|q| !q.judged)
        .map(|q| q.name.as_str())
        .collect();
    if unjudged.is_empty() {
        "pass: every quantile, the error rate and the mismatch rate within limits".to_string()
    } else {
        format!(
            "pass: judged quantiles, error rate and mismatch rate within limits \
             ({} not judged: too few jobs for that quantile)",
            unjudged.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, LogNormal};

    fn histogram(values: impl Iterator<Item = u64>) -> Histogram<u64> {
        let mut histogram = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for value in values {
            histogram.saturating_record(value.max(1));
        }
        histogram
    }

    fn latencies(n: usize, seed: u64) -> Vec<u64> {
        let distribution = LogNormal::new(8.0, 0.5).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| distribution.sample(&mut rng) as u64)
            .collect()
    }

    fn outcomes(jobs: u64, errors: u64) -> WindowOutcomes {
        WindowOutcomes {
            jobs,
            errors,
            mismatches: 0,
        }
    }

    #[test]
    fn identical_histograms_pass() {
        let values = latencies(20_000, 1);
        let h = histogram(values.iter().copied());
        let result = judge_window(
            &Condition::default(),
            &h,
            &h,
            outcomes(20_000, 200),
            outcomes(20_000, 200),
        );
        assert_eq!(
            result.verdict.decision,
            Decision::Pass,
            "{}",
            result.verdict.rule
        );
        assert!(result.quantiles.iter().all(|q| q.judged && q.ratio == 1.0));
    }

    #[test]
    fn p99_twenty_percent_slower_fails() {
        let values = latencies(20_000, 2);
        let v1 = histogram(values.iter().copied());
        let p99 = v1.value_at_quantile(0.99);
        let p95 = v1.value_at_quantile(0.95);
        // Only the tail slows down: p50 unchanged, p99 +20%.
        let v2 = histogram(values.iter().map(|&v| if v >= p95 { v * 6 / 5 } else { v }));
        let result = judge_window(
            &Condition::default(),
            &v1,
            &v2,
            outcomes(20_000, 0),
            outcomes(20_000, 0),
        );
        assert_eq!(
            result.verdict.decision,
            Decision::Fail,
            "{}",
            result.verdict.rule
        );
        assert!(
            result.verdict.rule.contains("p99"),
            "{}",
            result.verdict.rule
        );
        assert!(p99 > 0);
        assert!((result.quantiles[0].ratio - 1.0).abs() < 0.02);
    }

    #[test]
    fn one_point_more_errors_fails_and_far_more_is_hard() {
        let h = histogram(latencies(10_000, 3).into_iter());
        let condition = Condition::default();
        let result = judge_window(
            &condition,
            &h,
            &h,
            outcomes(10_000, 100),
            outcomes(10_000, 200),
        );
        assert_eq!(result.verdict.decision, Decision::Fail);
        assert!(!result.verdict.hard);
        let result = judge_window(
            &condition,
            &h,
            &h,
            outcomes(10_000, 100),
            outcomes(10_000, 900),
        );
        assert_eq!(result.verdict.decision, Decision::Fail);
        assert!(result.verdict.hard);
    }

    #[test]
    fn too_few_jobs_is_not_enough_data() {
        let h = histogram(latencies(50, 4).into_iter());
        let result = judge_window(
            &Condition::default(),
            &h,
            &h,
            outcomes(50, 25),
            outcomes(50, 50),
        );
        assert_eq!(result.verdict.decision, Decision::NotEnoughData);
    }

    #[test]
    fn tail_quantile_below_its_floor_is_not_judged() {
        let values = latencies(1_000, 5);
        let v1 = histogram(values.iter().copied());
        let v2 = histogram(values.iter().map(|v| v * 3));
        let result = judge_window(
            &Condition::default(),
            &v1,
            &v2,
            outcomes(1_000, 0),
            outcomes(1_000, 0),
        );
        let p999 = result.quantiles.iter().find(|q| q.name == "p99.9").unwrap();
        assert!(!p999.judged);
        // p50 is judged, and is 3x: fail on p50, not on the unjudged tail.
        assert!(
            result.verdict.rule.contains("p50"),
            "{}",
            result.verdict.rule
        );
    }

    #[test]
    fn million_job_histograms_judge_like_small_ones() {
        let values = latencies(10_000, 6);
        let mut v1 = histogram(values.iter().copied());
        let mut v2 = histogram(values.iter().map(|v| v * 13 / 10));
        // Scale the counts to 1M jobs: the verdict depends on the shape, not the volume.
        for value in &values {
            v1.saturating_record_n((*value).max(1), 99);
            v2.saturating_record_n((value * 13 / 10).max(1), 99);
        }
        assert_eq!(v1.len(), 1_000_000);
        let result = judge_window(
            &Condition::default(),
            &v1,
            &v2,
            outcomes(1_000_000, 10_000),
            outcomes(1_000_000, 10_000),
        );
        assert_eq!(
            result.verdict.decision,
            Decision::Fail,
            "{}",
            result.verdict.rule
        );
        assert!(result.quantiles.iter().all(|q| q.judged));
    }
}
