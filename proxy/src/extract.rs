//! axum's extractors and fallbacks with JSON answers, for the balancer's admin endpoint.
//!
//! axum answers a bad path segment, an unreadable body, an unknown route or a method a route does
//! not serve with `text/plain` (or nothing); every error of the admin endpoint is JSON
//! `{"error": "..."}` (`wire::ErrorBody`). The controller does the same in its own `src/extract.rs`
//! (this crate cannot use the controller's, and these few lines are not worth a shared crate).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use understudy_wire::ErrorBody;

/// A JSON error answer: `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: message.into(),
    };
    (status, Json(body)).into_response()
}

/// [`Path`] with a JSON rejection (a segment that does not percent-decode to UTF-8...).
pub(crate) struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(error(e.status(), format!("bad path: {}", e.body_text()))),
        }
    }
}

/// The raw body with a JSON rejection (413 past axum's body limit, 400 when it cannot be read).
pub(crate) struct ApiBody(pub Bytes);

impl<S> FromRequest<S> for ApiBody
where
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(ApiBody(bytes)),
            Err(e) => Err(error(e.status(), format!("bad body: {}", e.body_text()))),
        }
    }
}

/// The router's fallback: 404 for a path no route matches.
pub(crate) async fn no_such_endpoint(method: Method, uri: Uri) -> Response {
    let message = format!("no such endpoint: {method} {}", uri.path());
    error(StatusCode::NOT_FOUND, message)
}

/// 405 for a method a route does not serve; axum keeps its `Allow` header on this answer.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("method {method} is not allowed on {}", uri.path());
    error(StatusCode::METHOD_NOT_ALLOWED, message)
}
