//! Which of a service's machines a release targets. Exactly one form, e.g. in a release's TOML:
//! ```toml
//! [target]
//! machines = ["m1", "m4"]             # named ids
//! # count = 3                         # the first 3 by id
//! # percent = 25                      # ceil(25% of the machines), at least 1
//! # version = "v1"                    # every machine running v1
//! # larger_of = { percent = 33, count = 20 }   # max of the two (clamped to the machines there)
//! # smaller_of = { percent = 50, count = 4 }
//! ```
//! Selection is deterministic: candidates are the service's machines sorted by id, and a count
//! takes the first ones.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::registry::MachineRecord;

/// The part of a service's active machines a release moves: exactly one field is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubgroupSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub larger_of: Option<PercentAndCount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smaller_of: Option<PercentAndCount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PercentAndCount {
    pub percent: u32,
    pub count: u32,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subgroup {
    Named(BTreeSet<String>),
    Count(u32),
    Percent(u32),
    Version(String),
    LargerOf { percent: u32, count: u32 },
    SmallerOf { percent: u32, count: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubgroupError {
    #[error("target: {0}")]
    Toml(String),
    #[error("target: give exactly one of machines, count, percent, version, larger_of, smaller_of (got {0})")]
    NotExactlyOne(String),
    #[error("target.{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("target.machines: {0:?} is not a machine of service {1:?}")]
    UnknownMachine(String, String),
    #[error("target.count: {wanted} machines wanted, service {service:?} has {available}")]
    NotEnoughMachines {
        service: String,
        wanted: u32,
        available: usize,
    },
    #[error("target: selects no machine of service {0:?}")]
    Empty(String),
}

fn check_percent(field: &'static str, p: u32) -> Result<(), SubgroupError> {
    if p == 0 || p > 100 {
        return Err(SubgroupError::Invalid {
            field,
            problem: format!("{p} is not in 1..=100"),
        });
    }
    Ok(())
}

fn check_count(field: &'static str, c: u32) -> Result<(), SubgroupError> {
    if c == 0 {
        return Err(SubgroupError::Invalid {
            field,
            problem: "must be at least 1".into(),
        });
    }
    Ok(())
}

impl SubgroupSpec {
    pub fn validate(&self) -> Result<Subgroup, SubgroupError> {
        let given: Vec<&str> = [
            ("machines", self.machines.is_some()),
            ("count", self.count.is_some()),
            ("percent", self.percent.is_some()),
            ("version", self.version.is_some()),
            ("larger_of", self.larger_of.is_some()),
            ("smaller_of", self.smaller_of.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if given.len() != 1 {
            let got = if given.is_empty() {
                "none".to_string()
            } else {
                given.join(", ")
            };
            return Err(SubgroupError::NotExactlyOne(got));
        }
        if let Some(ids) = &self.machines {
            if ids.is_empty() {
                return Err(SubgroupError::Invalid {
                    field: "machines",
                    problem: "is empty".into(),
                });
            }
            let set: BTreeSet<String> = ids.iter().cloned().collect();
            if set.len() != ids.len() {
                return Err(SubgroupError::Invalid {
                    field: "machines",
                    problem: "names a machine twice".into(),
                });
            }
            return Ok(Subgroup::Named(set));
        }
        if let Some(c) = self.count {
            check_count("count", c)?;
            return Ok(Subgroup::Count(c));
        }
        if let Some(p) = self.percent {
            check_percent("percent", p)?;
            return Ok(Subgroup::Percent(p));
        }
        if let Some(v) = &self.version {
            if v.trim().is_empty() {
                return Err(SubgroupError::Invalid {
                    field: "version",
                    problem: "is empty".into(),
                });
            }
            return Ok(Subgroup::Version(v.clone()));
        }
        if let Some(PercentAndCount { percent, count }) = self.larger_of {
            check_percent("larger_of.percent", percent)?;
            check_count("larger_of.count", count)?;
            return Ok(Subgroup::LargerOf { percent, count });
        }
        let PercentAndCount { percent, count } = self.smaller_of.expect("exactly one is set");
        check_percent("smaller_of.percent", percent)?;
        check_count("smaller_of.count", count)?;
        Ok(Subgroup::SmallerOf { percent, count })
    }
}

impl Subgroup {
    pub fn from_toml(text: &str) -> Result<Subgroup, SubgroupError> {
        let spec: SubgroupSpec =
            toml::from_str(text).map_err(|e| SubgroupError::Toml(e.to_string()))?;
        spec.validate()
    }

    /// The ids of `service`'s machines this targets, sorted.
    pub fn select(
        &self,
        service: &str,
        machines: &[MachineRecord],
    ) -> Result<Vec<String>, SubgroupError> {
        let mut ids: Vec<&MachineRecord> =
            machines.iter().filter(|m| m.service == service).collect();
        ids.sort_by(|a, b| a.id.cmp(&b.id));
        ids.dedup_by(|a, b| a.id == b.id);
        let n = ids.len();
        let percent_of = |p: u32| (n * p as usize).div_ceil(100).max(1);
        let first = |k: usize| ids.iter().take(k).map(|m| m.id.clone()).collect::<Vec<_>>();
        let chosen = match self {
            Subgroup::Named(wanted) => {
                for id in wanted {
                    if !ids.iter().any(|m| &m.id == id) {
                        return Err(SubgroupError::UnknownMachine(
                            id.clone(),
                            service.to_string(),
                        ));
                    }
                }
                wanted.iter().cloned().collect()
            }
            Subgroup::Count(c) => {
                if *c as usize > n {
                    return Err(SubgroupError::NotEnoughMachines {
                        service: service.to_string(),
                        wanted: *c,
                        available: n,
                    });
                }
                first(*c as usize)
            }
            Subgroup::Percent(p) => first(percent_of(*p)),
            Subgroup::Version(v) => ids
                .iter()
                .filter(|m| &m.version == v)
                .map(|m| m.id.clone())
                .collect(),
            // "The larger of 33% and 20": a floor that may exceed the service; take all there are.
            Subgroup::LargerOf { percent, count } => {
                first(percent_of(*percent).max(*count as usize))
            }
            Subgroup::SmallerOf { percent, count } => {
                first(percent_of(*percent).min(*count as usize))
            }
        };
        if chosen.is_empty() {
            return Err(SubgroupError::Empty(service.to_string()));
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{machine, Role, Status};

    fn fleet(n: usize) -> Vec<MachineRecord> {
        // Inserted in reverse to show the result does not depend on input order.
        (0..n)
            .rev()
            .map(|i| {
                let version = if i % 3 == 0 { "v2" } else { "v1" };
                machine(
                    &format!("m{i:03}"),
                    "media",
                    version,
                    Role::Active,
                    Status::Running,
                )
            })
            .chain([machine(
                "r001",
                "router",
                "v1",
                Role::Active,
                Status::Running,
            )])
            .collect()
    }

    fn select(toml: &str, n: usize) -> Result<Vec<String>, SubgroupError> {
        Subgroup::from_toml(toml)?.select("media", &fleet(n))
    }

    #[test]
    fn each_form_selects_deterministically() {
        assert_eq!(
            select("machines = [\"m004\", \"m001\"]", 10).unwrap(),
            ["m001", "m004"]
        );
        assert_eq!(select("count = 3", 10).unwrap(), ["m000", "m001", "m002"]);
        // ceil(25% of 10) = 3; 33% of 100 is exactly 33.
        assert_eq!(select("percent = 25", 10).unwrap().len(), 3);
        assert_eq!(select("percent = 33", 100).unwrap().len(), 33);
        assert_eq!(select("percent = 1", 10).unwrap(), ["m000"]);
        assert_eq!(
            select("version = \"v2\"", 10).unwrap(),
            ["m000", "m003", "m006", "m009"]
        );
        assert_eq!(
            select("percent = 50", 10).unwrap(),
            select("percent = 50", 10).unwrap()
        );
    }

    #[test]
    fn larger_and_smaller_of_percent_and_count() {
        let rule = "larger_of = { percent = 33, count = 20 }";
        assert_eq!(select(rule, 100).unwrap().len(), 33);
        assert_eq!(select(rule, 30).unwrap().len(), 20);
        // Fewer machines than the floor: all of them.
        assert_eq!(select(rule, 12).unwrap().len(), 12);
        let rule = "smaller_of = { percent = 50, count = 4 }";
        assert_eq!(select(rule, 100).unwrap().len(), 4);
        assert_eq!(select(rule, 6).unwrap(), ["m000", "m001", "m002"]);
    }

    #[test]
    fn bad_targets_name_the_field() {
        assert_eq!(
            select("", 5).unwrap_err(),
            SubgroupError::NotExactlyOne("none".into())
        );
        assert_eq!(
            select("count = 2\npercent = 5", 5).unwrap_err(),
            SubgroupError::NotExactlyOne("count, percent".into())
        );
        assert!(select("percent = 0", 5)
            .unwrap_err()
            .to_string()
            .contains("target.percent"));
        assert!(select("percent = 101", 5)
            .unwrap_err()
            .to_string()
            .contains("target.percent"));
        assert!(select("count = 0", 5)
            .unwrap_err()
            .to_string()
            .contains("target.count"));
        let e = select("larger_of = { percent = 33, count = 0 }", 5).unwrap_err();
        assert!(e.to_string().contains("target.larger_of.count"), "{e}");
        let e = select("larger_of = { percent = 33 }", 5).unwrap_err();
        assert!(e.to_string().contains("count"), "{e}");
        let e = select("counts = 3", 5).unwrap_err();
        assert!(e.to_string().contains("counts"), "{e}");
        assert!(select("machines = []", 5).is_err());
        assert!(select("machines = [\"m001\", \"m001\"]", 5).is_err());
        assert_eq!(
            select("machines = [\"r001\"]", 5).unwrap_err(),
            SubgroupError::UnknownMachine("r001".into(), "media".into())
        );
        assert_eq!(
            select("count = 6", 5).unwrap_err(),
            SubgroupError::NotEnoughMachines {
                service: "media".into(),
                wanted: 6,
                available: 5
            }
        );
        assert_eq!(
            select("version = \"v9\"", 5).unwrap_err(),
            SubgroupError::Empty("media".into())
        );
        assert_eq!(
            select("percent = 50", 0).unwrap_err(),
            SubgroupError::Empty("media".into())
        );
    }
}
