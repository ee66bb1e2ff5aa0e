//! The evidence an approval is bound to, and whether an approval stands. Pure: the runtime keeps
//! the snapshots and the approvals, and asks [`decide_approval`] what an approval does.
//!
//! While a rollout awaits approval its copies keep being judged. Its evidence is summed up as a
//! [`EvidenceSnapshot`]: the decision and, per test of the joining condition, the estimate
//! against its margin. A new snapshot is logged (its `seq` one more) each time the evidence
//! changes *materially*: the decision flips, or a test's estimate moves past its margin. An
//! approval names the snapshot the operator was shown ([`EvidenceRef`]), and is refused when the
//! evidence has changed materially since, or when it was shown longer ago than the service's
//! approval time-to-live.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use understudy_judge::{Decision, Evidence, TestReport};
use utoipa::ToSchema;

/// One test of the joining condition as an operator is shown it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TestEvidence {
    /// `errors`, `hard errors`, `mismatches`, `paired shift`, `latency p99`, ...
    pub name: String,
    /// The mean of the test's statistic so far (how much worse v2 is).
    pub estimate: f64,
    /// The most it may be.
    pub margin: f64,
    /// Always-valid interval for the estimate.
    pub interval: [f64; 2],
    /// The estimate is past the margin.
    pub beyond_margin: bool,
    /// Where the test's evidence stands: `open`, `pass` or `fail`.
    #[schema(value_type = String, example = "pass")]
    pub evidence: Evidence,
}

impl TestEvidence {
    pub fn of(test: &TestReport) -> TestEvidence {
        let r = &test.report;
        TestEvidence {
            name: test.name.clone(),
            estimate: r.estimate,
            margin: r.margin,
            interval: r.interval,
            beyond_margin: r.observations > 0 && r.estimate > r.margin,
            evidence: r.evidence,
        }
    }
}

/// The evidence behind a rollout's verdict at one moment (`evidence` of a rollout's detail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvidenceSnapshot {
    /// What an approval names (`ROLLOUT.SEQ.SHOWN_MS`): set only while the rollout awaits
    /// approval, stamped with the moment it was shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its place in the rollout's log of material changes (0: the evidence it passed on).
    pub seq: u64,
    /// Since when the evidence stands materially as it is.
    pub at_ms: u64,
    /// Pairs judged (the newest figure, not the one of `at_ms`).
    pub jobs: u64,
    #[schema(value_type = String, example = "pass")]
    pub decision: Decision,
    pub tests: Vec<TestEvidence>,
}

impl EvidenceSnapshot {
    pub fn of(decision: Decision, jobs: u64, tests: &[TestReport], at_ms: u64) -> EvidenceSnapshot {
        EvidenceSnapshot {
            id: None,
            seq: 0,
            at_ms,
            jobs,
            decision,
            tests: tests.iter().map(TestEvidence::of).collect(),
        }
    }

    /// How the evidence changed materially since `shown`, in words; empty when it did not. Only
    /// changes for the worse count: a test that came back within its margin is no reason to
    /// refuse an approval.
    pub fn changes_since(&self, shown: &EvidenceSnapshot) -> Vec<String> {
        let mut changes = Vec::new();
        if self.decision != shown.decision {
            changes.push(format!(
                "the decision flipped from {} to {}",
                shown.decision.as_str(),
                self.decision.as_str()
            ));
        }
        for now in &self.tests {
            let was_within = shown
                .tests
                .iter()
                .find(|t| t.name == now.name)
                .is_none_or(|t| !t.beyond_margin);
            if now.beyond_margin && was_within {
                changes.push(format!(
                    "the {} estimate moved past its margin ({:.4} > {:.4})",
                    now.name, now.estimate, now.margin
                ));
            }
        }
        changes
    }

    /// Whether the two differ materially in either direction (a new snapshot is logged then).
    pub fn differs_materially(&self, other: &EvidenceSnapshot) -> bool {
        self.decision != other.decision
            || self.tests.len() != other.tests.len()
            || self
                .tests
                .iter()
                .zip(&other.tests)
                .any(|(a, b)| a.name != b.name || a.beyond_margin != b.beyond_margin)
    }
}

