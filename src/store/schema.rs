//! The store's tables, written once in SQLite's words: SQLite's `INTEGER` is 64 bits wide and its
//! `INTEGER PRIMARY KEY` numbers rows itself; PostgreSQL's form ([`postgres`]) says `BIGINT` and
//! `GENERATED ... AS IDENTITY`. The columns, their order and their meaning are the same in both.

use rusqlite::Connection;

pub(super) const SQLITE: &str = r#"
CREATE TABLE IF NOT EXISTS releases(
    id INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    rollback_on_failure INTEGER NOT NULL,
    created_by TEXT
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
    details_json TEXT NOT NULL,
    operator TEXT
);
-- Each material change of a rollout's evidence while it awaits approval: what an approval names
-- (src/core/evidence.rs).
CREATE TABLE IF NOT EXISTS evidence_log(
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    snapshot_json TEXT NOT NULL,
    PRIMARY KEY (rollout_id, seq)
);
-- Operators' approvals of a rollout (a second approver's service keeps the first one here).
CREATE TABLE IF NOT EXISTS approvals(
    id INTEGER PRIMARY KEY,
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    operator TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    evidence TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
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
    diff TEXT,
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
-- The fencing epoch: one more at each takeover (each start of a controller without a lease), sent in every config so
-- a balancer refuses the configs of a controller that no longer leads.
CREATE TABLE IF NOT EXISTS controller_epoch(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL
);
-- Who leads the controllers sharing this store, and until when (the database's clock, in ms).
CREATE TABLE IF NOT EXISTS controller_lease(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    url TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"#;

/// The same tables for PostgreSQL, derived from [`SQLITE`] so the two cannot drift apart: a row
/// id numbered by the database becomes an identity column, and every `INTEGER` a `BIGINT`.
pub(super) fn postgres() -> String {
    SQLITE
        .replace(
            "id INTEGER PRIMARY KEY,",
            "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,",
        )
        .replace("INTEGER", "BIGINT")
        .replace("SQLite's i64", "a BIGINT")
}

/// Columns added to a table after databases were written without them: (table, column, its
/// SQLite declaration). Pairs got their balancer job number (0: unknown); transitions and
/// releases the operator who caused them (null: the controller, or before operators had names).
pub(super) const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("pairs", "job", "INTEGER NOT NULL DEFAULT 0"),
    // Where a copy's answer differs, field by field (JSON; `compare = "fields"` only).
    ("pairs", "diff", "TEXT"),
    ("transitions", "operator", "TEXT"),
    ("releases", "created_by", "TEXT"),
];

/// Adds to an older SQLite database the columns it lacks.
pub(super) fn add_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, declaration) in ADDED_COLUMNS {
        let has = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
            ))?
            .exists([])?;
        if !has {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
        }
    }
    Ok(())
}

/// The same for PostgreSQL, which can say "if not exists" itself.
pub(super) fn postgres_added_columns() -> Vec<String> {
    ADDED_COLUMNS
        .iter()
        .map(|(table, column, declaration)| {
            format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {}",
                declaration.replace("INTEGER", "BIGINT")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn postgres_gets_every_table_with_its_own_integer_and_identity_words() {
        let pg = super::postgres();
        assert_eq!(
            pg.matches("CREATE TABLE").count(),
            super::SQLITE.matches("CREATE TABLE").count()
        );
        assert!(!pg.contains("INTEGER"), "{pg}");
        assert_eq!(pg.matches("GENERATED BY DEFAULT AS IDENTITY").count(), 5);
    }
}
