//! The monitor's tick on the controller's state: what the controller wants against what the
//! registry and the balancers report, the actions that follow, and the listing of them.

use super::{desired_machines, lock, Core, State};
use crate::core::monitor::{
    action_name, alters_watched, repeat_key, rule_of, ActionRecord, HeldOut, HoldReason,
};
use crate::core::roles::MachineRole;
use crate::runtime::monitor::{
    MachinePresence, MonitorView, Outbound, RECENT_ACTIONS, SCALE_TOPIC, UPDATE_TOPIC,
};
use crate::store::monitor::{drop_held_out, put_held_out};
use crate::store::{self, SqlMachineStore, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use understudy_hub::monitor::{
    evaluate, Action, ActualState, DesiredService, DesiredState, ObservedMachine,
};
use understudy_hub::{MachineRecord, MachineStore, Role, SecretKey, Signer, Status};
use understudy_wire::MachineState;

fn role_of(state: &State, id: &str) -> Option<Role> {
    state.roles.get(id).map(|r| match r {
        MachineRole::Active => Role::Active,
        MachineRole::Control => Role::Control,
        MachineRole::Standby => Role::Standby,
        MachineRole::Retired => Role::Retired,
    })
}

/// What the controller wants: per service its version, the machines its config places (before
/// the monitor took any out), and each declared machine's version.
fn desired_state(state: &State) -> DesiredState {
    let none = BTreeSet::new();
    let mut services = BTreeMap::new();
    for (name, spec) in &state.cluster.services {
        let rollout = state
            .open_rollout(name)
            .map(|r| (r.phase, r.selection.clone()));
        let members = desired_machines(
            &state.cluster,
            spec,
            &state.roles,
            rollout.as_ref().map(|(p, s)| (*p, s)),
            &none,
        );
        services.insert(
            name.clone(),
            DesiredService {
                version: state
                    .services
                    .get(name)
                    .map(|s| s.version.clone())
                    .unwrap_or_else(|| spec.declared_version.clone()),
                balancer_members: members.into_iter().map(|m| m.id).collect(),
                machine_versions: state
                    .cluster
                    .machines_of(name)
                    .map(|m| (m.id.clone(), m.version.clone()))
                    .collect(),
            },
        );
    }
    DesiredState { services }
}

/// What is observed: every machine the registry knows (role as the controller assigned it),
/// whether its balancer has it (in the committed config, or still draining it), and its sessions
/// (the fewer of what its balancer pins to it and what it reports: either reaching 0 ends a wait).
/// Also gives the machines seen only through their balancer.
fn actual_state(state: &State, now_ms: u64) -> Result<(ActualState, BTreeSet<String>), StoreError> {
    let latest = state
        .store
        .read(|sql| SqlMachineStore::new(sql).all_latest())?;
    let mut machines = Vec::with_capacity(latest.len());
    for revision in latest {
        let mut record: MachineRecord = revision.record;
        let Some(service) = state.services.get(&record.service) else {
            continue;
        };
        if let Some(role) = role_of(state, &record.id) {
            record.role = role;
        }
        let on_balancer = service
            .last_stats
            .as_ref()
            .and_then(|st| st.machines.iter().find(|m| m.id == record.id));
        // A balancer that runs an older config than it acknowledged lost it (it restarted): what
        // is missing from it is missing, whatever the committed config says.
        let in_config = service
            .desired
            .as_ref()
            .is_some_and(|c| c.machines.iter().any(|m| m.id == record.id))
            && (!service.lost_config() || on_balancer.is_some());
        let draining = on_balancer.filter(|m| m.state == MachineState::Draining && !in_config);
        if let Some(m) = on_balancer {
            record.sessions = record
                .sessions
                .min(m.sessions.min(u64::from(u32::MAX)) as u32);
        }
        let draining_since_ms = draining.map(|_| {
            state
                .monitor
                .held_out
                .get(&record.id)
                .map(|h| h.since_ms)
                .or_else(|| state.open_rollout(&record.service).map(|r| r.entered_ms))
                .unwrap_or(now_ms)
        });
        machines.push(ObservedMachine {
            record,
            in_balancer: in_config || draining.is_some(),
            draining_since_ms,
        });
    }
    let watched = observe_plain_machines(state, &mut machines);
    Ok((ActualState { now_ms, machines }, watched))
}

/// Machines that never report (plain HTTP servers) are seen through their balancer's probes,
/// and only once it has probed them: silence alone is never taken for a dead machine. Gives
/// the ids of those added.
fn observe_plain_machines(state: &State, machines: &mut Vec<ObservedMachine>) -> BTreeSet<String> {
    let mut watched = BTreeSet::new();
    for m in &state.cluster.machines {
        if machines.iter().any(|o| o.record.id == m.id) {
            continue;
        }
        let seen = state
            .services
            .get(&m.service)
            .and_then(|s| s.last_stats.as_ref())
            .and_then(|st| st.machines.iter().find(|b| b.id == m.id));
        let Some((seen, status)) =
            seen.and_then(|b| Some((b, crate::runtime::machines::status_from_health(b.health)?)))
        else {
            continue;
        };
        machines.push(ObservedMachine {
            record: MachineRecord {
                id: m.id.clone(),
                service: m.service.clone(),
                version: m.version.clone(),
                address: m.address.clone(),
                role: role_of(state, &m.id).unwrap_or(Role::Standby),
                status,
                capacity: 0,
                sessions: seen.sessions.min(u64::from(u32::MAX)) as u32,
            },
            in_balancer: true,
            draining_since_ms: None,
        });
        watched.insert(m.id.clone());
    }
    watched
}
impl Core {
    /// One monitor round on the locked state; returns the messages to publish on the hub.
    pub(super) fn monitor_tick(&self, state: &mut State) -> Vec<Outbound> {
        let now = self.clock.now_ms();
        let rules = state.cluster.monitor.clone();
        let desired = desired_state(state);
        let (actual, watched) = match actual_state(state, now) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("monitor: machine registry not readable: {e}");
                return Vec::new();
            }
        };
        let mut actions = evaluate(&desired, &actual, &rules);
        actions.retain(|a| !alters_watched(a, &watched));
        let mut outbox = Vec::new();
        let mut asked = BTreeSet::new();
        for action in actions {
            let key = repeat_key(&action);
            let fresh = !state.monitor.previous.contains(&key);
            asked.insert(key);
            let rule = rule_of(&action, &actual);
            let (outcome, message) = self.perform(state, &action, rule, &actual, now);
            if fresh {
                outbox.extend(message);
            }
            if fresh {
                self.record_action(state, now, rule, action, outcome);
            }
        }
        state.monitor.previous = asked;
        outbox
    }

    /// Does what an action asks of the controller's own state and says what it did; a request
    /// to someone else (a replacement, an update) is the message to publish.
    fn perform(
        &self,
        state: &mut State,
        action: &Action,
        rule: &'static str,
        actual: &ActualState,
        now: u64,
    ) -> (String, Option<Outbound>) {
        match action {
            Action::Drain {
                service, machine, ..
            }
            | Action::RemoveFromBalancer { service, machine } => {
                let reason = if rule == "active_machine_down" {
                    HoldReason::Down
                } else {
                    HoldReason::Update
                };
                (self.hold_out(state, service, machine, reason, now), None)
            }
            Action::AwaitSessions { until_ms, .. } => (
                format!("draining: kept until its sessions end or {until_ms} ms"),
                None,
            ),
            Action::AddToBalancer { service, machine } => {
                (self.put_back(state, service, machine), None)
            }
            Action::RequestReplacement { service, missing } => {
                let down: Vec<&str> = actual
                    .machines
                    .iter()
                    .filter(|m| {
                        &m.record.service == service
                            && m.record.role == Role::Active
                            && m.record.status == Status::Down
                    })
                    .map(|m| m.record.id.as_str())
                    .collect();
                let message = Outbound {
                    topic: SCALE_TOPIC,
                    payload: serde_json::json!({
                        "service": service,
                        "missing": missing,
                        "machines_down": down,
                    }),
                };
                let outcome = format!("asked for {missing} machine(s) on {SCALE_TOPIC}");
                (outcome, Some(message))
            }
            Action::ReportDrift { .. } => ("reported".to_string(), None),
            Action::UpdateVersion {
                service,
                machine,
                to_version,
            } => {
                let held = self.hold_out(state, service, machine, HoldReason::Update, now);
                let message = Outbound {
                    topic: UPDATE_TOPIC,
                    payload: serde_json::json!({
                        "service": service,
                        "machine": machine,
                        "to_version": to_version,
                    }),
                };
                (
                    format!("{held}; update asked on {UPDATE_TOPIC}"),
                    Some(message),
                )
            }
        }
    }

    fn record_action(
        &self,
        state: &mut State,
        now: u64,
        rule: &'static str,
        action: Action,
        outcome: String,
    ) {
        let name = action_name(&action);
        self.metrics
            .monitor_actions
            .with_label_values(&[rule, name])
            .inc();
        match &action {
            Action::ReportDrift {
                service,
                machine,
                running,
                desired,
            } => {
                tracing::warn!(rule, action = name, %service, %machine, %running, %desired, "monitor: version drift")
            }
            _ => tracing::info!(rule, action = name, ?action, %outcome, "monitor"),
        }
        let m = &mut state.monitor;
        m.next_seq += 1;
        if m.recent.len() == RECENT_ACTIONS {
            m.recent.pop_front();
        }
        m.recent.push_back(ActionRecord {
            seq: m.next_seq,
            at_ms: now,
            rule,
            action,
            outcome,
        });
    }

    /// Takes `machine` out of its balancer: the held-out row and the config without it are
    /// committed together, then memory follows (the push comes with the tick's other pushes).
    fn hold_out(
        &self,
        state: &mut State,
        service: &str,
        machine: &str,
        reason: HoldReason,
        now: u64,
    ) -> String {
        if let Some(h) = state.monitor.held_out.get(machine) {
            return format!("out of the balancer config since {} ms", h.since_ms);
        }
        if !state.cluster.machines_of(service).any(|m| m.id == machine) {
            return "not a machine of the cluster file: nothing to change".to_string();
        }
        let held = HeldOut {
            service: service.to_string(),
            since_ms: now,
            reason,
        };
        state
            .monitor
            .held_out
            .insert(machine.to_string(), held.clone());
        self.commit_monitor_change(state, service, |tx| put_held_out(tx, machine, &held))
            .inspect_err(|_| {
                state.monitor.held_out.remove(machine);
            })
            .unwrap_or_else(|e| e)
    }

    /// Puts a machine back into its balancer: one the monitor took out gets a config with it
    /// again; a balancer that lost its config gets the committed one pushed again.
    fn put_back(&self, state: &mut State, service: &str, machine: &str) -> String {
        let Some(held) = state.monitor.held_out.remove(machine) else {
            let Some(s) = state.services.get_mut(service).filter(|s| s.lost_config()) else {
                return "not held out by the monitor: nothing to change".to_string();
            };
            let running = s.last_stats.as_ref().map_or(0, |st| st.config_version);
            let desired = s.desired.as_ref().map_or(0, |c| c.version);
            // Forgetting the acknowledgement makes this tick's push send the config again.
            s.acked = None;
            return format!(
                "the balancer runs config {running}, older than it acknowledged: config {desired} pushed again"
            );
        };
        self.commit_monitor_change(state, service, |tx| drop_held_out(tx, machine))
            .inspect_err(|_| {
                state.monitor.held_out.insert(machine.to_string(), held);
            })
            .unwrap_or_else(|e| e)
    }

    /// Commits `write` with the service's config as the (already updated) held-out set implies.
    fn commit_monitor_change(
        &self,
        state: &mut State,
        service: &str,
        write: impl FnOnce(&store::Sql<'_>) -> Result<(), StoreError>,
    ) -> Result<String, String> {
        let rollout = state
            .open_rollout(service)
            .map(|r| (r.phase, r.selection.clone()));
        let config = state.next_config(
            service,
            &state.roles,
            rollout.as_ref().map(|(p, s)| (*p, s)),
        );
        let written = state.store.write(|tx| {
            write(tx)?;
            if let Some(c) = &config {
                store::set_config(tx, c)?;
            }
            Ok(())
        });
        match written {
            Ok(()) => match config {
                Some(c) => {
                    let version = c.version;
                    if let Some(s) = state.services.get_mut(service) {
                        s.desired = Some(c);
                    }
                    Ok(format!("balancer config {version} committed"))
                }
                None => Ok("balancer config unchanged".to_string()),
            },
            Err(e) => {
                tracing::error!(%service, "monitor change not committed: {e}");
                Err(format!("not committed: {e}"))
            }
        }
    }

    /// Publishes the monitor's requests on the hub, signed as the controller.
    pub(crate) async fn monitor_publish(&self, outbox: Vec<Outbound>) {
        if outbox.is_empty() {
            return;
        }
        let envelopes: Vec<_> = {
            let mut state = lock(&self.state);
            let signer = state.monitor.signer.get_or_insert_with(|| {
                Signer::new(crate::runtime::hub::CONTROLLER_ID, SecretKey::generate())
                    .expect("the controller id is a valid sender name")
            });
            // Each request carries the fencing epoch it was decided under, so whoever acts on
            // it can ignore a controller that no longer leads.
            outbox
                .into_iter()
                .map(|mut o| {
                    if let Some(fields) = o.payload.as_object_mut() {
                        fields.insert("epoch".into(), self.epoch().into());
                    }
                    signer.sign(o.topic, o.payload)
                })
                .collect()
        };
        let backend = self.hub_backend();
        for envelope in envelopes {
            let topic = envelope.topic.clone();
            if let Err(e) = backend.publish(envelope).await {
                tracing::warn!(%topic, "monitor: request not published: {e}");
            }
        }
    }

    /// The most recent monitor actions, oldest first.
    pub fn monitor_actions(&self) -> Vec<ActionRecord> {
        let state = lock(&self.state);
        state.monitor.recent.iter().cloned().collect()
    }

    /// Every declared machine's place on its balancer (serving, draining, absent), the sessions
    /// its balancer pins to it and those it reports, and whether the monitor holds it out.
    pub fn balancer_presence(&self) -> Vec<MachinePresence> {
        presence(&lock(&self.state))
    }

    /// Held-out machines and every machine a balancer drains, with the sessions it holds.
    pub fn monitor_view(&self) -> MonitorView {
        let state = lock(&self.state);
        MonitorView {
            drain_timeout_ms: state.cluster.monitor.drain_timeout_ms,
            held_out: state.monitor.held_out.clone(),
            machines: presence(&state)
                .into_iter()
                .filter(|m| m.state == "draining" || m.held_out.is_some())
                .collect(),
        }
    }
}

