//! Prometheus metrics of one set of balancers (one registry per [`crate::RunningBalancers`], so
//! several sets in one process do not collide). Names as in CONTRACT.md.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use understudy_wire::{
    DigestReason, MachineHealth, MachineState, MachineStatus, Outcome, PoolRole,
};

pub(crate) const OUTCOMES: [Outcome; 5] = [
    Outcome::Ok,
    Outcome::ClientError,
    Outcome::ServerError,
    Outcome::Timeout,
    Outcome::ConnectFailure,
];

pub(crate) fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Ok => 0,
        Outcome::ClientError => 1,
        Outcome::ServerError => 2,
        Outcome::Timeout => 3,
        Outcome::ConnectFailure => 4,
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    duration: HistogramVec,
    mirror: MirrorCounters,
    refused: IntCounterVec,
    limit_hits: IntCounterVec,
    marker_stripped: IntCounterVec,
    config_version: IntGaugeVec,
    config_epoch: IntGaugeVec,
    config_refused: IntCounterVec,
    sessions: IntGaugeVec,
    machine_failing: IntGaugeVec,
}

/// The counters of mirrored copies and their comparison.
struct MirrorCounters {
    dropped: IntCounterVec,
    held: IntCounterVec,
    mismatch: IntCounterVec,
    field_digest: IntCounterVec,
}

impl MirrorCounters {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register_counters(registry, name, help, labels)
        };
        Ok(MirrorCounters {
            dropped: counters(
                "understudy_balancer_mirror_dropped_total",
                "Mirror copies not sent: queue full, or request body over the copy limit.",
                &["service"],
            )?,
            held: counters(
                "understudy_balancer_mirror_held_total",
                "Mirror copies that waited in their queue because the simulation version had its \
                 cap of copies in flight (a multiple of the service's active jobs in flight).",
                &["service", "version"],
            )?,
            mismatch: counters(
                "understudy_balancer_response_mismatch_total",
                "Mirrored jobs whose simulation answer differed from the active answer.",
                &["service", "version"],
            )?,
            field_digest: counters(
                "understudy_balancer_field_digest_total",
                "Answers of compare = \"fields\" pairs compared by body digest instead, by \
                 reason (not_json, too_large, over_budget).",
                &["service", "reason"],
            )?,
        })
    }
}

fn register_counters(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

/// A deadline or cap of `[limits]` (see `config::LimitsSpec`), as counted when hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    HeadTimeout,
    CallerIdle,
    CallerBodyIdle,
    CallerWrite,
    MachineConnect,
    MachineWrite,
    MachineAnswer,
    Sessions,
    SessionIdLength,
}

impl Limit {
    pub(crate) const ALL: [Limit; 9] = [
        Limit::HeadTimeout,
        Limit::CallerIdle,
        Limit::CallerBodyIdle,
        Limit::CallerWrite,
        Limit::MachineConnect,
        Limit::MachineWrite,
        Limit::MachineAnswer,
        Limit::Sessions,
        Limit::SessionIdLength,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::HeadTimeout => "head_timeout",
            Limit::CallerIdle => "caller_idle",
            Limit::CallerBodyIdle => "caller_body_idle",
            Limit::CallerWrite => "caller_write_timeout",
            Limit::MachineConnect => "machine_connect_timeout",
            Limit::MachineWrite => "machine_write_timeout",
            Limit::MachineAnswer => "machine_answer_timeout",
            Limit::Sessions => "max_sessions",
            Limit::SessionIdLength => "max_session_id_bytes",
        }
    }
}

/// One service's limit counters, resolved once.
pub(crate) struct LimitHits([IntCounter; 9]);

impl LimitHits {
    pub(crate) fn hit(&self, limit: Limit) {
        self.0[limit as usize].inc();
    }
}

/// The metric children of one (service, version, config) series, resolved once so the per-job path
/// does no label lookup.
pub(crate) struct SeriesMetrics {
    jobs: [IntCounter; 5],
    duration: Histogram,
}

impl SeriesMetrics {
    pub(crate) fn observe(&self, latency_us: u64, outcome: Outcome) {
        self.jobs[outcome_index(outcome)].inc();
        self.duration.observe(latency_us as f64 / 1e6);
    }
}

