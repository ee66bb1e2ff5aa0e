//! The scenario file: a whole cluster (the controller's own tables), how each machine behaves,
//! the load, the release, what ops do and when, and the outcome expected for each service.
//! Validated as a whole before anything starts; errors name the file, the line and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::config::toml_spans::{Spanned, Step};
use serde::Deserialize;
use understudy_loadgen::{LoadSpec, MachineSpec as Behaviour};
use understudy_wire::PoolRole;

use crate::config::cluster::{
    self, Cluster, ClusterSpec, ConfigError, ControllerSpec, DefaultsSpec, ServiceSpec, Source,
};

/// Address given to machine `index` while the file is only being checked (one per machine, as
/// a cluster file needs; never connected to); the runner replaces it with the address the
/// machine really listens on.
fn placeholder_address(index: usize) -> String {
    format!("127.0.0.1:{}", 1 + index)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    scenario: Spanned<MetaSpec>,
    #[serde(default)]
    controller: ControllerSpec,
    #[serde(default)]
    defaults: DefaultsSpec,
    /// `[hub]`, as in a cluster file.
    #[serde(default)]
    hub: crate::config::hub::HubSpec,
    /// `[predict]`, as in a cluster file.
    #[serde(default)]
    predict: Option<Spanned<crate::config::predict::PredictSection>>,
    /// `[monitor]`, as in a cluster file.
    #[serde(default)]
    monitor: Option<Spanned<crate::config::monitor::MonitorSection>>,
    services: BTreeMap<String, Spanned<ServiceSpec>>,
    machines: Vec<Spanned<MachineEntry>>,
    #[serde(default)]
    behaviours: BTreeMap<String, Spanned<toml::Table>>,
    load: Spanned<LoadSpec>,
    /// One release, its outcomes in `[expect]`; or else `[[releases]]`.
    release: Option<Spanned<ReleaseSpec>>,
    /// Releases one after the other, each with its own `expect`.
    #[serde(default)]
    releases: Vec<Spanned<ReleaseSpec>>,
    #[serde(default)]
    ops: Vec<Spanned<OpsSpec>>,
    #[serde(default)]
    expect: Option<Spanned<BTreeMap<String, Spanned<Expected>>>>,
}

/// `[scenario]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaSpec {
    name: String,
    #[serde(default)]
    description: String,
    /// The service callers send their jobs to (through its balancer).
    entry: Spanned<String>,
    /// Hard bound on the whole run, load included.
    #[serde(default = "default_timeout_s")]
    timeout_s: f64,
    /// Errors callers may see; 0 by default: a release must not hurt a single caller.
    #[serde(default)]
    max_active_errors: u64,
    #[serde(default)]
    max_dropped_sessions: u64,
    /// Calls whose jobs may reach a second machine; 0 by default: a call moves only when its
    /// machine is removed while holding it (drain timeout, a down machine taken out).
    #[serde(default)]
    max_calls_moved: u64,
}

fn default_timeout_s() -> f64 {
    60.0
}

/// `[[machines]]`: like a cluster file's machines, without an address (each machine gets an
/// ephemeral port) and with the name of its behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineEntry {
    id: Spanned<String>,
    service: Spanned<String>,
    version: Spanned<String>,
    config: PoolRole,
    weight: Option<Spanned<u32>>,
    /// Key into `[behaviours]`; none = answers at once, never fails.
    behaviour: Option<Spanned<String>>,
}

/// `[release]`, or one of `[[releases]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseSpec {
    /// Seconds after the load starts (the first release), or after the previous release ended.
    #[serde(default = "default_release_at")]
    at_s: f64,
    /// service -> version.
    services: BTreeMap<String, String>,
    #[serde(default)]
    rollback_on_failure: bool,
    /// service -> the sub-group of its active machines to move (default: all).
    #[serde(default)]
    subgroup: BTreeMap<String, understudy_hub::SubgroupSpec>,
    /// service -> outcome, in `[[releases]]` (a single `[release]` has `[expect]` instead).
    expect: Option<BTreeMap<String, Spanned<Expected>>>,
}

