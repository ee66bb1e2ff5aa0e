//! The production path on real processes: the built `understudy-proxy` and `understudy
//! controller` binaries as child processes, ordinary HTTP servers as machines (they run no
//! Understudy code and never publish on the hub), load from the load generator. One service is
//! released v1 -> v2 (passes, completes) and then v2 -> v3 (v3 fails 5% of its jobs: rolled back)
//! with no caller error; and the same releases again while the controller is killed with SIGKILL
//! at seeded moments and started again on its database.
//!
//! The `understudy-proxy` binary belongs to another package of the workspace: it is taken from
//! the target directory of `understudy` (`cargo test --workspace` builds both).

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use understudy::api::client::AdminClient;

use understudy::runtime::controller::RolloutDetail;

use support::{
    free_port, joined, latest_id, phase_chain, phase_reached, release, wait_finished, Answer,
    Deployment, Load, CYCLE, FINISHED,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_run_on_plain_services_across_processes() {
    let deployment = Deployment::start().await;
    let (controller, client) = deployment.controller();
    let url = client.base().to_string();
    let load = Load::start(deployment.listen);

    release(&url, "media=v2");
    let first = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(first.phase, "complete", "{:?}", first.verdict);
    let chain = phase_chain(&client, first.id).await;
    assert_eq!(
        joined(&chain),
        "pending > simulating > judged(pass) > joining[0] > retiring > complete"
    );

    release(&url, "media=v3");
    let second = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(second.phase, "rolled_back", "{:?}", second.verdict);
    let verdict = serde_json::to_value(second.verdict.expect("judged")).unwrap();
    assert_eq!(
        verdict["baseline"], "active",
        "no control runs v2: {verdict}"
    );
    assert!(
        verdict["rule"].as_str().unwrap().contains("error"),
        "{verdict}"
    );
    let v3_jobs = deployment.jobs_of("media-3");

    let (sent, errors) = load.finish().await;
    println!("callers: {sent} jobs sent, {errors} errors; v3 answered {v3_jobs} copies");
    assert!(sent > 1000, "{sent}");
    assert_eq!(errors, 0, "a caller saw an error");
    assert!(v3_jobs > 0);
    assert!(deployment.jobs_of("media-2") > 0);
    // A supervisor's SIGTERM stops the controller cleanly.
    let mut controller = controller;
    let pid = controller.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(controller.0.wait().unwrap().success(), "exit on SIGTERM");
}

/// Kills the controller at a seeded moment of each of 20 releases and starts it again on its
/// database: each release ends as it would have, its transitions exactly the expected chain
/// (none lost, none applied twice), and no caller sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_survive_the_controller_killed_with_sigkill() {
    let deployment = Deployment::start().await;
    let (mut controller, mut client) = deployment.controller();
    let load = Load::start(deployment.listen);
    let mut rng = StdRng::seed_from_u64(13);
    let mut table = Vec::new();
    for round in 0..20 {
        let (target, expected) = CYCLE[round % CYCLE.len()];
        release(client.base(), target);
        let id = latest_id(&client).await;
        // The moment: a seeded phase the release is in while it runs (every fifth round: after
        // it ended, which a restart must leave alone too), then a seeded delay.
        let phases: Vec<&str> = expected.split(" > ").collect();
        let running: Vec<&str> = phases
            .iter()
            .copied()
            .filter(|p| *p != "pending" && !p.starts_with("judged"))
            .filter(|p| !FINISHED.contains(p))
            .collect();
        let aim = if round % 5 == 4 {
            phases[phases.len() - 1]
        } else {
            running[rng.gen_range(0..running.len())]
        };
        let phase = phase_reached(&client, id, aim).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
        controller.kill9();
        (controller, client) = deployment.controller();
        let view = wait_finished(&client, id, Duration::from_secs(60)).await;
        let chain = joined(&phase_chain(&client, id).await);
        println!("{round:2} {target}  killed at {phase:17} -> {}", view.phase);
        assert_eq!(chain, expected, "{target}, killed at {phase}");
        table.push((target, phase, view.phase));
    }
    let (sent, errors) = load.finish().await;
    let phases: std::collections::BTreeSet<&str> =
        table.iter().map(|(_, phase, _)| phase.as_str()).collect();
    println!("killed in: {phases:?}; callers: {sent} jobs sent, {errors} errors");
    for phase in [
        "simulating",
        "joining[0]",
        "retiring",
        "complete",
        "rolled_back",
    ] {
        assert!(
            phases.contains(phase),
            "never killed in {phase}: {phases:?}"
        );
    }
    assert_eq!(errors, 0, "a caller saw an error");
}

