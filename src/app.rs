//! The composition root: a running controller is its store, its hub, the [`Core`] over them, the
//! reconcile loop, the hub recorder, live predictions and the admin endpoint, started here and
//! stopped together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::cluster::Cluster;
use crate::config::store::{LeaseSettings, StoreLocation};
use crate::runtime::balancer::{BalancerClient, HttpBalancerClient};
use crate::runtime::clock::Clock;
use crate::runtime::controller::{ControllerError, Core};
use crate::runtime::hub::ControllerHub;
use crate::store::Store;

/// Everything the controller needs to run.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub cluster: Cluster,
    /// Where the state is kept: SQLite (one controller) or PostgreSQL (shared).
    pub store: StoreLocation,
    /// The lease controllers sharing the store hold to lead; none: this one always leads.
    pub lease: Option<LeaseSettings>,
    /// Admin endpoint address; port 0 picks a free one (see [`ControllerHandle::admin_addr`]).
    pub admin_addr: SocketAddr,
    /// Bearer token for mutating admin calls (the operator `ops`; empty: only the operators of
    /// `[controller] operators_file`).
    pub token: String,
    /// Reconcile period.
    pub tick: Duration,
}

impl ControllerConfig {
    /// Takes address, store, lease and tick from the cluster's `[controller]` table.
    pub fn from_cluster(cluster: Cluster, token: String) -> ControllerConfig {
        ControllerConfig {
            store: cluster.controller.store.clone(),
            lease: cluster.controller.lease.clone(),
            admin_addr: cluster.controller.admin_addr,
            tick: cluster.controller.tick,
            cluster,
            token,
        }
    }
}

/// A running controller: reconcile loop and admin endpoint.
pub struct ControllerHandle {
    admin_addr: SocketAddr,
    core: Arc<Core>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ControllerHandle {
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// `http://ADDR`, the base URL of the admin endpoint.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Stops the loop and the endpoint and waits for both.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts the controller with the HTTP balancer client.
pub async fn start(config: ControllerConfig) -> Result<ControllerHandle, ControllerError> {
    // Keyed balancers get signed configs; hub delivery once the hub runs.
    let client = Arc::new(HttpBalancerClient::for_cluster(&config.cluster));
    let handle = start_with_client(config, client.clone()).await?;
    client.set_hub(handle.core().hub_backend());
    Ok(handle)
}

/// Starts the controller with a given balancer client (tests use
/// [`crate::runtime::balancer::FakeBalancer`]). With a lease it asks for it once before returning:
/// it leads at once when nobody else does, and stands by otherwise.
pub async fn start_with_client(
    config: ControllerConfig,
    client: Arc<dyn BalancerClient>,
) -> Result<ControllerHandle, ControllerError> {
    let tick = config.tick;
    let wanted = config.admin_addr;
    let lease = config.lease.clone();
    let core = Arc::new(open_core(config, client).await?);
    let bind = |source| ControllerError::Bind {
        addr: wanted,
        source,
    };
    let listener = TcpListener::bind(wanted).await.map_err(bind)?;
    let admin_addr = listener.local_addr().map_err(bind)?;
    let (shutdown, watcher) = watch::channel(false);
    let url = format!("http://{admin_addr}");
    core.hub().set_advertised_url(url.clone());
    let mut tasks = vec![serve_admin(core.clone(), listener, watcher.clone())];
    match lease {
        None => {
            tasks.push(crate::runtime::leader::spawn_reconcile(
                core.clone(),
                tick,
                watcher.clone(),
            ));
            tasks.push(crate::runtime::controller::recording::spawn_recorder(
                core.clone(),
                watcher.clone(),
            ));
        }
        Some(lease) => {
            let url = lease.advertise_url.clone().unwrap_or(url);
            let mut leader = crate::runtime::leader::Leader::new(core.clone(), lease, url, tick);
            leader.step().await;
            tasks.push(tokio::spawn(leader.run(watcher.clone())));
        }
    }
    tasks.extend(core.predictions.start(core.hub_backend(), watcher));
    tracing::info!(%admin_addr, leading = core.is_leading(), "controller started");
    Ok(ControllerHandle {
        admin_addr,
        core,
        shutdown,
        tasks,
    })
}

/// The store, the hub and the core over them, refusing a config that cannot run. Without a lease
/// the core leads at once; with one it waits for [`crate::runtime::leader::Leader`].
async fn open_core(
    config: ControllerConfig,
    client: Arc<dyn BalancerClient>,
) -> Result<Core, ControllerError> {
    // The operators file's names, and the single token as `ops`.
    let operators = config
        .cluster
        .controller
        .operators
        .clone()
        .with_token(&config.token);
    if operators.is_empty() {
        return Err(ControllerError::NoToken);
    }
    let services = config.cluster.services.values();
    if let Some(s) = services.into_iter().find(|s| s.balancer.is_none()) {
        return Err(ControllerError::NoBalancer(s.name.clone()));
    }
    let location = config.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_location(&location))
        .await
        .map_err(|e| ControllerError::Inconsistent(format!("opening the store: {e}")))??;
    let hub = ControllerHub::connect(&config.cluster.hub, &store, Clock::new().now_ms()).await?;
    hub.install_balancer_subscribers(&config.cluster);
    if config.lease.is_some() {
        Core::load(config.cluster, store, client, operators, hub)
    } else {
        Core::open_with_hub(config.cluster, store, client, operators, hub)
    }
}

/// The admin endpoint, until shutdown (graceful: answers in flight are finished).
fn serve_admin(
    core: Arc<Core>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let router = crate::api::admin::router(core);
    tokio::spawn(async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("admin endpoint stopped: {e}");
        }
    })
}
