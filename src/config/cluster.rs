//! The cluster model: services, their dependencies, machines, balancers and joining conditions.
//!
//! [`ClusterSpec`] is the TOML form (standalone in a cluster file, or the same tables embedded in a
//! scenario file); [`Cluster::from_spec`] validates it into typed values. Every error names the file,
//! the line and the field; a dependency cycle names the services on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::config::source::{ConfigError, Source};
use crate::config::store::{LeaseSettings, PgTarget, StoreLocation};
use crate::config::toml_spans::Spanned;
use serde::Deserialize;
use understudy_judge::Condition;
use understudy_wire::{check_compare_headers, resolve_compare, CompareMode, PoolRole};

/// Whole cluster file. A scenario file may embed [`ServiceSpec`], [`MachineSpec`], [`DefaultsSpec`] and
/// [`ControllerSpec`] under the same keys and assemble a `ClusterSpec` itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default)]
    pub controller: ControllerSpec,
    #[serde(default)]
    pub defaults: DefaultsSpec,
    #[serde(default)]
    pub services: BTreeMap<String, Spanned<ServiceSpec>>,
    #[serde(default)]
    pub machines: Vec<Spanned<MachineSpec>>,
    /// `[hub]`: the state channel's backend and limits (src/runtime/hub.rs).
    #[serde(default)]
    pub hub: crate::config::hub::HubSpec,
    /// `[predict]`: predictive monitoring (src/runtime/predictions.rs).
    #[serde(default)]
    pub predict: Option<Spanned<crate::config::predict::PredictSection>>,
    /// `[monitor]`: the monitor loop's when/then rules (src/runtime/monitor.rs).
    #[serde(default)]
    pub monitor: Option<Spanned<crate::config::monitor::MonitorSection>>,
    /// `[notify]`: webhooks told of every rollout phase change (src/runtime/notify.rs).
    #[serde(default)]
    pub notify: Option<Spanned<crate::config::notify::NotifySpec>>,
}

/// `[controller]`: where the controller listens and keeps its state.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSpec {
    /// `host:port` of the admin endpoint (default 127.0.0.1:7070).
    pub admin_addr: Option<Spanned<String>>,
    /// SQLite file (default `understudy.db` beside the working directory).
    pub database: Option<PathBuf>,
    /// A store shared by several controllers instead: `postgres://user@host:port/database`.
    pub store: Option<Spanned<String>>,
    /// The lease period in milliseconds (default 10000 with a shared store; a SQLite store has
    /// no lease unless given one).
    pub lease_ms: Option<Spanned<u64>>,
    /// This controller's name in the lease (default: host name and process id).
    pub name: Option<Spanned<String>>,
    /// The admin URL standbys send callers to while this controller leads.
    pub advertise_url: Option<Spanned<String>>,
    /// Admin bearer token; `UNDERSTUDY_TOKEN` overrides it. It acts as the operator `ops`.
    pub token: Option<String>,
    /// Operators by name: a file of names and SHA-256 digests of their tokens
    /// (src/config/operators.rs), relative to this file.
    pub operators_file: Option<Spanned<PathBuf>>,
    /// Reconcile period in milliseconds (default 500).
    pub tick_ms: Option<Spanned<u64>>,
}

/// `[defaults]`: what a service does not say itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    pub requires_approval: Option<bool>,
    pub approvers: Option<Spanned<u8>>,
    pub approval_ttl_ms: Option<Spanned<u64>>,
    pub join_steps: Option<Spanned<Vec<u32>>>,
    pub join_step_ms: Option<u64>,
    pub simulation_timeout_ms: Option<u64>,
    pub mirror_fraction: Option<Spanned<f64>>,
    /// Copies steered by the evidence within a budget, instead of `mirror_fraction`.
    pub mirror_budget: Option<Spanned<MirrorBudgetSpec>>,
    /// The older form of `compare = "body"`.
    pub compare_body: Option<bool>,
    /// How copies' answers are compared: `status`, `body` or `fields`.
    pub compare: Option<Spanned<CompareMode>>,
    /// Answer headers compared as fields (`header:NAME`) in `fields` mode.
    pub compare_headers: Option<Spanned<Vec<String>>>,
    pub drain_timeout_ms: Option<u64>,
    pub condition: Option<Spanned<Condition>>,
}

