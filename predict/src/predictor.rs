//! The online part: maps update messages to states, follows each object through its states, teaches
//! each (service, version) model the transitions it sees, moves objects that dwell too long to the
//! time-threshold artifact, and raises alerts when an object enters a state from which an artifact
//! is likely.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::chain::Outlook;
use crate::compare::{compare, Comparison};
use crate::config::Settings;
use crate::decay::Timestamp;
use crate::model::{Model, ModelKey};

/// An update message as a machine, balancer or the controller reports it, e.g.
/// `{object: "call-17", kind: "call", fields: {status: "routed"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Update {
    pub object: String,
    pub service: String,
    pub version: String,
    pub kind: String,
    pub fields: BTreeMap<String, String>,
}

impl Update {
    pub fn new(
        object: impl Into<String>,
        service: impl Into<String>,
        version: impl Into<String>,
        kind: impl Into<String>,
    ) -> Update {
        Update {
            object: object.into(),
            service: service.into(),
            version: version.into(),
            kind: kind.into(),
            fields: BTreeMap::new(),
        }
    }

    pub fn with(mut self, field: impl Into<String>, value: impl Into<String>) -> Update {
        self.fields.insert(field.into(), value.into());
        self
    }
}

/// Why an alert was raised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum AlertCause {
    /// The object entered a state from which the artifact is likely.
    Entered,
    /// The object has been in its state so long that reaching the dwell limit became likely.
    Dwelling { elapsed_secs: f64 },
}

/// "Object X of service S version V is in state Q, from which it ends in artifact A with probability
/// P." The caller decides where it goes (log, metric, API, webhook).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub object: String,
    pub service: String,
    pub version: String,
    pub state: String,
    pub artifact: String,
    pub probability: f64,
    #[serde(flatten)]
    pub cause: AlertCause,
}

/// What an update did.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// No rule maps the message to a state.
    Ignored,
    /// The object was already in that state (repeated reports), or it first appeared in an end
    /// state (nothing to learn or predict).
    Unchanged,
    /// The object entered `state`; `alerts` are those its entry raised.
    Entered { state: String, alerts: Vec<Alert> },
}

impl Observed {
    pub fn alerts(&self) -> &[Alert] {
        match self {
            Observed::Entered { alerts, .. } => alerts,
            _ => &[],
        }
    }
}

/// An object moved to the time-threshold artifact because it dwelled beyond its state's limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimedOut {
    pub object: String,
    pub service: String,
    pub version: String,
    pub state: String,
    pub dwell_secs: f64,
}

/// What a [`Predictor::tick`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    pub timed_out: Vec<TimedOut>,
    pub alerts: Vec<Alert>,
}

/// Ordered (not hashed) so that tick reports come out in the same order on every run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    model: ModelKey,
    object: String,
}

/// Where a tracked object is. Objects that reach an end state are forgotten.
#[derive(Debug, Clone)]
struct InState {
    state: String,
    since: Timestamp,
    /// Artifacts already alerted for this stay, so one stay alerts once per artifact.
    alerted: BTreeSet<String>,
}

/// How an object moves: the one input of [`Predictor::transition`].
enum Move<'a> {
    /// A message put it in `state`.
    Reported { state: &'a str },
    /// It dwelled beyond its state's limit.
    DwellLimit { limit: Duration },
}

#[derive(Debug)]
pub struct Predictor {
    settings: Settings,
    models: BTreeMap<ModelKey, Model>,
    objects: BTreeMap<ObjectKey, InState>,
}

