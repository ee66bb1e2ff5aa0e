//! The leader loop of a controller that shares its store: it asks for the lease every third of a
//! period while it stands by (reading its view again from the store meanwhile), and renews it as
//! often while it leads. A term of leadership runs the reconcile loop and the hub recorder; it
//! ends when the lease is lost, or when it could not be renewed within the acting window (the
//! store went away, or the process was frozen), before any other controller may take it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::store::LeaseSettings;
use crate::core::lease::acting_window;
use crate::runtime::controller::recording::spawn_term_recorder;
use crate::runtime::controller::Core;
use crate::store::lease::Claim;

/// The reconcile loop: a tick every period, or sooner when something wakes it.
pub fn spawn_reconcile(
    core: Arc<Core>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = core.woken() => {}
                _ = stop.changed() => break,
            }
            core.tick().await;
        }
    })
}

/// The tasks of one term of leadership, stopped together.
struct Term {
    epoch: u64,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// A controller asking for, holding and renewing the lease.
pub struct Leader {
    core: Arc<Core>,
    lease: LeaseSettings,
    url: String,
    tick: Duration,
    term: Option<Term>,
}

impl Leader {
    pub fn new(core: Arc<Core>, lease: LeaseSettings, url: String, tick: Duration) -> Leader {
        core.set_lease_name(&lease.name);
        Leader {
            core,
            lease,
            url,
            tick,
            term: None,
        }
    }

    /// Asks for the lease (standing by) or renews it (leading), once.
    pub async fn step(&mut self) {
        match self.term.as_ref().map(|t| t.epoch) {
            None => self.claim(),
            Some(epoch) => self.renew(epoch).await,
        }
    }

