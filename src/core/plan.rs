//! Release plans: which service of a release moves after which, from the dependency graph.
//!
//! A service waits for the nearest services it depends on (directly or through services outside the
//! release) that are in the same release. Services with nothing to wait for start together (wave 1),
//! so independent branches proceed in parallel and a diamond's two sides move at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use understudy_hub::{MachineRecord, Role, Status, SubgroupSpec};
use utoipa::ToSchema;

use crate::config::cluster::Cluster;
use crate::core::roles::MachineRole;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanEntry {
    pub service: String,
    pub version: String,
    /// Services of this release that must have joined before this one starts.
    pub after: Vec<String>,
    /// 1 = starts at once; n = after something of wave n-1.
    pub wave: usize,
}

/// Entries in release order: by wave, then by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the release names no service")]
    Empty,
    #[error("unknown service `{0}`")]
    UnknownService(String),
    #[error("service `{service}` has no machine running version `{version}` (known: {known})")]
    UnknownVersion {
        service: String,
        version: String,
        known: String,
    },
    #[error("service `{service}` already runs version `{version}`")]
    AlreadyRunning { service: String, version: String },
    #[error("subgroup.{service}{problem}")]
    Subgroup { service: String, problem: String },
}

/// The machines one rollout moves: the active machines it replaces and the candidates (machines
/// of the new version outside the active configuration) that take their place. Every other
/// machine of the service keeps its role and its place in the balancer.
///
/// A machine's version is fixed by its id (the cluster file declares it), so "updating" a machine
/// to v2 means replacing it with a v2 machine: a sub-group picks the active machines to replace,
/// and as many v2 candidates (the first by id) join in their place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Selection {
    /// The sub-group asked for; `None` moves the whole service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subgroup: Option<SubgroupSpec>,
    /// Active machines retired when the rollout completes.
    pub replaced: BTreeSet<String>,
    /// Candidates simulated, judged, then made active.
    pub joining: BTreeSet<String>,
}

