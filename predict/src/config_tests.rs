//! Property tests of the configuration parser: every equivalent TOML form of a configuration reads
//! as the same settings, and one broken in any one place is refused naming the place, never
//! panicking.

use std::collections::BTreeMap;

use proptest::prelude::*;
use toml::{Table, Value};
use understudy_testkit::{self as kit, KeyPath, Seg};

use super::{
    AlertConfig, CompareConfig, ConfigError, DwellConfig, PredictConfig, RuleConfig,
    ERROR_STATE_FAILURE, TIME_THRESHOLD_FAILURE,
};

const CASES: u32 = 128;

fn state() -> impl Strategy<Value = String> {
    "[a-z]{1,8}( [a-z]{1,6})?"
}

fn rules() -> impl Strategy<Value = Vec<RuleConfig>> {
    let rule = (
        "[a-z]{1,6}",
        proptest::collection::btree_map("[a-z_]{1,6}", "[a-z ]{0,8}", 0..3),
        state(),
    )
        .prop_map(|(kind, when, state)| RuleConfig { kind, when, state });
    proptest::collection::vec(rule, 0..4)
}

pub(crate) fn config() -> impl Strategy<Value = PredictConfig> {
    let artifacts = proptest::collection::btree_set(state(), 0..2).prop_map(|extra| {
        let mut all = vec![
            ERROR_STATE_FAILURE.to_string(),
            TIME_THRESHOLD_FAILURE.to_string(),
        ];
        for state in extra {
            if !all.contains(&state) {
                all.push(state);
            }
        }
        all
    });
    let states = proptest::collection::btree_set(state(), 0..5);
    (
        (0.5..10_000.0, artifacts, states, any::<bool>()),
        rules(),
        (0.001..=1.0, 0.0..100.0),
        (
            proptest::option::of(0.5..1_000.0),
            0.0..1_000.0,
            0.0..0.99,
            proptest::option::of(0.1..5.0),
        ),
        (0u64..10_000, proptest::collection::vec(0.5..1_000.0, 0..3)),
    )
        .prop_map(|(head, rules, alerts, numbers, (resolve, limits))| {
            let (half_life_secs, artifacts, states, with_start) = head;
            let states: Vec<String> = states
                .into_iter()
                .filter(|s| !artifacts.contains(s))
                .collect();
            // The first state (if any) ends objects; the others may start and dwell.
            let successes: Vec<String> = states.iter().take(1).cloned().collect();
            let transient: Vec<&String> = states.iter().skip(1).collect();
            let dwell_limits: BTreeMap<String, f64> = transient
                .iter()
                .zip(limits)
                .map(|(s, l)| ((*s).clone(), l))
                .collect();
            PredictConfig {
                half_life_secs,
                time_threshold_artifact: artifacts[1].clone(),
                artifacts,
                successes,
                start_state: transient
                    .first()
                    .filter(|_| with_start)
                    .map(|s| (*s).clone()),
                rules,
                alerts: AlertConfig {
                    threshold: alerts.0,
                    min_exits: alerts.1,
                },
                dwell: DwellConfig {
                    limit_secs: numbers.0,
                    limits: dwell_limits,
                },
                compare: CompareConfig {
                    min_starts: numbers.1,
                    margin: numbers.2,
                    z: numbers.3,
                },
                resolve_interval_ms: resolve,
            }
        })
}

fn table_of(config: &PredictConfig) -> Table {
    match Value::try_from(config).expect("a configuration serializes") {
        Value::Table(t) => t,
        other => panic!("not a table: {other:?}"),
    }
}

/// Tables whose keys are fields (`rules[0].when` and `dwell.limits` are keyed by names).
fn field_tables(table: &Table) -> Vec<KeyPath> {
    kit::tables(table)
        .into_iter()
        .filter(|p| !matches!(p.last(), Some(Seg::Key(k)) if k == "when" || k == "limits"))
        .collect()
}

const NAMING: kit::Naming<ConfigError> = kit::Naming {
    names: |error, key| match error {
        ConfigError::Invalid { field, reason } => {
            kit::mentions(field, key) || kit::mentions(reason, key)
        }
        ConfigError::Parse(message) => {
            let field = message
                .strip_prefix("field `")
                .and_then(|rest| rest.split('`').next())
                .unwrap_or("");
            kit::mentions(field, key) || message.contains(&format!("`{key}`"))
        }
    },
    line: |error| match error {
        ConfigError::Parse(message) => {
            let rest = &message[message.find("line ")? + 5..];
            rest.split(',').next()?.parse().ok()
        }
        ConfigError::Invalid { .. } => None,
    },
};

proptest! {
    #![proptest_config(kit::config(CASES))]

    #[test]
    fn a_configuration_reads_alike_in_every_form(config in config(), style in kit::style()) {
        let expected = config.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let rendered = kit::render(&table_of(&config), style);
        let read = PredictConfig::from_toml_str(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(read, expected, "{}", rendered.text);
    }

    #[test]
    fn a_broken_configuration_is_refused_by_name(
        (table, what) in config().prop_flat_map(|c| {
            let table = table_of(&c);
            let fields = field_tables(&table);
            (Just(table.clone()), kit::breaks(&table, fields))
        }),
        style in kit::style(),
    ) {
        kit::check_break(table, &what, style, PredictConfig::from_toml_str, &NAMING)?;
    }

    #[test]
    fn garbled_configurations_never_panic(
        text in (config(), kit::style())
            .prop_map(|(c, style)| kit::render(&table_of(&c), style).text)
            .prop_flat_map(kit::garble),
    ) {
        let _ = PredictConfig::from_toml_str(&text);
    }
}

#[test]
fn a_field_of_the_wrong_type_is_named_with_its_line() {
    let err = PredictConfig::from_toml_str("[alerts]\nthreshold = \"high\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("field `alerts.threshold`: line 2, column 13: invalid type"),
        "{err}"
    );
}