/// Every declared machine's place on its balancer, as last seen.
fn presence(state: &State) -> Vec<MachinePresence> {
    let reported: BTreeMap<String, u32> = state
        .store
        .read(|sql| SqlMachineStore::new(sql).all_latest())
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.record.id, r.record.sessions))
        .collect();
    let mut machines = Vec::new();
    for m in &state.cluster.machines {
        let held = state.monitor.held_out.get(&m.id).map(|h| h.reason);
        let on_balancer = state
            .services
            .get(&m.service)
            .and_then(|s| s.last_stats.as_ref())
            .and_then(|st| st.machines.iter().find(|x| x.id == m.id));
        machines.push(MachinePresence {
            id: m.id.clone(),
            service: m.service.clone(),
            state: match on_balancer.map(|x| x.state) {
                Some(MachineState::Serving) => "serving",
                Some(MachineState::Draining) => "draining",
                None => "absent",
            },
            balancer_sessions: on_balancer.map(|x| x.sessions),
            reported_sessions: reported.get(&m.id).copied(),
            held_out: held,
        });
    }
    machines
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use understudy_hub::registry::Registry;
    use understudy_hub::Filter;
    use understudy_wire::{MachineHealth, PoolRole};

    use super::super::lock;
    use super::*;
    use crate::config::cluster::parse;
    use crate::runtime::balancer::FakeBalancer;
    use crate::testing::{identical_pairs, Rig};
    use understudy_hub::monitor::Rules;

    const MEDIA: &str = r#"
