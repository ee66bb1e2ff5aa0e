//! The rule `prediction` on seeded calls (`understudy judge-bench` runs it beside the judge's
//! battery): calls go received -> media -> completed, or end their media stay in an error (a late
//! failure: it shows only when the call ends, tens of seconds after it started). v1 takes calls
//! alone for a warm-up, then every call is also copied to v2 (same timing, its own outcome), and
//! each event is fed, in time order, to one [`Predictor`] per version and to the
//! [`PairedFailureTest`], as the controller feeds its active and simulation predictors. The
//! controller looks once per tick (here every `look_every_ms`): the test decides when its fail
//! evidence crossed; for comparison the old rule (the chain's z of 3.09 and the margin, re-tested
//! at every look) is read at the same looks on the same streams.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal};
use serde::Serialize;
use understudy_judge::bench::nearest_rank;
use understudy_judge::{Condition, Sharing};

use crate::compare::compare;
use crate::config::{CompareConfig, PredictConfig, Settings};
use crate::predictor::{Observed, Predictor};
use crate::signal::{PairedFailureTest, Side};

/// One family: each version's probability that a call ends in an error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Family {
    pub name: &'static str,
    pub v1_failure: f64,
    pub v2_failure: f64,
}

impl Family {
    /// An identical v2; v2 exactly the default margin (1 point) worse, the hardest case the rule
    /// must still not fail; and v2 failing 3 points more at the end of its calls (three times the
    /// margin) over a 1% baseline.
    pub const ALL: [Family; 3] = [
        Family {
            name: "prediction A/A",
            v1_failure: 0.01,
            v2_failure: 0.01,
        },
        Family {
            name: "prediction at the margin",
            v1_failure: 0.01,
            v2_failure: 0.02,
        },
        Family {
            name: "prediction late failures",
            v1_failure: 0.01,
            v2_failure: 0.04,
        },
    ];
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchConfig {
    pub runs: usize,
    pub seed: u64,
    /// Calls started per second (Poisson).
    pub calls_per_sec: f64,
    /// Median call length (log-normal, sigma 0.5), seconds.
    pub median_call_secs: f64,
    /// Seconds v1 takes calls alone before v2's copies start (v1's model is warm, as in a rollout).
    pub warm_up_secs: f64,
    /// v2 calls per run at most.
    pub max_calls: u64,
    /// How often the controller looks (its tick).
    pub look_every_ms: u64,
    /// The test's false-fail rate: the rule's share of the default condition's false-fail rate.
    pub alpha: f64,
    pub margin: f64,
    pub min_starts: f64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        let compare = CompareConfig::default();
        BenchConfig {
            runs: 50,
            seed: 2026,
            calls_per_sec: 10.0,
            median_call_secs: 30.0,
            warm_up_secs: 120.0,
            max_calls: 20_000,
            look_every_ms: 1_000,
            alpha: Condition::default()
                .fail_budget(Sharing {
                    prediction: true,
                    ..Sharing::default()
                })
                .prediction,
            margin: compare.margin,
            min_starts: compare.min_starts,
        }
    }
}

/// How one rule did over a family's runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleFigures {
    pub runs: usize,
    /// Runs it failed v2 in (false rollbacks for A/A, detections otherwise).
    pub fails: usize,
    /// v2 calls started when it failed v2: median and 90th percentile over the runs that failed.
    pub median_calls: Option<u64>,
    pub p90_calls: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyFigures {
    pub family: Family,
    /// The anytime-valid test (the rule `prediction` today).
    pub test: RuleFigures,
    /// The old rule: the chain's z >= 3.09 and the margin, re-tested at every look.
    pub old_z_rule: RuleFigures,
    /// Looks per run (median): a run stops once both rules failed v2, or when its calls ran out.
    pub median_looks: u64,
}

/// The calls (v2 calls started) at which each rule failed v2 in one run, and the looks taken.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RunOutcome {
    test: Option<u64>,
    old_z_rule: Option<u64>,
    looks: u64,
}

const SERVICE: &str = "media";
const FAILED: &str = "error state failure";

fn settings(config: &BenchConfig) -> Settings {
    let mut model = PredictConfig {
        successes: vec!["completed".to_string()],
        start_state: Some("received".to_string()),
        ..PredictConfig::default()
    };
    model.compare.margin = config.margin;
    model.compare.min_starts = config.min_starts;
    model.validate().expect("the bench's model is valid")
}

