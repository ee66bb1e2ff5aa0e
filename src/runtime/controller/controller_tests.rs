//! Controller tests: whole releases against the in-memory balancer, with tokio's paused clock and
//! SQLite in a temporary directory; restarts; the joining condition through the judge crate.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use understudy_judge::{Condition, Decision, Judge, PairSample};
use understudy_wire::{JobObservation, JobPair, Outcome, PoolRole};

use super::*;
use crate::app::{start_with_client, ControllerConfig};
use crate::runtime::balancer::FakeBalancer;
use crate::testing::SAMPLE;
use crate::testing::{failing_pairs, identical_pairs, json, latency, Rig};

fn phase(core: &Core, service: &str) -> String {
    core.rollouts()
        .iter()
        .rev()
        .find(|r| r.service == service)
        .map(|r| match r.step {
            Some(s) => format!("{}[{s}]", r.phase),
            None => r.phase.clone(),
        })
        .unwrap_or_default()
}

fn rollout_id(core: &Core, service: &str) -> i64 {
    core.rollouts()
        .iter()
        .rev()
        .find(|r| r.service == service)
        .map(|r| r.id)
        .expect("rollout")
}

/// Feeds identical pairs to `services` and ticks until none of them simulates any more.
async fn judge_until_decided(
    core: &Core,
    fake: &FakeBalancer,
    services: &[&str],
    rng: &mut StdRng,
    next_job: &mut u64,
) {
    for _ in 0..200 {
        if services.iter().all(|s| phase(core, s) != "simulating") {
            return;
        }
        for s in services {
            fake.add_pairs(s, identical_pairs(rng, *next_job, 500, "v1", "v2", true));
        }
        *next_job += 500;
        core.tick().await;
    }
    panic!("the judge never decided");
}

/// Approves a rollout as `operator` would from the page: naming the evidence it is shown now.
pub(crate) fn approve(core: &Core, id: i64, operator: &str) -> Result<RolloutDetail, RequestError> {
    let shown = core.rollout(id).and_then(|d| d.evidence).and_then(|e| e.id);
    let request = OpsRequest {
        action: OpsAction::Approve,
        operator,
        evidence: Some(shown.as_deref().unwrap_or("0.0.0")),
    };
    core.act(id, &request)
}

