//! The self-test battery: seeded A/A and A/B cases fed through the same [`Judge`] the controller
//! uses, and through the unpaired yardstick. Pairs come from one of two sources ([`PairSource`]):
//! a latency model, or a replay of A/A pairs recorded through the real balancer path
//! ([`Recording`]) with each family's regression applied to the v2 half.
//!
//! The model: each job has its own difficulty (a lognormal body, plus a Pareto-heavy tail for a
//! few jobs) that both versions share, since both ran the same input; each machine adds its own
//! multiplicative noise and rare stalls (GC, scheduling); the fresh v2 machine is slower for its
//! first jobs (warm-up); errors are partly caused by the input (both fail) and partly by the
//! machine (independent); answers differ at a tiny nondeterministic rate.

use std::sync::Arc;

use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Pareto};
use serde::Serialize;

use crate::unpaired::UnpairedJudge;
use crate::{Betting, Condition, Decision, Judge, PairSample, Sharing, Tuning};

/// The parameters of the job-pair model.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyModel {
    pub median_us: f64,
    /// Spread of the shared difficulty (log scale).
    pub difficulty_sigma: f64,
    /// Share of jobs with a heavy-tailed difficulty multiplier, and that tail's Pareto shape.
    pub heavy_share: f64,
    pub heavy_shape: f64,
    /// Each machine's own noise on top of the difficulty (log scale).
    pub machine_noise_sigma: f64,
    /// Each machine's chance of a stall on a job and the stall's mean length.
    pub stall_probability: f64,
    pub stall_mean_us: f64,
    /// v2's warm-up: extra slowdown factor at the first job, decaying over this many jobs.
    pub warmup_slowdown: f64,
    pub warmup_decay_jobs: f64,
    /// Errors caused by the input (both versions fail) and by the machine (each independently).
    pub input_error_rate: f64,
    pub machine_error_rate: f64,
    /// Answers that differ though both versions are correct (timestamps, ordering).
    pub nondeterministic_mismatch_rate: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        LatencyModel::DEFAULT
    }
}

impl LatencyModel {
    /// Also the warm-up applied to replayed v2 halves.
    pub const DEFAULT: LatencyModel = LatencyModel {
        median_us: 2_000.0,
        difficulty_sigma: 0.6,
        heavy_share: 0.01,
        heavy_shape: 1.8,
        machine_noise_sigma: 0.12,
        stall_probability: 0.002,
        stall_mean_us: 8_000.0,
        warmup_slowdown: 0.8,
        warmup_decay_jobs: 80.0,
        input_error_rate: 0.007,
        machine_error_rate: 0.003,
        nondeterministic_mismatch_rate: 0.0005,
    };
}

/// What v2 does differently from v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// v2 is v1 (a clean release): any failure is a false rollback.
    AA,
    /// Every job 20% slower.
    P50Slower,
    /// The slowest 5% of jobs 20% slower: p99 +20%, p50 unchanged.
    P99Slower,
    /// The slowest 0.2% of jobs 3x slower: p99.9 x3, p50 and p99 unchanged.
    TailOnly,
    /// One more point of errors (machine-caused).
    Errors,
    /// 2% of answers differ from v1's.
    Mismatches,
    /// v2 exactly at the default limits: 10% slower on every job (paired shift and p50 at their
    /// limit) and half a point more errors (at the margin). The hardest case for false
    /// rollbacks: any failure here counts against the stated false-fail rate.
    AtTheLimit,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::AA,
        Family::AtTheLimit,
        Family::P50Slower,
        Family::P99Slower,
        Family::TailOnly,
        Family::Errors,
        Family::Mismatches,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Family::AA => "A/A",
            Family::P50Slower => "p50 +20%",
            Family::P99Slower => "p99 +20%",
            Family::TailOnly => "tail-only p99.9 x3",
            Family::Errors => "errors +1 point",
            Family::Mismatches => "mismatches 2%",
            Family::AtTheLimit => "at the limit",
        }
    }

    /// Whether the right decision is a rollback (a regression beyond the condition).
    pub fn is_regression(&self) -> bool {
        !matches!(self, Family::AA | Family::AtTheLimit)
    }
}

impl Family {
    /// v2's slowdown on a job, given whether the job is among the slowest 5% and 0.2%.
    fn slowdown(&self, above_p95: bool, above_p998: bool) -> f64 {
        match self {
            Family::P50Slower => 1.2,
            Family::AtTheLimit => 1.1,
            Family::P99Slower if above_p95 => 1.2,
            Family::TailOnly if above_p998 => 3.0,
            _ => 1.0,
        }
    }