/// One event: (at ms, sequence for ties, side, call, state).
type Event = Reverse<(u64, u64, bool, u64, &'static str)>;

/// Where one run stands: the two predictors, the test, the queued events.
struct Run<'a> {
    config: &'a BenchConfig,
    family: Family,
    rng: StdRng,
    events: BinaryHeap<Event>,
    sequence: u64,
    v1: Predictor,
    v2: Predictor,
    test: PairedFailureTest,
    v2_calls: u64,
}

impl Run<'_> {
    /// Queues a call of one version starting at `at` ms.
    fn queue_call(&mut self, candidate: bool, call: u64, at: u64, setup: u64, length: u64) {
        let p = if candidate {
            self.family.v2_failure
        } else {
            self.family.v1_failure
        };
        let end = if self.rng.gen_bool(p) {
            FAILED
        } else {
            "completed"
        };
        for (offset, state) in [(0, "received"), (setup, "media"), (setup + length, end)] {
            self.sequence += 1;
            self.events.push(Reverse((
                at + offset,
                self.sequence,
                candidate,
                call,
                state,
            )));
        }
    }

    /// A session arriving at `at`: v1's call, and after the warm-up v2's copy.
    fn arrive(&mut self, call: u64, at: u64) {
        let setup = self.rng.gen_range(200..1_000);
        let length = LogNormal::new(self.config.median_call_secs.ln(), 0.5)
            .expect("valid log-normal")
            .sample(&mut self.rng);
        let length = (length * 1000.0).min(self.config.median_call_secs * 10_000.0) as u64;
        self.queue_call(false, call, at, setup, length);
        if at >= self.release_ms() && self.v2_calls < self.config.max_calls {
            self.v2_calls += 1;
            self.queue_call(true, call, at, setup, length);
        }
    }

    fn release_ms(&self) -> u64 {
        (self.config.warm_up_secs * 1000.0) as u64
    }

    fn apply(&mut self, event: Event) {
        let Reverse((at, _, candidate, call, state)) = event;
        let object = format!("c{call}");
        let now = Duration::from_millis(at);
        let (predictor, version, side) = if candidate {
            (&mut self.v2, "v2", Side::Candidate)
        } else {
            (&mut self.v1, "v1", Side::Baseline)
        };
        let observed = predictor.enter(SERVICE, version, &object, state, now);
        if at >= self.release_ms() {
            if let Observed::Entered { state, .. } = observed {
                self.test.observe(side, &object, &state);
            }
        }
    }

    /// The old rule at `now`: the chain's comparison with z >= 3.09 and the margin.
    fn old_rule_fails(&self, now: u64) -> bool {
        let now = Duration::from_millis(now);
        let (Some(v1), Some(v2)) = (
            self.v1.outlook(SERVICE, "v1", now),
            self.v2.outlook(SERVICE, "v2", now),
        ) else {
            return false;
        };
        compare(&v1, &v2, "received", &self.v1.settings().compare).clearly_higher
    }
}

fn run_once(config: &BenchConfig, family: Family, seed: u64) -> RunOutcome {
    let settings = settings(config);
    let test = PairedFailureTest::new(
        "received",
        settings.absorbing(),
        config.margin,
        config.alpha,
        config.min_starts,
    );
    let mut run = Run {
        config,
        family,
        rng: StdRng::seed_from_u64(seed),
        events: BinaryHeap::new(),
        sequence: 0,
        v1: Predictor::new(settings.clone()),
        v2: Predictor::new(settings),
        test,
        v2_calls: 0,
    };
    let gaps = Exp::new(config.calls_per_sec / 1000.0).expect("a positive rate");
    let mut next_arrival = 0.0f64;
    let mut call = 0u64;
    let mut next_look = run.release_ms();
    let mut outcome = RunOutcome {
        test: None,
        old_z_rule: None,
        looks: 0,
    };
    loop {
        let arriving = run.v2_calls < config.max_calls;
        let next_event = run.events.peek().map(|Reverse(e)| e.0);
        let arrival = arriving.then_some(next_arrival as u64);
        let Some(first) = [arrival, next_event].into_iter().flatten().min() else {
            break;
        };
        if next_look <= first {
            outcome.looks += 1;
            let calls = run.v2_calls;
            if outcome.test.is_none() && run.test.fails() {
                outcome.test = Some(calls);
            }
            if outcome.old_z_rule.is_none() && run.old_rule_fails(next_look) {
                outcome.old_z_rule = Some(calls);
            }
            if outcome.test.is_some() && outcome.old_z_rule.is_some() {
                break;
            }
            next_look += config.look_every_ms;
        } else if arrival == Some(first) {
            run.arrive(call, first);
            call += 1;
            next_arrival += gaps.sample(&mut run.rng);
        } else if let Some(event) = run.events.pop() {
            run.apply(event);
        }
    }
    outcome
}

