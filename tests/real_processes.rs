//! The production path on real processes: the built `understudy-proxy` and `understudy
//! controller` binaries as child processes, ordinary HTTP servers as machines (they run no
//! Understudy code and never publish on the hub), load from the load generator. One service is
//! released v1 -> v2 (passes, completes) and then v2 -> v3 (v3 fails 5% of its jobs: rolled back)
//! with no caller error; and the same releases again while the controller is killed with SIGKILL
//! at seeded moments and started again on its database.
//!
//! The `understudy-proxy` binary belongs to another package of the workspace: it is taken from
//! the target directory of `understudy` (`cargo test --workspace` builds both).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use understudy::api::client::AdminClient;
use understudy::runtime::controller::{RolloutDetail, RolloutView};

const UNDERSTUDY: &str = env!("CARGO_BIN_EXE_understudy");
const TOKEN: &str = "real-processes-token";

fn proxy_binary() -> PathBuf {
    let path = Path::new(UNDERSTUDY).with_file_name("understudy-proxy");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release --workspace` first",
        path.display()
    );
    path
}

/// An ordinary HTTP server: `200 ok` to everything after 1.5-2.5 ms, or `500` to every
/// `fail_every`-th job.
struct PlainMachine {
    addr: SocketAddr,
    jobs: Arc<AtomicU64>,
}

impl PlainMachine {
    async fn start(fail_every: Option<u64>) -> PlainMachine {
        let jobs = Arc::new(AtomicU64::new(0));
        let counter = jobs.clone();
        let app = axum::Router::new().fallback(move || {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                // Milliseconds of work, as a real service takes: the few microseconds the mirror
                // path adds to a copy are then noise, as they are in production.
                let work_us = 1_500 + (n.wrapping_mul(7_919) % 1_000);
                tokio::time::sleep(Duration::from_micros(work_us)).await;
                match fail_every {
                    Some(every) if n.is_multiple_of(every) => {
                        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "failed")
                    }
                    _ => (axum::http::StatusCode::OK, "ok"),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        PlainMachine { addr, jobs }
    }
}

/// A child process killed when dropped (a failing test leaves nothing running).
struct Process(Child);

impl Process {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Spawns `command` and reads stdout lines until `want` has found what it looks for.
fn spawn_reading<T>(mut command: Command, mut want: impl FnMut(&str) -> Option<T>) -> (Process, T) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let mut process = Process(child);
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            process.kill9();
            panic!("the process ended before printing what was expected");
        };
        if let Some(found) = want(&line) {
            // Keep draining stdout so that the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (process, found);
        }
    }
}

/// The four machines, one balancer process, the controller's files.
struct Deployment {
    dir: tempfile::TempDir,
    machines: Vec<(&'static str, &'static str, &'static str, PlainMachine)>,
    balancer: Process,
    balancer_admin: String,
    listen: SocketAddr,
    /// Active v1 machines declared at an address where nothing listens.
    silent: Vec<(&'static str, SocketAddr)>,
    /// `health_path` of declared machines, by id.
    health_paths: Vec<(&'static str, &'static str)>,
}

/// A port free at the time of asking (for a balancer restarted on the same addresses).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Deployment {
    async fn start() -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        for name in ["media.key", "marker.key"] {
            let key = understudy_hub::SecretKey::generate();
            understudy_wire::write_key_file(&dir.path().join(name), &key).unwrap();
        }
        let mut machines = Vec::new();
        for (id, version, config, fail_every) in [
            ("media-1", "v1", "active", None),
            ("media-c", "v1", "simulation", None),
            ("media-2", "v2", "simulation", None),
            ("media-3", "v3", "simulation", Some(20)),
        ] {
            machines.push((id, version, config, PlainMachine::start(fail_every).await));
        }
        // Fixed ports, so that a restarted balancer is where the controller and callers know it.
        let balancer_toml = format!(
            "admin = \"127.0.0.1:{}\"\n[[balancers]]\nlisten = \"127.0.0.1:{}\"\n\
             [balancers.config]\nservice = \"media\"\nversion = 0\n\
             [[balancers.config.machines]]\nid = \"media-1\"\nversion = \"v1\"\n\
             address = \"{}\"\nconfig = \"active\"\n",
            free_port(),
            free_port(),
            machines[0].3.addr
        );
        std::fs::write(dir.path().join("balancer.toml"), balancer_toml).unwrap();
        let (balancer, balancer_admin, listen) = spawn_balancer(dir.path());
        let deployment = Deployment {
            dir,
            machines,
            balancer,
            balancer_admin,
            listen,
            silent: Vec::new(),
            health_paths: Vec::new(),
        };
        deployment.write_cluster();
        deployment
    }

    /// Kills the balancer with SIGKILL and starts it again on its file.
    fn restart_balancer(&mut self) {
        self.balancer.kill9();
        let (balancer, admin, listen) = spawn_balancer(self.dir.path());
        assert_eq!(
            (admin.as_str(), listen),
            (self.balancer_admin.as_str(), self.listen)
        );
        self.balancer = balancer;
    }

    fn write_cluster(&self) {
        let mut text = format!(
            r#"[controller]
admin_addr = "127.0.0.1:0"
database = "state.db"
tick_ms = 100

[defaults]
join_step_ms = 300
drain_timeout_ms = 1000

[defaults.condition]
warmup_jobs = 100
min_jobs = 300
latency = [{{ quantile = 0.5, max_ratio = 1.5 }}, {{ quantile = 0.99, max_ratio = 2.0 }}]

[services.media]
balancer = "{}"
balancer_key_file = "media.key"
"#,
            self.balancer_admin
        );
        let declared = self
            .machines
            .iter()
            .map(|(id, v, c, m)| (*id, *v, *c, m.addr));
        let silent = self.silent.iter().map(|(id, a)| (*id, "v1", "active", *a));
        for (id, version, config, address) in declared.chain(silent) {
            text.push_str(&format!(
                "\n[[machines]]\nid = \"{id}\"\nservice = \"media\"\nversion = \"{version}\"\n\
                 address = \"{address}\"\nconfig = \"{config}\"\n"
            ));
            if let Some((_, path)) = self.health_paths.iter().find(|(m, _)| *m == id) {
                text.push_str(&format!("health_path = \"{path}\"\n"));
            }
        }
        std::fs::write(self.dir.path().join("cluster.toml"), text).unwrap();
    }

    /// Starts the controller process on the deployment's files; its admin client.
    fn controller(&self) -> (Process, AdminClient) {
        let mut command = Command::new(UNDERSTUDY);
        command
            .arg("controller")
            .arg("--config")
            .arg(self.dir.path().join("cluster.toml"))
            .current_dir(self.dir.path())
            .env("UNDERSTUDY_TOKEN", TOKEN)
            .env("NO_COLOR", "1");
        let (process, url) = spawn_reading(command, |line| {
            line.strip_prefix("admin endpoint: ").map(str::to_string)
        });
        let client = AdminClient::new(&url, Some(TOKEN.to_string())).unwrap();
        (process, client)
    }

    fn jobs_of(&self, id: &str) -> u64 {
        let machine = self.machines.iter().find(|m| m.0 == id).unwrap();
        machine.3.jobs.load(Ordering::Relaxed)
    }
}

/// Starts `understudy-proxy` on `dir/balancer.toml` with its keys: the process, its admin URL
/// and the balancer's listening address.
fn spawn_balancer(dir: &Path) -> (Process, String, SocketAddr) {
    let mut command = Command::new(proxy_binary());
    command
        .arg("--config")
        .arg(dir.join("balancer.toml"))
        .arg("--key-file")
        .arg(format!("media={}", dir.join("media.key").display()))
        .arg("--marker-key-file")
        .arg(dir.join("marker.key"));
    let mut admin = None;
    let (process, (admin, listen)) = spawn_reading(command, |line| {
        if let Some(rest) = line.strip_prefix("admin ") {
            admin = rest.split_whitespace().next().map(str::to_string);
        }
        let listen = line.strip_prefix("balancer media listening on ")?;
        Some((admin.clone()?, listen.parse().unwrap()))
    });
    (process, admin, listen)
}

/// Callers' load in chunks until stopped: what callers sent and how many failed.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Load {
    fn start(target: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut sent, mut errors) = (0, 0);
            let mut seed = 1;
            while !flag.load(Ordering::Relaxed) {
                let mut spec = understudy_loadgen::LoadSpec::constant(300.0, 2.0);
                spec.seed = seed;
                seed += 1;
                let report = understudy_loadgen::run_load(spec, target, |_| {})
                    .await
                    .expect("load");
                sent += report.sent;
                errors += report.errors;
            }
            (sent, errors)
        });
        Load { stop, task }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

async fn rollouts(client: &AdminClient) -> Option<Vec<RolloutView>> {
    client.get("/api/v1/rollouts").await.ok()
}

/// Starts a release through the CLI binary, as an operator would.
fn release(client_url: &str, service_version: &str) {
    let out = Command::new(UNDERSTUDY)
        .args(["release", "--url", client_url, service_version])
        .env("UNDERSTUDY_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "release {service_version}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const FINISHED: [&str; 3] = ["complete", "rolled_back", "aborted"];

/// Waits until rollout `id` finished; its view.
async fn wait_finished(client: &AdminClient, id: i64, limit: Duration) -> RolloutView {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(view) = rollouts(client)
            .await
            .and_then(|all| all.into_iter().find(|r| r.id == id))
        {
            if FINISHED.contains(&view.phase.as_str()) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "rollout {id} still {}: {:?}",
                view.phase,
                view.verdict
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn latest_id(client: &AdminClient) -> i64 {
    let all = rollouts(client).await.expect("rollouts");
    all.iter().map(|r| r.id).max().expect("a rollout")
}

/// The phases a rollout went through, in order, checked as a chain (each from = previous to).
async fn phase_chain(client: &AdminClient, id: i64) -> Vec<String> {
    let detail: RolloutDetail = client.get(&format!("/api/v1/rollouts/{id}")).await.unwrap();
    let mut chain = vec!["pending".to_string()];
    for t in &detail.transitions {
        let from = t.from.to_string();
        assert_eq!(
            &from,
            chain.last().unwrap(),
            "rollout {id}: a transition lost: {:?}",
            detail.transitions
        );
        chain.push(t.to.to_string());
    }
    chain
}

fn joined(chain: &[String]) -> String {
    chain.join(" > ")
}

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

/// What each release of the kill test does, in turn: to v2 (passes), to v3 (fails 5% of its
/// jobs: rolled back), back to v1 (passes, on the retired v1 machine).
const CYCLE: [(&str, &str); 3] = [
    (
        "media=v2",
        "pending > simulating > judged(pass) > joining[0] > retiring > complete",
    ),
    (
        "media=v3",
        "pending > simulating > judged(fail) > rolled_back",
    ),
    (
        "media=v1",
        "pending > simulating > judged(pass) > joining[0] > retiring > complete",
    ),
];

/// Polls rollout `id` until it is in phase `aim` (as the transitions name it) or finished; the
/// phase it was seen in.
async fn phase_reached(client: &AdminClient, id: i64, aim: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = rollouts(client)
            .await
            .and_then(|all| all.into_iter().find(|r| r.id == id));
        if let Some(view) = view {
            let phase = match (view.phase.as_str(), view.step) {
                ("joining", Some(step)) => format!("joining[{step}]"),
                (p, _) => p.to_string(),
            };
            if aim.starts_with(&phase) || FINISHED.contains(&view.phase.as_str()) {
                return phase;
            }
        }
        assert!(
            Instant::now() < deadline,
            "rollout {id} never reached {aim}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
