//! Sequential tests that stay valid however often they are looked at.
//!
//! Each metric is a bounded per-pair statistic `x` in `[low, high]` whose mean says how much worse
//! v2 is (e.g. `v2_error - v1_error`). Two tests by betting (Shafer, Vovk; Waudby-Smith & Ramdas
//! 2023) run on it: one bets that the mean exceeds the margin (evidence for "fail"), the other that
//! it stays below (evidence for "pass"). Under its null hypothesis each wealth process is a
//! nonnegative supermartingale starting at 1, so by Ville's inequality it ever reaches `1/alpha`
//! with probability at most `alpha`: the error rate holds at every look, with optional stopping.
//! The running interval is the predictable plug-in empirical-Bernstein confidence sequence
//! (Waudby-Smith & Ramdas 2023, Theorem 2), also valid at all times; it is reported, not decided on.

use serde::Serialize;

/// Which side of the margin a wealth process bets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Bets the mean is above the margin: rejects "v2 is within the margin".
    Above,
    /// Bets the mean is below the margin: rejects "v2 breaks the margin".
    Below,
}

/// The largest fraction of the maximal safe bet ever staked; halving keeps the wealth from
/// collapsing on one unlucky pair (the usual choice in the betting literature).
const BET_FRACTION_CAP: f64 = 0.5;

/// A test by betting against `mean <= margin` (Side::Above) or `mean >= margin` (Side::Below),
/// with the aGRAPA bet (an online Kelly fraction from past data only, so the bet is predictable).
#[derive(Debug, Clone)]
struct BettingTest {
    side: Side,
    margin: f64,
    max_bet: f64,
    log_wealth: f64,
    count: f64,
    sum_gain: f64,
    sum_gain_sq: f64,
}

impl BettingTest {
    fn new(side: Side, margin: f64, low: f64, high: f64) -> Self {
        // The bet must keep 1 + bet * gain >= 0 for the worst gain the statistic allows.
        let worst_loss = match side {
            Side::Above => margin - low,
            Side::Below => high - margin,
        };
        BettingTest {
            side,
            margin,
            max_bet: BET_FRACTION_CAP / worst_loss.max(f64::EPSILON),
            log_wealth: 0.0,
            count: 0.0,
            sum_gain: 0.0,
            sum_gain_sq: 0.0,
        }
    }

    fn gain(&self, x: f64) -> f64 {
        match self.side {
            Side::Above => x - self.margin,
            Side::Below => self.margin - x,
        }
    }

    fn observe(&mut self, x: f64) {
        // One pseudo-observation of zero gain shrinks early bets towards zero, and a small prior
        // second moment keeps the very first bets from jumping to the cap.
        let mean_gain = self.sum_gain / (self.count + 1.0);
        let second_moment = (self.sum_gain_sq + 1e-4) / (self.count + 1.0);
        let bet = (mean_gain / second_moment).clamp(0.0, self.max_bet);
        let gain = self.gain(x);
        self.log_wealth += (1.0 + bet * gain).ln();
        self.count += 1.0;
        self.sum_gain += gain;
        self.sum_gain_sq += gain * gain;
    }
}

/// The predictable plug-in empirical-Bernstein confidence sequence for a mean in `[low, high]`.
#[derive(Debug, Clone)]
struct ConfidenceSequence {
    low: f64,
    high: f64,
    log_two_over_alpha: f64,
    count: f64,
    sum_unit: f64,
    sum_sq_dev: f64,
    sum_lambda: f64,
    sum_lambda_x: f64,
    sum_penalty: f64,
}

impl ConfidenceSequence {
    fn new(low: f64, high: f64, alpha: f64) -> Self {
        ConfidenceSequence {
            low,
            high,
            log_two_over_alpha: (2.0 / alpha).ln(),
            count: 0.0,
            sum_unit: 0.0,
            sum_sq_dev: 0.0,
            sum_lambda: 0.0,
            sum_lambda_x: 0.0,
            sum_penalty: 0.0,
        }
    }

    fn observe(&mut self, x: f64) {
        let unit = ((x - self.low) / (self.high - self.low)).clamp(0.0, 1.0);
        let t = self.count + 1.0;
        let mean_before = (0.5 + self.sum_unit) / t;
        let variance_before = (0.25 + self.sum_sq_dev) / t;
        let lambda = (2.0 * self.log_two_over_alpha / (variance_before * t * (1.0 + t).ln()))
            .sqrt()
            .min(0.5);
        let psi = (-(1.0 - lambda).ln() - lambda) / 4.0;
        self.sum_penalty += 4.0 * (unit - mean_before).powi(2) * psi;
        self.sum_lambda += lambda;
        self.sum_lambda_x += lambda * unit;
        self.count = t;
        self.sum_unit += unit;
        let mean_after = (0.5 + self.sum_unit) / (t + 1.0);
        self.sum_sq_dev += (unit - mean_after).powi(2);
    }

    /// The interval for the mean on the statistic's own scale.
    fn interval(&self) -> (f64, f64) {
        if self.sum_lambda == 0.0 {
            return (self.low, self.high);
        }
        let center = self.sum_lambda_x / self.sum_lambda;
        let half = (self.log_two_over_alpha + self.sum_penalty) / self.sum_lambda;
        let scale = self.high - self.low;
        (
            self.low + scale * (center - half).clamp(0.0, 1.0),
            self.low + scale * (center + half).clamp(0.0, 1.0),
        )
    }
}

