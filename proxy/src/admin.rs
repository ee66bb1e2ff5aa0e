//! The admin HTTP endpoint shared by all balancers of a process: config push, stats since a
//! cursor, Prometheus metrics, health, and the OpenAPI document describing them (`openapi.rs`).
//! For a keyed balancer (the default) every config and key is controller-signed and every read of
//! its stats or config too; `/healthz`, `/metrics`, the list of balancers and the document are
//! open. Every error is JSON (`extract.rs` turns axum's own rejections into JSON too).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use understudy_hub::{Envelope, READ_AUTH_HEADER};
use understudy_wire::{
    BalancerConfig, ConfigRefusal, CursorProblem, CursorRefusal, ErrorBody, KeyRotationAck,
    PushAck, RefusalBody, RefusalReason, StatsReport,
};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::{error, ApiBody, ApiPath};
use crate::metrics::Metrics;
use crate::openapi::{AnyError, ConfigBody, StatsBadRequest};
use crate::service::{PushError, PushResult, Service};
use crate::signing::{ConfigGates, Refusal};
use crate::stats::CursorError;

pub(crate) struct AdminState {
    pub services: HashMap<String, Arc<Service>>,
    pub listen: HashMap<String, SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// Balancers with a key take only controller-signed configs (see `signing`).
    pub gates: Arc<ConfigGates>,
}

/// The admin endpoint: every route, `GET /api/v1/openapi.json` describing them, and JSON errors
/// for unknown routes and methods.
pub(crate) fn router(state: Arc<AdminState>) -> Router {
    let (routes, served) = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(list))
        .routes(routes!(get_config, put_config))
        .routes(routes!(stats))
        .routes(routes!(put_config_key))
        .with_state(state.clone())
        .split_for_parts();
    let mut services: Vec<String> = state.services.keys().cloned().collect();
    services.sort();
    let all_keyed = services.iter().all(|s| state.gates.is_signed(s));
    let document = crate::openapi::document(served, &services, all_keyed);
    routes
        .merge(crate::openapi::router(&document))
        .fallback(crate::extract::no_such_endpoint)
        // After every merge: it applies to the routes registered so far.
        .method_not_allowed_fallback(crate::extract::method_not_allowed)
}

/// A signed message refused: `{"error", "reason"}` like the hub's refusals.
fn refused(refusal: Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
    let body = RefusalBody {
        error: refusal.message,
        reason: refusal.reason.to_string(),
    };
    (status, Json(body)).into_response()
}

fn unknown_service(service: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no balancer for service {service:?} in this process"),
    )
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "balancer",
    responses((status = 200, description = "`ok`: the admin endpoint answers", body = String,
        content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "balancer",
    responses((status = 200, description = "Prometheus text format (docs/balancer.md, Metrics)",
        body = String, content_type = "text/plain"))
)]
async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    for service in state.services.values() {
        let status = service.router.machine_status();
        state.metrics.set_machines(&service.name, &status);
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

/// A balancer of this process.
#[derive(Serialize, ToSchema)]
struct BalancerSummary {
    service: String,
    /// Where its callers connect.
    #[schema(value_type = String, example = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Version of its running config.
    config_version: u64,
}

#[utoipa::path(
    get,
    path = "/api/v1/balancers",
    tag = "balancer",
    responses((status = 200, description = "Every balancer of this process, by service",
        body = [BalancerSummary]))
)]
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

