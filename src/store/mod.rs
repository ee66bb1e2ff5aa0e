//! The controller's state in SQLite or PostgreSQL ([`sql`] gives both one surface): releases, rollouts, their transitions, the mirrored pairs
//! behind every verdict, balancer config versions and stats cursors, machines and their history,
//! the hub keys of registered machines and the machine registry's revisions ([`SqlMachineStore`]).
//!
//! The controller writes here first and acts after: a transition, the balancer config it implies and
//! the pairs that led to it are committed in one transaction before the config is pushed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;
use serde::Serialize;
use understudy_hub::registry::{MachineRevision, MachineUpdate, Registry, RegistryError};
use understudy_hub::{MachineStore, SecretKey};
use understudy_judge::{AnswerFields, PairSample};
use understudy_wire::BalancerConfig;

use crate::config::store::{PgTarget, StoreLocation};
use crate::core::pairing::StoredPair;
use crate::core::roles::MachineRole;
use crate::core::rollout::{Actor, Phase, TransitionRecord};
use crate::core::verdict::RolloutVerdict;
use postgres::PgConn;
use sql::{vals, Conn};
pub use sql::{Dialect, Row, Sql, Value};

pub mod approvals;
pub mod lease;
pub mod monitor;
pub mod plans;
pub mod postgres;
mod schema;
pub mod sql;

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
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("store {store} cannot be reached: {reason}")]
    Unreachable { store: String, reason: String },
    #[error("store {store} gave no answer in {after:?}")]
    Timeout {
        store: String,
        after: std::time::Duration,
    },
    #[error("fenced off: this controller's epoch {mine} is no longer the store's ({current}); another controller leads")]
    Fenced { mine: u64, current: u64 },
    #[error("this controller stands by: it writes nothing until it leads")]
    ReadOnly,
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
    /// The operator who started it.
    pub created_by: Option<String>,
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

/// The controller's store: SQLite on one host, or PostgreSQL shared by several controllers.
pub struct Store {
    db: Db,
    /// What every write checks first.
    fence: Fence,
    /// Registry revisions kept per machine (0: all), see [`Store::limit_machine_history`].
    keep_revisions: AtomicI64,
}

enum Db {
    Sqlite(Connection),
    Postgres(Box<PgConn>),
}

/// What a write of this controller checks before it changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Nothing (tools and tests working on a store directly).
    Open,
    /// That this is still the store's fencing epoch: a controller that lost its lead cannot write
    /// after its successor took over.
    Epoch(u64),
    /// Refused: a standby that never led writes nothing.
    ReadOnly,
}

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

fn to_json(value: &impl Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(json_err)
}

/// Serializes schema creation of controllers starting together on one PostgreSQL database.
const SCHEMA_LOCK: i64 = 0x756e_6465_7273_7475;