/// Reported wealths are capped: past any threshold the exact (possibly astronomical) figure says
/// nothing more, and JSON has no infinity.
pub const REPORTED_EVIDENCE_CAP: f64 = 1e12;

fn reported_evidence(log_wealth: f64) -> f64 {
    log_wealth.min(REPORTED_EVIDENCE_CAP.ln()).exp()
}

/// Where one metric's evidence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// The fail test crossed its threshold: v2 breaks the margin.
    Fail,
    /// The pass test is above its threshold now: v2 is within the margin.
    Pass,
    /// Neither, yet.
    Open,
}

/// A metric judged by a pair of betting tests plus a running interval for its mean.
#[derive(Debug, Clone)]
pub struct MarginTest {
    fail_test: BettingTest,
    pass_test: BettingTest,
    interval: ConfidenceSequence,
    log_fail_threshold: f64,
    log_pass_threshold: f64,
    count: u64,
    sum: f64,
}

/// The numbers behind one metric's evidence (serialized into verdict details).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarginReport {
    pub observations: u64,
    /// Mean of the statistic so far.
    pub estimate: f64,
    /// Always-valid interval for the mean at the overall false-fail level.
    pub interval: [f64; 2],
    pub margin: f64,
    /// Wealth of the bet that v2 breaks the margin (fails at `fail_threshold`), capped at
    /// `REPORTED_EVIDENCE_CAP`.
    pub fail_evidence: f64,
    pub fail_threshold: f64,
    /// Wealth of the bet that v2 is within the margin (passes at `pass_threshold`), capped.
    pub pass_evidence: f64,
    pub pass_threshold: f64,
    pub evidence: Evidence,
}

impl MarginTest {
    /// A test of `mean(x) <= margin` for a statistic bounded in `[low, high]`, failing with
    /// probability at most `fail_alpha` when the mean is within the margin and passing with
    /// probability at most `pass_alpha` when it is not.
    pub fn new(
        margin: f64,
        low: f64,
        high: f64,
        fail_alpha: f64,
        pass_alpha: f64,
        interval_alpha: f64,
    ) -> Self {
        MarginTest {
            fail_test: BettingTest::new(Side::Above, margin, low, high),
            pass_test: BettingTest::new(Side::Below, margin, low, high),
            interval: ConfidenceSequence::new(low, high, interval_alpha),
            log_fail_threshold: (1.0 / fail_alpha).ln(),
            log_pass_threshold: (1.0 / pass_alpha).ln(),
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, x: f64) {
        self.fail_test.observe(x);
        self.pass_test.observe(x);
        self.interval.observe(x);
        self.count += 1;
        self.sum += x;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Fail as soon as the fail bet has ever crossed is what Ville allows; we check after every
    /// observation, so "now above" is the same as "crossed".
    pub fn evidence(&self) -> Evidence {
        if self.fail_test.log_wealth >= self.log_fail_threshold {
            Evidence::Fail
        } else if self.pass_test.log_wealth >= self.log_pass_threshold {
            Evidence::Pass
        } else {
            Evidence::Open
        }
    }

    pub fn report(&self) -> MarginReport {
        let (low, high) = self.interval.interval();
        MarginReport {
            observations: self.count,
            estimate: if self.count == 0 {
                0.0
            } else {
                self.sum / self.count as f64
            },
            interval: [low, high],
            margin: self.fail_test.margin,
            fail_evidence: reported_evidence(self.fail_test.log_wealth),
            fail_threshold: self.log_fail_threshold.exp(),
            pass_evidence: reported_evidence(self.pass_test.log_wealth),
            pass_threshold: self.log_pass_threshold.exp(),
            evidence: self.evidence(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn run(
        mean_of_bernoulli: f64,
        margin: f64,
        seed: u64,
        n: usize,
    ) -> (MarginTest, Option<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut test = MarginTest::new(margin, 0.0, 1.0, 0.01, 0.05, 0.01);
        let mut failed_at = None;
        for i in 0..n {
            let x = if rng.gen_bool(mean_of_bernoulli) {
                1.0
            } else {
                0.0
            };
            test.observe(x);
            if failed_at.is_none() && test.evidence() == Evidence::Fail {
                failed_at = Some(i + 1);
            }
        }
        (test, failed_at)
    }

    #[test]
    fn null_rarely_fails_under_continuous_monitoring() {
        // Mean exactly at the margin: the hardest null. Checked after every observation.
        let failures = (0..200)
            .filter(|seed| run(0.05, 0.05, *seed, 3000).1.is_some())
            .count();
        assert!(failures <= 4, "{failures} of 200 runs failed at alpha 0.01");
    }

    #[test]
    fn clear_excess_fails_early_and_clear_margin_passes() {
        let (_, failed_at) = run(0.20, 0.05, 7, 5000);
        assert!(failed_at.unwrap() < 500, "{failed_at:?}");
        let (test, failed_at) = run(0.01, 0.05, 7, 5000);
        assert_eq!(failed_at, None);
        assert_eq!(test.evidence(), Evidence::Pass);
    }

    #[test]
    fn interval_covers_the_mean_and_shrinks() {
        let (test, _) = run(0.3, 0.5, 3, 20000);
        let report = test.report();
        assert!(
            report.interval[0] < 0.3 && report.interval[1] > 0.3,
            "{report:?}"
        );
        assert!(report.interval[1] - report.interval[0] < 0.05, "{report:?}");
    }
}
