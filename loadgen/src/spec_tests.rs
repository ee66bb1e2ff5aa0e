//! Property tests of the load and machine spec parsers: every equivalent TOML form of a spec reads
//! as the same spec, and a spec broken in any one place is refused with an error that names the
//! place (and its line, where toml reports one), without panicking.

use proptest::prelude::*;
use toml::{Table, Value};
use understudy_testkit::{self as kit, KeyPath};

use crate::calls::LateFailureSpec;
use crate::load::{LoadSpec, Mode};
use crate::machine::{
    FaultSpec, FaultTrigger, LatencyCreepSpec, MachineSpec, SlowStartSpec, TailSpec,
};
use crate::schedule::{Arrivals, MixSpec, ProfileSpec, SessionShapeSpec, StepSpec};
use crate::spec::{DelaySpec, SpecError};

const CASES: u32 = 128;

fn ms() -> impl Strategy<Value = f64> {
    prop_oneof![0.0..5_000.0, (0u32..5_000).prop_map(f64::from)]
}

fn fraction() -> impl Strategy<Value = f64> {
    prop_oneof![0.0..=1.0, Just(0.0), Just(1.0)]
}

fn delay() -> impl Strategy<Value = DelaySpec> {
    prop_oneof![
        ms().prop_map(|ms| DelaySpec::Constant { ms }),
        (ms(), ms()).prop_map(|(a, b)| DelaySpec::Uniform {
            min_ms: a.min(b),
            max_ms: a.max(b),
        }),
        (1.0..5_000.0).prop_map(|mean_ms| DelaySpec::Exponential { mean_ms }),
        (ms(), 0.0..3.0).prop_map(|(median_ms, sigma)| DelaySpec::Lognormal { median_ms, sigma }),
        (ms(), ms(), fraction(), 0.0..3.0).prop_map(|(fast_ms, slow_ms, slow_fraction, sigma)| {
            DelaySpec::Bimodal {
                fast_ms,
                slow_ms,
                slow_fraction,
                sigma,
            }
        }),
    ]
}

fn trigger() -> impl Strategy<Value = Option<FaultTrigger>> {
    proptest::option::of(
        (0u64..1_000, fraction()).prop_map(|(after_jobs, fraction)| FaultTrigger {
            after_jobs,
            fraction,
        }),
    )
}

fn late_failure() -> impl Strategy<Value = Option<LateFailureSpec>> {
    let after = prop_oneof![
        (1u64..100).prop_map(|n| (Some(n), None)),
        (1u64..100_000).prop_map(|n| (None, Some(n))),
        (1u64..100, 1u64..100_000).prop_map(|(n, m)| (Some(n), Some(m))),
    ];
    let status = proptest::option::of(prop::sample::select(vec![500u16, 503, 429]));
    proptest::option::of(
        (fraction(), after, status).prop_map(|(fraction, after, status)| LateFailureSpec {
            fraction,
            after_media_jobs: after.0,
            after_media_ms: after.1,
            status,
        }),
    )
}

fn faults() -> impl Strategy<Value = FaultSpec> {
    let slow_start =
        proptest::option::of(
            (ms(), 1u64..1_000).prop_map(|(extra_ms, over_jobs)| SlowStartSpec {
                extra_ms,
                over_jobs,
            }),
        );
    let creep = proptest::option::of(
        (0.0..1_000.0, 1.0..60_000.0)
            .prop_map(|(per_job_us, max_ms)| LatencyCreepSpec { per_job_us, max_ms }),
    );
    (
        (trigger(), trigger(), trigger()),
        proptest::option::of(1u64..10_000),
        slow_start,
        creep,
        any::<bool>(),
        late_failure(),
    )
        .prop_map(
            |(
                (hang, reset, mismatch),
                crash_after_jobs,
                slow_start,
                latency_creep,
                leaks,
                late,
            )| {
                FaultSpec {
                    hang,
                    reset,
                    mismatch,
                    crash_after_jobs,
                    slow_start,
                    latency_creep,
                    leaks_side_effects: leaks,
                    late_failure: late,
                }
            },
        )
}

