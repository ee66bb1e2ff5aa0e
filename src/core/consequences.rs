//! What a rollout's move does to its service: which machines change role, which version the
//! service runs from then on. Pure: the runtime commits the result with the move.

use std::collections::BTreeMap;

use crate::config::cluster::Cluster;
use crate::core::plan::Selection;
use crate::core::roles::MachineRole;
use crate::core::rollout::Phase;

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