/// `[services.NAME]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Services this one calls: they are released before it.
    #[serde(default)]
    pub depends_on: Vec<Spanned<String>>,
    /// Base URL of the balancer admin port fronting this service (`http://127.0.0.1:9100`).
    /// May be left out in a scenario file and set once the balancer is up.
    pub balancer: Option<String>,
    pub requires_approval: Option<bool>,
    /// How many distinct operators must approve (1 or 2; with `requires_approval`).
    pub approvers: Option<Spanned<u8>>,
    /// How long an approval stays good: the evidence it names must have been shown within it,
    /// and a first approval waits that long for a second (default 15 minutes).
    pub approval_ttl_ms: Option<Spanned<u64>>,
    /// v2's share of new sessions, in percent, at each joining step (each below 100).
    pub join_steps: Option<Spanned<Vec<u32>>>,
    /// How long each joining step is held.
    pub join_step_ms: Option<u64>,
    /// Give up (roll back) when the judge still lacks data after this long; none by default.
    pub simulation_timeout_ms: Option<u64>,
    pub mirror_fraction: Option<Spanned<f64>>,
    /// Copies steered by the evidence within a budget (src/core/mirror.rs), instead of a fixed
    /// `mirror_fraction`.
    pub mirror_budget: Option<Spanned<MirrorBudgetSpec>>,
    /// The older form of `compare = "body"`.
    pub compare_body: Option<bool>,
    /// How copies' answers are compared: `status` (default), `body` (and a digest of the body)
    /// or `fields` (JSON field by field, see docs/judge.md).
    pub compare: Option<Spanned<CompareMode>>,
    /// Answer headers compared as fields (`header:NAME`) in `fields` mode (at most 16).
    pub compare_headers: Option<Spanned<Vec<String>>>,
    pub drain_timeout_ms: Option<u64>,
    pub condition: Option<Spanned<Condition>>,
    /// Signed configs: file holding the balancer's secret key (base64), relative to this file;
    /// every config pushed to that balancer is signed with it (docs/balancer.md).
    pub balancer_key_file: Option<Spanned<PathBuf>>,
    /// How signed configs reach the balancer: `http` (PUT, default) or `hub`.
    pub config_delivery: Option<crate::config::balancer::ConfigDelivery>,
}

/// `mirror_budget` of a service or of `[defaults]`: how far the controller may raise the copy
/// rate while the judge's tests are open, and what it keeps once they decided.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorBudgetSpec {
    /// The most copies per second each simulation version (v2, the A/A control) should take.
    pub copies_per_second: Spanned<f64>,
    /// The largest share of callers' jobs ever copied (default 1.0).
    pub max_fraction: Option<Spanned<f64>>,
    /// The share copied once the judge decided while the rollout waits (approval), so the
    /// judging goes on; also the least copied while tests are open (default 0.05, at most
    /// `max_fraction`).
    pub watch_fraction: Option<Spanned<f64>>,
}

/// A validated mirror budget (see [`MirrorBudgetSpec`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MirrorBudget {
    pub copies_per_second: f64,
    pub max_fraction: f64,
    pub watch_fraction: f64,
}

/// `watch_fraction` unless written (bounded by `max_fraction`).
pub const DEFAULT_WATCH_FRACTION: f64 = 0.05;

/// `[[machines]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    pub id: Spanned<String>,
    pub service: Spanned<String>,
    pub version: Spanned<String>,
    pub address: Spanned<String>,
    /// `active` serves callers; `simulation` receives mirrored copies only. A simulation machine of the
    /// service's current version is an A/A control; one of another version is a release candidate.
    pub config: PoolRole,
    pub weight: Option<Spanned<u32>>,
    /// Path the balancer probes with `GET` (else it probes with a TCP connect).
    pub health_path: Option<Spanned<String>>,
}

/// How a service's rollout proceeds.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPolicy {
    pub requires_approval: bool,
    /// Distinct operators whose approvals it takes (1 or 2).
    pub approvers: u8,
    pub approval_ttl: Duration,
    /// v2 share in percent per joining step; empty = one step at the declared weights.
    pub join_steps: Vec<u32>,
    pub join_step: Duration,
    pub simulation_timeout: Option<Duration>,
}

impl RolloutPolicy {
    /// Number of joining steps (at least one).
    pub fn step_count(&self) -> u32 {
        self.join_steps.len().max(1) as u32
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub depends_on: Vec<String>,
    pub balancer: Option<String>,
    pub policy: RolloutPolicy,
    pub condition: Condition,
    /// The share of callers' jobs copied while the service's rollout is judged; with a
    /// `mirror_budget`, the most ever copied (the controller steers below it).
    pub mirror_fraction: f64,
    /// Set: the copy rate follows the evidence within it (src/core/mirror.rs).
    pub mirror_budget: Option<MirrorBudget>,
    /// How copies' answers are compared.
    pub compare: CompareMode,
    /// Lower-case header names compared as fields (`fields` mode).
    pub compare_headers: Vec<String>,
    pub drain_timeout: Duration,
    /// Version of the active machines declared in the file.
    pub declared_version: String,
    /// The balancer's key: configs pushed to it are signed (none: plain configs).
    pub balancer_key: Option<crate::config::balancer::BalancerSecret>,
    pub config_delivery: crate::config::balancer::ConfigDelivery,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub id: String,
    pub service: String,
    pub version: String,
    pub address: String,
    pub weight: u32,
    pub config: PoolRole,
    /// Probed by the balancer with `GET`; `None`: a TCP connect.
    pub health_path: Option<String>,
}

/// Controller settings with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerSettings {
    pub admin_addr: std::net::SocketAddr,
    pub store: crate::config::store::StoreLocation,
    /// The lease controllers sharing the store hold to lead; none: this one always leads.
    pub lease: Option<crate::config::store::LeaseSettings>,
    pub token: Option<String>,
    /// Operators named in `operators_file` (the single token is added where it is read).
    pub operators: crate::config::operators::Operators,
    pub tick: Duration,
}