/// What an approval names: a rollout, a snapshot of its evidence, and when it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvidenceRef {
    pub rollout: i64,
    pub seq: u64,
    pub shown_ms: u64,
}

impl fmt::Display for EvidenceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.rollout, self.seq, self.shown_ms)
    }
}

impl FromStr for EvidenceRef {
    type Err = String;

    fn from_str(text: &str) -> Result<EvidenceRef, String> {
        let bad = || {
            format!(
                "evidence `{}` is not an evidence id (ROLLOUT.SEQ.SHOWN_MS, as `evidence.id` of \
                 GET /api/v1/rollouts/{{id}} gives it)",
                text.chars().take(64).collect::<String>()
            )
        };
        let mut parts = text.split('.');
        let (Some(rollout), Some(seq), Some(shown), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(EvidenceRef {
            rollout: rollout.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
            shown_ms: shown.parse().map_err(|_| bad())?,
        })
    }
}

/// One operator's approval of a rollout (while a second one is needed, it waits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Approval {
    pub operator: String,
    pub at_ms: u64,
    /// The evidence id it approved.
    pub evidence: String,
    /// The snapshot it approved (`seq` of the evidence).
    pub seq: u64,
    /// After this it no longer counts.
    pub expires_at_ms: u64,
}

/// What an approval does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Enough distinct operators approved: the rollout joins. Their names, oldest first.
    Join { approvers: Vec<String> },
    /// Recorded; `need` approvals are needed and `have` stand.
    Recorded { have: usize, need: usize },
}

/// Why an approval was refused (each a 409 but `Bad`, a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalRefusal {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Stale(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    SameOperator(String),
}

/// Everything an approval is decided on.
pub struct ApprovalCase<'a> {
    pub rollout: i64,
    pub approvers: u8,
    pub ttl: Duration,
    pub named: &'a str,
    /// The rollout's logged snapshots, by `seq`.
    pub log: &'a [EvidenceSnapshot],
    pub current: &'a EvidenceSnapshot,
    /// Approvals recorded before this one.
    pub earlier: &'a [Approval],
    pub operator: &'a str,
    pub now_ms: u64,
}

/// Decides an approval: the evidence it names must be this rollout's, shown within the
/// time-to-live, and not changed materially since; a second approval must come from another
/// operator, and an earlier one counts only while it is unexpired and its evidence still holds.
pub fn decide_approval(
    case: &ApprovalCase<'_>,
) -> Result<(ApprovalOutcome, Approval), ApprovalRefusal> {
    let reference: EvidenceRef = case.named.parse().map_err(ApprovalRefusal::Bad)?;
    if reference.rollout != case.rollout {
        return Err(ApprovalRefusal::Bad(format!(
            "evidence {reference} is rollout {}'s, not rollout {}'s",
            reference.rollout, case.rollout
        )));
    }
    if reference.shown_ms > case.now_ms + CLOCK_SLACK_MS {
        return Err(ApprovalRefusal::Bad(format!(
            "evidence {reference} claims to have been shown in the future"
        )));
    }
    let ttl_ms = case.ttl.as_millis() as u64;
    if case.now_ms.saturating_sub(reference.shown_ms) > ttl_ms {
        return Err(ApprovalRefusal::Expired(format!(
            "the approval expired: evidence {reference} was shown {} s ago, longer than the \
             service's approval time of {} s; look at the evidence again and approve what it shows",
            case.now_ms.saturating_sub(reference.shown_ms) / 1000,
            ttl_ms / 1000
        )));
    }
    let shown = snapshot(case.log, reference.seq).ok_or_else(|| {
        ApprovalRefusal::Stale(format!(
            "rollout {} has no evidence {}",
            case.rollout, reference.seq
        ))
    })?;
    let changes = case.current.changes_since(shown);
    if !changes.is_empty() {
        return Err(ApprovalRefusal::Stale(format!(
            "the evidence changed since it was shown (evidence {reference}): {}",
            changes.join("; ")
        )));
    }
    let standing: Vec<&Approval> = case
        .earlier
        .iter()
        .filter(|a| a.expires_at_ms > case.now_ms)
        .filter(|a| {
            snapshot(case.log, a.seq).is_some_and(|s| case.current.changes_since(s).is_empty())
        })
        .collect();
    if standing.iter().any(|a| a.operator == case.operator) {
        return Err(ApprovalRefusal::SameOperator(format!(
            "{} already approved rollout {}: it needs {} different operators",
            case.operator, case.rollout, case.approvers
        )));
    }
    let approval = Approval {
        operator: case.operator.to_string(),
        at_ms: case.now_ms,
        evidence: case.named.to_string(),
        seq: reference.seq,
        expires_at_ms: case.now_ms + ttl_ms,
    };
    let have = standing.len() + 1;
    let need = usize::from(case.approvers.max(1));
    let outcome = if have >= need {
        let mut approvers: Vec<String> = standing.iter().map(|a| a.operator.clone()).collect();
        approvers.push(case.operator.to_string());
        ApprovalOutcome::Join { approvers }
    } else {
        ApprovalOutcome::Recorded { have, need }
    };
    Ok((outcome, approval))
}