/// A read of a keyed balancer must be signed by the controller (see `signing::check_read`).
fn check_read(
    state: &AdminState,
    service: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Option<Response> {
    let header = headers.get(READ_AUTH_HEADER).map(|v| v.as_bytes());
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    state
        .gates
        .check_read(service, header, path)
        .err()
        .map(refused)
}

#[utoipa::path(
    get,
    path = "/api/v1/balancers/{service}/config",
    tag = "config",
    params(("service" = String, Path, description = "The balancer's service")),
    security(("signed_read" = [])),
    responses(
        (status = 200, description = "The running config", body = BalancerConfig),
        (status = 400, description = "A path that does not decode (`ErrorBody`), or a signed-read \
            header that is not base64, not an envelope or signed for another path \
            (`malformed`)", body = AnyError),
        (status = 401, description = "Keyed balancer: the signed-read header is missing \
            (`unsigned`), forged (`bad_signature`), from another sender (`unknown_sender`), \
            replayed (`replayed`) or older than the last read (`out_of_order`)", body = RefusalBody),
        (status = 403, description = "`forbidden_topic`: signed for another topic", body = RefusalBody),
        (status = 404, description = "No balancer for this service in this process", body = ErrorBody),
    )
)]
async fn get_config(
    State(state): State<Arc<AdminState>>,
    ApiPath(service): ApiPath<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(balancer) = state.services.get(&service) else {
        return unknown_service(&service);
    };
    if let Some(refusal) = check_read(&state, &service, &headers, &uri) {
        return refusal;
    }
    Json(balancer.running_config()).into_response()
}

/// A 409: the config is older than what runs, by version or by fencing epoch.
fn refusal(e: PushError, reason: RefusalReason) -> Response {
    let body = ConfigRefusal {
        error: e.to_string(),
        reason,
    };
    (StatusCode::CONFLICT, Json(body)).into_response()
}

#[utoipa::path(
    put,
    path = "/api/v1/balancers/{service}/config",
    tag = "config",
    params(("service" = String, Path, description = "The balancer's service")),
    request_body(content = ConfigBody, description = "The signed envelope (keyed balancer) or the \
        plain `BalancerConfig` (keyless balancer)"),
    responses(
        (status = 200, description = "Applied; also the running version again, an idempotent \
            no-op (the body is not compared)", body = PushAck),
        (status = 400, description = "Refused, the running config kept: bad JSON, an unknown \
            field, a value out of range, a machine address that is not `host:port` or does not \
            resolve within 2 s, a config for another service (`ErrorBody` naming the field); \
            keyed balancer: not an envelope (`malformed`), a verified payload that is not a \
            config (`bad_config`)", body = AnyError),
        (status = 401, description = "Keyed balancer: `unsigned` (a plain config), \
            `bad_signature`, `unknown_sender`, `replayed` or `out_of_order`", body = RefusalBody),
        (status = 403, description = "`forbidden_topic`: signed for another topic", body = RefusalBody),
        (status = 404, description = "No balancer for this service in this process", body = ErrorBody),
        (status = 409, description = "Older than what runs: its version, or its fencing epoch (another controller has taken over)", body = ConfigRefusal),
        (status = 413, description = "A signed message over 1 MiB (`oversized`), or a body over \
            the endpoint's limit", body = AnyError),
    )
)]
async fn put_config(
    State(state): State<Arc<AdminState>>,
    ApiPath(service): ApiPath<String>,
    ApiBody(body): ApiBody,
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
    let version = config.version;
    match balancer.push(&config).await {
        Ok(result) => {
            if result == PushResult::Applied {
                tracing::info!(service, version, "config applied");
            }
            Json(PushAck { service, version }).into_response()
        }
        Err(e @ PushError::Stale { .. }) => refusal(e, RefusalReason::StaleVersion),
        Err(e @ PushError::StaleEpoch { .. }) => refusal(e, RefusalReason::StaleEpoch),
        Err(e @ PushError::FloorNotSaved { .. }) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("bad config: {e}")),
    }
}

