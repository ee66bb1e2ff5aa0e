//! A machine publishing its state to the controller's hub: signed envelopes (`understudy_hub::Signer`)
//! POSTed one at a time to `{url}/api/v1/hub/publish` by a task of their own, so a job's answer
//! never waits on the hub. Topics: `machine.state` (a `MachineRecord`: at start, on every status
//! change, every heartbeat) and `call.state` (batched call status events). See docs/loadgen.md.

use crate::calls::CallStatus;
use crate::presence::Presence;
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use understudy_hub::{Envelope, MachineRecord, Role, SecretKey, Signer, Status};

/// Topic of a machine's state reports (payload: `MachineRecord`).
pub const MACHINE_STATE_TOPIC: &str = "machine.state";
/// Topic of call status events (payload: [`CallStateBatch`]).
pub const CALL_STATE_TOPIC: &str = "call.state";
/// Path of the hub's publish route under the controller's base URL.
pub const PUBLISH_PATH: &str = "/api/v1/hub/publish";
/// A batch of call events is sent at least this often...
pub const CALL_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// ...or as soon as it holds this many events.
pub const CALL_BATCH_EVENTS: usize = 256;
/// Call events waiting to be published; beyond this they are dropped (and counted).
pub const CALL_BUFFER_EVENTS: usize = 4_096;

/// What a machine reports once a `hang` fault that hits every job has fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HangReport {
    /// One last `machine.state` with status `down` (as a watchdog would), then nothing.
    #[default]
    Down,
    /// Nothing more at all: the controller notices only by the missing heartbeats.
    Silent,
}

/// Where and as whom a machine publishes. `Debug` never shows the key (`SecretKey` redacts it).
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The controller's base URL, e.g. `http://127.0.0.1:9000`.
    pub url: String,
    /// The machine's id: the envelopes' sender, as registered.
    pub id: String,
    /// The key from the registration answer.
    pub key: SecretKey,
    /// The role reported in `machine.state` (what the machine was told; see `set_role`).
    pub role: Role,
    /// Sessions it can hold at once, as reported.
    pub capacity: u32,
    /// Advertised `host:port`; default the machine's bound address.
    pub address: Option<String>,
    pub heartbeat_ms: u64,
    /// Longest wait for one POST; past it the message counts as a failure and is not retried.
    pub publish_timeout_ms: u64,
    pub hang_report: HangReport,
}

/// A hub option that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum HubOptionsError {
    #[error("hub.{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("this machine already publishes to a hub")]
    AlreadyPublishing,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> HubOptionsError {
    HubOptionsError::Invalid {
        field,
        problem: problem.into(),
    }
}

impl HubOptions {
    /// Options with the defaults: role standby, capacity 100, heartbeat 1 s, timeout 2 s, a full
    /// hang reported as `down`. `key_base64` is the registration answer's `key`.
    pub fn new(
        url: impl Into<String>,
        id: impl Into<String>,
        key_base64: &str,
    ) -> Result<HubOptions, HubOptionsError> {
        let key = SecretKey::from_base64(key_base64).map_err(|e| invalid("key", e.to_string()))?;
        let options = HubOptions {
            url: url.into(),
            id: id.into(),
            key,
            role: Role::Standby,
            capacity: 100,
            address: None,
            heartbeat_ms: 1_000,
            publish_timeout_ms: 2_000,
            hang_report: HangReport::Down,
        };
        options.publish_uri()?;
        Ok(options)
    }

    fn publish_uri(&self) -> Result<Uri, HubOptionsError> {
        let uri: Uri = format!("{}{PUBLISH_PATH}", self.url.trim_end_matches('/'))
            .parse()
            .map_err(|e| invalid("url", format!("{:?} is not a URL: {e}", self.url)))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(invalid(
                "url",
                format!("{:?} must be http://HOST:PORT", self.url),
            ));
        }
        Ok(uri)
    }

    /// Checks every field and builds the signer.
    pub(crate) fn validate(&self) -> Result<(Uri, Signer), HubOptionsError> {
        let uri = self.publish_uri()?;
        let signer =
            Signer::new(&self.id, self.key.clone()).map_err(|e| invalid("id", e.to_string()))?;
        if self.capacity == 0 {
            return Err(invalid("capacity", "must be at least 1"));
        }
        if self.heartbeat_ms == 0 {
            return Err(invalid("heartbeat_ms", "must be at least 1"));
        }
        if self.publish_timeout_ms == 0 {
            return Err(invalid("publish_timeout_ms", "must be at least 1"));
        }
        if let Some(address) = &self.address {
            if address
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(invalid("address", format!("{address:?} is not HOST:PORT")));
            }
        }
        Ok((uri, signer))
    }
}

