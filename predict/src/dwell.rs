//! Time spent in one state: an exponentially weighted mean and a recent-window histogram, from
//! which a high quantile and the chance of outlasting a dwell limit are read.
//!
//! Recency for the histogram comes from two windows, each one half-life long: the quantiles read the
//! current and the previous window, and the window older than that is dropped. (hdrhistogram counts
//! cannot decay smoothly; windows are the usual way to age them.)

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::decay::{DecayedCount, HalfLife, Timestamp};

/// Dwell times are kept in milliseconds, up to a week, to two significant digits (1%).
const HIGHEST_MS: u64 = 7 * 24 * 3600 * 1000;
const SIGNIFICANT_DIGITS: u8 = 2;

#[derive(Debug, Clone)]
pub struct DwellStats {
    weight: DecayedCount,
    mean_secs: f64,
    current: Histogram<u64>,
    previous: Histogram<u64>,
    window_started: Timestamp,
}

/// What the dwell statistics of a state say, for reports and the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DwellSummary {
    /// Decayed number of departures the mean rests on.
    pub samples: f64,
    pub mean_secs: f64,
    /// 99th percentile over the last one to two half-lives.
    pub p99_secs: f64,
    pub max_secs: f64,
}

impl Default for DwellStats {
    fn default() -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, HIGHEST_MS, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid")
        };
        DwellStats {
            weight: DecayedCount::default(),
            mean_secs: 0.0,
            current: histogram(),
            previous: histogram(),
            window_started: Timestamp::ZERO,
        }
    }
}

impl DwellStats {
    /// Records that an object left the state after `dwell`, at `now`.
    pub fn record(&mut self, dwell: Duration, now: Timestamp, half_life: HalfLife) {
        self.rotate(now, half_life);
        let earlier = self.weight.value_at(now, half_life);
        self.weight.add(1.0, now, half_life);
        // Decayed-weight running mean: the new sample weighs 1 against the decayed weight so far.
        self.mean_secs += (dwell.as_secs_f64() - self.mean_secs) / (earlier + 1.0);
        self.current.saturating_record(millis(dwell));
    }

    fn rotate(&mut self, now: Timestamp, half_life: HalfLife) {
        let age = now.saturating_sub(self.window_started);
        if age < half_life.duration() {
            return;
        }
        if age >= half_life.duration() * 2 {
            self.previous.reset();
        } else {
            std::mem::swap(&mut self.previous, &mut self.current);
        }
        self.current.reset();
        self.window_started = now;
    }

    /// Decayed number of departures seen at `now`.
    pub fn samples(&self, now: Timestamp, half_life: HalfLife) -> f64 {
        self.weight.value_at(now, half_life)
    }

    pub fn mean_secs(&self) -> f64 {
        self.mean_secs
    }

    /// Departures in the recent windows that took at least `dwell`.
    pub fn count_at_least(&self, dwell: Duration) -> u64 {
        let at_least = |h: &Histogram<u64>| h.count_between(millis(dwell), u64::MAX);
        at_least(&self.current) + at_least(&self.previous)
    }

    /// Of the recent departures that took at least `elapsed`, the fraction that took at least
    /// `limit`: the chance that an object already `elapsed` into the state reaches the limit.
    /// `None` when fewer than `min_samples` departures took `elapsed` or longer.
    pub fn chance_to_reach(
        &self,
        limit: Duration,
        elapsed: Duration,
        min_samples: u64,
    ) -> Option<f64> {
        let survivors = self.count_at_least(elapsed.min(limit));
        if survivors == 0 || survivors < min_samples {
            return None;
        }
        Some(self.count_at_least(limit) as f64 / survivors as f64)
    }

    pub fn summary(&self, now: Timestamp, half_life: HalfLife) -> DwellSummary {
        let mut recent = self.current.clone();
        recent
            .add(&self.previous)
            .expect("histograms with equal bounds add");
        let seconds = |ms: u64| ms as f64 / 1000.0;
        DwellSummary {
            samples: self.samples(now, half_life),
            mean_secs: self.mean_secs,
            p99_secs: if recent.is_empty() {
                0.0
            } else {
                seconds(recent.value_at_quantile(0.99))
            },
            max_secs: seconds(recent.max()),
        }
    }
}

fn millis(dwell: Duration) -> u64 {
    u64::try_from(dwell.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn mean_and_quantile_follow_the_samples() {
        let half_life = HalfLife::new(secs(3600)).unwrap();
        let mut stats = DwellStats::default();
        for i in 1..=100 {
            stats.record(Duration::from_millis(i * 10), secs(i), half_life);
        }
        let summary = stats.summary(secs(100), half_life);
        // Recent samples weigh a little more, so the mean sits just above the plain mean 0.505 s.
        assert!(
            summary.mean_secs > 0.505 && summary.mean_secs < 0.52,
            "{summary:?}"
        );
        assert!((summary.p99_secs - 0.99).abs() < 0.02, "{summary:?}");
        assert!(summary.samples > 98.0 && summary.samples < 100.0);
    }

    #[test]
    fn old_windows_are_forgotten() {
        let half_life = HalfLife::new(secs(60)).unwrap();
        let mut stats = DwellStats::default();
        stats.record(secs(50), secs(0), half_life);
        stats.record(secs(1), secs(61), half_life);
        assert_eq!(
            stats.count_at_least(secs(10)),
            1,
            "previous window still counts"
        );
        stats.record(secs(1), secs(200), half_life);
        assert_eq!(stats.count_at_least(secs(10)), 0);
        let max = stats.summary(secs(200), half_life).max_secs;
        assert!((1.0..1.02).contains(&max), "{max}");
    }

    #[test]
    fn chance_to_reach_the_limit_rises_with_time_spent() {
        let half_life = HalfLife::new(secs(3600)).unwrap();
        let mut stats = DwellStats::default();
        // 80 objects leave after 1 s, 15 after 5 s, 5 are stopped at the 10 s limit.
        for (dwell, n) in [(1, 80), (5, 15), (10, 5)] {
            for _ in 0..n {
                stats.record(secs(dwell), secs(10), half_life);
            }
        }
        let limit = secs(10);
        assert_eq!(stats.chance_to_reach(limit, Duration::ZERO, 1), Some(0.05));
        assert_eq!(stats.chance_to_reach(limit, secs(2), 1), Some(0.25));
        assert_eq!(stats.chance_to_reach(limit, secs(6), 1), Some(1.0));
        assert_eq!(stats.chance_to_reach(limit, secs(6), 6), None);
    }
}
