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
