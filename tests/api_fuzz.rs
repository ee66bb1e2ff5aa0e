//! The admin endpoints fuzzed from their own OpenAPI documents by schemathesis (installed by
//! scripts/setup.sh), four runs:
//!
//! - a real controller (SQLite in a temporary directory, in-memory balancers) on a loopback port,
//!   seeded with a release and a registered machine, once without a token (every mutating call
//!   must be refused) and once with it;
//! - a real balancer process (`understudy_proxy::spawn_with`) with a key, fuzzed anonymously: its
//!   config and stats reads, config pushes and key rotations must all be refused (hooks.py's
//!   `keyed_balancer_refuses_anonymous`, and schemathesis's own check of the signed-read scheme);
//! - a keyless balancer (`insecure_no_key`), so that the fuzzer's configs reach the validation and
//!   its cursors the stats.
//!
//! A run fails on any failed check: a 5xx, a status, content type or body the document does not
//! describe, an input the document forbids but the endpoint accepts, an error that is not JSON
//! `{"error": "..."}` (tests/api_fuzz/hooks.py); and every server must still answer `/healthz`
//! afterwards (no panic took its endpoint down).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use understudy::api::client::AdminClient;
use understudy::app::{self, ControllerConfig, ControllerHandle};
use understudy::runtime::balancer::FakeBalancer;
use understudy_hub::SecretKey;
use understudy_proxy::{
    BalancerKey, BalancerSpec, ConfigSigning, ProcessConfig, RunningBalancers, SpawnOptions,
};
use understudy_wire::{BalancerConfig, MachineEntry, PoolRole};

const TOKEN: &str = "fuzz-token";
/// Same seed, same cases: a failure is reproduced by running the test again.
const SEED: &str = "20251201";
/// Cases per operation and phase: about 1,700 cases a controller run (some 15 s on two cores),
/// about 400 a balancer run.
const MAX_EXAMPLES: &str = "50";
/// A bound on each run, whatever schemathesis decides to try.
const RUN_LIMIT: Duration = Duration::from_secs(50);

const CLUSTER: &str = r#"
[controller]
tick_ms = 100

[hub]
# Subscribing needs a signed token: no fuzzed request opens an endless event stream.
subscriber_auth = true

# Balancer URLs are never dialled: the controller runs with in-memory balancers.
[services.router]
depends_on = ["db"]
requires_approval = true
balancer = "http://127.0.0.1:9"

[services.db]
balancer = "http://127.0.0.1:9"

[[machines]]
id = "router-1"
service = "router"
version = "v1"
address = "127.0.0.1:8011"
config = "active"

[[machines]]
id = "router-2"
service = "router"
version = "v2"
address = "127.0.0.1:8012"
config = "simulation"

[[machines]]
id = "db-1"
service = "db"
version = "v1"
address = "127.0.0.1:8031"
config = "active"

[[machines]]
id = "db-2"
service = "db"
version = "v2"
address = "127.0.0.1:8032"
config = "simulation"
"#;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api_fuzz")
}

/// Fails (never skips) when schemathesis is missing: CI must fuzz.
fn require_schemathesis() {
    let found = std::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "schemathesis is not installed (`python3 -m schemathesis.cli` failed): run scripts/setup.sh"
    );
}

async fn start_controller(state: &Path) -> ControllerHandle {
    let cluster =
        understudy::config::cluster::parse("api_fuzz.toml", CLUSTER).expect("valid cluster");
    let config = ControllerConfig {
        tick: cluster.controller.tick,
        store: understudy::config::store::StoreLocation::Sqlite(state.join("understudy.db")),
        lease: None,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.to_string(),
        cluster,
    };
    app::start_with_client(config, Arc::new(FakeBalancer::new()))
        .await
        .expect("the controller starts")
}

/// Something for the reads to show: a release (rollout 1) and a registered machine.
async fn seed(controller: &ControllerHandle) {
    let client = AdminClient::new(&controller.admin_url(), Some(TOKEN.into())).unwrap();
    let _: Value = client
        .post("/api/v1/releases", &json!({ "services": { "db": "v2" } }))
        .await
        .expect("seed release");
    let machine = json!({
        "id": "db-9", "service": "db", "version": "v2", "address": "127.0.0.1:8039"
    });
    let _: Value = client
        .post("/api/v1/machines", &machine)
        .await
        .expect("seed machine");
}

/// The balancer of `media` with one active machine (never contacted: no job is sent).
fn start_balancer(keyed: bool) -> RunningBalancers {
    let config = BalancerConfig {
        service: "media".into(),
        version: 1,
        epoch: 0,
        mirror_fraction: 1.0,
        compare_body: false,
        compare: None,
        compare_headers: Vec::new(),
        drain_timeout_ms: 30_000,
        machines: vec![MachineEntry {
            id: "media-1".into(),
            version: "v1".into(),
            address: "127.0.0.1:9".into(),
            weight: 100,
            config: PoolRole::Active,
            health_path: None,
        }],
    };
    let loopback = "127.0.0.1:0".parse().unwrap();
    let process = ProcessConfig::new(loopback, vec![BalancerSpec::new(loopback, config)]);
    let options = if keyed {
        let key = BalancerKey::given(SecretKey::generate());
        SpawnOptions {
            signing: ConfigSigning {
                keys: [("media".to_string(), key)].into(),
                ..ConfigSigning::default()
            },
            marker_key: Some(SecretKey::generate()),
            ..SpawnOptions::default()
        }
    } else {
        SpawnOptions {
            insecure_no_key: true,
            ..SpawnOptions::default()
        }
    };
    understudy_proxy::spawn_with(process, options).expect("the balancer starts")
}

