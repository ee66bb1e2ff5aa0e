//! Leading and standing by: a controller acts (reconciles, writes, pushes configs) only while it
//! leads, with the fencing epoch it took when it started to; otherwise it answers reads from what
//! the store holds and sends callers that want a change to the leader.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;
use utoipa::ToSchema;

use super::{lock, ControllerError, Core};
use crate::core::lease::Lease;

/// Whether this controller leads, its epoch, and the lease as last seen.
#[derive(Default)]
pub(crate) struct Leadership {
    leading: AtomicBool,
    epoch: AtomicU64,
    seen: Mutex<Option<Lease>>,
    /// With a lease: until when it may act without a newer renewal (a leader frozen past it
    /// stops before doing anything when it wakes).
    acting_until: Mutex<Option<Instant>>,
    /// Its name in the lease.
    name: OnceLock<String>,
}

/// `GET /api/v1/leader`: this controller's role and who leads.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LeaderView {
    /// `leader` or `standby`.
    pub role: &'static str,
    /// This controller's name in the lease (absent without a lease: it always leads).
    pub name: Option<String>,
    /// The fencing epoch it leads with (0 while it stands by).
    pub epoch: u64,
    /// The lease as last read from the store (absent without a lease).
    #[schema(value_type = Option<Object>)]
    pub leader: Option<Lease>,
}

impl Core {
    /// Whether this controller leads (and so may act).
    pub fn is_leading(&self) -> bool {
        if !self.leadership.leading.load(Ordering::SeqCst) {
            return false;
        }
        let until = *self
            .leadership
            .acting_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if until.is_some_and(|until| Instant::now() >= until) {
            self.stand_down();
            tracing::warn!("the lease was not renewed in time: standing down");
            return false;
        }
        true
    }

    /// Lets a leader act until `until` (a renewal of its lease succeeded); `None`: for good.
    pub fn act_until(&self, until: Option<Instant>) {
        *self
            .leadership
            .acting_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// The fencing epoch this controller pushes configs with (0 before it first led).
    pub fn epoch(&self) -> u64 {
        self.leadership.epoch.load(Ordering::SeqCst)
    }

    /// The admin URL of the controller that leads, as last seen in the lease.
    pub fn leader_url(&self) -> Option<String> {
        self.seen_lease().map(|l| l.url)
    }

    fn seen_lease(&self) -> Option<Lease> {
        self.leadership
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What `GET /api/v1/leader` answers.
    pub fn leader_view(&self) -> LeaderView {
        let leading = self.is_leading();
        LeaderView {
            role: if leading { "leader" } else { "standby" },
            name: self.leadership.name.get().cloned(),
            epoch: if leading { self.epoch() } else { 0 },
            leader: self.seen_lease(),
        }
    }

    /// Names this controller in the lease (once).
    pub fn set_lease_name(&self, name: &str) {
        let _ = self.leadership.name.set(name.to_string());
    }

    /// Records the lease as read from the store.
    pub fn saw_lease(&self, lease: Option<Lease>) {
        *self
            .leadership
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = lease;
    }

    /// Starts leading with `epoch`: fences every later write of this controller to `epoch`,
    /// declares the file's machines, reads everything again from the store (what the previous
    /// leader left), loads the hub's keys and sequence floors, and commits the configs implied.
    pub fn lead(&self, epoch: u64) -> Result<(), ControllerError> {
        {
            let mut state = lock(&self.state);
            state.store.set_fence(crate::store::Fence::Epoch(epoch));
            state.declare_machines(self.clock.now_ms())?;
            state.reload(&self.metrics)?;
            self.hub.load_from(&state.store, self.clock.now_ms())?;
        }
        self.leadership.epoch.store(epoch, Ordering::SeqCst);
        self.leadership.leading.store(true, Ordering::SeqCst);
        self.metrics.epoch.set(epoch as i64);
        self.metrics.leader.set(1);
        self.commit_configs()?;
        Ok(())
    }

    /// Stops acting: no tick, no push, every mutation refused until it leads again.
    pub fn stand_down(&self) {
        self.leadership.leading.store(false, Ordering::SeqCst);
        self.metrics.leader.set(0);
        // The lease as last seen names this controller: who leads now is unknown until the
        // store is read again.
        let mut seen = self
            .leadership
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mine = seen.as_ref().is_some_and(|l| {
            Some(&l.holder) == self.leadership.name.get() && l.epoch == self.epoch()
        });
        if mine {
            *seen = None;
        }
    }

    /// A standby's view read again from the store (nothing while it leads: then memory is ahead).
    pub fn refresh(&self) -> Result<(), ControllerError> {
        let mut state = lock(&self.state);
        if self.is_leading() {
            return Ok(());
        }
        state.reload(&self.metrics)
    }

    /// Runs `f` on the store under the state lock (the lease's reads and writes).
    pub fn with_lease_store<T>(&self, f: impl FnOnce(&mut crate::store::Store) -> T) -> T {
        f(&mut lock(&self.state).store)
    }
}
