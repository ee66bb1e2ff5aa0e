//! The job schedule: when each job is meant to be sent and what it is. Pure and seeded: the same
//! spec and seed give the same sequence of jobs, whatever the target does.

use crate::spec::{
    check_positive, check_range, fields_of_kind, join, needed, Delay, DelaySpec, SpecError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp1};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// How the arrival rate varies over the run. `rate` (jobs started per second) is given beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "ProfileFields")]
pub enum ProfileSpec {
    /// `rate` for the whole run.
    #[default]
    Constant,
    /// Linear from `from_rate` (default 0) to `rate` over `over_s` seconds (default: the whole
    /// run), then `rate`.
    Ramp { from_rate: f64, over_s: Option<f64> },
    /// `rate` until the first step, then each step's rate from its `at_s`.
    Step { steps: Vec<StepSpec> },
    /// `rate`, except `spike_rate` during `[at_s, at_s + length_s)`.
    Spike {
        at_s: f64,
        length_s: f64,
        spike_rate: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub at_s: f64,
    pub rate: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ProfileKind {
    Constant,
    Ramp,
    Step,
    Spike,
}

/// Every field of every [`ProfileSpec`] kind, as read from TOML (see
/// [`crate::spec::fields_of_kind`] for why).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFields {
    kind: ProfileKind,
    from_rate: Option<f64>,
    over_s: Option<f64>,
    steps: Option<Vec<StepSpec>>,
    at_s: Option<f64>,
    length_s: Option<f64>,
    spike_rate: Option<f64>,
}

impl TryFrom<ProfileFields> for ProfileSpec {
    type Error = String;

    fn try_from(f: ProfileFields) -> Result<Self, String> {
        let (name, takes): (&str, &[&str]) = match f.kind {
            ProfileKind::Constant => ("constant", &[]),
            ProfileKind::Ramp => ("ramp", &["from_rate", "over_s"]),
            ProfileKind::Step => ("step", &["steps"]),
            ProfileKind::Spike => ("spike", &["at_s", "length_s", "spike_rate"]),
        };
        let given = [
            ("from_rate", f.from_rate.is_some()),
            ("over_s", f.over_s.is_some()),
            ("steps", f.steps.is_some()),
            ("at_s", f.at_s.is_some()),
            ("length_s", f.length_s.is_some()),
            ("spike_rate", f.spike_rate.is_some()),
        ];
        fields_of_kind(name, &given, takes)?;
        Ok(match f.kind {
            ProfileKind::Constant => ProfileSpec::Constant,
            ProfileKind::Ramp => ProfileSpec::Ramp {
                from_rate: f.from_rate.unwrap_or(0.0),
                over_s: f.over_s,
            },
            ProfileKind::Step => ProfileSpec::Step {
                steps: needed(name, "steps", f.steps)?,
            },
            ProfileKind::Spike => ProfileSpec::Spike {
                at_s: needed(name, "at_s", f.at_s)?,
                length_s: needed(name, "length_s", f.length_s)?,
                spike_rate: needed(name, "spike_rate", f.spike_rate)?,
            },
        })
    }
}

/// Evenly spaced arrivals (exact rate) or a Poisson process with the same mean rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    #[default]
    Uniform,
    Poisson,
}

/// What each arrival is: relative weights of the job kinds, and the shape of sustained sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSpec {
    #[serde(default)]
    pub sms: f64,
    #[serde(default)]
    pub voice: f64,
    #[serde(default)]
    pub video: f64,
    #[serde(default = "SessionShapeSpec::voice_call")]
    pub voice_call: SessionShapeSpec,
    #[serde(default = "SessionShapeSpec::video_session")]
    pub video_session: SessionShapeSpec,
}

impl Default for MixSpec {
    /// One SMS per arrival: the job rate is exactly the arrival rate.
    fn default() -> Self {
        MixSpec {
            sms: 1.0,
            voice: 0.0,
            video: 0.0,
            voice_call: SessionShapeSpec::voice_call(),
            video_session: SessionShapeSpec::video_session(),
        }
    }
}

/// A sustained session: set-up, an in-call job every `interval_ms`, tear-down after `length`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionShapeSpec {
    pub interval_ms: u64,
    pub length: DelaySpec,
    /// Lengths drawn above this are cut to it, so a run always ends.
    #[serde(default = "default_max_length_ms")]
    pub max_length_ms: u64,
}

