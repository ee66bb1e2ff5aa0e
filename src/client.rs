//! HTTP client of the admin endpoint, for the CLI subcommands.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad admin URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("admin endpoint {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// The endpoint answered with an error status; `message` is its `error` field.
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unreadable answer: {0}")]
    Protocol(String),
}

pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base: &str, token: Option<String>) -> Result<AdminClient, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        let uri: http::Uri =
            base.parse()
                .map_err(|e: http::uri::InvalidUri| ClientError::BadUrl {
                    url: base.clone(),
                    reason: e.to_string(),
                })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(ClientError::BadUrl {
                url: base,
                reason: "expected http://host:port".to_string(),
            });
        }
        Ok(AdminClient {
            base,
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadUrl {
                url: self.base.clone(),
                reason: e.to_string(),
            })?;
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| unreachable("no answer within 10 s".to_string()))??;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Refused { status, message })
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.call(http::Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let bytes = self
            .call(
                http::Method::POST,
                path,
                Some(body.to_string().into_bytes()),
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
