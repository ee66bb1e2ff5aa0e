use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use tower::ServiceExt;
use understudy_hub::{EmbeddedHub, Envelope};

use super::*;
use crate::api::predictions::router;
use crate::cli::predictions::{alerts_text, models_text, states_text};
use crate::config::predict::{PredictSection, PredictSectionError, PredictionSettings};
use crate::testing::json;
use axum::http::StatusCode;
use axum::Json;
use understudy_judge::Condition;

fn section(text: &str) -> Result<PredictionSettings, PredictSectionError> {
    let section: PredictSection = toml::from_str(text).map_err(|e| PredictSectionError {
        field: "(toml)".into(),
        reason: e.to_string(),
    })?;
    section.validate()
}

fn settings(text: &str) -> PredictionSettings {
    section(text).unwrap_or_else(|e| panic!("{e}"))
}

fn predictions(text: &str) -> Arc<Predictions> {
    Arc::new(Predictions::new(settings(text), Clock::new()).expect("metrics"))
}

/// A `call.state` envelope of one machine's events: (object, status, at_ms).
fn batch(service: &str, version: &str, config: &str, events: &[(&str, &str, u64)]) -> Envelope {
    let events: Vec<serde_json::Value> = events
        .iter()
        .map(|(object, status, at_ms)| {
            serde_json::json!({ "object": object, "kind": "call", "status": status, "at_ms": at_ms })
        })
        .collect();
    Envelope {
        sender: format!("{service}-{version}-{config}"),
        seq: 1,
        topic: CALL_STATE_TOPIC.to_string(),
        payload: serde_json::json!({
            "service": service, "version": version, "config": config,
            "machine": format!("{service}-{version}-{config}"), "events": events,
        }),
        signature: None,
    }
}

/// `calls` calls through received -> media -> (error for every `fail_every`-th call, else completed),
/// ending at `now_ms`, objects named `{prefix}-N`.
fn calls(
    p: &Predictions,
    service: &str,
    version: &str,
    config: &str,
    prefix: &str,
    count: usize,
    fail_every: Option<usize>,
) {
    let now = p.clock.now_ms();
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        let end = match fail_every {
            Some(k) if n % k == 0 => "error",
            _ => "completed",
        };
        let events = [
            (id.as_str(), "received", now.saturating_sub(3_000)),
            (id.as_str(), "media", now.saturating_sub(2_500)),
            (id.as_str(), "media", now.saturating_sub(1_500)),
            (id.as_str(), end, now),
        ];
        p.ingest(&batch(service, version, config, &events))
            .expect("accepted");
    }
}

// ---- configuration ----

#[test]
fn default_rules_map_the_machines_statuses_to_the_issue_states() {
    let settings = PredictionSettings::default();
    assert!(settings.enabled && settings.rollback);
    let predictor = Predictor::new(settings.model.clone());
    let expected = [
        ("received", Some("received")),
        ("routed", Some("routed")),
        ("queued", Some("queued")),
        ("media", Some("media")),
        ("completed", Some("completed")),
        ("error", Some("error state failure")),
        ("timeout", Some("time threshold failure")),
        ("dialing", None),
    ];
    for (status, state) in expected {
        let update = Update::new("c", "media", "v1", "call").with("status", status);
        assert_eq!(predictor.state_of(&update), state, "status {status}");
    }
    // Another kind of object is not a call.
    let sms = Update::new("s", "media", "v1", "sms").with("status", "received");
    assert_eq!(predictor.state_of(&sms), None);
    assert_eq!(settings.model.start_state.as_deref(), Some("received"));
    assert!(settings.model.successes.contains("completed"));
    assert_eq!(
        settings.model.dwell_limit("media"),
        Some(Duration::from_secs(300))
    );
}

#[test]
fn the_section_overrides_defaults_key_by_key() {
    let s = settings(
        r#"
        rollback = false
        webhook_url = "http://127.0.0.1:9/alerts"
        webhook_timeout_ms = 500
        [[rules]]
        kind = "call"
        when = { status = "error", config = "simulation" }
        state = "error state failure"
        [alerts]
        threshold = 0.2
        [compare]
        min_starts = 30
        "#,
    );
    assert!(s.enabled && !s.rollback);
    let webhook = s.webhook.expect("webhook");
    assert_eq!(webhook.timeout, Duration::from_millis(500));
    assert_eq!(webhook.queue, 1024);
    assert_eq!(s.model.rules.len(), 1, "rules replace the default rules");
    assert_eq!(s.model.alerts.threshold, 0.2);
    assert_eq!(s.model.compare.min_starts, 30.0);
    // Keys left out keep the defaults.
    assert_eq!(s.model.start_state.as_deref(), Some("received"));
}