/// A balancer killed with SIGKILL comes back on its own file (v1 active, version 0); the
/// controller sees the older config at its next stats read and pushes the committed one again,
/// so callers go on reaching v2 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_balancer_is_given_its_config_again() {
    let mut deployment = Deployment::start().await;
    let (_controller, client) = deployment.controller();
    let load = Load::start(deployment.listen);
    release(client.base(), "media=v2");
    let done = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(done.phase, "complete", "{:?}", done.verdict);
    let (sent, errors) = load.finish().await;
    assert_eq!(errors, 0, "{sent} sent");

    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    deployment.restart_balancer();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let views: Vec<serde_json::Value> = client.get("/api/v1/balancers").await.unwrap();
        let view = &views[0];
        // Stats read after the restart, showing the controller's config running.
        let stats = &view["last_stats"];
        let fresh = stats["at_ms"].as_u64().is_some_and(|at| at > restarted_ms);
        let running = stats["config_version"].as_u64();
        if fresh && view["in_sync"] == true && running == view["desired_version"].as_u64() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the balancer never got its config again: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v1_before = deployment.jobs_of("media-1");
    let v2_before = deployment.jobs_of("media-2");
    let report = understudy_loadgen::run_load(
        understudy_loadgen::LoadSpec::constant(200.0, 1.0),
        deployment.listen,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.errors, 0);
    assert_eq!(
        deployment.jobs_of("media-1"),
        v1_before,
        "a retired machine served callers"
    );
    assert!(deployment.jobs_of("media-2") >= v2_before + report.sent);
}

/// A balancer that is down when the controller starts: the controller keeps running, shows why
/// the push failed (naming the balancer), retries, and the release goes through once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_down_at_start_is_retried_with_its_reason() {
    let mut deployment = Deployment::start().await;
    deployment.balancer.kill9();
    let (_controller, client) = deployment.controller();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let views: Vec<serde_json::Value> = client.get("/api/v1/balancers").await.unwrap();
        if let Some(error) = views[0]["last_push_error"].as_str() {
            assert_eq!(views[0]["in_sync"], false);
            break error.to_string();
        }
        assert!(Instant::now() < deadline, "no push error shown: {views:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let url = deployment.balancer_admin.trim_end_matches('/');
    assert!(
        reason.contains(url) && reason.contains("refused"),
        "{reason}"
    );
    deployment.restart_balancer();
    let load = Load::start(deployment.listen);
    release(client.base(), "media=v2");
    let done = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(done.phase, "complete", "{:?}", done.verdict);
    let (_, errors) = load.finish().await;
    assert_eq!(errors, 0);
    let views: Vec<serde_json::Value> = client.get("/api/v1/balancers").await.unwrap();
    assert_eq!(views[0]["last_push_error"], serde_json::Value::Null);
}

