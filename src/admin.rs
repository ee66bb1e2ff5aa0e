//! The admin endpoint (axum): reads, releases and ops actions, per CONTRACT.md.
//!
//! Mutating calls need `Authorization: Bearer TOKEN`, compared in constant time; a missing or wrong
//! token is answered 401 before anything is read or changed. Every error is JSON `{"error": "..."}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::controller::{Core, OpsAction, ReleaseRequest, RequestError};

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match &e {
            RequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RequestError::NotFound(_) => StatusCode::NOT_FOUND,
            RequestError::Conflict(_) => StatusCode::CONFLICT,
            RequestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

type Shared = State<Arc<Core>>;

pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/services", get(services))
        .route(
            "/api/v1/machines",
            get(crate::machines::list).post(crate::machines::register),
        )
        .route(
            "/api/v1/machines/{id}/history",
            get(crate::machines::history),
        )
        .route(
            "/api/v1/machines/{id}/rotate-key",
            post(crate::machines::rotate_key),
        )
        .route("/api/v1/balancers", get(balancers))
        // (nats: signed configs) a fresh key for a service's balancer.
        .route(
            "/api/v1/balancers/{service}/rotate-key",
            post(rotate_balancer_key),
        )
        .route(
            "/api/v1/monitor",
            get(crate::controller::monitor::view_route),
        )
        .route(
            "/api/v1/monitor/actions",
            get(crate::controller::monitor::actions_route),
        )
        .route("/api/v1/rollouts", get(rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/rollouts/{id}/pairs.csv", get(pairs_csv))
        .route("/api/v1/releases", post(release).get(releases))
        .route("/api/v1/rollouts/{id}/approve", post(approve))
        .route("/api/v1/rollouts/{id}/abort", post(abort))
        .route("/api/v1/rollouts/{id}/rollback", post(rollback))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(core.clone())
        // The hub's publish/subscribe routes (their own auth: signed messages).
        .merge(core.hub().router())
        // Predictive monitoring reads (src/prediction.rs).
        .merge(crate::prediction::router(core.predictions.clone()))
}

/// Checks the bearer token in constant time.
pub(crate) fn authorize(core: &Core, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer TOKEN)",
        ));
    };
    if bool::from(presented.as_bytes().ct_eq(core.token().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token",
        ))
    }
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("rollout id `{raw}` is not a number"),
        )
    })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(core): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        core.metrics_text(),
    )
        .into_response()
}

async fn services(State(core): Shared) -> Response {
    Json(core.services()).into_response()
}

async fn balancers(State(core): Shared) -> Response {
    Json(core.balancers()).into_response()
}

async fn releases(State(core): Shared) -> Response {
    Json(core.releases()).into_response()
}

async fn rollouts(State(core): Shared) -> Response {
    Json(core.rollouts()).into_response()
}

async fn rollout(State(core): Shared, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    core.rollout(id)
        .map(|d| Json(d).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no rollout {id}")))
}

#[derive(Deserialize)]
struct CsvQuery {
    #[serde(default)]
    control: bool,
}

async fn pairs_csv(
    State(core): Shared,
    Path(id): Path<String>,
    Query(query): Query<CsvQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let csv = core.pairs_csv(id, query.control)?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
}

async fn release(
    State(core): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&core, &headers)?;
    // Parsed by hand so a bad body is a 400 with serde's message, not axum's 415/422.
    let request: ReleaseRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad release body: {e}")))?;
    let answer = core.release(&request)?;
    let status = if answer.dry_run {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(answer)).into_response())
}

/// (nats: signed configs) `POST /api/v1/balancers/{service}/rotate-key` (bearer token).
async fn rotate_balancer_key(
    State(core): Shared,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&core, &headers)?;
    Ok(Json(core.rotate_balancer_key(&service).await?).into_response())
}

async fn act(
    core: Arc<Core>,
    headers: HeaderMap,
    id: String,
    action: OpsAction,
) -> Result<Response, ApiError> {
    authorize(&core, &headers)?;
    let id = parse_id(&id)?;
    Ok(Json(core.act(id, action)?).into_response())
}

async fn approve(
    State(core): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(core, headers, id, OpsAction::Approve).await
}

async fn abort(
    State(core): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(core, headers, id, OpsAction::Abort).await
}

