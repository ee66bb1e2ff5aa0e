//! Understudy's per-service balancer, on pingora.
//!
//! Each balancer serves one service: callers' jobs go to the service's *active* machines (weighted,
//! sticky by `x-session-id`); a copy of each job (or of a fraction) goes to one machine of each
//! *simulation* version, with `x-understudy-simulation: 1`, and its answer is recorded and
//! discarded. Latencies and outcomes are kept per (version, config) as HDR histograms and as job
//! pairs, which the controller reads through the admin endpoint since a cursor.
//!
//! [`spawn`] starts a set of balancers (one listener each) and their shared admin endpoint.

mod admin;
mod caller;
mod config;
mod draft;
mod epoch_floor;
mod extract;
mod fault;
mod fields;
mod h1;
mod health;
mod marker;
mod metrics;
mod mirror;
mod openapi;
mod pool;
mod prober;
mod proxy;
mod service;
mod signing;
mod stats;
mod timing;
mod upstream;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::Service as PingoraService;

pub use config::{BalancerSpec, ConfigError, LimitsSpec, ProcessConfig, TrustSpec, WEIGHT_RANGE};
pub use marker::{MarkerPolicy, MarkerRejection, SIMULATION_AUTH_HEADER, SIMULATION_HEADER};
pub use proxy::{SESSION_EVENT_HEADER, SESSION_HEADER};
pub use service::PushError;
pub use signing::{
    BalancerKey, ConfigFeed, ConfigSigning, KeyLoadError, KeySource, SigningError, CONTROLLER_ID,
};
pub use stats::{decode_histogram, encode_histogram, CursorError};
/// The message vocabulary, now the `understudy-wire` crate: kept here so that
/// `understudy_proxy::wire::...` still names it.
pub use understudy_wire as wire;
pub use understudy_wire::{check_health_path, write_key_file, MAX_HEALTH_PATH};

/// Why balancers could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: String,
        source: std::io::Error,
    },
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("signed configs: {0}")]
    Signing(#[from] SigningError),
    #[error(transparent)]
    EpochFloor(#[from] epoch_floor::FloorError),
    /// Keys are required unless the process runs explicitly without them.
    #[error(
        "{0}: a balancer takes configs and simulation jobs only when authenticated; give the \
         keys (--key-file, --marker-key-file) or run with --insecure-no-key"
    )]
    NoKey(String),
}

