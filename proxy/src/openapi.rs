//! The admin endpoint's OpenAPI 3.1 document, served at `GET /api/v1/openapi.json`.
//!
//! Each operation is described on its handler in `admin.rs` (`#[utoipa::path]`) and registered
//! with `utoipa_axum::routes!`, which routes and documents it in one step; the schemas are the
//! wire types themselves (`wire.rs`) and the hub's envelope. The document describes the process
//! that serves it: the `service` path parameter lists its balancers, and the signed-read header is
//! required on reads when every balancer has a key, optional when some run keyless.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{AnyOfBuilder, OneOfBuilder, Schema};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ObjectBuilder, OpenApi as Document, Ref, RefOr, Type};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use understudy_hub::{Envelope, READ_AUTH_HEADER};
use understudy_wire::{BalancerConfig, ErrorBody, KeyRotation};
use understudy_wire::{CursorRefusal, RefusalBody};

/// The signed-read scheme's name, as the reads list it in `security(("signed_read" = []))`.
pub(crate) const SIGNED_READ: &str = "signed_read";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Understudy balancer admin API",
        description = "Config pushes, stats since a cursor, key rotation, metrics and health of \
            the balancers of one `understudy-proxy` process (docs/balancer.md). Every error is \
            JSON `{\"error\": \"...\"}`, with a `reason` where a reader acts on it.",
        license(name = "Apache-2.0")
    ),
    paths(openapi_json),
    components(schemas(KeyRotation)),
    modifiers(&SignedReadScheme),
    tags(
        (name = "balancer", description = "Health, metrics, the balancers of this process"),
        (name = "config", description = "Signed config pushes, reads and key rotation"),
        (name = "stats", description = "Measurements since a cursor"),
    )
)]
struct ApiDoc;

struct SignedReadScheme;

impl Modify for SignedReadScheme {
    fn modify(&self, document: &mut Document) {
        let description = "Base64 of a hub envelope from `controller` on topic \
            `control.balancer-read` whose payload is `{\"path\": \"<the exact path and query \
            read>\"}`, signed with the balancer's key and numbered above the last read accepted \
            (docs/security.md)";
        let key = ApiKeyValue::with_description(READ_AUTH_HEADER, description);
        document
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(SIGNED_READ, SecurityScheme::ApiKey(ApiKey::Header(key)));
    }
}

/// The whole document of a process: `served` (what the admin router registered) and this
/// endpoint, with `services` as the path parameter's values and the reads' signature optional
/// unless `all_keyed`.
pub(crate) fn document(served: Document, services: &[String], all_keyed: bool) -> Document {
    let mut document = ApiDoc::openapi();
    document.merge(served);
    let service_schema: RefOr<Schema> = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(services.iter().cloned()))
        .description(Some("A service with a balancer in this process"))
        .into();
    for operation in operations(&mut document) {
        for parameter in operation.parameters.iter_mut().flatten() {
            if parameter.name == "service" && parameter.parameter_in == ParameterIn::Path {
                parameter.schema = Some(service_schema.clone());
            }
        }
        // An empty requirement is OpenAPI's "or nothing": keyless balancers serve anyone.
        if let Some(security) = operation.security.as_mut().filter(|_| !all_keyed) {
            security.push(SecurityRequirement::default());
        }
    }
    document
}

fn operations(document: &mut Document) -> impl Iterator<Item = &mut Operation> {
    document.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
    })
}

/// `GET /api/v1/openapi.json`, serialized once.
pub(crate) fn router<S>(document: &Document) -> Router<S> {
    // Serializing plain data structures into a Vec cannot fail.
    let json = Bytes::from(serde_json::to_vec(document).unwrap_or_default());
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .with_state(json)
}

#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "balancer",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = Object))
)]
async fn openapi_json(State(json): State<Bytes>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

fn reference<T: ToSchema>() -> Ref {
    Ref::from_schema_name(T::name())
}

/// Adds `T` and what it refers to, to `schemas`.
fn with_refs<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into(), T::schema()));
    T::schemas(schemas);
}

/// The body of `PUT .../config` (schema only): the signed envelope or the plain config.
pub(crate) struct ConfigBody;

impl PartialSchema for ConfigBody {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(reference::<Envelope>())
            .item(reference::<BalancerConfig>())
            .description(Some(
                "A keyed balancer (the default) takes only an `Envelope` from `controller` on \
                 topic `control.balancer-config` whose payload is the `BalancerConfig`, signed \
                 with its key and numbered above the last one it accepted; a keyless one \
                 (`--insecure-no-key`) takes the plain `BalancerConfig`.",
            ))
            .into()
    }
}

impl ToSchema for ConfigBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        with_refs::<Envelope>(schemas);
        with_refs::<BalancerConfig>(schemas);
    }
}

/// An error answer (schema only): `{"error"}`, or a refused signed message's `{"error", "reason"}`.
pub(crate) struct AnyError;

impl PartialSchema for AnyError {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(reference::<ErrorBody>())
            .item(reference::<RefusalBody>())
            .description(Some(
                "`ErrorBody` for a bad request, `RefusalBody` for a refused signed message",
            ))
            .into()
    }
}

impl ToSchema for AnyError {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        with_refs::<ErrorBody>(schemas);
        with_refs::<RefusalBody>(schemas);
    }
}

/// A stats read refused with 400 (schema only): a bad query or path, a refused signature, or a
/// cursor ahead of the latest.
pub(crate) struct StatsBadRequest;

impl PartialSchema for StatsBadRequest {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(reference::<ErrorBody>())
            .item(reference::<RefusalBody>())
            .item(reference::<CursorRefusal>())
            .description(Some(
                "`ErrorBody` for a bad `since` or path, `RefusalBody` (`malformed`) for a bad \
                 signed-read header, `CursorRefusal` (`cursor_ahead`) for a cursor ahead of the \
                 latest (the balancer restarted: read from 0)",
            ))
            .into()
    }
}

impl ToSchema for StatsBadRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        with_refs::<ErrorBody>(schemas);
        with_refs::<RefusalBody>(schemas);
        with_refs::<CursorRefusal>(schemas);
    }
}

#[cfg(test)]
#[path = "openapi_tests.rs"]
mod tests;
