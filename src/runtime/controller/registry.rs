//! The machine registry on the controller's state: registration, key rotation, reports, listing.

use super::{Core, RequestError};
use crate::config::hub::MAX_ROTATION_GRACE_MS;
use crate::runtime::hub::{ControllerHub, CONTROLLER_ID};
use crate::runtime::machines::{
    status_from_health, ListingFilter, MachineListing, Registration, RegistrationRequest,
    ReportError, RotateRequest, RotatedKey, DEFAULT_CAPACITY,
};
use crate::store::{self, SqlMachineStore, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use understudy_hub::registry::{Change, MachineRevision, Registry, RegistryError};
use understudy_hub::{Envelope, MachineFilter, MachineRecord, Role, SecretKey, Status};

/// Machine ids appear in URLs and metric labels: the cluster file's naming rule.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn registry_refusal(e: RegistryError<StoreError>) -> RequestError {
    match e {
        RegistryError::Invalid { field, problem, .. } => {
            RequestError::BadRequest(format!("field `{field}`: {problem}"))
        }
        RegistryError::ServiceChanged {
            registered, given, ..
        } => RequestError::BadRequest(format!(
            "field `service`: the machine belongs to `{registered}`, not `{given}`"
        )),
        RegistryError::Unknown(id) => RequestError::NotFound(format!("no machine `{id}`")),
        RegistryError::Store(e) => e.into(),
    }
}

impl Core {
    /// The pub-sub backend the controller hosts; other controller parts subscribe through it.
    pub fn hub_backend(&self) -> Arc<dyn understudy_hub::Backend> {
        self.hub.backend()
    }

    pub fn hub(&self) -> &ControllerHub {
        &self.hub
    }

    /// Registers a machine: a fresh key (stored, then accepted by the hub), and a registry
    /// revision with status `starting`. Re-registering an id issues a new key; the old one stops
    /// working at once.
    pub fn register_machine(
        &self,
        request: &RegistrationRequest,
    ) -> Result<Registration, RequestError> {
        if !valid_id(&request.id) {
            return Err(RequestError::BadRequest(
                "field `id`: must be 1-64 characters of a-z, 0-9, '-' or '_'".into(),
            ));
        }
        let now = self.now_ms();
        let key = SecretKey::generate();
        self.with_store(|store, roles, cluster| {
            if !cluster.services.contains_key(&request.service) {
                return Err(RequestError::BadRequest(format!(
                    "field `service`: unknown service `{}`",
                    request.service
                )));
            }
            if let Some(declared) = cluster.machines.iter().find(|m| m.id == request.id) {
                if declared.service != request.service {
                    return Err(RequestError::BadRequest(format!(
                        "field `service`: machine `{}` is declared in service `{}`",
                        request.id, declared.service
                    )));
                }
            }
            let record = MachineRecord {
                id: request.id.clone(),
                service: request.service.clone(),
                version: request.version.clone(),
                address: request.address.clone(),
                role: roles
                    .get(&request.id)
                    .map(|r| r.hub_role())
                    .or(request.role)
                    .unwrap_or(Role::Standby),
                status: Status::Starting,
                capacity: request.capacity.unwrap_or(DEFAULT_CAPACITY),
                sessions: 0,
            };
            store.write_with(|tx| {
                Registry::new(SqlMachineStore::new(tx))
                    .register(record, now)
                    .map_err(registry_refusal)?;
                store::put_machine_key(tx, &request.id, &key, now)?;
                Ok(())
            })
        })?;
        self.hub
            .install_key(&request.id, key.clone())
            .map_err(|e| RequestError::BadRequest(format!("field `id`: {e}")))?;
        self.hub
            .keys_issued
            .with_label_values(&["registration"])
            .inc();
        tracing::info!(machine = %request.id, service = %request.service, "machine registered, hub key issued");
        Ok(Registration {
            id: request.id.clone(),
            key: key.to_base64(),
            controller_id: CONTROLLER_ID.to_string(),
            hub_url: self.hub.advertised_url(),
        })
    }