/// The listing's entry for machine `id`, once `done` holds for it.
async fn machine_when(
    client: &AdminClient,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listing: Vec<serde_json::Value> = client.get("/api/v1/machines").await.unwrap();
        let entry = listing.into_iter().find(|m| m["id"] == id).expect("listed");
        if done(&entry) {
            return entry;
        }
        assert!(Instant::now() < deadline, "machine {id} stayed {entry}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_does_not_answer_is_named_and_costs_callers_nothing() {
    let mut deployment = Deployment::start().await;
    let nothing_there = SocketAddr::from(([127, 0, 0, 1], free_port()));
    deployment.silent.push(("media-9", nothing_there));
    deployment.health_paths.push(("media-1", "/healthz"));
    deployment.write_cluster();
    let (_controller, client) = deployment.controller();
    let load = Load::start(deployment.listen);
    let dead = machine_when(&client, "media-9", |m| m["health"] == "failing").await;
    assert_eq!(dead["status"], "down", "{dead}");
    let reason = dead["health_reason"].as_str().unwrap();
    assert!(
        reason.contains(&nothing_there.to_string()) && reason.contains("refused"),
        "{reason}"
    );
    let probed = machine_when(&client, "media-1", |m| m["health"] == "answering").await;
    assert_eq!(probed["status"], "running", "{probed}");
    // The control never reports on the hub either: it is shown as its balancer sees it.
    let control = machine_when(&client, "media-c", |m| m["health"] == "answering").await;
    assert_eq!(control["status"], "running", "{control}");

    release(client.base(), "media=v2");
    let done = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(done.phase, "complete", "{:?}", done.verdict);
    let (sent, errors) = load.finish().await;
    assert!(sent > 0);
    assert_eq!(
        errors, 0,
        "callers paid for the machine that does not answer"
    );
}

/// Plain JSON services with `compare = "fields"`: v3 adds 1.00 to every item's price (rolled
/// back, the rule and the rollout's `fields` naming `items[].price` with a sample of its
/// values); v2 differs from v1 only in `generated_at`, a timestamp two v1s differ in too (noise:
/// it joins). The diff is the balancer process's, the tests the controller process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_json_field_is_named_across_processes_and_a_timestamp_is_noise() {
    let json = |price_cents| Answer::Json { price_cents };
    let deployment = Deployment::start_with(
        &[
            ("media-1", "v1", "active", json(1_000)),
            ("media-c", "v1", "simulation", json(1_000)),
            ("media-2", "v2", "simulation", json(1_000)),
            ("media-3", "v3", "simulation", json(1_100)),
        ],
        Some("fields"),
    )
    .await;
    let (_controller, client) = deployment.controller();
    let url = client.base().to_string();
    let load = Load::start(deployment.listen);

    release(&url, "media=v3");
    let changed = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(changed.phase, "rolled_back", "{:?}", changed.verdict);
    let verdict = serde_json::to_value(changed.verdict.expect("judged")).unwrap();
    let rule = verdict["rule"].as_str().unwrap();
    assert!(rule.contains("items[].price"), "{verdict}");
    assert!(!rule.contains("generated_at"), "{verdict}");
    let fields = fields_of(&client, changed.id).await;
    let price = field(&fields, "items[].price");
    assert_eq!(price["class"], "regression", "{fields:?}");
    assert_eq!(price["v2_sample"]["v1"], "\"10.00\"", "{fields:?}");
    assert_eq!(price["v2_sample"]["copy"], "\"11.00\"", "{fields:?}");
    assert_eq!(price["control_differs"], 0, "{fields:?}");
    assert_eq!(
        field(&fields, "generated_at")["class"],
        "noise",
        "{fields:?}"
    );

    release(&url, "media=v2");
    let noisy = wait_finished(&client, latest_id(&client).await, Duration::from_secs(60)).await;
    assert_eq!(noisy.phase, "complete", "{:?}", noisy.verdict);
    let fields = fields_of(&client, noisy.id).await;
    assert_eq!(
        field(&fields, "generated_at")["class"],
        "noise",
        "{fields:?}"
    );
    assert!(
        fields.iter().all(|f| f["class"] != "regression"),
        "{fields:?}"
    );

    let (sent, errors) = load.finish().await;
    println!("callers: {sent} jobs sent, {errors} errors");
    assert_eq!(errors, 0, "a caller saw an error");
}

async fn fields_of(client: &AdminClient, id: i64) -> Vec<serde_json::Value> {
    let detail: RolloutDetail = client.get(&format!("/api/v1/rollouts/{id}")).await.unwrap();
    let fields = serde_json::to_value(detail.fields.expect("compared field by field")).unwrap();
    fields["fields"].as_array().expect("fields").clone()
}

fn field<'a>(fields: &'a [serde_json::Value], path: &str) -> &'a serde_json::Value {
    let found = fields.iter().find(|f| f["path"] == path);
    found.unwrap_or_else(|| panic!("no field {path} in {fields:?}"))
}
