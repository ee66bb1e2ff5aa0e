//! Process configuration (what `understudy-proxy --config FILE` reads) and the validation that turns
//! a pushed [`BalancerConfig`] into typed values the data plane trusts.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::{BalancerConfig, PoolRole};

/// Weights outside this range are refused (0 would mean "remove the machine").
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;

/// All balancers of one process, plus the admin endpoint they share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Admin HTTP listener (config push, stats, metrics). Port 0 picks a free port.
    pub admin: SocketAddr,
    pub balancers: Vec<BalancerSpec>,
}

/// One balancer: its listener and its initial config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSpec {
    /// Where callers connect. Port 0 picks a free port.
    pub listen: SocketAddr,
    pub config: BalancerConfig,
}

impl ProcessConfig {
    /// Parses the TOML form. Errors name the line and the field.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks every balancer config and the process-wide constraints (distinct services,
    /// distinct fixed listen addresses), as `spawn` does before starting anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validated().map(|_| ())
    }

    pub(crate) fn validated(&self) -> Result<Vec<ValidConfig>, ConfigError> {
        let mut services = HashSet::new();
        let mut listens = HashSet::new();
        let mut valid = Vec::with_capacity(self.balancers.len());
        for (i, spec) in self.balancers.iter().enumerate() {
            let config = ValidConfig::new(&spec.config)
                .map_err(|e| e.within(&format!("balancers[{i}].config")))?;
            if !services.insert(spec.config.service.clone()) {
                return Err(ConfigError::invalid(
                    format!("balancers[{i}].config.service"),
                    format!("service {:?} appears twice", spec.config.service),
                ));
            }
            let fixed_port = spec.listen.port() != 0;
            let clash = fixed_port && (spec.listen == self.admin || !listens.insert(spec.listen));
            if clash {
                return Err(ConfigError::invalid(
                    format!("balancers[{i}].listen"),
                    format!("{} is already used by another listener", spec.listen),
                ));
            }
            valid.push(config);
        }
        Ok(valid)
    }
}

/// A config refused: the message names the field (`machines[2].weight: ...`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
    /// The document did not deserialize (unknown field, wrong type, syntax); serde names the
    /// field and the position.
    #[error("{0}")]
    Parse(String),
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Prefixes the field path with where the config sits in a bigger document.
    fn within(self, prefix: &str) -> Self {
        match self {
            ConfigError::Invalid { field, problem } => ConfigError::Invalid {
                field: format!("{prefix}.{field}"),
                problem,
            },
            other => other,
        }
    }
}

/// One machine after validation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidMachine {
    pub id: Arc<str>,
    pub version: Arc<str>,
    pub address: SocketAddr,
    pub weight: u32,
    pub role: PoolRole,
}

/// A [`BalancerConfig`] that passed every check; the raw form is kept for idempotent re-pushes and
/// for `GET .../config`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidConfig {
    pub raw: BalancerConfig,
    pub service: Arc<str>,
    pub version: u64,
    pub mirror_fraction: f64,
    pub compare_body: bool,
    pub drain_timeout: Duration,
    pub machines: Vec<ValidMachine>,
}

impl ValidConfig {
    pub(crate) fn new(config: &BalancerConfig) -> Result<Self, ConfigError> {
        if config.service.trim().is_empty() || config.service.contains('/') {
            return Err(ConfigError::invalid(
                "service",
                format!(
                    "{:?} is not a service name (non-empty, no '/')",
                    config.service
                ),
            ));
        }
        if !(0.0..=1.0).contains(&config.mirror_fraction) {
            return Err(ConfigError::invalid(
                "mirror_fraction",
                format!("{} is outside 0.0..=1.0", config.mirror_fraction),
            ));
        }
        let mut ids = HashSet::new();
        let mut machines = Vec::with_capacity(config.machines.len());
        for (i, m) in config.machines.iter().enumerate() {
            let field = |name: &str| format!("machines[{i}].{name}");
            if m.id.trim().is_empty() {
                return Err(ConfigError::invalid(field("id"), "empty machine id"));
            }
            if !ids.insert(m.id.as_str()) {
                return Err(ConfigError::invalid(
                    field("id"),
                    format!("duplicate machine id {:?}", m.id),
                ));
            }
            if m.version.trim().is_empty() {
                return Err(ConfigError::invalid(field("version"), "empty version"));
            }
            let address = parse_address(&m.address)
                .map_err(|problem| ConfigError::invalid(field("address"), problem))?;
            if !WEIGHT_RANGE.contains(&m.weight) {
                return Err(ConfigError::invalid(
                    field("weight"),
                    format!(
                        "{} is outside {}..={}",
                        m.weight,
                        WEIGHT_RANGE.start(),
                        WEIGHT_RANGE.end()
                    ),
                ));
            }
            machines.push(ValidMachine {
                id: m.id.as_str().into(),
                version: m.version.as_str().into(),
                address,
                weight: m.weight,
                role: m.config,
            });
        }
        if !machines.iter().any(|m| m.role == PoolRole::Active) {
            return Err(ConfigError::invalid(
                "machines",
                "the active pool is empty: at least one machine needs config = \"active\"",
            ));
        }
        Ok(ValidConfig {
            raw: config.clone(),
            service: config.service.as_str().into(),
            version: config.version,
            mirror_fraction: config.mirror_fraction,
            compare_body: config.compare_body,
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            machines,
        })
    }
}

