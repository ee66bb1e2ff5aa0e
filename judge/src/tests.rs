use super::*;
use crate::bench::{Family, LatencyModel, PairStream};

fn run(condition: &Condition, family: Family, seed: u64, budget: u64) -> Verdict {
    let model = LatencyModel::default();
    let cuts = model.cuts();
    let mut stream = PairStream::new(&model, &cuts, family, seed);
    let mut judge = Judge::new(condition.clone());
    for _ in 0..budget {
        judge.observe(&stream.next_pair());
        if judge.is_final() {
            break;
        }
    }
    judge.verdict()
}

fn pair(v1_latency_us: u64, v1_ok: bool, v2_latency_us: u64, v2_ok: bool) -> PairSample {
    PairSample {
        v1_latency_us,
        v1_ok,
        v2_latency_us,
        v2_ok,
        matched: None,
    }
}

#[test]
fn seeded_a_a_never_fails_and_passes() {
    let condition = Condition::default();
    let mut passes = 0;
    for seed in 0..12 {
        let verdict = run(&condition, Family::AA, seed, 60_000);
        assert_ne!(
            verdict.decision,
            Decision::Fail,
            "seed {seed}: {}",
            verdict.rule
        );
        passes += usize::from(verdict.decision == Decision::Pass);
    }
    assert!(passes >= 11, "only {passes} of 12 clean runs passed");
}

#[test]
fn known_regressions_fail() {
    let condition = Condition::default();
    for family in [
        Family::P50Slower,
        Family::P99Slower,
        Family::TailOnly,
        Family::Errors,
        Family::Mismatches,
    ] {
        for seed in 0..3 {
            let verdict = run(&condition, family, seed, 60_000);
            assert_eq!(
                verdict.decision,
                Decision::Fail,
                "{} seed {seed}: {}",
                family.name(),
                verdict.rule
            );
        }
    }
}

#[test]
fn tail_only_regression_is_caught_by_the_tail_and_not_before_its_floor() {
    let verdict = run(&Condition::default(), Family::TailOnly, 11, 60_000);
    assert_eq!(verdict.decision, Decision::Fail, "{}", verdict.rule);
    assert!(verdict.rule.contains("p99.9"), "{}", verdict.rule);
    let floor = verdict.details["latency"]["p99.9"]["floor_jobs"]
        .as_u64()
        .unwrap();
    assert!(verdict.jobs > floor + Condition::default().warmup_jobs);
}

#[test]
fn too_few_jobs_is_not_enough_data_even_when_v2_is_terrible() {
    let condition = Condition::default();
    let mut judge = Judge::new(condition.clone());
    let jobs = condition.warmup_jobs + condition.min_jobs - 1;
    for _ in 0..jobs {
        judge.observe(&pair(1_000, true, 50_000, false));
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::NotEnoughData);
    assert!(
        verdict.rule.starts_with("not enough data"),
        "{}",
        verdict.rule
    );
    assert_eq!(verdict.jobs, jobs);
}

#[test]
fn clear_regression_stops_early_as_a_hard_failure_and_stays_final() {
    let condition = Condition {
        warmup_jobs: 0,
        ..Condition::default()
    };
    let mut judge = Judge::new(condition.clone());
    let mut fed = 0;
    while !judge.is_final() && fed < 10_000 {
        // Half of v2's answers are errors.
        judge.observe(&pair(1_000, true, 1_000, fed % 2 == 0));
        fed += 1;
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::Fail, "{}", verdict.rule);
    assert!(verdict.hard, "{}", verdict.rule);
    assert!(
        verdict.jobs <= condition.min_jobs + 50,
        "needed {} jobs",
        verdict.jobs
    );
    // Later perfect pairs change nothing: the decision is final.
    for _ in 0..5_000 {
        judge.observe(&pair(1_000, true, 900, true));
    }
    assert_eq!(judge.verdict(), verdict);
}

