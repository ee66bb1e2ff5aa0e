//! Publish/subscribe over verified envelopes: the [`Backend`] trait and the embedded hub.
//!
//! Fan-out goes through one bounded queue per subscriber. Publishing never waits: a subscriber
//! whose queue is full is disconnected (reason `slow`) so the others keep their pace.

use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::envelope::{register_counter_vec, Envelope, MetricsError};

/// A subscription's interest: every field that is set must match (a conjunction); an empty
/// filter matches everything. `sender` and `topic` are the envelope's; `service`, `role` and
/// `status` are top-level string fields of the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub sender: Option<String>,
    pub service: Option<String>,
    pub role: Option<String>,
    pub status: Option<String>,
    pub topic: Option<String>,
}

impl Filter {
    pub fn matches(&self, envelope: &Envelope) -> bool {
        fn ok(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| have == Some(w))
        }
        ok(&self.sender, Some(&envelope.sender))
            && ok(&self.topic, Some(&envelope.topic))
            && ok(&self.service, envelope.payload_str("service"))
            && ok(&self.role, envelope.payload_str("role"))
            && ok(&self.status, envelope.payload_str("status"))
    }
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Its queue was full when a message came: it did not keep up.
    Slow,
    /// The hub shut down.
    HubClosed,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Slow => "slow",
            DisconnectReason::HubClosed => "hub_closed",
        }
    }
}

/// The receiving end of a subscription, the same for every backend.
#[derive(Debug)]
pub struct Subscription {
    receiver: mpsc::Receiver<Arc<Envelope>>,
    reason: Arc<OnceLock<DisconnectReason>>,
}

impl Subscription {
    /// The next message; `None` once disconnected and drained (see [`Self::disconnect_reason`]).
    pub async fn recv(&mut self) -> Option<Arc<Envelope>> {
        self.receiver.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Arc<Envelope>> {
        self.receiver.try_recv().ok()
    }

    pub fn disconnect_reason(&self) -> Option<DisconnectReason> {
        self.reason.get().copied()
    }
}

/// The sending end a backend keeps for each subscriber.
#[derive(Debug)]
pub struct SubscriberQueue {
    sender: mpsc::Sender<Arc<Envelope>>,
    reason: Arc<OnceLock<DisconnectReason>>,
}

/// What happened when offering a message to one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Delivered,
    /// Disconnected now for this reason; drop the queue.
    Disconnected(DisconnectReason),
    /// The subscriber went away by itself; drop the queue.
    Gone,
}

/// A bounded queue pair; backends (embedded or NATS forwarding task) use this to share the
/// slow-subscriber rule.
pub fn subscriber_queue(capacity: usize) -> (SubscriberQueue, Subscription) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let reason = Arc::new(OnceLock::new());
    (
        SubscriberQueue {
            sender,
            reason: reason.clone(),
        },
        Subscription { receiver, reason },
    )
}

impl SubscriberQueue {
    /// Offers without waiting: a full queue disconnects the subscriber.
    pub fn offer(&self, envelope: &Arc<Envelope>) -> Offer {
        match self.sender.try_send(envelope.clone()) {
            Ok(()) => Offer::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let _ = self.reason.set(DisconnectReason::Slow);
                Offer::Disconnected(DisconnectReason::Slow)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
        }
    }

    pub fn close(self, reason: DisconnectReason) {
        let _ = self.reason.set(reason);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("hub is closed")]
    Closed,
    #[error("hub transport: {0}")]
    Transport(String),
}

/// A pub-sub backend. Envelopes handed to `publish` are already verified by the caller.
/// Shaped for NATS as well: `publish` maps to a subject built from the topic (and service) with
/// the envelope as body; `subscribe` to a subject wildcard narrowed by the filter, with the rest
/// of the filter applied locally and messages forwarded into a [`subscriber_queue`].
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Publishes; returns how many subscribers it was delivered to (for NATS: what the local
    /// side knows, which may be 0 since delivery is remote).
    async fn publish(&self, envelope: Envelope) -> Result<usize, BackendError>;
    async fn subscribe(
        &self,
        filter: Filter,
        capacity: usize,
    ) -> Result<Subscription, BackendError>;
}

/// A local subscriber of a backend: its filter and its bounded queue.
pub(crate) struct Subscriber {
    pub(crate) filter: Filter,
    pub(crate) queue: SubscriberQueue,
}

pub(crate) fn register_counter(
    registry: &Registry,
    name: &'static str,
    help: &str,
) -> Result<IntCounter, MetricsError> {
    let counter =
        IntCounter::new(name, help).map_err(|source| MetricsError::Register { name, source })?;
    registry
        .register(Box::new(counter.clone()))
        .map_err(|source| MetricsError::Register { name, source })?;
    Ok(counter)
}