/// One event of a call, as published in `call.state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallEvent {
    /// The session id (`x-session-id`).
    pub object: String,
    /// Always `"call"`.
    pub kind: String,
    pub status: CallStatus,
    /// Wall clock, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Payload of a `call.state` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallStateBatch {
    pub service: String,
    pub version: String,
    /// `active`, or `simulation` for mirrored copies (`x-understudy-simulation: 1`).
    pub config: String,
    /// The machine's id.
    pub machine: String,
    pub events: Vec<CallEvent>,
}

/// An event on its way to the publisher.
#[derive(Debug)]
pub(crate) struct QueuedEvent {
    pub(crate) session: String,
    pub(crate) status: CallStatus,
    pub(crate) simulation: bool,
    pub(crate) at_ms: u64,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Publishing counters (all 0 for a machine without a hub).
#[derive(Debug, Default)]
pub(crate) struct HubCounters {
    pub(crate) published: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) call_events: AtomicU64,
    pub(crate) call_events_dropped: AtomicU64,
}

/// What the machine keeps of its publisher: where jobs put call events, and the reported role.
#[derive(Debug)]
pub(crate) struct HubLink {
    pub(crate) events: mpsc::Sender<QueuedEvent>,
    pub(crate) role: watch::Sender<Role>,
    /// A rotated key, taken by the publisher before its next message.
    pub(crate) key: watch::Sender<Option<SecretKey>>,
    pub(crate) task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The publisher's side of a [`HubLink`].
pub(crate) struct Inbox {
    events: mpsc::Receiver<QueuedEvent>,
    role: watch::Receiver<Role>,
    key: watch::Receiver<Option<SecretKey>>,
}

/// A link for the machine and the inbox of its publisher.
pub(crate) fn hub_link(role: Role) -> (HubLink, Inbox) {
    let (events, events_rx) = mpsc::channel(CALL_BUFFER_EVENTS);
    let (role, role_rx) = watch::channel(role);
    let (key, key_rx) = watch::channel(None);
    let link = HubLink {
        events,
        role,
        key,
        task: std::sync::Mutex::new(None),
    };
    let inbox = Inbox {
        events: events_rx,
        role: role_rx,
        key: key_rx,
    };
    (link, inbox)
}

impl HubLink {
    /// Queues an event without waiting: a full buffer drops it (counted).
    pub(crate) fn offer(&self, event: QueuedEvent, counters: &HubCounters) {
        counters.call_events.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            counters.call_events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why one message did not land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublishError {
    /// No answer: connection refused, reset, or the timeout passed.
    Transport(String),
    /// The hub answered and refused the message (e.g. 401 `bad_signature`).
    Refused { status: u16, reason: String },
}

type HubClient = Client<HttpConnector, Full<Bytes>>;

/// How envelopes leave the machine.
pub(crate) enum Transport {
    Http {
        // Boxed: the client is large and the test variant small.
        client: Box<HubClient>,
        uri: Uri,
        timeout: Duration,
    },
    /// Tests: straight into a verifier and a channel, no socket (so the paused clock works).
    #[cfg(test)]
    Memory {
        verifier: Arc<std::sync::Mutex<understudy_hub::Verifier>>,
        delivered: mpsc::UnboundedSender<Envelope>,
    },
}

impl Transport {
    pub(crate) fn http(uri: Uri, timeout: Duration) -> Transport {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Transport::Http {
            client: Box::new(Client::builder(TokioExecutor::new()).build(connector)),
            uri,
            timeout,
        }
    }

    async fn send(&self, envelope: &Envelope) -> Result<(), PublishError> {
        match self {
            Transport::Http {
                client,
                uri,
                timeout,
            } => {
                let body = serde_json::to_vec(envelope).expect("an envelope serializes");
                let request = Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| PublishError::Transport(e.to_string()))?;
                let exchange = async {
                    let response = client
                        .request(request)
                        .await
                        .map_err(|e| PublishError::Transport(format!("{uri}: {e}")))?;
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| PublishError::Transport(format!("{uri}: {e}")))?
                        .to_bytes();
                    if status.is_success() {
                        return Ok(());
                    }
                    Err(PublishError::Refused {
                        status: status.as_u16(),
                        reason: refusal_reason(status, &body),
                    })
                };
                tokio::time::timeout(*timeout, exchange)
                    .await
                    .unwrap_or_else(|_| {
                        Err(PublishError::Transport(format!(
                            "{uri}: no answer within {timeout:?}"
                        )))
                    })
            }
            #[cfg(test)]
            Transport::Memory {
                verifier,
                delivered,
            } => {
                let raw = serde_json::to_vec(envelope).expect("an envelope serializes");
                let verified = verifier
                    .lock()
                    .expect("verifier lock")
                    .verify_bytes(&raw, std::time::Instant::now());
                match verified {
                    Ok(envelope) => {
                        let _ = delivered.send(envelope);
                        Ok(())
                    }
                    Err(rejection) => Err(PublishError::Refused {
                        status: 401,
                        reason: rejection.reason().to_string(),
                    }),
                }
            }
        }
    }
}

/// The hub's refusal body is `{"error": "...", "reason": "..."}`; keep both for the log.
fn refusal_reason(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Refusal {
        #[serde(default)]
        error: String,
        #[serde(default)]
        reason: String,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(r) if !r.reason.is_empty() => format!("{} ({})", r.reason, r.error),
        _ => format!("{status}: {}", String::from_utf8_lossy(body).trim()),
    }
}

/// What the publisher reads of its machine (the machine's state implements it).
pub(crate) trait Reported: Send + Sync {
    fn service(&self) -> &str;
    fn version(&self) -> &str;
    fn presence(&self) -> tokio::sync::watch::Receiver<Presence>;
    /// Calls it holds now.
    fn sessions_held(&self) -> usize;
    fn hub_counters(&self) -> &HubCounters;
}

/// The publisher task's own state.
pub(crate) struct Publisher {
    pub(crate) state: Arc<dyn Reported>,
    pub(crate) options: HubOptions,
    pub(crate) address: String,
    pub(crate) signer: Signer,
    pub(crate) transport: Transport,
    inbox: Inbox,
    /// Sending the last words: the controller may be gone already (a scenario tears down).
    closing: bool,
    failure_logged: bool,
    refusal_logged: bool,
}

impl Publisher {
    pub(crate) fn new(
        state: Arc<dyn Reported>,
        options: HubOptions,
        address: String,
        signer: Signer,
        transport: Transport,
        inbox: Inbox,
    ) -> Publisher {
        Publisher {
            state,
            options,
            address,
            signer,
            transport,
            inbox,
            closing: false,
            failure_logged: false,
            refusal_logged: false,
        }
    }

