//! The rollback signal: is v2's probability of ending in a failure from the start state more than
//! `margin` above v1's? Answered by a test that stays valid however often it is looked at, so
//! that the rule `prediction` fails a good v2 with probability at most its share `alpha` of the
//! condition's false-fail rate, however long the rollout simulates.
//!
//! The test counts real objects, once each: an object counts when it entered the start state
//! while the test ran, and its outcome is known when it reaches an end state (an artifact:
//! failure; a success: not). Decayed weights would not do: a sum of weights is no count of
//! independent trials, and no betting martingale rests on it.
//!
//! Each v2 object is paired with one v1 object as they *start* (the newest v1 start not yet
//! paired, or else the next one), and pair `k` is fed to the test only once it and every earlier
//! pair ended. Which objects pair, and the order the test sees them in, depend on start order
//! alone, never on outcomes. Pairing by end order would not do: when failures end sooner (or
//! later) than successes, the first v2 objects to end are mostly failures (or successes), while
//! v1 ends at its steady mix, and an identical v2 would look worse than it is.
//!
//! Each pair gives `x = [v2 failed] - [v1 failed]` in [-1, 1], whose mean is exactly the
//! difference of the two failure probabilities; the judge's `MarginTest` (a test by betting,
//! Ville's inequality) bets that it exceeds `margin`, and the rule fails once its wealth reaches
//! `1/alpha` after at least `min_pairs` pairs.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;
use understudy_judge::sequential::{Evidence, MarginTest};

use crate::chain::Absorbing;

/// The version an object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// v1 (the active version).
    Baseline,
    /// v2 (the simulated candidate).
    Candidate,
}

/// One object of a pair: not assigned yet (v1 only), running, or ended (failed or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Unassigned,
    Running,
    Ended { failed: bool },
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    baseline: Slot,
    candidate: Slot,
}

/// Where a followed object is kept until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Pair number `n` (counted from the test's start).
    Paired(u64),
    /// A v1 object waiting for a v2 partner, by its number among v1 starts.
    Unpaired(u64),
}

/// Pairs formed but not yet fed; past this, new v2 objects are not followed (a choice made on
/// counts alone, so the test stays valid) until the oldest pairs end.
const MAX_OPEN_PAIRS: usize = 65_536;
/// v1 objects waiting for a partner; past this the oldest is let go.
const MAX_UNPAIRED: usize = 4_096;

/// Ended objects of one version among those followed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Ended {
    pub ended: u64,
    pub failed: u64,
}

/// The test's state, for the verdict's details and the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SignalReport {
    pub margin: f64,
    pub alpha: f64,
    /// The wealth `fail_evidence` must reach: 1/alpha.
    pub threshold: f64,
    /// Wealth of the bet that v2's failure probability exceeds v1's by more than `margin`
    /// (capped as the judge's are).
    pub fail_evidence: f64,
    /// Pairs fed to the test (both objects ended, and every earlier pair too).
    pub pairs: u64,
    /// Pairs needed before the rule may fail (`compare.min_starts`).
    pub min_pairs: f64,
    /// Failures among the fed pairs' v1 and v2 objects.
    pub v1_failed: u64,
    pub v2_failed: u64,
    /// Mean of `[v2 failed] - [v1 failed]` over the fed pairs, and its always-valid interval.
    pub estimate: f64,
    pub interval: [f64; 2],
    /// Every followed object that ended so far, per version (some wait for their pair's turn).
    pub v1_ended: Ended,
    pub v2_ended: Ended,
    /// Pairs formed and not yet fed (an object still running, or an earlier pair).
    pub open_pairs: u64,
    /// Whether the rule fails v2.
    pub fails: bool,
}