fn default_max_length_ms() -> u64 {
    60_000
}

impl SessionShapeSpec {
    pub fn voice_call() -> Self {
        SessionShapeSpec {
            interval_ms: 500,
            length: DelaySpec::Lognormal {
                median_ms: 4_000.0,
                sigma: 0.5,
            },
            max_length_ms: default_max_length_ms(),
        }
    }

    pub fn video_session() -> Self {
        SessionShapeSpec {
            interval_ms: 200,
            length: DelaySpec::Lognormal {
                median_ms: 6_000.0,
                sigma: 0.5,
            },
            max_length_ms: default_max_length_ms(),
        }
    }

    fn validate(&self, field: &str) -> Result<SessionShape, SpecError> {
        if self.interval_ms == 0 {
            return Err(SpecError::new(
                join(field, "interval_ms"),
                "must be at least 1",
            ));
        }
        if self.max_length_ms == 0 {
            return Err(SpecError::new(
                join(field, "max_length_ms"),
                "must be at least 1",
            ));
        }
        Ok(SessionShape {
            interval: Duration::from_millis(self.interval_ms),
            length: self.length.validate(&join(field, "length"))?,
            max_length: Duration::from_millis(self.max_length_ms),
        })
    }
}

#[derive(Debug, Clone)]
struct SessionShape {
    interval: Duration,
    length: Delay,
    max_length: Duration,
}

/// The kind of traffic a job belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Sms,
    Voice,
    Video,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [JobKind::Sms, JobKind::Voice, JobKind::Video];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Sms => "sms",
            JobKind::Voice => "voice",
            JobKind::Video => "video",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Where a job stands in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStep {
    /// A job on its own (an SMS).
    Single,
    SetUp,
    /// The n-th in-call job (1-based).
    InCall(u32),
    TearDown,
}

/// A sustained session a job belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// Session number within the run (0-based, in order of set-up).
    pub number: u64,
    /// How many jobs the whole session has (set-up, in-call jobs, tear-down).
    pub jobs: u32,
}

/// One job of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedJob {
    /// Job number within the run (0-based, in order of intended send time).
    pub seq: u64,
    /// Intended send time, from the start of the run.
    pub at: Duration,
    pub kind: JobKind,
    pub step: JobStep,
    pub session: Option<SessionRef>,
}

impl PlannedJob {
    /// The request path a job is sent to.
    pub fn path(&self) -> &'static str {
        match (self.kind, self.step) {
            (JobKind::Sms, _) => "/sms/send",
            (JobKind::Voice, JobStep::SetUp) => "/voice/setup",
            (JobKind::Voice, JobStep::TearDown) => "/voice/teardown",
            (JobKind::Voice, _) => "/voice/media",
            (JobKind::Video, JobStep::SetUp) => "/video/setup",
            (JobKind::Video, JobStep::TearDown) => "/video/teardown",
            (JobKind::Video, _) => "/video/frame",
        }
    }
}

/// A validated profile: the rate as a piecewise-linear function of time over `[0, duration)`.
#[derive(Debug, Clone)]
pub struct RateCurve {
    segments: Vec<Segment>,
}

/// Rate going linearly from `from` to `to` (per second) between `start` and `end` (seconds).
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: f64,
    end: f64,
    from: f64,
    to: f64,
}

impl Segment {
    fn arrivals(&self) -> f64 {
        (self.from + self.to) / 2.0 * (self.end - self.start)
    }

    /// Time from `start` until `count` arrivals have accumulated (count <= arrivals()).
    fn time_for(&self, count: f64) -> f64 {
        if count <= 0.0 {
            return 0.0;
        }
        // Solve from*x + a*x^2 = count with a = (to-from)/(2*len); this form is stable for a == 0.
        let a = (self.to - self.from) / (2.0 * (self.end - self.start));
        let b = self.from;
        let disc = (b * b + 4.0 * a * count).max(0.0);
        let x = 2.0 * count / (b + disc.sqrt());
        x.min(self.end - self.start)
    }
}

const MAX_RATE: f64 = 10_000_000.0;

