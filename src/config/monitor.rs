//! The cluster file's `[monitor]` table: the when/then rules, read with their positions so an
//! error names the file, the line and the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use understudy_hub::monitor::{Condition, RuleAction, Rules, RulesError};

use crate::config::cluster::{ConfigError, Source};
use crate::config::toml_spans::Spanned;

/// `[monitor]` in a cluster (or scenario) file: the rules of `understudy_hub::monitor::Rules`,
/// read here with their positions so an error names the file, the line and the field.
/// Without the table the standard rules apply (take down machines out, put running ones back,
/// report drift); with it, exactly the rules it lists.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSection {
    /// How long a machine holding sessions may drain before it is altered anyway (default 30).
    pub drain_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    pub rule: Vec<Spanned<RuleSection>>,
    pub scaling: Option<Spanned<ScalingSection>>,
}

/// `[[monitor.rule]]`: when a condition holds, then these actions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub when: Spanned<Condition>,
    pub then: Spanned<Vec<RuleAction>>,
}

/// `[monitor.scaling]`: the threshold below which a replacement is asked for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSection {
    pub min_running_active: Option<u32>,
    #[serde(default)]
    pub per_service: BTreeMap<String, u32>,
}

fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl MonitorSection {
    /// Validates into rules; `is_service` tells the cluster's service names.
    pub fn validate(
        &self,
        at: usize,
        source: &Source<'_>,
        is_service: impl Fn(&str) -> bool,
    ) -> Result<Rules, ConfigError> {
        let invalid = |offset: usize, field: String, reason: String| ConfigError::Invalid {
            file: source.file.to_string(),
            line: source.line_of(offset),
            field,
            reason,
        };
        let mut table = toml::Table::new();
        if let Some(t) = &self.drain_timeout_secs {
            table.insert(
                "drain_timeout_secs".into(),
                toml::Value::Integer(i64::try_from(*t.get_ref()).unwrap_or(i64::MAX)),
            );
        }
        let rules: Vec<toml::Value> = self
            .rule
            .iter()
            .map(|r| {
                let r = r.get_ref();
                let mut rule = toml::Table::new();
                rule.insert("when".into(), toml::Value::String(snake(r.when.get_ref())));
                rule.insert(
                    "then".into(),
                    toml::Value::Array(
                        r.then
                            .get_ref()
                            .iter()
                            .map(|a| toml::Value::String(snake(a)))
                            .collect(),
                    ),
                );
                toml::Value::Table(rule)
            })
            .collect();
        table.insert("rule".into(), toml::Value::Array(rules));
        if let Some(scaling) = &self.scaling {
            let s = scaling.get_ref();
            if let Some(unknown) = s.per_service.keys().find(|name| !is_service(name)) {
                return Err(invalid(
                    scaling.span().start,
                    format!("monitor.scaling.per_service.{unknown}"),
                    format!("unknown service `{unknown}`"),
                ));
            }
            let mut t = toml::Table::new();
            if let Some(n) = s.min_running_active {
                t.insert("min_running_active".into(), toml::Value::Integer(n.into()));
            }
            t.insert(
                "per_service".into(),
                toml::Value::Table(
                    s.per_service
                        .iter()
                        .map(|(k, v)| (k.clone(), toml::Value::Integer((*v).into())))
                        .collect(),
                ),
            );
            table.insert("scaling".into(), toml::Value::Table(t));
        }
        let rule_at = |index: usize, then: bool| {
            self.rule.get(index).map_or(at, |r| {
                if then {
                    r.get_ref().then.span().start
                } else {
                    r.get_ref().when.span().start
                }
            })
        };
        Rules::from_toml(&table.to_string()).map_err(|e| {
            // The hub's messages start with `rules: `; the field is named here instead.
            let reason = e.to_string();
            let reason = reason.strip_prefix("rules: ").unwrap_or(&reason);
            // ... and `rule[0].then: ` too: the field is named in full below.
            let reason = match reason.split_once(": ") {
                Some((head, rest)) if head.starts_with("rule[") => rest.to_string(),
                _ => reason.to_string(),
            };
            match e {
                RulesError::ActionNotAllowed { index, .. }
                | RulesError::EmptyThen { index }
                | RulesError::NoScalingThreshold { index } => invalid(
                    rule_at(index, true),
                    format!("monitor.rule[{index}].then"),
                    reason,
                ),
                RulesError::DuplicateWhen { index, .. } => invalid(
                    rule_at(index, false),
                    format!("monitor.rule[{index}].when"),
                    reason,
                ),
                RulesError::ZeroDrainTimeout => invalid(
                    self.drain_timeout_secs
                        .as_ref()
                        .map_or(at, |t| t.span().start),
                    "monitor.drain_timeout_secs".into(),
                    "must be at least 1".into(),
                ),
                RulesError::Toml(_) => invalid(at, "monitor".into(), reason),
            }
        })
    }
}

