//! The registry and hub keys through the admin router (`tower::ServiceExt::oneshot`), the recorder
//! task, and persistence across a controller restart.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{header, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use understudy_hub::{SecretKey, Signer};

use super::*;
use crate::runtime::balancer::FakeBalancer;
use crate::store::Store;

const TOKEN: &str = "s3cret";

fn open_core(store: Store) -> Arc<Core> {
    let cluster = crate::config::cluster::parse("t.toml", crate::testing::SAMPLE).unwrap();
    Arc::new(Core::open(cluster, store, Arc::new(FakeBalancer::new()), TOKEN.into()).unwrap())
}

/// The controller makes a machine active (as when its version joins), in its own transaction.
fn promote(core: &Core, id: &str, service: &str, version: &str) {
    core.with_store(|store, _, _| {
        store
            .write(|tx| {
                crate::store::set_machine_role(
                    tx,
                    id,
                    service,
                    version,
                    crate::core::roles::MachineRole::Active,
                    core.now_ms(),
                    None,
                    "test promotion",
                )
            })
            .unwrap()
    });
}

fn core() -> Arc<Core> {
    open_core(Store::open_in_memory().unwrap())
}

async fn call(
    core: &Arc<Core>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let mut request = http::Request::builder().method(method).uri(path);
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let response = crate::api::admin::router(core.clone())
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}

fn body(id: &str, service: &str, version: &str) -> String {
    serde_json::json!({
        "id": id, "service": service, "version": version,
        "address": "127.0.0.1:9100", "role": "standby", "capacity": 50,
    })
    .to_string()
}

async fn register(core: &Arc<Core>, id: &str, service: &str, version: &str) -> SecretKey {
    let (status, answer) = call(
        core,
        "POST",
        "/api/v1/machines",
        Some(TOKEN),
        &body(id, service, version),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["id"], id);
    assert_eq!(answer["controller_id"], "controller");
    SecretKey::from_base64(answer["key"].as_str().unwrap()).unwrap()
}

fn state(id: &str, service: &str, status: &str, sessions: u32) -> serde_json::Value {
    serde_json::json!({
        "id": id, "service": service, "version": "v9", "address": "127.0.0.1:9100",
        "role": "standby", "status": status, "capacity": 50, "sessions": sessions,
    })
}

async fn publish(core: &Arc<Core>, envelope: &understudy_hub::Envelope) -> (StatusCode, String) {
    let (status, answer) = call(
        core,
        "POST",
        "/api/v1/hub/publish",
        None,
        &serde_json::to_string(envelope).unwrap(),
    )
    .await;
    let reason = answer["reason"].as_str().unwrap_or_default().to_string();
    (status, reason)
}

/// Waits (bounded) until the registry holds `count` revisions of `id`.
async fn revisions_reach(core: &Arc<Core>, id: &str, count: usize) -> Vec<MachineRevision> {
    for _ in 0..200 {
        let history = core.machine_revisions(id).unwrap();
        if history.len() >= count {
            return history;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id}: fewer than {count} revisions");
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_prefix}"))
}

