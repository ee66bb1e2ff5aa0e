//! The admin endpoint (axum): reads, releases and ops actions, per CONTRACT.md.
//!
//! Mutating calls need `Authorization: Bearer TOKEN`, compared in constant time; a missing or wrong
//! token is answered 401 before anything is read or changed. Every error is JSON `{"error": "..."}`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::auth::{require_token, OperatorName};
use crate::api::error::{parse_body, ApiError, ErrorBody};
use crate::api::extract::{ApiBody, ApiPath, ApiQuery};
use crate::api::leader::require_leader;
use crate::api::{machines, monitor};
use crate::runtime::controller::{
    BalancerView, Core, OpsAction, OpsRequest, ReleaseAnswer, ReleaseRequest, ReleaseView,
    RolloutCharts, RolloutDetail, RolloutView, ServiceView,
};

type Shared = State<Arc<Core>>;

/// The admin endpoint: every route, `GET /api/v1/openapi.json` describing them, and JSON errors
/// for unknown routes and methods.
pub fn router(core: Arc<Core>) -> Router {
    let (routes, served) = documented_routes(core.clone()).split_for_parts();
    let document = crate::api::openapi::document(served);
    routes
        // The hub's publish/subscribe routes (their own auth: signed messages), on the leader.
        .merge(
            core.hub()
                .router()
                .route_layer(middleware::from_fn_with_state(core.clone(), require_leader)),
        )
        .merge(crate::api::openapi::router(&document))
        .merge(crate::api::dashboard::router())
        .fallback(no_such_endpoint)
        // After every merge: it applies to the routes registered so far.
        .method_not_allowed_fallback(method_not_allowed)
}

/// The routes described by their handlers' `#[utoipa::path]`: registering a route here is what
/// documents it.
fn documented_routes(core: Arc<Core>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(crate::api::leader::leader))
        .routes(routes!(services))
        .routes(routes!(machines::list))
        .routes(routes!(machines::history))
        .routes(routes!(balancers))
        .routes(routes!(monitor::view_route))
        .routes(routes!(monitor::actions_route))
        .routes(routes!(rollouts))
        .routes(routes!(rollout))
        .routes(routes!(charts))
        .routes(routes!(pairs_csv))
        .routes(routes!(releases))
        .with_state(core.clone())
        .merge(signed_in(core.clone()))
        .merge(mutations(core.clone()))
        .merge(crate::api::predictions::router(core.predictions.clone()))
}

/// Reads that need a token (who the token belongs to), answered by a standby as well.
fn signed_in(core: Arc<Core>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(session))
        .route_layer(middleware::from_fn_with_state(core.clone(), require_token))
        .with_state(core)
}

/// `GET /api/v1/session`.
#[derive(Serialize, ToSchema)]
struct Session {
    /// The operator the token belongs to.
    #[schema(example = "alice")]
    operator: String,
}

#[utoipa::path(
    get,
    path = "/api/v1/session",
    tag = "controller",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The operator the bearer token belongs to", body = Session),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
    )
)]
async fn session(Extension(OperatorName(operator)): Extension<OperatorName>) -> Json<Session> {
    Json(Session { operator })
}

/// Every route that changes something: behind the bearer token, checked by a layer that runs
/// only when one of these routes matched (an unknown route stays a 404, a wrong method a 405).
fn mutations(core: Arc<Core>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(machines::register))
        .routes(routes!(machines::rotate_key))
        // (nats: signed configs) a fresh key for a service's balancer.
        .routes(routes!(rotate_balancer_key))
        .routes(routes!(release))
        .routes(routes!(approve))
        .routes(routes!(abort))
        .routes(routes!(rollback))
        .route_layer(middleware::from_fn_with_state(core.clone(), require_token))
        // Outside the token check: a standby answers 503 whatever the token.
        .route_layer(middleware::from_fn_with_state(core.clone(), require_leader))
        .with_state(core)
}

