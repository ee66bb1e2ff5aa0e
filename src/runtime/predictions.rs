//! Predictive monitoring wired into the controller.
//!
//! Machines publish the states of their calls on the hub (topic `call.state`). This part
//! subscribes to that topic through the controller's backend, turns each event into an
//! [`understudy_predict::Update`], feeds one [`Predictor`] per configuration (callers' jobs on
//! active machines, mirrored copies on simulation machines: a v1 control and a v1 active machine
//! see the same session ids, and must not be taken for one object), moves objects that dwell too
//! long each controller tick, and routes alerts to the log, the metrics, a bounded list for the API
//! and an optional webhook. During a rollout's simulation it follows v2's calls (simulation) and
//! v1's (active) from the start state in a test valid at every look
//! ([`understudy_predict::PairedFailureTest`]): when it shows v2's probability of failure more than
//! the margin above v1's, the rollout fails with the rule `prediction`
//! ([`Predictions::early_fail`]); the chain's estimates are shown beside it.
//!
//! Configuration: the cluster file's `[predict]` section ([`PredictSection`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use understudy_hub::{Backend, Envelope, Filter};
use understudy_judge::{Condition, Decision, Verdict};
use understudy_predict::{
    Alert, Comparison, DwellSummary, Observed, Outlook, PairedFailureTest, Predictor,
    Side as TestSide, SignalReport, Timestamp, Update,
};
use understudy_wire::PoolRole;
use utoipa::ToSchema;

use crate::config::predict::{PredictionSettings, WebhookSettings};
use crate::core::verdict::RolloutVerdict;
use crate::runtime::clock::Clock;

/// The hub topic machines publish their calls' states on.
pub const CALL_STATE_TOPIC: &str = "call.state";

/// The rule name a verdict decided by the early signal carries (`rule` starts with it).
pub const PREDICTION_RULE: &str = "prediction";

// ---- configuration ----
// ---- messages ----

/// A `call.state` payload: one machine's batch of call events.
#[derive(Debug, Clone, Deserialize)]
pub struct CallStateBatch {
    pub service: String,
    pub version: String,
    pub config: PoolRole,
    #[serde(default)]
    pub machine: String,
    pub events: Vec<CallEvent>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CallEvent {
    /// The session id of the call.
    pub object: String,
    pub kind: String,
    pub status: String,
    /// Unix milliseconds at the machine.
    #[serde(default)]
    pub at_ms: Option<u64>,
}

/// Why a message was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("topic `{0}` is not {CALL_STATE_TOPIC}")]
    Topic(String),
    #[error("call.state payload from `{sender}`: {source}")]
    Payload {
        sender: String,
        #[source]
        source: serde_json::Error,
    },
    /// A machine reports its own calls only.
    #[error("call.state from `{sender}` speaks for machine `{machine}`")]
    NotItsOwn { sender: String, machine: String },
}

/// How far a machine's clock may be from the controller's before its timestamps are replaced by
/// the time the message arrived (a machine must not be able to age or freeze the model).
const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// The updates a batch stands for, each with the time it happened (controller milliseconds).
/// Fields a rule may match: `status`, `config` (`active` | `simulation`), `machine`.
pub fn updates_of(batch: &CallStateBatch, now_ms: u64) -> Vec<(Update, u64)> {
    let config = pool_name(batch.config);
    batch
        .events
        .iter()
        .map(|event| {
            let update = Update::new(
                event.object.clone(),
                batch.service.clone(),
                batch.version.clone(),
                event.kind.clone(),
            )
            .with("status", event.status.clone())
            .with("config", config)
            .with("machine", batch.machine.clone());
            let at = event
                .at_ms
                .filter(|at| at.abs_diff(now_ms) <= MAX_CLOCK_SKEW_MS)
                .unwrap_or(now_ms);
            (update, at)
        })
        .collect()
}

fn pool_name(config: PoolRole) -> &'static str {
    match config {
        PoolRole::Active => "active",
        PoolRole::Simulation => "simulation",
    }
}

fn timestamp(ms: u64) -> Timestamp {
    Duration::from_millis(ms)
}

// ---- metrics ----

struct PredictionMetrics {
    alerts: IntCounterVec,
    failure: GaugeVec,
    messages: IntCounterVec,
    webhook: IntCounterVec,
    signals: IntCounterVec,
}

