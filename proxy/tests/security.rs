//! The balancer's authentication, from the outside: the simulation marker is the balancers'
//! word only (stripped from outside callers, token-checked from cluster machines, always
//! exactly `1` towards a simulation machine), reads of a keyed balancer are signed, and a
//! balancer does not start without keys unless told to run insecure.

mod common;

use std::net::SocketAddr;

use common::*;
use understudy_hub::{SecretKey, Signer, READ_AUTH_HEADER};
use understudy_proxy::wire::{stats_path, PoolRole};
use understudy_proxy::{
    BalancerKey, ConfigSigning, ProxyError, RunningBalancers, SpawnOptions, CONTROLLER_ID,
};

const MARKER: &str = "x-understudy-simulation";
const TOKEN: &str = "x-understudy-simulation-auth";

/// Options with a config key per service and the cluster's marker key.
fn keyed(services: &[&str], controller: &SecretKey, marker: &SecretKey) -> SpawnOptions {
    SpawnOptions {
        signing: ConfigSigning {
            keys: services
                .iter()
                .map(|s| (s.to_string(), BalancerKey::given(controller.clone())))
                .collect(),
            ..ConfigSigning::default()
        },
        marker_key: Some(marker.clone()),
        ..SpawnOptions::default()
    }
}

struct Cluster {
    v1: Machine,
    v2: Machine,
    running: RunningBalancers,
}

/// One keyed balancer "media": v1 active, v2 in simulation.
async fn cluster(marker: &SecretKey) -> Cluster {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let running = start_with(
        vec![config(
            "media",
            1,
            vec![
                entry("a", "v1", &v1, PoolRole::Active),
                entry("s", "v2", &v2, PoolRole::Simulation),
            ],
        )],
        keyed(&["media"], &SecretKey::generate(), marker),
    );
    Cluster { v1, v2, running }
}

async fn send(lb: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    Http::new()
        .send("POST", &format!("http://{lb}/job"), headers, "x")
        .await
}

fn metric(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn metrics(running: &RunningBalancers) -> String {
    Http::new()
        .get(&format!("http://{}/metrics", running.admin_addr()))
        .await
        .body
}

async fn copies_arrive(machine: &Machine, count: usize) {
    let arrived = eventually(std::time::Duration::from_secs(5), || {
        machine.requests().len() >= count
    })
    .await;
    assert!(arrived, "{count} copies arrived");
}

#[tokio::test]
async fn an_outside_callers_marker_is_stripped_and_the_job_served_as_any_other() {
    let c = cluster(&SecretKey::generate()).await;
    let lb = c.running.listen_addr("media").unwrap();
    for value in ["1", "0", "yes"] {
        let answer = send(lb, &[(MARKER, value), (TOKEN, "v1.1.x.y")]).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "v1:x"),
            "{value}"
        );
    }
    copies_arrive(&c.v2, 3).await;
    // v1 (active) never saw a marker; v2 got copies marked exactly `1`, with a fresh token.
    for seen in c.v1.requests() {
        assert!(!seen.headers.contains_key(MARKER) && !seen.headers.contains_key(TOKEN));
    }
    for seen in c.v2.requests() {
        assert_eq!(seen.headers.get_all(MARKER).iter().count(), 1);
        assert_eq!(seen.headers[MARKER], "1");
        assert!(seen.headers[TOKEN].to_str().unwrap().starts_with("v1."));
        assert_ne!(seen.headers[TOKEN], "v1.1.x.y");
    }
    let m = metrics(&c.running).await;
    assert_eq!(
        metric(
            &m,
            "understudy_balancer_marker_stripped_total{service=\"media\"}"
        ),
        3
    );
    c.running.shutdown();
}

#[tokio::test]
async fn a_cluster_machines_marker_needs_a_token_the_cluster_key_verifies() {
    let marker = SecretKey::generate();
    let c = cluster(&marker).await;
    let internal = c.running.internal_addr("media").unwrap();
    let forged = {
        // A token made by a balancer with another marker key.
        let other = cluster(&SecretKey::generate()).await;
        send(other.running.listen_addr("media").unwrap(), &[]).await;
        copies_arrive(&other.v2, 1).await;
        let token = other.v2.requests()[0].headers[TOKEN]
            .to_str()
            .unwrap()
            .to_string();
        other.running.shutdown();
        token
    };
    for (headers, reason) in [
        (vec![(MARKER, "1")], "marker_unauthenticated"),
        (vec![(MARKER, "1"), (TOKEN, "garbage")], "marker_malformed"),
        (
            vec![(MARKER, "1"), (TOKEN, forged.as_str())],
            "marker_bad_signature",
        ),
    ] {
        let answer = send(internal, &headers).await;
        assert_eq!(answer.status, 403, "{reason}: {}", answer.body);
        assert!(
            answer.body.contains("simulation job refused"),
            "{}",
            answer.body
        );
        let m = metrics(&c.running).await;
        let line =
            format!("understudy_balancer_refused_total{{reason=\"{reason}\",service=\"media\"}}");
        assert_eq!(metric(&m, &line), 1, "{reason}");
    }
    assert!(c.v1.requests().is_empty() && c.v2.requests().is_empty());
    c.running.shutdown();
}

