//! The admin endpoint over HTTP on real balancer processes (`spawn_with`): JSON for every error,
//! axum's own rejections included, and config pushes that name machines by host name. The
//! helpers serve `openapi_tests.rs` too.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use understudy_hub::SecretKey;
use understudy_wire::{BalancerConfig, MachineEntry, PoolRole};

use crate::{BalancerKey, ConfigSigning, RunningBalancers, SpawnOptions};

pub(crate) fn media_config(version: u64) -> BalancerConfig {
    BalancerConfig {
        service: "media".into(),
        version,
        epoch: 0,
        mirror_fraction: 1.0,
        compare_body: false,
        compare: None,
        compare_headers: Vec::new(),
        drain_timeout_ms: 30_000,
        machines: vec![MachineEntry {
            id: "media-1".into(),
            version: "v1".into(),
            // Never contacted: no job is sent in these tests.
            address: "127.0.0.1:9".into(),
            weight: 100,
            config: PoolRole::Active,
            health_path: None,
        }],
    }
}

fn process() -> crate::ProcessConfig {
    crate::ProcessConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        vec![crate::BalancerSpec::new(
            "127.0.0.1:0".parse().unwrap(),
            media_config(1),
        )],
    )
}

/// A balancer of `media` with a key, as `understudy-proxy` starts by default.
pub(crate) fn keyed() -> RunningBalancers {
    let options = SpawnOptions {
        signing: ConfigSigning {
            keys: [(
                "media".to_string(),
                BalancerKey::given(SecretKey::generate()),
            )]
            .into(),
            ..ConfigSigning::default()
        },
        marker_key: Some(SecretKey::generate()),
        ..SpawnOptions::default()
    };
    crate::spawn_with(process(), options).unwrap()
}

/// A balancer of `media` without a key (`--insecure-no-key`).
pub(crate) fn keyless() -> RunningBalancers {
    let options = SpawnOptions {
        insecure_no_key: true,
        ..SpawnOptions::default()
    };
    crate::spawn_with(process(), options).unwrap()
}