    /// Gives a registered machine a new key; the old one is accepted for `grace` (default
    /// `[hub] rotation_grace_ms`) or until the first message under the new one.
    pub fn rotate_machine_key(
        &self,
        id: &str,
        request: &RotateRequest,
    ) -> Result<RotatedKey, RequestError> {
        let grace_ms = match request.grace_ms {
            Some(g) if g > MAX_ROTATION_GRACE_MS => {
                return Err(RequestError::BadRequest(format!(
                    "field `grace_ms`: must be at most {MAX_ROTATION_GRACE_MS} (one day)"
                )))
            }
            Some(g) => g,
            None => self.hub.settings().rotation_grace.as_millis() as u64,
        };
        let now = self.now_ms();
        let key = SecretKey::generate();
        let rotated = self.with_store(|store, _, _| {
            store.write(|tx| store::rotate_machine_key(tx, id, &key, now + grace_ms, now))
        })?;
        if !rotated {
            return Err(RequestError::NotFound(format!(
                "machine `{id}` is not registered"
            )));
        }
        self.hub
            .rotate_key(id, key.clone(), Duration::from_millis(grace_ms));
        self.hub.keys_issued.with_label_values(&["rotation"]).inc();
        tracing::info!(machine = %id, grace_ms, "machine hub key rotated");
        Ok(RotatedKey {
            id: id.to_string(),
            key: key.to_base64(),
            grace_ms,
        })
    }

    /// Records a verified `machine.state` message as the sender's new state (a new revision when
    /// anything changed).
    pub fn record_machine_state(&self, envelope: &Envelope) -> Result<Change, ReportError> {
        let outcome = self.record_report(envelope);
        let label = match &outcome {
            Ok(Change::New(_)) => "revision",
            Ok(Change::Unchanged(_)) => "unchanged",
            Err(_) => "refused",
        };
        self.hub.reports.with_label_values(&[label]).inc();
        outcome
    }

    fn record_report(&self, envelope: &Envelope) -> Result<Change, ReportError> {
        let mut record: MachineRecord = serde_json::from_value(envelope.payload.clone())
            .map_err(|e| ReportError::Payload(e.to_string()))?;
        if record.id != envelope.sender {
            return Err(ReportError::WrongSender {
                sender: envelope.sender.clone(),
                id: record.id,
            });
        }
        let now = self.now_ms();
        // The sender's sequence number is saved with the report it allowed: a controller that
        // takes over refuses this very message if it is replayed, whenever the leader fell.
        let seq = vec![(envelope.sender.clone(), envelope.seq)];
        let change = self.with_store(|store, roles, _| {
            if let Some(role) = roles.get(&record.id) {
                record.role = role.hub_role();
            }
            store.write_with(|tx| {
                crate::store::save_hub_sequences(tx, &seq)?;
                Registry::new(SqlMachineStore::new(tx))
                    .register(record, now)
                    .map_err(|e| match e {
                        RegistryError::Store(e) => ReportError::Store(e),
                        other => ReportError::Refused(other.to_string()),
                    })
            })
        })?;
        self.hub.mark_saved(seq);
        Ok(change)
    }

    /// Latest registry record of every machine that registered or reported, sorted by id; the
    /// role is the controller's where it assigns one.
    pub fn machine_records(&self) -> Vec<MachineRecord> {
        self.with_store(|store, roles, _| {
            let latest = store.read(|sql| {
                Registry::new(SqlMachineStore::new(sql)).list(&MachineFilter::default())
            });
            match latest {
                Ok(revisions) => revisions
                    .into_iter()
                    .map(|r| {
                        let mut record = r.record;
                        if let Some(role) = roles.get(&record.id) {
                            record.role = role.hub_role();
                        }
                        record
                    })
                    .collect(),
                Err(e) => {
                    tracing::error!("reading the machine registry: {e}");
                    Vec::new()
                }
            }
        })
    }

