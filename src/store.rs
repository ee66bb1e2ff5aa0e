//! The controller's state in SQLite: releases, rollouts, their transitions, the mirrored pairs
//! behind every verdict, balancer config versions and stats cursors, machines and their history.
//!
//! The controller writes here first and acts after: a transition, the balancer config it implies and
//! the pairs that led to it are committed in one transaction before the config is pushed.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use understudy_judge::PairSample;
use understudy_proxy::wire::BalancerConfig;

use crate::rollout::{Actor, Phase};

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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransitionRecord {
    pub at_ms: u64,
    pub from: String,
    pub to: String,
    pub cause: String,
    pub actor: Actor,
    /// Numbers behind the move (the verdict, for a judgement).
    pub details: serde_json::Value,
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
    pub verdict: Option<serde_json::Value>,
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

/// One recorded pair of a rollout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoredPair {
    /// A v1/v1 A/A control pair rather than v1/v2.
    pub control: bool,
    pub sample: PairSample,
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
"#;

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

fn json_err(e: serde_json::Error) -> StoreError {
    corrupt(e.to_string())
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
            conn.execute_batch(SCHEMA)
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
    from: Phase,
    to: Phase,
    record: &TransitionRecord,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO transitions(rollout_id, at_ms, from_phase, to_phase, cause, actor, details_json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            rollout,
            record.at_ms as i64,
            from.to_string(),
            to.to_string(),
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
    verdict: &serde_json::Value,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE rollouts SET verdict_json = ?2 WHERE id = ?1",
        params![rollout, verdict.to_string()],
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
        "INSERT INTO pairs(rollout_id, seq, control, v1_latency_us, v1_ok, v2_latency_us, v2_ok, matched)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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
        let raw = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, String>(10)?,
                r.get::<_, i64>(11)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in raw {
            let (
                id,
                release,
                service,
                from,
                to,
                after,
                phase,
                detail,
                entered,
                verdict,
                before,
                created,
            ) = row?;
            out.push(RolloutRow {
                id,
                release,
                service,
                from_version: from,
                to_version: to,
                after: serde_json::from_str(&after).map_err(json_err)?,
                phase: Phase::from_parts(&phase, detail)
                    .ok_or_else(|| corrupt(format!("rollout {id}: phase `{phase}`")))?,
                entered_ms: entered as u64,
                verdict: verdict
                    .map(|v| serde_json::from_str(&v))
                    .transpose()
                    .map_err(json_err)?,
                machines_before: serde_json::from_str(&before).map_err(json_err)?,
                created_ms: created as u64,
            });
        }
        Ok(out)
    }

    pub fn transitions(&self, rollout: i64) -> Result<Vec<TransitionRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, from_phase, to_phase, cause, actor, details_json FROM transitions
             WHERE rollout_id = ?1 ORDER BY id",
        )?;
        let raw = stmt.query_map([rollout], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in raw {
            let (at, from, to, cause, actor, details) = row?;
            out.push(TransitionRecord {
                at_ms: at as u64,
                from,
                to,
                cause,
                actor: Actor::parse(&actor).ok_or_else(|| corrupt(format!("actor `{actor}`")))?,
                details: serde_json::from_str(&details).map_err(json_err)?,
            });
        }
        Ok(out)
    }

    /// A rollout's pairs in arrival order.
    pub fn pairs(&self, rollout: i64) -> Result<Vec<StoredPair>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT control, v1_latency_us, v1_ok, v2_latency_us, v2_ok, matched FROM pairs
             WHERE rollout_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([rollout], |r| {
            Ok(StoredPair {
                control: r.get(0)?,
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

    pub fn rollout_exists(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM rollouts WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            from: "pending".into(),
            to: "simulating".into(),
            cause: "no dependency in the release".into(),
            actor: Actor::Controller,
            details: serde_json::json!({}),
        };
        store
            .write(|tx| record_transition(tx, id, Phase::Pending, Phase::Simulating, &record))
            .unwrap();
        // A failing transaction leaves nothing behind.
        let failed: Result<(), StoreError> = store.write(|tx| {
            record_transition(tx, id, Phase::Simulating, Phase::Aborted, &record)?;
            Err(corrupt("simulated failure"))
        });
        assert!(failed.is_err());
        let rows = store.rollouts().unwrap();
        assert_eq!(rows[0].phase, Phase::Simulating);
        assert_eq!(rows[0].entered_ms, 9);
        assert_eq!(store.transitions(id).unwrap(), vec![record]);
        let pair = StoredPair {
            control: false,
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
}