/// Process-level tunables (not part of the config the controller pushes).
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Worker threads of the pingora runtime serving callers' jobs.
    pub threads: usize,
    /// Pingora's scheduler for `threads`: true, one work-stealing runtime; false, one
    /// current-thread runtime per thread, a connection staying on the thread that accepted it
    /// (nginx's model; ~12% less CPU per job with one thread, docs/benchmarks.md). The binary
    /// uses false. Only for a process that starts one set of balancers: pingora 0.9 keeps the
    /// handles of its no-steal runtimes in a thread-local keyed by thread ids, which are reused
    /// once threads end, so a set started after another one stopped would hand its connections
    /// to the stopped runtime.
    pub work_stealing: bool,
    /// Worker threads of the runtime that sends mirrored copies.
    pub mirror_threads: usize,
    /// Copies waiting to be sent, per simulation version of a service; a copy that finds its
    /// queue full is dropped and counted.
    pub mirror_queue: usize,
    /// Copies in flight at once, all simulation versions together.
    pub mirror_concurrency: usize,
    /// Copies in flight towards one simulation version, per active job in flight of its service
    /// (at least one); beyond it copies wait in their queue. 0 = no per-version cap. The default
    /// 2 leaves a v2 as fast as v1 half its room (at exactly 1 an A/A copy stream would be a queue
    /// at full load) while a slow v2 cannot pile up more than twice v1's concurrency.
    pub mirror_per_active: usize,
    /// A copy without a complete answer this long after it was queued counts as a timeout.
    pub mirror_timeout: Duration,
    /// Jobs whose body is larger than this are not copied (counted as dropped).
    pub mirror_body_limit: usize,
    /// A session with no job for this long is forgotten (its pin released).
    pub session_idle: Duration,
    /// Stats windows kept for readers with an older cursor.
    pub stats_windows: usize,
    /// Job pairs kept until read; older ones are counted in `pairs_lost`.
    pub pair_retention: usize,
    /// Balancer keys (configs must then be signed by the controller) and the optional hub feed.
    pub signing: ConfigSigning,
    /// The cluster's key for the simulation marker (see `marker.rs`), shared by every balancer.
    pub marker_key: Option<understudy_hub::SecretKey>,
    /// Run without keys: configs and stats reads unauthenticated, simulation markers from
    /// internal callers believed as they are. A warning is logged at every start.
    pub insecure_no_key: bool,
    /// How far the controller's clock may lag this one: at start, a keyed balancer refuses
    /// (`out_of_order`) every signed message numbered below its clock less this, so a config
    /// captured before its restart is not applied after it (the controller numbers by its clock).
    pub max_clock_skew: Duration,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        SpawnOptions {
            threads: 1,
            work_stealing: true,
            mirror_threads: 1,
            mirror_queue: 4096,
            mirror_concurrency: 512,
            mirror_per_active: 2,
            mirror_timeout: Duration::from_secs(5),
            mirror_body_limit: 1 << 20,
            session_idle: Duration::from_secs(60),
            stats_windows: 4096,
            pair_retention: 200_000,
            signing: ConfigSigning::default(),
            marker_key: None,
            insecure_no_key: false,
            max_clock_skew: signing::DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

/// A running set of balancers. Dropping it shuts them down too.
pub struct RunningBalancers {
    admin_addr: SocketAddr,
    listen: HashMap<String, SocketAddr>,
    internal_listen: HashMap<String, SocketAddr>,
    stop: Option<Stop>,
}

struct Stop {
    pingora_stop: tokio::sync::oneshot::Sender<()>,
    pingora_thread: JoinHandle<()>,
    admin_task: tokio::task::JoinHandle<()>,
    admin_closed: std::sync::mpsc::Receiver<()>,
    runtimes: Vec<BackgroundRuntime>,
    copy_runtime: CopyRuntime,
}

impl RunningBalancers {
    /// Where the admin endpoint listens (the real port when 0 was asked).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where the balancer of `service` listens.
    pub fn listen_addr(&self, service: &str) -> Option<SocketAddr> {
        self.listen.get(service).copied()
    }

    /// Every balancer's listen address, by service.
    pub fn listen_addrs(&self) -> &HashMap<String, SocketAddr> {
        &self.listen
    }

    /// Where the balancer of `service` listens for cluster machines, if it has such a listener.
    pub fn internal_addr(&self, service: &str) -> Option<SocketAddr> {
        self.internal_listen.get(service).copied()
    }

    /// Stops at once (jobs in flight are cut). Returns once every listener is closed.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(stop) = self.stop.take() else {
            return;
        };
        let _ = stop.pingora_stop.send(());
        let _ = stop.pingora_thread.join();
        stop.admin_task.abort();
        // The admin task owns a guard that reports when its listener was dropped.
        let _ = stop.admin_closed.recv_timeout(Duration::from_secs(2));
        drop(stop.runtimes);
        drop(stop.copy_runtime);
    }
}

