//! Talking to the per-service balancers, only through their HTTP contract (`understudy_wire`):
//! `PUT config` (versioned, idempotent) and `GET stats since cursor`.
//!
//! Signed configs: a service whose balancer has a key (cluster file `balancer_key_file`) gets
//! every config as an envelope signed with that key (sender "controller", topic
//! `control.balancer-config`), either PUT on its admin port or, with `config_delivery = "hub"`,
//! published on the controller's hub (embedded or NATS), the balancer then being watched until it
//! runs the version. `rotate_key` replaces a balancer's key with a message signed by the current one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::config::balancer::{BalancerSecret, ConfigDelivery};
use crate::http_json::{self, error_message, ExchangeError, JsonClient};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use understudy_hub::{Backend, SecretKey, Signer, CONFIG_TOPIC, READ_AUTH_HEADER, READ_TOPIC};
use understudy_wire::{
    config_key_path, config_path, stats_path, BalancerConfig, ConfigRefusal, KeyRotation,
    KeyRotationAck, MachineHealth, MachineState, MachineStatus, PushAck, RefusalReason,
    StatsReport,
};

pub use understudy_hub::CONTROLLER_ID;

/// How often a config published on the hub is published again while its balancer does not run it.
const REPUBLISH: Duration = Duration::from_millis(500);

/// One keyed balancer, as the client signs for it.
struct Signing {
    signer: Signer,
    file: Option<PathBuf>,
    delivery: ConfigDelivery,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BalancerError {
    #[error("balancer {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// 409: the balancer runs a newer config version than the one pushed.
    #[error("balancer {url} runs a newer config: {message}")]
    Stale { url: String, message: String },
    /// 409: the balancer applied a config from a newer fencing epoch: another controller leads.
    #[error("balancer {url} is fenced off by a newer controller: {message}")]
    Fenced { url: String, message: String },
    #[error("balancer {url} refused ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("balancer {url} answered something unreadable: {reason}")]
    Protocol { url: String, reason: String },
    /// A stats read whose cursor the balancer cannot serve: the reader starts again from 0.
    #[error("balancer {url} refused the stats cursor ({}): {message}", problem.as_str())]
    Cursor {
        url: String,
        problem: CursorProblem,
        message: String,
    },
}

/// Why a balancer refused a stats cursor, and where to read from instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorProblem {
    /// The windows after the cursor were dropped (410): read again from the oldest cursor the
    /// balancer still serves (what lay between is lost, never counted twice).
    TooOld { oldest: u64 },
    /// The cursor is ahead of the balancer's (400): it restarted and its windows begin at 0.
    Ahead,
}

impl CursorProblem {
    pub fn as_str(self) -> &'static str {
        match self {
            CursorProblem::TooOld { .. } => "cursor_too_old",
            CursorProblem::Ahead => "cursor_ahead",
        }
    }

    /// The cursor to read from next.
    pub fn restart_at(self) -> u64 {
        match self {
            CursorProblem::TooOld { oldest } => oldest,
            CursorProblem::Ahead => 0,
        }
    }

    /// From the balancer's refusal of a cursor (`wire::CursorRefusal`); `None` for any other body.
    fn from_body(bytes: &[u8]) -> Option<CursorProblem> {
        use understudy_wire::{CursorProblem as Reason, CursorRefusal};
        let body: CursorRefusal = serde_json::from_slice(bytes).ok()?;
        match body.reason {
            Reason::CursorTooOld => Some(CursorProblem::TooOld {
                oldest: body.oldest_cursor?,
            }),
            Reason::CursorAhead => Some(CursorProblem::Ahead),
        }
    }
}

/// The two calls the controller makes to a balancer whose admin base URL is `url`.
/// A 409 to a push: a newer version runs (`Stale`), or a newer fencing epoch was applied
/// (`Fenced`); a body without a reason is taken for the former, as older balancers answer.
fn conflict(url: &str, bytes: &[u8]) -> BalancerError {
    let url = url.to_string();
    match serde_json::from_slice::<ConfigRefusal>(bytes) {
        Ok(ConfigRefusal {
            error,
            reason: RefusalReason::StaleEpoch,
        }) => BalancerError::Fenced {
            url,
            message: error,
        },
        _ => BalancerError::Stale {
            url,
            message: error_message(bytes),
        },
    }
}

#[async_trait]
pub trait BalancerClient: Send + Sync + 'static {
    async fn push(&self, url: &str, config: &BalancerConfig) -> Result<PushAck, BalancerError>;
    async fn stats(
        &self,
        url: &str,
        service: &str,
        since: u64,
    ) -> Result<StatsReport, BalancerError>;

    /// Replaces the key of `service`'s balancer (see [`HttpBalancerClient`]); clients that do not
    /// sign have nothing to rotate.
    async fn rotate_key(
        &self,
        url: &str,
        service: &str,
        new_key: SecretKey,
    ) -> Result<KeyRotationAck, BalancerError> {
        let _ = new_key;
        Err(BalancerError::Refused {
            url: url.to_string(),
            status: 0,
            message: format!("service {service:?} has no balancer key to rotate"),
        })
    }
}

