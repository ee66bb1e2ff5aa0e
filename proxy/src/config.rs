//! Process configuration (what `understudy-proxy --config FILE` reads) and the validation that turns
//! a pushed [`BalancerConfig`] into typed values the data plane trusts.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use understudy_wire::{check_compare_headers, check_health_path, BalancerConfig, PoolRole};

use crate::fields::Comparison;

/// Weights outside this range are refused (0 would mean "remove the machine").
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;

/// All balancers of one process, plus the admin endpoint they share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Admin HTTP listener (config push, stats, metrics). Port 0 picks a free port.
    pub admin: SocketAddr,
    /// Which callers are cluster machines (see `marker.rs`).
    #[serde(default)]
    pub trust: TrustSpec,
    /// Deadlines and caps of the data plane.
    #[serde(default)]
    pub limits: LimitsSpec,
    pub balancers: Vec<BalancerSpec>,
}

/// One balancer: its listeners and its initial config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSpec {
    /// Where callers connect. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// A second listener for cluster machines only (a dependency's callers): a job arriving
    /// there may carry the simulation marker. Port 0 picks a free port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_listen: Option<SocketAddr>,
    /// Where the highest controller fencing epoch applied is kept, so a restart still refuses
    /// the configs of a controller that lost its lead (none: in memory only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_file: Option<std::path::PathBuf>,
    pub config: BalancerConfig,
}

impl BalancerSpec {
    /// A balancer with a public listener only.
    pub fn new(listen: SocketAddr, config: BalancerConfig) -> Self {
        BalancerSpec {
            listen,
            internal_listen: None,
            epoch_file: None,
            config,
        }
    }
}

/// The `[trust]` table: who may send simulation jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSpec {
    /// Source networks of cluster machines (`"10.1.0.0/16"`, `"127.0.0.1/32"`): a job from
    /// elsewhere on a public listener loses any simulation marker it carries.
    #[serde(default)]
    pub internal_sources: Vec<IpNet>,
    /// How long a simulation marker's token is good for.
    #[serde(default = "default_marker_max_age_ms")]
    pub marker_max_age_ms: u64,
}

fn default_marker_max_age_ms() -> u64 {
    crate::marker::DEFAULT_MARKER_MAX_AGE.as_millis() as u64
}

impl Default for TrustSpec {
    fn default() -> Self {
        TrustSpec {
            internal_sources: Vec::new(),
            marker_max_age_ms: default_marker_max_age_ms(),
        }
    }
}

/// The `[limits]` table: every deadline and cap of the data plane, so that a slow or hostile
/// peer holds at most this much. Each one hit is counted in
/// `understudy_balancer_limit_hits_total{service,limit}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSpec {
    /// A request head must arrive whole within this, from its first byte (slowloris).
    pub head_timeout_ms: u64,
    /// A caller's connection idle between jobs is closed after this.
    pub caller_idle_ms: u64,
    /// A request body with no byte for this long fails the job (408).
    pub caller_body_idle_ms: u64,
    /// Writing an answer to a caller that does not read for this long ends its connection.
    pub caller_write_timeout_ms: u64,
    pub machine_connect_timeout_ms: u64,
    /// Writing a request to a machine that does not read for this long fails the job.
    pub machine_write_timeout_ms: u64,
    /// A machine that sends nothing of its answer for this long fails the job (504).
    pub machine_answer_timeout_ms: u64,
    /// A kept-alive connection to a machine idle longer than this is closed, not reused.
    pub machine_keepalive_ms: u64,
    /// Sessions pinned at once per balancer; a new one beyond it is refused (503).
    pub max_sessions: usize,
    /// The longest `x-session-id` accepted (431 beyond).
    pub max_session_id_bytes: usize,
    /// How often each machine is probed (its `health_path`, else a TCP connect).
    pub health_interval_ms: u64,
    /// A probe with no answer within this fails.
    pub health_timeout_ms: u64,
    /// Failed probes (or job connections) in a row that make a machine `failing`.
    pub health_fall: usize,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            head_timeout_ms: 10_000,
            caller_idle_ms: 60_000,
            caller_body_idle_ms: 30_000,
            caller_write_timeout_ms: 30_000,
            machine_connect_timeout_ms: 2_000,
            machine_write_timeout_ms: 30_000,
            machine_answer_timeout_ms: 30_000,
            machine_keepalive_ms: 50_000,
            max_sessions: 100_000,
            max_session_id_bytes: 256,
            health_interval_ms: 1_000,
            health_timeout_ms: 1_000,
            health_fall: 2,
        }
    }
}

