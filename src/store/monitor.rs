//! The monitor's tables in the store: the machines it holds out of their balancers.

use std::collections::BTreeMap;

use crate::core::monitor::{HeldOut, HoldReason};
use understudy_hub::MachineStore;

use crate::store::sql::{vals, Sql};
use crate::store::{SqlMachineStore, Store, StoreError};

/// The machines the monitor holds out, as stored.
pub(crate) fn held_out(sql: &Sql<'_>) -> Result<BTreeMap<String, HeldOut>, StoreError> {
    let rows = sql.query(
        "SELECT machine, service, since_ms, reason FROM monitor_held_out",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let machine = r.text(0)?;
            let reason = r.text(3)?;
            let reason = HoldReason::parse(&reason).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "monitor_held_out: machine `{machine}`: reason `{reason}`"
                ))
            })?;
            let held = HeldOut {
                service: r.text(1)?,
                since_ms: r.u64(2)?,
                reason,
            };
            Ok((machine, held))
        })
        .collect()
}

pub(crate) fn put_held_out(tx: &Sql<'_>, machine: &str, held: &HeldOut) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO monitor_held_out(machine, service, since_ms, reason) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(machine) DO UPDATE SET service = excluded.service,
             since_ms = excluded.since_ms, reason = excluded.reason",
        vals![machine, &held.service, held.since_ms, held.reason.as_str()],
    )?;
    Ok(())
}

pub(crate) fn drop_held_out(tx: &Sql<'_>, machine: &str) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM monitor_held_out WHERE machine = ?1",
        vals![machine],
    )?;
    Ok(())
}

/// The machine's latest report (registry) says it holds no session.
pub(crate) fn reports_no_sessions(store: &Store, id: &str) -> bool {
    matches!(
        store.read(|sql| SqlMachineStore::new(sql).latest(id)),
        Ok(Some(rev)) if rev.record.sessions == 0
    )
}