impl Metrics {
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "understudy_balancer_job_duration_seconds",
                "Job latency seen by the balancer, from request to the end of the answer.",
            )
            .buckets(prometheus::exponential_buckets(0.000_25, 2.0, 16)?),
            &["service", "version", "config"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register_counters(&registry, name, help, labels)
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        Ok(Metrics {
            jobs: counters(
                "understudy_balancer_jobs_total",
                "Jobs served (active) or mirrored copies answered (simulation), by outcome.",
                &["service", "version", "config", "outcome"],
            )?,
            duration,
            mirror: MirrorCounters::new(&registry)?,
            refused: counters(
                "understudy_balancer_refused_total",
                "Jobs refused by the balancer itself, by reason.",
                &["service", "reason"],
            )?,
            limit_hits: counters(
                "understudy_balancer_limit_hits_total",
                "Deadlines and caps of the balancer's [limits] reached, by limit.",
                &["service", "limit"],
            )?,
            marker_stripped: counters(
                "understudy_balancer_marker_stripped_total",
                "Jobs from outside the cluster that claimed to be simulation jobs; the claim \
                 was dropped and the job served as an ordinary one.",
                &["service"],
            )?,
            config_version: gauges(
                "understudy_balancer_config_version",
                "Version of the running balancer config.",
                &["service"],
            )?,
            config_epoch: gauges(
                "understudy_balancer_config_epoch",
                "Highest controller fencing epoch applied; a config from a lower epoch is refused.",
                &["service"],
            )?,
            config_refused: counters(
                "understudy_balancer_config_refused_total",
                "Pushed configs refused for where they came from, by reason (stale_epoch: a \
                 controller that lost its lead).",
                &["service", "reason"],
            )?,
            sessions: gauges(
                "understudy_balancer_sessions",
                "Sustained sessions pinned to a machine, by machine state.",
                &["service", "machine", "state"],
            )?,
            machine_failing: gauges(
                "understudy_balancer_machine_failing",
                "1 while the machine fails its health probes (it gets no new caller job), else 0.",
                &["service", "machine"],
            )?,
            registry,
        })
    }

    pub(crate) fn series(&self, service: &str, version: &str, role: PoolRole) -> SeriesMetrics {
        let config = role.as_str();
        SeriesMetrics {
            jobs: OUTCOMES.map(|o| {
                self.jobs
                    .with_label_values(&[service, version, config, o.as_str()])
            }),
            duration: self.duration.with_label_values(&[service, version, config]),
        }
    }

    pub(crate) fn mirror_dropped(&self, service: &str) -> IntCounter {
        self.mirror.dropped.with_label_values(&[service])
    }

    pub(crate) fn mirror_held(&self, service: &str, version: &str) -> IntCounter {
        self.mirror.held.with_label_values(&[service, version])
    }

    pub(crate) fn mismatch(&self, service: &str, version: &str) -> IntCounter {
        self.mirror.mismatch.with_label_values(&[service, version])
    }

    pub(crate) fn field_digest(&self, service: &str, reason: DigestReason) -> IntCounter {
        self.mirror
            .field_digest
            .with_label_values(&[service, reason.as_str()])
    }

    pub(crate) fn refused(&self, service: &str, reason: &str) -> IntCounter {
        self.refused.with_label_values(&[service, reason])
    }

    pub(crate) fn limit_hits(&self, service: &str) -> LimitHits {
        LimitHits(Limit::ALL.map(|l| self.limit_hits.with_label_values(&[service, l.as_str()])))
    }

    pub(crate) fn marker_stripped(&self, service: &str) -> IntCounter {
        self.marker_stripped.with_label_values(&[service])
    }

    pub(crate) fn config_version(&self, service: &str) -> IntGauge {
        self.config_version.with_label_values(&[service])
    }

    pub(crate) fn config_epoch(&self, service: &str) -> IntGauge {
        self.config_epoch.with_label_values(&[service])
    }

    pub(crate) fn config_refused(&self, service: &str, reason: &str) -> IntCounter {
        self.config_refused.with_label_values(&[service, reason])
    }

    /// Replaces the per-machine gauges of `service` (sessions by state, failing) with those of
    /// `machines`.
    pub(crate) fn set_machines(&self, service: &str, machines: &[MachineStatus]) {
        // Gauges of machines that left the pool would otherwise linger at their last value.
        for vec in [&self.sessions, &self.machine_failing] {
            for family in vec.collect() {
                for metric in family.get_metric() {
                    let labels: Vec<&str> = metric.get_label().iter().map(|l| l.value()).collect();
                    if labels.first() == Some(&service) {
                        let _ = vec.remove_label_values(&labels);
                    }
                }
            }
        }
        for m in machines {
            let state = match m.state {
                MachineState::Serving => "serving",
                MachineState::Draining => "draining",
            };
            self.sessions
                .with_label_values(&[service, &m.id, state])
                .set(m.sessions as i64);
            let failing = m.health == MachineHealth::Failing;
            self.machine_failing
                .with_label_values(&[service, &m.id])
                .set(i64::from(failing));
        }
    }

    /// The registry other parts of the balancer (signing, the NATS feed) register into.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed family, a bug.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("prometheus text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