/// [`LimitsSpec`] checked: what the data plane reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub head_timeout: Duration,
    pub caller_idle: Duration,
    pub caller_body_idle: Duration,
    pub caller_write: Duration,
    pub machine_connect: Duration,
    pub machine_write: Duration,
    pub machine_answer: Duration,
    pub machine_keepalive: Duration,
    pub max_sessions: usize,
    pub max_session_id_bytes: usize,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub health_fall: u32,
}

impl LimitsSpec {
    /// Every duration between 1 ms and a day, every cap at least 1.
    pub(crate) fn validated(&self) -> Result<Limits, ConfigError> {
        let duration = |field: &str, ms: u64| {
            if (1..=86_400_000).contains(&ms) {
                Ok(Duration::from_millis(ms))
            } else {
                Err(ConfigError::invalid(
                    format!("limits.{field}"),
                    format!("{ms} is outside 1..=86400000 (milliseconds)"),
                ))
            }
        };
        let cap = |field: &str, n: usize| {
            if n >= 1 {
                Ok(n)
            } else {
                Err(ConfigError::invalid(
                    format!("limits.{field}"),
                    "must be at least 1",
                ))
            }
        };
        Ok(Limits {
            head_timeout: duration("head_timeout_ms", self.head_timeout_ms)?,
            caller_idle: duration("caller_idle_ms", self.caller_idle_ms)?,
            caller_body_idle: duration("caller_body_idle_ms", self.caller_body_idle_ms)?,
            caller_write: duration("caller_write_timeout_ms", self.caller_write_timeout_ms)?,
            machine_connect: duration(
                "machine_connect_timeout_ms",
                self.machine_connect_timeout_ms,
            )?,
            machine_write: duration("machine_write_timeout_ms", self.machine_write_timeout_ms)?,
            machine_answer: duration("machine_answer_timeout_ms", self.machine_answer_timeout_ms)?,
            machine_keepalive: duration("machine_keepalive_ms", self.machine_keepalive_ms)?,
            max_sessions: cap("max_sessions", self.max_sessions)?,
            max_session_id_bytes: cap("max_session_id_bytes", self.max_session_id_bytes)?,
            health_interval: duration("health_interval_ms", self.health_interval_ms)?,
            health_timeout: duration("health_timeout_ms", self.health_timeout_ms)?,
            health_fall: match cap("health_fall", self.health_fall)? {
                n @ 1..=100 => n as u32,
                n => {
                    return Err(ConfigError::invalid(
                        "limits.health_fall",
                        format!("{n} is outside 1..=100"),
                    ))
                }
            },
        })
    }
}

impl TrustSpec {
    pub(crate) fn marker_max_age(&self) -> Result<Duration, ConfigError> {
        match self.marker_max_age_ms {
            1..=86_400_000 => Ok(Duration::from_millis(self.marker_max_age_ms)),
            other => Err(ConfigError::invalid(
                "trust.marker_max_age_ms",
                format!("{other} is outside 1..=86400000 (milliseconds)"),
            )),
        }
    }
}

impl ProcessConfig {
    /// The balancers of `balancers` behind one admin endpoint, with the default `[trust]` and
    /// `[limits]`.
    pub fn new(admin: SocketAddr, balancers: Vec<BalancerSpec>) -> Self {
        ProcessConfig {
            admin,
            trust: TrustSpec::default(),
            limits: LimitsSpec::default(),
            balancers,
        }
    }

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
        self.limits.validated()?;
        self.trust.marker_max_age()?;
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
            let addresses = [
                ("listen", Some(spec.listen)),
                ("internal_listen", spec.internal_listen),
            ];
            for (field, address) in addresses {
                let Some(address) = address.filter(|a| a.port() != 0) else {
                    continue;
                };
                if address == self.admin || !listens.insert(address) {
                    return Err(ConfigError::invalid(
                        format!("balancers[{i}].{field}"),
                        format!("{address} is already used by another listener"),
                    ));
                }
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
    /// Probed with `GET` when set, else by a TCP connect.
    pub health_path: Option<Arc<str>>,
}

/// A [`BalancerConfig`] that passed every check; the raw form is kept for idempotent re-pushes and
/// for `GET .../config`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidConfig {
    pub raw: BalancerConfig,
    pub service: Arc<str>,
    pub version: u64,
    pub mirror_fraction: f64,
    /// How the answers of a pair are compared.
    pub compare: Comparison,
    pub drain_timeout: Duration,
    pub machines: Vec<ValidMachine>,
}