    /// Runs until the machine is down (or hung): state at once, on changes and every
    /// heartbeat; call events in batches.
    pub(crate) async fn run(mut self) {
        let mut presence = self.state.presence();
        let mut heartbeat = tokio::time::interval(Duration::from_millis(self.options.heartbeat_ms));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(CALL_FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<QueuedEvent> = Vec::new();
        let last = loop {
            // Status changes first, so a crash is reported before a heartbeat would say running.
            tokio::select! {
                biased;
                changed = presence.changed() => {
                    let now = *presence.borrow_and_update();
                    if changed.is_err() || now.is_final() {
                        break now;
                    }
                    self.publish_state(now).await;
                }
                Ok(()) = self.inbox.role.changed() => {
                    let now = *presence.borrow();
                    self.publish_state(now).await;
                }
                _ = heartbeat.tick() => {
                    let now = *presence.borrow();
                    if now.is_final() {
                        break now;
                    }
                    self.publish_state(now).await;
                }
                Some(event) = self.inbox.events.recv() => {
                    batch.push(event);
                    if batch.len() >= CALL_BATCH_EVENTS {
                        self.publish_calls(&mut batch).await;
                    }
                }
                _ = flush.tick() => {
                    if !batch.is_empty() {
                        self.publish_calls(&mut batch).await;
                    }
                }
            }
        };
        if last == Presence::Hung && self.options.hang_report == HangReport::Silent {
            return;
        }
        // Last words: the call events already queued, then the final status.
        self.closing = true;
        while let Ok(event) = self.inbox.events.try_recv() {
            batch.push(event);
            if batch.len() >= CALL_BATCH_EVENTS {
                self.publish_calls(&mut batch).await;
            }
        }
        if !batch.is_empty() {
            self.publish_calls(&mut batch).await;
        }
        self.publish_state(last).await;
    }

    fn record(&self, presence: Presence) -> MachineRecord {
        let status = match presence {
            Presence::Starting => Status::Starting,
            Presence::Running => Status::Running,
            Presence::Draining => Status::Draining,
            Presence::Down | Presence::Hung => Status::Down,
        };
        MachineRecord {
            id: self.options.id.clone(),
            service: self.state.service().to_string(),
            version: self.state.version().to_string(),
            address: self.address.clone(),
            role: *self.inbox.role.borrow(),
            status,
            capacity: self.options.capacity,
            sessions: u32::try_from(self.state.sessions_held()).unwrap_or(u32::MAX),
        }
    }

    async fn publish_state(&mut self, presence: Presence) {
        let payload = serde_json::to_value(self.record(presence)).expect("a record serializes");
        self.publish(MACHINE_STATE_TOPIC, payload).await;
    }

    /// Sends the batch as one message per configuration (active first), then empties it.
    async fn publish_calls(&mut self, batch: &mut Vec<QueuedEvent>) {
        for simulation in [false, true] {
            let events: Vec<CallEvent> = batch
                .iter()
                .filter(|e| e.simulation == simulation)
                .map(|e| CallEvent {
                    object: e.session.clone(),
                    kind: "call".to_string(),
                    status: e.status,
                    at_ms: e.at_ms,
                })
                .collect();
            if events.is_empty() {
                continue;
            }
            let payload = CallStateBatch {
                service: self.state.service().to_string(),
                version: self.state.version().to_string(),
                config: if simulation { "simulation" } else { "active" }.to_string(),
                machine: self.options.id.clone(),
                events,
            };
            let payload = serde_json::to_value(payload).expect("a batch serializes");
            self.publish(CALL_STATE_TOPIC, payload).await;
        }
        batch.clear();
    }

    /// Signs and sends one message; never retries (the next heartbeat says it again).
    async fn publish(&mut self, topic: &str, payload: serde_json::Value) {
        if self.inbox.key.has_changed().unwrap_or(false) {
            if let Some(key) = self.inbox.key.borrow_and_update().clone() {
                self.signer.rotate(key);
            }
        }
        let envelope = self.signer.sign(topic, payload);
        let counters = self.state.hub_counters();
        match self.transport.send(&envelope).await {
            Ok(()) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(PublishError::Transport(problem)) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                if self.closing {
                    tracing::debug!(machine = %self.options.id, %topic, %problem, "last message not delivered");
                } else if !std::mem::replace(&mut self.failure_logged, true) {
                    tracing::warn!(
                        machine = %self.options.id, %topic, %problem,
                        "cannot publish to the hub; further failures are only counted (hub_publish_failures)"
                    );
                }
            }
            Err(PublishError::Refused { status, reason }) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut self.refusal_logged, true) {
                    tracing::warn!(
                        machine = %self.options.id, %topic, status, %reason,
                        "the hub refused a message; further refusals are only counted (hub_refused)"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    #[test]
    fn options_are_checked_naming_the_field_and_never_show_the_key() {
        let ok = HubOptions::new("http://127.0.0.1:9000/", "media-1", KEY).unwrap();
        assert_eq!(
            ok.validate().unwrap().0.to_string(),
            "http://127.0.0.1:9000/api/v1/hub/publish"
        );
        let debug = format!("{ok:?}");
        assert!(
            debug.contains("redacted") && !debug.contains(KEY),
            "{debug}"
        );

        let field = |e: HubOptionsError| match e {
            HubOptionsError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(
            field(HubOptions::new("http://h:1", "m", "c2hvcnQ=").unwrap_err()),
            "key"
        );
        assert_eq!(
            field(HubOptions::new("ftp://h:1", "m", KEY).unwrap_err()),
            "url"
        );
        assert_eq!(
            field(HubOptions::new("not a url", "m", KEY).unwrap_err()),
            "url"
        );
        let with = |f: fn(&mut HubOptions)| {
            let mut o = ok.clone();
            f(&mut o);
            field(o.validate().unwrap_err())
        };
        assert_eq!(with(|o| o.id = "has space".into()), "id");
        assert_eq!(with(|o| o.capacity = 0), "capacity");
        assert_eq!(with(|o| o.heartbeat_ms = 0), "heartbeat_ms");
        assert_eq!(with(|o| o.publish_timeout_ms = 0), "publish_timeout_ms");
        assert_eq!(with(|o| o.address = Some("nohost".into())), "address");
    }

    #[test]
    fn a_refusal_body_gives_its_reason() {
        let body = br#"{"error":"bad signature from media-1","reason":"bad_signature"}"#;
        assert_eq!(
            refusal_reason(StatusCode::UNAUTHORIZED, body),
            "bad_signature (bad signature from media-1)"
        );
        assert_eq!(
            refusal_reason(StatusCode::NOT_FOUND, b"nope\n"),
            "404 Not Found: nope"
        );
    }
}
