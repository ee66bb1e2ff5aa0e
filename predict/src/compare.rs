//! The chain's picture of v2 against v1: each version's probability of failure from the start
//! state, and an early warning when v2's looks clearly higher. It explains and warns; it decides
//! nothing (the rule `prediction` decides on [`crate::signal::PairedFailureTest`], which is valid
//! however often it is looked at, while this warning, re-read at every look, is not).
//!
//! Warning: both versions have at least `min_starts` (decayed) departures from the start state,
//! v2's probability of ending in any artifact exceeds v1's by at least `margin`, and by at least
//! [`WARNING_Z`] standard errors: (p2 - p1) / sqrt(se1² + se2²) >= z. Each standard error comes from
//! the chain itself (`StateOutlook::failure_std_error`): the chain's estimate rests on the few
//! objects that got far enough to fail late, not on every object that started. The chain sees late
//! failures coming before calls end, which is why it is shown beside the test.

use serde::Serialize;

use crate::chain::Outlook;
use crate::config::CompareRule;

/// Standard errors of the chain's early warning (one-sided, about 1 in 1000 at a single look).
pub const WARNING_Z: f64 = 3.09;

/// One version's side of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRisk {
    /// Probability of ending in any artifact from the start state.
    pub failure: f64,
    pub std_error: f64,
    /// Decayed departures observed from the start state.
    pub starts: f64,
    /// Probability of reaching a state whose outcome is unknown (the failure may be that much
    /// higher).
    pub unknown: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub start_state: String,
    pub baseline: VersionRisk,
    pub candidate: VersionRisk,
    /// candidate.failure - baseline.failure.
    pub difference: f64,
    /// The difference in standard errors (infinite when both are zero and v2 is worse).
    pub z: f64,
    /// The chain's early warning (see the module doc): shown, never decides.
    pub clearly_higher: bool,
    /// Why `clearly_higher` is what it is, for logs and the API.
    pub reason: String,
}

fn risk(outlook: &Outlook, start_state: &str) -> VersionRisk {
    match outlook.state(start_state) {
        Some(state) => VersionRisk {
            failure: state.failure(),
            std_error: state.failure_std_error,
            starts: state.exits,
            unknown: state.unknown,
        },
        None => VersionRisk {
            failure: 0.0,
            std_error: 0.0,
            starts: 0.0,
            unknown: 1.0,
        },
    }
}

/// Compares `candidate` (v2) with `baseline` (v1) from `start_state` under `rule`.
pub fn compare(
    baseline: &Outlook,
    candidate: &Outlook,
    start_state: &str,
    rule: &CompareRule,
) -> Comparison {
    let v1 = risk(baseline, start_state);
    let v2 = risk(candidate, start_state);
    let difference = v2.failure - v1.failure;
    let spread = (v1.std_error.powi(2) + v2.std_error.powi(2)).sqrt();
    let z = if spread > 0.0 {
        difference / spread
    } else if difference > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let fewest_starts = v1.starts.min(v2.starts);
    let (clearly_higher, reason) = if fewest_starts < rule.min_starts {
        (
            false,
            format!(
                "not enough data: {fewest_starts:.1} departures from `{start_state}`, {} needed",
                rule.min_starts
            ),
        )
    } else if difference < rule.margin {
        (
            false,
            format!(
                "v2 fails {:.4} vs v1 {:.4}: difference {difference:.4} below the margin {}",
                v2.failure, v1.failure, rule.margin
            ),
        )
    } else if z < WARNING_Z {
        (
            false,
            format!(
                "v2 fails {:.4} vs v1 {:.4}: {z:.2} standard errors, {WARNING_Z} needed",
                v2.failure, v1.failure
            ),
        )
    } else {
        (
            true,
            format!(
                "v2 fails {:.4} vs v1 {:.4}: {z:.2} standard errors (>= {WARNING_Z}) and margin {} passed",
                v2.failure, v1.failure, rule.margin
            ),
        )
    };
    Comparison {
        start_state: start_state.to_string(),
        baseline: v1,
        candidate: v2,
        difference,
        z,
        clearly_higher,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{solve, Absorbing, TransitionTable};
    use std::collections::{BTreeMap, BTreeSet};

    /// `starts` calls reach media; `media_exits` of them left it, `failed` into an error (the rest
    /// of the calls are still in media: long calls not over yet).
    fn calls(starts: f64, media_exits: f64, failed: f64) -> Outlook {
        let mut table = TransitionTable::new();
        table.add("received", "media", starts);
        table.add("media", "error state failure", failed);
        table.add("media", "completed", media_exits - failed);
        solve(
            &table,
            &Absorbing {
                artifacts: vec!["error state failure".to_string()],
                successes: BTreeSet::from(["completed".to_string()]),
            },
            &BTreeMap::new(),
        )
    }

    fn rule() -> CompareRule {
        CompareRule {
            min_starts: 100.0,
            margin: 0.01,
        }
    }

    #[test]
    fn a_clearly_worse_candidate_is_flagged() {
        let v1 = calls(2000.0, 2000.0, 20.0);
        let v2 = calls(2000.0, 2000.0, 80.0);
        let result = compare(&v1, &v2, "received", &rule());
        assert!((result.baseline.failure - 0.01).abs() < 1e-12);
        assert!((result.candidate.failure - 0.04).abs() < 1e-12);
        assert!(result.clearly_higher, "{}", result.reason);
    }

    #[test]
    fn late_failures_count_by_how_many_calls_got_that_far() {
        let v1 = calls(2000.0, 2000.0, 20.0);
        // 2 of the 5 calls that ended failed: 40%, but on 5 calls, though 2000 started.
        let five = compare(&v1, &calls(2000.0, 5.0, 2.0), "received", &rule());
        assert!((five.candidate.failure - 0.4).abs() < 1e-12);
        assert!(!five.clearly_higher, "{}", five.reason);
        assert!(five.reason.contains("standard errors"), "{}", five.reason);
        // 20 of 50 is clear: long before the 2000 calls end.
        let fifty = compare(&v1, &calls(2000.0, 50.0, 20.0), "received", &rule());
        assert!(fifty.clearly_higher, "{}", fifty.reason);
    }

    #[test]
    fn equal_versions_and_thin_data_are_not_flagged() {
        let v1 = calls(2000.0, 2000.0, 20.0);
        let v2 = calls(2000.0, 2000.0, 22.0);
        let same = compare(&v1, &v2, "received", &rule());
        assert!(!same.clearly_higher, "{}", same.reason);
        let thin = compare(
            &calls(50.0, 50.0, 0.0),
            &calls(50.0, 50.0, 25.0),
            "received",
            &rule(),
        );
        assert!(!thin.clearly_higher);
        assert!(thin.reason.contains("not enough data"), "{}", thin.reason);
    }
}