    /// v2's machine-caused errors on top of v1's.
    fn extra_error_rate(&self) -> f64 {
        match self {
            Family::Errors => 0.01,
            Family::AtTheLimit => 0.005,
            _ => 0.0,
        }
    }

    fn extra_mismatch_rate(&self) -> f64 {
        if *self == Family::Mismatches {
            0.02
        } else {
            0.0
        }
    }
}

/// A fresh v2 machine's slowdown on its `job`-th job (cold caches, connection set-up).
fn warmup_factor(model: &LatencyModel, job: u64) -> f64 {
    1.0 + model.warmup_slowdown * (-(job as f64) / model.warmup_decay_jobs).exp()
}

/// Difficulty cut-offs of the model, measured once from a large seeded sample.
#[derive(Debug, Clone, PartialEq)]
pub struct DifficultyCuts {
    pub p95: f64,
    pub p998: f64,
}

impl LatencyModel {
    fn difficulty(&self, rng: &mut StdRng) -> f64 {
        let body = LogNormal::new(self.median_us.ln(), self.difficulty_sigma)
            .expect("valid lognormal")
            .sample(rng);
        if rng.gen_bool(self.heavy_share) {
            body * Pareto::new(1.0, self.heavy_shape)
                .expect("valid pareto")
                .sample(rng)
        } else {
            body
        }
    }

    pub fn cuts(&self) -> DifficultyCuts {
        let mut rng = StdRng::seed_from_u64(0x5eed_cafe);
        let mut sample: Vec<f64> = (0..200_000).map(|_| self.difficulty(&mut rng)).collect();
        sample.sort_unstable_by(f64::total_cmp);
        let at = |q: f64| sample[((sample.len() as f64 * q) as usize).min(sample.len() - 1)];
        DifficultyCuts {
            p95: at(0.95),
            p998: at(0.998),
        }
    }
}

/// An endless seeded stream of job pairs for one family.
pub struct PairStream<'a> {
    model: &'a LatencyModel,
    cuts: &'a DifficultyCuts,
    family: Family,
    rng: StdRng,
    job: u64,
    noise: LogNormal<f64>,
    stall: Exp<f64>,
}

impl<'a> PairStream<'a> {
    pub fn new(
        model: &'a LatencyModel,
        cuts: &'a DifficultyCuts,
        family: Family,
        seed: u64,
    ) -> Self {
        PairStream {
            model,
            cuts,
            family,
            rng: StdRng::seed_from_u64(seed),
            job: 0,
            noise: LogNormal::new(0.0, model.machine_noise_sigma).expect("valid noise"),
            stall: Exp::new(1.0 / model.stall_mean_us).expect("valid stall"),
        }
    }

    fn machine_latency(&mut self, difficulty: f64) -> f64 {
        let mut latency = difficulty * self.noise.sample(&mut self.rng);
        if self.rng.gen_bool(self.model.stall_probability) {
            latency += self.stall.sample(&mut self.rng);
        }
        latency
    }

    pub fn next_pair(&mut self) -> PairSample {
        let model = self.model;
        let difficulty = model.difficulty(&mut self.rng);
        let v1 = self.machine_latency(difficulty);
        let regression = self
            .family
            .slowdown(difficulty > self.cuts.p95, difficulty > self.cuts.p998);
        let v2 = self.machine_latency(difficulty) * warmup_factor(model, self.job) * regression;
        let input_error = self.rng.gen_bool(model.input_error_rate);
        let v1_ok = !(input_error || self.rng.gen_bool(model.machine_error_rate));
        let v2_error_rate = model.machine_error_rate + self.family.extra_error_rate();
        let v2_ok = !(input_error || self.rng.gen_bool(v2_error_rate));
        let mismatch_rate =
            model.nondeterministic_mismatch_rate + self.family.extra_mismatch_rate();
        let matched = !self.rng.gen_bool(mismatch_rate);
        self.job += 1;
        PairSample {
            v1_latency_us: v1.round().max(1.0) as u64,
            v1_ok,
            v2_latency_us: v2.round().max(1.0) as u64,
            v2_ok,
            matched: Some(matched),
        }
    }
}

/// Why a recording cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("a recording needs at least {needed} pairs to replay, this one has {found}")]
    TooShort { needed: usize, found: usize },
}