impl Store {
    /// Opens the store at `location`: a SQLite file or memory, or a PostgreSQL database (an error
    /// names a server that cannot be reached).
    pub fn open_location(location: &StoreLocation) -> Result<Store, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Store::open(path),
            StoreLocation::Memory => Store::open_in_memory(),
            StoreLocation::Postgres(target) => Store::open_postgres(target),
        }
    }

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
            // Controllers sharing a file wait for each other's writes instead of failing at once.
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.execute_batch(schema::SQLITE)?;
            schema::add_columns(conn)
        };
        setup(&conn).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Store::over(Db::Sqlite(conn)))
    }

    /// Connects to a PostgreSQL database and creates the tables it lacks.
    pub fn open_postgres(target: &PgTarget) -> Result<Store, StoreError> {
        let store = Store::over(Db::Postgres(Box::new(PgConn::connect(target)?)));
        let Db::Postgres(pg) = &store.db else {
            unreachable!("just made")
        };
        pg.transaction(0, |sql| {
            sql.execute("SELECT pg_advisory_xact_lock(?1)", vals![SCHEMA_LOCK])?;
            for statement in schema::postgres().split(';').filter(|s| has_sql(s)) {
                sql.execute(statement, &[])?;
            }
            for statement in schema::postgres_added_columns() {
                sql.execute(&statement, &[])?;
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(store)
    }

    fn over(db: Db) -> Store {
        Store {
            db,
            fence: Fence::Open,
            keep_revisions: AtomicI64::new(0),
        }
    }

    /// Where the store is, for logs (a PostgreSQL URL without its password).
    pub fn shown(&self) -> String {
        match &self.db {
            Db::Sqlite(conn) => conn.path().unwrap_or(":memory:").to_string(),
            Db::Postgres(pg) => pg.shown().to_string(),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.db {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// What every write checks from now on ([`StoreError::Fenced`], [`StoreError::ReadOnly`]).
    pub fn set_fence(&mut self, fence: Fence) {
        self.fence = fence;
    }

    fn keep(&self) -> i64 {
        self.keep_revisions.load(Ordering::Relaxed)
    }

    /// Runs `f` on the store outside any transaction (reads).
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Sql<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        match &self.db {
            Db::Sqlite(conn) => f(&Sql {
                conn: Conn::Sqlite(conn),
                keep_revisions: self.keep(),
            }),
            Db::Postgres(pg) => pg.read(self.keep(), |sql| f(&sql)),
        }
    }

    /// Runs `f` in one transaction: all of it is committed, or none.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Sql<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_with(f)
    }

    /// [`Store::write`] for callers with their own error type (a refusal decided inside the
    /// transaction rolls it back too).
    pub fn write_with<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Sql<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let fence = self.fence;
        let guarded = |sql: &Sql<'_>| -> Result<T, E> {
            match fence {
                Fence::Open => {}
                Fence::Epoch(epoch) => check_fence(sql, epoch)?,
                Fence::ReadOnly => return Err(StoreError::ReadOnly.into()),
            }
            f(sql)
        };
        self.transaction(guarded)
    }

    /// A transaction without the fence check (taking the lease).
    fn transaction<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Sql<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let keep = self.keep();
        match &mut self.db {
            Db::Sqlite(conn) => {
                let tx = conn.transaction().map_err(StoreError::from)?;
                let value = f(&Sql {
                    conn: Conn::Sqlite(&tx),
                    keep_revisions: keep,
                })?;
                tx.commit().map_err(StoreError::from)?;
                Ok(value)
            }
            Db::Postgres(pg) => pg.transaction(keep, |sql| f(&sql)),
        }
    }
}

fn has_sql(statement: &str) -> bool {
    statement
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
}

/// Refuses the write of a controller whose epoch is no longer the store's. On PostgreSQL the row
/// is read `FOR SHARE`: a takeover's update waits until this transaction ends, and a transaction
/// begun after it sees the new epoch.
fn check_fence(sql: &Sql<'_>, mine: u64) -> Result<(), StoreError> {
    let query = match sql.dialect() {
        Dialect::Sqlite => "SELECT epoch FROM controller_epoch WHERE id = 1",
        Dialect::Postgres => "SELECT epoch FROM controller_epoch WHERE id = 1 FOR SHARE",
    };
    let current = sql.query_opt(query, &[])?.map(|r| r.u64(0)).transpose()?;
    match current {
        Some(current) if current == mine => Ok(()),
        current => Err(StoreError::Fenced {
            mine,
            current: current.unwrap_or(0),
        }),
    }
}

// ---- writes (inside a transaction) ----

pub fn insert_release(
    tx: &Sql<'_>,
    at_ms: u64,
    rollback_on_failure: bool,
    created_by: Option<&str>,
) -> Result<i64, StoreError> {
    tx.query_one(
        "INSERT INTO releases(created_ms, rollback_on_failure, created_by) VALUES (?1, ?2, ?3)
         RETURNING id",
        vals![at_ms, rollback_on_failure, created_by],
    )?
    .i64(0)
}