fn release_of(services: &[(&str, &str)], rollback_on_failure: bool) -> ReleaseRequest {
    ReleaseRequest {
        services: services
            .iter()
            .map(|(s, v)| (s.to_string(), v.to_string()))
            .collect(),
        rollback_on_failure,
        dry_run: false,
        subgroup: BTreeMap::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn whole_release_in_dependency_order() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    let fake = &rig.fake;
    let mut rng = StdRng::seed_from_u64(7);
    let mut job = 1;

    // Startup pushes every balancer its resting config: v1 active, the v1 control in the
    // simulation pool (for simulation jobs from services above), nothing mirrored.
    core.tick().await;
    let rest = fake.config("media").expect("pushed");
    assert_eq!(rest.version, 1);
    let places: Vec<(&str, PoolRole)> = rest
        .machines
        .iter()
        .map(|m| (m.id.as_str(), m.config))
        .collect();
    assert_eq!(
        places,
        [
            ("media-1", PoolRole::Active),
            ("media-c", PoolRole::Simulation)
        ]
    );
    assert_eq!(rest.mirror_fraction, 0.0);

    let answer = core
        .release(
            &release_of(&[("media", "v2"), ("db", "v2"), ("router", "v2")], false),
            "ops",
        )
        .expect("release");
    assert_eq!(answer.plan.len(), 3);
    core.tick().await;
    assert_eq!(phase(&core, "media"), "simulating");
    assert_eq!(phase(&core, "db"), "simulating");
    assert_eq!(phase(&core, "router"), "pending");

    // Simulation: v1 serves, v2 and the A/A control receive copies.
    let sim = fake.config("media").unwrap();
    let role = |id: &str| sim.machines.iter().find(|m| m.id == id).map(|m| m.config);
    assert_eq!(role("media-1"), Some(PoolRole::Active));
    assert_eq!(role("media-2"), Some(PoolRole::Simulation));
    assert_eq!(role("media-c"), Some(PoolRole::Simulation));

    judge_until_decided(&core, fake, &["media", "db"], &mut rng, &mut job).await;
    assert_eq!(phase(&core, "media"), "joining[0]");
    // Weight step 10%: v1 keeps serving with 90.
    let step0 = fake.config("media").unwrap();
    let weight = |c: &understudy_wire::BalancerConfig, id: &str| {
        c.machines.iter().find(|m| m.id == id).map(|m| m.weight)
    };
    assert_eq!(weight(&step0, "media-1"), Some(90));
    assert_eq!(weight(&step0, "media-2"), Some(10));
    assert!(step0
        .machines
        .iter()
        .all(|m| (m.config == PoolRole::Active) == (m.id != "media-c")));
    assert_eq!(
        step0.mirror_fraction, 0.0,
        "nothing is judged while joining"
    );

    // The step is held for join_step_ms (200) before the next.
    tokio::time::advance(Duration::from_millis(150)).await;
    core.tick().await;
    assert_eq!(phase(&core, "media"), "joining[0]");
    tokio::time::advance(Duration::from_millis(60)).await;
    core.tick().await;
    assert_eq!(phase(&core, "media"), "joining[1]");
    assert_eq!(weight(&fake.config("media").unwrap(), "media-2"), Some(50));

    // v1 holds sessions: retiring waits for them to drain.
    fake.set_sessions("media", "media-1", 3);
    tokio::time::advance(Duration::from_millis(210)).await;
    core.tick().await;
    assert_eq!(phase(&core, "media"), "retiring");
    let retiring = fake.config("media").unwrap();
    let active: Vec<&str> = retiring
        .machines
        .iter()
        .filter(|m| m.config == PoolRole::Active)
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(active, ["media-2"]);
    core.tick().await;
    assert_eq!(phase(&core, "media"), "retiring", "v1 still drains");
    // db (no steps) joined meanwhile; router waited for both and starts once v2 serves alone in each.
    assert_eq!(phase(&core, "db"), "complete");
    assert_eq!(phase(&core, "router"), "simulating");
    fake.set_sessions("media", "media-1", 0);
    core.tick().await;
    assert_eq!(phase(&core, "media"), "complete");

    // Router asks for approval.
    judge_until_decided(&core, fake, &["router"], &mut rng, &mut job).await;
    assert_eq!(phase(&core, "router"), "awaiting_approval");
    let id = rollout_id(&core, "router");
    let detail = approve(&core, id, "alice").expect("approve");
    assert_eq!(detail.rollout.phase, "joining");
    assert_eq!(
        approve(&core, id, "alice").unwrap_err(),
        RequestError::Conflict(format!(
            "rollout {id} is joining[0]: cannot approve (it does not await approval)"
        ))
    );
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(210)).await;
        core.tick().await;
    }
    assert_eq!(phase(&core, "router"), "complete");

    // The record: every transition with time, cause and actor; the verdict with its numbers.
    let detail = core.rollout(id).unwrap();
    let phases: Vec<String> = detail
        .transitions
        .iter()
        .map(|t| t.to.to_string())
        .collect();
    assert_eq!(
        phases,
        vec![
            "simulating",
            "judged(pass)",
            "awaiting_approval",
            "joining[0]",
            "retiring",
            "complete"
        ]
    );
    assert_eq!(detail.transitions[3].actor, Actor::Ops);
    assert_eq!(detail.transitions[3].operator.as_deref(), Some("alice"));
    assert_eq!(detail.transitions[3].cause, "approved by alice");
    assert_eq!(detail.transitions[1].actor, Actor::Controller);
    assert_eq!(detail.transitions[1].operator, None);
    let verdict = json(&detail.rollout.verdict.expect("verdict kept"));
    assert_eq!(verdict["decision"], "pass");
    let numbers = &verdict["numbers"];
    assert!(numbers["jobs"].as_u64().unwrap() > 0);
    // Synthetic latencies are 0.5-15 ms, the same on both sides.
    for side in ["v1", "v2"] {
        let p99 = numbers[side]["p99_us"].as_f64().unwrap();
        assert!((2_000.0..20_000.0).contains(&p99), "{side} p99 {p99}");
    }
    assert_eq!(numbers["v1"]["p50_us"], numbers["v2"]["p50_us"]);

    // Machines moved: v2 active, v1 retired, with history; service versions updated.
    let machines = core.machines().unwrap();
    let m = |id: &str| machines.iter().find(|m| m.id == id).unwrap().clone();
    assert_eq!(m("media-2").role, MachineRole::Active);
    assert_eq!(m("media-1").role, MachineRole::Retired);
    // The control stays in the simulation pool after its service's release.
    assert_eq!(m("media-c").role, MachineRole::Control);
    assert_eq!(m("media-c").config, Some(PoolRole::Simulation));
    assert_eq!(m("media-1").history.len(), 2);
    let services = core.services();
    assert!(services
        .iter()
        .filter(|s| s.name != "edge")
        .all(|s| s.version == "v2"));

    // Balancers saw configs in order with increasing versions; the final one is v2 alone.
    let accepted = fake.accepted("media");
    assert!(accepted.windows(2).all(|w| w[0].version < w[1].version));
    assert_eq!(accepted.len(), 5, "rest, simulation, 10%, 50%, v2 alone");

    let text = core.metrics_text();
    let media = rollout_id(&core, "media");
    assert!(
        text.contains(&format!(
        "understudy_rollout_phase{{phase=\"complete\",rollout=\"{media}\",service=\"media\"}} 1"
    )),
        "{text}"
    );
    assert!(text.contains("understudy_rollout_transitions_total{from=\"retiring\",service=\"media\",to=\"complete\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_completes_retiring() {
    let text = SAMPLE.replace(
        "[services.db]\n",
        "[services.db]\ndrain_timeout_ms = 1000\n",
    );
    let rig = Rig::new(&text);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(1);
    let mut job = 1;
    core.release(&release_of(&[("db", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    rig.fake.set_sessions("db", "db-1", 5);
    judge_until_decided(&core, &rig.fake, &["db"], &mut rng, &mut job).await;
    tokio::time::advance(Duration::from_millis(210)).await;
    core.tick().await;
    assert_eq!(phase(&core, "db"), "retiring");
    tokio::time::advance(Duration::from_millis(900)).await;
    core.tick().await;
    assert_eq!(phase(&core, "db"), "retiring");
    tokio::time::advance(Duration::from_millis(150)).await;
    core.tick().await;
    assert_eq!(phase(&core, "db"), "complete");
    let last = core.rollout(rollout_id(&core, "db")).unwrap();
    let cause = last.transitions.last().unwrap().cause.clone();
    assert!(cause.contains("drain timeout"), "{cause}");
}

#[tokio::test(start_paused = true)]
async fn hard_failure_rolls_back_and_stops_dependents() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    core.release(
        &release_of(&[("db", "v2"), ("router", "v2"), ("edge", "v2")], false),
        "ops",
    )
    .unwrap();
    core.tick().await;
    assert_eq!(phase(&core, "db"), "simulating");
    let mut job = 1;
    for _ in 0..50 {
        if phase(&core, "db") != "simulating" {
            break;
        }
        rig.fake
            .add_pairs("db", failing_pairs(job, 400, "v1", "v2"));
        job += 400;
        core.tick().await;
    }
    assert_eq!(phase(&core, "db"), "rolled_back");
    let detail = core.rollout(rollout_id(&core, "db")).unwrap();
    // Straight from simulating: no judged step for a hard failure.
    assert_eq!(detail.transitions.last().unwrap().from, Phase::Simulating);
    assert!(detail.rollout.verdict.as_ref().unwrap().hard);
    assert_eq!(phase(&core, "router"), "aborted");
    assert_eq!(phase(&core, "edge"), "aborted");
    // v2 pulled: back to the resting config.
    let config = rig.fake.config("db").unwrap();
    assert_eq!(config.machines.len(), 1);
    assert_eq!(config.machines[0].id, "db-1");
    // The recorded pairs are there for re-judging.
    let csv = core.pairs_csv(detail.rollout.id, false).unwrap();
    assert!(csv.starts_with("v1_latency_us,v1_ok,v2_latency_us,v2_ok,match\n1000,1,1000,0,0\n"));
    // The service is free for another release.
    core.release(&release_of(&[("db", "v2")], false), "ops")
        .expect("new release");
}

#[tokio::test(start_paused = true)]
async fn failure_unwinds_joined_services_in_reverse_order() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(3);
    let mut job = 1;
    core.release(
        &release_of(&[("db", "v2"), ("media", "v2"), ("router", "v2")], true),
        "ops",
    )
    .unwrap();
    core.tick().await;
    judge_until_decided(&core, &rig.fake, &["db", "media"], &mut rng, &mut job).await;
    for _ in 0..6 {
        tokio::time::advance(Duration::from_millis(210)).await;
        core.tick().await;
    }
    assert_eq!(phase(&core, "db"), "complete");
    assert_eq!(phase(&core, "media"), "complete");
    assert_eq!(phase(&core, "router"), "simulating");
    // Ops roll router back: the release unwinds db and media (v1 machines back to active).
    let router = rollout_id(&core, "router");
    core.act(router, &OpsRequest::by("ops", OpsAction::Rollback))
        .unwrap();
    assert_eq!(phase(&core, "db"), "rolled_back");
    assert_eq!(phase(&core, "media"), "rolled_back");
    let services = core.services();
    assert!(services.iter().all(|s| s.version == "v1"), "{services:?}");
    let db = rig.fake.config("db");
    core.tick().await;
    let db_after = rig.fake.config("db").unwrap();
    assert!(db_after.version > db.unwrap().version);
    assert_eq!(db_after.machines.len(), 1);
    assert_eq!(db_after.machines[0].id, "db-1");
    let media = rig.fake.config("media").unwrap();
    let ids: Vec<&str> = media.machines.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["media-1", "media-c"]);
    // Reverse order: router first, then its dependencies.
    let at = |s: &str| {
        core.rollout(rollout_id(&core, s))
            .unwrap()
            .transitions
            .len()
    };
    assert!(at("db") >= 5);
    let cause = core
        .rollout(rollout_id(&core, "db"))
        .unwrap()
        .transitions
        .last()
        .unwrap()
        .cause
        .clone();
    assert!(cause.contains("router failed"), "{cause}");
}

#[tokio::test(start_paused = true)]
async fn restart_mid_release_resumes_where_it_stood() {
    // Steps held a minute: the wall clock moves on between the two controllers, not just tokio's.
    let rig = Rig::new(&SAMPLE.replace("join_step_ms = 200", "join_step_ms = 60000"));
    let mut rng = StdRng::seed_from_u64(11);
    let mut job = 1;
    let (media_id, pairs_before, transitions_before) = {
        let core = rig.open();
        core.release(
            &release_of(&[("media", "v2"), ("router", "v2")], false),
            "ops",
        )
        .unwrap();
        core.tick().await;
        // Half-way through simulation: some pairs recorded, no verdict yet.
        rig.fake.add_pairs(
            "media",
            identical_pairs(&mut rng, job, 200, "v1", "v2", true),
        );
        job += 200;
        core.tick().await;
        assert_eq!(phase(&core, "media"), "simulating");
        let id = rollout_id(&core, "media");
        let pairs = core.pairs_csv(id, false).unwrap().lines().count();
        (id, pairs, core.rollout(id).unwrap().transitions.len())
        // The core is dropped here: a controller killed mid-release.
    };
    let pushes_before = rig.fake.pushes("media");
    let accepted_before = rig.fake.accepted("media").len();
    let core = rig.open();
    assert_eq!(phase(&core, "media"), "simulating");
    assert_eq!(phase(&core, "router"), "pending");
    assert_eq!(
        core.rollout(media_id).unwrap().transitions.len(),
        transitions_before
    );
    assert_eq!(
        core.pairs_csv(media_id, false).unwrap().lines().count(),
        pairs_before
    );
    // The judge was rebuilt from the recorded pairs.
    assert_eq!(
        core.rollout(media_id).unwrap().rollout.numbers.jobs,
        (pairs_before - 1) as u64
    );
    core.tick().await;
    // Config re-pushed with the same version: the balancer treats it as a no-op.
    assert_eq!(rig.fake.pushes("media"), pushes_before + 1);
    assert_eq!(rig.fake.accepted("media").len(), accepted_before);
    judge_until_decided(&core, &rig.fake, &["media"], &mut rng, &mut job).await;
    assert_eq!(phase(&core, "media"), "joining[0]");

    // Killed again during joining, and the balancer restarted too: it gets the same config back.
    let version = rig.fake.config("media").unwrap().version;
    drop(core);
    rig.fake.restart("media");
    let core = rig.open();
    assert_eq!(phase(&core, "media"), "joining[0]");
    core.tick().await;
    assert_eq!(rig.fake.config("media").unwrap().version, version);
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(60_010)).await;
        core.tick().await;
    }
    assert_eq!(phase(&core, "media"), "complete");
    assert_eq!(phase(&core, "router"), "simulating");
    // Nothing applied twice: each phase entered once.
    let detail = core.rollout(media_id).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for t in &detail.transitions {
        assert!(seen.insert(t.to.to_string()), "{:?}", detail.transitions);
    }
}