async fn no_such_endpoint(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

/// axum keeps the `Allow` header on this answer.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("rollout id `{raw}` is not a number"),
        )
    })
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "controller",
    responses((status = 200, description = "The controller answers", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "controller",
    responses((
        status = 200,
        description = "Prometheus text format (docs/api.md, \"Metrics\")",
        content_type = "text/plain; version=0.0.4; charset=utf-8",
        body = String
    ))
)]
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

#[utoipa::path(
    get,
    path = "/api/v1/services",
    tag = "controller",
    responses((status = 200, description = "Every service of the cluster", body = [ServiceView]))
)]
async fn services(State(core): Shared) -> Response {
    Json(core.services()).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/balancers",
    tag = "controller",
    responses((status = 200, description = "Each service's balancer as the controller sees it",
        body = [BalancerView]))
)]
async fn balancers(State(core): Shared) -> Response {
    Json(core.balancers()).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/releases",
    tag = "releases",
    responses((status = 200, description = "Every release", body = [ReleaseView]))
)]
async fn releases(State(core): Shared) -> Response {
    Json(core.releases()).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    tag = "releases",
    responses((status = 200, description = "Every rollout", body = [RolloutView]))
)]
async fn rollouts(State(core): Shared) -> Response {
    Json(core.rollouts()).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}",
    tag = "releases",
    params(("id" = i64, Path, description = "Rollout id", example = 1)),
    responses(
        (status = 200, description = "The rollout and its transitions", body = RolloutDetail),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
    )
)]
async fn rollout(State(core): Shared, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    core.rollout(id)
        .map(|d| Json(d).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no rollout {id}")))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}/charts",
    tag = "releases",
    params(("id" = i64, Path, description = "Rollout id", example = 1)),
    responses(
        (status = 200, description = "What the dashboard draws: latency histograms of v1, v2 and \
            the control on shared log-spaced buckets, quantile ratios with their intervals, \
            rates, each test's evidence against pairs judged, and traffic", body = RolloutCharts),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
    )
)]
async fn charts(State(core): Shared, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    core.charts(id)
        .map(|c| Json(c).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no rollout {id}")))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CsvQuery {
    /// The A/A control pairs instead of the v1/v2 pairs.
    #[serde(default)]
    control: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}/pairs.csv",
    tag = "releases",
    params(("id" = i64, Path, description = "Rollout id", example = 1), CsvQuery),
    responses(
        (status = 200, description = "Header `v1_latency_us,v1_ok,v2_latency_us,v2_ok,match`, \
            one row per pair in arrival order", content_type = "text/csv; charset=utf-8",
            body = String),
        (status = 400, description = "The id is not a number, or a bad query", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
async fn pairs_csv(
    State(core): Shared,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<CsvQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let csv = core.pairs_csv(id, query.control)?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
}

#[utoipa::path(
    post,
    path = "/api/v1/releases",
    tag = "releases",
    security(("bearer" = [])),
    request_body = ReleaseRequest,
    responses(
        (status = 200, description = "A dry run: the plan, nothing changed", body = ReleaseAnswer),
        (status = 201, description = "The release and its rollouts", body = ReleaseAnswer),
        (status = 400, description = "Bad body, unknown service or version, bad sub-group",
            body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 409, description = "A service already in an unfinished release, or already \
            at that version", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
async fn release(
    State(core): Shared,
    Extension(OperatorName(operator)): Extension<OperatorName>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    // Parsed by hand so a bad body is a 400 with serde's message, not axum's 415/422.
    let request: ReleaseRequest = parse_body("release", &body)?;
    let answer = core.release(&request, &operator)?;
    let status = if answer.dry_run {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(answer)).into_response())
}

/// (nats: signed configs) `POST /api/v1/balancers/{service}/rotate-key` (bearer token).
#[utoipa::path(
    post,
    path = "/api/v1/balancers/{service}/rotate-key",
    tag = "controller",
    security(("bearer" = [])),
    params(("service" = String, Path, description = "Service name", example = "db")),
    responses(
        (status = 200, description = "The balancer took the new key", body = understudy_wire::KeyRotationAck),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such service", body = ErrorBody),
        (status = 409, description = "The balancer refused the rotation", body = ErrorBody),
        (status = 500, description = "The balancer could not be reached or answered nonsense",
            body = ErrorBody),
    )
)]
async fn rotate_balancer_key(
    State(core): Shared,
    ApiPath(service): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(core.rotate_balancer_key(&service).await?).into_response())
}

async fn act(
    core: Arc<Core>,
    id: String,
    operator: &str,
    action: OpsAction,
    evidence: Option<&str>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let request = OpsRequest {
        action,
        operator,
        evidence,
    };
    Ok(Json(core.act(id, &request)?).into_response())
}

/// `POST /api/v1/rollouts/{id}/approve`: the evidence approved.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ApproveRequest {
    /// The `evidence.id` that `GET /api/v1/rollouts/{id}` showed.
    #[schema(example = "3.0.1764688000000")]
    evidence: String,
}

