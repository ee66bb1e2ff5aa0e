//! The hub on the controller (issue 6): the cluster file's `[hub]` table, the backend (embedded by
//! default, NATS when asked), the [`Verifier`] holding every registered machine's key, the hub's
//! HTTP routes (merged into the admin router) and its metrics, and the task that records each
//! verified `machine.state` message in the machine registry (src/machines.rs).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::toml_spans::Spanned;
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use understudy_hub::envelope::{restart_floor, KeyError, MetricsError};
use understudy_hub::http::HubHttp;
use understudy_hub::nats::{NatsBackend, NatsOptions, Receive};
use understudy_hub::registry::STATE_TOPIC;
use understudy_hub::{
    Backend, BackendError, DisconnectReason, EmbeddedHub, Filter, Keyring, SecretKey, Verifier,
};

use crate::config::cluster::{ConfigError, Source};
use crate::runtime::controller::Core;
use crate::store::{MachineKeyRow, Store, StoreError};

pub use understudy_hub::CONTROLLER_ID;

/// Which pub-sub backend carries the hub's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Embedded,
    Nats,
}

/// `[hub]` in a cluster file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpec {
    /// `"embedded"` (default) or `"nats"`.
    pub backend: Option<Spanned<BackendKind>>,
    /// `nats://host:port`, required with the NATS backend.
    pub nats_url: Option<Spanned<String>>,
    /// Largest message accepted, in bytes (default 65536).
    pub max_message_bytes: Option<Spanned<usize>>,
    /// Queue length of each subscriber (default 1024); a subscriber that lets it fill is cut.
    pub subscriber_queue: Option<Spanned<usize>>,
    /// Subscribers must present a signed token (default true; `false` opens the controller's
    /// state channel to anyone who reaches the admin port).
    pub subscriber_auth: Option<bool>,
    /// How long a rotated-out key stays valid by default (default 60000).
    pub rotation_grace_ms: Option<Spanned<u64>>,
    /// Base URL given to machines at registration (default: the admin endpoint's own address).
    pub public_url: Option<Spanned<String>>,
    /// How far a machine's clock may lag the controller's (default 2000): after a restart, a
    /// sender's messages numbered below the controller's clock less this are refused.
    pub max_clock_skew_ms: Option<Spanned<u64>>,
    /// Registry revisions kept per machine, the newest (default 1000).
    pub history_per_machine: Option<Spanned<u64>>,
}

/// Where the hub's messages travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubBackend {
    Embedded,
    Nats { url: String },
}

/// `[hub]` validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HubSettings {
    pub backend: HubBackend,
    pub max_message_bytes: usize,
    pub subscriber_queue: usize,
    pub subscriber_auth: bool,
    pub rotation_grace: Duration,
    pub public_url: Option<String>,
    /// Floor of each sender's sequence after a restart: the clock less this (see
    /// [`understudy_hub::envelope::restart_floor`]).
    pub max_clock_skew: Duration,
    /// Newest registry revisions kept per machine; older ones are pruned as new ones come.
    pub history_per_machine: u64,
}

const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
const MAX_MESSAGE_BYTES_RANGE: std::ops::RangeInclusive<usize> = 256..=(16 << 20);
const DEFAULT_SUBSCRIBER_QUEUE: usize = 1024;
const SUBSCRIBER_QUEUE_RANGE: std::ops::RangeInclusive<usize> = 1..=1_000_000;
const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(60);
/// Longest grace a rotation may give an old key: a leaked key must not live on for days.
pub const MAX_ROTATION_GRACE_MS: u64 = 24 * 3600 * 1000;
const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 2000;
/// A larger skew would let a message captured that long before a restart be accepted after it.
const MAX_CLOCK_SKEW_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=3_600_000;
const DEFAULT_HISTORY_PER_MACHINE: u64 = 1000;
const HISTORY_PER_MACHINE_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000_000;

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            backend: HubBackend::Embedded,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            subscriber_auth: true,
            rotation_grace: DEFAULT_ROTATION_GRACE,
            public_url: None,
            max_clock_skew: Duration::from_millis(DEFAULT_MAX_CLOCK_SKEW_MS),
            history_per_machine: DEFAULT_HISTORY_PER_MACHINE,
        }
    }
}

