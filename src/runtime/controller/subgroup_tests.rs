//! Sub-group releases end to end on the controller: the selection a release makes, bad
//! sub-groups named, the CLI's flags and a scenario's tables read alike, and a release that moves
//! only its machines.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;
use understudy_wire::PoolRole;

use std::collections::{BTreeMap, BTreeSet};

use understudy_hub::SubgroupSpec;

use crate::config::cluster::parse;
use crate::core::plan::*;
use crate::runtime::balancer::FakeBalancer;
use crate::runtime::controller::{Core, ReleaseRequest, RequestError};
use crate::store::Store;
use crate::testing::identical_pairs;

/// Four v1 machines serving, a v1 control, three v2 machines waiting.
const FLEET: &str = r#"
[controller]
tick_ms = 100
[defaults]
join_step_ms = 200
[services.media]
balancer = "http://127.0.0.1:9001"
[services.db]
balancer = "http://127.0.0.1:9002"
[[machines]]
id = "db-1"
service = "db"
version = "v1"
address = "127.0.0.1:8100"
config = "active"
[[machines]]
id = "db-2"
service = "db"
version = "v2"
address = "127.0.0.1:8101"
config = "simulation"
"#;

fn fleet() -> String {
    let mut text = FLEET.to_string();
    let mut add = |id: &str, version: &str, config: &str, port: u16| {
        text.push_str(&format!(
            "[[machines]]\nid = \"{id}\"\nservice = \"media\"\nversion = \"{version}\"\naddress = \"127.0.0.1:{port}\"\nconfig = \"{config}\"\n"
        ));
    };
    for i in 1..=4 {
        add(&format!("media-{i}"), "v1", "active", 8000 + i);
    }
    add("media-c", "v1", "simulation", 8010);
    for (i, s) in ["a", "b", "c"].iter().enumerate() {
        add(&format!("media-v2{s}"), "v2", "simulation", 8020 + i as u16);
    }
    text
}

