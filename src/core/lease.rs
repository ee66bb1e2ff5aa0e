//! The lease controllers sharing a store hold to lead: who may take it, and when a leader must
//! stop acting on its own, before anyone else could take it.

use std::time::Duration;

use serde::Serialize;

/// The lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// The leading controller's name.
    pub holder: String,
    /// Its admin URL, where standbys send callers that want to change something.
    pub url: String,
    /// The fencing epoch it leads with.
    pub epoch: u64,
    /// Until when (the store's clock, ms since the epoch) it holds unless renewed.
    pub expires_ms: u64,
}

/// Whether `me` may take the lease at the store's time `now_ms`: nobody holds it, it ran out, or
/// it is `me`'s own from before a restart (the name is unique among live controllers).
pub fn may_take(current: Option<&Lease>, me: &str, now_ms: u64) -> bool {
    match current {
        None => true,
        Some(lease) => lease.holder == me || lease.expires_ms <= now_ms,
    }
}

/// How long after the start of its last successful renewal a leader keeps acting: the lease's
/// period less a margin for the clocks of the store and the leader running apart, so it stops
/// before the store lets a standby take over.
pub fn acting_window(period: Duration) -> Duration {
    period.mul_f64(0.8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, expires_ms: u64) -> Lease {
        Lease {
            holder: holder.into(),
            url: "http://a".into(),
            epoch: 1 << 16,
            expires_ms,
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_expired_or_ones_own() {
        assert!(may_take(None, "b", 100));
        assert!(!may_take(Some(&lease("a", 200)), "b", 100));
        assert!(may_take(Some(&lease("a", 200)), "b", 200));
        assert!(may_take(Some(&lease("b", 200)), "b", 100));
    }

    #[test]
    fn a_leader_stops_acting_before_its_lease_runs_out() {
        let period = Duration::from_millis(1000);
        assert!(acting_window(period) < period);
        assert!(acting_window(period) > period / 2);
    }
}