/// The anytime-valid test of "v2 fails more than `margin` more often than v1" (module doc).
#[derive(Debug, Clone)]
pub struct PairedFailureTest {
    start_state: String,
    absorbing: Absorbing,
    margin: f64,
    alpha: f64,
    min_pairs: f64,
    test: MarginTest,
    /// Pairs in the order they formed; the front one is pair number `first`.
    pairs: VecDeque<Pair>,
    first: u64,
    objects: HashMap<(Side, String), Place>,
    /// v1 objects without a partner (number among v1 starts, id), oldest first, and their slots.
    unpaired: VecDeque<(u64, String)>,
    unpaired_slots: HashMap<u64, Slot>,
    baseline_starts: u64,
    /// Pairs whose v2 object waits for a v1 start, oldest first.
    waiting: VecDeque<u64>,
    fed_failed: [u64; 2],
    ended: [Ended; 2],
    /// Pairs fed when the fail bet first crossed `1/alpha` (with at least `min_pairs`).
    failed_at: Option<u64>,
}

fn index(side: Side) -> usize {
    match side {
        Side::Baseline => 0,
        Side::Candidate => 1,
    }
}

impl PairedFailureTest {
    /// A test from `start_state` (objects ending in `absorbing`'s artifacts fail), failing with
    /// probability at most `alpha` when v2 is within `margin` of v1, never before `min_pairs`.
    /// `alpha` must be in (0, 1).
    pub fn new(
        start_state: &str,
        absorbing: Absorbing,
        margin: f64,
        alpha: f64,
        min_pairs: f64,
    ) -> PairedFailureTest {
        PairedFailureTest {
            start_state: start_state.to_string(),
            absorbing,
            margin,
            alpha,
            min_pairs,
            test: MarginTest::new(margin, -1.0, 1.0, alpha, alpha, alpha),
            pairs: VecDeque::new(),
            first: 0,
            objects: HashMap::new(),
            unpaired: VecDeque::new(),
            unpaired_slots: HashMap::new(),
            baseline_starts: 0,
            waiting: VecDeque::new(),
            fed_failed: [0, 0],
            ended: [Ended::default(); 2],
            failed_at: None,
        }
    }

    /// `object` of `side` entered `state`: a start when it is the start state, an end when it is
    /// an artifact or a success; anything else changes nothing.
    pub fn observe(&mut self, side: Side, object: &str, state: &str) {
        if state == self.start_state {
            self.start(side, object);
        } else if self.absorbing.artifacts.iter().any(|a| a == state) {
            self.end(side, object, true);
        } else if self.absorbing.successes.contains(state) {
            self.end(side, object, false);
        }
    }

    fn start(&mut self, side: Side, object: &str) {
        let key = (side, object.to_string());
        if self.objects.contains_key(&key) {
            return; // back in the start state: still the same object
        }
        match side {
            Side::Candidate => {
                if self.pairs.len() >= MAX_OPEN_PAIRS {
                    return;
                }
                let number = self.first + self.pairs.len() as u64;
                let baseline = match self.unpaired.pop_back() {
                    Some((seq, v1)) => {
                        let slot = self.unpaired_slots.remove(&seq).unwrap_or(Slot::Running);
                        if slot == Slot::Running {
                            self.objects
                                .insert((Side::Baseline, v1), Place::Paired(number));
                        }
                        slot
                    }
                    None => {
                        self.waiting.push_back(number);
                        Slot::Unassigned
                    }
                };
                self.pairs.push_back(Pair {
                    baseline,
                    candidate: Slot::Running,
                });
                self.objects.insert(key, Place::Paired(number));
            }
            Side::Baseline => match self.waiting.pop_front() {
                Some(number) => {
                    self.pair_mut(number).baseline = Slot::Running;
                    self.objects.insert(key, Place::Paired(number));
                }
                None => {
                    if self.unpaired.len() >= MAX_UNPAIRED {
                        if let Some((seq, oldest)) = self.unpaired.pop_front() {
                            if self.unpaired_slots.remove(&seq) == Some(Slot::Running) {
                                self.objects.remove(&(Side::Baseline, oldest));
                            }
                        }
                    }
                    let seq = self.baseline_starts;
                    self.baseline_starts += 1;
                    self.unpaired.push_back((seq, object.to_string()));
                    self.unpaired_slots.insert(seq, Slot::Running);
                    self.objects.insert(key, Place::Unpaired(seq));
                }
            },
        }
    }

