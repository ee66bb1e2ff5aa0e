//! The predictions routes of the admin endpoint (reads: no token).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::error::ErrorBody;
use crate::api::extract::ApiPath;
use crate::runtime::predictions::{AlertRecord, Predictions, PredictionsView};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AlertQuery {
    /// Only this service's alerts.
    service: Option<String>,
    /// Only this version's (with `service`).
    version: Option<String>,
    /// At most this many (default `[predict] recent_alerts`).
    limit: Option<usize>,
}

/// `GET /api/v1/predictions/alerts`.
#[derive(Debug, Serialize, ToSchema)]
struct AlertsView {
    alerts_total: u64,
    /// Newest first.
    alerts: Vec<AlertRecord>,
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, Json(ErrorBody { error: message })).into_response()
}

/// `GET /api/v1/predictions`, `/api/v1/predictions/{service}`, `/{service}/{version}` and
/// `/api/v1/predictions/alerts` (reads: no token, like every other read of the admin endpoint).
pub fn router(predictions: Arc<Predictions>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(all_models))
        .routes(routes!(recent_alerts))
        .routes(routes!(service_models))
        .routes(routes!(version_models))
        .with_state(predictions)
}

type Shared = State<Arc<Predictions>>;

#[utoipa::path(
    get,
    path = "/api/v1/predictions",
    tag = "predictions",
    responses((status = 200, description = "Every model and v2-against-v1 comparison",
        body = PredictionsView))
)]
async fn all_models(State(p): Shared) -> Response {
    Json(p.view(None, None)).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/predictions/{service}",
    tag = "predictions",
    params(("service" = String, Path, description = "Service name", example = "db")),
    responses(
        (status = 200, description = "The service's models", body = PredictionsView),
        (status = 404, description = "No call of the service was reported yet", body = ErrorBody),
    )
)]
async fn service_models(State(p): Shared, ApiPath(service): ApiPath<String>) -> Response {
    let view = p.view(Some(&service), None);
    if view.models.is_empty() {
        return not_found(format!("no call of service `{service}` was reported yet"));
    }
    Json(view).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/predictions/{service}/{version}",
    tag = "predictions",
    params(
        ("service" = String, Path, description = "Service name", example = "db"),
        ("version" = String, Path, description = "Version", example = "v1"),
    ),
    responses(
        (status = 200, description = "The version's models, one per configuration",
            body = PredictionsView),
        (status = 404, description = "No call of that version was reported yet", body = ErrorBody),
    )
)]
async fn version_models(
    State(p): Shared,
    ApiPath((service, version)): ApiPath<(String, String)>,
) -> Response {
    let view = p.view(Some(&service), Some(&version));
    if view.models.is_empty() {
        return not_found(format!(
            "no call of service `{service}` version `{version}` was reported yet"
        ));
    }
    Json(view).into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/predictions/alerts",
    tag = "predictions",
    params(AlertQuery),
    responses(
        (status = 200, description = "The most recent alerts", body = AlertsView),
        (status = 400, description = "An unknown or bad query parameter", body = ErrorBody),
    )
)]
async fn recent_alerts(
    State(p): Shared,
    query: Result<Query<AlertQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => {
            let error = ErrorBody {
                error: e.body_text(),
            };
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
    };
    let limit = query.limit.unwrap_or(p.settings().recent_alerts);
    let alerts = p.alerts(query.service.as_deref(), query.version.as_deref(), limit);
    Json(AlertsView {
        alerts_total: p.alerts_total(),
        alerts,
    })
    .into_response()
}