    /// A machine's registry revisions, oldest first (empty for a declared machine that never
    /// registered nor reported); 404 for an id the controller does not know at all.
    pub fn machine_revisions(&self, id: &str) -> Result<Vec<MachineRevision>, RequestError> {
        self.with_store(|store, _, cluster| {
            let history = store.read(|sql| {
                understudy_hub::MachineStore::history(&SqlMachineStore::new(sql), id)
            })?;
            if history.is_empty() && !cluster.machines.iter().any(|m| m.id == id) {
                return Err(RequestError::NotFound(format!("no machine `{id}`")));
            }
            Ok(history)
        })
    }

    /// Every machine the controller knows (declared or registered), merged, filtered, by id.
    pub fn machine_listing(
        &self,
        filter: &ListingFilter,
    ) -> Result<Vec<MachineListing>, RequestError> {
        let declared = self.machines()?;
        let reported: BTreeMap<String, MachineRevision> = self.with_store(|store, _, _| {
            store
                .read(|sql| understudy_hub::MachineStore::all_latest(&SqlMachineStore::new(sql)))
                .map(|all| all.into_iter().map(|r| (r.record.id.clone(), r)).collect())
        })?;
        let mut out: BTreeMap<String, MachineListing> = BTreeMap::new();
        for m in declared {
            let report = reported.get(&m.id);
            out.insert(
                m.id.clone(),
                MachineListing {
                    version: report.map_or(m.version.clone(), |r| r.record.version.clone()),
                    address: report.map_or(m.address.clone(), |r| r.record.address.clone()),
                    weight: Some(m.weight),
                    role: m.role.hub_role(),
                    config: m.config,
                    status: report
                        .map(|r| r.record.status)
                        .or_else(|| m.health.and_then(status_from_health)),
                    health: m.health,
                    health_reason: m.health_reason,
                    capacity: report.map(|r| r.record.capacity),
                    sessions: report.map(|r| r.record.sessions),
                    revision: report.map(|r| r.revision),
                    updated_ms: report.map(|r| r.at_ms),
                    declared: true,
                    history: m.history,
                    id: m.id,
                    service: m.service,
                },
            );
        }
        for (id, r) in reported {
            if out.contains_key(&id) {
                continue;
            }
            let record = r.record;
            out.insert(
                id,
                MachineListing {
                    id: record.id,
                    service: record.service,
                    version: record.version,
                    address: record.address,
                    weight: None,
                    role: record.role,
                    config: None,
                    status: Some(record.status),
                    health: None,
                    health_reason: None,
                    capacity: Some(record.capacity),
                    sessions: Some(record.sessions),
                    revision: Some(r.revision),
                    updated_ms: Some(r.at_ms),
                    declared: false,
                    history: Vec::new(),
                },
            );
        }
        Ok(out
            .into_values()
            .filter(|m| {
                filter.service.as_ref().is_none_or(|s| *s == m.service)
                    && filter.role.is_none_or(|r| r == m.role)
                    && filter.status.is_none_or(|s| Some(s) == m.status)
                    && filter.version.as_ref().is_none_or(|v| *v == m.version)
            })
            .collect())
    }

    /// The hub's metrics page, with `understudy_machines` set from the current listing.
    pub fn hub_metrics_text(&self) -> String {
        let gauge = &self.hub.machines_gauge;
        gauge.reset();
        match self.machine_listing(&ListingFilter::default()) {
            Ok(listing) => {
                for m in listing {
                    let status = m.status.map_or("unknown", |s| s.as_str());
                    gauge
                        .with_label_values(&[&m.service, &m.version, m.role.as_str(), status])
                        .inc();
                }
            }
            Err(e) => tracing::error!("machine listing for metrics: {e}"),
        }
        self.hub.render_metrics()
    }
}

#[cfg(test)]
#[path = "../machines_tests.rs"]
mod tests;
