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

/// How a test by betting chooses its stakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Betting {
    /// A mixture over constant bets from 0 to (almost) the largest safe one, each weighted in
    /// proportion to its size: the wealth is the weighted average of the wealths of every
    /// constant bettor. Each of those is a nonnegative supermartingale under the null, so any
    /// fixed average of them is too. Weighting towards large bets favours the judge's common
    /// case, one-sided data near the margin (pass evidence, error counts), at some cost on rare
    /// events where small bets win (the ablation is in `judge-bench`). It bets nearly everything
    /// when the data are one-sided (a tail exceedance only v2 shows: wealth nearly doubles on each),
    /// which an online plug-in bet capped at half the safe stake can never do.
    #[default]
    Mixture,
    /// The same mixture with every bet weighing the same (kept for the ablation in `judge-bench`).
    UniformMixture,
    /// aGRAPA: an online Kelly fraction from past data, capped at half the safe stake (kept for
    /// the ablation in `judge-bench`).
    Agrapa,
}

/// aGRAPA's cap: the largest fraction of the maximal safe bet ever staked; halving keeps the
/// wealth from collapsing on one unlucky pair (the usual choice in the betting literature).
const BET_FRACTION_CAP: f64 = 0.5;

/// Constant bets in the mixture, evenly spaced over (0, largest safe bet); bet `k` of `n` weighs
/// `2k / (n + 1)`, so the weights average to 1.
const MIXTURE_BETS: usize = 48;

/// The largest constant bet of the mixture, as a fraction of the bet that loses everything on the
/// worst observation: one worst observation then keeps 1/1000 of that bettor's wealth.
const MIXTURE_BET_CAP: f64 = 0.999;

/// Distinct values whose per-bet log gains are remembered: every statistic of the judge takes a
/// handful of values (indicators and their differences), so an observation costs additions only.
const REMEMBERED_VALUES: usize = 8;

/// A test by betting against `mean <= margin` (Side::Above) or `mean >= margin` (Side::Below).
#[derive(Debug, Clone)]
struct BettingTest {
    side: Side,
    margin: f64,
    stakes: Stakes,
}

#[derive(Debug, Clone)]
enum Stakes {
    Mixture(Mixture),
    Agrapa(Agrapa),
}

/// The mixture's per-bet log wealths, with the log gains of values seen before.
#[derive(Debug, Clone)]
struct Mixture {
    bets: Vec<f64>,
    /// Each bettor's log of weight times wealth (it starts at the log of its prior weight).
    log_wealths: Vec<f64>,
    /// The largest of `log_wealths`: the mixture's log wealth is within `ln(MIXTURE_BETS)` below.
    top: f64,
    remembered: Vec<(f64, Vec<f64>)>,
}

#[derive(Debug, Clone)]
struct Agrapa {
    log_wealth: f64,
    max_bet: f64,
    count: f64,
    sum_gain: f64,
    sum_gain_sq: f64,
}

impl Mixture {
    /// `by_size`: bets weigh in proportion to their size; otherwise all alike.
    fn new(worst_loss: f64, by_size: bool) -> Self {
        let largest = MIXTURE_BET_CAP / worst_loss.max(f64::EPSILON);
        let bets = (0..MIXTURE_BETS)
            .map(|k| largest * (k as f64 + 1.0) / MIXTURE_BETS as f64)
            .collect();
        let n = MIXTURE_BETS as f64;
        let log_wealths: Vec<f64> = (1..=MIXTURE_BETS)
            .map(|k| match by_size {
                true => (2.0 * k as f64 / (n + 1.0)).ln(),
                false => 0.0,
            })
            .collect();
        let top = log_wealths
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        Mixture {
            bets,
            log_wealths,
            top,
            remembered: Vec::new(),
        }
    }

    fn log_wealth(&self) -> f64 {
        log_mean_exp(&self.log_wealths)
    }

