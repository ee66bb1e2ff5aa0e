//! Property tests of the cluster file parser (with the tables it takes from the hub, the monitor,
//! predictions and the judge): every equivalent TOML form of a cluster reads as the same cluster,
//! and one broken in any one place is refused naming the field and its line, never panicking.

use proptest::prelude::*;
use toml::{Table, Value};
use understudy_testkit::{self as kit, KeyPath, Seg};

use super::{parse, ConfigError};
use crate::testing::SAMPLE;

const CASES: u32 = 96;
const SERVICES: [&str; 4] = ["edge", "router", "media", "db"];

fn table(entries: Vec<(&str, Value)>) -> Table {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(*s)).collect())
}

/// Some of `entries`, as drawn by `keep` (one bit each).
fn some_of(entries: Vec<(&str, Value)>, keep: u32) -> Table {
    let kept = entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep & (1 << i) != 0)
        .map(|(_, e)| e)
        .collect();
    table(kept)
}

pub(crate) fn condition() -> impl Strategy<Value = Table> {
    let latency = proptest::collection::btree_map(1u32..999, 1.0..2.0, 1..3).prop_map(|m| {
        let limits = m.into_iter().map(|(q, r)| {
            Value::Table(table(vec![
                ("quantile", Value::Float(f64::from(q) / 1000.0)),
                ("max_ratio", Value::Float(r)),
            ]))
        });
        Value::Array(limits.collect())
    });
    (0i64..1_000, 1i64..1_000, latency, 1.0..2.0, any::<u32>()).prop_map(
        |(warmup, min, latency, paired, keep)| {
            some_of(
                vec![
                    ("warmup_jobs", Value::Integer(warmup)),
                    ("min_jobs", Value::Integer(min)),
                    ("latency", latency),
                    ("max_paired_ratio", Value::Float(paired)),
                    ("baseline", Value::from("active")),
                ],
                keep,
            )
        },
    )
}

/// What a service copies while judged: a fixed `mirror_fraction` or a `mirror_budget` (never
/// both: that is refused).
fn mirror() -> impl Strategy<Value = (&'static str, Value)> {
    let budget =
        (1.0..1e6, 0.01..=1.0, 0.01..=1.0, any::<u32>()).prop_map(|(cps, max, share, keep)| {
            let mut t = some_of(
                vec![
                    ("max_fraction", Value::Float(max)),
                    ("watch_fraction", Value::Float(max * share)),
                ],
                keep,
            );
            t.insert("copies_per_second".into(), Value::Float(cps));
            ("mirror_budget", Value::Table(t))
        });
    prop_oneof![
        (0.01..=1.0).prop_map(|f| ("mirror_fraction", Value::Float(f))),
        budget,
    ]
}

/// How a service compares answers: `compare`, or its older form `compare_body`.
fn compare() -> impl Strategy<Value = (&'static str, Value)> {
    prop_oneof![
        any::<bool>().prop_map(|b| ("compare_body", Value::Boolean(b))),
        prop::sample::select(vec!["status", "body", "fields"])
            .prop_map(|m| ("compare", Value::from(m))),
    ]
}

/// A service's own keys (`depends_on` is added by [`cluster`]).
fn service() -> impl Strategy<Value = Table> {
    let steps = proptest::collection::btree_set(1i64..99, 1..3)
        .prop_map(|s| Value::Array(s.into_iter().map(Value::Integer).collect()));
    (
        (any::<bool>(), steps, 1i64..10_000, 1i64..100_000),
        (mirror(), compare(), 1i64..100_000),
        condition(),
        (any::<u32>(), 1i64..=2, 1_000i64..=86_400_000),
    )
        .prop_map(
            |(
                (approval, steps, step_ms, sim_ms),
                (mirror, compare, drain),
                cond,
                (keep, approvers, ttl),
            )| {
                some_of(
                    vec![
                        ("requires_approval", Value::Boolean(approval)),
                        ("approvers", Value::Integer(approvers)),
                        ("approval_ttl_ms", Value::Integer(ttl)),
                        ("join_steps", steps),
                        ("join_step_ms", Value::Integer(step_ms)),
                        ("simulation_timeout_ms", Value::Integer(sim_ms)),
                        mirror,
                        compare,
                        ("compare_headers", strings(&["etag", "x-version"])),
                        ("drain_timeout_ms", Value::Integer(drain)),
                        ("condition", Value::Table(cond)),
                        ("balancer", Value::from("http://127.0.0.1:9001")),
                        ("config_delivery", Value::from("http")),
                    ],
                    keep,
                )
            },
        )
}

