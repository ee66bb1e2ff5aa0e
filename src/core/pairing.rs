//! What the judge is fed: v2's answer paired, job by job, with its baseline (see
//! `understudy_judge::Baseline`). With a control machine in the simulation pool, the balancer copies
//! each job to v2 and to the control at the same moment through the same mirror path; the two
//! halves arrive as separate balancer pairs (v1-active/v2 and v1-active/control) sharing the job
//! number, possibly in different stats windows. [`PairFeed`] joins them into one same-path pair
//! (control as v1, v2 as v2), so what the path adds (mirror queueing, a burst on a busy host) hits
//! both halves alike instead of being blamed on v2.
//!
//! Answers compared field by field (`compare = "fields"`) are judged job by job against the
//! control's answer to the same job whenever a control runs, whatever the baseline: the field
//! differences both copies show (timestamps, ids) are the noise subtracted from v2's. A v2 copy
//! whose control copy never came (dropped) is then not judged.

use std::collections::BTreeMap;
use std::sync::Arc;

use understudy_judge::{AnswerFields, Baseline, FieldValues, Judge, PairSample};
use understudy_wire::{AnswerDiff, JobPair};

/// Halves kept while waiting for their partner; a half whose partner was dropped (mirror queue
/// full) is forgotten oldest first beyond this.
const PENDING_LIMIT: usize = 65_536;

/// Feeds a rollout's stored pairs to its judge, in arrival order, as its condition's baseline asks.
#[derive(Debug)]
pub struct PairFeed {
    against_control: bool,
    /// A control runs the rollout's from-version: field differences are judged against its.
    has_control: bool,
    /// The condition asked for the control but no control runs the rollout's from-version.
    fell_back: bool,
    joiner: JobJoiner<StoredPair>,
}

/// The two balancer pairs of one job (v2's copy and the control's copy, each against the active
/// answer) brought together by job number, in whatever order and window they arrive.
#[derive(Debug)]
pub struct JobJoiner<T = PairSample> {
    /// Job number -> the half that came first (`true`: the control's).
    pending: BTreeMap<u64, (bool, T)>,
}

impl<T> Default for JobJoiner<T> {
    fn default() -> Self {
        JobJoiner {
            pending: BTreeMap::new(),
        }
    }
}

impl<T> JobJoiner<T> {
    /// Takes one half; gives `(control's pair, v2's pair)` once both halves of the job came.
    pub fn offer(&mut self, job: u64, control: bool, sample: T) -> Option<(T, T)> {
        match self.pending.remove(&job) {
            Some((first_is_control, first)) if first_is_control != control => Some(if control {
                (sample, first)
            } else {
                (first, sample)
            }),
            // The same side twice for one job (a balancer restart renumbering jobs): keep the newer.
            _ => {
                self.pending.insert(job, (control, sample));
                if self.pending.len() > PENDING_LIMIT {
                    self.pending.pop_first();
                }
                None
            }
        }
    }
}

impl PairFeed {
    /// `has_control`: the service keeps a control machine running the rollout's from-version (a
    /// control of another version, left by an earlier release, answers copies this rollout does
    /// not pair with, so it cannot be the baseline).
    pub fn new(baseline: Baseline, has_control: bool) -> PairFeed {
        PairFeed {
            against_control: baseline == Baseline::Control && has_control,
            has_control,
            fell_back: baseline == Baseline::Control && !has_control,
            joiner: JobJoiner::default(),
        }
    }

    /// Whether v2 is judged against the control (else against the active machine).
    pub fn against_control(&self) -> bool {
        self.against_control
    }

    /// Whether the condition asked for the control baseline and the active one is used instead.
    pub fn fell_back(&self) -> bool {
        self.fell_back
    }

    pub fn feed(&mut self, judge: &mut Judge, pair: &StoredPair) {
        let by_fields = pair.fields.is_some() && self.has_control;
        if !self.against_control && !by_fields {
            match (&pair.fields, pair.control) {
                (_, true) => judge.observe_control(&pair.sample),
                (Some(fields), false) => judge.observe_with_fields(&pair.sample, fields, None),
                (None, false) => judge.observe(&pair.sample),
            }
            return;
        }
        if pair.control {
            // Still the noise baseline of the details (control vs active).
            judge.observe_control(&pair.sample);
        }
        let Some((control, candidate)) = self.joiner.offer(pair.job, pair.control, pair.clone())
        else {
            return;
        };
        let sample = if self.against_control {
            same_path_pair(&control.sample, &candidate.sample)
        } else {
            candidate.sample
        };
        match (&candidate.fields, &control.fields) {
            // Only a successful control answer is a baseline for v2's fields.
            (Some(v2), Some(noise)) if control.sample.v2_ok => {
                judge.observe_with_fields(&sample, v2, Some(noise))
            }
            _ => judge.observe(&sample),
        }
    }

