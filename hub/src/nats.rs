//! The hub over NATS (`async-nats`; nats-server from Debian's packages): the same [`Backend`]
//! contract as the embedded hub, for deployments past one machine.
//!
//! - `publish` sends the envelope's JSON to the subject `understudy.{topic}`.
//! - One NATS subscription per backend covers what the process receives: `understudy.>` by
//!   default, or `understudy.{topic}` for each topic of [`NatsOptions::topics`] (a balancer takes
//!   only `control.balancer-config`). Each message is checked ONCE per process and then fanned out
//!   locally: `subscribe` applies the whole [`Filter`] here and forwards into a bounded
//!   [`subscriber_queue`] with the embedded hub's rule (full queue: disconnected as `slow`; the
//!   receive loop never waits for a subscriber).
//! - NATS is transport, not trust. What a received message must pass is [`Receive`]:
//!   only what this very backend published (the default; the controller publishes only envelopes
//!   it verified itself), or that plus anything a given [`Verifier`] accepts (signature and
//!   sequence), or nothing (each subscriber verifies itself, e.g. a balancer's
//!   `ControllerVerifier`). The message's subject must name its envelope's topic.
//!   Refusals are counted in `understudy_hub_nats_rejected_total{reason}`.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec, Registry};

use crate::envelope::{register_counter_vec, Envelope, MetricsError, Rejection, Verifier};
use crate::hub::{
    register_counter, subscriber_queue, Backend, BackendError, DisconnectReason, FanOutMetrics,
    Filter, Subscriber, Subscription,
};

/// Every hub subject starts with this.
pub const SUBJECT_PREFIX: &str = "understudy.";

/// The NATS subject of a topic.
pub fn subject_of(topic: &str) -> String {
    format!("{SUBJECT_PREFIX}{topic}")
}

/// What a message received from NATS must pass before local subscribers see it.
#[derive(Debug, Clone, Default)]
pub enum Receive {
    /// Only envelopes this backend published itself (its caller verified them before
    /// `publish`); anything else is refused as `unknown_sender`.
    #[default]
    OwnOnly,
    /// Own envelopes, and any other that this verifier accepts. Pass the verifier the HTTP
    /// transport uses: own envelopes are recognised (not verified twice, so no false `replayed`).
    Verify(Arc<Mutex<Verifier>>),
    /// Every well-formed envelope: each subscriber verifies what it takes (a balancer checks
    /// configs with its `ControllerVerifier`).
    SubscriberVerifies,
}

/// How a [`NatsBackend`] connects and what it receives.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Topics received; `None` = every hub topic (`understudy.>`).
    pub topics: Option<Vec<String>>,
    pub receive: Receive,
    /// Received messages larger than this are refused (`oversized`).
    pub max_message_bytes: usize,
    /// NATS client name (shown by the server's monitoring).
    pub client_name: String,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            topics: None,
            receive: Receive::OwnOnly,
            max_message_bytes: 64 * 1024,
            client_name: "understudy".into(),
        }
    }
}

/// A topic as the verifier accepts it (so never a NATS wildcard `*` or `>`).
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 128
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Own envelopes published and not yet seen coming back, bounded (oldest forgotten first).
const OWN_ECHOES: usize = 16_384;

type EchoKey = (String, u64, Option<String>);

fn echo_key(envelope: &Envelope) -> EchoKey {
    (
        envelope.sender.clone(),
        envelope.seq,
        envelope.signature.clone(),
    )
}

#[derive(Default)]
struct OwnEchoes {
    order: VecDeque<EchoKey>,
    pending: HashSet<EchoKey>,
}

impl OwnEchoes {
    fn insert(&mut self, key: EchoKey) {
        if self.pending.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > OWN_ECHOES {
            if let Some(old) = self.order.pop_front() {
                self.pending.remove(&old);
            }
        }
    }

    /// True once per published envelope: a second copy is not ours.
    fn take(&mut self, key: &EchoKey) -> bool {
        // `order` keeps the key until it is popped; `pending` decides.
        self.pending.remove(key)
    }
}

