//! HTTP client of the admin endpoint, for the CLI subcommands.

use std::time::Duration;

use bytes::Bytes;

use crate::core::rollout::OpsAction;
use crate::http_json::{self, ExchangeError, JsonClient};
use crate::runtime::controller::RolloutDetail;

/// How long the CLI waits for the admin endpoint's whole answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

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
    client: JsonClient,
}

impl AdminClient {
    /// The admin endpoint's base URL, as given (without a trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

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
            client: http_json::client(),
        })
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let url = format!("{}{path}", self.base);
        let (status, bytes) = http_json::exchange(
            &self.client,
            method,
            &url,
            self.token.as_deref(),
            body,
            ANSWER_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            ExchangeError::BadRequest(reason) => ClientError::BadUrl {
                url: self.base.clone(),
                reason,
            },
            ExchangeError::NoAnswer(reason) => ClientError::Unreachable {
                url: self.base.clone(),
                reason,
            },
        })?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        Err(ClientError::Refused {
            status,
            message: http_json::error_message(&bytes),
        })
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

    /// An operator's action on a rollout. An approval names the evidence it approves: `evidence`
    /// when given, else the `evidence.id` the endpoint shows now (the caller prints what it
    /// approved from the answer).
    pub async fn act(
        &self,
        rollout: i64,
        action: OpsAction,
        evidence: Option<String>,
    ) -> Result<RolloutDetail, ClientError> {
        let path = format!("/api/v1/rollouts/{rollout}/{}", action.as_str());
        let body = match (action, evidence) {
            (OpsAction::Approve, Some(id)) => serde_json::json!({ "evidence": id }),
            (OpsAction::Approve, None) => {
                let shown: RolloutDetail = self.get(&format!("/api/v1/rollouts/{rollout}")).await?;
                match shown.evidence.and_then(|e| e.id) {
                    Some(id) => serde_json::json!({ "evidence": id }),
                    None => {
                        return Err(ClientError::Refused {
                            status: 409,
                            message: format!(
                                "rollout {rollout} is {}: it has no evidence to approve",
                                shown.rollout.phase
                            ),
                        })
                    }
                }
            }
            _ => serde_json::json!({}),
        };
        self.post(&path, &body).await
    }
}
