//! Two controller processes on one PostgreSQL store, driving the same real balancer: one leads
//! (holds the store's lease and pushes configs with its fencing epoch), the other stands by
//! (answers reads from the store, refuses changes with 503 naming the leader). A leader killed
//! with SIGKILL mid-release is replaced within two lease periods and the release ends with
//! exactly its transitions; a leader frozen with SIGSTOP past its lease wakes as a standby
//! without doubling a transition; a store restarted mid-release pauses the leader, and the
//! release then completes as it would have.
//!
//! PostgreSQL comes from `understudy_testkit::postgres` (installed by scripts/setup.sh). The
//! tests run one at a time: the takeover bound is a timing claim, and two clusters at once on a
//! small machine would measure the machine.

mod support;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use understudy::api::client::AdminClient;
use understudy_testkit::postgres::PgServer;

use support::{
    joined, latest_id, phase_chain, phase_reached, release, rollouts, wait_finished, Deployment,
    Load, Process, CYCLE, FINISHED, TOKEN,
};

/// The lease period both controllers are configured with, in milliseconds.
const LEASE_MS: u64 = 1000;
const LEASE: Duration = Duration::from_millis(LEASE_MS);
/// A standby takes over within two lease periods; the second is an allowance for scheduling
/// the processes and for this test's polling.
const TAKEOVER_LIMIT: Duration = Duration::from_millis(2 * LEASE_MS + 1000);
/// Once a restarted store answers again, a leader is back within two lease periods plus time
/// for the controllers to reconnect.
const STORE_BACK_LIMIT: Duration = Duration::from_millis(2 * LEASE_MS + 3000);
/// How long a release may take from start to end, takeovers included.
const RELEASE_LIMIT: Duration = Duration::from_secs(90);

/// One cluster at a time (see the module's comment); a tokio mutex, so that a failed test does
/// not poison it for the next.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The store, the machines and balancer, and one cluster file per controller name.
struct Shared {
    deployment: Deployment,
    store: PgServer,
}

impl Shared {
    async fn start() -> Shared {
        let store = PgServer::start();
        let deployment = Deployment::start().await;
        for name in ["a", "b"] {
            let table = format!(
                "[controller]\nadmin_addr = \"127.0.0.1:0\"\nstore = \"{}\"\n\
                 lease_ms = {LEASE_MS}\nname = \"{name}\"\ntick_ms = 100\n",
                store.url(),
            );
            deployment.write_cluster_as(&format!("cluster-{name}.toml"), &table);
        }
        Shared { deployment, store }
    }

    fn controller(&self, name: &'static str) -> Controller {
        let (process, client) = self
            .deployment
            .controller_on(&format!("cluster-{name}.toml"));
        Controller {
            name,
            process,
            client,
        }
    }

    /// The balancer's counter of configs refused for a stale epoch (absent: none yet).
    async fn stale_refusals(&self) -> f64 {
        let url = format!("{}metrics", self.deployment.balancer_admin);
        let page = get_text(&url).await.expect("balancer metrics");
        metric(
            &page,
            "understudy_balancer_config_refused_total",
            &[("service", "media"), ("reason", "stale_epoch")],
        )
        .unwrap_or(0.0)
    }

    /// The version of the config the balancer runs.
    async fn balancer_config_version(&self) -> Option<f64> {
        let url = format!("{}metrics", self.deployment.balancer_admin);
        let page = get_text(&url).await.expect("balancer metrics");
        metric(
            &page,
            "understudy_balancer_config_version",
            &[("service", "media")],
        )
    }

    /// The highest fencing epoch the balancer applied.
    async fn balancer_epoch(&self) -> Option<f64> {
        let url = format!("{}metrics", self.deployment.balancer_admin);
        let page = get_text(&url).await.expect("balancer metrics");
        metric(
            &page,
            "understudy_balancer_config_epoch",
            &[("service", "media")],
        )
    }
}

/// A controller process and its admin client.
struct Controller {
    name: &'static str,
    process: Process,
    client: AdminClient,
}

