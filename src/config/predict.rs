//! The cluster file's `[predict]` table: the predictive model of calls, its alert routes and the
//! early-fail signal's bounds, validated into [`PredictionSettings`].

use std::time::Duration;

use serde::Deserialize;
use understudy_predict::{PredictConfig, Settings};

/// The model part of `[predict]` when the cluster file leaves it out: the machines' call statuses
/// (docs/loadgen.md) mapped to the states of a call, received -> routed -> queued -> media ->
/// completed, or an error, or a timeout. Any top-level key the file sets replaces the default's.
const DEFAULT_MODEL: &str = r#"
successes = ["completed"]
start_state = "received"

[[rules]]
kind = "call"
when = { status = "received" }
state = "received"

[[rules]]
kind = "call"
when = { status = "routed" }
state = "routed"

[[rules]]
kind = "call"
when = { status = "queued" }
state = "queued"

[[rules]]
kind = "call"
when = { status = "media" }
state = "media"

[[rules]]
kind = "call"
when = { status = "completed" }
state = "completed"

[[rules]]
kind = "call"
when = { status = "error" }
state = "error state failure"

[[rules]]
kind = "call"
when = { status = "timeout" }
state = "time threshold failure"

# A call whose machine stops reporting (crashed, or v2 pulled mid-call) is moved to the
# time-threshold artifact instead of being followed for ever.
[dwell]
limit_secs = 300
"#;

/// `[predict]` in a cluster (or scenario) file: the controller's own keys, and the predict crate's
/// [`PredictConfig`] (rules, artifacts, alerts, dwell, compare...) at the same level.
#[derive(Debug, Clone, Deserialize)]
pub struct PredictSection {
    /// Subscribe to `call.state` and predict at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Whether the early signal may roll a simulating v2 back (otherwise it is only reported).
    #[serde(default = "yes")]
    pub rollback: bool,
    /// Alerts are POSTed here as JSON (`http://` only).
    pub webhook_url: Option<String>,
    /// Deadline of one webhook POST (default 2000).
    pub webhook_timeout_ms: Option<u64>,
    /// Alerts waiting for the webhook; more are dropped and counted (default 1024).
    pub webhook_queue: Option<usize>,
    /// Alerts kept for `GET /api/v1/predictions/alerts` (default 200).
    pub recent_alerts: Option<usize>,
    /// Messages the hub may queue for this part before it counts as slow (default 8192).
    pub subscriber_queue: Option<usize>,
    /// The rest: the predict crate's configuration (unknown keys are refused there).
    #[serde(flatten)]
    pub model: toml::Table,
}

fn yes() -> bool {
    true
}

impl Default for PredictSection {
    fn default() -> Self {
        PredictSection {
            enabled: true,
            rollback: true,
            webhook_url: None,
            webhook_timeout_ms: None,
            webhook_queue: None,
            recent_alerts: None,
            subscriber_queue: None,
            model: toml::Table::new(),
        }
    }
}

/// A `[predict]` field that is wrong: `field` is its path below `predict`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `predict.{field}`: {reason}")]
pub struct PredictSectionError {
    pub field: String,
    pub reason: String,
}

fn section_error(field: impl Into<String>, reason: impl Into<String>) -> PredictSectionError {
    PredictSectionError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    pub url: String,
    pub timeout: Duration,
    pub queue: usize,
}

/// `[predict]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionSettings {
    pub enabled: bool,
    pub rollback: bool,
    pub webhook: Option<WebhookSettings>,
    pub recent_alerts: usize,
    pub subscriber_queue: usize,
    pub model: Settings,
}

impl PredictionSettings {
    /// Whether the rule `prediction` takes a share of each condition's false-fail rate: when it
    /// may roll back (predictions on, `rollback` on). The judge is built with the same sharing,
    /// so that the two together never exceed the condition's `false_fail_rate`.
    pub fn sharing(&self) -> understudy_judge::Sharing {
        understudy_judge::Sharing {
            prediction: self.enabled && self.rollback,
            ..understudy_judge::Sharing::default()
        }
    }
}

impl Default for PredictionSettings {
    fn default() -> Self {
        PredictSection::default()
            .validate()
            .expect("the default [predict] section is valid")
    }
}

fn bounded(
    field: &str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, PredictSectionError> {
    match value {
        None => Ok(default),
        Some(v) if (1..=max).contains(&v) => Ok(v),
        Some(v) => Err(section_error(
            field,
            format!("must be within 1..={max}, got {v}"),
        )),
    }
}

impl PredictSection {
    /// Checks every field; the error names the first that is wrong.
    pub fn validate(&self) -> Result<PredictionSettings, PredictSectionError> {
        let webhook = match &self.webhook_url {
            None => None,
            Some(url) => {
                let uri: http::Uri = url.parse().map_err(|e| {
                    section_error("webhook_url", format!("`{url}` is not a URL: {e}"))
                })?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(section_error(
                        "webhook_url",
                        format!("`{url}`: expected http://HOST:PORT/PATH (https is not supported)"),
                    ));
                }
                let timeout_ms = self.webhook_timeout_ms.unwrap_or(2_000);
                if !(1..=60_000).contains(&timeout_ms) {
                    return Err(section_error(
                        "webhook_timeout_ms",
                        format!("must be within 1..=60000, got {timeout_ms}"),
                    ));
                }
                Some(WebhookSettings {
                    url: url.clone(),
                    timeout: Duration::from_millis(timeout_ms),
                    queue: bounded("webhook_queue", self.webhook_queue, 1024, 1 << 20)?,
                })
            }
        };
        if webhook.is_none() {
            for (field, set) in [
                ("webhook_timeout_ms", self.webhook_timeout_ms.is_some()),
                ("webhook_queue", self.webhook_queue.is_some()),
            ] {
                if set {
                    return Err(section_error(field, "has no effect without webhook_url"));
                }
            }
        }
        let recent_alerts = bounded("recent_alerts", self.recent_alerts, 200, 100_000)?;
        let subscriber_queue = bounded("subscriber_queue", self.subscriber_queue, 8192, 1 << 20)?;
        let mut model: toml::Table = DEFAULT_MODEL
            .parse()
            .expect("the default model configuration is valid TOML");
        for (key, value) in &self.model {
            model.insert(key.clone(), value.clone());
        }
        let config: PredictConfig = serde_path_to_error::deserialize(toml::Value::Table(model))
            .map_err(|e| {
                let path = crate::config::toml_spans::path_text(
                    &crate::config::toml_spans::steps_of(e.path()),
                );
                let e = e.into_inner();
                let reason = e.message().trim().to_string();
                // An unknown key of the section itself is named by its message only.
                let field = if path.is_empty() {
                    unknown_field_of(&e)
                } else {
                    path
                };
                section_error(field, reason)
            })?;
        let model = config.validate().map_err(|e| match e {
            understudy_predict::ConfigError::Invalid { field, reason } => {
                section_error(field, reason)
            }
            understudy_predict::ConfigError::Parse(e) => section_error("(section)", e.to_string()),
        })?;
        Ok(PredictionSettings {
            enabled: self.enabled,
            rollback: self.rollback,
            webhook,
            recent_alerts,
            subscriber_queue,
            model,
        })
    }
}

/// The field a deserialization error is about, when its message names one (`unknown field `x``).
fn unknown_field_of(error: &toml::de::Error) -> String {
    let message = error.message();
    message
        .split('`')
        .nth(1)
        .filter(|_| message.contains("field"))
        .unwrap_or("(section)")
        .to_string()
}