impl RateCurve {
    /// Builds the curve of `profile` around `rate` over `duration_s`; `field` prefixes error names.
    pub fn new(
        profile: &ProfileSpec,
        rate: f64,
        duration_s: f64,
        field: &str,
    ) -> Result<Self, SpecError> {
        let rate = check_range("rate", rate, 0.0, MAX_RATE)?;
        let f = |name: &str| join(field, name);
        let end = duration_s;
        let flat = |start: f64, stop: f64, r: f64| Segment {
            start,
            end: stop,
            from: r,
            to: r,
        };
        let mut segments = Vec::new();
        match profile {
            ProfileSpec::Constant => segments.push(flat(0.0, end, rate)),
            ProfileSpec::Ramp { from_rate, over_s } => {
                let from = check_range(&f("from_rate"), *from_rate, 0.0, MAX_RATE)?;
                let over = match over_s {
                    Some(s) => check_positive(&f("over_s"), *s)?,
                    None => end,
                };
                if over >= end {
                    // The ramp is cut at the end of the run: rate at `end` by linear interpolation.
                    segments.push(Segment {
                        start: 0.0,
                        end,
                        from,
                        to: from + (rate - from) * end / over,
                    });
                } else {
                    segments.push(Segment {
                        start: 0.0,
                        end: over,
                        from,
                        to: rate,
                    });
                    segments.push(flat(over, end, rate));
                }
            }
            ProfileSpec::Step { steps } => {
                let mut at = 0.0;
                let mut current = rate;
                for (i, step) in steps.iter().enumerate() {
                    let name = format!("{}[{i}]", f("steps"));
                    let step_at = check_range(&join(&name, "at_s"), step.at_s, 0.0, f64::MAX)?;
                    if step_at < at {
                        return Err(SpecError::new(
                            join(&name, "at_s"),
                            format!("steps must be in time order ({step_at} comes after {at})"),
                        ));
                    }
                    let step_rate = check_range(&join(&name, "rate"), step.rate, 0.0, MAX_RATE)?;
                    segments.push(flat(at, step_at.min(end), current));
                    at = step_at.min(end);
                    current = step_rate;
                }
                segments.push(flat(at, end, current));
            }
            ProfileSpec::Spike {
                at_s,
                length_s,
                spike_rate,
            } => {
                let at = check_range(&f("at_s"), *at_s, 0.0, f64::MAX)?.min(end);
                let length = check_positive(&f("length_s"), *length_s)?;
                let spike = check_range(&f("spike_rate"), *spike_rate, 0.0, MAX_RATE)?;
                let stop = (at + length).min(end);
                segments.push(flat(0.0, at, rate));
                segments.push(flat(at, stop, spike));
                segments.push(flat(stop, end, rate));
            }
        }
        segments.retain(|s| s.end > s.start);
        Ok(RateCurve { segments })
    }

    /// Rate (per second) at `t` seconds.
    pub fn rate_at(&self, t: f64) -> f64 {
        self.segments
            .iter()
            .find(|s| t >= s.start && t < s.end)
            .map(|s| s.from + (s.to - s.from) * (t - s.start) / (s.end - s.start))
            .unwrap_or(0.0)
    }

    /// Expected arrivals over the whole curve.
    pub fn total_arrivals(&self) -> f64 {
        self.segments.iter().map(Segment::arrivals).sum()
    }
}

/// Walks a [`RateCurve`]: the time at which the cumulative expected arrivals reach a target.
#[derive(Debug, Clone)]
struct ArrivalClock {
    curve: RateCurve,
    segment: usize,
    /// Cumulative arrivals at the start of `segment`.
    before: f64,
}

impl ArrivalClock {
    /// Seconds at which the cumulative count reaches `target` (non-decreasing across calls), or
    /// None past the end of the curve.
    fn time_of(&mut self, target: f64) -> Option<f64> {
        while let Some(seg) = self.curve.segments.get(self.segment) {
            let here = seg.arrivals();
            if target < self.before + here {
                let t = seg.start + seg.time_for(target - self.before);
                if t < seg.end {
                    return Some(t);
                }
            }
            self.before += here;
            self.segment += 1;
        }
        None
    }
}

/// A session's next job, waiting in the heap by intended time; `order` breaks ties in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PendingJob {
    at_ns: u64,
    order: u64,
    kind: JobKind,
    step_index: u32,
    session: u64,
    jobs: u32,
    start_ns: u64,
    end_ns: u64,
    interval_ns: u64,
}

