//! The bearer token, checked as a layer on the mutating routes: a missing or wrong token is
//! answered 401 before any extractor reads the request, and no handler can forget the check.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;
use crate::runtime::controller::Core;

/// `route_layer` middleware: lets the request through only with `Authorization: Bearer TOKEN`.
pub async fn require_token(
    State(core): State<Arc<Core>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_token(core.token(), request.headers())?;
    Ok(next.run(request).await)
}

/// Compares the presented token with `token` in constant time.
pub fn check_token(token: &str, headers: &HeaderMap) -> Result<(), ApiError> {
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
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token",
        ))
    }
}
