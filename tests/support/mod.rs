//! What the tests on real processes share: ordinary HTTP servers as machines, the balancer and
//! controller binaries as child processes (killed when dropped), callers' load, and reading a
//! rollout's progress and transitions from a controller's admin endpoint.
//!
//! Each test binary uses a subset of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy::api::client::AdminClient;
use understudy::runtime::controller::{RolloutDetail, RolloutView};

pub const UNDERSTUDY: &str = env!("CARGO_BIN_EXE_understudy");
pub const TOKEN: &str = "real-processes-token";

pub fn proxy_binary() -> PathBuf {
    let path = Path::new(UNDERSTUDY).with_file_name("understudy-proxy");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release --workspace` first",
        path.display()
    );
    path
}

/// What a plain machine answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// `200 ok`, or `500` to every `fail_every`-th job.
    Text { fail_every: Option<u64> },
    /// A JSON object naming the job's path, with two items at the version's price (in cents)
    /// and a `generated_at` fresh on every answer: two machines of one version differ there only.
    Json { price_cents: u64 },
}

/// An ordinary HTTP server answering after 1.5-2.5 ms, as its [`Answer`] says.
pub struct PlainMachine {
    pub addr: SocketAddr,
    pub jobs: Arc<AtomicU64>,
}

impl PlainMachine {
    pub async fn start(fail_every: Option<u64>) -> PlainMachine {
        PlainMachine::answering(Answer::Text { fail_every }).await
    }

    pub async fn answering(answer: Answer) -> PlainMachine {
        let jobs = Arc::new(AtomicU64::new(0));
        let counter = jobs.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                // Milliseconds of work, as a real service takes: the few microseconds the mirror
                // path adds to a copy are then noise, as they are in production.
                let work_us = 1_500 + (n.wrapping_mul(7_919) % 1_000);
                tokio::time::sleep(Duration::from_micros(work_us)).await;
                plain_answer(answer, n, uri.path())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        PlainMachine { addr, jobs }
    }
}

fn plain_answer(answer: Answer, n: u64, path: &str) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    match answer {
        Answer::Text {
            fail_every: Some(every),
        } if n.is_multiple_of(every) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "failed").into_response()
        }
        Answer::Text { .. } => (StatusCode::OK, "ok").into_response(),
        Answer::Json { price_cents } => {
            let price = |extra: u64| {
                let cents = price_cents + extra;
                format!("{}.{:02}", cents / 100, cents % 100)
            };
            let generated_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let body = serde_json::json!({
                "answer": path,
                "items": [{"sku": "a", "price": price(0)}, {"sku": "b", "price": price(250)}],
                "generated_at": format!("{generated_at}-{n}"),
            });
            (
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
    }
}

/// A child process killed when dropped (a failing test leaves nothing running).
pub struct Process(pub Child);

impl Process {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends `SIG<name>` (`STOP`, `CONT`, `TERM`) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.0.id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(&pid)
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How long a process may take to print what `spawn_reading` waits for.
const SPAWN_LIMIT: Duration = Duration::from_secs(60);

/// Spawns `command` and reads stdout lines until `want` has found what it looks for (within a
/// minute).
pub fn spawn_reading<T>(
    mut command: Command,
    mut want: impl FnMut(&str) -> Option<T>,
) -> (Process, T) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let mut process = Process(child);
    // Lines come from a thread, so that a silent process cannot hold the test past its bound;
    // the thread keeps draining stdout afterwards so that the child never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + SPAWN_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                process.kill9();
                panic!("the process printed nothing expected within {SPAWN_LIMIT:?}");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = process.0.wait();
                panic!("the process ended ({status:?}) before printing what was expected");
            }
        };
        if let Some(found) = want(&line) {
            return (process, found);
        }
    }
}

/// The four machines, one balancer process, the controller's files.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub machines: Vec<(&'static str, &'static str, &'static str, PlainMachine)>,
    pub balancer: Process,
    pub balancer_admin: String,
    pub listen: SocketAddr,
    /// Active v1 machines declared at an address where nothing listens.
    pub silent: Vec<(&'static str, SocketAddr)>,
    /// `health_path` of declared machines, by id.
    pub health_paths: Vec<(&'static str, &'static str)>,
    /// The service's `compare` in the cluster file, when not the default.
    pub compare: Option<&'static str>,
}

/// A declared machine: id, version, configuration and what it answers.
pub type MachineSpec = (&'static str, &'static str, &'static str, Answer);

/// A port free at the time of asking (for a balancer restarted on the same addresses).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Deployment {
    /// v1 active and as the control, v2 alike, v3 failing every 20th job: all answering text.
    pub async fn start() -> Deployment {
        let text = |fail_every| Answer::Text { fail_every };
        Deployment::start_with(
            &[
                ("media-1", "v1", "active", text(None)),
                ("media-c", "v1", "simulation", text(None)),
                ("media-2", "v2", "simulation", text(None)),
                ("media-3", "v3", "simulation", text(Some(20))),
            ],
            None,
        )
        .await
    }

    /// The machines of `specs` (the first one active: the balancer starts with it) and a
    /// balancer, the service comparing answers by `compare`.
    pub async fn start_with(specs: &[MachineSpec], compare: Option<&'static str>) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        for name in ["media.key", "marker.key"] {
            let key = understudy_hub::SecretKey::generate();
            understudy_wire::write_key_file(&dir.path().join(name), &key).unwrap();
        }
        let mut machines = Vec::new();
        for &(id, version, config, answer) in specs {
            machines.push((id, version, config, PlainMachine::answering(answer).await));
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
            compare,
        };
        deployment.write_cluster();
        deployment
    }

    /// Kills the balancer with SIGKILL and starts it again on its file.
    pub fn restart_balancer(&mut self) {
        self.balancer.kill9();
        let (balancer, admin, listen) = spawn_balancer(self.dir.path());
        assert_eq!(
            (admin.as_str(), listen),
            (self.balancer_admin.as_str(), self.listen)
        );
        self.balancer = balancer;
    }

    /// Writes `cluster.toml`, the controller on its own SQLite database.
    pub fn write_cluster(&self) {
        let controller = "[controller]\nadmin_addr = \"127.0.0.1:0\"\n\
                          database = \"state.db\"\ntick_ms = 100\n";
        self.write_cluster_as("cluster.toml", controller);
    }

    /// Writes the cluster file `file` in the deployment's directory: `controller` (the
    /// `[controller]` table, as text) and the deployment's service and machines.
    pub fn write_cluster_as(&self, file: &str, controller: &str) {
        let mut text = format!(
            r#"{controller}
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
        if let Some(compare) = self.compare {
            text.push_str(&format!("compare = \"{compare}\"\n"));
        }
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
        std::fs::write(self.dir.path().join(file), text).unwrap();
    }

    /// Starts the controller process on the deployment's files; its admin client.
    pub fn controller(&self) -> (Process, AdminClient) {
        self.controller_on("cluster.toml")
    }

    /// Starts the controller process on cluster file `file` of the deployment's directory; its
    /// admin client.
    pub fn controller_on(&self, file: &str) -> (Process, AdminClient) {
        let mut command = Command::new(UNDERSTUDY);
        command
            .arg("controller")
            .arg("--config")
            .arg(self.dir.path().join(file))
            .current_dir(self.dir.path())
            .env("UNDERSTUDY_TOKEN", TOKEN)
            .env("NO_COLOR", "1");
        let (process, url) = spawn_reading(command, |line| {
            line.strip_prefix("admin endpoint: ").map(str::to_string)
        });
        let client = AdminClient::new(&url, Some(TOKEN.to_string())).unwrap();
        (process, client)
    }

    pub fn jobs_of(&self, id: &str) -> u64 {
        let machine = self.machines.iter().find(|m| m.0 == id).unwrap();
        machine.3.jobs.load(Ordering::Relaxed)
    }
}

/// Starts `understudy-proxy` on `dir/balancer.toml` with its keys: the process, its admin URL
/// and the balancer's listening address.
pub fn spawn_balancer(dir: &Path) -> (Process, String, SocketAddr) {
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
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Load {
    pub fn start(target: SocketAddr) -> Load {
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

    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

pub async fn rollouts(client: &AdminClient) -> Option<Vec<RolloutView>> {
    client.get("/api/v1/rollouts").await.ok()
}

/// Starts a release through the CLI binary, as an operator would.
pub fn release(client_url: &str, service_version: &str) {
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

pub const FINISHED: [&str; 3] = ["complete", "rolled_back", "aborted"];

/// Waits until rollout `id` finished; its view.
pub async fn wait_finished(client: &AdminClient, id: i64, limit: Duration) -> RolloutView {
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

pub async fn latest_id(client: &AdminClient) -> i64 {
    let all = rollouts(client).await.expect("rollouts");
    all.iter().map(|r| r.id).max().expect("a rollout")
}

/// The phases a rollout went through, in order, checked as a chain (each from = previous to).
pub async fn phase_chain(client: &AdminClient, id: i64) -> Vec<String> {
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

pub fn joined(chain: &[String]) -> String {
    chain.join(" > ")
}

/// What each release of the kill test does, in turn: to v2 (passes), to v3 (fails 5% of its
/// jobs: rolled back), back to v1 (passes, on the retired v1 machine).
pub const CYCLE: [(&str, &str); 3] = [
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
pub async fn phase_reached(client: &AdminClient, id: i64, aim: &str) -> String {
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