fn hub() -> impl Strategy<Value = Table> {
    (
        prop_oneof![Just(None), Just(Some("nats://127.0.0.1:4222"))],
        (256i64..1 << 20, 1i64..10_000, any::<bool>(), 0i64..100_000),
        (1i64..100_000, 1i64..100_000),
        any::<u32>(),
    )
        .prop_map(|(nats, numbers, (skew, history), keep)| {
            let mut t = some_of(
                vec![
                    ("max_message_bytes", Value::Integer(numbers.0)),
                    ("subscriber_queue", Value::Integer(numbers.1)),
                    ("subscriber_auth", Value::Boolean(numbers.2)),
                    ("rotation_grace_ms", Value::Integer(numbers.3)),
                    ("public_url", Value::from("http://127.0.0.1:7070")),
                    ("max_clock_skew_ms", Value::Integer(skew)),
                    ("history_per_machine", Value::Integer(history)),
                ],
                keep,
            );
            if let Some(url) = nats {
                t.insert("backend".into(), Value::from("nats"));
                t.insert("nats_url".into(), Value::from(url));
            }
            t
        })
}

fn monitor(services: Vec<&'static str>) -> impl Strategy<Value = Table> {
    let most = services.len().min(2);
    let per_service = proptest::sample::subsequence(services, 0..=most).prop_flat_map(|names| {
        proptest::collection::vec(1i64..5, names.len()).prop_map(move |counts| {
            let t = names
                .iter()
                .zip(counts)
                .map(|(n, c)| (n.to_string(), Value::Integer(c)));
            Value::Table(t.collect())
        })
    });
    (1i64..600, any::<bool>(), 1i64..5, per_service).prop_map(|(drain, update, min, per)| {
        let rule = |when: &str, then: &[&str]| {
            Value::Table(table(vec![
                ("when", Value::from(when)),
                ("then", strings(then)),
            ]))
        };
        let drift: &[&str] = if update {
            &["report_drift", "update_version"]
        } else {
            &["report_drift"]
        };
        let scaling = table(vec![
            ("min_running_active", Value::Integer(min)),
            ("per_service", per),
        ]);
        table(vec![
            ("drain_timeout_secs", Value::Integer(drain)),
            (
                "rule",
                Value::Array(vec![
                    rule(
                        "active_machine_down",
                        &["remove_from_balancer", "request_replacement"],
                    ),
                    rule("version_drift", drift),
                ]),
            ),
            ("scaling", Value::Table(scaling)),
        ])
    })
}

fn predict() -> impl Strategy<Value = Table> {
    (
        any::<bool>(),
        1i64..1_000,
        0.01..=1.0,
        1.0..600.0,
        any::<u32>(),
    )
        .prop_map(|(rollback, recent, threshold, limit, keep)| {
            let alerts = table(vec![("threshold", Value::Float(threshold))]);
            let dwell = table(vec![(
                "limits",
                Value::Table(table(vec![("media", Value::Float(limit))])),
            )]);
            some_of(
                vec![
                    ("rollback", Value::Boolean(rollback)),
                    ("recent_alerts", Value::Integer(recent)),
                    ("alerts", Value::Table(alerts)),
                    ("dwell", Value::Table(dwell)),
                    ("half_life_secs", Value::Float(limit)),
                ],
                keep,
            )
        })
}

