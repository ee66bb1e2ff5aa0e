//! Simulated machines: an HTTP server playing one machine of a service at a version, with a
//! latency distribution, an error rate, faults, dependencies and side effects. Every random choice
//! is drawn from a generator seeded by the machine's seed and the job's input, so a job gets the
//! same treatment whatever order jobs arrive in; order-based faults (crash after N, slow start,
//! creep) count arrivals.

use crate::calls::{
    CallBook, CallStatus, CallTracker, JobOutcome, LateFailure, LateFailureSpec, SessionEvent,
    Whereabouts,
};
use crate::load::{SESSION_EVENT_HEADER, SESSION_HEADER};
use crate::presence::{Presence, PresenceEvent};
use crate::publish::{
    hub_link, now_ms, HubCounters, HubLink, HubOptions, HubOptionsError, Publisher, QueuedEvent,
    Transport,
};
use crate::spec::{check_positive, check_range, join, Delay, DelaySpec, SpecError};
use bytes::Bytes;
use fnv::FnvHasher;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use understudy_hub::{Role, SecretKey};

/// Header set on every mirrored copy (see CONTRACT.md).
pub const SIMULATION_HEADER: &str = "x-understudy-simulation";
/// The copying balancer's token for the mark, passed on to dependencies as it came (the
/// balancers' word: docs/security.md).
pub const SIMULATION_AUTH_HEADER: &str = "x-understudy-simulation-auth";
/// Path prefix of a machine's own admin endpoints; jobs never use it.
pub const ADMIN_PREFIX: &str = "/__machine/";

/// One machine of a service at a version, as written in TOML (see docs/loadgen.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// Service name; part of every answer, so machines of one service answer alike.
    pub service: String,
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default)]
    pub seed: u64,
    /// Service time of a job (default: none).
    #[serde(default = "zero_latency")]
    pub latency: DelaySpec,
    /// A fraction of jobs take `multiplier` times longer.
    #[serde(default)]
    pub tail: Option<TailSpec>,
    /// Fraction of jobs answered with `error_status`.
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default = "default_error_status")]
    pub error_status: u16,
    /// Services this machine calls for every job (their balancers' addresses are set at runtime).
    #[serde(default)]
    pub dependencies: Vec<String>,
    #[serde(default = "default_dependency_timeout_ms")]
    pub dependency_timeout_ms: u64,
    #[serde(default)]
    pub faults: FaultSpec,
    /// How answers are written: a line of text (default) or a JSON object.
    #[serde(default, skip_serializing_if = "AnswerSpec::is_text")]
    pub answer: AnswerSpec,
}

/// How a machine writes a successful answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerSpec {
    #[serde(default)]
    pub format: AnswerFormat,
    /// JSON only: a field whose value is new on every answer, so that it differs even between
    /// two machines of one version answering the same job (a timestamp, a request id).
    #[serde(default)]
    pub volatile_field: Option<String>,
    /// JSON only: fields of the answer this machine writes differently from other versions:
    /// `price` (every item's price), `sku` (every item's sku) or `answer`.
    #[serde(default)]
    pub changed_fields: Vec<String>,
}

/// The body of a successful answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerFormat {
    /// `SERVICE DIGEST`, one line.
    #[default]
    Text,
    /// `{"service", "answer", "items": [{"sku", "price"}, ...]}` (and the volatile field).
    Json,
}

/// The JSON answer's fields a machine may change.
const CHANGEABLE_FIELDS: [&str; 3] = ["price", "sku", "answer"];

impl AnswerSpec {
    fn is_text(&self) -> bool {
        *self == AnswerSpec::default()
    }

    fn validate(&self) -> Result<(), SpecError> {
        let json = self.format == AnswerFormat::Json;
        if let Some(field) = &self.volatile_field {
            if !json {
                return Err(SpecError::new(
                    "answer.volatile_field",
                    "needs format = \"json\"",
                ));
            }
            let fixed = ["service", "items"].contains(&field.as_str());
            if field.trim().is_empty() || fixed || CHANGEABLE_FIELDS.contains(&field.as_str()) {
                return Err(SpecError::new(
                    "answer.volatile_field",
                    format!("{field:?} is empty or a field the answer already has"),
                ));
            }
        }
        for (i, field) in self.changed_fields.iter().enumerate() {
            if !json {
                return Err(SpecError::new(
                    "answer.changed_fields",
                    "needs format = \"json\"",
                ));
            }
            if !CHANGEABLE_FIELDS.contains(&field.as_str()) {
                return Err(SpecError::new(
                    format!("answer.changed_fields[{i}]"),
                    format!("{field:?} is not one of {CHANGEABLE_FIELDS:?}"),
                ));
            }
        }
        Ok(())
    }

    /// A successful answer's body for `digest` (what determines the job's answer).
    fn body(&self, service: &str, digest: u64) -> (Bytes, Option<&'static str>) {
        if self.format == AnswerFormat::Text {
            return (format!("{service} {digest:016x}\n").into(), None);
        }
        let changed = |field: &str| self.changed_fields.iter().any(|f| f == field);
        let answer = if changed("answer") { !digest } else { digest };
        let items: Vec<serde_json::Value> = (0..2u64)
            .map(|i| {
                let cents = (digest >> (16 * i)) % 10_000 + if changed("price") { 100 } else { 0 };
                let sku = format!("sku-{:04x}", (digest >> (32 + 16 * i)) & 0xffff);
                let sku = if changed("sku") {
                    sku.to_uppercase()
                } else {
                    sku
                };
                serde_json::json!({"sku": sku, "price": cents as f64 / 100.0})
            })
            .collect();
        let mut object = serde_json::json!({
            "service": service,
            "answer": format!("{answer:016x}"),
            "items": items,
        });
        if let Some(field) = &self.volatile_field {
            object[field.as_str()] = serde_json::Value::String(volatile_value());
        }
        let body = serde_json::to_vec(&object).expect("a JSON value serializes");
        (body.into(), Some("application/json"))
    }
}

/// A value no other answer has: the clock in nanoseconds and a process-wide sequence.
fn volatile_value() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos}-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

fn default_version() -> String {
    "v1".to_string()
}
fn zero_latency() -> DelaySpec {
    DelaySpec::constant_ms(0.0)
}
fn default_error_status() -> u16 {
    500
}
fn default_dependency_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailSpec {
    pub fraction: f64,
    pub multiplier: f64,
}

/// Faults; all off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Never answer these jobs (the connection stays open until the caller gives up).
    #[serde(default)]
    pub hang: Option<FaultTrigger>,
    /// Close the connection with a TCP reset instead of answering.
    #[serde(default)]
    pub reset: Option<FaultTrigger>,
    /// Answer these jobs with a different body than other versions would.
    #[serde(default)]
    pub mismatch: Option<FaultTrigger>,
    /// After this many jobs have arrived the machine stops: listener closed, connections dropped.
    #[serde(default)]
    pub crash_after_jobs: Option<u64>,
    #[serde(default)]
    pub slow_start: Option<SlowStartSpec>,
    #[serde(default)]
    pub latency_creep: Option<LatencyCreepSpec>,
    /// Performs side effects for simulation jobs too (a bug the counter must catch).
    #[serde(default)]
    pub leaks_side_effects: bool,
    /// Fails a seeded fraction of calls, but only once they have been in media long enough.
    #[serde(default)]
    pub late_failure: Option<LateFailureSpec>,
}

/// Which jobs a fault hits: from the `after_jobs`-th arrival on, a seeded `fraction` of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultTrigger {
    #[serde(default)]
    pub after_jobs: u64,
    #[serde(default = "one")]
    pub fraction: f64,
}

