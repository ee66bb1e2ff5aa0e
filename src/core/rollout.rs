//! The rollout state machine of one service in a release: its phases, the events that move it, and
//! the single function, [`transition`], that decides every move.

use serde::{Deserialize, Serialize};
use understudy_judge::Decision;

use crate::config::cluster::RolloutPolicy;

/// What ops can ask of a rollout: the admin endpoint's actions, the CLI's commands and a
/// scenario's `[[ops]]` steps are this one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpsAction {
    Approve,
    Abort,
    Rollback,
}

impl OpsAction {
    /// Its name, as in the endpoint's path (`/api/v1/rollouts/{id}/approve`).
    pub fn as_str(self) -> &'static str {
        match self {
            OpsAction::Approve => "approve",
            OpsAction::Abort => "abort",
            OpsAction::Rollback => "rollback",
        }
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the services it depends on (in the same release) to join.
    Pending,
    /// v2 in the balancer's simulation pool; jobs mirrored; the judge accumulates pairs.
    Simulating,
    /// The judge reached a decision (kept as `passed`); routed on at once.
    Judged { passed: bool },
    /// Passed, waiting for ops (only where the service asks for approval).
    AwaitingApproval,
    /// v2 in the active configuration beside v1, at joining step `step` (0-based).
    Joining { step: u32 },
    /// v1 removed from the balancer's config; its sustained sessions drain.
    Retiring,
    /// v2 serves alone; v1 retired.
    Complete,
    /// v2 pulled, v1 serving as before.
    RolledBack,
    /// Stopped (by ops, or because a dependency failed); v2 pulled.
    Aborted,
}

pub const PHASE_NAMES: [&str; 9] = [
    "pending",
    "simulating",
    "judged",
    "awaiting_approval",
    "joining",
    "retiring",
    "complete",
    "rolled_back",
    "aborted",
];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Simulating => "simulating",
            Phase::Judged { .. } => "judged",
            Phase::AwaitingApproval => "awaiting_approval",
            Phase::Joining { .. } => "joining",
            Phase::Retiring => "retiring",
            Phase::Complete => "complete",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }

    /// The phase's number in storage (step of joining, 1 for a passed judgement, else 0).
    pub fn detail(self) -> i64 {
        match self {
            Phase::Judged { passed } => i64::from(passed),
            Phase::Joining { step } => i64::from(step),
            _ => 0,
        }
    }

    pub fn from_parts(name: &str, detail: i64) -> Option<Phase> {
        Some(match name {
            "pending" => Phase::Pending,
            "simulating" => Phase::Simulating,
            "judged" => Phase::Judged {
                passed: detail != 0,
            },
            "awaiting_approval" => Phase::AwaitingApproval,
            "joining" => Phase::Joining {
                step: u32::try_from(detail).ok()?,
            },
            "retiring" => Phase::Retiring,
            "complete" => Phase::Complete,
            "rolled_back" => Phase::RolledBack,
            "aborted" => Phase::Aborted,
            _ => return None,
        })
    }

    /// No further move of its own (a complete rollout may still be rolled back by its release).
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Complete | Phase::RolledBack | Phase::Aborted)
    }

    /// Ended without v2 serving.
    pub fn is_failed(self) -> bool {
        matches!(self, Phase::RolledBack | Phase::Aborted)
    }

    /// v2 fully active (dependents may start).
    pub fn has_joined(self) -> bool {
        matches!(self, Phase::Retiring | Phase::Complete)
    }

    /// v2 serves callers (part or all of the active configuration).
    pub fn v2_active(self) -> bool {
        matches!(
            self,
            Phase::Joining { .. } | Phase::Retiring | Phase::Complete
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Joining { step } => write!(f, "joining[{step}]"),
            Phase::Judged { passed } => {
                write!(f, "judged({})", if *passed { "pass" } else { "fail" })
            }
            other => f.write_str(other.name()),
        }
    }
}

/// The display form back (`joining[1]`, `judged(pass)`, `retiring`), as transitions are stored
/// and shown.
impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(text: &str) -> Result<Phase, String> {
        let unknown = || format!("unknown phase `{text}`");
        let (name, detail) = match text.split_once(['[', '(']) {
            None => (text, 0),
            Some((name, rest)) => {
                let inner = rest.strip_suffix([']', ')']).ok_or_else(unknown)?;
                let detail = match inner {
                    "pass" => 1,
                    "fail" => 0,
                    step => step.parse().map_err(|_| unknown())?,
                };
                (name, detail)
            }
        };
        let phase = Phase::from_parts(name, detail).ok_or_else(unknown)?;
        // Only the exact display form: `judged` alone or `retiring[2]` are not phases.
        if phase.to_string() == text {
            Ok(phase)
        } else {
            Err(unknown())
        }
    }
}