impl ValidConfig {
    /// Every check, with machine names resolved here, blocking: for the process config at start
    /// (a push resolves through [`CheckedConfig::resolve`] instead).
    pub(crate) fn new(config: &BalancerConfig) -> Result<Self, ConfigError> {
        CheckedConfig::new(config)?.resolve_blocking()
    }
}

/// A [`BalancerConfig`] that passed every check except resolving the machines given by name
/// (`host:port`): a push checks its service and version on it first, so that only a config about
/// to be applied makes the balancer look a name up.
#[derive(Debug)]
pub(crate) struct CheckedConfig {
    /// Machines given by name hold an unspecified address until resolved.
    config: ValidConfig,
    /// (machine index, `host:port`) of the machines given by name.
    names: Vec<(usize, String)>,
}

/// One machine entry checked; true when its address is a name still to resolve (the address
/// is then unspecified, with the port). `ids` collects the ids seen so far.
fn check_machine<'a>(
    m: &'a understudy_wire::MachineEntry,
    ids: &mut HashSet<&'a str>,
) -> Result<(ValidMachine, bool), ConfigError> {
    if m.id.trim().is_empty() {
        return Err(ConfigError::invalid("id", "empty machine id"));
    }
    if !ids.insert(m.id.as_str()) {
        return Err(ConfigError::invalid(
            "id",
            format!("duplicate machine id {:?}", m.id),
        ));
    }
    if m.version.trim().is_empty() {
        return Err(ConfigError::invalid("version", "empty version"));
    }
    let (address, by_name) = match parse_address(&m.address)
        .map_err(|problem| ConfigError::invalid("address", problem))?
    {
        Address::Ip(address) => (address, false),
        Address::Name(port) => (SocketAddr::from(([0, 0, 0, 0], port)), true),
    };
    if !WEIGHT_RANGE.contains(&m.weight) {
        return Err(ConfigError::invalid(
            "weight",
            format!(
                "{} is outside {}..={}",
                m.weight,
                WEIGHT_RANGE.start(),
                WEIGHT_RANGE.end()
            ),
        ));
    }
    let health_path = match &m.health_path {
        Some(path) => Some(
            check_health_path(path)
                .map_err(|problem| ConfigError::invalid("health_path", problem))?
                .into(),
        ),
        None => None,
    };
    let machine = ValidMachine {
        id: m.id.as_str().into(),
        version: m.version.as_str().into(),
        address,
        weight: m.weight,
        role: m.config,
        health_path,
    };
    Ok((machine, by_name))
}