struct Metrics {
    fan_out: FanOutMetrics,
    received: IntCounter,
    rejected: IntCounterVec,
}

impl Metrics {
    fn new(registry: &Registry) -> Result<Metrics, MetricsError> {
        let fan_out = FanOutMetrics::register(registry, "Hub messages published (sent to NATS)")?;
        let received = register_counter(
            registry,
            "understudy_hub_nats_received_total",
            "Hub messages received from NATS and accepted",
        )?;
        let rejected = register_counter_vec(
            registry,
            "understudy_hub_nats_rejected_total",
            "Hub messages received from NATS and refused, by reason",
            &["reason"],
        )?;
        for reason in Rejection::ALL_REASONS {
            rejected.with_label_values(&[reason]);
        }
        Ok(Metrics {
            fan_out,
            received,
            rejected,
        })
    }
}

/// What the receive loops and the backend share.
struct Shared {
    subscribers: Mutex<Option<Vec<Subscriber>>>,
    own: Mutex<OwnEchoes>,
    receive: Receive,
    max_bytes: usize,
    metrics: Metrics,
}

impl Shared {
    fn refuse(&self, rejection: &Rejection) {
        tracing::debug!(
            reason = rejection.reason(),
            "NATS message refused: {rejection}"
        );
        self.metrics
            .rejected
            .with_label_values(&[rejection.reason()])
            .inc();
    }

    /// Checks one raw NATS message (see [`Receive`]) and fans it out. Never waits.
    fn on_message(&self, subject: &str, raw: &[u8]) {
        let verifier = match &self.receive {
            Receive::Verify(v) => Some(v),
            _ => None,
        };
        let count_there = |rejection: &Rejection| {
            if let Some(v) = verifier {
                v.lock().expect("verifier lock poisoned").count(rejection);
            }
        };
        if raw.len() > self.max_bytes {
            let rejection = Rejection::Oversized {
                size: raw.len(),
                limit: self.max_bytes,
            };
            count_there(&rejection);
            return self.refuse(&rejection);
        }
        let envelope: Envelope = match serde_json::from_slice(raw) {
            Ok(e) => e,
            Err(e) => {
                let rejection = Rejection::Malformed(e.to_string());
                count_there(&rejection);
                return self.refuse(&rejection);
            }
        };
        // The subject routes; it must say what the envelope says, or a filter on one could be
        // dodged by the other.
        if subject.strip_prefix(SUBJECT_PREFIX) != Some(envelope.topic.as_str()) {
            let rejection = Rejection::Malformed(format!(
                "subject {subject:?} does not carry topic {:?}",
                envelope.topic
            ));
            count_there(&rejection);
            return self.refuse(&rejection);
        }
        let own = self
            .own
            .lock()
            .expect("echo lock poisoned")
            .take(&echo_key(&envelope));
        let envelope = if own {
            envelope
        } else {
            match &self.receive {
                Receive::OwnOnly => {
                    return self.refuse(&Rejection::UnknownSender(envelope.sender));
                }
                Receive::Verify(verifier) => {
                    let verified = verifier
                        .lock()
                        .expect("verifier lock poisoned")
                        .verify(envelope, Instant::now());
                    match verified {
                        Ok(e) => e,
                        Err(rejection) => return self.refuse(&rejection),
                    }
                }
                Receive::SubscriberVerifies => envelope,
            }
        };
        self.metrics.received.inc();
        self.fan_out(Arc::new(envelope));
    }

    fn fan_out(&self, envelope: Arc<Envelope>) {
        let mut guard = self.subscribers.lock().expect("subscribers lock poisoned");
        if let Some(subscribers) = guard.as_mut() {
            self.metrics.fan_out.fan_out(subscribers, &envelope);
        }
    }
}

/// A [`Backend`] on a NATS server. Dropping it stops its receive loops.
pub struct NatsBackend {
    client: async_nats::Client,
    shared: Arc<Shared>,
    topics: Option<Vec<String>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for NatsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackend")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl NatsBackend {
    /// Connects with the default [`NatsOptions`]: every topic, own envelopes only.
    pub async fn connect(url: &str, registry: &Registry) -> Result<NatsBackend, BackendError> {
        NatsBackend::connect_with(url, registry, NatsOptions::default()).await
    }

