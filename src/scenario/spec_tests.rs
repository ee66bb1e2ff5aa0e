//! Property tests of the scenario parser: every equivalent TOML form of a scenario (behaviours'
//! delay tables as `[behaviours.NAME.latency]` sections included) reads as the same scenario, and
//! one broken in any one place is refused naming the field and its line, never panicking.

use proptest::prelude::*;
use toml::{Table, Value};
use understudy_testkit as kit;

use super::{parse, Scenario};
use crate::config::cluster::properties::{extras, field_tables, machines, shared_tables, NAMING};
use crate::config::cluster::ConfigError;

const CASES: u32 = 96;

fn delay() -> impl Strategy<Value = Value> {
    let t = |entries: Vec<(&str, Value)>| {
        Value::Table(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    };
    prop_oneof![
        (0.0..50.0)
            .prop_map(move |ms| t(vec![("kind", "constant".into()), ("ms", Value::Float(ms))])),
        (0.0..5.0, 5.0..50.0).prop_map(move |(a, b)| t(vec![
            ("kind", "uniform".into()),
            ("min_ms", Value::Float(a)),
            ("max_ms", Value::Float(b)),
        ])),
        (0.1..50.0, 0.0..2.0).prop_map(move |(m, s)| t(vec![
            ("kind", "lognormal".into()),
            ("median_ms", Value::Float(m)),
            ("sigma", Value::Float(s)),
        ])),
    ]
}

fn behaviour() -> impl Strategy<Value = Value> {
    (
        delay(),
        0.0..0.1,
        proptest::option::of(0.0..=1.0),
        0i64..100,
    )
        .prop_map(|(latency, error_rate, hang, seed)| {
            let mut t = Table::new();
            t.insert("latency".into(), latency);
            t.insert("error_rate".into(), Value::Float(error_rate));
            t.insert("seed".into(), Value::Integer(seed));
            if let Some(fraction) = hang {
                let hang: Table = [("fraction".to_string(), Value::Float(fraction))]
                    .into_iter()
                    .collect();
                let faults: Table = [("hang".to_string(), Value::Table(hang))]
                    .into_iter()
                    .collect();
                t.insert("faults".into(), Value::Table(faults));
            }
            Value::Table(t)
        })
}

/// A scenario: the shared cluster tables, machines with behaviours, load, release and expect.
fn scenario() -> impl Strategy<Value = Table> {
    shared_tables().prop_flat_map(|(t, names)| {
        let n = names.len();
        (
            Just((t, names)),
            extras(n),
            proptest::collection::vec(proptest::option::of(behaviour()), n),
            (1.0..100.0, 0.5..10.0, 0.0..0.4),
        )
            .prop_map(
                |((mut t, names), mut extra, behaviours, (rate, duration, at))| {
                    // The first service ships a v2.
                    extra[0].1 = true;
                    let mut listed = Table::new();
                    let mut entries = Vec::new();
                    for mut m in machines(&names, &extra) {
                        m.remove("address");
                        let service = m["service"].as_str().unwrap_or_default().to_string();
                        let index = names.iter().position(|n| *n == service).unwrap_or(0);
                        if let Some(b) = &behaviours[index] {
                            let name = format!("b-{service}");
                            m.insert("behaviour".into(), Value::from(name.clone()));
                            listed.insert(name, b.clone());
                        }
                        entries.push(Value::Table(m));
                    }
                    t.insert("machines".into(), Value::Array(entries));
                    if !listed.is_empty() {
                        t.insert("behaviours".into(), Value::Table(listed));
                    }
                    let meta = [
                        ("name", Value::from("prop")),
                        ("entry", Value::from(names[0])),
                        ("timeout_s", Value::Float(30.0)),
                    ];
                    t.insert(
                        "scenario".into(),
                        Value::Table(meta.into_iter().map(|(k, v)| (k.into(), v)).collect()),
                    );
                    let load = [
                        ("rate", Value::Float(rate)),
                        ("duration_s", Value::Float(duration)),
                    ];
                    t.insert(
                        "load".into(),
                        Value::Table(load.into_iter().map(|(k, v)| (k.into(), v)).collect()),
                    );
                    let released: Table = [(names[0].to_string(), Value::from("v2"))]
                        .into_iter()
                        .collect();
                    let release = [
                        ("at_s", Value::Float(at)),
                        ("services", Value::Table(released)),
                    ];
                    t.insert(
                        "release".into(),
                        Value::Table(release.into_iter().map(|(k, v)| (k.into(), v)).collect()),
                    );
                    let expect: Table = [(names[0].to_string(), Value::from("promoted"))]
                        .into_iter()
                        .collect();
                    t.insert("expect".into(), Value::Table(expect));
                    t
                },
            )
    })
}

/// What a scenario says, without the text it was read from.
fn essence(s: &Scenario) -> String {
    format!(
        "{:?}",
        (
            (&s.name, &s.description, &s.entry, s.timeout),
            (
                s.max_active_errors,
                s.max_dropped_sessions,
                &s.machines,
                &s.load
            ),
            &s.releases,
            (&s.ops, &s.cluster),
        )
    )
}

fn read(text: &str) -> Result<Scenario, ConfigError> {
    parse("s.toml", text)
}

proptest! {
    #![proptest_config(kit::config(CASES))]

    #[test]
    fn a_scenario_reads_alike_in_every_form(t in scenario(), style in kit::style()) {
        let plain = kit::render(&t, kit::Style::plain(kit::Tables::Headers));
        let expected = read(&plain.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", plain.text)))?;
        let rendered = kit::render(&t, style);
        let got = read(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(essence(&got), essence(&expected), "{}", rendered.text);
    }

    #[test]
    fn a_broken_scenario_is_refused_by_name(
        (t, what) in scenario().prop_flat_map(|t| {
            let fields = field_tables(&t);
            (Just(t.clone()), kit::breaks(&t, fields))
        }),
        style in kit::style(),
    ) {
        kit::check_break(t, &what, style, read, &NAMING)?;
    }

    #[test]
    fn garbled_scenarios_never_panic(
        text in (scenario(), kit::style())
            .prop_map(|(t, style)| kit::render(&t, style).text)
            .prop_flat_map(kit::garble),
    ) {
        let _ = read(&text);
    }
}

#[test]
fn a_behaviour_delay_reads_alike_as_a_section_or_inline() {
    const HEAD: &str = "[scenario]\nname = \"t\"\nentry = \"a\"\n[services.a]\n\
        [[machines]]\nid = \"a-1\"\nservice = \"a\"\nversion = \"v1\"\nconfig = \"active\"\nbehaviour = \"router\"\n\
        [[machines]]\nid = \"a-2\"\nservice = \"a\"\nversion = \"v2\"\nconfig = \"simulation\"\n\
        [load]\nrate = 1\nduration_s = 1\n[release]\nservices = { a = \"v2\" }\n[expect]\na = \"promoted\"\n";
    let inline = read(&format!(
        "{HEAD}[behaviours.router]\nlatency = {{ kind = \"lognormal\", median_ms = 2, sigma = 0.3 }}\n"
    ))
    .unwrap();
    let section = read(&format!(
        "{HEAD}[behaviours.router.latency]\nkind = \"lognormal\"\nmedian_ms = 2.0\nsigma = 0.3\n"
    ))
    .unwrap();
    assert_eq!(essence(&inline), essence(&section));
    let wrong = read(&format!(
        "{HEAD}[behaviours.router.latency]\nkind = \"constant\"\nms = \"x\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        wrong.starts_with("s.toml:25: field `behaviours.router.latency.ms`: invalid type"),
        "{wrong}"
    );
}