/// One request to the admin endpoint: (status, headers, body).
pub(crate) async fn call(
    running: &RunningBalancers,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> (u16, http::HeaderMap, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", running.admin_addr()))
        .body(Full::new(body.into()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("the admin endpoint answers within 10 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

/// The `error` of a JSON error answer (asserting it is one).
fn error_of(headers: &http::HeaderMap, body: &Bytes) -> String {
    assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
    let body: Value = serde_json::from_slice(body).expect("a JSON body");
    let error = body["error"].as_str().expect("an error string").to_string();
    assert!(!error.is_empty());
    error
}

#[tokio::test]
async fn axum_rejections_unknown_routes_and_methods_are_json_errors() {
    let running = keyless();
    let (status, headers, body) = call(&running, "GET", "/api/v1/balancers/%FF/config", "").await;
    assert_eq!(status, 400);
    assert!(error_of(&headers, &body).starts_with("bad path"));
    let (status, headers, body) = call(&running, "GET", "/api/v1/nothing", "").await;
    assert_eq!(status, 404);
    assert!(error_of(&headers, &body).starts_with("no such endpoint"));
    let (status, headers, body) =
        call(&running, "DELETE", "/api/v1/balancers/media/config", "").await;
    assert_eq!(status, 405);
    let allow = headers[http::header::ALLOW].to_str().unwrap().to_string();
    assert!(allow.contains("GET") && allow.contains("PUT"), "{allow}");
    assert!(error_of(&headers, &body).contains("DELETE"));
    // Over axum's default body limit (2 MB).
    let big = vec![b' '; 3 << 20];
    let (status, headers, body) =
        call(&running, "PUT", "/api/v1/balancers/media/config", big).await;
    assert_eq!(status, 413);
    assert!(error_of(&headers, &body).starts_with("bad body"));
    let (status, headers, body) =
        call(&running, "PUT", "/api/v1/balancers/media/config-key", "{}").await;
    assert_eq!(status, 409);
    error_of(&headers, &body);
}

#[tokio::test]
async fn stats_refusals_are_json_with_their_reason() {
    let running = keyless();
    let (status, headers, body) =
        call(&running, "GET", "/api/v1/balancers/media/stats?since=x", "").await;
    assert_eq!(status, 400);
    assert!(error_of(&headers, &body).starts_with("since"));
    let (status, headers, body) = call(
        &running,
        "GET",
        "/api/v1/balancers/media/stats?since=99",
        "",
    )
    .await;
    assert_eq!(status, 400);
    error_of(&headers, &body);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["reason"], "cursor_ahead");
    assert_eq!(body["oldest_cursor"], Value::Null);
    let keyed = keyed();
    let (status, headers, body) = call(&keyed, "GET", "/api/v1/balancers/media/stats", "").await;
    assert_eq!(status, 401);
    error_of(&headers, &body);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["reason"],
        "unsigned"
    );
}

/// (status, error) of a keyless push of version 2 whose machine has `address`.
async fn push_address(running: &RunningBalancers, address: &str) -> (u16, String) {
    let mut config = media_config(2);
    config.machines[0].address = address.into();
    let body = serde_json::to_vec(&config).unwrap();
    let (status, _, body) = call(running, "PUT", "/api/v1/balancers/media/config", body).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn a_machine_named_by_host_resolves_or_is_refused_in_bounded_time() {
    let running = keyless();
    // Not a DNS name: refused before any lookup.
    for address in ["a b:80", "💥:80", "-x:80", "x..y:80", ":80", "x:0"] {
        let (status, error) = push_address(&running, address).await;
        assert_eq!(status, 400, "{address}");
        assert!(error.contains("machines[0].address"), "{address}: {error}");
    }
    // A name that does not resolve: refused, naming the field, within the resolution deadline.
    let started = Instant::now();
    let (status, error) = push_address(&running, "no-such-host.invalid:80").await;
    assert_eq!(status, 400);
    assert!(error.contains("machines[0].address"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let (status, _, _) = call(&running, "GET", "/api/v1/balancers/media/config", "").await;
    assert_eq!(status, 200);
    // A name that resolves is applied with its address.
    assert_eq!(push_address(&running, "localhost:7001").await.0, 200);
    let (_, _, body) = call(&running, "GET", "/api/v1/balancers/media/config", "").await;
    let config: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(config["machines"][0]["address"], json!("localhost:7001"));
    // The same version again is a no-op: no lookup, whatever the name.
    assert_eq!(
        push_address(&running, "no-such-host.invalid:80").await.0,
        200
    );
}

/// (status, body) of a keyless push of `config`.
async fn push(running: &RunningBalancers, config: &BalancerConfig) -> (u16, Value) {
    let body = serde_json::to_vec(config).unwrap();
    let (status, _, body) = call(running, "PUT", "/api/v1/balancers/media/config", body).await;
    (status, serde_json::from_slice(&body).unwrap())
}

/// The `media` lines of the epoch gauge and the refusal counter on `/metrics`.
async fn epoch_metrics(running: &RunningBalancers) -> (String, String) {
    let (_, _, body) = call(running, "GET", "/metrics", "").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("service=\"media\""))
            .unwrap_or_default()
            .to_string()
    };
    (
        line("understudy_balancer_config_epoch{"),
        line("understudy_balancer_config_refused_total{"),
    )
}

/// A keyless `media` balancer keeping its epoch floor at `file`.
fn keyless_with_floor(file: &std::path::Path) -> RunningBalancers {
    let mut cfg = process();
    cfg.balancers[0].epoch_file = Some(file.to_path_buf());
    let options = SpawnOptions {
        insecure_no_key: true,
        ..SpawnOptions::default()
    };
    crate::spawn_with(cfg, options).unwrap()
}

#[tokio::test]
async fn a_restarted_balancer_still_refuses_an_epoch_below_the_one_it_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("media.epoch");
    let at = |version, epoch| BalancerConfig {
        epoch,
        ..media_config(version)
    };
    let running = keyless_with_floor(&file);
    assert_eq!(push(&running, &at(2, 7)).await.0, 200);
    running.shutdown();
    // Back from its file (version 1, epoch 0), it remembers epoch 7.
    let running = keyless_with_floor(&file);
    let (epoch, _) = epoch_metrics(&running).await;
    assert!(epoch.ends_with(" 7"), "{epoch}");
    let (status, body) = push(&running, &at(3, 6)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["reason"], "stale_epoch");
    assert_eq!(push(&running, &at(3, 7)).await.0, 200);
    // A floor that cannot be recorded applies nothing.
    drop(running);
    let unwritable = dir.path().join("missing-dir").join("media.epoch");
    let running = keyless_with_floor(&unwritable);
    let (status, body) = push(&running, &at(2, 9)).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("missing-dir"),
        "{body}"
    );
    let (_, _, config) = call(&running, "GET", "/api/v1/balancers/media/config", "").await;
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["version"], 1, "nothing was switched");
}

#[tokio::test]
async fn a_config_from_an_older_fencing_epoch_is_refused_whatever_its_version() {
    let running = keyless();
    let at = |version, epoch| BalancerConfig {
        epoch,
        ..media_config(version)
    };
    // A new leader (epoch 3) pushes the running version again: nothing to swap, but its epoch
    // becomes the floor.
    assert_eq!(push(&running, &at(1, 3)).await.0, 200);
    let (epoch, _) = epoch_metrics(&running).await;
    assert!(epoch.ends_with(" 3"), "{epoch}");
    // The old leader (epoch 2) is refused even with a newer version, and says why.
    let (status, body) = push(&running, &at(5, 2)).await;
    assert_eq!(status, 409);
    assert_eq!(body["reason"], "stale_epoch");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("epoch 2") && error.contains("epoch 3"),
        "{error}"
    );
    let (_, _, config) = call(&running, "GET", "/api/v1/balancers/media/config", "").await;
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["version"], 1, "nothing was switched");
    let (epoch, refused) = epoch_metrics(&running).await;
    assert!(
        refused.contains("reason=\"stale_epoch\"") && refused.ends_with(" 1"),
        "{refused}"
    );
    assert!(epoch.ends_with(" 3"), "{epoch}");
    // The leader goes on; an older version from it is refused for its version, not its epoch.
    assert_eq!(push(&running, &at(6, 3)).await.0, 200);
    let (status, body) = push(&running, &at(4, 3)).await;
    assert_eq!(status, 409);
    assert_eq!(body["reason"], "stale_version");
}