/// The fan-out metrics every backend exports under the same names, so dashboards do not care
/// which backend runs: `understudy_hub_published_total`, `understudy_hub_delivered_total`,
/// `understudy_hub_subscribers` and `understudy_hub_disconnected_total{reason}`.
pub(crate) struct FanOutMetrics {
    pub(crate) published: IntCounter,
    pub(crate) delivered: IntCounter,
    pub(crate) disconnected: IntCounterVec,
    pub(crate) subscribers: IntGauge,
}

impl FanOutMetrics {
    /// `published_help` says where a published message goes (local subscribers, or NATS).
    pub(crate) fn register(
        registry: &Registry,
        published_help: &str,
    ) -> Result<FanOutMetrics, MetricsError> {
        let published =
            register_counter(registry, "understudy_hub_published_total", published_help)?;
        let delivered = register_counter(
            registry,
            "understudy_hub_delivered_total",
            "Hub messages queued to a local subscriber",
        )?;
        let disconnected = register_counter_vec(
            registry,
            "understudy_hub_disconnected_total",
            "Hub subscribers disconnected by the hub, by reason",
            &["reason"],
        )?;
        for reason in [DisconnectReason::Slow, DisconnectReason::HubClosed] {
            disconnected.with_label_values(&[reason.as_str()]);
        }
        let name = "understudy_hub_subscribers";
        let subscribers = IntGauge::new(name, "Hub subscribers connected")
            .map_err(|source| MetricsError::Register { name, source })?;
        registry
            .register(Box::new(subscribers.clone()))
            .map_err(|source| MetricsError::Register { name, source })?;
        Ok(FanOutMetrics {
            published,
            delivered,
            disconnected,
            subscribers,
        })
    }

    /// Offers `envelope` to every subscriber whose filter matches; never waits, so one subscriber
    /// cannot hold up the others: a full queue disconnects its subscriber (counted by reason).
    /// Returns how many queues took it.
    pub(crate) fn fan_out(
        &self,
        subscribers: &mut Vec<Subscriber>,
        envelope: &Arc<Envelope>,
    ) -> usize {
        let mut delivered = 0;
        subscribers.retain(|sub| {
            if !sub.filter.matches(envelope) {
                return true;
            }
            match sub.queue.offer(envelope) {
                Offer::Delivered => {
                    delivered += 1;
                    true
                }
                Offer::Disconnected(reason) => {
                    tracing::warn!(reason = reason.as_str(), "hub subscriber disconnected");
                    self.disconnected
                        .with_label_values(&[reason.as_str()])
                        .inc();
                    false
                }
                Offer::Gone => false,
            }
        });
        self.delivered.inc_by(delivered as u64);
        self.subscribers.set(subscribers.len() as i64);
        delivered
    }
}

/// The in-process hub the controller hosts by default.
pub struct EmbeddedHub {
    subscribers: Mutex<Option<Vec<Subscriber>>>,
    metrics: FanOutMetrics,
}

impl EmbeddedHub {
    /// Registers the [`FanOutMetrics`] in `registry`.
    pub fn new(registry: &Registry) -> Result<EmbeddedHub, MetricsError> {
        Ok(EmbeddedHub {
            subscribers: Mutex::new(Some(Vec::new())),
            metrics: FanOutMetrics::register(registry, "Hub messages published")?,
        })
    }

    /// Fan-out under the lock; never awaits, so one subscriber cannot hold up the others.
    pub fn publish_now(&self, envelope: Envelope) -> Result<usize, BackendError> {
        let envelope = Arc::new(envelope);
        let mut guard = self.subscribers.lock().expect("hub lock poisoned");
        let subscribers = guard.as_mut().ok_or(BackendError::Closed)?;
        self.metrics.published.inc();
        Ok(self.metrics.fan_out(subscribers, &envelope))
    }

    pub fn subscribe_now(
        &self,
        filter: Filter,
        capacity: usize,
    ) -> Result<Subscription, BackendError> {
        let mut guard = self.subscribers.lock().expect("hub lock poisoned");
        let subscribers = guard.as_mut().ok_or(BackendError::Closed)?;
        // Drop subscribers that went away since the last publish.
        subscribers.retain(|s| !s.queue.sender.is_closed());
        let (queue, subscription) = subscriber_queue(capacity);
        subscribers.push(Subscriber { filter, queue });
        self.metrics.subscribers.set(subscribers.len() as i64);
        Ok(subscription)
    }

    /// Ends every subscription (reason `hub_closed`); later calls fail with `Closed`.
    pub fn close(&self) {
        let taken = self.subscribers.lock().expect("hub lock poisoned").take();
        for sub in taken.into_iter().flatten() {
            self.metrics
                .disconnected
                .with_label_values(&[DisconnectReason::HubClosed.as_str()])
                .inc();
            sub.queue.close(DisconnectReason::HubClosed);
        }
        self.metrics.subscribers.set(0);
    }
}

#[async_trait::async_trait]
impl Backend for EmbeddedHub {
    async fn publish(&self, envelope: Envelope) -> Result<usize, BackendError> {
        self.publish_now(envelope)
    }

