//! Webhook notifications against in-process HTTP servers on loopback.

use std::sync::atomic::AtomicU32;
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};

use super::*;

fn change(rollout: i64, to: &str) -> PhaseChange {
    PhaseChange {
        rollout,
        release: 7,
        service: "media".into(),
        from: "simulating".into(),
        to: to.into(),
        cause: "passed; the service asks for ops approval".into(),
        actor: "controller".into(),
        operator: None,
        at_ms: 1_700_000_000_000,
    }
}

fn webhook(url: &str, attempts: u32, backoff_ms: u64) -> Webhook {
    Webhook {
        url: url.parse().expect("url"),
        timeout: Duration::from_secs(2),
        attempts,
        backoff: Duration::from_millis(backoff_ms),
    }
}

fn settings(webhooks: Vec<Webhook>) -> NotifySettings {
    NotifySettings { webhooks }
}

/// What a test server saw: every request's content type and body, and the bodies it accepted.
#[derive(Default)]
struct Seen {
    requests: AtomicU32,
    accepted: Mutex<Vec<(String, serde_json::Value)>>,
}

/// A webhook receiver that answers 500 to its first `failures` requests, then 200.
async fn receiver(failures: u32) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hook/secret",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let seen = state.clone();
            async move {
                if seen.requests.fetch_add(1, Ordering::SeqCst) < failures {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                seen.accepted.lock().unwrap().push((content_type, json));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/hook/secret"), seen)
}

/// A loopback address nothing listens on: connections are refused.
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}/hook")
}

fn counter(notifier: &Notifier, pick: impl Fn(&NotifyMetrics) -> u64) -> u64 {
    pick(&notifier.inner.as_ref().expect("enabled").metrics)
}

fn deliveries(notifier: &Notifier, webhook: &str, outcome: &str) -> u64 {
    counter(notifier, |m| {
        m.deliveries.with_label_values(&[webhook, outcome]).get()
    })
}

fn attempt_failures(notifier: &Notifier, webhook: &str) -> u64 {
    counter(notifier, |m| {
        m.attempt_failures.with_label_values(&[webhook]).get()
    })
}

fn dropped(notifier: &Notifier, webhook: &str) -> u64 {
    counter(notifier, |m| m.dropped.with_label_values(&[webhook]).get())
}

/// Waits (real time, 10 s at most) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn delivered_json_has_text_and_every_field() {
    let (url, seen) = receiver(0).await;
    let notifier = Notifier::start(&settings(vec![webhook(&url, 3, 10)]));
    notifier.phase_changed(change(3, "awaiting_approval"));
    until("delivered", || deliveries(&notifier, "0", "delivered") == 1).await;
    let accepted = seen.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), 1);
    let (content_type, body) = &accepted[0];
    assert_eq!(content_type, "application/json");
    assert_eq!(
        body["text"],
        "understudy: media rollout 3 simulating -> awaiting_approval: passed; the service asks \
         for ops approval (by controller)"
    );
    assert_eq!(body["event"], "phase_change");
    assert_eq!(body["rollout"], 3);
    assert_eq!(body["release"], 7);
    assert_eq!(body["service"], "media");
    assert_eq!(body["from"], "simulating");
    assert_eq!(body["to"], "awaiting_approval");
    assert_eq!(body["cause"], "passed; the service asks for ops approval");
    assert_eq!(body["actor"], "controller");
    assert_eq!(body["operator"], serde_json::Value::Null);
    assert_eq!(body["at_ms"], 1_700_000_000_000u64);
    assert_eq!(body.as_object().unwrap().len(), 11, "{body}");
}

#[test]
fn text_names_the_operator_and_escapes_what_slack_would_read() {
    let mut ops = change(4, "aborted");
    ops.actor = "ops".into();
    ops.operator = Some("alice".into());
    ops.cause = "abort: <!channel> & co".into();
    assert_eq!(
        ops.text(),
        "understudy: media rollout 4 simulating -> aborted: abort: &lt;!channel&gt; &amp; co \
         (by ops alice)"
    );
    ops.cause.clear();
    assert_eq!(
        ops.text(),
        "understudy: media rollout 4 simulating -> aborted (by ops alice)"
    );
}