#[test]
fn a_pass_is_watched_on_and_a_v2_that_turns_bad_fails_later() {
    let model = LatencyModel::default();
    let cuts = model.cuts();
    let mut stream = PairStream::new(&model, &cuts, Family::AA, 3);
    let mut judge = Judge::new(Condition::default());
    while !judge.is_final() {
        judge.observe(&stream.next_pair());
    }
    let passed = judge.verdict();
    assert_eq!(passed.decision, Decision::Pass, "{}", passed.rule);
    // More healthy pairs: still a pass, with live numbers that move on.
    for _ in 0..3_000 {
        judge.observe(&stream.next_pair());
    }
    assert_eq!(judge.verdict(), passed, "the pass itself keeps its moment");
    let live = judge.live_verdict();
    assert_eq!(live.decision, Decision::Pass);
    assert_eq!(live.jobs, passed.jobs + 3_000);
    assert!(judge
        .tests()
        .iter()
        .all(|t| t.report.estimate <= t.report.margin));
    // v2 turns bad while it waits: the error test crosses and the pass becomes a fail.
    for _ in 0..2_000 {
        judge.observe(&pair(1_000, true, 100_000, false));
    }
    let failed = judge.verdict();
    assert_eq!(failed.decision, Decision::Fail, "{}", failed.rule);
    assert!(
        failed.rule.starts_with("fail after passing"),
        "{}",
        failed.rule
    );
    let tests = judge.tests();
    let crossed: Vec<_> = tests
        .iter()
        .filter(|t| t.report.evidence == Evidence::Fail)
        .collect();
    assert!(!crossed.is_empty(), "{tests:?}");
    assert!(
        crossed.iter().all(|t| t.report.estimate > t.report.margin),
        "{crossed:?}"
    );
    // A fail is final.
    for _ in 0..2_000 {
        judge.observe(&stream.next_pair());
    }
    assert_eq!(judge.verdict(), failed);
}

#[test]
fn pass_waits_for_consecutive_windows() {
    let condition = Condition {
        warmup_jobs: 0,
        ..Condition::default()
    };
    let verdict = {
        let mut judge = Judge::new(condition.clone());
        // v2 answers each job exactly as fast as v1; latencies spread over a decade.
        for n in 0..50_000u64 {
            let latency = 1_000 + (n * 7919) % 9_000;
            judge.observe(&pair(latency, true, latency, true));
            if judge.is_final() {
                break;
            }
        }
        judge.verdict()
    };
    assert_eq!(verdict.decision, Decision::Pass, "{}", verdict.rule);
    assert_eq!(verdict.jobs % condition.window_jobs, 0);
    assert_eq!(
        verdict.details["consecutive_passes"].as_u64(),
        Some(u64::from(condition.consecutive_passes))
    );
}

#[test]
fn a_a_control_absorbs_the_simulation_configurations_own_slowdown() {
    // Machines in simulation configuration are 15% slower whatever the version (e.g. a slower
    // pool); v2 itself is no slower than v1. Without the control the judge must blame v2; with
    // the control it must not.
    let job_pairs = |seed: u64| {
        let model = LatencyModel::default();
        let cuts = model.cuts();
        let mut v2_stream = PairStream::new(&model, &cuts, Family::AA, seed);
        let mut control_stream = PairStream::new(&model, &cuts, Family::AA, seed + 1000);
        let slow = |mut p: PairSample| {
            p.v2_latency_us = p.v2_latency_us * 115 / 100;
            p
        };
        (0..40_000)
            .map(|_| {
                (
                    slow(v2_stream.next_pair()),
                    slow(control_stream.next_pair()),
                )
            })
            .collect::<Vec<_>>()
    };
    let pairs = job_pairs(5);
    let mut without_control = Judge::new(Condition::default());
    let mut with_control = Judge::new(Condition {
        require_control: true,
        baseline: crate::Baseline::Active,
        ..Condition::default()
    });
    for (v2_pair, control_pair) in &pairs {
        without_control.observe(v2_pair);
        with_control.observe(v2_pair);
        with_control.observe_control(control_pair);
    }
    assert_eq!(without_control.verdict().decision, Decision::Fail);
    let verdict = with_control.verdict();
    assert_ne!(verdict.decision, Decision::Fail, "{}", verdict.rule);

    // A v2 30% slower than the (equally slow) control still fails against it.
    let mut regressed = Judge::new(Condition {
        require_control: true,
        baseline: crate::Baseline::Active,
        ..Condition::default()
    });
    for (v2_pair, control_pair) in &pairs {
        let slower = PairSample {
            v2_latency_us: v2_pair.v2_latency_us * 13 / 10,
            ..*v2_pair
        };
        regressed.observe(&slower);
        regressed.observe_control(control_pair);
    }
    let verdict = regressed.verdict();
    assert_eq!(verdict.decision, Decision::Fail, "{}", verdict.rule);
}

