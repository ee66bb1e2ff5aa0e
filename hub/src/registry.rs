//! The machine registry model: every change to a machine's record is a new revision with its time,
//! kept as that machine's history. Storage is behind [`MachineStore`] (the controller's SQLite
//! store implements it; [`MemoryStore`] is for tests and embedding).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a machine is for; the same names as the controller's `MachineRole`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves callers (the active pool).
    Active,
    /// Permanently in the simulation pool as the A/A control.
    Control,
    /// Waiting for a release of its version.
    Standby,
    /// Out of every pool.
    Retired,
}

/// Health as the machine (or its balancer) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Starting,
    Running,
    /// Takes no new sessions; finishing the ones it holds.
    Draining,
    Down,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Control => "control",
            Role::Standby => "standby",
            Role::Retired => "retired",
        }
    }
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Draining => "draining",
            Status::Down => "down",
        }
    }
}

/// Topic of a machine's state reports; the payload is its [`MachineRecord`] (or a
/// [`MachineUpdate`] with `id` and `service` alongside), so hub filters on `service`, `role` and
/// `status` apply to it directly.
pub const STATE_TOPIC: &str = "machine.state";

/// One machine's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MachineRecord {
    pub id: String,
    pub service: String,
    pub version: String,
    /// `host:port`.
    pub address: String,
    pub role: Role,
    pub status: Status,
    /// Sessions it can hold at once.
    pub capacity: u32,
    /// Sustained sessions (calls) it holds now.
    #[serde(default)]
    pub sessions: u32,
}

/// A change reported by a machine; unset fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineUpdate {
    pub version: Option<String>,
    pub address: Option<String>,
    pub role: Option<Role>,
    pub status: Option<Status>,
    pub capacity: Option<u32>,
    pub sessions: Option<u32>,
}

/// One revision of a machine's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineRevision {
    /// 1 for the registration, +1 per change.
    pub revision: u64,
    pub at_ms: u64,
    pub record: MachineRecord,
}

/// Narrows a listing; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct MachineFilter {
    pub service: Option<String>,
    pub role: Option<Role>,
    pub status: Option<Status>,
    pub version: Option<String>,
}

impl MachineFilter {
    pub fn matches(&self, r: &MachineRecord) -> bool {
        self.service.as_ref().is_none_or(|s| *s == r.service)
            && self.role.is_none_or(|x| x == r.role)
            && self.status.is_none_or(|x| x == r.status)
            && self.version.as_ref().is_none_or(|v| *v == r.version)
    }
}

/// Storage the registry needs: append-only revisions per machine.
pub trait MachineStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn latest(&self, id: &str) -> Result<Option<MachineRevision>, Self::Error>;
    /// Stores a new revision; the registry guarantees it is `latest.revision + 1` (or 1).
    fn append(&mut self, revision: MachineRevision) -> Result<(), Self::Error>;
    /// Oldest first.
    fn history(&self, id: &str) -> Result<Vec<MachineRevision>, Self::Error>;
    /// The latest revision of every machine.
    fn all_latest(&self) -> Result<Vec<MachineRevision>, Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError<E: std::error::Error + 'static> {
    #[error("machine {id:?}: field `{field}` {problem}")]
    Invalid {
        id: String,
        field: &'static str,
        problem: String,
    },
    #[error("machine {0:?} is not registered")]
    Unknown(String),
    #[error("machine {id:?} belongs to service {registered:?}, not {given:?}")]
    ServiceChanged {
        id: String,
        registered: String,
        given: String,
    },
    #[error("machine store: {0}")]
    Store(#[source] E),
}

/// Whether a call made a new revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    New(MachineRevision),
    /// Nothing differed from the latest revision: no new one.
    Unchanged(MachineRevision),
}

impl Change {
    pub fn revision(&self) -> &MachineRevision {
        match self {
            Change::New(r) | Change::Unchanged(r) => r,
        }
    }
}

/// The registry's rules over any store.
#[derive(Debug, Default)]
pub struct Registry<S> {
    store: S,
}