fn spec(json: serde_json::Value) -> SubgroupSpec {
    serde_json::from_value(json).expect("spec")
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_sub_group_replaces_that_many_active_machines() {
    let cluster = parse("fleet.toml", &fleet()).unwrap();
    let roles = declared_roles(&cluster);
    let whole = Selection::choose(&cluster, &roles, "media", "v2", None).unwrap();
    assert!(whole.is_whole_service());
    assert_eq!(
        whole.replaced,
        ids(&["media-1", "media-2", "media-3", "media-4"])
    );
    assert_eq!(whole.joining, ids(&["media-v2a", "media-v2b", "media-v2c"]));
    assert_eq!(describe_moves(&whole), "all");

    let half = spec(serde_json::json!({"percent": 50}));
    let s = Selection::choose(&cluster, &roles, "media", "v2", Some(&half)).unwrap();
    assert_eq!(s.replaced, ids(&["media-1", "media-2"]));
    assert_eq!(s.joining, ids(&["media-v2a", "media-v2b"]));
    assert_eq!(describe_moves(&s), "media-1,media-2 -> media-v2a,media-v2b");

    let named = spec(serde_json::json!({"machines": ["media-4"]}));
    let s = Selection::choose(&cluster, &roles, "media", "v2", Some(&named)).unwrap();
    assert_eq!(s.replaced, ids(&["media-4"]));
    assert_eq!(s.joining, ids(&["media-v2a"]));

    let by_version = spec(serde_json::json!({"version": "v1"}));
    let larger = spec(serde_json::json!({"larger_of": {"percent": 25, "count": 2}}));
    let smaller = spec(serde_json::json!({"smaller_of": {"percent": 75, "count": 2}}));
    for (s, n) in [(&larger, 2), (&smaller, 2)] {
        let chosen = Selection::choose(&cluster, &roles, "media", "v2", Some(s)).unwrap();
        assert_eq!(chosen.replaced.len(), n);
        assert_eq!(chosen.joining.len(), n);
    }
    // Four v1 machines to replace, three v2 machines to take their place.
    let e = Selection::choose(&cluster, &roles, "media", "v2", Some(&by_version)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("subgroup.media: selects 4 active machine(s)"),
        "{e}"
    );
}

#[test]
fn bad_sub_groups_name_the_field() {
    let cluster = parse("fleet.toml", &fleet()).unwrap();
    let roles = declared_roles(&cluster);
    let error = |json: serde_json::Value| {
        Selection::choose(&cluster, &roles, "media", "v2", Some(&spec(json)))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        error(serde_json::json!({"count": 0})),
        "subgroup.media.count: must be at least 1"
    );
    assert!(error(serde_json::json!({"percent": 101})).starts_with("subgroup.media.percent"));
    assert!(error(serde_json::json!({"count": 1, "percent": 5}))
        .starts_with("subgroup.media: give exactly one"));
    assert!(error(serde_json::json!({"count": 9})).starts_with("subgroup.media.count"));
    let e = error(serde_json::json!({"machines": ["media-v2a"]}));
    assert!(
        e.starts_with("subgroup.media.machines: `media-v2a` is not an active machine")
            && e.contains("media-1, media-2, media-3, media-4"),
        "{e}"
    );
    assert!(error(serde_json::json!({"version": "v9"}))
        .starts_with("subgroup.media: selects no machine"));
    assert!(
        error(serde_json::json!({"larger_of": {"percent": 0, "count": 1}}))
            .starts_with("subgroup.media.larger_of.percent")
    );
}

#[test]
fn cli_sub_group_flags() {
    let parsed = crate::cli::parse_subgroups(&[
        "media:percent=25".into(),
        "db:larger_of=33%,20".into(),
        "edge:machines=edge-1,edge-4".into(),
    ])
    .unwrap();
    assert_eq!(parsed["media"], spec(serde_json::json!({"percent": 25})));
    assert_eq!(
        parsed["db"],
        spec(serde_json::json!({"larger_of": {"percent": 33, "count": 20}}))
    );
    assert_eq!(
        parsed["edge"],
        spec(serde_json::json!({"machines": ["edge-1", "edge-4"]}))
    );
    for bad in [
        "media",
        "media:percent",
        "media:share=3",
        "media:count=x",
        "media:count=0",
        "media:larger_of=33",
    ] {
        assert!(crate::cli::parse_subgroups(&[bad.into()]).is_err(), "{bad}");
    }
    let twice = crate::cli::parse_subgroups(&["a:count=1".into(), "a:count=2".into()]);
    assert!(twice.unwrap_err().contains("named twice"));
}

#[test]
fn scenario_sub_groups_are_checked_when_the_file_is_read() {
    let text = include_str!("../../../scenarios/subgroup.toml");
    let scenario = crate::scenario::spec::parse("subgroup.toml", text).unwrap();
    assert_eq!(
        scenario.releases[0].subgroups["media"],
        spec(serde_json::json!({"larger_of": {"percent": 33, "count": 2}}))
    );
    let line = text
        .lines()
        .position(|l| l.starts_with("larger_of"))
        .unwrap();
    let error = |replacement: &str| {
        let bad = text.replace("larger_of = { percent = 33, count = 2 }", replacement);
        crate::scenario::spec::parse("subgroup.toml", &bad)
            .unwrap_err()
            .to_string()
    };
    // Three v1 machines asked for, two v2 machines to take their place.
    let e = error("count = 3");
    assert!(
        e.contains("field `release.subgroup.media`") && e.contains("only 2 machine(s)"),
        "{e}"
    );
    let e = error("counts = 3");
    assert!(
        e.contains(&format!("subgroup.toml:{}", line + 1)) && e.contains("counts"),
        "{e}"
    );
}

fn places(fake: &FakeBalancer) -> Vec<(String, PoolRole)> {
    fake.config("media")
        .expect("pushed")
        .machines
        .iter()
        .map(|m| (m.id.clone(), m.config))
        .collect()
}

fn place(list: &[(&str, PoolRole)]) -> Vec<(String, PoolRole)> {
    list.iter().map(|(id, p)| (id.to_string(), *p)).collect()
}

fn release(subgroup: Option<serde_json::Value>, dry_run: bool) -> ReleaseRequest {
    ReleaseRequest {
        services: BTreeMap::from([("media".to_string(), "v2".to_string())]),
        rollback_on_failure: false,
        dry_run,
        subgroup: subgroup
            .map(|s| BTreeMap::from([("media".to_string(), spec(s))]))
            .unwrap_or_default(),
    }
}

async fn run_to_the_end(core: &Core, fake: &FakeBalancer, rng: &mut StdRng, job: &mut u64) {
    for _ in 0..400 {
        let rollout = core.rollouts().into_iter().last().expect("rollout");
        if rollout.phase == "complete" {
            return;
        }
        if rollout.phase == "simulating" {
            fake.add_pairs("media", identical_pairs(rng, *job, 500, "v1", "v2", false));
            *job += 500;
        }
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        core.tick().await;
    }
    panic!("the rollout did not complete");
}

#[tokio::test(start_paused = true)]
async fn a_sub_group_release_moves_only_its_machines() {
    use PoolRole::{Active, Simulation};
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeBalancer::new());
    let cluster = parse("fleet.toml", &fleet()).unwrap();
    let open = || {
        Core::open(
            cluster.clone(),
            Store::open(&dir.path().join("state.db")).unwrap(),
            fake.clone(),
            "secret".into(),
        )
        .unwrap()
    };
    let core = open();
    core.tick().await;

    // Bad sub-groups are refused before anything is stored.
    let mut stray = release(None, false);
    stray
        .subgroup
        .insert("db".into(), spec(serde_json::json!({"count": 1})));
    assert_eq!(
        core.release(&stray, "ops").unwrap_err(),
        RequestError::BadRequest("subgroup.db: service `db` is not in this release".into())
    );
    assert!(matches!(
        core.release(&release(Some(serde_json::json!({"count": 0})), false), "ops"),
        Err(RequestError::BadRequest(m)) if m.starts_with("subgroup.media.count")
    ));
    assert!(core.rollouts().is_empty());

    let half = serde_json::json!({"percent": 50});
    let plan = core
        .release(&release(Some(half.clone()), true), "ops")
        .unwrap();
    assert_eq!(plan.plan[0].machines.replaced, ids(&["media-1", "media-2"]));
    assert!(core.rollouts().is_empty());
    let started = core.release(&release(Some(half), false), "ops").unwrap();
    assert_eq!(
        started.rollouts[0].machines.joining,
        ids(&["media-v2a", "media-v2b"])
    );
    core.tick().await;
    // Only the sub-group's v2 machines are simulated.
    assert_eq!(
        places(&fake),
        place(&[
            ("media-1", Active),
            ("media-2", Active),
            ("media-3", Active),
            ("media-4", Active),
            ("media-c", Simulation),
            ("media-v2a", Simulation),
            ("media-v2b", Simulation),
        ])
    );
    // The selection survives a restart.
    drop(core);
    let core = open();
    assert_eq!(
        core.rollouts()[0].machines.replaced,
        ids(&["media-1", "media-2"])
    );
    let mut rng = StdRng::seed_from_u64(3);
    let mut job = 1;
    // Retiring keeps the rest of the service serving: hold a call on media-1 so the drain
    // is visible.
    fake.set_sessions("media", "media-1", 1);
    for _ in 0..400 {
        let phase = core.rollouts()[0].phase.clone();
        if phase == "retiring" {
            break;
        }
        if phase == "simulating" {
            fake.add_pairs(
                "media",
                identical_pairs(&mut rng, job, 500, "v1", "v2", false),
            );
            job += 500;
        }
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        core.tick().await;
    }
    core.tick().await;
    assert_eq!(core.rollouts()[0].phase, "retiring");
    assert_eq!(
        places(&fake),
        place(&[
            ("media-3", Active),
            ("media-4", Active),
            ("media-c", Simulation),
            ("media-v2a", Active),
            ("media-v2b", Active),
        ])
    );
    // media-1 still holds its call: the rollout waits (the monitor view shows it draining).
    tokio::time::advance(std::time::Duration::from_millis(1_000)).await;
    core.tick().await;
    assert_eq!(core.rollouts()[0].phase, "retiring");
    let draining = core.monitor_view().machines;
    assert_eq!(draining.len(), 1);
    assert_eq!(
        (
            draining[0].id.as_str(),
            draining[0].state,
            draining[0].balancer_sessions
        ),
        ("media-1", "draining", Some(1))
    );
    fake.set_sessions("media", "media-1", 0);
    run_to_the_end(&core, &fake, &mut rng, &mut job).await;
    let roles: BTreeMap<String, String> = core
        .machines()
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.role.as_str().to_string()))
        .collect();
    for (id, role) in [
        ("media-1", "retired"),
        ("media-2", "retired"),
        ("media-3", "active"),
        ("media-4", "active"),
        ("media-c", "control"),
        ("media-v2a", "active"),
        ("media-v2b", "active"),
        ("media-v2c", "standby"),
    ] {
        assert_eq!(roles[id], role, "{id}");
    }
    // Half the service still runs v1: the service's version is still v1.
    let media = core
        .services()
        .into_iter()
        .find(|s| s.name == "media")
        .unwrap();
    assert_eq!(media.version, "v1");

    // A second release moves the rest (the remaining v2 machine joins), keeping the v2
    // machines that already serve.
    core.release(&release(None, false), "ops").unwrap();
    let second = core.rollouts().into_iter().last().unwrap();
    assert_eq!(second.machines.replaced, ids(&["media-3", "media-4"]));
    assert_eq!(second.machines.joining, ids(&["media-v2c"]));
    run_to_the_end(&core, &fake, &mut rng, &mut job).await;
    let media = core
        .services()
        .into_iter()
        .find(|s| s.name == "media")
        .unwrap();
    assert_eq!(media.version, "v2");
    assert_eq!(
        places(&fake),
        place(&[
            ("media-c", Simulation),
            ("media-v2a", Active),
            ("media-v2b", Active),
            ("media-v2c", Active),
        ])
    );
}
