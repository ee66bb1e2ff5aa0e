//! The controller: holds the cluster's state, runs releases through their rollouts, reconciles
//! the balancers, and serves the admin endpoint.
//!
//! Memory is a cache of the SQLite store: every change is committed first (a transition together
//! with the balancer config it implies), then acted on (config pushed). On start the state is read
//! back and every balancer gets its last committed config again (same version: a no-op for a
//! balancer that already runs it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use understudy_judge::{Decision, Judge, Verdict};
use understudy_wire::{
    BalancerConfig, JobPair, MachineEntry, MachineHealth, MachineStatus, PoolRole, SeriesStats,
    StatsReport,
};
use utoipa::ToSchema;

use crate::config::cluster::{Cluster, Service};
use crate::config::operators::Operators;
use crate::core::consequences::{consequences, Consequences, RoleChange, RolloutMachines};
use crate::core::evidence::{Approval, EvidenceRef, EvidenceSeries, EvidenceSnapshot};
use crate::core::mirror::{self, CallerRate, JudgeState, MirrorChoice, MirrorView};
use crate::core::pairing::PairFeed;
use crate::core::pairing::StoredPair;
use crate::core::plan::{plan_release, PlanLine, Refusal, Selection};
use crate::core::roles::MachineRole;
use crate::core::rollout::TransitionRecord;
use crate::core::rollout::{transition, Actor, Event, Phase, TransitionError};
use crate::core::step;
use crate::core::verdict::{PairNumbers, PairSummary, RolloutVerdict};
use crate::runtime::balancer::{BalancerClient, BalancerError};
use crate::runtime::clock::Clock;
use crate::runtime::metrics::Metrics;
use crate::runtime::monitor;
use crate::store::{self, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service `{0}` has no balancer URL (set `balancer` in its table)")]
    NoBalancer(String),
    #[error(
        "no operator may act: set [controller] token, UNDERSTUDY_TOKEN or [controller] operators_file"
    )]
    NoToken,
    #[error("the database does not fit the cluster file: {0}")]
    Inconsistent(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("hub: {0}")]
    Hub(#[from] crate::runtime::hub::HubError),
}

/// Why an admin request was refused; maps onto an HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for RequestError {
    fn from(e: StoreError) -> Self {
        RequestError::Internal(e.to_string())
    }
}

/// The rollout a stats report feeds: the one being judged on the report's service (simulating,
/// or awaiting approval: its copies are judged until it joins).
struct Simulating {
    id: i64,
    phase: Phase,
    service: String,
    from: String,
    to: String,
    /// Sequence number of the next pair stored for it.
    next_seq: u64,
}

impl Simulating {
    fn of(state: &State, service: &str) -> Option<Simulating> {
        let r = state
            .open_rollout(service)
            .filter(|r| matches!(r.phase, Phase::Simulating | Phase::AwaitingApproval))?;
        Some(Simulating {
            id: r.id,
            phase: r.phase,
            service: r.service.clone(),
            from: r.from_version.clone(),
            to: r.to_version.clone(),
            next_seq: r.next_seq,
        })
    }

    /// The report's pairs that compare this rollout's versions.
    fn pairs_of(&self, pairs: &[JobPair]) -> Vec<StoredPair> {
        pairs
            .iter()
            .filter_map(|p| stored_pair(p, &self.from, &self.to))
            .collect()
    }
}

/// Jobs of callers (the active configuration) in a balancer's series.
fn active_jobs(series: &[SeriesStats]) -> u64 {
    series
        .iter()
        .filter(|s| s.config == PoolRole::Active)
        .map(series_jobs)
        .sum()
}

/// Every job of one series, whatever its outcome.
fn series_jobs(s: &SeriesStats) -> u64 {
    let o = &s.outcomes;
    o.ok + o.client_error + o.server_error + o.timeout + o.connect_failure
}

/// Whether a decision moves a rollout judged in `phase`: any decision while it simulates; only a
/// fail once it passed and awaits approval.
fn moves_rollout(phase: Phase, decision: Decision) -> bool {
    match phase {
        Phase::AwaitingApproval => decision == Decision::Fail,
        _ => decision != Decision::NotEnoughData,
    }
}

/// What the judge (or the early signal) made of a report.
#[derive(Default)]
struct Judgement {
    /// The verdict to show and store, decided or not.
    shown: Option<RolloutVerdict>,
    /// Set when it decides: the rollout moves.
    decided: Option<Verdict>,
}

/// A move the controller asks of a rollout on its own: the event, its cause, the numbers behind.
struct Move {
    rollout: i64,
    event: Event,
    cause: String,
    details: serde_json::Value,
}

impl Move {
    fn of_verdict(rollout: i64, verdict: &Verdict, shown: &Option<RolloutVerdict>) -> Move {
        Move {
            rollout,
            event: Event::Verdict {
                decision: verdict.decision,
                hard: verdict.hard,
            },
            cause: format!("judge: {} ({})", verdict.decision.as_str(), verdict.rule),
            details: serde_json::to_value(shown).unwrap_or_default(),
        }
    }
}

pub(super) struct RolloutState {
    pub(super) id: i64,
    pub(super) release: i64,
    pub(super) service: String,
    pub(super) from_version: String,
    pub(super) to_version: String,
    pub(super) after: Vec<String>,
    pub(super) phase: Phase,
    pub(super) entered_ms: u64,
    pub(super) created_ms: u64,
    pub(super) machines_before: BTreeMap<String, MachineRole>,
    /// The machines it moves (a sub-group, or the whole service).
    pub(super) selection: Selection,
    pub(super) transitions: Vec<TransitionRecord>,
    pub(super) verdict: Option<RolloutVerdict>,
    /// Present while the rollout may still be judged.
    pub(super) judge: Option<Judge>,
    /// Forms the judge's pairs (v2 against the control job by job, or against the active machine).
    pub(super) feed: PairFeed,
    pub(super) numbers: PairNumbers,
    pub(super) next_seq: u64,
    /// Callers' jobs per version while v2 is active (joining, retiring), for the live guard.
    pub(super) live: LiveCounts,
    /// Copies answered by v2 machines since the rollout (or the controller) started.
    pub(super) copies_seen: u64,
    /// Callers' jobs the service's active machines answered meanwhile (the copies' source).
    pub(super) callers_jobs: u64,
    /// Where the judge's tests stand now.
    pub(super) evidence: Option<EvidenceSnapshot>,
    /// Each material change of the evidence while it awaits approval (what approvals name).
    pub(super) evidence_log: Vec<EvidenceSnapshot>,
    /// Each test's evidence against pairs judged, for the dashboard.
    pub(super) series: EvidenceSeries,
    /// The latency quantiles as the judge last saw them.
    pub(super) quantiles: Vec<(String, understudy_judge::QuantileReport)>,
    /// The field tests as the judge last saw them (`compare = "fields"`).
    pub(super) fields: Option<crate::core::fields::FieldsView>,
    /// Operators' approvals so far.
    pub(super) approvals: Vec<Approval>,
    /// The copy rate steered within the service's mirror budget (none yet, or a fixed fraction).
    pub(super) mirror: Option<MirrorChoice>,
}

impl RolloutState {
    /// The rollout moved: its phase, since when, its history; its judge is dropped once it
    /// left simulation for good.
    fn enter(&mut self, record: TransitionRecord) {
        let to = record.to;
        self.phase = to;
        self.entered_ms = record.at_ms;
        self.transitions.push(record);
        // A passed v2 is still judged while it is routed to and awaits approval.
        let judged = matches!(
            to,
            Phase::Pending
                | Phase::Simulating
                | Phase::Judged { passed: true }
                | Phase::AwaitingApproval
        );
        if !judged {
            self.judge = None;
        }
    }

    /// Feeds one stored pair to the judge, sampling the evidence series when a point is due.
    fn feed(&mut self, pair: &StoredPair) {
        if let Some(judge) = self.judge.as_mut() {
            feed_judge(judge, &mut self.feed, &mut self.series, pair);
        }
    }

    /// The judge's tests and quantiles as they stand now (kept once the judge is dropped).
    fn refresh_evidence(&mut self, now_ms: u64) {
        let Some(judge) = self.judge.as_ref() else {
            return;
        };
        let decision = judge.decision();
        let mut snapshot = EvidenceSnapshot::of(decision, judge.jobs(), &judge.tests(), now_ms);
        if let Some(last) = self.evidence_log.last() {
            if !snapshot.differs_materially(last) {
                snapshot.seq = last.seq;
                snapshot.at_ms = last.at_ms;
            }
        }
        self.evidence = Some(snapshot);
        self.quantiles = judge.quantiles();
        self.fields = judge
            .fields()
            .map(|f| crate::core::fields::FieldsView::of(&f));
    }
}

/// One pair into a judge through its feed, and a point of the evidence series when one is due.
fn feed_judge(
    judge: &mut Judge,
    feed: &mut PairFeed,
    series: &mut EvidenceSeries,
    pair: &StoredPair,
) {
    let before = judge.jobs();
    feed.feed(judge, pair);
    let jobs = judge.jobs();
    if jobs != before && series.due(jobs) {
        series.push(jobs, &judge.tests());
    }
}

/// Outcomes of callers' jobs (active configuration) per side, from the balancer's series.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LiveCounts {
    pub v1_jobs: u64,
    pub v1_errors: u64,
    pub v2_jobs: u64,
    pub v2_errors: u64,
}

impl LiveCounts {
    /// v2's error rate above v1's, once v2 served `min_jobs` jobs.
    fn excess_error_rate(&self, min_jobs: u64) -> Option<(f64, f64)> {
        if self.v2_jobs < min_jobs.max(1) {
            return None;
        }
        let v2 = self.v2_errors as f64 / self.v2_jobs as f64;
        let v1 = if self.v1_jobs == 0 {
            0.0
        } else {
            self.v1_errors as f64 / self.v1_jobs as f64
        };
        Some((v1, v2))
    }
}

pub(super) struct ReleaseState {
    pub(super) id: i64,
    pub(super) created_ms: u64,
    pub(super) rollback_on_failure: bool,
    /// Rollout ids in plan order.
    pub(super) rollouts: Vec<i64>,
    /// The operator who started it.
    pub(super) created_by: Option<String>,
}

