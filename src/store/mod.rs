//! The controller's state in SQLite: releases, rollouts, their transitions, the mirrored pairs
//! behind every verdict, balancer config versions and stats cursors, machines and their history,
//! the hub keys of registered machines and the machine registry's revisions ([`SqlMachineStore`]).
//!
//! The controller writes here first and acts after: a transition, the balancer config it implies and
//! the pairs that led to it are committed in one transaction before the config is pushed.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use understudy_hub::registry::{MachineRevision, MachineUpdate, Registry, RegistryError};
use understudy_hub::{MachineStore, SecretKey};
use understudy_judge::PairSample;
use understudy_wire::BalancerConfig;

use crate::core::pairing::StoredPair;
use crate::core::roles::MachineRole;
use crate::core::rollout::{Actor, Phase, TransitionRecord};
use crate::core::verdict::RolloutVerdict;

pub mod monitor;
pub mod plans;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database holds unreadable data: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub id: i64,
    pub release: i64,
    pub service: String,
    pub from_version: String,
    pub to_version: String,
    pub after: Vec<String>,
    pub phase: Phase,
    pub entered_ms: u64,
    pub verdict: Option<RolloutVerdict>,
    pub machines_before: BTreeMap<String, MachineRole>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseRow {
    pub id: i64,
    pub created_ms: u64,
    pub rollback_on_failure: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    pub version: String,
    pub stats_cursor: u64,
    pub config: Option<BalancerConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineHistoryRow {
    pub at_ms: u64,
    pub role: MachineRole,
    pub version: String,
    pub rollout: Option<i64>,
    pub cause: String,
}

/// A registered machine's hub keys.
#[derive(Debug, Clone)]
pub struct MachineKeyRow {
    pub id: String,
    pub key: SecretKey,
    /// The key a rotation replaced and until when (wall-clock ms) it is still accepted.
    pub previous: Option<(SecretKey, u64)>,
    pub issued_ms: u64,
}

pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS releases(
    id INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    rollback_on_failure INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts(
    id INTEGER PRIMARY KEY,
    release_id INTEGER NOT NULL REFERENCES releases(id),
    service TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    after_json TEXT NOT NULL,
    phase TEXT NOT NULL,
    phase_detail INTEGER NOT NULL,
    entered_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    verdict_json TEXT,
    machines_before_json TEXT NOT NULL
);
-- The machines a rollout moves (src/core/plan.rs `Selection`: its sub-group, replaced, joining).
-- A rollout without a row here predates sub-groups: it moves the whole service.
CREATE TABLE IF NOT EXISTS rollout_selections(
    rollout_id INTEGER PRIMARY KEY REFERENCES rollouts(id),
    selection_json TEXT NOT NULL
);
-- Machines the monitor took out of their balancer (src/runtime/monitor.rs), and since when.
CREATE TABLE IF NOT EXISTS monitor_held_out(
    machine TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions(
    id INTEGER PRIMARY KEY,
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    at_ms INTEGER NOT NULL,
    from_phase TEXT NOT NULL,
    to_phase TEXT NOT NULL,
    cause TEXT NOT NULL,
    actor TEXT NOT NULL,
    details_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs(
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    seq INTEGER NOT NULL,
    control INTEGER NOT NULL,
    v1_latency_us INTEGER NOT NULL,
    v1_ok INTEGER NOT NULL,
    v2_latency_us INTEGER NOT NULL,
    v2_ok INTEGER NOT NULL,
    matched INTEGER,
    job INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, seq)
);
CREATE TABLE IF NOT EXISTS services(
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    stats_cursor INTEGER NOT NULL,
    config_json TEXT
);
CREATE TABLE IF NOT EXISTS machines(
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS machine_history(
    id INTEGER PRIMARY KEY,
    machine TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    role TEXT NOT NULL,
    version TEXT NOT NULL,
    rollout_id INTEGER,
    cause TEXT NOT NULL
);
-- Hub keys of registered machines (HMAC secrets: the controller must hold them to verify).
-- `previous_*`: the key replaced by a rotation, accepted until `previous_until_ms`.
CREATE TABLE IF NOT EXISTS machine_keys(
    id TEXT PRIMARY KEY,
    key_b64 TEXT NOT NULL,
    previous_b64 TEXT,
    previous_until_ms INTEGER,
    issued_ms INTEGER NOT NULL
);
-- The machine registry: every change of a machine's reported state is a new revision.
CREATE TABLE IF NOT EXISTS machine_revisions(
    id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (id, revision)
);
-- The last hub sequence number accepted per sender (saved about once a second): after a restart
-- the verifier refuses anything at or below it, so a message captured before is not accepted again.
-- `seq` is the u64 stored bit for bit in SQLite's i64.
CREATE TABLE IF NOT EXISTS hub_sequences(
    sender TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
-- The fencing epoch: one more at each controller start (each takeover), sent in every config so
-- a balancer refuses the configs of a controller that no longer leads.
CREATE TABLE IF NOT EXISTS controller_epoch(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL
);
"#;

/// Low bits of a fencing epoch that tell apart controllers of the same takeover count.
pub const EPOCH_SALT_BITS: u32 = 16;

/// So registry operations can run inside [`Store::write_with`].
impl From<StoreError> for RegistryError<StoreError> {
    fn from(e: StoreError) -> Self {
        RegistryError::Store(e)
    }
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

fn json_err(e: serde_json::Error) -> StoreError {
    corrupt(e.to_string())
}

/// Databases written before pairs carried their balancer job number get the column (0: unknown).
fn add_pair_job_column(conn: &Connection) -> rusqlite::Result<()> {
    let has_job = conn
        .prepare("SELECT 1 FROM pragma_table_info('pairs') WHERE name = 'job'")?
        .exists([])?;
    if !has_job {
        conn.execute_batch("ALTER TABLE pairs ADD COLUMN job INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::init(conn, path)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?, Path::new(":memory:"))
    }

    fn init(conn: Connection, path: &Path) -> Result<Store, StoreError> {
        let setup = |conn: &Connection| -> rusqlite::Result<()> {
            // WAL: a crash leaves the last committed transaction intact; NORMAL sync is safe with WAL.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(SCHEMA)?;
            add_pair_job_column(conn)
        };
        setup(&conn).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Store { conn })
    }

    /// Runs `f` in one transaction: all of it is committed, or none.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// [`Store::write`] for callers with their own error type (a refusal decided inside the
    /// transaction rolls it back too).
    pub fn write_with<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.conn.transaction().map_err(StoreError::from)?;
        let value = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(value)
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

// ---- writes (inside a transaction) ----

pub fn insert_release(
    tx: &Connection,
    at_ms: u64,
    rollback_on_failure: bool,
) -> Result<i64, StoreError> {
    tx.execute(
        "INSERT INTO releases(created_ms, rollback_on_failure) VALUES (?1, ?2)",
        params![at_ms as i64, rollback_on_failure],
    )?;
    Ok(tx.last_insert_rowid())
}

#[allow(clippy::too_many_arguments)]
pub fn insert_rollout(
    tx: &Connection,
    release: i64,
    service: &str,
    from_version: &str,
    to_version: &str,
    after: &[String],
    at_ms: u64,
    machines_before: &BTreeMap<String, MachineRole>,
) -> Result<i64, StoreError> {
    tx.execute(
        "INSERT INTO rollouts(release_id, service, from_version, to_version, after_json, phase,
             phase_detail, entered_ms, created_ms, machines_before_json)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6, ?7)",
        params![
            release,
            service,
            from_version,
            to_version,
            serde_json::to_string(after).map_err(json_err)?,
            at_ms as i64,
            serde_json::to_string(machines_before).map_err(json_err)?,
        ],
    )?;
    Ok(tx.last_insert_rowid())
}

pub fn record_transition(
    tx: &Connection,
    rollout: i64,
    record: &TransitionRecord,
) -> Result<(), StoreError> {
    let to = record.to;
    tx.execute(
        "INSERT INTO transitions(rollout_id, at_ms, from_phase, to_phase, cause, actor, details_json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            rollout,
            record.at_ms as i64,
            record.from.to_string(),
            record.to.to_string(),
            record.cause,
            record.actor.as_str(),
            record.details.to_string(),
        ],
    )?;
    let changed = tx.execute(
        "UPDATE rollouts SET phase = ?2, phase_detail = ?3, entered_ms = ?4 WHERE id = ?1",
        params![rollout, to.name(), to.detail(), record.at_ms as i64],
    )?;
    if changed != 1 {
        return Err(corrupt(format!("rollout {rollout} missing")));
    }
    Ok(())
}

pub fn set_verdict(
    tx: &Connection,
    rollout: i64,
    verdict: &RolloutVerdict,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(verdict).map_err(json_err)?;
    tx.execute(
        "UPDATE rollouts SET verdict_json = ?2 WHERE id = ?1",
        params![rollout, json],
    )?;
    Ok(())
}

/// Appends pairs to a rollout, numbered from `first_seq`.
pub fn insert_pairs(
    tx: &Connection,
    rollout: i64,
    first_seq: u64,
    pairs: &[StoredPair],
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO pairs(rollout_id, seq, control, v1_latency_us, v1_ok, v2_latency_us, v2_ok, matched, job)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for (i, p) in pairs.iter().enumerate() {
        let s = &p.sample;
        stmt.execute(params![
            rollout,
            (first_seq + i as u64) as i64,
            p.control,
            s.v1_latency_us as i64,
            s.v1_ok,
            s.v2_latency_us as i64,
            s.v2_ok,
            s.matched,
            p.job as i64,
        ])?;
    }
    Ok(())
}

pub fn upsert_service(tx: &Connection, name: &str, version: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO services(name, version, stats_cursor) VALUES (?1, ?2, 0)
         ON CONFLICT(name) DO NOTHING",
        params![name, version],
    )?;
    Ok(())
}

pub fn set_service_version(tx: &Connection, name: &str, version: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE services SET version = ?2 WHERE name = ?1",
        params![name, version],
    )?;
    Ok(())
}

pub fn set_cursor(tx: &Connection, service: &str, cursor: u64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE services SET stats_cursor = ?2 WHERE name = ?1",
        params![service, cursor as i64],
    )?;
    Ok(())
}

pub fn set_config(tx: &Connection, config: &BalancerConfig) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE services SET config_json = ?2 WHERE name = ?1",
        params![
            config.service,
            serde_json::to_string(config).map_err(json_err)?
        ],
    )?;
    Ok(())
}

