//! Approvals bound to the evidence: the log of material changes a rollout's evidence goes
//! through while it awaits approval, operators' approvals decided by
//! `core::evidence::decide_approval`, and what the dashboard charts of a rollout.

use serde::Serialize;
use utoipa::ToSchema;

use super::{lock, Core, OpsRequest, RequestError, State};
use crate::core::evidence::{
    decide_approval, ApprovalCase, ApprovalOutcome, ApprovalRefusal, EvidenceSeries,
    EvidenceSnapshot,
};
use crate::core::rollout::Phase;
use crate::core::verdict::LatencyBuckets;
use crate::store::approvals as stored;

/// Buckets of the latency overlay.
const LATENCY_BINS: usize = 48;

impl Core {
    /// Logs a rollout's evidence (as its last refresh left it) while it awaits approval, when
    /// none is logged yet or it changed materially since the last entry.
    pub(super) fn log_evidence(&self, state: &mut State, id: i64) {
        let now = self.now_ms();
        let Some(r) = state.rollouts.get_mut(&id) else {
            return;
        };
        if r.phase != Phase::AwaitingApproval {
            return;
        }
        let Some(current) = r.evidence.clone() else {
            return;
        };
        let last = r.evidence_log.last();
        if last.is_some_and(|l| !current.differs_materially(l)) {
            return;
        }
        let entry = EvidenceSnapshot {
            id: None,
            seq: last.map_or(0, |l| l.seq + 1),
            at_ms: now,
            ..current
        };
        match state.store.write(|tx| stored::log_evidence(tx, id, &entry)) {
            Ok(()) => {
                tracing::info!(rollout = id, seq = entry.seq, "evidence changed materially");
                r.evidence_log.push(entry.clone());
                r.evidence = Some(entry);
            }
            Err(e) => tracing::error!(rollout = id, "evidence not logged: {e}"),
        }
    }

    /// Decides an approval and records it: the cause of the move when the rollout joins now,
    /// `None` when it waits for another operator's approval.
    pub(super) fn approve(
        &self,
        state: &mut State,
        rollout: i64,
        request: &OpsRequest<'_>,
    ) -> Result<Option<String>, RequestError> {
        let now = self.now_ms();
        let Some(r) = state.rollouts.get(&rollout) else {
            return Err(RequestError::NotFound(format!("no rollout {rollout}")));
        };
        if r.phase != Phase::AwaitingApproval {
            return Err(RequestError::Conflict(format!(
                "rollout {rollout} is {}: cannot approve (it does not await approval)",
                r.phase
            )));
        }
        let named = request.evidence.ok_or_else(|| {
            RequestError::BadRequest(format!(
                "approve needs the evidence it approves: {{\"evidence\": ID}} with the \
                 `evidence.id` that GET /api/v1/rollouts/{rollout} shows"
            ))
        })?;
        let policy = state.cluster.services[&r.service].policy.clone();
        // The evidence as it stands this moment, logged if it changed materially.
        if let Some(r) = state.rollouts.get_mut(&rollout) {
            r.refresh_evidence(now);
        }
        self.log_evidence(state, rollout);
        let Some(r) = state.rollouts.get_mut(&rollout) else {
            return Err(RequestError::NotFound(format!("no rollout {rollout}")));
        };
        let current = r.evidence.clone().ok_or_else(|| {
            RequestError::Conflict(format!("rollout {rollout} has no evidence to approve yet"))
        })?;
        let case = ApprovalCase {
            rollout,
            approvers: policy.approvers,
            ttl: policy.approval_ttl,
            named,
            log: &r.evidence_log,
            current: &current,
            earlier: &r.approvals,
            operator: request.operator,
            now_ms: now,
        };
        let (outcome, approval) = decide_approval(&case).map_err(|refusal| match refusal {
            ApprovalRefusal::Bad(m) => RequestError::BadRequest(m),
            other => RequestError::Conflict(other.to_string()),
        })?;
        state
            .store
            .write(|tx| stored::insert_approval(tx, rollout, &approval))?;
        tracing::info!(
            rollout,
            operator = request.operator,
            evidence = named,
            "approved"
        );
        if let Some(r) = state.rollouts.get_mut(&rollout) {
            r.approvals.push(approval);
        }
        Ok(match outcome {
            ApprovalOutcome::Join { approvers } => {
                Some(format!("approved by {}", approvers.join(" and ")))
            }
            ApprovalOutcome::Recorded { .. } => None,
        })
    }