/// A validated cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub controller: ControllerSettings,
    pub services: BTreeMap<String, Service>,
    pub machines: Vec<Machine>,
    pub hub: crate::config::hub::HubSettings,
    pub predict: crate::config::predict::PredictionSettings,
    /// The monitor's rules (the standard ones when the file has no `[monitor]`).
    pub monitor: understudy_hub::Rules,
    /// The webhooks told of phase changes (none when the file has no `[notify]`).
    pub notify: crate::config::notify::NotifySettings,
}

/// Reads and validates a cluster file.
pub fn load_file(path: &Path) -> Result<Cluster, ConfigError> {
    let (file, text) = read_file(path)?;
    parse(&file, &text)
}

/// A config file's name (for errors) and text.
pub fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    Ok((file, text))
}

/// Parses and validates cluster TOML text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Cluster, ConfigError> {
    let source = Source { file, text };
    let spec: ClusterSpec = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
    Cluster::from_spec(spec, &source)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

const NAME_RULE: &str = "must be 1-64 characters of a-z, 0-9, '-' or '_'";

/// One `[services.NAME]` table checked, its defaults applied. The second value is a problem
/// reported only if the file has no dependency cycle (the more fundamental error).
fn service_from_spec(
    name: &str,
    spanned: &Spanned<ServiceSpec>,
    spec: &ClusterSpec,
    machines: &[Machine],
    source: &Source<'_>,
) -> Result<(Service, Option<ConfigError>), ConfigError> {
    let at = spanned.span().start;
    let s = spanned.get_ref();
    let defaults = &spec.defaults;
    if !valid_name(name) {
        return Err(source.invalid(at, format!("services.{name}"), NAME_RULE));
    }
    let depends_on = depends_on_of(name, s, spec, source)?;
    let (mirror_fraction, mirror_budget) = mirror_of(name, s, defaults, source)?;
    let condition = condition_of(name, s, defaults, source)?;
    let (compare, compare_headers) = compare_of(name, at, s, defaults, source)?;
    let balancer_key = balancer_of(name, at, s, source)?;
    let (declared_version, problem) = match declared_version_of(name, machines) {
        Ok(version) => (version, None),
        Err(problem) => (
            String::new(),
            Some(source.invalid(at, format!("services.{name}"), problem)),
        ),
    };
    let service = Service {
        name: name.to_string(),
        depends_on,
        balancer: s
            .balancer
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_string()),
        policy: policy_of(name, s, defaults, source)?,
        condition,
        mirror_fraction,
        mirror_budget,
        compare,
        compare_headers,
        drain_timeout: Duration::from_millis(
            s.drain_timeout_ms
                .or(defaults.drain_timeout_ms)
                .unwrap_or(30_000),
        ),
        declared_version,
        balancer_key,
        config_delivery: s.config_delivery.unwrap_or_default(),
    };
    Ok((service, problem))
}

/// The service's judging condition (its own, else the default one), checked.
fn condition_of(
    name: &str,
    s: &ServiceSpec,
    defaults: &DefaultsSpec,
    source: &Source<'_>,
) -> Result<Condition, ConfigError> {
    let Some(c) = s.condition.as_ref().or(defaults.condition.as_ref()) else {
        return Ok(Condition::default());
    };
    c.get_ref().validate().map_err(|e| {
        source.invalid(
            c.span().start,
            format!("services.{name}.condition"),
            e.to_string(),
        )
    })?;
    Ok(c.get_ref().clone())
}

/// The balancer fields checked together: its URL, its key, and how configs reach it (the hub
/// delivers signed configs only, so `hub` needs a key). Gives the key.
fn balancer_of(
    name: &str,
    at: usize,
    s: &ServiceSpec,
    source: &Source<'_>,
) -> Result<Option<crate::config::balancer::BalancerSecret>, ConfigError> {
    if let Some(url) = &s.balancer {
        check_balancer_url(url)
            .map_err(|reason| source.invalid(at, format!("services.{name}.balancer"), reason))?;
    }
    let balancer_key = balancer_key_of(name, s, source)?;
    if s.config_delivery == Some(crate::config::balancer::ConfigDelivery::Hub)
        && balancer_key.is_none()
    {
        return Err(source.invalid(
            at,
            format!("services.{name}.config_delivery"),
            "\"hub\" needs balancer_key_file: the balancer takes only signed configs from the hub",
        ));
    }
    Ok(balancer_key)
}

/// How long an approval stays good unless the service says otherwise.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(15 * 60);