#[allow(clippy::too_many_arguments)]
pub fn insert_rollout(
    tx: &Sql<'_>,
    release: i64,
    service: &str,
    from_version: &str,
    to_version: &str,
    after: &[String],
    at_ms: u64,
    machines_before: &BTreeMap<String, MachineRole>,
) -> Result<i64, StoreError> {
    tx.query_one(
        "INSERT INTO rollouts(release_id, service, from_version, to_version, after_json, phase,
             phase_detail, entered_ms, created_ms, machines_before_json)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6, ?7) RETURNING id",
        vals![
            release,
            service,
            from_version,
            to_version,
            to_json(&after)?,
            at_ms,
            to_json(machines_before)?,
        ],
    )?
    .i64(0)
}

pub fn record_transition(
    tx: &Sql<'_>,
    rollout: i64,
    record: &TransitionRecord,
) -> Result<(), StoreError> {
    let to = record.to;
    tx.execute(
        "INSERT INTO transitions(rollout_id, at_ms, from_phase, to_phase, cause, actor, details_json,
                                 operator)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        vals![
            rollout,
            record.at_ms,
            record.from.to_string(),
            record.to.to_string(),
            &record.cause,
            record.actor.as_str(),
            record.details.to_string(),
            record.operator.as_deref(),
        ],
    )?;
    let changed = tx.execute(
        "UPDATE rollouts SET phase = ?2, phase_detail = ?3, entered_ms = ?4 WHERE id = ?1",
        vals![rollout, to.name(), to.detail(), record.at_ms],
    )?;
    if changed != 1 {
        return Err(corrupt(format!("rollout {rollout} missing")));
    }
    Ok(())
}

pub fn set_verdict(tx: &Sql<'_>, rollout: i64, verdict: &RolloutVerdict) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE rollouts SET verdict_json = ?2 WHERE id = ?1",
        vals![rollout, to_json(verdict)?],
    )?;
    Ok(())
}

/// Rows per `INSERT` of pairs: one statement (one round trip to PostgreSQL) per hundred pairs
/// instead of one per pair.
const PAIRS_PER_STATEMENT: usize = 100;

/// `INSERT INTO pairs ... VALUES (?1, ..., ?9), (?10, ...)` for `rows` rows.
fn insert_pairs_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO pairs(rollout_id, seq, control, v1_latency_us, v1_ok, v2_latency_us, v2_ok, matched, job, diff) VALUES ",
    );
    for row in 0..rows {
        let first = row * 10 + 1;
        let marks: Vec<String> = (first..first + 10).map(|n| format!("?{n}")).collect();
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("({})", marks.join(", ")));
    }
    sql
}

/// Appends pairs to a rollout, numbered from `first_seq`.
pub fn insert_pairs(
    tx: &Sql<'_>,
    rollout: i64,
    first_seq: u64,
    pairs: &[StoredPair],
) -> Result<(), StoreError> {
    for (c, chunk) in pairs.chunks(PAIRS_PER_STATEMENT).enumerate() {
        let mut params = Vec::with_capacity(chunk.len() * 10);
        for (i, p) in chunk.iter().enumerate() {
            let s = &p.sample;
            let diff = p.fields.as_deref().map(to_json).transpose()?;
            let seq = first_seq + (c * PAIRS_PER_STATEMENT + i) as u64;
            params.extend_from_slice(vals![
                rollout,
                seq,
                p.control,
                s.v1_latency_us,
                s.v1_ok,
                s.v2_latency_us,
                s.v2_ok,
                s.matched,
                p.job,
                diff,
            ]);
        }
        tx.execute(&insert_pairs_sql(chunk.len()), &params)?;
    }
    Ok(())
}

pub fn upsert_service(tx: &Sql<'_>, name: &str, version: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO services(name, version, stats_cursor) VALUES (?1, ?2, 0)
         ON CONFLICT(name) DO NOTHING",
        vals![name, version],
    )?;
    Ok(())
}

pub fn set_service_version(tx: &Sql<'_>, name: &str, version: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE services SET version = ?2 WHERE name = ?1",
        vals![name, version],
    )?;
    Ok(())
}

