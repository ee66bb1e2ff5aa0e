//! Approvals bound to the evidence, on a controller over a fake balancer: judging goes on while
//! a rollout awaits approval, and each refusal changes nothing.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::tests::approve;
use super::*;
use crate::testing::{failing_pairs, identical_pairs, Rig, SAMPLE};

/// The router rollout of SAMPLE (it asks for approval) brought to `awaiting_approval`.
pub(crate) async fn awaiting(rig: &Rig) -> (Core, i64, u64) {
    let core = rig.open();
    core.tick().await;
    let request = ReleaseRequest {
        services: BTreeMap::from([("router".to_string(), "v2".to_string())]),
        ..ReleaseRequest::default()
    };
    let answer = core.release(&request, "carol").unwrap();
    let id = answer.rollouts[0].id;
    let mut rng = StdRng::seed_from_u64(5);
    let mut job = 1;
    for _ in 0..200 {
        core.tick().await;
        if core.rollout(id).unwrap().rollout.phase != "simulating" {
            break;
        }
        let pairs = identical_pairs(&mut rng, job, 500, "v1", "v2", true);
        rig.fake.add_pairs("router", pairs);
        job += 500;
    }
    assert_eq!(core.rollout(id).unwrap().rollout.phase, "awaiting_approval");
    (core, id, job)
}

