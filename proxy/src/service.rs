//! One balancer's shared state (routing, stats, mirror) and the config push that changes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use understudy_wire::{BalancerConfig, PoolRole, StatsReport};

use crate::config::{CheckedConfig, ConfigError, Limits, ValidConfig};
use crate::marker::MarkerPolicy;
use crate::metrics::{LimitHits, Metrics};
use crate::mirror::{ActiveInFlight, Lane, Mirror};
use crate::pool::{Router, Table};
use crate::stats::Stats;
use crate::upstream::Upstream;

/// How long a push may take to resolve its machine names: under the controller's push deadline
/// (3 s), so that it gets the refusal naming the address rather than a timeout of its own.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Tunables of the data plane that are not part of the pushed config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataPlaneLimits {
    /// The process config's `[limits]`.
    pub limits: Limits,
    pub mirror_body_limit: usize,
}

/// Result of a config push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PushResult {
    Applied,
    /// Same version as the running one: nothing changed.
    AlreadyRunning,
}

/// Why a push was refused; the running config is unchanged in every case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("config is for service {pushed:?}, this balancer serves {serving:?}")]
    WrongService { pushed: String, serving: String },
    #[error("config version {pushed} is older than the running version {running}")]
    Stale { pushed: u64, running: u64 },
    /// Pushed by a controller that lost its lead: another one has pushed from a higher epoch.
    #[error(
        "config from fencing epoch {pushed} refused: epoch {highest} was already applied \
         (another controller has taken over)"
    )]
    StaleEpoch { pushed: u64, highest: u64 },
    /// The new floor could not be recorded: nothing was applied.
    #[error("the fencing epoch {epoch} cannot be recorded, nothing applied: {reason}")]
    FloorNotSaved { epoch: u64, reason: String },
}

pub(crate) struct Service {
    pub name: Arc<str>,
    pub router: Router,
    pub stats: Arc<Stats>,
    pub limits: DataPlaneLimits,
    pub jobs: AtomicU64,
    pub refused_no_simulation: IntCounter,
    pub hits: LimitHits,
    pub marker_stripped: IntCounter,
    /// The simulation marker's rules (process-wide).
    pub marker: Arc<MarkerPolicy>,
    pub metrics: Arc<Metrics>,
    /// Jobs in flight towards active machines: the copy lanes size their cap on it.
    pub active_in_flight: Arc<ActiveInFlight>,
    links: MachineLinks,
    config_version: IntGauge,
    /// The highest fencing epoch applied; a config from a lower one is refused.
    epoch: AtomicU64,
    /// Where that epoch is kept across restarts.
    floor: crate::epoch_floor::EpochFloor,
    config_epoch: IntGauge,
    stale_epoch: IntCounter,
    /// Serializes pushes so that the version check, the name lookups and the swap are one step.
    push: tokio::sync::Mutex<()>,
}

impl Service {
    pub(crate) fn new(
        config: ValidConfig,
        metrics: &Arc<Metrics>,
        stats: Arc<Stats>,
        mirror: Mirror,
        limits: DataPlaneLimits,
        marker: Arc<MarkerPolicy>,
        floor: crate::epoch_floor::EpochFloor,
    ) -> Self {
        let name = config.service.clone();
        let config_version = metrics.config_version(&name);
        config_version.set(config.version as i64);
        let config_epoch = metrics.config_epoch(&name);
        let highest = config.raw.epoch.max(floor.stored());
        config_epoch.set(highest as i64);
        let epoch = AtomicU64::new(highest);
        let stale_epoch = metrics.config_refused(&name, "stale_epoch");
        let active_in_flight: Arc<ActiveInFlight> = Arc::default();
        let links = MachineLinks {
            mirror,
            active_in_flight: active_in_flight.clone(),
            metrics: metrics.clone(),
            service: name.clone(),
            connect_timeout: limits.limits.machine_connect,
            keepalive: limits.limits.machine_keepalive,
            health_fall: limits.limits.health_fall,
            lanes: Mutex::default(),
            upstreams: Mutex::default(),
        };
        let table = links.table(config, &stats);
        Service {
            refused_no_simulation: metrics.refused(&name, "no_simulation_machine"),
            hits: metrics.limit_hits(&name),
            marker_stripped: metrics.marker_stripped(&name),
            marker,
            metrics: metrics.clone(),
            router: Router::new(table, limits.limits.max_sessions),
            name,
            stats,
            limits,
            jobs: AtomicU64::new(0),
            active_in_flight,
            links,
            config_version,
            epoch,
            floor,
            config_epoch,
            stale_epoch,
            push: tokio::sync::Mutex::new(()),
        }
    }

