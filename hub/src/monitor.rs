//! Monitor rules: compare desired with actual state and say what to do, as a pure function of
//! its inputs (no memory of earlier ticks: whatever must persist, such as when a drain began, is
//! part of the actual state).
//!
//! Rules file (TOML), each rule `when` a condition `then` actions:
//! ```toml
//! drain_timeout_secs = 30
//! [[rule]]
//! when = "active_machine_down"
//! then = ["remove_from_balancer", "request_replacement"]
//! [[rule]]
//! when = "running_not_in_balancer"
//! then = ["add_to_balancer"]
//! [[rule]]
//! when = "version_drift"
//! then = ["report_drift"]          # or also "update_version"
//! [scaling]
//! min_running_active = 2           # threshold for request_replacement, every service
//! per_service = { media = 3 }      # overrides
//! ```
//! A machine that holds sessions is never altered (removed, updated) until they end or the drain
//! timeout passed since its drain began; it is drained first.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::registry::{MachineRecord, Role, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// A machine of an active pool (role active, in its balancer) is down.
    ActiveMachineDown,
    /// A running machine that belongs in its balancer is not there.
    RunningNotInBalancer,
    /// A machine runs a version other than the desired one.
    VersionDrift,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    RemoveFromBalancer,
    RequestReplacement,
    AddToBalancer,
    ReportDrift,
    UpdateVersion,
}