/// The validated parts of a load spec that decide the schedule.
#[derive(Debug, Clone)]
pub struct SchedulePlan {
    pub curve: RateCurve,
    pub arrivals: Arrivals,
    pub seed: u64,
    pub max_jobs: Option<u64>,
    weights: [f64; 3],
    shapes: [Option<SessionShape>; 3],
}

impl SchedulePlan {
    pub fn new(
        curve: RateCurve,
        arrivals: Arrivals,
        mix: &MixSpec,
        seed: u64,
        max_jobs: Option<u64>,
    ) -> Result<Self, SpecError> {
        let weights = [
            check_range("mix.sms", mix.sms, 0.0, 1e9)?,
            check_range("mix.voice", mix.voice, 0.0, 1e9)?,
            check_range("mix.video", mix.video, 0.0, 1e9)?,
        ];
        if weights.iter().sum::<f64>() <= 0.0 {
            return Err(SpecError::new(
                "mix",
                "at least one of sms, voice, video must have a positive weight",
            ));
        }
        Ok(SchedulePlan {
            curve,
            arrivals,
            seed,
            max_jobs,
            weights,
            shapes: [
                None,
                Some(mix.voice_call.validate("mix.voice_call")?),
                Some(mix.video_session.validate("mix.video_session")?),
            ],
        })
    }

    pub fn iter(&self) -> Schedule {
        Schedule {
            clock: ArrivalClock {
                curve: self.curve.clone(),
                segment: 0,
                before: 0.0,
            },
            plan: self.clone(),
            rng: StdRng::seed_from_u64(self.seed),
            arrival_target: 0.0,
            next_arrival: None,
            arrivals_done: false,
            pending: BinaryHeap::new(),
            order: 0,
            sessions: 0,
            emitted: 0,
        }
    }
}

/// The jobs of a run in intended-time order. Lazy: memory grows with open sessions, not jobs.
#[derive(Debug, Clone)]
pub struct Schedule {
    plan: SchedulePlan,
    clock: ArrivalClock,
    rng: StdRng,
    arrival_target: f64,
    next_arrival: Option<u64>,
    arrivals_done: bool,
    pending: BinaryHeap<Reverse<PendingJob>>,
    order: u64,
    sessions: u64,
    emitted: u64,
}

impl Schedule {
    /// Sessions whose remaining jobs the schedule will never emit (the job bound was reached).
    pub fn sessions_open(&self) -> usize {
        self.pending.len()
    }

    fn peek_arrival(&mut self) -> Option<u64> {
        if self.next_arrival.is_none() && !self.arrivals_done {
            // Uniform: one arrival per unit of cumulative rate; Poisson: exponential gaps in it.
            let t = self.clock.time_of(self.arrival_target);
            let step = match self.plan.arrivals {
                Arrivals::Uniform => 1.0,
                Arrivals::Poisson => Exp1.sample(&mut self.rng),
            };
            self.arrival_target += step;
            match t {
                Some(secs) => self.next_arrival = Some((secs * 1e9) as u64),
                None => self.arrivals_done = true,
            }
        }
        self.next_arrival
    }

    fn pick_kind(&mut self) -> JobKind {
        let total: f64 = self.plan.weights.iter().sum();
        let mut x = self.rng.gen::<f64>() * total;
        for kind in JobKind::ALL {
            let w = self.plan.weights[kind.index()];
            if x < w {
                return kind;
            }
            x -= w;
        }
        // Rounding at the top end: the last kind with a weight.
        *JobKind::ALL
            .iter()
            .rev()
            .find(|k| self.plan.weights[k.index()] > 0.0)
            .expect("validated: some weight is positive")
    }

    fn arrive(&mut self, at_ns: u64) -> PlannedJob {
        self.next_arrival = None;
        let kind = self.pick_kind();
        let seq = self.emitted;
        let Some(shape) = &self.plan.shapes[kind.index()] else {
            return PlannedJob {
                seq,
                at: Duration::from_nanos(at_ns),
                kind,
                step: JobStep::Single,
                session: None,
            };
        };
        let length = shape.length.sample(&mut self.rng).min(shape.max_length);
        let interval_ns = shape.interval.as_nanos() as u64;
        let length_ns = length.as_nanos() as u64;
        // In-call jobs at every interval strictly inside the session, then the tear-down.
        let in_calls = (length_ns.saturating_sub(1) / interval_ns) as u32;
        let jobs = in_calls + 2;
        let number = self.sessions;
        self.sessions += 1;
        self.push_pending(PendingJob {
            at_ns: if in_calls > 0 {
                at_ns + interval_ns
            } else {
                at_ns + length_ns
            },
            order: 0,
            kind,
            step_index: 1,
            session: number,
            jobs,
            start_ns: at_ns,
            end_ns: at_ns + length_ns,
            interval_ns,
        });
        PlannedJob {
            seq,
            at: Duration::from_nanos(at_ns),
            kind,
            step: JobStep::SetUp,
            session: Some(SessionRef { number, jobs }),
        }
    }