/// The rollout policy: the service's own settings, else `[defaults]`, else the built-in ones.
fn policy_of(
    name: &str,
    s: &ServiceSpec,
    defaults: &DefaultsSpec,
    source: &Source<'_>,
) -> Result<RolloutPolicy, ConfigError> {
    let approvers = source.in_range(
        s.approvers.as_ref().or(defaults.approvers.as_ref()),
        format!("services.{name}.approvers"),
        1..=2,
        1,
    )?;
    let ttl_ms = source.in_range(
        s.approval_ttl_ms
            .as_ref()
            .or(defaults.approval_ttl_ms.as_ref()),
        format!("services.{name}.approval_ttl_ms"),
        1_000..=86_400_000,
        DEFAULT_APPROVAL_TTL.as_millis() as u64,
    )?;
    let approval_ttl = Duration::from_millis(ttl_ms);
    Ok(RolloutPolicy {
        requires_approval: s
            .requires_approval
            .or(defaults.requires_approval)
            .unwrap_or(false),
        approvers,
        approval_ttl,
        join_steps: join_steps_of(name, s, defaults, source)?,
        join_step: Duration::from_millis(s.join_step_ms.or(defaults.join_step_ms).unwrap_or(1_000)),
        simulation_timeout: s
            .simulation_timeout_ms
            .or(defaults.simulation_timeout_ms)
            .map(Duration::from_millis),
    })
}

/// The share of jobs copied while the service is judged, within (0, 1].
fn mirror_fraction_of(
    name: &str,
    s: &ServiceSpec,
    defaults: &DefaultsSpec,
    source: &Source<'_>,
) -> Result<f64, ConfigError> {
    match s
        .mirror_fraction
        .as_ref()
        .or(defaults.mirror_fraction.as_ref())
    {
        Some(f) if !(0.0..=1.0).contains(f.get_ref()) || *f.get_ref() == 0.0 => Err(source
            .invalid(
                f.span().start,
                format!("services.{name}.mirror_fraction"),
                "must be within (0, 1]",
            )),
        Some(f) => Ok(*f.get_ref()),
        None => Ok(1.0),
    }
}

/// How much is copied while the service is judged: a fixed share, or a budget the controller
/// steers within. The service's own setting (either) wins over `[defaults]`; one table setting
/// both is refused.
fn mirror_of(
    name: &str,
    s: &ServiceSpec,
    defaults: &DefaultsSpec,
    source: &Source<'_>,
) -> Result<(f64, Option<MirrorBudget>), ConfigError> {
    let tables = [
        (
            &s.mirror_fraction,
            &s.mirror_budget,
            format!("services.{name}"),
        ),
        (
            &defaults.mirror_fraction,
            &defaults.mirror_budget,
            "defaults".to_string(),
        ),
    ];
    for (fraction, budget, table) in &tables {
        if let (Some(_), Some(b)) = (fraction, budget) {
            return Err(source.invalid(
                b.span().start,
                format!("{table}.mirror_budget"),
                "set either `mirror_fraction` or `mirror_budget`, not both: a budget steers the fraction itself",
            ));
        }
    }
    let own = s.mirror_fraction.is_some() || s.mirror_budget.is_some();
    let budget = if own {
        &s.mirror_budget
    } else {
        &defaults.mirror_budget
    };
    match budget {
        Some(b) => {
            let budget = mirror_budget_of(name, b.get_ref(), source)?;
            Ok((budget.max_fraction, Some(budget)))
        }
        None => Ok((mirror_fraction_of(name, s, defaults, source)?, None)),
    }
}

/// How the service's copies are compared: its own `compare` / `compare_body` (the same setting
/// in two forms, which must agree), else `[defaults]`'s; and the headers compared as fields.
fn compare_of(
    name: &str,
    at: usize,
    s: &ServiceSpec,
    defaults: &DefaultsSpec,
    source: &Source<'_>,
) -> Result<(CompareMode, Vec<String>), ConfigError> {
    let own = s.compare.is_some() || s.compare_body.is_some();
    let (table, compare, compare_body) = if own {
        (format!("services.{name}"), &s.compare, s.compare_body)
    } else {
        (
            "defaults".to_string(),
            &defaults.compare,
            defaults.compare_body,
        )
    };
    let place = compare.as_ref().map_or(at, |c| c.span().start);
    let mode = resolve_compare(
        compare_body.unwrap_or(false),
        compare.as_ref().map(|c| *c.get_ref()),
    )
    .map_err(|problem| source.invalid(place, format!("{table}.compare"), problem))?;
    let (table, headers) = match (&s.compare_headers, &defaults.compare_headers) {
        (Some(h), _) => (format!("services.{name}"), Some(h)),
        (None, h) => ("defaults".to_string(), h.as_ref()),
    };
    let headers = match headers {
        Some(h) => check_compare_headers(h.get_ref()).map_err(|problem| {
            source.invalid(h.span().start, format!("{table}.compare_headers"), problem)
        })?,
        None => Vec::new(),
    };
    Ok((mode, headers))
}