/// A/A job pairs recorded through the real balancer path (v1 active against a v1 machine in
/// simulation, the same jobs at the same moments): what the judge sees of real measurement noise,
/// connection reuse, scheduling and input-dependent work. Replayed by [`ReplayStream`].
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pairs: Vec<PairSample>,
    /// The v2 half's 95th and 99.8th percentiles: the jobs a tail regression slows down.
    v2_p95_us: u64,
    v2_p998_us: u64,
}

impl Recording {
    /// Fewer pairs than this would replay the same few blocks over and over.
    pub const MIN_PAIRS: usize = 2_000;
    /// Consecutive recorded pairs replayed together, so that bursts and slow stretches of the
    /// real run (a GC pause, a busy neighbour) survive the resampling.
    pub const BLOCK_PAIRS: usize = 50;

    pub fn new(pairs: Vec<PairSample>) -> Result<Recording, RecordingError> {
        if pairs.len() < Self::MIN_PAIRS {
            return Err(RecordingError::TooShort {
                needed: Self::MIN_PAIRS,
                found: pairs.len(),
            });
        }
        let mut v2: Vec<u64> = pairs.iter().map(|p| p.v2_latency_us).collect();
        v2.sort_unstable();
        let at = |q: f64| v2[((v2.len() as f64 * q) as usize).min(v2.len() - 1)];
        Ok(Recording {
            v2_p95_us: at(0.95),
            v2_p998_us: at(0.998),
            pairs,
        })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn pairs(&self) -> &[PairSample] {
        &self.pairs
    }
}

/// An endless seeded stream of replayed pairs for one family: blocks of [`Recording::BLOCK_PAIRS`]
/// consecutive recorded pairs from seeded starting points (a moving-block bootstrap), each pair's
/// v2 half given the family's regression and a fresh machine's warm-up (the model's), so every
/// run sees different real noise.
pub struct ReplayStream<'a> {
    recording: &'a Recording,
    warmup: &'a LatencyModel,
    family: Family,
    rng: StdRng,
    job: u64,
    position: usize,
    left_in_block: usize,
}

impl<'a> ReplayStream<'a> {
    pub fn new(
        recording: &'a Recording,
        warmup: &'a LatencyModel,
        family: Family,
        seed: u64,
    ) -> Self {
        ReplayStream {
            recording,
            warmup,
            family,
            rng: StdRng::seed_from_u64(seed),
            job: 0,
            position: 0,
            left_in_block: 0,
        }
    }

    pub fn next_pair(&mut self) -> PairSample {
        let pairs = &self.recording.pairs;
        if self.left_in_block == 0 {
            self.position = self.rng.gen_range(0..pairs.len());
            self.left_in_block = Recording::BLOCK_PAIRS;
        }
        let recorded = pairs[self.position % pairs.len()];
        self.position += 1;
        self.left_in_block -= 1;
        let regression = self.family.slowdown(
            recorded.v2_latency_us > self.recording.v2_p95_us,
            recorded.v2_latency_us > self.recording.v2_p998_us,
        );
        let v2 = recorded.v2_latency_us as f64 * warmup_factor(self.warmup, self.job) * regression;
        let v2_ok = recorded.v2_ok && !self.rng.gen_bool(self.family.extra_error_rate());
        // A failed job has no answer to compare; otherwise keep the recorded comparison.
        let matched = recorded
            .matched
            .map(|m| m && !self.rng.gen_bool(self.family.extra_mismatch_rate()));
        self.job += 1;
        PairSample {
            v2_latency_us: v2.round().max(1.0) as u64,
            v2_ok,
            matched,
            ..recorded
        }
    }
}

/// Where a battery's pairs come from.
#[derive(Debug, Clone)]
pub enum PairSource {
    /// The seeded latency model (shared job difficulty, machine noise, stalls, warm-up, errors).
    Model(LatencyModel),
    /// Recorded A/A pairs from the real balancer path; the model's warm-up is applied to v2.
    Replay(Arc<Recording>),
}

impl PairSource {
    pub fn name(&self) -> &'static str {
        match self {
            PairSource::Model(_) => "latency model",
            PairSource::Replay(_) => "replay of balancer-recorded A/A pairs",
        }
    }
}