    fn push_pending(&mut self, mut job: PendingJob) {
        job.order = self.order;
        self.order += 1;
        self.pending.push(Reverse(job));
    }

    fn continue_session(&mut self, job: PendingJob) -> PlannedJob {
        let last = job.step_index + 1 == job.jobs;
        let step = if last {
            JobStep::TearDown
        } else {
            JobStep::InCall(job.step_index)
        };
        if !last {
            let next_index = job.step_index + 1;
            let next_at = if next_index + 1 == job.jobs {
                // Tear-down at the session's end, which is after the last in-call job.
                job.end_ns
            } else {
                job.start_ns + job.interval_ns * next_index as u64
            };
            self.push_pending(PendingJob {
                at_ns: next_at,
                step_index: next_index,
                ..job
            });
        }
        PlannedJob {
            seq: self.emitted,
            at: Duration::from_nanos(job.at_ns),
            kind: job.kind,
            step,
            session: Some(SessionRef {
                number: job.session,
                jobs: job.jobs,
            }),
        }
    }
}

impl Iterator for Schedule {
    type Item = PlannedJob;

    fn next(&mut self) -> Option<PlannedJob> {
        if self.plan.max_jobs.is_some_and(|max| self.emitted >= max) {
            return None;
        }
        let arrival = self.peek_arrival();
        let continuation = self.pending.peek().map(|Reverse(p)| p.at_ns);
        let job = match (arrival, continuation) {
            (None, None) => return None,
            (Some(a), Some(c)) if c <= a => {
                let Reverse(p) = self.pending.pop().expect("peeked");
                self.continue_session(p)
            }
            (None, Some(_)) => {
                let Reverse(p) = self.pending.pop().expect("peeked");
                self.continue_session(p)
            }
            (Some(a), _) => self.arrive(a),
        };
        self.emitted += 1;
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(profile: ProfileSpec, rate: f64, duration_s: f64, mix: MixSpec) -> SchedulePlan {
        let curve = RateCurve::new(&profile, rate, duration_s, "profile").unwrap();
        SchedulePlan::new(curve, Arrivals::Uniform, &mix, 7, None).unwrap()
    }

    fn per_second(jobs: &[PlannedJob], seconds: usize) -> Vec<usize> {
        let mut counts = vec![0; seconds];
        for job in jobs {
            counts[job.at.as_secs() as usize] += 1;
        }
        counts
    }

    fn telephony_mix() -> MixSpec {
        MixSpec {
            sms: 2.0,
            voice: 1.0,
            video: 0.5,
            ..MixSpec::default()
        }
    }

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        let curve = RateCurve::new(&ProfileSpec::Constant, 200.0, 5.0, "profile").unwrap();
        let make = |seed| {
            SchedulePlan::new(
                curve.clone(),
                Arrivals::Poisson,
                &telephony_mix(),
                seed,
                None,
            )
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
        };
        let a = make(11);
        assert!(a.len() > 1_000, "{} jobs", a.len());
        assert_eq!(a, make(11));
        assert_ne!(a, make(12));
        // Jobs come in intended-time order and are numbered in that order.
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(a.iter().enumerate().all(|(i, j)| j.seq == i as u64));
    }

    #[test]
    fn constant_uniform_rate_is_exact_and_evenly_spaced() {
        let jobs: Vec<_> = plan(ProfileSpec::Constant, 100.0, 10.0, MixSpec::default())
            .iter()
            .collect();
        assert_eq!(jobs.len(), 1_000);
        assert_eq!(per_second(&jobs, 10), vec![100; 10]);
        for w in jobs.windows(2) {
            let gap = w[1].at - w[0].at;
            assert!(gap.abs_diff(Duration::from_millis(10)) < Duration::from_micros(1));
        }
    }

