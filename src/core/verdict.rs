//! A rollout's verdict as it is stored, served and read back: the judge's [`Verdict`] with the
//! display numbers of the pairs behind it and what v2 was paired with. One typed value from the
//! judge to the API, the store and the tables; serde only at those edges.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use understudy_judge::{Baseline, Decision, Verdict};
use utoipa::ToSchema;

use crate::core::pairing::{PairFeed, StoredPair};

/// What `GET /api/v1/rollouts/{id}` shows as `verdict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutVerdict {
    #[schema(value_type = String, example = "pass")]
    pub decision: Decision,
    /// A failure so clear that the rollout rolls back at once.
    pub hard: bool,
    /// The rule that decided, in words.
    pub rule: String,
    /// Pairs seen when this verdict was reached.
    pub jobs: u64,
    /// The judge's estimates, intervals and evidence per test.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// The display numbers of the pairs compared when it was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numbers: Option<PairSummary>,
    /// What v2 was paired with, job by job (the judge's v1 side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "control")]
    pub baseline: Option<Baseline>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_note: Option<String>,
}

impl RolloutVerdict {
    /// The judge's verdict with the numbers and the pairing behind it.
    pub fn of(verdict: &Verdict, numbers: &PairNumbers, feed: &PairFeed) -> RolloutVerdict {
        let baseline = if feed.against_control() {
            Baseline::Control
        } else {
            Baseline::Active
        };
        let note = "no control runs the from-version: v2 is judged against the active machines";
        RolloutVerdict {
            numbers: Some(numbers.summary()),
            baseline: Some(baseline),
            baseline_note: feed.fell_back().then(|| note.to_string()),
            ..RolloutVerdict::bare(verdict.clone())
        }
    }

    /// A verdict with nothing around it (the early signal adds the judge's numbers itself).
    pub fn bare(verdict: Verdict) -> RolloutVerdict {
        RolloutVerdict {
            decision: verdict.decision,
            hard: verdict.hard,
            rule: verdict.rule,
            jobs: verdict.jobs,
            details: verdict.details,
            numbers: None,
            baseline: None,
            baseline_note: None,
        }
    }
}

/// One side's display numbers (latencies in µs, rounded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SideSummary {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub error_rate: f64,
    pub errors: u64,
}

/// The display numbers of a rollout's pairs (`numbers` in the API).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PairSummary {
    pub jobs: u64,
    pub v1: SideSummary,
    pub v2: SideSummary,
    /// Pairs whose answers were compared.
    pub compared: u64,
    pub mismatch_rate: f64,
    pub control_jobs: u64,
    pub control_error_rate: f64,
}

/// Latency histograms on shared log-spaced buckets: `bounds_us` has one more entry than each
/// count list; bucket i holds latencies in `[bounds_us[i], bounds_us[i + 1])`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatencyBuckets {
    pub bounds_us: Vec<u64>,
    pub v1: Vec<u64>,
    pub v2: Vec<u64>,
    pub control: Vec<u64>,
}

/// Display numbers of the pairs a rollout compared (the judge keeps the statistics that decide).
#[derive(Debug, Clone)]
pub struct PairNumbers {
    v1: Histogram<u64>,
    v2: Histogram<u64>,
    /// The A/A control's copies (v1 in the simulation pool).
    control: Histogram<u64>,
    pub jobs: u64,
    pub v1_errors: u64,
    pub v2_errors: u64,
    pub compared: u64,
    pub mismatches: u64,
    pub control_jobs: u64,
    pub control_errors: u64,
}

impl Default for PairNumbers {
    fn default() -> Self {
        // Fixed bounds (1 µs .. 1 h): `saturating_record` clamps rather than resizes.
        let histogram = || {
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
        };
        PairNumbers {
            v1: histogram(),
            v2: histogram(),
            control: histogram(),
            jobs: 0,
            v1_errors: 0,
            v2_errors: 0,
            compared: 0,
            mismatches: 0,
            control_jobs: 0,
            control_errors: 0,
        }
    }
}

impl PairNumbers {
    pub fn record(&mut self, pair: &StoredPair) {
        let s = &pair.sample;
        if pair.control {
            self.control_jobs += 1;
            self.control_errors += u64::from(!s.v2_ok);
            self.control.saturating_record(s.v2_latency_us);
            return;
        }
        self.jobs += 1;
        self.v1.saturating_record(s.v1_latency_us);
        self.v2.saturating_record(s.v2_latency_us);
        self.v1_errors += u64::from(!s.v1_ok);
        self.v2_errors += u64::from(!s.v2_ok);
        if let Some(matched) = s.matched {
            self.compared += 1;
            self.mismatches += u64::from(!matched);
        }
    }