impl PredictionMetrics {
    fn new(registry: &Registry) -> Result<PredictionMetrics, prometheus::Error> {
        let alerts = IntCounterVec::new(
            Opts::new(
                "understudy_prediction_alerts_total",
                "Alerts raised: an object entered (or dwelled in) a state from which an artifact is likely.",
            ),
            &["service", "version", "state", "artifact"],
        )?;
        let failure = GaugeVec::new(
            Opts::new(
                "understudy_prediction_failure_probability",
                "Probability that an object ends in an artifact, from the start state, per version and configuration.",
            ),
            &["service", "version", "config"],
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "understudy_prediction_messages_total",
                "call.state messages taken in (accepted) or refused (rejected).",
            ),
            &["outcome"],
        )?;
        let webhook = IntCounterVec::new(
            Opts::new(
                "understudy_prediction_webhook_alerts_total",
                "Alerts for the webhook: sent, failed (no 2xx answer in time) or dropped (queue full).",
            ),
            &["outcome"],
        )?;
        let signals = IntCounterVec::new(
            Opts::new(
                "understudy_prediction_rollbacks_total",
                "Rollouts failed by the early signal (v2 clearly more likely to fail than v1).",
            ),
            &["service"],
        )?;
        registry.register(Box::new(alerts.clone()))?;
        registry.register(Box::new(failure.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(webhook.clone()))?;
        registry.register(Box::new(signals.clone()))?;
        for outcome in ["accepted", "rejected"] {
            messages.with_label_values(&[outcome]);
        }
        for outcome in ["sent", "failed", "dropped"] {
            webhook.with_label_values(&[outcome]);
        }
        Ok(PredictionMetrics {
            alerts,
            failure,
            messages,
            webhook,
            signals,
        })
    }
}

// ---- the part ----

/// An alert as kept for the API and sent to the webhook.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AlertRecord {
    pub at_ms: u64,
    pub config: PoolRole,
    #[serde(flatten)]
    #[schema(value_type = AlertFields)]
    pub alert: Alert,
}

/// What `understudy_predict::Alert` serializes to (never built: the API's description of it).
#[allow(dead_code)]
#[derive(ToSchema)]
struct AlertFields {
    object: String,
    service: String,
    version: String,
    state: String,
    artifact: String,
    probability: f64,
    /// `entered` the state, or `dwelling` in it past the limit.
    cause: String,
    /// With `cause` `dwelling`: seconds in the state so far.
    elapsed_secs: Option<f64>,
}

/// Logging every alert would flood the log at call rates: one line per (service, version, state,
/// artifact) at most this often, with the count of those not logged.
const ALERT_LOG_INTERVAL_MS: u64 = 10_000;

type AlertKey = (String, String, String, String);

struct Inner {
    active: Predictor,
    simulation: Predictor,
    recent: VecDeque<AlertRecord>,
    alerts_total: u64,
    /// Per alert key: when it was last logged, and how many were raised since.
    logged: BTreeMap<AlertKey, (u64, u64)>,
    /// Per service, the rollout whose simulation the early signal last looked at.
    simulating: BTreeMap<String, Simulation>,
}

/// A rollout's simulation as the rule `prediction` follows it.
struct Simulation {
    rollout: i64,
    baseline: String,
    candidate: String,
    /// None when the rule may not roll back (nothing to decide) or there is no start state.
    test: Option<PairedFailureTest>,
}

impl Inner {
    /// `object` of `service` `version` entered `state` in `config`: the simulating rollout's test
    /// (if any) takes it when it is v1 on the active machines or v2 on the simulation ones.
    fn follow(
        &mut self,
        config: PoolRole,
        service: &str,
        version: &str,
        object: &str,
        state: &str,
    ) {
        let Some(simulation) = self.simulating.get_mut(service) else {
            return;
        };
        let side = match config {
            PoolRole::Active if version == simulation.baseline => TestSide::Baseline,
            PoolRole::Simulation if version == simulation.candidate => TestSide::Candidate,
            _ => return,
        };
        if let Some(test) = simulation.test.as_mut() {
            test.observe(side, object, state);
        }
    }

    fn predictor(&mut self, config: PoolRole) -> &mut Predictor {
        match config {
            PoolRole::Active => &mut self.active,
            PoolRole::Simulation => &mut self.simulation,
        }
    }