    #[test]
    fn ramp_rises_linearly() {
        let profile = ProfileSpec::Ramp {
            from_rate: 0.0,
            over_s: None,
        };
        let jobs: Vec<_> = plan(profile, 100.0, 10.0, MixSpec::default())
            .iter()
            .collect();
        // Expected arrivals in second k of a 0 -> 100/s ramp: 10k + 5.
        let counts = per_second(&jobs, 10);
        for (k, n) in counts.iter().enumerate() {
            let expected = 10 * k + 5;
            assert!(n.abs_diff(expected) <= 1, "second {k}: {n} vs {expected}");
        }
        assert!(jobs.len().abs_diff(500) <= 1);
    }

    #[test]
    fn ramp_over_part_of_the_run_then_holds() {
        let profile = ProfileSpec::Ramp {
            from_rate: 100.0,
            over_s: Some(2.0),
        };
        let jobs: Vec<_> = plan(profile, 300.0, 4.0, MixSpec::default())
            .iter()
            .collect();
        let counts = per_second(&jobs, 4);
        assert!(counts[0].abs_diff(150) <= 1, "{counts:?}");
        assert!(counts[1].abs_diff(250) <= 1, "{counts:?}");
        assert_eq!(&counts[2..], &[300, 300]);
    }

    #[test]
    fn steps_switch_rate_at_their_times() {
        let profile = ProfileSpec::Step {
            steps: vec![
                StepSpec {
                    at_s: 2.0,
                    rate: 300.0,
                },
                StepSpec {
                    at_s: 4.0,
                    rate: 0.0,
                },
                StepSpec {
                    at_s: 5.0,
                    rate: 50.0,
                },
            ],
        };
        let jobs: Vec<_> = plan(profile, 100.0, 6.0, MixSpec::default())
            .iter()
            .collect();
        assert_eq!(per_second(&jobs, 6), vec![100, 100, 300, 300, 0, 50]);
    }

    #[test]
    fn spike_lifts_the_rate_for_its_window() {
        let profile = ProfileSpec::Spike {
            at_s: 2.0,
            length_s: 1.0,
            spike_rate: 1_000.0,
        };
        let jobs: Vec<_> = plan(profile, 100.0, 4.0, MixSpec::default())
            .iter()
            .collect();
        assert_eq!(per_second(&jobs, 4), vec![100, 100, 1_000, 100]);
    }

    #[test]
    fn poisson_arrivals_keep_the_mean_rate() {
        let curve = RateCurve::new(&ProfileSpec::Constant, 1_000.0, 10.0, "profile").unwrap();
        let plan =
            SchedulePlan::new(curve, Arrivals::Poisson, &MixSpec::default(), 5, None).unwrap();
        let jobs: Vec<_> = plan.iter().collect();
        assert!(jobs.len().abs_diff(10_000) < 300, "{}", jobs.len());
        // Not evenly spaced: gaps vary.
        let gaps: Vec<_> = jobs.windows(2).map(|w| w[1].at - w[0].at).collect();
        assert!(gaps.iter().any(|g| *g > Duration::from_millis(3)));
    }

    #[test]
    fn a_call_is_setup_in_call_jobs_every_interval_then_teardown() {
        let mix = MixSpec {
            sms: 0.0,
            voice: 1.0,
            video: 0.0,
            voice_call: SessionShapeSpec {
                interval_ms: 300,
                length: DelaySpec::constant_ms(1_000.0),
                max_length_ms: 60_000,
            },
            ..MixSpec::default()
        };
        // One call per second for 2 seconds.
        let jobs: Vec<_> = plan(ProfileSpec::Constant, 1.0, 2.0, mix).iter().collect();
        assert_eq!(jobs.len(), 10);
        let first: Vec<_> = jobs
            .iter()
            .filter(|j| j.session.unwrap().number == 0)
            .map(|j| (j.at.as_millis(), j.step, j.path()))
            .collect();
        assert_eq!(
            first,
            vec![
                (0, JobStep::SetUp, "/voice/setup"),
                (300, JobStep::InCall(1), "/voice/media"),
                (600, JobStep::InCall(2), "/voice/media"),
                (900, JobStep::InCall(3), "/voice/media"),
                (1_000, JobStep::TearDown, "/voice/teardown"),
            ]
        );
        assert!(jobs.iter().all(|j| j.session.unwrap().jobs == 5));
        // At 1 s the first call's tear-down comes before the second call's set-up.
        assert_eq!(
            (jobs[4].step, jobs[4].session.unwrap().number),
            (JobStep::TearDown, 0)
        );
        assert_eq!(
            (jobs[5].step, jobs[5].session.unwrap().number),
            (JobStep::SetUp, 1)
        );
    }