#[derive(Default)]
pub(super) struct ServiceState {
    pub(super) version: String,
    pub(super) cursor: u64,
    /// Last committed config (the one to run).
    pub(super) desired: Option<BalancerConfig>,
    /// Version the balancer acknowledged since this controller started.
    pub(super) acked: Option<u64>,
    pub(super) last_push_error: Option<String>,
    pub(super) last_push_ms: Option<u64>,
    pub(super) last_stats: Option<StatsView>,
    pub(super) last_stats_error: Option<String>,
    /// Stats reads taken in, and how many had been when the last push was acknowledged: a read
    /// from before the acknowledgement shows the config it replaced, not a lost one.
    pub(super) stats_reads: u64,
    pub(super) reads_at_ack: u64,
    /// Callers' jobs per stats read: their rate steers a mirror budget.
    pub(super) callers: CallerRate,
}

impl ServiceState {
    /// The balancer reports, since it acknowledged a config, an older one: it lost its state (it
    /// restarted on its own file), so the committed config is pushed to it again.
    pub(super) fn lost_config(&self) -> bool {
        match (&self.last_stats, self.acked) {
            (Some(stats), Some(acked)) => {
                self.stats_reads > self.reads_at_ack && stats.config_version < acked
            }
            _ => false,
        }
    }
}

/// What the pure release step (`step.rs`) decides on, read from the state: the unfinished
/// releases, every rollout, each service's policy and balancer, and which machines of a
/// retiring rollout report holding no session (the one store read).
fn snapshot(state: &State) -> step::Snapshot<'_> {
    let releases = state
        .releases
        .values()
        .filter(|r| !state.release_finished(r))
        .map(|r| step::ReleaseFacts {
            id: r.id,
            rollouts: &r.rollouts,
            rollback_on_failure: r.rollback_on_failure,
        })
        .collect();
    let rollouts = state
        .rollouts
        .iter()
        .map(|(id, r)| {
            let facts = step::RolloutFacts {
                id: r.id,
                service: &r.service,
                from_version: &r.from_version,
                after: &r.after,
                phase: r.phase,
                entered_ms: r.entered_ms,
                replaced: &r.selection.replaced,
            };
            (*id, facts)
        })
        .collect();
    let services = state
        .cluster
        .services
        .iter()
        .map(|(name, spec)| {
            let s = state.services.get(name);
            let desired = s.and_then(|s| s.desired.as_ref()).map(|c| c.version);
            let facts = step::ServiceFacts {
                policy: &spec.policy,
                drain_timeout: spec.drain_timeout,
                synced: s.is_some_and(|s| desired == s.acked),
                desired_version: desired.unwrap_or(0),
                reported: s
                    .and_then(|s| s.last_stats.as_ref())
                    .map(|st| (st.config_version, st.machines.as_slice())),
            };
            (name.as_str(), facts)
        })
        .collect();
    let report_no_sessions = retiring_with_sessions(state)
        .filter(|id| crate::store::monitor::reports_no_sessions(&state.store, id))
        .map(str::to_string)
        .collect();
    step::Snapshot {
        releases,
        rollouts,
        services,
        report_no_sessions,
    }
}

/// Machines a retiring rollout replaces that their balancer still pins sessions to.
fn retiring_with_sessions(state: &State) -> impl Iterator<Item = &str> {
    state
        .rollouts
        .values()
        .filter(|r| r.phase == Phase::Retiring)
        .flat_map(move |r| {
            let stats = state
                .services
                .get(&r.service)
                .and_then(|s| s.last_stats.as_ref());
            stats
                .into_iter()
                .flat_map(|st| st.machines.iter())
                .filter(move |m| r.selection.replaced.contains(&m.id) && m.sessions > 0)
                .map(|m| m.id.as_str())
        })
}

/// The last stats read from a balancer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct StatsView {
    pub(super) at_ms: u64,
    pub(super) config_version: u64,
    pub(super) cursor: u64,
    pub(super) machines: Vec<MachineStatus>,
    pub(super) pairs_lost: u64,
    pub(super) mirror_dropped: u64,
}

pub(super) struct State {
    pub(super) cluster: Cluster,
    pub(super) store: Store,
    pub(super) services: BTreeMap<String, ServiceState>,
    pub(super) rollouts: BTreeMap<i64, RolloutState>,
    pub(super) releases: BTreeMap<i64, ReleaseState>,
    pub(super) roles: BTreeMap<String, MachineRole>,
    /// Machines the monitor took out of their balancer, its recent actions (src/runtime/monitor.rs).
    pub(super) monitor: monitor::MonitorState,
}

/// The controller proper, shared by the reconcile loop and the admin endpoint.
pub struct Core {
    pub(super) state: Mutex<State>,
    client: Arc<dyn BalancerClient>,
    pub(crate) metrics: Metrics,
    pub(super) clock: Clock,
    /// Whether it leads, and with which fencing epoch (every config is pushed with it).
    pub(super) leadership: leadership::Leadership,
    /// Who may call the mutating endpoints, by name.
    operators: Operators,
    wake: Notify,
    /// The hub it hosts and the keys of registered machines (src/runtime/hub.rs, src/runtime/machines.rs).
    pub(crate) hub: crate::runtime::hub::ControllerHub,
    /// Predictive monitoring of calls (src/runtime/predictions.rs).
    pub(crate) predictions: Arc<crate::runtime::predictions::Predictions>,
    /// Webhooks told of every phase change (src/runtime/notify.rs); never blocks a transition.
    pub(crate) notifier: crate::runtime::notify::Notifier,
}

/// `ReleaseRequest.services`: service -> version, at least one (utoipa has no field attribute for
/// `minProperties`).
fn service_versions() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::Object)
        .additional_properties(Some(
            utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::String),
        ))
        .min_properties(Some(1))
        .description(Some("service -> version, at least one"))
        .build()
}

/// A release request (`POST /api/v1/releases`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"services": {"db": "v2"}, "dry_run": true}))]
pub struct ReleaseRequest {
    /// service -> version.
    #[schema(schema_with = service_versions)]
    pub services: BTreeMap<String, String>,
    /// When a service fails, roll back what already joined, in reverse dependency order.
    #[serde(default)]
    pub rollback_on_failure: bool,
    /// Only show the plan.
    #[serde(default)]
    pub dry_run: bool,
    /// service -> the sub-group of its machines to move (default: all of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subgroup: BTreeMap<String, understudy_hub::SubgroupSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReleaseAnswer {
    /// Null for a dry run.
    pub release: Option<i64>,
    pub dry_run: bool,
    pub plan: Vec<PlanLine>,
    pub rollouts: Vec<RolloutView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    pub id: i64,
    pub release: i64,
    pub service: String,
    pub from_version: String,
    pub to_version: String,
    pub phase: String,
    /// Joining step (0-based) while joining.
    pub step: Option<u32>,
    pub entered_ms: u64,
    pub created_ms: u64,
    pub after: Vec<String>,
    pub requires_approval: bool,
    /// Latest verdict with the numbers behind it.
    pub verdict: Option<RolloutVerdict>,
    /// Display numbers of the pairs compared so far.
    pub numbers: PairSummary,
    /// The machines the rollout moves (its sub-group, if it has one).
    #[serde(default)]
    pub machines: Selection,
    /// Why the rollout cannot progress on its own, when the controller sees a reason: copies of
    /// v2 answered while no pair reached the judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutDetail {
    #[serde(flatten)]
    pub rollout: RolloutView,
    /// `{at_ms, from, to, cause, actor, details, operator}`, oldest first.
    pub transitions: Vec<TransitionRecord>,
    /// Where the judge's tests stand now. While the rollout awaits approval its `id` is what
    /// `POST .../approve` names (`{"evidence": ID}`).
    pub evidence: Option<EvidenceSnapshot>,
    /// Operators' approvals so far (a service may ask for two).
    pub approvals: Vec<Approval>,
    /// Distinct operators whose approvals it takes.
    pub approvals_required: u8,
    /// How long an evidence id may be approved after it was shown, and a first approval waits.
    pub approval_ttl_ms: u64,
    /// The share of callers' jobs its balancer is told to copy now, and why (a mirror budget
    /// steers it by the evidence).
    #[serde(default)]
    pub mirror: Option<MirrorView>,
    /// Per field path, where copies' answers differ from v1's and each field's test
    /// (`compare = "fields"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<crate::core::fields::FieldsView>,
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy)]
pub struct OpsRequest<'a> {
    pub action: OpsAction,
    /// Who asks (from the bearer token).
    pub operator: &'a str,
    /// The evidence id an approval names.
    pub evidence: Option<&'a str>,
}