fn one() -> f64 {
    1.0
}

/// Extra latency `extra_ms` on the first job, shrinking linearly to 0 at job `over_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowStartSpec {
    pub extra_ms: f64,
    pub over_jobs: u64,
}

/// Latency grows by `per_job_us` for every job that arrived before, up to `max_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyCreepSpec {
    pub per_job_us: f64,
    #[serde(default = "default_creep_max_ms")]
    pub max_ms: f64,
}

fn default_creep_max_ms() -> f64 {
    60_000.0
}

impl MachineSpec {
    /// A machine of `service` at `version` answering at once, without faults.
    pub fn new(service: impl Into<String>, version: impl Into<String>) -> Self {
        MachineSpec {
            service: service.into(),
            version: version.into(),
            seed: 0,
            latency: zero_latency(),
            tail: None,
            error_rate: 0.0,
            error_status: default_error_status(),
            dependencies: Vec::new(),
            dependency_timeout_ms: default_dependency_timeout_ms(),
            faults: FaultSpec::default(),
            answer: AnswerSpec::default(),
        }
    }

    /// Parses and validates a TOML machine spec; errors name the field (and line, for syntax).
    pub fn from_toml_str(text: &str) -> Result<Self, SpecError> {
        let spec: MachineSpec = crate::spec::from_toml("machine spec", text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.behaviour().map(|_| ())
    }

    fn behaviour(&self) -> Result<Behaviour, SpecError> {
        // The order of the checks (fault triggers last) decides which bad field an error names.
        if self.service.trim().is_empty() {
            return Err(SpecError::new("service", "must not be empty"));
        }
        if self.version.trim().is_empty() {
            return Err(SpecError::new("version", "must not be empty"));
        }
        let latency = self.latency.validate("latency")?;
        let tail = self.tail.as_ref().map(TailSpec::validate).transpose()?;
        let error_rate = check_range("error_rate", self.error_rate, 0.0, 1.0)?;
        let error_status = StatusCode::from_u16(self.error_status)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .ok_or_else(|| {
                SpecError::new(
                    "error_status",
                    format!("must be a 4xx or 5xx status, got {}", self.error_status),
                )
            })?;
        self.validate_dependencies()?;
        self.answer.validate()?;
        let f = &self.faults;
        let slow_start = f
            .slow_start
            .as_ref()
            .map(SlowStartSpec::validate)
            .transpose()?;
        let creep = f
            .latency_creep
            .as_ref()
            .map(LatencyCreepSpec::validate)
            .transpose()?;
        let late_failure = f
            .late_failure
            .as_ref()
            .map(|l| l.validate("faults.late_failure"))
            .transpose()?;
        Ok(Behaviour {
            latency,
            tail,
            error_rate,
            error_status,
            dependency_timeout: Duration::from_millis(self.dependency_timeout_ms),
            hang: trigger("hang", f.hang.as_ref())?,
            reset: trigger("reset", f.reset.as_ref())?,
            mismatch: trigger("mismatch", f.mismatch.as_ref())?,
            crash_after_jobs: f.crash_after_jobs,
            slow_start,
            creep,
            leaks_side_effects: f.leaks_side_effects,
            late_failure,
            answer: self.answer.clone(),
        })
    }

    /// Dependencies named once each, and a timeout to call them with.
    fn validate_dependencies(&self) -> Result<(), SpecError> {
        let mut seen = HashSet::new();
        for (i, dep) in self.dependencies.iter().enumerate() {
            if dep.trim().is_empty() {
                return Err(SpecError::new(
                    format!("dependencies[{i}]"),
                    "must not be empty",
                ));
            }
            if !seen.insert(dep) {
                return Err(SpecError::new(
                    format!("dependencies[{i}]"),
                    format!("{dep:?} is listed twice"),
                ));
            }
        }
        if self.dependency_timeout_ms == 0 {
            return Err(SpecError::new(
                "dependency_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl TailSpec {
    /// (fraction, multiplier).
    fn validate(&self) -> Result<(f64, f64), SpecError> {
        Ok((
            check_range("tail.fraction", self.fraction, 0.0, 1.0)?,
            check_range("tail.multiplier", self.multiplier, 0.0, 1e6)?,
        ))
    }
}

impl SlowStartSpec {
    /// (extra_ms, over_jobs).
    fn validate(&self) -> Result<(f64, u64), SpecError> {
        if self.over_jobs == 0 {
            return Err(SpecError::new(
                "faults.slow_start.over_jobs",
                "must be at least 1",
            ));
        }
        Ok((
            check_range("faults.slow_start.extra_ms", self.extra_ms, 0.0, 3.6e6)?,
            self.over_jobs,
        ))
    }
}

impl LatencyCreepSpec {
    /// (per_job_us, max_ms).
    fn validate(&self) -> Result<(f64, f64), SpecError> {
        Ok((
            check_range("faults.latency_creep.per_job_us", self.per_job_us, 0.0, 1e9)?,
            check_positive("faults.latency_creep.max_ms", self.max_ms)?,
        ))
    }
}

/// The fault `faults.NAME`'s trigger, if it is configured.
fn trigger(name: &str, t: Option<&FaultTrigger>) -> Result<Option<Trigger>, SpecError> {
    t.map(|t| {
        Ok(Trigger {
            after_jobs: t.after_jobs,
            fraction: check_range(
                &join(&format!("faults.{name}"), "fraction"),
                t.fraction,
                0.0,
                1.0,
            )?,
        })
    })
    .transpose()
}

#[derive(Debug, Clone, Copy)]
struct Trigger {
    after_jobs: u64,
    fraction: f64,
}

impl Trigger {
    fn hits(self, job: u64, draw: f64) -> bool {
        job >= self.after_jobs && draw < self.fraction
    }
}

/// A validated machine spec.
#[derive(Debug, Clone)]
struct Behaviour {
    latency: Delay,
    tail: Option<(f64, f64)>,
    error_rate: f64,
    error_status: StatusCode,
    dependency_timeout: Duration,
    hang: Option<Trigger>,
    reset: Option<Trigger>,
    mismatch: Option<Trigger>,
    crash_after_jobs: Option<u64>,
    slow_start: Option<(f64, u64)>,
    creep: Option<(f64, f64)>,
    leaks_side_effects: bool,
    late_failure: Option<LateFailure>,
    answer: AnswerSpec,
}

/// The fate of one job, decided from the seeded draws before anything happens.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Hang,
    Reset,
    Answer {
        latency: Duration,
        error: bool,
        mismatch: bool,
    },
}

impl Behaviour {
    fn fate(&self, job: u64, rng: &mut StdRng) -> Fate {
        // Always draw the same values in the same order, whatever is configured, so changing one
        // fault does not reshuffle the others.
        let hang = rng.gen::<f64>();
        let reset = rng.gen::<f64>();
        let error = rng.gen::<f64>();
        let mismatch = rng.gen::<f64>();
        let tail = rng.gen::<f64>();
        let mut ms = self.latency.sample_ms(rng);
        if self.hang.is_some_and(|t| t.hits(job, hang)) {
            return Fate::Hang;
        }
        if self.reset.is_some_and(|t| t.hits(job, reset)) {
            return Fate::Reset;
        }
        if let Some((fraction, multiplier)) = self.tail {
            if tail < fraction {
                ms *= multiplier;
            }
        }
        if let Some((extra_ms, over_jobs)) = self.slow_start {
            if job < over_jobs {
                ms += extra_ms * (1.0 - job as f64 / over_jobs as f64);
            }
        }
        if let Some((per_job_us, max_ms)) = self.creep {
            ms += (per_job_us * job as f64 / 1_000.0).min(max_ms);
        }
        Fate::Answer {
            latency: crate::spec::ms_to_duration(ms),
            error: error < self.error_rate,
            mismatch: self.mismatch.is_some_and(|t| t.hits(job, mismatch)),
        }
    }
}

/// A machine's counters, from `GET /__machine/stats` or [`MachineHandle::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStats {
    pub service: String,
    pub version: String,
    /// Jobs that arrived (admin requests excluded).
    pub jobs: u64,
    /// Jobs answered 2xx.
    pub ok: u64,
    /// Jobs answered with an error status (configured errors and failed dependencies).
    pub errors: u64,
    pub hung: u64,
    pub resets: u64,
    /// Answers deliberately different from other versions'.
    pub mismatches: u64,
    /// Jobs that carried `x-understudy-simulation: 1`.
    pub simulation_jobs: u64,
    /// Jobs without it: callers' jobs. With `simulation_jobs`, a witness of isolation that does
    /// not depend on any balancer's bookkeeping: an active machine must get no simulation job,
    /// a machine only ever in the simulation pool no plain one.
    #[serde(default)]
    pub plain_jobs: u64,
    /// Side effects performed for real jobs (e.g. calls recorded).
    pub side_effects: u64,
    /// Side effects attempted for simulation jobs: must stay 0.
    pub simulation_side_effects: u64,
    /// Sessions opened (`x-session-event: start`) and not yet closed (`end`).
    pub sessions_held: u64,
    /// Requests sent to dependencies, and those that failed.
    pub forwarded: u64,
    pub forward_errors: u64,
    /// True once the crash fault fired.
    pub crashed: bool,
    /// Jobs failed by the `late_failure` fault.
    #[serde(default)]
    pub late_failures: u64,
    /// Calls served without status tracking because too many were open at once.
    #[serde(default)]
    pub calls_untracked: u64,
    /// Calls whose plain jobs reached this machine though it did not see them start
    /// (`x-session-event: start`): the call moved here from another machine. Counted once per
    /// call; a job that a call's end overtook, or that overtook its start, is no move.
    #[serde(default)]
    pub calls_moved: u64,
    /// Calls whose copies (simulation jobs) reached this machine though it did not see them
    /// start. Not a move: a balancer begins copying a call wherever it is when its rollout starts
    /// simulating, and a copy of a start can be shed under overload.
    #[serde(default)]
    pub copied_calls_joined: u64,
    /// Hub messages accepted, not delivered (no answer or timeout), refused (e.g. 401).
    #[serde(default)]
    pub hub_published: u64,
    #[serde(default)]
    pub hub_publish_failures: u64,
    #[serde(default)]
    pub hub_refused: u64,
    /// Call status events produced, and those dropped because the publish buffer was full.
    #[serde(default)]
    pub call_events: u64,
    #[serde(default)]
    pub call_events_dropped: u64,
}

#[derive(Default)]
struct Counters {
    jobs: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    hung: AtomicU64,
    resets: AtomicU64,
    mismatches: AtomicU64,
    simulation_jobs: AtomicU64,
    plain_jobs: AtomicU64,
    side_effects: AtomicU64,
    simulation_side_effects: AtomicU64,
    forwarded: AtomicU64,
    forward_errors: AtomicU64,
    crashed: AtomicBool,
    late_failures: AtomicU64,
    calls_untracked: AtomicU64,
    calls_moved: AtomicU64,
    copied_calls_joined: AtomicU64,
}

/// Jobs received in one wall-clock second, plain and simulation apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsInSecond {
    /// Seconds since the Unix epoch.
    pub unix_s: u64,
    pub plain: u64,
    pub simulation: u64,
}

/// Seconds a timeline keeps: a day.
const TIMELINE_SECONDS: usize = 86_400;

/// Jobs received per second, so that a reader can tell what a machine received before and after
/// a moment it learns only later (a candidate joining the active pool). The oldest seconds go
/// first.
#[derive(Default)]
struct Timeline(Mutex<VecDeque<JobsInSecond>>);

impl Timeline {
    fn record(&self, simulation: bool) {
        let mut seconds = self.0.lock().expect("timeline lock");
        // Read under the lock, so seconds are pushed in order.
        let unix_s = now_ms() / 1000;
        if seconds.back().is_none_or(|last| last.unix_s != unix_s) {
            if seconds.len() == TIMELINE_SECONDS {
                seconds.pop_front();
            }
            seconds.push_back(JobsInSecond {
                unix_s,
                ..JobsInSecond::default()
            });
        }
        let second = seconds.back_mut().expect("pushed above");
        if simulation {
            second.simulation += 1;
        } else {
            second.plain += 1;
        }
    }

    fn seconds(&self) -> Vec<JobsInSecond> {
        self.0
            .lock()
            .expect("timeline lock")
            .iter()
            .copied()
            .collect()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

type DependencyClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) struct MachineState {
    pub(crate) service: String,
    pub(crate) version: String,
    seed: u64,
    behaviour: Behaviour,
    declared: Vec<String>,
    dependencies: RwLock<BTreeMap<String, SocketAddr>>,
    client: DependencyClient,
    counters: Counters,
    timeline: Timeline,
    sessions: Mutex<CallBook>,
    stop: watch::Sender<bool>,
    pub(crate) presence: watch::Sender<Presence>,
    calls: CallTracker,
    hub: OnceLock<HubLink>,
    pub(crate) hub_counters: HubCounters,
}

impl crate::publish::Reported for MachineState {
    fn service(&self) -> &str {
        &self.service
    }
    fn version(&self) -> &str {
        &self.version
    }
    fn presence(&self) -> watch::Receiver<Presence> {
        self.presence.subscribe()
    }
    fn sessions_held(&self) -> usize {
        MachineState::sessions_held(self)
    }
    fn hub_counters(&self) -> &HubCounters {
        &self.hub_counters
    }
}

impl MachineState {
    fn stats(&self) -> MachineStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MachineStats {
            service: self.service.clone(),
            version: self.version.clone(),
            jobs: get(&c.jobs),
            ok: get(&c.ok),
            errors: get(&c.errors),
            hung: get(&c.hung),
            resets: get(&c.resets),
            mismatches: get(&c.mismatches),
            simulation_jobs: get(&c.simulation_jobs),
            plain_jobs: get(&c.plain_jobs),
            side_effects: get(&c.side_effects),
            simulation_side_effects: get(&c.simulation_side_effects),
            sessions_held: self.sessions_held() as u64,
            forwarded: get(&c.forwarded),
            forward_errors: get(&c.forward_errors),
            crashed: c.crashed.load(Ordering::Relaxed),
            late_failures: get(&c.late_failures),
            calls_untracked: get(&c.calls_untracked),
            calls_moved: get(&c.calls_moved),
            copied_calls_joined: get(&c.copied_calls_joined),
            hub_published: get(&self.hub_counters.published),
            hub_publish_failures: get(&self.hub_counters.failures),
            hub_refused: get(&self.hub_counters.refused),
            call_events: get(&self.hub_counters.call_events),
            call_events_dropped: get(&self.hub_counters.call_events_dropped),
        }
    }

    pub(crate) fn sessions_held(&self) -> usize {
        self.sessions.lock().expect("sessions lock").open_calls()
    }

    fn apply(&self, event: PresenceEvent) {
        self.presence.send_if_modified(|presence| {
            let next = presence.next(event);
            std::mem::replace(presence, next) != next
        });
    }

    /// Books the arrival of a job of call `session`: the sessions held, the call's status and
    /// whether the call began on another machine. Returns whether the late failure hits the job.
    fn arrive(
        &self,
        session: &str,
        event: Option<SessionEvent>,
        path: &str,
        simulation: bool,
    ) -> bool {
        let whereabouts = self
            .sessions
            .lock()
            .expect("sessions lock")
            .arrive(session, event);
        let c = &self.counters;
        let moved = if simulation {
            &c.copied_calls_joined
        } else {
            &c.calls_moved
        };
        match whereabouts {
            Whereabouts::Here => {}
            Whereabouts::MovedHere => bump(moved),
            Whereabouts::StartOvertaken => {
                moved.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let arrival = self
            .calls
            .arrive(session, path, tokio::time::Instant::now());
        if arrival.first {
            self.call_event(session, CallStatus::Received, simulation);
        }
        if arrival.untracked {
            bump(&self.counters.calls_untracked);
        }
        arrival.fails_late
    }

    /// Records how a job of a call ended and publishes the call's new status, if any.
    fn finish_call(&self, call: &JobCall, outcome: JobOutcome) {
        let Some(session) = &call.session else { return };
        if let Some(status) = self.calls.finish(session, outcome, call.ends_call) {
            self.call_event(session, status, call.simulation);
        }
    }

    /// Hands a call event to the publisher without waiting; nothing without a hub, nothing
    /// once the machine is down or hung (it says nothing more).
    fn call_event(&self, session: &str, status: CallStatus, simulation: bool) {
        let Some(hub) = self.hub.get() else { return };
        if self.presence.borrow().is_final() {
            return;
        }
        hub.offer(
            QueuedEvent {
                session: session.to_string(),
                status,
                simulation,
                at_ms: now_ms(),
            },
            &self.hub_counters,
        );
    }

    /// Replaces the addresses of the named dependencies; names not declared are refused and
    /// nothing is changed.
    fn set_dependencies(&self, addresses: BTreeMap<String, SocketAddr>) -> Result<(), SpecError> {
        if let Some(unknown) = addresses.keys().find(|name| !self.declared.contains(name)) {
            return Err(SpecError::new(
                format!("dependencies.{unknown}"),
                format!(
                    "not a dependency of this machine (declared: {})",
                    self.declared.join(", ")
                ),
            ));
        }
        self.dependencies
            .write()
            .expect("dependencies lock")
            .extend(addresses);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid machine spec: {0}")]
    Spec(#[from] SpecError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hub(#[from] HubOptionsError),
}

/// The call a job belongs to, as far as the machine's call statuses go.
struct JobCall {
    session: Option<String>,
    simulation: bool,
    ends_call: bool,
}

/// Returned by the service to make hyper drop the connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection reset by the reset fault")]
struct ResetFault;

/// A running machine. Dropping the handle stops the machine.
pub struct MachineHandle {
    addr: SocketAddr,
    state: Arc<MachineState>,
    task: Option<JoinHandle<()>>,
}

impl MachineHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> MachineStats {
        self.state.stats()
    }

    /// The jobs received in each second of the last day, oldest first.
    pub fn jobs_by_second(&self) -> Vec<JobsInSecond> {
        self.state.timeline.seconds()
    }

    /// Sets (or updates) where the named dependencies' balancers listen. Takes effect for the
    /// next job. Unknown names are refused, naming the field.
    pub fn set_dependencies(
        &self,
        addresses: impl IntoIterator<Item = (String, SocketAddr)>,
    ) -> Result<(), SpecError> {
        self.state.set_dependencies(addresses.into_iter().collect())
    }

    /// False once the machine was shut down or crashed.
    pub fn is_running(&self) -> bool {
        !*self.state.stop.borrow()
    }

    /// Resolves once the machine stopped (shut down or crashed).
    pub async fn stopped(&self) {
        let mut stop = self.state.stop.subscribe();
        let _ = stop.wait_for(|stopped| *stopped).await;
    }

    /// Stops accepting, drops every connection (in-flight jobs are cut) and waits for the end.
    /// With a hub, the machine's last message (`down`) is sent first (bounded by the publish
    /// timeout).
    pub async fn shutdown(mut self) {
        self.state.apply(PresenceEvent::Shutdown);
        self.state.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let publisher = self
            .state
            .hub
            .get()
            .and_then(|hub| hub.task.lock().expect("hub task lock").take());
        if let Some(publisher) = publisher {
            let _ = publisher.await;
        }
    }

    /// Starts publishing this machine's state and its calls' statuses to a hub (see
    /// docs/loadgen.md): `machine.state` at once, then on every change and every heartbeat.
    /// A machine publishes to one hub; a second call is refused.
    pub fn publish_to_hub(&self, hub: HubOptions) -> Result<(), HubOptionsError> {
        self.start_publisher(hub, Transport::http)
    }

    fn start_publisher(
        &self,
        hub: HubOptions,
        transport: impl FnOnce(Uri, Duration) -> Transport,
    ) -> Result<(), HubOptionsError> {
        let (uri, signer) = hub.validate()?;
        let (link, inbox) = hub_link(hub.role);
        self.state
            .hub
            .set(link)
            .map_err(|_| HubOptionsError::AlreadyPublishing)?;
        let address = hub.address.clone().unwrap_or_else(|| self.addr.to_string());
        let transport = transport(uri, Duration::from_millis(hub.publish_timeout_ms));
        let publisher = Publisher::new(self.state.clone(), hub, address, signer, transport, inbox);
        let task = tokio::spawn(publisher.run());
        if let Some(link) = self.state.hub.get() {
            *link.task.lock().expect("hub task lock") = Some(task);
        }
        Ok(())
    }

    /// The role reported from now on (e.g. `active` after a promotion); published at once.
    pub fn set_role(&self, role: Role) {
        if let Some(hub) = self.state.hub.get() {
            hub.role
                .send_if_modified(|current| std::mem::replace(current, role) != role);
        }
    }

    /// Signs every later message with `key` (after `POST /api/v1/machines/{id}/rotate-key`); the
    /// sequence goes on. Without a hub, nothing to do.
    pub fn rotate_hub_key(&self, key: SecretKey) {
        if let Some(hub) = self.state.hub.get() {
            hub.key.send_replace(Some(key));
        }
    }

    /// Reports `draining` (the machine keeps serving what it is sent).
    pub fn drain(&self) {
        self.state.apply(PresenceEvent::Drain);
    }
}

impl Drop for MachineHandle {
    fn drop(&mut self) {
        self.state.apply(PresenceEvent::Shutdown);
        self.state.stop.send_replace(true);
    }
}

/// [`spawn_machine`], then [`MachineHandle::publish_to_hub`]; nothing runs if `hub` is invalid.
pub async fn spawn_machine_with_hub(
    spec: MachineSpec,
    bind: SocketAddr,
    hub: HubOptions,
) -> Result<MachineHandle, MachineError> {
    hub.validate()?;
    let machine = spawn_machine(spec, bind).await?;
    machine.publish_to_hub(hub)?;
    Ok(machine)
}

/// Starts a machine listening on `bind` (use port 0 for an ephemeral port).
pub async fn spawn_machine(
    spec: MachineSpec,
    bind: SocketAddr,
) -> Result<MachineHandle, MachineError> {
    let behaviour = spec.behaviour()?;
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| MachineError::Bind { addr: bind, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| MachineError::Bind { addr: bind, source })?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let (stop, _) = watch::channel(false);
    let initial = if behaviour.slow_start.is_some() {
        Presence::Starting
    } else {
        Presence::Running
    };
    let calls = CallTracker::new(spec.seed, behaviour.late_failure);
    let state = Arc::new(MachineState {
        service: spec.service,
        version: spec.version,
        seed: spec.seed,
        behaviour,
        declared: spec.dependencies,
        dependencies: RwLock::new(BTreeMap::new()),
        client,
        counters: Counters::default(),
        timeline: Timeline::default(),
        sessions: Mutex::new(CallBook::default()),
        stop,
        presence: watch::channel(initial).0,
        calls,
        hub: OnceLock::new(),
        hub_counters: HubCounters::default(),
    });
    let task = tokio::spawn(accept_loop(listener, state.clone()));
    Ok(MachineHandle {
        addr,
        state,
        task: Some(task),
    })
}

async fn accept_loop(listener: TcpListener, state: Arc<MachineState>) {
    let mut stop = state.stop.subscribe();
    let mut connections = JoinSet::new();
    let reset_with_rst = state.behaviour.reset.is_some();
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.spawn(serve_connection(stream, state.clone(), reset_with_rst));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Closing the listener refuses new connections; dropping the set aborts every connection.
    drop(listener);
    connections.shutdown().await;
}

async fn serve_connection(stream: TcpStream, state: Arc<MachineState>, reset_with_rst: bool) {
    let _ = stream.set_nodelay(true);
    if reset_with_rst {
        // Zero linger turns the close of a dropped connection into a TCP reset.
        let _ = stream.set_zero_linger();
    }
    let service = service_fn(move |req| handle(state.clone(), req));
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::OK,
        serde_json::to_vec(value).expect("stats serialize"),
    );
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    state: Arc<MachineState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ResetFault> {
    if req.uri().path().starts_with(ADMIN_PREFIX) {
        return Ok(admin(&state, req).await);
    }
    let job = state.counters.jobs.fetch_add(1, Ordering::Relaxed);
    if state.counters.crashed.load(Ordering::Relaxed)
        || state.behaviour.crash_after_jobs.is_some_and(|n| job >= n)
    {
        state.counters.crashed.store(true, Ordering::Relaxed);
        state.apply(PresenceEvent::Crash);
        state.stop.send_replace(true);
        // The accept loop now drops every connection, this one included.
        std::future::pending::<()>().await;
    }
    if state
        .behaviour
        .slow_start
        .is_some_and(|(_, over_jobs)| job + 1 >= over_jobs)
    {
        state.apply(PresenceEvent::Warmed);
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Err(ResetFault);
    };
    let simulation = parts
        .headers
        .get(SIMULATION_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    let counters = &state.counters;
    bump(if simulation {
        &counters.simulation_jobs
    } else {
        &counters.plain_jobs
    });
    state.timeline.record(simulation);
    let session = parts
        .headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let event = parts
        .headers
        .get(SESSION_EVENT_HEADER)
        .and_then(|v| SessionEvent::of(v.as_bytes()));
    let fails_late = session
        .as_deref()
        .is_some_and(|id| state.arrive(id, event, parts.uri.path(), simulation));
    let call = JobCall {
        session,
        simulation,
        ends_call: event == Some(SessionEvent::End),
    };
    let answer = serve_job(&state, job, &parts, &body, &call, fails_late).await;
    let outcome = match &answer {
        Ok(response) if response.status().is_success() => JobOutcome::Ok {
            path_status: CallStatus::from_path(parts.uri.path()),
            ends_call: call.ends_call,
        },
        _ => JobOutcome::Failed,
    };
    state.finish_call(&call, outcome);
    answer
}

/// Serves one job after the bookkeeping: its fate, latency, dependencies and answer.
async fn serve_job(
    state: &MachineState,
    job: u64,
    parts: &http::request::Parts,
    body: &Bytes,
    call: &JobCall,
    fails_late: bool,
) -> Result<Response<Full<Bytes>>, ResetFault> {
    let input = input_digest(&state.service, &parts.method, parts.uri.path(), body);
    let session = call.session.as_deref();
    let mut rng = StdRng::seed_from_u64(state.seed ^ input ^ session.map_or(0, digest_str));
    match state.behaviour.fate(job, &mut rng) {
        Fate::Hang => {
            bump(&state.counters.hung);
            state.finish_call(call, JobOutcome::Hung);
            if state.behaviour.hang.is_some_and(|t| t.fraction >= 1.0) {
                state.apply(PresenceEvent::HangEverything);
            }
            std::future::pending::<()>().await;
            unreachable!("a pending future never completes")
        }
        Fate::Reset => {
            bump(&state.counters.resets);
            Err(ResetFault)
        }
        Fate::Answer {
            latency,
            error,
            mismatch,
        } => {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let mut answer = FnvHasher::default();
            answer.write_u64(input);
            if let Err(message) = call_dependencies(state, parts, body, &mut answer).await {
                bump(&state.counters.forward_errors);
                bump(&state.counters.errors);
                return Ok(text(StatusCode::BAD_GATEWAY, message));
            }
            let outcome = AnswerOutcome {
                fails_late,
                error,
                mismatch,
                simulation: call.simulation,
            };
            Ok(answer_job(state, answer, outcome))
        }
    }
}

/// Calls every declared dependency in turn, folding their answers into `answer`; the first
/// failure's message ends the job.
async fn call_dependencies(
    state: &MachineState,
    parts: &http::request::Parts,
    body: &Bytes,
    answer: &mut FnvHasher,
) -> Result<(), String> {
    for dependency in &state.declared {
        let dependency_answer = forward(
            state,
            dependency,
            &parts.method,
            &parts.uri,
            &parts.headers,
            body,
        )
        .await?;
        answer.write(&dependency_answer);
    }
    Ok(())
}

/// What decides the answer to a job whose dependencies answered: its seeded draws (error,
/// mismatch), whether its call fails late, and whether it is a simulation copy.
struct AnswerOutcome {
    fails_late: bool,
    error: bool,
    mismatch: bool,
    simulation: bool,
}

/// The answer to a job whose dependencies answered: a late failure, an error, or the digest of
/// its input and its dependencies' answers (changed by a mismatch), with its side effect.
fn answer_job(
    state: &MachineState,
    mut answer: FnvHasher,
    outcome: AnswerOutcome,
) -> Response<Full<Bytes>> {
    if outcome.fails_late {
        bump(&state.counters.late_failures);
        bump(&state.counters.errors);
        let status = state
            .behaviour
            .late_failure
            .and_then(|l| l.status)
            .unwrap_or(state.behaviour.error_status);
        return text(status, "simulated late failure\n");
    }
    if outcome.error {
        bump(&state.counters.errors);
        return text(state.behaviour.error_status, "simulated error\n");
    }
    if outcome.mismatch {
        bump(&state.counters.mismatches);
        answer.write(b"mismatch");
    }
    if !outcome.simulation {
        bump(&state.counters.side_effects);
    } else if state.behaviour.leaks_side_effects {
        bump(&state.counters.simulation_side_effects);
    }
    bump(&state.counters.ok);
    let (body, content_type) = state.behaviour.answer.body(&state.service, answer.finish());
    let mut response = text(StatusCode::OK, body);
    if let Some(content_type) = content_type {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
    }
    response
}

/// Digest of what determines a job's answer: never the version, so versions answer alike.
fn input_digest(service: &str, method: &Method, path: &str, body: &[u8]) -> u64 {
    let mut h = FnvHasher::default();
    for part in [
        service.as_bytes(),
        method.as_str().as_bytes(),
        path.as_bytes(),
        body,
    ] {
        h.write_usize(part.len());
        h.write(part);
    }
    h.finish()
}

fn digest_str(s: &str) -> u64 {
    let mut h = FnvHasher::default();
    h.write(s.as_bytes());
    h.finish()
}

/// Headers passed on to dependencies: session stickiness, the simulation mark and its token
/// (the dependency's balancer refuses a simulation job whose token it cannot verify).
const FORWARDED_HEADERS: [&str; 4] = [
    SESSION_HEADER,
    SESSION_EVENT_HEADER,
    SIMULATION_HEADER,
    SIMULATION_AUTH_HEADER,
];

async fn forward(
    state: &MachineState,
    dependency: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Bytes, String> {
    let Some(addr) = state
        .dependencies
        .read()
        .expect("dependencies lock")
        .get(dependency)
        .copied()
    else {
        return Err(format!("dependency {dependency} has no address yet\n"));
    };
    let mut request = Request::builder().method(method.clone()).uri(format!(
        "http://{addr}{}",
        uri.path_and_query().map_or("/", |p| p.as_str())
    ));
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value.clone());
        }
    }
    let request = request
        .body(Full::new(body.clone()))
        .map_err(|e| format!("dependency {dependency}: {e}\n"))?;
    bump(&state.counters.forwarded);
    let exchange = async {
        let response = state
            .client
            .request(request)
            .await
            .map_err(|e| format!("dependency {dependency} at {addr}: {e}\n"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("dependency {dependency} at {addr}: {e}\n"))?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("dependency {dependency} answered {status}\n"))
        }
    };
    tokio::time::timeout(state.behaviour.dependency_timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("dependency {dependency} timed out\n")))
}

async fn admin(state: &MachineState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path()
        .trim_start_matches(ADMIN_PREFIX)
        .to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "stats") => json(&state.stats()),
        (Method::GET, "health") => text(StatusCode::OK, "ok\n"),
        (Method::POST, "drain") => {
            state.apply(PresenceEvent::Drain);
            text(StatusCode::OK, "draining\n")
        }
        (Method::GET, "dependencies") => {
            json(&*state.dependencies.read().expect("dependencies lock"))
        }
        (Method::PUT, "dependencies") => {
            let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
                return text(StatusCode::BAD_REQUEST, "{\"error\":\"unreadable body\"}");
            };
            let parsed: Result<BTreeMap<String, SocketAddr>, _> = serde_json::from_slice(&body);
            let result = parsed
                .map_err(|e| e.to_string())
                .and_then(|map| state.set_dependencies(map).map_err(|e| e.to_string()));
            match result {
                Ok(()) => json(&*state.dependencies.read().expect("dependencies lock")),
                Err(message) => {
                    let mut response = text(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "error": message }).to_string(),
                    );
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    response
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "unknown machine admin path\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Sends one job on a fresh connection; Err when no full answer came within 2 s.
    pub(super) async fn send(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(StatusCode, String), String> {
        let client: DependencyClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(HttpConnector::new());
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{e:?}"))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()))
    }

    fn with_faults(service: &str, version: &str, faults: FaultSpec) -> MachineSpec {
        MachineSpec {
            faults,
            ..MachineSpec::new(service, version)
        }
    }

    #[tokio::test]
    async fn versions_answer_alike_unless_a_mismatch_is_configured() {
        let v1 = spawn_machine(MachineSpec::new("routing", "v1"), local())
            .await
            .unwrap();
        let v2 = spawn_machine(
            MachineSpec {
                seed: 99,
                latency: DelaySpec::constant_ms(2.0),
                ..MachineSpec::new("routing", "v2")
            },
            local(),
        )
        .await
        .unwrap();
        let broken = spawn_machine(
            with_faults(
                "routing",
                "v3",
                FaultSpec {
                    mismatch: Some(FaultTrigger {
                        after_jobs: 1,
                        fraction: 1.0,
                    }),
                    ..FaultSpec::default()
                },
            ),
            local(),
        )
        .await
        .unwrap();
        let a = send(v1.addr(), "/route", &[], "to=1").await.unwrap();
        let b = send(v2.addr(), "/route", &[], "to=1").await.unwrap();
        assert_eq!(a.0, StatusCode::OK);
        assert_eq!(a, b);
        assert_ne!(a, send(v1.addr(), "/route", &[], "to=2").await.unwrap());
        // The mismatch fault starts after the first job.
        assert_eq!(send(broken.addr(), "/route", &[], "to=1").await.unwrap(), a);
        let c = send(broken.addr(), "/route", &[], "to=1").await.unwrap();
        assert_eq!(c.0, StatusCode::OK);
        assert_ne!(c, a);
        assert_eq!(broken.stats().mismatches, 1);
        assert_eq!(v1.stats().jobs, 2);
    }

    #[tokio::test]
    async fn hang_never_answers_and_is_counted() {
        let m = spawn_machine(
            with_faults(
                "media",
                "v2",
                FaultSpec {
                    hang: Some(FaultTrigger {
                        after_jobs: 1,
                        fraction: 1.0,
                    }),
                    ..FaultSpec::default()
                },
            ),
            local(),
        )
        .await
        .unwrap();
        assert!(send(m.addr(), "/a", &[], "").await.is_ok());
        let started = std::time::Instant::now();
        let hung =
            tokio::time::timeout(Duration::from_millis(300), send(m.addr(), "/a", &[], "")).await;
        assert!(hung.is_err(), "answered: {hung:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let stats = m.stats();
        assert_eq!((stats.jobs, stats.ok, stats.hung), (2, 1, 1));
        m.shutdown().await;
    }

    #[tokio::test]
    async fn reset_closes_the_connection_without_an_answer() {
        let m = spawn_machine(
            with_faults(
                "media",
                "v2",
                FaultSpec {
                    reset: Some(FaultTrigger {
                        after_jobs: 0,
                        fraction: 1.0,
                    }),
                    ..FaultSpec::default()
                },
            ),
            local(),
        )
        .await
        .unwrap();
        let err = send(m.addr(), "/a", &[], "x").await.unwrap_err();
        assert_ne!(err, "timed out");
        assert_eq!(m.stats().resets, 1);
        assert_eq!(m.stats().ok, 0);
    }

    #[tokio::test]
    async fn crash_after_n_jobs_stops_answering_and_listening() {
        let m = spawn_machine(
            with_faults(
                "queue",
                "v2",
                FaultSpec {
                    crash_after_jobs: Some(3),
                    ..FaultSpec::default()
                },
            ),
            local(),
        )
        .await
        .unwrap();
        for i in 0..3 {
            assert!(send(m.addr(), "/q", &[], &i.to_string()).await.is_ok());
        }
        assert!(m.is_running());
        let err = send(m.addr(), "/q", &[], "3").await.unwrap_err();
        assert_ne!(err, "timed out");
        tokio::time::timeout(Duration::from_secs(2), m.stopped())
            .await
            .unwrap();
        assert!(!m.is_running());
        assert!(m.stats().crashed);
        // New connections are refused.
        assert!(TcpStream::connect(m.addr()).await.is_err());
        m.shutdown().await;
    }

    #[tokio::test]
    async fn error_rate_answers_the_configured_status_deterministically() {
        let spec = MachineSpec {
            error_rate: 0.5,
            error_status: 503,
            seed: 4,
            ..MachineSpec::new("db", "v1")
        };
        let a = spawn_machine(spec.clone(), local()).await.unwrap();
        let b = spawn_machine(spec, local()).await.unwrap();
        let mut failed = Vec::new();
        for i in 0..40 {
            let body = format!("job {i}");
            let (sa, _) = send(a.addr(), "/q", &[], &body).await.unwrap();
            let (sb, _) = send(b.addr(), "/q", &[], &body).await.unwrap();
            // Same seed, same input: same fate, whatever the arrival order.
            assert_eq!(sa, sb);
            if sa == StatusCode::SERVICE_UNAVAILABLE {
                failed.push(i);
            } else {
                assert_eq!(sa, StatusCode::OK);
            }
        }
        assert!((8..=32).contains(&failed.len()), "{failed:?}");
        assert_eq!(a.stats().errors, failed.len() as u64);
        assert_eq!(a.stats().side_effects, 40 - failed.len() as u64);
    }

    #[test]
    fn slow_start_and_creep_shape_latency_by_arrival() {
        let spec = MachineSpec {
            faults: FaultSpec {
                slow_start: Some(SlowStartSpec {
                    extra_ms: 100.0,
                    over_jobs: 10,
                }),
                latency_creep: Some(LatencyCreepSpec {
                    per_job_us: 1_000.0,
                    max_ms: 30.0,
                }),
                ..FaultSpec::default()
            },
            ..MachineSpec::new("media", "v1")
        };
        let behaviour = spec.behaviour().unwrap();
        let latency = |job: u64| match behaviour.fate(job, &mut StdRng::seed_from_u64(job)) {
            Fate::Answer { latency, .. } => latency,
            other => panic!("{other:?}"),
        };
        assert_eq!(latency(0), Duration::from_millis(100));
        // job 5: half the slow start left (50 ms) plus 5 ms of creep.
        assert_eq!(latency(5), Duration::from_millis(55));
        assert_eq!(latency(20), Duration::from_millis(20));
        assert_eq!(latency(1_000), Duration::from_millis(30));
    }

    #[test]
    fn tail_multiplies_a_fraction_of_jobs() {
        let spec = MachineSpec {
            latency: DelaySpec::constant_ms(2.0),
            tail: Some(TailSpec {
                fraction: 0.1,
                multiplier: 3.0,
            }),
            ..MachineSpec::new("media", "v1")
        };
        let behaviour = spec.behaviour().unwrap();
        let slow = (0..10_000u64)
            .filter(|i| {
                matches!(
                    behaviour.fate(*i, &mut StdRng::seed_from_u64(*i)),
                    Fate::Answer { latency, .. } if latency == Duration::from_millis(6)
                )
            })
            .count();
        assert!((850..1_150).contains(&slow), "{slow}");
    }

    #[tokio::test]
    async fn simulation_jobs_cause_no_side_effect_and_carry_the_header_on() {
        let media = spawn_machine(MachineSpec::new("media", "v2"), local())
            .await
            .unwrap();
        let router = spawn_machine(
            MachineSpec {
                dependencies: vec!["media".to_string()],
                ..MachineSpec::new("router", "v2")
            },
            local(),
        )
        .await
        .unwrap();
        router
            .set_dependencies([("media".to_string(), media.addr())])
            .unwrap();

        let sim = [(SIMULATION_HEADER, "1")];
        let (status, _) = send(router.addr(), "/voice/setup", &sim, "call")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let (r, m) = (router.stats(), media.stats());
        assert_eq!(
            (r.simulation_jobs, r.side_effects, r.simulation_side_effects),
            (1, 0, 0)
        );
        // The dependency saw the header too, so it performed nothing either.
        assert_eq!((m.jobs, m.simulation_jobs, m.side_effects), (1, 1, 0));

        let (status, _) = send(router.addr(), "/voice/setup", &[], "call")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(router.stats().side_effects, 1);
        assert_eq!(media.stats().side_effects, 1);
        assert_eq!(media.stats().simulation_jobs, 1);
        assert_eq!(router.stats().forwarded, 2);
    }

    #[tokio::test]
    async fn a_leaking_machine_is_caught_by_the_counter() {
        let m = spawn_machine(
            with_faults(
                "media",
                "v2",
                FaultSpec {
                    leaks_side_effects: true,
                    ..FaultSpec::default()
                },
            ),
            local(),
        )
        .await
        .unwrap();
        send(m.addr(), "/x", &[(SIMULATION_HEADER, "1")], "")
            .await
            .unwrap();
        send(m.addr(), "/x", &[], "").await.unwrap();
        let stats = m.stats();
        assert_eq!((stats.simulation_side_effects, stats.side_effects), (1, 1));
    }

    #[tokio::test]
    async fn router_forwards_each_job_to_its_dependencies_and_follows_address_updates() {
        let routing = spawn_machine(MachineSpec::new("routing", "v1"), local())
            .await
            .unwrap();
        let media_a = spawn_machine(MachineSpec::new("media", "v1"), local())
            .await
            .unwrap();
        let media_b = spawn_machine(MachineSpec::new("media", "v1"), local())
            .await
            .unwrap();
        let router = spawn_machine(
            MachineSpec {
                dependencies: vec!["routing".to_string(), "media".to_string()],
                ..MachineSpec::new("router", "v1")
            },
            local(),
        )
        .await
        .unwrap();
        // No address yet: the job fails with 502 and names the dependency.
        let (status, body) = send(router.addr(), "/sms/send", &[], "hi").await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("routing"), "{body}");

        router
            .set_dependencies([
                ("routing".to_string(), routing.addr()),
                ("media".to_string(), media_a.addr()),
            ])
            .unwrap();
        let first = send(router.addr(), "/sms/send", &[], "hi").await.unwrap();
        assert_eq!(first.0, StatusCode::OK);
        assert_eq!((routing.stats().jobs, media_a.stats().jobs), (1, 1));

        // Through the admin endpoint, as the binary would be updated.
        let update = serde_json::json!({ "media": media_b.addr() }).to_string();
        let client: DependencyClient =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let response = client
            .request(
                Request::builder()
                    .method(Method::PUT)
                    .uri(format!("http://{}/__machine/dependencies", router.addr()))
                    .body(Full::new(Bytes::from(update)))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let second = send(router.addr(), "/sms/send", &[], "hi").await.unwrap();
        assert_eq!(
            second, first,
            "same input, same answer through either media machine"
        );
        assert_eq!((media_a.stats().jobs, media_b.stats().jobs), (1, 1));

        // A dependency that fails makes the job fail.
        media_b.shutdown().await;
        let (status, _) = send(router.addr(), "/sms/send", &[], "hi").await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(router.stats().forward_errors, 2);

        let err = router
            .set_dependencies([("billing".to_string(), routing.addr())])
            .unwrap_err();
        assert_eq!(err.field, "dependencies.billing");
    }

    #[tokio::test]
    async fn sessions_held_follow_setup_and_teardown_and_stats_are_served() {
        let m = spawn_machine(MachineSpec::new("media", "v1"), local())
            .await
            .unwrap();
        let start = [(SESSION_HEADER, "call-1"), (SESSION_EVENT_HEADER, "start")];
        let in_call = [(SESSION_HEADER, "call-1")];
        let end = [(SESSION_HEADER, "call-1"), (SESSION_EVENT_HEADER, "end")];
        send(m.addr(), "/voice/setup", &start, "").await.unwrap();
        send(m.addr(), "/voice/media", &in_call, "").await.unwrap();
        assert_eq!(m.stats().sessions_held, 1);
        let client: DependencyClient =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let response = client
            .get(
                format!("http://{}/__machine/stats", m.addr())
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let stats: MachineStats = serde_json::from_slice(&body).unwrap();
        assert_eq!((stats.jobs, stats.sessions_held), (2, 1));
        send(m.addr(), "/voice/teardown", &end, "").await.unwrap();
        assert_eq!(m.stats().sessions_held, 0);
        assert_eq!(m.stats().jobs, 3, "admin requests are not jobs");
    }

    #[tokio::test]
    async fn a_call_that_started_elsewhere_counts_once_as_moved_or_for_copies_as_joined() {
        let m = spawn_machine(MachineSpec::new("media", "v1"), local())
            .await
            .unwrap();
        let job = |call: &'static str, event: Option<&'static str>, marked: bool| {
            let mut headers = vec![(SESSION_HEADER, call)];
            headers.extend(event.map(|e| (SESSION_EVENT_HEADER, e)));
            headers.extend(marked.then_some((SIMULATION_HEADER, "1")));
            headers
        };
        let calls = [
            // Started here: no move, whether plain or copied.
            ("here", Some("start"), false),
            ("here", None, false),
            ("here", Some("end"), false),
            ("copied", Some("start"), true),
            ("copied", None, true),
            // Started on another machine: one move, however many of its jobs come here.
            ("moved", None, false),
            ("moved", None, false),
            ("moved", Some("end"), false),
            // Copies that began while the call was up: joined, not moved.
            ("late-copy", None, true),
            ("late-copy", Some("end"), true),
        ];
        for (call, event, marked) in calls {
            let headers = job(call, event, marked);
            send(m.addr(), "/voice/media", &headers, "").await.unwrap();
        }
        let stats = m.stats();
        assert_eq!((stats.plain_jobs, stats.simulation_jobs), (6, 4));
        assert_eq!((stats.calls_moved, stats.copied_calls_joined), (1, 1));
        assert_eq!(stats.sessions_held, 1, "the copied call has not ended");
        let seconds = m.jobs_by_second();
        let sum = |f: fn(&JobsInSecond) -> u64| seconds.iter().map(f).sum::<u64>();
        assert_eq!((sum(|s| s.plain), sum(|s| s.simulation)), (6, 4));
        assert!(seconds.windows(2).all(|w| w[0].unix_s < w[1].unix_s));
    }

    #[test]
    fn bad_specs_name_the_field() {
        let field = |text: &str| MachineSpec::from_toml_str(text).unwrap_err();
        let err = field("service = \"a\"\n[faults]\nhang = { fraction = 1.5 }\n");
        assert_eq!(err.field, "faults.hang.fraction");
        let err = field("service = \"a\"\nerror_status = 200\n");
        assert_eq!(err.field, "error_status");
        let err = field("service = \"a\"\ndependencies = [\"b\", \"b\"]\n");
        assert_eq!(err.field, "dependencies[1]");
        let err = field(
            "service = \"a\"\nlatency = { kind = \"lognormal\", median_ms = 2, sigma = -1 }\n",
        );
        assert_eq!(err.field, "latency.sigma");
        let err =
            field("service = \"a\"\n[faults]\nslow_start = { extra_ms = 5, over_jobs = 0 }\n");
        assert_eq!(err.field, "faults.slow_start.over_jobs");
        let err = field("service = \"a\"\n[faults]\nlate_failure = { fraction = 0.5 }\n");
        assert_eq!(err.field, "faults.late_failure");
        let err = field(
            "service = \"a\"\n[faults]\nlate_failure = { after_media_jobs = 2, status = 302 }\n",
        );
        assert_eq!(err.field, "faults.late_failure.status");
        let err = field("service = \"a\"\n[faults]\nlate_failure = { after_jobs = 2 }\n");
        assert!(err.problem.contains("after_jobs"), "{err}");
        // Unknown fields are refused with the key and the line.
        let err = field("service = \"a\"\n\n[faults]\nhangs = { fraction = 1.0 }\n");
        assert!(
            err.problem.contains("hangs") && err.problem.contains("line 4"),
            "{err}"
        );
        let err = field("service = \"a\"\nlatency = { kind = \"constant\", ms = 1, sigma = 2 }\n");
        assert!(err.problem.contains("sigma"), "{err}");
    }

    #[test]
    fn presence_moves_by_one_function_and_down_is_final() {
        use Presence::*;
        use PresenceEvent::*;
        assert_eq!(Starting.next(Warmed), Running);
        assert_eq!(Running.next(Warmed), Running);
        assert_eq!(Draining.next(Warmed), Draining);
        assert_eq!(Starting.next(Drain), Draining);
        assert_eq!(Running.next(Crash), Down);
        assert_eq!(Draining.next(Shutdown), Down);
        assert_eq!(Running.next(HangEverything), Hung);
        for event in [Warmed, Drain, Crash, HangEverything, Shutdown] {
            assert_eq!(Down.next(event), Down);
            assert_eq!(Hung.next(event), Hung);
        }
    }

    #[test]
    fn full_toml_form_parses() {
        let spec = MachineSpec::from_toml_str(
            r#"
service = "media"
version = "v2"
seed = 7
latency = { kind = "bimodal", fast_ms = 1.0, slow_ms = 20.0, slow_fraction = 0.05, sigma = 0.2 }
tail = { fraction = 0.001, multiplier = 3.0 }
error_rate = 0.01
error_status = 503
dependencies = ["routing"]
dependency_timeout_ms = 1000

[faults]
hang = { after_jobs = 100, fraction = 0.01 }
reset = { fraction = 0.001 }
mismatch = { fraction = 0.02 }
crash_after_jobs = 5000
slow_start = { extra_ms = 50.0, over_jobs = 200 }
latency_creep = { per_job_us = 2.0, max_ms = 100.0 }
leaks_side_effects = false
late_failure = { fraction = 0.3, after_media_jobs = 6, after_media_ms = 3000, status = 503 }
"#,
        )
        .unwrap();
        assert_eq!(spec.faults.crash_after_jobs, Some(5000));
        assert_eq!(spec.faults.reset.as_ref().unwrap().after_jobs, 0);
        assert_eq!(
            spec.faults.late_failure.as_ref().unwrap().after_media_jobs,
            Some(6)
        );
    }
}

#[cfg(test)]
#[path = "machine_hub_tests.rs"]
mod hub_tests;

#[cfg(test)]
mod answer_tests {
    use super::*;

    fn json(spec: &AnswerSpec, digest: u64) -> serde_json::Value {
        let (body, content_type) = spec.body("media", digest);
        assert_eq!(content_type, Some("application/json"));
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn json_answers_differ_only_where_asked() {
        let v1 = AnswerSpec {
            format: AnswerFormat::Json,
            volatile_field: Some("generated_at".into()),
            changed_fields: Vec::new(),
        };
        let (a, b) = (json(&v1, 42), json(&v1, 42));
        assert_eq!(a["items"], b["items"]);
        assert_eq!(a["answer"], b["answer"]);
        assert_ne!(a["generated_at"], b["generated_at"]);
        let v2 = AnswerSpec {
            changed_fields: vec!["price".into()],
            ..v1.clone()
        };
        let c = json(&v2, 42);
        assert_eq!(c["answer"], a["answer"]);
        assert_eq!(c["items"][0]["sku"], a["items"][0]["sku"]);
        let price = |v: &serde_json::Value| v["items"][1]["price"].as_f64().unwrap();
        assert!((price(&c) - price(&a) - 1.0).abs() < 1e-9);
        // The default stays a line of text.
        let (text, content_type) = AnswerSpec::default().body("media", 42);
        assert_eq!(
            (&text[..], content_type),
            (&b"media 000000000000002a\n"[..], None)
        );
    }

    #[test]
    fn json_options_are_checked() {
        let text_with_field = AnswerSpec {
            volatile_field: Some("t".into()),
            ..AnswerSpec::default()
        };
        assert!(text_with_field.validate().is_err());
        let bad_change = AnswerSpec {
            format: AnswerFormat::Json,
            volatile_field: None,
            changed_fields: vec!["colour".into()],
        };
        let err = bad_change.validate().unwrap_err().to_string();
        assert!(err.contains("changed_fields[0]"), "{err}");
        let clash = AnswerSpec {
            format: AnswerFormat::Json,
            volatile_field: Some("price".into()),
            changed_fields: Vec::new(),
        };
        assert!(clash.validate().is_err());
    }
}