/// Either source's stream, behind one `next_pair`.
enum Pairs<'a> {
    Model(PairStream<'a>),
    Replay(ReplayStream<'a>),
}

impl Pairs<'_> {
    fn next_pair(&mut self) -> PairSample {
        match self {
            Pairs::Model(stream) => stream.next_pair(),
            Pairs::Replay(stream) => stream.next_pair(),
        }
    }
}

/// What a source needs computed once per battery.
enum Prepared<'a> {
    Model(&'a LatencyModel, DifficultyCuts),
    Replay(&'a Recording),
}

impl Prepared<'_> {
    fn stream(&self, family: Family, seed: u64) -> Pairs<'_> {
        match self {
            Prepared::Model(model, cuts) => {
                Pairs::Model(PairStream::new(model, cuts, family, seed))
            }
            Prepared::Replay(recording) => Pairs::Replay(ReplayStream::new(
                recording,
                &LatencyModel::DEFAULT,
                family,
                seed,
            )),
        }
    }
}

/// One run's outcome for one judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RunOutcome {
    pub decision: Decision,
    /// Pairs fed when the decision was reached (the budget when undecided).
    pub jobs: u64,
}

/// Totals for one family and one judge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeFigures {
    pub runs: usize,
    pub fails: usize,
    pub passes: usize,
    pub undecided: usize,
    /// Fails among runs: the false rollback rate for A/A, the detection rate otherwise.
    pub fail_rate: f64,
    /// Jobs needed by the runs that reached the family's right decision (fail for a regression,
    /// pass for A/A).
    pub median_jobs: Option<u64>,
    pub p90_jobs: Option<u64>,
    /// Runs still undecided after [`DECIDED_BY_JOBS`] pairs (whatever they decided later).
    pub undecided_at_20k: usize,
}

impl JudgeFigures {
    fn from_outcomes(family: Family, outcomes: &[RunOutcome]) -> Self {
        let count = |decision| outcomes.iter().filter(|o| o.decision == decision).count();
        let right = if family.is_regression() {
            Decision::Fail
        } else {
            Decision::Pass
        };
        let mut jobs: Vec<u64> = outcomes
            .iter()
            .filter(|o| o.decision == right)
            .map(|o| o.jobs)
            .collect();
        jobs.sort_unstable();
        let at = |q: f64| nearest_rank(&jobs, q);
        JudgeFigures {
            runs: outcomes.len(),
            fails: count(Decision::Fail),
            passes: count(Decision::Pass),
            undecided: count(Decision::NotEnoughData),
            fail_rate: count(Decision::Fail) as f64 / outcomes.len().max(1) as f64,
            median_jobs: at(0.5),
            p90_jobs: at(0.9),
            undecided_at_20k: outcomes
                .iter()
                .filter(|o| o.decision == Decision::NotEnoughData || o.jobs > DECIDED_BY_JOBS)
                .count(),
        }
    }
}

/// One family's figures for each judge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyFigures {
    pub family: Family,
    pub name: &'static str,
    pub paired: JudgeFigures,
    pub unpaired: JudgeFigures,
    /// The paired judge fed pairs whose v2 half comes from the previous job: same marginals,
    /// no shared difficulty. Shows what the pairing itself is worth.
    pub pairing_broken: JudgeFigures,
}

/// One run's outcome for each judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseOutcome {
    pub paired: RunOutcome,
    pub unpaired: RunOutcome,
    pub pairing_broken: RunOutcome,
}

/// The battery's settings.
#[derive(Debug, Clone)]
pub struct BatteryConfig {
    pub runs: usize,
    /// Pairs per run at most; a judge still undecided then counts as undecided.
    pub budget_jobs: u64,
    pub seed: u64,
    pub condition: Condition,
    pub source: PairSource,
}

impl Default for BatteryConfig {
    fn default() -> Self {
        BatteryConfig {
            runs: 50,
            budget_jobs: 120_000,
            seed: 2026,
            condition: Condition::default(),
            source: PairSource::Model(LatencyModel::default()),
        }
    }
}