    async fn subscribe(
        &self,
        filter: Filter,
        capacity: usize,
    ) -> Result<Subscription, BackendError> {
        self.subscribe_now(filter, capacity)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn env(sender: &str, seq: u64, topic: &str, payload: serde_json::Value) -> Envelope {
        Envelope {
            sender: sender.into(),
            seq,
            topic: topic.into(),
            payload,
            signature: Some("x".into()),
        }
    }

    /// A counter's or gauge's value summed over its series (those with a label `label`).
    pub(crate) fn metric(registry: &Registry, name: &str, label: Option<&str>) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| label.is_none_or(|l| m.get_label().iter().any(|p| p.value() == l)))
            // Counters and gauges: the other kind reads 0.
            .map(|m| (m.get_counter().get_value() + m.get_gauge().get_value()) as u64)
            .sum()
    }

    #[test]
    fn filters_are_conjunctions_of_set_fields() {
        let e = env(
            "m1",
            1,
            "state",
            json!({"service": "media", "role": "active", "status": "running"}),
        );
        assert!(Filter::default().matches(&e));
        let f = Filter {
            service: Some("media".into()),
            role: Some("active".into()),
            ..Filter::default()
        };
        assert!(f.matches(&e));
        assert!(!Filter {
            status: Some("down".into()),
            ..f.clone()
        }
        .matches(&e));
        assert!(!Filter {
            sender: Some("m2".into()),
            ..f.clone()
        }
        .matches(&e));
        assert!(Filter {
            topic: Some("state".into()),
            sender: Some("m1".into()),
            ..f.clone()
        }
        .matches(&e));
        // A filter on a payload field the message lacks does not match.
        let bare = env("m1", 2, "state", json!({"load": 3}));
        assert!(!Filter {
            service: Some("media".into()),
            ..Filter::default()
        }
        .matches(&bare));
    }

    #[tokio::test]
    async fn fans_out_to_matching_subscribers_only() {
        let registry = Registry::new();
        let hub = EmbeddedHub::new(&registry).unwrap();
        let mut media = hub
            .subscribe(
                Filter {
                    service: Some("media".into()),
                    ..Filter::default()
                },
                8,
            )
            .await
            .unwrap();
        let mut all = hub.subscribe(Filter::default(), 8).await.unwrap();
        let mut router = hub
            .subscribe(
                Filter {
                    service: Some("router".into()),
                    ..Filter::default()
                },
                8,
            )
            .await
            .unwrap();
        let n = hub
            .publish(env("m1", 1, "state", json!({"service": "media"})))
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(media.recv().await.unwrap().sender, "m1");
        assert_eq!(all.recv().await.unwrap().seq, 1);
        assert!(router.try_recv().is_none());
        assert_eq!(metric(&registry, "understudy_hub_delivered_total", None), 2);
        assert_eq!(metric(&registry, "understudy_hub_subscribers", None), 3);
    }

    #[tokio::test]
    async fn slow_subscriber_is_disconnected_and_others_keep_receiving() {
        let registry = Registry::new();
        let hub = EmbeddedHub::new(&registry).unwrap();
        let mut slow = hub.subscribe(Filter::default(), 2).await.unwrap();
        let mut fast = hub.subscribe(Filter::default(), 2).await.unwrap();
        for seq in 1..=10 {
            hub.publish(env("m1", seq, "state", json!({})))
                .await
                .unwrap();
            // The fast one keeps up; the slow one never reads.
            assert_eq!(fast.recv().await.unwrap().seq, seq);
        }
        // It keeps what was queued before the cut, then ends with the reason.
        assert_eq!(slow.recv().await.unwrap().seq, 1);
        assert_eq!(slow.recv().await.unwrap().seq, 2);
        assert!(slow.recv().await.is_none());
        assert_eq!(slow.disconnect_reason(), Some(DisconnectReason::Slow));
        assert_eq!(fast.disconnect_reason(), None);
        assert_eq!(
            metric(&registry, "understudy_hub_disconnected_total", Some("slow")),
            1
        );
        assert_eq!(metric(&registry, "understudy_hub_subscribers", None), 1);
    }

    #[tokio::test]
    async fn dropped_subscribers_are_forgotten_and_close_ends_all() {
        let registry = Registry::new();
        let hub = EmbeddedHub::new(&registry).unwrap();
        drop(hub.subscribe(Filter::default(), 1).await.unwrap());
        let mut kept = hub.subscribe(Filter::default(), 1).await.unwrap();
        assert_eq!(hub.publish(env("m1", 1, "s", json!({}))).await.unwrap(), 1);
        assert_eq!(
            metric(&registry, "understudy_hub_disconnected_total", Some("slow")),
            0
        );
        hub.close();
        assert!(kept.recv().await.is_some());
        assert!(kept.recv().await.is_none());
        assert_eq!(kept.disconnect_reason(), Some(DisconnectReason::HubClosed));
        assert!(matches!(
            hub.publish(env("m1", 2, "s", json!({}))).await,
            Err(BackendError::Closed)
        ));
    }
}
