//! The machine registry's routes: listing, registration, key rotation, history.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use understudy_hub::registry::MachineRevision;

use crate::api::error::{parse_body, ApiError, ErrorBody};
use crate::api::extract::{ApiBody, ApiPath};
use crate::runtime::controller::Core;
use crate::runtime::machines::{
    ListingFilter, MachineListing, Registration, RegistrationRequest, RotateRequest, RotatedKey,
};

type Shared = State<Arc<Core>>;

/// `GET /api/v1/machines?service=&role=&status=&version=`
#[utoipa::path(
    get,
    path = "/api/v1/machines",
    tag = "machines",
    params(ListingFilter),
    responses(
        (status = 200, description = "Every machine, declared or registered, by id",
            body = [MachineListing]),
        (status = 400, description = "An unknown filter or value", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
pub async fn list(
    State(core): Shared,
    query: Result<Query<ListingFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(filter) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad machine filter: {}", e.body_text()),
        )
    })?;
    Ok(Json(core.machine_listing(&filter)?).into_response())
}

/// `POST /api/v1/machines` (token).
#[utoipa::path(
    post,
    path = "/api/v1/machines",
    tag = "machines",
    security(("bearer" = [])),
    request_body = RegistrationRequest,
    responses(
        (status = 201, description = "Registered; the key is shown here only", body = Registration),
        (status = 400, description = "A missing, unknown or bad field (named)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
pub async fn register(State(core): Shared, ApiBody(body): ApiBody) -> Result<Response, ApiError> {
    let request: RegistrationRequest = parse_body("registration", &body)?;
    let answer = core.register_machine(&request)?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `POST /api/v1/machines/{id}/rotate-key` (token; body optional).
#[utoipa::path(
    post,
    path = "/api/v1/machines/{id}/rotate-key",
    tag = "machines",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Machine id", example = "db-1")),
    request_body(content = Option<RotateRequest>, description = "Optional: no body (or `null`) \
        takes the `[hub] rotation_grace_ms`"),
    responses(
        (status = 200, description = "The new key", body = RotatedKey),
        (status = 400, description = "Bad body, or `grace_ms` over one day", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "The machine is not registered", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
pub async fn rotate_key(
    State(core): Shared,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    // No body, or JSON `null`, asks for the defaults.
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        parse_body::<Option<RotateRequest>>("rotate-key", &body)?.unwrap_or_default()
    };
    Ok(Json(core.rotate_machine_key(&id, &request)?).into_response())
}

/// `GET /api/v1/machines/{id}/history`
#[utoipa::path(
    get,
    path = "/api/v1/machines/{id}/history",
    tag = "machines",
    params(("id" = String, Path, description = "Machine id", example = "db-1")),
    responses(
        (status = 200, description = "Registry revisions, oldest first", body = [MachineRevision]),
        (status = 404, description = "No such machine", body = ErrorBody),
        (status = 500, description = "Storage failure", body = ErrorBody),
    )
)]
pub async fn history(
    State(core): Shared,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(core.machine_revisions(&id)?).into_response())
}