impl HubSettings {
    /// Validates `[hub]`; errors name the file, line and field.
    pub fn from_spec(spec: &HubSpec, source: &Source<'_>) -> Result<HubSettings, ConfigError> {
        let invalid = |offset: usize, field: &str, reason: String| ConfigError::Invalid {
            file: source.file.to_string(),
            line: source.line_of(offset),
            field: format!("hub.{field}"),
            reason,
        };
        let kind = spec.backend.as_ref().map(|b| *b.get_ref());
        // Where `backend` is written, for errors about what it asks for.
        let backend_at = spec.backend.as_ref().map_or(0, |b| b.span().start);
        let backend = match (kind.unwrap_or(BackendKind::Embedded), &spec.nats_url) {
            (BackendKind::Embedded, None) => HubBackend::Embedded,
            (BackendKind::Embedded, Some(url)) => {
                return Err(invalid(
                    url.span().start,
                    "nats_url",
                    "set, but backend is not \"nats\"".into(),
                ))
            }
            (BackendKind::Nats, None) => {
                return Err(invalid(
                    backend_at,
                    "nats_url",
                    "required with backend = \"nats\" (nats://host:port)".into(),
                ))
            }
            (BackendKind::Nats, Some(url)) => {
                let text = url.get_ref().trim();
                let parsed: Option<http::Uri> = text.parse().ok();
                let ok = parsed.as_ref().is_some_and(|u| {
                    u.scheme_str() == Some("nats")
                        && u.authority().is_some_and(|a| a.port().is_some())
                });
                if !ok {
                    return Err(invalid(
                        url.span().start,
                        "nats_url",
                        format!("`{text}` is not nats://host:port"),
                    ));
                }
                HubBackend::Nats {
                    url: text.to_string(),
                }
            }
        };
        fn in_range<T: PartialOrd + Copy + std::fmt::Display>(
            value: &Option<Spanned<T>>,
            field: &str,
            range: std::ops::RangeInclusive<T>,
            default: T,
            invalid: impl Fn(usize, &str, String) -> ConfigError,
        ) -> Result<T, ConfigError> {
            match value {
                Some(v) if !range.contains(v.get_ref()) => Err(invalid(
                    v.span().start,
                    field,
                    format!("must be within {}..={}", range.start(), range.end()),
                )),
                Some(v) => Ok(*v.get_ref()),
                None => Ok(default),
            }
        }
        let max_message_bytes = in_range(
            &spec.max_message_bytes,
            "max_message_bytes",
            MAX_MESSAGE_BYTES_RANGE,
            DEFAULT_MAX_MESSAGE_BYTES,
            invalid,
        )?;
        let subscriber_queue = in_range(
            &spec.subscriber_queue,
            "subscriber_queue",
            SUBSCRIBER_QUEUE_RANGE,
            DEFAULT_SUBSCRIBER_QUEUE,
            invalid,
        )?;
        let max_clock_skew_ms = in_range(
            &spec.max_clock_skew_ms,
            "max_clock_skew_ms",
            MAX_CLOCK_SKEW_MS_RANGE,
            DEFAULT_MAX_CLOCK_SKEW_MS,
            invalid,
        )?;
        let history_per_machine = in_range(
            &spec.history_per_machine,
            "history_per_machine",
            HISTORY_PER_MACHINE_RANGE,
            DEFAULT_HISTORY_PER_MACHINE,
            invalid,
        )?;
        let rotation_grace = match &spec.rotation_grace_ms {
            Some(g) if *g.get_ref() > MAX_ROTATION_GRACE_MS => {
                return Err(invalid(
                    g.span().start,
                    "rotation_grace_ms",
                    format!("must be at most {MAX_ROTATION_GRACE_MS} (one day)"),
                ))
            }
            Some(g) => Duration::from_millis(*g.get_ref()),
            None => DEFAULT_ROTATION_GRACE,
        };
        let public_url = match &spec.public_url {
            Some(url) => {
                let text = url.get_ref().trim().trim_end_matches('/');
                let parsed: Option<http::Uri> = text.parse().ok();
                let ok = parsed.as_ref().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some()
                        && matches!(u.path(), "" | "/")
                });
                if !ok {
                    return Err(invalid(
                        url.span().start,
                        "public_url",
                        format!("`{text}` is not http://host:port (no path)"),
                    ));
                }
                Some(text.to_string())
            }
            None => None,
        };
        Ok(HubSettings {
            backend,
            max_message_bytes,
            subscriber_queue,
            subscriber_auth: spec.subscriber_auth.unwrap_or(true),
            rotation_grace,
            public_url,
            max_clock_skew: Duration::from_millis(max_clock_skew_ms),
            history_per_machine,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("hub keys: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("hub metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("hub key of machine `{id}`: {source}")]
    Key {
        id: String,
        #[source]
        source: KeyError,
    },
    #[error("NATS backend at {url}: {source}")]
    Nats {
        url: String,
        #[source]
        source: BackendError,
    },
}

/// The hub as the controller hosts it. Its metrics live in their own registry, rendered after the
/// controller's on `/metrics`.
pub struct ControllerHub {
    settings: HubSettings,
    backend: Arc<dyn Backend>,
    /// To end its subscriptions at shutdown (SSE streams would otherwise keep the admin
    /// endpoint's graceful shutdown waiting).
    closer: Closer,
    verifier: Arc<Mutex<Verifier>>,
    http: Arc<HubHttp>,
    registry: Registry,
    pub(crate) machines_gauge: IntGaugeVec,
    pub(crate) reports: IntCounterVec,
    pub(crate) keys_issued: IntCounterVec,
    advertised_url: OnceLock<String>,
    /// The sequence number last saved to SQLite per sender, so only changes are written.
    saved_sequences: Mutex<SavedSequences>,
}

/// The last hub sequence number saved per sender.
type SavedSequences = HashMap<String, u64>;

/// The concrete backend, for what the [`Backend`] trait does not cover (closing).
enum Closer {
    Embedded(Arc<EmbeddedHub>),
    Nats(Arc<NatsBackend>),
}

/// Outcomes of `machine.state` reports, each a label of `understudy_machine_reports_total`.
pub const REPORT_OUTCOMES: [&str; 3] = ["revision", "unchanged", "refused"];

impl ControllerHub {
    /// The hub with the embedded backend (no I/O), keys loaded from `store`.
    pub fn embedded(
        settings: &HubSettings,
        store: &Store,
        now_ms: u64,
    ) -> Result<ControllerHub, HubError> {
        let registry = Registry::new();
        let (verifier, saved) = new_verifier(settings, store, now_ms, &registry)?;
        let hub = Arc::new(EmbeddedHub::new(&registry)?);
        Self::assemble(
            settings,
            registry,
            hub.clone(),
            Closer::Embedded(hub),
            verifier,
            saved,
        )
    }

    /// The hub `settings` ask for: embedded, or connected to NATS.
    pub async fn connect(
        settings: &HubSettings,
        store: &Store,
        now_ms: u64,
    ) -> Result<ControllerHub, HubError> {
        match &settings.backend {
            HubBackend::Embedded => Self::embedded(settings, store, now_ms),
            HubBackend::Nats { url } => {
                let registry = Registry::new();
                let (verifier, saved) = new_verifier(settings, store, now_ms, &registry)?;
                let options = NatsOptions {
                    // NATS is transport, not trust: what other processes put on it is verified
                    // with the HTTP path's own verifier (which recognises our own messages).
                    receive: Receive::Verify(verifier.clone()),
                    max_message_bytes: settings.max_message_bytes,
                    client_name: CONTROLLER_ID.to_string(),
                    ..NatsOptions::default()
                };
                let backend = Arc::new(
                    NatsBackend::connect_with(url, &registry, options)
                        .await
                        .map_err(|source| HubError::Nats {
                            url: url.clone(),
                            source,
                        })?,
                );
                Self::assemble(
                    settings,
                    registry,
                    backend.clone(),
                    Closer::Nats(backend),
                    verifier,
                    saved,
                )
            }
        }
    }

    fn assemble(
        settings: &HubSettings,
        registry: Registry,
        backend: Arc<dyn Backend>,
        closer: Closer,
        verifier: Arc<Mutex<Verifier>>,
        saved_sequences: SavedSequences,
    ) -> Result<ControllerHub, HubError> {
        let machines_gauge = IntGaugeVec::new(
            Opts::new(
                "understudy_machines",
                "Machines by service, reported version, role and reported status (unknown: never reported).",
            ),
            &["service", "version", "role", "status"],
        )?;
        let reports = IntCounterVec::new(
            Opts::new(
                "understudy_machine_reports_total",
                "Verified machine.state messages: a new registry revision, unchanged, or refused (payload not a record of the sender).",
            ),
            &["outcome"],
        )?;
        let keys_issued = IntCounterVec::new(
            Opts::new(
                "understudy_hub_keys_issued_total",
                "Machine hub keys issued, by kind (registration, rotation).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(machines_gauge.clone()))?;
        registry.register(Box::new(reports.clone()))?;
        registry.register(Box::new(keys_issued.clone()))?;
        for outcome in REPORT_OUTCOMES {
            reports.with_label_values(&[outcome]);
        }
        for kind in ["registration", "rotation"] {
            keys_issued.with_label_values(&[kind]);
        }
        let http = Arc::new(HubHttp {
            backend: backend.clone(),
            verifier: verifier.clone(),
            controller_id: CONTROLLER_ID.to_string(),
            subscriber_capacity: settings.subscriber_queue,
            subscriber_auth: settings.subscriber_auth,
        });
        Ok(ControllerHub {
            settings: settings.clone(),
            backend,
            closer,
            verifier,
            http,
            registry,
            machines_gauge,
            reports,
            keys_issued,
            advertised_url: OnceLock::new(),
            saved_sequences: Mutex::new(saved_sequences),
        })
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    pub fn backend(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    /// `POST /api/v1/hub/publish` and `GET /api/v1/hub/subscribe`, to merge into the admin router.
    pub fn router(&self) -> axum::Router {
        understudy_hub::http::router(self.http.clone())
    }

    /// Accepts `key` for `id` from now on, replacing any key it had (registration).
    pub fn install_key(&self, id: &str, key: SecretKey) -> Result<(), KeyError> {
        self.lock_verifier().register(id, key)
    }

    /// Lets each keyed balancer subscribe to the hub (its config feed) as
    /// `balancer.{service}`, proving it with its own key.
    pub fn install_balancer_subscribers(&self, cluster: &crate::config::cluster::Cluster) {
        for service in cluster.services.values() {
            let Some(secret) = &service.balancer_key else {
                continue;
            };
            let sender = understudy_hub::http::balancer_subscriber(&service.name);
            if let Err(e) = self.install_key(&sender, secret.key().clone()) {
                tracing::warn!(
                    service = %service.name,
                    "its balancer cannot subscribe to the hub as {sender:?}: {e}"
                );
            }
        }
    }

    /// Rotates `id` to `key`; the old key stays valid for `grace` or until the first message
    /// under the new one. False when `id` has no key.
    pub fn rotate_key(&self, id: &str, key: SecretKey, grace: Duration) -> bool {
        self.lock_verifier()
            .keyring_mut()
            .rotate(id, key, grace, Instant::now())
    }

    /// Senders whose last accepted sequence number moved past what was last saved.
    fn unsaved_sequences(&self) -> Vec<(String, u64)> {
        let saved = self
            .saved_sequences
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.lock_verifier()
            .last_seqs()
            .filter(|(sender, seq)| saved.get(*sender) != Some(seq))
            .map(|(sender, seq)| (sender.to_string(), seq))
            .collect()
    }

    fn mark_saved(&self, sequences: Vec<(String, u64)>) {
        self.saved_sequences
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(sequences);
    }

    fn lock_verifier(&self) -> std::sync::MutexGuard<'_, Verifier> {
        // The verifier's state (keys, sequence windows) stays consistent across a panic elsewhere.
        self.verifier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Base URL machines publish to: `[hub] public_url`, else the admin endpoint once bound.
    pub fn advertised_url(&self) -> Option<String> {
        self.settings
            .public_url
            .clone()
            .or_else(|| self.advertised_url.get().cloned())
    }

    pub fn set_advertised_url(&self, url: String) {
        let _ = self.advertised_url.set(url);
    }

    /// Ends every subscription (shutdown).
    pub fn close(&self) {
        match &self.closer {
            Closer::Embedded(hub) => hub.close(),
            Closer::Nats(nats) => nats.close(),
        }
    }

    pub fn render_metrics(&self) -> String {
        let mut buffer = Vec::new();
        // The text encoder only fails on a broken writer; a Vec never is.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// A verifier holding every stored machine key: a key rotated less than its grace ago is installed
/// as the previous one with the grace that remains. Each sender starts with a sequence floor, the
/// larger of the last sequence number saved for it and the clock less `max_clock_skew`, so a
/// message captured before the restart is refused (`out_of_order`) after it. Also returns the
/// saved sequence numbers. Applies the registry's retention (`history_per_machine`) to `store`.
fn new_verifier(
    settings: &HubSettings,
    store: &Store,
    now_ms: u64,
    registry: &Registry,
) -> Result<(Arc<Mutex<Verifier>>, SavedSequences), HubError> {
    store.limit_machine_history(settings.history_per_machine)?;
    let mut verifier = Verifier::new(Keyring::new(), settings.max_message_bytes, registry)?;
    let saved: BTreeMap<String, u64> = store.hub_sequences()?;
    let clock_floor = restart_floor(settings.max_clock_skew);
    for row in store.machine_keys()? {
        let floor = saved
            .get(&row.id)
            .map_or(clock_floor, |s| clock_floor.max(*s));
        install_stored(&mut verifier, row, floor, now_ms)?;
    }
    Ok((Arc::new(Mutex::new(verifier)), saved.into_iter().collect()))
}

fn install_stored(
    verifier: &mut Verifier,
    row: MachineKeyRow,
    floor: u64,
    now_ms: u64,
) -> Result<(), HubError> {
    let key_error = |source| HubError::Key {
        id: row.id.clone(),
        source,
    };
    match row.previous {
        Some((previous, until_ms)) if until_ms > now_ms => {
            verifier
                .register_with_floor(&row.id, previous, floor)
                .map_err(key_error)?;
            let remaining = Duration::from_millis(until_ms - now_ms);
            verifier
                .keyring_mut()
                .rotate(&row.id, row.key, remaining, Instant::now());
        }
        _ => verifier
            .register_with_floor(&row.id, row.key, floor)
            .map_err(key_error)?,
    }
    Ok(())
}

/// How often the recorder saves the senders' last sequence numbers (only those that moved): a
/// write per second at most, whatever the message rate.
const SEQUENCE_SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl Core {
    /// Saves the last accepted sequence number of every sender whose number moved since the last
    /// save (one transaction); returns how many were written. The recorder calls it every second
    /// and at shutdown. What a crash loses (at most the last second) is covered by the clock floor
    /// of the next start as long as the restart takes longer than `max_clock_skew_ms`.
    pub fn save_hub_sequences(&self) -> Result<usize, StoreError> {
        let changed = self.hub.unsaved_sequences();
        if changed.is_empty() {
            return Ok(0);
        }
        self.with_store(|store, _, _| {
            store.write(|tx| crate::store::save_hub_sequences(tx, &changed))
        })?;
        let count = changed.len();
        self.hub.mark_saved(changed);
        Ok(count)
    }
}

fn save_sequences(core: &Core) {
    if let Err(e) = core.save_hub_sequences() {
        tracing::warn!("saving hub sequence numbers: {e}");
    }
}

/// How long the recorder waits before subscribing again after the backend refused.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Subscribes to `machine.state` through the controller's backend and records every message as a
/// registry revision until `stop`; then closes the embedded hub so SSE subscribers end. Every
/// second, and once more at the end, it saves the senders' last sequence numbers
/// ([`Core::save_hub_sequences`]).
pub fn spawn_recorder(core: Arc<Core>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let filter = Filter {
            topic: Some(STATE_TOPIC.to_string()),
            ..Filter::default()
        };
        let capacity = core.hub().settings().subscriber_queue;
        let mut save = tokio::time::interval(SEQUENCE_SAVE_INTERVAL);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'subscribe: loop {
            let mut subscription =
                match core.hub_backend().subscribe(filter.clone(), capacity).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("registry cannot subscribe to {STATE_TOPIC}: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue 'subscribe,
                            _ = stop.changed() => break 'subscribe,
                        }
                    }
                };
            loop {
                tokio::select! {
                    message = subscription.recv() => match message {
                        Some(envelope) => {
                            if let Err(e) = core.record_machine_state(&envelope) {
                                tracing::warn!(sender = %envelope.sender, "machine.state not recorded: {e}");
                            }
                        }
                        None => match subscription.disconnect_reason() {
                            Some(DisconnectReason::HubClosed) => break 'subscribe,
                            reason => {
                                // Reports lost while cut off are superseded by the next heartbeat.
                                tracing::warn!(?reason, "registry subscription ended; subscribing again");
                                continue 'subscribe;
                            }
                        },
                    },
                    _ = save.tick() => save_sequences(&core),
                    _ = stop.changed() => break 'subscribe,
                }
            }
        }
        core.hub().close();
        save_sequences(&core);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<HubSettings, ConfigError> {
        let source = Source {
            file: "c.toml",
            text,
        };
        #[derive(Deserialize)]
        struct Wrapper {
            hub: HubSpec,
        }
        let wrapper: Wrapper = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        HubSettings::from_spec(&wrapper.hub, &source)
    }

    #[test]
    fn hub_table_defaults_and_errors_name_the_field() {
        assert_eq!(settings("[hub]\n").unwrap(), HubSettings::default());
        let nats =
            settings("[hub]\nbackend = \"nats\"\nnats_url = \"nats://127.0.0.1:4222\"\n").unwrap();
        assert_eq!(
            nats.backend,
            HubBackend::Nats {
                url: "nats://127.0.0.1:4222".into()
            }
        );
        let full = settings(
            "[hub]\nmax_message_bytes = 1024\nsubscriber_queue = 8\nsubscriber_auth = true\nrotation_grace_ms = 5\npublic_url = \"http://127.0.0.1:7070/\"\n",
        )
        .unwrap();
        assert_eq!(full.max_message_bytes, 1024);
        assert_eq!(full.subscriber_queue, 8);
        assert!(full.subscriber_auth);
        assert_eq!(full.rotation_grace, Duration::from_millis(5));
        assert_eq!(full.public_url.as_deref(), Some("http://127.0.0.1:7070"));
        let defaults = HubSettings::default();
        assert_eq!(defaults.max_clock_skew, Duration::from_millis(2000));
        assert_eq!(defaults.history_per_machine, 1000);
        let replay = settings("[hub]\nmax_clock_skew_ms = 500\nhistory_per_machine = 3\n").unwrap();
        assert_eq!(replay.max_clock_skew, Duration::from_millis(500));
        assert_eq!(replay.history_per_machine, 3);

        for (text, field, line) in [
            ("[hub]\nbackend = \"kafka\"\n", "hub.backend", 2),
            ("[hub]\nbackend = \"nats\"\n", "hub.nats_url", 2),
            (
                "[hub]\nbackend = \"nats\"\nnats_url = \"http://x:1\"\n",
                "hub.nats_url",
                3,
            ),
            ("[hub]\nnats_url = \"nats://x:1\"\n", "hub.nats_url", 2),
            (
                "[hub]\nmax_message_bytes = 10\n",
                "hub.max_message_bytes",
                2,
            ),
            ("[hub]\nsubscriber_queue = 0\n", "hub.subscriber_queue", 2),
            (
                "[hub]\nrotation_grace_ms = 999999999999\n",
                "hub.rotation_grace_ms",
                2,
            ),
            ("[hub]\npublic_url = \"ftp://x\"\n", "hub.public_url", 2),
            ("[hub]\nmax_clock_skew_ms = 0\n", "hub.max_clock_skew_ms", 2),
            (
                "[hub]\nmax_clock_skew_ms = 3600001\n",
                "hub.max_clock_skew_ms",
                2,
            ),
            (
                "[hub]\nhistory_per_machine = 0\n",
                "hub.history_per_machine",
                2,
            ),
            ("[hub]\nqueue = 3\n", "hub.queue", 2),
        ] {
            match settings(text) {
                Err(ConfigError::Invalid {
                    field: f, line: l, ..
                }) => {
                    assert_eq!((f.as_str(), l), (field, line), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