    fn pair_mut(&mut self, number: u64) -> &mut Pair {
        let at = (number - self.first) as usize;
        &mut self.pairs[at]
    }

    fn end(&mut self, side: Side, object: &str, failed: bool) {
        // An object counts once: it is let go at its first end.
        let Some(place) = self.objects.remove(&(side, object.to_string())) else {
            return;
        };
        let counts = &mut self.ended[index(side)];
        counts.ended += 1;
        counts.failed += u64::from(failed);
        let slot = Slot::Ended { failed };
        match place {
            Place::Paired(number) => {
                let pair = self.pair_mut(number);
                match side {
                    Side::Baseline => pair.baseline = slot,
                    Side::Candidate => pair.candidate = slot,
                }
                self.feed_ended_pairs();
            }
            Place::Unpaired(seq) => {
                self.unpaired_slots.insert(seq, slot);
            }
        }
    }

    /// Feeds the pairs at the front whose objects both ended, in the order the pairs formed.
    fn feed_ended_pairs(&mut self) {
        while let Some(pair) = self.pairs.front() {
            let (Slot::Ended { failed: v1 }, Slot::Ended { failed: v2 }) =
                (pair.baseline, pair.candidate)
            else {
                return;
            };
            self.pairs.pop_front();
            self.first += 1;
            self.fed_failed[0] += u64::from(v1);
            self.fed_failed[1] += u64::from(v2);
            self.test
                .observe(f64::from(u8::from(v2)) - f64::from(u8::from(v1)));
            let fed = self.test.count();
            if self.failed_at.is_none()
                && fed as f64 >= self.min_pairs
                && self.test.evidence() == Evidence::Fail
            {
                self.failed_at = Some(fed);
            }
        }
    }

    /// Whether the fail bet crossed `1/alpha` (after `min_pairs` pairs): by Ville's inequality
    /// this happens with probability at most `alpha` when v2 is within the margin, at any look.
    pub fn fails(&self) -> bool {
        self.failed_at.is_some()
    }

    /// Pairs fed so far.
    pub fn pairs(&self) -> u64 {
        self.test.count()
    }