#[tokio::test]
async fn retried_after_failures_and_delivered_exactly_once() {
    let (url, seen) = receiver(2).await;
    let notifier = Notifier::start(&settings(vec![webhook(&url, 6, 5)]));
    notifier.phase_changed(change(5, "joining[0]"));
    until("delivered", || deliveries(&notifier, "0", "delivered") == 1).await;
    // Nothing more is sent once delivered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
    assert_eq!(seen.accepted.lock().unwrap().len(), 1);
    assert_eq!(attempt_failures(&notifier, "0"), 2);
    assert_eq!(deliveries(&notifier, "0", "failed"), 0);
    let text = notifier.render_metrics();
    for line in [
        "understudy_webhook_deliveries_total{outcome=\"delivered\",webhook=\"0\"} 1",
        "understudy_webhook_deliveries_total{outcome=\"failed\",webhook=\"0\"} 0",
        "understudy_webhook_attempt_failures_total{webhook=\"0\"} 2",
        "understudy_webhook_dropped_total{webhook=\"0\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(!text.contains("secret"), "the URL must not show:\n{text}");
}

#[tokio::test]
async fn a_dead_address_is_given_up_after_its_attempts() {
    let notifier = Notifier::start(&settings(vec![webhook(&dead_address(), 3, 1)]));
    notifier.phase_changed(change(6, "retiring"));
    until("given up", || deliveries(&notifier, "0", "failed") == 1).await;
    assert_eq!(attempt_failures(&notifier, "0"), 3);
    assert_eq!(deliveries(&notifier, "0", "delivered"), 0);
}

#[tokio::test]
async fn a_dead_webhook_does_not_hold_up_a_live_one() {
    let (url, seen) = receiver(0).await;
    let dead = webhook(&dead_address(), 20, 30_000);
    let notifier = Notifier::start(&settings(vec![dead, webhook(&url, 3, 10)]));
    for rollout in 1..=3 {
        notifier.phase_changed(change(rollout, "complete"));
    }
    until("live one delivered", || {
        deliveries(&notifier, "1", "delivered") == 3
    })
    .await;
    let order: Vec<i64> = seen
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| body["rollout"].as_i64().unwrap())
        .collect();
    assert_eq!(order, vec![1, 2, 3], "delivered in order");
    assert_eq!(deliveries(&notifier, "0", "delivered"), 0);
}

#[tokio::test]
async fn a_full_queue_drops_at_once_and_counts() {
    // A receiver that never answers: the worker holds its first event for the whole timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let mut hook = webhook(&url, 1, 1);
    hook.timeout = Duration::from_secs(30);
    let notifier = Notifier::with_capacity(&settings(vec![hook]), 2);
    let start = Instant::now();
    // No await between the sends: the worker cannot take any, so 2 fit and 98 are dropped.
    for rollout in 0..100 {
        notifier.phase_changed(change(rollout, "complete"));
    }
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(dropped(&notifier, "0"), 98);
    assert!(notifier
        .render_metrics()
        .contains("understudy_webhook_dropped_total{webhook=\"0\"} 98"));
    drop(listener);
}

#[test]
fn started_outside_a_runtime_it_delivers_once_inside_one() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (url, seen) = runtime.block_on(receiver(0));
    // No runtime here: nothing is spawned, nothing panics, events wait in the queue.
    let notifier = Notifier::start(&settings(vec![webhook(&url, 3, 10)]));
    notifier.phase_changed(change(8, "simulating"));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
    runtime.block_on(async {
        notifier.phase_changed(change(9, "judged(pass)"));
        until("both delivered", || {
            deliveries(&notifier, "0", "delivered") == 2
        })
        .await;
    });
    assert_eq!(seen.accepted.lock().unwrap().len(), 2);
}

#[test]
fn disabled_costs_nothing_and_renders_nothing() {
    let notifier = Notifier::start(&NotifySettings::default());
    assert!(notifier.inner.is_none());
    notifier.phase_changed(change(1, "pending"));
    assert_eq!(notifier.render_metrics(), "");
}

