//! Release plans: which service of a release moves after which, from the dependency graph.
//!
//! A service waits for the nearest services it depends on (directly or through services outside the
//! release) that are in the same release. Services with nothing to wait for start together (wave 1),
//! so independent branches proceed in parallel and a diamond's two sides move at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::cluster::Cluster;

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
    use crate::cluster::parse;

    /// Builds a cluster from `service: deps` lines, each with a v1 and a v2 machine.
    fn cluster(edges: &[(&str, &[&str])]) -> Result<Cluster, crate::cluster::ConfigError> {
        let mut text = String::new();
        for (service, deps) in edges {
            let deps: Vec<String> = deps.iter().map(|d| format!("\"{d}\"")).collect();
            text.push_str(&format!(
                "[services.{service}]\ndepends_on = [{}]\n",
                deps.join(", ")
            ));
        }
        for (i, (service, _)) in edges.iter().enumerate() {
            for (version, config) in [("v1", "active"), ("v2", "simulation")] {
                text.push_str(&format!(
                    "[[machines]]\nid = \"{service}-{version}\"\nservice = \"{service}\"\nversion = \"{version}\"\naddress = \"127.0.0.1:{}\"\nconfig = \"{config}\"\n",
                    10_000 + i
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
            crate::cluster::ConfigError::Cycle { services, .. } => {
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
