//! An unpaired, Kayenta-like judge used only as a yardstick in the self-test battery: it ignores
//! that v1 and v2 ran the same jobs and compares the two latency samples with a one-sided
//! Mann-Whitney U test (v2 divided by the median's allowed ratio, as an allowed effect size) and the error and mismatch rates with two-proportion z-tests, at a few
//! looks on a doubling schedule. Its false-fail budget is split over looks and tests (Bonferroni)
//! so that it gets the same error guarantee as the paired judge; it passes when the job budget
//! ends without a failure, as a fixed-duration canary analysis does.

use crate::{Condition, Decision, PairSample};

/// Standard normal upper tail probability.
pub fn normal_upper_tail(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// One-sided Mann-Whitney U test that `second` tends to be larger than `first` (normal
/// approximation with average ranks for ties and the tie correction). Returns the p-value.
pub fn mann_whitney_greater(first: &[u64], second: &[u64]) -> f64 {
    let (n1, n2) = (first.len() as f64, second.len() as f64);
    if first.is_empty() || second.is_empty() {
        return 1.0;
    }
    let mut combined: Vec<(u64, bool)> = first
        .iter()
        .map(|&v| (v, false))
        .chain(second.iter().map(|&v| (v, true)))
        .collect();
    combined.sort_unstable_by_key(|&(value, _)| value);
    let mut second_rank_sum = 0.0;
    let mut tie_term = 0.0;
    let mut start = 0;
    while start < combined.len() {
        let mut end = start;
        while end < combined.len() && combined[end].0 == combined[start].0 {
            end += 1;
        }
        // Ranks start..end (1-based start+1..=end) share their average.
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied = (end - start) as f64;
        tie_term += tied * tied * tied - tied;
        second_rank_sum += average_rank
            * combined[start..end]
                .iter()
                .filter(|(_, is_second)| *is_second)
                .count() as f64;
        start = end;
    }
    let u = second_rank_sum - n2 * (n2 + 1.0) / 2.0;
    let n = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 1.0;
    }
    normal_upper_tail((u - n1 * n2 / 2.0) / variance.sqrt())
}

/// One-sided z-test that `rate(second) - rate(first) > margin`; returns the p-value.
pub fn proportion_increase_p_value(
    first_hits: u64,
    first_n: u64,
    second_hits: u64,
    second_n: u64,
    margin: f64,
) -> f64 {
    if first_n == 0 || second_n == 0 {
        return 1.0;
    }
    let p1 = first_hits as f64 / first_n as f64;
    let p2 = second_hits as f64 / second_n as f64;
    // Wald variance floored by one event's worth so that zero counts do not give zero variance.
    let variance = (p1 * (1.0 - p1)).max(1.0 / first_n as f64) / first_n as f64
        + (p2 * (1.0 - p2)).max(1.0 / second_n as f64) / second_n as f64;
    normal_upper_tail((p2 - p1 - margin) / variance.sqrt())
}

/// The unpaired yardstick judge.
#[derive(Debug, Clone)]
pub struct UnpairedJudge {
    condition: Condition,
    looks: Vec<u64>,
    per_test_alpha: f64,
    jobs: u64,
    v1_latency: Vec<u64>,
    v2_latency: Vec<u64>,
    v1_errors: u64,
    v2_errors: u64,
    compared: u64,
    mismatched: u64,
    outcome: Option<(Decision, u64)>,
}

impl UnpairedJudge {
    /// Looks at `min_jobs`, then doubling, up to `budget_jobs` judged pairs (after warm-up); at
    /// the last look without a failure it passes.
    pub fn new(condition: Condition, budget_jobs: u64) -> Self {
        let mut looks = Vec::new();
        let mut look = condition.min_jobs.max(1);
        while look < budget_jobs {
            looks.push(look);
            look *= 2;
        }
        looks.push(budget_jobs.max(1));
        let tests = 3.0;
        let per_test_alpha = condition.false_fail_rate / (tests * looks.len() as f64);
        UnpairedJudge {
            condition,
            looks,
            per_test_alpha,
            jobs: 0,
            v1_latency: Vec::new(),
            v2_latency: Vec::new(),
            v1_errors: 0,
            v2_errors: 0,
            compared: 0,
            mismatched: 0,
            outcome: None,
        }
    }

    /// The decision and the pairs fed when it was reached, once reached.
    pub fn outcome(&self) -> Option<(Decision, u64)> {
        self.outcome
    }

    pub fn observe(&mut self, pair: &PairSample) {
        if self.outcome.is_some() {
            return;
        }
        self.jobs += 1;
        if self.jobs <= self.condition.warmup_jobs {
            return;
        }
        self.v1_latency.push(pair.v1_latency_us);
        self.v2_latency.push(pair.v2_latency_us);
        self.v1_errors += u64::from(!pair.v1_ok);
        self.v2_errors += u64::from(!pair.v2_ok);
        if let Some(matched) = pair.matched {
            self.compared += 1;
            self.mismatched += u64::from(!matched);
        }
        let judged = self.v1_latency.len() as u64;
        if let Some(position) = self.looks.iter().position(|&look| look == judged) {
            self.look(position + 1 == self.looks.len());
        }
    }

    fn look(&mut self, last: bool) {
        let judged = self.v1_latency.len() as u64;
        // Like Kayenta's allowed effect size: v2 is compared after dividing by the median's
        // allowed ratio, so a v2 exactly at the limit is the null, not a regression.
        let allowed_ratio = self
            .condition
            .latency
            .iter()
            .find(|limit| limit.quantile == 0.5)
            .map_or(self.condition.max_paired_ratio, |limit| limit.max_ratio);
        let v2_scaled: Vec<u64> = self
            .v2_latency
            .iter()
            .map(|&v| (v as f64 / allowed_ratio).round() as u64)
            .collect();
        let latency_p = mann_whitney_greater(&self.v1_latency, &v2_scaled);
        let error_p = proportion_increase_p_value(
            self.v1_errors,
            judged,
            self.v2_errors,
            judged,
            self.condition.max_error_rate_increase,
        );
        let mismatch_p = if self.compared == 0 {
            1.0
        } else {
            proportion_increase_p_value(
                0,
                self.compared,
                self.mismatched,
                self.compared,
                self.condition.max_mismatch_rate,
            )
        };
        if latency_p.min(error_p).min(mismatch_p) < self.per_test_alpha {
            self.outcome = Some((Decision::Fail, self.jobs));
        } else if last {
            self.outcome = Some((Decision::Pass, self.jobs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mann_whitney_sees_a_shift_and_not_its_absence() {
        let first: Vec<u64> = (0..500).collect();
        let shifted: Vec<u64> = (100..600).collect();
        assert!(mann_whitney_greater(&first, &shifted) < 1e-6);
        assert!(mann_whitney_greater(&first, &first) > 0.4);
        assert!(mann_whitney_greater(&shifted, &first) > 0.99);
    }

    #[test]
    fn proportion_test_respects_the_margin() {
        assert!(proportion_increase_p_value(100, 10_000, 300, 10_000, 0.005) < 1e-6);
        assert!(proportion_increase_p_value(100, 10_000, 140, 10_000, 0.005) > 0.5);
    }
}