async fn rollback(
    State(core): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(core, headers, id, OpsAction::Rollback).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::FakeBalancer;
    use crate::store::Store;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn core() -> Arc<Core> {
        let cluster = crate::cluster::parse("t.toml", crate::cluster::tests::SAMPLE).unwrap();
        let store = Store::open_in_memory().unwrap();
        Arc::new(
            Core::open(
                cluster,
                store,
                Arc::new(FakeBalancer::new()),
                "s3cret".into(),
            )
            .unwrap(),
        )
    }

    async fn call(
        core: &Arc<Core>,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, String) {
        let mut request = http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let response = router(core.clone())
            .oneshot(request.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn error_of(body: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON error body");
        v["error"].as_str().expect("error field").to_string()
    }

    const RELEASE_DB: &str = r#"{"services": {"db": "v2"}}"#;

    #[tokio::test]
    async fn mutating_calls_need_the_token_and_change_nothing_without_it() {
        let core = core();
        for token in [None, Some("wrong"), Some("s3cre"), Some("s3cret ")] {
            let (status, body) = call(&core, "POST", "/api/v1/releases", token, RELEASE_DB).await;
            if token == Some("s3cret ") {
                // Surrounding blanks are trimmed: this one is accepted.
                assert_eq!(status, StatusCode::CREATED, "{body}");
                continue;
            }
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
            assert!(error_of(&body).contains("token"));
            assert!(core.rollouts().is_empty(), "nothing changed");
        }
        let id = core.rollouts()[0].id;
        for action in ["approve", "abort", "rollback"] {
            let path = format!("/api/v1/rollouts/{id}/{action}");
            let (status, _) = call(&core, "POST", &path, None, "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            let (status, _) = call(&core, "POST", &path, Some("nope"), "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(core.rollouts()[0].phase, "pending");
        // Reads need no token.
        let (status, body) = call(&core, "GET", "/api/v1/rollouts", None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"service\":\"db\""));
    }

    #[tokio::test]
    async fn wrong_state_and_bad_requests_are_refused() {
        let core = core();
        let t = Some("s3cret");
        let (status, body) = call(&core, "POST", "/api/v1/releases", t, "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("bad release body"));
        let (status, body) = call(
            &core,
            "POST",
            "/api/v1/releases",
            t,
            r#"{"services": {"db": "v2"}, "extra": 1}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, body) = call(
            &core,
            "POST",
            "/api/v1/releases",
            t,
            r#"{"services": {"nope": "v2"}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("unknown service `nope`"));
        let (status, body) = call(
            &core,
            "POST",
            "/api/v1/releases",
            t,
            r#"{"services": {"db": "v9"}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("v9"));
        let (status, _) = call(&core, "POST", "/api/v1/releases", t, r#"{"services": {}}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(core.rollouts().is_empty());

        // Dry run: the plan, nothing created.
        let (status, body) = call(
            &core,
            "POST",
            "/api/v1/releases",
            t,
            r#"{"services": {"db": "v2", "router": "v2"}, "dry_run": true}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["plan"][1]["service"], "router");
        assert_eq!(answer["plan"][1]["after"][0], "db");
        assert!(core.rollouts().is_empty());

        let (status, _) = call(&core, "POST", "/api/v1/releases", t, RELEASE_DB).await;
        assert_eq!(status, StatusCode::CREATED);
        // A second release of a service already in one.
        let (status, body) = call(
            &core,
            "POST",
            "/api/v1/releases",
            t,
            r#"{"services": {"db": "v2", "media": "v2"}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(error_of(&body).contains("db"));
        assert_eq!(core.rollouts().len(), 1);

        let id = core.rollouts()[0].id;
        // Approving what does not await approval.
        let (status, body) = call(
            &core,
            "POST",
            &format!("/api/v1/rollouts/{id}/approve"),
            t,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(error_of(&body).contains("pending"));
        let (status, _) = call(&core, "POST", "/api/v1/rollouts/999/abort", t, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&core, "POST", "/api/v1/rollouts/x/abort", t, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = call(
            &core,
            "POST",
            &format!("/api/v1/rollouts/{id}/abort"),
            t,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(core.rollouts()[0].phase, "aborted");
        let (status, _) = call(
            &core,
            "POST",
            &format!("/api/v1/rollouts/{id}/abort"),
            t,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, body) = call(&core, "GET", "/api/v1/nothing", None, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!error_of(&body).is_empty());
    }

    #[tokio::test]
    async fn reads_and_metrics() {
        let core = core();
        for path in [
            "/healthz",
            "/api/v1/services",
            "/api/v1/machines",
            "/api/v1/balancers",
            "/api/v1/releases",
        ] {
            let (status, body) = call(&core, "GET", path, None, "").await;
            assert_eq!(status, StatusCode::OK, "{path}");
            serde_json::from_str::<serde_json::Value>(&body).expect("JSON");
        }
        let (_, body) = call(
            &core,
            "POST",
            "/api/v1/releases",
            Some("s3cret"),
            RELEASE_DB,
        )
        .await;
        let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["rollouts"][0]["id"]
            .as_i64()
            .unwrap();
        let (status, body) = call(
            &core,
            "GET",
            &format!("/api/v1/rollouts/{id}/pairs.csv"),
            None,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "v1_latency_us,v1_ok,v2_latency_us,v2_ok,match\n");
        let (status, body) = call(&core, "GET", &format!("/api/v1/rollouts/{id}"), None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"phase\":\"pending\""));
        core.tick().await; // pending -> simulating
        core.tick().await; // first stats of the simulation: verdict numbers
        let (status, text) = call(&core, "GET", "/metrics", None, "").await;
        assert!(text.contains("understudy_verdict_jobs{"), "{text}");
        assert!(
            text.contains("understudy_verdict_latency_seconds{"),
            "{text}"
        );
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("understudy_rollout_phase{"));
        assert!(text.contains("understudy_balancer_push_seconds_bucket"));
        assert!(text.contains("understudy_rollout_transitions_total{"));
        crate::metrics::promtool_check(&text);
    }
}