    fn ratio(part: u64, whole: u64) -> f64 {
        if whole == 0 {
            0.0
        } else {
            part as f64 / whole as f64
        }
    }

    /// Quantile in seconds of v1 (`false`) or v2 (`true`).
    pub fn quantile_seconds(&self, v2: bool, q: f64) -> f64 {
        let h = if v2 { &self.v2 } else { &self.v1 };
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1e6
        }
    }

    pub fn error_rate(&self, v2: bool) -> f64 {
        Self::ratio(if v2 { self.v2_errors } else { self.v1_errors }, self.jobs)
    }

    pub fn mismatch_rate(&self) -> f64 {
        Self::ratio(self.mismatches, self.compared)
    }

    /// v1's, v2's and the control's latencies counted in `bins` buckets spaced evenly on a log
    /// scale, from the fastest job to the slowest of any of them (the dashboard's overlay).
    pub fn latency_buckets(&self, bins: usize) -> LatencyBuckets {
        let sides = [&self.v1, &self.v2, &self.control];
        let seen = sides.iter().filter(|h| !h.is_empty());
        let low = seen.clone().map(|h| h.min()).min().unwrap_or(0).max(1);
        let high = seen.map(|h| h.max()).max().unwrap_or(0);
        if high == 0 || bins == 0 {
            return LatencyBuckets::default();
        }
        let high = high.max(low + 1) + 1;
        let ratio = (high as f64 / low as f64).powf(1.0 / bins as f64);
        let mut bounds: Vec<u64> = (0..=bins)
            .map(|i| (low as f64 * ratio.powi(i as i32)).round() as u64)
            .collect();
        bounds.dedup();
        if let Some(last) = bounds.last_mut() {
            *last = (*last).max(high);
        }
        // Each recorded value counted once, in the bucket its (HDR-equivalent) value falls in.
        let counts = |h: &Histogram<u64>| {
            let mut counts = vec![0u64; bounds.len() - 1];
            for v in h.iter_recorded() {
                let value = h.highest_equivalent(v.value_iterated_to()).min(high - 1);
                let i = bounds.partition_point(|&b| b <= value).saturating_sub(1);
                let last = counts.len() - 1;
                counts[i.min(last)] += v.count_at_value();
            }
            counts
        };
        LatencyBuckets {
            v1: counts(&self.v1),
            v2: counts(&self.v2),
            control: counts(&self.control),
            bounds_us: bounds,
        }
    }

    pub fn summary(&self) -> PairSummary {
        let side = |v2: bool| SideSummary {
            p50_us: (self.quantile_seconds(v2, 0.5) * 1e6).round(),
            p99_us: (self.quantile_seconds(v2, 0.99) * 1e6).round(),
            p999_us: (self.quantile_seconds(v2, 0.999) * 1e6).round(),
            error_rate: self.error_rate(v2),
            errors: if v2 { self.v2_errors } else { self.v1_errors },
        };
        PairSummary {
            jobs: self.jobs,
            v1: side(false),
            v2: side(true),
            compared: self.compared,
            mismatch_rate: self.mismatch_rate(),
            control_jobs: self.control_jobs,
            control_error_rate: Self::ratio(self.control_errors, self.control_jobs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_judge::PairSample;

    fn pair(control: bool, v1: u64, v2: u64) -> StoredPair {
        StoredPair {
            control,
            job: 0,
            sample: PairSample {
                v1_latency_us: v1,
                v1_ok: true,
                v2_latency_us: v2,
                v2_ok: true,
                matched: None,
            },
            fields: None,
        }
    }

    #[test]
    fn latency_buckets_count_every_job_of_each_side_once() {
        assert_eq!(
            PairNumbers::default().latency_buckets(40),
            LatencyBuckets::default()
        );
        let mut numbers = PairNumbers::default();
        for i in 0..1_000u64 {
            numbers.record(&pair(false, 1_000 + i, 2_000 + 3 * i));
            numbers.record(&pair(true, 1_000 + i, 900 + i));
        }
        let b = numbers.latency_buckets(40);
        assert_eq!(b.bounds_us.len(), b.v1.len() + 1);
        assert!(b.bounds_us.windows(2).all(|w| w[0] < w[1]));
        for side in [&b.v1, &b.v2, &b.control] {
            assert_eq!(side.iter().sum::<u64>(), 1_000);
        }
        // v2 is slower: its mass sits in higher buckets than v1's.
        let mean_bucket =
            |c: &Vec<u64>| c.iter().enumerate().map(|(i, n)| i as u64 * n).sum::<u64>() / 1_000;
        assert!(mean_bucket(&b.v2) > mean_bucket(&b.v1) + 5);
        assert!(b.bounds_us[0] <= 900 && *b.bounds_us.last().unwrap() > 4_997);
    }
}