#[test]
fn bad_sections_name_the_field() {
    let refused = |text: &str| section(text).unwrap_err().to_string();
    assert!(refused("webhook_url = \"ftp://x/y\"").contains("`predict.webhook_url`"));
    assert!(refused("webhook_url = \"not a url\"").contains("`predict.webhook_url`"));
    assert!(refused("webhook_timeout_ms = 100").contains("`predict.webhook_timeout_ms`"));
    assert!(refused("recent_alerts = 0").contains("`predict.recent_alerts`"));
    assert!(refused("[alerts]\nthreshold = 2").contains("`predict.alerts.threshold`"));
    assert!(refused("start_state = \"completed\"").contains("`predict.start_state`"));
    let unknown = refused("half_lfe_secs = 3");
    assert!(unknown.contains("`predict.half_lfe_secs`"), "{unknown}");
    let nested = refused("[alerts]\ntreshold = 0.1");
    assert!(nested.contains("`predict.alerts.treshold`"), "{nested}");
    let typo = refused("[[rules]]\nkind = \"call\"\nstat = \"x\"");
    assert!(typo.contains("`predict.rules[0].stat`"), "{typo}");
    let wrong_type = refused("[compare]\nz = \"high\"");
    assert!(wrong_type.contains("`predict.compare.z`"), "{wrong_type}");
    let rule = refused("[[rules]]\nkind = \"call\"\nstate = \"\"");
    assert!(rule.contains("`predict.rules[0].state`"), "{rule}");
}

// ---- messages ----

#[test]
fn events_become_updates_with_status_config_and_machine() {
    let now = 1_000_000;
    let batch: CallStateBatch = serde_json::from_value(serde_json::json!({
        "service": "media", "version": "v2", "config": "simulation", "machine": "media-3",
        "events": [
            { "object": "voice-1", "kind": "call", "status": "received", "at_ms": now - 40 },
            { "object": "voice-1", "kind": "call", "status": "media", "at_ms": now + 3_600_000 },
            { "object": "voice-2", "kind": "call", "status": "error" },
        ],
    }))
    .expect("payload");
    let updates = updates_of(&batch, now);
    assert_eq!(updates.len(), 3);
    let (first, at) = &updates[0];
    assert_eq!(first.object, "voice-1");
    assert_eq!(
        (first.service.as_str(), first.version.as_str()),
        ("media", "v2")
    );
    assert_eq!(first.kind, "call");
    assert_eq!(first.fields["status"], "received");
    assert_eq!(first.fields["config"], "simulation");
    assert_eq!(first.fields["machine"], "media-3");
    assert_eq!(*at, now - 40, "the machine's time is kept");
    assert_eq!(updates[1].1, now, "a clock an hour ahead is not believed");
    assert_eq!(updates[2].1, now, "no time: arrival time");
}

