//! How much of callers' traffic a service's balancer copies while its rollout is judged, when
//! the service sets a `mirror_budget` instead of a fixed `mirror_fraction`. Pure: the runtime
//! measures the callers' job rate ([`CallerRate`]), reads where the judge stands
//! ([`JudgeState::of`]) and asks [`steer`] whether the fraction in force should change.
//!
//! The judge needs a number of pairs, not an amount of time: copying faster only decides sooner.
//! So while any test is open the balancer copies as much as the budget allows (never less than
//! the watch fraction, so judging never stalls); once the judge passed v2 and the rollout waits
//! (approval) only the watch fraction is copied, enough to catch a v2 that turns bad; after a
//! fail nothing more is needed. A new config costs a version and a push, so the fraction moves
//! within a regime only by more than [`RELATIVE_STEP`] and at most every [`MIN_INTERVAL_MS`];
//! a change of regime (decided, failed, rate first measured) applies at once.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use understudy_judge::{Decision, Evidence};
use utoipa::ToSchema;

use crate::config::cluster::MirrorBudget;
use crate::core::evidence::EvidenceSnapshot;

/// Within a regime, the fraction moves only when the target differs by more than this share of
/// the fraction in force.
pub const RELATIVE_STEP: f64 = 0.25;

/// Within a regime, the fraction moves at most this often.
pub const MIN_INTERVAL_MS: u64 = 5_000;

/// The callers' rate is measured over the stats reads of this long a window.
pub const RATE_WINDOW_MS: u64 = 10_000;

/// At most this many reads are kept for the rate.
const RATE_READS: usize = 32;

/// Callers' jobs (the active pool) per stats read, for their rate over the last reads.
#[derive(Debug, Clone, Default)]
pub struct CallerRate {
    /// `(read at, callers' jobs since the read before)`, oldest first.
    reads: VecDeque<(u64, u64)>,
}

impl CallerRate {
    /// One stats read at `at_ms` counted `jobs` callers' jobs since the previous one.
    pub fn record(&mut self, at_ms: u64, jobs: u64) {
        self.reads.push_back((at_ms, jobs));
        while self.reads.len() > RATE_READS
            || (self.reads.len() > 2 && self.reads[1].0 + RATE_WINDOW_MS <= at_ms)
        {
            self.reads.pop_front();
        }
    }

    /// Callers' jobs per second over the reads kept: the jobs after the oldest read over the
    /// time since it (the oldest read's own jobs came from before the window, of unknown
    /// length). None until two reads apart in time.
    pub fn per_second(&self) -> Option<f64> {
        let (first, _) = *self.reads.front()?;
        let (last, _) = *self.reads.back()?;
        if last <= first {
            return None;
        }
        let jobs: u64 = self.reads.iter().skip(1).map(|(_, j)| j).sum();
        Some(jobs as f64 * 1000.0 / (last - first) as f64)
    }
}

/// Where the judge stands, as far as copying goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JudgeState {
    /// Undecided: these tests are still open.
    Open { open_tests: Vec<String> },
    /// Passed: it goes on watching for a v2 that turns bad.
    Passed,
    /// Failed: the rollout rolls back.
    Failed,
}

impl JudgeState {
    /// From the judge's latest evidence (none yet: everything is open).
    pub fn of(evidence: Option<&EvidenceSnapshot>) -> JudgeState {
        let Some(e) = evidence else {
            return JudgeState::Open {
                open_tests: Vec::new(),
            };
        };
        match e.decision {
            Decision::Pass => JudgeState::Passed,
            Decision::Fail => JudgeState::Failed,
            Decision::NotEnoughData => JudgeState::Open {
                open_tests: e
                    .tests
                    .iter()
                    .filter(|t| t.evidence == Evidence::Open)
                    .map(|t| t.name.clone())
                    .collect(),
            },
        }
    }
}

/// Why the fraction in force is what it is (`reason` of a rollout's `mirror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MirrorReason {
    /// Nothing of the service is judged: nothing is copied.
    NotJudging,
    /// The service copies a fixed `mirror_fraction`.
    Fixed,
    /// Tests are open and the callers' rate is not measured yet: the watch fraction.
    Measuring,
    /// Tests are open: as much as the budget allows.
    Judging,
    /// The judge passed v2 and the rollout waits: the watch fraction.
    Watching,
    /// The judge failed v2: nothing more is needed.
    Failed,
}

/// The fraction chosen, why, and since when.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorChoice {
    pub fraction: f64,
    pub reason: MirrorReason,
    pub since_ms: u64,
}

impl MirrorChoice {
    pub fn not_judging() -> MirrorChoice {
        MirrorChoice {
            fraction: 0.0,
            reason: MirrorReason::NotJudging,
            since_ms: 0,
        }
    }