impl Selection {
    /// What a rollout of `service` to `to_version` moves, under the machine `roles` at release
    /// time. Without a sub-group: every active machine of another version is replaced and every
    /// candidate of `to_version` joins. With one: the sub-group picks among the active machines
    /// of another version, and as many candidates join.
    pub fn choose(
        cluster: &Cluster,
        roles: &BTreeMap<String, MachineRole>,
        service: &str,
        to_version: &str,
        subgroup: Option<&SubgroupSpec>,
    ) -> Result<Selection, PlanError> {
        let role_of = |id: &str| roles.get(id).copied().unwrap_or(MachineRole::Retired);
        let replaceable: Vec<&crate::config::cluster::Machine> = cluster
            .machines_of(service)
            .filter(|m| role_of(&m.id) == MachineRole::Active && m.version != to_version)
            .collect();
        // Sorted and without repeats: a sub-group takes the first candidates by id.
        let candidates: Vec<String> = cluster
            .machines_of(service)
            .filter(|m| m.version == to_version && role_of(&m.id).is_candidate())
            .map(|m| m.id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let Some(spec) = subgroup else {
            return Ok(Selection {
                subgroup: None,
                replaced: replaceable.iter().map(|m| m.id.clone()).collect(),
                joining: candidates.into_iter().collect(),
            });
        };
        let replaced = select_replaced(spec, service, to_version, &replaceable)?;
        if candidates.len() < replaced.len() {
            return Err(PlanError::Subgroup {
                service: service.to_string(),
                problem: format!(
                    ": selects {} active machine(s) ({}) but only {} machine(s) of version `{to_version}` can take their place",
                    replaced.len(),
                    names(replaced.iter().map(String::as_str)),
                    candidates.len()
                ),
            });
        }
        let joining = candidates.into_iter().take(replaced.len()).collect();
        Ok(Selection {
            subgroup: Some(spec.clone()),
            replaced,
            joining,
        })
    }

    /// Whether the rollout moves the whole service (no sub-group).
    pub fn is_whole_service(&self) -> bool {
        self.subgroup.is_none()
    }
}

/// The active machines a sub-group picks among those that can be replaced (active, of another
/// version than `to_version`).
fn select_replaced(
    spec: &SubgroupSpec,
    service: &str,
    to_version: &str,
    replaceable: &[&crate::config::cluster::Machine],
) -> Result<BTreeSet<String>, PlanError> {
    let subgroup = spec.validate().map_err(|e| subgroup_problem(service, e))?;
    let records: Vec<MachineRecord> = replaceable.iter().map(|m| active_record(m)).collect();
    let replaced = subgroup.select(service, &records).map_err(|e| match e {
        understudy_hub::subgroup::SubgroupError::UnknownMachine(id, _) => PlanError::Subgroup {
            service: service.to_string(),
            problem: format!(
                ".machines: `{id}` is not an active machine of `{service}` running a version other than `{to_version}` (those are: {})",
                names(records.iter().map(|r| r.id.as_str()))
            ),
        },
        other => subgroup_problem(service, other),
    })?;
    Ok(replaced.into_iter().collect())
}

/// A sub-group error of the hub, about the request's `subgroup.SERVICE` field.
fn subgroup_problem(service: &str, e: understudy_hub::subgroup::SubgroupError) -> PlanError {
    PlanError::Subgroup {
        service: service.to_string(),
        // The hub names fields `target.count`; here the request field is `subgroup.SERVICE`.
        problem: e
            .to_string()
            .strip_prefix("target")
            .map(str::to_string)
            .unwrap_or_else(|| format!(": {e}")),
    }
}

/// A cluster machine as the hub's sub-group selection sees it: active and running, no sessions.
fn active_record(m: &crate::config::cluster::Machine) -> MachineRecord {
    MachineRecord {
        id: m.id.clone(),
        service: m.service.clone(),
        version: m.version.clone(),
        address: m.address.clone(),
        role: Role::Active,
        status: Status::Running,
        capacity: m.weight,
        sessions: 0,
    }
}

impl Plan {
    /// Orders the `requested` services (name -> version) of a cluster; checks names, not versions.
    pub fn build(
        cluster: &Cluster,
        requested: &BTreeMap<String, String>,
    ) -> Result<Plan, PlanError> {
        if requested.is_empty() {
            return Err(PlanError::Empty);
        }
        if let Some(unknown) = requested
            .keys()
            .find(|s| !cluster.services.contains_key(*s))
        {
            return Err(PlanError::UnknownService(unknown.clone()));
        }
        let after: BTreeMap<&str, Vec<String>> = requested
            .keys()
            .map(|s| {
                (
                    s.as_str(),
                    nearest_released_dependencies(cluster, s, requested),
                )
            })
            .collect();
        // Kahn's algorithm over the release's own edges; the cluster is acyclic (validated).
        let mut waiting: BTreeMap<&str, usize> =
            after.iter().map(|(s, deps)| (*s, deps.len())).collect();
        let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (s, deps) in &after {
            for d in deps {
                dependents.entry(d.as_str()).or_default().push(s);
            }
        }
        let mut wave_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut current: Vec<&str> = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(s, _)| *s)
            .collect();
        let mut wave = 1;
        let mut entries = Vec::with_capacity(requested.len());
        while !current.is_empty() {
            current.sort_unstable();
            let mut next = Vec::new();
            for s in &current {
                wave_of.insert(s, wave);
                entries.push(PlanEntry {
                    service: s.to_string(),
                    version: requested[*s].clone(),
                    after: after[s].clone(),
                    wave,
                });
                for d in dependents.get(s).map(Vec::as_slice).unwrap_or_default() {
                    if let Some(n) = waiting.get_mut(d) {
                        *n -= 1;
                        if *n == 0 {
                            next.push(*d);
                        }
                    }
                }
            }
            current = next;
            wave += 1;
        }
        Ok(Plan { entries })
    }

    /// Like [`Plan::build`], and checks each version is one the service's machines run and is not
    /// the one it runs already (`current`: service -> running version).
    pub fn for_release(
        cluster: &Cluster,
        current: &BTreeMap<String, String>,
        requested: &BTreeMap<String, String>,
    ) -> Result<Plan, PlanError> {
        let plan = Plan::build(cluster, requested)?;
        for (service, version) in requested {
            let known = cluster.versions_of(service);
            if !known.contains(version) {
                return Err(PlanError::UnknownVersion {
                    service: service.clone(),
                    version: version.clone(),
                    known: known.into_iter().collect::<Vec<_>>().join(", "),
                });
            }
            if current.get(service) == Some(version) {
                return Err(PlanError::AlreadyRunning {
                    service: service.clone(),
                    version: version.clone(),
                });
            }
        }
        Ok(plan)
    }