impl Drop for RunningBalancers {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Starts the balancers of `cfg` with default [`SpawnOptions`].
pub fn spawn(cfg: ProcessConfig) -> Result<RunningBalancers, ProxyError> {
    spawn_with(cfg, SpawnOptions::default())
}

/// Starts the balancers of `cfg`. Everything is validated and every socket bound before anything
/// runs, so an error leaves nothing behind. Callable from inside a tokio runtime.
/// Everything [`spawn_with`] checks before it binds a socket: the balancer configs, the keys,
/// `[limits]` and `[trust]`. `understudy-proxy --check` runs only this. Gives the services.
pub fn check(cfg: &ProcessConfig, options: &SpawnOptions) -> Result<Vec<String>, ProxyError> {
    cfg.validated()?;
    check_keys(cfg, options)?;
    cfg.limits.validated()?;
    cfg.trust.marker_max_age()?;
    let services: Vec<&str> = cfg
        .balancers
        .iter()
        .map(|b| b.config.service.as_str())
        .collect();
    let registry = prometheus::Registry::new();
    signing::ConfigGates::new(
        &options.signing,
        &services,
        options.max_clock_skew,
        &registry,
    )?;
    Ok(services.into_iter().map(str::to_string).collect())
}

pub fn spawn_with(
    cfg: ProcessConfig,
    options: SpawnOptions,
) -> Result<RunningBalancers, ProxyError> {
    let configs = cfg.validated()?;
    let floors = cfg
        .balancers
        .iter()
        .map(|b| epoch_floor::EpochFloor::open(b.epoch_file.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    check_keys(&cfg, &options)?;
    let limits = cfg.limits.validated()?;
    let marker = Arc::new(MarkerPolicy::new(
        options.marker_key.clone(),
        cfg.trust.marker_max_age()?,
        cfg.trust.internal_sources.clone(),
    ));
    let service_names: Vec<&str> = cfg
        .balancers
        .iter()
        .map(|b| b.config.service.as_str())
        .collect();
    let metrics = Arc::new(metrics::Metrics::new()?);
    let gates = Arc::new(signing::ConfigGates::new(
        &options.signing,
        &service_names,
        options.max_clock_skew,
        metrics.registry(),
    )?);
    let bound = Bound::bind(&cfg)?;
    let mirror_runtime = if options.mirror_threads <= 1 {
        // One copy thread (the default): a current-thread runtime on a thread of its own costs
        // less per copy than a work-stealing runtime with one worker.
        CopyRuntime::Driven(DrivenRuntime::start("understudy-mirror")?)
    } else {
        CopyRuntime::Workers(background_runtime(
            "understudy-mirror",
            options.mirror_threads,
        )?)
    };
    let admin_runtime = background_runtime("understudy-admin", 1)?;
    let mirror = mirror::Mirror::start(
        mirror_runtime.handle(),
        mirror::MirrorLimits {
            queue: options.mirror_queue,
            concurrency: options.mirror_concurrency,
            per_active: options.mirror_per_active,
            timeout: options.mirror_timeout,
            connect_timeout: limits.machine_connect,
        },
        marker.clone(),
    );
    let shared = Shared {
        metrics: metrics.clone(),
        mirror,
        marker,
        data_plane: service::DataPlaneLimits {
            limits,
            mirror_body_limit: options.mirror_body_limit,
        },
    };
    let services = shared.services(configs.into_iter().zip(floors).collect(), &options);
    start_background(&services, &options, limits, &gates, &admin_runtime);
    let admin_state = Arc::new(admin::AdminState {
        services: services.clone(),
        listen: bound.listen.clone(),
        metrics,
        gates,
    });
    let (admin_task, admin_closed) = start_admin(bound.admin, admin_state, &admin_runtime)?;
    let (pingora_stop, pingora_thread) = start_pingora(&options, bound.balancers, &services)?;
    Ok(RunningBalancers {
        admin_addr: bound.admin_addr,
        listen: bound.listen,
        internal_listen: bound.internal_listen,
        stop: Some(Stop {
            pingora_stop,
            pingora_thread,
            admin_task,
            admin_closed,
            runtimes: vec![admin_runtime],
            copy_runtime: mirror_runtime,
        }),
    })
}

/// What every balancer of a process shares.
struct Shared {
    metrics: Arc<metrics::Metrics>,
    mirror: mirror::Mirror,
    marker: Arc<MarkerPolicy>,
    data_plane: service::DataPlaneLimits,
}

impl Shared {
    /// One service (routing, stats, links) per validated balancer config and its stored epoch
    /// floor, by name.
    fn services(
        &self,
        configs: Vec<(config::ValidConfig, epoch_floor::EpochFloor)>,
        options: &SpawnOptions,
    ) -> HashMap<String, Arc<service::Service>> {
        let retention = stats::Retention {
            epochs: options.stats_windows.max(1),
            pairs: options.pair_retention.max(1),
        };
        configs
            .into_iter()
            .map(|(valid, floor)| {
                let stats = Arc::new(stats::Stats::new(
                    valid.service.clone(),
                    self.metrics.clone(),
                    retention,
                ));
                let service = Arc::new(service::Service::new(
                    valid,
                    &self.metrics,
                    stats,
                    self.mirror.clone(),
                    self.data_plane,
                    self.marker.clone(),
                    floor,
                ));
                (service.name.to_string(), service)
            })
            .collect()
    }
}

/// Without `insecure_no_key`, every balancer needs its config key and the process the cluster's
/// marker key; with it, a warning says what is left open.
fn check_keys(cfg: &ProcessConfig, options: &SpawnOptions) -> Result<(), ProxyError> {
    let keyless: Vec<&str> = cfg
        .balancers
        .iter()
        .map(|b| b.config.service.as_str())
        .filter(|s| !options.signing.keys.contains_key(*s))
        .collect();
    if options.insecure_no_key {
        tracing::warn!(
            keyless = ?keyless,
            marker_key = options.marker_key.is_some(),
            "running with --insecure-no-key: balancers without a key take any config and serve \
             stats to anyone, and simulation markers from internal callers are believed unchecked"
        );
        return Ok(());
    }
    if let Some(service) = keyless.first() {
        return Err(ProxyError::NoKey(format!(
            "no key for the balancer of {service:?}"
        )));
    }
    if options.marker_key.is_none() {
        return Err(ProxyError::NoKey("no marker key".into()));
    }
    Ok(())
}

fn background_runtime(name: &'static str, threads: usize) -> Result<BackgroundRuntime, ProxyError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .map(|r| BackgroundRuntime(Some(r)))
        .map_err(|source| ProxyError::Start { what: name, source })
}

/// Every socket of the process, bound before anything runs (port 0 resolved, bind errors
/// reported first); pingora then serves these very sockets (see `BalancerListeners`).
struct Bound {
    admin: TcpListener,
    admin_addr: SocketAddr,
    /// (service, listener, internal?) for each balancer listener.
    balancers: Vec<(String, TcpListener, bool)>,
    listen: HashMap<String, SocketAddr>,
    internal_listen: HashMap<String, SocketAddr>,
}

impl Bound {
    fn bind(cfg: &ProcessConfig) -> Result<Bound, ProxyError> {
        let admin = bind(cfg.admin, "admin endpoint".into())?;
        let admin_addr = local_addr(&admin, cfg.admin)?;
        let mut bound = Bound {
            admin,
            admin_addr,
            balancers: Vec::new(),
            listen: HashMap::new(),
            internal_listen: HashMap::new(),
        };
        for spec in &cfg.balancers {
            let service = &spec.config.service;
            let listener = bind(spec.listen, format!("balancer of {service}"))?;
            let addr = local_addr(&listener, spec.listen)?;
            bound.listen.insert(service.clone(), addr);
            bound.balancers.push((service.clone(), listener, false));
            if let Some(internal) = spec.internal_listen {
                let what = format!("internal listener of the balancer of {service}");
                let listener = bind(internal, what)?;
                let addr = local_addr(&listener, internal)?;
                bound.internal_listen.insert(service.clone(), addr);
                bound.balancers.push((service.clone(), listener, true));
            }
        }
        Ok(bound)
    }
}

fn bind(addr: SocketAddr, what: String) -> Result<TcpListener, ProxyError> {
    let listener = TcpListener::bind(addr).map_err(|source| ProxyError::Bind {
        addr,
        what: what.clone(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ProxyError::Bind { addr, what, source })?;
    Ok(listener)
}

/// The balancers' background tasks, on the admin runtime (ended with it): the session sweeper,
/// the health probes, the hub feed of configs when there is one.
fn start_background(
    services: &HashMap<String, Arc<service::Service>>,
    options: &SpawnOptions,
    limits: config::Limits,
    gates: &Arc<signing::ConfigGates>,
    runtime: &BackgroundRuntime,
) {
    start_sweeper(services, options.session_idle, runtime);
    runtime.spawn(prober::run(services.values().cloned().collect(), limits));
    if let Some(feed) = &options.signing.feed {
        signing::start_feed(feed, gates, services, runtime.handle());
    }
}

/// Sessions idle out and drains end on a timer, on the admin runtime.
fn start_sweeper(
    services: &HashMap<String, Arc<service::Service>>,
    idle: Duration,
    runtime: &BackgroundRuntime,
) {
    let services: Vec<Arc<service::Service>> = services.values().cloned().collect();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = std::time::Instant::now();
            for s in &services {
                s.router.sweep(now, idle);
            }
        }
    });
}

type AdminTask = (tokio::task::JoinHandle<()>, std::sync::mpsc::Receiver<()>);

fn start_admin(
    listener: TcpListener,
    state: Arc<admin::AdminState>,
    runtime: &BackgroundRuntime,
) -> Result<AdminTask, ProxyError> {
    let (admin_closed_tx, admin_closed) = std::sync::mpsc::channel();
    let listener = {
        let _enter = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|source| ProxyError::Start {
            what: "admin endpoint",
            source,
        })?
    };
    let task = runtime.spawn(async move {
        let _report_closed = NotifyOnDrop(admin_closed_tx);
        if let Err(e) = axum::serve(listener, admin::router(state)).await {
            tracing::error!("admin endpoint stopped: {e}");
        }
    });
    Ok((task, admin_closed))
}

/// Pingora's server on a thread of its own, serving every balancer listener.
fn start_pingora(
    options: &SpawnOptions,
    listeners: Vec<(String, TcpListener, bool)>,
    services: &HashMap<String, Arc<service::Service>>,
) -> Result<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>), ProxyError> {
    let conf = ServerConf {
        threads: options.threads.max(1),
        // No grace period: in-flight jobs end with the process (see `StopSignal`).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        work_stealing: options.work_stealing,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let entries = listeners
        .into_iter()
        .map(|(name, listener, internal)| {
            let address = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let service = services[&name].clone();
            let label = format!(
                "balancer {name}{}",
                if internal { " (internal)" } else { "" }
            );
            let mut pingora_service = pingora::services::listening::Service::new(
                label,
                proxy::Balancer { service, internal },
            );
            pingora_service.add_tcp(&address);
            (address, listener, pingora_service)
        })
        .collect();
    server.add_service(BalancerListeners {
        name: "understudy".into(),
        entries,
    });
    let (pingora_stop, stop_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("understudy-pingora".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(StopSignal(tokio::sync::Mutex::new(Some(stop_rx)))),
            })
        })
        .map_err(|source| ProxyError::Start {
            what: "pingora server thread",
            source,
        })?;
    Ok((pingora_stop, thread))
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, ProxyError> {
    listener.local_addr().map_err(|source| ProxyError::Bind {
        addr: asked,
        what: "reading the bound address".into(),
        source,
    })
}