/// A mirror budget checked field by field.
fn mirror_budget_of(
    name: &str,
    b: &MirrorBudgetSpec,
    source: &Source<'_>,
) -> Result<MirrorBudget, ConfigError> {
    let field = |key: &str| format!("services.{name}.mirror_budget.{key}");
    let copies_per_second = source.in_range(
        Some(&b.copies_per_second),
        field("copies_per_second"),
        0.001..=1e9,
        0.0,
    )?;
    let max_fraction = source.in_range(
        b.max_fraction.as_ref(),
        field("max_fraction"),
        0.0001..=1.0,
        1.0,
    )?;
    let watch_fraction = source.in_range(
        b.watch_fraction.as_ref(),
        field("watch_fraction"),
        0.0001..=max_fraction,
        DEFAULT_WATCH_FRACTION.min(max_fraction),
    )?;
    Ok(MirrorBudget {
        copies_per_second,
        max_fraction,
        watch_fraction,
    })
}

/// The services `name` depends on: known, not itself, each once.
fn depends_on_of(
    name: &str,
    s: &ServiceSpec,
    spec: &ClusterSpec,
    source: &Source<'_>,
) -> Result<Vec<String>, ConfigError> {
    let mut depends_on = Vec::new();
    for dep in &s.depends_on {
        let dep_name = dep.get_ref();
        if !spec.services.contains_key(dep_name) {
            return Err(source.invalid(
                dep.span().start,
                format!("services.{name}.depends_on"),
                format!("unknown service `{dep_name}`"),
            ));
        }
        if dep_name == name {
            return Err(ConfigError::Cycle {
                file: source.file.to_string(),
                services: vec![name.to_string(), name.to_string()],
            });
        }
        if !depends_on.contains(dep_name) {
            depends_on.push(dep_name.clone());
        }
    }
    Ok(depends_on)
}

/// v2's share at each joining step: strictly increasing percentages within 1..=99.
fn join_steps_of(
    name: &str,
    s: &ServiceSpec,
    defaults: &DefaultsSpec,
    source: &Source<'_>,
) -> Result<Vec<u32>, ConfigError> {
    let Some(steps) = s.join_steps.as_ref().or(defaults.join_steps.as_ref()) else {
        return Ok(Vec::new());
    };
    let list = steps.get_ref();
    let increasing = list.windows(2).all(|w| w[0] < w[1]);
    if list.iter().any(|p| *p == 0 || *p >= 100) || !increasing {
        return Err(source.invalid(
            steps.span().start,
            format!("services.{name}.join_steps"),
            "percentages must increase strictly, each within 1..=99",
        ));
    }
    Ok(list.clone())
}

/// The balancer's key, read from its file (a relative path is beside the cluster file).
fn balancer_key_of(
    name: &str,
    s: &ServiceSpec,
    source: &Source<'_>,
) -> Result<Option<crate::config::balancer::BalancerSecret>, ConfigError> {
    let Some(file) = &s.balancer_key_file else {
        return Ok(None);
    };
    let path = Path::new(source.file)
        .parent()
        .unwrap_or(Path::new(""))
        .join(file.get_ref());
    crate::config::balancer::BalancerSecret::from_file(&path)
        .map(Some)
        .map_err(|reason| {
            source.invalid(
                file.span().start,
                format!("services.{name}.balancer_key_file"),
                reason,
            )
        })
}

