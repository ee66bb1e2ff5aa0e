use super::*;
use crate::{Condition, Decision};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn field(path: &str, v1: &str, copy: &str) -> FieldValues {
    FieldValues {
        path: path.to_string(),
        v1: Some(v1.to_string()),
        copy: Some(copy.to_string()),
    }
}

fn answer(paths: Vec<FieldValues>) -> AnswerFields {
    AnswerFields { paths }
}

fn pair() -> PairSample {
    PairSample {
        v1_latency_us: 1_000,
        v1_ok: true,
        v2_latency_us: 1_000,
        v2_ok: true,
        matched: Some(false),
    }
}

fn condition() -> Condition {
    Condition {
        warmup_jobs: 20,
        min_jobs: 100,
        ..Condition::default()
    }
}

/// A timestamp differs on every answer of every copy, v2's and the control's alike.
fn timestamp(job: u64) -> FieldValues {
    field("generated_at", &job.to_string(), &(job + 1).to_string())
}

#[test]
fn a_field_v2_changed_fails_the_rollout_and_is_named_with_its_values() {
    let mut judge = Judge::new(condition());
    for job in 0..5_000 {
        let v2 = answer(vec![timestamp(job), field("items[].price", "12.5", "13.0")]);
        let control = answer(vec![timestamp(job)]);
        judge.observe_with_fields(&pair(), &v2, Some(&control));
        if judge.is_final() {
            break;
        }
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::Fail, "{}", verdict.rule);
    assert!(verdict.rule.contains("items[].price"), "{}", verdict.rule);
    assert!(verdict.rule.contains("12.5 -> 13.0"), "{}", verdict.rule);
    assert!(!verdict.rule.contains("generated_at"), "{}", verdict.rule);
    assert!(judge.jobs() < 200, "caught after {} jobs", judge.jobs());
    let report = judge.fields().unwrap();
    let class = |path: &str| report.fields.iter().find(|f| f.path == path).unwrap().class;
    assert_eq!(class("items[].price"), FieldClass::Regression);
    assert_eq!(class("generated_at"), FieldClass::Noise);
    let price = &report.fields[0];
    assert_eq!(price.path, "items[].price");
    assert_eq!(price.v2_rate, 1.0);
    assert_eq!(price.control_rate, Some(0.0));
    assert_eq!(
        price.v2_sample,
        Some(ValuePair {
            v1: Some("12.5".into()),
            copy: Some("13.0".into())
        })
    );
    // The verdict's details carry the fields too.
    let fields = &verdict.details["mismatches"]["fields"]["fields"];
    assert_eq!(fields[0]["class"], "regression", "{fields}");
}

/// Thousands of A/A jobs: a timestamp differs on every answer, an id on a random 30% of them on
/// each side independently; v2 is another v1. The mismatch test never fails, the timestamp and
/// the id are shown as noise.
#[test]
fn noise_that_differs_between_two_v1s_never_fails_and_is_shown_as_noise() {
    for seed in 0..5 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut judge = Judge::new(condition());
        let id = |rng: &mut StdRng| {
            rng.gen_bool(0.3)
                .then(|| field("request.id", "\"a\"", "\"b\""))
        };
        for job in 0..4_000 {
            let v2: Vec<FieldValues> = [Some(timestamp(job)), id(&mut rng)]
                .into_iter()
                .flatten()
                .collect();
            let control: Vec<FieldValues> = [Some(timestamp(job)), id(&mut rng)]
                .into_iter()
                .flatten()
                .collect();
            judge.observe_with_fields(&pair(), &answer(v2), Some(&answer(control)));
            assert_ne!(
                judge.decision(),
                Decision::Fail,
                "seed {seed}: {}",
                judge.verdict().rule
            );
        }
        let report = judge.fields().unwrap();
        assert_eq!(report.jobs, 4_000 - 20);
        for f in &report.fields {
            assert_eq!(f.class, FieldClass::Noise, "seed {seed}: {f:?}");
            assert!(f.control_sample.is_some());
        }
        let mismatches = judge
            .tests()
            .into_iter()
            .find(|t| t.name == "mismatches")
            .unwrap();
        assert_ne!(mismatches.report.evidence, Evidence::Fail);
        assert!(
            mismatches.report.estimate.abs() < 0.05,
            "{:?}",
            mismatches.report
        );
    }
}

