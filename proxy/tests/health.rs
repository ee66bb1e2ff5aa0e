//! Machines that do not answer, seen by the balancer itself: probes (a TCP connect, or `GET` of a
//! declared health path), jobs sent elsewhere, the state in the stats report and the metrics.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use understudy_proxy::wire::{self, MachineHealth, MachineStatus, PoolRole, StatsReport};
use understudy_proxy::LimitsSpec;

fn fast_probes() -> LimitsSpec {
    LimitsSpec {
        health_interval_ms: 100,
        health_timeout_ms: 500,
        ..LimitsSpec::default()
    }
}

async fn machines(http: &Http, admin: SocketAddr) -> Vec<MachineStatus> {
    let answer = http
        .get(&format!("http://{admin}{}", wire::stats_path("svc", 0)))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str::<StatsReport>(&answer.body)
        .unwrap()
        .machines
}

async fn health_of(http: &Http, admin: SocketAddr, id: &str) -> MachineStatus {
    machines(http, admin)
        .await
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("no machine {id} in the report"))
}

async fn until_health(
    http: &Http,
    admin: SocketAddr,
    id: &str,
    want: MachineHealth,
) -> MachineStatus {
    for _ in 0..250 {
        let m = health_of(http, admin, id).await;
        if m.health == want {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("machine {id} never became {want:?}");
}

fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn a_machine_that_does_not_answer_costs_no_caller_a_job_and_is_named() {
    let up = Machine::start("up", Behaviour::Echo).await;
    let dead = closed_port();
    let mut gone = entry("gone", "v1", &up, PoolRole::Active);
    gone.address = dead.to_string();
    // Slow probes: the jobs themselves find the dead machine first.
    let limits = LimitsSpec {
        health_interval_ms: 60_000,
        ..LimitsSpec::default()
    };
    let running = start_with_limits(
        vec![config(
            "svc",
            1,
            vec![entry("up", "v1", &up, PoolRole::Active), gone],
        )],
        limits,
        insecure(),
    );
    let (admin, lb) = (running.admin_addr(), running.listen_addr("svc").unwrap());
    let http = Http::new();
    // POST: not idempotent, and still safe to send elsewhere, since the dead machine got no byte.
    for i in 0..40 {
        let answer = http.job(lb, None, &format!("job-{i}")).await;
        assert_eq!(answer.status, 200, "job {i}: {}", answer.body);
    }
    assert_eq!(up.requests().len(), 40);
    let gone = health_of(&http, admin, "gone").await;
    assert_eq!(gone.health, MachineHealth::Failing);
    let reason = gone.health_reason.unwrap();
    assert!(
        reason.contains(&dead.to_string()) && reason.contains("refused"),
        "{reason}"
    );
    let metrics = http.get(&format!("http://{admin}/metrics")).await.body;
    assert!(
        metrics.contains(r#"understudy_balancer_machine_failing{machine="gone",service="svc"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"understudy_balancer_machine_failing{machine="up",service="svc"} 0"#),
        "{metrics}"
    );
    running.shutdown();
}

/// A plain HTTP machine whose health path answers what the test sets; every other path echoes.
struct Sick {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    probes: Arc<AtomicUsize>,
    jobs: Arc<AtomicUsize>,
}

async fn sick_machine() -> Sick {
    let health = Arc::new(AtomicU16::new(503));
    let probes: Arc<AtomicUsize> = Arc::default();
    let jobs: Arc<AtomicUsize> = Arc::default();
    let (h, p, j) = (health.clone(), probes.clone(), jobs.clone());
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move |headers: http::HeaderMap| async move {
                assert_eq!(headers["user-agent"], "understudy-health-probe");
                p.fetch_add(1, Ordering::SeqCst);
                http::StatusCode::from_u16(h.load(Ordering::SeqCst)).unwrap()
            }),
        )
        .fallback(move || async move {
            j.fetch_add(1, Ordering::SeqCst);
            "sick:"
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Sick {
        addr,
        health,
        probes,
        jobs,
    }
}

#[tokio::test]
async fn a_declared_health_path_is_probed_and_a_sick_machine_waits_until_it_answers() {
    let well = Machine::start("well", Behaviour::Echo).await;
    let sick = sick_machine().await;
    let mut sick_entry = entry("sick", "v1", &well, PoolRole::Active);
    sick_entry.address = sick.addr.to_string();
    sick_entry.health_path = Some("/healthz".into());
    let running = start_with_limits(
        vec![config(
            "svc",
            1,
            vec![entry("well", "v1", &well, PoolRole::Active), sick_entry],
        )],
        fast_probes(),
        insecure(),
    );
    let (admin, lb) = (running.admin_addr(), running.listen_addr("svc").unwrap());
    let http = Http::new();
    let failing = until_health(&http, admin, "sick", MachineHealth::Failing).await;
    assert_eq!(
        failing.health_reason.as_deref(),
        Some(&*format!(
            "GET /healthz on {}: answered 503 Service Unavailable",
            sick.addr
        ))
    );
    assert_eq!(
        until_health(&http, admin, "well", MachineHealth::Answering)
            .await
            .health_reason,
        None
    );
    for _ in 0..30 {
        assert_eq!(http.job(lb, None, "x").await.status, 200);
    }
    assert_eq!(
        sick.jobs.load(Ordering::SeqCst),
        0,
        "a failing machine got a job"
    );

    sick.health.store(200, Ordering::SeqCst);
    until_health(&http, admin, "sick", MachineHealth::Answering).await;
    for _ in 0..30 {
        assert_eq!(http.job(lb, None, "x").await.status, 200);
    }
    assert_eq!(
        sick.jobs.load(Ordering::SeqCst),
        15,
        "equal weights share the jobs"
    );
    assert!(sick.probes.load(Ordering::SeqCst) >= 3);
    running.shutdown();
}

#[tokio::test]
async fn a_health_path_that_could_end_the_request_line_is_refused_by_name() {
    let well = Machine::start("well", Behaviour::Echo).await;
    let running = start(vec![config(
        "svc",
        1,
        vec![entry("well", "v1", &well, PoolRole::Active)],
    )]);
    let http = Http::new();
    for (path, problem) in [
        ("healthz", "does not start with '/'"),
        ("/a b", "' '"),
        ("/a\r\nX-Injected: 1", "holds '"),
        ("/#frag", "'#'"),
    ] {
        let mut c = config("svc", 2, vec![entry("well", "v1", &well, PoolRole::Active)]);
        c.machines[0].health_path = Some(path.into());
        let answer = http
            .put_json(
                &format!(
                    "http://{}{}",
                    running.admin_addr(),
                    wire::config_path("svc")
                ),
                &c,
            )
            .await;
        assert_eq!(answer.status, 400, "{path:?}: {}", answer.body);
        assert!(
            answer.body.contains("machines[0].health_path") && answer.body.contains(problem),
            "{path:?}: {}",
            answer.body
        );
    }
    running.shutdown();
}
