//! What a machine is for, as the controller tracks it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use understudy_hub::Role;

use crate::config::cluster::Cluster;
use crate::core::plan::Selection;
use crate::core::rollout::Phase;

/// What a machine is for, as the controller tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineRole {
    /// Serves callers (active configuration).
    Active,
    /// In the simulation pool at all times (declared there at the service's version): answers
    /// simulation jobs from services above, and is the A/A control of rollouts from its version.
    /// A release of its service leaves it a control.
    Control,
    /// Runs another version, waiting for a release (simulation pool while one simulates it).
    Standby,
    /// Its version was replaced; out of every pool (a later release of its version brings it back).
    Retired,
}

impl MachineRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineRole::Active => "active",
            MachineRole::Control => "control",
            MachineRole::Standby => "standby",
            MachineRole::Retired => "retired",
        }
    }
    /// Can be brought in by a release of its version (not serving, not the A/A control).
    pub fn is_candidate(self) -> bool {
        matches!(self, MachineRole::Standby | MachineRole::Retired)
    }

    /// The same name in the hub's registry model.
    pub fn hub_role(self) -> Role {
        match self {
            MachineRole::Active => Role::Active,
            MachineRole::Control => Role::Control,
            MachineRole::Standby => Role::Standby,
            MachineRole::Retired => Role::Retired,
        }
    }

    pub fn parse(s: &str) -> Option<MachineRole> {
        Some(match s {
            "active" => MachineRole::Active,
            "control" => MachineRole::Control,
            "standby" => MachineRole::Standby,
            "retired" => MachineRole::Retired,
            _ => return None,
        })
    }
}

/// A machine's new role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub machine: String,
    pub role: MachineRole,
}

/// What a rollout moves: its selection, the roles its service's machines had when it started,
/// and its versions.
pub struct RolloutMachines<'a> {
    pub selection: &'a Selection,
    pub before: &'a BTreeMap<String, MachineRole>,
    pub from_version: &'a str,
    pub to_version: &'a str,
}

/// What a move does to a service's machines and version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Consequences {
    pub role_changes: Vec<RoleChange>,
    /// The version the service runs from now on, when it changes.
    pub new_version: Option<String>,
}

/// The consequences of a rollout's move from `from` to `to` on the roles (`roles`, as they are)
/// of its service's machines: completion makes the selection's new machines active and retires
/// the ones they replace; a roll-back after completion puts every role back as it was.
pub fn consequences(
    cluster: &Cluster,
    service: &str,
    roles: &BTreeMap<String, MachineRole>,
    rollout: &RolloutMachines<'_>,
    from: Phase,
    to: Phase,
) -> Consequences {
    let mut out = Consequences::default();
    if to == Phase::Complete {
        let mut after = roles.clone();
        // Only the rollout's selection moves; a control stays (it keeps answering simulation
        // jobs from services above), and so does every machine outside a sub-group.
        for m in cluster.machines_of(service) {
            let role = after.get(&m.id).copied().unwrap_or(MachineRole::Retired);
            let next = if rollout.selection.joining.contains(&m.id) && role.is_candidate() {
                MachineRole::Active
            } else if rollout.selection.replaced.contains(&m.id) && role == MachineRole::Active {
                MachineRole::Retired
            } else {
                role
            };
            if next != role {
                out.role_changes.push(RoleChange {
                    machine: m.id.clone(),
                    role: next,
                });
                after.insert(m.id.clone(), next);
            }
        }
        // The service runs the new version once no active machine runs another one; after a
        // sub-group it still runs the old one (a later release moves the rest).
        let mixed = cluster.machines_of(service).any(|m| {
            after.get(&m.id) == Some(&MachineRole::Active) && m.version != rollout.to_version
        });
        if !mixed {
            out.new_version = Some(rollout.to_version.to_string());
        }
    }
    if to == Phase::RolledBack && from == Phase::Complete {
        for (id, before) in rollout.before {
            if roles.get(id) != Some(before) {
                out.role_changes.push(RoleChange {
                    machine: id.clone(),
                    role: *before,
                });
            }
        }
        out.new_version = Some(rollout.from_version.to_string());
    }
    out
}