#[tokio::test(start_paused = true)]
async fn stale_balancer_version_is_overtaken() {
    let rig = Rig::new(SAMPLE);
    // A balancer that runs version 40 from an earlier controller whose database was lost.
    let old = understudy_wire::BalancerConfig {
        service: "db".into(),
        version: 40,
        epoch: 0,
        mirror_fraction: 1.0,
        compare_body: false,
        compare: None,
        compare_headers: Vec::new(),
        drain_timeout_ms: 1,
        machines: vec![],
    };
    rig.fake.push("x", &old).await.unwrap();
    let core = rig.open();
    core.tick().await; // refused (409); stats tell the running version
    core.tick().await;
    let running = rig.fake.config("db").unwrap();
    assert_eq!(running.version, 41);
    assert_eq!(running.machines.len(), 1);
    let balancers = core.balancers();
    assert!(
        balancers
            .iter()
            .find(|b| b.service == "db")
            .unwrap()
            .in_sync
    );
}

#[tokio::test(start_paused = true)]
async fn unreachable_balancer_is_retried_and_counted() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    rig.fake.set_unreachable("db", true);
    core.tick().await;
    assert!(rig.fake.config("db").is_none());
    let text = core.metrics_text();
    assert!(
        text.contains("understudy_balancer_push_failures_total{service=\"db\"} 1"),
        "{text}"
    );
    rig.fake.set_unreachable("db", false);
    core.tick().await;
    assert_eq!(rig.fake.config("db").unwrap().version, 1);
}

