//! The monitor's tables in the store: the machines it holds out of their balancers.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use crate::core::monitor::{HeldOut, HoldReason};
use understudy_hub::MachineStore;

use crate::store::{SqlMachineStore, Store, StoreError};

/// The machines the monitor holds out, as stored.
pub(crate) fn held_out(conn: &Connection) -> Result<BTreeMap<String, HeldOut>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT machine, service, since_ms, reason FROM monitor_held_out")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (machine, service, since, reason) = row?;
        let reason = HoldReason::parse(&reason).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "monitor_held_out: machine `{machine}`: reason `{reason}`"
            ))
        })?;
        out.insert(
            machine,
            HeldOut {
                service,
                since_ms: since as u64,
                reason,
            },
        );
    }
    Ok(out)
}

pub(crate) fn put_held_out(
    tx: &Connection,
    machine: &str,
    held: &HeldOut,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO monitor_held_out(machine, service, since_ms, reason) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(machine) DO UPDATE SET service = excluded.service,
             since_ms = excluded.since_ms, reason = excluded.reason",
        params![
            machine,
            held.service,
            held.since_ms as i64,
            held.reason.as_str()
        ],
    )?;
    Ok(())
}

pub(crate) fn drop_held_out(tx: &Connection, machine: &str) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM monitor_held_out WHERE machine = ?1",
        params![machine],
    )?;
    Ok(())
}

/// The machine's latest report (registry) says it holds no session.
pub(crate) fn reports_no_sessions(store: &Store, id: &str) -> bool {
    matches!(
        SqlMachineStore::new(store.conn()).latest(id),
        Ok(Some(rev)) if rev.record.sessions == 0
    )
}
