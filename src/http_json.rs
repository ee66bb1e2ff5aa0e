//! One JSON request over HTTP/1.1 and its whole answer, within a deadline: what the controller's
//! balancer client and the admin endpoint's CLI client both do.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type JsonClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> JsonClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Why no answer came.
#[derive(Debug)]
pub enum ExchangeError {
    /// The request could not be built (a bad URL).
    BadRequest(String),
    /// Connection refused, broken, or no whole answer within the deadline.
    NoAnswer(String),
}

/// Sends `method url` (with a bearer token and a JSON body when given) and reads the answer to
/// the end: its status and body.
pub async fn exchange(
    client: &JsonClient,
    method: http::Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Bytes), ExchangeError> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| (http::header::AUTHORIZATION.as_str(), value.as_str()))
        .collect();
    exchange_with(client, method, url, &headers, body, timeout).await
}

/// As [`exchange`], with any request headers (a signed read's `x-understudy-auth`).
pub async fn exchange_with(
    client: &JsonClient,
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Bytes), ExchangeError> {
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if body.is_some() {
        request = request.header(http::header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ExchangeError::BadRequest(e.to_string()))?;
    let no_answer = |e: &dyn std::error::Error| ExchangeError::NoAnswer(with_sources(e));
    let answer = async {
        let response = client.request(request).await.map_err(|e| no_answer(&e))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| no_answer(&e))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| ExchangeError::NoAnswer(format!("no answer within {timeout:?}")))?
}

/// An error and its causes, outermost first: hyper's "client error (Connect)" says nothing
/// without the "Connection refused (os error 111)" beneath it.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The `error` field of a JSON error body (`{"error": "..."}`), else the body as text.
pub fn error_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned())
}