/// A copy made by one balancer causes a job at the next one: the token the copy carried is
/// passed on by the simulation machine, and the next balancer sends the job to its simulation
/// pool only, marked exactly `1`.
#[tokio::test]
async fn a_copys_token_carries_its_simulation_job_through_the_next_balancer() {
    let marker = SecretKey::generate();
    let router = cluster(&marker).await;
    let media = cluster(&marker).await;
    send(router.running.listen_addr("media").unwrap(), &[]).await;
    copies_arrive(&router.v2, 1).await;
    let token = router.v2.requests()[0].headers[TOKEN]
        .to_str()
        .unwrap()
        .to_string();

    let internal = media.running.internal_addr("media").unwrap();
    let answer = send(internal, &[(MARKER, "anything"), (TOKEN, &token)]).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "v2:x"));
    assert!(media.v1.requests().is_empty(), "never to an active machine");
    let seen = &media.v2.requests()[0];
    assert_eq!(seen.headers[MARKER], "1");
    assert_eq!(seen.headers[TOKEN].to_str().unwrap(), token);
    // The same job from outside the cluster: the claim is dropped, v1 serves it.
    let outside = send(
        media.running.listen_addr("media").unwrap(),
        &[(MARKER, "1"), (TOKEN, &token)],
    )
    .await;
    assert_eq!(outside.body, "v1:x");
    router.running.shutdown();
    media.running.shutdown();
}

/// A source network marked internal is trusted on the public listener too.
#[tokio::test]
async fn internal_sources_are_cluster_machines_on_the_public_listener() {
    let marker = SecretKey::generate();
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let mut process = process(vec![config(
        "media",
        1,
        vec![
            entry("a", "v1", &v1, PoolRole::Active),
            entry("s", "v2", &v2, PoolRole::Simulation),
        ],
    )]);
    process.trust.internal_sources = vec!["127.0.0.0/8".parse().unwrap()];
    let running =
        understudy_proxy::spawn_with(process, keyed(&["media"], &SecretKey::generate(), &marker))
            .unwrap();
    let lb = running.listen_addr("media").unwrap();
    assert_eq!(send(lb, &[(MARKER, "1")]).await.status, 403);
    running.shutdown();
}

#[tokio::test]
async fn reads_of_a_keyed_balancer_are_signed_by_the_controller_once() {
    let key = SecretKey::generate();
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let running = start_with(
        vec![config(
            "media",
            1,
            vec![entry("a", "v1", &v1, PoolRole::Active)],
        )],
        keyed(&["media"], &key, &SecretKey::generate()),
    );
    let admin = format!("http://{}", running.admin_addr());
    let path = stats_path("media", 0);
    let http = Http::new();
    let get = |header: Option<String>, path: String| {
        let (http, admin) = (http.clone(), admin.clone());
        async move {
            let headers: Vec<(&str, &str)> = header
                .as_deref()
                .map(|h| vec![(READ_AUTH_HEADER, h)])
                .unwrap_or_default();
            http.send("GET", &format!("{admin}{path}"), &headers, "")
                .await
        }
    };
    let anonymous = get(None, path.clone()).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(anonymous.body.contains("signed by the controller"));
    let mut controller = Signer::new(CONTROLLER_ID, key.clone()).unwrap();
    let mut forger = Signer::new(CONTROLLER_ID, SecretKey::generate()).unwrap();
    assert_eq!(
        get(Some(signed_read(&mut forger, &path)), path.clone())
            .await
            .status,
        401
    );
    let other_path = signed_read(&mut controller, &stats_path("media", 7));
    assert_eq!(get(Some(other_path), path.clone()).await.status, 400);
    let good = signed_read(&mut controller, &path);
    assert_eq!(get(Some(good.clone()), path.clone()).await.status, 200);
    let replayed = get(Some(good), path.clone()).await;
    assert_eq!(replayed.status, 401, "{}", replayed.body);
    assert!(replayed.body.contains("replayed"), "{}", replayed.body);
    // Health and metrics stay open for probes and Prometheus.
    assert_eq!(http.get(&format!("{admin}/healthz")).await.status, 200);
    assert_eq!(http.get(&format!("{admin}/metrics")).await.status, 200);
    running.shutdown();
}

#[test]
fn a_balancer_without_keys_does_not_start_unless_told_to_run_insecure() {
    let cfg = || {
        process(vec![config(
            "media",
            1,
            vec![understudy_proxy::wire::MachineEntry {
                id: "a".into(),
                version: "v1".into(),
                address: "127.0.0.1:9".into(),
                weight: 1,
                config: PoolRole::Active,
                health_path: None,
            }],
        )])
    };
    let no_key = understudy_proxy::spawn_with(cfg(), SpawnOptions::default());
    assert!(matches!(no_key, Err(ProxyError::NoKey(_))), "no config key");
    let no_marker_key = understudy_proxy::spawn_with(
        cfg(),
        SpawnOptions {
            marker_key: None,
            ..keyed(&["media"], &SecretKey::generate(), &SecretKey::generate())
        },
    );
    match no_marker_key {
        Err(e @ ProxyError::NoKey(_)) => assert!(e.to_string().contains("marker key"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started without a marker key"),
    }
    let insecure = understudy_proxy::spawn_with(cfg(), insecure()).unwrap();
    insecure.shutdown();
}
