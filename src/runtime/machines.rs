//! The machine registry on the controller: registration with a hub key, key rotation,
//! each verified `machine.state` report recorded as a new revision in SQLite
//! ([`crate::store::SqlMachineStore`]), and the merged machine listing of the admin endpoint.
//!
//! Roles are the controller's: a machine's report keeps its status, sessions, capacity, address
//! and version, but its role is replaced by the one the controller assigned (cluster file,
//! rollouts) when the controller knows the machine. Keys are never logged nor shown by a read.

use serde::{Deserialize, Serialize};
use understudy_hub::{MachineFilter, Role, Status};
use understudy_wire::{MachineHealth, MachineStatus, PoolRole};
use utoipa::ToSchema;

use crate::store::StoreError;

/// `POST /api/v1/machines`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "id": "db-9", "service": "db", "version": "v2", "address": "127.0.0.1:9109"
}))]
pub struct RegistrationRequest {
    #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
    pub id: String,
    #[schema(min_length = 1)]
    pub service: String,
    #[schema(min_length = 1)]
    pub version: String,
    /// `host:port` of the machine's listener.
    #[schema(min_length = 1)]
    pub address: String,
    /// Ignored for a machine the controller already assigns a role to; default `standby`.
    #[serde(default)]
    pub role: Option<Role>,
    /// Sessions it can hold at once; default 100.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub capacity: Option<u32>,
}

pub(crate) const DEFAULT_CAPACITY: u32 = 100;

/// The answer to a registration: the key is shown here once and never again.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    pub id: String,
    /// Base64 of the machine's HMAC key.
    pub key: String,
    pub controller_id: String,
    /// Base URL to publish to (`{hub_url}/api/v1/hub/publish`).
    pub hub_url: Option<String>,
}

/// `POST /api/v1/machines/{id}/rotate-key` (body optional).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old key stays valid (default `[hub] rotation_grace_ms`), at most one day.
    #[schema(maximum = 86_400_000)]
    pub grace_ms: Option<u64>,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    pub id: String,
    pub key: String,
    pub grace_ms: u64,
}

/// One machine as `GET /api/v1/machines` shows it: the controller's view (cluster file, role,
/// place in the balancer config, role history) merged with the registry's latest report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineListing {
    pub id: String,
    pub service: String,
    /// The version the machine last reported, else the declared one.
    pub version: String,
    pub address: String,
    /// Declared weight; null for a machine only registered, not in the cluster file.
    pub weight: Option<u32>,
    pub role: Role,
    /// Its place in the service's current balancer config (`active` | `simulation` | null).
    pub config: Option<PoolRole>,
    /// Last reported status; for a machine that never reports (a plain HTTP server), what its
    /// balancer's probes say (`running` while it answers, `down` while it fails); null when
    /// neither knows.
    pub status: Option<Status>,
    /// Whether it answers its balancer's probes (null: its balancer does not list it).
    pub health: Option<MachineHealth>,
    /// Why it fails them (names the address), while it does.
    pub health_reason: Option<String>,
    pub capacity: Option<u32>,
    pub sessions: Option<u32>,
    /// Latest registry revision and its time.
    pub revision: Option<u64>,
    pub updated_ms: Option<u64>,
    /// In the cluster file.
    pub declared: bool,
    /// Role changes `{at_ms, role, version, rollout, cause}` made by the controller.
    pub history: Vec<serde_json::Value>,
}

/// The status a machine that never reports is shown with: what its balancer sees.
pub fn status_from_health(health: MachineHealth) -> Option<Status> {
    match health {
        MachineHealth::Answering => Some(Status::Running),
        MachineHealth::Failing => Some(Status::Down),
        MachineHealth::Unknown => None,
    }
}

/// A machine whose health, as its balancer reports it, changed between two stats reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub machine: String,
    pub health: MachineHealth,
    pub reason: Option<String>,
}

impl HealthChange {
    /// A machine that stopped answering is a warning naming it, its address and why; one
    /// answering again is news.
    pub fn log(&self, service: &str, cluster: &crate::config::cluster::Cluster) {
        let address = cluster
            .machines
            .iter()
            .find(|m| m.id == self.machine)
            .map_or("?", |m| m.address.as_str());
        let machine = &self.machine;
        match self.health {
            MachineHealth::Failing => tracing::warn!(
                %service, %machine, %address,
                "machine does not answer its balancer: {}",
                self.reason.as_deref().unwrap_or("no reason given")
            ),
            MachineHealth::Answering => {
                tracing::info!(%service, %machine, %address, "machine answers its balancer again")
            }
            MachineHealth::Unknown => {}
        }
    }
}

/// The machines whose health changed from `before` (the previous read; `None` at the first) to
/// `after`. A machine first seen failing is a change; one first seen answering is not.
pub fn health_changes(
    before: Option<&[MachineStatus]>,
    after: &[MachineStatus],
) -> Vec<HealthChange> {
    after
        .iter()
        .filter(|m| {
            let was = before
                .and_then(|b| b.iter().find(|o| o.id == m.id))
                .map_or(MachineHealth::Unknown, |o| o.health);
            match m.health {
                MachineHealth::Failing => was != MachineHealth::Failing,
                MachineHealth::Answering => was == MachineHealth::Failing,
                MachineHealth::Unknown => false,
            }
        })
        .map(|m| HealthChange {
            machine: m.id.clone(),
            health: m.health,
            reason: m.health_reason.clone(),
        })
        .collect()
}

/// `GET /api/v1/machines` query: every set field must match.
pub type ListingFilter = MachineFilter;

/// Why a `machine.state` report was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("payload is not a machine record: {0}")]
    Payload(String),
    #[error(
        "sender `{sender}` reported the state of machine `{id}`: a machine reports itself only"
    )]
    WrongSender { sender: String, id: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}