[controller]
tick_ms = 100

[services.media]
balancer = "http://127.0.0.1:9001"

[[machines]]
id = "media-1"
service = "media"
version = "v1"
address = "127.0.0.1:8001"
config = "active"

[[machines]]
id = "media-2"
service = "media"
version = "v1"
address = "127.0.0.1:8002"
config = "active"

[[machines]]
id = "media-3"
service = "media"
version = "v1"
address = "127.0.0.1:8003"
config = "active"

[[machines]]
id = "media-c"
service = "media"
version = "v1"
address = "127.0.0.1:8009"
config = "simulation"
"#;

    const RULES: &str = r#"
[monitor]
drain_timeout_secs = 2
[[monitor.rule]]
when = "active_machine_down"
then = ["remove_from_balancer", "request_replacement"]
[[monitor.rule]]
when = "running_not_in_balancer"
then = ["add_to_balancer"]
[[monitor.rule]]
when = "version_drift"
then = ["report_drift"]
[monitor.scaling]
min_running_active = 3
"#;

    /// A controller over the media cluster with `monitor` settings added.
    fn media_with(monitor: &str) -> Rig {
        Rig::new(&format!("{MEDIA}{monitor}"))
    }

    /// Records a machine's report in the registry, as the hub's recorder does.
    fn report(core: &Core, id: &str, version: &str, status: Status, sessions: u32) {
        let now = core.now_ms();
        let mut state = lock(&core.state);
        let record = MachineRecord {
            id: id.to_string(),
            service: "media".to_string(),
            version: version.to_string(),
            address: "127.0.0.1:8000".to_string(),
            role: Role::Active,
            status,
            capacity: 100,
            sessions,
        };
        state
            .store
            .write(|tx| {
                Registry::new(SqlMachineStore::new(tx))
                    .register(record, now)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(())
            })
            .expect("recorded");
    }

    fn all_running(core: &Core) {
        for id in ["media-1", "media-2", "media-3", "media-c"] {
            report(core, id, "v1", Status::Running, 0);
        }
    }

    fn in_config(fake: &FakeBalancer) -> Vec<String> {
        fake.config("media")
            .expect("pushed")
            .machines
            .iter()
            .map(|m| m.id.clone())
            .collect()
    }

    fn actions(core: &Core) -> Vec<(String, String)> {
        core.monitor_actions()
            .iter()
            .map(|a| (a.rule.to_string(), action_name(&a.action).to_string()))
            .collect()
    }

    fn pair(rule: &str, action: &str) -> (String, String) {
        (rule.to_string(), action.to_string())
    }

    fn counted(core: &Core, rule: &str, action: &str) -> f64 {
        core.metrics
            .monitor_actions
            .with_label_values(&[rule, action])
            .get()
    }

    fn listed(core: &Core, id: &str) -> crate::runtime::machines::MachineListing {
        core.machine_listing(&Default::default())
            .unwrap()
            .into_iter()
            .find(|m| m.id == id)
            .unwrap()
    }

    /// Machines that never report (plain HTTP servers): the listing and the monitor see them
    /// through their balancer, a silent one is not taken for dead, and a failing one is left in
    /// its balancer (which skips it and goes on probing it) while a replacement is asked for.
    #[tokio::test(start_paused = true)]
    async fn plain_machines_are_seen_through_their_balancer_and_never_taken_for_dead_by_silence() {
        let probed = MEDIA.replace(
            "address = \"127.0.0.1:8002\"",
            "address = \"127.0.0.1:8002\"\nhealth_path = \"/healthz\"",
        );
        let rig = Rig::new(&format!("{probed}{RULES}"));
        let core = rig.open();
        core.tick().await;
        core.tick().await;
        let pushed = rig.fake.config("media").unwrap();
        let path_of = |id: &str| {
            let entry = pushed.machines.iter().find(|m| m.id == id).unwrap();
            entry.health_path.clone()
        };
        assert_eq!(path_of("media-2").as_deref(), Some("/healthz"));
        assert_eq!(path_of("media-1"), None);
        let silent = listed(&core, "media-2");
        assert_eq!(
            (silent.status, silent.health),
            (None, Some(MachineHealth::Unknown))
        );
        assert!(core.monitor_actions().is_empty(), "silence is not death");

        for id in ["media-1", "media-3", "media-c"] {
            rig.fake
                .set_health("media", id, MachineHealth::Answering, "");
        }
        let refused = "connecting to 127.0.0.1:7002: Connection refused (os error 111)";
        rig.fake
            .set_health("media", "media-2", MachineHealth::Failing, refused);
        core.tick().await;
        let failing = listed(&core, "media-2");
        assert_eq!(failing.status, Some(Status::Down));
        assert_eq!(failing.health, Some(MachineHealth::Failing));
        assert_eq!(failing.health_reason.as_deref(), Some(refused));
        assert_eq!(listed(&core, "media-1").status, Some(Status::Running));
        assert_eq!(
            actions(&core),
            [pair("active_machine_down", "request_replacement")],
            "asked for a replacement, not taken out"
        );
        assert_eq!(
            in_config(&rig.fake),
            ["media-1", "media-2", "media-3", "media-c"]
        );

        rig.fake
            .set_health("media", "media-2", MachineHealth::Answering, "");
        core.tick().await;
        assert_eq!(listed(&core, "media-2").status, Some(Status::Running));
        assert_eq!(actions(&core).len(), 1, "nothing more to do");
    }

    #[tokio::test(start_paused = true)]
    async fn down_machine_is_taken_out_replacement_asked_and_put_back_when_running() {
        let rig = media_with(RULES);
        let core = rig.open();
        let mut scale = core
            .hub_backend()
            .subscribe(
                Filter {
                    topic: Some(SCALE_TOPIC.to_string()),
                    ..Filter::default()
                },
                16,
            )
            .await
            .expect("subscribed");
        core.tick().await;
        all_running(&core);
        core.tick().await;
        assert!(core.monitor_actions().is_empty());
        assert_eq!(
            in_config(&rig.fake),
            ["media-1", "media-2", "media-3", "media-c"]
        );

        report(&core, "media-2", "v1", Status::Down, 0);
        core.tick().await;
        assert_eq!(
            actions(&core),
            [
                pair("active_machine_down", "remove_from_balancer"),
                pair("active_machine_down", "request_replacement"),
            ]
        );
        // Out of the balancer through a new, committed config version.
        assert_eq!(in_config(&rig.fake), ["media-1", "media-3", "media-c"]);
        assert_eq!(rig.fake.config("media").unwrap().version, 2);
        let asked = scale.recv().await.expect("published");
        assert_eq!(asked.sender, crate::runtime::hub::CONTROLLER_ID);
        assert_eq!(asked.payload["epoch"], core.epoch());
        assert_eq!(asked.payload["service"], "media");
        assert_eq!(asked.payload["missing"], 1);
        assert_eq!(
            asked.payload["machines_down"],
            serde_json::json!(["media-2"])
        );

        // Asked again on the next ticks (no memory), but logged and counted once.
        core.tick().await;
        core.tick().await;
        assert_eq!(core.monitor_actions().len(), 2);
        assert_eq!(
            counted(&core, "active_machine_down", "remove_from_balancer"),
            1.0
        );
        assert_eq!(
            counted(&core, "active_machine_down", "request_replacement"),
            1.0
        );
        let text = core.metrics_text();
        assert!(
            text.contains(
                "understudy_monitor_actions_total{action=\"add_to_balancer\",rule=\"running_not_in_balancer\"} 0"
            ),
            "{text}"
        );

        // The held-out machine stays out across a restart (a restarted controller asks for the
        // replacement again: what it asked before is not state).
        drop(core);
        let core = rig.open();
        core.tick().await;
        assert_eq!(in_config(&rig.fake), ["media-1", "media-3", "media-c"]);
        assert_eq!(
            actions(&core),
            [pair("active_machine_down", "request_replacement")]
        );
        assert_eq!(
            core.monitor_view().held_out["media-2"].reason,
            HoldReason::Down
        );

        // Running again: back in its balancer.
        report(&core, "media-2", "v1", Status::Running, 0);
        core.tick().await;
        assert_eq!(
            actions(&core).last(),
            Some(&pair("running_not_in_balancer", "add_to_balancer"))
        );
        assert_eq!(
            in_config(&rig.fake),
            ["media-1", "media-2", "media-3", "media-c"]
        );
        assert!(core.monitor_view().held_out.is_empty());
        core.tick().await;
        assert_eq!(core.monitor_actions().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn machine_holding_calls_drains_before_it_is_taken_out() {
        let rig = media_with(RULES);
        let core = rig.open();
        core.tick().await;
        all_running(&core);
        rig.fake.set_sessions("media", "media-3", 2);
        // Down (hung) while its balancer still pins two calls to it.
        report(&core, "media-3", "v1", Status::Down, 2);
        core.tick().await;
        assert_eq!(
            actions(&core),
            [
                pair("active_machine_down", "drain"),
                pair("active_machine_down", "request_replacement"),
            ]
        );
        // Prepared first: no new session goes to it; the balancer keeps its calls.
        assert_eq!(in_config(&rig.fake), ["media-1", "media-2", "media-c"]);
        core.tick().await;
        assert_eq!(
            actions(&core).last(),
            Some(&pair("active_machine_down", "await_sessions"))
        );
        let view = core.monitor_view();
        assert_eq!(
            view.machines,
            [MachinePresence {
                id: "media-3".into(),
                service: "media".into(),
                state: "draining",
                balancer_sessions: Some(2),
                reported_sessions: Some(2),
                held_out: Some(HoldReason::Down),
            }]
        );
        // Still draining within the timeout (one call ended): nothing more.
        rig.fake.set_sessions("media", "media-3", 1);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        core.tick().await;
        assert_eq!(core.monitor_actions().len(), 3);
        // The drain timeout (2 s) passed: it is altered (removed for good).
        tokio::time::advance(Duration::from_millis(600)).await;
        core.tick().await;
        assert_eq!(
            actions(&core).last(),
            Some(&pair("active_machine_down", "remove_from_balancer"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_when_the_calls_end() {
        let rig = media_with(RULES);
        let core = rig.open();
        core.tick().await;
        all_running(&core);
        rig.fake.set_sessions("media", "media-1", 1);
        report(&core, "media-1", "v1", Status::Down, 1);
        core.tick().await;
        core.tick().await;
        assert_eq!(core.monitor_view().machines[0].state, "draining");
        // Its last call ends: the balancer drops it; nothing is left to wait for.
        rig.fake.set_sessions("media", "media-1", 0);
        core.tick().await;
        let view = core.monitor_view();
        assert_eq!(view.machines[0].state, "absent");
        assert_eq!(view.machines[0].held_out, Some(HoldReason::Down));
        let before = core.monitor_actions().len();
        core.tick().await;
        assert_eq!(core.monitor_actions().len(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn version_drift_is_reported_once_and_updates_wait_for_calls() {
        let rig = media_with(RULES);
        let core = rig.open();
        core.tick().await;
        all_running(&core);
        report(&core, "media-1", "v7", Status::Running, 0);
        core.tick().await;
        core.tick().await;
        let listed = core.monitor_actions();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].action,
            Action::ReportDrift {
                service: "media".into(),
                machine: "media-1".into(),
                running: "v7".into(),
                desired: "v1".into()
            }
        );
        let json = serde_json::to_value(&listed[0]).unwrap();
        assert_eq!(json["action"], "report_drift");
        assert_eq!(json["rule"], "version_drift");
        // Reporting changes nothing.
        assert_eq!(in_config(&rig.fake).len(), 4);

        // With `update_version`, a drifting machine holding calls is drained first, then taken
        // out and its update asked for.
        let rig = media_with(
            "[monitor]\ndrain_timeout_secs = 1\n[[monitor.rule]]\nwhen = \"version_drift\"\nthen = [\"update_version\"]\n",
        );
        let core = rig.open();
        core.tick().await;
        all_running(&core);
        rig.fake.set_sessions("media", "media-2", 3);
        report(&core, "media-2", "v0", Status::Running, 3);
        core.tick().await;
        assert_eq!(actions(&core), [pair("version_drift", "drain")]);
        core.tick().await;
        rig.fake.set_sessions("media", "media-2", 0);
        report(&core, "media-2", "v0", Status::Running, 0);
        core.tick().await;
        // Its sessions ended: altered (it is out already; the update is asked).
        assert_eq!(
            actions(&core),
            [
                pair("version_drift", "drain"),
                pair("version_drift", "await_sessions"),
                pair("version_drift", "update_version"),
            ]
        );
        assert!(!in_config(&rig.fake).contains(&"media-2".to_string()));
    }

    #[test]
    fn monitor_table_errors_name_file_line_and_field() {
        let error = |monitor: &str| {
            parse("bad.toml", &format!("{MEDIA}{monitor}"))
                .expect_err("refused")
                .to_string()
        };
        let e = error("[monitor]\ndrain_timeout = 3\n");
        assert!(
            e.contains("bad.toml:") && e.contains("drain_timeout"),
            "{e}"
        );
        let e = error("[monitor]\ndrain_timeout_secs = 0\n");
        assert!(e.contains("field `monitor.drain_timeout_secs`"), "{e}");
        let e = error(
            "[monitor]\n[[monitor.rule]]\nwhen = \"version_drift\"\nthen = [\"report_drift\"]\n[[monitor.rule]]\nwhen = \"running_not_in_balancer\"\nthen = [\"report_drift\"]\n",
        );
        let line = MEDIA.lines().count() + 7;
        assert!(
            e.contains(&format!("bad.toml:{line}: field `monitor.rule[1].then`")),
            "{e}"
        );
        let e = error(
            "[monitor]\n[[monitor.rule]]\nwhen = \"version_drift\"\nthen = [\"report_drift\"]\n[[monitor.rule]]\nwhen = \"version_drift\"\nthen = [\"update_version\"]\n",
        );
        assert!(
            e.contains(&format!(
                "bad.toml:{}: field `monitor.rule[1].when`",
                line - 1
            )) && e.contains("already has a rule"),
            "{e}"
        );
        let e = error("[monitor]\n[[monitor.rule]]\nwhen = \"machine_sad\"\nthen = []\n");
        assert!(e.contains("machine_sad"), "{e}");
        let e = error(
            "[monitor]\n[[monitor.rule]]\nwhen = \"active_machine_down\"\nthen = [\"request_replacement\"]\n",
        );
        assert!(
            e.contains("monitor.rule[0].then") && e.contains("scaling"),
            "{e}"
        );
        let e = error("[monitor]\n[monitor.scaling]\nper_service = { video = 2 }\n");
        assert!(
            e.contains("monitor.scaling.per_service.video") && e.contains("unknown service"),
            "{e}"
        );
        // No table: the standard rules; an empty table: none.
        let standard = parse("ok.toml", MEDIA).unwrap();
        assert_eq!(standard.monitor, Rules::standard());
        let none = parse("ok.toml", &format!("{MEDIA}[monitor]\n")).unwrap();
        assert_eq!(none.monitor, Rules::from_toml("").unwrap());
        assert_eq!(
            parse("ok.toml", &format!("{MEDIA}{RULES}"))
                .unwrap()
                .monitor
                .drain_timeout_ms,
            2_000
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_balancer_that_lost_its_config_gets_it_again() {
        let rig = media_with(RULES);
        let core = rig.open();
        core.tick().await;
        all_running(&core);
        core.tick().await;
        assert!(core.monitor_actions().is_empty());
        rig.fake.restart("media");
        core.tick().await;
        assert_eq!(
            actions(&core),
            [
                pair("running_not_in_balancer", "add_to_balancer"),
                pair("running_not_in_balancer", "add_to_balancer"),
                pair("running_not_in_balancer", "add_to_balancer"),
                pair("running_not_in_balancer", "add_to_balancer"),
            ]
        );
        assert_eq!(
            in_config(&rig.fake),
            ["media-1", "media-2", "media-3", "media-c"]
        );
        core.tick().await;
        assert_eq!(core.monitor_actions().len(), 4);
    }

    async fn get_json(
        core: &Arc<Core>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", "Bearer secret")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let response = crate::api::admin::router(core.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).expect("JSON"))
    }

    #[tokio::test(start_paused = true)]
    async fn the_api_lists_actions_draining_machines_and_refuses_bad_sub_groups() {
        let rig = media_with(RULES);
        let core = Arc::new(rig.open());
        core.tick().await;
        all_running(&core);
        rig.fake.set_sessions("media", "media-1", 4);
        report(&core, "media-1", "v1", Status::Down, 4);
        core.tick().await;
        core.tick().await;
        let (status, listed) = get_json(&core, "GET", "/api/v1/monitor/actions", "").await;
        assert_eq!(status, 200);
        assert_eq!(listed[0]["seq"], 1);
        assert_eq!(listed[0]["rule"], "active_machine_down");
        assert_eq!(listed[0]["action"], "drain");
        assert_eq!(listed[0]["machine"], "media-1");
        assert_eq!(listed[0]["sessions"], 4);
        assert_eq!(listed[2]["action"], "await_sessions");
        let (status, view) = get_json(&core, "GET", "/api/v1/monitor", "").await;
        assert_eq!(status, 200);
        assert_eq!(view["drain_timeout_ms"], 2000);
        assert_eq!(view["held_out"]["media-1"]["reason"], "down");
        assert_eq!(view["machines"][0]["state"], "draining");
        assert_eq!(view["machines"][0]["balancer_sessions"], 4);

        // A release's sub-group is checked before anything is stored.
        let (status, answer) = get_json(
            &core,
            "POST",
            "/api/v1/releases",
            r#"{"services": {"media": "v1"}, "subgroup": {"media": {"counts": 1}}}"#,
        )
        .await;
        assert_eq!(status, 400);
        assert!(
            answer["error"].as_str().unwrap().contains("counts"),
            "{answer}"
        );
        let (status, rollouts) = get_json(&core, "GET", "/api/v1/rollouts", "").await;
        assert_eq!((status, rollouts), (200, serde_json::json!([])));
    }

    #[tokio::test(start_paused = true)]
    async fn retiring_waits_for_the_calls_of_the_replaced_machines() {
        use rand::SeedableRng;
        let v2 = "[[machines]]\nid = \"media-v2\"\nservice = \"media\"\nversion = \"v2\"\naddress = \"127.0.0.1:8020\"\nconfig = \"simulation\"\n";
        let rig = media_with(v2);
        let core = rig.open();
        core.tick().await;
        all_running(&core);
        let request = crate::runtime::controller::ReleaseRequest {
            services: BTreeMap::from([("media".to_string(), "v2".to_string())]),
            subgroup: BTreeMap::from([(
                "media".to_string(),
                serde_json::from_value(serde_json::json!({"machines": ["media-2"]})).unwrap(),
            )]),
            ..Default::default()
        };
        core.release(&request, "ops").expect("release");
        // Two calls stay on media-2 (the machine replaced) through the whole release.
        rig.fake.set_sessions("media", "media-2", 2);
        report(&core, "media-2", "v1", Status::Running, 2);
        let mut job = 1;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let phase = core.rollouts()[0].phase.clone();
            if phase == "retiring" {
                break;
            }
            if phase == "simulating" {
                let pairs = identical_pairs(&mut rng, job, 500, "v1", "v2", false);
                rig.fake.add_pairs("media", pairs);
                job += 500;
            }
            tokio::time::advance(Duration::from_millis(100)).await;
            core.tick().await;
        }
        core.tick().await;
        assert_eq!(
            core.rollouts()[0].phase,
            "retiring",
            "{:?}",
            core.rollouts()[0].verdict
        );
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            core.tick().await;
        }
        // Still held: its balancer drains it with two calls and it reports two.
        assert_eq!(core.rollouts()[0].phase, "retiring");
        let presence = core.balancer_presence();
        let media_2 = presence.iter().find(|m| m.id == "media-2").unwrap();
        assert_eq!(
            (
                media_2.state,
                media_2.balancer_sessions,
                media_2.reported_sessions
            ),
            ("draining", Some(2), Some(2))
        );
        // The machine reports its calls ended (its balancer still counts them until they idle
        // out): either count reaching 0 ends the wait.
        report(&core, "media-2", "v1", Status::Running, 0);
        core.tick().await;
        assert_eq!(core.rollouts()[0].phase, "complete");
        let roles: BTreeMap<String, MachineRole> = lock(&core.state).roles.clone();
        assert_eq!(roles["media-2"], MachineRole::Retired);
        assert_eq!(roles["media-1"], MachineRole::Active);
        assert_eq!(roles["media-v2"], MachineRole::Active);
    }

    #[test]
    fn joining_shifts_weight_from_the_replaced_machines_only() {
        let text = format!(
            "{MEDIA}[[machines]]\nid = \"media-v2\"\nservice = \"media\"\nversion = \"v2\"\naddress = \"127.0.0.1:8020\"\nconfig = \"simulation\"\nweight = 200\n"
        )
        .replace(
            "[services.media]\n",
            "[services.media]\njoin_steps = [25]\n",
        );
        let cluster = parse("steps.toml", &text).unwrap();
        let roles = crate::core::plan::declared_roles(&cluster);
        let selection = crate::core::plan::Selection::choose(
            &cluster,
            &roles,
            "media",
            "v2",
            Some(&serde_json::from_value(serde_json::json!({"machines": ["media-2"]})).unwrap()),
        )
        .unwrap();
        let weights = |phase| {
            desired_machines(
                &cluster,
                &cluster.services["media"],
                &roles,
                Some((phase, &selection)),
                &BTreeSet::new(),
            )
            .into_iter()
            .map(|m| (m.id, m.weight, m.config))
            .collect::<Vec<_>>()
        };
        let w = |id: &str, weight: u32, config: PoolRole| (id.to_string(), weight, config);
        assert_eq!(
            weights(crate::core::rollout::Phase::Joining { step: 0 }),
            [
                w("media-1", 100, PoolRole::Active),
                w("media-2", 75, PoolRole::Active),
                w("media-3", 100, PoolRole::Active),
                w("media-c", 100, PoolRole::Simulation),
                w("media-v2", 50, PoolRole::Active),
            ]
        );
        assert_eq!(
            weights(crate::core::rollout::Phase::Retiring),
            [
                w("media-1", 100, PoolRole::Active),
                w("media-3", 100, PoolRole::Active),
                w("media-c", 100, PoolRole::Simulation),
                w("media-v2", 200, PoolRole::Active),
            ]
        );
    }

    #[test]
    fn held_out_machines_are_left_out_of_the_config() {
        let rig = media_with("");
        let core = rig.open();
        let mut state = lock(&core.state);
        state.monitor.held_out.insert(
            "media-1".into(),
            HeldOut {
                service: "media".into(),
                since_ms: 0,
                reason: HoldReason::Down,
            },
        );
        let config = state
            .next_config("media", &state.roles, None)
            .expect("changed");
        let places: Vec<(&str, PoolRole)> = config
            .machines
            .iter()
            .map(|m| (m.id.as_str(), m.config))
            .collect();
        assert_eq!(
            places,
            [
                ("media-2", PoolRole::Active),
                ("media-3", PoolRole::Active),
                ("media-c", PoolRole::Simulation)
            ]
        );
    }
}