/// `GET /healthz` of a balancer answers `ok`.
async fn balancer_is_healthy(balancer: &RunningBalancers) -> bool {
    let url = format!("http://{}/healthz", balancer.admin_addr());
    let client = understudy::http_json::client();
    let answer = understudy::http_json::exchange(
        &client,
        http::Method::GET,
        &url,
        None,
        None,
        Duration::from_secs(5),
    )
    .await;
    matches!(answer, Ok((200, body)) if body.as_ref() == b"ok\n")
}

/// One schemathesis run against the document at `url`.
struct Run {
    label: &'static str,
    url: String,
    /// The controller's bearer token, if the run sends it.
    token: Option<&'static str>,
    /// A keyed balancer fuzzed without its key: hooks.py then refuses any 2xx on its guarded
    /// operations.
    keyed_balancer: bool,
}

/// One schemathesis run; its JSON report is written to `report`.
async fn schemathesis(run: &Run, report: &Path) -> Output {
    let (url, token) = (&run.url, run.token);
    let mut command = tokio::process::Command::new("python3");
    command
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(fuzz_dir().join("schemathesis.toml"))
        .args(["--no-color", "run"])
        .arg(format!("{url}/api/v1/openapi.json"))
        .args([
            "--seed",
            SEED,
            "--max-examples",
            MAX_EXAMPLES,
            "--workers",
            "1",
        ])
        .args([
            "--request-timeout",
            "10",
            "--report",
            "json",
            "--report-json-path",
        ])
        .arg(report)
        .env("SCHEMATHESIS_HOOKS", fuzz_dir().join("hooks.py"))
        .env(
            "UNDERSTUDY_FUZZ_KEYED_BALANCER",
            if run.keyed_balancer { "1" } else { "0" },
        )
        // Hypothesis and schemathesis write their caches and reports beside the run.
        .current_dir(report.parent().unwrap())
        .kill_on_drop(true);
    if let Some(token) = token {
        command.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran past {RUN_LIMIT:?}"))
        .expect("schemathesis runs")
}

/// What a run tried and found, from its JSON report; the failures as lines.
fn summary(label: &str, output: &Output, report: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(report).unwrap_or_else(|e| {
        panic!(
            "{label}: no report ({e}); schemathesis said:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    let line = format!(
        "{label}: {} operations tested, {} cases generated, exit code {}",
        report["operations"]["tested"], report["test_cases"]["generated"], report["exit_code"]
    );
    let mut problems: Vec<String> = report["failures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            format!(
                "{label}: {} x{} on {}",
                f["title"], f["count"], f["operations"]
            )
        })
        .collect();
    problems.extend(
        report["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{label}: error {} x{}", e["title"], e["count"])),
    );
    if !output.status.success() && problems.is_empty() {
        problems.push(format!(
            "{label}: schemathesis exited with {}",
            output.status
        ));
    }
    (line, problems)
}

/// Every run in turn (two cores: one at a time); what each tried, and every problem found.
async fn fuzz(runs: &[Run], dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for run in runs {
        let dir = dir.join(run.label.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let report = dir.join("report.json");
        let output = schemathesis(run, &report).await;
        let (line, found) = summary(run.label, &output, &report);
        if !found.is_empty() {
            println!("{}", String::from_utf8_lossy(&output.stdout));
        }
        lines.push(line);
        problems.extend(found);
    }
    (lines, problems)
}

#[test]
fn schemathesis_finds_nothing_wrong_with_the_admin_apis() {
    require_schemathesis();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let state = tempfile::tempdir().unwrap();
        let controller = start_controller(state.path()).await;
        seed(&controller).await;
        let keyed = start_balancer(true);
        let keyless = start_balancer(false);
        let url = controller.admin_url();
        let balancer_url = |b: &RunningBalancers| format!("http://{}", b.admin_addr());
        let runs = [
            Run {
                label: "controller without token",
                url: url.clone(),
                token: None,
                keyed_balancer: false,
            },
            Run {
                label: "controller with token",
                url: url.clone(),
                token: Some(TOKEN),
                keyed_balancer: false,
            },
            Run {
                label: "keyed balancer",
                url: balancer_url(&keyed),
                token: None,
                keyed_balancer: true,
            },
            Run {
                label: "keyless balancer",
                url: balancer_url(&keyless),
                token: None,
                keyed_balancer: false,
            },
        ];
        let (lines, mut problems) = fuzz(&runs, state.path()).await;
        let health: Value = AdminClient::new(&url, None)
            .unwrap()
            .get("/healthz")
            .await
            .expect("the controller still answers after the fuzzing");
        assert_eq!(health["status"], "ok");
        for (label, balancer) in [("keyed", &keyed), ("keyless", &keyless)] {
            if !balancer_is_healthy(balancer).await {
                problems.push(format!("the {label} balancer no longer answers /healthz"));
            }
        }
        controller.shutdown().await;
        keyed.shutdown();
        keyless.shutdown();
        println!("{}", lines.join("\n"));
        assert!(
            problems.is_empty(),
            "schemathesis found:\n{}",
            problems.join("\n")
        );
    });
}
