//! Webhook notifications of rollout phase changes (`[notify]`, docs/cluster.md).
//!
//! The controller calls [`Notifier::phase_changed`] under its state lock, so it only `try_send`s
//! the event onto each webhook's bounded queue: a full queue drops the event (counted), it never
//! waits. One worker task per webhook POSTs the events in order, retrying with a doubling back-off,
//! so a slow or dead receiver holds up neither the rollout nor the other webhooks.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::notify::{NotifySettings, Webhook, MAX_BACKOFF};

/// Events waiting per webhook; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 1024;

/// One rollout phase change, as sent (beside `text` and `event`) to every webhook.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseChange {
    pub rollout: i64,
    pub release: i64,
    pub service: String,
    /// Phases as the API shows them (`joining[1]`).
    pub from: String,
    pub to: String,
    pub cause: String,
    /// `controller` or `ops`.
    pub actor: String,
    /// Who, when ops acted and the caller is known.
    pub operator: Option<String>,
    /// The transition's time (milliseconds since the Unix epoch).
    pub at_ms: u64,
}

impl PhaseChange {
    /// The one line a Slack channel shows: `understudy: media rollout 3 simulating ->
    /// awaiting_approval: passed (by controller)`.
    pub fn text(&self) -> String {
        let mut line = format!(
            "understudy: {} rollout {} {} -> {}",
            self.service, self.rollout, self.from, self.to
        );
        if !self.cause.is_empty() {
            line.push_str(": ");
            line.push_str(&slack_escaped(&self.cause));
        }
        match &self.operator {
            Some(who) => line.push_str(&format!(" (by {} {})", self.actor, slack_escaped(who))),
            None => line.push_str(&format!(" (by {})", self.actor)),
        }
        line
    }
}

/// Slack reads `<...>` as a link or a mention (`<!channel>`): free text written by ops must not
/// become one, so the three characters Slack reserves are escaped as it asks.
fn slack_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The JSON body of one POST: Slack's `text`, and the event's fields for any other receiver.
#[derive(Serialize)]
struct Payload<'a> {
    text: String,
    event: &'static str,
    #[serde(flatten)]
    change: &'a PhaseChange,
}

