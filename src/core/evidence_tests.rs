use super::*;

fn test(name: &str, estimate: f64, margin: f64) -> TestEvidence {
    TestEvidence {
        name: name.to_string(),
        estimate,
        margin,
        interval: [estimate - 0.01, estimate + 0.01],
        beyond_margin: estimate > margin,
        evidence: Evidence::Pass,
    }
}

fn snap(seq: u64, errors: f64, p99: f64) -> EvidenceSnapshot {
    EvidenceSnapshot {
        id: None,
        seq,
        at_ms: 1_000 * seq,
        jobs: 5_000,
        decision: Decision::Pass,
        tests: vec![test("errors", errors, 0.005), test("latency p99", p99, 0.0)],
    }
}

const MINUTE: Duration = Duration::from_secs(60);

fn case<'a>(
    named: &'a str,
    log: &'a [EvidenceSnapshot],
    current: &'a EvidenceSnapshot,
    earlier: &'a [Approval],
    operator: &'a str,
    now_ms: u64,
) -> ApprovalCase<'a> {
    ApprovalCase {
        rollout: 3,
        approvers: 1,
        ttl: MINUTE,
        named,
        log,
        current,
        earlier,
        operator,
        now_ms,
    }
}

#[test]
fn only_changes_for_the_worse_are_material() {
    let shown = snap(0, 0.001, -0.02);
    assert!(snap(1, 0.002, -0.01).changes_since(&shown).is_empty());
    let worse = snap(1, 0.001, 0.003);
    let changes = worse.changes_since(&shown);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].contains("latency p99 estimate moved past its margin"));
    // Back within its margin: better, not a reason to refuse.
    assert!(shown.changes_since(&worse).is_empty());
    assert!(shown.differs_materially(&worse));
    let failed = EvidenceSnapshot {
        decision: Decision::Fail,
        ..snap(2, 0.001, -0.02)
    };
    assert!(failed.changes_since(&shown)[0].contains("flipped from pass to fail"));
}

#[test]
fn evidence_ids_read_back_and_bad_ones_are_named() {
    let r = EvidenceRef {
        rollout: 3,
        seq: 2,
        shown_ms: 1_733_000_000_123,
    };
    assert_eq!(r.to_string().parse::<EvidenceRef>(), Ok(r));
    for bad in ["", "3", "3.2", "3.2.x", "3.2.1.0", "a.b.c", "-"] {
        let error = bad.parse::<EvidenceRef>().unwrap_err();
        assert!(error.contains("not an evidence id"), "{bad}: {error}");
    }
}

#[test]
fn an_approval_of_what_still_stands_joins() {
    let log = [snap(0, 0.001, -0.02)];
    let current = snap(0, 0.0015, -0.019);
    let (outcome, approval) =
        decide_approval(&case("3.0.10000", &log, &current, &[], "alice", 30_000)).unwrap();
    assert_eq!(
        outcome,
        ApprovalOutcome::Join {
            approvers: vec!["alice".into()]
        }
    );
    assert_eq!(approval.expires_at_ms, 90_000);
    assert_eq!(approval.seq, 0);
}

#[test]
fn stale_expired_foreign_and_future_evidence_are_refused() {
    let log = [snap(0, 0.001, -0.02), snap(1, 0.001, 0.004)];
    let current = snap(1, 0.001, 0.004);
    let refuse = |named: &str, now_ms| {
        decide_approval(&case(named, &log, &current, &[], "alice", now_ms)).unwrap_err()
    };
    assert!(
        matches!(refuse("3.0.10000", 20_000), ApprovalRefusal::Stale(m)
        if m.contains("latency p99 estimate moved past its margin"))
    );
    assert!(
        matches!(refuse("3.1.10000", 80_000), ApprovalRefusal::Expired(m)
        if m.contains("expired") && m.contains("70 s ago"))
    );
    assert!(
        matches!(refuse("4.1.10000", 20_000), ApprovalRefusal::Bad(m)
        if m.contains("rollout 4's, not rollout 3's"))
    );
    assert!(
        matches!(refuse("3.1.99000", 20_000), ApprovalRefusal::Bad(m)
        if m.contains("future"))
    );
    assert!(
        matches!(refuse("3.7.10000", 20_000), ApprovalRefusal::Stale(m)
        if m.contains("no evidence 7"))
    );
    assert!(matches!(
        refuse("nonsense", 20_000),
        ApprovalRefusal::Bad(_)
    ));
    // The newest snapshot is approvable.
    assert!(decide_approval(&case("3.1.10000", &log, &current, &[], "alice", 20_000)).is_ok());
}