    pub fn fixed(fraction: f64) -> MirrorChoice {
        MirrorChoice {
            fraction,
            reason: MirrorReason::Fixed,
            since_ms: 0,
        }
    }
}

/// What the evidence asks for now, before any hysteresis.
pub fn target(
    budget: &MirrorBudget,
    judge: &JudgeState,
    caller_rate: Option<f64>,
    now_ms: u64,
) -> MirrorChoice {
    let (fraction, reason) = match (judge, caller_rate) {
        (JudgeState::Failed, _) => (0.0, MirrorReason::Failed),
        (JudgeState::Passed, _) => (budget.watch_fraction, MirrorReason::Watching),
        (JudgeState::Open { .. }, None) => (budget.watch_fraction, MirrorReason::Measuring),
        (JudgeState::Open { .. }, Some(rate)) => {
            // No callers: copying all of nothing costs nothing.
            let allowed = if rate > 0.0 {
                budget.copies_per_second / rate
            } else {
                budget.max_fraction
            };
            let fraction = allowed.clamp(budget.watch_fraction, budget.max_fraction);
            (fraction, MirrorReason::Judging)
        }
    };
    MirrorChoice {
        fraction,
        reason,
        since_ms: now_ms,
    }
}

/// The choice to put in force now, or None to keep `in_force` (no new config). None in force
/// yet: the target at once.
pub fn steer(
    budget: &MirrorBudget,
    judge: &JudgeState,
    caller_rate: Option<f64>,
    in_force: Option<&MirrorChoice>,
    now_ms: u64,
) -> Option<MirrorChoice> {
    let next = target(budget, judge, caller_rate, now_ms);
    let Some(current) = in_force else {
        return Some(next);
    };
    if next.reason != current.reason {
        return Some(next);
    }
    if next.fraction == current.fraction {
        return None;
    }
    let moved = (next.fraction - current.fraction).abs() / current.fraction.max(f64::MIN_POSITIVE);
    let rested = now_ms.saturating_sub(current.since_ms) >= MIN_INTERVAL_MS;
    (moved > RELATIVE_STEP && rested).then_some(next)
}

/// The budget as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BudgetView {
    pub copies_per_second: f64,
    pub max_fraction: f64,
    pub watch_fraction: f64,
}

impl From<&MirrorBudget> for BudgetView {
    fn from(b: &MirrorBudget) -> BudgetView {
        BudgetView {
            copies_per_second: b.copies_per_second,
            max_fraction: b.max_fraction,
            watch_fraction: b.watch_fraction,
        }
    }
}

