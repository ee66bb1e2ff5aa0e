//! Configuration: which update messages map to which states, which states end an object's life,
//! how fast the model forgets, when to alert. TOML, checked field by field into [`Settings`].
//!
//! ```toml
//! half_life_secs = 900
//! artifacts = ["error state failure", "time threshold failure"]   # the default
//! successes = ["completed"]
//! start_state = "received"
//!
//! [[rules]]                          # first matching rule wins; unmatched messages are ignored
//! kind = "call"
//! when = { status = "routed" }
//! state = "routed"
//!
//! [alerts]
//! threshold = 0.05
//! min_exits = 20
//!
//! [dwell]
//! limit_secs = 60                    # any state not listed below
//! limits = { media = 3600 }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decay::HalfLife;

pub const ERROR_STATE_FAILURE: &str = "error state failure";
pub const TIME_THRESHOLD_FAILURE: &str = "time threshold failure";

/// Why a configuration was refused. `Invalid` names the offending field by its TOML path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TOML that does not read as a configuration: the field's path (when it is not the
    /// document itself), the line and column, and toml's message.
    #[error("predictive monitoring config: {0}")]
    Parse(String),
    #[error("predictive monitoring config: `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The configuration as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictConfig {
    /// After this many seconds an observation counts half.
    #[serde(default = "default_half_life_secs")]
    pub half_life_secs: f64,
    /// Failure states; each gets its own probability.
    #[serde(default = "default_artifacts")]
    pub artifacts: Vec<String>,
    /// The artifact an object is moved to when it dwells in a state beyond its limit.
    #[serde(default = "default_time_threshold_artifact")]
    pub time_threshold_artifact: String,
    /// Successful ends.
    #[serde(default)]
    pub successes: Vec<String>,
    /// Where objects begin: the state compared between versions.
    #[serde(default)]
    pub start_state: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub alerts: AlertConfig,
    #[serde(default)]
    pub dwell: DwellConfig,
    #[serde(default)]
    pub compare: CompareConfig,
    /// The chain is solved again at most this often per model (milliseconds); between solves
    /// alerts use the last solution. 0 solves after every change.
    #[serde(default = "default_resolve_interval_ms")]
    pub resolve_interval_ms: u64,
}

/// "A message of kind `kind` whose fields equal `when` puts its object in `state`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub kind: String,
    #[serde(default)]
    pub when: BTreeMap<String, String>,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Alert when an object enters a state whose probability of ending in an artifact is at least
    /// this.
    #[serde(default = "default_alert_threshold")]
    pub threshold: f64,
    /// A state alerts only once this much (decayed) departure weight was observed from it, so one
    /// unlucky object does not make a state look doomed.
    #[serde(default = "default_min_exits")]
    pub min_exits: f64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            threshold: default_alert_threshold(),
            min_exits: default_min_exits(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DwellConfig {
    /// Seconds any state may hold an object before it becomes a time threshold failure.
    #[serde(default)]
    pub limit_secs: Option<f64>,
    /// Per-state limits (seconds), overriding `limit_secs`.
    #[serde(default)]
    pub limits: BTreeMap<String, f64>,
}

/// The rule `prediction`: when v2's probability of failure is more than `margin` above v1's
/// (see `signal.rs`; its false-fail rate is a share of the joining condition's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Pairs of ended objects (one of each version) the test needs before it may fail; also the
    /// (decayed) departures the chain's early warning needs.
    #[serde(default = "default_min_starts")]
    pub min_starts: f64,
    /// v2 must be worse by more than this absolute probability.
    #[serde(default = "default_margin")]
    pub margin: f64,
    /// Deprecated and ignored: the rule once failed v2 at a fixed z, re-tested at every look. The
    /// test's error rate is now its share of the joining condition's `false_fail_rate`. Still
    /// read so that older files load ([`Settings::warnings`] says it is ignored).
    #[serde(default)]
    pub z: Option<f64>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            min_starts: default_min_starts(),
            margin: default_margin(),
            z: None,
        }
    }
}

fn default_half_life_secs() -> f64 {
    900.0
}
fn default_artifacts() -> Vec<String> {
    vec![
        ERROR_STATE_FAILURE.to_string(),
        TIME_THRESHOLD_FAILURE.to_string(),
    ]
}
fn default_time_threshold_artifact() -> String {
    TIME_THRESHOLD_FAILURE.to_string()
}
fn default_alert_threshold() -> f64 {
    0.05
}
fn default_min_exits() -> f64 {
    20.0
}
fn default_min_starts() -> f64 {
    100.0
}
fn default_margin() -> f64 {
    0.01
}
fn default_resolve_interval_ms() -> u64 {
    1000
}