/// The one version the service's active machines run.
fn declared_version_of(name: &str, machines: &[Machine]) -> Result<String, String> {
    let active_versions: BTreeSet<&str> = machines
        .iter()
        .filter(|m| m.service == name && m.config == PoolRole::Active)
        .map(|m| m.version.as_str())
        .collect();
    match active_versions.len() {
        1 => Ok(active_versions
            .into_iter()
            .next()
            .unwrap_or_default()
            .to_string()),
        0 => Err("needs at least one machine with config = \"active\"".to_string()),
        _ => Err(format!(
            "active machines run several versions ({}): the active configuration must run one",
            active_versions.into_iter().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// One `[[machines]]` entry checked: names, a known service, an address given once, a weight,
/// a health path the balancer can write into a request line.
fn machine_from_spec<'s>(
    index: usize,
    m: &'s MachineSpec,
    spec: &ClusterSpec,
    source: &Source<'_>,
    ids: &mut BTreeSet<String>,
    addresses: &mut BTreeMap<&'s str, &'s str>,
) -> Result<Machine, ConfigError> {
    let at = |s: &Spanned<String>| s.span().start;
    let field = |name: &str| format!("machines[{index}].{name}");
    if !valid_name(m.id.get_ref()) {
        return Err(source.invalid(at(&m.id), field("id"), NAME_RULE));
    }
    if !ids.insert(m.id.get_ref().clone()) {
        return Err(source.invalid(
            at(&m.id),
            field("id"),
            format!("machine `{}` is declared twice", m.id.get_ref()),
        ));
    }
    if !spec.services.contains_key(m.service.get_ref()) {
        return Err(source.invalid(
            at(&m.service),
            field("service"),
            format!("unknown service `{}`", m.service.get_ref()),
        ));
    }
    if !valid_name(m.version.get_ref()) {
        return Err(source.invalid(at(&m.version), field("version"), NAME_RULE));
    }
    if m.address.get_ref().parse::<std::net::SocketAddr>().is_err()
        && !m.address.get_ref().contains(':')
    {
        return Err(source.invalid(at(&m.address), field("address"), "expected host:port"));
    }
    // One process answering as two machines would be counted, judged and retired twice.
    if let Some(first) = addresses.insert(m.address.get_ref(), m.id.get_ref()) {
        return Err(source.invalid(
            at(&m.address),
            field("address"),
            format!(
                "`{}` is already the address of machine `{first}`: a machine is declared once",
                m.address.get_ref()
            ),
        ));
    }
    let weight = match &m.weight {
        Some(w) if !(1..=1000).contains(w.get_ref()) => {
            return Err(source.invalid(w.span().start, field("weight"), "must be within 1..=1000"))
        }
        Some(w) => *w.get_ref(),
        None => 100,
    };
    let health_path = match &m.health_path {
        Some(path) => Some(
            understudy_wire::check_health_path(path.get_ref())
                .map_err(|problem| {
                    source.invalid(path.span().start, field("health_path"), problem)
                })?
                .to_string(),
        ),
        None => None,
    };
    Ok(Machine {
        id: m.id.get_ref().clone(),
        service: m.service.get_ref().clone(),
        version: m.version.get_ref().clone(),
        address: m.address.get_ref().clone(),
        weight,
        config: m.config,
        health_path,
    })
}

impl Cluster {
    /// Validates a spec; `source` names the file and locates lines (spans refer to its text).
    pub fn from_spec(spec: ClusterSpec, source: &Source<'_>) -> Result<Cluster, ConfigError> {
        let controller = controller_settings(&spec.controller, source)?;
        let hub = crate::config::hub::HubSettings::from_spec(&spec.hub, source)?;
        let predict = match &spec.predict {
            Some(section) => section.get_ref().validate().map_err(|e| {
                let field = format!("predict.{}", e.field);
                let path = crate::config::toml_spans::parse_path(&field);
                source.invalid_near(field, &path, section.span().start, e.reason)
            })?,
            None => crate::config::predict::PredictionSettings::default(),
        };
        let monitor = match &spec.monitor {
            Some(section) => section
                .get_ref()
                .validate(section.span().start, source, |name| {
                    spec.services.contains_key(name)
                })?,
            None => understudy_hub::Rules::standard(),
        };
        let notify = match &spec.notify {
            Some(section) => {
                crate::config::notify::NotifySettings::from_spec(section.get_ref(), source)?
            }
            None => crate::config::notify::NotifySettings::default(),
        };
        let defaults = &spec.defaults;
        if let Some(c) = &defaults.condition {
            c.get_ref()
                .validate()
                .map_err(|e| source.invalid(c.span().start, "defaults.condition", e.to_string()))?;
        }
        if spec.services.is_empty() {
            return Err(source.invalid(0, "services", "at least one service is required"));
        }

        // Versions of the active machines per service, checked below once machines are read.
        let mut machines = Vec::with_capacity(spec.machines.len());
        let mut ids = BTreeSet::new();
        let mut addresses: BTreeMap<&str, &str> = BTreeMap::new();
        for (index, m) in spec.machines.iter().enumerate() {
            machines.push(machine_from_spec(
                index,
                m.get_ref(),
                &spec,
                source,
                &mut ids,
                &mut addresses,
            )?);
        }

        let mut services = BTreeMap::new();
        // Reported after the cycle check: a cycle is the more fundamental error.
        let mut deferred: Option<ConfigError> = None;
        for (name, spanned) in &spec.services {
            let (service, problem) = service_from_spec(name, spanned, &spec, &machines, source)?;
            if let Some(problem) = problem {
                deferred.get_or_insert(problem);
            }
            services.insert(name.clone(), service);
        }
        let cluster = Cluster {
            controller,
            services,
            machines,
            hub,
            predict,
            monitor,
            notify,
        };
        if let Some(cycle) = cluster.find_cycle() {
            return Err(ConfigError::Cycle {
                file: source.file.to_string(),
                services: cycle,
            });
        }
        match deferred {
            Some(error) => Err(error),
            None => Ok(cluster),
        }
    }

    /// Sets the admin URL of the balancer fronting `service` (scenario runner, after balancers start).
    pub fn set_balancer_url(&mut self, service: &str, url: &str) -> Result<(), String> {
        check_balancer_url(url)?;
        let entry = self
            .services
            .get_mut(service)
            .ok_or_else(|| format!("unknown service `{service}`"))?;
        entry.balancer = Some(url.trim_end_matches('/').to_string());
        Ok(())
    }

    /// Gives `service`'s balancer a key (scenario runner: it generates one per balancer).
    pub fn set_balancer_key(
        &mut self,
        service: &str,
        key: crate::config::balancer::BalancerSecret,
        delivery: crate::config::balancer::ConfigDelivery,
    ) -> Result<(), String> {
        let entry = self
            .services
            .get_mut(service)
            .ok_or_else(|| format!("unknown service `{service}`"))?;
        entry.balancer_key = Some(key);
        entry.config_delivery = delivery;
        Ok(())
    }

    pub fn machines_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Machine> + 'a {
        self.machines.iter().filter(move |m| m.service == service)
    }

    /// Versions a service's machines run.
    pub fn versions_of(&self, service: &str) -> BTreeSet<String> {
        self.machines_of(service)
            .map(|m| m.version.clone())
            .collect()
    }

    /// A dependency cycle, as the services along it (first repeated at the end), if any.
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut marks: BTreeMap<&str, Mark> = self
            .services
            .keys()
            .map(|k| (k.as_str(), Mark::New))
            .collect();
        // Iterative depth-first search: 200+ services must not risk the stack.
        for start in self.services.keys() {
            if marks[start.as_str()] != Mark::New {
                continue;
            }
            let mut path: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
            marks.insert(start.as_str(), Mark::OnPath);
            while let Some((node, next)) = path.last().copied() {
                let deps = &self.services[node].depends_on;
                if next < deps.len() {
                    if let Some(top) = path.last_mut() {
                        top.1 += 1;
                    }
                    let dep = deps[next].as_str();
                    match marks[dep] {
                        Mark::New => {
                            marks.insert(dep, Mark::OnPath);
                            path.push((dep, 0));
                        }
                        Mark::OnPath => {
                            let from = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                            let mut cycle: Vec<String> =
                                path[from..].iter().map(|(n, _)| n.to_string()).collect();
                            cycle.push(dep.to_string());
                            return Some(cycle);
                        }
                        Mark::Done => {}
                    }
                } else {
                    marks.insert(node, Mark::Done);
                    path.pop();
                }
            }
        }
        None
    }
}

fn check_balancer_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}): expected http://host:port"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err("expected http://host:port".to_string());
    }
    Ok(())
}