pub fn set_cursor(tx: &Sql<'_>, service: &str, cursor: u64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE services SET stats_cursor = ?2 WHERE name = ?1",
        vals![service, cursor],
    )?;
    Ok(())
}

pub fn set_config(tx: &Sql<'_>, config: &BalancerConfig) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE services SET config_json = ?2 WHERE name = ?1",
        vals![&config.service, to_json(config)?],
    )?;
    Ok(())
}

/// Records a machine's role; `declare` only inserts it when unknown (startup from the cluster file).
#[allow(clippy::too_many_arguments)]
pub fn set_machine_role(
    tx: &Sql<'_>,
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
        vals![id, service, version, role.as_str()],
    )?;
    tx.execute(
        "INSERT INTO machine_history(machine, at_ms, role, version, rollout_id, cause)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        vals![id, at_ms, role.as_str(), version, rollout, cause],
    )?;
    record_role_in_registry(tx, id, role, at_ms)
}

/// The controller assigns roles; a machine known to the registry gets a revision with its new role
/// (in the same transaction as the role change), so its history shows every change.
fn record_role_in_registry(
    tx: &Sql<'_>,
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
    tx: &Sql<'_>,
    id: &str,
    key: &SecretKey,
    at_ms: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO machine_keys(id, key_b64, previous_b64, previous_until_ms, issued_ms)
         VALUES (?1, ?2, NULL, NULL, ?3)
         ON CONFLICT(id) DO UPDATE SET key_b64 = excluded.key_b64, previous_b64 = NULL,
             previous_until_ms = NULL, issued_ms = excluded.issued_ms",
        vals![id, key.to_base64(), at_ms],
    )?;
    Ok(())
}

/// Rotates a machine's key: the current one becomes the previous, accepted until
/// `previous_until_ms`. False when the machine has no key.
pub fn rotate_machine_key(
    tx: &Sql<'_>,
    id: &str,
    key: &SecretKey,
    previous_until_ms: u64,
    at_ms: u64,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE machine_keys SET previous_b64 = key_b64, previous_until_ms = ?3, key_b64 = ?2,
             issued_ms = ?4
         WHERE id = ?1",
        vals![id, key.to_base64(), previous_until_ms, at_ms],
    )?;
    Ok(changed == 1)
}

/// Saves the last accepted hub sequence number of each sender given; a number never moves back
/// (two controllers saving at once keep the higher). The numbers are u64 stored bit for bit, so
/// they are compared as unsigned: a negative i64 is the larger when the other is not.
pub fn save_hub_sequences(tx: &Sql<'_>, sequences: &[(String, u64)]) -> Result<(), StoreError> {
    for (sender, seq) in sequences {
        tx.execute(
            "INSERT INTO hub_sequences(sender, seq) VALUES (?1, ?2)
             ON CONFLICT(sender) DO UPDATE SET seq = excluded.seq
             WHERE (excluded.seq < 0 AND hub_sequences.seq >= 0)
                OR ((excluded.seq < 0) = (hub_sequences.seq < 0) AND excluded.seq > hub_sequences.seq)",
            vals![sender, *seq],
        )?;
    }
    Ok(())
}

// ---- reads ----

