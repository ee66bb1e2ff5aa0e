//! Plays a scenario on loopback: machines, balancers and the controller in this process, the
//! load generator against the entry service's balancer, the release and ops calls through the
//! admin endpoint, exactly as an operator would send them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;
use understudy_loadgen::{
    run_load, spawn_machine, HubOptions, JobsInSecond, LoadReport, MachineHandle, MachineStats,
};
use understudy_proxy::{BalancerSpec, ProcessConfig, RunningBalancers};
use understudy_wire::{BalancerConfig, MachineEntry, PoolRole};

use super::report::{
    ActiveJobs, Isolation, OpsRecord, ReleaseReport, ScenarioReport, ServiceReport,
};
use super::spec::{Expected, OpsTrigger, ReleasePlan, Scenario};
use crate::api::client::{AdminClient, ClientError};
use crate::app::{ControllerConfig, ControllerHandle};
use crate::config::cluster::Cluster;
use crate::runtime::controller::{RolloutDetail, RolloutView};

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";
/// How often the runner looks at the rollouts.
const WATCH_PERIOD: Duration = Duration::from_millis(100);
/// A copy not answered this long after it was queued is a timeout: copies made before a
/// candidate joined reach it at most this long after its balancer took it in.
const COPY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("machine `{id}` could not start: {reason}")]
    Machine { id: String, reason: String },
    #[error("balancers could not start: {0}")]
    Balancers(String),
    #[error("controller could not start: {0}")]
    Controller(String),
    #[error("scenario cluster is invalid once addresses are known: {0}")]
    Cluster(String),
    #[error("admin endpoint refused the release: {0}")]
    Release(ClientError),
    #[error("cannot create a state directory: {0}")]
    StateDir(std::io::Error),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Keep the cluster up this long after the verdict.
    pub linger: Option<Duration>,
    /// Print progress lines.
    pub verbose: bool,
}

/// What one machine counted during the run.
struct Counted {
    stats: MachineStats,
    by_second: Vec<JobsInSecond>,
}

/// Everything started for a run, stopped in reverse order.
struct Running {
    machines: BTreeMap<String, MachineHandle>,
    balancers: RunningBalancers,
    controller: ControllerHandle,
    _state_dir: tempfile::TempDir,
}

macro_rules! say {
    ($opts:expr, $($arg:tt)*) => {
        if $opts.verbose {
            println!($($arg)*);
        }
    };
}