    pub fn report(&self) -> SignalReport {
        let margin = self.test.report();
        SignalReport {
            margin: self.margin,
            alpha: self.alpha,
            threshold: margin.fail_threshold,
            fail_evidence: margin.fail_evidence,
            pairs: margin.observations,
            min_pairs: self.min_pairs,
            v1_failed: self.fed_failed[0],
            v2_failed: self.fed_failed[1],
            estimate: margin.estimate,
            interval: margin.interval,
            v1_ended: self.ended[0],
            v2_ended: self.ended[1],
            open_pairs: self.pairs.len() as u64,
            fails: self.fails(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::collections::BTreeSet;

    const FAILURE: &str = "error state failure";

    fn absorbing() -> Absorbing {
        Absorbing {
            artifacts: vec![FAILURE.to_string()],
            successes: BTreeSet::from(["completed".to_string()]),
        }
    }

    fn test(alpha: f64, min_pairs: f64) -> PairedFailureTest {
        PairedFailureTest::new("received", absorbing(), 0.01, alpha, min_pairs)
    }

    fn call(t: &mut PairedFailureTest, side: Side, id: &str, failed: bool) {
        t.observe(side, id, "received");
        t.observe(side, id, "media");
        t.observe(side, id, if failed { FAILURE } else { "completed" });
    }

    /// Calls of both versions interleaved, each ending within a random number of later starts
    /// (failures on either side as likely to end early as late); looks after every event.
    fn run(seed: u64, v1: f64, v2: f64, calls: usize) -> Option<u64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = test(0.01, 0.0);
        let mut running: Vec<(Side, String, bool)> = Vec::new();
        for n in 0..calls {
            for (side, p) in [(Side::Baseline, v1), (Side::Candidate, v2)] {
                let id = format!("{n}");
                t.observe(side, &id, "received");
                running.push((side, id, rng.gen_bool(p)));
            }
            while running.len() > 40 || (!running.is_empty() && rng.gen_bool(0.5)) {
                let (side, id, failed) = running.swap_remove(rng.gen_range(0..running.len()));
                t.observe(side, &id, if failed { FAILURE } else { "completed" });
                if t.fails() {
                    return Some(t.pairs());
                }
            }
        }
        None
    }

    #[test]
    fn an_identical_v2_rarely_fails_however_often_it_is_looked_at() {
        // At the margin's edge (v2 exactly `margin` worse) is the hardest null; alpha 0.01.
        let edge = (0..300)
            .filter(|seed| run(*seed, 0.05, 0.06, 3_000).is_some())
            .count();
        let same = (0..300)
            .filter(|seed| run(1_000 + seed, 0.05, 0.05, 3_000).is_some())
            .count();
        // alpha x runs = 3; the slack covers a 1-in-100 unlucky batch.
        assert!(edge <= 8, "{edge} of 300 runs at the margin failed");
        assert!(same <= 3, "{same} of 300 A/A runs failed");
    }

    #[test]
    fn a_clear_late_failure_regression_fails() {
        let caught: Vec<u64> = (0..20).filter_map(|s| run(s, 0.01, 0.06, 5_000)).collect();
        assert_eq!(caught.len(), 20, "{caught:?}");
        assert!(caught.iter().all(|&n| n < 3_000), "{caught:?}");
    }

    #[test]
    fn each_object_counts_once_whatever_it_reports() {
        let mut t = test(0.01, 0.0);
        call(&mut t, Side::Baseline, "a", false);
        // v2's object loops through the start state and reports its end twice: one object.
        t.observe(Side::Candidate, "b", "received");
        t.observe(Side::Candidate, "b", "media");
        t.observe(Side::Candidate, "b", "received");
        t.observe(Side::Candidate, "b", FAILURE);
        t.observe(Side::Candidate, "b", FAILURE);
        t.observe(Side::Candidate, "b", "completed");
        // Objects never seen starting while the test ran are not counted.
        t.observe(Side::Candidate, "c", "media");
        t.observe(Side::Candidate, "c", FAILURE);
        let report = t.report();
        assert_eq!(report.pairs, 1);
        assert_eq!(
            report.v2_ended,
            Ended {
                ended: 1,
                failed: 1
            }
        );
        assert_eq!(
            report.v1_ended,
            Ended {
                ended: 1,
                failed: 0
            }
        );
        assert_eq!((report.v1_failed, report.v2_failed), (0, 1));
        assert_eq!(report.estimate, 1.0);
    }

    #[test]
    fn pairs_are_fed_in_the_order_they_formed() {
        let mut t = test(0.01, 0.0);
        // Pair 0: v2 "x" waits for a v1 start; pair 1: v2 "y" takes the next v1 start.
        t.observe(Side::Candidate, "x", "received");
        t.observe(Side::Baseline, "p", "received");
        t.observe(Side::Baseline, "q", "received");
        t.observe(Side::Candidate, "y", "received");
        for (side, id) in [
            (Side::Candidate, "y"),
            (Side::Baseline, "q"),
            (Side::Baseline, "p"),
        ] {
            t.observe(side, id, "completed");
        }
        // Pair 1 ended first but waits for pair 0 ("x" still running).
        assert_eq!(t.report().pairs, 0);
        assert_eq!(t.report().open_pairs, 2);
        t.observe(Side::Candidate, "x", FAILURE);
        assert_eq!(t.report().pairs, 2);
        assert_eq!(t.report().v2_failed, 1);
    }

    #[test]
    fn nothing_fails_before_min_pairs() {
        let mut t = test(0.01, 200.0);
        for n in 0..150 {
            call(&mut t, Side::Baseline, &format!("a{n}"), false);
            call(&mut t, Side::Candidate, &format!("b{n}"), true);
        }
        assert!(!t.fails());
        assert!(t.report().fail_evidence >= t.report().threshold);
        for n in 150..200 {
            call(&mut t, Side::Baseline, &format!("a{n}"), false);
            call(&mut t, Side::Candidate, &format!("b{n}"), true);
        }
        assert!(t.fails());
    }
}
