//! The controller's release decisions, pure: from a [`Snapshot`] of the releases, their rollouts
//! and what the balancers reported, the [`Move`]s to make now, in the manner of a kube-rs
//! `reconcile` returning an action. No clock, no store, no network: the runtime
//! (`controller.rs`) builds the snapshot, commits each move as a transition and applies it, and
//! steps again while moves are made (a chain unwinding).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use understudy_wire::{MachineStatus, PoolRole};

use crate::config::cluster::RolloutPolicy;
use crate::core::rollout::{Event, Phase};

/// One transition to ask for, and why (recorded as its cause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub rollout: i64,
    pub event: Event,
    pub cause: String,
}

/// A release as the step sees it.
#[derive(Debug, Clone)]
pub struct ReleaseFacts<'a> {
    pub id: i64,
    /// Rollout ids in plan order.
    pub rollouts: &'a [i64],
    pub rollback_on_failure: bool,
}

/// A rollout as the step sees it.
#[derive(Debug, Clone)]
pub struct RolloutFacts<'a> {
    pub id: i64,
    pub service: &'a str,
    pub from_version: &'a str,
    /// Services of the release it waits for.
    pub after: &'a [String],
    pub phase: Phase,
    pub entered_ms: u64,
    /// Active machines it retires.
    pub replaced: &'a BTreeSet<String>,
}

/// A service as the step sees it: its policy and its balancer.
#[derive(Debug, Clone)]
pub struct ServiceFacts<'a> {
    pub policy: &'a RolloutPolicy,
    pub drain_timeout: Duration,
    /// The balancer acknowledged the committed config.
    pub synced: bool,
    /// Version of the committed config (0 before any).
    pub desired_version: u64,
    /// The balancer's last stats: the config version it ran and its machines.
    pub reported: Option<(u64, &'a [MachineStatus])>,
}

/// Everything the step decides on.
#[derive(Debug, Clone, Default)]
pub struct Snapshot<'a> {
    /// Unfinished releases, in id order.
    pub releases: Vec<ReleaseFacts<'a>>,
    /// Every rollout, finished or not, by id (the newest of a service is its last).
    pub rollouts: BTreeMap<i64, RolloutFacts<'a>>,
    pub services: BTreeMap<&'a str, ServiceFacts<'a>>,
    /// Machines whose own latest report says they hold no session (a drain may end on it).
    pub report_no_sessions: BTreeSet<String>,
}

/// The moves to make at `now_ms`. A move may no longer apply once an earlier one was made: the
/// runtime skips those (the transition function refuses them).
pub fn step(snapshot: &Snapshot<'_>, now_ms: u64) -> Vec<Move> {
    let mut moves = Vec::new();
    for release in &snapshot.releases {
        let rollouts: Vec<&RolloutFacts> = release
            .rollouts
            .iter()
            .filter_map(|id| snapshot.rollouts.get(id))
            .collect();
        let failed: Vec<&str> = rollouts
            .iter()
            .filter(|r| r.phase.is_failed())
            .map(|r| r.service)
            .collect();
        if release.rollback_on_failure && !failed.is_empty() {
            unwind(snapshot, release, &rollouts, &failed, &mut moves);
            continue;
        }
        for r in &rollouts {
            let Some(service) = snapshot.services.get(r.service) else {
                continue;
            };
            if let Some(m) = next_move(snapshot, &rollouts, r, service, now_ms) {
                moves.push(m);
            }
        }
    }
    moves
}