/// Records a machine's role; `declare` only inserts it when unknown (startup from the cluster file).
#[allow(clippy::too_many_arguments)]
pub fn set_machine_role(
    tx: &Connection,
    id: &str,
    service: &str,
    version: &str,
    role: MachineRole,
    at_ms: u64,
    rollout: Option<i64>,
    cause: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO machines(id, service, version, role) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(id) DO UPDATE SET role = excluded.role, version = excluded.version",
        params![id, service, version, role.as_str()],
    )?;
    tx.execute(
        "INSERT INTO machine_history(machine, at_ms, role, version, rollout_id, cause)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, at_ms as i64, role.as_str(), version, rollout, cause],
    )?;
    record_role_in_registry(tx, id, role, at_ms)
}

/// The controller assigns roles; a machine known to the registry gets a revision with its new role
/// (in the same transaction as the role change), so its history shows every change.
fn record_role_in_registry(
    tx: &Connection,
    id: &str,
    role: MachineRole,
    at_ms: u64,
) -> Result<(), StoreError> {
    let update = MachineUpdate {
        role: Some(role.hub_role()),
        ..MachineUpdate::default()
    };
    match Registry::new(SqlMachineStore::new(tx)).update(id, &update, at_ms) {
        Ok(_) | Err(RegistryError::Unknown(_)) => Ok(()),
        Err(RegistryError::Store(e)) => Err(e),
        Err(e) => Err(corrupt(format!("registry record of machine `{id}`: {e}"))),
    }
}