#[tokio::test(start_paused = true)]
async fn bad_messages_are_refused_and_counted() {
    let p = predictions("");
    let mut wrong_topic = batch("media", "v1", "active", &[]);
    wrong_topic.topic = "machine.state".into();
    assert!(matches!(p.ingest(&wrong_topic), Err(IngestError::Topic(_))));
    let mut bad = batch("media", "v1", "active", &[]);
    bad.payload = serde_json::json!({ "service": "media" });
    assert!(matches!(p.ingest(&bad), Err(IngestError::Payload { .. })));
    let mut bad_config = batch("media", "v1", "active", &[]);
    bad_config.payload["config"] = "sideways".into();
    assert!(p.ingest(&bad_config).is_err());
    let mut forged = batch("media", "v1", "active", &[]);
    forged.payload["machine"] = "media-2".into();
    assert!(matches!(
        p.ingest(&forged),
        Err(IngestError::NotItsOwn { .. })
    ));
    let mut unnamed = batch("media", "v1", "active", &[]);
    unnamed.payload.as_object_mut().unwrap().remove("machine");
    assert!(p.ingest(&unnamed).is_ok(), "the sender names the machine");
    assert_eq!(p.metrics.messages.with_label_values(&["rejected"]).get(), 4);
    assert_eq!(p.metrics.messages.with_label_values(&["accepted"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn active_and_simulation_copies_of_one_session_stay_apart() {
    let p = predictions("");
    let now = p.clock.now_ms();
    // v1 active and the v1 control see the same session: one completes, the other errors.
    p.ingest(&batch(
        "media",
        "v1",
        "active",
        &[("s", "received", now), ("s", "completed", now)],
    ))
    .unwrap();
    p.ingest(&batch(
        "media",
        "v1",
        "simulation",
        &[("s", "received", now), ("s", "error", now)],
    ))
    .unwrap();
    let view = p.view(Some("media"), Some("v1"));
    assert_eq!(view.models.len(), 2);
    let active = view
        .models
        .iter()
        .find(|m| m.config == PoolRole::Active)
        .unwrap();
    let control = view
        .models
        .iter()
        .find(|m| m.config == PoolRole::Simulation)
        .unwrap();
    assert_eq!(active.outlook.table.count("received", "completed"), 1.0);
    assert_eq!(
        active
            .outlook
            .table
            .count("received", "error state failure"),
        0.0
    );
    assert_eq!(
        control
            .outlook
            .table
            .count("received", "error state failure"),
        1.0
    );
}

// ---- alerts ----

#[tokio::test(start_paused = true)]
async fn entering_a_doomed_state_alerts_to_the_metric_and_the_list() {
    let p = predictions("recent_alerts = 3\nresolve_interval_ms = 0");
    // 40 calls of v2 through media, one in four ends in an error: P(error | media) = 0.25.
    calls(&p, "media", "v2", "simulation", "old", 40, Some(4));
    let counter =
        p.metrics
            .alerts
            .with_label_values(&["media", "v2", "media", "error state failure"]);
    let (before, total_before) = (counter.get(), lock(&p.inner).alerts_total);
    let now = p.clock.now_ms();
    for n in 0..5 {
        let id = format!("new-{n}");
        p.ingest(&batch(
            "media",
            "v2",
            "simulation",
            &[(&id, "received", now), (&id, "media", now)],
        ))
        .unwrap();
    }
    let alerts = p.alerts(None, None, 100);
    assert_eq!(alerts.len(), 3, "the list keeps the 3 most recent");
    assert_eq!(alerts[0].alert.object, "new-4", "newest first");
    // Entering `received` alerts too (P = 0.25 from the start); entering media alerts.
    let media: Vec<_> = alerts.iter().filter(|a| a.alert.state == "media").collect();
    assert!(!media.is_empty());
    assert!(
        (media[0].alert.probability - 0.25).abs() < 1e-9,
        "{}",
        media[0].alert.probability
    );
    assert_eq!(media[0].alert.artifact, "error state failure");
    assert_eq!(media[0].config, PoolRole::Simulation);
    assert_eq!(counter.get() - before, 5, "one per call entering media");
    assert_eq!(
        lock(&p.inner).alerts_total - total_before,
        10,
        "and one entering received"
    );
    assert!(p.alerts(Some("router"), None, 100).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_call_past_its_dwell_limit_is_a_time_threshold_failure() {
    let p = predictions("[dwell]\nlimit_secs = 5");
    let now = p.clock.now_ms();
    p.ingest(&batch(
        "media",
        "v1",
        "active",
        &[("c", "received", now), ("c", "media", now)],
    ))
    .unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    p.tick();
    let view = p.view(Some("media"), None);
    let table = &view.models[0].outlook.table;
    assert_eq!(table.count("media", "time threshold failure"), 1.0);
    assert_eq!(view.tracked_objects, 0);
    let gauge = p
        .metrics
        .failure
        .with_label_values(&["media", "v1", "active"])
        .get();
    assert_eq!(gauge, 1.0, "P(failure) from the start state on the gauge");
}

/// A webhook receiver on 127.0.0.1:0 that answers `status` and forwards each body.
async fn receiver(status: StatusCode) -> (String, mpsc::UnboundedReceiver<serde_json::Value>) {
    let (sender, bodies) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |Json(body): Json<serde_json::Value>| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(body);
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bodies)
}

async fn wait_for(counter: &prometheus::IntCounter, at_least: u64) {
    for _ in 0..500 {
        if counter.get() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("counter stayed at {}", counter.get());
}

fn hub() -> Arc<dyn Backend> {
    Arc::new(EmbeddedHub::new(&Registry::new()).expect("hub"))
}

#[tokio::test]
async fn alerts_are_posted_to_the_webhook() {
    let (url, mut bodies) = receiver(StatusCode::OK).await;
    let p = predictions(&format!(
        "webhook_url = \"{url}\"\nresolve_interval_ms = 0\n[alerts]\nmin_exits = 4"
    ));
    let (_stop, shutdown) = watch::channel(false);
    let tasks = p.start(hub(), shutdown);
    assert_eq!(tasks.len(), 2, "feed and webhook sender");
    calls(&p, "media", "v2", "simulation", "old", 8, Some(2));
    let now = p.clock.now_ms();
    p.ingest(&batch(
        "media",
        "v2",
        "simulation",
        &[("new", "received", now), ("new", "media", now)],
    ))
    .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(5), bodies.recv())
        .await
        .expect("a POST within 5 s")
        .expect("body");
    let alerts = body["alerts"].as_array().expect("alerts array");
    assert!(!alerts.is_empty());
    assert_eq!(alerts[0]["service"], "media");
    assert_eq!(alerts[0]["version"], "v2");
    assert_eq!(alerts[0]["config"], "simulation");
    assert_eq!(alerts[0]["artifact"], "error state failure");
    assert!(alerts[0]["probability"].as_f64().unwrap() >= 0.05);
    wait_for(&p.metrics.webhook.with_label_values(&["sent"]), 1).await;
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn a_failing_webhook_is_counted_and_never_blocks() {
    let (url, _bodies) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let p = predictions(&format!(
        "webhook_url = \"{url}\"\nwebhook_queue = 2\nresolve_interval_ms = 0\n[alerts]\nmin_exits = 4"
    ));
    calls(&p, "media", "v2", "simulation", "old", 8, Some(2));
    let now = p.clock.now_ms();
    // Not started yet: the queue of 2 fills and the rest are dropped, without waiting.
    for n in 0..4 {
        let id = format!("new-{n}");
        p.ingest(&batch(
            "media",
            "v2",
            "simulation",
            &[(&id, "received", now), (&id, "media", now)],
        ))
        .unwrap();
    }
    let dropped = p.metrics.webhook.with_label_values(&["dropped"]).get();
    assert!(dropped >= 2, "dropped {dropped}");
    let (_stop, shutdown) = watch::channel(false);
    let tasks = p.start(hub(), shutdown);
    wait_for(&p.metrics.webhook.with_label_values(&["failed"]), 2).await;
    assert_eq!(p.metrics.webhook.with_label_values(&["sent"]).get(), 0);
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn the_feed_follows_call_state_on_the_hub() {
    let hub = Arc::new(EmbeddedHub::new(&Registry::new()).expect("hub"));
    let p = predictions("");
    let (stop, shutdown) = watch::channel(false);
    let tasks = p.start(hub.clone(), shutdown);
    // The subscription is taken asynchronously: publish until it is there.
    let now = p.clock.now_ms();
    for _ in 0..500 {
        if hub
            .publish_now(batch(
                "media",
                "v1",
                "active",
                &[("c", "received", now), ("c", "completed", now)],
            ))
            .unwrap()
            > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut other = batch("media", "v1", "active", &[("x", "received", now)]);
    other.topic = "machine.state".into();
    hub.publish_now(other).unwrap();
    wait_for(&p.metrics.messages.with_label_values(&["accepted"]), 1).await;
    assert_eq!(p.metrics.messages.with_label_values(&["rejected"]).get(), 0);
    assert_eq!(p.view(None, None).models.len(), 1);
    stop.send(true).unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the feed stops on shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn disabled_predictions_start_nothing() {
    let p = predictions("enabled = false");
    let (_stop, shutdown) = watch::channel(false);
    assert!(p.start(hub(), shutdown).is_empty());
    assert!(p
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
}

// ---- API ----

async fn get_json(p: &Arc<Predictions>, uri: &str) -> (StatusCode, serde_json::Value) {
    let response = axum::Router::from(router(p.clone()))
        .oneshot(http::Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

#[tokio::test(start_paused = true)]
async fn the_api_shows_tables_probabilities_dwell_and_the_comparison() {
    let p = predictions("resolve_interval_ms = 0\n[alerts]\nmin_exits = 4");
    calls(&p, "media", "v1", "active", "a", 20, None);
    calls(&p, "media", "v2", "simulation", "b", 20, Some(4));
    calls(&p, "router", "v1", "active", "r", 3, None);

    let (status, all) = get_json(&p, "/api/v1/predictions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["enabled"], true);
    assert_eq!(all["start_state"], "received");
    assert_eq!(all["models"].as_array().unwrap().len(), 3);
    let comparisons = all["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 1);
    assert_eq!(comparisons[0]["service"], "media");
    assert_eq!(comparisons[0]["baseline"]["version"], "v1");
    assert_eq!(comparisons[0]["baseline"]["config"], "active");
    assert_eq!(comparisons[0]["candidate"]["version"], "v2");
    let numbers = &comparisons[0]["comparison"];
    assert!((numbers["candidate"]["failure"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    assert_eq!(numbers["baseline"]["failure"].as_f64(), Some(0.0));
    assert_eq!(numbers["start_state"], "received");
    assert!(numbers["clearly_higher"].is_boolean());

    let (status, media) = get_json(&p, "/api/v1/predictions/media/v2").await;
    assert_eq!(status, StatusCode::OK);
    let model = &media["models"][0];
    assert_eq!(model["config"], "simulation");
    assert!((model["start_failure"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    let media_state = &model["outlook"]["states"]["media"];
    assert!(
        (media_state["artifacts"]["error state failure"]
            .as_f64()
            .unwrap()
            - 0.25)
            .abs()
            < 1e-9
    );
    assert_eq!(
        model["outlook"]["table"]["counts"]["media"]["media"],
        serde_json::Value::Null
    );
    // Decayed counts: 20 transitions 2.5 s old, half-life 900 s.
    let decayed = 20.0 * (-2.5f64 / 900.0).exp2();
    let count = model["outlook"]["table"]["counts"]["received"]["media"]
        .as_f64()
        .unwrap();
    assert!((count - decayed).abs() < 1e-9, "{count}");
    assert!((model["dwell"]["media"]["samples"].as_f64().unwrap() - 20.0).abs() < 1e-9);
    assert!((model["dwell"]["media"]["mean_secs"].as_f64().unwrap() - 2.5).abs() < 1e-9);

    let (status, router_only) = get_json(&p, "/api/v1/predictions/router").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(router_only["models"].as_array().unwrap().len(), 1);
    assert!(router_only["comparisons"].as_array().unwrap().is_empty());

    let (status, missing) = get_json(&p, "/api/v1/predictions/billing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(missing["error"].as_str().unwrap().contains("billing"));
    let (status, _) = get_json(&p, "/api/v1/predictions/media/v9").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let now = p.clock.now_ms();
    p.ingest(&batch(
        "media",
        "v2",
        "simulation",
        &[("n", "received", now), ("n", "media", now)],
    ))
    .unwrap();
    let (status, alerts) = get_json(&p, "/api/v1/predictions/alerts?service=media&limit=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(alerts["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(alerts["alerts"][0]["object"], "n");
    assert_eq!(alerts["alerts"][0]["state"], "media");
    assert_eq!(alerts["alerts"][0]["cause"], "entered");
    assert!(alerts["alerts_total"].as_u64().unwrap() >= 2);
    let (status, refused) = get_json(&p, "/api/v1/predictions/alerts?limt=3").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(refused["error"].as_str().unwrap().contains("limt"));
}

// ---- the early signal ----

/// The judge's verdict JSON while it still lacks data, as the controller passes it.
fn judge_json() -> RolloutVerdict {
    RolloutVerdict {
        decision: Decision::NotEnoughData,
        hard: false,
        jobs: 640,
        rule: "not enough data: evidence still open for errors".into(),
        details: serde_json::json!({ "errors": { "v2_rate": 0.004 } }),
        numbers: Some(crate::core::verdict::PairSummary {
            jobs: 640,
            ..Default::default()
        }),
        baseline: None,
        baseline_note: None,
    }
}

#[tokio::test(start_paused = true)]
async fn v2_failing_late_in_its_calls_is_failed_by_the_prediction() {
    let p = predictions("resolve_interval_ms = 0");
    // The controller looks at rollout 1 from the moment it simulates.
    assert!(p
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    // Not enough calls yet: no signal.
    calls(&p, "media", "v1", "active", "a", 50, None);
    calls(&p, "media", "v2", "simulation", "b", 50, Some(3));
    assert!(p
        .early_fail(
            1,
            "media",
            "v1",
            "v2",
            &Condition::default(),
            Some(&judge_json())
        )
        .is_none());
    // 150 calls each; one v2 call in three fails after its media stay, v1's never do.
    calls(&p, "media", "v1", "active", "c", 100, None);
    calls(&p, "media", "v2", "simulation", "d", 100, Some(3));
    let early = p
        .early_fail(
            1,
            "media",
            "v1",
            "v2",
            &Condition::default(),
            Some(&judge_json()),
        )
        .expect("clearly higher");
    assert_eq!(early.verdict.decision, Decision::Fail);
    assert!(early.verdict.hard);
    assert!(
        early.verdict.rule.starts_with("prediction:"),
        "{}",
        early.verdict.rule
    );
    assert_eq!(early.verdict.jobs, 640);
    let numbers = &json(&early.shown)["details"]["prediction"];
    // The chain's estimates, shown beside the test that decided.
    assert!((numbers["v2_failure"].as_f64().unwrap() - 51.0 / 150.0).abs() < 1e-9);
    assert_eq!(numbers["v1_failure"].as_f64(), Some(0.0));
    // The test: 150 pairs of ended calls, its evidence past 1/alpha at the default condition's
    // share (0.1 x 0.01).
    assert_eq!(numbers["pairs"], 150);
    assert_eq!(
        (numbers["v1_ended"].as_u64(), numbers["v2_ended"].as_u64()),
        (Some(150), Some(150))
    );
    assert_eq!(
        (numbers["v1_failed"].as_u64(), numbers["v2_failed"].as_u64()),
        (Some(0), Some(51))
    );
    assert!((numbers["alpha"].as_f64().unwrap() - 0.001).abs() < 1e-12);
    assert!((numbers["threshold"].as_f64().unwrap() - 1000.0).abs() < 1e-6);
    assert!(numbers["fail_evidence"].as_f64().unwrap() >= 1000.0);
    assert_eq!(
        json(&early.shown)["details"]["errors"]["v2_rate"].as_f64(),
        Some(0.004)
    );
    assert_eq!(json(&early.shown)["rule"], early.verdict.rule.as_str());
    assert_eq!(json(&early.shown)["decision"], "fail");
    assert_eq!(json(&early.shown)["numbers"]["jobs"], 640);
    assert_eq!(p.metrics.signals.with_label_values(&["media"]).get(), 1);
    // The API shows the test beside the chain's comparison while the rollout simulates.
    let view = p.view(Some("media"), None);
    let test = view.comparisons[0]
        .test
        .as_ref()
        .expect("the rollout's test");
    assert_eq!((test.pairs, test.v2_failed, test.fails), (150, 51, true));
}

#[test]
fn the_rule_takes_a_share_of_the_false_fail_rate_only_when_it_may_roll_back() {
    let condition = Condition::default();
    let on = settings("").sharing();
    assert!(on.prediction);
    let share = condition.fail_budget(on).prediction;
    assert!(share > 0.0 && share < condition.false_fail_rate, "{share}");
    for off in ["rollback = false", "enabled = false"] {
        let sharing = settings(off).sharing();
        assert!(!sharing.prediction, "{off}");
        assert_eq!(condition.fail_budget(sharing).prediction, 0.0);
    }
    // An old file's `compare.z` still loads, said to be ignored.
    let old = settings("[compare]\nz = 3.09");
    assert!(
        old.model.warnings[0].contains("ignored"),
        "{:?}",
        old.model.warnings
    );
}

#[tokio::test(start_paused = true)]
async fn calls_that_started_before_the_first_look_do_not_count() {
    let p = predictions("resolve_interval_ms = 0");
    calls(&p, "media", "v1", "active", "a", 300, None);
    calls(&p, "media", "v2", "simulation", "b", 300, Some(2));
    // The chain saw it all; the rule's test starts at its first look and has no pair yet.
    assert!(p.compare("media", "v1", "v2").unwrap().clearly_higher);
    assert!(p
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    calls(&p, "media", "v1", "active", "c", 300, None);
    calls(&p, "media", "v2", "simulation", "d", 300, Some(2));
    let early = p
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .expect("failed on the calls after the first look");
    let numbers = &early.verdict.details["prediction"];
    assert_eq!(numbers["pairs"], 300);
    assert_eq!(numbers["v2_failed"], 150);
}

#[tokio::test(start_paused = true)]
async fn no_early_signal_for_an_equal_v2_or_when_rollback_is_off() {
    let equal = predictions("resolve_interval_ms = 0");
    assert!(equal
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    calls(&equal, "media", "v1", "active", "a", 300, Some(20));
    calls(&equal, "media", "v2", "simulation", "b", 300, Some(20));
    assert!(equal
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    let comparison = equal.compare("media", "v1", "v2").expect("both seen");
    assert!(!comparison.clearly_higher);

    let report_only = predictions("rollback = false\nresolve_interval_ms = 0");
    assert!(report_only
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    calls(&report_only, "media", "v1", "active", "a", 300, None);
    calls(&report_only, "media", "v2", "simulation", "b", 300, Some(2));
    assert!(
        report_only
            .compare("media", "v1", "v2")
            .unwrap()
            .clearly_higher
    );
    assert!(report_only
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    // v2 seen only as a control copy of v1, or v1 only in simulation: nothing to compare.
    assert!(report_only.compare("media", "v2", "v1").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_new_rollout_of_the_same_candidate_starts_from_its_new_run() {
    let p = predictions("resolve_interval_ms = 0");
    assert!(p
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    calls(&p, "media", "v1", "active", "a", 300, None);
    calls(&p, "media", "v2", "simulation", "b", 300, Some(2));
    assert!(p
        .early_fail(1, "media", "v1", "v2", &Condition::default(), None)
        .is_some());
    // v2 fixed and released again as rollout 2: the first look forgets the failed run.
    assert!(p
        .early_fail(2, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    assert!(p.view(Some("media"), Some("v2")).models.is_empty());
    calls(&p, "media", "v2", "simulation", "c", 300, None);
    assert!(p
        .early_fail(2, "media", "v1", "v2", &Condition::default(), None)
        .is_none());
    let comparison = p.compare("media", "v1", "v2").expect("both seen");
    assert_eq!(comparison.candidate.failure, 0.0);
    // v1's model (active) is kept across rollouts.
    assert!(comparison.baseline.starts > 250.0);
}

// ---- the early signal in the controller ----

const CLUSTER: &str = r#"
[controller]
tick_ms = 100

[services.media]
balancer = "http://127.0.0.1:9001"

[[machines]]
id = "media-1"
service = "media"
version = "v1"
address = "127.0.0.1:8001"
config = "active"

[[machines]]
id = "media-2"
service = "media"
version = "v2"
address = "127.0.0.1:8002"
config = "simulation"

[predict]
resolve_interval_ms = 0
"#;

/// `n` mirrored pairs where both versions answer alike: the judge alone has nothing to fail.
fn alike_pairs(first: u64, n: u64) -> Vec<understudy_wire::JobPair> {
    use understudy_wire::{JobObservation, JobPair, Outcome};
    let observation = |machine: &str, version: &str, job: u64| JobObservation {
        machine: machine.into(),
        version: version.into(),
        latency_us: 1_000 + job % 7,
        outcome: Outcome::Ok,
        status: Some(200),
    };
    (first..first + n)
        .map(|job| JobPair {
            job,
            session: None,
            active: observation("media-1", "v1", job),
            simulation: observation("media-2", "v2", job),
            matched: true,
            diff: None,
        })
        .collect()
}

async fn simulating_core(
    cluster_text: &str,
) -> (
    crate::runtime::controller::Core,
    Arc<crate::runtime::balancer::FakeBalancer>,
) {
    let cluster = crate::config::cluster::parse("test.toml", cluster_text).expect("cluster");
    let fake = Arc::new(crate::runtime::balancer::FakeBalancer::new());
    let store = crate::store::Store::open_in_memory().expect("store");
    let core =
        crate::runtime::controller::Core::open(cluster, store, fake.clone(), "secret".into())
            .expect("core");
    let request = crate::runtime::controller::ReleaseRequest {
        services: [("media".to_string(), "v2".to_string())].into(),
        ..Default::default()
    };
    core.release(&request, "ops").expect("release");
    core.tick().await;
    assert_eq!(core.rollouts()[0].phase, "simulating");
    // The first tick of the simulation is the early signal's first look at this rollout.
    core.tick().await;
    (core, fake)
}

/// 200 alike pairs (still the judge's warm-up, so only the prediction can decide) and 150 calls
/// each: v1's all complete, one in three of v2's fails.
fn v2_fails_one_call_in_three_in_the_warm_up(
    core: &crate::runtime::controller::Core,
    fake: &crate::runtime::balancer::FakeBalancer,
) {
    fake.add_pairs("media", alike_pairs(1, 200));
    calls(&core.predictions, "media", "v1", "active", "a", 150, None);
    calls(
        &core.predictions,
        "media",
        "v2",
        "simulation",
        "b",
        150,
        Some(3),
    );
}

#[tokio::test(start_paused = true)]
async fn the_controller_rolls_back_on_the_early_signal_before_the_judge_decides() {
    let (core, fake) = simulating_core(CLUSTER).await;
    v2_fails_one_call_in_three_in_the_warm_up(&core, &fake);
    core.tick().await;
    let rollout = &core.rollouts()[0];
    assert_eq!(rollout.phase, "rolled_back");
    let verdict = json(rollout.verdict.as_ref().expect("verdict"));
    assert_eq!(verdict["decision"], "fail");
    let rule = verdict["rule"].as_str().unwrap();
    assert!(rule.starts_with("prediction:"), "{rule}");
    // The judge's own count of pairs at that moment, and the display numbers.
    let jobs = verdict["jobs"].as_u64().unwrap();
    assert!((1..=200).contains(&jobs), "{jobs}");
    assert_eq!(verdict["numbers"]["jobs"], 200);
    assert!(
        (verdict["details"]["prediction"]["v2_failure"]
            .as_f64()
            .unwrap()
            - 50.0 / 150.0)
            .abs()
            < 1e-9
    );
    assert!(verdict["details"]["judge_rule"]
        .as_str()
        .unwrap()
        .starts_with("not enough data"));
    // The transition names the rule; the metrics page has the part's metrics.
    let detail = core.rollout(rollout.id).expect("detail");
    let cause = detail.transitions.last().unwrap().cause.clone();
    assert!(cause.contains("prediction"), "{cause}");
    let metrics = core.metrics_text();
    assert!(metrics.contains("understudy_prediction_rollbacks_total{service=\"media\"} 1"));
    assert!(metrics.contains("understudy_prediction_failure_probability{config=\"simulation\",service=\"media\",version=\"v2\"} 0.333"));
}

#[tokio::test(start_paused = true)]
async fn with_rollback_off_the_signal_is_only_reported() {
    let text = CLUSTER.replace("[predict]", "[predict]\nrollback = false");
    let (core, fake) = simulating_core(&text).await;
    v2_fails_one_call_in_three_in_the_warm_up(&core, &fake);
    core.tick().await;
    assert_eq!(core.rollouts()[0].phase, "simulating");
    let view = core.predictions.view(Some("media"), None);
    assert!(view.comparisons[0].comparison.clearly_higher);
}

// ---- CLI ----

#[tokio::test(start_paused = true)]
async fn the_cli_tables_show_models_states_and_alerts() {
    let p = predictions("resolve_interval_ms = 0\n[alerts]\nmin_exits = 4");
    calls(&p, "media", "v1", "active", "a", 20, None);
    calls(&p, "media", "v2", "simulation", "b", 20, Some(4));
    let view = serde_json::to_value(p.view(None, None)).unwrap();
    let models = models_text(&view);
    assert!(
        models.contains("MODELS (start state `received`)"),
        "{models}"
    );
    let v2_row = models
        .lines()
        .find(|l| l.starts_with("media") && l.contains("simulation"))
        .expect("v2's row");
    assert!(v2_row.contains("0.2500"), "{v2_row}");
    assert!(models.contains("COMPARISONS"));
    assert!(models
        .lines()
        .any(|l| l.starts_with("media") && l.contains("v1") && l.contains("v2")));

    let one = serde_json::to_value(p.view(Some("media"), Some("v2"))).unwrap();
    let states = states_text(&one);
    assert!(states.starts_with("media v2 (simulation)"), "{states}");
    assert!(states.contains("P(error state failure)"));
    let media = states
        .lines()
        .find(|l| l.starts_with("media ") && l.contains("transient"))
        .expect("media's row");
    assert!(
        media.contains("0.2500") && media.contains("2.500"),
        "{media}"
    );

    let alerts = serde_json::json!({
        "alerts_total": p.alerts(None, None, 100).len(),
        "alerts": p.alerts(None, None, 2),
    });
    let text = alerts_text(&alerts);
    assert!(text.starts_with("ALERTS ("), "{text}");
    assert_eq!(
        text.lines().count(),
        4,
        "title, header and two alerts: {text}"
    );
    assert!(text.contains("error state failure"));
}