    /// Connects, subscribes and makes sure the server has the subscriptions before returning
    /// (a message published by anyone after this returns is received).
    pub async fn connect_with(
        url: &str,
        registry: &Registry,
        options: NatsOptions,
    ) -> Result<NatsBackend, BackendError> {
        let transport = |what: &str, e: &dyn std::fmt::Display| {
            BackendError::Transport(format!("NATS {url}: {what}: {e}"))
        };
        if let Some(topics) = &options.topics {
            if topics.is_empty() {
                return Err(BackendError::Transport(
                    "NATS options: topics is empty (leave it unset for every topic)".into(),
                ));
            }
            if let Some(bad) = topics.iter().find(|t| !valid_topic(t)) {
                return Err(BackendError::Transport(format!(
                    "NATS options: topic {bad:?} is not 1..=128 bytes of [A-Za-z0-9._:-]"
                )));
            }
        }
        let client = async_nats::ConnectOptions::new()
            .name(&options.client_name)
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| transport("connect", &e))?;
        let subjects: Vec<String> = match &options.topics {
            None => vec![format!("{SUBJECT_PREFIX}>")],
            Some(topics) => topics.iter().map(|t| subject_of(t)).collect(),
        };
        let mut subscribers = Vec::new();
        for subject in &subjects {
            subscribers.push(
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| transport("subscribe", &e))?,
            );
        }
        round_trip(&client)
            .await
            .map_err(|e| transport("first round trip", &e))?;
        // Registered only once connected, so a caller may retry a failed connect with the
        // same registry.
        let metrics = Metrics::new(registry).map_err(|e| transport("metrics", &e))?;
        let shared = Arc::new(Shared {
            subscribers: Mutex::new(Some(Vec::new())),
            own: Mutex::new(OwnEchoes::default()),
            receive: options.receive,
            max_bytes: options.max_message_bytes,
            metrics,
        });
        let loops = subscribers
            .into_iter()
            .map(|mut nats_sub| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    while let Some(message) = nats_sub.next().await {
                        shared.on_message(message.subject.as_str(), &message.payload);
                    }
                })
            })
            .collect();
        tracing::info!(%url, subjects = ?subjects, "hub on NATS");
        Ok(NatsBackend {
            client,
            shared,
            topics: options.topics,
            loops,
        })
    }

    fn receives(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|topics| topics.iter().any(|t| t == topic))
    }

    /// Ends every local subscription (`hub_closed`) and stops receiving; later calls fail with
    /// `Closed`.
    pub fn close(&self) {
        let taken = self
            .shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .take();
        for sub in taken.into_iter().flatten() {
            self.shared
                .metrics
                .fan_out
                .disconnected
                .with_label_values(&[DisconnectReason::HubClosed.as_str()])
                .inc();
            sub.queue.close(DisconnectReason::HubClosed);
        }
        self.shared.metrics.fan_out.subscribers.set(0);
        for task in &self.loops {
            task.abort();
        }
    }

    fn is_closed(&self) -> bool {
        self.shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .is_none()
    }
}

impl Drop for NatsBackend {
    fn drop(&mut self) {
        for task in &self.loops {
            task.abort();
        }
    }
}

/// Publishes to a private inbox this client listens on and waits for it: the server handles a
/// connection's operations in order, so every earlier subscription is then in place.
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish(inbox, Vec::new().into())
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let got = tokio::time::timeout(Duration::from_secs(5), probe.next())
        .await
        .map_err(|_| "no answer within 5 s".to_string())?;
    let _ = probe.unsubscribe().await;
    got.map(|_| ()).ok_or_else(|| "connection closed".into())
}

