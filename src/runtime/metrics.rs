//! The controller's Prometheus metrics (names per CONTRACT.md; base units, `_total` counters).

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::core::rollout::PHASE_NAMES;

pub struct Metrics {
    registry: Registry,
    pub rollout_phase: IntGaugeVec,
    pub transitions: CounterVec,
    pub push_seconds: HistogramVec,
    pub push_failures: CounterVec,
    pub stats_failures: CounterVec,
    pub cursor_resets: CounterVec,
    pub verdict_latency: GaugeVec,
    pub verdict_error_ratio: GaugeVec,
    pub verdict_jobs: IntGaugeVec,
    pub verdict_mismatch_ratio: GaugeVec,
    pub verdict_decision: IntGaugeVec,
    /// 1 while a simulating rollout's v2 answers copies and none reaches its judge.
    pub judge_starved: IntGaugeVec,
    /// Monitor actions by rule and action (src/runtime/monitor.rs).
    pub monitor_actions: CounterVec,
    /// The fencing epoch this controller pushes configs with.
    pub epoch: IntGauge,
    /// 1 while this controller leads, 0 while it stands by.
    pub leader: IntGauge,
    /// Pushes a balancer refused because it applied a newer epoch: another controller leads.
    pub fenced: CounterVec,
    /// Field differences of copies' answers (`compare = "fields"`), by field and side.
    pub field_differences: FieldDifferences,
    /// The share of callers' jobs each balancer copies, as it last acknowledged.
    pub mirror_fraction: GaugeVec,
    /// Copies answered by simulation machines (v2 and the control), from the balancers' pairs.
    pub mirror_copies: CounterVec,
}

/// One metric family: its name, help text and label names.
struct Def {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const ROLLOUT_PHASE: Def = Def {
    name: "understudy_rollout_phase",
    help: "1 for the phase a rollout is in, 0 for the others.",
    labels: &["service", "rollout", "phase"],
};
const TRANSITIONS: Def = Def {
    name: "understudy_rollout_transitions_total",
    help: "Rollout transitions performed.",
    labels: &["service", "from", "to"],
};
const PUSH_SECONDS: Def = Def {
    name: "understudy_balancer_push_seconds",
    help: "Time to push a config to a balancer and get its answer.",
    labels: &["service"],
};
const PUSH_SECONDS_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const PUSH_FAILURES: Def = Def {
    name: "understudy_balancer_push_failures_total",
    help: "Config pushes a balancer did not acknowledge.",
    labels: &["service"],
};
const CURSOR_RESETS: Def = Def {
    name: "understudy_balancer_stats_cursor_resets_total",
    help: "Stats cursors a balancer could not serve (too old, or ahead after its restart), \
           replaced by one it can.",
    labels: &["service", "reason"],
};
const STATS_FAILURES: Def = Def {
    name: "understudy_balancer_stats_failures_total",
    help: "Stats reads from a balancer that failed.",
    labels: &["service"],
};
const VERDICT_LATENCY: Def = Def {
    name: "understudy_verdict_latency_seconds",
    help: "Latency percentile (p50, p99, p99.9) of the mirrored jobs a rollout compared, per version and configuration.",
    // Not `quantile`: that label is reserved for summaries.
    labels: &["service", "rollout", "version", "config", "percentile"],
};
const VERDICT_ERROR_RATIO: Def = Def {
    name: "understudy_verdict_error_ratio",
    help: "Share of the compared jobs that failed, per version and configuration.",
    labels: &["service", "rollout", "version", "config"],
};
const VERDICT_JOBS: Def = Def {
    name: "understudy_verdict_jobs",
    help: "Mirrored job pairs behind a rollout's latest verdict.",
    labels: &["service", "rollout"],
};
const VERDICT_MISMATCH_RATIO: Def = Def {
    name: "understudy_verdict_mismatch_ratio",
    help: "Share of compared pairs whose answers differed.",
    labels: &["service", "rollout"],
};
const VERDICT_DECISION: Def = Def {
    name: "understudy_verdict_decision",
    help: "1 for a rollout's current judge decision (pass, fail, not_enough_data).",
    labels: &["service", "rollout", "decision"],
};
const JUDGE_STARVED: Def = Def {
    name: "understudy_rollout_judge_starved",
    help: "1 while a simulating rollout's v2 answers copies and not one pair reaches its \
           judge (the API shows why in the rollout's `problem`).",
    labels: &["service", "rollout"],
};
const EPOCH: Def = Def {
    name: "understudy_controller_epoch",
    help: "The fencing epoch this controller sends in every balancer config (one more at each \
           start or takeover).",
    labels: &[],
};
const LEADER: Def = Def {
    name: "understudy_controller_leader",
    help: "1 while this controller leads (acts), 0 while it stands by behind the one that holds            the lease.",
    labels: &[],
};
const FENCED: Def = Def {
    name: "understudy_balancer_push_fenced_total",
    help: "Config pushes a balancer refused for a newer fencing epoch it applied: another \
           controller has taken over.",
    labels: &["service"],
};
const MIRROR_FRACTION: Def = Def {
    name: "understudy_mirror_fraction",
    help: "Share of callers' jobs the service's balancer copies to its simulation pool, as it \
           last acknowledged (a mirror budget steers it by the judge's evidence).",
    labels: &["service"],
};
const MIRROR_COPIES: Def = Def {
    name: "understudy_mirror_copies_total",
    help: "Copies of callers' jobs answered by the service's simulation machines (v2 and the \
           A/A control), as the balancer reported them in pairs.",
    labels: &["service"],
};
const MONITOR_ACTIONS: Def = Def {
    name: "understudy_monitor_actions_total",
    help: "Actions the monitor loop took, by the rule that asked for them and the action.",
    labels: &["rule", "action"],
};

const FIELD_DIFFERENCES: Def = Def {
    name: "understudy_field_differences_total",
    help: "Copies whose answer differed from the active answer in a field (compare = \
           \"fields\"), by field path and side (v2, or the A/A control); at most 64 fields per \
           service, the rest counted as (other).",
    labels: &["service", "field", "side"],
};

/// The most field labels per service; later fields count under `(other)`.
const FIELD_LABELS_PER_SERVICE: usize = 64;

/// `understudy_field_differences_total`, its label set bounded per service.
pub struct FieldDifferences {
    counter: CounterVec,
    seen: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
}

impl FieldDifferences {
    fn new(counter: CounterVec) -> Self {
        FieldDifferences {
            counter,
            seen: Default::default(),
        }
    }