/// How far ahead of the controller's clock a shown time may be (another controller's clock).
const CLOCK_SLACK_MS: u64 = 5_000;

fn snapshot(log: &[EvidenceSnapshot], seq: u64) -> Option<&EvidenceSnapshot> {
    log.iter().find(|s| s.seq == seq)
}

/// Each test's fail and pass evidence (e-values) against pairs judged, for the evidence chart.
/// Sampled at fixed pair counts, so replaying a rollout's stored pairs rebuilds it exactly; the
/// spacing doubles whenever it holds [`SERIES_POINTS`] points, keeping it small.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvidenceSeries {
    /// Pairs judged at each point.
    pub jobs: Vec<u64>,
    pub tests: Vec<TestSeries>,
    #[serde(skip)]
    every: u64,
}

/// One test's evidence over the points of an [`EvidenceSeries`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TestSeries {
    pub name: String,
    pub fail: Vec<f64>,
    pub pass: Vec<f64>,
    pub fail_threshold: f64,
    pub pass_threshold: f64,
}

/// Points kept before the spacing doubles.
pub const SERIES_POINTS: usize = 256;

impl EvidenceSeries {
    /// Whether a point is due after `jobs` pairs.
    pub fn due(&self, jobs: u64) -> bool {
        jobs > 0 && jobs.is_multiple_of(self.every.max(1)) && self.jobs.last() != Some(&jobs)
    }

    /// Adds a point (call when [`EvidenceSeries::due`]).
    pub fn push(&mut self, jobs: u64, tests: &[TestReport]) {
        self.every = self.every.max(1);
        if self.tests.len() != tests.len() {
            self.tests = tests
                .iter()
                .map(|t| TestSeries {
                    name: t.name.clone(),
                    fail: Vec::new(),
                    pass: Vec::new(),
                    fail_threshold: t.report.fail_threshold,
                    pass_threshold: t.report.pass_threshold,
                })
                .collect();
            self.jobs.clear();
        }
        self.jobs.push(jobs);
        for (series, test) in self.tests.iter_mut().zip(tests) {
            series.fail.push(test.report.fail_evidence);
            series.pass.push(test.report.pass_evidence);
        }
        if self.jobs.len() >= SERIES_POINTS {
            self.every *= 2;
            let every = self.every;
            let keep: Vec<bool> = self.jobs.iter().map(|j| j.is_multiple_of(every)).collect();
            thin(&mut self.jobs, &keep);
            for s in &mut self.tests {
                thin(&mut s.fail, &keep);
                thin(&mut s.pass, &keep);
            }
        }
    }
}

fn thin<T>(values: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    values.retain(|_| flags.next().copied().unwrap_or(false));
}

#[cfg(test)]
#[path = "evidence_tests.rs"]
mod tests;
