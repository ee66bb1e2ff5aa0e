//! A rollout's [`Selection`] of machines (table `rollout_selections`).

use std::collections::BTreeMap;

use crate::core::plan::Selection;
use crate::store::sql::{vals, Sql};
use crate::store::StoreError;

pub fn insert(tx: &Sql<'_>, rollout: i64, selection: &Selection) -> Result<(), StoreError> {
    let json = serde_json::to_string(selection).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO rollout_selections(rollout_id, selection_json) VALUES (?1, ?2)",
        vals![rollout, json],
    )?;
    Ok(())
}

/// Every stored selection, by rollout id.
pub fn all(sql: &Sql<'_>) -> Result<BTreeMap<i64, Selection>, StoreError> {
    let rows = sql.query(
        "SELECT rollout_id, selection_json FROM rollout_selections",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let id = r.i64(0)?;
            let selection = serde_json::from_str(&r.text(1)?)
                .map_err(|e| StoreError::Corrupt(format!("selection of rollout {id}: {e}")))?;
            Ok((id, selection))
        })
        .collect()
}