    #[cfg(test)]
    fn join(&mut self, pair: &StoredPair) -> Option<PairSample> {
        self.joiner
            .offer(pair.job, pair.control, pair.clone())
            .map(|(control, candidate)| same_path_pair(&control.sample, &candidate.sample))
    }
}

/// A balancer's field differences as the judge reads them.
pub fn fields_of(pair: &JobPair) -> Option<Arc<AnswerFields>> {
    pair.diff.as_ref().map(|d| Arc::new(answer_fields(d)))
}

fn answer_fields(diff: &AnswerDiff) -> AnswerFields {
    AnswerFields {
        paths: diff
            .paths
            .iter()
            .map(|p| FieldValues {
                path: p.path.clone(),
                v1: p.active.clone(),
                copy: p.simulation.clone(),
            })
            .collect(),
    }
}

/// A balancer pair as the judge sees it: the active answer as v1, the simulation copy's as v2.
pub fn sample_of(pair: &JobPair) -> PairSample {
    PairSample {
        v1_latency_us: pair.active.latency_us,
        v1_ok: pair.active.outcome.is_ok(),
        v2_latency_us: pair.simulation.latency_us,
        v2_ok: pair.simulation.outcome.is_ok(),
        matched: Some(pair.matched),
    }
}

/// The control's answer as v1, v2's as v2, from the balancer's two pairs of one job (each with the
/// active answer as its v1 side). Both copies were compared with the active answer, v1's too: v2's
/// comparison stands.
pub fn same_path_pair(control: &PairSample, candidate: &PairSample) -> PairSample {
    PairSample {
        v1_latency_us: control.v2_latency_us,
        v1_ok: control.v2_ok,
        v2_latency_us: candidate.v2_latency_us,
        v2_ok: candidate.v2_ok,
        matched: candidate.matched,
    }
}