/// What `GET /api/v1/leader` answered.
#[derive(Debug, Clone)]
struct LeaderView {
    role: String,
    /// The leader's URL, when one leads.
    leader_url: Option<String>,
    /// The epoch the leader leads with, when one leads.
    leader_epoch: Option<u64>,
    raw: Value,
}

impl Controller {
    fn url(&self) -> &str {
        self.client.base()
    }

    async fn leader_view(&self) -> Result<LeaderView, String> {
        let raw: Value = self
            .client
            .get("/api/v1/leader")
            .await
            .map_err(|e| e.to_string())?;
        let role = raw["role"].as_str().ok_or(format!("no role: {raw}"))?;
        let leader = &raw["leader"];
        Ok(LeaderView {
            role: role.to_string(),
            leader_url: leader["url"]
                .as_str()
                .map(|u| u.trim_end_matches('/').to_string()),
            leader_epoch: leader["epoch"].as_u64(),
            raw,
        })
    }

    /// Polls until the controller says it is in `role`: its answer and how long that took, or
    /// the last answer when `limit` passed first.
    async fn wait_role(
        &self,
        role: &str,
        limit: Duration,
    ) -> Result<(LeaderView, Duration), String> {
        let start = Instant::now();
        loop {
            let seen = self.leader_view().await;
            if let Ok(view) = &seen {
                if view.role == role {
                    return Ok((view.clone(), start.elapsed()));
                }
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "controller {} not {role} after {limit:?}: {seen:?}",
                    self.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let page = get_text(&format!("{}/metrics", self.url())).await.ok()?;
        metric(&page, name, &[])
    }

    /// A `POST /api/v1/releases` with the token: status and JSON body.
    async fn post_release(&self) -> (u16, Value) {
        let body = json!({"services": {"media": "v2"}, "dry_run": false});
        let url = format!("{}/api/v1/releases", self.url());
        let (status, bytes) = understudy::http_json::exchange(
            &understudy::http_json::client(),
            http::Method::POST,
            &url,
            Some(TOKEN),
            Some(body.to_string().into_bytes()),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e:?}"));
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// `standby` says it stands by and names `leader`'s URL, refuses a change with 503 naming the
/// same URL, and its metrics say it does not lead while `leader`'s say it does.
async fn check_standby(standby: &Controller, leader: &Controller) {
    let (view, _) = standby
        .wait_role("standby", Duration::from_secs(10))
        .await
        .unwrap();
    // The standby learns the leader from the store; right after a takeover it may still name
    // the previous one for a moment.
    let deadline = Instant::now() + TAKEOVER_LIMIT;
    let mut view = view;
    while view.leader_url.as_deref() != Some(leader.url()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        view = standby.leader_view().await.unwrap();
    }
    assert_eq!(view.role, "standby", "{}", view.raw);
    assert_eq!(
        view.leader_url.as_deref(),
        Some(leader.url()),
        "standby {} names the wrong leader: {}",
        standby.name,
        view.raw
    );
    let (status, body) = standby.post_release().await;
    assert_eq!(status, 503, "a standby's answer to a change: {body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(
        body["leader"].as_str().map(|u| u.trim_end_matches('/')),
        Some(leader.url()),
        "{body}"
    );
    // The gauge follows the role within a tick or so.
    for (controller, leads) in [(standby, 0.0), (leader, 1.0)] {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let gauge = controller.metric("understudy_controller_leader").await;
            if gauge == Some(leads) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: understudy_controller_leader {gauge:?}, not {leads}",
                controller.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until the standby lists rollout `id` (read from the shared store).
async fn standby_lists(standby: &Controller, id: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = rollouts(&standby.client).await;
        if listed
            .as_ref()
            .is_some_and(|all| all.iter().any(|r| r.id == id))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "standby {} does not list rollout {id}: {listed:?}",
            standby.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The phases of `expected` a rollout spends time in while running (where a kill is mid-release).
fn running_phases(expected: &str) -> Vec<&str> {
    expected
        .split(" > ")
        .filter(|p| *p != "pending" && !p.starts_with("judged"))
        .filter(|p| !FINISHED.contains(p))
        .collect()
}

/// Waits until the balancer runs the config `leader` committed last (stats read after `after`,
/// in sync): no config pushed by anyone else is left in place.
async fn balancer_in_sync(leader: &Controller, after: Instant) {
    let after_ms = unix_ms() - after.elapsed().as_millis() as u64;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let views: Vec<Value> = leader.client.get("/api/v1/balancers").await.unwrap();
        let view = &views[0];
        let stats = &view["last_stats"];
        let fresh = stats["at_ms"].as_u64().is_some_and(|at| at > after_ms);
        let running = stats["config_version"].as_u64();
        if fresh && view["in_sync"] == true && running == view["desired_version"].as_u64() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the balancer does not run leader {}'s config: {view}",
            leader.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn get_text(url: &str) -> Result<String, String> {
    let (status, bytes) = understudy::http_json::exchange(
        &understudy::http_json::client(),
        http::Method::GET,
        url,
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("{e:?}"))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match status {
        200 => Ok(text),
        _ => Err(format!("{status}: {text}")),
    }
}

/// The value of sample `name` whose labels include `labels`, from a Prometheus text page.
fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(inner) => inner.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let wanted = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.trim().parse().ok()).flatten()
        })
        .next()
}

fn median(sorted: &[u128]) -> u128 {
    sorted[sorted.len() / 2]
}

/// Five releases, the leader killed with SIGKILL at a seeded moment of each (alternately A and
/// B, the killed one started again as the new standby): the standby takes over within two
/// lease periods with a higher epoch, and every release ends with exactly its transitions, no
/// caller seeing an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_a_leader_killed_mid_release() {
    const SEED: u64 = 29;
    const ROUNDS: usize = 5;
    let _serial = SERIAL.lock().await;
    println!("seed {SEED}");
    let shared = Shared::start().await;
    let mut leader = shared.controller("a");
    leader
        .wait_role("leader", Duration::from_secs(10))
        .await
        .unwrap();
    let mut standby = shared.controller("b");
    check_standby(&standby, &leader).await;

    let load = Load::start(shared.deployment.listen);
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut rows: Vec<(usize, &str, String, u128, String)> = Vec::new();
    println!("round  killed  in phase           takeover  outcome");
    for round in 0..ROUNDS {
        let (target, expected) = CYCLE[round % CYCLE.len()];
        let before = leader.leader_view().await.unwrap();
        assert_eq!(before.role, "leader", "{}", before.raw);
        let old_epoch = before.leader_epoch.expect("a leader's epoch");
        release(leader.url(), target);
        let id = latest_id(&leader.client).await;
        standby_lists(&standby, id).await;
        let running = running_phases(expected);
        let aim = running[rng.gen_range(0..running.len())];
        let phase = phase_reached(&leader.client, id, aim).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;

        leader.process.kill9();
        let outcome = standby.wait_role("leader", 3 * TAKEOVER_LIMIT).await;
        let (view, takeover) = outcome.unwrap_or_else(|e| {
            panic!(
                "seed {SEED} round {round}: {e}\nstore log:\n{}",
                shared.store.log()
            )
        });
        let new_epoch = view.leader_epoch.expect("the new leader's epoch");
        let killed = leader.name;
        assert!(
            takeover <= TAKEOVER_LIMIT,
            "seed {SEED} round {round}: {} took over {killed}'s lead in {takeover:?}, over \
             {TAKEOVER_LIMIT:?}",
            standby.name
        );
        assert!(
            new_epoch > old_epoch,
            "seed {SEED} round {round}: epoch {new_epoch} after {old_epoch}: {}",
            view.raw
        );

        let restarted = shared.controller(killed);
        (leader, standby) = (standby, restarted);
        check_standby(&standby, &leader).await;
        let done = wait_finished(&leader.client, id, RELEASE_LIMIT).await;
        let chain = joined(&phase_chain(&leader.client, id).await);
        let ms = takeover.as_millis();
        println!(
            "{round:5}  {killed:6}  {phase:17}  {ms:6} ms  {target} {}",
            done.phase
        );
        assert_eq!(
            chain, expected,
            "seed {SEED} round {round}: {target}, {killed} killed at {phase}"
        );
        // The standby reads the same transitions from the store (its view refreshed at each
        // look at the lease, a third of a period apart).
        let deadline = Instant::now() + 2 * LEASE;
        loop {
            let read_by_standby = joined(&phase_chain(&standby.client, id).await);
            if read_by_standby == chain {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "standby {} reads {read_by_standby}, the leader {chain}",
                standby.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rows.push((round, killed, phase, ms, done.phase));
    }
    let (sent, errors) = load.finish().await;
    let mut times: Vec<u128> = rows.iter().map(|r| r.3).collect();
    times.sort_unstable();
    println!(
        "takeover over {ROUNDS} kills (lease {LEASE_MS} ms): median {} ms, worst {} ms; callers: \
         {sent} jobs sent, {errors} errors",
        median(&times),
        times[times.len() - 1]
    );
    assert!(sent > 1000, "{sent}");
    assert_eq!(errors, 0, "seed {SEED}: a caller saw an error");
}

/// Controller A leading and B standing by on `shared`, callers sending jobs, and the first
/// release of [`CYCLE`] through A at a seeded phase (simulating or joining[0]).
struct MidRelease {
    a: Controller,
    a_epoch: u64,
    b: Controller,
    load: Load,
    id: i64,
    expected: &'static str,
    phase: String,
}

async fn mid_release(shared: &Shared, seed: u64) -> MidRelease {
    let mut rng = StdRng::seed_from_u64(seed);
    let a = shared.controller("a");
    let (a_view, _) = a
        .wait_role("leader", Duration::from_secs(10))
        .await
        .unwrap();
    let a_epoch = a_view.leader_epoch.expect("a leader's epoch");
    let b = shared.controller("b");
    check_standby(&b, &a).await;
    let load = Load::start(shared.deployment.listen);
    let (target, expected) = CYCLE[0];
    release(a.url(), target);
    let id = latest_id(&a.client).await;
    let aim = ["simulating", "joining[0]"][rng.gen_range(0..2)];
    let phase = phase_reached(&a.client, id, aim).await;
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
    MidRelease {
        a,
        a_epoch,
        b,
        load,
        id,
        expected,
        phase,
    }
}

/// A leader frozen with SIGSTOP past two lease periods mid-release: the standby takes over and
/// the release goes on under it. Woken with SIGCONT, the old leader must find it lost the lease
/// and stand by: no transition doubled, the balancer left on the new leader's config (a config
/// the old one pushes after waking is refused for its stale epoch), its own changes refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_when_it_wakes() {
    const SEED: u64 = 31;
    let _serial = SERIAL.lock().await;
    println!("seed {SEED}");
    let shared = Shared::start().await;
    // Mid-release, where the leader has work left to do when it wakes.
    let MidRelease {
        a,
        a_epoch,
        b,
        load,
        id,
        expected,
        phase,
        ..
    } = mid_release(&shared, SEED).await;
    let refused_before = shared.stale_refusals().await;

    a.process.signal("STOP");
    let frozen = Instant::now();
    let (b_view, takeover) = b
        .wait_role("leader", 3 * TAKEOVER_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("seed {SEED}, frozen at {phase}: {e}"));
    let b_epoch = b_view.leader_epoch.expect("the new leader's epoch");
    println!("A frozen at {phase}; B leads after {takeover:?} with epoch {b_epoch}");
    assert!(
        takeover <= TAKEOVER_LIMIT,
        "seed {SEED}: takeover {takeover:?}"
    );
    assert!(b_epoch > a_epoch, "epoch {b_epoch} after {a_epoch}");
    // Past two lease periods, and a little more, before A wakes.
    let wake_at = frozen + 2 * LEASE + Duration::from_millis(500);
    tokio::time::sleep(wake_at.saturating_duration_since(Instant::now())).await;
    a.process.signal("CONT");
    let woke = Instant::now();

    // A must find out by itself that its lease ran out: nobody tells it.
    let (a_after, stepped_down) = a
        .wait_role("standby", TAKEOVER_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("seed {SEED}: the woken leader never stood by: {e}"));
    println!("A stands by {stepped_down:?} after waking: {}", a_after.raw);
    check_standby(&a, &b).await;

    let done = wait_finished(&b.client, id, RELEASE_LIMIT).await;
    let chain = joined(&phase_chain(&b.client, id).await);
    assert_eq!(chain, expected, "seed {SEED}: A frozen at {phase}");
    balancer_in_sync(&b, woke).await;
    assert_eq!(
        shared.balancer_epoch().await,
        Some(b_epoch as f64),
        "the balancer's applied epoch is not the leader's"
    );
    let refused = shared.stale_refusals().await - refused_before;
    let a_fenced = a.metric("understudy_balancer_push_fenced_total").await;
    let b_fenced = b.metric("understudy_balancer_push_fenced_total").await;
    println!(
        "release {}; stale-epoch configs the balancer refused: {refused}; pushes fenced: A \
         {a_fenced:?}, B {b_fenced:?}",
        done.phase
    );
    // The leader is never the one refused.
    assert!(
        b_fenced.unwrap_or(0.0) == 0.0,
        "B's pushes refused: {b_fenced:?}"
    );
    let (sent, errors) = load.finish().await;
    assert_eq!(
        errors, 0,
        "seed {SEED}: {errors} of {sent} callers saw an error"
    );
}

/// The store stopped (fast shutdown) mid-release for two lease periods: the leader must stop
/// acting once it cannot renew (the balancer's config stays as it was), a leader (either) is
/// back soon after the store is, and the release completes with exactly its transitions,
/// callers unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_pauses_while_the_store_restarts() {
    const SEED: u64 = 37;
    let _serial = SERIAL.lock().await;
    println!("seed {SEED}");
    let mut shared = Shared::start().await;
    let MidRelease {
        a,
        b,
        load,
        id,
        expected,
        phase,
        ..
    } = mid_release(&shared, SEED).await;

    shared.store.stop();
    let stopped = Instant::now();
    // Past one lease period nobody can hold the lease: from then until the store is back, no
    // controller may change the balancer's config (a config pushed for a step the store never
    // recorded would be half-applied).
    tokio::time::sleep(LEASE).await;
    let paused_at = shared.balancer_config_version().await;
    let roles = (a.leader_view().await, b.leader_view().await);
    println!(
        "one lease period into the outage: A {:?}, B {:?}",
        roles.0, roles.1
    );
    tokio::time::sleep((stopped + 2 * LEASE).saturating_duration_since(Instant::now())).await;
    assert_eq!(
        shared.balancer_config_version().await,
        paused_at,
        "seed {SEED}: the balancer's config changed while the store was down (stopped at {phase})"
    );
    shared.store.start_again();
    let back = Instant::now();

    let deadline = back + STORE_BACK_LIMIT;
    let (leader, standby) = loop {
        let a_view = a.leader_view().await;
        let b_view = b.leader_view().await;
        let leads = |v: &Result<LeaderView, String>| v.as_ref().is_ok_and(|v| v.role == "leader");
        match (leads(&a_view), leads(&b_view)) {
            (true, true) => panic!("two leaders: {a_view:?} {b_view:?}"),
            (true, false) => break (&a, &b),
            (false, true) => break (&b, &a),
            (false, false) => {}
        }
        assert!(
            Instant::now() < deadline,
            "seed {SEED}: no leader {STORE_BACK_LIMIT:?} after the store came back: \
             {a_view:?} {b_view:?}\nstore log:\n{}",
            shared.store.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "store stopped at {phase}; {} leads {:?} after the store is back",
        leader.name,
        back.elapsed()
    );
    check_standby(standby, leader).await;
    let done = wait_finished(&leader.client, id, RELEASE_LIMIT).await;
    let chain = joined(&phase_chain(&leader.client, id).await);
    assert_eq!(chain, expected, "seed {SEED}: store stopped at {phase}");
    balancer_in_sync(leader, back).await;
    let (sent, errors) = load.finish().await;
    println!(
        "release {}; callers: {sent} sent, {errors} errors",
        done.phase
    );
    assert_eq!(errors, 0, "seed {SEED}: callers depend on the store");
}