    pub fn waves(&self) -> Vec<Vec<String>> {
        let mut waves: Vec<Vec<String>> = Vec::new();
        for e in &self.entries {
            if waves.len() < e.wave {
                waves.resize(e.wave, Vec::new());
            }
            waves[e.wave - 1].push(e.service.clone());
        }
        waves
    }

    /// The plan as a text table.
    pub fn table(&self) -> String {
        let mut rows = vec![vec![
            "wave".to_string(),
            "service".to_string(),
            "version".to_string(),
            "after".to_string(),
        ]];
        for e in &self.entries {
            rows.push(vec![
                e.wave.to_string(),
                e.service.clone(),
                e.version.clone(),
                if e.after.is_empty() {
                    "-".to_string()
                } else {
                    e.after.join(",")
                },
            ]);
        }
        crate::table::render(&rows)
    }
}

/// One service of a planned release: its wave, versions, what it waits for, the machines it moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanLine {
    pub wave: usize,
    pub service: String,
    pub from_version: String,
    pub to_version: String,
    pub after: Vec<String>,
    /// The machines the rollout moves: replaced (active) and joining (the new version).
    #[serde(default)]
    pub machines: Selection,
}

/// Why a release cannot be planned: a bad request, or one that clashes with the cluster's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Conflict(String),
}

/// The plan of a release, checked as every release is (the admin endpoint's and the CLI's dry
/// runs alike): the order from the dependency graph, a candidate machine of each new version,
/// sub-groups only of services in the release, each service's machines, none already busy.
pub fn plan_release(
    cluster: &Cluster,
    roles: &BTreeMap<String, MachineRole>,
    current: &BTreeMap<String, String>,
    busy: &BTreeSet<String>,
    services: &BTreeMap<String, String>,
    subgroups: &BTreeMap<String, SubgroupSpec>,
) -> Result<Vec<PlanLine>, Refusal> {
    let plan = Plan::for_release(cluster, current, services).map_err(|e| match e {
        PlanError::AlreadyRunning { .. } => Refusal::Conflict(e.to_string()),
        other => Refusal::Bad(other.to_string()),
    })?;
    for (service, version) in services {
        let available = cluster
            .machines_of(service)
            .any(|m| &m.version == version && roles.get(&m.id).is_some_and(|r| r.is_candidate()));
        if !available {
            return Err(Refusal::Bad(format!(
                "service `{service}` has no machine of version `{version}` outside the active configuration"
            )));
        }
    }
    if let Some(stray) = subgroups.keys().find(|s| !services.contains_key(*s)) {
        return Err(Refusal::Bad(format!(
            "subgroup.{stray}: service `{stray}` is not in this release"
        )));
    }
    let mut selections = BTreeMap::new();
    for (service, version) in services {
        let selection = Selection::choose(cluster, roles, service, version, subgroups.get(service))
            .map_err(|e| Refusal::Bad(e.to_string()))?;
        selections.insert(service.clone(), selection);
    }
    let clashing: Vec<&str> = services
        .keys()
        .filter(|s| busy.contains(*s))
        .map(String::as_str)
        .collect();
    if !clashing.is_empty() {
        return Err(Refusal::Conflict(format!(
            "already in a release that has not finished: {}",
            clashing.join(", ")
        )));
    }
    Ok(plan
        .entries
        .into_iter()
        .map(|e| PlanLine {
            wave: e.wave,
            from_version: current.get(&e.service).cloned().unwrap_or_default(),
            machines: selections.remove(&e.service).unwrap_or_default(),
            service: e.service,
            to_version: e.version,
            after: e.after,
        })
        .collect())
}