fn controller_settings(
    spec: &ControllerSpec,
    source: &Source<'_>,
) -> Result<ControllerSettings, ConfigError> {
    let admin_addr = match &spec.admin_addr {
        Some(a) => a.get_ref().parse().map_err(|e| {
            source.invalid(
                a.span().start,
                "controller.admin_addr",
                format!("expected ip:port: {e}"),
            )
        })?,
        None => std::net::SocketAddr::from(([127, 0, 0, 1], 7070)),
    };
    let tick = match &spec.tick_ms {
        Some(t) if *t.get_ref() == 0 || *t.get_ref() > 60_000 => {
            return Err(source.invalid(
                t.span().start,
                "controller.tick_ms",
                "must be within 1..=60000",
            ))
        }
        Some(t) => Duration::from_millis(*t.get_ref()),
        None => Duration::from_millis(500),
    };
    let store = store_location(spec, source)?;
    let lease = lease_settings(spec, source, store.is_shared())?;
    let operators = match &spec.operators_file {
        Some(file) => {
            let path = Path::new(source.file)
                .parent()
                .unwrap_or(Path::new(""))
                .join(file.get_ref());
            crate::config::operators::Operators::from_file(&path).map_err(|reason| {
                source.invalid(file.span().start, "controller.operators_file", reason)
            })?
        }
        None => crate::config::operators::Operators::default(),
    };
    Ok(ControllerSettings {
        admin_addr,
        store,
        lease,
        token: spec.token.clone(),
        operators,
        tick,
    })
}

fn store_location(
    spec: &ControllerSpec,
    source: &Source<'_>,
) -> Result<StoreLocation, ConfigError> {
    match (&spec.store, &spec.database) {
        (Some(url), Some(_)) => Err(source.invalid(
            url.span().start,
            "controller.store",
            "give `store` (PostgreSQL) or `database` (SQLite), not both",
        )),
        (Some(url), None) => url
            .get_ref()
            .parse::<PgTarget>()
            .map(|t| StoreLocation::Postgres(Box::new(t)))
            .map_err(|reason| source.invalid(url.span().start, "controller.store", reason)),
        (None, database) => Ok(StoreLocation::sqlite(
            database
                .clone()
                .unwrap_or_else(|| PathBuf::from("understudy.db")),
        )),
    }
}

fn lease_settings(
    spec: &ControllerSpec,
    source: &Source<'_>,
    shared: bool,
) -> Result<Option<LeaseSettings>, ConfigError> {
    let period = match &spec.lease_ms {
        Some(p) if !(300..=600_000).contains(p.get_ref()) => {
            return Err(source.invalid(
                p.span().start,
                "controller.lease_ms",
                "must be within 300..=600000",
            ))
        }
        Some(p) => Duration::from_millis(*p.get_ref()),
        None if shared => DEFAULT_LEASE,
        None => return Ok(None),
    };
    let name = match &spec.name {
        Some(n) if n.get_ref().trim().is_empty() || n.get_ref().len() > 200 => {
            return Err(source.invalid(
                n.span().start,
                "controller.name",
                "must be 1 to 200 characters, not blank",
            ))
        }
        Some(n) => n.get_ref().clone(),
        None => crate::config::store::default_name(),
    };
    let advertise_url = match &spec.advertise_url {
        Some(u) => {
            let reason = check_balancer_url(u.get_ref()).err();
            if let Some(reason) = reason {
                return Err(source.invalid(u.span().start, "controller.advertise_url", reason));
            }
            Some(u.get_ref().trim_end_matches('/').to_string())
        }
        None => None,
    };
    Ok(Some(LeaseSettings {
        period,
        name,
        advertise_url,
    }))
}