fn router_machines_active(rig: &Rig) -> Vec<String> {
    let config = rig.fake.config("router").expect("pushed");
    config
        .machines
        .iter()
        .filter(|m| m.config == PoolRole::Active)
        .map(|m| m.version.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_v2_that_turns_bad_while_awaiting_approval_is_rolled_back_before_anyone_approves() {
    let rig = Rig::new(SAMPLE);
    let (core, id, job) = awaiting(&rig).await;
    let shown = core.rollout(id).unwrap();
    let evidence = shown.evidence.expect("evidence");
    assert!(evidence.id.is_some(), "an approvable evidence id");
    assert_eq!(evidence.decision, Decision::Pass);
    let judged_at_pass = evidence.jobs;
    // Copies keep flowing and being judged while it waits.
    assert!(rig.fake.config("router").unwrap().mirror_fraction > 0.0);
    let mut rng = StdRng::seed_from_u64(6);
    rig.fake.add_pairs(
        "router",
        identical_pairs(&mut rng, job, 500, "v1", "v2", true),
    );
    core.tick().await;
    let still = core.rollout(id).unwrap();
    assert_eq!(still.rollout.phase, "awaiting_approval");
    assert!(
        still.evidence.unwrap().jobs > judged_at_pass,
        "judging goes on"
    );
    assert!(
        still.rollout.verdict.unwrap().jobs > judged_at_pass,
        "the verdict shown is live"
    );

    // v2 turns bad: rolled back at once, no caller ever reached it.
    rig.fake
        .add_pairs("router", failing_pairs(job + 500, 400, "v1", "v2"));
    core.tick().await;
    let detail = core.rollout(id).unwrap();
    assert_eq!(detail.rollout.phase, "rolled_back");
    let last = detail.transitions.last().unwrap();
    assert_eq!(last.from, Phase::AwaitingApproval);
    assert!(last.cause.contains("fail after passing"), "{}", last.cause);
    assert_eq!(last.operator, None);
    assert_eq!(router_machines_active(&rig), ["v1"]);
    assert!(matches!(
        approve(&core, id, "alice"),
        Err(RequestError::Conflict(m)) if m.contains("rolled_back")
    ));
}

#[tokio::test(start_paused = true)]
async fn an_approval_names_evidence_that_still_stands_and_was_shown_lately() {
    let rig = Rig::new(SAMPLE);
    let (core, id, _) = awaiting(&rig).await;
    let shown = core.rollout(id).unwrap().evidence.unwrap().id.unwrap();
    let ask = |evidence: &str, operator: &'static str| {
        core.act(
            id,
            &OpsRequest {
                action: OpsAction::Approve,
                operator,
                evidence: Some(evidence),
            },
        )
    };
    let unchanged = |core: &Core| {
        let d = core.rollout(id).unwrap();
        assert_eq!(d.rollout.phase, "awaiting_approval");
        assert!(d.approvals.is_empty());
    };
    // Bad ids and another rollout's evidence: 400.
    for (bad, expected) in [("x", "not an evidence id"), ("99.0.1", "rollout 99's")] {
        assert!(
            matches!(ask(bad, "alice"), Err(RequestError::BadRequest(m)) if m.contains(expected))
        );
    }
    let missing = core.act(id, &OpsRequest::by("alice", OpsAction::Approve));
    assert!(matches!(missing, Err(RequestError::BadRequest(m)) if m.contains("evidence")));
    unchanged(&core);

    // The evidence shown then was materially better than the live one: refused as stale.
    {
        let mut state = lock(&core.state);
        let r = state.rollouts.get_mut(&id).unwrap();
        let logged = &mut r.evidence_log[0];
        logged.decision = Decision::NotEnoughData;
    }
    assert!(matches!(ask(&shown, "alice"),
        Err(RequestError::Conflict(m)) if m.contains("changed since it was shown")
            && m.contains("flipped from not_enough_data to pass")));
    unchanged(&core);
    lock(&core.state)
        .rollouts
        .get_mut(&id)
        .unwrap()
        .evidence_log[0]
        .decision = Decision::Pass;

    // Shown longer ago than the approval time (15 minutes by default): expired.
    tokio::time::advance(Duration::from_secs(16 * 60)).await;
    assert!(matches!(ask(&shown, "alice"),
        Err(RequestError::Conflict(m)) if m.contains("expired")));
    unchanged(&core);

    // Shown now: it joins, and the operator is on record.
    let fresh = core.rollout(id).unwrap().evidence.unwrap().id.unwrap();
    let detail = ask(&fresh, "alice").unwrap();
    assert_eq!(detail.rollout.phase, "joining");
    let joined = detail.transitions.last().unwrap();
    assert_eq!(joined.operator.as_deref(), Some("alice"));
    assert_eq!(joined.cause, "approved by alice");
    assert_eq!(detail.approvals.len(), 1);
    // The release says who started it.
    assert_eq!(core.releases()[0].created_by.as_deref(), Some("carol"));
}

#[tokio::test(start_paused = true)]
async fn a_service_asking_for_two_approvers_joins_on_the_second_operator_only() {
    let text = SAMPLE.replace(
        "requires_approval = true",
        "requires_approval = true\napprovers = 2\napproval_ttl_ms = 60000",
    );
    let rig = Rig::new(&text);
    let (core, id, _) = awaiting(&rig).await;
    let first = approve(&core, id, "alice").unwrap();
    assert_eq!(first.rollout.phase, "awaiting_approval");
    assert_eq!(first.approvals_required, 2);
    assert_eq!(first.approvals[0].operator, "alice");
    assert!(matches!(approve(&core, id, "alice"),
        Err(RequestError::Conflict(m)) if m.contains("alice already approved")));
    assert_eq!(
        core.rollout(id).unwrap().approvals.len(),
        1,
        "nothing recorded"
    );
    // Alice's approval expires before Bob's comes: Bob's is a first one again.
    tokio::time::advance(Duration::from_secs(61)).await;
    let lone = approve(&core, id, "bob").unwrap();
    assert_eq!(lone.rollout.phase, "awaiting_approval");
    // Within the minute, Alice again: two distinct operators, it joins.
    let both = approve(&core, id, "alice").unwrap();
    assert_eq!(both.rollout.phase, "joining");
    assert_eq!(
        both.transitions.last().unwrap().cause,
        "approved by bob and alice"
    );

    // Approvals and the evidence log survive a restart.
    drop(core);
    let again = rig.open();
    let detail = again.rollout(id).unwrap();
    assert_eq!(detail.approvals.len(), 3);
    assert_eq!(
        detail.transitions.last().unwrap().operator.as_deref(),
        Some("alice")
    );
}

/// SAMPLE with a mirror budget on the router: at most 2,000 copies a second, 5% once decided.
fn budgeted() -> String {
    let text = SAMPLE.replacen(
        "requires_approval = true\n",
        "requires_approval = true\n\
         mirror_budget = { copies_per_second = 2000.0, watch_fraction = 0.05 }\n",
        1,
    );
    assert_ne!(text, SAMPLE);
    text
}

/// Callers' jobs the router's active pool served since the last read.
fn callers(jobs: u64) -> Vec<SeriesStats> {
    vec![SeriesStats {
        version: "v1".into(),
        config: PoolRole::Active,
        outcomes: understudy_wire::OutcomeCounts {
            ok: jobs,
            ..Default::default()
        },
        histogram: String::new(),
    }]
}

/// One reconcile round 100 ms after the last, with `jobs` callers' jobs and `copies` of them
/// answered by v2 (identical answers) since.
async fn round(rig: &Rig, core: &Core, jobs: u64, copies: u64, job: &mut u64, rng: &mut StdRng) {
    tokio::time::advance(Duration::from_millis(100)).await;
    rig.fake.add_series("router", callers(jobs));
    rig.fake.add_pairs(
        "router",
        identical_pairs(rng, *job, copies, "v1", "v2", false),
    );
    *job += copies.max(1);
    core.tick().await;
}

fn fraction_in_force(rig: &Rig) -> f64 {
    rig.fake.config("router").expect("pushed").mirror_fraction
}

#[tokio::test(start_paused = true)]
async fn a_mirror_budget_copies_by_the_evidence_and_keeps_watching_while_approval_waits() {
    let rig = Rig::new(&budgeted());
    let core = rig.open();
    let (mut rng, mut job) = (StdRng::seed_from_u64(7), 1);
    // Callers at 10,000 jobs a second, measured before the release.
    for _ in 0..5 {
        round(&rig, &core, 1_000, 0, &mut job, &mut rng).await;
    }
    let request = ReleaseRequest {
        services: BTreeMap::from([("router".to_string(), "v2".to_string())]),
        ..ReleaseRequest::default()
    };
    let id = core.release(&request, "carol").unwrap().rollouts[0].id;
    round(&rig, &core, 1_000, 0, &mut job, &mut rng).await;
    // Tests open: as much as the budget allows, 2,000 of 10,000 a second.
    assert_eq!(fraction_in_force(&rig), 0.2);
    let mirror = core.rollout(id).unwrap().mirror.expect("mirror");
    assert_eq!(mirror.reason, mirror::MirrorReason::Judging);
    assert_eq!(mirror.caller_rate, Some(10_000.0));
    assert_eq!(mirror.budget.map(|b| b.copies_per_second), Some(2000.0));

    // Callers double: the fraction halves, but not before 5 s since it was set (paused clock).
    for _ in 0..30 {
        round(&rig, &core, 2_000, 0, &mut job, &mut rng).await;
        assert_eq!(fraction_in_force(&rig), 0.2, "held within the interval");
    }
    let open = core.rollout(id).unwrap().mirror.unwrap().open_tests;
    assert!(open.contains(&"errors".to_string()), "{open:?}");
    for _ in 0..30 {
        round(&rig, &core, 2_000, 0, &mut job, &mut rng).await;
    }
    assert!(
        (fraction_in_force(&rig) - 0.1).abs() < 0.01,
        "{}",
        fraction_in_force(&rig)
    );

    // Identical answers until the judge passes v2: the watch fraction from then on.
    for _ in 0..400 {
        let copies = (2_000.0 * fraction_in_force(&rig)) as u64;
        round(&rig, &core, 2_000, copies, &mut job, &mut rng).await;
        if core.rollout(id).unwrap().rollout.phase != "simulating" {
            break;
        }
    }
    let waiting = core.rollout(id).unwrap();
    assert_eq!(waiting.rollout.phase, "awaiting_approval");
    assert_eq!(fraction_in_force(&rig), 0.05);
    assert_eq!(
        waiting.mirror.unwrap().reason,
        mirror::MirrorReason::Watching
    );

    // Copies keep flowing at the watch fraction and are judged: the verdict shown is live.
    let judged = waiting.evidence.unwrap().jobs;
    for _ in 0..10 {
        round(&rig, &core, 2_000, 100, &mut job, &mut rng).await;
    }
    let still = core.rollout(id).unwrap();
    assert_eq!(still.rollout.phase, "awaiting_approval");
    assert_eq!(still.evidence.unwrap().jobs, judged + 1_000);
    assert!(still.rollout.verdict.unwrap().jobs >= judged + 1_000);

    // v2 turns bad while it waits: pulled, and nothing is copied any more.
    rig.fake
        .add_pairs("router", failing_pairs(job, 100, "v1", "v2"));
    core.tick().await;
    let detail = core.rollout(id).unwrap();
    assert_eq!(detail.rollout.phase, "rolled_back");
    assert_eq!(
        detail.transitions.last().unwrap().from,
        Phase::AwaitingApproval
    );
    assert_eq!(router_machines_active(&rig), ["v1"]);
    assert_eq!(fraction_in_force(&rig), 0.0);

    // Each move of the fraction was one new config: no flapping between them.
    let fractions: Vec<f64> = rig
        .fake
        .accepted("router")
        .iter()
        .map(|c| c.mirror_fraction)
        .collect();
    let mut moves = fractions.clone();
    moves.dedup();
    assert_eq!(moves.len(), 5, "{fractions:?}");
    assert_eq!(
        [moves[0], moves[1], moves[3], moves[4]],
        [0.0, 0.2, 0.05, 0.0]
    );
    let metrics = core.metrics_text();
    assert!(
        metrics.contains("understudy_mirror_fraction{service=\"router\"} 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("understudy_mirror_copies_total{service=\"router\"}"));
}