pub async fn run(scenario: &Scenario, opts: &RunOptions) -> Result<ScenarioReport, RunError> {
    let token = std::env::var("UNDERSTUDY_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(generate_token);
    let started = start_cluster(scenario, &token).await?;
    let admin = format!("http://{}", started.controller.admin_addr());
    say!(
        opts,
        "scenario   {}: {}",
        scenario.name,
        scenario.description
    );
    say!(opts, "admin      {admin}   (token: {token})");
    say!(opts, "metrics    {admin}/metrics");
    let balancer_metrics = format!("http://{}/metrics", started.balancers.admin_addr());
    for service in scenario.cluster.services.keys() {
        let listen = started
            .balancers
            .listen_addr(service)
            .expect("started above");
        say!(
            opts,
            "balancer   {service:<12} jobs http://{listen}   metrics {balancer_metrics}"
        );
    }

    let client = AdminClient::new(&admin, Some(token.clone())).expect("controller URL is valid");
    let entry = started
        .balancers
        .listen_addr(&scenario.entry)
        .expect("entry service has a balancer");
    let result = drive(scenario, opts, &client, entry).await;
    let counted: BTreeMap<String, Counted> = started
        .machines
        .iter()
        .map(|(id, m)| {
            let machine = Counted {
                stats: m.stats(),
                by_second: m.jobs_by_second(),
            };
            (id.clone(), machine)
        })
        .collect();
    let registry = started.controller.core().machine_records();
    let monitor_actions = started.controller.core().monitor_actions();

    if let Some(linger) = opts.linger {
        say!(
            opts,
            "lingering {}s: the cluster stays up at the URLs above",
            linger.as_secs()
        );
        tokio::time::sleep(linger).await;
    }
    stop_cluster(started).await;

    let (load, runs, ops, release_error) = result;
    if let Some(error) = release_error {
        return Err(RunError::Release(error));
    }
    let mut report = build_report(scenario, load, &runs, ops, &counted);
    report.machines = registry;
    report.monitor_actions = monitor_actions;
    Ok(report)
}

async fn start_cluster(scenario: &Scenario, token: &str) -> Result<Running, RunError> {
    let any: SocketAddr = LOOPBACK_ANY_PORT.parse().expect("valid address");
    let mut machines = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    for plan in &scenario.machines {
        let handle = spawn_machine(plan.behaviour.clone(), any)
            .await
            .map_err(|e| RunError::Machine {
                id: plan.id.clone(),
                reason: e.to_string(),
            })?;
        addresses.insert(plan.id.clone(), handle.addr().to_string());
        machines.insert(plan.id.clone(), handle);
    }
    let mut cluster = scenario
        .cluster_with_addresses(&addresses)
        .map_err(|e| RunError::Cluster(e.to_string()))?;

    let (balancers, balancer_keys, delivery) = spawn_balancers(&cluster, any)?;
    for plan in &scenario.machines {
        let dependencies = plan.behaviour.dependencies.iter().map(|dep| {
            let addr = balancers
                .internal_addr(dep)
                .expect("every service has a balancer with an internal listener");
            (dep.clone(), addr)
        });
        machines[&plan.id]
            .set_dependencies(dependencies)
            .map_err(|e| RunError::Machine {
                id: plan.id.clone(),
                reason: e.to_string(),
            })?;
    }
    let balancer_url = format!("http://{}", balancers.admin_addr());
    let services: Vec<String> = cluster.services.keys().cloned().collect();
    for service in &services {
        cluster
            .set_balancer_url(service, &balancer_url)
            .map_err(RunError::Cluster)?;
        let key = crate::config::balancer::BalancerSecret::given(balancer_keys[service].clone());
        cluster
            .set_balancer_key(service, key, delivery)
            .map_err(RunError::Cluster)?;
    }

    let state_dir = tempfile::tempdir().map_err(RunError::StateDir)?;
    let config = ControllerConfig {
        tick: cluster.controller.tick,
        store: crate::config::store::StoreLocation::Sqlite(state_dir.path().join("understudy.db")),
        lease: None,
        admin_addr: any,
        token: token.to_string(),
        cluster,
    };
    let controller = crate::app::start(config)
        .await
        .map_err(|e| RunError::Controller(e.to_string()))?;
    join_hub(scenario, &machines, &controller, token).await?;
    Ok(Running {
        machines,
        balancers,
        controller,
        _state_dir: state_dir,
    })
}

/// Every balancer of the cluster in this process, each with a fresh key (the controller signs
/// each config with it; with a NATS hub the configs go through NATS instead of the admin PUT),
/// and the cluster's marker key. Each balancer has a public listener (the load generator's) and
/// an internal one for the machines calling their dependencies: only those may send simulation
/// jobs, and each must carry a marker token made with the marker key.
fn spawn_balancers(
    cluster: &crate::config::cluster::Cluster,
    any: SocketAddr,
) -> Result<
    (
        understudy_proxy::RunningBalancers,
        BTreeMap<String, understudy_hub::SecretKey>,
        crate::config::balancer::ConfigDelivery,
    ),
    RunError,
> {
    let balancer_keys: BTreeMap<String, understudy_hub::SecretKey> = cluster
        .services
        .keys()
        .map(|service| (service.clone(), understudy_hub::SecretKey::generate()))
        .collect();
    let (config_feed, delivery) = match &cluster.hub.backend {
        crate::config::hub::HubBackend::Nats { url } => (
            Some(understudy_proxy::ConfigFeed::Nats { url: url.clone() }),
            crate::config::balancer::ConfigDelivery::Hub,
        ),
        crate::config::hub::HubBackend::Embedded => {
            (None, crate::config::balancer::ConfigDelivery::Http)
        }
    };
    let signing = understudy_proxy::ConfigSigning {
        keys: balancer_keys
            .iter()
            .map(|(s, k)| (s.clone(), understudy_proxy::BalancerKey::given(k.clone())))
            .collect(),
        feed: config_feed,
        ..understudy_proxy::ConfigSigning::default()
    };
    let process = ProcessConfig::new(
        any,
        cluster
            .services
            .keys()
            .map(|service| BalancerSpec {
                internal_listen: Some(any),
                ..BalancerSpec::new(any, initial_balancer_config(cluster, service))
            })
            .collect(),
    );
    let options = understudy_proxy::SpawnOptions {
        signing,
        marker_key: Some(understudy_hub::SecretKey::generate()),
        mirror_timeout: COPY_TIMEOUT,
        // The scenario's `[hub] max_clock_skew_ms`, as for the controller.
        max_clock_skew: cluster.hub.max_clock_skew,
        ..understudy_proxy::SpawnOptions::default()
    };
    let balancers = understudy_proxy::spawn_with(process, options)
        .map_err(|e| RunError::Balancers(e.to_string()))?;
    Ok((balancers, balancer_keys, delivery))
}

/// Registers every machine with the controller, as a machine does at boot, and has it publish its
/// state (and its calls') to the controller's hub with the key the registration gave it.
async fn join_hub(
    scenario: &Scenario,
    machines: &BTreeMap<String, MachineHandle>,
    controller: &ControllerHandle,
    token: &str,
) -> Result<(), RunError> {
    let admin = controller.admin_url();
    let client =
        AdminClient::new(&admin, Some(token.to_string())).expect("controller URL is valid");
    for plan in &scenario.machines {
        let failed = |reason: String| RunError::Machine {
            id: plan.id.clone(),
            reason: format!("cannot join the hub: {reason}"),
        };
        let machine = &machines[&plan.id];
        let body = serde_json::json!({
            "id": plan.id,
            "service": plan.service,
            "version": plan.version,
            "address": machine.addr().to_string(),
        });
        let answer: crate::runtime::machines::Registration = client
            .post("/api/v1/machines", &body)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let url = answer.hub_url.unwrap_or_else(|| admin.clone());
        let options = HubOptions::new(url, plan.id.as_str(), &answer.key)
            .map_err(|e| failed(e.to_string()))?;
        machine
            .publish_to_hub(options)
            .map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

/// The balancer's config before the controller takes over: the declared active machines, at
/// version 0 so that the controller's first push (version 1 and up) replaces it.
fn initial_balancer_config(cluster: &Cluster, service: &str) -> BalancerConfig {
    let spec = &cluster.services[service];
    BalancerConfig {
        service: service.to_string(),
        version: 0,
        epoch: 0,
        mirror_fraction: spec.mirror_fraction,
        compare_body: spec.compare.wire_form().0,
        compare: spec.compare.wire_form().1,
        compare_headers: spec.compare_headers.clone(),
        drain_timeout_ms: spec.drain_timeout.as_millis() as u64,
        machines: cluster
            .machines_of(service)
            .filter(|m| m.config == PoolRole::Active)
            .map(|m| MachineEntry {
                id: m.id.clone(),
                version: m.version.clone(),
                address: m.address.clone(),
                weight: m.weight,
                config: PoolRole::Active,
                health_path: m.health_path.clone(),
            })
            .collect(),
    }
}

async fn stop_cluster(cluster: Running) {
    cluster.controller.shutdown().await;
    let balancers = cluster.balancers;
    // Pingora's shutdown joins its own thread: keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || balancers.shutdown()).await;
    for (_, machine) in cluster.machines {
        machine.shutdown().await;
    }
}

/// What the run saw of one release.
pub(super) struct ReleaseRun {
    /// The controller's release id.
    id: Option<i64>,
    /// Wall clock when it was asked for (machines count their jobs by wall-clock second).
    started_unix_ms: u64,
    details: Vec<RolloutDetail>,
}

type DriveResult = (
    Option<LoadReport>,
    Vec<ReleaseRun>,
    Vec<OpsRecord>,
    Option<ClientError>,
);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The load, the releases one after the other, and the ops steps of each, until every release
/// ended and the load finished, or the scenario's timeout.
struct Driver<'a> {
    scenario: &'a Scenario,
    opts: &'a RunOptions,
    client: &'a AdminClient,
    start: Instant,
    deadline: Instant,
    load: tokio::task::JoinHandle<Result<LoadReport, understudy_loadgen::LoadError>>,
    load_report: Option<LoadReport>,
    ops: Vec<OpsRecord>,
}

async fn drive(
    scenario: &Scenario,
    opts: &RunOptions,
    client: &AdminClient,
    entry: SocketAddr,
) -> DriveResult {
    let start = Instant::now();
    let verbose = opts.verbose;
    let load = tokio::spawn(run_load(scenario.load.clone(), entry, move |p| {
        if verbose {
            println!("load       {p}");
        }
    }));
    let mut driver = Driver {
        scenario,
        opts,
        client,
        start,
        deadline: start + scenario.timeout,
        load,
        load_report: None,
        ops: Vec::new(),
    };
    let mut runs = Vec::with_capacity(scenario.releases.len());
    let mut previous_end = start;
    for (index, plan) in scenario.releases.iter().enumerate() {
        tokio::time::sleep_until((previous_end + plan.at).min(driver.deadline)).await;
        if Instant::now() >= driver.deadline {
            break;
        }
        match driver.release(index).await {
            Ok(run) => runs.push(run),
            Err(e) => {
                driver.load.abort();
                return (None, runs, driver.ops, Some(e));
            }
        }
        previous_end = Instant::now();
    }
    while driver.load_report.is_none() && Instant::now() < driver.deadline {
        driver.poll_load().await;
        tokio::time::sleep(WATCH_PERIOD).await;
    }
    if driver.load_report.is_none() {
        say!(
            opts,
            "timeout    the scenario's {}s ran out",
            scenario.timeout.as_secs()
        );
        driver.load.abort();
    }
    (driver.load_report, runs, driver.ops, None)
}

impl Driver<'_> {
    async fn poll_load(&mut self) {
        if self.load_report.is_none() && self.load.is_finished() {
            self.load_report = (&mut self.load).await.ok().and_then(Result::ok);
        }
    }

    /// Starts release `index`, fires its ops steps and follows its rollouts until they end.
    async fn release(&mut self, index: usize) -> Result<ReleaseRun, ClientError> {
        let plan = &self.scenario.releases[index];
        let body = serde_json::json!({
            "services": plan.services,
            "rollback_on_failure": plan.rollback_on_failure,
            "subgroup": plan.subgroups,
        });
        let started_unix_ms = unix_ms();
        let release_started = Instant::now();
        let answer: crate::runtime::controller::ReleaseAnswer =
            self.client.post("/api/v1/releases", &body).await?;
        let release_id = answer.release;
        say!(
            self.opts,
            "release    #{} started: {}",
            release_id.unwrap_or(0),
            describe(&plan.services)
        );
        let mut fired = vec![false; self.scenario.ops.len()];
        let mut phases: BTreeMap<String, String> = BTreeMap::new();
        let mut rollouts: Vec<RolloutView> = Vec::new();
        loop {
            self.poll_load().await;
            if let Ok(all) = self
                .client
                .get::<Vec<RolloutView>>("/api/v1/rollouts")
                .await
            {
                rollouts = all
                    .into_iter()
                    .filter(|r| Some(r.release) == release_id)
                    .collect();
            }
            self.say_phases(&rollouts, &mut phases);
            self.fire_ops(index, &rollouts, release_started, &mut fired)
                .await;
            let settled = !rollouts.is_empty()
                && rollouts
                    .iter()
                    .all(|r| Expected::of_phase(&r.phase) != Expected::Pending);
            if settled || Instant::now() >= self.deadline {
                break;
            }
            tokio::time::sleep(WATCH_PERIOD).await;
        }
        let mut details = Vec::with_capacity(rollouts.len());
        for r in &rollouts {
            let path = format!("/api/v1/rollouts/{}", r.id);
            if let Ok(d) = self.client.get::<RolloutDetail>(&path).await {
                details.push(d);
            }
        }
        Ok(ReleaseRun {
            id: release_id,
            started_unix_ms,
            details,
        })
    }

    fn say_phases(&self, rollouts: &[RolloutView], phases: &mut BTreeMap<String, String>) {
        for r in rollouts {
            let before = phases.insert(r.service.clone(), r.phase.clone());
            if before.as_deref() != Some(r.phase.as_str()) {
                say!(
                    self.opts,
                    "rollout    t={:>5.1}s {:<12} {} -> {}",
                    self.start.elapsed().as_secs_f64(),
                    r.service,
                    before.as_deref().unwrap_or("-"),
                    r.phase
                );
            }
        }
    }

    /// Sends the ops steps of release `index` that are due.
    async fn fire_ops(
        &mut self,
        index: usize,
        rollouts: &[RolloutView],
        release_started: Instant,
        fired: &mut [bool],
    ) {
        for (n, step) in self.scenario.ops.iter().enumerate() {
            if fired[n] || step.release != index {
                continue;
            }
            let Some(rollout) = rollouts.iter().find(|r| r.service == step.service) else {
                continue;
            };
            let due = match &step.trigger {
                OpsTrigger::After(after) => release_started.elapsed() >= *after,
                OpsTrigger::Phase(phase) => &rollout.phase == phase,
            };
            if !due {
                continue;
            }
            fired[n] = true;
            let result = self.client.act(rollout.id, step.action, None).await;
            let at_s = self.start.elapsed().as_secs_f64();
            say!(
                self.opts,
                "ops        t={at_s:>5.1}s {} {} (rollout {}): {}",
                step.action.as_str(),
                step.service,
                rollout.id,
                match &result {
                    Ok(_) => "accepted".to_string(),
                    Err(e) => format!("refused: {e}"),
                }
            );
            self.ops.push(OpsRecord {
                action: step.action.as_str().to_string(),
                service: step.service.clone(),
                at_s,
                accepted: result.is_ok(),
                error: result.err().map(|e| e.to_string()),
            });
        }
    }
}

fn describe(release: &BTreeMap<String, String>) -> String {
    release
        .iter()
        .map(|(s, v)| format!("{s}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn build_report(
    scenario: &Scenario,
    load: Option<LoadReport>,
    runs: &[ReleaseRun],
    ops: Vec<OpsRecord>,
    counted: &BTreeMap<String, Counted>,
) -> ScenarioReport {
    let releases: Vec<ReleaseReport> = scenario
        .releases
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let run = runs.get(i);
            ReleaseReport {
                release: run.and_then(|r| r.id),
                services: service_reports(plan, run.map_or(&[], |r| r.details.as_slice())),
            }
        })
        .collect();
    // Each service as its last release left it.
    let services = releases.iter().flat_map(|r| r.services.clone()).collect();
    let rollouts: Vec<RolloutDetail> = runs.iter().flat_map(|r| r.details.clone()).collect();
    let active_jobs = load
        .as_ref()
        .map_or_else(ActiveJobs::default, |l| ActiveJobs {
            sent: l.sent,
            ok: l.ok,
            errors: l.errors,
        });
    let mut report = ScenarioReport {
        scenario: scenario.name.clone(),
        passed: false,
        failures: Vec::new(),
        services,
        releases,
        release_order: joining_order(&rollouts),
        active_jobs,
        dropped_sessions: load.as_ref().map_or(0, LoadReport::dropped_sessions),
        simulation_side_effects: counted
            .values()
            .map(|m| m.stats.simulation_side_effects)
            .sum(),
        isolation: isolation(scenario, runs, counted),
        calls_moved: counted.values().map(|m| m.stats.calls_moved).sum(),
        calls_moved_by_machine: counted
            .iter()
            .filter(|(_, m)| m.stats.calls_moved > 0)
            .map(|(id, m)| (id.clone(), m.stats.calls_moved))
            .collect(),
        ops,
        load,
        machines: Vec::new(),
        monitor_actions: Vec::new(),
    };
    report.failures = failures(scenario, &report);
    report.passed = report.failures.is_empty();
    report
}

/// The outcome of each service of a release, beside the one expected.
fn service_reports(
    plan: &ReleasePlan,
    rollouts: &[RolloutDetail],
) -> BTreeMap<String, ServiceReport> {
    let mut services = BTreeMap::new();
    for (service, expected) in &plan.expect {
        let rollout = rollouts.iter().find(|r| &r.rollout.service == service);
        let outcome = rollout.map_or(Expected::Pending, |r| Expected::of_phase(&r.rollout.phase));
        let verdict = rollout.and_then(|r| r.rollout.verdict.clone());
        let numbers = rollout.map(|r| r.rollout.numbers.clone());
        let jobs_compared = verdict
            .as_ref()
            .map(|v| v.jobs)
            .or_else(|| numbers.as_ref().map(|n| n.jobs))
            .unwrap_or(0);
        services.insert(
            service.clone(),
            ServiceReport {
                outcome,
                expected: *expected,
                phase: rollout.map(|r| r.rollout.phase.clone()),
                jobs_compared,
                verdict,
                numbers,
            },
        );
    }
    services
}

/// Why the run is not as expected, one line per reason.
fn failures(scenario: &Scenario, report: &ScenarioReport) -> Vec<String> {
    let mut failures = Vec::new();
    let several = report.releases.len() > 1;
    for (index, release) in report.releases.iter().enumerate() {
        for (name, s) in &release.services {
            if s.outcome != s.expected {
                let which = if several {
                    format!("release {index}: ")
                } else {
                    String::new()
                };
                failures.push(format!(
                    "{which}{name}: expected {}, got {}",
                    s.expected.as_str(),
                    s.outcome.as_str()
                ));
            }
        }
    }
    if report.load.is_none() {
        failures.push("the load did not finish before the scenario's timeout".to_string());
    }
    let errors = report.active_jobs.errors;
    if errors > scenario.max_active_errors {
        failures.push(format!(
            "callers saw {errors} errors (at most {} allowed)",
            scenario.max_active_errors
        ));
    }
    let dropped = report.dropped_sessions;
    if dropped > scenario.max_dropped_sessions {
        failures.push(format!(
            "{dropped} sessions dropped (at most {} allowed)",
            scenario.max_dropped_sessions
        ));
    }
    let i = &report.isolation;
    let list = |ids: &[String]| match ids {
        [] => "none".to_string(),
        ids => ids.join(", "),
    };
    let joined = list(&i.joined_machines);
    if i.active_machines_simulation_jobs > 0 {
        failures.push(format!(
            "{} simulation jobs reached active machines (active all along: {}; joined: {joined})",
            i.active_machines_simulation_jobs,
            list(&i.always_active_machines),
        ));
    }
    if i.simulation_only_plain_jobs > 0 {
        failures.push(format!(
            "{} callers' jobs reached machines only in the simulation pool (never joined: {}; \
             joined later: {joined})",
            i.simulation_only_plain_jobs,
            list(&i.simulation_only_machines),
        ));
    }
    if report.calls_moved > scenario.max_calls_moved {
        let by_machine: Vec<String> = report
            .calls_moved_by_machine
            .iter()
            .map(|(id, n)| format!("{id}: {n}"))
            .collect();
        failures.push(format!(
            "{} calls moved to a machine that did not see them start ({}; at most {} allowed)",
            report.calls_moved,
            by_machine.join(", "),
            scenario.max_calls_moved
        ));
    }
    if report.simulation_side_effects > 0 {
        failures.push(format!(
            "{} side effects performed for simulation jobs",
            report.simulation_side_effects
        ));
    }
    failures
}

/// Counts, from what the machines received, the simulation jobs that reached a machine while it
/// was active and the callers' jobs that reached one while it was only in the simulation pool.
/// Roles come from the scenario and the rollouts the controller recorded, never from a
/// balancer's view:
/// - declared active and joining no rollout: active from the start until retired or taken out,
///   when it leaves every pool (a drain keeps only its calls, callers' jobs): every simulation
///   job counts;
/// - declared in the simulation configuration and joining no rollout that reached `joining` (a
///   control, or a candidate rolled back, aborted or still judged): every caller's job counts;
/// - a candidate that joined: the jobs out of turn around its joining (see [`out_of_turn`]).
///
/// With several releases, each is judged over its own time window (from its start to the next
/// one's), with the roles the releases before it left: a candidate that joined is active from
/// then on, and a machine it replaced leaves every pool (a caller's job there is out of turn).
fn isolation(
    scenario: &Scenario,
    runs: &[ReleaseRun],
    machines: &BTreeMap<String, Counted>,
) -> Isolation {
    let mut roles: BTreeMap<&str, PoolRole> = scenario
        .machines
        .iter()
        .map(|m| (m.id.as_str(), m.config))
        .collect();
    let mut isolation = Isolation::default();
    if runs.is_empty() {
        window_isolation(&roles, &[], machines, 0..u64::MAX, &mut isolation);
    }
    for (i, run) in runs.iter().enumerate() {
        let from_s = if i == 0 {
            0
        } else {
            run.started_unix_ms / 1000
        };
        let until_s = runs
            .get(i + 1)
            .map_or(u64::MAX, |next| next.started_unix_ms / 1000);
        window_isolation(
            &roles,
            &run.details,
            machines,
            from_s..until_s,
            &mut isolation,
        );
        for r in run.details.iter().filter(|r| r.rollout.phase == "complete") {
            let moved = &r.rollout.machines;
            for id in &moved.joining {
                roles.insert(id.as_str(), PoolRole::Active);
            }
            for id in &moved.replaced {
                roles.insert(id.as_str(), PoolRole::Simulation);
            }
        }
    }
    for list in [
        &mut isolation.always_active_machines,
        &mut isolation.simulation_only_machines,
        &mut isolation.joined_machines,
    ] {
        list.sort();
        list.dedup();
    }
    isolation
}

/// [`isolation`] over the seconds of `window`, with each machine's role at its start.
fn window_isolation(
    roles: &BTreeMap<&str, PoolRole>,
    rollouts: &[RolloutDetail],
    machines: &BTreeMap<String, Counted>,
    window: std::ops::Range<u64>,
    isolation: &mut Isolation,
) {
    let candidates: BTreeSet<&str> = rollouts
        .iter()
        .flat_map(|r| r.rollout.machines.joining.iter().map(String::as_str))
        .collect();
    let joined: BTreeMap<&str, u64> = rollouts
        .iter()
        .filter_map(|r| Some((r, joined_at(r)?)))
        .flat_map(|(r, at)| {
            r.rollout
                .machines
                .joining
                .iter()
                .map(move |id| (id.as_str(), at))
        })
        .collect();
    for (&id, &role) in roles {
        let Some(counted) = machines.get(id) else {
            continue;
        };
        let seconds: Vec<JobsInSecond> = counted
            .by_second
            .iter()
            .filter(|s| window.contains(&s.unix_s))
            .cloned()
            .collect();
        let sum = |f: fn(&JobsInSecond) -> u64| seconds.iter().map(f).sum::<u64>();
        match (role, joined.get(id)) {
            (PoolRole::Active, _) if !candidates.contains(id) => {
                isolation.active_machines_simulation_jobs += sum(|s| s.simulation);
                isolation.always_active_machines.push(id.to_string());
            }
            (PoolRole::Simulation, None) => {
                isolation.simulation_only_plain_jobs += sum(|s| s.plain);
                isolation.simulation_only_machines.push(id.to_string());
            }
            (PoolRole::Simulation, Some(&joined_ms)) => {
                let (plain, simulation) = out_of_turn(&seconds, joined_ms);
                isolation.simulation_only_plain_jobs += plain;
                isolation.active_machines_simulation_jobs += simulation;
                isolation.joined_machines.push(id.to_string());
            }
            (PoolRole::Active, _) => {}
        }
    }
}

/// The jobs a candidate that joined at `joined_ms` (the controller's record, committed before
/// any balancer is told) received out of turn: callers' jobs in the seconds before it, and
/// simulation jobs after copies made before its balancer took it in could still arrive. Its
/// first caller's job from the joining second on came after that switch, and a copy arrives
/// within [`COPY_TIMEOUT`] of being made; one more second for the rounding to seconds.
fn out_of_turn(seconds: &[JobsInSecond], joined_ms: u64) -> (u64, u64) {
    let joined_s = joined_ms / 1000;
    let plain_before = seconds
        .iter()
        .filter(|s| s.unix_s < joined_s)
        .map(|s| s.plain)
        .sum();
    let switched_s = seconds
        .iter()
        .find(|s| s.unix_s >= joined_s && s.plain > 0)
        .map_or(joined_s + 1, |s| s.unix_s);
    let copies_until_s = switched_s + COPY_TIMEOUT.as_secs() + 1;
    let simulation_after = seconds
        .iter()
        .filter(|s| s.unix_s > copies_until_s)
        .map(|s| s.simulation)
        .sum();
    (plain_before, simulation_after)
}

/// When the rollout's balancer took v2 into the active configuration, if it did.
fn joined_at(rollout: &RolloutDetail) -> Option<u64> {
    rollout
        .transitions
        .iter()
        .find(|t| matches!(t.to, crate::core::rollout::Phase::Joining { .. }))
        .map(|t| t.at_ms)
}

/// Services in the order their balancers took v2 into the active configuration.
fn joining_order(rollouts: &[RolloutDetail]) -> Vec<String> {
    let mut joined: Vec<(u64, i64, String)> = rollouts
        .iter()
        .filter_map(|r| Some((joined_at(r)?, r.rollout.id, r.rollout.service.clone())))
        .collect();
    joined.sort();
    let mut seen = BTreeSet::new();
    joined
        .into_iter()
        .filter(|(_, _, s)| seen.insert(s.clone()))
        .map(|(_, _, s)| s)
        .collect()
}

fn generate_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(unix_s: u64, plain: u64, simulation: u64) -> JobsInSecond {
        JobsInSecond {
            unix_s,
            plain,
            simulation,
        }
    }

    #[test]
    fn a_joined_candidate_counts_callers_jobs_before_it_joined_and_copies_too_late_to_be_old() {
        // Joined at 100.5 s, first caller's job at 101 s: copies made before may come until 107 s.
        let seconds = [
            second(98, 0, 40),
            second(99, 2, 40),
            second(100, 0, 40),
            second(101, 30, 3),
            second(107, 30, 1),
            second(108, 30, 5),
        ];
        assert_eq!(out_of_turn(&seconds, 100_500), (2, 5));
        // No caller's job after joining: the switch is taken a second after the controller's.
        let quiet = [second(100, 0, 1), second(107, 0, 2), second(108, 0, 3)];
        assert_eq!(out_of_turn(&quiet, 100_500), (0, 3));
    }
}