/// One move of a rollout, as recorded and shown (`transitions` of a rollout's detail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TransitionRecord {
    pub at_ms: u64,
    #[serde(with = "phase_text")]
    #[schema(value_type = String, example = "simulating")]
    pub from: Phase,
    #[serde(with = "phase_text")]
    #[schema(value_type = String, example = "judged(pass)")]
    pub to: Phase,
    pub cause: String,
    #[schema(value_type = String, example = "controller")]
    pub actor: Actor,
    /// Numbers behind the move (the verdict, for a judgement).
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// The operator whose call caused it (null for the controller's own moves).
    #[serde(default)]
    pub operator: Option<String>,
}

/// A phase as its display text in JSON.
mod phase_text {
    use super::Phase;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(phase: &Phase, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(phase)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Every service this one waits for has joined.
    DependenciesJoined,
    /// A service this one waits for failed: this one never starts.
    DependencyFailed,
    /// The judge decided; `NotEnoughData` moves nothing.
    Verdict { decision: Decision, hard: bool },
    /// Leave `judged`: to approval, joining or roll-back according to the judgement.
    Route,
    /// Ops approved.
    Approve,
    /// The current joining step was held long enough.
    StepHeld,
    /// v1's machines left the balancer (or the drain timeout passed).
    Drained,
    /// Still not enough data after the service's simulation timeout.
    SimulationTimedOut,
    /// Pull v2 (ops, hard failure elsewhere, or the release unwinding).
    Rollback,
    /// Stop (ops).
    Abort,
}

/// Who caused a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    Controller,
    Ops,
}