#[async_trait::async_trait]
impl Backend for NatsBackend {
    /// Sends to NATS; returns 0 (delivery happens on the receivers' side).
    async fn publish(&self, envelope: Envelope) -> Result<usize, BackendError> {
        if self.is_closed() {
            return Err(BackendError::Closed);
        }
        let body = serde_json::to_vec(&envelope)
            .map_err(|e| BackendError::Transport(format!("envelope does not serialize: {e}")))?;
        let key = echo_key(&envelope);
        let echoes = self.receives(&envelope.topic);
        // Recorded before sending, so the echo can never arrive first.
        if echoes {
            self.shared
                .own
                .lock()
                .expect("echo lock poisoned")
                .insert(key.clone());
        }
        let sent = self
            .client
            .publish(subject_of(&envelope.topic), body.into())
            .await;
        if let Err(e) = sent {
            if echoes {
                self.shared
                    .own
                    .lock()
                    .expect("echo lock poisoned")
                    .take(&key);
            }
            return Err(BackendError::Transport(format!("NATS publish: {e}")));
        }
        self.shared.metrics.fan_out.published.inc();
        Ok(0)
    }

    async fn subscribe(
        &self,
        filter: Filter,
        capacity: usize,
    ) -> Result<Subscription, BackendError> {
        if let Some(topics) = &self.topics {
            if !filter.topic.as_ref().is_some_and(|t| topics.contains(t)) {
                return Err(BackendError::Transport(format!(
                    "this NATS backend receives only topics {topics:?}: the filter's topic must be one of them"
                )));
            }
        }
        let mut guard = self
            .shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned");
        let subscribers = guard.as_mut().ok_or(BackendError::Closed)?;
        let (queue, subscription) = subscriber_queue(capacity);
        subscribers.push(Subscriber { filter, queue });
        self.shared
            .metrics
            .fan_out
            .subscribers
            .set(subscribers.len() as i64);
        Ok(subscription)
    }
}

/// A `nats-server` child process on a free loopback port with a temporary directory, for tests
/// and local runs. Killed (and waited for) on drop.
pub struct NatsServer {
    child: Child,
    url: String,
    _dir: TempDir,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error("nats-server is not installed (not found on PATH): run scripts/setup.sh, which installs Debian's nats-server")]
    NotInstalled,
    #[error("nats-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("nats-server did not report its port within {0:?} (log: {1})")]
    NoPort(Duration, String),
}