/// Runs one seeded case through every judge until all decided or the budget is spent.
fn run_case(
    config: &BatteryConfig,
    prepared: &Prepared<'_>,
    family: Family,
    seed: u64,
) -> CaseOutcome {
    let mut stream = prepared.stream(family, seed);
    let mut paired = Judge::new(config.condition.clone());
    let mut broken = Judge::new(config.condition.clone());
    let unpaired_budget = config
        .budget_jobs
        .saturating_sub(config.condition.warmup_jobs);
    let mut unpaired = UnpairedJudge::new(config.condition.clone(), unpaired_budget);
    let mut previous: Option<PairSample> = None;
    let final_outcome = |judge: &Judge| {
        judge.is_final().then(|| {
            let verdict = judge.verdict();
            RunOutcome {
                decision: verdict.decision,
                jobs: verdict.jobs,
            }
        })
    };
    for _ in 0..config.budget_jobs {
        let pair = stream.next_pair();
        paired.observe(&pair);
        unpaired.observe(&pair);
        // v1 of this job with v2 of the previous job (the first job keeps its own pair).
        let shifted = previous.map_or(pair, |earlier| PairSample {
            v2_latency_us: earlier.v2_latency_us,
            v2_ok: earlier.v2_ok,
            matched: earlier.matched,
            ..pair
        });
        broken.observe(&shifted);
        previous = Some(pair);
        if paired.is_final() && broken.is_final() && unpaired.outcome().is_some() {
            break;
        }
    }
    let undecided = RunOutcome {
        decision: Decision::NotEnoughData,
        jobs: config.budget_jobs,
    };
    CaseOutcome {
        paired: final_outcome(&paired).unwrap_or(undecided),
        unpaired: unpaired
            .outcome()
            .map(|(decision, jobs)| RunOutcome { decision, jobs })
            .unwrap_or(undecided),
        pairing_broken: final_outcome(&broken).unwrap_or(undecided),
    }
}

/// Runs every family `config.runs` times, spread over `threads` threads; deterministic for a
/// given seed whatever the thread count.
pub fn run_battery(
    config: &BatteryConfig,
    families: &[Family],
    threads: usize,
) -> Vec<FamilyFigures> {
    let prepared = match &config.source {
        PairSource::Model(model) => Prepared::Model(model, model.cuts()),
        PairSource::Replay(recording) => Prepared::Replay(recording),
    };
    let cases: Vec<(usize, Family, u64)> = families
        .iter()
        .enumerate()
        .flat_map(|(family_index, &family)| {
            (0..config.runs).map(move |run| {
                let seed = config
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((family_index * 100_000 + run) as u64);
                (family_index, family, seed)
            })
        })
        .collect();
    let threads = threads.max(1);
    let mut results: Vec<Option<CaseOutcome>> = vec![None; cases.len()];
    std::thread::scope(|scope| {
        let chunks = results.chunks_mut(cases.len().div_ceil(threads).max(1));
        for (chunk_index, chunk) in chunks.enumerate() {
            let cases = &cases;
            let prepared = &prepared;
            let start = chunk_index * cases.len().div_ceil(threads).max(1);
            scope.spawn(move || {
                for (offset, slot) in chunk.iter_mut().enumerate() {
                    let (_, family, seed) = cases[start + offset];
                    *slot = Some(run_case(config, prepared, family, seed));
                }
            });
        }
    });
    families
        .iter()
        .enumerate()
        .map(|(family_index, &family)| {
            let outcomes: Vec<&CaseOutcome> = cases
                .iter()
                .zip(&results)
                .filter(|((index, _, _), _)| *index == family_index)
                .map(|(_, result)| result.as_ref().expect("every case ran"))
                .collect();
            let figures = |pick: fn(&CaseOutcome) -> RunOutcome| {
                let picked: Vec<RunOutcome> = outcomes.iter().map(|o| pick(o)).collect();
                JudgeFigures::from_outcomes(family, &picked)
            };
            FamilyFigures {
                family,
                name: family.name(),
                paired: figures(|o| o.paired),
                unpaired: figures(|o| o.unpaired),
                pairing_broken: figures(|o| o.pairing_broken),
            }
        })
        .collect()
}

/// Pairs by which every family whose difference is at least twice its margin must be decided.
pub const DECIDED_BY_JOBS: u64 = 20_000;

/// The nearest-rank `q` quantile of `sorted` (none when empty).
pub fn nearest_rank(sorted: &[u64], q: f64) -> Option<u64> {
    let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(at).copied()
}

/// One variant of the paired judge in an ablation: what it changes from the default.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: &'static str,
    pub tuning: Tuning,
    pub condition: Condition,
}