/// A field that is noisy on a fraction of answers does not hide a field v2 always changes.
#[test]
fn a_rare_noisy_field_does_not_hide_a_changed_one() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut judge = Judge::new(condition());
    for job in 0..5_000u64 {
        let noisy = |rng: &mut StdRng| rng.gen_bool(0.05).then(|| field("cache.age", "1", "2"));
        let mut v2: Vec<FieldValues> = noisy(&mut rng).into_iter().collect();
        v2.push(field("status_text", "\"ok\"", "\"OK\""));
        let control: Vec<FieldValues> = noisy(&mut rng).into_iter().collect();
        judge.observe_with_fields(&pair(), &answer(v2), Some(&answer(control)));
        if judge.is_final() {
            assert!(job < 300, "decided at job {job}");
            break;
        }
    }
    let verdict = judge.verdict();
    assert_eq!(verdict.decision, Decision::Fail);
    assert!(verdict.rule.contains("status_text"), "{}", verdict.rule);
    assert!(!verdict.rule.contains("cache.age"), "{}", verdict.rule);
}

#[test]
fn without_a_control_every_differing_field_counts() {
    let mut tests = FieldTests::new(0.005, 0.0025, 0.05, 0.01);
    for _ in 0..300 {
        tests.observe(&answer(vec![field("a", "1", "2")]), None);
    }
    assert_eq!(tests.aggregate().evidence(), Evidence::Fail);
    let report = tests.report();
    assert_eq!(report.control_jobs, 0);
    assert_eq!(report.fields[0].control_rate, None);
    assert_eq!(report.fields[0].class, FieldClass::Regression);
}

#[test]
fn fields_seen_late_are_tested_over_every_job_and_paths_are_capped() {
    let mut tests = FieldTests::new(0.005, 0.0025, 0.05, 0.01);
    for _ in 0..50 {
        tests.observe(&answer(vec![]), Some(&answer(vec![])));
    }
    let many: Vec<FieldValues> = (0..100)
        .map(|i| field(&format!("f{i:03}"), "1", "2"))
        .collect();
    tests.observe(&answer(many), Some(&answer(vec![])));
    let report = tests.report();
    assert_eq!(report.fields.len(), MAX_FIELDS + 1);
    let other = report
        .fields
        .iter()
        .find(|f| f.path == OTHER_FIELD)
        .unwrap();
    assert_eq!(other.v2_differs, 1);
    // A field first seen at job 51 has a test of 51 observations, 50 of them zero.
    assert!(report.fields.iter().all(|f| f.test.observations == 51));
    assert!(report
        .fields
        .iter()
        .all(|f| f.class != FieldClass::Regression));
    // Known fields keep their names; new ones still go to the overflow.
    tests.observe(
        &answer(vec![field("f000", "1", "2"), field("zzz", "1", "2")]),
        None,
    );
    let report = tests.report();
    let count = |path: &str| {
        report
            .fields
            .iter()
            .find(|f| f.path == path)
            .unwrap()
            .v2_differs
    };
    assert_eq!((count("f000"), count(OTHER_FIELD)), (2, 2));
}

#[test]
fn status_mode_judges_keep_their_mismatch_test() {
    let mut judge = Judge::new(condition());
    for _ in 0..2_000 {
        judge.observe(&pair());
        if judge.is_final() {
            break;
        }
    }
    assert!(judge.fields().is_none());
    assert_eq!(judge.decision(), Decision::Fail);
    assert!(judge
        .verdict()
        .rule
        .contains("mismatches: v2's answers differ from v1's in more"));
}