/// The real client: HTTP/1.1 over hyper-util, JSON bodies; signs configs for keyed balancers.
pub struct HttpBalancerClient {
    client: JsonClient,
    timeout: Duration,
    /// Per service with a balancer key.
    signing: Mutex<HashMap<String, Signing>>,
    /// The controller's hub, for `ConfigDelivery::Hub` (set once the hub runs).
    hub: OnceLock<Arc<dyn Backend>>,
}

impl Default for HttpBalancerClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(3))
    }
}

impl HttpBalancerClient {
    pub fn new(timeout: Duration) -> Self {
        HttpBalancerClient {
            client: http_json::client(),
            timeout,
            signing: Mutex::new(HashMap::new()),
            hub: OnceLock::new(),
        }
    }

    /// Signs the configs of `service` with `secret`, delivered as `delivery` says.
    pub fn with_key(
        self,
        service: &str,
        secret: &BalancerSecret,
        delivery: ConfigDelivery,
    ) -> Self {
        let signer =
            Signer::new(CONTROLLER_ID, secret.key().clone()).expect("the controller id is valid");
        self.signing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                service.to_string(),
                Signing {
                    signer,
                    file: secret.file().map(Path::to_path_buf),
                    delivery,
                },
            );
        self
    }

    /// The client for a cluster: every service with a `balancer_key` is signed for.
    pub fn for_cluster(cluster: &crate::config::cluster::Cluster) -> Self {
        cluster
            .services
            .values()
            .fold(HttpBalancerClient::default(), |client, s| {
                match &s.balancer_key {
                    Some(secret) => client.with_key(&s.name, secret, s.config_delivery),
                    None => client,
                }
            })
    }

    /// The hub that `ConfigDelivery::Hub` publishes on (once; later calls are ignored).
    pub fn set_hub(&self, hub: Arc<dyn Backend>) {
        let _ = self.hub.set(hub);
    }

    /// Signs `payload` for `service`'s balancer, when it has a key.
    fn sign(
        &self,
        service: &str,
        payload: serde_json::Value,
    ) -> Option<(understudy_hub::Envelope, ConfigDelivery)> {
        let mut signing = self.signing.lock().unwrap_or_else(|p| p.into_inner());
        let s = signing.get_mut(service)?;
        Some((s.signer.sign(CONFIG_TOPIC, payload), s.delivery))
    }

    /// Publishes a signed config on the hub and waits until the balancer runs it.
    async fn push_over_hub(
        &self,
        url: &str,
        config: &BalancerConfig,
        envelope: understudy_hub::Envelope,
    ) -> Result<PushAck, BalancerError> {
        let unreachable = |reason: String| BalancerError::Unreachable {
            url: url.to_string(),
            reason,
        };
        let hub = self
            .hub
            .get()
            .ok_or_else(|| unreachable("the controller's hub is not running yet".into()))?;
        hub.publish(envelope)
            .await
            .map_err(|e| unreachable(format!("hub publish: {e}")))?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut next_publish = tokio::time::Instant::now() + REPUBLISH;
        loop {
            // A balancer that subscribed after the publish (it just started, or its feed
            // reconnected) gets a freshly signed copy.
            if tokio::time::Instant::now() >= next_publish {
                let payload =
                    serde_json::to_value(config).map_err(|e| BalancerError::Protocol {
                        url: url.to_string(),
                        reason: e.to_string(),
                    })?;
                if let Some((again, _)) = self.sign(&config.service, payload) {
                    hub.publish(again)
                        .await
                        .map_err(|e| unreachable(format!("hub publish: {e}")))?;
                }
                next_publish += REPUBLISH;
            }
            let (status, bytes) = self
                .read(url, &config.service, &config_path(&config.service))
                .await?;
            if (200..=299).contains(&status) {
                let running: BalancerConfig =
                    serde_json::from_slice(&bytes).map_err(|e| BalancerError::Protocol {
                        url: url.to_string(),
                        reason: e.to_string(),
                    })?;
                if running.version == config.version {
                    return Ok(PushAck {
                        service: config.service.clone(),
                        version: config.version,
                    });
                }
                if running.version > config.version {
                    return Err(BalancerError::Stale {
                        url: url.to_string(),
                        message: format!(
                            "config version {} is older than the running version {}",
                            config.version, running.version
                        ),
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unreachable(format!(
                    "config {} published on the hub; the balancer did not run it within {:?}",
                    config.version, self.timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A read of `service`'s balancer (stats, its running config), signed when it has a key:
    /// a keyed balancer serves reads to the controller only.
    async fn read(
        &self,
        url: &str,
        service: &str,
        path: &str,
    ) -> Result<(u16, Bytes), BalancerError> {
        let token = {
            let mut signing = self.signing.lock().unwrap_or_else(|p| p.into_inner());
            signing.get_mut(service).map(|s| {
                let envelope = s
                    .signer
                    .sign(READ_TOPIC, serde_json::json!({ "path": path }));
                BASE64.encode(serde_json::to_vec(&envelope).expect("an envelope serializes"))
            })
        };
        let headers: Vec<(&str, &str)> = token
            .iter()
            .map(|t| (READ_AUTH_HEADER, t.as_str()))
            .collect();
        self.send(url, http::Method::GET, path, &headers, None)
            .await
    }

    async fn call(
        &self,
        url: &str,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), BalancerError> {
        self.send(url, method, path, &[], body).await
    }

    async fn send(
        &self,
        url: &str,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), BalancerError> {
        let full = format!("{url}{path}");
        http_json::exchange_with(&self.client, method, &full, headers, body, self.timeout)
            .await
            .map_err(|e| BalancerError::Unreachable {
                url: url.to_string(),
                reason: match e {
                    ExchangeError::BadRequest(r) | ExchangeError::NoAnswer(r) => r,
                },
            })
    }
}

#[async_trait]
impl BalancerClient for HttpBalancerClient {
    async fn push(&self, url: &str, config: &BalancerConfig) -> Result<PushAck, BalancerError> {
        let protocol = |e: serde_json::Error| BalancerError::Protocol {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let body = match self.sign(
            &config.service,
            serde_json::to_value(config).map_err(protocol)?,
        ) {
            None => serde_json::to_vec(config).map_err(protocol)?,
            Some((envelope, ConfigDelivery::Http)) => {
                serde_json::to_vec(&envelope).map_err(protocol)?
            }
            Some((envelope, ConfigDelivery::Hub)) => {
                return self.push_over_hub(url, config, envelope).await
            }
        };
        let (status, bytes) = self
            .call(
                url,
                http::Method::PUT,
                &config_path(&config.service),
                Some(body),
            )
            .await?;
        match status {
            200..=299 => serde_json::from_slice(&bytes).map_err(|e| BalancerError::Protocol {
                url: url.to_string(),
                reason: e.to_string(),
            }),
            409 => Err(conflict(url, &bytes)),
            status => Err(BalancerError::Refused {
                url: url.to_string(),
                status,
                message: error_message(&bytes),
            }),
        }
    }

    async fn stats(
        &self,
        url: &str,
        service: &str,
        since: u64,
    ) -> Result<StatsReport, BalancerError> {
        let (status, bytes) = self.read(url, service, &stats_path(service, since)).await?;
        if let Some(problem) = CursorProblem::from_body(&bytes).filter(|_| status >= 400) {
            return Err(BalancerError::Cursor {
                url: url.to_string(),
                problem,
                message: error_message(&bytes),
            });
        }
        if !(200..=299).contains(&status) {
            return Err(BalancerError::Refused {
                url: url.to_string(),
                status,
                message: error_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| BalancerError::Protocol {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// Replaces the key of `service`'s balancer: a rotation message signed with the current
    /// key carries the new one (sent only to the admin port, never over the hub). The new key is
    /// written beside the key file first (`.next`) and moved over it once the balancer took it.
    async fn rotate_key(
        &self,
        url: &str,
        service: &str,
        new_key: SecretKey,
    ) -> Result<KeyRotationAck, BalancerError> {
        let protocol = |reason: String| BalancerError::Protocol {
            url: url.to_string(),
            reason,
        };
        let rotation = KeyRotation {
            service: service.to_string(),
            rotate_key: new_key.to_base64(),
        };
        let payload = serde_json::to_value(&rotation).map_err(|e| protocol(e.to_string()))?;
        let file = {
            let signing = self.signing.lock().unwrap_or_else(|p| p.into_inner());
            let s = signing.get(service).ok_or_else(|| BalancerError::Refused {
                url: url.to_string(),
                status: 0,
                message: format!("service {service:?} has no balancer key to rotate"),
            })?;
            s.file.clone()
        };
        let next = file.as_ref().map(|f| f.with_extension("next"));
        if let Some(next) = &next {
            understudy_wire::write_key_file(next, &new_key)
                .map_err(|e| protocol(format!("cannot write {}: {e}", next.display())))?;
        }
        let (envelope, _) = self.sign(service, payload).expect("checked above");
        let body = serde_json::to_vec(&envelope).map_err(|e| protocol(e.to_string()))?;
        let answer = self
            .call(
                url,
                http::Method::PUT,
                &config_key_path(service),
                Some(body),
            )
            .await;
        let ack = match answer {
            Ok((200..=299, bytes)) => serde_json::from_slice::<KeyRotationAck>(&bytes)
                .map_err(|e| protocol(e.to_string())),
            Ok((status, bytes)) => Err(BalancerError::Refused {
                url: url.to_string(),
                status,
                message: error_message(&bytes),
            }),
            Err(e) => Err(e),
        };
        match (&ack, &file, &next) {
            (Ok(_), Some(file), Some(next)) => std::fs::rename(next, file).map_err(|e| {
                protocol(format!(
                    "the balancer took the new key but {} could not replace {}: {e}",
                    next.display(),
                    file.display()
                ))
            })?,
            (Err(_), _, Some(next)) => {
                let _ = std::fs::remove_file(next);
            }
            _ => {}
        }
        if ack.is_ok() {
            let mut signing = self.signing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = signing.get_mut(service) {
                s.signer.rotate(new_key);
            }
        }
        ack
    }
}

/// In-memory balancer following the same contract, for tests and benchmarks: versioned configs,
/// a cursor over queued pairs, draining of removed machines that hold sessions.
#[derive(Default)]
pub struct FakeBalancer {
    state: Mutex<BTreeMap<String, FakeService>>,
}

#[derive(Default, Clone)]
struct FakeService {
    config: Option<BalancerConfig>,
    /// Every config accepted, in order (idempotent repeats not included).
    accepted: Vec<BalancerConfig>,
    pushes: u64,
    queued: Vec<understudy_wire::JobPair>,
    series: Vec<understudy_wire::SeriesStats>,
    cursor: u64,
    sessions: BTreeMap<String, u64>,
    /// What the balancer's probes say of a machine (unknown when not set).
    health: BTreeMap<String, (MachineHealth, Option<String>)>,
    draining: Vec<MachineStatus>,
    unreachable: bool,
    /// Reads with a cursor below this are refused as too old (windows dropped).
    oldest_cursor: u64,
    /// The highest fencing epoch applied, as a real balancer keeps it.
    epoch: u64,
}

impl FakeBalancer {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, service: &str, f: impl FnOnce(&mut FakeService) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(state.entry(service.to_string()).or_default())
    }

    /// Queues mirrored pairs for the next stats read. Like a real balancer, which copies each job
    /// to every simulation version, a job given only with its v2 copy also gets its control copy
    /// when the running config has a control (a simulation machine of the active version): the
    /// control answers as the active v1 machine did.
    pub fn add_pairs(&self, service: &str, pairs: Vec<understudy_wire::JobPair>) {
        self.with(service, |s| {
            let control = s.config.as_ref().and_then(|c| {
                c.machines
                    .iter()
                    .find(|m| {
                        m.config == understudy_wire::PoolRole::Simulation
                            && pairs.iter().any(|p| p.active.version == m.version)
                    })
                    .map(|m| (m.id.clone(), m.version.clone()))
            });
            for pair in &pairs {
                s.queued.push(pair.clone());
                let Some((id, version)) = &control else {
                    continue;
                };
                let has_control_copy = pairs
                    .iter()
                    .any(|p| p.job == pair.job && p.simulation.version == pair.active.version);
                if pair.active.version == *version
                    && pair.simulation.version != *version
                    && !has_control_copy
                {
                    s.queued.push(understudy_wire::JobPair {
                        simulation: understudy_wire::JobObservation {
                            machine: id.clone(),
                            ..pair.active.clone()
                        },
                        matched: true,
                        diff: None,
                        ..pair.clone()
                    });
                }
            }
        });
    }

    /// Queues per-(version, config) series for the next stats read only.
    pub fn add_series(&self, service: &str, series: Vec<understudy_wire::SeriesStats>) {
        self.with(service, |s| s.series.extend(series));
    }

    /// Sustained sessions a machine holds (kept while it drains).
    pub fn set_sessions(&self, service: &str, machine: &str, sessions: u64) {
        self.with(service, |s| {
            s.sessions.insert(machine.to_string(), sessions);
            if sessions == 0 {
                s.draining.retain(|m| m.id != machine);
            }
        });
    }

    /// Sets what the balancer reports of `machine`'s health probes from now on.
    pub fn set_health(&self, service: &str, machine: &str, health: MachineHealth, reason: &str) {
        self.with(service, |s| {
            let reason = (!reason.is_empty()).then(|| reason.to_string());
            s.health.insert(machine.to_string(), (health, reason));
        });
    }

    pub fn set_unreachable(&self, service: &str, unreachable: bool) {
        self.with(service, |s| s.unreachable = unreachable);
    }

    /// Drops the windows up to `oldest`: a read with an older cursor is refused, as a balancer
    /// whose windows were used up answers.
    pub fn drop_windows(&self, service: &str, oldest: u64) {
        self.with(service, |s| {
            s.oldest_cursor = oldest;
            s.cursor = s.cursor.max(oldest);
        });
    }

    /// The running config.
    pub fn config(&self, service: &str) -> Option<BalancerConfig> {
        self.with(service, |s| s.config.clone())
    }

    /// Every config accepted (a repeat of the running version is not counted).
    pub fn accepted(&self, service: &str) -> Vec<BalancerConfig> {
        self.with(service, |s| s.accepted.clone())
    }

    /// Push calls received, accepted or not.
    /// The highest fencing epoch the service's balancer applied.
    pub fn epoch(&self, service: &str) -> u64 {
        self.with(service, |s| s.epoch)
    }

    pub fn pushes(&self, service: &str) -> u64 {
        self.with(service, |s| s.pushes)
    }

    /// Forgets everything, as a restarted balancer would.
    pub fn restart(&self, service: &str) {
        self.with(service, |s| *s = FakeService::default());
    }
}

#[async_trait]
impl BalancerClient for FakeBalancer {
    async fn push(&self, url: &str, config: &BalancerConfig) -> Result<PushAck, BalancerError> {
        self.with(&config.service, |s| {
            s.pushes += 1;
            if s.unreachable {
                return Err(BalancerError::Unreachable {
                    url: url.to_string(),
                    reason: "fake balancer set unreachable".to_string(),
                });
            }
            if config.epoch < s.epoch {
                return Err(BalancerError::Fenced {
                    url: url.to_string(),
                    message: format!("epoch {} was already applied", s.epoch),
                });
            }
            s.epoch = config.epoch;
            let running = s.config.as_ref().map(|c| c.version).unwrap_or(0);
            if config.version < running {
                return Err(BalancerError::Stale {
                    url: url.to_string(),
                    message: format!("running version {running} is newer"),
                });
            }
            if config.version > running || s.config.is_none() {
                if let Some(old) = &s.config {
                    for m in &old.machines {
                        let kept = config.machines.iter().any(|n| n.id == m.id);
                        let sessions = s.sessions.get(&m.id).copied().unwrap_or(0);
                        if !kept && sessions > 0 {
                            s.draining.push(MachineStatus {
                                id: m.id.clone(),
                                version: m.version.clone(),
                                config: m.config,
                                state: MachineState::Draining,
                                sessions,
                                health: MachineHealth::Unknown,
                                health_reason: None,
                            });
                        }
                    }
                }
                s.draining
                    .retain(|d| !config.machines.iter().any(|m| m.id == d.id));
                s.config = Some(config.clone());
                s.accepted.push(config.clone());
            }
            Ok(PushAck {
                service: config.service.clone(),
                version: config.version,
            })
        })
    }

    async fn stats(
        &self,
        url: &str,
        service: &str,
        since: u64,
    ) -> Result<StatsReport, BalancerError> {
        self.with(service, |s| {
            if s.unreachable {
                return Err(BalancerError::Unreachable {
                    url: url.to_string(),
                    reason: "fake balancer set unreachable".to_string(),
                });
            }
            if since < s.oldest_cursor {
                return Err(BalancerError::Cursor {
                    url: url.to_string(),
                    problem: CursorProblem::TooOld {
                        oldest: s.oldest_cursor,
                    },
                    message: format!("cursor {since} is older than the retained windows"),
                });
            }
            // Pairs carry increasing job numbers; the cursor is the last job number handed out.
            let pairs: Vec<_> = s.queued.iter().filter(|p| p.job > since).cloned().collect();
            s.queued.retain(|p| p.job > since);
            let cursor = pairs.last().map(|p| p.job).unwrap_or(since.max(s.cursor));
            s.cursor = cursor;
            let mut machines: Vec<MachineStatus> = s
                .config
                .iter()
                .flat_map(|c| c.machines.iter())
                .map(|m| {
                    let (health, health_reason) = s.health.get(&m.id).cloned().unwrap_or_default();
                    MachineStatus {
                        id: m.id.clone(),
                        version: m.version.clone(),
                        config: m.config,
                        state: MachineState::Serving,
                        sessions: s.sessions.get(&m.id).copied().unwrap_or(0),
                        health,
                        health_reason,
                    }
                })
                .collect();
            machines.extend(s.draining.iter().cloned());
            Ok(StatsReport {
                service: service.to_string(),
                config_version: s.config.as_ref().map(|c| c.version).unwrap_or(0),
                cursor,
                series: std::mem::take(&mut s.series),
                pairs,
                pairs_lost: 0,
                mirror_dropped: 0,
                machines,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path, Query};
    use axum::http::StatusCode;
    use axum::routing::{get, put};
    use axum::{Json, Router};
    use understudy_wire::{ErrorBody, MachineEntry, PoolRole};

    /// A stand-in balancer admin port: accepts version 5 only, refuses older (409) or empty (400).
    async fn serve() -> String {
        let app = Router::new()
            .route(
                "/api/v1/balancers/{service}/config",
                put(|Path(service): Path<String>, Json(c): Json<BalancerConfig>| async move {
                    match c.version {
                        5 => Ok(Json(PushAck { service, version: 5 })),
                        v if v < 5 => Err((
                            StatusCode::CONFLICT,
                            Json(ErrorBody { error: format!("version {v} is older than 5") }),
                        )),
                        _ => Err((
                            StatusCode::BAD_REQUEST,
                            Json(ErrorBody { error: "machines[0].weight: 0 is outside 1..=1000".into() }),
                        )),
                    }
                }),
            )
            .route(
                "/api/v1/balancers/{service}/stats",
                get(|Path(service): Path<String>, Query(q): Query<BTreeMap<String, u64>>| async move {
                    Json(StatsReport {
                        service,
                        config_version: 5,
                        cursor: q.get("since").copied().unwrap_or(0) + 3,
                        series: Vec::new(),
                        pairs: Vec::new(),
                        pairs_lost: 0,
                        mirror_dropped: 0,
                        machines: Vec::new(),
                    })
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    fn config(version: u64) -> BalancerConfig {
        BalancerConfig {
            service: "db".into(),
            version,
            epoch: 0,
            mirror_fraction: 1.0,
            compare_body: false,
            compare: None,
            compare_headers: Vec::new(),
            drain_timeout_ms: 1000,
            machines: vec![MachineEntry {
                id: "db-1".into(),
                version: "v1".into(),
                address: "127.0.0.1:1".into(),
                weight: 100,
                config: PoolRole::Active,
                health_path: None,
            }],
        }
    }

    /// A real balancer process (in this process) for `db`, with a key and optionally a feed.
    fn keyed_balancer(
        key: Option<understudy_proxy::BalancerKey>,
        feed: Option<understudy_proxy::ConfigFeed>,
    ) -> (understudy_proxy::RunningBalancers, String) {
        balancer_signing(understudy_proxy::ConfigSigning {
            keys: key.into_iter().map(|k| ("db".to_string(), k)).collect(),
            feed,
            ..Default::default()
        })
    }

    /// A real balancer process (in this process) for `db` with these signing settings, and its
    /// admin URL.
    fn balancer_signing(
        signing: understudy_proxy::ConfigSigning,
    ) -> (understudy_proxy::RunningBalancers, String) {
        balancer_keeping(signing, 4096)
    }

    /// As `balancer_signing`, keeping `windows` stats windows. A keyless `db` runs only in
    /// insecure mode, which leaves a keyed one keyed.
    fn balancer_keeping(
        signing: understudy_proxy::ConfigSigning,
        windows: usize,
    ) -> (understudy_proxy::RunningBalancers, String) {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let running = understudy_proxy::spawn_with(
            understudy_proxy::ProcessConfig::new(
                any,
                vec![understudy_proxy::BalancerSpec::new(any, config(1))],
            ),
            understudy_proxy::SpawnOptions {
                insecure_no_key: signing.keys.is_empty(),
                signing,
                marker_key: Some(SecretKey::generate()),
                stats_windows: windows,
                ..Default::default()
            },
        )
        .unwrap();
        let url = format!("http://{}", running.admin_addr());
        (running, url)
    }

    #[test]
    fn a_conflict_says_whether_a_newer_version_or_a_newer_epoch_stands() {
        let fenced = conflict(
            "u",
            br#"{"error": "epoch 9 applied", "reason": "stale_epoch"}"#,
        );
        assert!(
            matches!(fenced, BalancerError::Fenced { ref message, .. } if message == "epoch 9 applied")
        );
        let stale = conflict("u", br#"{"error": "older", "reason": "stale_version"}"#);
        assert!(matches!(stale, BalancerError::Stale { .. }), "{stale:?}");
        // A balancer from before the epoch gives no reason: a version conflict.
        let old = conflict("u", br#"{"error": "older"}"#);
        assert!(matches!(old, BalancerError::Stale { ref message, .. } if message == "older"));
    }

    /// Reads of a keyed balancer are signed by the client; a cursor whose windows the balancer
    /// dropped comes back as a typed refusal naming the oldest cursor it still serves.

    #[tokio::test]
    async fn stats_reads_are_signed_and_a_dropped_cursor_names_the_oldest() {
        let key = SecretKey::generate();
        let (running, url) = balancer_keeping(
            understudy_proxy::ConfigSigning {
                keys: [(
                    "db".to_string(),
                    understudy_proxy::BalancerKey::given(key.clone()),
                )]
                .into(),
                ..Default::default()
            },
            2,
        );
        let anonymous = HttpBalancerClient::new(Duration::from_secs(2));
        match anonymous.stats(&url, "db", 0).await {
            Err(BalancerError::Refused { status: 401, .. }) => {}
            other => panic!("an unsigned read was not refused: {other:?}"),
        }
        let secret = BalancerSecret::given(key);
        let client = HttpBalancerClient::new(Duration::from_secs(2)).with_key(
            "db",
            &secret,
            ConfigDelivery::Http,
        );
        let first = client.stats(&url, "db", 0).await.unwrap();
        // Each job (its machine is not there: a connect failure, recorded) fills a window that
        // the next read closes; four of them push the first job's cursor out of the two kept.
        let lb = running.listen_addr("db").unwrap();
        let http = http_json::client();
        let mut cursor = first.cursor;
        let mut after_first_job = None;
        for _ in 0..4 {
            let job = format!("http://{lb}/job");
            let timeout = Duration::from_secs(5);
            let _ = http_json::exchange(&http, http::Method::GET, &job, None, None, timeout).await;
            // The job is recorded just after its error page is sent: read until it shows.
            let before = cursor;
            for _ in 0..100 {
                cursor = client.stats(&url, "db", cursor).await.unwrap().cursor;
                if cursor > before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            after_first_job.get_or_insert(cursor);
        }
        // Cursor 0 always reads the totals; the cursor after the first job has left the two
        // windows kept.
        let old = after_first_job.expect("a cursor");
        match client.stats(&url, "db", old).await {
            Err(BalancerError::Cursor {
                problem: CursorProblem::TooOld { oldest },
                ..
            }) => {
                assert!(oldest > old && oldest < cursor, "{oldest}");
                assert!(client.stats(&url, "db", oldest).await.is_ok());
            }
            other => panic!("not a cursor refusal: {other:?}"),
        }
        running.shutdown();
    }

    /// A real balancer behind a signed push: a config from an older fencing epoch comes back as
    /// `Fenced`, whatever its version, and nothing is switched.
    #[tokio::test]
    async fn a_real_balancer_fences_off_an_older_epoch() {
        let key = SecretKey::generate();
        let (balancer, url) = keyed_balancer(
            Some(understudy_proxy::BalancerKey::given(key.clone())),
            None,
        );
        let secret = BalancerSecret::given(key);
        let client = HttpBalancerClient::new(Duration::from_secs(2)).with_key(
            "db",
            &secret,
            ConfigDelivery::Http,
        );
        let at = |version, epoch| BalancerConfig {
            epoch,
            ..config(version)
        };
        assert_eq!(client.push(&url, &at(2, 7)).await.unwrap().version, 2);
        match client.push(&url, &at(3, 6)).await {
            Err(BalancerError::Fenced { message, .. }) => {
                assert!(message.contains("epoch 6"), "{message}")
            }
            other => panic!("not fenced: {other:?}"),
        }
        match client.push(&url, &at(1, 7)).await {
            Err(BalancerError::Stale { .. }) => {}
            other => panic!("not a version conflict: {other:?}"),
        }
        assert_eq!(client.push(&url, &at(3, 8)).await.unwrap().version, 3);
        balancer.shutdown();
    }

    #[tokio::test]
    async fn configs_to_a_keyed_balancer_are_signed_and_its_key_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("db.key");
        let key = SecretKey::generate();
        understudy_wire::write_key_file(&key_file, &key).unwrap();
        let (_balancer, url) = keyed_balancer(
            Some(understudy_proxy::BalancerKey::from_file(&key_file).unwrap()),
            None,
        );
        // Unsigned: refused, with the reason.
        let plain = HttpBalancerClient::new(Duration::from_secs(2));
        match plain.push(&url, &config(2)).await {
            Err(BalancerError::Refused {
                status: 401,
                message,
                ..
            }) => assert!(message.contains("signed by the controller"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
        // Signed with the key from the same file: applied.
        let secret = BalancerSecret::from_file(&key_file).unwrap();
        assert!(!format!("{secret:?}").contains(&key.to_base64()));
        let client = HttpBalancerClient::new(Duration::from_secs(2)).with_key(
            "db",
            &secret,
            ConfigDelivery::Http,
        );
        assert_eq!(client.push(&url, &config(2)).await.unwrap().version, 2);
        // Re-pushing the same version (a retry) is a fresh signature, so it is accepted.
        assert_eq!(client.push(&url, &config(2)).await.unwrap().version, 2);

        // Rotation: the balancer and the controller both end up with the new key in the file
        // (here they share it, as on one host).
        let next = SecretKey::generate();
        let ack = client.rotate_key(&url, "db", next.clone()).await.unwrap();
        assert_eq!(ack.grace_ms, 60_000);
        assert_eq!(
            BalancerSecret::from_file(&key_file)
                .unwrap()
                .key()
                .to_base64(),
            next.to_base64()
        );
        assert!(!key_file.with_extension("next").exists());
        assert_eq!(client.push(&url, &config(3)).await.unwrap().version, 3);
        // The old key is now refused.
        let stale = HttpBalancerClient::new(Duration::from_secs(2)).with_key(
            "db",
            &BalancerSecret::given(key),
            ConfigDelivery::Http,
        );
        assert!(matches!(
            stale.push(&url, &config(4)).await,
            Err(BalancerError::Refused { status: 401, .. })
        ));
        // No key, nothing to rotate.
        assert!(plain
            .rotate_key(&url, "db", SecretKey::generate())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn configs_delivered_through_nats_are_acknowledged_once_running() {
        let nats = understudy_hub::nats::NatsServer::start()
            .unwrap_or_else(|e| panic!("cannot run the NATS test: {e}"));
        let key = SecretKey::generate();
        let (_balancer, url) = keyed_balancer(
            Some(understudy_proxy::BalancerKey::given(key.clone())),
            Some(understudy_proxy::ConfigFeed::Nats {
                url: nats.url().to_string(),
            }),
        );
        let client = HttpBalancerClient::new(Duration::from_secs(2)).with_key(
            "db",
            &BalancerSecret::given(key),
            ConfigDelivery::Hub,
        );
        // Before the hub is set: a clear, retryable error.
        assert!(matches!(
            client.push(&url, &config(2)).await,
            Err(BalancerError::Unreachable { .. })
        ));
        let hub =
            understudy_hub::nats::NatsBackend::connect(nats.url(), &prometheus::Registry::new())
                .await
                .unwrap();
        client.set_hub(Arc::new(hub));
        // The balancer connects to NATS in the background: retried as the controller's tick does.
        let mut ack = None;
        for _ in 0..10 {
            if let Ok(a) = client.push(&url, &config(2)).await {
                ack = Some(a);
                break;
            }
        }
        assert_eq!(ack.expect("acknowledged").version, 2);
        assert_eq!(client.push(&url, &config(3)).await.unwrap().version, 3);
        // An older version than the running one is reported stale.
        assert!(matches!(
            client.push(&url, &config(2)).await,
            Err(BalancerError::Stale { .. })
        ));
    }

    #[tokio::test]
    async fn the_controller_rotates_a_balancers_key_on_request() {
        let key = SecretKey::generate();
        // No grace: the old key dies with the rotation, so the second rotation below succeeds
        // only if the controller signs with the new key.
        let (balancer, url) = balancer_signing(understudy_proxy::ConfigSigning {
            keys: [(
                "db".to_string(),
                understudy_proxy::BalancerKey::given(key.clone()),
            )]
            .into(),
            rotation_grace: Duration::ZERO,
            ..Default::default()
        });
        let text = format!(
            "[services.db]\nbalancer = \"{url}\"\n[[machines]]\nid = \"db-1\"\nservice = \"db\"\nversion = \"v1\"\naddress = \"127.0.0.1:1\"\nconfig = \"active\"\n"
        );
        let mut cluster = crate::config::cluster::parse("c.toml", &text).unwrap();
        cluster
            .set_balancer_key("db", BalancerSecret::given(key), ConfigDelivery::Http)
            .unwrap();
        let controller = crate::app::start(crate::app::ControllerConfig {
            cluster,
            store: crate::config::store::StoreLocation::Memory,
            lease: None,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            token: "t0ken".into(),
            tick: Duration::from_millis(50),
        })
        .await
        .unwrap();
        let http = http_json::client();
        let rotate = |service: &str, token: &str| {
            let url = format!(
                "{}/api/v1/balancers/{service}/rotate-key",
                controller.admin_url()
            );
            let (http, token) = (http.clone(), token.to_string());
            async move {
                http_json::exchange(
                    &http,
                    http::Method::POST,
                    &url,
                    Some(&token),
                    None,
                    Duration::from_secs(5),
                )
                .await
                .unwrap()
            }
        };
        assert_eq!(rotate("db", "wrong").await.0, 401);
        assert_eq!(rotate("nope", "t0ken").await.0, 404);
        for _ in 0..2 {
            let (status, body) = rotate("db", "t0ken").await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let ack: KeyRotationAck = serde_json::from_slice(&body).unwrap();
            assert_eq!((ack.service.as_str(), ack.grace_ms), ("db", 0));
        }
        controller.shutdown().await;
        tokio::task::spawn_blocking(move || balancer.shutdown())
            .await
            .unwrap();
    }

    #[test]
    fn the_cluster_file_names_each_balancers_key_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let key = SecretKey::generate();
        understudy_wire::write_key_file(&dir.path().join("keys/db.key"), &key).unwrap();
        let file = dir.path().join("cluster.toml");
        let file = file.to_str().unwrap();
        let sample = crate::testing::SAMPLE;
        let with_key =
            |extra: &str| sample.replace("[services.db]\n", &format!("[services.db]\n{extra}\n"));
        // Relative to the cluster file; configs to that balancer are then signed.
        let cluster = crate::config::cluster::parse(
            file,
            &with_key("balancer_key_file = \"keys/db.key\"\nconfig_delivery = \"hub\""),
        )
        .unwrap();
        let db = &cluster.services["db"];
        assert_eq!(
            db.balancer_key.as_ref().unwrap().key().to_base64(),
            key.to_base64()
        );
        assert_eq!(db.config_delivery, ConfigDelivery::Hub);
        assert!(cluster.services["media"].balancer_key.is_none());
        assert_eq!(
            cluster.services["media"].config_delivery,
            ConfigDelivery::Http
        );
        // Errors name the field and the line; the key never appears.
        let text = with_key("balancer_key_file = \"keys/missing.key\"");
        let err = crate::config::cluster::parse(file, &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("services.db.balancer_key_file"), "{err}");
        assert!(err.contains("missing.key"), "{err}");
        let line = text
            .lines()
            .position(|l| l.contains("missing.key"))
            .unwrap()
            + 1;
        assert!(
            err.contains(&format!("line {line}")) || err.contains(&format!(":{line}")),
            "{err}"
        );
        let err = crate::config::cluster::parse(file, &with_key("config_delivery = \"hub\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config_delivery") && err.contains("balancer_key_file"),
            "{err}"
        );
        let err =
            crate::config::cluster::parse(file, &with_key("config_delivery = \"carrier-pigeon\""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("carrier-pigeon"), "{err}");
    }

    #[tokio::test]
    async fn http_client_maps_the_contract() {
        let url = serve().await;
        let client = HttpBalancerClient::new(Duration::from_secs(2));
        let ack = client.push(&url, &config(5)).await.unwrap();
        assert_eq!(ack.version, 5);
        match client.push(&url, &config(4)).await {
            Err(BalancerError::Stale { message, .. }) => assert!(message.contains("older")),
            other => panic!("unexpected {other:?}"),
        }
        match client.push(&url, &config(6)).await {
            Err(BalancerError::Refused {
                status: 400,
                message,
                ..
            }) => {
                assert!(message.contains("weight"))
            }
            other => panic!("unexpected {other:?}"),
        }
        let stats = client.stats(&url, "db", 7).await.unwrap();
        assert_eq!((stats.service.as_str(), stats.cursor), ("db", 10));
        // Nothing listens on port 1.
        assert!(matches!(
            client.stats("http://127.0.0.1:1", "db", 0).await,
            Err(BalancerError::Unreachable { .. })
        ));
    }
}