/// The tables a cluster file and a scenario file share: services (a chain of dependencies in
/// [`SERVICES`] order, so never a cycle), controller, defaults, hub, monitor, predict.
pub(crate) fn shared_tables() -> impl Strategy<Value = (Table, Vec<&'static str>)> {
    proptest::sample::subsequence(SERVICES.to_vec(), 1..=4)
        .prop_flat_map(|names| {
            let n = names.len();
            (
                Just(names.clone()),
                proptest::collection::vec((service(), any::<bool>()), n),
                (1i64..60_000, condition(), 1i64..5_000),
                hub(),
                proptest::option::of(monitor(names)),
                proptest::option::of(predict()),
            )
        })
        .prop_map(
            |(names, services, (tick, cond, step_ms), hub, monitor, predict)| {
                let mut all = Table::new();
                for (i, (name, (mut service, depends))) in names.iter().zip(services).enumerate() {
                    if depends && i + 1 < names.len() {
                        service.insert("depends_on".into(), strings(&[names[i + 1]]));
                    }
                    all.insert(name.to_string(), Value::Table(service));
                }
                let mut t = table(vec![
                    (
                        "controller",
                        Value::Table(table(vec![("tick_ms", Value::Integer(tick))])),
                    ),
                    (
                        "defaults",
                        Value::Table(table(vec![
                            ("condition", Value::Table(cond)),
                            ("join_step_ms", Value::Integer(step_ms)),
                        ])),
                    ),
                    ("services", Value::Table(all)),
                    ("hub", Value::Table(hub)),
                ]);
                if let Some(m) = monitor {
                    t.insert("monitor".into(), Value::Table(m));
                }
                if let Some(p) = predict {
                    t.insert("predict".into(), Value::Table(p));
                }
                (t, names)
            },
        )
}

/// Each service's machines: an active v1, maybe a control and a v2 candidate.
pub(crate) fn machines(names: &[&str], extra: &[(bool, bool, Option<i64>)]) -> Vec<Table> {
    let mut out = Vec::new();
    for (i, (name, (control, candidate, weight))) in names.iter().zip(extra).enumerate() {
        let mut machine = |suffix: &str, version: &str, config: &str| {
            let mut m = table(vec![
                ("id", Value::from(format!("{name}-{suffix}"))),
                ("service", Value::from(*name)),
                ("version", Value::from(version)),
                ("config", Value::from(config)),
            ]);
            if let (Some(w), "active") = (weight, config) {
                m.insert("weight".into(), Value::Integer(*w));
            }
            m.insert(
                "address".into(),
                Value::from(format!("127.0.0.1:{}", 8000 + 10 * i + out.len())),
            );
            out.push(m);
        };
        machine("1", "v1", "active");
        if *control {
            machine("c", "v1", "simulation");
        }
        if *candidate {
            machine("2", "v2", "simulation");
        }
    }
    out
}

pub(crate) fn extras(n: usize) -> impl Strategy<Value = Vec<(bool, bool, Option<i64>)>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1i64..=1000),
        ),
        n,
    )
}

pub(crate) fn cluster() -> impl Strategy<Value = Table> {
    shared_tables().prop_flat_map(|(t, names)| {
        extras(names.len()).prop_map(move |extra| {
            let mut t = t.clone();
            let list = machines(&names, &extra)
                .into_iter()
                .map(Value::Table)
                .collect();
            t.insert("machines".into(), Value::Array(list));
            t
        })
    })
}

/// Tables whose keys are fields, not names (services, per-service counts, dwell limits...).
pub(crate) fn field_tables(t: &Table) -> Vec<KeyPath> {
    let named = [
        "services",
        "per_service",
        "limits",
        "when",
        "behaviours",
        "expect",
        "subgroup",
    ];
    kit::tables(t)
        .into_iter()
        .filter(|p| !matches!(p.last(), Some(Seg::Key(k)) if named.contains(&k.as_str())))
        .collect()
}

/// A config error names a key as a part of its field, or quoted in its reason.
pub(crate) const NAMING: kit::Naming<ConfigError> = kit::Naming {
    names: |error, key| match error {
        ConfigError::Invalid { field, reason, .. } => {
            kit::mentions(field, key)
                || reason.contains(&format!("`{key}`"))
                || kit::mentions(reason, key)
        }
        other => kit::mentions(&other.to_string(), key),
    },
    line: |error| match error {
        ConfigError::Invalid { line, .. } => Some(*line),
        _ => None,
    },
};

fn read(text: &str) -> Result<super::Cluster, ConfigError> {
    parse("c.toml", text)
}