pub(crate) fn machine_spec() -> impl Strategy<Value = MachineSpec> {
    let tail = proptest::option::of((fraction(), 1.0..100.0).prop_map(|(fraction, multiplier)| {
        TailSpec {
            fraction,
            multiplier,
        }
    }));
    (
        ("[a-z][a-z0-9-]{0,8}", "v[0-9]{1,2}", 0u64..1 << 40),
        (delay(), tail, fraction()),
        prop::sample::select(vec![500u16, 502, 503, 404, 429]),
        proptest::collection::btree_set("[a-z]{1,6}", 0..3),
        1u64..60_000,
        faults(),
    )
        .prop_map(
            |((service, version, seed), (latency, tail, error_rate), status, deps, timeout, f)| {
                MachineSpec {
                    service,
                    version,
                    seed,
                    latency,
                    tail,
                    error_rate,
                    error_status: status,
                    dependencies: deps.into_iter().collect(),
                    dependency_timeout_ms: timeout,
                    faults: f,
                    answer: Default::default(),
                }
            },
        )
}

fn profile() -> impl Strategy<Value = ProfileSpec> {
    let rate = || 0.0..1_000.0;
    let steps = proptest::collection::vec((0.0..100.0, rate()), 0..4).prop_map(|mut v| {
        v.sort_by(|a: &(f64, f64), b| a.0.total_cmp(&b.0));
        v.into_iter()
            .map(|(at_s, rate)| StepSpec { at_s, rate })
            .collect()
    });
    prop_oneof![
        Just(ProfileSpec::Constant),
        (rate(), proptest::option::of(0.5..100.0))
            .prop_map(|(from_rate, over_s)| ProfileSpec::Ramp { from_rate, over_s }),
        steps.prop_map(|steps| ProfileSpec::Step { steps }),
        (0.0..100.0, 0.5..100.0, rate()).prop_map(|(at_s, length_s, spike_rate)| {
            ProfileSpec::Spike {
                at_s,
                length_s,
                spike_rate,
            }
        }),
    ]
}

fn session_shape() -> impl Strategy<Value = SessionShapeSpec> {
    (1u64..10_000, delay(), 1u64..600_000).prop_map(|(interval_ms, length, max_length_ms)| {
        SessionShapeSpec {
            interval_ms,
            length,
            max_length_ms,
        }
    })
}

fn mix() -> impl Strategy<Value = MixSpec> {
    (
        (0.1..10.0, 0.0..10.0, 0.0..10.0),
        session_shape(),
        session_shape(),
    )
        .prop_map(|((sms, voice, video), voice_call, video_session)| MixSpec {
            sms,
            voice,
            video,
            voice_call,
            video_session,
        })
}

pub(crate) fn load_spec() -> impl Strategy<Value = LoadSpec> {
    (
        (0.0..10_000.0, 0.1..3_600.0, profile()),
        (proptest::option::of(1u64..1 << 40), mix(), 0u64..1 << 40),
        prop::sample::select(vec![Arrivals::Uniform, Arrivals::Poisson]),
        prop::sample::select(vec![Mode::Open, Mode::Closed]),
        (1usize..=10_000, 1u64..100_000, 1u64..100_000),
    )
        .prop_map(
            |((rate, duration_s, profile), (max_jobs, mix, seed), arrivals, mode, numbers)| {
                LoadSpec {
                    rate,
                    duration_s,
                    profile,
                    max_jobs,
                    mix,
                    seed,
                    arrivals,
                    mode,
                    connections: numbers.0,
                    timeout_ms: numbers.1,
                    progress_interval_ms: numbers.2,
                }
            },
        )
}

fn table_of<T: serde::Serialize>(spec: &T) -> Table {
    match Value::try_from(spec).expect("a spec serializes to TOML") {
        Value::Table(t) => t,
        other => panic!("not a table: {other:?}"),
    }
}

/// A spec error names a key as (a part of) its field, or quoted in its problem; toml's problems
/// start with their line.
const NAMING: kit::Naming<SpecError> = kit::Naming {
    names: |error, key| {
        error.field.split(['.', '[']).any(|part| part == key)
            || error.problem.contains(&format!("`{key}`"))
    },
    line: |error| {
        let rest = error.problem.strip_prefix("line ")?;
        rest.split(',').next()?.parse().ok()
    },
};

/// Every table of a spec: all their keys are fields.
fn broken(table: Table) -> impl Strategy<Value = (Table, kit::Break)> {
    let tables = kit::tables(&table);
    (Just(table.clone()), kit::breaks(&table, tables))
}