    /// Validates and applies a pushed config atomically: in-flight jobs finish on the machine
    /// they were sent to; new jobs see the whole new config. Machine names are looked up only
    /// for a config that is about to be applied (not for a stale or idempotent push).
    pub(crate) async fn push(&self, config: &BalancerConfig) -> Result<PushResult, PushError> {
        let checked = CheckedConfig::new(config)?;
        if checked.service() != &*self.name {
            return Err(PushError::WrongService {
                pushed: config.service.clone(),
                serving: self.name.to_string(),
            });
        }
        let _one_at_a_time = self.push.lock().await;
        let highest = self.epoch.load(Ordering::Acquire);
        if config.epoch < highest {
            self.stale_epoch.inc();
            return Err(PushError::StaleEpoch {
                pushed: config.epoch,
                highest,
            });
        }
        if config.epoch > highest {
            // Recorded before anything is applied: a restart never forgets a floor it obeyed.
            self.floor
                .save(config.epoch)
                .map_err(|e| PushError::FloorNotSaved {
                    epoch: config.epoch,
                    reason: e.to_string(),
                })?;
        }
        let result = self.push_version(checked).await?;
        // An idempotent push from a newer leader fences the old one as surely as a new version.
        self.epoch.store(config.epoch, Ordering::Release);
        self.config_epoch.set(config.epoch as i64);
        Ok(result)
    }

    /// The version check and the swap, under the push lock.
    async fn push_version(&self, checked: CheckedConfig) -> Result<PushResult, PushError> {
        let running = self.router.table().config.version;
        if checked.version() < running {
            return Err(PushError::Stale {
                pushed: checked.version(),
                running,
            });
        }
        if checked.version() == running {
            return Ok(PushResult::AlreadyRunning);
        }
        let valid = checked.resolve(RESOLVE_TIMEOUT).await?;
        let version = valid.version;
        let table = self.links.table(valid, &self.stats);
        self.router.swap(table, Instant::now());
        self.config_version.set(version as i64);
        Ok(PushResult::Applied)
    }

    pub(crate) fn running_config(&self) -> BalancerConfig {
        self.router.table().config.raw.clone()
    }

    pub(crate) fn report(&self, since: u64) -> Result<StatsReport, crate::stats::CursorError> {
        let config_version = self.router.table().config.version;
        let window = self.stats.read_since(since)?;
        Ok(StatsReport {
            service: self.name.to_string(),
            config_version,
            cursor: window.cursor,
            series: window.series,
            pairs: window.pairs,
            pairs_lost: window.pairs_lost,
            mirror_dropped: window.mirror_dropped,
            machines: self.router.machine_status(),
        })
    }
}

/// What a service's machines are linked to, resolved when a config is applied so that a job
/// finds them without a lookup: the copy lanes (one per simulation version ever configured, kept
/// across pushes so that a version's copies in flight stay counted in one place) and the
/// keep-alive connections per machine address (kept while the address stays configured).
struct MachineLinks {
    mirror: Mirror,
    active_in_flight: Arc<ActiveInFlight>,
    metrics: Arc<Metrics>,
    service: Arc<str>,
    connect_timeout: Duration,
    keepalive: Duration,
    health_fall: u32,
    lanes: Mutex<HashMap<Arc<str>, Arc<Lane>>>,
    upstreams: Mutex<HashMap<SocketAddr, Arc<Upstream>>>,
}

impl MachineLinks {
    /// The routing table of `config`, each machine holding its connections and each simulation
    /// machine its version's lane (both opened here on first use).
    fn table(&self, config: ValidConfig, stats: &Stats) -> Table {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        let mut upstreams = self.upstreams.lock().expect("upstreams lock");
        upstreams.retain(|address, _| config.machines.iter().any(|m| m.address == *address));
        for machine in &config.machines {
            if machine.role == PoolRole::Simulation && !lanes.contains_key(&machine.version) {
                let held = self.metrics.mirror_held(&self.service, &machine.version);
                let lane = self.mirror.open_lane(self.active_in_flight.clone(), held);
                lanes.insert(machine.version.clone(), Arc::new(lane));
            }
            upstreams.entry(machine.address).or_insert_with(|| {
                Arc::new(Upstream::new(
                    machine.address,
                    self.connect_timeout,
                    self.keepalive,
                    self.health_fall,
                ))
            });
        }
        Table::new(
            config,
            stats,
            |version| lanes.get(version).cloned(),
            |address| upstreams[&address].clone(),
        )
    }
}
