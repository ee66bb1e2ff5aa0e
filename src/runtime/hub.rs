//! The hub on the controller (its settings are `[hub]`, src/config/hub.rs): the backend (embedded by
//! default, NATS when asked), the [`Verifier`] holding every registered machine's key, the hub's
//! HTTP routes (merged into the admin router) and its metrics, and the task that records each
//! verified `machine.state` message in the machine registry (src/runtime/machines.rs).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use understudy_hub::envelope::{restart_floor, KeyError, MetricsError};
use understudy_hub::http::HubHttp;
use understudy_hub::nats::{NatsBackend, NatsOptions, Receive};
use understudy_hub::{Backend, BackendError, EmbeddedHub, Keyring, SecretKey, Verifier};

use crate::config::hub::{HubBackend, HubSettings};
use crate::store::{MachineKeyRow, Store, StoreError};

pub use understudy_hub::CONTROLLER_ID;

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

    /// Takes the keys and sequence floors the store holds (a new leader takes over what the
    /// previous one registered, rotated and accepted): each sender's floor is the larger of its
    /// saved number and the clock less `max_clock_skew`, as at a start.
    pub fn load_from(&self, store: &Store, now_ms: u64) -> Result<(), HubError> {
        let mut verifier = self.lock_verifier();
        let saved = install_stored_keys(&mut verifier, &self.settings, store, now_ms)?;
        let clock_floor = restart_floor(self.settings.max_clock_skew);
        for (sender, seq) in &saved {
            verifier.restore_floor(sender, clock_floor.max(*seq));
        }
        drop(verifier);
        *self
            .saved_sequences
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = saved.into_iter().collect();
        Ok(())
    }

    /// Senders whose last accepted sequence number moved past what was last saved.
    pub(crate) fn unsaved_sequences(&self) -> Vec<(String, u64)> {
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

    pub(crate) fn mark_saved(&self, sequences: Vec<(String, u64)>) {
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
    let mut verifier = Verifier::new(Keyring::new(), settings.max_message_bytes, registry)?;
    let saved = install_stored_keys(&mut verifier, settings, store, now_ms)?;
    Ok((Arc::new(Mutex::new(verifier)), saved.into_iter().collect()))
}

/// Installs every key `store` holds in `verifier`, each sender with its floor (the larger of its
/// saved sequence number and the clock less `max_clock_skew`), after applying the registry's
/// retention; returns the saved sequence numbers.
fn install_stored_keys(
    verifier: &mut Verifier,
    settings: &HubSettings,
    store: &Store,
    now_ms: u64,
) -> Result<BTreeMap<String, u64>, HubError> {
    store.limit_machine_history(settings.history_per_machine)?;
    let saved: BTreeMap<String, u64> = store.hub_sequences()?;
    let clock_floor = restart_floor(settings.max_clock_skew);
    for row in store.machine_keys()? {
        let floor = saved
            .get(&row.id)
            .map_or(clock_floor, |s| clock_floor.max(*s));
        install_stored(verifier, row, floor, now_ms)?;
    }
    Ok(saved)
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