impl Store {
    pub fn releases(&self) -> Result<Vec<ReleaseRow>, StoreError> {
        self.read(|sql| {
            sql.query(
                "SELECT id, created_ms, rollback_on_failure, created_by FROM releases ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(ReleaseRow {
                    id: r.i64(0)?,
                    created_ms: r.u64(1)?,
                    rollback_on_failure: r.bool(2)?,
                    created_by: r.opt_text(3)?,
                })
            })
            .collect()
        })
    }

    pub fn rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        let rows = self.read(|sql| {
            sql.query(
                "SELECT id, release_id, service, from_version, to_version, after_json, phase,
                        phase_detail, entered_ms, verdict_json, machines_before_json, created_ms
                 FROM rollouts ORDER BY id",
                &[],
            )
        })?;
        rows.iter().map(rollout_row).collect()
    }

    pub fn transitions(&self, rollout: i64) -> Result<Vec<TransitionRecord>, StoreError> {
        let rows = self.read(|sql| {
            sql.query(
                "SELECT at_ms, from_phase, to_phase, cause, actor, details_json, operator
                 FROM transitions WHERE rollout_id = ?1 ORDER BY id",
                vals![rollout],
            )
        })?;
        let phase = |text: String| {
            text.parse::<Phase>()
                .map_err(|_| corrupt(format!("rollout {rollout}: transition phase `{text}`")))
        };
        rows.iter()
            .map(|r| {
                let actor = r.text(4)?;
                Ok(TransitionRecord {
                    at_ms: r.u64(0)?,
                    from: phase(r.text(1)?)?,
                    to: phase(r.text(2)?)?,
                    cause: r.text(3)?,
                    actor: Actor::parse(&actor)
                        .ok_or_else(|| corrupt(format!("actor `{actor}`")))?,
                    details: r.json(5)?,
                    operator: r.opt_text(6)?,
                })
            })
            .collect()
    }

    /// A rollout's pairs in arrival order.
    pub fn pairs(&self, rollout: i64) -> Result<Vec<StoredPair>, StoreError> {
        let rows = self.read(|sql| {
            sql.query(
                "SELECT control, v1_latency_us, v1_ok, v2_latency_us, v2_ok, matched, job, diff FROM pairs
                 WHERE rollout_id = ?1 ORDER BY seq",
                vals![rollout],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(StoredPair {
                    control: r.bool(0)?,
                    job: r.u64(6)?,
                    sample: PairSample {
                        v1_latency_us: r.u64(1)?,
                        v1_ok: r.bool(2)?,
                        v2_latency_us: r.u64(3)?,
                        v2_ok: r.bool(4)?,
                        matched: r.opt_bool(5)?,
                    },
                    fields: r.opt_json::<AnswerFields>(7)?.map(Arc::new),
                })
            })
            .collect()
    }

    pub fn services(&self) -> Result<Vec<ServiceRow>, StoreError> {
        let rows = self.read(|sql| {
            sql.query(
                "SELECT name, version, stats_cursor, config_json FROM services ORDER BY name",
                &[],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(ServiceRow {
                    name: r.text(0)?,
                    version: r.text(1)?,
                    stats_cursor: r.u64(2)?,
                    config: r.opt_json(3)?,
                })
            })
            .collect()
    }

    /// Machine id -> role.
    pub fn machine_roles(&self) -> Result<BTreeMap<String, MachineRole>, StoreError> {
        let rows = self.read(|sql| sql.query("SELECT id, role FROM machines", &[]))?;
        rows.iter()
            .map(|r| {
                let role = r.text(1)?;
                let role =
                    MachineRole::parse(&role).ok_or_else(|| corrupt(format!("role `{role}`")))?;
                Ok((r.text(0)?, role))
            })
            .collect()
    }

    pub fn machine_history(&self, machine: &str) -> Result<Vec<MachineHistoryRow>, StoreError> {
        let rows = self.read(|sql| {
            sql.query(
                "SELECT at_ms, role, version, rollout_id, cause FROM machine_history
                 WHERE machine = ?1 ORDER BY id",
                vals![machine],
            )
        })?;
        rows.iter()
            .map(|r| {
                let role = r.text(1)?;
                Ok(MachineHistoryRow {
                    at_ms: r.u64(0)?,
                    role: MachineRole::parse(&role)
                        .ok_or_else(|| corrupt(format!("role `{role}`")))?,
                    version: r.text(2)?,
                    rollout: r.opt_i64(3)?,
                    cause: r.text(4)?,
                })
            })
            .collect()
    }

    /// Every registered machine's keys, by id.
    pub fn machine_keys(&self) -> Result<Vec<MachineKeyRow>, StoreError> {
        let rows = self.read(|sql| {
            sql.query(
                "SELECT id, key_b64, previous_b64, previous_until_ms, issued_ms FROM machine_keys
                 ORDER BY id",
                &[],
            )
        })?;
        rows.iter().map(machine_key_row).collect()
    }

    /// Takes the next fencing epoch and records it: the caller now leads (a controller without a
    /// lease, alone on its store). See [`next_epoch`].
    pub fn take_epoch(&mut self) -> Result<u64, StoreError> {
        let salt: u16 = rand::random();
        self.transaction(|tx| {
            let epoch = next_epoch(current_epoch(tx)?, salt);
            set_epoch(tx, epoch)?;
            Ok::<_, StoreError>(epoch)
        })
    }

    /// The hub sequence numbers saved by [`save_hub_sequences`], by sender.
    pub fn hub_sequences(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let rows = self.read(|sql| sql.query("SELECT sender, seq FROM hub_sequences", &[]))?;
        rows.iter().map(|r| Ok((r.text(0)?, r.u64(1)?))).collect()
    }

    /// Keeps the newest `keep` registry revisions of each machine: older ones are deleted now,
    /// and from now on in the very transaction that appends one ([`SqlMachineStore`]).
    /// `keep` must be at least 1 (the latest stays).
    pub fn limit_machine_history(&self, keep: u64) -> Result<(), StoreError> {
        let keep = keep.max(1) as i64;
        self.keep_revisions.store(keep, Ordering::Relaxed);
        self.read(|sql| {
            sql.execute(
                "DELETE FROM machine_revisions
                 WHERE revision <= (SELECT MAX(m.revision) FROM machine_revisions m
                                    WHERE m.id = machine_revisions.id) - ?1",
                vals![keep],
            )
        })?;
        Ok(())
    }

    pub fn rollout_exists(&self, id: i64) -> Result<bool, StoreError> {
        self.read(|sql| {
            Ok(sql
                .query_opt("SELECT 1 FROM rollouts WHERE id = ?1", vals![id])?
                .is_some())
        })
    }
}

fn rollout_row(r: &Row) -> Result<RolloutRow, StoreError> {
    let id = r.i64(0)?;
    let phase = r.text(6)?;
    let detail = r.i64(7)?;
    Ok(RolloutRow {
        id,
        release: r.i64(1)?,
        service: r.text(2)?,
        from_version: r.text(3)?,
        to_version: r.text(4)?,
        after: r.json(5)?,
        phase: Phase::from_parts(&phase, detail)
            .ok_or_else(|| corrupt(format!("rollout {id}: phase `{phase}`")))?,
        entered_ms: r.u64(8)?,
        verdict: r.opt_json(9)?,
        machines_before: r.json(10)?,
        created_ms: r.u64(11)?,
    })
}

fn machine_key_row(r: &Row) -> Result<MachineKeyRow, StoreError> {
    let id = r.text(0)?;
    // The key itself never goes into an error message.
    let decode = |text: &str| {
        SecretKey::from_base64(text).map_err(|e| corrupt(format!("hub key of machine `{id}`: {e}")))
    };
    let previous = match (r.opt_text(2)?, r.opt_i64(3)?) {
        (Some(p), Some(until)) => Some((decode(&p)?, until as u64)),
        _ => None,
    };
    Ok(MachineKeyRow {
        key: decode(&r.text(1)?)?,
        previous,
        issued_ms: r.u64(4)?,
        id,
    })
}

/// The fencing epoch after `last`: its high bits count the takeovers of this store, so it is above
/// every earlier one; its low [`EPOCH_SALT_BITS`] are `salt` (random), so two controllers wrongly
/// given different stores but the same balancers still hold different epochs, and the balancers
/// refuse one of them instead of obeying both.
pub fn next_epoch(last: u64, salt: u16) -> u64 {
    let takeovers = (last >> EPOCH_SALT_BITS) + 1;
    takeovers << EPOCH_SALT_BITS | u64::from(salt)
}

fn current_epoch(tx: &Sql<'_>) -> Result<u64, StoreError> {
    Ok(tx
        .query_opt("SELECT epoch FROM controller_epoch WHERE id = 1", &[])?
        .map(|r| r.u64(0))
        .transpose()?
        .unwrap_or(0))
}

fn set_epoch(tx: &Sql<'_>, epoch: u64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO controller_epoch(id, epoch) VALUES (1, ?1)
         ON CONFLICT(id) DO UPDATE SET epoch = excluded.epoch",
        vals![epoch],
    )?;
    Ok(())
}

