//! The controller's Prometheus metrics (names per CONTRACT.md; base units, `_total` counters).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    /// Monitor actions by rule and action (src/monitor.rs).
    pub monitor_actions: CounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let rollout_phase = IntGaugeVec::new(
            Opts::new(
                "understudy_rollout_phase",
                "1 for the phase a rollout is in, 0 for the others.",
            ),
            &["service", "rollout", "phase"],
        )?;
        let transitions = CounterVec::new(
            Opts::new(
                "understudy_rollout_transitions_total",
                "Rollout transitions performed.",
            ),
            &["service", "from", "to"],
        )?;
        let push_seconds = HistogramVec::new(
            HistogramOpts::new(
                "understudy_balancer_push_seconds",
                "Time to push a config to a balancer and get its answer.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["service"],
        )?;
        let push_failures = CounterVec::new(
            Opts::new(
                "understudy_balancer_push_failures_total",
                "Config pushes a balancer did not acknowledge.",
            ),
            &["service"],
        )?;
        let cursor_resets = CounterVec::new(
            Opts::new(
                "understudy_balancer_stats_cursor_resets_total",
                "Stats cursors a balancer could not serve (too old, or ahead after its restart), \
                 replaced by one it can.",
            ),
            &["service", "reason"],
        )?;
        let stats_failures = CounterVec::new(
            Opts::new(
                "understudy_balancer_stats_failures_total",
                "Stats reads from a balancer that failed.",
            ),
            &["service"],
        )?;
        let verdict_latency = GaugeVec::new(
            Opts::new(
                "understudy_verdict_latency_seconds",
                "Latency percentile (p50, p99, p99.9) of the mirrored jobs a rollout compared, per version and configuration.",
            ),
            // Not `quantile`: that label is reserved for summaries.
            &["service", "rollout", "version", "config", "percentile"],
        )?;
        let verdict_error_ratio = GaugeVec::new(
            Opts::new(
                "understudy_verdict_error_ratio",
                "Share of the compared jobs that failed, per version and configuration.",
            ),
            &["service", "rollout", "version", "config"],
        )?;
        let verdict_jobs = IntGaugeVec::new(
            Opts::new(
                "understudy_verdict_jobs",
                "Mirrored job pairs behind a rollout's latest verdict.",
            ),
            &["service", "rollout"],
        )?;
        let verdict_mismatch_ratio = GaugeVec::new(
            Opts::new(
                "understudy_verdict_mismatch_ratio",
                "Share of compared pairs whose answers differed.",
            ),
            &["service", "rollout"],
        )?;
        let verdict_decision = IntGaugeVec::new(
            Opts::new(
                "understudy_verdict_decision",
                "1 for a rollout's current judge decision (pass, fail, not_enough_data).",
            ),
            &["service", "rollout", "decision"],
        )?;
        let judge_starved = IntGaugeVec::new(
            Opts::new(
                "understudy_rollout_judge_starved",
                "1 while a simulating rollout's v2 answers copies and not one pair reaches its \
                 judge (the API shows why in the rollout's `problem`).",
            ),
            &["service", "rollout"],
        )?;
        registry.register(Box::new(judge_starved.clone()))?;
        registry.register(Box::new(rollout_phase.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(push_seconds.clone()))?;
        registry.register(Box::new(push_failures.clone()))?;
        registry.register(Box::new(stats_failures.clone()))?;
        registry.register(Box::new(cursor_resets.clone()))?;
        registry.register(Box::new(verdict_latency.clone()))?;
        registry.register(Box::new(verdict_error_ratio.clone()))?;
        registry.register(Box::new(verdict_jobs.clone()))?;
        registry.register(Box::new(verdict_mismatch_ratio.clone()))?;
        registry.register(Box::new(verdict_decision.clone()))?;
        let monitor_actions = CounterVec::new(
            Opts::new(
                "understudy_monitor_actions_total",
                "Actions the monitor loop took, by the rule that asked for them and the action.",
            ),
            &["rule", "action"],
        )?;
        registry.register(Box::new(monitor_actions.clone()))?;
        for (rule, action) in crate::core::monitor::ACTION_LABELS {
            monitor_actions.with_label_values(&[rule, action]);
        }
        Ok(Metrics {
            registry,
            rollout_phase,
            transitions,
            push_seconds,
            push_failures,
            stats_failures,
            cursor_resets,
            verdict_latency,
            verdict_error_ratio,
            verdict_jobs,
            verdict_mismatch_ratio,
            verdict_decision,
            judge_starved,
            monitor_actions,
        })
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