proptest! {
    #![proptest_config(kit::config(CASES))]

    #[test]
    fn a_machine_spec_reads_alike_in_every_form(spec in machine_spec(), style in kit::style()) {
        let rendered = kit::render(&table_of(&spec), style);
        let read = MachineSpec::from_toml_str(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(read, spec, "{}", rendered.text);
    }

    #[test]
    fn a_load_spec_reads_alike_in_every_form(spec in load_spec(), style in kit::style()) {
        let rendered = kit::render(&table_of(&spec), style);
        let read = LoadSpec::from_toml_str(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(read, spec, "{}", rendered.text);
    }

    #[test]
    fn a_broken_machine_spec_is_refused_by_name(
        (table, what) in machine_spec().prop_flat_map(|s| broken(table_of(&s))),
        style in kit::style(),
    ) {
        kit::check_break(table, &what, style, MachineSpec::from_toml_str, &NAMING)?;
    }

    #[test]
    fn a_broken_load_spec_is_refused_by_name(
        (table, what) in load_spec().prop_flat_map(|s| broken(table_of(&s))),
        style in kit::style(),
    ) {
        kit::check_break(table, &what, style, LoadSpec::from_toml_str, &NAMING)?;
    }

    #[test]
    fn a_number_out_of_range_is_refused_by_name(
        spec in machine_spec(),
        pick in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![-1.0, f64::NAN, f64::INFINITY, 1e300]),
        style in kit::style(),
    ) {
        // Every float of a machine spec is bounded (seed and counts are integers).
        let mut table = table_of(&spec);
        let floats: Vec<KeyPath> = kit::leaves(&table)
            .into_iter()
            .filter(|p| matches!(kit::get(&table, p), Some(Value::Float(_))))
            .collect();
        prop_assume!(!floats.is_empty());
        let path = pick.get(&floats).clone();
        kit::set(&mut table, &path, Value::Float(bad));
        let rendered = kit::render(&table, style);
        let error = MachineSpec::from_toml_str(&rendered.text);
        // A lognormal's sigma may be large, a creep's max and a tail's multiplier too.
        let unbounded_above = ["sigma", "max_ms", "multiplier", "per_job_us", "extra_ms"];
        if bad == 1e300 && unbounded_above.contains(&kit::last_key(&path)) {
            prop_assume!(error.is_err());
        }
        let error = error
            .err()
            .ok_or_else(|| TestCaseError::fail(format!("accepted\n{}", rendered.text)))?;
        prop_assert!(
            error.field.ends_with(kit::last_key(&path)),
            "{} does not name {}", error, kit::path_string(&path)
        );
    }

    #[test]
    fn garbled_specs_never_panic(
        text in (machine_spec(), kit::style())
            .prop_map(|(s, style)| kit::render(&table_of(&s), style).text)
            .prop_flat_map(kit::garble),
    ) {
        let _ = MachineSpec::from_toml_str(&text);
        let _ = LoadSpec::from_toml_str(&text);
    }
}

#[test]
fn a_delay_reads_alike_as_a_standard_or_inline_table() {
    let inline = MachineSpec::from_toml_str(
        "service = \"s\"\nlatency = { kind = \"lognormal\", median_ms = 2, sigma = 0.5 }\n",
    )
    .unwrap();
    let standard = MachineSpec::from_toml_str(
        "service = \"s\"\n[latency]\nkind = \"lognormal\"\nmedian_ms = 2.0\nsigma = 0.5\n",
    )
    .unwrap();
    assert_eq!(inline, standard);
}

#[test]
fn a_delay_field_of_the_wrong_type_or_kind_is_named() {
    let wrong_type =
        MachineSpec::from_toml_str("service = \"s\"\n[latency]\nkind = \"constant\"\nms = \"x\"\n")
            .unwrap_err()
            .to_string();
    assert!(
        wrong_type.starts_with("latency.ms: line 4, column 6: invalid type"),
        "{wrong_type}"
    );
    let other_kind = MachineSpec::from_toml_str(
        "service = \"s\"\nlatency = { kind = \"constant\", ms = 1, sigma = 2 }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        other_kind.contains("unknown field `sigma` for kind = \"constant\""),
        "{other_kind}"
    );
    let missing = LoadSpec::from_toml_str("rate = 1\nduration_s = 1\nprofile.kind = \"spike\"\n")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("missing field `at_s`"), "{missing}");
}