    /// Counts each differing field of each pair (v2's or the control's copy).
    pub fn count(&self, service: &str, pairs: &[crate::core::pairing::StoredPair]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let known = seen.entry(service.to_string()).or_default();
        for pair in pairs {
            let Some(fields) = &pair.fields else { continue };
            let side = if pair.control { "control" } else { "v2" };
            for p in &fields.paths {
                let field = if known.contains(&p.path) {
                    p.path.as_str()
                } else if known.len() < FIELD_LABELS_PER_SERVICE {
                    known.insert(p.path.clone());
                    p.path.as_str()
                } else {
                    understudy_judge::OTHER_FIELD
                };
                self.counter
                    .with_label_values(&[service, field, side])
                    .inc();
            }
        }
    }
}

/// Creates each metric from its [`Def`] and registers it at once, so `Metrics::new` reads as a
/// list of the families rather than pairs of constructor and registration calls.
struct Registrar<'r> {
    registry: &'r Registry,
}

impl Registrar<'_> {
    fn register<C: Collector + Clone + 'static>(&self, metric: C) -> Result<C, prometheus::Error> {
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn counter(&self, def: &Def) -> Result<CounterVec, prometheus::Error> {
        self.register(CounterVec::new(Opts::new(def.name, def.help), def.labels)?)
    }

    fn gauge(&self, def: &Def) -> Result<GaugeVec, prometheus::Error> {
        self.register(GaugeVec::new(Opts::new(def.name, def.help), def.labels)?)
    }

    fn int_gauge(&self, def: &Def) -> Result<IntGaugeVec, prometheus::Error> {
        self.register(IntGaugeVec::new(Opts::new(def.name, def.help), def.labels)?)
    }

    fn histogram(&self, def: &Def, buckets: &[f64]) -> Result<HistogramVec, prometheus::Error> {
        let opts = HistogramOpts::new(def.name, def.help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, def.labels)?)
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let r = Registrar {
            registry: &registry,
        };
        let metrics = Metrics {
            rollout_phase: r.int_gauge(&ROLLOUT_PHASE)?,
            transitions: r.counter(&TRANSITIONS)?,
            push_seconds: r.histogram(&PUSH_SECONDS, &PUSH_SECONDS_BUCKETS)?,
            push_failures: r.counter(&PUSH_FAILURES)?,
            stats_failures: r.counter(&STATS_FAILURES)?,
            cursor_resets: r.counter(&CURSOR_RESETS)?,
            verdict_latency: r.gauge(&VERDICT_LATENCY)?,
            verdict_error_ratio: r.gauge(&VERDICT_ERROR_RATIO)?,
            verdict_jobs: r.int_gauge(&VERDICT_JOBS)?,
            verdict_mismatch_ratio: r.gauge(&VERDICT_MISMATCH_RATIO)?,
            verdict_decision: r.int_gauge(&VERDICT_DECISION)?,
            judge_starved: r.int_gauge(&JUDGE_STARVED)?,
            monitor_actions: r.counter(&MONITOR_ACTIONS)?,
            epoch: r.register(IntGauge::new(EPOCH.name, EPOCH.help)?)?,
            leader: r.register(IntGauge::new(LEADER.name, LEADER.help)?)?,
            fenced: r.counter(&FENCED)?,
            field_differences: FieldDifferences::new(r.counter(&FIELD_DIFFERENCES)?),
            mirror_fraction: r.gauge(&MIRROR_FRACTION)?,
            mirror_copies: r.counter(&MIRROR_COPIES)?,
            registry,
        };
        // Every rule/action pair shows (at 0) before the monitor first acts.
        for (rule, action) in crate::core::monitor::ACTION_LABELS {
            metrics.monitor_actions.with_label_values(&[rule, action]);
        }
        Ok(metrics)
    }

    /// Sets the phase gauge of a rollout: 1 for `phase`, 0 for the others.
    pub fn set_phase(&self, service: &str, rollout: i64, phase: &str) {
        let id = rollout.to_string();
        for name in PHASE_NAMES {
            self.rollout_phase
                .with_label_values(&[service, &id, name])
                .set(i64::from(name == phase));
        }
    }

    /// Zero counters for every service, so dashboards see them before the first failure.
    pub fn register_service(&self, service: &str) {
        self.push_failures.with_label_values(&[service]);
        self.stats_failures.with_label_values(&[service]);
        self.mirror_fraction.with_label_values(&[service]);
        self.mirror_copies.with_label_values(&[service]);
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // The text encoder only fails on a broken writer; a Vec never is.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Runs `promtool check metrics` on a `/metrics` page (scripts/setup.sh installs promtool).
#[cfg(test)]
pub(crate) fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: run scripts/setup.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod field_difference_tests {
    use super::*;
    use crate::core::pairing::StoredPair;
    use std::sync::Arc;
    use understudy_judge::{AnswerFields, FieldValues, PairSample};

    fn pair(control: bool, paths: &[String]) -> StoredPair {
        StoredPair {
            control,
            job: 1,
            sample: PairSample {
                v1_latency_us: 1,
                v1_ok: true,
                v2_latency_us: 1,
                v2_ok: true,
                matched: Some(false),
            },
            fields: Some(Arc::new(AnswerFields {
                paths: paths
                    .iter()
                    .map(|p| FieldValues {
                        path: p.clone(),
                        v1: None,
                        copy: None,
                    })
                    .collect(),
            })),
        }
    }

    #[test]
    fn field_labels_are_bounded_per_service() {
        let metrics = Metrics::new().unwrap();
        let many: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        metrics
            .field_differences
            .count("media", &[pair(false, &many), pair(true, &many[..1])]);
        let c = &metrics.field_differences.counter;
        assert_eq!(c.with_label_values(&["media", "f0", "v2"]).get(), 1.0);
        assert_eq!(c.with_label_values(&["media", "f0", "control"]).get(), 1.0);
        assert_eq!(c.with_label_values(&["media", "f63", "v2"]).get(), 1.0);
        assert_eq!(c.with_label_values(&["media", "(other)", "v2"]).get(), 36.0);
        // Another service has labels of its own.
        metrics
            .field_differences
            .count("web", &[pair(false, &many[99..])]);
        assert_eq!(c.with_label_values(&["web", "f99", "v2"]).get(), 1.0);
    }
}
