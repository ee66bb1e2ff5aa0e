//! axum's extractors, with their rejections turned into the admin endpoint's JSON errors.
//!
//! axum answers a bad path segment, query string or unreadable body with `text/plain`; every error
//! of the admin endpoint is `{"error": "..."}` (CONTRACT.md), so handlers take these instead.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::api::error::ApiError;

/// [`Path`] with a JSON rejection.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::new(
                e.status(),
                format!("bad path: {}", e.body_text()),
            )),
        }
    }
}

/// [`Query`] with a JSON rejection.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(ApiError::new(
                e.status(),
                format!("bad query: {}", e.body_text()),
            )),
        }
    }
}

/// The raw body ([`Bytes`]) with a JSON rejection (413 past axum's body limit). Bodies are parsed
/// by the handlers themselves so that a bad one is a 400 naming serde's complaint.
pub struct ApiBody(pub Bytes);

impl<S> FromRequest<S> for ApiBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(ApiBody(bytes)),
            Err(e) => Err(ApiError::new(
                e.status(),
                format!("bad body: {}", e.body_text()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[derive(serde::Deserialize)]
    struct Flag {
        #[allow(dead_code)] // read by serde only: the test is about its rejection
        on: bool,
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/n/{n}",
                get(|ApiPath(n): ApiPath<u8>| async move { n.to_string() }),
            )
            .route("/q", get(|ApiQuery(_): ApiQuery<Flag>| async { "ok" }))
            .route(
                "/b",
                post(|ApiBody(b): ApiBody| async move { b.len().to_string() })
                    .layer(axum::extract::DefaultBodyLimit::max(4)),
            )
    }

    async fn call(request: http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = app().oneshot(request).await.unwrap().into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    #[tokio::test]
    async fn rejections_are_json_errors_with_axum_status() {
        let get = |uri: &str| http::Request::get(uri).body(Body::empty()).unwrap();
        let (status, body) = call(get("/n/300")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().unwrap().starts_with("bad path"),
            "{body}"
        );
        let (status, body) = call(get("/q?on=maybe")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().unwrap().starts_with("bad query"),
            "{body}"
        );
        let big = http::Request::post("/b")
            .body(Body::from("123456"))
            .unwrap();
        let (status, body) = call(big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            body["error"].as_str().unwrap().starts_with("bad body"),
            "{body}"
        );
        let small = http::Request::post("/b").body(Body::from("12")).unwrap();
        assert_eq!(call(small).await.0, StatusCode::OK);
    }
}
