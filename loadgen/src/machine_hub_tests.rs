//! Machines publishing to a hub, and the late-failure fault, end to end over loopback.

use super::*;
use crate::publish::{
    CallStateBatch, HangReport, HubOptions, CALL_STATE_TOPIC, MACHINE_STATE_TOPIC,
};
use tokio::sync::mpsc;
use understudy_hub::http::{router, HubHttp};
use understudy_hub::{
    EmbeddedHub, Envelope, Filter, Keyring, MachineRecord, SecretKey, Status, Subscription,
    Verifier,
};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn verifier_for(id: &str, key_base64: &str) -> Arc<Mutex<Verifier>> {
    let mut keyring = Keyring::new();
    keyring
        .insert(id, SecretKey::from_base64(key_base64).unwrap())
        .unwrap();
    let registry = prometheus::Registry::new();
    Arc::new(Mutex::new(
        Verifier::new(keyring, 64 * 1024, &registry).unwrap(),
    ))
}

/// The controller's hub routes over an embedded hub, on an ephemeral port; a subscription to
/// everything it accepts (so only verified envelopes are seen).
async fn serve_hub(verifier: Arc<Mutex<Verifier>>) -> (String, Subscription, Arc<Mutex<Verifier>>) {
    let hub = Arc::new(EmbeddedHub::new(&prometheus::Registry::new()).unwrap());
    let subscription = hub.subscribe_now(Filter::default(), 10_000).unwrap();
    let app = router(Arc::new(HubHttp {
        backend: hub,
        verifier: verifier.clone(),
        controller_id: "controller".to_string(),
        subscriber_capacity: 1_000,
        subscriber_auth: false,
    }));
    let listener = tokio::net::TcpListener::bind(local()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, subscription, verifier)
}

/// Sends one job on a fresh connection; its status, or Err when no full answer came within 2 s.
async fn send(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<StatusCode, String> {
    super::tests::send(addr, path, headers, body)
        .await
        .map(|(status, _)| status)
}

/// One call: set-up, `media` in-call jobs, tear-down. Returns each job's status.
async fn call(addr: SocketAddr, id: &str, media: usize, simulation: bool) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    let mut headers = vec![(SESSION_HEADER, id)];
    if simulation {
        headers.push((SIMULATION_HEADER, "1"));
    }
    let with = |event: Option<&'static str>| {
        let mut h = headers.clone();
        if let Some(event) = event {
            h.push((SESSION_EVENT_HEADER, event));
        }
        h
    };
    statuses.push(
        send(addr, "/voice/setup", &with(Some("start")), id)
            .await
            .unwrap(),
    );
    for i in 0..media {
        let body = format!("{id} {i}");
        statuses.push(
            send(addr, "/voice/media", &with(None), &body)
                .await
                .unwrap(),
        );
    }
    statuses.push(
        send(addr, "/voice/teardown", &with(Some("end")), id)
            .await
            .unwrap(),
    );
    statuses
}

fn state_of(envelope: &Envelope) -> MachineRecord {
    assert_eq!(envelope.topic, MACHINE_STATE_TOPIC);
    serde_json::from_value(envelope.payload.clone()).unwrap()
}