impl Default for PredictConfig {
    fn default() -> Self {
        PredictConfig {
            half_life_secs: default_half_life_secs(),
            artifacts: default_artifacts(),
            time_threshold_artifact: default_time_threshold_artifact(),
            successes: Vec::new(),
            start_state: None,
            rules: Vec::new(),
            alerts: AlertConfig::default(),
            dwell: DwellConfig::default(),
            compare: CompareConfig::default(),
            resolve_interval_ms: default_resolve_interval_ms(),
        }
    }
}

/// One mapping rule, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub kind: String,
    pub when: BTreeMap<String, String>,
    pub state: String,
}

/// Alerting, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertPolicy {
    pub threshold: f64,
    pub min_exits: f64,
}

/// Comparison rule, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompareRule {
    pub min_starts: f64,
    pub margin: f64,
}

/// The configuration, validated into domain values.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub half_life: HalfLife,
    pub artifacts: Vec<String>,
    pub time_threshold_artifact: String,
    pub successes: BTreeSet<String>,
    pub start_state: Option<String>,
    pub rules: Vec<Rule>,
    pub alerts: AlertPolicy,
    pub default_dwell_limit: Option<Duration>,
    pub dwell_limits: BTreeMap<String, Duration>,
    pub compare: CompareRule,
    pub resolve_interval: Duration,
    /// Keys that were read but have no effect any more, each with why (for the caller to log).
    pub warnings: Vec<String>,
}

impl Settings {
    /// The dwell limit of `state`, if any. Absorbing states have none.
    pub fn dwell_limit(&self, state: &str) -> Option<Duration> {
        if self.is_absorbing(state) {
            return None;
        }
        self.dwell_limits
            .get(state)
            .copied()
            .or(self.default_dwell_limit)
    }

    pub fn is_artifact(&self, state: &str) -> bool {
        self.artifacts.iter().any(|a| a == state)
    }

    pub fn is_absorbing(&self, state: &str) -> bool {
        self.is_artifact(state) || self.successes.contains(state)
    }

    pub fn absorbing(&self) -> crate::chain::Absorbing {
        crate::chain::Absorbing {
            artifacts: self.artifacts.clone(),
            successes: self.successes.clone(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        PredictConfig::default()
            .validate()
            .expect("the default configuration is valid")
    }
}

fn seconds(field: &str, value: f64) -> Result<Duration, ConfigError> {
    if !value.is_finite() || value <= 0.0 {
        return Err(invalid(
            field,
            format!("must be a positive number of seconds, got {value}"),
        ));
    }
    Duration::try_from_secs_f64(value).map_err(|e| invalid(field, e.to_string()))
}

fn state_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() {
        return Err(invalid(field, "a state name cannot be empty"));
    }
    Ok(())
}

impl PredictConfig {
    pub fn from_toml_str(text: &str) -> Result<Settings, ConfigError> {
        let config: PredictConfig =
            understudy_tomlread::read(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()
    }

    /// Checks every field; the error names the first that is wrong.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        // Fields are checked in the order they are declared, so the first wrong one is named.
        let half_life = HalfLife::new(seconds("half_life_secs", self.half_life_secs)?)
            .ok_or_else(|| invalid("half_life_secs", "must be positive"))?;
        self.validate_artifacts()?;
        let successes = self.validate_successes()?;
        let absorbing =
            |name: &str| self.artifacts.iter().any(|a| a == name) || successes.contains(name);
        if let Some(start) = &self.start_state {
            state_name("start_state", start)?;
            if absorbing(start) {
                return Err(invalid(
                    "start_state",
                    format!("`{start}` is an end state (artifact or success)"),
                ));
            }
        }
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| rule.validate(i))
            .collect::<Result<Vec<Rule>, ConfigError>>()?;
        let alerts = self.alerts.validate()?;
        let (default_dwell_limit, dwell_limits) = self.dwell.validate(&absorbing)?;
        let compare = self.compare.validate()?;
        Ok(Settings {
            half_life,
            artifacts: self.artifacts.clone(),
            time_threshold_artifact: self.time_threshold_artifact.clone(),
            successes,
            start_state: self.start_state.clone(),
            rules,
            alerts,
            default_dwell_limit,
            dwell_limits,
            compare,
            resolve_interval: Duration::from_millis(self.resolve_interval_ms),
            warnings: self.compare.warnings(),
        })
    }