#[test]
fn required_control_without_control_pairs_never_decides() {
    let condition = Condition {
        require_control: true,
        baseline: crate::Baseline::Active,
        warmup_jobs: 0,
        ..Condition::default()
    };
    let mut judge = Judge::new(condition);
    for n in 0..5_000u64 {
        judge.observe(&pair(1_000 + n % 13, true, 1_000 + n % 13, true));
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::NotEnoughData);
    assert!(verdict.rule.contains("control"), "{}", verdict.rule);
}

#[test]
fn details_carry_stable_keys() {
    let verdict = run(&Condition::default(), Family::Errors, 1, 60_000);
    let details = &verdict.details;
    for key in [
        "jobs",
        "judged_jobs",
        "errors",
        "mismatches",
        "latency",
        "paired_ratio",
        "false_fail_rate",
        "per_test_false_fail_rate",
    ] {
        assert!(details.get(key).is_some(), "missing {key}: {details}");
    }
    let increase = &details["errors"]["increase"];
    for key in [
        "estimate",
        "interval",
        "margin",
        "fail_evidence",
        "fail_threshold",
        "evidence",
    ] {
        assert!(increase.get(key).is_some(), "missing errors.increase.{key}");
    }
    for quantile in ["p50", "p99", "p99.9"] {
        let latency = &details["latency"][quantile];
        for key in [
            "v1_us",
            "v2_us",
            "ratio",
            "ratio_interval",
            "judged",
            "test",
        ] {
            assert!(
                latency.get(key).is_some(),
                "missing latency.{quantile}.{key}"
            );
        }
    }
    assert_eq!(details["errors"]["increase"]["evidence"], "fail");
}

#[test]
fn battery_is_deterministic_and_compares_three_judges() {
    let config = crate::bench::BatteryConfig {
        runs: 2,
        budget_jobs: 3_000,
        ..Default::default()
    };
    let families = [Family::P50Slower, Family::Mismatches];
    let one_thread = crate::bench::run_battery(&config, &families, 1);
    let two_threads = crate::bench::run_battery(&config, &families, 2);
    assert_eq!(one_thread, two_threads);
    let p50 = &one_thread[0];
    assert_eq!(p50.paired.fails, 2, "{p50:?}");
    assert_eq!(p50.unpaired.runs, 2);
    assert_eq!(p50.pairing_broken.runs, 2);
}

#[test]
fn a_a_with_a_required_control_passes() {
    let model = LatencyModel::default();
    let cuts = model.cuts();
    let mut v2_stream = PairStream::new(&model, &cuts, Family::AA, 40);
    let mut control_stream = PairStream::new(&model, &cuts, Family::AA, 41);
    let mut judge = Judge::new(Condition {
        require_control: true,
        baseline: crate::Baseline::Active,
        ..Condition::default()
    });
    for _ in 0..60_000 {
        judge.observe(&v2_stream.next_pair());
        judge.observe_control(&control_stream.next_pair());
        if judge.is_final() {
            break;
        }
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::Pass, "{}", verdict.rule);
    assert!(verdict.details["errors"]["control_rate"].is_number());
}

#[test]
fn a_failed_job_is_an_error_not_also_a_mismatch() {
    let mut judge = Judge::new(Condition::default());
    for i in 0..2_000u64 {
        let v2_fails = i % 20 == 0;
        judge.observe(&PairSample {
            matched: Some(!v2_fails),
            ..pair(1_000 + i % 7, true, 1_000 + i % 7, !v2_fails)
        });
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::Fail);
    assert!(verdict.rule.contains("error"), "{}", verdict.rule);
    let mismatches = &verdict.details["mismatches"];
    assert_eq!(mismatches["mismatched"], 0, "{mismatches}");
    assert!(mismatches["compared"].as_u64() > Some(0), "{mismatches}");
}

/// A/A pairs as a recording would hold them: the model's clean pairs after v2's warm-up.
fn recorded_aa(pairs: usize, seed: u64) -> crate::bench::Recording {
    let model = LatencyModel::default();
    let cuts = model.cuts();
    let mut stream = PairStream::new(&model, &cuts, Family::AA, seed);
    for _ in 0..1_000 {
        stream.next_pair();
    }
    crate::bench::Recording::new((0..pairs).map(|_| stream.next_pair()).collect()).unwrap()
}

#[test]
fn a_recording_too_short_to_resample_is_refused() {
    let pair = PairSample {
        v1_latency_us: 1_000,
        v1_ok: true,
        v2_latency_us: 1_000,
        v2_ok: true,
        matched: Some(true),
    };
    let message = crate::bench::Recording::new(vec![pair; 10])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("at least 2000") && message.contains("has 10"),
        "{message}"
    );
}