/// The machine registry's storage ([`understudy_hub::MachineStore`]) over the controller's store:
/// one row per revision in `machine_revisions`. Borrowing a connection (or a transaction) lets a
/// registry change commit together with the rest of a controller write.
pub struct SqlMachineStore<'c> {
    sql: Sql<'c>,
}

impl<'c> SqlMachineStore<'c> {
    pub fn new(sql: &Sql<'c>) -> SqlMachineStore<'c> {
        SqlMachineStore { sql: *sql }
    }

    fn revisions(&self, sql: &str, args: &[Value]) -> Result<Vec<MachineRevision>, StoreError> {
        self.sql
            .query(sql, args)?
            .iter()
            .map(|r| {
                let id = r.text(0)?;
                Ok(MachineRevision {
                    revision: r.u64(1)?,
                    at_ms: r.u64(2)?,
                    record: serde_json::from_str(&r.text(3)?)
                        .map_err(|e| corrupt(format!("registry record of `{id}`: {e}")))?,
                })
            })
            .collect()
    }
}

impl MachineStore for SqlMachineStore<'_> {
    type Error = StoreError;

    fn latest(&self, id: &str) -> Result<Option<MachineRevision>, StoreError> {
        Ok(self
            .revisions(
                "SELECT id, revision, at_ms, record_json FROM machine_revisions
                 WHERE id = ?1 ORDER BY revision DESC LIMIT 1",
                vals![id],
            )?
            .pop())
    }