    /// What the dashboard draws of a rollout; `None` for an unknown one.
    pub fn charts(&self, id: i64) -> Option<RolloutCharts> {
        let state = lock(&self.state);
        let r = state.rollouts.get(&id)?;
        let stats = state
            .services
            .get(&r.service)
            .and_then(|s| s.last_stats.as_ref());
        let n = &r.numbers;
        let verdict = r.verdict.as_ref();
        Some(RolloutCharts {
            latency: n.latency_buckets(LATENCY_BINS),
            quantiles: r
                .quantiles
                .iter()
                .map(|(name, q)| QuantileLine {
                    name: name.clone(),
                    quantile: q.quantile,
                    v1_us: q.v1_us,
                    v2_us: q.v2_us,
                    control_us: q.control_us,
                    ratio: q.ratio,
                    interval: q.ratio_interval,
                    max_ratio: q.max_ratio,
                })
                .collect(),
            rates: Rates {
                v1_error_rate: n.error_rate(false),
                v2_error_rate: n.error_rate(true),
                control_error_rate: n.summary().control_error_rate,
                mismatch_rate: n.mismatch_rate(),
            },
            evidence: r.series.clone(),
            traffic: Traffic {
                callers_jobs: r.callers_jobs,
                not_mirrored: r.callers_jobs.saturating_sub(r.copies_seen),
                copies: r.copies_seen,
                pairs: n.jobs,
                control_pairs: n.control_jobs,
                mirror_dropped: stats.map(|s| s.mirror_dropped),
                pairs_lost: stats.map(|s| s.pairs_lost),
            },
            rule: verdict.map(|v| v.rule.clone()),
        })
    }
}

/// `GET /api/v1/rollouts/{id}/charts`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RolloutCharts {
    /// v1, v2 and the A/A control on shared log-spaced latency buckets.
    pub latency: LatencyBuckets,
    /// Each latency quantile of the condition: v2 against v1, the ratio and its interval.
    pub quantiles: Vec<QuantileLine>,
    pub rates: Rates,
    /// Each test's fail and pass evidence (e-values) against pairs judged.
    pub evidence: EvidenceSeries,
    pub traffic: Traffic,
    /// The rule of the verdict shown.
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QuantileLine {
    pub name: String,
    pub quantile: f64,
    pub v1_us: f64,
    pub v2_us: f64,
    pub control_us: Option<f64>,
    pub ratio: f64,
    /// Interval of the ratio v2/v1.
    pub interval: [f64; 2],
    pub max_ratio: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Rates {
    pub v1_error_rate: f64,
    pub v2_error_rate: f64,
    pub control_error_rate: f64,
    pub mismatch_rate: f64,
}

/// Jobs copied and judged, and what the balancer dropped or lost (counted since this controller
/// took the rollout in).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Traffic {
    /// Callers' jobs the active machines answered while the rollout was judged.
    pub callers_jobs: u64,
    /// Of those, the ones v2 answered no copy of (not copied at the service's `mirror_fraction`,
    /// dropped, or lost).
    pub not_mirrored: u64,
    /// Copies v2 answered since this controller took the rollout in.
    pub copies: u64,
    /// v1/v2 pairs judged.
    pub pairs: u64,
    /// A/A control pairs.
    pub control_pairs: u64,
    /// Copies the balancer dropped (its mirror queue was full), as it last reported.
    pub mirror_dropped: Option<u64>,
    /// Pairs the balancer could not keep until read, as it last reported.
    pub pairs_lost: Option<u64>,
}