/// Release order of every service: waves of services whose dependencies are all in earlier waves.
pub fn release_waves(cluster: &Cluster) -> Vec<Vec<String>> {
    let all: BTreeMap<String, String> = cluster
        .services
        .values()
        .map(|s| (s.name.clone(), s.declared_version.clone()))
        .collect();
    match Plan::build(cluster, &all) {
        Ok(plan) => plan.waves(),
        Err(_) => Vec::new(),
    }
}

/// The roles a cluster file declares (as the controller assigns them on its first start):
/// `active` machines serve, a `simulation` machine of the serving version is a control, one of
/// another version a standby.
pub fn declared_roles(cluster: &Cluster) -> BTreeMap<String, MachineRole> {
    cluster
        .machines
        .iter()
        .map(|m| {
            let declared = &cluster.services[&m.service].declared_version;
            let role = match m.config {
                understudy_wire::PoolRole::Active => MachineRole::Active,
                understudy_wire::PoolRole::Simulation if &m.version == declared => {
                    MachineRole::Control
                }
                understudy_wire::PoolRole::Simulation => MachineRole::Standby,
            };
            (m.id.clone(), role)
        })
        .collect()
}

/// One line for plan tables: `all` for a whole service, else `a,b -> c,d`.
pub fn describe_moves(selection: &Selection) -> String {
    if selection.is_whole_service() {
        return "all".to_string();
    }
    let list = |ids: &BTreeSet<String>| ids.iter().cloned().collect::<Vec<_>>().join(",");
    format!(
        "{} -> {}",
        list(&selection.replaced),
        list(&selection.joining)
    )
}

/// `a, b, c`, or `none`.
fn names<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<&str> = ids.collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