/// `mirror` of a rollout's detail: the share of callers' jobs its balancer is told to copy, and
/// why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MirrorView {
    pub fraction: f64,
    pub reason: MirrorReason,
    /// Since when (ms since the epoch; 0 for a fixed fraction or nothing judged).
    pub since_ms: u64,
    /// The service's budget; null when it copies a fixed `mirror_fraction`.
    pub budget: Option<BudgetView>,
    /// Callers' jobs per second as last measured (null until measured).
    pub caller_rate: Option<f64>,
    /// The judge's tests still open (while `judging` or `measuring`).
    #[serde(default)]
    pub open_tests: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::evidence::TestEvidence;

    const BUDGET: MirrorBudget = MirrorBudget {
        copies_per_second: 200.0,
        max_fraction: 1.0,
        watch_fraction: 0.05,
    };

    fn open() -> JudgeState {
        JudgeState::Open {
            open_tests: vec!["errors".into()],
        }
    }

    fn choice(fraction: f64, reason: MirrorReason, since_ms: u64) -> MirrorChoice {
        MirrorChoice {
            fraction,
            reason,
            since_ms,
        }
    }

    #[test]
    fn open_tests_copy_as_much_as_the_budget_allows_within_its_bounds() {
        let at = |rate| target(&BUDGET, &open(), Some(rate), 7);
        assert_eq!(at(1_000.0), choice(0.2, MirrorReason::Judging, 7));
        // Few callers: everything, never above max_fraction.
        assert_eq!(at(50.0).fraction, 1.0);
        let capped = MirrorBudget {
            max_fraction: 0.5,
            ..BUDGET
        };
        assert_eq!(target(&capped, &open(), Some(50.0), 0).fraction, 0.5);
        assert_eq!(target(&capped, &open(), Some(0.0), 0).fraction, 0.5);
        // Many: never below the watch fraction, so judging goes on.
        assert_eq!(at(1_000_000.0).fraction, 0.05);
        // Not measured yet: the watch fraction until it is.
        let unmeasured = target(&BUDGET, &open(), None, 0);
        assert_eq!(unmeasured.reason, MirrorReason::Measuring);
        assert_eq!(unmeasured.fraction, 0.05);
    }

    #[test]
    fn a_decided_judge_keeps_the_watch_fraction_and_a_failed_one_copies_nothing() {
        let passed = target(&BUDGET, &JudgeState::Passed, Some(1_000.0), 0);
        assert_eq!(
            (passed.fraction, passed.reason),
            (0.05, MirrorReason::Watching)
        );
        let failed = target(&BUDGET, &JudgeState::Failed, Some(1_000.0), 0);
        assert_eq!(
            (failed.fraction, failed.reason),
            (0.0, MirrorReason::Failed)
        );
    }

    #[test]
    fn small_moves_are_ignored_and_large_ones_wait_for_the_interval() {
        let in_force = choice(0.2, MirrorReason::Judging, 10_000);
        let steer_at = |rate: f64, now| steer(&BUDGET, &open(), Some(rate), Some(&in_force), now);
        // 0.2 -> 0.18: within 25%, never a new config.
        assert_eq!(steer_at(1_111.0, 60_000), None);
        // 0.2 -> 0.1: a large move, but only once the interval passed since the last change.
        assert_eq!(steer_at(2_000.0, 10_000 + MIN_INTERVAL_MS - 1), None);
        assert_eq!(
            steer_at(2_000.0, 10_000 + MIN_INTERVAL_MS),
            Some(choice(0.1, MirrorReason::Judging, 10_000 + MIN_INTERVAL_MS))
        );
        // Unchanged: nothing.
        assert_eq!(steer_at(1_000.0, 90_000), None);
    }

    #[test]
    fn a_change_of_regime_applies_at_once() {
        let judging = choice(0.2, MirrorReason::Judging, 10_000);
        let now = 10_001;
        let decided = steer(
            &BUDGET,
            &JudgeState::Passed,
            Some(1_000.0),
            Some(&judging),
            now,
        );
        assert_eq!(decided, Some(choice(0.05, MirrorReason::Watching, now)));
        let measuring = choice(0.05, MirrorReason::Measuring, 10_000);
        let measured = steer(&BUDGET, &open(), Some(1_000.0), Some(&measuring), now);
        assert_eq!(measured, Some(choice(0.2, MirrorReason::Judging, now)));
        let failed = steer(&BUDGET, &JudgeState::Failed, None, Some(&judging), now);
        assert_eq!(failed.map(|c| c.fraction), Some(0.0));
        // Nothing in force yet: the target.
        let first = steer(&BUDGET, &open(), Some(400.0), None, now);
        assert_eq!(first, Some(choice(0.5, MirrorReason::Judging, now)));
        // Watching stays watching.
        let watching = choice(0.05, MirrorReason::Watching, 0);
        assert_eq!(
            steer(
                &BUDGET,
                &JudgeState::Passed,
                Some(9.0),
                Some(&watching),
                now
            ),
            None
        );
    }

    #[test]
    fn the_callers_rate_is_measured_over_the_recent_reads() {
        let mut rate = CallerRate::default();
        assert_eq!(rate.per_second(), None);
        // The first read's jobs came from before it: not counted.
        rate.record(1_000, 90_000);
        assert_eq!(rate.per_second(), None);
        rate.record(1_500, 500);
        rate.record(2_000, 500);
        assert_eq!(rate.per_second(), Some(1_000.0));
        // Reads older than the window leave it: the rate follows the callers.
        for i in 1..=40 {
            rate.record(2_000 + i * 500, 100);
        }
        let measured = rate.per_second().unwrap();
        assert!((measured - 200.0).abs() < 1e-9, "{measured}");
    }

    #[test]
    fn the_judge_state_names_the_open_tests() {
        let test = |name: &str, evidence| TestEvidence {
            name: name.into(),
            estimate: 0.0,
            margin: 0.01,
            interval: [0.0, 0.0],
            beyond_margin: false,
            evidence,
        };
        let mut e = EvidenceSnapshot {
            id: None,
            seq: 0,
            at_ms: 0,
            jobs: 10,
            decision: Decision::NotEnoughData,
            tests: vec![
                test("errors", Evidence::Pass),
                test("latency p99", Evidence::Open),
            ],
        };
        assert_eq!(
            JudgeState::of(Some(&e)),
            JudgeState::Open {
                open_tests: vec!["latency p99".into()]
            }
        );
        e.decision = Decision::Pass;
        assert_eq!(JudgeState::of(Some(&e)), JudgeState::Passed);
        e.decision = Decision::Fail;
        assert_eq!(JudgeState::of(Some(&e)), JudgeState::Failed);
        assert!(matches!(JudgeState::of(None), JudgeState::Open { .. }));
    }
}