    /// Whether the log wealth is at least `level`; exact, and cheap far from it.
    fn reaches(&self, level: f64) -> bool {
        if self.top < level {
            false
        } else if self.top - (MIXTURE_BETS as f64).ln() >= level {
            true
        } else {
            self.log_wealth() >= level
        }
    }

    /// Adds one observation's gain.
    fn observe(&mut self, gain: f64) {
        let position = self.remembered.iter().position(|(g, _)| *g == gain);
        let logs = match position {
            Some(index) => &self.remembered[index].1,
            None => {
                let logs: Vec<f64> = self.bets.iter().map(|b| (1.0 + b * gain).ln()).collect();
                if self.remembered.len() == REMEMBERED_VALUES {
                    self.remembered.remove(0);
                }
                self.remembered.push((gain, logs));
                &self.remembered.last().expect("just pushed").1
            }
        };
        let mut top = f64::NEG_INFINITY;
        for (wealth, log_gain) in self.log_wealths.iter_mut().zip(logs) {
            *wealth += log_gain;
            top = top.max(*wealth);
        }
        self.top = top;
    }
}

/// `ln(mean(exp(x)))`, computed without overflow.
fn log_mean_exp(values: &[f64]) -> f64 {
    let top = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !top.is_finite() {
        return top;
    }
    let sum: f64 = values.iter().map(|v| (v - top).exp()).sum();
    top + (sum / values.len() as f64).ln()
}

impl Agrapa {
    /// Adds one observation's gain.
    fn observe(&mut self, gain: f64) {
        // One pseudo-observation of zero gain shrinks early bets towards zero, and a small prior
        // second moment keeps the very first bets from jumping to the cap.
        let mean_gain = self.sum_gain / (self.count + 1.0);
        let second_moment = (self.sum_gain_sq + 1e-4) / (self.count + 1.0);
        let bet = (mean_gain / second_moment).clamp(0.0, self.max_bet);
        self.count += 1.0;
        self.sum_gain += gain;
        self.sum_gain_sq += gain * gain;
        self.log_wealth += (1.0 + bet * gain).ln();
    }
}

impl BettingTest {
    fn new(side: Side, margin: f64, low: f64, high: f64, betting: Betting) -> Self {
        // Every bet must keep 1 + bet * gain >= 0 for the worst gain the statistic allows.
        let worst_loss = match side {
            Side::Above => margin - low,
            Side::Below => high - margin,
        };
        let stakes = match betting {
            Betting::Mixture => Stakes::Mixture(Mixture::new(worst_loss, true)),
            Betting::UniformMixture => Stakes::Mixture(Mixture::new(worst_loss, false)),
            Betting::Agrapa => Stakes::Agrapa(Agrapa {
                log_wealth: 0.0,
                max_bet: BET_FRACTION_CAP / worst_loss.max(f64::EPSILON),
                count: 0.0,
                sum_gain: 0.0,
                sum_gain_sq: 0.0,
            }),
        };
        BettingTest {
            side,
            margin,
            stakes,
        }
    }

    fn gain(&self, x: f64) -> f64 {
        match self.side {
            Side::Above => x - self.margin,
            Side::Below => self.margin - x,
        }
    }

    fn observe(&mut self, x: f64) {
        let gain = self.gain(x);
        match &mut self.stakes {
            Stakes::Mixture(mixture) => mixture.observe(gain),
            Stakes::Agrapa(agrapa) => agrapa.observe(gain),
        }
    }

    fn log_wealth(&self) -> f64 {
        match &self.stakes {
            Stakes::Mixture(mixture) => mixture.log_wealth(),
            Stakes::Agrapa(agrapa) => agrapa.log_wealth,
        }
    }

    /// Whether the wealth is at least `exp(level)`.
    fn reaches(&self, level: f64) -> bool {
        match &self.stakes {
            Stakes::Mixture(mixture) => mixture.reaches(level),
            Stakes::Agrapa(agrapa) => agrapa.log_wealth >= level,
        }
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

/// A test's error rates: of failing within the margin, of passing beyond it, and of the interval
/// missing the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alphas {
    pub fail: f64,
    pub pass: f64,
    pub interval: f64,
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
        let alphas = Alphas {
            fail: fail_alpha,
            pass: pass_alpha,
            interval: interval_alpha,
        };
        MarginTest::with_betting(margin, low, high, alphas, Betting::default())
    }