impl CheckedConfig {
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
        let compare = Comparison {
            mode: config
                .compare_mode()
                .map_err(|problem| ConfigError::invalid("compare", problem))?,
            headers: check_compare_headers(&config.compare_headers)
                .map_err(|problem| ConfigError::invalid("compare_headers", problem))?
                .into(),
        };
        let mut ids = HashSet::new();
        let mut machines = Vec::with_capacity(config.machines.len());
        let mut names = Vec::new();
        for (i, m) in config.machines.iter().enumerate() {
            let (machine, by_name) =
                check_machine(m, &mut ids).map_err(|e| e.within(&format!("machines[{i}]")))?;
            if by_name {
                names.push((i, m.address.clone()));
            }
            machines.push(machine);
        }
        if !machines.iter().any(|m| m.role == PoolRole::Active) {
            return Err(ConfigError::invalid(
                "machines",
                "the active pool is empty: at least one machine needs config = \"active\"",
            ));
        }
        let config = ValidConfig {
            raw: config.clone(),
            service: config.service.as_str().into(),
            version: config.version,
            mirror_fraction: config.mirror_fraction,
            compare,
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            machines,
        };
        Ok(CheckedConfig { config, names })
    }

    pub(crate) fn service(&self) -> &str {
        &self.config.service
    }

    pub(crate) fn version(&self) -> u64 {
        self.config.version
    }

    fn resolve_blocking(mut self) -> Result<ValidConfig, ConfigError> {
        for (i, name) in std::mem::take(&mut self.names) {
            let found = name.to_socket_addrs().map(|mut a| a.next());
            self.set_address(i, &name, found)?;
        }
        Ok(self.config)
    }

    /// Resolves the machine names on tokio's blocking pool, all within `deadline`: a name that
    /// does not resolve in time is refused like a bad address, and the admin endpoint's runtime
    /// (one thread, shared with the session sweeper and the config feed) never waits on a lookup.
    pub(crate) async fn resolve(self, deadline: Duration) -> Result<ValidConfig, ConfigError> {
        self.resolve_with(deadline, |name| async move {
            tokio::net::lookup_host(name).await.map(|mut a| a.next())
        })
        .await
    }

    async fn resolve_with<F, Fut>(
        mut self,
        deadline: Duration,
        lookup: F,
    ) -> Result<ValidConfig, ConfigError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<Option<SocketAddr>>>,
    {
        let until = tokio::time::Instant::now() + deadline;
        for (i, name) in std::mem::take(&mut self.names) {
            let found = match tokio::time::timeout_at(until, lookup(name.clone())).await {
                Ok(found) => found,
                Err(_) => {
                    let problem = format!("{name:?} did not resolve within {deadline:?}");
                    return Err(ConfigError::invalid(
                        format!("machines[{i}].address"),
                        problem,
                    ));
                }
            };
            self.set_address(i, &name, found)?;
        }
        Ok(self.config)
    }

    fn set_address(
        &mut self,
        i: usize,
        name: &str,
        found: std::io::Result<Option<SocketAddr>>,
    ) -> Result<(), ConfigError> {
        let field = format!("machines[{i}].address");
        let address = match found {
            Ok(Some(address)) => address,
            Ok(None) => {
                return Err(ConfigError::invalid(
                    field,
                    format!("{name:?} has no address"),
                ))
            }
            Err(e) => {
                return Err(ConfigError::invalid(
                    field,
                    format!("{name:?} does not resolve: {e}"),
                ))
            }
        };
        let address = check_port(name, address).map_err(|p| ConfigError::invalid(&field, p))?;
        self.config.machines[i].address = address;
        Ok(())
    }
}

/// A machine's address as pushed: an `ip:port`, or a `host:port` whose name is resolved once
/// when the config is applied (the data plane never resolves names per job).
enum Address {
    Ip(SocketAddr),
    /// The port of a `host:port`.
    Name(u16),
}

fn parse_address(text: &str) -> Result<Address, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return check_port(text, addr).map(Address::Ip);
    }
    let bad = || format!("{text:?} is not a host:port address");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if !is_host_name(host) {
        return Err(format!(
            "{text:?} is not a host:port address (host: an IP address or a DNS name)"
        ));
    }
    if port == 0 {
        return Err(format!("{text:?} has port 0"));
    }
    Ok(Address::Name(port))
}