/// The lease period when a shared store is given without one.
const DEFAULT_LEASE: Duration = Duration::from_secs(10);

#[cfg(test)]
#[path = "cluster_tests.rs"]
pub(crate) mod properties;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SAMPLE;

    #[test]
    fn sample_is_valid() {
        let cluster = parse("sample.toml", SAMPLE).expect("valid");
        assert_eq!(cluster.services.len(), 4);
        assert_eq!(cluster.services["media"].policy.join_steps, vec![10, 50]);
        assert!(cluster.services["router"].policy.requires_approval);
        assert_eq!(cluster.services["db"].declared_version, "v1");
        assert_eq!(cluster.controller.tick, Duration::from_millis(100));
        assert_eq!(
            crate::core::plan::release_waves(&cluster),
            vec![
                vec!["db".to_string(), "media".to_string()],
                vec!["router".to_string()],
                vec!["edge".to_string()]
            ]
        );
    }

    fn error_of(text: &str) -> ConfigError {
        parse("bad.toml", text).expect_err("must be refused")
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let text = SAMPLE.replace("requires_approval = true", "requires_aproval = true");
        let err = error_of(&text);
        let line = text
            .lines()
            .position(|l| l.contains("requires_aproval"))
            .unwrap()
            + 1;
        match &err {
            ConfigError::Invalid {
                file,
                line: l,
                field,
                reason,
            } => {
                assert_eq!(file, "bad.toml");
                assert_eq!(*l, line);
                assert_eq!(field, "services.router.requires_aproval");
                assert!(reason.contains("unknown field"), "{reason}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().starts_with(&format!("bad.toml:{line}:")));
    }

    #[test]
    fn wrong_type_names_line_and_field() {
        let text = SAMPLE.replacen("join_step_ms = 200", "join_step_ms = \"fast\"", 1);
        match error_of(&text) {
            ConfigError::Invalid { line, field, .. } => {
                assert_eq!(field, "defaults.join_step_ms");
                assert_eq!(line, 6);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn unknown_dependency_names_line_and_field() {
        let text = SAMPLE.replace(r#"depends_on = ["router"]"#, r#"depends_on = ["routr"]"#);
        match error_of(&text) {
            ConfigError::Invalid {
                line,
                field,
                reason,
                ..
            } => {
                assert_eq!(field, "services.edge.depends_on");
                assert_eq!(line, 9);
                assert!(reason.contains("routr"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn bad_weight_and_unknown_machine_service() {
        let text = SAMPLE.replacen(
            "config = \"active\"\n",
            "config = \"active\"\nweight = 0\n",
            1,
        );
        match error_of(&text) {
            ConfigError::Invalid { field, line, .. } => {
                assert_eq!(field, "machines[0].weight");
                let expected = text.lines().position(|l| l == "weight = 0").unwrap() + 1;
                assert_eq!(line, expected);
            }
            other => panic!("unexpected {other}"),
        }
        let text = SAMPLE.replacen("service = \"db\"", "service = \"dbx\"", 1);
        assert!(error_of(&text)
            .to_string()
            .contains("unknown service `dbx`"));
    }

    #[test]
    fn cycle_is_refused_with_its_services_named() {
        let text = SAMPLE.replace(
            "[services.db]\n",
            "[services.db]\ndepends_on = [\"edge\"]\n",
        );
        match error_of(&text) {
            ConfigError::Cycle { services, .. } => {
                assert_eq!(services.first(), services.last());
                for name in ["edge", "router", "db"] {
                    assert!(services.iter().any(|s| s == name), "{services:?}");
                }
                assert!(!services.iter().any(|s| s == "media"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn service_without_active_machine_is_refused() {
        let text = SAMPLE.replacen(
            "id = \"db-1\"\nservice = \"db\"\nversion = \"v1\"\naddress = \"127.0.0.1:8031\"\nconfig = \"active\"",
            "id = \"db-1\"\nservice = \"db\"\nversion = \"v1\"\naddress = \"127.0.0.1:8031\"\nconfig = \"simulation\"",
            1,
        );
        let err = error_of(&text).to_string();
        assert!(
            err.contains("services.db") && err.contains("active"),
            "{err}"
        );
    }

    #[test]
    fn balancer_url_set_programmatically() {
        let text = SAMPLE.replace("balancer = \"http://127.0.0.1:9001\"\n", "");
        let mut cluster = parse("c.toml", &text).expect("valid without balancers");
        assert!(cluster.services["db"].balancer.is_none());
        cluster
            .set_balancer_url("db", "http://127.0.0.1:4567/")
            .expect("set");
        assert_eq!(
            cluster.services["db"].balancer.as_deref(),
            Some("http://127.0.0.1:4567")
        );
        assert!(cluster
            .set_balancer_url("nope", "http://127.0.0.1:1")
            .is_err());
        assert!(cluster.set_balancer_url("db", "ftp://x").is_err());
    }
}