    /// [`MarginTest::new`] with the stakes chosen by `betting`.
    pub fn with_betting(
        margin: f64,
        low: f64,
        high: f64,
        alphas: Alphas,
        betting: Betting,
    ) -> Self {
        let (fail_alpha, pass_alpha, interval_alpha) = (alphas.fail, alphas.pass, alphas.interval);
        MarginTest {
            fail_test: BettingTest::new(Side::Above, margin, low, high, betting),
            pass_test: BettingTest::new(Side::Below, margin, low, high, betting),
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
        if self.fail_test.reaches(self.log_fail_threshold) {
            Evidence::Fail
        } else if self.pass_test.reaches(self.log_pass_threshold) {
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
            fail_evidence: reported_evidence(self.fail_test.log_wealth()),
            fail_threshold: self.log_fail_threshold.exp(),
            pass_evidence: reported_evidence(self.pass_test.log_wealth()),
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

    /// Observations of +1 only (a tail exceedance only v2 shows), margin 0, statistic in [-1, 1].
    fn one_sided_wealth(betting: Betting, count: usize) -> f64 {
        let alphas = Alphas {
            fail: 0.001,
            pass: 0.05,
            interval: 0.01,
        };
        let mut test = MarginTest::with_betting(0.0, -1.0, 1.0, alphas, betting);
        for _ in 0..count {
            test.observe(1.0);
        }
        test.report().fail_evidence
    }

    #[test]
    fn the_mixture_starts_with_a_wealth_of_one() {
        for by_size in [true, false] {
            let mixture = Mixture::new(1.0, by_size);
            assert!(
                mixture.log_wealth().abs() < 1e-12,
                "{}",
                mixture.log_wealth()
            );
            assert!(mixture.reaches(-1e-9) && !mixture.reaches(1e-9));
        }
    }

    #[test]
    fn the_mixture_bets_nearly_everything_on_one_sided_data() {
        // Weighted 2b over bets b in (0, 1): about 2^(n+2) / (n + 2); 14 pairs reach 4000.
        let mixture = one_sided_wealth(Betting::Mixture, 14);
        assert!(mixture > 3000.0, "{mixture}");
        // Uniform over bets in (0, 1): about (2^(n+1) - 1) / (n + 1); 14 pairs reach 1000.
        let uniform = one_sided_wealth(Betting::UniformMixture, 14);
        assert!(uniform > 1000.0 && uniform < mixture, "{uniform}");
        // aGRAPA stakes at most half the safe bet: 1.5^14 = 292 at the very best.
        let agrapa = one_sided_wealth(Betting::Agrapa, 14);
        assert!(agrapa < 292.0, "{agrapa}");
    }

    #[test]
    fn the_mixture_holds_its_level_on_a_three_valued_statistic_at_the_margin() {
        // The error test's statistic (v2 error - v1 error) with a mean exactly at the margin,
        // looked at after every pair.
        let margin = 0.005;
        let alphas = Alphas {
            fail: 0.01,
            pass: 0.05,
            interval: 0.01,
        };
        let failures = (0..200u64)
            .filter(|seed| {
                let mut rng = StdRng::seed_from_u64(*seed);
                let mut test =
                    MarginTest::with_betting(margin, -1.0, 1.0, alphas, Betting::Mixture);
                (0..4000).any(|_| {
                    let u: f64 = rng.gen();
                    let x = if u < 0.010 + margin / 2.0 {
                        1.0
                    } else if u < 0.020 {
                        -1.0
                    } else {
                        0.0
                    };
                    test.observe(x);
                    test.evidence() == Evidence::Fail
                })
            })
            .count();
        assert!(failures <= 6, "{failures} of 200 runs failed at alpha 0.01");
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