    /// Steps every third of a lease period until `stop`; then gives the lease up.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease.poll()) => {}
                _ = stop.changed() => break,
            }
            self.step().await;
        }
        if let Some(epoch) = self.end_term().await {
            let name = self.lease.name.clone();
            let released = self
                .core
                .with_lease_store(|store| store.release_lease(&name, epoch));
            if let Err(e) = released {
                tracing::warn!("giving the lease up: {e}");
            }
        }
        self.core.hub().close();
    }

    fn claim(&mut self) {
        let asked = Instant::now();
        let (name, url, period) = (&self.lease.name, &self.url, self.lease.period);
        let claim = self
            .core
            .with_lease_store(|store| store.claim_lease(name, url, period));
        match claim {
            Ok(Claim::Leading(lease)) => {
                let epoch = lease.epoch;
                self.core.saw_lease(Some(lease));
                self.core.act_until(Some(asked + acting_window(period)));
                match self.core.lead(epoch) {
                    Ok(()) => {
                        tracing::info!(epoch, "leading");
                        self.start_term(epoch);
                    }
                    Err(e) => {
                        tracing::warn!("taking over failed, standing by: {e}");
                        self.core.stand_down();
                    }
                }
            }
            Ok(Claim::Held(lease)) => {
                self.core.saw_lease(Some(lease));
                if let Err(e) = self.core.refresh() {
                    tracing::warn!("reading the store as a standby: {e}");
                }
            }
            Err(e) => tracing::warn!("asking for the lease (retrying): {e}"),
        }
    }

    async fn renew(&mut self, epoch: u64) {
        let asked = Instant::now();
        let (name, period) = (&self.lease.name, self.lease.period);
        let renewed = self
            .core
            .with_lease_store(|store| store.renew_lease(name, epoch, period));
        match renewed {
            Ok(Some(lease)) => {
                self.core.act_until(Some(asked + acting_window(period)));
                self.core.saw_lease(Some(lease));
            }
            Ok(None) => {
                tracing::warn!(epoch, "another controller took the lease: standing by");
                self.core.stand_down();
            }
            Err(e) => tracing::warn!("renewing the lease (retrying): {e}"),
        }
        // A lost lease, or a renewal overdue (is_leading stands down past the window).
        if !self.core.is_leading() {
            self.end_term().await;
        }
    }

    fn start_term(&mut self, epoch: u64) {
        let (stop, watcher) = watch::channel(false);
        let tasks = vec![
            spawn_reconcile(self.core.clone(), self.tick, watcher.clone()),
            spawn_term_recorder(self.core.clone(), watcher),
        ];
        self.term = Some(Term { epoch, stop, tasks });
    }

    /// Stops the term's tasks; returns its epoch.
    async fn end_term(&mut self) -> Option<u64> {
        let term = self.term.take()?;
        self.core.stand_down();
        let _ = term.stop.send(true);
        for task in term.tasks {
            let _ = task.await;
        }
        // Not this controller any more: whoever the store names, or nobody known while the
        // store is away.
        let seen = self
            .core
            .with_lease_store(|store| store.lease())
            .ok()
            .flatten();
        self.core
            .saw_lease(seen.filter(|l| !(l.holder == self.lease.name && l.epoch == term.epoch)));
        tracing::info!(epoch = term.epoch, "term ended");
        Some(term.epoch)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::api::client::{AdminClient, ClientError};
    use crate::app::{start_with_client, ControllerConfig, ControllerHandle};
    use crate::config::store::{LeaseSettings, StoreLocation};
    use crate::runtime::controller::LeaderView;
    use crate::testing::{Rig, SAMPLE};

    async fn start(rig: &Rig, name: &str) -> ControllerHandle {
        let config = ControllerConfig {
            store: StoreLocation::Sqlite(rig.dir.path().join("shared.db")),
            lease: Some(LeaseSettings {
                period: Duration::from_millis(600),
                name: name.into(),
                advertise_url: None,
            }),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            token: "tok".into(),
            tick: Duration::from_millis(20),
            cluster: rig.cluster.clone(),
        };
        start_with_client(config, rig.fake.clone())
            .await
            .expect("start")
    }

    fn client(handle: &ControllerHandle) -> AdminClient {
        AdminClient::new(&handle.admin_url(), Some("tok".into())).unwrap()
    }

    #[derive(serde::Deserialize)]
    struct View {
        role: String,
        epoch: u64,
        leader: Option<serde_json::Value>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_sends_changes_to_the_leader_and_takes_over_when_it_leaves() {
        let rig = Rig::new(SAMPLE);
        let a = start(&rig, "a").await;
        let b = start(&rig, "b").await;
        assert!(a.core().is_leading());
        assert!(!b.core().is_leading());
        let view: View = client(&b).get("/api/v1/leader").await.unwrap();
        assert_eq!(view.role, "standby");
        assert_eq!(view.epoch, 0, "a standby pushes nothing");
        let leader = view.leader.expect("the lease is seen");
        assert_eq!(leader["holder"], "a");
        assert_eq!(leader["url"], a.admin_url());
        // A change sent to the standby is refused with the leader's address; reads are answered.
        let body = serde_json::json!({"services": {"db": "v2"}});
        let refused = client(&b)
            .post::<serde_json::Value>("/api/v1/releases", &body)
            .await;
        match refused {
            Err(ClientError::Refused { status, message }) => {
                assert_eq!(status, 503);
                assert!(message.contains(&a.admin_url()), "{message}");
            }
            other => panic!("a standby took a release: {other:?}"),
        }
        let services: Vec<serde_json::Value> = client(&b).get("/api/v1/services").await.unwrap();
        assert_eq!(services.len(), 4);
        let released: serde_json::Value = client(&a).post("/api/v1/releases", &body).await.unwrap();
        assert_eq!(released["release"], 1);
        let first = a.core().epoch();
        // The leader leaves (giving the lease up): the standby leads within a poll or two, with a
        // higher epoch, and carries on the release it sees in the store.
        a.shutdown().await;
        let mut view: Option<LeaderView> = None;
        for _ in 0..50 {
            if b.core().is_leading() {
                view = Some(b.core().leader_view());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let view = view.expect("b took over");
        assert_eq!(view.role, "leader");
        assert!(view.epoch > first, "{} > {first}", view.epoch);
        assert_eq!(rig.fake.epoch("db"), view.epoch);
        let rollouts: Vec<serde_json::Value> = client(&b).get("/api/v1/rollouts").await.unwrap();
        assert_eq!(rollouts.len(), 1);
        let text = b.core().metrics_text();
        assert!(text.contains("understudy_controller_leader 1"), "{text}");
        b.shutdown().await;
    }
}