#[utoipa::path(
    put,
    path = "/api/v1/balancers/{service}/config-key",
    tag = "config",
    params(("service" = String, Path, description = "The balancer's service")),
    request_body(content = Envelope, description = "An envelope from `controller` on topic \
        `control.balancer-config`, signed with the CURRENT key, whose payload is a `KeyRotation` \
        (the next key)"),
    responses(
        (status = 200, description = "Rotated: the new key is accepted at once, the old one \
            during `grace_ms` or until the first config signed with the new one", body = KeyRotationAck),
        (status = 400, description = "A path that does not decode (`ErrorBody`); not an envelope, \
            a payload that is not a rotation for this service, or a bad key (`malformed`)",
            body = AnyError),
        (status = 401, description = "`unsigned`, `bad_signature`, `unknown_sender`, `replayed` \
            or `out_of_order`", body = RefusalBody),
        (status = 403, description = "`forbidden_topic`: signed for another topic", body = RefusalBody),
        (status = 404, description = "No balancer for this service in this process", body = ErrorBody),
        (status = 409, description = "The balancer has no key to rotate (keyless)", body = ErrorBody),
        (status = 413, description = "A signed message over 1 MiB (`oversized`), or a body over \
            the endpoint's limit", body = AnyError),
        (status = 500, description = "`key_file`: the new key could not be written to the key \
            file; the old key stays", body = RefusalBody),
    )
)]
async fn put_config_key(
    State(state): State<Arc<AdminState>>,
    ApiPath(service): ApiPath<String>,
    ApiBody(body): ApiBody,
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

#[utoipa::path(
    get,
    path = "/api/v1/balancers/{service}/stats",
    tag = "stats",
    params(
        ("service" = String, Path, description = "The balancer's service"),
        ("since" = Option<u64>, Query, description = "The `cursor` of the previous read; 0 (the \
            default) for everything since start"),
    ),
    security(("signed_read" = [])),
    responses(
        (status = 200, description = "Everything measured after `since`; pass its `cursor` as \
            the next `since`", body = StatsReport),
        (status = 400, description = "A bad `since`, an unknown query parameter, a path that does \
            not decode, a malformed signed-read header, or `cursor_ahead`", body = StatsBadRequest),
        (status = 401, description = "Keyed balancer: `unsigned`, `bad_signature`, \
            `unknown_sender`, `replayed` or `out_of_order`", body = RefusalBody),
        (status = 403, description = "`forbidden_topic`: signed for another topic", body = RefusalBody),
        (status = 404, description = "No balancer for this service in this process", body = ErrorBody),
        (status = 410, description = "`cursor_too_old`: windows after `since` were dropped; read \
            again from `oldest_cursor`", body = CursorRefusal),
    )
)]
async fn stats(
    State(state): State<Arc<AdminState>>,
    ApiPath(service): ApiPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(balancer) = state.services.get(&service) else {
        return unknown_service(&service);
    };
    if let Some(refusal) = check_read(&state, &service, &headers, &uri) {
        return refusal;
    }
    let since = match since(query.as_deref().unwrap_or("")) {
        Ok(since) => since,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    // The reason tells a reader how to recover: `cursor_ahead`, the balancer restarted (its
    // windows begin again at 0); `cursor_too_old`, windows after the cursor were dropped (read
    // again from `oldest_cursor`).
    let error = match balancer.report(since) {
        Ok(report) => return Json(report).into_response(),
        Err(error) => error,
    };
    let (status, reason, oldest_cursor) = match error {
        CursorError::Ahead { .. } => (StatusCode::BAD_REQUEST, CursorProblem::CursorAhead, None),
        CursorError::TooOld { oldest, .. } => {
            (StatusCode::GONE, CursorProblem::CursorTooOld, Some(oldest))
        }
    };
    let body = CursorRefusal {
        error: error.to_string(),
        reason,
        oldest_cursor,
    };
    (status, Json(body)).into_response()
}

/// The `since` of a stats query (0 when absent); any other parameter is refused.
fn since(query: &str) -> Result<u64, String> {
    let mut since = 0;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("since", value)) => {
                since = value.parse::<u64>().map_err(|_| {
                    format!("since: {value:?} is not a cursor (an unsigned integer)")
                })?
            }
            _ if pair.is_empty() => {}
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?}; expected since=CURSOR"
                ))
            }
        }
    }
    Ok(since)
}

#[cfg(test)]
#[path = "admin_tests.rs"]
pub(crate) mod tests;
