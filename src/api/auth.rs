//! Operators' bearer tokens, checked as a layer on the mutating routes: a missing or unknown
//! token is answered 401 before any extractor reads the request, and no handler can forget the
//! check. The layer puts the operator's name in the request, where handlers take it from
//! ([`OperatorName`]) to record who did what.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::api::error::ApiError;
use crate::config::operators::Operators;
use crate::runtime::controller::Core;

/// Who a request acts as: the operator whose token it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorName(pub String);

/// `route_layer` middleware: lets the request through only with `Authorization: Bearer TOKEN`
/// of a known operator, whose name it adds to the request's extensions.
pub async fn require_token(
    State(core): State<Arc<Core>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let name = identify(core.operators(), request.headers())?.to_string();
    request.extensions_mut().insert(OperatorName(name));
    Ok(next.run(request).await)
}

/// The operator whose token the request presents (compared by digest, in constant time).
pub fn identify<'a>(operators: &'a Operators, headers: &HeaderMap) -> Result<&'a str, ApiError> {
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
    operators
        .identify(presented)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "wrong bearer token"))
}