/// Released services reached from `service` through its dependencies without passing through
/// another released service (the ones further down are ordered by those).
fn nearest_released_dependencies(
    cluster: &Cluster,
    service: &str,
    requested: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut found = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&str> = cluster.services[service]
        .depends_on
        .iter()
        .map(String::as_str)
        .collect();
    while let Some(node) = stack.pop() {
        if !seen.insert(node) {
            continue;
        }
        if requested.contains_key(node) {
            found.insert(node.to_string());
            continue;
        }
        stack.extend(cluster.services[node].depends_on.iter().map(String::as_str));
    }
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::parse;

    /// Builds a cluster from `service: deps` lines, each with a v1 and a v2 machine.
    fn cluster(edges: &[(&str, &[&str])]) -> Result<Cluster, crate::config::cluster::ConfigError> {
        let mut text = String::new();
        for (service, deps) in edges {
            let deps: Vec<String> = deps.iter().map(|d| format!("\"{d}\"")).collect();
            text.push_str(&format!(
                "[services.{service}]\ndepends_on = [{}]\n",
                deps.join(", ")
            ));
        }
        for (i, (service, _)) in edges.iter().enumerate() {
            for (j, (version, config)) in
                [("v1", "active"), ("v2", "simulation")].iter().enumerate()
            {
                text.push_str(&format!(
                    "[[machines]]\nid = \"{service}-{version}\"\nservice = \"{service}\"\nversion = \"{version}\"\naddress = \"127.0.0.1:{}\"\nconfig = \"{config}\"\n",
                    10_000 + 2 * i + j
                ));
            }
        }
        parse("plan.toml", &text)
    }

    fn release(names: &[&str]) -> BTreeMap<String, String> {
        names
            .iter()
            .map(|n| (n.to_string(), "v2".to_string()))
            .collect()
    }

    #[test]
    fn chain_moves_one_after_another() {
        let c = cluster(&[("a", &["b"]), ("b", &["c"]), ("c", &[])]).unwrap();
        let plan = Plan::build(&c, &release(&["a", "b", "c"])).unwrap();
        assert_eq!(plan.waves(), vec![vec!["c"], vec!["b"], vec!["a"]]);
        assert_eq!(plan.entries[2].after, vec!["b".to_string()]);
    }

    #[test]
    fn chain_with_a_gap_waits_through_the_unreleased_service() {
        let c = cluster(&[("a", &["b"]), ("b", &["c"]), ("c", &[])]).unwrap();
        let plan = Plan::build(&c, &release(&["a", "c"])).unwrap();
        assert_eq!(plan.waves(), vec![vec!["c"], vec!["a"]]);
        assert_eq!(plan.entries[1].after, vec!["c".to_string()]);
    }

    #[test]
    fn diamond_sides_move_together() {
        let c = cluster(&[
            ("top", &["left", "right"]),
            ("left", &["bottom"]),
            ("right", &["bottom"]),
            ("bottom", &[]),
        ])
        .unwrap();
        let plan = Plan::build(&c, &release(&["top", "left", "right", "bottom"])).unwrap();
        assert_eq!(
            plan.waves(),
            vec![vec!["bottom"], vec!["left", "right"], vec!["top"]]
        );
        let top = plan.entries.iter().find(|e| e.service == "top").unwrap();
        assert_eq!(top.after, vec!["left".to_string(), "right".to_string()]);
    }

    #[test]
    fn independent_branches_proceed_in_parallel() {
        let c = cluster(&[("a1", &["a2"]), ("a2", &[]), ("b1", &["b2"]), ("b2", &[])]).unwrap();
        let plan = Plan::build(&c, &release(&["a1", "a2", "b1", "b2"])).unwrap();
        assert_eq!(plan.waves(), vec![vec!["a2", "b2"], vec!["a1", "b1"]]);
        let a1 = plan.entries.iter().find(|e| e.service == "a1").unwrap();
        assert_eq!(a1.after, vec!["a2".to_string()]);
    }

    #[test]
    fn cycle_is_refused_with_names() {
        let err = cluster(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]).unwrap_err();
        match err {
            crate::config::cluster::ConfigError::Cycle { services, .. } => {
                assert_eq!(services.len(), 4, "{services:?}");
                assert_eq!(services.first(), services.last());
                let named: BTreeSet<&str> = services.iter().map(String::as_str).collect();
                assert_eq!(named, BTreeSet::from(["a", "b", "c"]));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn unknown_service_and_version_are_refused() {
        let c = cluster(&[("a", &[])]).unwrap();
        assert_eq!(
            Plan::build(&c, &release(&["zz"])),
            Err(PlanError::UnknownService("zz".into()))
        );
        let current = BTreeMap::from([("a".to_string(), "v1".to_string())]);
        let v9 = BTreeMap::from([("a".to_string(), "v9".to_string())]);
        assert!(matches!(
            Plan::for_release(&c, &current, &v9),
            Err(PlanError::UnknownVersion { .. })
        ));
        let v1 = BTreeMap::from([("a".to_string(), "v1".to_string())]);
        assert!(matches!(
            Plan::for_release(&c, &current, &v1),
            Err(PlanError::AlreadyRunning { .. })
        ));
        assert_eq!(Plan::build(&c, &BTreeMap::new()), Err(PlanError::Empty));
    }
}

#[cfg(test)]
mod subgroup_tests {
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use understudy_wire::PoolRole;

    use super::*;
    use crate::config::cluster::parse;
    use crate::runtime::balancer::FakeBalancer;
    use crate::runtime::controller::{Core, ReleaseRequest, RequestError};
    use crate::store::Store;
    use crate::testing::identical_pairs;

    /// Four v1 machines serving, a v1 control, three v2 machines waiting.
    const FLEET: &str = r#"
[controller]
tick_ms = 100
[defaults]
join_step_ms = 200
[services.media]
balancer = "http://127.0.0.1:9001"
[services.db]
balancer = "http://127.0.0.1:9002"
[[machines]]
id = "db-1"
service = "db"
version = "v1"
address = "127.0.0.1:8100"
config = "active"
[[machines]]
id = "db-2"
service = "db"
version = "v2"
address = "127.0.0.1:8101"
config = "simulation"
"#;

    fn fleet() -> String {
        let mut text = FLEET.to_string();
        let mut add = |id: &str, version: &str, config: &str, port: u16| {
            text.push_str(&format!(
                "[[machines]]\nid = \"{id}\"\nservice = \"media\"\nversion = \"{version}\"\naddress = \"127.0.0.1:{port}\"\nconfig = \"{config}\"\n"
            ));
        };
        for i in 1..=4 {
            add(&format!("media-{i}"), "v1", "active", 8000 + i);
        }
        add("media-c", "v1", "simulation", 8010);
        for (i, s) in ["a", "b", "c"].iter().enumerate() {
            add(&format!("media-v2{s}"), "v2", "simulation", 8020 + i as u16);
        }
        text
    }

    fn spec(json: serde_json::Value) -> SubgroupSpec {
        serde_json::from_value(json).expect("spec")
    }

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_sub_group_replaces_that_many_active_machines() {
        let cluster = parse("fleet.toml", &fleet()).unwrap();
        let roles = declared_roles(&cluster);
        let whole = Selection::choose(&cluster, &roles, "media", "v2", None).unwrap();
        assert!(whole.is_whole_service());
        assert_eq!(
            whole.replaced,
            ids(&["media-1", "media-2", "media-3", "media-4"])
        );
        assert_eq!(whole.joining, ids(&["media-v2a", "media-v2b", "media-v2c"]));
        assert_eq!(describe_moves(&whole), "all");

        let half = spec(serde_json::json!({"percent": 50}));
        let s = Selection::choose(&cluster, &roles, "media", "v2", Some(&half)).unwrap();
        assert_eq!(s.replaced, ids(&["media-1", "media-2"]));
        assert_eq!(s.joining, ids(&["media-v2a", "media-v2b"]));
        assert_eq!(describe_moves(&s), "media-1,media-2 -> media-v2a,media-v2b");

        let named = spec(serde_json::json!({"machines": ["media-4"]}));
        let s = Selection::choose(&cluster, &roles, "media", "v2", Some(&named)).unwrap();
        assert_eq!(s.replaced, ids(&["media-4"]));
        assert_eq!(s.joining, ids(&["media-v2a"]));

        let by_version = spec(serde_json::json!({"version": "v1"}));
        let larger = spec(serde_json::json!({"larger_of": {"percent": 25, "count": 2}}));
        let smaller = spec(serde_json::json!({"smaller_of": {"percent": 75, "count": 2}}));
        for (s, n) in [(&larger, 2), (&smaller, 2)] {
            let chosen = Selection::choose(&cluster, &roles, "media", "v2", Some(s)).unwrap();
            assert_eq!(chosen.replaced.len(), n);
            assert_eq!(chosen.joining.len(), n);
        }
        // Four v1 machines to replace, three v2 machines to take their place.
        let e = Selection::choose(&cluster, &roles, "media", "v2", Some(&by_version)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("subgroup.media: selects 4 active machine(s)"),
            "{e}"
        );
    }

    #[test]
    fn bad_sub_groups_name_the_field() {
        let cluster = parse("fleet.toml", &fleet()).unwrap();
        let roles = declared_roles(&cluster);
        let error = |json: serde_json::Value| {
            Selection::choose(&cluster, &roles, "media", "v2", Some(&spec(json)))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error(serde_json::json!({"count": 0})),
            "subgroup.media.count: must be at least 1"
        );
        assert!(error(serde_json::json!({"percent": 101})).starts_with("subgroup.media.percent"));
        assert!(error(serde_json::json!({"count": 1, "percent": 5}))
            .starts_with("subgroup.media: give exactly one"));
        assert!(error(serde_json::json!({"count": 9})).starts_with("subgroup.media.count"));
        let e = error(serde_json::json!({"machines": ["media-v2a"]}));
        assert!(
            e.starts_with("subgroup.media.machines: `media-v2a` is not an active machine")
                && e.contains("media-1, media-2, media-3, media-4"),
            "{e}"
        );
        assert!(error(serde_json::json!({"version": "v9"}))
            .starts_with("subgroup.media: selects no machine"));
        assert!(
            error(serde_json::json!({"larger_of": {"percent": 0, "count": 1}}))
                .starts_with("subgroup.media.larger_of.percent")
        );
    }

    #[test]
    fn cli_sub_group_flags() {
        let parsed = crate::cli::parse_subgroups(&[
            "media:percent=25".into(),
            "db:larger_of=33%,20".into(),
            "edge:machines=edge-1,edge-4".into(),
        ])
        .unwrap();
        assert_eq!(parsed["media"], spec(serde_json::json!({"percent": 25})));
        assert_eq!(
            parsed["db"],
            spec(serde_json::json!({"larger_of": {"percent": 33, "count": 20}}))
        );
        assert_eq!(
            parsed["edge"],
            spec(serde_json::json!({"machines": ["edge-1", "edge-4"]}))
        );
        for bad in [
            "media",
            "media:percent",
            "media:share=3",
            "media:count=x",
            "media:count=0",
            "media:larger_of=33",
        ] {
            assert!(crate::cli::parse_subgroups(&[bad.into()]).is_err(), "{bad}");
        }
        let twice = crate::cli::parse_subgroups(&["a:count=1".into(), "a:count=2".into()]);
        assert!(twice.unwrap_err().contains("named twice"));
    }

    #[test]
    fn scenario_sub_groups_are_checked_when_the_file_is_read() {
        let text = include_str!("../../scenarios/subgroup.toml");
        let scenario = crate::scenario::spec::parse("subgroup.toml", text).unwrap();
        assert_eq!(
            scenario.releases[0].subgroups["media"],
            spec(serde_json::json!({"larger_of": {"percent": 33, "count": 2}}))
        );
        let line = text
            .lines()
            .position(|l| l.starts_with("larger_of"))
            .unwrap();
        let error = |replacement: &str| {
            let bad = text.replace("larger_of = { percent = 33, count = 2 }", replacement);
            crate::scenario::spec::parse("subgroup.toml", &bad)
                .unwrap_err()
                .to_string()
        };
        // Three v1 machines asked for, two v2 machines to take their place.
        let e = error("count = 3");
        assert!(
            e.contains("field `release.subgroup.media`") && e.contains("only 2 machine(s)"),
            "{e}"
        );
        let e = error("counts = 3");
        assert!(
            e.contains(&format!("subgroup.toml:{}", line + 1)) && e.contains("counts"),
            "{e}"
        );
    }

    fn places(fake: &FakeBalancer) -> Vec<(String, PoolRole)> {
        fake.config("media")
            .expect("pushed")
            .machines
            .iter()
            .map(|m| (m.id.clone(), m.config))
            .collect()
    }

    fn place(list: &[(&str, PoolRole)]) -> Vec<(String, PoolRole)> {
        list.iter().map(|(id, p)| (id.to_string(), *p)).collect()
    }

    fn release(subgroup: Option<serde_json::Value>, dry_run: bool) -> ReleaseRequest {
        ReleaseRequest {
            services: BTreeMap::from([("media".to_string(), "v2".to_string())]),
            rollback_on_failure: false,
            dry_run,
            subgroup: subgroup
                .map(|s| BTreeMap::from([("media".to_string(), spec(s))]))
                .unwrap_or_default(),
        }
    }

    async fn run_to_the_end(core: &Core, fake: &FakeBalancer, rng: &mut StdRng, job: &mut u64) {
        for _ in 0..400 {
            let rollout = core.rollouts().into_iter().last().expect("rollout");
            if rollout.phase == "complete" {
                return;
            }
            if rollout.phase == "simulating" {
                fake.add_pairs("media", identical_pairs(rng, *job, 500, "v1", "v2", false));
                *job += 500;
            }
            tokio::time::advance(std::time::Duration::from_millis(100)).await;
            core.tick().await;
        }
        panic!("the rollout did not complete");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sub_group_release_moves_only_its_machines() {
        use PoolRole::{Active, Simulation};
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeBalancer::new());
        let cluster = parse("fleet.toml", &fleet()).unwrap();
        let open = || {
            Core::open(
                cluster.clone(),
                Store::open(&dir.path().join("state.db")).unwrap(),
                fake.clone(),
                "secret".into(),
            )
            .unwrap()
        };
        let core = open();
        core.tick().await;

        // Bad sub-groups are refused before anything is stored.
        let mut stray = release(None, false);
        stray
            .subgroup
            .insert("db".into(), spec(serde_json::json!({"count": 1})));
        assert_eq!(
            core.release(&stray).unwrap_err(),
            RequestError::BadRequest("subgroup.db: service `db` is not in this release".into())
        );
        assert!(matches!(
            core.release(&release(Some(serde_json::json!({"count": 0})), false)),
            Err(RequestError::BadRequest(m)) if m.starts_with("subgroup.media.count")
        ));
        assert!(core.rollouts().is_empty());

        let half = serde_json::json!({"percent": 50});
        let plan = core.release(&release(Some(half.clone()), true)).unwrap();
        assert_eq!(plan.plan[0].machines.replaced, ids(&["media-1", "media-2"]));
        assert!(core.rollouts().is_empty());
        let started = core.release(&release(Some(half), false)).unwrap();
        assert_eq!(
            started.rollouts[0].machines.joining,
            ids(&["media-v2a", "media-v2b"])
        );
        core.tick().await;
        // Only the sub-group's v2 machines are simulated.
        assert_eq!(
            places(&fake),
            place(&[
                ("media-1", Active),
                ("media-2", Active),
                ("media-3", Active),
                ("media-4", Active),
                ("media-c", Simulation),
                ("media-v2a", Simulation),
                ("media-v2b", Simulation),
            ])
        );
        // The selection survives a restart.
        drop(core);
        let core = open();
        assert_eq!(
            core.rollouts()[0].machines.replaced,
            ids(&["media-1", "media-2"])
        );
        let mut rng = StdRng::seed_from_u64(3);
        let mut job = 1;
        // Retiring keeps the rest of the service serving: hold a call on media-1 so the drain
        // is visible.
        fake.set_sessions("media", "media-1", 1);
        for _ in 0..400 {
            let phase = core.rollouts()[0].phase.clone();
            if phase == "retiring" {
                break;
            }
            if phase == "simulating" {
                fake.add_pairs(
                    "media",
                    identical_pairs(&mut rng, job, 500, "v1", "v2", false),
                );
                job += 500;
            }
            tokio::time::advance(std::time::Duration::from_millis(100)).await;
            core.tick().await;
        }
        core.tick().await;
        assert_eq!(core.rollouts()[0].phase, "retiring");
        assert_eq!(
            places(&fake),
            place(&[
                ("media-3", Active),
                ("media-4", Active),
                ("media-c", Simulation),
                ("media-v2a", Active),
                ("media-v2b", Active),
            ])
        );
        // media-1 still holds its call: the rollout waits (the monitor view shows it draining).
        tokio::time::advance(std::time::Duration::from_millis(1_000)).await;
        core.tick().await;
        assert_eq!(core.rollouts()[0].phase, "retiring");
        let draining = core.monitor_view().machines;
        assert_eq!(draining.len(), 1);
        assert_eq!(
            (
                draining[0].id.as_str(),
                draining[0].state,
                draining[0].balancer_sessions
            ),
            ("media-1", "draining", Some(1))
        );
        fake.set_sessions("media", "media-1", 0);
        run_to_the_end(&core, &fake, &mut rng, &mut job).await;
        let roles: BTreeMap<String, String> = core
            .machines()
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.role.as_str().to_string()))
            .collect();
        for (id, role) in [
            ("media-1", "retired"),
            ("media-2", "retired"),
            ("media-3", "active"),
            ("media-4", "active"),
            ("media-c", "control"),
            ("media-v2a", "active"),
            ("media-v2b", "active"),
            ("media-v2c", "standby"),
        ] {
            assert_eq!(roles[id], role, "{id}");
        }
        // Half the service still runs v1: the service's version is still v1.
        let media = core
            .services()
            .into_iter()
            .find(|s| s.name == "media")
            .unwrap();
        assert_eq!(media.version, "v1");

        // A second release moves the rest (the remaining v2 machine joins), keeping the v2
        // machines that already serve.
        core.release(&release(None, false)).unwrap();
        let second = core.rollouts().into_iter().last().unwrap();
        assert_eq!(second.machines.replaced, ids(&["media-3", "media-4"]));
        assert_eq!(second.machines.joining, ids(&["media-v2c"]));
        run_to_the_end(&core, &fake, &mut rng, &mut job).await;
        let media = core
            .services()
            .into_iter()
            .find(|s| s.name == "media")
            .unwrap();
        assert_eq!(media.version, "v2");
        assert_eq!(
            places(&fake),
            place(&[
                ("media-c", Simulation),
                ("media-v2a", Active),
                ("media-v2b", Active),
                ("media-v2c", Active),
            ])
        );
    }
}
