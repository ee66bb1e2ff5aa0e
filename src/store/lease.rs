//! The lease in the store (table `controller_lease`): taken, renewed and given up in transactions
//! that read the store's own clock, so the controllers' clocks need not agree.

use std::time::Duration;

use crate::core::lease::{may_take, Lease};
use crate::store::sql::{vals, Dialect, Sql};
use crate::store::{current_epoch, next_epoch, set_epoch, Store, StoreError};

/// What asking for the lease gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now leads with this lease (a new epoch).
    Leading(Lease),
    /// Another controller holds it.
    Held(Lease),
}

/// Serializes claims of controllers asking at the same moment (PostgreSQL; SQLite writers are
/// serialized anyway).
const LEASE_LOCK: i64 = 0x756e_6465_7273_7476;

fn now_ms(sql: &Sql<'_>) -> Result<u64, StoreError> {
    let query = match sql.dialect() {
        Dialect::Sqlite => "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        Dialect::Postgres => "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    };
    sql.query_one(query, &[])?.u64(0)
}

fn stored(sql: &Sql<'_>) -> Result<Option<Lease>, StoreError> {
    let row = sql.query_opt(
        "SELECT holder, url, epoch, expires_ms FROM controller_lease WHERE id = 1",
        &[],
    )?;
    row.map(|r| {
        Ok(Lease {
            holder: r.text(0)?,
            url: r.text(1)?,
            epoch: r.u64(2)?,
            expires_ms: r.u64(3)?,
        })
    })
    .transpose()
}

fn period_ms(period: Duration) -> u64 {
    period.as_millis() as u64
}

impl Store {
    /// Takes the lease for `me` when it is free, ran out or is `me`'s own: the next fencing epoch
    /// is taken in the same transaction. Otherwise tells who holds it.
    pub fn claim_lease(
        &mut self,
        me: &str,
        url: &str,
        period: Duration,
    ) -> Result<Claim, StoreError> {
        let salt: u16 = rand::random();
        self.transaction(|tx| {
            if tx.dialect() == Dialect::Postgres {
                tx.execute("SELECT pg_advisory_xact_lock(?1)", vals![LEASE_LOCK])?;
            }
            let now = now_ms(tx)?;
            let current = stored(tx)?;
            if !may_take(current.as_ref(), me, now) {
                return Ok(Claim::Held(current.expect("held means present")));
            }
            let lease = Lease {
                holder: me.to_string(),
                url: url.to_string(),
                epoch: next_epoch(current_epoch(tx)?, salt),
                expires_ms: now + period_ms(period),
            };
            set_epoch(tx, lease.epoch)?;
            tx.execute(
                "INSERT INTO controller_lease(id, holder, url, epoch, expires_ms)
                 VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET holder = excluded.holder, url = excluded.url,
                     epoch = excluded.epoch, expires_ms = excluded.expires_ms",
                vals![&lease.holder, &lease.url, lease.epoch, lease.expires_ms],
            )?;
            Ok::<_, StoreError>(Claim::Leading(lease))
        })
    }

    /// Extends `me`'s lease of `epoch` by a period from the store's now: the lease as renewed, or
    /// none when it is no longer `me`'s (another controller took it).
    pub fn renew_lease(
        &mut self,
        me: &str,
        epoch: u64,
        period: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.transaction(|tx| {
            let until = now_ms(tx)? + period_ms(period);
            let changed = tx.execute(
                "UPDATE controller_lease SET expires_ms = ?3 WHERE id = 1 AND holder = ?1 AND epoch = ?2",
                vals![me, epoch, until],
            )?;
            if changed == 1 {
                stored(tx)
            } else {
                Ok(None)
            }
        })
    }

    /// Gives the lease up at once (a controller shutting down), so a standby need not wait for it
    /// to run out.
    pub fn release_lease(&mut self, me: &str, epoch: u64) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.execute(
                "UPDATE controller_lease SET expires_ms = 0 WHERE id = 1 AND holder = ?1 AND epoch = ?2",
                vals![me, epoch],
            )
        })?;
        Ok(())
    }

    /// The lease as stored (none before anyone led with one).
    pub fn lease(&self) -> Result<Option<Lease>, StoreError> {
        self.read(stored)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn lease_of(claim: Claim) -> Lease {
        match claim {
            Claim::Leading(l) | Claim::Held(l) => l,
        }
    }

    #[test]
    fn one_controller_leads_and_the_next_takes_over_only_after_the_lease_ran_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        take_turns(
            &mut Store::open(&path).unwrap(),
            &mut Store::open(&path).unwrap(),
        );
    }

    /// Two controllers' connections to one store take turns (SQLite here, PostgreSQL in
    /// `store::postgres_tests`).
    pub(crate) fn take_turns(a: &mut Store, b: &mut Store) {
        let period = Duration::from_millis(400);
        let Claim::Leading(first) = a.claim_lease("a", "http://a", period).unwrap() else {
            panic!("a free lease is taken")
        };
        let held = b.claim_lease("b", "http://b", period).unwrap();
        assert_eq!(held, Claim::Held(first.clone()));
        let renewed = a
            .renew_lease("a", first.epoch, period)
            .unwrap()
            .expect("a's");
        assert!(renewed.expires_ms >= first.expires_ms);
        assert_eq!(renewed.epoch, first.epoch);
        std::thread::sleep(period + Duration::from_millis(50));
        let Claim::Leading(second) = b.claim_lease("b", "http://b", period).unwrap() else {
            panic!("a lease that ran out is taken")
        };
        assert!(second.epoch > first.epoch);
        let lost = a.renew_lease("a", first.epoch, period).unwrap();
        assert_eq!(lost, None, "a lost it");
        // a's writes are fenced from now on; b's go through.
        a.set_fence(crate::store::Fence::Epoch(first.epoch));
        let fenced = a.write(|tx| crate::store::upsert_service(tx, "db", "v1"));
        assert!(
            matches!(fenced, Err(StoreError::Fenced { .. })),
            "{fenced:?}"
        );
        b.set_fence(crate::store::Fence::Epoch(second.epoch));
        b.write(|tx| crate::store::upsert_service(tx, "db", "v1"))
            .unwrap();
        // Its own lease, from before a restart, is taken back at once.
        let again = lease_of(b.claim_lease("b", "http://b", period).unwrap());
        assert!(again.epoch > second.epoch);
        b.release_lease("b", again.epoch).unwrap();
        assert!(matches!(
            a.claim_lease("a", "http://a", period).unwrap(),
            Claim::Leading(_)
        ));
    }
}