    /// At least one artifact, each named once, the time threshold artifact among them.
    fn validate_artifacts(&self) -> Result<(), ConfigError> {
        if self.artifacts.is_empty() {
            return Err(invalid("artifacts", "name at least one artifact state"));
        }
        for (i, artifact) in self.artifacts.iter().enumerate() {
            let field = format!("artifacts[{i}]");
            state_name(&field, artifact)?;
            if self.artifacts[..i].contains(artifact) {
                return Err(invalid(field, format!("`{artifact}` is listed twice")));
            }
        }
        if !self.artifacts.contains(&self.time_threshold_artifact) {
            return Err(invalid(
                "time_threshold_artifact",
                format!(
                    "`{}` is not one of the artifacts",
                    self.time_threshold_artifact
                ),
            ));
        }
        Ok(())
    }

    /// The success states, each named once and none an artifact.
    fn validate_successes(&self) -> Result<BTreeSet<String>, ConfigError> {
        let mut successes = BTreeSet::new();
        for (i, success) in self.successes.iter().enumerate() {
            let field = format!("successes[{i}]");
            state_name(&field, success)?;
            if self.artifacts.contains(success) {
                return Err(invalid(field, format!("`{success}` is also an artifact")));
            }
            if !successes.insert(success.clone()) {
                return Err(invalid(field, format!("`{success}` is listed twice")));
            }
        }
        Ok(successes)
    }
}

impl RuleConfig {
    /// Checks `rules[i]`.
    fn validate(&self, i: usize) -> Result<Rule, ConfigError> {
        if self.kind.trim().is_empty() {
            return Err(invalid(format!("rules[{i}].kind"), "cannot be empty"));
        }
        if let Some(key) = self.when.keys().find(|k| k.trim().is_empty()) {
            return Err(invalid(
                format!("rules[{i}].when"),
                format!("field name `{key}` cannot be empty"),
            ));
        }
        state_name(&format!("rules[{i}].state"), &self.state)?;
        Ok(Rule {
            kind: self.kind.clone(),
            when: self.when.clone(),
            state: self.state.clone(),
        })
    }
}

impl AlertConfig {
    fn validate(&self) -> Result<AlertPolicy, ConfigError> {
        let threshold = self.threshold;
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(invalid(
                "alerts.threshold",
                format!("must be a probability in (0, 1], got {threshold}"),
            ));
        }
        let min_exits = self.min_exits;
        if !(min_exits.is_finite() && min_exits >= 0.0) {
            return Err(invalid(
                "alerts.min_exits",
                format!("must be a non-negative number, got {min_exits}"),
            ));
        }
        Ok(AlertPolicy {
            threshold,
            min_exits,
        })
    }
}

/// The default dwell limit and the per-state ones.
type DwellLimits = (Option<Duration>, BTreeMap<String, Duration>);

impl DwellConfig {
    /// `absorbing` says which states are ends: they cannot have a limit.
    fn validate(&self, absorbing: &dyn Fn(&str) -> bool) -> Result<DwellLimits, ConfigError> {
        let default_dwell_limit = self
            .limit_secs
            .map(|value| seconds("dwell.limit_secs", value))
            .transpose()?;
        let mut dwell_limits = BTreeMap::new();
        for (state, value) in &self.limits {
            let field = format!("dwell.limits.\"{state}\"");
            state_name(&field, state)?;
            if absorbing(state) {
                return Err(invalid(
                    field,
                    format!("`{state}` is an end state: objects do not dwell there"),
                ));
            }
            dwell_limits.insert(state.clone(), seconds(&field, *value)?);
        }
        Ok((default_dwell_limit, dwell_limits))
    }
}

impl CompareConfig {
    fn validate(&self) -> Result<CompareRule, ConfigError> {
        if !(self.min_starts.is_finite() && self.min_starts >= 0.0) {
            return Err(invalid(
                "compare.min_starts",
                format!("must be a non-negative number, got {}", self.min_starts),
            ));
        }
        if !(self.margin >= 0.0 && self.margin < 1.0) {
            return Err(invalid(
                "compare.margin",
                format!("must be a probability in [0, 1), got {}", self.margin),
            ));
        }
        // An old file's z is ignored, but a value no rule could ever have used is still refused.
        if let Some(z) = self.z.filter(|z| !(z.is_finite() && *z > 0.0)) {
            return Err(invalid(
                "compare.z",
                format!("must be a positive number, got {z} (and it is ignored: remove it)"),
            ));
        }
        Ok(CompareRule {
            min_starts: self.min_starts,
            margin: self.margin,
        })
    }

