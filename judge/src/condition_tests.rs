//! Property tests of the condition parser: every equivalent TOML form of a condition reads as the
//! same condition, and one broken in any one place is refused naming the place, never panicking.

use proptest::prelude::*;
use toml::{Table, Value};
use understudy_testkit::{self as kit, KeyPath};

use super::{Baseline, Condition, ConditionError, LatencyLimit};

const CASES: u32 = 256;

fn latency() -> impl Strategy<Value = Vec<LatencyLimit>> {
    proptest::collection::btree_map(1u32..9_999, 1.0..3.0, 1..4).prop_map(|limits| {
        limits
            .into_iter()
            .map(|(q, max_ratio)| LatencyLimit {
                quantile: f64::from(q) / 10_000.0,
                max_ratio,
            })
            .collect()
    })
}

pub(crate) fn condition() -> impl Strategy<Value = Condition> {
    (
        (0u64..10_000, 1u64..10_000, latency(), 1.0..3.0, 1u64..100),
        (0.0..0.4, 0.0..0.5, 0.0..0.99),
        (1u64..1_000, 1u32..10, 0.001..=0.5, 0.001..=0.5),
        prop_oneof![
            Just((false, Baseline::Control)),
            Just((false, Baseline::Active)),
            Just((true, Baseline::Active)),
        ],
    )
        .prop_map(|(counts, rates, windows, (require_control, baseline))| {
            let (warmup_jobs, min_jobs, latency, max_paired_ratio, min_tail_exceedances) = counts;
            let (max_error, above, max_mismatch_rate) = rates;
            Condition {
                warmup_jobs,
                min_jobs,
                latency,
                max_paired_ratio,
                min_tail_exceedances,
                max_error_rate_increase: max_error,
                hard_error_rate_increase: max_error + (1.0 - max_error) * (0.01 + above),
                max_mismatch_rate,
                window_jobs: windows.0,
                consecutive_passes: windows.1,
                false_fail_rate: windows.2,
                false_pass_rate: windows.3,
                require_control,
                baseline,
            }
        })
}

pub(crate) fn table_of(condition: &Condition) -> Table {
    match Value::try_from(condition).expect("a condition serializes") {
        Value::Table(t) => t,
        other => panic!("not a table: {other:?}"),
    }
}

/// A condition error names a key as a part of its field, or quoted in its message; a parse error
/// gives its line.
pub(crate) const NAMING: kit::Naming<ConditionError> = kit::Naming {
    names: |error, key| match error {
        // A coherence error names its field and mentions the other it clashes with.
        ConditionError::Invalid { field, reason } => {
            field.split('.').any(|part| part == key) || kit::mentions(reason, key)
        }
        ConditionError::Parse(message) => {
            let field = message
                .strip_prefix("field `")
                .and_then(|rest| rest.split('`').next())
                .unwrap_or("");
            field.split(['.', '[']).any(|part| part == key) || message.contains(&format!("`{key}`"))
        }
    },
    line: |error| match error {
        ConditionError::Parse(message) => {
            let rest = &message[message.find("line ")? + 5..];
            rest.split(',').next()?.parse().ok()
        }
        ConditionError::Invalid { .. } => None,
    },
};

proptest! {
    #![proptest_config(kit::config(CASES))]

    #[test]
    fn a_condition_reads_alike_in_every_form(condition in condition(), style in kit::style()) {
        let rendered = kit::render(&table_of(&condition), style);
        let read = Condition::from_toml_str(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(read, condition, "{}", rendered.text);
    }

    #[test]
    fn a_broken_condition_is_refused_by_name(
        (table, what) in condition().prop_flat_map(|c| {
            let table = table_of(&c);
            let tables = kit::tables(&table);
            (Just(table.clone()), kit::breaks(&table, tables))
        }),
        style in kit::style(),
    ) {
        kit::check_break(table, &what, style, Condition::from_toml_str, &NAMING)?;
    }

    #[test]
    fn a_number_out_of_range_is_refused_by_name(
        condition in condition(),
        pick in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![-1.0, f64::NAN, f64::INFINITY]),
        style in kit::style(),
    ) {
        // Every number of a condition is bounded below (counts are unsigned); floats are finite.
        let mut table = table_of(&condition);
        let numbers: Vec<KeyPath> = kit::leaves(&table)
            .into_iter()
            .filter(|p| matches!(kit::get(&table, p), Some(Value::Float(_) | Value::Integer(_))))
            .collect();
        let path = pick.get(&numbers).clone();
        let value = match kit::get(&table, &path) {
            Some(Value::Integer(_)) => Value::Integer(-1),
            _ => Value::Float(bad),
        };
        kit::set(&mut table, &path, value);
        let rendered = kit::render(&table, style);
        let error = Condition::from_toml_str(&rendered.text)
            .err()
            .ok_or_else(|| TestCaseError::fail(format!("accepted\n{}", rendered.text)))?;
        prop_assert!((NAMING.names)(&error, kit::last_key(&path)), "{} does not name {}",
            error, kit::path_string(&path));
    }

    #[test]
    fn garbled_conditions_never_panic(
        text in (condition(), kit::style())
            .prop_map(|(c, style)| kit::render(&table_of(&c), style).text)
            .prop_flat_map(kit::garble),
    ) {
        let _ = Condition::from_toml_str(&text);
    }
}

#[test]
fn a_field_of_the_wrong_type_is_named_with_its_line() {
    let err = Condition::from_toml_str("min_jobs = 5\n[[latency]]\nquantile = \"high\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("condition: field `latency[0].quantile`: line 3, column 12: invalid type"),
        "{err}"
    );
}