/// A balancer that dropped the windows after the controller's cursor answers 410 for ever to
/// that cursor: the controller moves to the oldest cursor the balancer serves, says so, and
/// reads on.
#[tokio::test(start_paused = true)]
async fn a_cursor_too_old_is_reset_to_the_oldest_window_and_reads_go_on() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    core.tick().await;
    rig.fake.drop_windows("db", 40);
    core.tick().await;
    let view = |core: &Core| {
        core.balancers()
            .into_iter()
            .find(|b| b.service == "db")
            .unwrap()
    };
    let reset = view(&core);
    assert_eq!(reset.cursor, 40);
    let error = reset.last_stats_error.expect("the reset is shown");
    assert!(error.contains("cursor reset from 0 to 40"), "{error}");
    let text = core.metrics_text();
    assert!(
        text.contains(
            "understudy_balancer_stats_cursor_resets_total{reason=\"cursor_too_old\",service=\"db\"} 1"
        ),
        "{text}"
    );
    // The next read, from the new cursor, succeeds.
    core.tick().await;
    assert_eq!(view(&core).last_stats_error, None);
    // A controller restarted after the reset reads from the persisted cursor.
    drop(core);
    let again = rig.open();
    assert_eq!(view(&again).cursor, 40);
}

// ---- the joining condition, evaluated through the judge crate on synthetic data ----

fn run_judge(
    n: u64,
    seed: u64,
    make: impl Fn(&mut StdRng, u64) -> PairSample,
) -> understudy_judge::Verdict {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut judge = Judge::new(Condition::default());
    for _ in 0..n {
        let l = latency(&mut rng);
        let pair = make(&mut rng, l);
        judge.observe(&pair);
        if judge.is_final() {
            break;
        }
    }
    judge.verdict()
}

fn same(l: u64) -> PairSample {
    PairSample {
        v1_latency_us: l,
        v1_ok: true,
        v2_latency_us: l,
        v2_ok: true,
        matched: Some(true),
    }
}

#[test]
fn condition_identical_versions_pass() {
    let v = run_judge(200_000, 21, |_, l| same(l));
    assert_eq!(v.decision, Decision::Pass, "{v:?}");
}

#[test]
fn condition_p99_twenty_percent_slower_fails() {
    // Only the slow tail is slower: jobs above ~p90 of v1 take 20% longer on v2.
    let v = run_judge(400_000, 22, |_, l| PairSample {
        v2_latency_us: if l > 5_000 { l * 12 / 10 } else { l },
        ..same(l)
    });
    assert_eq!(v.decision, Decision::Fail, "{v:?}");
    assert!(!v.hard);
}

#[test]
fn condition_one_more_error_point_fails() {
    // v1 fails 1% of jobs, v2 fails those and 1% more.
    let v = run_judge(400_000, 23, |rng, l| {
        let x: f64 = rng.gen();
        PairSample {
            v1_ok: x >= 0.01,
            v2_ok: x >= 0.02,
            ..same(l)
        }
    });
    assert_eq!(v.decision, Decision::Fail, "{v:?}");
    assert!(v.rule.contains("error"), "{}", v.rule);
}

#[test]
fn condition_too_few_jobs_is_not_enough_data() {
    // Even a clearly worse v2: too few jobs never fail.
    let v = run_judge(100, 24, |_, l| PairSample {
        v2_latency_us: l * 3,
        ..same(l)
    });
    assert_eq!(v.decision, Decision::NotEnoughData, "{v:?}");
}

