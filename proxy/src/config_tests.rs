//! Properties of the process config parser: every equivalent TOML form of a config reads as the
//! same config; a config broken in one place (a value of another type, an unknown key, a key
//! removed) is refused with an error naming the key; any text, however garbled, is refused or
//! read, never a panic; and validation names the field of a value out of range.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use toml::{Table, Value};
use understudy_testkit::{self as kit, KeyPath};
use understudy_wire::{BalancerConfig, MachineEntry, PoolRole};

use super::*;

const CASES: u32 = 128;

fn address() -> impl Strategy<Value = SocketAddr> {
    (1u16..=65535).prop_map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
}

fn machines() -> impl Strategy<Value = Vec<MachineEntry>> {
    let machine = (
        prop::sample::select(vec!["v1", "v2", "v1.2.3"]),
        address(),
        WEIGHT_RANGE,
        prop::sample::select(vec![PoolRole::Active, PoolRole::Simulation]),
        prop::option::of(prop::sample::select(vec![
            "/healthz",
            "/status?deep=1",
            "/",
        ])),
    );
    proptest::collection::vec(machine, 1..4).prop_map(|list| {
        list.into_iter()
            .enumerate()
            .map(
                |(i, (version, address, weight, role, health))| MachineEntry {
                    id: format!("m-{i}"),
                    version: version.into(),
                    address: address.to_string(),
                    weight,
                    // The first machine is active: a config needs one.
                    config: if i == 0 { PoolRole::Active } else { role },
                    health_path: health.map(String::from),
                },
            )
            .collect()
    })
}

fn balancer(index: usize) -> impl Strategy<Value = BalancerSpec> {
    let fraction = (0u32..=8).prop_map(|k| f64::from(k) / 8.0);
    (
        proptest::option::of(address()),
        (1u64..1 << 40, fraction, any::<bool>(), 0u64..100_000),
        machines(),
    )
        .prop_map(
            move |(internal, (version, fraction, compare, drain), machines)| BalancerSpec {
                listen: "127.0.0.1:0".parse().expect("an address"),
                internal_listen: internal,
                epoch_file: None,
                config: BalancerConfig {
                    service: format!("service-{index}"),
                    version,
                    epoch: 0,
                    mirror_fraction: fraction,
                    compare_body: compare,
                    compare: None,
                    compare_headers: Vec::new(),
                    drain_timeout_ms: drain,
                    machines,
                },
            },
        )
}

fn trust() -> impl Strategy<Value = TrustSpec> {
    let net = (any::<[u8; 4]>(), 8u8..=32).prop_map(|(ip, len)| {
        IpNet::new(std::net::Ipv4Addr::from(ip).into(), len)
            .expect("a prefix length of at most 32")
            .trunc()
    });
    (proptest::collection::vec(net, 0..3), 1u64..=86_400_000).prop_map(|(internal_sources, age)| {
        TrustSpec {
            internal_sources,
            marker_max_age_ms: age,
        }
    })
}

fn limits() -> impl Strategy<Value = LimitsSpec> {
    let ms = || 1u64..=86_400_000;
    (
        (ms(), ms(), ms(), ms(), ms()),
        (ms(), ms(), ms(), 1usize..1_000_000, 1usize..65_536),
        (ms(), ms(), 1usize..=100),
    )
        .prop_map(
            |((a, b, c, d, e), (f, g, h, sessions, id), (i, j, fall))| LimitsSpec {
                head_timeout_ms: a,
                caller_idle_ms: b,
                caller_body_idle_ms: c,
                caller_write_timeout_ms: d,
                machine_connect_timeout_ms: e,
                machine_write_timeout_ms: f,
                machine_answer_timeout_ms: g,
                machine_keepalive_ms: h,
                max_sessions: sessions,
                max_session_id_bytes: id,
                health_interval_ms: i,
                health_timeout_ms: j,
                health_fall: fall,
            },
        )
}

fn process() -> impl Strategy<Value = ProcessConfig> {
    let balancers = (1usize..=3).prop_flat_map(|n| (0..n).map(balancer).collect::<Vec<_>>());
    (trust(), limits(), balancers).prop_map(|(trust, limits, balancers)| ProcessConfig {
        admin: "127.0.0.1:0".parse().expect("an address"),
        trust,
        limits,
        balancers,
    })
}

fn table_of(config: &ProcessConfig) -> Table {
    match Value::try_from(config).expect("a config serializes to TOML") {
        Value::Table(t) => t,
        other => panic!("not a table: {other:?}"),
    }
}

/// toml's messages name a key in backquotes or on the line they quote; validation names the
/// field path.
const NAMING: kit::Naming<ConfigError> = kit::Naming {
    names: |error, key| kit::mentions(&error.to_string(), key),
    line: |error| {
        let text = error.to_string();
        let rest = text.split("line ").nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    },
};

proptest! {
    #![proptest_config(kit::config(CASES))]

    #[test]
    fn a_config_reads_alike_in_every_form(config in process(), style in kit::style()) {
        let rendered = kit::render(&table_of(&config), style);
        let read = ProcessConfig::from_toml_str(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(&read, &config, "{}", rendered.text);
        prop_assert!(read.validate().is_ok());
    }

    #[test]
    fn a_broken_config_is_refused_by_name(
        (table, what) in process().prop_flat_map(|c| {
            let table = table_of(&c);
            // Every table's keys are fields (services are in a list, not keys).
            let tables: Vec<KeyPath> = kit::tables(&table);
            (Just(table.clone()), kit::breaks(&table, tables))
        }),
        style in kit::style(),
    ) {
        kit::check_break(table, &what, style, ProcessConfig::from_toml_str, &NAMING)?;
    }

    #[test]
    fn garbled_text_is_refused_or_read_never_a_panic(
        text in process().prop_flat_map(|c| kit::garble(kit::render(&table_of(&c), kit::Style::plain(kit::Tables::Headers)).text)),
    ) {
        if let Ok(config) = ProcessConfig::from_toml_str(&text) {
            let _ = config.validate();
        }
    }

    #[test]
    fn a_limit_out_of_range_is_refused_by_its_field(
        config in process(),
        pick in 0usize..10,
        bad in prop::sample::select(vec![0u64, 86_400_001]),
    ) {
        let mut table = table_of(&config);
        let limits = kit::leaves(&table)
            .into_iter()
            .filter(|p| kit::path_string(p).starts_with("limits."))
            .collect::<Vec<_>>();
        let path = limits[pick % limits.len()].clone();
        let key = kit::last_key(&path).to_string();
        // A cap of a day in milliseconds is fine for a count: only 0 is out of range there.
        let bad = if key.starts_with("max_") { 0 } else { bad };
        kit::set(&mut table, &path, Value::Integer(bad as i64));
        let text = kit::render(&table, kit::Style::plain(kit::Tables::Headers)).text;
        let error = ProcessConfig::from_toml_str(&text)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .validate()
            .expect_err("out of range");
        prop_assert_eq!(
            error.clone(),
            ConfigError::Invalid {
                field: format!("limits.{key}"),
                problem: match &error { ConfigError::Invalid { problem, .. } => problem.clone(), _ => String::new() },
            }
        );
    }
}

#[test]
fn a_network_that_is_not_one_is_named() {
    let text =
        "admin = \"127.0.0.1:0\"\nbalancers = []\n[trust]\ninternal_sources = [\"10.0.0.0/33\"]\n";
    let error = ProcessConfig::from_toml_str(text).unwrap_err().to_string();
    assert!(kit::mentions(&error, "internal_sources"), "{error}");
}