/// Registers a machine's hub key, replacing any it had (a re-registration: no grace for the old one).
pub fn put_machine_key(
    tx: &Connection,
    id: &str,
    key: &SecretKey,
    at_ms: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO machine_keys(id, key_b64, previous_b64, previous_until_ms, issued_ms)
         VALUES (?1, ?2, NULL, NULL, ?3)
         ON CONFLICT(id) DO UPDATE SET key_b64 = excluded.key_b64, previous_b64 = NULL,
             previous_until_ms = NULL, issued_ms = excluded.issued_ms",
        params![id, key.to_base64(), at_ms as i64],
    )?;
    Ok(())
}

/// Rotates a machine's key: the current one becomes the previous, accepted until
/// `previous_until_ms`. False when the machine has no key.
pub fn rotate_machine_key(
    tx: &Connection,
    id: &str,
    key: &SecretKey,
    previous_until_ms: u64,
    at_ms: u64,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE machine_keys SET previous_b64 = key_b64, previous_until_ms = ?3, key_b64 = ?2,
             issued_ms = ?4
         WHERE id = ?1",
        params![id, key.to_base64(), previous_until_ms as i64, at_ms as i64],
    )?;
    Ok(changed == 1)
}

/// Saves the last accepted hub sequence number of each sender given (replacing what was saved).
pub fn save_hub_sequences(tx: &Connection, sequences: &[(String, u64)]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO hub_sequences(sender, seq) VALUES (?1, ?2)
         ON CONFLICT(sender) DO UPDATE SET seq = excluded.seq",
    )?;
    for (sender, seq) in sequences {
        stmt.execute(params![sender, *seq as i64])?;
    }
    Ok(())
}