/// `ip:port`, or `host:port` resolved once now (the data plane never resolves names per job).
fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return check_port(text, addr);
    }
    let bad = || format!("{text:?} is not a host:port address");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let addr = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} does not resolve: {e}"))?
        .next()
        .ok_or_else(bad)?;
    check_port(text, addr)
}

fn check_port(text: &str, addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err(format!("{text:?} has port 0"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MachineEntry;

    fn machine(id: &str, role: PoolRole) -> MachineEntry {
        MachineEntry {
            id: id.into(),
            version: "v1".into(),
            address: "127.0.0.1:9".into(),
            weight: 100,
            config: role,
        }
    }

    fn config() -> BalancerConfig {
        BalancerConfig {
            service: "media".into(),
            version: 1,
            mirror_fraction: 1.0,
            compare_body: false,
            drain_timeout_ms: 1000,
            machines: vec![
                machine("a", PoolRole::Active),
                machine("s", PoolRole::Simulation),
            ],
        }
    }

    fn field_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn accepts_a_good_config() {
        let valid = ValidConfig::new(&config()).unwrap();
        assert_eq!(valid.machines.len(), 2);
        assert_eq!(valid.machines[0].address, "127.0.0.1:9".parse().unwrap());
    }

    #[test]
    fn every_bad_value_names_its_field() {
        let mut c = config();
        c.machines[1].address = "nonsense".into();
        assert_eq!(
            field_of(ValidConfig::new(&c).unwrap_err()),
            "machines[1].address"
        );

        let mut c = config();
        c.machines[0].address = "127.0.0.1:0".into();
        assert_eq!(
            field_of(ValidConfig::new(&c).unwrap_err()),
            "machines[0].address"
        );

        let mut c = config();
        c.machines[1].weight = 0;
        assert_eq!(
            field_of(ValidConfig::new(&c).unwrap_err()),
            "machines[1].weight"
        );

        let mut c = config();
        c.machines[0].weight = 1001;
        assert_eq!(
            field_of(ValidConfig::new(&c).unwrap_err()),
            "machines[0].weight"
        );

        let mut c = config();
        c.machines[1].id = "a".into();
        let err = ValidConfig::new(&c).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        assert_eq!(field_of(err), "machines[1].id");

        let mut c = config();
        c.machines.retain(|m| m.config == PoolRole::Simulation);
        assert_eq!(field_of(ValidConfig::new(&c).unwrap_err()), "machines");

        let mut c = config();
        c.mirror_fraction = 1.5;
        assert_eq!(
            field_of(ValidConfig::new(&c).unwrap_err()),
            "mirror_fraction"
        );

        let mut c = config();
        c.service = "".into();
        assert_eq!(field_of(ValidConfig::new(&c).unwrap_err()), "service");
    }

    #[test]
    fn unknown_fields_are_named_by_the_parser() {
        let text = r#"
admin = "127.0.0.1:0"
[[balancers]]
listen = "127.0.0.1:0"
[balancers.config]
service = "media"
version = 1
mirror_fractoin = 0.5
machines = []
"#;
        let err = ProcessConfig::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains("mirror_fractoin"), "{err}");
        assert!(err.contains("line 8"), "{err}");
    }

    #[test]
    fn process_errors_say_which_balancer() {
        let spec = BalancerSpec {
            listen: "127.0.0.1:0".parse().unwrap(),
            config: config(),
        };
        let mut bad = spec.clone();
        bad.config.machines[0].weight = 0;
        let process = ProcessConfig {
            admin: "127.0.0.1:0".parse().unwrap(),
            balancers: vec![spec.clone(), bad],
        };
        assert_eq!(
            field_of(process.validate().unwrap_err()),
            "balancers[1].config.machines[0].weight"
        );
        let twice = ProcessConfig {
            admin: "127.0.0.1:0".parse().unwrap(),
            balancers: vec![spec.clone(), spec],
        };
        assert_eq!(
            field_of(twice.validate().unwrap_err()),
            "balancers[1].config.service"
        );
    }

    #[test]
    fn toml_round_trip() {
        let process = ProcessConfig {
            admin: "127.0.0.1:0".parse().unwrap(),
            balancers: vec![BalancerSpec {
                listen: "127.0.0.1:0".parse().unwrap(),
                config: config(),
            }],
        };
        let text = toml::to_string(&process).unwrap();
        assert_eq!(ProcessConfig::from_toml_str(&text).unwrap(), process);
    }
}