#[tokio::test(start_paused = true)]
async fn dependents_wait_for_the_dependency_balancer_to_run_its_new_config() {
    let text = SAMPLE.replace("[services.db]\n", "[services.db]\ndrain_timeout_ms = 500\n");
    let rig = Rig::new(&text);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(5);
    let mut job = 1;
    core.release(&release_of(&[("db", "v2"), ("router", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    judge_until_decided(&core, &rig.fake, &["db"], &mut rng, &mut job).await;
    assert_eq!(phase(&core, "db"), "joining[0]");
    rig.fake.set_unreachable("db", true);
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(300)).await;
        core.tick().await;
    }
    // db completed on its drain timeout, but its balancer never got the config without v1.
    assert_eq!(phase(&core, "db"), "complete");
    assert_eq!(phase(&core, "router"), "pending");
    rig.fake.set_unreachable("db", false);
    core.tick().await; // push acknowledged
    core.tick().await;
    assert_eq!(phase(&core, "router"), "simulating");
    let db = rig.fake.config("db").unwrap();
    assert_eq!(db.machines.len(), 1);
    assert_eq!(db.machines[0].id, "db-2");
}

#[tokio::test(start_paused = true)]
async fn a_later_release_brings_retired_machines_back() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(8);
    let mut job = 1;
    core.release(&release_of(&[("db", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    judge_until_decided(&core, &rig.fake, &["db"], &mut rng, &mut job).await;
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(210)).await;
        core.tick().await;
    }
    assert_eq!(phase(&core, "db"), "complete");
    // v2 now runs; v1 is retired. v9 does not exist; v2 already runs.
    let err = core
        .release(&release_of(&[("db", "v9")], false), "ops")
        .unwrap_err();
    assert!(matches!(err, RequestError::BadRequest(_)), "{err:?}");
    let err = core
        .release(&release_of(&[("db", "v2")], false), "ops")
        .unwrap_err();
    assert!(matches!(err, RequestError::Conflict(_)), "{err:?}");
    core.release(&release_of(&[("db", "v1")], false), "ops")
        .expect("back to v1");
    core.tick().await;
    assert_eq!(phase(&core, "db"), "simulating");
    let sim = rig.fake.config("db").unwrap();
    let db1 = sim.machines.iter().find(|m| m.id == "db-1").unwrap();
    assert_eq!(db1.config, PoolRole::Simulation);
    for _ in 0..200 {
        if phase(&core, "db") != "simulating" {
            break;
        }
        rig.fake
            .add_pairs("db", identical_pairs(&mut rng, job, 500, "v2", "v1", false));
        job += 500;
        core.tick().await;
    }
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(210)).await;
        core.tick().await;
    }
    assert_eq!(phase(&core, "db"), "complete");
    let services = core.services();
    assert_eq!(
        services.iter().find(|s| s.name == "db").unwrap().version,
        "v1"
    );
    let config = rig.fake.config("db").unwrap();
    assert_eq!(config.machines.len(), 1);
    assert_eq!(config.machines[0].id, "db-1");
}

#[tokio::test]
async fn in_process_start_serves_the_admin_endpoint_and_shuts_down() {
    let rig = Rig::new(SAMPLE);
    let config = ControllerConfig {
        store: crate::config::store::StoreLocation::Memory,
        lease: None,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        token: "tok".into(),
        tick: Duration::from_millis(20),
        cluster: rig.cluster.clone(),
    };
    let handle = start_with_client(config.clone(), rig.fake.clone())
        .await
        .expect("start");
    assert_ne!(handle.admin_addr().port(), 0);
    let client =
        crate::api::client::AdminClient::new(&handle.admin_url(), Some("tok".into())).unwrap();
    let services: Vec<ServiceView> = client.get("/api/v1/services").await.unwrap();
    assert_eq!(services.len(), 4);
    let answer: ReleaseAnswer = client
        .post(
            "/api/v1/releases",
            &serde_json::json!({"services": {"db": "v2"}}),
        )
        .await
        .unwrap();
    assert_eq!(answer.release, Some(1));
    // The loop runs on its own: the rollout starts simulating and the balancer gets v2 mirrored.
    for _ in 0..100 {
        if phase(handle.core(), "db") == "simulating"
            && rig.fake.config("db").map(|c| c.machines.len()) == Some(2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(phase(handle.core(), "db"), "simulating");
    assert_eq!(rig.fake.config("db").unwrap().machines.len(), 2);
    handle.shutdown().await;

    // No token, no balancer URL: refused before anything starts.
    let mut no_token = config.clone();
    no_token.token.clear();
    assert!(matches!(
        start_with_client(no_token, rig.fake.clone()).await,
        Err(ControllerError::NoToken)
    ));
    let mut no_balancer = config;
    if let Some(s) = no_balancer.cluster.services.get_mut("db") {
        s.balancer = None;
    }
    assert!(matches!(
        start_with_client(no_balancer, rig.fake.clone()).await,
        Err(ControllerError::NoBalancer(s)) if s == "db"
    ));
}

fn series(version: &str, ok: u64, errors: u64) -> understudy_wire::SeriesStats {
    understudy_wire::SeriesStats {
        version: version.into(),
        config: PoolRole::Active,
        outcomes: understudy_wire::OutcomeCounts {
            ok,
            server_error: errors,
            ..Default::default()
        },
        histogram: String::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn live_guard_pulls_a_v2_that_fails_callers_while_joining() {
    let text = SAMPLE.replace("join_step_ms = 200", "join_step_ms = 60000");
    let rig = Rig::new(&text);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(4);
    let mut job = 1;
    core.release(&release_of(&[("db", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    judge_until_decided(&core, &rig.fake, &["db"], &mut rng, &mut job).await;
    assert_eq!(phase(&core, "db"), "joining[0]");
    // A few errors, within the margin, or too few jobs: nothing happens.
    rig.fake
        .add_series("db", vec![series("v1", 100, 0), series("v2", 97, 3)]);
    core.tick().await;
    assert_eq!(phase(&core, "db"), "joining[0]");
    rig.fake
        .add_series("db", vec![series("v1", 300, 1), series("v2", 153, 2)]);
    core.tick().await;
    assert_eq!(
        phase(&core, "db"),
        "joining[0]",
        "v2 2% (5 of 255) against v1 0.25%: within the 5-point hard margin"
    );
    // Callers now see 15% errors on v2 (7.7% over the phase): pulled at once.
    rig.fake
        .add_series("db", vec![series("v1", 200, 0), series("v2", 170, 30)]);
    core.tick().await;
    assert_eq!(phase(&core, "db"), "rolled_back");
    let detail = core.rollout(rollout_id(&core, "db")).unwrap();
    let last = json(detail.transitions.last().unwrap());
    assert!(
        last["cause"].as_str().unwrap().starts_with("live guard"),
        "{last}"
    );
    assert_eq!(last["details"]["v2_errors"], 35);
    core.tick().await;
    let config = rig.fake.config("db").unwrap();
    assert_eq!(config.machines.len(), 1);
    assert_eq!(config.machines[0].id, "db-1");
}

/// Pairs whose v1 and v2 latencies are `latencies` (µs), v1 active and v2 simulating.
fn pairs_with_latencies(first: u64, latencies: &[u64], from: &str, to: &str) -> Vec<JobPair> {
    let obs = |machine: &str, version: &str, latency_us: u64| JobObservation {
        machine: machine.to_string(),
        version: version.to_string(),
        latency_us,
        outcome: Outcome::Ok,
        status: Some(200),
    };
    latencies
        .iter()
        .enumerate()
        .map(|(i, &l)| JobPair {
            job: first + i as u64,
            session: None,
            active: obs("a", from, l),
            simulation: obs("s", to, l),
            matched: true,
            diff: None,
        })
        .collect()
}

/// The nearest-rank quantile of the `column`-th field of a pairs.csv, computed independently of
/// the controller's histograms.
fn csv_quantile(csv: &str, column: usize, q: f64) -> f64 {
    let mut values: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|line| line.split(',').nth(column).unwrap().parse().unwrap())
        .collect();
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).max(1);
    values[rank - 1] as f64
}

fn assert_numbers_follow_pairs(numbers: &serde_json::Value, csv: &str) {
    let rows = csv.lines().count() as u64 - 1;
    assert!(rows > 0);
    assert_eq!(numbers["jobs"], rows, "{numbers}");
    for (side, column) in [("v1", 0), ("v2", 2)] {
        for (key, q) in [("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)] {
            let shown = numbers[side][key].as_f64().unwrap();
            let expected = csv_quantile(csv, column, q);
            // Three significant digits of the histogram: within 0.1%.
            assert!(
                (shown - expected).abs() <= expected * 0.001 + 1.0,
                "{side} {key}: shown {shown}, pairs.csv says {expected}: {numbers}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn display_numbers_follow_the_recorded_pairs_live_and_after_restart() {
    let rig = Rig::new(SAMPLE);
    let mut rng = StdRng::seed_from_u64(17);
    let mut job = 1;
    let (id, live) = {
        let core = rig.open();
        core.release(&release_of(&[("media", "v2")], false), "ops")
            .unwrap();
        core.tick().await;
        // Latencies of a loaded telephony service: 5-37 ms.
        for _ in 0..200 {
            if phase(&core, "media") != "simulating" {
                break;
            }
            let latencies: Vec<u64> = (0..500).map(|_| rng.gen_range(5_000..37_000)).collect();
            rig.fake
                .add_pairs("media", pairs_with_latencies(job, &latencies, "v1", "v2"));
            job += 500;
            core.tick().await;
        }
        assert_eq!(phase(&core, "media"), "joining[0]");
        let id = rollout_id(&core, "media");
        let csv = core.pairs_csv(id, false).unwrap();
        let live = json(&core.rollout(id).unwrap().rollout.numbers);
        assert_numbers_follow_pairs(&live, &csv);
        // The verdict keeps the same numbers as the view.
        let verdict = json(&core.rollout(id).unwrap().rollout.verdict.unwrap());
        assert_eq!(verdict["numbers"], live);
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(210)).await;
            core.tick().await;
        }
        assert_eq!(phase(&core, "media"), "complete");
        assert_eq!(json(&core.rollout(id).unwrap().rollout.numbers), live);
        (id, live)
    };
    // A restarted controller shows the finished rollout's numbers as they were.
    let core = rig.open();
    let csv = core.pairs_csv(id, false).unwrap();
    let restored = json(&core.rollout(id).unwrap().rollout.numbers);
    assert_numbers_follow_pairs(&restored, &csv);
    assert_eq!(restored, live);
}

#[tokio::test(start_paused = true)]
async fn controls_answer_simulation_jobs_at_all_times_and_copies_flow_only_while_judged() {
    let text = SAMPLE.replace(
        "join_steps = [10, 50]",
        "join_steps = [10, 50]\nmirror_fraction = 0.25",
    );
    let rig = Rig::new(&text);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(19);
    let mut job = 1;
    let places = |service: &str| -> (Vec<(String, PoolRole)>, f64) {
        let config = rig.fake.config(service).expect("pushed");
        let places = config
            .machines
            .iter()
            .map(|m| (m.id.clone(), m.config))
            .collect();
        (places, config.mirror_fraction)
    };
    let at = |id: &str, config: PoolRole| (id.to_string(), config);

    // Outside any rollout: the control answers upstream simulation jobs; no copies are made; the
    // standby v2 stays out.
    core.tick().await;
    assert_eq!(
        places("media"),
        (
            vec![
                at("media-1", PoolRole::Active),
                at("media-c", PoolRole::Simulation)
            ],
            0.0
        )
    );

    // A release of a service above (router) leaves media's pool as it is.
    core.release(&release_of(&[("router", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    assert_eq!(phase(&core, "router"), "simulating");
    assert_eq!(places("media").1, 0.0);
    assert!(places("media")
        .0
        .contains(&at("media-c", PoolRole::Simulation)));
    core.act(
        rollout_id(&core, "router"),
        &OpsRequest::by("ops", OpsAction::Abort),
    )
    .unwrap();
    core.tick().await;

    // Its own simulation: v2 joins the pool and the configured fraction is copied.
    core.release(&release_of(&[("media", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    assert_eq!(phase(&core, "media"), "simulating");
    assert_eq!(
        places("media"),
        (
            vec![
                at("media-1", PoolRole::Active),
                at("media-c", PoolRole::Simulation),
                at("media-2", PoolRole::Simulation)
            ],
            0.25
        )
    );

    judge_until_decided(&core, &rig.fake, &["media"], &mut rng, &mut job).await;
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(210)).await;
        core.tick().await;
    }
    // Completed (without waiting for the drain timeout: the control in the simulation pool is
    // not a v1 machine left to drain): the control is still in the pool, copies stop.
    assert_eq!(phase(&core, "media"), "complete");
    assert_eq!(
        places("media"),
        (
            vec![
                at("media-c", PoolRole::Simulation),
                at("media-2", PoolRole::Active)
            ],
            0.0
        )
    );
    let machines = core.machines().unwrap();
    let control = machines.iter().find(|m| m.id == "media-c").unwrap();
    assert_eq!(control.role, MachineRole::Control);

    // And a restarted controller keeps it there.
    drop(core);
    let core = rig.open();
    core.tick().await;
    assert!(places("media")
        .0
        .contains(&at("media-c", PoolRole::Simulation)));
}

#[tokio::test(start_paused = true)]
async fn pairs_the_store_refused_are_not_counted_twice_by_the_judge() {
    let rig = Rig::new(SAMPLE);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(23);
    core.release(&release_of(&[("media", "v2")], false), "ops")
        .unwrap();
    core.tick().await;
    let id = rollout_id(&core, "media");
    rig.fake.add_pairs(
        "media",
        identical_pairs(&mut rng, 1, 100, "v1", "v2", false),
    );
    core.tick().await;
    let judged = |core: &Core| core.rollout(id).unwrap().rollout.verdict.unwrap().jobs;
    assert_eq!(judged(&core), 100);

    // The next batch cannot be committed (a failing disk, simulated by a trigger from a second
    // connection); the balancer hands the same pairs again on the next read.
    let other = rusqlite::Connection::open(rig.dir.path().join("state.db")).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON pairs BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
        )
        .unwrap();
    rig.fake.add_pairs(
        "media",
        identical_pairs(&mut rng, 101, 50, "v1", "v2", false),
    );
    core.tick().await;
    assert_eq!(core.pairs_csv(id, false).unwrap().lines().count(), 101);
    other.execute_batch("DROP TRIGGER refuse;").unwrap();
    core.tick().await;
    assert_eq!(core.pairs_csv(id, false).unwrap().lines().count(), 151);
    assert_eq!(judged(&core), 150, "each pair judged once");
    assert_eq!(core.rollout(id).unwrap().rollout.numbers.jobs, 150);
}

/// One service released v1 -> v2 -> v3 (its control stays at v1): the second rollout has no
/// control of its from-version, so it is judged against the active machines and says so.
const RELEASES: &str = r#"
[defaults]
join_step_ms = 200

[services.media]
balancer = "http://127.0.0.1:9001"

[[machines]]
id = "media-1"
service = "media"
version = "v1"
address = "127.0.0.1:8001"
config = "active"

[[machines]]
id = "media-c"
service = "media"
version = "v1"
address = "127.0.0.1:8002"
config = "simulation"

[[machines]]
id = "media-2"
service = "media"
version = "v2"
address = "127.0.0.1:8003"
config = "simulation"

[[machines]]
id = "media-3"
service = "media"
version = "v3"
address = "127.0.0.1:8004"
config = "simulation"
"#;

/// Releases `media` to `to`, feeding pairs from `pairs(first_job)` until it leaves simulating.
async fn release_media(
    rig: &Rig,
    core: &Core,
    to: &str,
    mut pairs: impl FnMut(u64) -> Vec<JobPair>,
    job: &mut u64,
) -> RolloutView {
    core.release(&release_of(&[("media", to)], false), "ops")
        .expect("release");
    core.tick().await;
    for _ in 0..200 {
        if phase(core, "media") != "simulating" {
            break;
        }
        rig.fake.add_pairs("media", pairs(*job));
        *job += 500;
        core.tick().await;
    }
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(210)).await;
        core.tick().await;
    }
    let id = rollout_id(core, "media");
    core.rollouts().into_iter().find(|r| r.id == id).unwrap()
}

#[tokio::test(start_paused = true)]
async fn release_after_release_falls_back_to_the_active_baseline() {
    let rig = Rig::new(RELEASES);
    let core = rig.open();
    let mut rng = StdRng::seed_from_u64(11);
    let mut job = 1;
    let first = release_media(
        &rig,
        &core,
        "v2",
        |j| identical_pairs(&mut StdRng::seed_from_u64(j), j, 500, "v1", "v2", true),
        &mut job,
    )
    .await;
    assert_eq!(first.phase, "complete");
    let verdict = json(&first.verdict.expect("judged"));
    assert_eq!(verdict["baseline"], "control");
    assert!(verdict.get("baseline_note").is_none(), "{verdict}");

    // v2 -> v3: the control still runs v1, its copies pair with nothing of this rollout.
    let second = release_media(
        &rig,
        &core,
        "v3",
        |j| {
            let mut pairs = failing_pairs(j, 500, "v2", "v3");
            // The control of v1 answers too; its copies must not stand in for v2's baseline.
            for p in pairs.iter_mut().filter(|p| p.simulation.machine == "c") {
                p.simulation.version = "v1".into();
            }
            pairs
        },
        &mut job,
    )
    .await;
    assert_eq!(second.phase, "rolled_back", "{:?}", second.verdict);
    let verdict = json(&second.verdict.expect("judged"));
    assert_eq!(verdict["baseline"], "active");
    assert!(verdict["baseline_note"]
        .as_str()
        .unwrap()
        .contains("no control"));

    // And back again: v2 -> v3 passes on identical pairs against the active machines.
    let third = release_media(
        &rig,
        &core,
        "v3",
        |j| identical_pairs(&mut rng, j, 500, "v2", "v3", false),
        &mut job,
    )
    .await;
    assert_eq!(third.phase, "complete", "{:?}", third.verdict);
    assert_eq!(third.problem, None);
}

#[tokio::test(start_paused = true)]
async fn a_judge_that_gets_no_pairs_while_copies_flow_is_shown_as_starved() {
    let rig = Rig::new(RELEASES);
    let core = rig.open();
    core.release(&release_of(&[("media", "v2")], false), "ops")
        .expect("release");
    core.tick().await;
    let id = rollout_id(&core, "media");
    let starved = |core: &Core| {
        let view = core.rollouts().into_iter().find(|r| r.id == id).unwrap();
        let gauge = core
            .metrics_text()
            .lines()
            .any(|l| l.starts_with("understudy_rollout_judge_starved{") && l.ends_with(" 1"));
        (view.problem, gauge)
    };
    // Copies of v2 whose active side runs another version than the rollout's from-version
    // (machines moved by hand): none can be paired.
    let mut rng = StdRng::seed_from_u64(12);
    rig.fake.add_pairs(
        "media",
        identical_pairs(&mut rng, 1, 300, "v0", "v2", false),
    );
    core.tick().await;
    assert_eq!(
        starved(&core),
        (None, false),
        "300 copies: still warming up"
    );
    rig.fake.add_pairs(
        "media",
        identical_pairs(&mut rng, 301, 300, "v0", "v2", false),
    );
    core.tick().await;
    let (problem, gauge) = starved(&core);
    let problem = problem.expect("starved");
    assert!(
        problem.contains("600 copies") && problem.contains("v1"),
        "{problem}"
    );
    assert!(gauge);
    // Pairs that fit end it.
    rig.fake.add_pairs(
        "media",
        identical_pairs(&mut rng, 601, 10, "v1", "v2", true),
    );
    core.tick().await;
    assert_eq!(starved(&core), (None, false));
}

#[tokio::test(start_paused = true)]
async fn a_controller_that_lost_its_lead_is_fenced_off_and_switches_nothing() {
    let rig = Rig::new(SAMPLE);
    // The old leader committed its configs but froze before pushing them.
    let old = rig.open();
    // A second controller takes over the store: a higher epoch, which its first push applies.
    let new = rig.open();
    assert!(new.epoch() > old.epoch());
    assert_eq!(
        new.epoch() >> crate::store::EPOCH_SALT_BITS,
        (old.epoch() >> crate::store::EPOCH_SALT_BITS) + 1,
        "one more takeover"
    );
    new.tick().await;
    let first = rig.fake.config("media").expect("pushed");
    assert_eq!(first.epoch, new.epoch(), "every config carries the epoch");
    assert_eq!(rig.fake.epoch("media"), new.epoch());
    // The old one wakes up: the store refuses the release it starts (nothing of it is kept) ...
    let refused = old
        .release(&release_of(&[("media", "v2")], false), "ops")
        .unwrap_err();
    assert!(refused.to_string().contains("fenced off"), "{refused}");
    let store = Store::open(&rig.dir.path().join("state.db")).unwrap();
    assert!(store.releases().unwrap().is_empty());
    // ... and the balancers refuse the config it still had to push.
    let accepted = rig.fake.accepted("media").len();
    old.tick().await;
    assert_eq!(
        rig.fake.accepted("media").len(),
        accepted,
        "nothing switched"
    );
    let running = rig.fake.config("media").unwrap();
    assert_eq!(rig.fake.epoch("media"), new.epoch());
    assert!(
        running.machines.iter().all(|m| m.version == "v1"),
        "{running:?}"
    );
    let fenced = old.metrics.fenced.with_label_values(&["media"]).get();
    assert_eq!(fenced, 1.0);
    let text = old.metrics_text();
    assert!(text.contains("understudy_balancer_push_fenced_total{service=\"media\"} 1"));
    let epoch_line = format!("understudy_controller_epoch {}", old.epoch());
    assert!(text.contains(&epoch_line), "{epoch_line}");
}
