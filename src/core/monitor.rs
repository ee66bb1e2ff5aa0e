//! The monitor's pure part: why it holds a machine out, what it records of an action, and the
//! naming of actions (which rule asked, which repeat is the same request). The comparison of
//! desired and actual state itself is `understudy_hub::monitor::evaluate`.

use std::collections::BTreeSet;

use serde::Serialize;
use understudy_hub::monitor::{Action, ActualState};
use understudy_hub::{Role, Status};
use utoipa::ToSchema;

/// Every (rule, action) pair the counter is exported with from 0.
pub const ACTION_LABELS: [(&str, &str); 9] = [
    ("active_machine_down", "drain"),
    ("active_machine_down", "await_sessions"),
    ("active_machine_down", "remove_from_balancer"),
    ("active_machine_down", "request_replacement"),
    ("running_not_in_balancer", "add_to_balancer"),
    ("version_drift", "report_drift"),
    ("version_drift", "drain"),
    ("version_drift", "await_sessions"),
    ("version_drift", "update_version"),
];

/// Why the monitor took a machine out of its balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// It is down (rule `active_machine_down`).
    Down,
    /// It runs another version and is to be updated (rule `version_drift`, `update_version`).
    Update,
}

impl HoldReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::Down => "down",
            HoldReason::Update => "update",
        }
    }

    pub fn parse(s: &str) -> Option<HoldReason> {
        match s {
            "down" => Some(HoldReason::Down),
            "update" => Some(HoldReason::Update),
            _ => None,
        }
    }
}

/// A machine the monitor took out of its balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct HeldOut {
    pub service: String,
    pub since_ms: u64,
    pub reason: HoldReason,
}

/// One action as `GET /api/v1/monitor/actions` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActionRecord {
    /// Increasing number of the record (since the controller started).
    pub seq: u64,
    pub at_ms: u64,
    /// The condition that asked for it.
    pub rule: &'static str,
    /// The action with its fields (`{"action": "remove_from_balancer", "service", "machine"}`).
    #[serde(flatten)]
    pub action: Action,
    /// What the controller did about it.
    pub outcome: String,
}

/// Whether `action` takes a machine out of its balancer or asks it to change. Neither is done
/// to a machine seen only through its balancer: the balancer already sends a failing machine no
/// caller's job and goes on probing it, which a removal would end (it could then never be seen
/// answering again), and such a machine does not listen on the hub for an update.
pub fn alters_watched(action: &Action, watched: &BTreeSet<String>) -> bool {
    match action {
        Action::Drain { machine, .. }
        | Action::AwaitSessions { machine, .. }
        | Action::RemoveFromBalancer { machine, .. }
        | Action::UpdateVersion { machine, .. } => watched.contains(machine),
        _ => false,
    }
}

/// The condition behind an action, for the metric and the listing.
pub fn rule_of(action: &Action, actual: &ActualState) -> &'static str {
    match action {
        Action::RemoveFromBalancer { .. } | Action::RequestReplacement { .. } => {
            "active_machine_down"
        }
        Action::AddToBalancer { .. } => "running_not_in_balancer",
        Action::ReportDrift { .. } | Action::UpdateVersion { .. } => "version_drift",
        Action::Drain { machine, .. } | Action::AwaitSessions { machine, .. } => {
            let down = actual.machines.iter().any(|m| {
                &m.record.id == machine
                    && m.record.status == Status::Down
                    && m.record.role == Role::Active
            });
            if down {
                "active_machine_down"
            } else {
                "version_drift"
            }
        }
    }
}

/// What makes an action "the same as last tick": a drain or a wait whose session count moved is
/// still the same drain.
pub fn repeat_key(action: &Action) -> Action {
    match action.clone() {
        Action::Drain {
            service, machine, ..
        } => Action::Drain {
            service,
            machine,
            sessions: 0,
        },
        Action::AwaitSessions {
            service,
            machine,
            until_ms,
            ..
        } => Action::AwaitSessions {
            service,
            machine,
            sessions: 0,
            until_ms,
        },
        other => other,
    }
}

pub fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Drain { .. } => "drain",
        Action::AwaitSessions { .. } => "await_sessions",
        Action::RemoveFromBalancer { .. } => "remove_from_balancer",
        Action::AddToBalancer { .. } => "add_to_balancer",
        Action::RequestReplacement { .. } => "request_replacement",
        Action::ReportDrift { .. } => "report_drift",
        Action::UpdateVersion { .. } => "update_version",
    }
}