fn default_release_at() -> f64 {
    1.0
}

/// `[[ops]]`: an approval, abort or rollback sent to the admin endpoint, at a time after the
/// release starts or as soon as the service's rollout reaches a phase.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpsSpec {
    action: OpsAction,
    service: String,
    /// Which of `[[releases]]` (from 0); default the first.
    #[serde(default)]
    release: usize,
    at_s: Option<f64>,
    when_phase: Option<String>,
}

use crate::core::rollout::OpsAction;

/// What a service's rollout ends as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    Promoted,
    RolledBack,
    Aborted,
    Pending,
}

impl Expected {
    pub fn as_str(self) -> &'static str {
        match self {
            Expected::Promoted => "promoted",
            Expected::RolledBack => "rolled_back",
            Expected::Aborted => "aborted",
            Expected::Pending => "pending",
        }
    }

    /// The outcome a rollout phase stands for (phases not final are `pending`).
    pub fn of_phase(phase: &str) -> Expected {
        match phase {
            "complete" => Expected::Promoted,
            "rolled_back" => Expected::RolledBack,
            "aborted" => Expected::Aborted,
            _ => Expected::Pending,
        }
    }
}

/// When an ops step fires.
#[derive(Debug, Clone, PartialEq)]
pub enum OpsTrigger {
    /// This long after the release was started.
    After(Duration),
    /// As soon as the service's rollout is in this phase.
    Phase(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpsStep {
    pub action: OpsAction,
    pub service: String,
    pub trigger: OpsTrigger,
    /// Index of the release whose rollout it acts on.
    pub release: usize,
}

/// One release of the scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleasePlan {
    /// After the load started (the first), or after the previous release ended.
    pub at: Duration,
    /// service -> version.
    pub services: BTreeMap<String, String>,
    /// service -> sub-group of the release (`subgroup.SERVICE`).
    pub subgroups: BTreeMap<String, understudy_hub::SubgroupSpec>,
    pub rollback_on_failure: bool,
    /// service -> the outcome its rollout must end with.
    pub expect: BTreeMap<String, Expected>,
}

/// One machine to start.
#[derive(Debug, Clone)]
pub struct MachinePlan {
    pub id: String,
    pub service: String,
    pub version: String,
    pub config: PoolRole,
    pub weight: Option<u32>,
    pub behaviour: Behaviour,
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub entry: String,
    pub timeout: Duration,
    pub max_active_errors: u64,
    pub max_dropped_sessions: u64,
    pub max_calls_moved: u64,
    pub machines: Vec<MachinePlan>,
    pub load: LoadSpec,
    /// At least one; each starts once the previous one ended.
    pub releases: Vec<ReleasePlan>,
    pub ops: Vec<OpsStep>,
    /// The cluster as validated with placeholder addresses (release order, checks).
    pub cluster: Cluster,
    file: String,
    text: String,
}

impl Scenario {
    /// The cluster with each machine at the address it really listens on.
    pub fn cluster_with_addresses(
        &self,
        addresses: &BTreeMap<String, String>,
    ) -> Result<Cluster, ConfigError> {
        let source = Source {
            file: &self.file,
            text: &self.text,
        };
        let file: ScenarioFile = toml::from_str(&self.text).map_err(|e| source.toml_error(&e))?;
        Cluster::from_spec(cluster_spec(file, addresses), &source)
    }
}

/// Whether a TOML text is a scenario (it has a `[scenario]` table) rather than a cluster file.
pub fn is_scenario(text: &str) -> bool {
    text.parse::<toml::Table>()
        .map(|t| t.contains_key("scenario"))
        .unwrap_or(false)
}

pub fn load_file(path: &Path) -> Result<Scenario, ConfigError> {
    let (file, text) = cluster::read_file(path)?;
    parse(&file, &text)
}

/// Parses and validates a scenario; nothing is started.
pub fn parse(file: &str, text: &str) -> Result<Scenario, ConfigError> {
    let source = Source { file, text };
    let raw: ScenarioFile = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
    let meta = meta_of(&raw, &source)?;
    let load_at = raw.load.span().start;
    let load = raw.load.get_ref().clone();
    load.plan()
        .map_err(|e| source.invalid(load_at, format!("load.{}", e.field), e.problem))?;
    let machines = machine_plans(&raw, &source)?;
    let (releases, first_release) = releases_of(&raw, &source, meta.timeout_s)?;
    let ops = ops_of(&raw, &releases, &source)?;
    let cluster = placeholder_cluster(raw, &source)?;
    check_first_subgroups(&cluster, &releases[0], &first_release, &source)?;
    Ok(Scenario {
        name: meta.name,
        description: meta.description,
        entry: meta.entry.into_inner(),
        timeout: Duration::from_secs_f64(meta.timeout_s),
        max_active_errors: meta.max_active_errors,
        max_dropped_sessions: meta.max_dropped_sessions,
        max_calls_moved: meta.max_calls_moved,
        machines,
        load,
        releases,
        ops,
        cluster,
        file: file.to_string(),
        text: text.to_string(),
    })
}

/// `[scenario]` checked: a name, a known entry service, a timeout of at most an hour.
fn meta_of(raw: &ScenarioFile, source: &Source<'_>) -> Result<MetaSpec, ConfigError> {
    let meta_at = raw.scenario.span().start;
    let meta = raw.scenario.get_ref().clone();
    if meta.name.trim().is_empty() {
        return Err(source.invalid(meta_at, "scenario.name", "must not be empty"));
    }
    if !raw.services.contains_key(meta.entry.get_ref()) {
        return Err(source.invalid(
            meta.entry.span().start,
            "scenario.entry",
            format!("unknown service `{}`", meta.entry.get_ref()),
        ));
    }
    if !(meta.timeout_s.is_finite() && meta.timeout_s > 0.0 && meta.timeout_s <= 3600.0) {
        return Err(source.invalid(
            meta_at,
            "scenario.timeout_s",
            format!("must be within (0, 3600], got {}", meta.timeout_s),
        ));
    }
    Ok(meta)
}

/// The machines to start, in file order, each with its behaviour. A behaviour no machine uses
/// is refused: it is most likely a misspelt name.
fn machine_plans(raw: &ScenarioFile, source: &Source<'_>) -> Result<Vec<MachinePlan>, ConfigError> {
    let mut machines = Vec::with_capacity(raw.machines.len());
    let mut used_behaviours = BTreeSet::new();
    for (index, entry) in raw.machines.iter().enumerate() {
        let m = entry.get_ref();
        let behaviour = machine_behaviour(raw, source, index, m)?;
        if let Some(name) = &m.behaviour {
            used_behaviours.insert(name.get_ref().clone());
        }
        machines.push(MachinePlan {
            id: m.id.get_ref().clone(),
            service: m.service.get_ref().clone(),
            version: m.version.get_ref().clone(),
            config: m.config,
            weight: m.weight.as_ref().map(|w| *w.get_ref()),
            behaviour,
        });
    }
    if let Some((name, table)) = raw
        .behaviours
        .iter()
        .find(|(name, _)| !used_behaviours.contains(*name))
    {
        return Err(source.invalid(
            table.span().start,
            format!("behaviours.{name}"),
            "no machine uses this behaviour",
        ));
    }
    Ok(machines)
}

/// Machine `index`'s behaviour: the one it names in `[behaviours]`, or else one that answers at
/// once and never fails. Either way it calls the services its own service depends on.
fn machine_behaviour(
    raw: &ScenarioFile,
    source: &Source<'_>,
    index: usize,
    m: &MachineEntry,
) -> Result<Behaviour, ConfigError> {
    let service = m.service.get_ref();
    let depends_on = dependencies_of(raw, service);
    let Some(name) = &m.behaviour else {
        let mut b = Behaviour::new(service.clone(), m.version.get_ref().clone());
        b.dependencies = depends_on;
        return Ok(b);
    };
    let table = raw.behaviours.get(name.get_ref()).ok_or_else(|| {
        source.invalid(
            name.span().start,
            format!("machines[{index}].behaviour"),
            format!(
                "no behaviour `{}` in [behaviours] (known: {})",
                name.get_ref(),
                raw.behaviours
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    behaviour_for(table, service, m.version.get_ref(), index, depends_on).map_err(
        |(path, reason)| {
            // The path is within the behaviour's table: name it from the file's root.
            let mut full = vec![
                Step::Key("behaviours".into()),
                Step::Key(name.get_ref().clone()),
            ];
            full.extend(path);
            let field = crate::config::toml_spans::path_text(&full);
            source.invalid_near(field, &full, table.span().start, reason)
        },
    )
}

/// The services `service` depends on, as its `[services]` table lists them.
fn dependencies_of(raw: &ScenarioFile, service: &str) -> Vec<String> {
    raw.services
        .get(service)
        .map(|s| {
            s.get_ref()
                .depends_on
                .iter()
                .map(|d| d.get_ref().clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The cluster validated with a placeholder address per machine (the real ones are known only
/// once the machines listen).
fn placeholder_cluster(raw: ScenarioFile, source: &Source<'_>) -> Result<Cluster, ConfigError> {
    let placeholders = raw
        .machines
        .iter()
        .enumerate()
        .map(|(i, m)| (m.get_ref().id.get_ref().clone(), placeholder_address(i)))
        .collect();
    Cluster::from_spec(cluster_spec(raw, &placeholders), source)
}

/// The first release's sub-groups are checked against the machines the file declares, as the
/// controller will; later ones depend on the outcomes before them, and are checked when they
/// start. `first_release` is where the first release is written (offset, field path).
fn check_first_subgroups(
    cluster: &Cluster,
    first: &ReleasePlan,
    first_release: &(usize, String),
    source: &Source<'_>,
) -> Result<(), ConfigError> {
    let roles = crate::core::plan::declared_roles(cluster);
    let (first_at, first_prefix) = first_release;
    for (service, spec) in &first.subgroups {
        let version = &first.services[service];
        crate::core::plan::Selection::choose(cluster, &roles, service, version, Some(spec))
            .map_err(|e| {
                source.invalid(
                    *first_at,
                    format!("{first_prefix}.subgroup.{service}"),
                    e.to_string(),
                )
            })?;
    }
    Ok(())
}

/// The file's releases with the field path each is named by: `[release]` (outcomes in
/// `[expect]`) or `[[releases]]` (each with its `expect`), never both.
fn release_specs<'a>(
    raw: &'a ScenarioFile,
    source: &Source<'_>,
) -> Result<Vec<(&'a Spanned<ReleaseSpec>, String)>, ConfigError> {
    match (&raw.release, raw.releases.as_slice()) {
        (Some(one), []) => Ok(vec![(one, "release".to_string())]),
        (None, []) => Err(source.invalid(
            0,
            "release",
            "give a [release] (with [expect]) or a sequence of [[releases]]",
        )),
        (Some(one), _) => Err(source.invalid(
            one.span().start,
            "release",
            "give either one [release] or [[releases]], not both",
        )),
        (None, many) => Ok(many
            .iter()
            .enumerate()
            .map(|(i, r)| (r, format!("releases[{i}]")))
            .collect()),
    }
}

/// Every release checked: a start within the run, known versions, an outcome expected for
/// each service released and for no other. Also gives where the first one is written (its
/// offset and field path), for the errors found once the cluster is built.
fn releases_of(
    raw: &ScenarioFile,
    source: &Source<'_>,
    timeout_s: f64,
) -> Result<(Vec<ReleasePlan>, (usize, String)), ConfigError> {
    let specs = release_specs(raw, source)?;
    let first = specs
        .first()
        .map(|(spec, prefix)| (spec.span().start, prefix.clone()))
        .expect("release_specs gives at least one");
    let single = raw.release.is_some();
    match (&raw.expect, single) {
        (Some(e), false) => {
            return Err(source.invalid(
                e.span().start,
                "expect",
                "[[releases]] give their outcomes in their own `expect`",
            ))
        }
        (None, true) => {
            return Err(source.invalid(
                0,
                "expect",
                "a [release] needs an [expect] table: service = outcome",
            ))
        }
        _ => {}
    }
    let mut plans = Vec::with_capacity(specs.len());
    for (spec, prefix) in specs {
        let at = spec.span().start;
        let r = spec.get_ref();
        let (expect, expect_field) = match (&r.expect, &raw.expect) {
            (Some(_), _) if single => {
                return Err(source.invalid(
                    at,
                    format!("{prefix}.expect"),
                    "a single [release] gives its outcomes in [expect]",
                ))
            }
            (Some(e), _) => (e, format!("{prefix}.expect")),
            (None, Some(e)) => (e.get_ref(), "expect".to_string()),
            (None, None) => {
                return Err(source.invalid(
                    at,
                    format!("{prefix}.expect"),
                    "every release needs `expect`: service = outcome",
                ))
            }
        };
        plans.push(release_plan(
            r,
            at,
            &prefix,
            expect,
            &expect_field,
            raw,
            source,
            timeout_s,
        )?);
    }
    Ok((plans, first))
}

/// One release checked against the machines of the file.
#[allow(clippy::too_many_arguments)]
fn release_plan(
    r: &ReleaseSpec,
    at: usize,
    prefix: &str,
    expect: &BTreeMap<String, Spanned<Expected>>,
    expect_field: &str,
    raw: &ScenarioFile,
    source: &Source<'_>,
    timeout_s: f64,
) -> Result<ReleasePlan, ConfigError> {
    if !(r.at_s.is_finite() && r.at_s >= 0.0 && r.at_s < timeout_s) {
        return Err(source.invalid(
            at,
            format!("{prefix}.at_s"),
            format!("must be within [0, scenario.timeout_s), got {}", r.at_s),
        ));
    }
    if r.services.is_empty() {
        return Err(source.invalid(
            at,
            format!("{prefix}.services"),
            "name at least one service = version",
        ));
    }
    for (service, version) in &r.services {
        let known = raw.machines.iter().any(|m| {
            m.get_ref().service.get_ref() == service && m.get_ref().version.get_ref() == version
        });
        if !known {
            return Err(source.invalid(
                at,
                format!("{prefix}.services.{service}"),
                format!("no machine of service `{service}` runs version `{version}`"),
            ));
        }
    }
    for service in r.subgroup.keys() {
        if !r.services.contains_key(service) {
            return Err(source.invalid(
                at,
                format!("{prefix}.subgroup.{service}"),
                format!("`{service}` is not in the release"),
            ));
        }
    }
    for (service, outcome) in expect {
        if !r.services.contains_key(service) {
            return Err(source.invalid(
                outcome.span().start,
                format!("{expect_field}.{service}"),
                format!("`{service}` is not in the release"),
            ));
        }
    }
    if let Some(missing) = r.services.keys().find(|s| !expect.contains_key(*s)) {
        return Err(source.invalid(
            at,
            format!("{expect_field}.{missing}"),
            "every released service needs an expected outcome",
        ));
    }
    Ok(ReleasePlan {
        at: Duration::from_secs_f64(r.at_s),
        services: r.services.clone(),
        subgroups: r.subgroup.clone(),
        rollback_on_failure: r.rollback_on_failure,
        expect: expect
            .iter()
            .map(|(s, o)| (s.clone(), *o.get_ref()))
            .collect(),
    })
}

/// The ops steps, each on a service of the release it names.
fn ops_of(
    raw: &ScenarioFile,
    releases: &[ReleasePlan],
    source: &Source<'_>,
) -> Result<Vec<OpsStep>, ConfigError> {
    let mut ops = Vec::with_capacity(raw.ops.len());
    for (index, step) in raw.ops.iter().enumerate() {
        let at = step.span().start;
        let s = step.get_ref();
        let field = |name: &str| format!("ops[{index}].{name}");
        let Some(release) = releases.get(s.release) else {
            return Err(source.invalid(
                at,
                field("release"),
                format!(
                    "no release {} (releases count from 0; the file has {})",
                    s.release,
                    releases.len()
                ),
            ));
        };
        if !release.services.contains_key(&s.service) {
            return Err(source.invalid(
                at,
                field("service"),
                format!("`{}` is not in the release", s.service),
            ));
        }
        let trigger = match (s.at_s, &s.when_phase) {
            (Some(t), None) if t.is_finite() && t >= 0.0 => {
                OpsTrigger::After(Duration::from_secs_f64(t))
            }
            (Some(t), None) => {
                return Err(source.invalid(
                    at,
                    field("at_s"),
                    format!("must be a non-negative number, got {t}"),
                ))
            }
            (None, Some(phase)) if crate::core::rollout::PHASE_NAMES.contains(&phase.as_str()) => {
                OpsTrigger::Phase(phase.clone())
            }
            (None, Some(phase)) => {
                return Err(source.invalid(
                    at,
                    field("when_phase"),
                    format!(
                        "unknown phase `{phase}` (one of {})",
                        crate::core::rollout::PHASE_NAMES.join(", ")
                    ),
                ))
            }
            _ => {
                return Err(source.invalid(
                    at,
                    format!("ops[{index}]"),
                    "give exactly one of at_s or when_phase",
                ))
            }
        };
        ops.push(OpsStep {
            action: s.action,
            service: s.service.clone(),
            trigger,
            release: s.release,
        });
    }
    Ok(ops)
}

/// A machine behaviour from its `[behaviours.NAME]` table: service, version and dependencies come
/// from the machine and the cluster, so a table need not repeat them; the seed differs per machine.
/// An error gives the path of the field within the table.
fn behaviour_for(
    table: &Spanned<toml::Table>,
    service: &str,
    version: &str,
    index: usize,
    depends_on: Vec<String>,
) -> Result<Behaviour, (Vec<Step>, String)> {
    let mut table = table.get_ref().clone();
    for reserved in ["service", "version", "dependencies"] {
        if table.contains_key(reserved) {
            return Err((
                vec![Step::Key(reserved.to_string())],
                "is taken from the machine and its service; remove it here".to_string(),
            ));
        }
    }
    table.insert("service".into(), service.into());
    table.insert("version".into(), version.into());
    // A seed that is not an integer is left for deserialization to refuse by name.
    if let Some(seed) = table.get("seed").map_or(Some(0), toml::Value::as_integer) {
        let seed = seed.wrapping_add(index as i64 * 7919);
        table.insert("seed".into(), toml::Value::Integer(seed));
    }
    let mut behaviour: Behaviour = serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| {
            let path = crate::config::toml_spans::steps_of(e.path());
            (path, e.into_inner().message().trim_end().to_string())
        })?;
    behaviour.dependencies = depends_on;
    behaviour.validate().map_err(|e| {
        (
            crate::config::toml_spans::parse_path(&e.field),
            e.problem.clone(),
        )
    })?;
    Ok(behaviour)
}

fn cluster_spec(raw: ScenarioFile, addresses: &BTreeMap<String, String>) -> ClusterSpec {
    let machines = raw
        .machines
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let span = entry.span();
            let m = entry.into_inner();
            let address = addresses
                .get(m.id.get_ref())
                .cloned()
                .unwrap_or_else(|| placeholder_address(i));
            Spanned::new(
                span.clone(),
                cluster::MachineSpec {
                    id: m.id,
                    service: m.service,
                    version: m.version,
                    address: Spanned::new(span, address),
                    config: m.config,
                    weight: m.weight,
                    health_path: None,
                },
            )
        })
        .collect();
    ClusterSpec {
        controller: raw.controller,
        defaults: raw.defaults,
        services: raw.services,
        machines,
        hub: raw.hub,
        predict: raw.predict,
        monitor: raw.monitor,
        notify: None,
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[scenario]
name = "t"
entry = "router"

[services.router]
depends_on = ["media"]

[services.media]

[[machines]]
id = "router-1"
service = "router"
version = "v1"
config = "active"

[[machines]]
id = "media-1"
service = "media"
version = "v1"
config = "active"
behaviour = "slow"

[[machines]]
id = "media-2"
service = "media"
version = "v2"
config = "simulation"
behaviour = "slow"

[behaviours.slow]
latency = { kind = "constant", ms = 5.0 }

[load]
rate = 10
duration_s = 2

[release]
services = { media = "v2" }

[expect]
media = "promoted"
"#;

    fn error_of(text: &str) -> String {
        parse("s.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_scenario_becomes_machines_with_behaviours_and_dependencies() {
        let s = parse("s.toml", MINIMAL).unwrap();
        assert_eq!(s.entry, "router");
        assert_eq!(s.machines.len(), 3);
        let router = &s.machines[0];
        assert_eq!(router.behaviour.dependencies, ["media"]);
        let media = &s.machines[1];
        assert_eq!(
            (
                media.behaviour.service.as_str(),
                media.behaviour.version.as_str()
            ),
            ("media", "v1")
        );
        assert_ne!(
            s.machines[1].behaviour.seed, s.machines[2].behaviour.seed,
            "machines get their own seeds"
        );
        assert_eq!(s.releases[0].expect["media"], Expected::Promoted);
        assert_eq!(s.releases[0].at, Duration::from_secs(1));
    }

    #[test]
    fn the_cluster_takes_the_real_addresses() {
        let s = parse("s.toml", MINIMAL).unwrap();
        let addresses = [
            ("router-1", "127.0.0.1:4001"),
            ("media-1", "127.0.0.1:4002"),
            ("media-2", "127.0.0.1:4003"),
        ]
        .into_iter()
        .map(|(id, a)| (id.to_string(), a.to_string()))
        .collect();
        let cluster = s.cluster_with_addresses(&addresses).unwrap();
        let media2 = cluster.machines.iter().find(|m| m.id == "media-2").unwrap();
        assert_eq!(media2.address, "127.0.0.1:4003");
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let bad_entry = MINIMAL.replace("entry = \"router\"", "entry = \"nowhere\"");
        assert_eq!(
            error_of(&bad_entry),
            "s.toml:4: field `scenario.entry`: unknown service `nowhere`"
        );
        let unknown_behaviour = MINIMAL.replacen("behaviour = \"slow\"", "behaviour = \"fast\"", 1);
        assert!(error_of(&unknown_behaviour).contains("machines[1].behaviour"));
        let bad_behaviour = MINIMAL.replace("ms = 5.0", "ms = -1.0");
        assert!(
            error_of(&bad_behaviour).contains("behaviours.slow.latency.ms"),
            "{}",
            error_of(&bad_behaviour)
        );
        let reserved = MINIMAL.replace("[behaviours.slow]", "[behaviours.slow]\nservice = \"x\"");
        assert!(error_of(&reserved).contains("behaviours.slow.service"));
        let unknown_key = MINIMAL.replace("[load]", "[load]\nspeed = 3");
        assert!(error_of(&unknown_key).contains("speed"));
        let bad_version = MINIMAL.replace("media = \"v2\" }", "media = \"v9\" }");
        assert!(error_of(&bad_version).contains("release.services.media"));
        let no_expect = MINIMAL.replace("media = \"promoted\"", "");
        assert!(error_of(&no_expect).contains("expect.media"));
    }

    #[test]
    fn an_ops_step_takes_exactly_one_trigger() {
        let both = format!("{MINIMAL}\n[[ops]]\naction = \"approve\"\nservice = \"media\"\nat_s = 1.0\nwhen_phase = \"simulating\"\n");
        assert!(error_of(&both).contains("exactly one of at_s or when_phase"));
        let bad_phase = format!(
            "{MINIMAL}\n[[ops]]\naction = \"abort\"\nservice = \"media\"\nwhen_phase = \"later\"\n"
        );
        assert!(error_of(&bad_phase).contains("ops[0].when_phase"));
        let fine = format!("{MINIMAL}\n[[ops]]\naction = \"abort\"\nservice = \"media\"\nwhen_phase = \"simulating\"\n");
        let s = parse("s.toml", &fine).unwrap();
        assert_eq!(s.ops[0].trigger, OpsTrigger::Phase("simulating".into()));
    }

    /// MINIMAL with its `[release]` and `[expect]` replaced by `releases`.
    fn sequence(releases: &str) -> String {
        let head = MINIMAL.split("[release]").next().unwrap();
        format!("{head}{releases}")
    }

    #[test]
    fn a_sequence_of_releases_each_with_its_outcome() {
        let s = parse(
            "s.toml",
            &sequence(
                "[[releases]]\nservices = { media = \"v2\" }\nexpect = { media = \"promoted\" }\n\
                 [[releases]]\nat_s = 2.5\nservices = { media = \"v1\" }\n\
                 [releases.expect]\nmedia = \"rolled_back\"\n\
                 [[ops]]\naction = \"rollback\"\nservice = \"media\"\nrelease = 1\nat_s = 0.5\n",
            ),
        )
        .unwrap();
        let seen: Vec<_> = s
            .releases
            .iter()
            .map(|r| (r.at, r.services["media"].as_str(), r.expect["media"]))
            .collect();
        assert_eq!(
            seen,
            [
                (Duration::from_secs(1), "v2", Expected::Promoted),
                (Duration::from_millis(2500), "v1", Expected::RolledBack),
            ]
        );
        assert_eq!(s.ops[0].release, 1);
    }

    #[test]
    fn a_sequence_is_refused_by_name_when_half_given() {
        let one =
            "[[releases]]\nservices = { media = \"v2\" }\nexpect = { media = \"promoted\" }\n";
        let both = format!("{MINIMAL}{one}");
        assert!(
            error_of(&both)
                .contains("field `release`: give either one [release] or [[releases]], not both"),
            "{}",
            error_of(&both)
        );
        let no_expect = sequence("[[releases]]\nservices = { media = \"v2\" }\n");
        assert!(
            error_of(&no_expect).contains("releases[0].expect"),
            "{}",
            error_of(&no_expect)
        );
        let stray = sequence(&format!("{one}[expect]\nmedia = \"promoted\"\n"));
        assert!(
            error_of(&stray).contains("field `expect`: [[releases]] give their outcomes"),
            "{}",
            error_of(&stray)
        );
        let wrong = sequence(&format!(
            "{one}[[releases]]\nservices = {{ media = \"v9\" }}\nexpect = {{ media = \"promoted\" }}\n"
        ));
        assert!(
            error_of(&wrong).contains("releases[1].services.media"),
            "{}",
            error_of(&wrong)
        );
        let far = sequence(&format!(
            "{one}[[ops]]\naction = \"abort\"\nservice = \"media\"\nrelease = 1\nat_s = 1.0\n"
        ));
        assert!(
            error_of(&far)
                .contains("`ops[0].release`: no release 1 (releases count from 0; the file has 1)"),
            "{}",
            error_of(&far)
        );
        let none = sequence("");
        assert!(
            error_of(&none).contains("field `release`"),
            "{}",
            error_of(&none)
        );
    }

    #[test]
    fn scenario_files_are_told_from_cluster_files() {
        assert!(is_scenario(MINIMAL));
        assert!(!is_scenario("[services.a]\n"));
    }
}
