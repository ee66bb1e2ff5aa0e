//! End-to-end: one test per scenario family, each playing a file of `scenarios/` on loopback
//! (machines, balancers, controller and load generator in this process) and checking what a
//! release engineer would: each service's outcome, the release order, and that no caller was hurt.

use std::path::Path;
use std::sync::Mutex;

use understudy::scenario::{self, Expected, RunOptions, ScenarioReport};

/// Scenarios measure latency: running two at once on a 2-core machine would judge the machine's
/// contention instead of v2, so they take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn play(file: &str) -> ScenarioReport {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    let scenario = scenario::spec::load_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    play_scenario(&scenario)
}

fn play_scenario(scenario: &scenario::Scenario) -> ScenarioReport {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime
        .block_on(scenario::run(scenario, &RunOptions::default()))
        .unwrap_or_else(|e| panic!("{}: {e}", scenario.name));
    println!("{}", report.table());
    report
}

fn outcome(report: &ScenarioReport, service: &str) -> Expected {
    report.services[service].outcome
}

/// What every scenario must show whatever v2 does: callers saw no error and the outcomes matched.
fn assert_callers_unhurt_and_as_expected(report: &ScenarioReport) {
    assert!(report.active_jobs.sent > 0, "no load was sent");
    assert_eq!(report.active_jobs.errors, 0, "callers saw errors");
    assert_eq!(report.simulation_side_effects, 0);
    assert!(report.passed, "not as expected: {:?}", report.failures);
}

#[test]
fn identical_v2_is_promoted() {
    let report = play("identical.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Promoted);
    assert_eq!(report.release_order, ["media"]);
    assert!(report.services["media"].jobs_compared >= 300);
}

#[test]
fn median_regression_is_rolled_back() {
    let report = play("p50-regression.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::RolledBack);
    assert!(
        report.release_order.is_empty(),
        "a rolled-back v2 never joins"
    );
}

#[test]
fn tail_only_regression_is_rolled_back() {
    let report = play("tail-regression.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::RolledBack);
}

#[test]
fn one_point_error_regression_is_rolled_back() {
    let report = play("error-rate.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::RolledBack);
}

#[test]
fn response_mismatch_is_rolled_back() {
    let report = play("mismatch.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::RolledBack);
}

#[test]
fn hanging_v2_is_rolled_back_without_hurting_callers() {
    let report = play("hang.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::RolledBack);
}

#[test]
fn crashing_v2_is_rolled_back_without_hurting_callers() {
    let report = play("crash.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::RolledBack);
}

#[test]
fn diamond_release_joins_in_dependency_order() {
    let report = play("diamond.toml");
    assert_callers_unhurt_and_as_expected(&report);
    let position = |s: &str| {
        report
            .release_order
            .iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s} never joined: {:?}", report.release_order))
    };
    for (below, above) in [
        ("db", "cache"),
        ("db", "queue"),
        ("cache", "api"),
        ("queue", "api"),
        ("api", "router"),
    ] {
        assert!(
            position(below) < position(above),
            "{below} must join before {above}: {:?}",
            report.release_order
        );
    }
}

#[test]
fn manual_approval_through_the_endpoint_promotes() {
    let report = play("approval.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Promoted);
    assert_eq!(report.ops.len(), 1);
    assert!(
        report.ops[0].accepted,
        "approval refused: {:?}",
        report.ops[0]
    );
}

#[test]
fn abort_by_ops_pulls_v2() {
    let report = play("abort.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Aborted);
    assert!(report.ops[0].accepted, "abort refused: {:?}", report.ops[0]);
}

#[test]
fn voice_calls_cross_the_switch_without_a_drop() {
    let report = play("voice-calls.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Promoted);
    assert_eq!(report.dropped_sessions, 0);
    let load = report.load.as_ref().expect("load report");
    assert!(load.calls_completed > 0, "no call completed");
}

#[test]
fn traffic_spike_sheds_copies_not_callers() {
    let report = play("spike.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Promoted);
}

#[test]
fn low_traffic_is_not_enough_data_never_a_failure() {
    let report = play("low-traffic.toml");
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Pending);
    let rule = report.services["media"].verdict["decision"].as_str();
    assert_eq!(rule, Some("not_enough_data"));
}

#[test]
fn the_demo_promotes_one_service_and_rolls_back_another() {
    let scenario = scenario::spec::parse("demo", scenario::DEMO).expect("demo parses");
    let report = play_scenario(&scenario);
    assert_callers_unhurt_and_as_expected(&report);
    assert_eq!(outcome(&report, "media"), Expected::Promoted);
    assert_eq!(outcome(&report, "routing"), Expected::RolledBack);
}

#[test]
fn every_library_scenario_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("scenarios/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            scenario::spec::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 13, "the library holds {count} scenarios");
}
