//! Signed configs: a balancer given a secret key at boot applies only configs the controller
//! signed with that key (an `understudy_hub` envelope from "controller" on
//! `control.balancer-config`, checked by `understudy_hub::ControllerVerifier`: signature,
//! sequence, so an old signed config replayed is refused too). The same check guards the admin
//! `PUT .../config`, the key rotation call and the optional hub feed (SSE on the controller's hub,
//! or NATS). Refusals are JSON `{"error", "reason"}` and counted in
//! `understudy_balancer_config_rejected_total{service,reason}`; the running config stays.
//! Keys are never logged: `Debug` shows them redacted.
//!
//! Replays across a restart: the verifier's memory of the controller's last sequence number is
//! lost when the balancer restarts, so at start each gate refuses everything numbered below the
//! clock less `max_clock_skew` (the controller numbers its messages by its clock in microseconds).
//! A config captured more than the skew before the restart is refused (`out_of_order`); one
//! captured within it could be applied once, until the controller's next push supersedes it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use prometheus::{IntCounterVec, Opts, Registry};
use understudy_hub::envelope::{restart_floor, ConfigRejection};
use understudy_hub::nats::{NatsBackend, NatsOptions, Receive};
use understudy_hub::{
    Backend, ControllerVerifier, Filter, Rejection, SecretKey, CONFIG_TOPIC, READ_AUTH_HEADER,
    READ_TOPIC,
};
use understudy_wire::{write_key_file, BalancerConfig, KeyRotation};

use crate::service::{PushError, PushResult, Service};

pub use understudy_hub::CONTROLLER_ID;
/// Largest signed message read (a config with many machines stays far below).
pub const MAX_SIGNED_BYTES: usize = 1 << 20;
/// Default of [`crate::SpawnOptions::max_clock_skew`] (the controller's `[hub] max_clock_skew_ms`).
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);

/// The payload of a signed read.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedRead {
    /// The path and query read, exactly as requested.
    path: String,
}

/// Where a balancer's key came from; a rotated key is written back to its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key in base64 (rewritten on rotation).
    File(PathBuf),
    /// An environment variable holding the key in base64 (rotation is in memory only).
    Env(String),
    /// Handed over by the embedding program (the scenario runner).
    Given,
}

/// One balancer's secret key and its source.
#[derive(Debug, Clone)]
pub struct BalancerKey {
    pub key: SecretKey,
    pub source: KeySource,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("environment variable {var}: {problem}")]
    Env { var: String, problem: String },
}

impl BalancerKey {
    /// Reads a key file: the key in standard base64 (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<BalancerKey, KeyLoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyLoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let key = SecretKey::from_base64(&text).map_err(|e| KeyLoadError::File {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        Ok(BalancerKey {
            key,
            source: KeySource::File(path.to_path_buf()),
        })
    }

    /// Reads a key from an environment variable (base64).
    pub fn from_env(var: &str) -> Result<BalancerKey, KeyLoadError> {
        let text = std::env::var(var).map_err(|e| KeyLoadError::Env {
            var: var.to_string(),
            problem: e.to_string(),
        })?;
        let key = SecretKey::from_base64(&text).map_err(|e| KeyLoadError::Env {
            var: var.to_string(),
            problem: e.to_string(),
        })?;
        Ok(BalancerKey {
            key,
            source: KeySource::Env(var.to_string()),
        })
    }

    pub fn given(key: SecretKey) -> BalancerKey {
        BalancerKey {
            key,
            source: KeySource::Given,
        }
    }
}

/// Besides the admin `PUT`, where a balancer takes its configs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFeed {
    /// The controller's embedded hub: `GET {url}/api/v1/hub/subscribe?topic=control.balancer-config&service=S`
    /// (server-sent events), reconnecting after a cut. `url` is the controller's base URL.
    Hub { url: String },
    /// A NATS server (`nats://host:port`), subject `understudy.control.balancer-config`.
    Nats { url: String },
}