    fn predictors(&self) -> [(PoolRole, &Predictor); 2] {
        [
            (PoolRole::Active, &self.active),
            (PoolRole::Simulation, &self.simulation),
        ]
    }
}

/// The controller's predictive monitoring (see the module doc).
pub struct Predictions {
    settings: PredictionSettings,
    clock: Clock,
    inner: Mutex<Inner>,
    /// Its own registry, rendered after the controller's on `/metrics` (as the hub's is).
    registry: Registry,
    metrics: PredictionMetrics,
    webhook: Option<mpsc::Sender<AlertRecord>>,
    /// Taken by [`Predictions::start`], which runs the webhook's sender.
    webhook_queue: Mutex<Option<mpsc::Receiver<AlertRecord>>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Models are caches of what machines reported: a panic mid-update leaves them usable.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// One side of a comparison: a version in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Side {
    pub version: String,
    pub config: PoolRole,
}

/// One version's model, for the API.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelView {
    pub service: String,
    pub version: String,
    pub config: PoolRole,
    pub start_state: Option<String>,
    /// Probability of ending in any artifact from the start state.
    pub start_failure: Option<f64>,
    /// Per state: role, departures, P(each artifact), success, unknown, standard error, expected
    /// steps and seconds; and the decayed transition table (`table.counts`).
    #[schema(value_type = Object)]
    pub outlook: Outlook,
    /// Per state: `{samples, mean_secs, p99_secs, max_secs}`.
    #[schema(value_type = BTreeMap<String, Object>)]
    pub dwell: BTreeMap<String, DwellSummary>,
}

/// v2 (simulation) against v1 (active) from the start state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ComparisonView {
    pub service: String,
    pub baseline: Side,
    pub candidate: Side,
    /// Each side's P(failure) from the start state, its standard error and departures; the
    /// difference in standard errors, and the chain's early warning `clearly_higher` (shown,
    /// never decides; see the predict crate).
    #[schema(value_type = Object)]
    pub comparison: Comparison,
    /// The rule `prediction`'s test, while a rollout simulates this pair and the rule may roll
    /// back: pairs of ended calls, failures of each, fail evidence against its threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub test: Option<SignalReport>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PredictionsView {
    pub enabled: bool,
    pub rollback: bool,
    pub start_state: Option<String>,
    pub artifacts: Vec<String>,
    pub tracked_objects: usize,
    pub alerts_total: u64,
    pub models: Vec<ModelView>,
    pub comparisons: Vec<ComparisonView>,
}

/// What the early signal decided: a failing verdict and its JSON (as the judge's are shown).
#[derive(Debug, Clone)]
pub struct EarlyFail {
    pub verdict: Verdict,
    /// As the rollout shows it: with the judge's numbers when there were any.
    pub shown: RolloutVerdict,
}

impl Predictions {
    pub fn new(
        settings: PredictionSettings,
        clock: Clock,
    ) -> Result<Predictions, prometheus::Error> {
        let registry = Registry::new();
        let metrics = PredictionMetrics::new(&registry)?;
        let (webhook, webhook_queue) = match &settings.webhook {
            Some(w) => {
                let (sender, receiver) = mpsc::channel(w.queue);
                (Some(sender), Some(receiver))
            }
            None => (None, None),
        };
        for warning in &settings.model.warnings {
            tracing::warn!("[predict] {warning}");
        }
        Ok(Predictions {
            inner: Mutex::new(Inner {
                active: Predictor::new(settings.model.clone()),
                simulation: Predictor::new(settings.model.clone()),
                recent: VecDeque::new(),
                alerts_total: 0,
                logged: BTreeMap::new(),
                simulating: BTreeMap::new(),
            }),
            settings,
            clock,
            registry,
            metrics,
            webhook,
            webhook_queue: Mutex::new(webhook_queue),
        })
    }

    pub fn settings(&self) -> &PredictionSettings {
        &self.settings
    }

