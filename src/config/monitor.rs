//! The cluster file's `[monitor]` table: the when/then rules, read with their positions so an
//! error names the file, the line and the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use understudy_hub::monitor::{Condition, RuleAction, Rules, RulesError};

use crate::config::source::{ConfigError, Source};
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
        let table = self.rules_table(source, is_service)?;
        Rules::from_toml(&table.to_string()).map_err(|e| self.rules_error(at, source, e))
    }

    /// The section as the TOML table `Rules::from_toml` reads: the hub owns the rules' checks,
    /// so the positions kept here only serve to place its errors.
    fn rules_table(
        &self,
        source: &Source<'_>,
        is_service: impl Fn(&str) -> bool,
    ) -> Result<toml::Table, ConfigError> {
        let mut table = toml::Table::new();
        if let Some(t) = &self.drain_timeout_secs {
            table.insert(
                "drain_timeout_secs".into(),
                toml::Value::Integer(i64::try_from(*t.get_ref()).unwrap_or(i64::MAX)),
            );
        }
        let rules = self.rule.iter().map(|r| rule_value(r.get_ref())).collect();
        table.insert("rule".into(), toml::Value::Array(rules));
        if let Some(scaling) = &self.scaling {
            table.insert(
                "scaling".into(),
                toml::Value::Table(scaling_table(scaling, source, is_service)?),
            );
        }
        Ok(table)
    }

    /// Where rule `index`'s `then` (or `when`) is written; `at` when there is no such rule.
    fn rule_at(&self, at: usize, index: usize, then: bool) -> usize {
        self.rule.get(index).map_or(at, |r| {
            if then {
                r.get_ref().then.span().start
            } else {
                r.get_ref().when.span().start
            }
        })
    }

    /// The hub's error on the rules, placed at the field it is about.
    fn rules_error(&self, at: usize, source: &Source<'_>, e: RulesError) -> ConfigError {
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
            | RulesError::NoScalingThreshold { index } => source.invalid(
                self.rule_at(at, index, true),
                format!("monitor.rule[{index}].then"),
                reason,
            ),
            RulesError::DuplicateWhen { index, .. } => source.invalid(
                self.rule_at(at, index, false),
                format!("monitor.rule[{index}].when"),
                reason,
            ),
            RulesError::ZeroDrainTimeout => source.invalid(
                self.drain_timeout_secs
                    .as_ref()
                    .map_or(at, |t| t.span().start),
                "monitor.drain_timeout_secs",
                "must be at least 1",
            ),
            RulesError::Toml(_) => source.invalid(at, "monitor", reason),
        }
    }
}

/// One `[[monitor.rule]]` as the hub's TOML: names in snake case.
fn rule_value(r: &RuleSection) -> toml::Value {
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
}

/// `[monitor.scaling]` as the hub's TOML, its services checked against the cluster's.
fn scaling_table(
    scaling: &Spanned<ScalingSection>,
    source: &Source<'_>,
    is_service: impl Fn(&str) -> bool,
) -> Result<toml::Table, ConfigError> {
    let s = scaling.get_ref();
    if let Some(unknown) = s.per_service.keys().find(|name| !is_service(name)) {
        return Err(source.invalid(
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
    Ok(t)
}