proptest! {
    #![proptest_config(kit::config(CASES))]

    #[test]
    fn a_cluster_reads_alike_in_every_form(t in cluster(), style in kit::style()) {
        let plain = kit::render(&t, kit::Style::plain(kit::Tables::Headers));
        let expected = read(&plain.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", plain.text)))?;
        let rendered = kit::render(&t, style);
        let got = read(&rendered.text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", rendered.text)))?;
        prop_assert_eq!(got, expected, "{}", rendered.text);
    }

    #[test]
    fn a_broken_cluster_is_refused_by_name(
        (t, what) in cluster().prop_flat_map(|t| {
            let fields = field_tables(&t);
            (Just(t.clone()), kit::breaks(&t, fields))
        }),
        style in kit::style(),
    ) {
        kit::check_break(t, &what, style, read, &NAMING)?;
    }

    #[test]
    fn garbled_clusters_never_panic(
        text in (cluster(), kit::style())
            .prop_map(|(t, style)| kit::render(&t, style).text)
            .prop_flat_map(kit::garble),
    ) {
        let _ = read(&text);
    }
}

#[test]
fn a_condition_file_reads_alike_flat_or_wrapped_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let load = crate::offline::judge::load_condition;
    let flat = load(&write(
        "flat.toml",
        "min_jobs = 50\n[[latency]]\nquantile = 0.5\nmax_ratio = 1.1\n",
    ))
    .unwrap();
    let wrapped = load(&write(
        "wrapped.toml",
        "condition.min_jobs = 50\ncondition.latency = [{ quantile = 0.5, max_ratio = 1.1 }]\n",
    ))
    .unwrap();
    assert_eq!(flat, wrapped);
    let err = load(&write(
        "bad.toml",
        "[condition]\nlatency = [{ quantile = \"x\", max_ratio = 1 }]\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("field `condition.latency[0].quantile`: line 2"),
        "{err}"
    );
}

#[test]
fn a_balancer_url_with_a_trailing_slash_reads_as_without() {
    let text = SAMPLE.replace(
        "[services.db]\nbalancer = \"http://127.0.0.1:9001\"",
        "[services.db]\nbalancer = \"http://127.0.0.1:9001/\"",
    );
    assert_ne!(text, SAMPLE);
    let cluster = parse("sample.toml", &text).expect("valid");
    assert_eq!(
        cluster.services["db"].balancer.as_deref(),
        Some("http://127.0.0.1:9001")
    );
}

#[test]
fn approvals_and_operators_are_checked_by_name() {
    for (from, to, expected) in [
        (
            "requires_approval = true",
            "requires_approval = true\napprovers = 3",
            "services.router.approvers",
        ),
        (
            "requires_approval = true",
            "requires_approval = true\napproval_ttl_ms = 10",
            "services.router.approval_ttl_ms",
        ),
        (
            "[controller]",
            "[controller]\noperators_file = \"missing.toml\"",
            "controller.operators_file",
        ),
    ] {
        let text = SAMPLE.replacen(from, to, 1);
        assert_ne!(text, SAMPLE);
        let err = parse("sample.toml", &text).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let entry = crate::config::operators::file_entry("alice", "tok");
    std::fs::write(dir.path().join("ops.toml"), &entry).unwrap();
    let text = SAMPLE.replacen(
        "[controller]",
        "[controller]\noperators_file = \"ops.toml\"",
        1,
    );
    let cluster = parse(dir.path().join("c.toml").to_str().unwrap(), &text).expect("valid");
    assert_eq!(cluster.controller.operators.identify("tok"), Some("alice"));
    let router = &cluster.services["router"].policy;
    assert_eq!(
        (router.approvers, router.approval_ttl),
        (1, super::DEFAULT_APPROVAL_TTL)
    );
    std::fs::write(dir.path().join("ops.toml"), entry.replace("alice", "ops")).unwrap();
    let err = parse(dir.path().join("c.toml").to_str().unwrap(), &text).unwrap_err();
    assert!(err.to_string().contains("operator[0].name `ops`"), "{err}");
}

#[test]
fn one_address_declared_as_two_machines_is_refused_naming_both() {
    let text = SAMPLE.replace(
        "address = \"127.0.0.1:8022\"",
        "address = \"127.0.0.1:8021\"",
    );
    assert_ne!(text, SAMPLE);
    let err = parse("sample.toml", &text).unwrap_err().to_string();
    assert!(err.contains("field `machines["), "{err}");
    assert!(
        err.contains("127.0.0.1:8021") && err.contains("`media-1`"),
        "{err}"
    );
}

#[test]
fn a_health_path_reaches_the_balancer_config_and_a_bad_one_is_refused_by_line() {
    let with = |path: &str| {
        SAMPLE.replace(
            "address = \"127.0.0.1:8022\"",
            &format!("address = \"127.0.0.1:8022\"\nhealth_path = \"{path}\""),
        )
    };
    let cluster = parse("sample.toml", &with("/healthz?deep=1")).expect("valid");
    let probed: Vec<_> = cluster
        .machines
        .iter()
        .filter_map(|m| Some((m.address.as_str(), m.health_path.as_deref()?)))
        .collect();
    assert_eq!(probed, [("127.0.0.1:8022", "/healthz?deep=1")]);
    for (path, problem) in [
        ("healthz", "does not start with '/'"),
        ("/a b", "holds ' '"),
        ("/x#y", "holds '#'"),
    ] {
        let err = parse("sample.toml", &with(path)).unwrap_err().to_string();
        assert!(
            err.contains("sample.toml:") && err.contains(".health_path`") && err.contains(problem),
            "{path:?}: {err}"
        );
    }
}

#[test]
fn a_mirror_budget_reads_alike_inline_or_as_a_table_and_is_checked_by_name() {
    let with = |router: &str| {
        let text = SAMPLE.replacen(
            "requires_approval = true\n",
            &format!("requires_approval = true\n{router}\n"),
            1,
        );
        assert_ne!(text, SAMPLE);
        parse("sample.toml", &text)
    };
    let inline = with("mirror_budget = { copies_per_second = 200.0, max_fraction = 0.5 }").unwrap();
    let table = SAMPLE.replacen(
        "[services.media]",
        "[services.router.mirror_budget]\ncopies_per_second = 200.0\nmax_fraction = 0.5\n\n[services.media]",
        1,
    );
    assert_eq!(parse("sample.toml", &table).unwrap(), inline);
    let router = &inline.services["router"];
    assert_eq!(
        router.mirror_budget,
        Some(super::MirrorBudget {
            copies_per_second: 200.0,
            max_fraction: 0.5,
            watch_fraction: super::DEFAULT_WATCH_FRACTION,
        })
    );
    assert_eq!(router.mirror_fraction, 0.5, "the most it copies");
    assert_eq!(inline.services["media"].mirror_budget, None);

    for (router, field, problem) in [
        (
            "mirror_fraction = 0.5\nmirror_budget = { copies_per_second = 1.0 }",
            "services.router.mirror_budget",
            "`mirror_fraction` or `mirror_budget`",
        ),
        (
            "mirror_budget = { copies_per_second = 0.0 }",
            "services.router.mirror_budget.copies_per_second",
            "within",
        ),
        (
            "mirror_budget = { copies_per_second = nan }",
            "services.router.mirror_budget.copies_per_second",
            "within",
        ),
        (
            "mirror_budget = { copies_per_second = 1.0, max_fraction = 1.5 }",
            "services.router.mirror_budget.max_fraction",
            "within",
        ),
        (
            "mirror_budget = { copies_per_second = 1.0, max_fraction = 0.1, watch_fraction = 0.2 }",
            "services.router.mirror_budget.watch_fraction",
            "within 0.0001..=0.1",
        ),
        (
            "mirror_budget = { copies_per_second = 1.0, watch_fraction = 0.0 }",
            "services.router.mirror_budget.watch_fraction",
            "within",
        ),
        (
            "mirror_budget = { max_fraction = 0.5 }",
            "services.router.mirror_budget.copies_per_second",
            "missing field",
        ),
        (
            "mirror_budget = { copies_per_second = 1.0, copies = 2 }",
            "services.router.mirror_budget",
            "unknown field `copies`",
        ),
    ] {
        let err = with(router).unwrap_err().to_string();
        assert!(
            err.contains(field) && err.contains(problem),
            "{router}: {err}"
        );
        assert!(err.contains("sample.toml:"), "{err}");
    }
}

#[test]
fn a_default_mirror_budget_applies_unless_the_service_says_otherwise() {
    let text = SAMPLE
        .replacen(
            "[defaults]\n",
            "[defaults]\nmirror_budget = { copies_per_second = 50.0, watch_fraction = 0.1 }\n",
            1,
        )
        .replacen(
            "join_steps = [10, 50]\n",
            "join_steps = [10, 50]\nmirror_fraction = 0.3\n",
            1,
        );
    let cluster = parse("sample.toml", &text).unwrap();
    let budget = cluster.services["router"]
        .mirror_budget
        .expect("the default budget");
    assert_eq!(
        (budget.copies_per_second, budget.watch_fraction),
        (50.0, 0.1)
    );
    let media = &cluster.services["media"];
    assert_eq!((media.mirror_budget, media.mirror_fraction), (None, 0.3));
    let both = text.replacen("[defaults]\n", "[defaults]\nmirror_fraction = 0.2\n", 1);
    let err = parse("sample.toml", &both).unwrap_err().to_string();
    assert!(
        err.contains("defaults.mirror_budget") && err.contains("not both"),
        "{err}"
    );
}

#[test]
fn compare_reads_alike_in_either_form_and_a_disagreement_names_both() {
    use understudy_wire::CompareMode;
    let with = |media: &str, defaults: &str| {
        SAMPLE
            .replacen("[defaults]\n", &format!("[defaults]\n{defaults}\n"), 1)
            .replacen(
                "join_steps = [10, 50]\n",
                &format!("join_steps = [10, 50]\n{media}\n"),
                1,
            )
    };
    let mode = |media: &str, defaults: &str| {
        let cluster = parse("sample.toml", &with(media, defaults)).expect("valid");
        let m = &cluster.services["media"];
        (m.compare, m.compare_headers.clone())
    };
    let status = (CompareMode::Status, Vec::<String>::new());
    assert_eq!(mode("", ""), status);
    let body = (CompareMode::Body, Vec::new());
    assert_eq!(mode("compare_body = true", ""), body);
    assert_eq!(mode("compare = \"body\"", ""), body);
    assert_eq!(mode("compare = \"body\"\ncompare_body = true", ""), body);
    assert_eq!(mode("compare_body = false", ""), status);
    // A service's own setting wins over the defaults'; the headers come lower-cased.
    assert_eq!(
        mode("", "compare = \"fields\"\ncompare_headers = [\"ETag\"]"),
        (CompareMode::Fields, vec!["etag".to_string()])
    );
    assert_eq!(
        mode("compare_body = true", "compare = \"fields\""),
        (CompareMode::Body, Vec::new())
    );
    let other = parse("sample.toml", &with("", "compare = \"fields\"")).unwrap();
    assert_eq!(other.services["router"].compare, CompareMode::Fields);
    // The balancer is told the same, in the form every balancer reads.
    assert_eq!(CompareMode::Body.wire_form(), (true, None));
    assert_eq!(
        CompareMode::Fields.wire_form(),
        (false, Some(CompareMode::Fields))
    );
    for (media, problem) in [
        (
            "compare = \"fields\"\ncompare_body = true",
            "compare_body = true means compare = \"body\", but compare = \"fields\"",
        ),
        ("compare = \"digest\"", "unknown variant"),
        ("compare_headers = [\"e tag\"]", "is not a header name"),
        ("compare_headers = [\"etag\", \"ETag\"]", "named twice"),
    ] {
        let err = parse("sample.toml", &with(media, ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sample.toml:") && err.contains(problem),
            "{media}: {err}"
        );
    }
    let many: Vec<String> = (0..17).map(|i| format!("\"h{i}\"")).collect();
    let err = parse(
        "sample.toml",
        &with(&format!("compare_headers = [{}]", many.join(", ")), ""),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("services.media.compare_headers") && err.contains("more than the 16"),
        "{err}"
    );
}