#[tokio::test]
async fn dropping_the_notifier_stops_the_retries() {
    let notifier = Notifier::start(&settings(vec![webhook(&dead_address(), 20, 30_000)]));
    let metrics = notifier.inner.as_ref().unwrap().metrics.clone();
    notifier.phase_changed(change(2, "aborted"));
    until("first attempt failed", || {
        metrics.attempt_failures.with_label_values(&["0"]).get() == 1
    })
    .await;
    drop(notifier);
    until("given up", || {
        metrics.deliveries.with_label_values(&["0", "failed"]).get() == 1
    })
    .await;
    assert_eq!(metrics.attempt_failures.with_label_values(&["0"]).get(), 1);
}

#[test]
fn retry_delays_double_up_to_the_cap() {
    let first = Duration::from_millis(250);
    let delays: Vec<u64> = (1..=10)
        .map(|retry| retry_delay(first, retry).as_millis() as u64)
        .collect();
    assert_eq!(
        delays,
        vec![250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
    );
    assert_eq!(retry_delay(first, 40), MAX_BACKOFF);
}

#[tokio::test(start_paused = true)]
async fn attempts_are_spaced_by_doubling_delays() {
    let metrics = NotifyMetrics::new(1).unwrap();
    let (_closing, mut closed) = watch::channel(());
    let times = Arc::new(Mutex::new(Vec::new()));
    let record = times.clone();
    let start = tokio::time::Instant::now();
    let attempt = move || {
        record.lock().unwrap().push(start.elapsed());
        async { Err::<(), _>("answered 503".to_string()) }
    };
    let hook = webhook("http://127.0.0.1:1/", 6, 250);
    let result = deliver(&hook, "0", &metrics, &mut closed, attempt).await;
    assert_eq!(result, Err((6, "answered 503".to_string())));
    let times = times.lock().unwrap().clone();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(gaps, vec![250, 500, 1000, 2000, 4000]);
    assert_eq!(metrics.attempt_failures.with_label_values(&["0"]).get(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_success_ends_the_attempts() {
    let metrics = NotifyMetrics::new(1).unwrap();
    let (_closing, mut closed) = watch::channel(());
    let calls = Arc::new(AtomicU32::new(0));
    let count = calls.clone();
    let attempt = move || {
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 3 {
                Err("answered 500".to_string())
            } else {
                Ok(())
            }
        }
    };
    let hook = webhook("http://127.0.0.1:1/", 6, 1_000);
    let start = tokio::time::Instant::now();
    assert_eq!(
        deliver(&hook, "0", &metrics, &mut closed, attempt).await,
        Ok(4)
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(1_000 + 2_000 + 4_000)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_controller_notifies_its_transitions() {
    let (url, seen) = receiver(0).await;
    let text = format!(
        "{}\n[[notify.webhooks]]\nurl = \"{url}\"\nbackoff_ms = 10\n",
        crate::testing::SAMPLE
    );
    let rig = crate::testing::Rig::new(&text);
    let core = rig.open();
    let request: crate::runtime::controller::ReleaseRequest =
        serde_json::from_value(serde_json::json!({ "services": { "db": "v2" } })).unwrap();
    core.release(&request, "ops").expect("release");
    core.tick().await;
    let simulating = || {
        seen.accepted
            .lock()
            .unwrap()
            .iter()
            .any(|(_, body)| body["service"] == "db" && body["to"] == "simulating")
    };
    until("db simulating notified", simulating).await;
    let event = seen.accepted.lock().unwrap()[0].1.clone();
    assert_eq!(event["from"], "pending", "{event}");
    assert_eq!(event["actor"], "controller", "{event}");
    assert!(event["release"].as_i64().unwrap() > 0, "{event}");
    assert!(event["text"]
        .as_str()
        .unwrap()
        .starts_with("understudy: db rollout "));
    let metrics = core.metrics_text();
    assert!(
        metrics
            .contains("understudy_webhook_deliveries_total{outcome=\"delivered\",webhook=\"0\"}"),
        "{metrics}"
    );
}