    fn append(&mut self, revision: MachineRevision) -> Result<(), StoreError> {
        let id = &revision.record.id;
        self.sql.execute(
            "INSERT INTO machine_revisions(id, revision, at_ms, record_json) VALUES (?1, ?2, ?3, ?4)",
            vals![id, revision.revision, revision.at_ms, to_json(&revision.record)?],
        )?;
        if self.sql.keep_revisions > 0 {
            self.sql.execute(
                "DELETE FROM machine_revisions WHERE id = ?1 AND revision <= ?2",
                vals![id, revision.revision as i64 - self.sql.keep_revisions],
            )?;
        }
        Ok(())
    }

    fn history(&self, id: &str) -> Result<Vec<MachineRevision>, StoreError> {
        self.revisions(
            "SELECT id, revision, at_ms, record_json FROM machine_revisions
             WHERE id = ?1 ORDER BY revision",
            vals![id],
        )
    }

    fn all_latest(&self) -> Result<Vec<MachineRevision>, StoreError> {
        self.revisions(
            "SELECT r.id, r.revision, r.at_ms, r.record_json FROM machine_revisions r
             WHERE r.revision = (SELECT MAX(revision) FROM machine_revisions WHERE id = r.id)
             ORDER BY r.id",
            &[],
        )
    }
}

