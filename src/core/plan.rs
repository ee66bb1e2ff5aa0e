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