/// Receives envelopes until the machine's `down` report (or 5 s).
async fn until_down(subscription: &mut Subscription) -> Vec<Envelope> {
    let mut seen = Vec::new();
    let collect = async {
        while let Some(envelope) = subscription.recv().await {
            let envelope = (*envelope).clone();
            let down =
                envelope.topic == MACHINE_STATE_TOPIC && state_of(&envelope).status == Status::Down;
            seen.push(envelope);
            if down {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), collect).await;
    seen
}

/// (session, status, config) of every call event, in publishing order.
fn call_events(envelopes: &[Envelope]) -> Vec<(String, String, String)> {
    envelopes
        .iter()
        .filter(|e| e.topic == CALL_STATE_TOPIC)
        .flat_map(|e| {
            let batch: CallStateBatch = serde_json::from_value(e.payload.clone()).unwrap();
            assert_eq!(
                (
                    batch.service.as_str(),
                    batch.version.as_str(),
                    batch.machine.as_str()
                ),
                ("media", "v2", "media-1")
            );
            batch.events.into_iter().map(move |ev| {
                assert_eq!(ev.kind, "call");
                assert!(ev.at_ms > 1_700_000_000_000);
                (
                    ev.object,
                    ev.status.as_str().to_string(),
                    batch.config.clone(),
                )
            })
        })
        .collect()
}

fn triples(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    list.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[tokio::test]
async fn a_machine_publishes_signed_state_and_call_events_in_order() {
    let (url, mut subscription, _) = serve_hub(verifier_for("media-1", KEY)).await;
    let mut hub = HubOptions::new(&url, "media-1", KEY).unwrap();
    hub.capacity = 40;
    let machine = spawn_machine_with_hub(
        MachineSpec {
            error_rate: 0.0,
            ..MachineSpec::new("media", "v2")
        },
        local(),
        hub,
    )
    .await
    .unwrap();
    let first = subscription.recv().await.unwrap();
    assert!(call(machine.addr(), "call-a", 2, false)
        .await
        .iter()
        .all(|s| s.is_success()));
    assert!(call(machine.addr(), "call-s", 1, true)
        .await
        .iter()
        .all(|s| s.is_success()));
    let address = machine.addr().to_string();
    let stats_before = machine.stats();
    assert_eq!(stats_before.call_events, 6);
    machine.shutdown().await;
    let mut seen = vec![(*first).clone()];
    seen.extend(until_down(&mut subscription).await);

    // Valid signatures (the hub verified each), seq strictly increasing, one sender.
    assert!(seen
        .iter()
        .all(|e| e.sender == "media-1" && e.signature.is_some()));
    assert!(
        seen.windows(2).all(|w| w[0].seq < w[1].seq),
        "{:?}",
        seen.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    let first = state_of(&seen[0]);
    assert_eq!(
        first,
        MachineRecord {
            id: "media-1".into(),
            service: "media".into(),
            version: "v2".into(),
            address,
            role: Role::Standby,
            status: Status::Running,
            capacity: 40,
            sessions: 0,
        }
    );
    assert_eq!(state_of(seen.last().unwrap()).status, Status::Down);
    assert_eq!(
        call_events(&seen),
        triples(&[
            ("call-a", "received", "active"),
            ("call-a", "media", "active"),
            ("call-a", "completed", "active"),
            ("call-s", "received", "simulation"),
            ("call-s", "media", "simulation"),
            ("call-s", "completed", "simulation"),
        ])
    );
}

#[tokio::test]
async fn late_failures_and_refusals_are_published_and_counted() {
    // The hub knows another key for this machine: every message is refused (401), counted.
    let (url, _subscription, verifier) =
        serve_hub(verifier_for("media-1", &SecretKey::generate().to_base64())).await;
    let machine = spawn_machine_with_hub(
        MachineSpec::new("media", "v2"),
        local(),
        HubOptions::new(&url, "media-1", KEY).unwrap(),
    )
    .await
    .unwrap();
    call(machine.addr(), "c", 1, false).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while machine.stats().hub_refused < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(machine.stats().hub_published, 0);
    drop(verifier);
}

#[tokio::test]
async fn a_down_or_stalled_hub_never_delays_an_answer() {
    // Down: nothing listens there.
    let closed = tokio::net::TcpListener::bind(local()).await.unwrap();
    let down_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    // Stalled: accepts connections, never answers.
    let stalled = tokio::net::TcpListener::bind(local()).await.unwrap();
    let stalled_url = format!("http://{}", stalled.local_addr().unwrap());
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = stalled.accept().await {
            held.push(stream);
        }
    });
    for url in [down_url, stalled_url] {
        let mut hub = HubOptions::new(&url, "media-1", KEY).unwrap();
        hub.heartbeat_ms = 10;
        hub.publish_timeout_ms = 600;
        let machine = spawn_machine_with_hub(MachineSpec::new("media", "v2"), local(), hub)
            .await
            .unwrap();
        // Every job is answered (the helper gives up after 2 s) while the publisher fails or waits.
        for i in 0..10 {
            let statuses = call(machine.addr(), &format!("call-{i}"), 3, false).await;
            assert!(
                statuses.iter().all(|s| s.is_success()),
                "{url}: {statuses:?}"
            );
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while machine.stats().hub_publish_failures == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        let stats = machine.stats();
        assert_eq!(
            (stats.hub_published, stats.call_events, stats.ok),
            (0, 30, 50),
            "{url}"
        );
        // Shutting down waits at most for the last attempts, each bounded by the timeout.
        tokio::time::timeout(Duration::from_secs(5), machine.shutdown())
            .await
            .unwrap();
    }
    keep.abort();
}

#[test]
fn a_full_event_buffer_drops_and_counts() {
    // A link whose buffer holds 2 events, with no publisher taking them.
    let (mut link, _inbox) = crate::publish::hub_link(Role::Active);
    let (events, _rx) = mpsc::channel(2);
    link.events = events;
    let counters = HubCounters::default();
    for i in 0..5 {
        link.offer(
            QueuedEvent {
                session: format!("c{i}"),
                status: CallStatus::Received,
                simulation: false,
                at_ms: 1,
            },
            &counters,
        );
    }
    assert_eq!(counters.call_events.load(Ordering::Relaxed), 5);
    assert_eq!(counters.call_events_dropped.load(Ordering::Relaxed), 3);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_key_signs_the_next_messages() {
    let machine = spawn_machine(MachineSpec::new("media", "v2"), local())
        .await
        .unwrap();
    let mut hub = HubOptions::new("http://127.0.0.1:1", "media-1", KEY).unwrap();
    hub.heartbeat_ms = 1_000;
    let verifier = verifier_for("media-1", KEY);
    let (delivered, mut rx) = mpsc::unbounded_channel();
    let hub_side = verifier.clone();
    machine
        .start_publisher(hub, move |_, _| Transport::Memory {
            verifier: hub_side,
            delivered,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(drain_states(&mut rx).len(), 2);
    // The controller rotates with no grace: the old key stops working at once.
    let new_key = SecretKey::generate();
    verifier.lock().unwrap().keyring_mut().rotate(
        "media-1",
        new_key.clone(),
        Duration::ZERO,
        std::time::Instant::now(),
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(drain_states(&mut rx).len(), 0);
    assert_eq!(machine.stats().hub_refused, 1);
    machine.rotate_hub_key(new_key);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(drain_states(&mut rx).len(), 1);
    assert_eq!(machine.stats().hub_published, 3);
}

/// A machine publishing through the in-memory transport (verifier, no socket), so the paused
/// clock drives heartbeats.
fn publish_in_memory(
    machine: &MachineHandle,
    hub: HubOptions,
) -> mpsc::UnboundedReceiver<Envelope> {
    let verifier = verifier_for(&hub.id, KEY);
    let (delivered, rx) = mpsc::unbounded_channel();
    machine
        .start_publisher(hub, move |_, _| Transport::Memory {
            verifier,
            delivered,
        })
        .unwrap();
    rx
}

fn drain_states(rx: &mut mpsc::UnboundedReceiver<Envelope>) -> Vec<(Status, Role, u32)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if e.topic == MACHINE_STATE_TOPIC {
            let r = state_of(&e);
            out.push((r.status, r.role, r.sessions));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn heartbeats_carry_sessions_and_every_change_is_published_at_once() {
    let machine = spawn_machine(MachineSpec::new("media", "v2"), local())
        .await
        .unwrap();
    let mut hub = HubOptions::new("http://127.0.0.1:1", "media-1", KEY).unwrap();
    hub.heartbeat_ms = 1_000;
    let mut rx = publish_in_memory(&machine, hub);
    tokio::time::sleep(Duration::from_millis(10)).await;
    {
        let mut sessions = machine.state.sessions.lock().unwrap();
        for call in ["a", "b"] {
            sessions.arrive(call, Some(SessionEvent::Start));
        }
    }
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    use Status::*;
    assert_eq!(
        drain_states(&mut rx),
        [
            (Running, Role::Standby, 0),
            (Running, Role::Standby, 2),
            (Running, Role::Standby, 2),
            (Running, Role::Standby, 2)
        ]
    );
    machine.set_role(Role::Active);
    tokio::time::sleep(Duration::from_millis(1)).await;
    machine.drain();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        drain_states(&mut rx),
        [(Running, Role::Active, 2), (Draining, Role::Active, 2)]
    );
    machine.shutdown().await;
    assert_eq!(drain_states(&mut rx), [(Down, Role::Active, 2)]);
    // Nothing after down, however long we wait.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn slow_start_crash_and_hang_are_reported() {
    // Slow start: starting, then running once the warm-up jobs arrived; crash: down.
    let spec = MachineSpec {
        faults: FaultSpec {
            slow_start: Some(SlowStartSpec {
                extra_ms: 1.0,
                over_jobs: 2,
            }),
            crash_after_jobs: Some(3),
            ..FaultSpec::default()
        },
        ..MachineSpec::new("media", "v2")
    };
    let machine = spawn_machine(spec, local()).await.unwrap();
    let mut hub = HubOptions::new("http://127.0.0.1:1", "media-1", KEY).unwrap();
    hub.heartbeat_ms = 60_000;
    let mut rx = publish_in_memory(&machine, hub);
    for i in 0..3 {
        assert!(send(machine.addr(), "/q", &[], &i.to_string())
            .await
            .unwrap()
            .is_success());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(send(machine.addr(), "/q", &[], "3").await.is_err());
    machine.stopped().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    use Status::*;
    let statuses: Vec<Status> = drain_states(&mut rx).into_iter().map(|s| s.0).collect();
    assert_eq!(statuses, [Starting, Running, Down]);

    // A hang that hits every job: the call times out, then `down`, then nothing (or, silent,
    // nothing at all).
    for report in [HangReport::Down, HangReport::Silent] {
        let spec = MachineSpec {
            faults: FaultSpec {
                hang: Some(FaultTrigger {
                    after_jobs: 1,
                    fraction: 1.0,
                }),
                ..FaultSpec::default()
            },
            ..MachineSpec::new("media", "v2")
        };
        let machine = spawn_machine(spec, local()).await.unwrap();
        let mut hub = HubOptions::new("http://127.0.0.1:1", "media-1", KEY).unwrap();
        hub.heartbeat_ms = 20;
        hub.hang_report = report;
        let mut rx = publish_in_memory(&machine, hub);
        // The first report is out before the fault can silence the machine (on a busy host the
        // publisher task may not have run yet when the hang strikes).
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the machine reports at start")
            .expect("publisher running");
        assert_eq!(first.topic, MACHINE_STATE_TOPIC);
        let start = [(SESSION_HEADER, "c1"), (SESSION_EVENT_HEADER, "start")];
        assert!(send(machine.addr(), "/voice/setup", &start, "")
            .await
            .unwrap()
            .is_success());
        assert!(send(
            machine.addr(),
            "/voice/media",
            &[(SESSION_HEADER, "c1")],
            ""
        )
        .await
        .is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut states = vec![state_of(&first).status];
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if e.topic == MACHINE_STATE_TOPIC {
                states.push(state_of(&e).status);
            } else {
                events.extend(
                    call_events(std::slice::from_ref(&e))
                        .into_iter()
                        .map(|t| t.1),
                );
            }
        }
        let last = states.pop();
        assert!(states.iter().all(|s| *s == Running), "{states:?}");
        match report {
            HangReport::Down => {
                assert_eq!(last, Some(Down));
                assert_eq!(events, ["received", "timeout"]);
            }
            HangReport::Silent => {
                assert_eq!(last, Some(Running));
                assert!(events.is_empty() || events == ["received"], "{events:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            rx.try_recv().is_err(),
            "{report:?}: the hung machine says nothing more"
        );
    }
}

/// Runs 20 calls of 0..=9 media jobs against a machine; returns the statuses of each call's jobs.
async fn twenty_calls(machine: &MachineHandle) -> Vec<Vec<StatusCode>> {
    let mut calls = Vec::new();
    for i in 0..20 {
        calls.push(call(machine.addr(), &format!("voice-{i}"), i % 10, false).await);
    }
    calls
}

fn late_spec(seed: u64) -> MachineSpec {
    MachineSpec::from_toml_str(&format!(
        "service = \"media\"\nversion = \"v2\"\nseed = {seed}\n\
         [faults]\nlate_failure = {{ fraction = 0.5, after_media_jobs = 4, status = 503 }}\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn late_failure_errors_only_the_late_jobs_of_long_calls() {
    let machine = spawn_machine(late_spec(11), local()).await.unwrap();
    let calls = twenty_calls(&machine).await;
    let mut failed_calls = Vec::new();
    for (i, statuses) in calls.iter().enumerate() {
        let media = i % 10;
        let first_error = statuses.iter().position(|s| !s.is_success());
        if let Some(at) = first_error {
            failed_calls.push(i);
            // Set-up and the first 4 media jobs are fine; from the 5th job on, every job fails.
            assert_eq!(at, 5, "call {i}: {statuses:?}");
            assert!(statuses[at..]
                .iter()
                .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE));
            assert!(media >= 4);
        }
    }
    // Seeded: exactly these calls fail, on every run.
    assert_eq!(failed_calls, [4, 8, 9, 14, 18]);
    let expected_errors: u64 = failed_calls.iter().map(|i| (i % 10 - 4 + 1) as u64).sum();
    let stats = machine.stats();
    assert_eq!(
        (stats.late_failures, stats.errors),
        (expected_errors, expected_errors)
    );

    // Same seed, same failures; a machine without the fault fails none.
    let again = spawn_machine(late_spec(11), local()).await.unwrap();
    assert_eq!(twenty_calls(&again).await, calls);
    let healthy = spawn_machine(MachineSpec::new("media", "v1"), local())
        .await
        .unwrap();
    assert!(twenty_calls(&healthy)
        .await
        .iter()
        .flatten()
        .all(|s| s.is_success()));
}

#[tokio::test(start_paused = true)]
async fn late_failure_by_time_in_media() {
    let spec = MachineSpec::from_toml_str(
        "service = \"media\"\n[faults]\nlate_failure = { after_media_ms = 2000 }\n",
    )
    .unwrap();
    let machine = spawn_machine(spec, local()).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let arrive = |at_ms: u64| {
        machine
            .state
            .calls
            .arrive("c", "/voice/media", t0 + Duration::from_millis(at_ms))
            .fails_late
    };
    assert_eq!(
        [
            arrive(0),
            arrive(1_000),
            arrive(1_999),
            arrive(2_000),
            arrive(2_500)
        ],
        [false, false, false, true, true]
    );
}