impl Predictor {
    pub fn new(settings: Settings) -> Predictor {
        Predictor {
            settings,
            models: BTreeMap::new(),
            objects: BTreeMap::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The state the configured rules map `update` to (first matching rule).
    pub fn state_of(&self, update: &Update) -> Option<&str> {
        self.settings
            .rules
            .iter()
            .find(|rule| {
                rule.kind == update.kind
                    && rule
                        .when
                        .iter()
                        .all(|(field, value)| update.fields.get(field) == Some(value))
            })
            .map(|rule| rule.state.as_str())
    }

    /// Maps `update` to a state with the configured rules and moves its object there.
    pub fn observe(&mut self, update: &Update, now: Timestamp) -> Observed {
        match self.state_of(update).map(str::to_string) {
            Some(state) => self.enter(
                &update.service,
                &update.version,
                &update.object,
                &state,
                now,
            ),
            None => Observed::Ignored,
        }
    }

    /// Moves `object` to `state` directly (for callers that know states without rules).
    pub fn enter(
        &mut self,
        service: &str,
        version: &str,
        object: &str,
        state: &str,
        now: Timestamp,
    ) -> Observed {
        let key = ObjectKey {
            model: ModelKey::new(service, version),
            object: object.to_string(),
        };
        self.transition(key, Move::Reported { state }, now)
    }

    /// Moves every object that dwelled beyond its state's limit to the time-threshold artifact, and
    /// alerts for objects whose time spent so far makes reaching that limit likely. Call it
    /// periodically (e.g. every second).
    pub fn tick(&mut self, now: Timestamp) -> TickReport {
        let mut report = TickReport::default();
        let mut expired = Vec::new();
        let threshold = self.settings.alerts.threshold;
        let min_exits = self.settings.alerts.min_exits;
        let artifact = self.settings.time_threshold_artifact.clone();
        let absorbing = self.settings.absorbing();
        for (key, stay) in &mut self.objects {
            let Some(limit) = self.settings.dwell_limit(&stay.state) else {
                continue;
            };
            let elapsed = now.saturating_sub(stay.since);
            if elapsed >= limit {
                expired.push((key.clone(), limit));
                continue;
            }
            if stay.alerted.contains(&artifact) {
                continue;
            }
            let Some(model) = self.models.get_mut(&key.model) else {
                continue;
            };
            let Some(direct) = model
                .dwell(&stay.state)
                .and_then(|dwell| dwell.chance_to_reach(limit, elapsed, min_exits.ceil() as u64))
            else {
                continue;
            };
            let outlook = model.outlook(now, &absorbing, self.settings.resolve_interval);
            let probability = time_threshold_chance(outlook, &stay.state, &artifact, direct);
            if probability >= threshold {
                stay.alerted.insert(artifact.clone());
                report.alerts.push(Alert {
                    object: key.object.clone(),
                    service: key.model.service.clone(),
                    version: key.model.version.clone(),
                    state: stay.state.clone(),
                    artifact: artifact.clone(),
                    probability,
                    cause: AlertCause::Dwelling {
                        elapsed_secs: elapsed.as_secs_f64(),
                    },
                });
            }
        }
        for (key, limit) in expired {
            let state = self.objects[&key].state.clone();
            report.timed_out.push(TimedOut {
                object: key.object.clone(),
                service: key.model.service.clone(),
                version: key.model.version.clone(),
                state,
                dwell_secs: limit.as_secs_f64(),
            });
            self.transition(key, Move::DwellLimit { limit }, now);
        }
        report
    }

    /// The one place an object changes state: records the transition in its model, forgets the
    /// object when it ended, and raises the alerts its new state calls for.
    fn transition(&mut self, key: ObjectKey, step: Move<'_>, now: Timestamp) -> Observed {
        let (to, dwell) = match step {
            Move::Reported { state } => (state.to_string(), None),
            Move::DwellLimit { limit } => {
                (self.settings.time_threshold_artifact.clone(), Some(limit))
            }
        };
        let model = self
            .models
            .entry(key.model.clone())
            .or_insert_with(|| Model::new(self.settings.half_life));
        match self.objects.get(&key) {
            Some(stay) if stay.state == to => return Observed::Unchanged,
            Some(stay) => {
                // A dwell-limit move records the limit, not the tick's lateness, as the dwell.
                let dwell = dwell.unwrap_or_else(|| now.saturating_sub(stay.since));
                model.record(&stay.state, &to, dwell, now);
            }
            None if self.settings.is_absorbing(&to) => return Observed::Unchanged,
            None => model.note_state(&to),
        }
        if self.settings.is_absorbing(&to) {
            self.objects.remove(&key);
            return Observed::Entered {
                state: to,
                alerts: Vec::new(),
            };
        }
        let outlook = model.outlook(
            now,
            &self.settings.absorbing(),
            self.settings.resolve_interval,
        );
        let mut alerted = BTreeSet::new();
        let mut alerts = Vec::new();
        if let Some(state) = outlook.state(&to) {
            if state.exits >= self.settings.alerts.min_exits {
                for (artifact, probability) in &state.artifacts {
                    if *probability >= self.settings.alerts.threshold {
                        alerted.insert(artifact.clone());
                        alerts.push(Alert {
                            object: key.object.clone(),
                            service: key.model.service.clone(),
                            version: key.model.version.clone(),
                            state: to.clone(),
                            artifact: artifact.clone(),
                            probability: *probability,
                            cause: AlertCause::Entered,
                        });
                    }
                }
            }
        }
        self.objects.insert(
            key,
            InState {
                state: to.clone(),
                since: now,
                alerted,
            },
        );
        Observed::Entered { state: to, alerts }
    }

    /// The model of one service version, if any of its objects was seen.
    pub fn model(&self, service: &str, version: &str) -> Option<&Model> {
        self.models.get(&ModelKey::new(service, version))
    }

    pub fn model_keys(&self) -> impl Iterator<Item = &ModelKey> {
        self.models.keys()
    }

    /// The current predictions of one service version (solved afresh).
    pub fn outlook(&self, service: &str, version: &str, now: Timestamp) -> Option<Outlook> {
        self.model(service, version)
            .map(|model| model.solve(now, &self.settings.absorbing()))
    }

    /// Objects currently followed (in a state that is not an end).
    pub fn tracked_objects(&self) -> usize {
        self.objects.len()
    }

    /// Forgets one service version: its model and the objects it follows (e.g. a candidate
    /// version released again after a roll-back starts from what its new run shows).
    /// Returns whether there was a model.
    pub fn forget(&mut self, service: &str, version: &str) -> bool {
        let key = ModelKey::new(service, version);
        self.objects.retain(|object, _| object.model != key);
        self.models.remove(&key).is_some()
    }

    /// Compares the probability of failure from the configured start state of `candidate` (v2)
    /// with `baseline` (v1). `None` without a start state or before both versions were seen.
    pub fn compare(
        &self,
        service: &str,
        baseline: &str,
        candidate: &str,
        now: Timestamp,
    ) -> Option<Comparison> {
        let start = self.settings.start_state.as_deref()?;
        let v1 = self.outlook(service, baseline, now)?;
        let v2 = self.outlook(service, candidate, now)?;
        Some(compare(&v1, &v2, start, &self.settings.compare))
    }
}

/// Probability that an object in `state`, whose chance of reaching the dwell limit there is now
/// `direct`, ends in the time-threshold artifact: directly, or later through the state it leaves to.
/// The chain's probability B from the state splits into the direct share r (observed timeouts out
/// of the state) and the rest, which applies to objects leaving before the limit: (B - r) / (1 - r).
fn time_threshold_chance(outlook: &Outlook, state: &str, artifact: &str, direct: f64) -> f64 {
    let Some(stay) = outlook.state(state) else {
        return direct;
    };
    let through_state = stay.artifacts.get(artifact).copied().unwrap_or(0.0);
    let direct_share = if stay.exits > 0.0 {
        direct_exits(outlook, state, artifact) / stay.exits
    } else {
        0.0
    };
    let later = if direct_share < 1.0 {
        ((through_state - direct_share) / (1.0 - direct_share)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    direct + (1.0 - direct) * later
}

/// Departures from `state` straight into `artifact`, from the outlook's evidence.
fn direct_exits(outlook: &Outlook, state: &str, artifact: &str) -> f64 {
    outlook.table.count(state, artifact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PredictConfig;

    #[test]
    fn a_forgotten_version_starts_afresh() {
        let mut predictor = Predictor::new(Settings::default());
        let at = Duration::from_secs;
        predictor.enter("media", "v2", "a", "received", at(0));
        predictor.enter("media", "v2", "a", "error state failure", at(1));
        predictor.enter("media", "v2", "b", "received", at(1));
        predictor.enter("media", "v1", "c", "received", at(1));
        assert_eq!(predictor.tracked_objects(), 2);
        assert!(predictor.forget("media", "v2"));
        assert!(predictor.model("media", "v2").is_none());
        assert!(predictor.model("media", "v1").is_some());
        assert_eq!(
            predictor.tracked_objects(),
            1,
            "v2's object went with its model"
        );
        assert!(!predictor.forget("media", "v2"));
    }

    const WORKED_STATES: [&str; 11] = [
        "API request",
        "5XX response",
        "server-side exception",
        "process start",
        "X",
        "Y",
        "Z",
        "F",
        "complete",
        "error state failure",
        "time threshold failure",
    ];

    /// Jobs report `{kind: "job", status: STATE}`; one rule per state of the worked example. The
    /// two early failures are artifacts here too (they are failures; the issue's two are kept).
    fn worked_settings() -> Settings {
        let mut text = String::from(
            r#"
            artifacts = ["error state failure", "time threshold failure", "5XX response",
                         "server-side exception"]
            successes = ["complete"]
            start_state = "API request"
            resolve_interval_ms = 0
            [alerts]
            threshold = 0.05
            min_exits = 10
            [dwell.limits]
            F = 1
            "#,
        );
        for state in WORKED_STATES {
            text.push_str(&format!(
                "[[rules]]\nkind = \"job\"\nwhen = {{ status = \"{state}\" }}\nstate = \"{state}\"\n"
            ));
        }
        PredictConfig::from_toml_str(&text).unwrap()
    }

    fn job(object: &str, status: &str) -> Update {
        Update::new(object, "api", "v1", "job").with("status", status)
    }

    fn at(seconds: u64) -> Timestamp {
        Duration::from_secs(seconds)
    }

    /// Replays the worked example: 100 jobs moving in lockstep, one level per second; the four jobs
    /// that stay in F are moved to the time threshold failure by the dwell limit of 1 s.
    fn replay_worked_example(predictor: &mut Predictor) {
        let paths: Vec<(usize, &[&str])> = vec![
            (1, &["API request", "5XX response"]),
            (2, &["API request", "server-side exception"]),
            (
                3,
                &[
                    "API request",
                    "process start",
                    "X",
                    "Y",
                    "error state failure",
                ],
            ),
            (17, &["API request", "process start", "X", "Y", "complete"]),
            (
                6,
                &["API request", "process start", "X", "Y", "F", "complete"],
            ),
            (4, &["API request", "process start", "X", "Y", "F"]),
            (67, &["API request", "process start", "X", "Z", "complete"]),
        ];
        let mut jobs = Vec::new();
        for (count, path) in paths {
            for _ in 0..count {
                jobs.push((format!("job-{}", jobs.len()), path));
            }
        }
        assert_eq!(jobs.len(), 100);
        for level in 0..6 {
            for (object, path) in &jobs {
                if let Some(state) = path.get(level) {
                    let observed = predictor.observe(&job(object, state), at(level as u64));
                    assert!(matches!(observed, Observed::Entered { .. }), "{observed:?}");
                }
            }
            let report = predictor.tick(at(level as u64));
            if level == 5 {
                assert_eq!(report.timed_out.len(), 4, "the four jobs left in F");
                assert!(report.timed_out.iter().all(|t| t.state == "F"));
            } else {
                assert!(report.timed_out.is_empty());
            }
        }
        assert_eq!(predictor.tracked_objects(), 0, "every job ended");
    }

    #[test]
    fn worked_example_learned_online_comes_out_exactly() {
        let mut predictor = Predictor::new(worked_settings());
        replay_worked_example(&mut predictor);
        let outlook = predictor.outlook("api", "v1", at(5)).unwrap();
        let p = |state, artifact| outlook.probability(state, artifact).unwrap();
        assert!((p("Y", "error state failure") - 0.10).abs() < 1e-12);
        assert!((p("F", "time threshold failure") - 0.40).abs() < 1e-12);
        assert!((p("API request", "error state failure") - 0.03).abs() < 1e-12);
        assert!((p("API request", "time threshold failure") - 0.04).abs() < 1e-12);
        assert!((p("API request", "5XX response") - 0.01).abs() < 1e-12);
        let table = &outlook.table;
        // Decayed since t = 3 s, both alike: their ratio stays 30/67.
        assert!(table.count("X", "Y") < 30.0);
        assert!((table.count("X", "Y") / table.count("X", "Z") - 30.0 / 67.0).abs() < 1e-12);
        assert_eq!(table.count("F", "time threshold failure"), 4.0);
        // The four timed-out jobs are recorded at the 1 s limit.
        let f = predictor.model("api", "v1").unwrap().dwell("F").unwrap();
        assert_eq!(f.count_at_least(at(1)), 10);
    }

    #[test]
    fn a_job_entering_y_raises_an_alert_and_one_entering_z_does_not() {
        let mut predictor = Predictor::new(worked_settings());
        replay_worked_example(&mut predictor);
        let now = at(10);
        for (object, path) in [
            ("late-y", ["API request", "process start", "X", "Y"]),
            ("late-z", ["API request", "process start", "X", "Z"]),
        ] {
            for state in &path[..3] {
                let observed = predictor.observe(&job(object, state), now);
                assert!(observed.alerts().is_empty(), "{state}: {observed:?}");
            }
            let observed = predictor.observe(&job(object, path[3]), now);
            if path[3] == "Z" {
                assert!(observed.alerts().is_empty(), "{observed:?}");
                continue;
            }
            let alerts = observed.alerts();
            assert_eq!(alerts.len(), 2, "{alerts:?}");
            assert_eq!(alerts[0].object, "late-y");
            assert_eq!(alerts[0].service, "api");
            assert_eq!(alerts[0].version, "v1");
            assert_eq!(alerts[0].state, "Y");
            assert_eq!(alerts[0].artifact, "error state failure");
            assert!((alerts[0].probability - 0.10).abs() < 1e-12);
            assert_eq!(alerts[0].cause, AlertCause::Entered);
            assert_eq!(alerts[1].artifact, "time threshold failure");
            assert!((alerts[1].probability - 0.4 / 3.0).abs() < 1e-12);
        }
    }

    #[test]
    fn rules_map_messages_and_repeats_change_nothing() {
        let mut predictor = Predictor::new(worked_settings());
        let unmatched = Update::new("j", "api", "v1", "job").with("status", "unheard of");
        assert_eq!(predictor.observe(&unmatched, at(0)), Observed::Ignored);
        let other_kind = Update::new("j", "api", "v1", "session").with("status", "X");
        assert_eq!(predictor.observe(&other_kind, at(0)), Observed::Ignored);
        assert!(matches!(
            predictor.observe(&job("j", "X"), at(0)),
            Observed::Entered { .. }
        ));
        assert_eq!(
            predictor.observe(&job("j", "X"), at(1)),
            Observed::Unchanged
        );
        // An object first seen in an end state teaches nothing.
        assert_eq!(
            predictor.observe(&job("k", "complete"), at(1)),
            Observed::Unchanged
        );
        assert_eq!(predictor.tracked_objects(), 1);
        predictor.observe(&job("j", "complete"), at(2));
        assert_eq!(predictor.tracked_objects(), 0);
        let table = predictor.model("api", "v1").unwrap().table(at(2));
        assert_eq!(table.count("X", "complete"), 1.0);
        assert_eq!(table.exits("X"), 1.0);
    }

    #[test]
    fn dwell_limit_moves_objects_and_dwell_time_predicts_the_timeout() {
        let settings = PredictConfig::from_toml_str(
            r#"
            successes = ["completed"]
            resolve_interval_ms = 0
            [alerts]
            threshold = 0.5
            min_exits = 10
            [dwell.limits]
            media = 10
            "#,
        )
        .unwrap();
        let mut predictor = Predictor::new(settings);
        let call = |object: &str, state: &str, t: Duration, p: &mut Predictor| {
            p.enter("media-proc", "v2", object, state, t)
        };
        // History: 80 calls leave media after 1 s, 20 stay until the 10 s limit.
        for i in 0..100 {
            call(&format!("old-{i}"), "media", at(0), &mut predictor);
        }
        for i in 0..80 {
            call(&format!("old-{i}"), "completed", at(1), &mut predictor);
        }
        assert!(predictor.tick(at(9)).timed_out.is_empty());
        let report = predictor.tick(at(10));
        assert_eq!(report.timed_out.len(), 20);
        assert_eq!(report.timed_out[0].dwell_secs, 10.0);
        assert_eq!(predictor.tracked_objects(), 0);

        // A new call: entering media (P = 0.2 < 0.5) does not alert...
        let entered = call("new", "media", at(100), &mut predictor);
        assert!(entered.alerts().is_empty(), "{entered:?}");
        let half_second = at(100) + Duration::from_millis(500);
        assert!(predictor.tick(half_second).alerts.is_empty());
        // ...but once it outlasted every call that left on its own, the limit is near certain.
        let report = predictor.tick(at(102));
        assert_eq!(report.alerts.len(), 1, "{report:?}");
        let alert = &report.alerts[0];
        assert_eq!(alert.artifact, "time threshold failure");
        assert_eq!(alert.state, "media");
        assert!((alert.probability - 1.0).abs() < 1e-12);
        assert_eq!(alert.cause, AlertCause::Dwelling { elapsed_secs: 2.0 });
        assert!(
            predictor.tick(at(103)).alerts.is_empty(),
            "one alert per stay"
        );
        let report = predictor.tick(at(110));
        assert_eq!(report.timed_out.len(), 1);
        let outlook = predictor.outlook("media-proc", "v2", at(110)).unwrap();
        let p = outlook
            .probability("media", "time threshold failure")
            .unwrap();
        assert!((p - 21.0 / 101.0).abs() < 1e-2, "{p}");
    }

    #[test]
    fn the_predictor_can_move_between_threads() {
        fn sendable<T: Send + Sync>() {}
        sendable::<Predictor>();
    }

    #[test]
    fn versions_learn_separately_and_compare() {
        let settings = PredictConfig::from_toml_str(
            r#"
            successes = ["completed"]
            start_state = "received"
            resolve_interval_ms = 0
            [compare]
            min_starts = 100
            "#,
        )
        .unwrap();
        let mut predictor = Predictor::new(settings);
        for i in 0..500 {
            for (version, fails) in [("v1", i % 100 == 0), ("v2", i % 10 == 0)] {
                let object = format!("call-{i}");
                predictor.enter("media", version, &object, "received", at(i));
                predictor.enter("media", version, &object, "media", at(i));
                let end = if fails {
                    "error state failure"
                } else {
                    "completed"
                };
                predictor.enter("media", version, &object, end, at(i + 1));
            }
        }
        let comparison = predictor.compare("media", "v1", "v2", at(500)).unwrap();
        assert!(comparison.candidate.failure > 0.09 && comparison.candidate.failure < 0.11);
        assert!(comparison.baseline.failure < 0.02);
        assert!(comparison.clearly_higher, "{}", comparison.reason);
        let reverse = predictor.compare("media", "v2", "v1", at(500)).unwrap();
        assert!(!reverse.clearly_higher);
        assert!(predictor.compare("media", "v1", "v3", at(500)).is_none());
    }
}