impl<S: MachineStore> Registry<S> {
    pub fn new(store: S) -> Registry<S> {
        Registry { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    fn validate(record: &MachineRecord) -> Result<(), RegistryError<S::Error>> {
        let invalid = |field, problem: &str| RegistryError::Invalid {
            id: record.id.clone(),
            field,
            problem: problem.to_string(),
        };
        for (field, value) in [
            ("id", &record.id),
            ("service", &record.service),
            ("version", &record.version),
            ("address", &record.address),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "is empty"));
            }
        }
        if record.address.parse::<std::net::SocketAddr>().is_err() && !record.address.contains(':')
        {
            return Err(invalid("address", "is not host:port"));
        }
        if record.capacity == 0 {
            return Err(invalid("capacity", "is 0"));
        }
        Ok(())
    }

    /// Registers a machine, or records its full new state. A machine never changes service.
    pub fn register(
        &mut self,
        record: MachineRecord,
        at_ms: u64,
    ) -> Result<Change, RegistryError<S::Error>> {
        Self::validate(&record)?;
        let latest = self
            .store
            .latest(&record.id)
            .map_err(RegistryError::Store)?;
        if let Some(latest) = &latest {
            if latest.record.service != record.service {
                return Err(RegistryError::ServiceChanged {
                    id: record.id.clone(),
                    registered: latest.record.service.clone(),
                    given: record.service.clone(),
                });
            }
        }
        self.commit(latest, record, at_ms)
    }

    /// Applies a reported change to the latest record.
    pub fn update(
        &mut self,
        id: &str,
        update: &MachineUpdate,
        at_ms: u64,
    ) -> Result<Change, RegistryError<S::Error>> {
        let latest = self
            .store
            .latest(id)
            .map_err(RegistryError::Store)?
            .ok_or_else(|| RegistryError::Unknown(id.to_string()))?;
        let mut record = latest.record.clone();
        if let Some(v) = &update.version {
            record.version = v.clone();
        }
        if let Some(a) = &update.address {
            record.address = a.clone();
        }
        if let Some(r) = update.role {
            record.role = r;
        }
        if let Some(s) = update.status {
            record.status = s;
        }
        if let Some(c) = update.capacity {
            record.capacity = c;
        }
        if let Some(s) = update.sessions {
            record.sessions = s;
        }
        Self::validate(&record)?;
        self.commit(Some(latest), record, at_ms)
    }

    fn commit(
        &mut self,
        latest: Option<MachineRevision>,
        record: MachineRecord,
        at_ms: u64,
    ) -> Result<Change, RegistryError<S::Error>> {
        match latest {
            Some(latest) if latest.record == record => Ok(Change::Unchanged(latest)),
            latest => {
                let revision = MachineRevision {
                    revision: latest.as_ref().map_or(1, |l| l.revision + 1),
                    // Keep history ordered even if the caller's clock stepped back.
                    at_ms: latest.as_ref().map_or(at_ms, |l| l.at_ms.max(at_ms)),
                    record,
                };
                self.store
                    .append(revision.clone())
                    .map_err(RegistryError::Store)?;
                Ok(Change::New(revision))
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<MachineRevision>, RegistryError<S::Error>> {
        self.store.latest(id).map_err(RegistryError::Store)
    }

    pub fn history(&self, id: &str) -> Result<Vec<MachineRevision>, RegistryError<S::Error>> {
        let history = self.store.history(id).map_err(RegistryError::Store)?;
        if history.is_empty() {
            return Err(RegistryError::Unknown(id.to_string()));
        }
        Ok(history)
    }

    /// Latest records matching `filter`, sorted by id.
    pub fn list(
        &self,
        filter: &MachineFilter,
    ) -> Result<Vec<MachineRevision>, RegistryError<S::Error>> {
        let mut all: Vec<_> = self
            .store
            .all_latest()
            .map_err(RegistryError::Store)?
            .into_iter()
            .filter(|r| filter.matches(&r.record))
            .collect();
        all.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        Ok(all)
    }
}

/// In-memory store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    machines: BTreeMap<String, Vec<MachineRevision>>,
}

impl MachineStore for MemoryStore {
    type Error = std::convert::Infallible;

    fn latest(&self, id: &str) -> Result<Option<MachineRevision>, Self::Error> {
        Ok(self.machines.get(id).and_then(|h| h.last().cloned()))
    }

    fn append(&mut self, revision: MachineRevision) -> Result<(), Self::Error> {
        self.machines
            .entry(revision.record.id.clone())
            .or_default()
            .push(revision);
        Ok(())
    }

    fn history(&self, id: &str) -> Result<Vec<MachineRevision>, Self::Error> {
        Ok(self.machines.get(id).cloned().unwrap_or_default())
    }

    fn all_latest(&self) -> Result<Vec<MachineRevision>, Self::Error> {
        Ok(self
            .machines
            .values()
            .filter_map(|h| h.last().cloned())
            .collect())
    }
}

#[cfg(test)]
pub(crate) fn machine(
    id: &str,
    service: &str,
    version: &str,
    role: Role,
    status: Status,
) -> MachineRecord {
    MachineRecord {
        id: id.into(),
        service: service.into(),
        version: version.into(),
        address: "127.0.0.1:9000".into(),
        role,
        status,
        capacity: 100,
        sessions: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_is_a_new_revision_in_history() {
        let mut reg = Registry::new(MemoryStore::default());
        let m = machine("m1", "media", "v1", Role::Active, Status::Starting);
        assert!(
            matches!(reg.register(m.clone(), 1000).unwrap(), Change::New(ref r) if r.revision == 1)
        );
        let running = MachineUpdate {
            status: Some(Status::Running),
            ..Default::default()
        };
        assert_eq!(
            reg.update("m1", &running, 2000)
                .unwrap()
                .revision()
                .revision,
            2
        );
        // Same state again: no new revision.
        assert!(matches!(
            reg.update("m1", &running, 3000).unwrap(),
            Change::Unchanged(_)
        ));
        let upgraded = MachineUpdate {
            version: Some("v2".into()),
            sessions: Some(4),
            ..Default::default()
        };
        reg.update("m1", &upgraded, 1500).unwrap();
        let history = reg.history("m1").unwrap();
        let summary: Vec<_> = history
            .iter()
            .map(|r| {
                (
                    r.revision,
                    r.at_ms,
                    r.record.status,
                    r.record.version.as_str(),
                    r.record.sessions,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, 1000, Status::Starting, "v1", 0),
                (2, 2000, Status::Running, "v1", 0),
                // The clock stepped back: the time is held at the previous revision's.
                (3, 2000, Status::Running, "v2", 4),
            ]
        );
        assert_eq!(reg.get("m1").unwrap().unwrap().revision, 3);
    }

    #[test]
    fn bad_records_are_refused_naming_the_field() {
        let mut reg = Registry::new(MemoryStore::default());
        let mut m = machine("m1", "media", "v1", Role::Active, Status::Running);
        m.capacity = 0;
        let e = reg.register(m.clone(), 1).unwrap_err();
        assert!(e.to_string().contains("`capacity`"), "{e}");
        m.capacity = 5;
        m.address = "nowhere".into();
        assert!(reg
            .register(m.clone(), 1)
            .unwrap_err()
            .to_string()
            .contains("`address`"));
        m.address = "10.0.0.1:80".into();
        reg.register(m.clone(), 1).unwrap();
        m.service = "router".into();
        assert!(matches!(
            reg.register(m, 2),
            Err(RegistryError::ServiceChanged { .. })
        ));
        assert!(matches!(
            reg.update("m9", &MachineUpdate::default(), 1),
            Err(RegistryError::Unknown(_))
        ));
        assert!(matches!(reg.history("m9"), Err(RegistryError::Unknown(_))));
        assert_eq!(reg.history("m1").unwrap().len(), 1);
    }

    #[test]
    fn a_record_published_as_state_matches_hub_filters() {
        use crate::envelope::{SecretKey, Signer};
        use crate::hub::Filter;
        let record = machine("m1", "media", "v2", Role::Standby, Status::Draining);
        let mut signer = Signer::starting_at("m1", SecretKey::generate(), 1).unwrap();
        let envelope = signer.sign(STATE_TOPIC, serde_json::to_value(&record).unwrap());
        let filter = Filter {
            service: Some("media".into()),
            role: Some("standby".into()),
            status: Some("draining".into()),
            topic: Some(STATE_TOPIC.into()),
            sender: Some("m1".into()),
        };
        assert!(filter.matches(&envelope));
        let back: MachineRecord = serde_json::from_value(envelope.payload.clone()).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn lists_filter_by_service_role_status_version() {
        let mut reg = Registry::new(MemoryStore::default());
        for m in [
            machine("m3", "media", "v1", Role::Active, Status::Running),
            machine("m1", "media", "v2", Role::Standby, Status::Running),
            machine("m2", "media", "v1", Role::Active, Status::Down),
            machine("r1", "router", "v1", Role::Active, Status::Running),
        ] {
            reg.register(m, 1).unwrap();
        }
        let ids = |f: MachineFilter| -> Vec<String> {
            reg.list(&f)
                .unwrap()
                .into_iter()
                .map(|r| r.record.id)
                .collect()
        };
        assert_eq!(ids(MachineFilter::default()), ["m1", "m2", "m3", "r1"]);
        assert_eq!(
            ids(MachineFilter {
                service: Some("media".into()),
                ..Default::default()
            }),
            ["m1", "m2", "m3"]
        );
        assert_eq!(
            ids(MachineFilter {
                service: Some("media".into()),
                role: Some(Role::Active),
                status: Some(Status::Running),
                ..Default::default()
            }),
            ["m3"]
        );
        assert_eq!(
            ids(MachineFilter {
                version: Some("v2".into()),
                ..Default::default()
            }),
            ["m1"]
        );
        // The filter's query form.
        let f: MachineFilter =
            serde_json::from_str(r#"{"role":"active","status":"down"}"#).unwrap();
        assert_eq!(ids(f), ["m2"]);
    }
}