/// Process-level signing settings (part of [`crate::SpawnOptions`]).
#[derive(Debug, Clone)]
pub struct ConfigSigning {
    /// Per service: the key its configs must be signed with. A balancer without a key takes
    /// plain, unsigned configs (the behaviour before signing).
    pub keys: BTreeMap<String, BalancerKey>,
    /// Also take signed configs from the controller's hub (every balancer needs a key then).
    pub feed: Option<ConfigFeed>,
    /// After a key rotation the previous key is accepted until the first config signed with the
    /// new one, or this long.
    pub rotation_grace: Duration,
}

impl Default for ConfigSigning {
    fn default() -> Self {
        ConfigSigning {
            keys: BTreeMap::new(),
            feed: None,
            rotation_grace: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("a key is given for service {0:?}, which has no balancer in this process")]
    UnknownService(String),
    #[error("the config feed needs a key for every balancer; {0:?} has none")]
    FeedWithoutKey(String),
    #[error("signing metrics: {0}")]
    Metrics(String),
}

/// Why a signed message was refused: HTTP status, metric reason, message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn from_rejection(rejection: &Rejection) -> Refusal {
        let status = match rejection {
            Rejection::Oversized { .. } => 413,
            Rejection::Malformed(_) => 400,
            Rejection::ForbiddenTopic { .. } => 403,
            Rejection::Unsigned
            | Rejection::UnknownSender(_)
            | Rejection::BadSignature(_)
            | Rejection::Replayed { .. }
            | Rejection::OutOfOrder { .. } => 401,
        };
        Refusal {
            status,
            reason: rejection.reason(),
            message: rejection.to_string(),
        }
    }

    fn malformed(message: String) -> Refusal {
        Refusal {
            status: 400,
            reason: "malformed",
            message,
        }
    }
}

struct Gate {
    verifier: Mutex<ControllerVerifier>,
    /// Signed reads (stats, config) are sequenced apart from configs.
    reads: Mutex<ControllerVerifier>,
    /// The current key: the balancer also signs its hub subscription with it.
    key: Mutex<SecretKey>,
    source: KeySource,
}

/// Every keyed balancer's verifier, and the refusal counter.
pub(crate) struct ConfigGates {
    gates: HashMap<String, Gate>,
    grace: Duration,
    rejected: IntCounterVec,
    /// The balancer's registry: the signing metrics (and the NATS feed's) are on its `/metrics`.
    registry: Registry,
}

impl ConfigGates {
    /// `max_clock_skew`: every gate starts with the controller's floor at the clock less this.
    /// The refusal counter is registered in `registry` (the balancer's).
    pub(crate) fn new(
        signing: &ConfigSigning,
        services: &[&str],
        max_clock_skew: Duration,
        registry: &Registry,
    ) -> Result<ConfigGates, SigningError> {
        if let Some(unknown) = signing
            .keys
            .keys()
            .find(|s| !services.contains(&s.as_str()))
        {
            return Err(SigningError::UnknownService(unknown.clone()));
        }
        if signing.feed.is_some() {
            if let Some(bare) = services.iter().find(|s| !signing.keys.contains_key(**s)) {
                return Err(SigningError::FeedWithoutKey(bare.to_string()));
            }
        }
        let metrics = |e: prometheus::Error| SigningError::Metrics(e.to_string());
        let rejected = IntCounterVec::new(
            Opts::new(
                "understudy_balancer_config_rejected_total",
                "Signed config messages refused (running config kept), by reason.",
            ),
            &["service", "reason"],
        )
        .map_err(metrics)?;
        registry
            .register(Box::new(rejected.clone()))
            .map_err(metrics)?;
        let mut gates = HashMap::new();
        for (service, key) in &signing.keys {
            for reason in Rejection::ALL_REASONS {
                rejected.with_label_values(&[service.as_str(), reason]);
            }
            let verifier = || {
                // The verifier's own counter is not exported: this module counts per service.
                let mut verifier = ControllerVerifier::new(
                    CONTROLLER_ID,
                    key.key.clone(),
                    MAX_SIGNED_BYTES,
                    &Registry::new(),
                )
                .map_err(|e| SigningError::Metrics(e.to_string()))?;
                verifier.restore_floor(restart_floor(max_clock_skew));
                Ok::<_, SigningError>(Mutex::new(verifier))
            };
            gates.insert(
                service.clone(),
                Gate {
                    verifier: verifier()?,
                    reads: verifier()?,
                    key: Mutex::new(key.key.clone()),
                    source: key.source.clone(),
                },
            );
        }
        Ok(ConfigGates {
            gates,
            grace: signing.rotation_grace,
            rejected,
            registry: registry.clone(),
        })
    }