impl Actor {
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Controller => "controller",
            Actor::Ops => "ops",
        }
    }

    pub fn parse(s: &str) -> Option<Actor> {
        match s {
            "controller" => Some(Actor::Controller),
            "ops" => Some(Actor::Ops),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a rollout in phase {from} cannot take event {event:?}")]
pub struct TransitionError {
    pub from: Phase,
    pub event: Event,
}

/// The one place that decides how a rollout moves. Pure: callers persist the result before acting.
pub fn transition(
    from: Phase,
    event: Event,
    policy: &RolloutPolicy,
) -> Result<Phase, TransitionError> {
    use Phase as P;
    let refuse = Err(TransitionError { from, event });
    let to = match (from, event) {
        (P::Pending, Event::DependenciesJoined) => P::Simulating,
        (P::Pending, Event::DependencyFailed) => P::Aborted,
        (P::Simulating, Event::Verdict { decision, hard }) => match decision {
            Decision::NotEnoughData => return refuse,
            Decision::Fail if hard => P::RolledBack,
            Decision::Fail => P::Judged { passed: false },
            Decision::Pass => P::Judged { passed: true },
        },
        (P::Simulating, Event::SimulationTimedOut) => P::RolledBack,
        (P::Judged { passed: false }, Event::Route) => P::RolledBack,
        (P::Judged { passed: true }, Event::Route) if policy.requires_approval => {
            P::AwaitingApproval
        }
        (P::Judged { passed: true }, Event::Route) => P::Joining { step: 0 },
        (P::AwaitingApproval, Event::Approve) => P::Joining { step: 0 },
        // Still judged while it waits: a v2 that turns bad is pulled before anyone approves it
        // (it never served a caller).
        (
            P::AwaitingApproval,
            Event::Verdict {
                decision: Decision::Fail,
                ..
            },
        ) => P::RolledBack,
        (P::Joining { step }, Event::StepHeld) if step + 1 < policy.step_count() => {
            P::Joining { step: step + 1 }
        }
        (P::Joining { .. }, Event::StepHeld) => P::Retiring,
        (P::Retiring, Event::Drained) => P::Complete,
        (P::RolledBack | P::Aborted, Event::Rollback) => return refuse,
        (_, Event::Rollback) => P::RolledBack,
        (P::Complete | P::RolledBack | P::Aborted, Event::Abort) => return refuse,
        (_, Event::Abort) => P::Aborted,
        _ => return refuse,
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(requires_approval: bool, steps: Vec<u32>) -> RolloutPolicy {
        RolloutPolicy {
            requires_approval,
            approvers: 1,
            approval_ttl: crate::config::cluster::DEFAULT_APPROVAL_TTL,
            join_steps: steps,
            join_step: Duration::from_millis(100),
            simulation_timeout: None,
        }
    }

    fn run(policy: &RolloutPolicy, events: &[Event]) -> Result<Vec<Phase>, TransitionError> {
        let mut phase = Phase::Pending;
        let mut seen = vec![phase];
        for e in events {
            phase = transition(phase, *e, policy)?;
            seen.push(phase);
        }
        Ok(seen)
    }

    const PASS: Event = Event::Verdict {
        decision: Decision::Pass,
        hard: false,
    };

    /// Transitions are stored as display text and read back: every phase comes back as itself,
    /// and text that is not exactly a phase's display form is refused.
    #[test]
    fn phases_read_back_from_their_display_text_and_nothing_else() {
        let phases = [
            Phase::Pending,
            Phase::Simulating,
            Phase::Judged { passed: true },
            Phase::Judged { passed: false },
            Phase::AwaitingApproval,
            Phase::Joining { step: 0 },
            Phase::Joining { step: 12 },
            Phase::Retiring,
            Phase::Complete,
            Phase::RolledBack,
            Phase::Aborted,
        ];
        for phase in phases {
            assert_eq!(phase.to_string().parse::<Phase>(), Ok(phase));
        }
        for bad in [
            "",
            "judged",
            "joining",
            "joining[x]",
            "joining[1",
            "judged(maybe)",
            "pending[0]",
            "retiring(pass)",
            "Complete",
            "joining[-1]",
        ] {
            assert!(
                bad.parse::<Phase>().is_err(),
                "{bad:?} was taken for a phase"
            );
        }
    }

    #[test]
    fn happy_path_with_steps_and_approval() {
        let p = policy(true, vec![10, 50]);
        let phases = run(
            &p,
            &[
                Event::DependenciesJoined,
                PASS,
                Event::Route,
                Event::Approve,
                Event::StepHeld,
                Event::StepHeld,
                Event::Drained,
            ],
        )
        .unwrap();
        assert_eq!(
            phases,
            vec![
                Phase::Pending,
                Phase::Simulating,
                Phase::Judged { passed: true },
                Phase::AwaitingApproval,
                Phase::Joining { step: 0 },
                Phase::Joining { step: 1 },
                Phase::Retiring,
                Phase::Complete
            ]
        );
    }

    #[test]
    fn a_v2_that_fails_while_awaiting_approval_is_rolled_back_and_a_pass_moves_nothing() {
        let p = policy(true, vec![]);
        let fail = |hard| Event::Verdict {
            decision: Decision::Fail,
            hard,
        };
        for hard in [false, true] {
            assert_eq!(
                transition(Phase::AwaitingApproval, fail(hard), &p),
                Ok(Phase::RolledBack)
            );
        }
        assert!(transition(Phase::AwaitingApproval, PASS, &p).is_err());
        // Once joining, a verdict is no longer what moves it (the live guard is).
        assert!(transition(Phase::Joining { step: 0 }, fail(false), &p).is_err());
    }

    #[test]
    fn no_approval_goes_straight_to_joining() {
        let p = policy(false, vec![]);
        let phases = run(&p, &[Event::DependenciesJoined, PASS, Event::Route]).unwrap();
        assert_eq!(phases.last(), Some(&Phase::Joining { step: 0 }));
        assert_eq!(
            transition(Phase::Joining { step: 0 }, Event::StepHeld, &p),
            Ok(Phase::Retiring)
        );
        // Approving what does not await approval is refused.
        assert!(transition(Phase::Joining { step: 0 }, Event::Approve, &p).is_err());
        assert!(transition(Phase::Simulating, Event::Approve, &p).is_err());
    }

    #[test]
    fn verdicts() {
        let p = policy(false, vec![]);
        let not_enough = Event::Verdict {
            decision: Decision::NotEnoughData,
            hard: false,
        };
        assert!(transition(Phase::Simulating, not_enough, &p).is_err());
        let hard = Event::Verdict {
            decision: Decision::Fail,
            hard: true,
        };
        assert_eq!(
            transition(Phase::Simulating, hard, &p),
            Ok(Phase::RolledBack)
        );
        let soft = Event::Verdict {
            decision: Decision::Fail,
            hard: false,
        };
        let judged = transition(Phase::Simulating, soft, &p).unwrap();
        assert_eq!(judged, Phase::Judged { passed: false });
        assert_eq!(transition(judged, Event::Route, &p), Ok(Phase::RolledBack));
    }

    #[test]
    fn ops_actions() {
        let p = policy(false, vec![]);
        for phase in [
            Phase::Pending,
            Phase::Simulating,
            Phase::AwaitingApproval,
            Phase::Joining { step: 0 },
            Phase::Retiring,
        ] {
            assert_eq!(transition(phase, Event::Abort, &p), Ok(Phase::Aborted));
            assert_eq!(
                transition(phase, Event::Rollback, &p),
                Ok(Phase::RolledBack)
            );
        }
        assert_eq!(
            transition(Phase::Complete, Event::Rollback, &p),
            Ok(Phase::RolledBack)
        );
        for finished in [Phase::Complete, Phase::RolledBack, Phase::Aborted] {
            assert!(transition(finished, Event::Abort, &p).is_err());
            assert!(transition(finished, Event::StepHeld, &p).is_err());
        }
        assert!(transition(Phase::RolledBack, Event::Rollback, &p).is_err());
        assert_eq!(
            transition(Phase::Pending, Event::DependencyFailed, &p),
            Ok(Phase::Aborted)
        );
    }

    #[test]
    fn storage_round_trip() {
        for phase in [
            Phase::Pending,
            Phase::Judged { passed: true },
            Phase::Judged { passed: false },
            Phase::Joining { step: 3 },
            Phase::Aborted,
        ] {
            assert_eq!(Phase::from_parts(phase.name(), phase.detail()), Some(phase));
        }
        assert_eq!(Phase::from_parts("nonsense", 0), None);
    }
}