// ---- reads ----

impl Store {
    pub fn releases(&self) -> Result<Vec<ReleaseRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, created_ms, rollback_on_failure FROM releases ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(ReleaseRow {
                id: r.get(0)?,
                created_ms: r.get::<_, i64>(1)? as u64,
                rollback_on_failure: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, release_id, service, from_version, to_version, after_json, phase, phase_detail,
                    entered_ms, verdict_json, machines_before_json, created_ms
             FROM rollouts ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let phase: String = r.get(6)?;
            let verdict: Option<String> = r.get(9)?;
            out.push(RolloutRow {
                id,
                release: r.get(1)?,
                service: r.get(2)?,
                from_version: r.get(3)?,
                to_version: r.get(4)?,
                after: serde_json::from_str(&r.get::<_, String>(5)?).map_err(json_err)?,
                phase: Phase::from_parts(&phase, r.get(7)?)
                    .ok_or_else(|| corrupt(format!("rollout {id}: phase `{phase}`")))?,
                entered_ms: r.get::<_, i64>(8)? as u64,
                verdict: verdict
                    .map(|v| serde_json::from_str(&v))
                    .transpose()
                    .map_err(json_err)?,
                machines_before: serde_json::from_str(&r.get::<_, String>(10)?)
                    .map_err(json_err)?,
                created_ms: r.get::<_, i64>(11)? as u64,
            });
        }
        Ok(out)
    }