    #[test]
    fn call_lengths_are_capped_and_follow_the_distribution() {
        let mix = MixSpec {
            sms: 0.0,
            voice: 1.0,
            video: 0.0,
            voice_call: SessionShapeSpec {
                interval_ms: 100,
                length: DelaySpec::Exponential { mean_ms: 500.0 },
                max_length_ms: 800,
            },
            ..MixSpec::default()
        };
        let jobs: Vec<_> = plan(ProfileSpec::Constant, 100.0, 10.0, mix)
            .iter()
            .collect();
        let mut setups = std::collections::HashMap::new();
        let mut lengths = Vec::new();
        for j in &jobs {
            let n = j.session.unwrap().number;
            match j.step {
                JobStep::SetUp => {
                    setups.insert(n, j.at);
                }
                JobStep::TearDown => lengths.push(j.at - setups[&n]),
                _ => {}
            }
        }
        assert_eq!(lengths.len(), 1_000);
        assert!(lengths.iter().all(|l| *l <= Duration::from_millis(800)));
        let capped = lengths
            .iter()
            .filter(|l| **l == Duration::from_millis(800))
            .count();
        // P(exp(mean 500) > 800) = e^-1.6 = 0.20
        assert!((150..260).contains(&capped), "{capped}");
    }

    #[test]
    fn mix_weights_set_the_share_of_each_kind() {
        let jobs: Vec<_> = plan(ProfileSpec::Constant, 1_000.0, 6.0, telephony_mix())
            .iter()
            .filter(|j| matches!(j.step, JobStep::Single | JobStep::SetUp))
            .collect();
        let share =
            |kind| jobs.iter().filter(|j| j.kind == kind).count() as f64 / jobs.len() as f64;
        assert!((share(JobKind::Sms) - 2.0 / 3.5).abs() < 0.03);
        assert!((share(JobKind::Voice) - 1.0 / 3.5).abs() < 0.03);
        assert!((share(JobKind::Video) - 0.5 / 3.5).abs() < 0.03);
    }

    #[test]
    fn max_jobs_bounds_the_schedule() {
        let curve = RateCurve::new(&ProfileSpec::Constant, 100.0, 10.0, "profile").unwrap();
        let plan =
            SchedulePlan::new(curve, Arrivals::Uniform, &telephony_mix(), 3, Some(123)).unwrap();
        let mut schedule = plan.iter();
        assert_eq!(schedule.by_ref().count(), 123);
        assert!(schedule.sessions_open() > 0);
    }

    #[test]
    fn bad_profiles_and_mixes_name_the_field() {
        let err = RateCurve::new(
            &ProfileSpec::Spike {
                at_s: 1.0,
                length_s: -1.0,
                spike_rate: 5.0,
            },
            10.0,
            5.0,
            "profile",
        )
        .unwrap_err();
        assert_eq!(err.field, "profile.length_s");
        let err = RateCurve::new(
            &ProfileSpec::Step {
                steps: vec![
                    StepSpec {
                        at_s: 3.0,
                        rate: 1.0,
                    },
                    StepSpec {
                        at_s: 2.0,
                        rate: 1.0,
                    },
                ],
            },
            10.0,
            5.0,
            "profile",
        )
        .unwrap_err();
        assert_eq!(err.field, "profile.steps[1].at_s");
        let err = RateCurve::new(&ProfileSpec::Constant, -1.0, 5.0, "profile").unwrap_err();
        assert_eq!(err.field, "rate");
        let curve = RateCurve::new(&ProfileSpec::Constant, 1.0, 5.0, "profile").unwrap();
        let zero = MixSpec {
            sms: 0.0,
            ..MixSpec::default()
        };
        let err = SchedulePlan::new(curve.clone(), Arrivals::Uniform, &zero, 1, None).unwrap_err();
        assert_eq!(err.field, "mix");
        let mut mix = MixSpec::default();
        mix.voice_call.interval_ms = 0;
        let err = SchedulePlan::new(curve, Arrivals::Uniform, &mix, 1, None).unwrap_err();
        assert_eq!(err.field, "mix.voice_call.interval_ms");
    }
}
