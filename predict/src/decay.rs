//! Exponentially decayed counts. Each count carries the timestamp it was last brought up to date, so
//! an update costs O(1) and a read decays the value to the reader's "now" without touching the rest.

use std::time::Duration;

/// Time since an epoch the caller chooses (e.g. the controller's start). Timestamps given to one
/// model should not go backwards; an earlier timestamp is treated as "no time passed".
pub type Timestamp = Duration;

/// How fast old observations lose weight: after one half-life an observation counts half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HalfLife(Duration);

impl HalfLife {
    /// `None` when the half-life is zero (every observation would vanish at once).
    pub fn new(half_life: Duration) -> Option<HalfLife> {
        (!half_life.is_zero()).then_some(HalfLife(half_life))
    }

    pub fn duration(self) -> Duration {
        self.0
    }

    /// The factor a weight recorded at `from` is multiplied by when read at `to`.
    pub fn factor(self, from: Timestamp, to: Timestamp) -> f64 {
        let elapsed = to.saturating_sub(from).as_secs_f64();
        (-elapsed / self.0.as_secs_f64()).exp2()
    }
}

/// A count whose observations lose half their weight every half-life.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecayedCount {
    value: f64,
    as_of: Timestamp,
}

impl DecayedCount {
    /// Adds `weight` observed at `now`.
    pub fn add(&mut self, weight: f64, now: Timestamp, half_life: HalfLife) {
        self.value = self.value_at(now, half_life) + weight;
        self.as_of = self.as_of.max(now);
    }

    /// The decayed value as seen at `now`.
    pub fn value_at(&self, now: Timestamp, half_life: HalfLife) -> f64 {
        self.value * half_life.factor(self.as_of, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_half_life_halves_the_weight() {
        let half_life = HalfLife::new(Duration::from_secs(60)).unwrap();
        let mut count = DecayedCount::default();
        count.add(8.0, Duration::from_secs(0), half_life);
        assert_eq!(count.value_at(Duration::from_secs(60), half_life), 4.0);
        assert_eq!(count.value_at(Duration::from_secs(180), half_life), 1.0);
        count.add(1.0, Duration::from_secs(120), half_life);
        assert!((count.value_at(Duration::from_secs(120), half_life) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn earlier_timestamps_do_not_inflate_counts() {
        let half_life = HalfLife::new(Duration::from_secs(10)).unwrap();
        let mut count = DecayedCount::default();
        count.add(1.0, Duration::from_secs(100), half_life);
        count.add(1.0, Duration::from_secs(50), half_life);
        assert_eq!(count.value_at(Duration::from_secs(100), half_life), 2.0);
    }

    #[test]
    fn zero_half_life_is_refused() {
        assert!(HalfLife::new(Duration::ZERO).is_none());
    }
}