    pub fn transitions(&self, rollout: i64) -> Result<Vec<TransitionRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, from_phase, to_phase, cause, actor, details_json FROM transitions
             WHERE rollout_id = ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query([rollout])?;
        let phase = |text: String| {
            text.parse::<Phase>()
                .map_err(|_| corrupt(format!("rollout {rollout}: transition phase `{text}`")))
        };
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let actor: String = r.get(4)?;
            out.push(TransitionRecord {
                at_ms: r.get::<_, i64>(0)? as u64,
                from: phase(r.get(1)?)?,
                to: phase(r.get(2)?)?,
                cause: r.get(3)?,
                actor: Actor::parse(&actor).ok_or_else(|| corrupt(format!("actor `{actor}`")))?,
                details: serde_json::from_str(&r.get::<_, String>(5)?).map_err(json_err)?,
            });
        }
        Ok(out)
    }

    /// A rollout's pairs in arrival order.
    pub fn pairs(&self, rollout: i64) -> Result<Vec<StoredPair>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT control, v1_latency_us, v1_ok, v2_latency_us, v2_ok, matched, job FROM pairs
             WHERE rollout_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([rollout], |r| {
            Ok(StoredPair {
                control: r.get(0)?,
                job: r.get::<_, i64>(6)? as u64,
                sample: PairSample {
                    v1_latency_us: r.get::<_, i64>(1)? as u64,
                    v1_ok: r.get(2)?,
                    v2_latency_us: r.get::<_, i64>(3)? as u64,
                    v2_ok: r.get(4)?,
                    matched: r.get(5)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn services(&self) -> Result<Vec<ServiceRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, version, stats_cursor, config_json FROM services ORDER BY name",
        )?;
        let raw = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in raw {
            let (name, version, cursor, config) = row?;
            out.push(ServiceRow {
                name,
                version,
                stats_cursor: cursor as u64,
                config: config
                    .map(|c| serde_json::from_str(&c))
                    .transpose()
                    .map_err(json_err)?,
            });
        }
        Ok(out)
    }

    /// Machine id -> role.
    pub fn machine_roles(&self) -> Result<BTreeMap<String, MachineRole>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, role FROM machines")?;
        let raw = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in raw {
            let (id, role) = row?;
            let role =
                MachineRole::parse(&role).ok_or_else(|| corrupt(format!("role `{role}`")))?;
            out.insert(id, role);
        }
        Ok(out)
    }

    pub fn machine_history(&self, machine: &str) -> Result<Vec<MachineHistoryRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, role, version, rollout_id, cause FROM machine_history
             WHERE machine = ?1 ORDER BY id",
        )?;
        let raw = stmt.query_map([machine], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in raw {
            let (at, role, version, rollout, cause) = row?;
            out.push(MachineHistoryRow {
                at_ms: at as u64,
                role: MachineRole::parse(&role).ok_or_else(|| corrupt(format!("role `{role}`")))?,
                version,
                rollout,
                cause,
            });
        }
        Ok(out)
    }

    /// Every registered machine's keys, by id.
    pub fn machine_keys(&self) -> Result<Vec<MachineKeyRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, key_b64, previous_b64, previous_until_ms, issued_ms FROM machine_keys
             ORDER BY id",
        )?;
        let raw = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in raw {
            let (id, key, previous, until, issued) = row?;
            // The key itself never goes into an error message.
            let decode = |text: &str| {
                SecretKey::from_base64(text)
                    .map_err(|e| corrupt(format!("hub key of machine `{id}`: {e}")))
            };
            let previous = match (previous, until) {
                (Some(p), Some(until)) => Some((decode(&p)?, until as u64)),
                _ => None,
            };
            out.push(MachineKeyRow {
                key: decode(&key)?,
                id,
                previous,
                issued_ms: issued as u64,
            });
        }
        Ok(out)
    }

    /// Takes the next fencing epoch and records it: the caller now leads. Its high bits count
    /// the takeovers of this store, so each is above every earlier one; its low 16 bits are
    /// random, so two controllers wrongly given different stores but the same balancers still
    /// hold different epochs, and the balancers refuse one of them instead of obeying both.
    pub fn take_epoch(&mut self) -> Result<u64, StoreError> {
        let salt: u64 = rand::random::<u16>().into();
        self.write(|tx| {
            let last: Option<i64> = tx
                .query_row("SELECT epoch FROM controller_epoch WHERE id = 1", [], |r| {
                    r.get(0)
                })
                .optional()?;
            let takeovers = (last.unwrap_or(0) as u64 >> EPOCH_SALT_BITS) + 1;
            let epoch = takeovers << EPOCH_SALT_BITS | salt;
            tx.execute(
                "INSERT INTO controller_epoch(id, epoch) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET epoch = excluded.epoch",
                params![epoch as i64],
            )?;
            Ok(epoch)
        })
    }

    /// The hub sequence numbers saved by [`save_hub_sequences`], by sender.
    pub fn hub_sequences(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT sender, seq FROM hub_sequences")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (sender, seq) = row?;
            out.insert(sender, seq as u64);
        }
        Ok(out)
    }

    /// Keeps the newest `keep` registry revisions of each machine: older ones are deleted now,
    /// and from now on by a trigger of this connection in the very transaction that appends one
    /// (whichever code path appends). `keep` must be at least 1 (the latest stays).
    pub fn limit_machine_history(&self, keep: u64) -> Result<(), StoreError> {
        let keep = keep.max(1) as i64;
        self.conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS temp.machine_revisions_retention;
             CREATE TEMP TRIGGER machine_revisions_retention
             AFTER INSERT ON main.machine_revisions
             BEGIN
                 DELETE FROM machine_revisions
                 WHERE id = NEW.id AND revision <= NEW.revision - {keep};
             END;
             DELETE FROM main.machine_revisions
             WHERE revision <= (SELECT MAX(m.revision) FROM main.machine_revisions m
                                WHERE m.id = machine_revisions.id) - {keep};"
        ))?;
        Ok(())
    }

    pub fn rollout_exists(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM rollouts WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

/// The machine registry's storage ([`understudy_hub::MachineStore`]) over the controller's database:
/// one row per revision in `machine_revisions`. Borrowing a connection (or a transaction) lets a
/// registry change commit together with the rest of a controller write.
pub struct SqlMachineStore<'c> {
    conn: &'c Connection,
}