    /// This part's metrics in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut buffer = Vec::new();
        // The text encoder only fails on a broken writer; a Vec never is.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Starts the `call.state` subscription and the webhook's sender (when configured); both stop
    /// when `shutdown` turns true. Nothing is started when predictions are disabled.
    pub fn start(
        self: &Arc<Self>,
        backend: Arc<dyn Backend>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        if !self.settings.enabled {
            return Vec::new();
        }
        let mut tasks = vec![tokio::spawn(feed(self.clone(), backend, shutdown.clone()))];
        let queue = self
            .webhook_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(queue), Some(webhook)) = (queue, self.settings.webhook.clone()) {
            tasks.push(tokio::spawn(send_webhooks(
                webhook,
                queue,
                self.metrics.webhook.clone(),
                shutdown,
            )));
        }
        tasks
    }

    /// Takes in one hub message; returns the number of events it held.
    pub fn ingest(&self, envelope: &Envelope) -> Result<usize, IngestError> {
        let result = self.ingest_inner(envelope);
        let outcome = if result.is_ok() {
            "accepted"
        } else {
            "rejected"
        };
        self.metrics.messages.with_label_values(&[outcome]).inc();
        result
    }

    fn ingest_inner(&self, envelope: &Envelope) -> Result<usize, IngestError> {
        if envelope.topic != CALL_STATE_TOPIC {
            return Err(IngestError::Topic(envelope.topic.clone()));
        }
        let mut batch: CallStateBatch =
            serde_json::from_value(envelope.payload.clone()).map_err(|source| {
                IngestError::Payload {
                    sender: envelope.sender.clone(),
                    source,
                }
            })?;
        if batch.machine.is_empty() {
            batch.machine = envelope.sender.clone();
        } else if batch.machine != envelope.sender {
            return Err(IngestError::NotItsOwn {
                sender: envelope.sender.clone(),
                machine: batch.machine,
            });
        }
        let now_ms = self.clock.now_ms();
        let mut alerts = Vec::new();
        let mut inner = lock(&self.inner);
        for (update, at_ms) in updates_of(&batch, now_ms) {
            if let Observed::Entered {
                state,
                alerts: raised,
            } = inner
                .predictor(batch.config)
                .observe(&update, timestamp(at_ms))
            {
                alerts.extend(raised);
                inner.follow(
                    batch.config,
                    &update.service,
                    &update.version,
                    &update.object,
                    &state,
                );
            }
        }
        self.route(&mut inner, batch.config, alerts, now_ms);
        Ok(batch.events.len())
    }

    /// Once per controller tick: moves objects past their dwell limit to the time-threshold
    /// artifact, raises dwelling alerts, and refreshes the P(failure) gauges.
    pub fn tick(&self) {
        if !self.settings.enabled {
            return;
        }
        let now_ms = self.clock.now_ms();
        let now = timestamp(now_ms);
        let mut inner = lock(&self.inner);
        for config in [PoolRole::Active, PoolRole::Simulation] {
            let report = inner.predictor(config).tick(now);
            let artifact = &self.settings.model.time_threshold_artifact;
            for timed_out in &report.timed_out {
                inner.follow(
                    config,
                    &timed_out.service,
                    &timed_out.version,
                    &timed_out.object,
                    artifact,
                );
                tracing::debug!(
                    service = %timed_out.service,
                    version = %timed_out.version,
                    object = %timed_out.object,
                    state = %timed_out.state,
                    "call dwelled past its limit: time threshold failure"
                );
            }
            self.route(&mut inner, config, report.alerts, now_ms);
        }
        let Some(start) = self.settings.model.start_state.clone() else {
            return;
        };
        for (config, predictor) in inner.predictors() {
            for key in predictor.model_keys() {
                let failure = predictor
                    .outlook(&key.service, &key.version, now)
                    .and_then(|o| o.state(&start).map(|s| s.failure()));
                if let Some(p) = failure {
                    self.metrics
                        .failure
                        .with_label_values(&[&key.service, &key.version, pool_name(config)])
                        .set(p);
                }
            }
        }
    }

    /// Alerts go to the metric, the recent list, the log (throttled) and the webhook queue.
    fn route(&self, inner: &mut Inner, config: PoolRole, alerts: Vec<Alert>, now_ms: u64) {
        for alert in alerts {
            self.metrics
                .alerts
                .with_label_values(&[
                    &alert.service,
                    &alert.version,
                    &alert.state,
                    &alert.artifact,
                ])
                .inc();
            inner.alerts_total += 1;
            let key = (
                alert.service.clone(),
                alert.version.clone(),
                alert.state.clone(),
                alert.artifact.clone(),
            );
            let entry = inner.logged.entry(key).or_insert((0, 0));
            entry.1 += 1;
            if entry.0 == 0 || now_ms.saturating_sub(entry.0) >= ALERT_LOG_INTERVAL_MS {
                tracing::warn!(
                    service = %alert.service,
                    version = %alert.version,
                    config = pool_name(config),
                    object = %alert.object,
                    state = %alert.state,
                    artifact = %alert.artifact,
                    probability = alert.probability,
                    raised = entry.1,
                    "prediction alert: P({}) = {:.3} from `{}` ({} raised since the last line)",
                    alert.artifact,
                    alert.probability,
                    alert.state,
                    entry.1
                );
                *entry = (now_ms.max(1), 0);
            }
            let record = AlertRecord {
                at_ms: now_ms,
                config,
                alert,
            };
            if let Some(webhook) = &self.webhook {
                if webhook.try_send(record.clone()).is_err() {
                    self.metrics.webhook.with_label_values(&["dropped"]).inc();
                }
            }
            inner.recent.push_back(record);
            while inner.recent.len() > self.settings.recent_alerts {
                inner.recent.pop_front();
            }
        }
    }

    /// v2 (`candidate`, simulation) against v1 (`baseline`, active) from the start state.
    pub fn compare(&self, service: &str, baseline: &str, candidate: &str) -> Option<Comparison> {
        let start = self.settings.model.start_state.as_deref()?;
        let now = timestamp(self.clock.now_ms());
        let inner = lock(&self.inner);
        let v1 = inner.active.outlook(service, baseline, now)?;
        let v2 = inner.simulation.outlook(service, candidate, now)?;
        Some(understudy_predict::compare(
            &v1,
            &v2,
            start,
            &self.settings.model.compare,
        ))
    }

    /// The early signal for `rollout`, simulating `service` from `baseline` to `candidate`:
    /// `Some` when rollback is enabled and the rule's test shows v2's probability of failure from
    /// the start state more than the margin above v1's, at the rule's share of `condition`'s
    /// false-fail rate (`Condition::fail_budget`). `judge` is the judge's current
    /// verdict JSON: its numbers and details are kept beside the prediction's, so the report shows
    /// how far the error-rate condition still was. The first look at a new rollout starts its
    /// test (calls that start from then on count) and forgets what an earlier run of the same
    /// candidate version taught (a version released again after a roll-back is judged on its new
    /// run).
    pub fn early_fail(
        &self,
        rollout: i64,
        service: &str,
        baseline: &str,
        candidate: &str,
        condition: &Condition,
        judge: Option<&RolloutVerdict>,
    ) -> Option<EarlyFail> {
        if !self.settings.enabled {
            return None;
        }
        let report = {
            let mut inner = lock(&self.inner);
            if inner.simulating.get(service).map(|s| s.rollout) != Some(rollout) {
                inner.simulation.forget(service, candidate);
                let alpha = condition.fail_budget(self.settings.sharing()).prediction;
                let simulation = self.follow_simulation(rollout, baseline, candidate, alpha);
                inner.simulating.insert(service.to_string(), simulation);
            }
            let test = inner.simulating.get(service)?.test.as_ref()?;
            test.fails().then(|| test.report())?
        };
        let comparison = self.compare(service, baseline, candidate);
        let verdict =
            self.prediction_verdict(baseline, candidate, &report, comparison.as_ref(), judge);
        self.metrics.signals.with_label_values(&[service]).inc();
        tracing::warn!(%service, %baseline, %candidate, jobs = verdict.jobs, "early signal: {}", verdict.rule);
        let shown = RolloutVerdict {
            numbers: judge.and_then(|j| j.numbers.clone()),
            ..RolloutVerdict::bare(verdict.clone())
        };
        Some(EarlyFail { verdict, shown })
    }

    /// What the rule follows for a new rollout: a test when it may roll back.
    fn follow_simulation(
        &self,
        rollout: i64,
        baseline: &str,
        candidate: &str,
        alpha: f64,
    ) -> Simulation {
        let model = &self.settings.model;
        let may_decide = self.settings.rollback && alpha > 0.0 && alpha < 1.0;
        let test = model
            .start_state
            .as_deref()
            .filter(|_| may_decide)
            .map(|start| {
                PairedFailureTest::new(
                    start,
                    model.absorbing(),
                    model.compare.margin,
                    alpha,
                    model.compare.min_starts,
                )
            });
        Simulation {
            rollout,
            baseline: baseline.to_string(),
            candidate: candidate.to_string(),
            test,
        }
    }

    /// The failing verdict of the rule: the test's figures, the chain's estimates beside them.
    fn prediction_verdict(
        &self,
        baseline: &str,
        candidate: &str,
        report: &SignalReport,
        comparison: Option<&Comparison>,
        judge: Option<&RolloutVerdict>,
    ) -> Verdict {
        let start = self.settings.model.start_state.as_deref().unwrap_or("");
        let chain = comparison.map_or_else(String::new, |c| {
            format!(
                "; the chain predicts {:.4} against {:.4}",
                c.candidate.failure, c.baseline.failure
            )
        });
        let rule = format!(
            "{PREDICTION_RULE}: from `{start}`, {} of {} {candidate} calls ended in a failure \
             against {} of {} for {baseline} (fail evidence {:.0} >= {:.0} = 1/alpha, margin {}){chain}",
            report.v2_failed,
            report.pairs,
            report.v1_failed,
            report.pairs,
            report.fail_evidence,
            report.threshold,
            report.margin,
        );
        let mut prediction = serde_json::json!({
            "start_state": start,
            "fail_evidence": report.fail_evidence,
            "threshold": report.threshold,
            "alpha": report.alpha,
            "pairs": report.pairs,
            "estimate": report.estimate,
            "interval": report.interval,
            "v1_ended": report.v1_ended.ended,
            "v2_ended": report.v2_ended.ended,
            "v1_failed": report.v1_failed,
            "v2_failed": report.v2_failed,
            "margin": report.margin,
            "min_starts": report.min_pairs,
        });
        if let (Some(c), Some(obj)) = (comparison, prediction.as_object_mut()) {
            for (key, value) in [
                ("v1_failure", c.baseline.failure),
                ("v2_failure", c.candidate.failure),
                ("v1_std_error", c.baseline.std_error),
                ("v2_std_error", c.candidate.std_error),
                ("v1_starts", c.baseline.starts),
                ("v2_starts", c.candidate.starts),
                ("difference", c.difference),
                // JSON has no infinity: a z over every bound shows as the largest finite one.
                ("z", c.z.min(f64::MAX)),
            ] {
                obj.insert(key.to_string(), value.into());
            }
            obj.insert("reason".to_string(), c.reason.clone().into());
        }
        let mut details = judge
            .map(|j| j.details.clone())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(obj) = details.as_object_mut() {
            obj.insert(PREDICTION_RULE.to_string(), prediction);
            if let Some(j) = judge {
                obj.insert("judge_rule".to_string(), j.rule.clone().into());
            }
        }
        Verdict {
            decision: Decision::Fail,
            hard: true,
            rule,
            jobs: judge.map_or(0, |j| j.jobs),
            details,
        }
    }

    /// Every model (optionally of one service, one version), with the v2-against-v1 comparisons.
    pub fn view(&self, service: Option<&str>, version: Option<&str>) -> PredictionsView {
        let now = timestamp(self.clock.now_ms());
        let start = self.settings.model.start_state.clone();
        let inner = lock(&self.inner);
        let mut models = Vec::new();
        for (config, predictor) in inner.predictors() {
            for key in predictor.model_keys() {
                if service.is_some_and(|s| s != key.service)
                    || version.is_some_and(|v| v != key.version)
                {
                    continue;
                }
                let Some(outlook) = predictor.outlook(&key.service, &key.version, now) else {
                    continue;
                };
                let dwell = predictor
                    .model(&key.service, &key.version)
                    .map(|m| m.dwell_summaries(now))
                    .unwrap_or_default();
                let start_failure = start
                    .as_deref()
                    .and_then(|s| outlook.state(s))
                    .map(|s| s.failure());
                models.push(ModelView {
                    service: key.service.clone(),
                    version: key.version.clone(),
                    config,
                    start_state: start.clone(),
                    start_failure,
                    outlook,
                    dwell,
                });
            }
        }
        let mut comparisons = Vec::new();
        if let Some(start) = &start {
            for v2 in models.iter().filter(|m| m.config == PoolRole::Simulation) {
                for v1 in models.iter().filter(|m| {
                    m.config == PoolRole::Active
                        && m.service == v2.service
                        && m.version != v2.version
                }) {
                    comparisons.push(ComparisonView {
                        service: v2.service.clone(),
                        baseline: Side {
                            version: v1.version.clone(),
                            config: v1.config,
                        },
                        candidate: Side {
                            version: v2.version.clone(),
                            config: v2.config,
                        },
                        comparison: understudy_predict::compare(
                            &v1.outlook,
                            &v2.outlook,
                            start,
                            &self.settings.model.compare,
                        ),
                        test: inner
                            .simulating
                            .get(&v2.service)
                            .filter(|s| s.baseline == v1.version && s.candidate == v2.version)
                            .and_then(|s| s.test.as_ref())
                            .map(PairedFailureTest::report),
                    });
                }
            }
        }
        PredictionsView {
            enabled: self.settings.enabled,
            rollback: self.settings.rollback,
            start_state: start,
            artifacts: self.settings.model.artifacts.clone(),
            tracked_objects: inner.active.tracked_objects() + inner.simulation.tracked_objects(),
            alerts_total: inner.alerts_total,
            models,
            comparisons,
        }
    }

    /// The recent alerts, newest first, optionally of one service (and version).
    /// Alerts raised since start (the listing keeps only the recent ones).
    pub fn alerts_total(&self) -> u64 {
        lock(&self.inner).alerts_total
    }

    pub fn alerts(
        &self,
        service: Option<&str>,
        version: Option<&str>,
        limit: usize,
    ) -> Vec<AlertRecord> {
        let inner = lock(&self.inner);
        inner
            .recent
            .iter()
            .rev()
            .filter(|r| service.is_none_or(|s| s == r.alert.service))
            .filter(|r| version.is_none_or(|v| v == r.alert.version))
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Follows `call.state` until shutdown. A subscription the hub dropped (this part was slow, or
/// the backend restarted) is taken again after a pause that doubles up to five seconds.
async fn feed(
    predictions: Arc<Predictions>,
    backend: Arc<dyn Backend>,
    mut shutdown: watch::Receiver<bool>,
) {
    let filter = Filter {
        topic: Some(CALL_STATE_TOPIC.to_string()),
        ..Filter::default()
    };
    let mut pause = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match backend
            .subscribe(filter.clone(), predictions.settings.subscriber_queue)
            .await
        {
            Ok(mut subscription) => loop {
                tokio::select! {
                    message = subscription.recv() => match message {
                        Some(envelope) => {
                            pause = Duration::from_millis(100);
                            if let Err(e) = predictions.ingest(&envelope) {
                                tracing::debug!("prediction: {e}");
                            }
                        }
                        None => {
                            let reason = subscription
                                .disconnect_reason()
                                .map_or("ended", |r| r.as_str());
                            tracing::warn!(reason, "prediction: call.state subscription ended; subscribing again");
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            },
            Err(e) => tracing::warn!("prediction: cannot subscribe to {CALL_STATE_TOPIC}: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Most alerts in one POST: the queue is drained in batches so a burst costs few requests.
const WEBHOOK_BATCH: usize = 64;

/// POSTs queued alerts as `{"alerts": [...]}`, one request at a time, each within its deadline.
/// The controller only ever `try_send`s into the queue, so a slow or dead receiver never holds
/// it up: alerts beyond the queue are dropped and counted.
async fn send_webhooks(
    webhook: WebhookSettings,
    mut queue: mpsc::Receiver<AlertRecord>,
    counter: IntCounterVec,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = crate::http_json::client();
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            received = queue.recv_many(&mut batch, WEBHOOK_BATCH) => {
                if received == 0 {
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
        let body = serde_json::to_vec(&serde_json::json!({ "alerts": batch })).unwrap_or_default();
        let result = crate::http_json::exchange(
            &client,
            http::Method::POST,
            &webhook.url,
            None,
            Some(body),
            webhook.timeout,
        )
        .await;
        let failure = match result {
            Ok((status, _)) if (200..300).contains(&status) => None,
            Ok((status, body)) => Some(format!(
                "answered {status}: {}",
                crate::http_json::error_message(&body)
            )),
            Err(crate::http_json::ExchangeError::BadRequest(e))
            | Err(crate::http_json::ExchangeError::NoAnswer(e)) => Some(e),
        };
        let outcome = if failure.is_some() { "failed" } else { "sent" };
        counter
            .with_label_values(&[outcome])
            .inc_by(batch.len() as u64);
        if let Some(reason) = failure {
            tracing::warn!(url = %webhook.url, alerts = batch.len(), "prediction webhook: {reason}");
        }
    }
}

#[cfg(test)]
#[path = "predictions_tests.rs"]
mod tests;
