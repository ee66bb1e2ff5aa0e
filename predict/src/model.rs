//! One service version's model: decayed transition counts and dwell times per state, and the
//! absorbing chain solved from them (cached, re-solved at most once per resolve interval).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::chain::{solve, Absorbing, Outlook, TransitionTable};
use crate::decay::{DecayedCount, HalfLife, Timestamp};
use crate::dwell::{DwellStats, DwellSummary};

/// Which model an object's transitions teach: its service and version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ModelKey {
    pub service: String,
    pub version: String,
}

impl ModelKey {
    pub fn new(service: impl Into<String>, version: impl Into<String>) -> ModelKey {
        ModelKey {
            service: service.into(),
            version: version.into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Solved {
    at: Timestamp,
    outlook: Outlook,
}

#[derive(Debug, Clone)]
pub struct Model {
    half_life: HalfLife,
    counts: BTreeMap<String, BTreeMap<String, DecayedCount>>,
    /// States in the order first seen, so reports follow the objects' life.
    order: Vec<String>,
    dwell: BTreeMap<String, DwellStats>,
    solved: Option<Solved>,
    changed_since_solve: bool,
}

impl Model {
    pub fn new(half_life: HalfLife) -> Model {
        Model {
            half_life,
            counts: BTreeMap::new(),
            order: Vec::new(),
            dwell: BTreeMap::new(),
            solved: None,
            changed_since_solve: false,
        }
    }

    /// Notes a state an object was first seen in (no transition into it is known).
    pub fn note_state(&mut self, state: &str) {
        if !self.order.iter().any(|known| known == state) {
            self.order.push(state.to_string());
            self.changed_since_solve = true;
        }
    }

    /// Records that an object moved `from -> to` at `now` after `dwell` in `from`. O(1) in the size
    /// of the model (decay is applied lazily to the one count touched).
    pub fn record(&mut self, from: &str, to: &str, dwell: Duration, now: Timestamp) {
        self.note_state(from);
        self.note_state(to);
        self.counts
            .entry(from.to_string())
            .or_default()
            .entry(to.to_string())
            .or_default()
            .add(1.0, now, self.half_life);
        self.dwell
            .entry(from.to_string())
            .or_default()
            .record(dwell, now, self.half_life);
        self.changed_since_solve = true;
    }

    /// The transition counts as seen at `now` (decayed).
    pub fn table(&self, now: Timestamp) -> TransitionTable {
        let mut table = TransitionTable::new();
        for state in &self.order {
            table.note_state(state);
        }
        for (from, row) in &self.counts {
            for (to, count) in row {
                table.add(from, to, count.value_at(now, self.half_life));
            }
        }
        table
    }

    pub fn dwell(&self, state: &str) -> Option<&DwellStats> {
        self.dwell.get(state)
    }

    /// Dwell summaries per state as seen at `now`.
    pub fn dwell_summaries(&self, now: Timestamp) -> BTreeMap<String, DwellSummary> {
        self.dwell
            .iter()
            .map(|(state, stats)| (state.clone(), stats.summary(now, self.half_life)))
            .collect()
    }

    /// Solves the chain afresh.
    pub fn solve(&self, now: Timestamp, absorbing: &Absorbing) -> Outlook {
        let mean_dwell = self
            .dwell
            .iter()
            .map(|(state, stats)| (state.clone(), stats.mean_secs()))
            .collect();
        solve(&self.table(now), absorbing, &mean_dwell)
    }

    /// The chain's solution, re-solved when something changed and the last solve is at least
    /// `resolve_interval` old (solving is O(states³): not on every message at high rates).
    pub fn outlook(
        &mut self,
        now: Timestamp,
        absorbing: &Absorbing,
        resolve_interval: Duration,
    ) -> &Outlook {
        let stale = match &self.solved {
            None => true,
            Some(solved) => {
                let age = now.saturating_sub(solved.at);
                // Without new data the probabilities stay put, but the evidence behind them
                // (departure weights, checked against alerts.min_exits) decays.
                (self.changed_since_solve && age >= resolve_interval)
                    || age >= self.half_life.duration() / 8
            }
        };
        if stale {
            let outlook = self.solve(now, absorbing);
            self.changed_since_solve = false;
            self.solved = Some(Solved { at: now, outlook });
        }
        &self.solved.as_ref().expect("solved just above").outlook
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn absorbing() -> Absorbing {
        Absorbing {
            artifacts: vec!["error state failure".to_string()],
            successes: BTreeSet::from(["ok".to_string()]),
        }
    }

    #[test]
    fn recent_transitions_outweigh_old_ones() {
        let half_life = HalfLife::new(Duration::from_secs(60)).unwrap();
        let mut model = Model::new(half_life);
        let at = Duration::from_secs;
        // Long ago, a state always failed; lately it always succeeds.
        for _ in 0..30 {
            model.record("s", "error state failure", at(1), at(0));
        }
        for _ in 0..30 {
            model.record("s", "ok", at(1), at(600));
        }
        let table = model.table(at(600));
        let old_weight = table.count("s", "error state failure");
        assert!((old_weight - 30.0 / 1024.0).abs() < 1e-9, "{old_weight}");
        let p = model
            .solve(at(600), &absorbing())
            .probability("s", "error state failure")
            .unwrap();
        assert!((p - 1.0 / 1025.0).abs() < 1e-9, "{p}");
        // Without decay (read at the time of the old data) it would be all failure.
        let then = model.table(at(0));
        assert!(then.count("s", "error state failure") >= 30.0);
    }

    #[test]
    fn outlook_is_resolved_only_after_the_interval() {
        let half_life = HalfLife::new(Duration::from_secs(600)).unwrap();
        let mut model = Model::new(half_life);
        let at = Duration::from_secs;
        model.record("s", "ok", at(1), at(0));
        let interval = Duration::from_secs(5);
        let p = |m: &mut Model, t| {
            m.outlook(at(t), &absorbing(), interval)
                .probability("s", "error state failure")
                .unwrap()
        };
        assert_eq!(p(&mut model, 0), 0.0);
        model.record("s", "error state failure", at(1), at(1));
        assert_eq!(p(&mut model, 1), 0.0, "cached until the interval passed");
        assert!(p(&mut model, 5) > 0.4);
    }
}
