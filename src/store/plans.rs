//! A rollout's [`Selection`] of machines (table `rollout_selections`).

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use crate::core::plan::Selection;
use crate::store::StoreError;

pub fn insert(tx: &Connection, rollout: i64, selection: &Selection) -> Result<(), StoreError> {
    let json = serde_json::to_string(selection).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO rollout_selections(rollout_id, selection_json) VALUES (?1, ?2)",
        params![rollout, json],
    )?;
    Ok(())
}

/// Every stored selection, by rollout id.
pub fn all(conn: &Connection) -> Result<BTreeMap<i64, Selection>, StoreError> {
    let mut stmt = conn.prepare("SELECT rollout_id, selection_json FROM rollout_selections")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (id, json) = row?;
        let selection = serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("selection of rollout {id}: {e}")))?;
        out.insert(id, selection);
    }
    Ok(out)
}