/// A runtime of our own threads. Dropped without blocking, so that `spawn` failing half-way or
/// `shutdown` is fine inside the caller's async context (tokio panics on a blocking drop there).
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for BackgroundRuntime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("runtime present until drop")
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A current-thread runtime driven by a thread of its own until it is dropped; its tasks are
/// dropped on that thread, never in the caller's async context.
struct DrivenRuntime {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the driving thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl DrivenRuntime {
    fn start(name: &'static str) -> Result<Self, ProxyError> {
        let start_error = |source| ProxyError::Start { what: name, source };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(start_error)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Returns once `stop` is dropped (an error then, which is the signal).
                let _ = runtime.block_on(stopped);
            })
            .map_err(start_error)?;
        Ok(DrivenRuntime {
            handle,
            _stop: stop,
        })
    }
}

/// The runtime copies run on: one driven thread, or a pool of workers (`--mirror-threads`).
enum CopyRuntime {
    Driven(DrivenRuntime),
    Workers(BackgroundRuntime),
}

impl CopyRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            CopyRuntime::Driven(driven) => &driven.handle,
            CopyRuntime::Workers(workers) => workers.handle(),
        }
    }
}

struct NotifyOnDrop(std::sync::mpsc::Sender<()>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Pingora's shutdown trigger when `RunningBalancers` stops (or is dropped). Graceful with no grace
/// period: the runtimes are then given up to `graceful_shutdown_timeout_seconds` to drop their
/// tasks, so the listeners are closed when the pingora thread ends (a quick shutdown leaves that to
/// the worker threads, after `shutdown` has returned).
struct StopSignal(tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        if let Some(rx) = self.0.lock().await.take() {
            // A dropped sender also means stop.
            let _ = rx.await;
        }
        ShutdownSignal::GracefulTerminate
    }
}

