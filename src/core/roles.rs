//! What a machine is for, as the controller tracks it.

use serde::{Deserialize, Serialize};
use understudy_hub::Role;

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