/// A DNS name (letters, digits, `-` and `_` in labels of 1..=63, 253 at most, a final dot
/// allowed): anything else is refused before it reaches the resolver.
fn is_host_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn check_port(text: &str, addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err(format!("{text:?} has port 0"));
    }
    Ok(addr)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_wire::MachineEntry;

    fn machine(id: &str, role: PoolRole) -> MachineEntry {
        MachineEntry {
            id: id.into(),
            version: "v1".into(),
            address: "127.0.0.1:9".into(),
            weight: 100,
            config: role,
            health_path: None,
        }
    }

    fn config() -> BalancerConfig {
        BalancerConfig {
            service: "media".into(),
            version: 1,
            epoch: 0,
            mirror_fraction: 1.0,
            compare_body: false,
            compare: None,
            compare_headers: Vec::new(),
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

    fn named(address: &str) -> BalancerConfig {
        let mut c = config();
        c.machines[1].address = address.into();
        c
    }

    #[tokio::test]
    async fn a_name_is_resolved_within_the_deadline_or_refused_by_field() {
        let never = |_: String| std::future::pending::<std::io::Result<Option<SocketAddr>>>();
        let checked = CheckedConfig::new(&named("slow.example:80")).unwrap();
        let started = std::time::Instant::now();
        let err = checked
            .resolve_with(Duration::from_millis(50), never)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.to_string().contains("did not resolve within"), "{err}");
        assert_eq!(field_of(err), "machines[1].address");

        let found = |_: String| async { Ok(Some("10.0.0.7:80".parse().unwrap())) };
        let checked = CheckedConfig::new(&named("media-2.internal:80")).unwrap();
        let valid = checked
            .resolve_with(Duration::from_secs(1), found)
            .await
            .unwrap();
        assert_eq!(valid.machines[1].address, "10.0.0.7:80".parse().unwrap());
        // An IP address is never looked up.
        let checked = CheckedConfig::new(&config()).unwrap();
        let valid = checked.resolve_with(Duration::ZERO, never).await.unwrap();
        assert_eq!(valid, ValidConfig::new(&config()).unwrap());
    }

    #[test]
    fn a_host_that_is_not_a_dns_name_never_reaches_the_resolver() {
        for address in [
            "a b:80", "a/b:80", "-a:80", "a..b:80", "💥:80", "a\0:80", ":80",
        ] {
            let err = CheckedConfig::new(&named(address)).unwrap_err();
            assert_eq!(field_of(err), "machines[1].address", "{address:?}");
        }
        for address in [
            "media-2:80",
            "media_2.svc.cluster.local.:8080",
            "localhost:1",
        ] {
            assert!(CheckedConfig::new(&named(address)).is_ok(), "{address:?}");
        }
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
    fn the_comparison_is_read_in_either_form_and_checked() {
        use understudy_wire::CompareMode;
        let mode = |compare_body: bool, compare: Option<CompareMode>| {
            let mut c = config();
            c.compare_body = compare_body;
            c.compare = compare;
            ValidConfig::new(&c).map(|v| v.compare.mode)
        };
        assert_eq!(mode(false, None).unwrap(), CompareMode::Status);
        assert_eq!(mode(true, None).unwrap(), CompareMode::Body);
        assert_eq!(
            mode(true, Some(CompareMode::Body)).unwrap(),
            CompareMode::Body
        );
        let fields = Some(CompareMode::Fields);
        assert_eq!(mode(false, fields).unwrap(), CompareMode::Fields);
        let err = mode(true, fields).unwrap_err().to_string();
        assert!(
            err.contains("compare") && err.contains("compare_body"),
            "{err}"
        );
        // An old controller's JSON (compare_body only) still reads.
        let old: BalancerConfig = serde_json::from_value(serde_json::json!({
            "service": "media", "version": 1, "compare_body": true,
            "machines": [{"id": "a", "version": "v1", "address": "127.0.0.1:9", "config": "active"}]
        }))
        .unwrap();
        assert_eq!(old.compare_mode(), Ok(CompareMode::Body));
        let mut c = config();
        c.compare = fields;
        c.compare_headers = vec!["ETag".into(), "X-Version".into()];
        let valid = ValidConfig::new(&c).unwrap();
        assert_eq!(&*valid.compare.headers, ["etag", "x-version"]);
        c.compare_headers = vec!["bad header".into()];
        let err = ValidConfig::new(&c).unwrap_err().to_string();
        assert!(err.contains("compare_headers"), "{err}");
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
            internal_listen: None,
            epoch_file: None,
            config: config(),
        };
        let mut bad = spec.clone();
        bad.config.machines[0].weight = 0;
        let process = ProcessConfig {
            admin: "127.0.0.1:0".parse().unwrap(),
            trust: TrustSpec::default(),
            limits: LimitsSpec::default(),
            balancers: vec![spec.clone(), bad],
        };
        assert_eq!(
            field_of(process.validate().unwrap_err()),
            "balancers[1].config.machines[0].weight"
        );
        let twice = ProcessConfig {
            admin: "127.0.0.1:0".parse().unwrap(),
            trust: TrustSpec::default(),
            limits: LimitsSpec::default(),
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
            trust: TrustSpec {
                internal_sources: vec!["10.0.0.0/8".parse().unwrap()],
                marker_max_age_ms: 5_000,
            },
            limits: LimitsSpec {
                max_sessions: 7,
                ..LimitsSpec::default()
            },
            balancers: vec![BalancerSpec {
                listen: "127.0.0.1:0".parse().unwrap(),
                internal_listen: Some("127.0.0.1:0".parse().unwrap()),
                epoch_file: None,
                config: config(),
            }],
        };
        let text = toml::to_string(&process).unwrap();
        assert_eq!(ProcessConfig::from_toml_str(&text).unwrap(), process);
    }
}