    pub(crate) fn is_signed(&self, service: &str) -> bool {
        self.gates.contains_key(service)
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    fn refuse(&self, service: &str, refusal: Refusal) -> Refusal {
        tracing::warn!(
            service,
            reason = refusal.reason,
            "signed config message refused: {}",
            refusal.message
        );
        self.rejected
            .with_label_values(&[service, refusal.reason])
            .inc();
        refusal
    }

    /// Verifies a signed message for `service` and returns its payload.
    fn open(&self, service: &str, raw: &[u8]) -> Result<serde_json::Value, Refusal> {
        let gate = self.gates.get(service).ok_or_else(|| Refusal {
            status: 400,
            reason: "malformed",
            message: format!("the balancer of {service:?} has no key: it takes plain configs"),
        })?;
        if raw.len() > MAX_SIGNED_BYTES {
            let r = Rejection::Oversized {
                size: raw.len(),
                limit: MAX_SIGNED_BYTES,
            };
            return Err(self.refuse(service, Refusal::from_rejection(&r)));
        }
        // A plain config (no envelope around it) gets a message saying what is expected.
        let plain = serde_json::from_slice::<serde_json::Value>(raw)
            .ok()
            .is_some_and(|v| v.is_object() && v.get("signature").is_none());
        if plain {
            return Err(self.refuse(
                service,
                Refusal {
                    status: 401,
                    reason: "unsigned",
                    message: format!(
                        "the balancer of {service:?} takes only configs signed by the controller: an envelope {{sender, seq, topic: {CONFIG_TOPIC:?}, payload, signature}}"
                    ),
                },
            ));
        }
        let result = gate
            .verifier
            .lock()
            .expect("verifier lock poisoned")
            .verify_config::<serde_json::Value>(raw, Instant::now());
        result.map_err(|e| self.rejected(service, e))
    }

    /// A fresh token for `service`'s balancer to subscribe to the controller's hub (signed with
    /// its key as `balancer.{service}`); `None` for a keyless balancer.
    pub(crate) fn subscribe_token(&self, service: &str) -> Option<String> {
        let gate = self.gates.get(service)?;
        let key = gate.key.lock().expect("key lock poisoned").clone();
        let sender = understudy_hub::http::balancer_subscriber(service);
        let mut signer = understudy_hub::Signer::new(&sender, key).ok()?;
        Some(signer.subscribe_token())
    }

    /// Checks a signed read of `path_and_query` on `service`'s admin endpoint: the
    /// [`READ_AUTH_HEADER`] holds base64 of an envelope from the controller on [`READ_TOPIC`]
    /// whose payload names this very path (so a captured one opens nothing else, and once).
    pub(crate) fn check_read(
        &self,
        service: &str,
        header: Option<&[u8]>,
        path_and_query: &str,
    ) -> Result<(), Refusal> {
        let Some(gate) = self.gates.get(service) else {
            return Ok(());
        };
        let Some(header) = header else {
            let refusal = Refusal {
                status: 401,
                reason: "unsigned",
                message: format!(
                    "reads of the balancer of {service:?} are signed by the controller: \
                     {READ_AUTH_HEADER} is missing"
                ),
            };
            return Err(self.refuse(service, refusal));
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(header)
            .map_err(|_| {
                let message = format!("{READ_AUTH_HEADER} is not base64");
                self.refuse(service, Refusal::malformed(message))
            })?;
        let read: SignedRead = gate
            .reads
            .lock()
            .expect("verifier lock poisoned")
            .verify_on(READ_TOPIC, &raw, Instant::now())
            .map_err(|e| self.rejected(service, e))?;
        if read.path != path_and_query {
            let message = format!(
                "the signed read is for {:?}, not {path_and_query:?}",
                read.path
            );
            return Err(self.refuse(service, Refusal::malformed(message)));
        }
        Ok(())
    }

    fn rejected(&self, service: &str, rejection: ConfigRejection) -> Refusal {
        match rejection {
            ConfigRejection::Rejected(r) => self.refuse(service, Refusal::from_rejection(&r)),
            ConfigRejection::Payload(e) => {
                self.refuse(service, Refusal::malformed(format!("payload: {e}")))
            }
        }
    }

    /// A verified config for `service` (from the admin `PUT` or the hub feed).
    pub(crate) fn open_config(&self, service: &str, raw: &[u8]) -> Result<BalancerConfig, Refusal> {
        let payload = self.open(service, raw)?;
        if payload.get("rotate_key").is_some() {
            return Err(self.refuse(
                service,
                Refusal::malformed(
                    "a key rotation is not a config: send it to PUT /api/v1/balancers/{service}/config-key"
                        .into(),
                ),
            ));
        }
        // Not counted: a signed config that does not validate is the controller's bug, not
        // an attack; it is refused like an unsigned bad config.
        serde_json::from_value(payload).map_err(|e| Refusal {
            status: 400,
            reason: "bad_config",
            message: format!("bad config: {e}"),
        })
    }

    /// Rotates `service`'s key to the one in a message signed with the current key. A key read
    /// from a file is written back to it first (so a restart keeps the new key).
    pub(crate) fn rotate(&self, service: &str, raw: &[u8]) -> Result<Duration, Refusal> {
        let payload = self.open(service, raw)?;
        let rotation: KeyRotation = serde_json::from_value(payload)
            .map_err(|e| self.refuse(service, Refusal::malformed(format!("key rotation: {e}"))))?;
        if rotation.service != service {
            return Err(self.refuse(
                service,
                Refusal::malformed(format!(
                    "key rotation is for service {:?}, this is {service:?}",
                    rotation.service
                )),
            ));
        }
        let key = SecretKey::from_base64(&rotation.rotate_key)
            .map_err(|e| self.refuse(service, Refusal::malformed(format!("rotate_key: {e}"))))?;
        let gate = &self.gates[service];
        match &gate.source {
            KeySource::File(path) => write_key_file(path, &key).map_err(|e| Refusal {
                status: 500,
                reason: "key_file",
                message: format!("cannot write key file {}: {e}", path.display()),
            })?,
            KeySource::Env(var) => tracing::warn!(
                service,
                "key rotated in memory only: set {var} to the new key before the next restart"
            ),
            KeySource::Given => {}
        }
        let now = Instant::now();
        *gate.key.lock().expect("key lock poisoned") = key.clone();
        for verifier in [&gate.verifier, &gate.reads] {
            verifier
                .lock()
                .expect("verifier lock poisoned")
                .rotate(key.clone(), self.grace, now);
        }
        tracing::info!(
            service,
            grace_ms = self.grace.as_millis() as u64,
            "config key rotated"
        );
        Ok(self.grace)
    }
}

/// Verifies and applies one config message from the hub feed.
async fn apply_from_feed(gates: &ConfigGates, service: &Service, raw: &[u8]) {
    let config = match gates.open_config(&service.name, raw) {
        Ok(config) => config,
        Err(_) => return, // logged and counted by the gate
    };
    match service.push(&config).await {
        Ok(PushResult::Applied) => tracing::info!(
            service = &*service.name,
            version = config.version,
            "config applied (from the hub)"
        ),
        Ok(PushResult::AlreadyRunning) => {}
        Err(e @ PushError::Stale { .. }) => {
            tracing::debug!(service = &*service.name, "hub config ignored: {e}")
        }
        Err(e @ PushError::StaleEpoch { .. }) => {
            tracing::warn!(service = &*service.name, "hub config fenced off: {e}")
        }
        Err(e) => tracing::warn!(service = &*service.name, "hub config refused: {e}"),
    }
}

/// Starts the feed's tasks on `runtime` (one per balancer).
pub(crate) fn start_feed(
    feed: &ConfigFeed,
    gates: &Arc<ConfigGates>,
    services: &HashMap<String, Arc<Service>>,
    runtime: &tokio::runtime::Handle,
) -> Vec<tokio::task::JoinHandle<()>> {
    match feed {
        ConfigFeed::Hub { url } => services
            .values()
            .map(|service| {
                runtime.spawn(sse_feed(
                    url.trim_end_matches('/').to_string(),
                    gates.clone(),
                    service.clone(),
                ))
            })
            .collect(),
        ConfigFeed::Nats { url } => vec![runtime.spawn(nats_feed(
            url.clone(),
            gates.clone(),
            services.values().cloned().collect(),
        ))],
    }
}

const RECONNECT: Duration = Duration::from_secs(1);

/// Subscribes to the controller's hub (server-sent events) and applies each verified config;
/// reconnects after a cut (the controller re-sends a config until the balancer runs it).
async fn sse_feed(base: String, gates: Arc<ConfigGates>, service: Arc<Service>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let url = format!(
        "{base}/api/v1/hub/subscribe?topic={CONFIG_TOPIC}&service={}",
        query_escape(&service.name)
    );
    let mut last_problem = String::new();
    loop {
        let problem = match sse_session(&client, &url, &gates, &service).await {
            Ok(reason) => format!("subscription ended ({reason})"),
            Err(e) => e,
        };
        if problem != last_problem {
            tracing::warn!(service = &*service.name, %url, "config feed: {problem}; retrying");
            last_problem = problem;
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a query value.
fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

type SseClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

async fn sse_session(
    client: &SseClient,
    url: &str,
    gates: &ConfigGates,
    service: &Service,
) -> Result<String, String> {
    let mut request = http::Request::get(url).header(http::header::ACCEPT, "text/event-stream");
    if let Some(token) = gates.subscribe_token(&service.name) {
        request = request.header(understudy_hub::http::SUBSCRIBE_AUTH_HEADER, token);
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("hub answered {}", response.status()));
    }
    tracing::info!(service = &*service.name, %url, "config feed connected");
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buffer.extend_from_slice(data);
        // Events end with a blank line.
        while let Some(end) = find_event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end.1).collect();
            let (kind, data) = parse_event(&event[..end.0]);
            match kind.as_deref() {
                Some("message") => apply_from_feed(gates, service, data.as_bytes()).await,
                Some("disconnected") => return Ok(data),
                _ => {} // keep-alive comments
            }
        }
        if buffer.len() > 2 * MAX_SIGNED_BYTES {
            return Err("an event larger than the signed-message limit".into());
        }
    }
    Ok("stream closed".into())
}

/// (end of the event's text, end including the blank line).
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The `event:` name and the joined `data:` lines of one event.
fn parse_event(text: &[u8]) -> (Option<String>, String) {
    let text = String::from_utf8_lossy(text);
    let mut kind = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (kind, data.join("\n"))
}

/// Takes configs from NATS: one backend receiving only the config topic (each message verified
/// by the balancer's own gate), one local subscription per balancer.
async fn nats_feed(url: String, gates: Arc<ConfigGates>, services: Vec<Arc<Service>>) {
    let mut last_problem = String::new();
    let backend = loop {
        let options = NatsOptions {
            topics: Some(vec![CONFIG_TOPIC.to_string()]),
            receive: Receive::SubscriberVerifies,
            max_message_bytes: MAX_SIGNED_BYTES,
            client_name: "understudy-balancer".into(),
        };
        match NatsBackend::connect_with(&url, gates.registry(), options).await {
            Ok(backend) => break Arc::new(backend),
            Err(e) => {
                let problem = e.to_string();
                if problem != last_problem {
                    tracing::warn!(%url, "config feed: {problem}; retrying");
                    last_problem = problem;
                }
                tokio::time::sleep(RECONNECT).await;
            }
        }
    };
    tracing::info!(%url, "config feed connected to NATS");
    let mut tasks = Vec::new();
    for service in services {
        let (backend, gates) = (backend.clone(), gates.clone());
        tasks.push(tokio::spawn(async move {
            let filter = Filter {
                topic: Some(CONFIG_TOPIC.to_string()),
                service: Some(service.name.to_string()),
                ..Filter::default()
            };
            loop {
                let mut subscription = match backend.subscribe(filter.clone(), 64).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(service = &*service.name, "config feed: {e}");
                        return;
                    }
                };
                while let Some(envelope) = subscription.recv().await {
                    match serde_json::to_vec(&*envelope) {
                        Ok(raw) => apply_from_feed(&gates, &service, &raw).await,
                        Err(e) => tracing::warn!("config feed: envelope does not serialize: {e}"),
                    }
                }
                tracing::warn!(
                    service = &*service.name,
                    reason = ?subscription.disconnect_reason(),
                    "config feed subscription ended; subscribing again"
                );
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_and_parsed() {
        let stream = b"event: message\nid: controller:1\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: disconnected\r\ndata: {\"reason\":\"slow\"}\r\n\r\n";
        let mut buffer = stream.to_vec();
        let mut events = Vec::new();
        while let Some(end) = find_event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end.1).collect();
            events.push(parse_event(&event[..end.0]));
        }
        assert_eq!(
            events,
            vec![
                (Some("message".into()), "{\"a\":1}".into()),
                (None, String::new()),
                (Some("disconnected".into()), "{\"reason\":\"slow\"}".into()),
            ]
        );
        assert!(buffer.is_empty());
    }

    fn media_config(version: u64) -> BalancerConfig {
        BalancerConfig {
            service: "media".into(),
            version,
            epoch: 0,
            mirror_fraction: 1.0,
            compare_body: false,
            compare: None,
            compare_headers: Vec::new(),
            drain_timeout_ms: 30_000,
            machines: vec![understudy_wire::MachineEntry {
                id: "media-1".into(),
                version: "v1".into(),
                // Never contacted: only configs are pushed here.
                address: "127.0.0.1:9".into(),
                weight: 100,
                config: understudy_wire::PoolRole::Active,
                health_path: None,
            }],
        }
    }

    /// A keyed balancer process, as `understudy-proxy` starts it.
    fn boot(key: &SecretKey, max_clock_skew: Duration) -> crate::RunningBalancers {
        crate::spawn_with(
            crate::ProcessConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                vec![crate::BalancerSpec::new(
                    "127.0.0.1:0".parse().unwrap(),
                    media_config(1),
                )],
            ),
            crate::SpawnOptions {
                signing: ConfigSigning {
                    keys: [("media".to_string(), BalancerKey::given(key.clone()))].into(),
                    ..ConfigSigning::default()
                },
                marker_key: Some(SecretKey::generate()),
                max_clock_skew,
                ..crate::SpawnOptions::default()
            },
        )
        .unwrap()
    }

    /// PUTs a signed config; (status, reason).
    async fn put(
        running: &crate::RunningBalancers,
        envelope: &understudy_hub::Envelope,
    ) -> (u16, String) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let url = format!(
            "http://{}{}",
            running.admin_addr(),
            understudy_wire::config_path("media")
        );
        let request = http::Request::put(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(
                serde_json::to_vec(envelope).unwrap(),
            )))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .unwrap()
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        (
            status,
            body["reason"].as_str().unwrap_or_default().to_string(),
        )
    }

    #[tokio::test]
    async fn a_config_captured_before_a_balancer_restart_is_refused_after_it() {
        let key = SecretKey::generate();
        let mut controller = understudy_hub::Signer::new(CONTROLLER_ID, key.clone()).unwrap();
        let sign = |signer: &mut understudy_hub::Signer, version: u64| {
            signer.sign(
                CONFIG_TOPIC,
                serde_json::to_value(media_config(version)).unwrap(),
            )
        };
        // Signed 3 s ago, longer than the 2 s skew (e.g. captured then).
        let three_seconds_ago = understudy_hub::envelope::wall_clock_micros() - 3_000_000;
        let mut past =
            understudy_hub::Signer::starting_at(CONTROLLER_ID, key.clone(), three_seconds_ago)
                .unwrap();
        let captured = sign(&mut past, 2);

        // The first boot with a wide skew stands for a balancer up for a while (its floor far
        // back), so the capture is applied before the restart.
        let running = boot(&key, Duration::from_secs(60));
        assert_eq!(
            put(&running, &captured).await.0,
            200,
            "applied before the restart"
        );
        assert_eq!(put(&running, &sign(&mut controller, 3)).await.0, 200);
        drop(running);

        // Restarted: it runs version 1 again, so only the floor stops the captured version 2.
        let running = boot(&key, Duration::from_secs(2));
        assert_eq!(
            put(&running, &captured).await,
            (401, "out_of_order".to_string())
        );
        let metrics = metrics_page(&running).await;
        assert!(
            metrics.contains(
                "understudy_balancer_config_rejected_total{reason=\"out_of_order\",service=\"media\"} 1"
            ),
            "{metrics}"
        );
        // The controller, numbering by its clock, goes on being accepted.
        assert_eq!(put(&running, &sign(&mut controller, 4)).await.0, 200);
        // A controller whose clock lags by less than the skew too.
        let lagging_start = understudy_hub::envelope::wall_clock_micros() - 1_000_000;
        let mut lagging =
            understudy_hub::Signer::starting_at(CONTROLLER_ID, key.clone(), lagging_start).unwrap();
        drop(running);
        let restarted = boot(&key, Duration::from_secs(2));
        assert_eq!(put(&restarted, &sign(&mut lagging, 5)).await.0, 200);
    }

    async fn metrics_page(running: &crate::RunningBalancers) -> String {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
        let url = format!("http://{}/metrics", running.admin_addr());
        let response = client.get(url.parse().unwrap()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_escape("media-1.v2_x~"), "media-1.v2_x~");
        assert_eq!(query_escape("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn keys_load_from_files_and_env_and_never_print() {
        let dir = std::env::temp_dir().join(format!("understudy-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("media.key");
        let key = SecretKey::generate();
        write_key_file(&path, &key).unwrap();
        let loaded = BalancerKey::from_file(&path).unwrap();
        assert_eq!(loaded.key.to_base64(), key.to_base64());
        assert!(!format!("{loaded:?}").contains(&key.to_base64()));
        // The file's mode (owner only) is `understudy_wire::write_key_file`'s own test.
        std::fs::write(&path, "c2hvcnQ=").unwrap();
        let err = BalancerKey::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("media.key") && err.contains("at least 16"),
            "{err}"
        );
        let err = BalancerKey::from_file(&dir.join("missing.key")).unwrap_err();
        assert!(err.to_string().contains("missing.key"), "{err}");
        let err = BalancerKey::from_env("UNDERSTUDY_TEST_SURELY_UNSET_KEY").unwrap_err();
        assert!(err.to_string().contains("UNDERSTUDY_TEST_SURELY_UNSET_KEY"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