fn figures(runs: usize, decided: impl Iterator<Item = Option<u64>>) -> RuleFigures {
    let mut calls: Vec<u64> = decided.flatten().collect();
    calls.sort_unstable();
    RuleFigures {
        runs,
        fails: calls.len(),
        median_calls: nearest_rank(&calls, 0.5),
        p90_calls: nearest_rank(&calls, 0.9),
    }
}

/// `config.runs` seeded runs of `family` (family `index` in the battery picks the seeds).
pub fn run_family(config: &BenchConfig, family: Family, index: u64) -> FamilyFigures {
    let outcomes: Vec<RunOutcome> = (0..config.runs as u64)
        .map(|run| run_once(config, family, config.seed ^ (index << 32) ^ run))
        .collect();
    let mut looks: Vec<u64> = outcomes.iter().map(|o| o.looks).collect();
    looks.sort_unstable();
    FamilyFigures {
        family,
        test: figures(config.runs, outcomes.iter().map(|o| o.test)),
        old_z_rule: figures(config.runs, outcomes.iter().map(|o| o.old_z_rule)),
        median_looks: nearest_rank(&looks, 0.5).unwrap_or(0),
    }
}

/// Every family of [`Family::ALL`].
pub fn run_battery(config: &BenchConfig) -> Vec<FamilyFigures> {
    Family::ALL
        .iter()
        .enumerate()
        .map(|(index, family)| run_family(config, *family, index as u64))
        .collect()
}

/// The figures as a Markdown table, like the judge's battery.
pub fn render(config: &BenchConfig, figures: &[FamilyFigures], seconds: f64) -> String {
    let calls = |value: Option<u64>| value.map_or("-".to_string(), |v| v.to_string());
    let mut out = format!(
        "prediction-bench, seeded calls: {} runs per family, {} calls/s lasting a median {} s \
         (failures show at their end), at most {} v2 calls per run, a look every {} ms, seed {}, \
         {seconds:.1} s\n\
         fails = rollbacks (false rollbacks for A/A and at the margin); calls = v2 calls started when the rule \
         failed v2; the test at alpha {} (the default condition's share), margin {}\n\n\
         | family | rule | fails | median calls | p90 calls | median looks |\n\
         | --- | --- | ---: | ---: | ---: | ---: |\n",
        config.runs,
        config.calls_per_sec,
        config.median_call_secs,
        config.max_calls,
        config.look_every_ms,
        config.seed,
        config.alpha,
        config.margin,
    );
    for family in figures {
        for (rule, f) in [
            ("anytime-valid test", &family.test),
            ("old z >= 3.09, every look", &family.old_z_rule),
        ] {
            out.push_str(&format!(
                "| {} | {} | {}/{} | {} | {} | {} |\n",
                family.family.name,
                rule,
                f.fails,
                f.runs,
                calls(f.median_calls),
                calls(f.p90_calls),
                family.median_looks,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BenchConfig {
        BenchConfig {
            runs: 4,
            max_calls: 12_000,
            median_call_secs: 10.0,
            ..BenchConfig::default()
        }
    }

    #[test]
    fn a_late_failure_regression_is_caught_and_an_identical_v2_is_not() {
        let config = small();
        let regression = run_family(&config, Family::ALL[2], 2);
        assert_eq!(regression.test.fails, 4, "{regression:?}");
        assert!(
            regression.test.median_calls.unwrap() < 6_000,
            "{regression:?}"
        );
        let same = run_family(&config, Family::ALL[0], 0);
        assert_eq!(same.test.fails, 0, "{same:?}");
        assert!(same.median_looks > 500, "{same:?}");
    }

    /// The battery as `understudy judge-bench` runs it:
    /// `cargo test --release -p understudy-predict bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn the_whole_battery() {
        let config = BenchConfig::default();
        let started = std::time::Instant::now();
        let figures = run_battery(&config);
        println!(
            "{}",
            render(&config, &figures, started.elapsed().as_secs_f64())
        );
        assert_eq!(figures[0].test.fails, 0, "{figures:?}");
        assert!(figures[1].test.fails <= 1, "{figures:?}");
    }

    #[test]
    fn runs_are_seeded() {
        let config = BenchConfig {
            runs: 1,
            max_calls: 1_000,
            ..small()
        };
        let once = run_once(&config, Family::ALL[2], 9);
        assert_eq!(once, run_once(&config, Family::ALL[2], 9));
        let text = render(&config, &[run_family(&config, Family::ALL[0], 0)], 0.5);
        assert!(
            text.contains("| prediction A/A | anytime-valid test | 0/1 |"),
            "{text}"
        );
    }
}