fn payload(change: &PhaseChange) -> Vec<u8> {
    let body = Payload {
        text: change.text(),
        event: "phase_change",
        change,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Hands phase changes to the webhooks' workers. Cheap to clone; [`Notifier::disabled`] (no
/// webhook configured) does nothing at all.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// One queue per webhook, in config order.
    queues: Vec<mpsc::Sender<Arc<PhaseChange>>>,
    metrics: NotifyMetrics,
    /// Workers not spawned yet: [`Notifier::start`] found no tokio runtime (a synchronous test
    /// loading a controller). The first event sent from within one spawns them.
    unspawned: Mutex<Vec<Worker>>,
    has_unspawned: AtomicBool,
    /// Dropped with the last notifier (the controller stopped): workers stop retrying then.
    _closing: watch::Sender<()>,
}

impl Notifier {
    /// Notifies nobody.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// A notifier for the configured webhooks, their workers spawned on the current tokio
    /// runtime (or at the first event sent from one, when there is none now).
    pub fn start(settings: &NotifySettings) -> Notifier {
        Notifier::with_capacity(settings, QUEUE_CAPACITY)
    }

    pub(crate) fn with_capacity(settings: &NotifySettings, capacity: usize) -> Notifier {
        if settings.webhooks.is_empty() {
            return Notifier::disabled();
        }
        let metrics = match NotifyMetrics::new(settings.webhooks.len()) {
            Ok(metrics) => metrics,
            Err(e) => {
                tracing::error!("webhook notifications are off: metrics: {e}");
                return Notifier::disabled();
            }
        };
        let (closing, closed) = watch::channel(());
        let (queues, workers) = settings
            .webhooks
            .iter()
            .enumerate()
            .map(|(index, webhook)| {
                let (sender, queue) = mpsc::channel(capacity.max(1));
                let worker = Worker {
                    label: index.to_string(),
                    webhook: webhook.clone(),
                    queue,
                    closed: closed.clone(),
                    metrics: metrics.clone(),
                };
                (sender, worker)
            })
            .unzip();
        let inner = Inner {
            queues,
            metrics,
            unspawned: Mutex::new(workers),
            has_unspawned: AtomicBool::new(true),
            _closing: closing,
        };
        inner.spawn_workers();
        Notifier {
            inner: Some(Arc::new(inner)),
        }
    }

    /// Queues `event` for every webhook and returns at once: never blocks, never waits. A webhook
    /// whose queue is full misses it (counted in `understudy_webhook_dropped_total`).
    pub fn phase_changed(&self, event: PhaseChange) {
        let Some(inner) = &self.inner else {
            return;
        };
        inner.spawn_workers();
        let event = Arc::new(event);
        for (index, queue) in inner.queues.iter().enumerate() {
            if queue.try_send(event.clone()).is_err() {
                let label = index.to_string();
                inner.metrics.dropped.with_label_values(&[&label]).inc();
                tracing::warn!(
                    webhook = index,
                    rollout = event.rollout,
                    to = %event.to,
                    "webhook queue full: phase change dropped"
                );
            }
        }
    }

    /// The webhook metrics in Prometheus text format (nothing when no webhook is configured).
    pub fn render_metrics(&self) -> String {
        self.inner
            .as_ref()
            .map(|inner| inner.metrics.render())
            .unwrap_or_default()
    }
}

impl Inner {
    /// Spawns the workers not running yet, when there is a runtime to run them.
    fn spawn_workers(&self) {
        if !self.has_unspawned.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut unspawned = self
            .unspawned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for worker in unspawned.drain(..) {
            runtime.spawn(worker.run());
        }
        self.has_unspawned.store(false, Ordering::Release);
    }
}

/// The metrics of the webhooks, in a registry of their own (appended to the controller's page).
#[derive(Clone)]
struct NotifyMetrics {
    registry: Registry,
    /// By webhook and outcome: `delivered`, or `failed` (given up after its attempts).
    deliveries: IntCounterVec,
    /// Every attempt that got no 2xx answer, by webhook.
    attempt_failures: IntCounterVec,
    /// Events a full queue refused, by webhook.
    dropped: IntCounterVec,
}

impl NotifyMetrics {
    fn new(webhooks: usize) -> Result<NotifyMetrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let metrics = NotifyMetrics {
            deliveries: counter(
                "understudy_webhook_deliveries_total",
                "Phase changes a webhook was sent: delivered (2xx), or failed (given up).",
                &["webhook", "outcome"],
            )?,
            attempt_failures: counter(
                "understudy_webhook_attempt_failures_total",
                "POSTs to a webhook that got no 2xx answer in time (each is retried until the \
                 webhook's attempts are spent).",
                &["webhook"],
            )?,
            dropped: counter(
                "understudy_webhook_dropped_total",
                "Phase changes a webhook missed because its queue was full.",
                &["webhook"],
            )?,
            registry,
        };
        // Every series shows (at 0) before the first event. The label is the webhook's index in
        // the config, never its URL, whose path may be a secret.
        for index in 0..webhooks {
            let label = index.to_string();
            for outcome in ["delivered", "failed"] {
                metrics.deliveries.with_label_values(&[&label, outcome]);
            }
            metrics.attempt_failures.with_label_values(&[&label]);
            metrics.dropped.with_label_values(&[&label]);
        }
        Ok(metrics)
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("webhook metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Delivers one webhook's events, in order.
struct Worker {
    /// The webhook's index in the config: its metric label and its name in the log.
    label: String,
    webhook: Webhook,
    queue: mpsc::Receiver<Arc<PhaseChange>>,
    closed: watch::Receiver<()>,
    metrics: NotifyMetrics,
}

impl Worker {
    /// Until the notifier is dropped and the queue drained.
    async fn run(mut self) {
        let client = crate::http_json::client();
        let url = self.webhook.url.to_string();
        // The log names host:port only: the URL's path may be a secret.
        let target = host_port(&self.webhook.url);
        while let Some(event) = self.queue.recv().await {
            let body = payload(&event);
            let timeout = self.webhook.timeout;
            let post = || post(&client, &url, body.clone(), timeout);
            let result = deliver(
                &self.webhook,
                &self.label,
                &self.metrics,
                &mut self.closed,
                post,
            )
            .await;
            let outcome = match result {
                Ok(_) => "delivered",
                Err((attempts, error)) => {
                    tracing::warn!(
                        webhook = %self.label,
                        %target,
                        rollout = event.rollout,
                        to = %event.to,
                        attempts,
                        "webhook: phase change given up: {error}"
                    );
                    "failed"
                }
            };
            self.metrics
                .deliveries
                .with_label_values(&[&self.label, outcome])
                .inc();
        }
    }
}

/// Tries one event until an attempt succeeds or `webhook.attempts` have failed, waiting
/// [`retry_delay`] before each retry; once the notifier is dropped it retries no more. Returns
/// the attempts made, or those and the last error.
async fn deliver<F, Fut>(
    webhook: &Webhook,
    label: &str,
    metrics: &NotifyMetrics,
    closed: &mut watch::Receiver<()>,
    mut attempt: F,
) -> Result<u32, (u32, String)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut tried = 0;
    loop {
        tried += 1;
        let error = match attempt().await {
            Ok(()) => return Ok(tried),
            Err(error) => error,
        };
        metrics.attempt_failures.with_label_values(&[label]).inc();
        tracing::debug!(
            webhook = label,
            attempt = tried,
            "webhook attempt failed: {error}"
        );
        // `has_changed` fails once the sender (the notifier) is gone.
        if tried >= webhook.attempts || closed.has_changed().is_err() {
            return Err((tried, error));
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_delay(webhook.backoff, tried)) => {}
            _ = closed.changed() => return Err((tried, error)),
        }
    }
}

/// The wait before retry `retry` (1 for the first): `first`, then twice as long each time, at
/// most [`MAX_BACKOFF`].
fn retry_delay(first: Duration, retry: u32) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1))
        .unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

/// One POST of a JSON body: `Ok` for a 2xx answer within `timeout`.
async fn post(
    client: &crate::http_json::JsonClient,
    url: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(), String> {
    use crate::http_json::ExchangeError;
    let answer =
        crate::http_json::exchange(client, http::Method::POST, url, None, Some(body), timeout);
    match answer.await {
        Ok((status, _)) if (200..300).contains(&status) => Ok(()),
        Ok((status, _)) => Err(format!("answered {status}")),
        Err(ExchangeError::BadRequest(e) | ExchangeError::NoAnswer(e)) => Err(e),
    }
}

/// `host:port` of a URL (port 80 when it gives none).
fn host_port(url: &http::Uri) -> String {
    let host = url.host().unwrap_or("?");
    format!("{host}:{}", url.port_u16().unwrap_or(80))
}

#[cfg(test)]
#[path = "notify_tests.rs"]
mod tests;