type BalancerService = pingora::services::listening::Service<proxy::Balancer>;

/// Serves already-bound listeners through pingora's own listening services (one per balancer,
/// all on one runtime). Pingora binds from an address string and keeps the bound port to itself,
/// but it takes over a listening socket found in its fd table under that address (the mechanism
/// of its zero-downtime upgrade). So `spawn` binds with std (port 0 resolved, bind errors reported
/// before anything starts) and this service puts each socket in the table under its exact
/// address before starting pingora's service: pingora then accepts on our socket, with its own
/// accept path (buffers, nodelay, keep-alive).
struct BalancerListeners {
    name: String,
    entries: Vec<(String, TcpListener, BalancerService)>,
}

#[async_trait]
impl PingoraService for BalancerListeners {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        // pingora's server always hands its fd table to services on unix.
        let Some(fds) = fds else {
            tracing::error!("pingora gave no listen fd table; balancers cannot serve");
            return;
        };
        let mut services = Vec::new();
        for (address, listener, service) in self.entries.drain(..) {
            fds.lock().add(address, listener.into_raw_fd());
            services.push(service);
        }
        let mut running = Vec::new();
        for mut service in services {
            let (fds, shutdown) = (fds.clone(), shutdown.clone());
            running.push(tokio::spawn(async move {
                service
                    .start_service(Some(fds), shutdown, listeners_per_fd)
                    .await
            }));
        }
        for handle in running {
            if let Err(e) = handle.await {
                tracing::error!("balancer listener stopped: {e}");
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}