#[tokio::test]
async fn registration_needs_the_token_and_refuses_bad_bodies_naming_the_field() {
    let core = core();
    for token in [None, Some("wrong")] {
        let (status, answer) = call(
            &core,
            "POST",
            "/api/v1/machines",
            token,
            &body("media-9", "media", "v2"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(answer["error"].as_str().unwrap().contains("token"));
    }
    assert!(core.machine_records().is_empty(), "nothing registered");
    assert!(core.with_store(|s, _, _| s.machine_keys().unwrap().is_empty()));

    for (text, field) in [
        (r#"{"id": "x"}"#.to_string(), "service"),
        (
            body("media-9", "media", "v2").replace("\"capacity\"", "\"capacty\""),
            "capacty",
        ),
        (body("Media 9", "media", "v2"), "`id`"),
        (body("media-9", "nope", "v2"), "`service`"),
        (body("media-1", "db", "v2"), "`service`"),
        (
            body("media-9", "media", "v2").replace("50", "0"),
            "`capacity`",
        ),
        (
            body("media-9", "media", "v2").replace("127.0.0.1:9100", ""),
            "`address`",
        ),
        (
            body("media-9", "media", "v2").replace("standby", "boss"),
            "boss",
        ),
        ("{not json".to_string(), "bad registration body"),
    ] {
        let (status, answer) = call(&core, "POST", "/api/v1/machines", Some(TOKEN), &text).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(field), "{text}: {error}");
    }
    assert!(core.machine_records().is_empty(), "nothing half-applied");
    assert!(core.with_store(|s, _, _| s.machine_keys().unwrap().is_empty()));

    let key = register(&core, "media-9", "media", "v2").await;
    let record = &core.machine_records()[0];
    assert_eq!(record.id, "media-9");
    assert_eq!(record.status, Status::Starting);
    assert_eq!(record.capacity, 50);
    // Reads never show a key.
    for path in ["/api/v1/machines", "/api/v1/machines/media-9/history"] {
        let (status, answer) = call(&core, "GET", path, None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(!answer.to_string().contains(&key.to_base64()), "{path}");
    }
    // A declared machine keeps the controller's role whatever it asks for.
    register(&core, "media-1", "media", "v1").await;
    let records = core.machine_records();
    assert_eq!(records[0].id, "media-1");
    assert_eq!(records[0].role, Role::Active);
}

#[tokio::test]
async fn signed_reports_become_revisions_and_forgeries_are_refused_and_counted() {
    let core = core();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let recorder = crate::runtime::controller::recording::spawn_recorder(core.clone(), stop);
    let key = register(&core, "media-9", "media", "v2").await;
    // Let the recorder subscribe before the first publish.
    for _ in 0..100 {
        if core
            .hub()
            .render_metrics()
            .contains("understudy_hub_subscribers 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut signer = Signer::new("media-9", key.clone()).unwrap();
    let first = signer.sign("machine.state", state("media-9", "media", "running", 0));
    assert_eq!(
        publish(&core, &first).await,
        (StatusCode::ACCEPTED, String::new())
    );
    let history = revisions_reach(&core, "media-9", 2).await;
    assert_eq!(history[1].record.status, Status::Running);
    assert_eq!(history[1].record.version, "v9", "the machine's own report");

    // Replayed, wrong key, another machine's state: refused or not recorded.
    assert_eq!(
        publish(&core, &first).await,
        (StatusCode::UNAUTHORIZED, "replayed".into())
    );
    let mut forger = Signer::new("media-9", SecretKey::generate()).unwrap();
    let forged = forger.sign("machine.state", state("media-9", "media", "down", 0));
    assert_eq!(
        publish(&core, &forged).await,
        (StatusCode::UNAUTHORIZED, "bad_signature".into())
    );
    let mut stranger = Signer::new("media-7", key.clone()).unwrap();
    let unknown = stranger.sign("machine.state", state("media-7", "media", "down", 0));
    assert_eq!(
        publish(&core, &unknown).await,
        (StatusCode::UNAUTHORIZED, "unknown_sender".into())
    );
    let other = signer.sign("machine.state", state("media-1", "media", "down", 0));
    assert_eq!(publish(&core, &other).await.0, StatusCode::ACCEPTED);
    // Same record again: no revision; sessions changed: a revision.
    let same = signer.sign("machine.state", state("media-9", "media", "running", 0));
    assert_eq!(publish(&core, &same).await.0, StatusCode::ACCEPTED);
    let busier = signer.sign("machine.state", state("media-9", "media", "running", 3));
    assert_eq!(publish(&core, &busier).await.0, StatusCode::ACCEPTED);
    let history = revisions_reach(&core, "media-9", 3).await;
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].record.sessions, 3);
    assert!(core.machine_revisions("media-1").unwrap().is_empty());

    let (_, text) = call(&core, "GET", "/metrics", None, "").await;
    let text = text.as_str().unwrap().to_string();
    assert_eq!(
        metric(&text, "understudy_hub_rejected_total{reason=\"replayed\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_hub_rejected_total{reason=\"bad_signature\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_hub_rejected_total{reason=\"unknown_sender\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_machine_reports_total{outcome=\"refused\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_machine_reports_total{outcome=\"unchanged\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_machine_reports_total{outcome=\"revision\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_machines{role=\"standby\",service=\"media\",status=\"running\",version=\"v9\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "understudy_hub_keys_issued_total{kind=\"registration\"}"
        ),
        1.0
    );
    crate::runtime::metrics::promtool_check(&text);

    stop_tx.send(true).unwrap();
    recorder.await.unwrap();
}

#[tokio::test]
async fn rotation_with_no_body_or_null_takes_the_default_grace() {
    let core = core();
    register(&core, "db-9", "db", "v2").await;
    let path = "/api/v1/machines/db-9/rotate-key";
    for body in ["", " \n", "null"] {
        let (status, answer) = call(&core, "POST", path, Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::OK, "{body:?}: {answer}");
        assert_eq!(answer["grace_ms"], 60_000, "{body:?}");
    }
}

#[tokio::test]
async fn rotation_keeps_the_old_key_for_its_grace_and_unknown_ids_are_404() {
    let core = core();
    let old = register(&core, "db-9", "db", "v2").await;
    let (status, _) = call(&core, "POST", "/api/v1/machines/db-9/rotate-key", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, answer) = call(
        &core,
        "POST",
        "/api/v1/machines/nope/rotate-key",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (status, answer) = call(
        &core,
        "POST",
        "/api/v1/machines/db-9/rotate-key",
        Some(TOKEN),
        r#"{"grace": 5}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(answer["error"].as_str().unwrap().contains("grace"));
    let (status, answer) = call(
        &core,
        "POST",
        "/api/v1/machines/db-9/rotate-key",
        Some(TOKEN),
        r#"{"grace_ms": 60000}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["grace_ms"], 60000);
    let new = SecretKey::from_base64(answer["key"].as_str().unwrap()).unwrap();
    assert_ne!(new.to_base64(), old.to_base64());

    // In flight under the old key: accepted; then the new key; then the old one no more.
    let mut with_old = Signer::new("db-9", old.clone()).unwrap();
    let in_flight = with_old.sign("machine.state", state("db-9", "db", "running", 0));
    assert_eq!(publish(&core, &in_flight).await.0, StatusCode::ACCEPTED);
    let mut with_new = Signer::starting_at("db-9", new, in_flight.seq + 1).unwrap();
    let fresh = with_new.sign("machine.state", state("db-9", "db", "running", 1));
    assert_eq!(publish(&core, &fresh).await.0, StatusCode::ACCEPTED);
    let mut late_old = Signer::starting_at("db-9", old, fresh.seq + 1).unwrap();
    let late = late_old.sign("machine.state", state("db-9", "db", "running", 2));
    assert_eq!(
        publish(&core, &late).await,
        (StatusCode::UNAUTHORIZED, "bad_signature".into())
    );
    let (_, text) = call(&core, "GET", "/metrics", None, "").await;
    assert_eq!(
        metric(
            text.as_str().unwrap(),
            "understudy_hub_keys_issued_total{kind=\"rotation\"}"
        ),
        1.0
    );

    let (status, _) = call(&core, "GET", "/api/v1/machines/nope/history", None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Declared but never registered: known, no revision yet.
    let (status, answer) = call(&core, "GET", "/api/v1/machines/db-1/history", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, serde_json::json!([]));
}

#[tokio::test]
async fn listing_merges_declared_and_registered_machines_and_filters() {
    let core = core();
    register(&core, "media-9", "media", "v3").await;
    let key = register(&core, "db-2", "db", "v2").await;
    let mut signer = Signer::new("db-2", key).unwrap();
    let running = signer.sign("machine.state", state("db-2", "db", "running", 2));
    core.record_machine_state(&running).unwrap();

    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, all) = call(&core, "GET", "/api/v1/machines", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        all.as_array().unwrap().len(),
        10,
        "9 declared + 1 registered"
    );
    let media9 = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "media-9")
        .unwrap();
    assert_eq!(media9["declared"], false);
    assert_eq!(media9["weight"], serde_json::Value::Null);
    assert_eq!(media9["status"], "starting");

    for (query, expected) in [
        (
            "service=media",
            vec!["media-1", "media-2", "media-9", "media-c"],
        ),
        ("service=media&role=control", vec!["media-c"]),
        ("status=running", vec!["db-2"]),
        ("service=db&version=v9", vec!["db-2"]),
        ("role=active&service=db", vec!["db-1"]),
        ("version=v3", vec!["media-9"]),
    ] {
        let (status, list) =
            call(&core, "GET", &format!("/api/v1/machines?{query}"), None, "").await;
        assert_eq!(status, StatusCode::OK, "{query}");
        assert_eq!(ids(&list), expected, "{query}");
    }
    let db2 = &call(&core, "GET", "/api/v1/machines?status=running", None, "")
        .await
        .1[0];
    assert_eq!(db2["sessions"], 2);
    assert_eq!(
        db2["role"], "standby",
        "the controller's role for a candidate"
    );
    assert_eq!(db2["weight"], 100);
    for query in ["role=boss", "status=asleep", "colour=red"] {
        let (status, answer) =
            call(&core, "GET", &format!("/api/v1/machines?{query}"), None, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("bad machine filter"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn role_changes_by_the_controller_are_registry_revisions() {
    let core = core();
    let key = register(&core, "media-2", "media", "v2").await;
    let mut signer = Signer::new("media-2", key).unwrap();
    core.record_machine_state(
        &signer.sign("machine.state", state("media-2", "media", "running", 0)),
    )
    .unwrap();
    promote(&core, "media-2", "media", "v2");
    let history = core.machine_revisions("media-2").unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].record.role, Role::Active);
    assert_eq!(history[2].record.status, Status::Running, "the rest kept");
}

fn file_store(path: &Path) -> Store {
    Store::open(path).unwrap()
}

#[tokio::test]
async fn keys_and_revisions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("understudy.db");
    let (key, rotated, seq) = {
        let core = open_core(file_store(&db));
        let key = register(&core, "media-9", "media", "v2").await;
        let other = register(&core, "db-9", "db", "v2").await;
        let mut signer = Signer::new("media-9", key.clone()).unwrap();
        let report = signer.sign("machine.state", state("media-9", "media", "running", 1));
        core.record_machine_state(&report).unwrap();
        let (status, answer) = call(
            &core,
            "POST",
            "/api/v1/machines/db-9/rotate-key",
            Some(TOKEN),
            r#"{"grace_ms": 600000}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let rotated = SecretKey::from_base64(answer["key"].as_str().unwrap()).unwrap();
        (key, (other, rotated), report.seq)
    };
    let core = open_core(file_store(&db));
    let history = core.machine_revisions("media-9").unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].record.sessions, 1);
    // The machine goes on publishing with its key, numbering on.
    let mut signer = Signer::starting_at("media-9", key, seq + 1).unwrap();
    let report = signer.sign("machine.state", state("media-9", "media", "running", 2));
    assert_eq!(publish(&core, &report).await.0, StatusCode::ACCEPTED);
    // A rotation's grace survives too: the old key first, then the new one.
    let (old, new) = rotated;
    let mut old_signer = Signer::new("db-9", old).unwrap();
    let report = old_signer.sign("machine.state", state("db-9", "db", "running", 0));
    assert_eq!(publish(&core, &report).await.0, StatusCode::ACCEPTED);
    let mut new_signer = Signer::starting_at("db-9", new, report.seq + 1).unwrap();
    let report = new_signer.sign("machine.state", state("db-9", "db", "running", 0));
    assert_eq!(publish(&core, &report).await.0, StatusCode::ACCEPTED);
}

/// Sends one HTTP/1.1 request on a fresh connection and returns the stream after the request.
async fn send(addr: std::net::SocketAddr, request: String) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Reads until `needle` shows up (bounded by a timeout), returning what was read.
async fn read_until(stream: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn a_running_controller_hosts_the_hub_and_shuts_down_with_subscribers_open() {
    let metrics = hosts_the_hub(crate::testing::SAMPLE.to_string()).await;
    assert!(!metrics.contains("understudy_hub_nats"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_nats_reports_are_verified_and_recorded_the_same_way() {
    // scripts/setup.sh installs nats-server; without it this fails and says so.
    let server = understudy_hub::nats::NatsServer::start().expect("nats-server");
    let text = format!(
        "{}\n[hub]\nbackend = \"nats\"\nnats_url = \"{}\"\n",
        crate::testing::SAMPLE,
        server.url()
    );
    let metrics = hosts_the_hub(text).await;
    assert!(
        metrics.contains("understudy_hub_nats_received_total"),
        "the NATS backend carried it: {metrics}"
    );
}

/// A controller started on `cluster_text`: a machine registers over HTTP, publishes its state,
/// an SSE subscriber sees it, the registry records it, and shutdown ends the subscriber.
async fn hosts_the_hub(cluster_text: String) -> String {
    let cluster = crate::config::cluster::parse("t.toml", &cluster_text).unwrap();
    let config = crate::app::ControllerConfig {
        store: crate::config::store::StoreLocation::Memory,
        lease: None,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        tick: Duration::from_millis(50),
        cluster,
    };
    let handle = crate::app::start_with_client(config, Arc::new(FakeBalancer::new()))
        .await
        .unwrap();
    let addr = handle.admin_addr();
    let core = handle.core().clone();

    // Subscriptions are authenticated by default: an anonymous one is refused.
    let subscribe = |token: Option<String>| {
        let auth = token
            .map(|t| format!("{}: {t}\r\n", understudy_hub::http::SUBSCRIBE_AUTH_HEADER))
            .unwrap_or_default();
        format!(
            "GET /api/v1/hub/subscribe?topic=machine.state HTTP/1.1\r\nhost: {addr}\r\n{auth}\r\n"
        )
    };
    let mut anonymous = send(addr, subscribe(None)).await;
    read_until(&mut anonymous, "401 Unauthorized").await;

    let registration = body("media-9", "media", "v2");
    let mut answer = send(
        addr,
        format!(
            "POST /api/v1/machines HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{registration}",
            registration.len()
        ),
    )
    .await;
    let text = read_until(&mut answer, "}").await;
    let json = &text[text.find('{').unwrap()..];
    let answer: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(answer["hub_url"], format!("http://{addr}"));
    let key = SecretKey::from_base64(answer["key"].as_str().unwrap()).unwrap();

    let mut signer = Signer::new("media-9", key).unwrap();
    // A subscriber on the machines' state, over server-sent events, signed by the machine.
    let mut events = send(addr, subscribe(Some(signer.subscribe_token()))).await;
    read_until(&mut events, "text/event-stream").await;
    let report = serde_json::to_string(
        &signer.sign("machine.state", state("media-9", "media", "running", 4)),
    )
    .unwrap();
    let mut published = send(
        addr,
        format!(
            "POST /api/v1/hub/publish HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{report}",
            report.len()
        ),
    )
    .await;
    read_until(&mut published, "202 Accepted").await;
    read_until(&mut events, "\"sessions\":4").await;
    // The recorder task of the running controller made it a revision.
    let history = revisions_reach(&core, "media-9", 2).await;
    assert_eq!(history[1].record.sessions, 4);
    let metrics = core.hub().render_metrics();

    // The open SSE stream does not hold the shutdown up: the hub is closed, the stream ends.
    tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
        .await
        .expect("shutdown with a subscriber open");
    read_until(&mut events, "hub_closed").await;
    metrics
}

#[tokio::test]
async fn a_message_captured_before_a_restart_is_refused_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("understudy.db");
    let seconds_ago = |s: u64| understudy_hub::envelope::wall_clock_micros() - s * 1_000_000;
    let (key, lagging_key, captured, long_ago) = {
        let core = open_core(file_store(&db));
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let recorder = crate::runtime::controller::recording::spawn_recorder(core.clone(), stop);
        let key = register(&core, "media-9", "media", "v2").await;
        let lagging_key = register(&core, "db-9", "db", "v2").await;
        // Signed 3 s ago (longer than the default 2 s skew), then one signed now.
        let mut past = Signer::starting_at("media-9", key.clone(), seconds_ago(3)).unwrap();
        let long_ago = past.sign("machine.state", state("media-9", "media", "running", 1));
        assert_eq!(publish(&core, &long_ago).await.0, StatusCode::ACCEPTED);
        let mut signer = Signer::new("media-9", key.clone()).unwrap();
        let captured = signer.sign("machine.state", state("media-9", "media", "running", 2));
        assert_eq!(publish(&core, &captured).await.0, StatusCode::ACCEPTED);
        // The recorder saves the last sequence numbers when it stops (and every second).
        stop_tx.send(true).unwrap();
        recorder.await.unwrap();
        let saved = core.with_store(|s, _, _| s.hub_sequences().unwrap());
        assert_eq!(saved.get("media-9"), Some(&captured.seq));
        assert_eq!(core.save_hub_sequences().unwrap(), 0, "nothing moved since");
        (key, lagging_key, captured, long_ago)
    };

    let core = open_core(file_store(&db));
    // `captured` is within the skew: only the saved sequence number refuses it.
    for old in [&captured, &long_ago] {
        assert_eq!(
            publish(&core, old).await,
            (StatusCode::UNAUTHORIZED, "out_of_order".into()),
            "seq {}",
            old.seq
        );
    }
    // The machine's new messages are accepted.
    let mut signer = Signer::new("media-9", key).unwrap();
    let fresh = signer.sign("machine.state", state("media-9", "media", "running", 3));
    assert_eq!(publish(&core, &fresh).await.0, StatusCode::ACCEPTED);
    // A machine whose clock lags the controller's by less than the skew is not refused...
    let mut lagging = Signer::starting_at("db-9", lagging_key.clone(), seconds_ago(1)).unwrap();
    let report = lagging.sign("machine.state", state("db-9", "db", "running", 0));
    assert_eq!(publish(&core, &report).await.0, StatusCode::ACCEPTED);
    // ...but one never accepted and signed longer than the skew ago is.
    let mut ancient = Signer::starting_at("db-9", lagging_key, seconds_ago(60)).unwrap();
    let report = ancient.sign("machine.state", state("db-9", "db", "running", 0));
    assert_eq!(
        publish(&core, &report).await,
        (StatusCode::UNAUTHORIZED, "out_of_order".into())
    );
    let (_, text) = call(&core, "GET", "/metrics", None, "").await;
    assert_eq!(
        metric(
            text.as_str().unwrap(),
            "understudy_hub_rejected_total{reason=\"out_of_order\"}"
        ),
        3.0
    );
}

fn core_with_hub_table(store: Store, hub: &str) -> Arc<Core> {
    let text = format!("{}\n[hub]\n{hub}\n", crate::testing::SAMPLE);
    let cluster = crate::config::cluster::parse("t.toml", &text).unwrap();
    Arc::new(Core::open(cluster, store, Arc::new(FakeBalancer::new()), TOKEN.into()).unwrap())
}

#[tokio::test]
async fn history_keeps_the_newest_revisions_per_machine() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("understudy.db");
    {
        let core = core_with_hub_table(file_store(&db), "history_per_machine = 3");
        let key = register(&core, "media-9", "media", "v2").await;
        let other = register(&core, "db-9", "db", "v2").await;
        let mut signer = Signer::new("media-9", key).unwrap();
        for sessions in 1..=5 {
            let report = signer.sign(
                "machine.state",
                state("media-9", "media", "running", sessions),
            );
            core.record_machine_state(&report).unwrap();
        }
        let history = core.machine_revisions("media-9").unwrap();
        let revisions: Vec<u64> = history.iter().map(|r| r.revision).collect();
        assert_eq!(revisions, vec![4, 5, 6], "the newest 3 of 6");
        assert_eq!(history[2].record.sessions, 5);
        // A role change by the controller appends (and prunes) in its own transaction too.
        promote(&core, "media-9", "media", "v2");
        let revisions: Vec<u64> = core
            .machine_revisions("media-9")
            .unwrap()
            .iter()
            .map(|r| r.revision)
            .collect();
        assert_eq!(revisions, vec![5, 6, 7]);
        // Another machine's history is its own.
        let mut db9 = Signer::new("db-9", other).unwrap();
        core.record_machine_state(&db9.sign("machine.state", state("db-9", "db", "running", 0)))
            .unwrap();
        assert_eq!(core.machine_revisions("db-9").unwrap().len(), 2);
        let (_, listing) = call(&core, "GET", "/api/v1/machines?status=running", None, "").await;
        assert_eq!(listing.as_array().unwrap().len(), 2, "{listing}");
    }
    // A lower bound at the next start prunes what is there at once.
    let core = core_with_hub_table(file_store(&db), "history_per_machine = 1");
    let history = core.machine_revisions("media-9").unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].revision, 7);
    assert_eq!(history[0].record.role, Role::Active);
    assert_eq!(core.machine_revisions("db-9").unwrap()[0].revision, 2);
}

#[test]
fn health_changes_are_the_turns_to_failing_and_back() {
    use understudy_wire::{MachineHealth, MachineState, MachineStatus, PoolRole};
    let status = |id: &str, health: MachineHealth| MachineStatus {
        id: id.into(),
        version: "v1".into(),
        config: PoolRole::Active,
        state: MachineState::Serving,
        sessions: 0,
        health,
        health_reason: (health == MachineHealth::Failing).then(|| format!("{id} refused")),
    };
    use MachineHealth::*;
    let first = [
        status("a", Answering),
        status("b", Failing),
        status("c", Unknown),
    ];
    let turned = |before: Option<&[MachineStatus]>, after: &[MachineStatus]| {
        crate::runtime::machines::health_changes(before, after)
            .into_iter()
            .map(|c| (c.machine, c.health, c.reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        turned(None, &first),
        [("b".to_string(), Failing, Some("b refused".to_string()))],
        "first seen failing is news, first seen answering is not"
    );
    assert_eq!(turned(Some(&first), &first), []);
    let second = [
        status("a", Failing),
        status("b", Answering),
        status("c", Answering),
    ];
    assert_eq!(
        turned(Some(&first), &second),
        [
            ("a".to_string(), Failing, Some("a refused".to_string())),
            ("b".to_string(), Answering, None)
        ]
    );
}