#[test]
fn replay_applies_each_family_to_the_v2_half_of_the_same_recorded_pairs() {
    use crate::bench::ReplayStream;
    let recording = recorded_aa(5_000, 7);
    let model = LatencyModel::default();
    let mut aa = ReplayStream::new(&recording, &model, Family::AA, 99);
    let mut slower = ReplayStream::new(&recording, &model, Family::P50Slower, 99);
    let mut errors = ReplayStream::new(&recording, &model, Family::Errors, 99);
    let (mut extra_errors, mut jobs) = (0u32, 0u32);
    for job in 0..20_000 {
        let (a, s, e) = (aa.next_pair(), slower.next_pair(), errors.next_pair());
        // Same seed, same recorded pair: v1 untouched, v2 slowed by exactly the family's factor.
        assert_eq!(a.v1_latency_us, s.v1_latency_us);
        assert_eq!((a.v1_ok, a.v2_ok), (s.v1_ok, s.v2_ok));
        let expected = a.v2_latency_us as f64 * 1.2;
        assert!(
            (s.v2_latency_us as f64 - expected).abs() <= 1.5,
            "job {job}: {a:?} {s:?}"
        );
        assert!(recording
            .pairs()
            .iter()
            .any(|p| p.v1_latency_us == a.v1_latency_us));
        if job >= 2_000 {
            // Warm-up long gone: an A/A replay gives back the recorded v2 latencies.
            assert!(recording
                .pairs()
                .iter()
                .any(|p| p.v2_latency_us == a.v2_latency_us));
            jobs += 1;
            extra_errors += u32::from(a.v2_ok && !e.v2_ok);
        }
    }
    let rate = f64::from(extra_errors) / f64::from(jobs);
    assert!((0.007..0.013).contains(&rate), "extra error rate {rate}");
}

#[test]
fn replayed_battery_passes_a_a_and_catches_a_slower_v2() {
    use crate::bench::{run_battery, BatteryConfig, PairSource};
    let config = BatteryConfig {
        runs: 3,
        budget_jobs: 20_000,
        source: PairSource::Replay(std::sync::Arc::new(recorded_aa(20_000, 8))),
        ..Default::default()
    };
    let families = [Family::AA, Family::P50Slower];
    let figures = run_battery(&config, &families, 2);
    assert_eq!(figures, run_battery(&config, &families, 1));
    assert_eq!(figures[0].paired.fails, 0, "{:?}", figures[0]);
    // A clean v2 may still be proving its p99.9 when the budget ends, never failing.
    assert!(figures[0].paired.passes >= 2, "{:?}", figures[0]);
    assert_eq!(figures[1].paired.fails, 3, "{:?}", figures[1]);
}

#[test]
fn each_test_bets_against_its_own_share_of_the_false_fail_rate() {
    let condition = Condition::default();
    let judge = Judge::new(condition.clone());
    let details = judge.verdict().details;
    let budget = condition.fail_budget(Sharing::default());
    let threshold = |test: &serde_json::Value| test["fail_threshold"].as_f64().unwrap();
    assert!((threshold(&details["errors"]["increase"]) - 1.0 / budget.errors).abs() < 1e-6);
    // The hard test fails only with the error test, so it may use the same share.
    assert!((threshold(&details["errors"]["hard"]) - 1.0 / budget.errors).abs() < 1e-6);
    assert!((threshold(&details["mismatches"]["test"]) - 1.0 / budget.mismatches).abs() < 1e-6);
    let p999 = &details["latency"]["p99.9"]["test"];
    assert!((threshold(p999) - 1.0 / budget.latency[2]).abs() < 1e-3);
    // Rarer tails get larger shares; with the prediction rule sharing, everyone gets less.
    assert!(budget.latency[2] > budget.latency[1] && budget.latency[1] > budget.latency[0]);
    let shared = condition.fail_budget(Sharing {
        prediction: true,
        ..Sharing::default()
    });
    assert!(shared.errors < budget.errors && shared.prediction > 0.0);
    let with_prediction = Judge::with_sharing(
        condition,
        Sharing {
            prediction: true,
            ..Sharing::default()
        },
    );
    let details = with_prediction.verdict().details;
    assert!((threshold(&details["errors"]["increase"]) - 1.0 / shared.errors).abs() < 1e-6);
}