/// No body, or only blanks.
fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// An empty body or `{}` (abort and rollback take nothing).
fn no_body(what: &str, body: &[u8]) -> Result<(), ApiError> {
    if is_blank(body) {
        return Ok(());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    serde_json::from_slice::<Empty>(body)
        .map(|_| ())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad {what} body: {e}")))
}

#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/approve",
    tag = "releases",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Rollout id", example = 1)),
    request_body = ApproveRequest,
    responses(
        (status = 200, description = "Approved: the rollout joins, or (a service asking for two \
            operators) the approval is recorded in `approvals` and waits for another operator's",
            body = RolloutDetail),
        (status = 400, description = "The id is not a number, or a bad body or evidence id",
            body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
        (status = 409, description = "It does not await approval; the evidence changed \
            materially since it was shown; the approval expired; or this operator already \
            approved", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
async fn approve(
    State(core): Shared,
    Extension(OperatorName(operator)): Extension<OperatorName>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let request: Option<ApproveRequest> = if is_blank(&body) {
        None
    } else {
        Some(parse_body("approve", &body)?)
    };
    let evidence = request.as_ref().map(|r| r.evidence.as_str());
    act(core, id, &operator, OpsAction::Approve, evidence).await
}

#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/abort",
    tag = "releases",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Rollout id", example = 1)),
    responses(
        (status = 200, description = "Aborted: v2 pulled", body = RolloutDetail),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
        (status = 409, description = "It already finished", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
async fn abort(
    State(core): Shared,
    Extension(OperatorName(operator)): Extension<OperatorName>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    no_body("abort", &body)?;
    act(core, id, &operator, OpsAction::Abort, None).await
}

#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/rollback",
    tag = "releases",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Rollout id", example = 1)),
    responses(
        (status = 200, description = "Rolled back: v1 machines active again", body = RolloutDetail),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
        (status = 409, description = "Already rolled back or aborted, or not the service's \
            latest rollout", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
async fn rollback(
    State(core): Shared,
    Extension(OperatorName(operator)): Extension<OperatorName>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    no_body("rollback", &body)?;
    act(core, id, &operator, OpsAction::Rollback, None).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::balancer::FakeBalancer;
    use crate::store::Store;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn core() -> Arc<Core> {
        let cluster = crate::config::cluster::parse("t.toml", crate::testing::SAMPLE).unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn operators_act_by_name_and_approvals_name_their_evidence() {
        use crate::config::operators::{file_entry, Operators};
        let rig = crate::testing::Rig::new(crate::testing::SAMPLE);
        let (core, id, _) = crate::runtime::controller::approval_tests::awaiting(&rig).await;
        let text = format!(
            "{}{}",
            file_entry("alice", "tok-a"),
            file_entry("bob", "tok-b")
        );
        let mut core = core;
        core.set_operators(Operators::parse(&text).unwrap().with_token("s3cret"));
        let core = Arc::new(core);
        for (token, name) in [("tok-a", "alice"), ("tok-b", "bob"), ("s3cret", "ops")] {
            let (status, body) = call(&core, "GET", "/api/v1/session", Some(token), "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, format!(r#"{{"operator":"{name}"}}"#));
        }
        let (status, _) = call(&core, "GET", "/api/v1/session", Some("tok-c"), "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&core, "GET", "/api/v1/session", None, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let path = format!("/api/v1/rollouts/{id}/approve");
        let (_, shown) = call(&core, "GET", &format!("/api/v1/rollouts/{id}"), None, "").await;
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        let evidence = shown["evidence"]["id"]
            .as_str()
            .expect("evidence id")
            .to_string();
        let body = format!(r#"{{"evidence": "{evidence}"}}"#);
        for (token, request, status, expected) in [
            (
                Some("tok-c"),
                body.as_str(),
                StatusCode::UNAUTHORIZED,
                "wrong bearer token",
            ),
            (
                Some("tok-a"),
                "",
                StatusCode::BAD_REQUEST,
                "needs the evidence",
            ),
            (
                Some("tok-a"),
                "{}",
                StatusCode::BAD_REQUEST,
                "missing field `evidence`",
            ),
            (
                Some("tok-a"),
                r#"{"evidence": "1.2.3", "x": 1}"#,
                StatusCode::BAD_REQUEST,
                "unknown field",
            ),
            (
                Some("tok-a"),
                r#"{"evidence": "nope"}"#,
                StatusCode::BAD_REQUEST,
                "not an evidence id",
            ),
        ] {
            let (got, answer) = call(&core, "POST", &path, token, request).await;
            assert_eq!(got, status, "{request}: {answer}");
            assert!(error_of(&answer).contains(expected), "{answer}");
        }
        let (status, _) = call(
            &core,
            "POST",
            "/api/v1/rollouts/999/approve",
            Some("tok-a"),
            &body,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, answer) = call(
            &core,
            "POST",
            &format!("/api/v1/rollouts/{id}/abort"),
            Some("tok-a"),
            r#"{"x":1}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(core.rollout(id).unwrap().rollout.phase, "awaiting_approval");

        let (status, answer) = call(&core, "POST", &path, Some("tok-b"), &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let detail: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(detail["phase"], "joining");
        let transitions = detail["transitions"].as_array().unwrap();
        assert_eq!(transitions.last().unwrap()["operator"], "bob");
        // No answer ever carries a token or its digest.
        for secret in ["tok-a", "tok-b", "s3cret"] {
            let digest = crate::config::operators::token_digest(secret);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            assert!(!answer.contains(secret) && !answer.contains(&hex));
        }
    }

    #[tokio::test]
    async fn axum_rejections_and_unknown_methods_are_json_errors() {
        let core = core();
        // A route that exists, with a method it does not serve: 405, `Allow`, JSON.
        let request = http::Request::builder()
            .method("DELETE")
            .uri("/api/v1/releases")
            .body(Body::empty())
            .unwrap();
        let response = router(core.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let allow = response.headers()[header::ALLOW]
            .to_str()
            .unwrap()
            .to_string();
        assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(error_of(&body).contains("DELETE"), "{body}");
        // Also on the merged routers (predictions, hub).
        for path in ["/api/v1/predictions", "/api/v1/hub/publish"] {
            let (status, body) = call(&core, "PUT", path, None, "").await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert!(!error_of(&body).is_empty());
        }
        // axum's query and path rejections.
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
        let path = format!("/api/v1/rollouts/{id}/pairs.csv?control=maybe");
        let (status, body) = call(&core, "GET", &path, None, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).starts_with("bad query"), "{body}");
        let (status, body) = call(&core, "GET", "/api/v1/machines/%FF/history", None, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).starts_with("bad path"), "{body}");
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
        crate::runtime::metrics::promtool_check(&text);
    }
}
