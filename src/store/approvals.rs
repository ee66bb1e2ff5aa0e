//! What approvals are bound to: a rollout's log of material changes of its evidence (table
//! `evidence_log`) and the operators' approvals (table `approvals`), see src/core/evidence.rs.

use std::collections::BTreeMap;

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

/// Every rollout's logged evidence, oldest first, by rollout id (one read at a start or reload).
pub fn evidence_logs(sql: &Sql<'_>) -> Result<BTreeMap<i64, Vec<EvidenceSnapshot>>, StoreError> {
    let rows = sql.query(
        "SELECT rollout_id, snapshot_json FROM evidence_log ORDER BY rollout_id, seq",
        &[],
    )?;
    let mut out: BTreeMap<i64, Vec<EvidenceSnapshot>> = BTreeMap::new();
    for r in &rows {
        out.entry(r.i64(0)?).or_default().push(r.json(1)?);
    }
    Ok(out)
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

/// Every rollout's approvals, oldest first, by rollout id.
pub fn approvals(sql: &Sql<'_>) -> Result<BTreeMap<i64, Vec<Approval>>, StoreError> {
    let rows = sql.query(
        "SELECT rollout_id, operator, at_ms, evidence, seq, expires_ms FROM approvals ORDER BY id",
        &[],
    )?;
    let mut out: BTreeMap<i64, Vec<Approval>> = BTreeMap::new();
    for r in &rows {
        let approval = Approval {
            operator: r.text(1)?,
            at_ms: r.u64(2)?,
            evidence: r.text(3)?,
            seq: r.u64(4)?,
            expires_at_ms: r.u64(5)?,
        };
        out.entry(r.i64(0)?).or_default().push(approval);
    }
    Ok(out)
}