impl Condition {
    fn allows(self, action: RuleAction) -> bool {
        use RuleAction::*;
        match self {
            Condition::ActiveMachineDown => {
                matches!(action, RemoveFromBalancer | RequestReplacement)
            }
            Condition::RunningNotInBalancer => matches!(action, AddToBalancer),
            Condition::VersionDrift => matches!(action, ReportDrift | UpdateVersion),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    when: Condition,
    then: Vec<RuleAction>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScalingSpec {
    min_running_active: Option<u32>,
    #[serde(default)]
    per_service: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesSpec {
    #[serde(default = "default_drain_timeout_secs")]
    drain_timeout_secs: u64,
    #[serde(default)]
    rule: Vec<RuleSpec>,
    #[serde(default)]
    scaling: ScalingSpec,
}

fn default_drain_timeout_secs() -> u64 {
    30
}

/// Validated rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub drain_timeout_ms: u64,
    then: BTreeMap<Condition, BTreeSet<RuleAction>>,
    default_min_running_active: Option<u32>,
    min_running_active: BTreeMap<String, u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    #[error("rules: {0}")]
    Toml(String),
    #[error("rules: rule[{index}].then: `{action:?}` does not apply when `{when:?}`")]
    ActionNotAllowed {
        index: usize,
        when: Condition,
        action: RuleAction,
    },
    #[error("rules: rule[{index}].then is empty")]
    EmptyThen { index: usize },
    #[error("rules: rule[{index}].when: `{when:?}` already has a rule (rule[{first}])")]
    DuplicateWhen {
        index: usize,
        first: usize,
        when: Condition,
    },
    #[error("rules: rule[{index}].then: `request_replacement` needs scaling.min_running_active or scaling.per_service")]
    NoScalingThreshold { index: usize },
    #[error("rules: drain_timeout_secs must be at least 1")]
    ZeroDrainTimeout,
}

impl Rules {
    /// Parses and validates; toml's errors name the field and the line.
    pub fn from_toml(text: &str) -> Result<Rules, RulesError> {
        let spec: RulesSpec = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        if spec.drain_timeout_secs == 0 {
            return Err(RulesError::ZeroDrainTimeout);
        }
        let has_threshold =
            spec.scaling.min_running_active.is_some() || !spec.scaling.per_service.is_empty();
        let mut then: BTreeMap<Condition, BTreeSet<RuleAction>> = BTreeMap::new();
        let mut first_index = BTreeMap::new();
        for (index, rule) in spec.rule.iter().enumerate() {
            if rule.then.is_empty() {
                return Err(RulesError::EmptyThen { index });
            }
            if let Some(&first) = first_index.get(&rule.when) {
                return Err(RulesError::DuplicateWhen {
                    index,
                    first,
                    when: rule.when,
                });
            }
            first_index.insert(rule.when, index);
            for &action in &rule.then {
                if !rule.when.allows(action) {
                    return Err(RulesError::ActionNotAllowed {
                        index,
                        when: rule.when,
                        action,
                    });
                }
                if action == RuleAction::RequestReplacement && !has_threshold {
                    return Err(RulesError::NoScalingThreshold { index });
                }
            }
            then.insert(rule.when, rule.then.iter().copied().collect());
        }
        Ok(Rules {
            drain_timeout_ms: spec.drain_timeout_secs * 1000,
            then,
            default_min_running_active: spec.scaling.min_running_active,
            min_running_active: spec.scaling.per_service,
        })
    }

    /// The default rules: remove down machines, add missing ones, report drift.
    pub fn standard() -> Rules {
        Rules::from_toml(
            r#"
            [[rule]]
            when = "active_machine_down"
            then = ["remove_from_balancer"]
            [[rule]]
            when = "running_not_in_balancer"
            then = ["add_to_balancer"]
            [[rule]]
            when = "version_drift"
            then = ["report_drift"]
            "#,
        )
        .expect("standard rules are valid")
    }

    fn does(&self, when: Condition, action: RuleAction) -> bool {
        self.then
            .get(&when)
            .is_some_and(|set| set.contains(&action))
    }

    fn threshold(&self, service: &str) -> Option<u32> {
        self.min_running_active
            .get(service)
            .copied()
            .or(self.default_min_running_active)
    }
}

/// What the controller wants, per service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<String, DesiredService>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// The version its active and control machines should run.
    pub version: String,
    /// Machines that belong in the service's balancer (either pool).
    pub balancer_members: BTreeSet<String>,
    /// Per-machine target versions (a release's sub-group), overriding `version`.
    pub machine_versions: BTreeMap<String, String>,
}

impl DesiredService {
    /// The version `machine` should run, if any is wanted of it.
    fn version_for(&self, machine: &MachineRecord) -> Option<&str> {
        if let Some(v) = self.machine_versions.get(&machine.id) {
            return Some(v);
        }
        matches!(machine.role, Role::Active | Role::Control).then_some(self.version.as_str())
    }
}

/// What is observed now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualState {
    pub now_ms: u64,
    pub machines: Vec<ObservedMachine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedMachine {
    pub record: MachineRecord,
    /// Listed in its service's balancer config (either pool).
    pub in_balancer: bool,
    /// When its balancer began draining it, if it is draining.
    pub draining_since_ms: Option<u64>,
}

/// What the monitor asks for. `evaluate` returns them sorted by kind in this declaration order
/// (balancers are prepared first), then service, then machine: deterministic output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Prepare the balancer: no new sessions to the machine; it keeps the ones it holds.
    Drain {
        service: String,
        machine: String,
        sessions: u32,
    },
    /// The machine is draining; nothing may change it before `until_ms` unless its sessions end.
    AwaitSessions {
        service: String,
        machine: String,
        sessions: u32,
        until_ms: u64,
    },
    RemoveFromBalancer {
        service: String,
        machine: String,
    },
    AddToBalancer {
        service: String,
        machine: String,
    },
    RequestReplacement {
        service: String,
        missing: u32,
    },
    ReportDrift {
        service: String,
        machine: String,
        running: String,
        desired: String,
    },
    UpdateVersion {
        service: String,
        machine: String,
        to_version: String,
    },
}

/// The gate before altering a machine: `Ok(())` when it may be altered now, otherwise the action
/// that protects its sessions.
fn sessions_gate(m: &ObservedMachine, now_ms: u64, drain_timeout_ms: u64) -> Result<(), Action> {
    let r = &m.record;
    if r.sessions == 0 {
        return Ok(());
    }
    match m.draining_since_ms {
        None => Err(Action::Drain {
            service: r.service.clone(),
            machine: r.id.clone(),
            sessions: r.sessions,
        }),
        Some(since) if now_ms.saturating_sub(since) >= drain_timeout_ms => Ok(()),
        Some(since) => Err(Action::AwaitSessions {
            service: r.service.clone(),
            machine: r.id.clone(),
            sessions: r.sessions,
            until_ms: since + drain_timeout_ms,
        }),
    }
}

/// `alter` when the machine may be altered now, otherwise the action that protects its sessions.
fn gated(
    m: &ObservedMachine,
    now_ms: u64,
    drain_timeout_ms: u64,
    alter: impl FnOnce() -> Action,
) -> Action {
    match sessions_gate(m, now_ms, drain_timeout_ms) {
        Ok(()) => alter(),
        Err(protect) => protect,
    }
}

/// One tick of the monitor.
pub fn evaluate(desired: &DesiredState, actual: &ActualState, rules: &Rules) -> Vec<Action> {
    let mut actions = BTreeSet::new();
    for m in &actual.machines {
        let Some(want) = desired.services.get(&m.record.service) else {
            continue;
        };
        machine_actions(m, want, actual.now_ms, rules, &mut actions);
    }
    if rules.does(Condition::ActiveMachineDown, RuleAction::RequestReplacement) {
        for service in desired.services.keys() {
            if let Some(request) = replacement_request(service, actual, rules) {
                actions.insert(request);
            }
        }
    }
    actions.into_iter().collect()
}

/// What one machine of a desired service calls for: removal, addition, drift.
fn machine_actions(
    m: &ObservedMachine,
    want: &DesiredService,
    now: u64,
    rules: &Rules,
    actions: &mut BTreeSet<Action>,
) {
    let r = &m.record;
    // A machine is altered at most once per tick: removal takes precedence over an update.
    let mut altered = false;

    if r.role == Role::Active
        && r.status == Status::Down
        && m.in_balancer
        && rules.does(Condition::ActiveMachineDown, RuleAction::RemoveFromBalancer)
    {
        altered = true;
        actions.insert(gated(m, now, rules.drain_timeout_ms, || {
            Action::RemoveFromBalancer {
                service: r.service.clone(),
                machine: r.id.clone(),
            }
        }));
    }

    if r.status == Status::Running
        && !m.in_balancer
        && want.balancer_members.contains(&r.id)
        && rules.does(Condition::RunningNotInBalancer, RuleAction::AddToBalancer)
    {
        actions.insert(Action::AddToBalancer {
            service: r.service.clone(),
            machine: r.id.clone(),
        });
    }

    if let Some(desired_version) = want.version_for(r) {
        if r.version != desired_version {
            drift_actions(m, desired_version, !altered, now, rules, actions);
        }
    }
}

/// A machine runs another version than `desired_version`: report it, and update it unless
/// `may_update` is false (it was already altered this tick).
fn drift_actions(
    m: &ObservedMachine,
    desired_version: &str,
    may_update: bool,
    now: u64,
    rules: &Rules,
    actions: &mut BTreeSet<Action>,
) {
    let r = &m.record;
    if rules.does(Condition::VersionDrift, RuleAction::ReportDrift) {
        actions.insert(Action::ReportDrift {
            service: r.service.clone(),
            machine: r.id.clone(),
            running: r.version.clone(),
            desired: desired_version.to_string(),
        });
    }
    if may_update && rules.does(Condition::VersionDrift, RuleAction::UpdateVersion) {
        actions.insert(gated(m, now, rules.drain_timeout_ms, || {
            Action::UpdateVersion {
                service: r.service.clone(),
                machine: r.id.clone(),
                to_version: desired_version.to_string(),
            }
        }));
    }
}

/// Replacements for `service` when an active machine is down and fewer than its threshold of
/// active machines run.
fn replacement_request(service: &str, actual: &ActualState, rules: &Rules) -> Option<Action> {
    let threshold = rules.threshold(service)?;
    let machines = actual
        .machines
        .iter()
        .map(|m| &m.record)
        .filter(|r| r.service == service);
    let any_down = machines
        .clone()
        .any(|r| r.role == Role::Active && r.status == Status::Down);
    let healthy = machines
        .filter(|r| r.role == Role::Active && r.status == Status::Running)
        .count() as u32;
    (any_down && healthy < threshold).then(|| Action::RequestReplacement {
        service: service.to_string(),
        missing: threshold - healthy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::machine;

    fn observed(
        id: &str,
        version: &str,
        role: Role,
        status: Status,
        in_balancer: bool,
    ) -> ObservedMachine {
        ObservedMachine {
            record: machine(id, "media", version, role, status),
            in_balancer,
            draining_since_ms: None,
        }
    }

    fn desired(members: &[&str]) -> DesiredState {
        DesiredState {
            services: BTreeMap::from([(
                "media".to_string(),
                DesiredService {
                    version: "v1".into(),
                    balancer_members: members.iter().map(|s| s.to_string()).collect(),
                    machine_versions: BTreeMap::new(),
                },
            )]),
        }
    }

    fn actual(machines: Vec<ObservedMachine>) -> ActualState {
        ActualState {
            now_ms: 100_000,
            machines,
        }
    }

    const WITH_SCALING: &str = r#"
        drain_timeout_secs = 10
        [[rule]]
        when = "active_machine_down"
        then = ["remove_from_balancer", "request_replacement"]
        [[rule]]
        when = "running_not_in_balancer"
        then = ["add_to_balancer"]
        [[rule]]
        when = "version_drift"
        then = ["report_drift", "update_version"]
        [scaling]
        min_running_active = 2
    "#;

    #[test]
    fn down_active_machine_is_removed_and_replacement_requested_under_threshold() {
        let a = actual(vec![
            observed("m1", "v1", Role::Active, Status::Down, true),
            observed("m2", "v1", Role::Active, Status::Running, true),
        ]);
        let d = desired(&["m1", "m2"]);
        assert_eq!(
            evaluate(&d, &a, &Rules::standard()),
            vec![Action::RemoveFromBalancer {
                service: "media".into(),
                machine: "m1".into()
            }]
        );
        let rules = Rules::from_toml(WITH_SCALING).unwrap();
        assert_eq!(
            evaluate(&d, &a, &rules),
            vec![
                Action::RemoveFromBalancer {
                    service: "media".into(),
                    machine: "m1".into()
                },
                Action::RequestReplacement {
                    service: "media".into(),
                    missing: 1
                },
            ]
        );
        // Already out of the balancer: nothing to remove, but still short of machines.
        let a = actual(vec![observed(
            "m1",
            "v1",
            Role::Active,
            Status::Down,
            false,
        )]);
        assert_eq!(
            evaluate(&d, &a, &rules),
            vec![Action::RequestReplacement {
                service: "media".into(),
                missing: 2
            }]
        );
        // A down standby machine is not of the active pool.
        let a = actual(vec![observed(
            "m3",
            "v2",
            Role::Standby,
            Status::Down,
            true,
        )]);
        assert!(evaluate(&d, &a, &rules).is_empty());
    }

    #[test]
    fn running_machine_missing_from_its_balancer_is_added() {
        let d = desired(&["m1", "m2"]);
        let a = actual(vec![
            observed("m1", "v1", Role::Active, Status::Running, false),
            observed("m2", "v1", Role::Active, Status::Starting, false),
            observed("m9", "v1", Role::Active, Status::Running, false),
        ]);
        assert_eq!(
            evaluate(&d, &a, &Rules::standard()),
            vec![Action::AddToBalancer {
                service: "media".into(),
                machine: "m1".into()
            }]
        );
    }

    #[test]
    fn version_drift_is_reported_and_sub_group_targets_override() {
        let mut d = desired(&["m1", "m2", "m3"]);
        d.services
            .get_mut("media")
            .unwrap()
            .machine_versions
            .insert("m3".into(), "v2".into());
        let a = actual(vec![
            observed("m1", "v0", Role::Active, Status::Running, true),
            observed("m2", "v1", Role::Active, Status::Running, true),
            observed("m3", "v1", Role::Standby, Status::Running, true),
            observed("m4", "v7", Role::Standby, Status::Running, false),
        ]);
        assert_eq!(
            evaluate(&d, &a, &Rules::standard()),
            vec![
                Action::ReportDrift {
                    service: "media".into(),
                    machine: "m1".into(),
                    running: "v0".into(),
                    desired: "v1".into()
                },
                Action::ReportDrift {
                    service: "media".into(),
                    machine: "m3".into(),
                    running: "v1".into(),
                    desired: "v2".into()
                },
            ]
        );
    }

    #[test]
    fn machine_holding_sessions_is_drained_before_it_is_altered() {
        let rules = Rules::from_toml(WITH_SCALING).unwrap();
        let mut d = desired(&["m1"]);
        d.services.get_mut("media").unwrap().version = "v2".into();
        let mut m = observed("m1", "v1", Role::Active, Status::Running, true);
        m.record.sessions = 3;
        let drift = Action::ReportDrift {
            service: "media".into(),
            machine: "m1".into(),
            running: "v1".into(),
            desired: "v2".into(),
        };

        // Holding calls, not yet draining: drain first.
        assert_eq!(
            evaluate(&d, &actual(vec![m.clone()]), &rules),
            vec![
                Action::Drain {
                    service: "media".into(),
                    machine: "m1".into(),
                    sessions: 3
                },
                drift.clone()
            ]
        );
        // Draining for 5 s of the 10 s timeout: wait.
        m.draining_since_ms = Some(95_000);
        assert_eq!(
            evaluate(&d, &actual(vec![m.clone()]), &rules),
            vec![
                Action::AwaitSessions {
                    service: "media".into(),
                    machine: "m1".into(),
                    sessions: 3,
                    until_ms: 105_000
                },
                drift.clone()
            ]
        );
        // The timeout passed: alter it.
        m.draining_since_ms = Some(90_000);
        let update = Action::UpdateVersion {
            service: "media".into(),
            machine: "m1".into(),
            to_version: "v2".into(),
        };
        assert_eq!(
            evaluate(&d, &actual(vec![m.clone()]), &rules),
            vec![drift.clone(), update.clone()]
        );
        // Or its sessions ended.
        m.draining_since_ms = Some(99_000);
        m.record.sessions = 0;
        assert_eq!(
            evaluate(&d, &actual(vec![m.clone()]), &rules),
            vec![drift, update]
        );

        // The same gate holds for removing a down machine that still reports calls.
        let mut down = observed("m1", "v2", Role::Active, Status::Down, true);
        down.record.sessions = 1;
        let got = evaluate(&d, &actual(vec![down]), &rules);
        assert_eq!(
            got[0],
            Action::Drain {
                service: "media".into(),
                machine: "m1".into(),
                sessions: 1
            }
        );
    }

    #[test]
    fn evaluation_has_no_memory() {
        let rules = Rules::from_toml(WITH_SCALING).unwrap();
        let d = desired(&["m1"]);
        let a = actual(vec![observed("m1", "v1", Role::Active, Status::Down, true)]);
        assert_eq!(evaluate(&d, &a, &rules), evaluate(&d, &a, &rules));
    }

    #[test]
    fn rules_config_errors_name_the_field() {
        let e = Rules::from_toml("drain_timeout = 3").unwrap_err();
        assert!(e.to_string().contains("drain_timeout"), "{e}");
        let e = Rules::from_toml("[[rule]]\nwhen = \"machine_sad\"\nthen = []").unwrap_err();
        assert!(e.to_string().contains("machine_sad"), "{e}");
        let e =
            Rules::from_toml("[[rule]]\nwhen = \"version_drift\"\nthen = [\"add_to_balancer\"]")
                .unwrap_err();
        assert_eq!(
            e,
            RulesError::ActionNotAllowed {
                index: 0,
                when: Condition::VersionDrift,
                action: RuleAction::AddToBalancer
            }
        );
        assert!(e.to_string().contains("rule[0].then"), "{e}");
        let e = Rules::from_toml(
            "[[rule]]\nwhen = \"active_machine_down\"\nthen = [\"request_replacement\"]",
        )
        .unwrap_err();
        assert_eq!(e, RulesError::NoScalingThreshold { index: 0 });
        let e = Rules::from_toml(
            "[[rule]]\nwhen = \"version_drift\"\nthen = [\"report_drift\"]\n[[rule]]\nwhen = \"version_drift\"\nthen = [\"update_version\"]",
        )
        .unwrap_err();
        assert!(matches!(
            e,
            RulesError::DuplicateWhen {
                index: 1,
                first: 0,
                ..
            }
        ));
        assert_eq!(
            Rules::from_toml("drain_timeout_secs = 0").unwrap_err(),
            RulesError::ZeroDrainTimeout
        );
        let e = Rules::from_toml("[scaling]\nmin_running = 2").unwrap_err();
        assert!(e.to_string().contains("min_running"), "{e}");
        // No rules at all: nothing is done.
        let none = Rules::from_toml("").unwrap();
        let a = actual(vec![observed("m1", "v0", Role::Active, Status::Down, true)]);
        assert!(evaluate(&desired(&["m1"]), &a, &none).is_empty());
    }

    #[test]
    fn per_service_threshold_overrides_the_default() {
        let rules = Rules::from_toml(
            "[[rule]]\nwhen = \"active_machine_down\"\nthen = [\"request_replacement\"]\n[scaling]\nper_service = { media = 3 }",
        )
        .unwrap();
        let a = actual(vec![
            observed("m1", "v1", Role::Active, Status::Down, false),
            observed("m2", "v1", Role::Active, Status::Running, true),
        ]);
        assert_eq!(
            evaluate(&desired(&["m1", "m2"]), &a, &rules),
            vec![Action::RequestReplacement {
                service: "media".into(),
                missing: 2
            }]
        );
    }
}