/// One recorded pair of a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPair {
    /// A v1/v1 A/A control pair rather than v1/v2.
    pub control: bool,
    /// The balancer's job number: a v2 pair and a control pair of one job share it.
    pub job: u64,
    pub sample: PairSample,
    /// Where the copy's answer differs from the active one (`compare = "fields"` only).
    pub fields: Option<Arc<AnswerFields>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_judge::{Condition, Decision};

    fn stored(job: u64, control: bool, active_us: u64, sim_us: u64, sim_ok: bool) -> StoredPair {
        StoredPair {
            control,
            job,
            sample: PairSample {
                v1_latency_us: active_us,
                v1_ok: true,
                v2_latency_us: sim_us,
                v2_ok: sim_ok,
                matched: Some(true),
            },
            fields: None,
        }
    }

    #[test]
    fn halves_of_one_job_join_in_either_order_into_a_same_path_pair() {
        let mut feed = PairFeed::new(Baseline::Control, true);
        assert!(feed.join(&stored(1, false, 1_000, 2_000, false)).is_none());
        assert!(feed.join(&stored(2, true, 1_000, 1_500, true)).is_none());
        let one = feed.join(&stored(1, true, 1_000, 1_900, true)).unwrap();
        assert_eq!(
            (one.v1_latency_us, one.v1_ok, one.v2_latency_us, one.v2_ok),
            (1_900, true, 2_000, false)
        );
        let two = feed.join(&stored(2, false, 1_000, 1_600, true)).unwrap();
        assert_eq!((two.v1_latency_us, two.v2_latency_us), (1_500, 1_600));
        assert!(feed.joiner.pending.is_empty());
    }

    #[test]
    fn unmatched_halves_are_bounded() {
        let mut feed = PairFeed::new(Baseline::Control, true);
        for job in 0..(PENDING_LIMIT as u64 + 10) {
            feed.join(&stored(job, false, 1, 1, true));
        }
        assert_eq!(feed.joiner.pending.len(), PENDING_LIMIT);
        assert_eq!(feed.joiner.pending.keys().next(), Some(&10));
    }

    fn with_fields(mut pair: StoredPair, paths: &[(&str, &str, &str)]) -> StoredPair {
        let paths = paths
            .iter()
            .map(|(path, v1, copy)| FieldValues {
                path: path.to_string(),
                v1: Some(v1.to_string()),
                copy: Some(copy.to_string()),
            })
            .collect();
        pair.sample.matched = Some(false);
        pair.fields = Some(Arc::new(AnswerFields { paths }));
        pair
    }

    /// Field differences are judged job by job against the control's copy of the same job,
    /// with either baseline: a timestamp both copies differ in is noise, a price only v2
    /// changed fails the rollout and is named.
    #[test]
    fn field_differences_are_judged_against_the_controls_copy_of_the_same_job() {
        let condition = Condition {
            warmup_jobs: 10,
            min_jobs: 50,
            ..Condition::default()
        };
        for baseline in [Baseline::Active, Baseline::Control] {
            let run = |price: bool| {
                let mut judge = Judge::new(condition.clone());
                let mut feed = PairFeed::new(baseline, true);
                for job in 0..3_000u64 {
                    let stamp = ("generated_at", "1", "2");
                    let v2 = if price {
                        vec![stamp, ("items[].price", "12.5", "13.0")]
                    } else {
                        vec![stamp]
                    };
                    let work = 1_000 + (job * 7_919) % 3_000;
                    // The control's half first on odd jobs, v2's on even ones.
                    let halves = [
                        with_fields(stored(job, false, work, work, true), &v2),
                        with_fields(stored(job, true, work, work, true), &[stamp]),
                    ];
                    let order = if job % 2 == 0 { [0, 1] } else { [1, 0] };
                    for i in order {
                        feed.feed(&mut judge, &halves[i]);
                    }
                    if judge.decision() == Decision::Fail {
                        break;
                    }
                }
                judge
            };
            let changed = run(true).verdict();
            assert_eq!(changed.decision, Decision::Fail, "{baseline:?}");
            assert!(changed.rule.contains("items[].price"), "{}", changed.rule);
            let noisy = run(false);
            assert_ne!(noisy.decision(), Decision::Fail, "{}", noisy.verdict().rule);
            assert_eq!(noisy.fields().unwrap().jobs, 3_000 - 10);
        }
    }

    #[test]
    fn a_balancers_diff_becomes_the_judges_fields() {
        let observation = |version: &str| understudy_wire::JobObservation {
            machine: "m".into(),
            version: version.into(),
            latency_us: 1,
            outcome: understudy_wire::Outcome::Ok,
            status: Some(200),
        };
        let mut pair = JobPair {
            job: 1,
            session: None,
            active: observation("v1"),
            simulation: observation("v2"),
            matched: false,
            diff: None,
        };
        assert_eq!(fields_of(&pair), None);
        pair.diff = Some(AnswerDiff {
            kind: understudy_wire::DiffKind::Fields,
            digest_reason: None,
            paths: vec![understudy_wire::FieldDifference {
                path: "a.b".into(),
                active: Some("1".into()),
                simulation: None,
            }],
        });
        let fields = fields_of(&pair).unwrap();
        assert_eq!(
            fields.paths,
            [FieldValues {
                path: "a.b".into(),
                v1: Some("1".into()),
                copy: None
            }]
        );
    }

    /// The mirror path is 30% slower than the active one for both copies: against the active
    /// machine an identical v2 looks 30% slower and is rolled back; against the control it passes.
    #[test]
    fn a_slow_mirror_path_is_not_blamed_on_v2_when_judged_against_the_control() {
        let condition = Condition {
            warmup_jobs: 10,
            min_jobs: 50,
            latency: vec![understudy_judge::LatencyLimit {
                quantile: 0.5,
                max_ratio: 1.1,
            }],
            ..Condition::default()
        };
        let verdict = |baseline| {
            let mut judge = Judge::new(condition.clone());
            let mut feed = PairFeed::new(baseline, true);
            for job in 0..4_000u64 {
                let work = 1_000 + (job * 7_919) % 3_000;
                let sim = work * 13 / 10;
                feed.feed(&mut judge, &stored(job, false, work, sim, true));
                feed.feed(&mut judge, &stored(job, true, work, sim, true));
                if judge.is_final() {
                    break;
                }
            }
            judge.verdict()
        };
        assert_eq!(verdict(Baseline::Active).decision, Decision::Fail);
        assert_eq!(verdict(Baseline::Control).decision, Decision::Pass);
        // Without a control machine the control baseline falls back to the active machine.
        assert!(!PairFeed::new(Baseline::Control, false).against_control());
    }
}