#[cfg(test)]
mod postgres_tests;

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
        round_trip(&mut Store::open_in_memory().unwrap());
    }

    /// What every store must do alike (SQLite here, PostgreSQL in `postgres_tests`).
    pub(super) fn round_trip(store: &mut Store) {
        let id = store
            .write(|tx| {
                upsert_service(tx, "db", "v1")?;
                let release = insert_release(tx, 5, true, Some("alice"))?;
                let before = BTreeMap::from([("db-1".to_string(), MachineRole::Active)]);
                insert_rollout(tx, release, "db", "v1", "v2", &[], 5, &before)
            })
            .unwrap();
        let record = TransitionRecord {
            at_ms: 9,
            from: Phase::Pending,
            to: Phase::Simulating,
            cause: "no dependency in the release".into(),
            actor: Actor::Ops,
            details: serde_json::json!({}),
            operator: Some("alice".into()),
        };
        store
            .write(|tx| record_transition(tx, id, &record))
            .unwrap();
        assert_eq!(
            store.releases().unwrap()[0].created_by.as_deref(),
            Some("alice")
        );
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
            fields: None,
        };
        // A pair compared field by field keeps its differences.
        let compared = StoredPair {
            fields: Some(Arc::new(AnswerFields {
                paths: vec![understudy_judge::FieldValues {
                    path: "items[].price".into(),
                    v1: Some("12.5".into()),
                    copy: None,
                }],
            })),
            ..pair.clone()
        };
        store
            .write(|tx| insert_pairs(tx, id, 0, &[pair.clone(), compared.clone()]))
            .unwrap();
        assert_eq!(store.pairs(id).unwrap(), vec![pair.clone(), compared]);
        assert!(store
            .write(|tx| insert_pairs(tx, id, 1, std::slice::from_ref(&pair)))
            .is_err());
        // More pairs than one statement carries keep their numbers and order.
        let many: Vec<StoredPair> = (0..250)
            .map(|job| StoredPair {
                job,
                ..pair.clone()
            })
            .collect();
        store.write(|tx| insert_pairs(tx, id, 2, &many)).unwrap();
        let jobs: Vec<u64> = store.pairs(id).unwrap().iter().map(|p| p.job).collect();
        assert_eq!(jobs[2..], (0..250).collect::<Vec<u64>>()[..]);
        approvals_round_trip(store, id);
    }

    /// The evidence log and approvals come back as written; a snapshot is logged once per seq.
    fn approvals_round_trip(store: &mut Store, id: i64) {
        use crate::core::evidence::{Approval, EvidenceSnapshot};
        let snapshot = |seq| EvidenceSnapshot {
            id: None,
            seq,
            at_ms: 100 + seq,
            jobs: 5_000,
            decision: understudy_judge::Decision::Pass,
            tests: Vec::new(),
        };
        let approval = Approval {
            operator: "bob".into(),
            at_ms: 7,
            evidence: format!("{id}.1.5"),
            seq: 1,
            expires_at_ms: 60_007,
        };
        store
            .write(|tx| {
                approvals::log_evidence(tx, id, &snapshot(0))?;
                approvals::log_evidence(tx, id, &snapshot(1))?;
                approvals::insert_approval(tx, id, &approval)
            })
            .unwrap();
        assert!(store
            .write(|tx| approvals::log_evidence(tx, id, &snapshot(1)))
            .is_err());
        let logs = store.read(approvals::evidence_logs).unwrap();
        assert_eq!(logs[&id], vec![snapshot(0), snapshot(1)]);
        let stored = store.read(approvals::approvals).unwrap();
        assert_eq!(stored[&id], vec![approval]);
    }

    #[test]
    fn a_database_written_before_operators_had_names_gets_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = schema::SQLITE
            .replace(",\n    created_by TEXT\n)", "\n)")
            .replace(",\n    operator TEXT\n)", "\n)");
        assert!(!old.contains("created_by") && old.len() < schema::SQLITE.len());
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(&old)
            .unwrap();
        let mut store = Store::open(&path).unwrap();
        round_trip(&mut store);
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
            store
                .write(|tx| put_machine_key(tx, "m-1", &SecretKey::generate(), 1))
                .unwrap();
            // A refusal inside a transaction leaves nothing behind.
            let refused = store.write_with(|tx| {
                let mut registry = Registry::new(SqlMachineStore::new(tx));
                registry.register(record("m-3", "media", "v1", Role::Active), 20)?;
                registry.register(record("m-3", "db", "v1", Role::Active), 21)
            });
            assert!(matches!(refused, Err(RegistryError::ServiceChanged { .. })));
        }
        let store = Store::open(&path).unwrap();
        store
            .read(|sql| {
                let registry = Registry::new(SqlMachineStore::new(sql));
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
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let keys = store.machine_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id, "m-1");
        assert!(keys[0].previous.is_none());
    }
}
