//! What approvals are bound to: a rollout's log of material changes of its evidence (table
//! `evidence_log`) and the operators' approvals (table `approvals`), see src/core/evidence.rs.

use crate::core::evidence::{Approval, EvidenceSnapshot};
use crate::store::sql::{vals, Sql};
use crate::store::StoreError;

pub fn log_evidence(
    tx: &Sql<'_>,
    rollout: i64,
    snapshot: &EvidenceSnapshot,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(snapshot).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO evidence_log(rollout_id, seq, at_ms, snapshot_json) VALUES (?1, ?2, ?3, ?4)",
        vals![rollout, snapshot.seq, snapshot.at_ms, json],
    )?;
    Ok(())
}

/// A rollout's logged evidence, oldest first.
pub fn evidence_log(sql: &Sql<'_>, rollout: i64) -> Result<Vec<EvidenceSnapshot>, StoreError> {
    let rows = sql.query(
        "SELECT snapshot_json FROM evidence_log WHERE rollout_id = ?1 ORDER BY seq",
        vals![rollout],
    )?;
    rows.iter().map(|r| r.json(0)).collect()
}

pub fn insert_approval(tx: &Sql<'_>, rollout: i64, approval: &Approval) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO approvals(rollout_id, operator, at_ms, evidence, seq, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        vals![
            rollout,
            &approval.operator,
            approval.at_ms,
            &approval.evidence,
            approval.seq,
            approval.expires_at_ms
        ],
    )?;
    Ok(())
}

/// A rollout's approvals, oldest first.
pub fn approvals(sql: &Sql<'_>, rollout: i64) -> Result<Vec<Approval>, StoreError> {
    let rows = sql.query(
        "SELECT operator, at_ms, evidence, seq, expires_ms FROM approvals
         WHERE rollout_id = ?1 ORDER BY id",
        vals![rollout],
    )?;
    rows.iter()
        .map(|r| {
            Ok(Approval {
                operator: r.text(0)?,
                at_ms: r.u64(1)?,
                evidence: r.text(2)?,
                seq: r.u64(3)?,
                expires_at_ms: r.u64(4)?,
            })
        })
        .collect()
}