    fn warnings(&self) -> Vec<String> {
        self.z
            .map(|z| {
                format!(
                    "`compare.z` = {z} is ignored: the rule `prediction` is now a test valid at \
                     every look, whose error rate is a share of the joining condition's \
                     `false_fail_rate`; remove the key"
                )
            })
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        PredictConfig::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn a_full_config_is_read() {
        let settings = PredictConfig::from_toml_str(
            r#"
            half_life_secs = 60
            successes = ["completed"]
            start_state = "received"
            resolve_interval_ms = 0
            [[rules]]
            kind = "call"
            when = { status = "routed" }
            state = "routed"
            [alerts]
            threshold = 0.1
            min_exits = 5
            [dwell]
            limit_secs = 30
            limits = { media = 3600 }
            [compare]
            margin = 0.02
            "#,
        )
        .unwrap();
        assert_eq!(settings.half_life.duration(), Duration::from_secs(60));
        assert_eq!(settings.artifacts, default_artifacts());
        assert_eq!(settings.rules[0].state, "routed");
        assert_eq!(
            settings.dwell_limit("media"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            settings.dwell_limit("routed"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(settings.dwell_limit("completed"), None);
        assert_eq!(settings.compare.margin, 0.02);
        assert!(settings.warnings.is_empty());
    }

    #[test]
    fn an_old_z_is_read_and_said_to_be_ignored() {
        let settings = PredictConfig::from_toml_str("[compare]\nz = 2.5\nmargin = 0.02").unwrap();
        assert_eq!(settings.compare.margin, 0.02);
        assert_eq!(settings.warnings.len(), 1);
        assert!(settings.warnings[0].contains("`compare.z` = 2.5 is ignored"));
        assert!(settings.warnings[0].contains("false_fail_rate"));
    }

    #[test]
    fn the_default_config_is_valid() {
        let settings = PredictConfig::from_toml_str("").unwrap();
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.dwell_limit("anything"), None);
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert!(refused("half_life = 3").contains("half_life"));
        assert!(refused("half_life_secs = 0").contains("`half_life_secs`"));
        assert!(refused("artifacts = []").contains("`artifacts`"));
        assert!(refused(
            r#"artifacts = ["a", "a"]
            time_threshold_artifact = "a""#
        )
        .contains("`artifacts[1]`"));
        assert!(
            refused(r#"time_threshold_artifact = "slow""#).contains("`time_threshold_artifact`")
        );
        assert!(refused(r#"successes = ["error state failure"]"#).contains("`successes[0]`"));
        assert!(refused(r#"start_state = "time threshold failure""#).contains("`start_state`"));
        assert!(refused(
            r#"[[rules]]
            kind = ""
            state = "x""#
        )
        .contains("`rules[0].kind`"));
        assert!(refused(
            r#"[[rules]]
            kind = "call"
            state = "x"
            [[rules]]
            kind = "call"
            state = " ""#
        )
        .contains("`rules[1].state`"));
        let unknown = refused(
            r#"[[rules]]
            kind = "call"
            stat = "x""#,
        );
        assert!(unknown.contains("stat"), "{unknown}");
        assert!(refused("[alerts]\nthreshold = 1.5").contains("`alerts.threshold`"));
        assert!(refused("[alerts]\nthreshold = 0").contains("`alerts.threshold`"));
        assert!(refused("[alerts]\nmin_exits = -1").contains("`alerts.min_exits`"));
        assert!(refused("[dwell]\nlimit_secs = -5").contains("`dwell.limit_secs`"));
        assert!(refused("[dwell]\nlimits = { media = 0 }").contains("`dwell.limits.\"media\"`"));
        assert!(refused("[dwell.limits]\n\"error state failure\" = 5")
            .contains("`dwell.limits.\"error state failure\"`"));
        assert!(refused("[compare]\nmargin = 1").contains("`compare.margin`"));
        assert!(refused("[compare]\nz = 0").contains("`compare.z`"));
        assert!(refused("[alerts]\nthreshhold = 0.1").contains("threshhold"));
    }
}