/// A release that rolls back on failure unwinds in reverse dependency order: a rollout goes once
/// its dependents are out (a completed one only while it is its service's newest).
fn unwind(
    snapshot: &Snapshot<'_>,
    release: &ReleaseFacts<'_>,
    rollouts: &[&RolloutFacts<'_>],
    failed: &[&str],
    moves: &mut Vec<Move>,
) {
    for r in rollouts.iter().rev() {
        if r.phase.is_failed() {
            continue;
        }
        if r.phase == Phase::Complete {
            let newest = snapshot
                .rollouts
                .values()
                .rev()
                .find(|o| o.service == r.service)
                .map(|o| o.id);
            if newest != Some(r.id) {
                continue;
            }
        }
        let dependents_out = rollouts
            .iter()
            .filter(|d| d.after.iter().any(|a| a == r.service))
            .all(|d| d.phase.is_failed());
        if dependents_out {
            moves.push(Move {
                rollout: r.id,
                event: Event::Rollback,
                cause: format!(
                    "release {} rolling back: {} failed",
                    release.id,
                    failed.join(", ")
                ),
            });
        }
    }
}

/// What moves one rollout of a release forward, if anything does now.
fn next_move(
    snapshot: &Snapshot<'_>,
    release: &[&RolloutFacts<'_>],
    r: &RolloutFacts<'_>,
    service: &ServiceFacts<'_>,
    now_ms: u64,
) -> Option<Move> {
    let policy = service.policy;
    let in_phase_ms = now_ms.saturating_sub(r.entered_ms);
    let to = |event: Event, cause: String| {
        Some(Move {
            rollout: r.id,
            event,
            cause,
        })
    };
    match r.phase {
        Phase::Pending => pending_move(snapshot, release, r),
        Phase::Simulating => {
            let limit = policy.simulation_timeout?;
            (in_phase_ms >= limit.as_millis() as u64).then_some(())?;
            to(
                Event::SimulationTimedOut,
                format!(
                    "not enough data after {} ms of simulation",
                    limit.as_millis()
                ),
            )
        }
        Phase::Judged { passed } => {
            let cause = match (passed, policy.requires_approval) {
                (false, _) => "the joining condition failed",
                (true, true) => "passed; the service asks for ops approval",
                (true, false) => "passed",
            };
            to(Event::Route, cause.to_string())
        }
        Phase::Joining { step } if in_phase_ms >= policy.join_step.as_millis() as u64 => to(
            Event::StepHeld,
            format!(
                "joining step {step} held {} ms",
                policy.join_step.as_millis()
            ),
        ),
        Phase::Retiring => {
            let timeout = service.drain_timeout.as_millis() as u64;
            if drained(snapshot, r, service) {
                to(
                    Event::Drained,
                    format!("no {} machine left on the balancer", r.from_version),
                )
            } else if in_phase_ms >= timeout {
                to(
                    Event::Drained,
                    format!("drain timeout of {timeout} ms passed"),
                )
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A pending rollout starts once every dependency in the release joined and its balancer runs
/// the new config; it fails when one of them did not join.
fn pending_move(
    snapshot: &Snapshot<'_>,
    release: &[&RolloutFacts<'_>],
    r: &RolloutFacts<'_>,
) -> Option<Move> {
    let phase_of = |service: &str| {
        release
            .iter()
            .find(|o| o.service == service)
            .map(|o| o.phase)
    };
    let synced = |service: &str| snapshot.services.get(service).is_some_and(|s| s.synced);
    let dep_failed = r
        .after
        .iter()
        .find(|d| phase_of(d).is_some_and(|p| p.is_failed()));
    if let Some(dep) = dep_failed {
        return Some(Move {
            rollout: r.id,
            event: Event::DependencyFailed,
            cause: format!("dependency {dep} did not join"),
        });
    }
    let ready = r
        .after
        .iter()
        .all(|d| phase_of(d).is_none_or(|p| p.has_joined()) && synced(d));
    ready.then(|| Move {
        rollout: r.id,
        event: Event::DependenciesJoined,
        cause: if r.after.is_empty() {
            "no dependency in the release".to_string()
        } else {
            format!("dependencies joined: {}", r.after.join(", "))
        },
    })
}

/// Only the replaced machines drain: a v1 control stays in the simulation pool for good, and
/// so does every active machine outside a sub-group. A machine is done when its balancer
/// dropped it (its drain ended) or it reports holding no session itself.
fn drained(snapshot: &Snapshot<'_>, r: &RolloutFacts<'_>, service: &ServiceFacts<'_>) -> bool {
    service.reported.is_some_and(|(config_version, machines)| {
        config_version >= service.desired_version
            && !machines.iter().any(|m| {
                r.replaced.contains(&m.id)
                    && m.config == PoolRole::Active
                    && m.sessions > 0
                    && !snapshot.report_no_sessions.contains(&m.id)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_wire::{MachineHealth, MachineState};

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            requires_approval: false,
            approvers: 1,
            approval_ttl: crate::config::cluster::DEFAULT_APPROVAL_TTL,
            join_steps: Vec::new(),
            join_step: Duration::from_millis(500),
            simulation_timeout: Some(Duration::from_secs(10)),
        }
    }

    fn holding(id: &str, sessions: u64) -> MachineStatus {
        MachineStatus {
            id: id.into(),
            version: "v1".into(),
            config: PoolRole::Active,
            state: MachineState::Serving,
            sessions,
            health: MachineHealth::Answering,
            health_reason: None,
        }
    }

    #[test]
    fn each_phase_moves_on_its_own_condition() {
        let policy = policy();
        let after = vec!["db".to_string()];
        let none = BTreeSet::new();
        let replaced: BTreeSet<String> = ["media-1".to_string()].into();
        let rollout = |id, service, after: &'static [String], phase, entered_ms| RolloutFacts {
            id,
            service,
            from_version: "v1",
            after,
            phase,
            entered_ms,
            replaced: &none,
        };
        let after: &'static [String] = Box::leak(after.into_boxed_slice());
        let machines = [holding("media-1", 2)];
        let service = |synced| ServiceFacts {
            policy: &policy,
            drain_timeout: Duration::from_secs(30),
            synced,
            desired_version: 3,
            reported: Some((3, &machines[..])),
        };
        let ids = [1, 2];
        let mut snapshot = Snapshot {
            releases: vec![ReleaseFacts {
                id: 7,
                rollouts: &ids,
                rollback_on_failure: false,
            }],
            ..Snapshot::default()
        };
        snapshot
            .rollouts
            .insert(1, rollout(1, "db", &[], Phase::Joining { step: 0 }, 1_000));
        snapshot
            .rollouts
            .insert(2, rollout(2, "media", after, Phase::Pending, 0));
        snapshot.services.insert("db", service(true));
        snapshot.services.insert("media", service(true));
        let events = |s: &Snapshot, now| -> Vec<(i64, Event)> {
            step(s, now)
                .into_iter()
                .map(|m| (m.rollout, m.event))
                .collect()
        };
        // db still joins (step held 400 of 500 ms): media waits for it.
        assert_eq!(events(&snapshot, 1_400), []);
        assert_eq!(events(&snapshot, 1_500), [(1, Event::StepHeld)]);
        // db retiring (its replaced machine still holds calls) has joined; media starts once
        // db's balancer runs the new config.
        snapshot.rollouts.get_mut(&1).unwrap().phase = Phase::Retiring;
        snapshot.rollouts.get_mut(&1).unwrap().replaced = &replaced;
        snapshot.services.insert("db", service(false));
        assert_eq!(events(&snapshot, 1_500), []);
        snapshot.services.insert("db", service(true));
        assert_eq!(events(&snapshot, 1_500), [(2, Event::DependenciesJoined)]);
        // The drain waits for the calls, until the machine reports none.
        snapshot.rollouts.get_mut(&2).unwrap().phase = Phase::Simulating;
        snapshot.rollouts.get_mut(&2).unwrap().entered_ms = 1_000;
        assert_eq!(events(&snapshot, 2_000), []);
        snapshot.report_no_sessions.insert("media-1".into());
        assert_eq!(events(&snapshot, 2_000), [(1, Event::Drained)]);
        // Simulation with no verdict for the policy's 10 s: timed out.
        assert_eq!(
            events(&snapshot, 11_000),
            [(1, Event::Drained), (2, Event::SimulationTimedOut)]
        );
    }

    #[test]
    fn a_failed_rollout_unwinds_its_release_from_the_last_dependent() {
        let policy = policy();
        let none = BTreeSet::new();
        let media_after: &'static [String] = Box::leak(vec!["db".to_string()].into_boxed_slice());
        let ids = [1, 2];
        let mut snapshot = Snapshot {
            releases: vec![ReleaseFacts {
                id: 4,
                rollouts: &ids,
                rollback_on_failure: true,
            }],
            ..Snapshot::default()
        };
        let facts = |id, service, after, phase| RolloutFacts {
            id,
            service,
            from_version: "v1",
            after,
            phase,
            entered_ms: 0,
            replaced: &none,
        };
        snapshot
            .rollouts
            .insert(1, facts(1, "db", &[][..], Phase::Complete));
        snapshot
            .rollouts
            .insert(2, facts(2, "media", media_after, Phase::Simulating));
        for s in ["db", "media"] {
            snapshot.services.insert(
                s,
                ServiceFacts {
                    policy: &policy,
                    drain_timeout: Duration::from_secs(1),
                    synced: true,
                    desired_version: 1,
                    reported: None,
                },
            );
        }
        assert!(step(&snapshot, 0).is_empty(), "nothing failed");
        snapshot.rollouts.get_mut(&2).unwrap().phase = Phase::RolledBack;
        let moves = step(&snapshot, 0);
        assert_eq!(
            moves,
            [Move {
                rollout: 1,
                event: Event::Rollback,
                cause: "release 4 rolling back: media failed".into(),
            }]
        );
    }
}