impl Variant {
    /// The judge as it stood before (aGRAPA bets, every test the same share, p99.9 judged from
    /// 5,000 pairs), then each change added one at a time, then all of them (the default).
    pub fn ablations() -> Vec<Variant> {
        let before = Tuning {
            betting: Betting::Agrapa,
            sharing: Sharing {
                equal_split: true,
                ..Sharing::default()
            },
        };
        let old_floor = Condition {
            min_tail_exceedances: 5,
            ..Condition::default()
        };
        let new_floor = Condition {
            min_tail_exceedances: 2,
            ..Condition::default()
        };
        let with = |name, tuning: Tuning, condition: &Condition| Variant {
            name,
            tuning,
            condition: condition.clone(),
        };
        vec![
            with(
                "before (aGRAPA, equal shares, tail floor 5)",
                before,
                &old_floor,
            ),
            with(
                "+ uniform mixture bets",
                Tuning {
                    betting: Betting::UniformMixture,
                    ..before
                },
                &old_floor,
            ),
            with(
                "+ size-weighted mixture bets",
                Tuning {
                    betting: Betting::Mixture,
                    ..before
                },
                &old_floor,
            ),
            with(
                "+ weighted shares",
                Tuning {
                    sharing: Sharing::default(),
                    ..before
                },
                &old_floor,
            ),
            with("+ tail floor 2", before, &new_floor),
            with("all (default)", Tuning::default(), &new_floor),
        ]
    }
}

/// One variant's figures per family.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantFigures {
    pub variant: &'static str,
    pub families: Vec<(Family, JudgeFigures)>,
}

/// The paired judge alone, under each variant, on every family (deterministic for a seed).
pub fn run_ablations(
    config: &BatteryConfig,
    families: &[Family],
    variants: &[Variant],
    threads: usize,
) -> Vec<VariantFigures> {
    let prepared = match &config.source {
        PairSource::Model(model) => Prepared::Model(model, model.cuts()),
        PairSource::Replay(recording) => Prepared::Replay(recording),
    };
    let cases: Vec<(usize, usize, u64)> = (0..variants.len())
        .flat_map(|v| {
            families.iter().enumerate().flat_map(move |(f, _)| {
                (0..config.runs).map(move |run| (v, f, case_seed(config.seed, f, run)))
            })
        })
        .collect();
    let outcomes = run_parallel(&cases, threads, |&(v, f, seed)| {
        run_paired(config, &prepared, &variants[v], families[f], seed)
    });
    variants
        .iter()
        .enumerate()
        .map(|(v, variant)| VariantFigures {
            variant: variant.name,
            families: families
                .iter()
                .enumerate()
                .map(|(f, &family)| {
                    let picked: Vec<RunOutcome> = cases
                        .iter()
                        .zip(&outcomes)
                        .filter(|((cv, cf, _), _)| *cv == v && *cf == f)
                        .map(|(_, outcome)| *outcome)
                        .collect();
                    (family, JudgeFigures::from_outcomes(family, &picked))
                })
                .collect(),
        })
        .collect()
}

/// The seed of one run: the same for a family and run whatever the judge or variant.
fn case_seed(seed: u64, family_index: usize, run: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add((family_index * 100_000 + run) as u64)
}

/// `work` over `cases` on `threads` threads, results in the cases' order.
fn run_parallel<C: Sync, R: Send + Copy, F: Fn(&C) -> R + Sync>(
    cases: &[C],
    threads: usize,
    work: F,
) -> Vec<R> {
    let chunk = cases.len().div_ceil(threads.max(1)).max(1);
    let mut results: Vec<Option<R>> = (0..cases.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        for (slots, inputs) in results.chunks_mut(chunk).zip(cases.chunks(chunk)) {
            let work = &work;
            scope.spawn(move || {
                for (slot, case) in slots.iter_mut().zip(inputs) {
                    *slot = Some(work(case));
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every case ran"))
        .collect()
}

/// One seeded run of the paired judge under `variant`.
fn run_paired(
    config: &BatteryConfig,
    prepared: &Prepared<'_>,
    variant: &Variant,
    family: Family,
    seed: u64,
) -> RunOutcome {
    let mut stream = prepared.stream(family, seed);
    let mut judge = Judge::tuned(variant.condition.clone(), variant.tuning);
    for _ in 0..config.budget_jobs {
        judge.observe(&stream.next_pair());
        if judge.is_final() {
            let verdict = judge.verdict();
            return RunOutcome {
                decision: verdict.decision,
                jobs: verdict.jobs,
            };
        }
    }
    RunOutcome {
        decision: Decision::NotEnoughData,
        jobs: config.budget_jobs,
    }
}