impl<'c> SqlMachineStore<'c> {
    pub fn new(conn: &'c Connection) -> SqlMachineStore<'c> {
        SqlMachineStore { conn }
    }

    fn revisions(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<MachineRevision>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let raw = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in raw {
            let (id, revision, at_ms, json) = row?;
            out.push(MachineRevision {
                revision: revision as u64,
                at_ms: at_ms as u64,
                record: serde_json::from_str(&json)
                    .map_err(|e| corrupt(format!("registry record of `{id}`: {e}")))?,
            });
        }
        Ok(out)
    }
}

impl MachineStore for SqlMachineStore<'_> {
    type Error = StoreError;

    fn latest(&self, id: &str) -> Result<Option<MachineRevision>, StoreError> {
        Ok(self
            .revisions(
                "SELECT id, revision, at_ms, record_json FROM machine_revisions
                 WHERE id = ?1 ORDER BY revision DESC LIMIT 1",
                [id],
            )?
            .pop())
    }

    fn append(&mut self, revision: MachineRevision) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO machine_revisions(id, revision, at_ms, record_json) VALUES (?1, ?2, ?3, ?4)",
            params![
                revision.record.id,
                revision.revision as i64,
                revision.at_ms as i64,
                serde_json::to_string(&revision.record).map_err(json_err)?,
            ],
        )?;
        Ok(())
    }

    fn history(&self, id: &str) -> Result<Vec<MachineRevision>, StoreError> {
        self.revisions(
            "SELECT id, revision, at_ms, record_json FROM machine_revisions
             WHERE id = ?1 ORDER BY revision",
            [id],
        )
    }

    fn all_latest(&self) -> Result<Vec<MachineRevision>, StoreError> {
        self.revisions(
            "SELECT r.id, r.revision, r.at_ms, r.record_json FROM machine_revisions r
             WHERE r.revision = (SELECT MAX(revision) FROM machine_revisions WHERE id = r.id)
             ORDER BY r.id",
            [],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_hub::Role;

    #[test]
    fn each_opening_takes_a_higher_epoch_that_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let first = Store::open(&path).unwrap().take_epoch().unwrap();
        let second = Store::open(&path).unwrap().take_epoch().unwrap();
        assert_eq!(first >> EPOCH_SALT_BITS, 1);
        assert_eq!(second >> EPOCH_SALT_BITS, 2);
        assert!(second > first);
        // Another store starts its own count: the salt tells its controller apart.
        let other = Store::open_in_memory().unwrap().take_epoch().unwrap();
        assert_eq!(other >> EPOCH_SALT_BITS, 1);
    }

    #[test]
    fn rollout_round_trip_and_atomic_write() {
        let mut store = Store::open_in_memory().unwrap();
        let id = store
            .write(|tx| {
                upsert_service(tx, "db", "v1")?;
                let release = insert_release(tx, 5, true)?;
                let before = BTreeMap::from([("db-1".to_string(), MachineRole::Active)]);
                insert_rollout(tx, release, "db", "v1", "v2", &[], 5, &before)
            })
            .unwrap();
        let record = TransitionRecord {
            at_ms: 9,
            from: Phase::Pending,
            to: Phase::Simulating,
            cause: "no dependency in the release".into(),
            actor: Actor::Controller,
            details: serde_json::json!({}),
        };
        store
            .write(|tx| record_transition(tx, id, &record))
            .unwrap();
        // A failing transaction leaves nothing behind.
        let failed: Result<(), StoreError> = store.write(|tx| {
            record_transition(tx, id, &record)?;
            Err(corrupt("simulated failure"))
        });
        assert!(failed.is_err());
        let rows = store.rollouts().unwrap();
        assert_eq!(rows[0].phase, Phase::Simulating);
        assert_eq!(rows[0].entered_ms, 9);
        assert_eq!(store.transitions(id).unwrap(), vec![record]);
        let pair = StoredPair {
            control: false,
            job: 7,
            sample: PairSample {
                v1_latency_us: 10,
                v1_ok: true,
                v2_latency_us: 12,
                v2_ok: false,
                matched: None,
            },
        };
        store
            .write(|tx| insert_pairs(tx, id, 0, &[pair, pair]))
            .unwrap();
        assert_eq!(store.pairs(id).unwrap(), vec![pair, pair]);
        assert!(store.write(|tx| insert_pairs(tx, id, 1, &[pair])).is_err());
    }

    fn record(id: &str, service: &str, version: &str, role: Role) -> understudy_hub::MachineRecord {
        understudy_hub::MachineRecord {
            id: id.into(),
            service: service.into(),
            version: version.into(),
            address: "127.0.0.1:9000".into(),
            role,
            status: understudy_hub::Status::Running,
            capacity: 10,
            sessions: 0,
        }
    }

    #[test]
    fn registry_revisions_history_filters_and_restart() {
        use understudy_hub::registry::Change;
        use understudy_hub::{MachineFilter, Status};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let mut store = Store::open(&path).unwrap();
            store
                .write_with(|tx| {
                    let mut registry = Registry::new(SqlMachineStore::new(tx));
                    registry.register(record("m-1", "media", "v1", Role::Active), 10)?;
                    registry.register(record("m-2", "media", "v2", Role::Standby), 11)?;
                    registry.register(record("d-1", "db", "v1", Role::Active), 12)?;
                    let same = registry.register(record("m-1", "media", "v1", Role::Active), 13)?;
                    assert!(
                        matches!(same, Change::Unchanged(_)),
                        "no revision for no change"
                    );
                    let down = MachineUpdate {
                        status: Some(Status::Down),
                        ..MachineUpdate::default()
                    };
                    // A clock that stepped back does not reorder the history.
                    registry.update("m-1", &down, 5)?;
                    Ok::<_, RegistryError<StoreError>>(())
                })
                .unwrap();
            put_machine_key(store.conn(), "m-1", &SecretKey::generate(), 1).unwrap();
            // A refusal inside a transaction leaves nothing behind.
            let refused = store.write_with(|tx| {
                let mut registry = Registry::new(SqlMachineStore::new(tx));
                registry.register(record("m-3", "media", "v1", Role::Active), 20)?;
                registry.register(record("m-3", "db", "v1", Role::Active), 21)
            });
            assert!(matches!(refused, Err(RegistryError::ServiceChanged { .. })));
        }
        let store = Store::open(&path).unwrap();
        let registry = Registry::new(SqlMachineStore::new(store.conn()));
        let history = registry.history("m-1").unwrap();
        assert_eq!(
            history
                .iter()
                .map(|r| (r.revision, r.at_ms, r.record.status))
                .collect::<Vec<_>>(),
            vec![(1, 10, Status::Running), (2, 10, Status::Down)]
        );
        assert!(registry.get("m-3").unwrap().is_none());
        let ids = |filter: MachineFilter| -> Vec<String> {
            registry
                .list(&filter)
                .unwrap()
                .into_iter()
                .map(|r| r.record.id)
                .collect()
        };
        assert_eq!(ids(MachineFilter::default()), ["d-1", "m-1", "m-2"]);
        let media = MachineFilter {
            service: Some("media".into()),
            ..MachineFilter::default()
        };
        assert_eq!(ids(media.clone()), ["m-1", "m-2"]);
        assert_eq!(
            ids(MachineFilter {
                status: Some(Status::Running),
                ..media.clone()
            }),
            ["m-2"]
        );
        assert_eq!(
            ids(MachineFilter {
                role: Some(Role::Active),
                version: Some("v1".into()),
                ..MachineFilter::default()
            }),
            ["d-1", "m-1"]
        );
        let keys = store.machine_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id, "m-1");
        assert!(keys[0].previous.is_none());
    }
}