impl<'a> OpsRequest<'a> {
    /// An action that names no evidence (abort, rollback).
    pub fn by(operator: &'a str, action: OpsAction) -> OpsRequest<'a> {
        OpsRequest {
            action,
            operator,
            evidence: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReleaseView {
    pub id: i64,
    pub created_ms: u64,
    pub rollback_on_failure: bool,
    pub finished: bool,
    /// Rollout ids in plan order.
    pub rollouts: Vec<i64>,
    /// The operator who started it (null: before operators had names).
    pub created_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub version: String,
    pub depends_on: Vec<String>,
    pub versions: Vec<String>,
    pub requires_approval: bool,
    pub balancer: Option<String>,
    /// The unfinished rollout of the service, if any.
    pub rollout: Option<i64>,
    pub phase: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineView {
    pub id: String,
    pub service: String,
    pub version: String,
    pub address: String,
    pub weight: u32,
    pub role: MachineRole,
    /// Configuration in the service's current balancer config, if it is in it.
    pub config: Option<PoolRole>,
    /// Whether it answers its balancer's probes (null: not in the last stats read).
    pub health: Option<MachineHealth>,
    /// Why it fails them (names the address), while it does.
    pub health_reason: Option<String>,
    pub history: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BalancerView {
    pub service: String,
    pub url: Option<String>,
    pub desired_version: Option<u64>,
    pub acked_version: Option<u64>,
    pub in_sync: bool,
    pub last_push_ms: Option<u64>,
    pub last_push_error: Option<String>,
    pub cursor: u64,
    #[schema(value_type = Option<StatsView>)]
    pub last_stats: Option<serde_json::Value>,
    pub last_stats_error: Option<String>,
    pub config: Option<BalancerConfig>,
}

pub(super) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves memory possibly ahead of nothing: the store is the
    // truth and memory is only changed after a commit, so the data is still usable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the service's own rollout is being judged: only then does its balancer copy callers'
/// jobs to the simulation pool (otherwise copies would cost capacity and judge nothing).
fn is_judging(phase: Option<Phase>) -> bool {
    matches!(
        phase,
        Some(Phase::Simulating | Phase::Judged { .. } | Phase::AwaitingApproval)
    )
}

/// The balancer config a service should run, given machine roles and its unfinished rollout
/// (its phase and the machines it moves).
///
/// Control machines (the serving version, simulation configuration) are in the simulation pool at
/// all times: besides being the A/A control of the service's own rollouts, they answer the
/// simulation jobs (`x-understudy-simulation: 1`) that a v2 judged upstream sends to this
/// service, which the balancer never gives to an active machine.
///
/// A rollout moves only its selection: the machines it replaces leave (in weight steps while
/// joining, then at once when retiring) and its joining machines take their place; every other
/// machine keeps its place. Machines the monitor took out (`held_out`) are left out.
pub(super) fn desired_machines(
    cluster: &Cluster,
    service: &Service,
    roles: &BTreeMap<String, MachineRole>,
    rollout: Option<(Phase, &Selection)>,
    held_out: &BTreeSet<String>,
) -> Vec<MachineEntry> {
    let entry = |m: &crate::config::cluster::Machine, weight: u32, config: PoolRole| MachineEntry {
        id: m.id.clone(),
        version: m.version.clone(),
        address: m.address.clone(),
        weight: weight.clamp(1, 1000),
        config,
        health_path: m.health_path.clone(),
    };
    let scaled = |w: u32, percent: u32| ((w * percent + 50) / 100).max(1);
    let mut out = Vec::new();
    for m in cluster.machines_of(&service.name) {
        if held_out.contains(&m.id) {
            continue;
        }
        let role = roles.get(&m.id).copied().unwrap_or(MachineRole::Retired);
        if role == MachineRole::Control {
            out.push(entry(m, m.weight, PoolRole::Simulation));
            continue;
        }
        let active = role == MachineRole::Active;
        match rollout {
            Some((Phase::Simulating | Phase::Judged { .. } | Phase::AwaitingApproval, moves)) => {
                if active {
                    out.push(entry(m, m.weight, PoolRole::Active));
                } else if moves.joining.contains(&m.id) {
                    out.push(entry(m, m.weight, PoolRole::Simulation));
                }
            }
            Some((Phase::Joining { step }, moves)) => {
                let share = service.policy.join_steps.get(step as usize).copied();
                if active && moves.replaced.contains(&m.id) {
                    let w = share.map_or(m.weight, |p| scaled(m.weight, 100 - p));
                    out.push(entry(m, w, PoolRole::Active));
                } else if active {
                    out.push(entry(m, m.weight, PoolRole::Active));
                } else if moves.joining.contains(&m.id) {
                    let w = share.map_or(m.weight, |p| scaled(m.weight, p));
                    out.push(entry(m, w, PoolRole::Active));
                }
            }
            Some((Phase::Retiring, moves)) => {
                if (active && !moves.replaced.contains(&m.id)) || moves.joining.contains(&m.id) {
                    out.push(entry(m, m.weight, PoolRole::Active));
                }
            }
            _ => {
                if active {
                    out.push(entry(m, m.weight, PoolRole::Active));
                }
            }
        }
    }
    out
}

/// A stats read to make: whose, where, from which cursor.
struct StatsRead {
    service: String,
    url: String,
    cursor: u64,
}

impl State {
    /// One read per service with a balancer, from its persisted cursor.
    fn stats_reads(&self) -> Vec<StatsRead> {
        self.cluster
            .services
            .values()
            .filter_map(|s| {
                Some(StatsRead {
                    service: s.name.clone(),
                    url: s.balancer.clone()?,
                    cursor: self.services.get(&s.name).map_or(0, |x| x.cursor),
                })
            })
            .collect()
    }
}

/// A config a balancer does not run yet.
struct Push {
    service: String,
    url: String,
    config: BalancerConfig,
}

/// Moving: a rollout's move committed with everything it implies.
impl State {
    /// The transition, the machines' new roles, the service's version and its balancer's next
    /// config, in one transaction.
    fn commit_move(
        &mut self,
        rollout: i64,
        record: &TransitionRecord,
        role_changes: &[RoleChange],
        new_version: Option<&str>,
        config: Option<&BalancerConfig>,
    ) -> Result<(), StoreError> {
        let service = &self.rollouts[&rollout].service;
        let machines: BTreeMap<String, (String, String)> = self
            .cluster
            .machines_of(service)
            .map(|m| (m.id.clone(), (m.service.clone(), m.version.clone())))
            .collect();
        let service = service.clone();
        let (now, cause) = (record.at_ms, record.cause.as_str());
        self.store.write(|tx| {
            store::record_transition(tx, rollout, record)?;
            for RoleChange { machine: id, role } in role_changes {
                // A machine the cluster file no longer declares has no balancer entry to change.
                let Some((svc, version)) = machines.get(id) else {
                    continue;
                };
                store::set_machine_role(tx, id, svc, version, *role, now, Some(rollout), cause)?;
            }
            if let Some(v) = new_version {
                store::set_service_version(tx, &service, v)?;
            }
            if let Some(c) = config {
                store::set_config(tx, c)?;
            }
            Ok(())
        })
    }
}

/// Pushing: what is due and what a refusal changes.
impl State {
    /// Every desired config its balancer has not acknowledged (or lost), the service whose
    /// rollout moved last going last: dependencies first.
    fn pending_pushes(&self) -> Vec<Push> {
        let mut order: Vec<(u64, Push)> = self
            .services
            .iter()
            .filter_map(|(name, s)| {
                let desired = s.desired.as_ref()?;
                if s.acked == Some(desired.version) && !s.lost_config() {
                    return None;
                }
                if s.lost_config() {
                    let running = s.last_stats.as_ref().map_or(0, |st| st.config_version);
                    tracing::warn!(
                        service = %name,
                        "the balancer runs config version {running} though it acknowledged \
                         {}: it lost its config (a restart?); pushing version {} again",
                        s.acked.unwrap_or_default(),
                        desired.version
                    );
                }
                let url = self.cluster.services.get(name)?.balancer.clone()?;
                let moved_at = self
                    .rollouts
                    .values()
                    .filter(|r| &r.service == name)
                    .map(|r| r.entered_ms)
                    .max()
                    .unwrap_or(0);
                let push = Push {
                    service: name.clone(),
                    url,
                    config: desired.clone(),
                };
                Some((moved_at, push))
            })
            .collect();
        order.sort_by(|a, b| (a.0, &a.1.service).cmp(&(b.0, &b.1.service)));
        order.into_iter().map(|(_, push)| push).collect()
    }

    /// The balancer runs a newer version than the one pushed (a lost database): the desired
    /// config moves past it.
    fn move_past_stale(&mut self, push: &Push) {
        let running = self
            .services
            .get(&push.service)
            .and_then(|s| s.last_stats.as_ref())
            .map_or(0, |st| st.config_version);
        let bumped = BalancerConfig {
            version: running.max(push.config.version) + 1,
            ..push.config.clone()
        };
        if self
            .store
            .write(|tx| store::set_config(tx, &bumped))
            .is_err()
        {
            return;
        }
        if let Some(s) = self.services.get_mut(&push.service) {
            if s.desired.as_ref().map(|d| d.version) == Some(push.config.version) {
                s.desired = Some(bumped);
            }
        }
    }
}

/// What the store keeps of a rollout beside its row: its machines, evidence log and approvals.
struct Kept {
    selection: Option<Selection>,
    evidence_log: Vec<EvidenceSnapshot>,
    approvals: Vec<Approval>,
}

/// Opening: the state rebuilt from the store and the cluster file.
impl State {
    /// Every service of the file, and every machine the store does not know yet with the role
    /// the file gives it.
    /// Everything in memory read again from the store, as at a start: a standby's view, and the
    /// state a new leader takes over.
    fn reload(&mut self, metrics: &Metrics) -> Result<(), ControllerError> {
        self.services.clear();
        self.rollouts.clear();
        self.releases.clear();
        self.roles = self.store.machine_roles()?;
        self.monitor = monitor::MonitorState::default();
        self.monitor.held_out = self.store.read(crate::store::monitor::held_out)?;
        // Counted again from the stored transitions.
        metrics.transitions.reset();
        self.load_services(metrics)?;
        self.load_rollouts(metrics)
    }

    fn declare_machines(&mut self, now: u64) -> Result<(), StoreError> {
        let known = self.store.machine_roles()?;
        let declared = crate::core::plan::declared_roles(&self.cluster);
        let cluster = &self.cluster;
        self.store.write(|tx| {
            for service in cluster.services.values() {
                store::upsert_service(tx, &service.name, &service.declared_version)?;
            }
            for m in cluster
                .machines
                .iter()
                .filter(|m| !known.contains_key(&m.id))
            {
                let role = declared[&m.id];
                let why = "declared in the cluster file";
                store::set_machine_role(tx, &m.id, &m.service, &m.version, role, now, None, why)?;
            }
            Ok(())
        })
    }

    /// The services the file still declares, with their stored version, cursor and config.
    fn load_services(&mut self, metrics: &Metrics) -> Result<(), StoreError> {
        for row in self.store.services()? {
            if !self.cluster.services.contains_key(&row.name) {
                continue;
            }
            metrics.register_service(&row.name);
            let service = ServiceState {
                version: row.version,
                cursor: row.stats_cursor,
                desired: row.config,
                ..ServiceState::default()
            };
            self.services.insert(row.name, service);
        }
        Ok(())
    }

    /// Every release and rollout, finished or not; an unfinished rollout of a service the file
    /// no longer declares is refused.
    fn load_rollouts(&mut self, metrics: &Metrics) -> Result<(), ControllerError> {
        for row in self.store.releases()? {
            let release = ReleaseState {
                id: row.id,
                created_ms: row.created_ms,
                rollback_on_failure: row.rollback_on_failure,
                rollouts: Vec::new(),
                created_by: row.created_by,
            };
            self.releases.insert(row.id, release);
        }
        let mut selections = self.store.read(crate::store::plans::all)?;
        let mut logs = self.store.read(store::approvals::evidence_logs)?;
        let mut approvals = self.store.read(store::approvals::approvals)?;
        for row in self.store.rollouts()? {
            if !row.phase.is_finished() && !self.cluster.services.contains_key(&row.service) {
                return Err(ControllerError::Inconsistent(format!(
                    "rollout {} of service `{}` is unfinished, and the cluster no longer declares `{}`",
                    row.id, row.service, row.service
                )));
            }
            metrics.set_phase(&row.service, row.id, row.phase.name());
            if let Some(release) = self.releases.get_mut(&row.release) {
                release.rollouts.push(row.id);
            }
            let kept = Kept {
                selection: selections.remove(&row.id),
                evidence_log: logs.remove(&row.id).unwrap_or_default(),
                approvals: approvals.remove(&row.id).unwrap_or_default(),
            };
            let rollout = self.restore_rollout(row, kept, metrics)?;
            self.rollouts.insert(rollout.id, rollout);
        }
        Ok(())
    }

    /// A stored rollout back in memory. Replaying the recorded pairs in order rebuilds the display
    /// numbers of every rollout (finished ones are shown too) and the judge of an unfinished one
    /// exactly as it stood.
    fn restore_rollout(
        &self,
        row: store::RolloutRow,
        kept: Kept,
        metrics: &Metrics,
    ) -> Result<RolloutState, StoreError> {
        let condition = self
            .cluster
            .services
            .get(&row.service)
            .map(|s| s.condition.clone())
            .unwrap_or_default();
        let against_control = has_control(&self.cluster, &row.machines_before, &row.from_version);
        let mut feed = PairFeed::new(condition.baseline, against_control);
        let sharing = self.cluster.predict.sharing();
        let mut judge = (!row.phase.is_finished()).then(|| Judge::with_sharing(condition, sharing));
        let mut numbers = PairNumbers::default();
        let mut next_seq = 0;
        let mut series = EvidenceSeries::default();
        for pair in self.store.pairs(row.id)? {
            if let Some(j) = judge.as_mut() {
                feed_judge(j, &mut feed, &mut series, &pair);
            }
            numbers.record(&pair);
            next_seq += 1;
        }
        let transitions = self.store.transitions(row.id)?;
        for t in &transitions {
            metrics
                .transitions
                .with_label_values(&[&row.service, t.from.name(), t.to.name()])
                .inc();
        }
        // A rollout stored before sub-groups moved the whole service as it stood then.
        let selection = kept.selection.unwrap_or_else(|| {
            whole_service_selection(&self.cluster, &row.machines_before, &row.to_version)
        });
        Ok(RolloutState {
            id: row.id,
            release: row.release,
            service: row.service,
            from_version: row.from_version,
            to_version: row.to_version,
            after: row.after,
            phase: row.phase,
            entered_ms: row.entered_ms,
            created_ms: row.created_ms,
            machines_before: row.machines_before,
            selection,
            transitions,
            verdict: row.verdict,
            judge,
            feed,
            numbers,
            next_seq,
            live: LiveCounts::default(),
            copies_seen: 0,
            callers_jobs: 0,
            evidence: None,
            evidence_log: kept.evidence_log,
            series,
            quantiles: Vec::new(),
            fields: None,
            approvals: kept.approvals,
            mirror: None,
        })
        .map(|mut r| {
            r.refresh_evidence(r.entered_ms);
            r
        })
    }
}

impl State {
    /// Commits a new config version for `service` when its config differs from what it should be.
    fn commit_config(&mut self, service: &str) -> Result<(), StoreError> {
        let rollout = self
            .open_rollout(service)
            .map(|r| (r.phase, r.selection.clone()));
        let next = self.next_config(service, &self.roles, rollout.as_ref().map(|(p, s)| (*p, s)));
        if let Some(config) = next {
            self.store.write(|tx| store::set_config(tx, &config))?;
            if let Some(s) = self.services.get_mut(service) {
                s.desired = Some(config);
            }
        }
        Ok(())
    }

    pub(super) fn service(&self, name: &str) -> &Service {
        &self.cluster.services[name]
    }

    /// The service's unfinished rollout.
    pub(super) fn open_rollout(&self, service: &str) -> Option<&RolloutState> {
        self.rollouts
            .values()
            .rev()
            .find(|r| r.service == service && !r.phase.is_finished())
    }

    pub(super) fn release_finished(&self, release: &ReleaseState) -> bool {
        let phases: Vec<Phase> = release
            .rollouts
            .iter()
            .map(|id| self.rollouts[id].phase)
            .collect();
        let all_finished = phases.iter().all(|p| p.is_finished());
        let unwinding = release.rollback_on_failure && phases.iter().any(|p| p.is_failed());
        all_finished && !(unwinding && phases.contains(&Phase::Complete))
    }

    /// Services taking part in an unfinished release.
    pub(super) fn busy_services(&self) -> BTreeSet<String> {
        self.releases
            .values()
            .filter(|r| !self.release_finished(r))
            .flat_map(|r| {
                r.rollouts
                    .iter()
                    .map(|id| self.rollouts[id].service.clone())
            })
            .collect()
    }

    /// What `service`'s balancer should copy with its rollout in `phase`: nothing unless the
    /// rollout is judged; then the service's fixed fraction, or within its budget the choice
    /// steered last (src/core/mirror.rs), else the one the evidence asks for now.
    pub(super) fn mirror_choice(&self, service: &str, phase: Option<Phase>) -> MirrorChoice {
        let spec = self.service(service);
        if !is_judging(phase) {
            return MirrorChoice::not_judging();
        }
        let Some(budget) = &spec.mirror_budget else {
            return MirrorChoice::fixed(spec.mirror_fraction);
        };
        let r = self.open_rollout(service);
        if let Some(choice) = r.and_then(|r| r.mirror.clone()) {
            return choice;
        }
        let judge = JudgeState::of(r.and_then(|r| r.evidence.as_ref()));
        mirror::target(budget, &judge, self.caller_rate(service), 0)
    }

    /// Callers' jobs per second on `service`'s active pool, as last measured.
    fn caller_rate(&self, service: &str) -> Option<f64> {
        self.services.get(service)?.callers.per_second()
    }

    /// A rollout's `mirror` in the API: what its balancer is told to copy, and why.
    fn mirror_view(&self, r: &RolloutState) -> MirrorView {
        let open = (!r.phase.is_finished()).then_some(r.phase);
        let choice = self.mirror_choice(&r.service, open);
        let open_tests = match JudgeState::of(r.evidence.as_ref()) {
            JudgeState::Open { open_tests } if choice.reason != mirror::MirrorReason::Fixed => {
                open_tests
            }
            _ => Vec::new(),
        };
        MirrorView {
            fraction: choice.fraction,
            reason: choice.reason,
            since_ms: choice.since_ms,
            budget: self
                .service(&r.service)
                .mirror_budget
                .as_ref()
                .map(Into::into),
            caller_rate: self.caller_rate(&r.service),
            open_tests,
        }
    }

    /// Records the budget's choice a config was just committed with (the first one is computed
    /// from the evidence then), so the next steer moves from it rather than from nothing.
    fn pin_mirror(&mut self, service: &str, now_ms: u64) {
        if self.service(service).mirror_budget.is_none() {
            return;
        }
        let Some(r) = self
            .open_rollout(service)
            .filter(|r| is_judging(Some(r.phase)))
        else {
            return;
        };
        if r.mirror.is_some() {
            return;
        }
        let (id, phase) = (r.id, r.phase);
        let choice = MirrorChoice {
            since_ms: now_ms,
            ..self.mirror_choice(service, Some(phase))
        };
        if let Some(r) = self.rollouts.get_mut(&id) {
            r.mirror = Some(choice);
        }
    }

    /// Steers the judged rollout's copy rate by its evidence within the service's budget;
    /// true when the service's balancer config should change.
    fn steer_mirror(&mut self, service: &str, now_ms: u64) -> bool {
        let Some(budget) = self.service(service).mirror_budget else {
            return false;
        };
        let rate = self.caller_rate(service);
        let Some(r) = self
            .open_rollout(service)
            .filter(|r| is_judging(Some(r.phase)))
        else {
            return false;
        };
        let judge = JudgeState::of(r.evidence.as_ref());
        let Some(next) = mirror::steer(&budget, &judge, rate, r.mirror.as_ref(), now_ms) else {
            return false;
        };
        let id = r.id;
        tracing::info!(rollout = id, service, fraction = next.fraction, reason = ?next.reason, "mirror fraction steered");
        if let Some(r) = self.rollouts.get_mut(&id) {
            r.mirror = Some(next);
        }
        true
    }

    /// Computes the config for `service` under `roles` and `rollout`; returns it with a new version
    /// when it differs from the committed one.
    pub(super) fn next_config(
        &self,
        service: &str,
        roles: &BTreeMap<String, MachineRole>,
        rollout: Option<(Phase, &Selection)>,
    ) -> Option<BalancerConfig> {
        let spec = self.service(service);
        let held_out: BTreeSet<String> = self.monitor.held_out.keys().cloned().collect();
        let machines = desired_machines(&self.cluster, spec, roles, rollout, &held_out);
        let current = self.services.get(service).and_then(|s| s.desired.as_ref());
        let candidate = BalancerConfig {
            service: service.to_string(),
            version: current.map_or(1, |c| c.version + 1),
            // Stamped with the controller's fencing epoch when pushed.
            epoch: 0,
            mirror_fraction: self
                .mirror_choice(service, rollout.map(|(p, _)| p))
                .fraction,
            compare_body: spec.compare.wire_form().0,
            compare: spec.compare.wire_form().1,
            compare_headers: spec.compare_headers.clone(),
            drain_timeout_ms: spec.drain_timeout.as_millis() as u64,
            machines,
        };
        match current {
            Some(c)
                if BalancerConfig {
                    version: c.version,
                    ..candidate.clone()
                } == *c =>
            {
                None
            }
            _ => Some(candidate),
        }
    }
}

impl Core {
    /// (nats: signed configs) Gives `service`'s balancer a fresh key, sent in a message signed
    /// with its current key; the controller signs with the new key from then on.
    pub async fn rotate_balancer_key(
        &self,
        service: &str,
    ) -> Result<understudy_wire::KeyRotationAck, RequestError> {
        let url = {
            let state = lock(&self.state);
            let s = state
                .cluster
                .services
                .get(service)
                .ok_or_else(|| RequestError::NotFound(format!("no service `{service}`")))?;
            s.balancer
                .clone()
                .ok_or_else(|| RequestError::Conflict(format!("`{service}` has no balancer URL")))?
        };
        let new_key = understudy_hub::SecretKey::generate();
        let ack = self.client.rotate_key(&url, service, new_key.clone()).await;
        if ack.is_ok() {
            // Its hub subscription is signed with the same key.
            let sender = understudy_hub::http::balancer_subscriber(service);
            let grace = self.hub().settings().rotation_grace;
            self.hub().rotate_key(&sender, new_key, grace);
        }
        ack.map_err(|e| match e {
            BalancerError::Refused { .. }
            | BalancerError::Stale { .. }
            | BalancerError::Fenced { .. } => RequestError::Conflict(e.to_string()),
            BalancerError::Unreachable { .. }
            | BalancerError::Protocol { .. }
            | BalancerError::Cursor { .. } => RequestError::Internal(e.to_string()),
        })
    }

    /// Opens the store, records the cluster's services and machines it does not know yet, and
    /// reads back every rollout where it stood.
    pub fn open(
        cluster: Cluster,
        store: Store,
        client: Arc<dyn BalancerClient>,
        operators: Operators,
    ) -> Result<Core, ControllerError> {
        let hub = crate::runtime::hub::ControllerHub::embedded(
            &cluster.hub,
            &store,
            Clock::new().now_ms(),
        )?;
        Self::open_with_hub(cluster, store, client, operators, hub)
    }

    /// [`Core::open`] with a hub built by the caller (e.g. connected to NATS): a controller alone
    /// on its store, leading from the start with the store's next epoch.
    pub fn open_with_hub(
        cluster: Cluster,
        store: Store,
        client: Arc<dyn BalancerClient>,
        operators: Operators,
        hub: crate::runtime::hub::ControllerHub,
    ) -> Result<Core, ControllerError> {
        let core = Core::load(cluster, store, client, operators, hub)?;
        let epoch = lock(&core.state).store.take_epoch()?;
        core.lead(epoch)?;
        Ok(core)
    }

    /// The controller over what its store holds, not leading yet: it answers reads, writes
    /// nothing and pushes nothing until [`Core::lead`].
    pub fn load(
        cluster: Cluster,
        store: Store,
        client: Arc<dyn BalancerClient>,
        operators: Operators,
        hub: crate::runtime::hub::ControllerHub,
    ) -> Result<Core, ControllerError> {
        let clock = Clock::new();
        let metrics = Metrics::new()?;
        let mut store = store;
        store.set_fence(crate::store::Fence::ReadOnly);
        let mut state = State {
            cluster,
            store,
            services: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            releases: BTreeMap::new(),
            roles: BTreeMap::new(),
            monitor: monitor::MonitorState::default(),
        };
        state.reload(&metrics)?;
        let predictions = Arc::new(crate::runtime::predictions::Predictions::new(
            state.cluster.predict.clone(),
            clock,
        )?);
        let notifier = crate::runtime::notify::Notifier::start(&state.cluster.notify);
        Ok(Core {
            state: Mutex::new(state),
            client,
            metrics,
            clock,
            leadership: leadership::Leadership::default(),
            operators,
            wake: Notify::new(),
            hub,
            predictions,
            notifier,
        })
    }

    pub fn operators(&self) -> &Operators {
        &self.operators
    }

    /// Replaces who may act (a test swaps in operators files).
    #[cfg(test)]
    pub(crate) fn set_operators(&mut self, operators: Operators) {
        self.operators = operators;
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Asks the reconcile loop to run now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when [`Core::wake`] is called (the reconcile loop ticks early).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Runs `f` on the store, the machines' roles and the cluster under the state lock (the
    /// machine registry shares the controller's database).
    pub(crate) fn with_store<T>(
        &self,
        f: impl FnOnce(&mut Store, &BTreeMap<String, MachineRole>, &Cluster) -> T,
    ) -> T {
        let mut state = lock(&self.state);
        let state = &mut *state;
        f(&mut state.store, &state.roles, &state.cluster)
    }

    /// Commits a new config version for every service whose config differs from what it should be.
    fn commit_configs(&self) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let names: Vec<String> = state.cluster.services.keys().cloned().collect();
        for name in names {
            state.commit_config(&name)?;
        }
        Ok(())
    }

    /// Performs one transition: decided by [`transition`], committed with its consequences (machine
    /// roles, service version, balancer config), then applied to memory. The push follows later.
    fn apply(
        &self,
        state: &mut State,
        rollout_id: i64,
        event: Event,
        cause: &str,
        operator: Option<&str>,
        details: serde_json::Value,
    ) -> Result<Phase, ApplyError> {
        let actor = if operator.is_some() {
            Actor::Ops
        } else {
            Actor::Controller
        };
        let now = self.clock.now_ms();
        let r = state
            .rollouts
            .get(&rollout_id)
            .ok_or(ApplyError::NotFound(rollout_id))?;
        let service = r.service.clone();
        let policy = state.service(&service).policy.clone();
        let from = r.phase;
        let to = transition(from, event, &policy)?;

        let mut roles = state.roles.clone();
        let moved = RolloutMachines {
            selection: &r.selection,
            before: &r.machines_before,
            from_version: &r.from_version,
            to_version: &r.to_version,
        };
        let Consequences {
            role_changes,
            new_version,
        } = consequences(&state.cluster, &service, &roles, &moved, from, to);
        for change in &role_changes {
            roles.insert(change.machine.clone(), change.role);
        }
        let selection = r.selection.clone();
        let open_after = (!to.is_finished()).then_some((to, &selection));
        let config = state.next_config(&service, &roles, open_after);
        let record = TransitionRecord {
            at_ms: now,
            from,
            to,
            cause: cause.to_string(),
            actor,
            details,
            operator: operator.map(str::to_string),
        };
        state.commit_move(
            rollout_id,
            &record,
            &role_changes,
            new_version.as_deref(),
            config.as_ref(),
        )?;

        // Committed: now memory follows.
        state.roles = roles;
        let s = state.services.entry(service.clone()).or_default();
        if let Some(v) = new_version {
            s.version = v;
        }
        if let Some(c) = config {
            s.desired = Some(c);
        }
        if let Some(r) = state.rollouts.get_mut(&rollout_id) {
            r.enter(record);
        }
        state.pin_mirror(&service, now);
        if to == Phase::AwaitingApproval {
            self.log_evidence(state, rollout_id);
        }
        self.count_transition(&service, rollout_id, from, to);
        self.notify_transition(state, rollout_id);
        tracing::info!(rollout = rollout_id, %service, %from, %to, cause, actor = actor.as_str(), "transition");
        Ok(to)
    }

    /// Tells the webhooks of the transition a rollout just entered (src/runtime/notify.rs): only
    /// queued, so a slow webhook never holds the state lock.
    fn notify_transition(&self, state: &State, rollout_id: i64) {
        let Some(r) = state.rollouts.get(&rollout_id) else {
            return;
        };
        let Some(record) = r.transitions.last() else {
            return;
        };
        self.notifier
            .phase_changed(crate::runtime::notify::PhaseChange {
                rollout: r.id,
                release: r.release,
                service: r.service.clone(),
                from: record.from.to_string(),
                to: record.to.to_string(),
                cause: record.cause.clone(),
                actor: record.actor.as_str().to_string(),
                operator: record.operator.clone(),
                at_ms: record.at_ms,
            });
    }

    /// A transition on `/metrics`: the phase gauge, the counter, and a starved judge no longer so
    /// once the rollout leaves simulation.
    fn count_transition(&self, service: &str, rollout: i64, from: Phase, to: Phase) {
        self.metrics.set_phase(service, rollout, to.name());
        if to != Phase::Simulating {
            let labels = [service, &rollout.to_string()];
            if let Ok(gauge) = self
                .metrics
                .judge_starved
                .get_metric_with_label_values(&labels)
            {
                gauge.set(0);
            }
        }
        self.metrics
            .transitions
            .with_label_values(&[service, from.name(), to.name()])
            .inc();
    }

    /// Moves every release forward as far as it can go now: dependencies, timers, unwinding.
    fn advance(&self, state: &mut State) {
        // Each pass may enable more moves (a chain unwinding); the bound is the number of rollouts.
        for _ in 0..=state.rollouts.len() {
            if !self.advance_once(state) {
                break;
            }
        }
    }

    fn advance_once(&self, state: &mut State) -> bool {
        let now = self.clock.now_ms();
        let moves = step::step(&snapshot(state), now);
        let mut moved = false;
        for step::Move {
            rollout: id,
            event,
            cause,
        } in moves
        {
            // A move computed above may no longer apply after an earlier one in this pass.
            match self.apply(state, id, event, &cause, None, serde_json::json!({})) {
                Ok(_) => moved = true,
                Err(ApplyError::Transition(e)) => tracing::debug!(rollout = id, "skipped: {e}"),
                Err(e) => {
                    tracing::error!(rollout = id, "transition not committed: {e}");
                    return false;
                }
            }
        }
        moved
    }

    /// Takes in one stats report: records the pairs of the service's simulating rollout, advances
    /// the cursor, feeds the judge, and moves the rollout when the judge decided.
    fn take_stats(&self, state: &mut State, report: StatsReport) -> Result<(), ApplyError> {
        let service = report.service.clone();
        let simulating = Simulating::of(state, &service);
        let pairs = simulating
            .as_ref()
            .map_or_else(Vec::new, |s| s.pairs_of(&report.pairs));
        let judgement = match &simulating {
            Some(s) => self.judge_pairs(state, s, &pairs, &report.pairs),
            None => Judgement::default(),
        };
        self.commit_stats(
            state,
            &service,
            simulating.as_ref(),
            &pairs,
            &judgement,
            report.cursor,
        )?;
        if let Some(s) = &simulating {
            self.keep_judged(state, s.id, &pairs, &judgement);
            self.log_evidence(state, s.id);
            if let Some(r) = state.rollouts.get_mut(&s.id) {
                r.callers_jobs += active_jobs(&report.series);
            }
        }
        let guard = self.live_guard(state, &report.series, &service);
        let steered = self.measure_mirror(state, &report);
        self.keep_stats_view(state, &service, report);
        let judged = simulating
            .zip(judgement.decided)
            .map(|(s, verdict)| Move::of_verdict(s.id, &verdict, &judgement.shown));
        for ask in judged.into_iter().chain(guard) {
            self.apply(state, ask.rollout, ask.event, &ask.cause, None, ask.details)?;
        }
        if steered {
            // A move above may already have committed the steered fraction: then nothing differs.
            state.commit_config(&service)?;
        }
        Ok(())
    }

    /// The report's copies counted and its callers' jobs measured; the service's copy rate
    /// steered by the evidence when it has a mirror budget (true: its config should change).
    fn measure_mirror(&self, state: &mut State, report: &StatsReport) -> bool {
        let now = self.clock.now_ms();
        let service = report.service.as_str();
        self.metrics
            .mirror_copies
            .with_label_values(&[service])
            .inc_by(report.pairs.len() as f64);
        if let Some(s) = state.services.get_mut(service) {
            s.callers.record(now, active_jobs(&report.series));
        }
        state.steer_mirror(service, now)
    }

    /// Feeds the report's pairs to the simulating rollout's judge, then the early signal
    /// (src/runtime/predictions.rs) when the judge has not decided.
    fn judge_pairs(
        &self,
        state: &mut State,
        s: &Simulating,
        pairs: &[StoredPair],
        copies: &[JobPair],
    ) -> Judgement {
        let mut judgement = Judgement::default();
        let now = self.clock.now_ms();
        if let Some(r) = state.rollouts.get_mut(&s.id) {
            for p in pairs {
                r.feed(p);
            }
            let answered = copies.iter().filter(|p| p.simulation.version == s.to);
            self.count_copies(r, answered.count() as u64);
            r.refresh_evidence(now);
            if let Some(judge) = r.judge.as_ref() {
                if !pairs.is_empty() || r.verdict.is_none() {
                    let mut numbers = r.numbers.clone();
                    for p in pairs {
                        numbers.record(p);
                    }
                    // The live verdict: while v2 awaits approval the pass's numbers move on.
                    let verdict = judge.live_verdict();
                    judgement.shown = Some(RolloutVerdict::of(&verdict, &numbers, &r.feed));
                    judgement.decided = moves_rollout(s.phase, verdict.decision).then_some(verdict);
                }
            }
        }
        if judgement.decided.is_none() {
            let judged = judgement
                .shown
                .clone()
                .or_else(|| state.rollouts.get(&s.id).and_then(|r| r.verdict.clone()));
            let condition = (state.cluster.services.get(&s.service))
                .map(|service| service.condition.clone())
                .unwrap_or_default();
            let early = self.predictions.early_fail(
                s.id,
                &s.service,
                &s.from,
                &s.to,
                &condition,
                judged.as_ref(),
            );
            if let Some(early) = early {
                judgement.shown = Some(early.shown);
                judgement.decided = Some(early.verdict);
            }
        }
        judgement
    }

    /// Writes the pairs, the verdict and the cursor in one transaction. On failure the judge goes
    /// back to what was committed: the same pairs come again on the next read.
    fn commit_stats(
        &self,
        state: &mut State,
        service: &str,
        simulating: Option<&Simulating>,
        pairs: &[StoredPair],
        judgement: &Judgement,
        cursor: u64,
    ) -> Result<(), ApplyError> {
        let unchanged = state.services.get(service).map(|s| s.cursor) == Some(cursor);
        // An idle balancer's report changes nothing worth a write.
        if unchanged && pairs.is_empty() && judgement.shown.is_none() {
            return Ok(());
        }
        let written = state.store.write(|tx| {
            if let Some(s) = simulating {
                store::insert_pairs(tx, s.id, s.next_seq, pairs)?;
                if let Some(v) = &judgement.shown {
                    store::set_verdict(tx, s.id, v)?;
                }
            }
            store::set_cursor(tx, service, cursor)
        });
        if let Err(e) = written {
            if let Some(s) = simulating {
                Self::rebuild_judge(state, s.id);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// The committed pairs and verdict in the rollout's memory, and on `/metrics`.
    fn keep_judged(&self, state: &mut State, id: i64, pairs: &[StoredPair], judgement: &Judgement) {
        if let Some(r) = state.rollouts.get_mut(&id) {
            for p in pairs {
                r.numbers.record(p);
            }
            r.next_seq += pairs.len() as u64;
            self.metrics.field_differences.count(&r.service, pairs);
            if let Some(v) = judgement.shown.clone() {
                r.verdict = Some(v);
            }
            self.publish_verdict(r);
        }
    }

    /// The report as the listing shows it, logging each machine's change of health.
    fn keep_stats_view(&self, state: &mut State, service: &str, report: StatsReport) {
        let now = self.clock.now_ms();
        let Some(s) = state.services.get_mut(service) else {
            return;
        };
        let before = s.last_stats.as_ref().map(|st| st.machines.as_slice());
        for change in crate::runtime::machines::health_changes(before, &report.machines) {
            change.log(service, &state.cluster);
        }
        s.cursor = report.cursor;
        s.stats_reads += 1;
        s.last_stats = Some(StatsView {
            at_ms: now,
            config_version: report.config_version,
            cursor: report.cursor,
            machines: report.machines,
            pairs_lost: report.pairs_lost,
            mirror_dropped: report.mirror_dropped,
        });
        s.last_stats_error = None;
    }

    /// Counts v2's answered copies and shows a starved judge (log, `/metrics`) when it becomes so.
    fn count_copies(&self, r: &mut RolloutState, copies: u64) {
        let was = starved(r).is_some();
        r.copies_seen += copies;
        let problem = starved(r);
        if let (false, Some(problem)) = (was, &problem) {
            tracing::warn!(rollout = r.id, service = %r.service, "{problem}");
        }
        self.metrics
            .judge_starved
            .with_label_values(&[&r.service, &r.id.to_string()])
            .set(i64::from(problem.is_some()));
    }

    /// Replays a rollout's committed pairs into a fresh judge.
    fn rebuild_judge(state: &mut State, id: i64) {
        let Some(r) = state.rollouts.get(&id) else {
            return;
        };
        let condition = state
            .cluster
            .services
            .get(&r.service)
            .map(|s| s.condition.clone())
            .unwrap_or_default();
        let mut feed = PairFeed::new(
            condition.baseline,
            has_control(&state.cluster, &r.machines_before, &r.from_version),
        );
        match state.store.pairs(id) {
            Ok(pairs) => {
                let mut judge = Judge::with_sharing(condition, state.cluster.predict.sharing());
                let mut series = EvidenceSeries::default();
                for pair in &pairs {
                    feed_judge(&mut judge, &mut feed, &mut series, pair);
                }
                if let Some(r) = state.rollouts.get_mut(&id) {
                    r.judge = Some(judge);
                    r.feed = feed;
                    r.series = series;
                }
            }
            Err(e) => tracing::error!(rollout = id, "judge not rebuilt: {e}"),
        }
    }

    /// While v2 serves callers (joining, retiring), counts callers' outcomes per version; a v2
    /// whose error rate exceeds v1's by the condition's hard margin is pulled (the judge decided
    /// on mirrored copies; this catches what only real traffic shows).
    fn live_guard(&self, state: &mut State, series: &[SeriesStats], service: &str) -> Option<Move> {
        let condition = state.cluster.services.get(service)?.condition.clone();
        let id = state
            .open_rollout(service)
            .filter(|r| matches!(r.phase, Phase::Joining { .. } | Phase::Retiring))?
            .id;
        let r = state.rollouts.get_mut(&id)?;
        for s in series.iter().filter(|s| s.config == PoolRole::Active) {
            let (total, ok) = (series_jobs(s), s.outcomes.ok);
            if s.version == r.to_version {
                r.live.v2_jobs += total;
                r.live.v2_errors += total - ok;
            } else if s.version == r.from_version {
                r.live.v1_jobs += total;
                r.live.v1_errors += total - ok;
            }
        }
        let (v1, v2) = r.live.excess_error_rate(condition.min_jobs)?;
        if v2 - v1 <= condition.hard_error_rate_increase {
            return None;
        }
        let cause = format!(
            "live guard: callers saw {:.2}% errors on {} against {:.2}% on {} (hard margin {:.2} points)",
            v2 * 100.0,
            r.to_version,
            v1 * 100.0,
            r.from_version,
            condition.hard_error_rate_increase * 100.0
        );
        Some(Move {
            rollout: id,
            event: Event::Rollback,
            cause,
            details: serde_json::to_value(r.live).unwrap_or_default(),
        })
    }

    fn publish_verdict(&self, r: &RolloutState) {
        let id = r.id.to_string();
        let labels = |version: &str, config: &str, q: &str| {
            [
                r.service.clone(),
                id.clone(),
                version.to_string(),
                config.to_string(),
                q.to_string(),
            ]
        };
        for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            let l = labels(&r.from_version, "active", name);
            self.metrics
                .verdict_latency
                .with_label_values(&l.each_ref().map(String::as_str))
                .set(r.numbers.quantile_seconds(false, q));
            let l = labels(&r.to_version, "simulation", name);
            self.metrics
                .verdict_latency
                .with_label_values(&l.each_ref().map(String::as_str))
                .set(r.numbers.quantile_seconds(true, q));
        }
        self.metrics
            .verdict_error_ratio
            .with_label_values(&[&r.service, &id, &r.from_version, "active"])
            .set(r.numbers.error_rate(false));
        self.metrics
            .verdict_error_ratio
            .with_label_values(&[&r.service, &id, &r.to_version, "simulation"])
            .set(r.numbers.error_rate(true));
        self.metrics
            .verdict_jobs
            .with_label_values(&[&r.service, &id])
            .set(r.numbers.jobs as i64);
        self.metrics
            .verdict_mismatch_ratio
            .with_label_values(&[&r.service, &id])
            .set(r.numbers.mismatch_rate());
        let decision = r
            .verdict
            .as_ref()
            .map_or(Decision::NotEnoughData, |v| v.decision)
            .as_str();
        for name in ["pass", "fail", "not_enough_data"] {
            self.metrics
                .verdict_decision
                .with_label_values(&[&r.service, &id, name])
                .set(i64::from(name == decision));
        }
    }

    /// One reconcile round: read stats, move rollouts, push what changed.
    pub async fn tick(&self) {
        self.predictions.tick();
        if !self.is_leading() {
            return;
        }
        let reads = lock(&self.state).stats_reads();
        let mut replies = tokio::task::JoinSet::new();
        for read in reads {
            let client = self.client.clone();
            replies.spawn(async move {
                let result = client.stats(&read.url, &read.service, read.cursor).await;
                (read, result)
            });
        }
        let mut reports = Vec::new();
        while let Some(joined) = replies.join_next().await {
            if let Ok(r) = joined {
                reports.push(r);
            }
        }
        reports.sort_by(|a, b| a.0.service.cmp(&b.0.service));
        let monitor_outbox = {
            let mut state = lock(&self.state);
            for (read, result) in reports {
                self.take_reply(&mut state, read, result);
            }
            self.advance(&mut state);
            self.monitor_tick(&mut state)
        };
        self.monitor_publish(monitor_outbox).await;
        self.push_pending().await;
    }

    /// A balancer's answer to a stats read, taken in or counted as a failure.
    fn take_reply(
        &self,
        state: &mut State,
        read: StatsRead,
        result: Result<StatsReport, BalancerError>,
    ) {
        let service = read.service;
        match result {
            Ok(report) => {
                // A read based on a cursor that moved meanwhile would count pairs twice.
                if state.services.get(&service).map(|s| s.cursor) != Some(read.cursor) {
                    return;
                }
                if report.service != service {
                    tracing::warn!(%service, other = %report.service, "stats of another service ignored");
                    return;
                }
                if let Err(e) = self.take_stats(state, report) {
                    tracing::error!(%service, "stats not recorded: {e}");
                }
            }
            Err(e) => self.stats_failed(state, &service, read.cursor, e),
        }
    }

    /// A stats read failed. A cursor the balancer cannot serve is replaced by one it can (the
    /// oldest window it keeps, or 0 after its restart), persisted, logged and counted, so the
    /// rollout goes on judging instead of waiting for reads that can never succeed.
    fn stats_failed(&self, state: &mut State, service: &str, cursor: u64, error: BalancerError) {
        self.metrics
            .stats_failures
            .with_label_values(&[service])
            .inc();
        let mut message = error.to_string();
        if let BalancerError::Cursor { problem, .. } = &error {
            let next = problem.restart_at();
            match state.store.write(|tx| store::set_cursor(tx, service, next)) {
                Ok(()) => {
                    tracing::warn!(
                        service,
                        from = cursor,
                        to = next,
                        "stats cursor reset ({}): reading again from cursor {next}",
                        problem.as_str()
                    );
                    self.metrics
                        .cursor_resets
                        .with_label_values(&[service, problem.as_str()])
                        .inc();
                    if let Some(s) = state.services.get_mut(service) {
                        s.cursor = next;
                    }
                    message = format!("{message}; cursor reset from {cursor} to {next}");
                }
                Err(e) => message = format!("{message}; cursor not reset: {e}"),
            }
        }
        if let Some(s) = state.services.get_mut(service) {
            s.last_stats_error = Some(message);
        }
    }

    /// Pushes every committed config the balancer has not acknowledged, in release order.
    async fn push_pending(&self) {
        let pushes = lock(&self.state).pending_pushes();
        for push in pushes {
            let started = std::time::Instant::now();
            if !self.is_leading() {
                return;
            }
            let sent = BalancerConfig {
                epoch: self.epoch(),
                ..push.config.clone()
            };
            let result = self.client.push(&push.url, &sent).await;
            self.metrics
                .push_seconds
                .with_label_values(&[&push.service])
                .observe(started.elapsed().as_secs_f64());
            let mut state = lock(&self.state);
            let now = self.clock.now_ms();
            let failure = match result {
                Ok(ack) if ack.version == push.config.version => {
                    self.metrics
                        .mirror_fraction
                        .with_label_values(&[&push.service])
                        .set(push.config.mirror_fraction);
                    if let Some(s) = state.services.get_mut(&push.service) {
                        s.acked = Some(ack.version);
                        s.reads_at_ack = s.stats_reads;
                        s.last_push_error = None;
                        s.last_push_ms = Some(now);
                    }
                    continue;
                }
                Ok(ack) => format!(
                    "acknowledged version {} instead of {}",
                    ack.version, push.config.version
                ),
                Err(e) => {
                    match e {
                        BalancerError::Stale { .. } => state.move_past_stale(&push),
                        BalancerError::Fenced { .. } => {
                            let labels = [push.service.as_str()];
                            self.metrics.fenced.with_label_values(&labels).inc();
                        }
                        _ => {}
                    }
                    // Retried every tick: log when the failure starts or changes, not each time.
                    let message = e.to_string();
                    let last = state.services.get(&push.service);
                    if last.and_then(|s| s.last_push_error.as_deref()) != Some(message.as_str()) {
                        tracing::warn!(service = %push.service, "push of config {} failed: {message}", push.config.version);
                    }
                    message
                }
            };
            self.metrics
                .push_failures
                .with_label_values(&[&push.service])
                .inc();
            if let Some(s) = state.services.get_mut(&push.service) {
                s.last_push_error = Some(failure);
            }
        }
    }

    // ---- admin operations ----

    /// Starts a release (or shows its plan), as `operator` asks.
    pub fn release(
        &self,
        request: &ReleaseRequest,
        operator: &str,
    ) -> Result<ReleaseAnswer, RequestError> {
        let mut state = lock(&self.state);
        let current: BTreeMap<String, String> = state
            .services
            .iter()
            .map(|(k, v)| (k.clone(), v.version.clone()))
            .collect();
        let lines = plan_release(
            &state.cluster,
            &state.roles,
            &current,
            &state.busy_services(),
            &request.services,
            &request.subgroup,
        )
        .map_err(|refusal| match refusal {
            Refusal::Bad(message) => RequestError::BadRequest(message),
            Refusal::Conflict(message) => RequestError::Conflict(message),
        })?;
        if request.dry_run {
            return Ok(ReleaseAnswer {
                release: None,
                dry_run: true,
                plan: lines,
                rollouts: Vec::new(),
            });
        }
        let now = self.clock.now_ms();
        let (release_id, ids) = Self::store_release(&mut state, request, &lines, now, operator)?;
        for (line, id) in lines.iter().zip(&ids) {
            let rollout = Self::new_rollout(&state, line, *id, release_id, now);
            state.rollouts.insert(*id, rollout);
            self.metrics.set_phase(&line.service, *id, "pending");
        }
        state.releases.insert(
            release_id,
            ReleaseState {
                id: release_id,
                created_ms: now,
                rollback_on_failure: request.rollback_on_failure,
                rollouts: ids.clone(),
                created_by: Some(operator.to_string()),
            },
        );
        let rollouts = ids
            .iter()
            .map(|id| view(&state, &state.rollouts[id]))
            .collect();
        drop(state);
        self.wake();
        tracing::info!(release = release_id, operator, "release started");
        Ok(ReleaseAnswer {
            release: Some(release_id),
            dry_run: false,
            plan: lines,
            rollouts,
        })
    }

    /// The release, its rollouts (each with the roles its machines had) and their selections, in
    /// one transaction.
    fn store_release(
        state: &mut State,
        request: &ReleaseRequest,
        lines: &[PlanLine],
        now: u64,
        operator: &str,
    ) -> Result<(i64, Vec<i64>), StoreError> {
        let befores: Vec<_> = lines
            .iter()
            .map(|line| roles_before(state, &line.service))
            .collect();
        state.store.write(|tx| {
            let release =
                store::insert_release(tx, now, request.rollback_on_failure, Some(operator))?;
            let mut ids = Vec::new();
            for (line, before) in lines.iter().zip(&befores) {
                let id = store::insert_rollout(
                    tx,
                    release,
                    &line.service,
                    &line.from_version,
                    &line.to_version,
                    &line.after,
                    now,
                    before,
                )?;
                crate::store::plans::insert(tx, id, &line.machines)?;
                ids.push(id);
            }
            Ok((release, ids))
        })
    }

    /// A rollout as it starts: pending, with a fresh judge of its service's condition.
    fn new_rollout(
        state: &State,
        line: &PlanLine,
        id: i64,
        release: i64,
        now: u64,
    ) -> RolloutState {
        let condition = state.service(&line.service).condition.clone();
        let before = roles_before(state, &line.service);
        let feed = PairFeed::new(
            condition.baseline,
            has_control(&state.cluster, &before, &line.from_version),
        );
        RolloutState {
            id,
            release,
            service: line.service.clone(),
            from_version: line.from_version.clone(),
            to_version: line.to_version.clone(),
            after: line.after.clone(),
            phase: Phase::Pending,
            entered_ms: now,
            created_ms: now,
            machines_before: before,
            selection: line.machines.clone(),
            transitions: Vec::new(),
            verdict: None,
            feed,
            judge: Some(Judge::with_sharing(
                condition,
                state.cluster.predict.sharing(),
            )),
            numbers: PairNumbers::default(),
            next_seq: 0,
            live: LiveCounts::default(),
            copies_seen: 0,
            callers_jobs: 0,
            evidence: None,
            evidence_log: Vec::new(),
            series: EvidenceSeries::default(),
            quantiles: Vec::new(),
            fields: None,
            approvals: Vec::new(),
            mirror: None,
        }
    }

    /// An operator's action on a rollout: approve (bound to the evidence it names), abort or
    /// rollback.
    pub fn act(
        &self,
        rollout: i64,
        request: &OpsRequest<'_>,
    ) -> Result<RolloutDetail, RequestError> {
        let mut state = lock(&self.state);
        let r = state
            .rollouts
            .get(&rollout)
            .ok_or_else(|| RequestError::NotFound(format!("no rollout {rollout}")))?;
        if request.action == OpsAction::Rollback && r.phase == Phase::Complete {
            let newest = state
                .rollouts
                .values()
                .rev()
                .find(|o| o.service == r.service)
                .map(|o| o.id);
            if newest != Some(rollout) {
                return Err(RequestError::Conflict(format!(
                    "rollout {rollout} was followed by a newer rollout of {}",
                    r.service
                )));
            }
        }
        let operator = request.operator;
        let (event, cause) = match request.action {
            OpsAction::Approve => match self.approve(&mut state, rollout, request)? {
                Some(cause) => (Event::Approve, cause),
                // Recorded; it waits for another operator.
                None => return Ok(detail(&state, &state.rollouts[&rollout], self.now_ms())),
            },
            OpsAction::Abort => (Event::Abort, format!("aborted by {operator}")),
            OpsAction::Rollback => (Event::Rollback, format!("rolled back by {operator}")),
        };
        let details = serde_json::json!({});
        match self.apply(&mut state, rollout, event, &cause, Some(operator), details) {
            Ok(_) => {}
            Err(ApplyError::Transition(e)) => {
                return Err(RequestError::Conflict(format!(
                    "rollout {rollout} is {}: cannot {}",
                    e.from,
                    request.action.as_str()
                )))
            }
            Err(ApplyError::NotFound(_)) => {
                return Err(RequestError::NotFound(format!("no rollout {rollout}")))
            }
            Err(ApplyError::Store(e)) => return Err(e.into()),
        }
        self.advance(&mut state);
        let detail = detail(&state, &state.rollouts[&rollout], self.now_ms());
        drop(state);
        self.wake();
        Ok(detail)
    }

    // ---- reads ----

    pub fn rollouts(&self) -> Vec<RolloutView> {
        let state = lock(&self.state);
        state.rollouts.values().map(|r| view(&state, r)).collect()
    }

    pub fn releases(&self) -> Vec<ReleaseView> {
        let state = lock(&self.state);
        state
            .releases
            .values()
            .map(|r| ReleaseView {
                id: r.id,
                created_ms: r.created_ms,
                rollback_on_failure: r.rollback_on_failure,
                finished: state.release_finished(r),
                rollouts: r.rollouts.clone(),
                created_by: r.created_by.clone(),
            })
            .collect()
    }

    pub fn rollout(&self, id: i64) -> Option<RolloutDetail> {
        let state = lock(&self.state);
        let now = self.now_ms();
        state.rollouts.get(&id).map(|r| detail(&state, r, now))
    }

    pub fn services(&self) -> Vec<ServiceView> {
        let state = lock(&self.state);
        state
            .cluster
            .services
            .values()
            .map(|s| {
                let open = state.open_rollout(&s.name);
                ServiceView {
                    name: s.name.clone(),
                    version: state
                        .services
                        .get(&s.name)
                        .map(|x| x.version.clone())
                        .unwrap_or_default(),
                    depends_on: s.depends_on.clone(),
                    versions: state.cluster.versions_of(&s.name).into_iter().collect(),
                    requires_approval: s.policy.requires_approval,
                    balancer: s.balancer.clone(),
                    rollout: open.map(|r| r.id),
                    phase: open.map(|r| r.phase.name().to_string()),
                }
            })
            .collect()
    }

    pub fn machines(&self) -> Result<Vec<MachineView>, RequestError> {
        let state = lock(&self.state);
        let mut out = Vec::new();
        for m in &state.cluster.machines {
            let config = state
                .services
                .get(&m.service)
                .and_then(|s| s.desired.as_ref())
                .and_then(|c| c.machines.iter().find(|e| e.id == m.id))
                .map(|e| e.config);
            let history = state
                .store
                .machine_history(&m.id)?
                .into_iter()
                .map(|h| serde_json::to_value(h).unwrap_or_default())
                .collect();
            let seen = state
                .services
                .get(&m.service)
                .and_then(|s| s.last_stats.as_ref())
                .and_then(|st| st.machines.iter().find(|b| b.id == m.id));
            out.push(MachineView {
                health: seen.map(|b| b.health),
                health_reason: seen.and_then(|b| b.health_reason.clone()),
                id: m.id.clone(),
                service: m.service.clone(),
                version: m.version.clone(),
                address: m.address.clone(),
                weight: m.weight,
                role: state
                    .roles
                    .get(&m.id)
                    .copied()
                    .unwrap_or(MachineRole::Retired),
                config,
                history,
            });
        }
        Ok(out)
    }

    pub fn balancers(&self) -> Vec<BalancerView> {
        let state = lock(&self.state);
        state
            .cluster
            .services
            .values()
            .map(|svc| {
                let s = state.services.get(&svc.name);
                let desired = s.and_then(|s| s.desired.as_ref());
                BalancerView {
                    service: svc.name.clone(),
                    url: svc.balancer.clone(),
                    desired_version: desired.map(|c| c.version),
                    acked_version: s.and_then(|s| s.acked),
                    in_sync: desired.map(|c| c.version) == s.and_then(|s| s.acked)
                        && !s.is_some_and(ServiceState::lost_config),
                    last_push_ms: s.and_then(|s| s.last_push_ms),
                    last_push_error: s.and_then(|s| s.last_push_error.clone()),
                    cursor: s.map_or(0, |s| s.cursor),
                    last_stats: s
                        .and_then(|s| s.last_stats.as_ref())
                        .map(|st| serde_json::to_value(st).unwrap_or_default()),
                    last_stats_error: s.and_then(|s| s.last_stats_error.clone()),
                    config: desired.cloned(),
                }
            })
            .collect()
    }

    /// The rollout's recorded v1/v2 pairs (or its A/A control pairs) as CSV, in arrival order.
    pub fn pairs_csv(&self, id: i64, control: bool) -> Result<String, RequestError> {
        let state = lock(&self.state);
        if !state.rollouts.contains_key(&id) {
            return Err(RequestError::NotFound(format!("no rollout {id}")));
        }
        let pairs = state.store.pairs(id)?;
        let mut out = String::from("v1_latency_us,v1_ok,v2_latency_us,v2_ok,match\n");
        for p in pairs.iter().filter(|p| p.control == control) {
            let s = &p.sample;
            let matched = match s.matched {
                Some(m) => u8::from(m).to_string(),
                None => String::new(),
            };
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                s.v1_latency_us,
                u8::from(s.v1_ok),
                s.v2_latency_us,
                u8::from(s.v2_ok),
                matched
            ));
        }
        Ok(out)
    }

    pub fn metrics_text(&self) -> String {
        let mut text = self.metrics.render();
        text.push_str(&self.hub_metrics_text());
        text.push_str(&self.predictions.render_metrics());
        text.push_str(&self.notifier.render_metrics());
        text
    }
}

pub use crate::core::rollout::OpsAction;
pub use approvals::RolloutCharts;
pub use leadership::LeaderView;

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("no rollout {0}")]
    NotFound(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The roles a service's machines have now, kept by a rollout as where it started from.
fn roles_before(state: &State, service: &str) -> BTreeMap<String, MachineRole> {
    state
        .cluster
        .machines_of(service)
        .filter_map(|m| state.roles.get(&m.id).map(|r| (m.id.clone(), *r)))
        .collect()
}

/// What a rollout stored before sub-groups moved: every active machine of another version out,
/// every candidate of the new version in (roles as they were when it started).
fn whole_service_selection(
    cluster: &Cluster,
    before: &BTreeMap<String, MachineRole>,
    to_version: &str,
) -> Selection {
    let mut selection = Selection::default();
    for m in &cluster.machines {
        match before.get(&m.id) {
            Some(MachineRole::Active) if m.version != to_version => {
                selection.replaced.insert(m.id.clone());
            }
            Some(role) if role.is_candidate() && m.version == to_version => {
                selection.joining.insert(m.id.clone());
            }
            _ => {}
        }
    }
    selection
}

/// Whether the service kept a control machine running the rollout's from-version when the rollout
/// began: then v2 can be judged against it job by job. A control left at an older version by an
/// earlier release does not count (its copies pair with no job of this rollout).
fn has_control(
    cluster: &Cluster,
    machines_before: &BTreeMap<String, MachineRole>,
    from_version: &str,
) -> bool {
    cluster
        .machines
        .iter()
        .filter(|m| machines_before.get(&m.id) == Some(&MachineRole::Control))
        .any(|m| m.version == from_version)
}

/// A balancer pair as recorded for a rollout from `from` to `to`: v1-active/v2-simulation, or the
/// v1-active/v1-simulation control; anything else is not this rollout's.
fn stored_pair(pair: &JobPair, from: &str, to: &str) -> Option<StoredPair> {
    if pair.active.version != from {
        return None;
    }
    let control = if pair.simulation.version == to {
        false
    } else if pair.simulation.version == from {
        true
    } else {
        return None;
    };
    Some(StoredPair {
        control,
        job: pair.job,
        sample: crate::core::pairing::sample_of(pair),
        fields: crate::core::pairing::fields_of(pair),
    })
}

fn view(state: &State, r: &RolloutState) -> RolloutView {
    RolloutView {
        id: r.id,
        release: r.release,
        service: r.service.clone(),
        from_version: r.from_version.clone(),
        to_version: r.to_version.clone(),
        phase: r.phase.name().to_string(),
        step: match r.phase {
            Phase::Joining { step } => Some(step),
            _ => None,
        },
        entered_ms: r.entered_ms,
        created_ms: r.created_ms,
        after: r.after.clone(),
        requires_approval: state
            .cluster
            .services
            .get(&r.service)
            .is_some_and(|s| s.policy.requires_approval),
        verdict: r.verdict.clone(),
        numbers: r.numbers.summary(),
        machines: r.selection.clone(),
        problem: starved(r),
    }
}

/// Copies of v2 answered, none of them judged, beyond which a simulating rollout is starved: its
/// pairs cannot form (the active machines do not run the from-version, or the baseline's halves
/// never come). Far above any warm-up gap between the first copies and the first pair.
const STARVED_AFTER_COPIES: u64 = 500;

/// Why a simulating rollout's judge gets nothing while copies flow, if it does.
fn starved(r: &RolloutState) -> Option<String> {
    let judged = r.judge.as_ref().map(Judge::jobs)?;
    if r.phase != Phase::Simulating || judged > 0 || r.copies_seen < STARVED_AFTER_COPIES {
        return None;
    }
    let baseline = if r.feed.against_control() {
        format!(
            "the control's copies (a control running {})",
            r.from_version
        )
    } else {
        format!(
            "callers' jobs answered by active machines running {}",
            r.from_version
        )
    };
    Some(format!(
        "judge starved: {} copies answered by {} and not one pair judged; each needs {baseline}",
        r.copies_seen, r.to_version
    ))
}

/// A rollout's detail as shown at `now_ms`: while it awaits approval its evidence carries the id
/// an approval names, stamped with that moment.
fn detail(state: &State, r: &RolloutState, now_ms: u64) -> RolloutDetail {
    let policy = state.cluster.services.get(&r.service).map(|s| &s.policy);
    let mut evidence = r.evidence.clone();
    if let (Some(e), Phase::AwaitingApproval) = (evidence.as_mut(), r.phase) {
        let logged = r.evidence_log.last().map(|l| l.seq);
        e.id = logged.map(|seq| {
            EvidenceRef {
                rollout: r.id,
                seq,
                shown_ms: now_ms,
            }
            .to_string()
        });
    }
    RolloutDetail {
        rollout: view(state, r),
        transitions: r.transitions.clone(),
        evidence,
        approvals: r.approvals.clone(),
        approvals_required: policy.map_or(1, |p| p.approvers),
        approval_ttl_ms: policy.map_or(0, |p| p.approval_ttl.as_millis() as u64),
        mirror: Some(state.mirror_view(r)),
        fields: r.fields.clone(),
    }
}

// The controller's operations by concern, each on the state behind the one lock.
mod approvals;
mod leadership;
mod monitoring;
pub mod recording;
mod registry;

#[cfg(test)]
#[path = "controller_tests.rs"]
pub(crate) mod tests;

#[cfg(test)]
mod subgroup_tests;

#[cfg(test)]
pub(crate) mod approval_tests;