/// A directory removed on drop (std only, so the crate needs no extra dependency).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl NatsServer {
    /// Starts `nats-server -a 127.0.0.1 -p -1` (a random free port) and reads the port from the
    /// ports file it writes.
    pub fn start() -> Result<NatsServer, NatsServerError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("understudy-nats-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let log = dir.0.join("nats-server.log");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(&dir.0)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => NatsServerError::NotInstalled,
                _ => NatsServerError::Io(e),
            })?;
        let mut server = NatsServer {
            child,
            url: String::new(),
            _dir: dir,
        };
        let wait = Duration::from_secs(10);
        let deadline = Instant::now() + wait;
        let ports_file = server
            ._dir
            .0
            .join(format!("nats-server_{}.ports", server.child.id()));
        loop {
            if let Some(url) = read_client_url(&ports_file) {
                server.url = url;
                return Ok(server);
            }
            if Instant::now() > deadline || server.child.try_wait()?.is_some() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(NatsServerError::NoPort(wait, text));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The first client URL of a ports file (`{"nats": ["nats://127.0.0.1:PORT"], ...}`).
fn read_client_url(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("nats")?.get(0)?.as_str().map(str::to_string)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Keyring, SecretKey, Signer};
    use crate::hub::tests::metric;
    use serde_json::json;

    fn server() -> NatsServer {
        match NatsServer::start() {
            Ok(s) => s,
            Err(e) => panic!("cannot run the NATS tests: {e}"),
        }
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(vec![b; 32]).unwrap()
    }

    async fn recv(sub: &mut Subscription) -> Arc<Envelope> {
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("a message within 5 s")
            .expect("subscription open")
    }

    /// Nothing more arrives: a probe published after `sent` on the same connection comes first.
    async fn assert_nothing_before_probe(sub: &mut Subscription, probe_seq: u64) {
        let got = recv(sub).await;
        assert_eq!(got.seq, probe_seq, "unexpected message {got:?}");
    }

    #[tokio::test]
    async fn publish_reaches_other_processes_subscribers_with_filters() {
        let nats = server();
        let (reg_a, reg_b) = (Registry::new(), Registry::new());
        let publisher = NatsBackend::connect(nats.url(), &reg_a).await.unwrap();
        let receiver = NatsBackend::connect_with(
            nats.url(),
            &reg_b,
            NatsOptions {
                receive: Receive::SubscriberVerifies,
                ..NatsOptions::default()
            },
        )
        .await
        .unwrap();
        let mut media = receiver
            .subscribe(
                Filter {
                    service: Some("media".into()),
                    topic: Some("machine.state".into()),
                    ..Filter::default()
                },
                8,
            )
            .await
            .unwrap();
        let mut everything = receiver.subscribe(Filter::default(), 8).await.unwrap();
        let mut own = publisher.subscribe(Filter::default(), 8).await.unwrap();
        let mut signer = Signer::starting_at("m1", key(1), 1).unwrap();
        let router = signer.sign("machine.state", json!({"service": "router"}));
        let media_msg = signer.sign("machine.state", json!({"service": "media"}));
        let other_topic = signer.sign("call.state", json!({"service": "media"}));
        for e in [&router, &media_msg, &other_topic] {
            assert_eq!(publisher.publish(e.clone()).await.unwrap(), 0);
        }
        assert_eq!(*recv(&mut media).await, media_msg);
        for want in [&router, &media_msg, &other_topic] {
            assert_eq!(*recv(&mut everything).await, *want);
            // The publisher's own subscribers get its messages too (own echoes).
            assert_eq!(*recv(&mut own).await, *want);
        }
        assert!(media.try_recv().is_none());
        assert_eq!(metric(&reg_a, "understudy_hub_published_total", None), 3);
        assert_eq!(
            metric(&reg_b, "understudy_hub_nats_received_total", None),
            3
        );
        assert_eq!(metric(&reg_b, "understudy_hub_delivered_total", None), 4);
        assert_eq!(metric(&reg_b, "understudy_hub_subscribers", None), 2);
    }

    #[tokio::test]
    async fn topic_scoped_backend_receives_only_its_topics() {
        let nats = server();
        let registry = Registry::new();
        let publisher = NatsBackend::connect(nats.url(), &Registry::new())
            .await
            .unwrap();
        let balancer = NatsBackend::connect_with(
            nats.url(),
            &registry,
            NatsOptions {
                topics: Some(vec![crate::CONFIG_TOPIC.into()]),
                receive: Receive::SubscriberVerifies,
                ..NatsOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(balancer.subscribe(Filter::default(), 4).await.is_err());
        let mut configs = balancer
            .subscribe(
                Filter {
                    topic: Some(crate::CONFIG_TOPIC.into()),
                    service: Some("media".into()),
                    ..Filter::default()
                },
                4,
            )
            .await
            .unwrap();
        let mut controller = Signer::starting_at("controller", key(9), 1).unwrap();
        publisher
            .publish(controller.sign("machine.state", json!({"service": "media"})))
            .await
            .unwrap();
        let config = controller.sign(crate::CONFIG_TOPIC, json!({"service": "media"}));
        publisher.publish(config.clone()).await.unwrap();
        assert_eq!(*recv(&mut configs).await, config);
        // The machine.state message never reached this process.
        assert_eq!(
            metric(&registry, "understudy_hub_nats_received_total", None),
            1
        );
    }

    #[tokio::test]
    async fn slow_subscriber_is_cut_and_the_others_keep_pace() {
        let nats = server();
        let registry = Registry::new();
        let hub = NatsBackend::connect(nats.url(), &registry).await.unwrap();
        let mut slow = hub.subscribe(Filter::default(), 2).await.unwrap();
        let mut fast = hub.subscribe(Filter::default(), 2).await.unwrap();
        let mut signer = Signer::starting_at("m1", key(1), 1).unwrap();
        for n in 1..=10u64 {
            let e = signer.sign("machine.state", json!({ "n": n }));
            hub.publish(e.clone()).await.unwrap();
            // The fast one reads each message; the slow one never reads.
            assert_eq!(*recv(&mut fast).await, e);
        }
        assert_eq!(recv(&mut slow).await.payload["n"], 1);
        assert_eq!(recv(&mut slow).await.payload["n"], 2);
        assert!(slow.recv().await.is_none());
        assert_eq!(slow.disconnect_reason(), Some(DisconnectReason::Slow));
        assert_eq!(fast.disconnect_reason(), None);
        assert_eq!(
            metric(&registry, "understudy_hub_disconnected_total", Some("slow")),
            1
        );
        assert_eq!(metric(&registry, "understudy_hub_subscribers", None), 1);
        hub.close();
        assert!(fast.recv().await.is_none());
        assert_eq!(fast.disconnect_reason(), Some(DisconnectReason::HubClosed));
        assert!(matches!(
            hub.publish(signer.sign("machine.state", json!({}))).await,
            Err(BackendError::Closed)
        ));
    }

    #[tokio::test]
    async fn forged_messages_injected_into_nats_are_refused() {
        let nats = server();
        let registry = Registry::new();
        let verifier_registry = Registry::new();
        let mut keyring = Keyring::new();
        keyring.insert("m1", key(1)).unwrap();
        let verifier = Arc::new(Mutex::new(
            Verifier::new(keyring, 4096, &verifier_registry).unwrap(),
        ));
        let controller = NatsBackend::connect_with(
            nats.url(),
            &registry,
            NatsOptions {
                receive: Receive::Verify(verifier.clone()),
                max_message_bytes: 4096,
                ..NatsOptions::default()
            },
        )
        .await
        .unwrap();
        let mut sub = controller.subscribe(Filter::default(), 64).await.unwrap();

        // An attacker with plain access to the NATS server.
        let attacker = async_nats::connect(nats.url()).await.unwrap();
        let inject = |subject: &str, body: Vec<u8>| {
            let attacker = attacker.clone();
            let subject = subject.to_string();
            async move { attacker.publish(subject, body.into()).await.unwrap() }
        };
        let mut m1 = Signer::starting_at("m1", key(1), 100).unwrap();
        let genuine = m1.sign("machine.state", json!({"status": "running"}));
        // A genuine message from another process is verified and delivered.
        inject(
            "understudy.machine.state",
            serde_json::to_vec(&genuine).unwrap(),
        )
        .await;
        assert_eq!(*recv(&mut sub).await, genuine);

        let mut forger = Signer::starting_at("m1", key(2), 200).unwrap();
        let mut stranger = Signer::starting_at("m9", key(1), 1).unwrap();
        let mut tampered = m1.sign("machine.state", json!({"status": "running"}));
        tampered.payload = json!({"status": "down"});
        let mut unsigned = m1.sign("machine.state", json!({}));
        unsigned.signature = None;
        let wrong_subject = m1.sign("call.state", json!({}));
        let big = m1.sign("machine.state", json!({"blob": "x".repeat(5000)}));
        let forged: Vec<(&str, Vec<u8>)> = vec![
            ("understudy.machine.state", b"{not json".to_vec()),
            (
                "understudy.machine.state",
                serde_json::to_vec(&forger.sign("machine.state", json!({}))).unwrap(),
            ),
            (
                "understudy.machine.state",
                serde_json::to_vec(&stranger.sign("machine.state", json!({}))).unwrap(),
            ),
            (
                "understudy.machine.state",
                serde_json::to_vec(&tampered).unwrap(),
            ),
            (
                "understudy.machine.state",
                serde_json::to_vec(&unsigned).unwrap(),
            ),
            // A replay of the genuine message.
            (
                "understudy.machine.state",
                serde_json::to_vec(&genuine).unwrap(),
            ),
            // Signed, but sent on another topic's subject.
            (
                "understudy.machine.state",
                serde_json::to_vec(&wrong_subject).unwrap(),
            ),
            (
                "understudy.machine.state",
                serde_json::to_vec(&big).unwrap(),
            ),
        ];
        for (subject, body) in forged {
            inject(subject, body).await;
        }
        // A genuine message sent after the forgeries on the same connection arrives next:
        // none of them got through.
        let probe = m1.sign("machine.state", json!({"status": "draining"}));
        inject(
            "understudy.machine.state",
            serde_json::to_vec(&probe).unwrap(),
        )
        .await;
        assert_nothing_before_probe(&mut sub, probe.seq).await;
        for (reason, n) in [
            ("malformed", 2),
            ("bad_signature", 2),
            ("unknown_sender", 1),
            ("unsigned", 1),
            ("replayed", 1),
            ("oversized", 1),
        ] {
            assert_eq!(
                metric(
                    &registry,
                    "understudy_hub_nats_rejected_total",
                    Some(reason)
                ),
                n,
                "{reason}"
            );
            // The shared verifier counted them as well.
            assert_eq!(
                metric(
                    &verifier_registry,
                    "understudy_hub_rejected_total",
                    Some(reason)
                ),
                n,
                "verifier {reason}"
            );
        }

        // Its own messages are not verified again (no false `replayed`), even though the
        // verifier already accepted them on the HTTP path.
        let via_http = m1.sign("machine.state", json!({"status": "running"}));
        verifier
            .lock()
            .unwrap()
            .verify(via_http.clone(), Instant::now())
            .unwrap();
        controller.publish(via_http.clone()).await.unwrap();
        assert_eq!(*recv(&mut sub).await, via_http);
        // ...but a copy of it injected afterwards is a replay.
        inject(
            "understudy.machine.state",
            serde_json::to_vec(&via_http).unwrap(),
        )
        .await;
        let probe = m1.sign("machine.state", json!({"n": 2}));
        inject(
            "understudy.machine.state",
            serde_json::to_vec(&probe).unwrap(),
        )
        .await;
        assert_nothing_before_probe(&mut sub, probe.seq).await;
        assert_eq!(
            metric(
                &registry,
                "understudy_hub_nats_rejected_total",
                Some("replayed")
            ),
            2
        );
    }

    #[tokio::test]
    async fn own_only_backend_refuses_everything_it_did_not_publish() {
        let nats = server();
        let registry = Registry::new();
        let hub = NatsBackend::connect(nats.url(), &registry).await.unwrap();
        let mut sub = hub.subscribe(Filter::default(), 8).await.unwrap();
        let attacker = async_nats::connect(nats.url()).await.unwrap();
        let mut m1 = Signer::starting_at("controller", key(1), 1).unwrap();
        let injected = m1.sign(crate::CONFIG_TOPIC, json!({"service": "media"}));
        attacker
            .publish(
                subject_of(crate::CONFIG_TOPIC),
                serde_json::to_vec(&injected).unwrap().into(),
            )
            .await
            .unwrap();
        attacker.flush().await.unwrap();
        let own = m1.sign(crate::CONFIG_TOPIC, json!({"service": "media"}));
        // Let the injected one arrive first (different connections have no common order).
        tokio::time::timeout(Duration::from_secs(5), async {
            while metric(
                &registry,
                "understudy_hub_nats_rejected_total",
                Some("unknown_sender"),
            ) == 0
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the injected message is refused");
        hub.publish(own.clone()).await.unwrap();
        assert_eq!(*recv(&mut sub).await, own);
        assert!(sub.try_recv().is_none());
    }

    #[test]
    fn bad_options_are_refused_before_connecting() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = runtime
            .block_on(NatsBackend::connect_with(
                "nats://127.0.0.1:1",
                &Registry::new(),
                NatsOptions {
                    topics: Some(vec!["bad topic".into()]),
                    ..NatsOptions::default()
                },
            ))
            .unwrap_err();
        assert!(err.to_string().contains("bad topic"), "{err}");
        // Nothing listens on port 1: a clear transport error, no hang.
        let err = runtime
            .block_on(NatsBackend::connect("nats://127.0.0.1:1", &Registry::new()))
            .unwrap_err();
        assert!(err.to_string().contains("connect"), "{err}");
    }
}
