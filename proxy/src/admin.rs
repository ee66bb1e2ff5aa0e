//! The admin HTTP endpoint shared by all balancers of a process: config push, stats since a
//! cursor, Prometheus metrics, health.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::service::{PushError, PushResult, Service};
use crate::signing::{ConfigGates, Refusal};
use crate::stats::CursorError;
use crate::wire::{BalancerConfig, ErrorBody, KeyRotationAck, PushAck};

pub(crate) struct AdminState {
    pub services: HashMap<String, Arc<Service>>,
    pub listen: HashMap<String, SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// Balancers with a key take only controller-signed configs (see `signing`).
    pub gates: Arc<ConfigGates>,
}

pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/balancers", get(list))
        .route(
            "/api/v1/balancers/{service}/config",
            get(get_config).put(put_config),
        )
        .route("/api/v1/balancers/{service}/stats", get(stats))
        .route(
            "/api/v1/balancers/{service}/config-key",
            axum::routing::put(put_config_key),
        )
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// A signed message refused: `{"error", "reason"}` like the hub's refusals.
fn refused(refusal: Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(serde_json::json!({ "error": refusal.message, "reason": refusal.reason })),
    )
        .into_response()
}

fn unknown_service(service: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no balancer for service {service:?} in this process"),
    )
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    for service in state.services.values() {
        let status = service.router.machine_status();
        state.metrics.set_sessions(
            &service.name,
            status.iter().map(|m| {
                let s = match m.state {
                    crate::wire::MachineState::Serving => "serving",
                    crate::wire::MachineState::Draining => "draining",
                };
                (m.id.as_str(), s, m.sessions)
            }),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct BalancerSummary {
    service: String,
    listen: SocketAddr,
    config_version: u64,
}

async fn list(State(state): State<Arc<AdminState>>) -> Json<Vec<BalancerSummary>> {
    let mut out: Vec<BalancerSummary> = state
        .services
        .iter()
        .map(|(name, s)| BalancerSummary {
            service: name.clone(),
            listen: state.listen[name],
            config_version: s.router.table().config.version,
        })
        .collect();
    out.sort_by(|a, b| a.service.cmp(&b.service));
    Json(out)
}

async fn get_config(State(state): State<Arc<AdminState>>, Path(service): Path<String>) -> Response {
    match state.services.get(&service) {
        Some(s) => Json(s.running_config()).into_response(),
        None => unknown_service(&service),
    }
}

async fn put_config(
    State(state): State<Arc<AdminState>>,
    Path(service): Path<String>,
    body: Bytes,
) -> Response {
    let Some(balancer) = state.services.get(&service) else {
        return unknown_service(&service);
    };
    // Parsed here rather than by the Json extractor so that every refusal is an ErrorBody that
    // names the field (serde says "unknown field `x`" with line and column).
    let config: BalancerConfig = if state.gates.is_signed(&service) {
        match state.gates.open_config(&service, &body) {
            Ok(c) => c,
            Err(refusal) => return refused(refusal),
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad config: {e}")),
        }
    };
    match balancer.push(&config) {
        Ok(PushResult::Applied) => {
            tracing::info!(service, version = config.version, "config applied");
            Json(PushAck {
                service,
                version: config.version,
            })
            .into_response()
        }
        Ok(PushResult::AlreadyRunning) => Json(PushAck {
            service,
            version: config.version,
        })
        .into_response(),
        Err(e @ PushError::Stale { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("bad config: {e}")),
    }
}

/// Key rotation: a message signed with the current key carrying the next one.
async fn put_config_key(
    State(state): State<Arc<AdminState>>,
    Path(service): Path<String>,
    body: Bytes,
) -> Response {
    if !state.services.contains_key(&service) {
        return unknown_service(&service);
    }
    if !state.gates.is_signed(&service) {
        return error(
            StatusCode::CONFLICT,
            format!("the balancer of {service:?} has no key to rotate (start it with one)"),
        );
    }
    match state.gates.rotate(&service, &body) {
        Ok(grace) => Json(KeyRotationAck {
            service,
            grace_ms: grace.as_millis() as u64,
        })
        .into_response(),
        Err(refusal) => refused(refusal),
    }
}

async fn stats(
    State(state): State<Arc<AdminState>>,
    Path(service): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(balancer) = state.services.get(&service) else {
        return unknown_service(&service);
    };
    let mut since = 0;
    for pair in query.as_deref().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("since", value)) => match value.parse::<u64>() {
                Ok(v) => since = v,
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("since: {value:?} is not a cursor (an unsigned integer)"),
                    )
                }
            },
            _ if pair.is_empty() => {}
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {pair:?}; expected since=CURSOR"),
                )
            }
        }
    }
    match balancer.report(since) {
        Ok(report) => Json(report).into_response(),
        Err(e @ CursorError::Ahead { .. }) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ CursorError::TooOld { .. }) => error(StatusCode::GONE, e.to_string()),
    }
}
