//! Talking to the per-service balancers, only through their HTTP contract (`understudy_proxy::wire`):
//! `PUT config` (versioned, idempotent) and `GET stats since cursor`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::http_json::{self, error_message, ExchangeError, JsonClient};
use async_trait::async_trait;
use bytes::Bytes;
use understudy_proxy::wire::{
    config_path, stats_path, BalancerConfig, MachineState, MachineStatus, PushAck, StatsReport,
};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BalancerError {
    #[error("balancer {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// 409: the balancer runs a newer config version than the one pushed.
    #[error("balancer {url} runs a newer config: {message}")]
    Stale { url: String, message: String },
    #[error("balancer {url} refused ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("balancer {url} answered something unreadable: {reason}")]
    Protocol { url: String, reason: String },
}

/// The two calls the controller makes to a balancer whose admin base URL is `url`.
#[async_trait]
pub trait BalancerClient: Send + Sync + 'static {
    async fn push(&self, url: &str, config: &BalancerConfig) -> Result<PushAck, BalancerError>;
    async fn stats(
        &self,
        url: &str,
        service: &str,
        since: u64,
    ) -> Result<StatsReport, BalancerError>;
}

/// The real client: HTTP/1.1 over hyper-util, JSON bodies.
pub struct HttpBalancerClient {
    client: JsonClient,
    timeout: Duration,
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
        }
    }

    async fn call(
        &self,
        url: &str,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), BalancerError> {
        let full = format!("{url}{path}");
        http_json::exchange(&self.client, method, &full, None, body, self.timeout)
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
        let body = serde_json::to_vec(config).map_err(|e| BalancerError::Protocol {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
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
            409 => Err(BalancerError::Stale {
                url: url.to_string(),
                message: error_message(&bytes),
            }),
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
        let (status, bytes) = self
            .call(url, http::Method::GET, &stats_path(service, since), None)
            .await?;
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
    queued: Vec<understudy_proxy::wire::JobPair>,
    series: Vec<understudy_proxy::wire::SeriesStats>,
    cursor: u64,
    sessions: BTreeMap<String, u64>,
    draining: Vec<MachineStatus>,
    unreachable: bool,
}

impl FakeBalancer {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, service: &str, f: impl FnOnce(&mut FakeService) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(state.entry(service.to_string()).or_default())
    }

    /// Queues mirrored pairs for the next stats read.
    pub fn add_pairs(&self, service: &str, pairs: Vec<understudy_proxy::wire::JobPair>) {
        self.with(service, |s| s.queued.extend(pairs));
    }

    /// Queues per-(version, config) series for the next stats read only.
    pub fn add_series(&self, service: &str, series: Vec<understudy_proxy::wire::SeriesStats>) {
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

    pub fn set_unreachable(&self, service: &str, unreachable: bool) {
        self.with(service, |s| s.unreachable = unreachable);
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
            // Pairs carry increasing job numbers; the cursor is the last job number handed out.
            let pairs: Vec<_> = s.queued.iter().filter(|p| p.job > since).cloned().collect();
            s.queued.retain(|p| p.job > since);
            let cursor = pairs.last().map(|p| p.job).unwrap_or(since.max(s.cursor));
            s.cursor = cursor;
            let mut machines: Vec<MachineStatus> = s
                .config
                .iter()
                .flat_map(|c| c.machines.iter())
                .map(|m| MachineStatus {
                    id: m.id.clone(),
                    version: m.version.clone(),
                    config: m.config,
                    state: MachineState::Serving,
                    sessions: s.sessions.get(&m.id).copied().unwrap_or(0),
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
    use understudy_proxy::wire::{ErrorBody, MachineEntry, PoolRole};

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
            mirror_fraction: 1.0,
            compare_body: false,
            drain_timeout_ms: 1000,
            machines: vec![MachineEntry {
                id: "db-1".into(),
                version: "v1".into(),
                address: "127.0.0.1:1".into(),
                weight: 100,
                config: PoolRole::Active,
            }],
        }
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
