//! The admin endpoint's OpenAPI 3 document, served at `GET /api/v1/openapi.json`.
//!
//! Each operation is described on its handler (`#[utoipa::path]`) and registered with
//! `utoipa_axum::routes!` (src/api/admin.rs), which routes and documents it in one step; the hub's two
//! routes come from `understudy_hub::http::HubApi`. The balancer's wire types the API shows are
//! `understudy_wire`'s own (their schemas are derived there).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as Document;
use utoipa::{Modify, OpenApi};

/// The bearer scheme's name, as mutating operations list it in `security(("bearer" = []))`.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Understudy controller admin API",
        description = "Reads, releases, ops actions, machines and the hub of the Understudy \
            controller (docs/api.md). Every error is JSON `{\"error\": \"...\"}`.",
        license(name = "Apache-2.0")
    ),
    paths(openapi_json),
    components(schemas(crate::api::error::ErrorBody)),
    modifiers(&BearerScheme),
    tags(
        (name = "controller", description = "Health, metrics, services, balancers"),
        (name = "releases", description = "Releases, rollouts and ops actions"),
        (name = "machines", description = "Machine registry and hub keys"),
        (name = "monitor", description = "The monitor loop"),
        (name = "predictions", description = "Live predictive monitoring"),
        (name = "hub", description = "The state channel: signed envelopes, server-sent events"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, document: &mut Document) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "`[controller] token` or `UNDERSTUDY_TOKEN`, compared in constant time",
            ))
            .build();
        document
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(BEARER, SecurityScheme::Http(scheme));
    }
}

/// The whole document: `served` (what the admin router registered) plus this endpoint and the
/// hub's routes.
pub fn document(served: Document) -> Document {
    let mut document = ApiDoc::openapi();
    document.merge(served);
    document.merge(understudy_hub::http::HubApi::openapi());
    document
}

/// `GET /api/v1/openapi.json`, serialized once.
pub fn router(document: &Document) -> Router {
    // Serializing plain data structures into a Vec cannot fail.
    let json = Bytes::from(serde_json::to_vec(document).unwrap_or_default());
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .with_state(json)
}

#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "controller",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = Object))
)]
async fn openapi_json(State(json): State<Bytes>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

#[cfg(test)]
#[path = "openapi_tests.rs"]
mod tests;