#[test]
fn two_approvers_must_be_two_operators_whose_approvals_still_stand() {
    let log = [
        snap(0, 0.001, -0.02),
        snap(1, 0.001, 0.004),
        snap(2, 0.001, -0.01),
    ];
    let current = snap(2, 0.001, -0.01);
    let two = |named: &'static str, earlier: &'static [Approval], who: &'static str, now| {
        let log: &'static [EvidenceSnapshot] = Box::leak(log.to_vec().into_boxed_slice());
        let current: &'static EvidenceSnapshot = Box::leak(Box::new(current.clone()));
        decide_approval(&ApprovalCase {
            approvers: 2,
            ..case(named, log, current, earlier, who, now)
        })
    };
    let (first, alice) = two("3.2.10000", &[], "alice", 20_000).unwrap();
    assert_eq!(first, ApprovalOutcome::Recorded { have: 1, need: 2 });
    let earlier: &'static [Approval] = Box::leak(vec![alice.clone()].into_boxed_slice());
    assert!(matches!(two("3.2.10000", earlier, "alice", 21_000),
        Err(ApprovalRefusal::SameOperator(m)) if m.contains("alice already approved")));
    let (second, _) = two("3.2.10000", earlier, "bob", 22_000).unwrap();
    assert_eq!(
        second,
        ApprovalOutcome::Join {
            approvers: vec!["alice".into(), "bob".into()]
        }
    );
    // Alice's approval expired: Bob's is the first again.
    let (late, _) = two("3.2.60000", earlier, "bob", 81_000).unwrap();
    assert_eq!(late, ApprovalOutcome::Recorded { have: 1, need: 2 });
    // The evidence Alice approved no longer stands (a test moved past its margin since): her
    // approval does not count, and Bob's alone is the first of two.
    let log = [snap(0, 0.001, -0.02), snap(1, 0.001, 0.004)];
    let current = snap(1, 0.001, 0.004);
    let void = Approval { seq: 0, ..alice };
    let earlier = [void];
    let case = ApprovalCase {
        approvers: 2,
        ..case("3.1.10000", &log, &current, &earlier, "bob", 21_000)
    };
    let (outcome, _) = decide_approval(&case).unwrap();
    assert_eq!(outcome, ApprovalOutcome::Recorded { have: 1, need: 2 });
}

#[test]
fn the_series_keeps_its_points_few_and_evenly_spaced() {
    let report = |n: u64| understudy_judge::TestReport {
        name: "errors".into(),
        report: understudy_judge::MarginReport {
            observations: n,
            estimate: 0.0,
            interval: [0.0, 0.0],
            margin: 0.005,
            fail_evidence: 1.0,
            fail_threshold: 100.0,
            pass_evidence: n as f64,
            pass_threshold: 20.0,
            evidence: Evidence::Open,
        },
    };
    let mut series = EvidenceSeries::default();
    for jobs in 1..=10_000u64 {
        if series.due(jobs) {
            series.push(jobs, &[report(jobs)]);
        }
    }
    assert!(series.jobs.len() < SERIES_POINTS, "{}", series.jobs.len());
    assert!(series.jobs.len() > SERIES_POINTS / 4);
    let step = series.jobs[1] - series.jobs[0];
    assert!(series.jobs.windows(2).all(|w| w[1] - w[0] == step));
    assert_eq!(
        series.tests[0].pass,
        series.jobs.iter().map(|&j| j as f64).collect::<Vec<_>>()
    );
    assert_eq!(series.tests[0].fail_threshold, 100.0);
}
