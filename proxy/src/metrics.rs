//! Prometheus metrics of one set of balancers (one registry per [`crate::RunningBalancers`], so
//! several sets in one process do not collide). Names as in CONTRACT.md.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::wire::{Outcome, PoolRole};

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
    mirror_dropped: IntCounterVec,
    mirror_held: IntCounterVec,
    mismatch: IntCounterVec,
    refused: IntCounterVec,
    config_version: IntGaugeVec,
    sessions: IntGaugeVec,
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
        let jobs = IntCounterVec::new(
            Opts::new(
                "understudy_balancer_jobs_total",
                "Jobs served (active) or mirrored copies answered (simulation), by outcome.",
            ),
            &["service", "version", "config", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "understudy_balancer_job_duration_seconds",
                "Job latency seen by the balancer, from request to the end of the answer.",
            )
            .buckets(prometheus::exponential_buckets(0.000_25, 2.0, 16)?),
            &["service", "version", "config"],
        )?;
        let mirror_dropped = IntCounterVec::new(
            Opts::new(
                "understudy_balancer_mirror_dropped_total",
                "Mirror copies not sent: queue full, or request body over the copy limit.",
            ),
            &["service"],
        )?;
        let mirror_held = IntCounterVec::new(
            Opts::new(
                "understudy_balancer_mirror_held_total",
                "Mirror copies that waited in their queue because the simulation version had its \
                 cap of copies in flight (a multiple of the service's active jobs in flight).",
            ),
            &["service", "version"],
        )?;
        let mismatch = IntCounterVec::new(
            Opts::new(
                "understudy_balancer_response_mismatch_total",
                "Mirrored jobs whose simulation answer differed from the active answer.",
            ),
            &["service", "version"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "understudy_balancer_refused_total",
                "Jobs refused by the balancer itself, by reason.",
            ),
            &["service", "reason"],
        )?;
        let config_version = IntGaugeVec::new(
            Opts::new(
                "understudy_balancer_config_version",
                "Version of the running balancer config.",
            ),
            &["service"],
        )?;
        let sessions = IntGaugeVec::new(
            Opts::new(
                "understudy_balancer_sessions",
                "Sustained sessions pinned to a machine, by machine state.",
            ),
            &["service", "machine", "state"],
        )?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(mirror_dropped.clone()))?;
        registry.register(Box::new(mirror_held.clone()))?;
        registry.register(Box::new(mismatch.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(config_version.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        Ok(Metrics {
            registry,
            jobs,
            duration,
            mirror_dropped,
            mirror_held,
            mismatch,
            refused,
            config_version,
            sessions,
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
        self.mirror_dropped.with_label_values(&[service])
    }

    pub(crate) fn mirror_held(&self, service: &str, version: &str) -> IntCounter {
        self.mirror_held.with_label_values(&[service, version])
    }

    pub(crate) fn mismatch(&self, service: &str, version: &str) -> IntCounter {
        self.mismatch.with_label_values(&[service, version])
    }

    pub(crate) fn refused(&self, service: &str, reason: &str) -> IntCounter {
        self.refused.with_label_values(&[service, reason])
    }

    pub(crate) fn config_version(&self, service: &str) -> IntGauge {
        self.config_version.with_label_values(&[service])
    }

    /// Replaces the session gauges of `service` with `machines` (machine id, state, sessions).
    pub(crate) fn set_sessions<'a>(
        &self,
        service: &str,
        machines: impl Iterator<Item = (&'a str, &'a str, u64)>,
    ) {
        // Gauges of machines that left the pool would otherwise linger at their last value.
        for family in self.sessions.collect() {
            for metric in family.get_metric() {
                let labels: Vec<&str> = metric.get_label().iter().map(|l| l.value()).collect();
                if labels.first() == Some(&service) {
                    let _ = self.sessions.remove_label_values(&labels);
                }
            }
        }
        for (machine, state, count) in machines {
            self.sessions
                .with_label_values(&[service, machine, state])
                .set(count as i64);
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
