//! Signed configs: a balancer started with a key applies only configs the controller signed with
//! it, over the admin PUT, over the controller's hub (SSE) and over NATS; key rotation.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    config, entry, eventually, signed_read, start_with, Answer, Behaviour, Http, Machine,
};
use serde_json::json;
use understudy_hub::http::HubHttp;
use understudy_hub::nats::{NatsBackend, NatsServer};
use understudy_hub::{
    Backend, EmbeddedHub, Envelope, Keyring, SecretKey, Signer, Verifier, READ_AUTH_HEADER,
};
use understudy_proxy::wire::{config_key_path, config_path, BalancerConfig, KeyRotation, PoolRole};
use understudy_proxy::{BalancerKey, ConfigFeed, ConfigSigning, SpawnOptions, CONTROLLER_ID};

const TOPIC: &str = understudy_hub::CONFIG_TOPIC;

fn options(keys: &[(&str, SecretKey)], feed: Option<ConfigFeed>) -> SpawnOptions {
    SpawnOptions {
        signing: ConfigSigning {
            keys: keys
                .iter()
                .map(|(s, k)| (s.to_string(), BalancerKey::given(k.clone())))
                .collect::<BTreeMap<_, _>>(),
            feed,
            rotation_grace: Duration::from_secs(60),
        },
        marker_key: Some(SecretKey::generate()),
        ..SpawnOptions::default()
    }
}

fn signed(signer: &mut Signer, config: &BalancerConfig) -> Envelope {
    signer.sign(TOPIC, serde_json::to_value(config).unwrap())
}

fn reason(answer: &Answer) -> String {
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    body["reason"].as_str().unwrap_or_default().to_string()
}

/// The value of `understudy_balancer_config_rejected_total{service, reason}` on the page.
fn rejected(metrics: &str, service: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("understudy_balancer_config_rejected_total{")
                && l.contains(&format!("service=\"{service}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rejected series for {service}/{reason}"))
}

/// The running config's version, read as the controller reads it: signed with `key`.
async fn running_version(http: &Http, admin: &str, service: &str, key: &SecretKey) -> u64 {
    let path = config_path(service);
    let mut reader = Signer::new(CONTROLLER_ID, key.clone()).unwrap();
    let answer = http
        .send(
            "GET",
            &format!("{admin}{path}"),
            &[(READ_AUTH_HEADER, &signed_read(&mut reader, &path))],
            "",
        )
        .await;
    serde_json::from_str::<BalancerConfig>(&answer.body)
        .unwrap_or_else(|e| panic!("{e}: {}", answer.body))
        .version
}

#[tokio::test]
async fn a_keyed_balancer_applies_only_controller_signed_configs() {
    let m1 = Machine::start("m1", Behaviour::Echo).await;
    let key = SecretKey::generate();
    let machines = || vec![entry("m1", "v1", &m1, PoolRole::Active)];
    let running = start_with(
        vec![config("media", 1, machines()), config("db", 1, machines())],
        // db keeps no key: allowed only in insecure mode, which leaves keyed balancers keyed.
        SpawnOptions {
            insecure_no_key: true,
            ..options(&[("media", key.clone())], None)
        },
    );
    let admin = format!("http://{}", running.admin_addr());
    let url = format!("{admin}{}", config_path("media"));
    let http = Http::new();
    let put = |body: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.send("PUT", &url, &[("content-type", "application/json")], &body)
                .await
        }
    };
    let mut controller = Signer::new(CONTROLLER_ID, key.clone()).unwrap();

    // A plain config is refused with a message saying what is expected.
    let plain = put(serde_json::to_string(&config("media", 2, machines())).unwrap()).await;
    assert_eq!((plain.status, reason(&plain).as_str()), (401, "unsigned"));
    assert!(
        plain.body.contains("signed by the controller"),
        "{}",
        plain.body
    );

    // Signed with the balancer's key: applied.
    let v2 = signed(&mut controller, &config("media", 2, machines()));
    let ok = put(serde_json::to_string(&v2).unwrap()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(running_version(&http, &admin, "media", &key).await, 2);

    // Each refusal names its reason; the running config stays.
    let mut forger = Signer::new(CONTROLLER_ID, SecretKey::generate()).unwrap();
    let mut machine = Signer::new("media-1", key.clone()).unwrap();
    let mut tampered = signed(&mut controller, &config("media", 5, machines()));
    tampered.payload["version"] = json!(50);
    let other_topic = controller.sign(
        "machine.state",
        serde_json::to_value(config("media", 6, machines())).unwrap(),
    );
    let big = signed(
        &mut controller,
        &BalancerConfig {
            service: "x".repeat(1 << 20),
            ..config("media", 7, machines())
        },
    );
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "malformed"),
        (
            serde_json::to_string(&signed(&mut forger, &config("media", 8, machines()))).unwrap(),
            401,
            "bad_signature",
        ),
        (
            serde_json::to_string(&tampered).unwrap(),
            401,
            "bad_signature",
        ),
        (
            serde_json::to_string(&signed(&mut machine, &config("media", 8, machines()))).unwrap(),
            401,
            "unknown_sender",
        ),
        (
            serde_json::to_string(&other_topic).unwrap(),
            403,
            "forbidden_topic",
        ),
        (serde_json::to_string(&big).unwrap(), 413, "oversized"),
        // The very message applied above, sent again.
        (serde_json::to_string(&v2).unwrap(), 401, "replayed"),
    ];
    for (body, status, why) in &cases {
        let answer = put(body.clone()).await;
        assert_eq!(
            (answer.status, reason(&answer).as_str()),
            (*status, *why),
            "{}",
            answer.body
        );
        assert_eq!(running_version(&http, &admin, "media", &key).await, 2);
    }
    // An old signed config replayed after a newer one: refused, the newer one stays.
    let v3 = signed(&mut controller, &config("media", 3, machines()));
    let v4 = signed(&mut controller, &config("media", 4, machines()));
    assert_eq!(put(serde_json::to_string(&v4).unwrap()).await.status, 200);
    let old = put(serde_json::to_string(&v3).unwrap()).await;
    assert_eq!((old.status, reason(&old).as_str()), (401, "out_of_order"));
    assert_eq!(running_version(&http, &admin, "media", &key).await, 4);

    // A balancer without a key still takes plain configs.
    let db = http
        .put_json(
            &format!("{admin}{}", config_path("db")),
            &config("db", 2, machines()),
        )
        .await;
    assert_eq!(db.status, 200, "{}", db.body);

    let metrics = http.get(&format!("{admin}/metrics")).await.body;
    for (why, n) in [
        ("unsigned", 1),
        ("malformed", 1),
        ("bad_signature", 2),
        ("unknown_sender", 1),
        ("forbidden_topic", 1),
        ("oversized", 1),
        ("replayed", 1),
        ("out_of_order", 1),
    ] {
        assert_eq!(rejected(&metrics, "media", why), n, "{why}");
    }
    assert!(!metrics.contains(&key.to_base64()));
    // Jobs still flow through the keyed balancer.
    let job = http
        .job(running.listen_addr("media").unwrap(), None, "hello")
        .await;
    assert_eq!(job.status, 200);
}

#[tokio::test]
async fn key_rotation_is_signed_with_the_current_key_and_written_back() {
    let m1 = Machine::start("m1", Behaviour::Echo).await;
    let machines = || vec![entry("m1", "v1", &m1, PoolRole::Active)];
    let dir = std::env::temp_dir().join(format!("understudy-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("media.key");
    let old_key = SecretKey::generate();
    understudy_proxy::write_key_file(&key_file, &old_key).unwrap();
    let running = start_with(
        vec![config("media", 1, machines()), config("db", 1, machines())],
        SpawnOptions {
            signing: ConfigSigning {
                keys: [(
                    "media".to_string(),
                    BalancerKey::from_file(&key_file).unwrap(),
                )]
                .into(),
                ..ConfigSigning::default()
            },
            insecure_no_key: true,
            ..SpawnOptions::default()
        },
    );
    let admin = format!("http://{}", running.admin_addr());
    let http = Http::new();
    let put = |path: String, body: &Envelope| {
        let http = http.clone();
        let url = format!("{admin}{path}");
        let body = serde_json::to_string(body).unwrap();
        async move {
            http.send("PUT", &url, &[("content-type", "application/json")], &body)
                .await
        }
    };
    let rotation = |service: &str, key: &SecretKey| {
        serde_json::to_value(KeyRotation {
            service: service.into(),
            rotate_key: key.to_base64(),
        })
        .unwrap()
    };
    let mut controller = Signer::new(CONTROLLER_ID, old_key.clone()).unwrap();
    let new_key = SecretKey::generate();

    // Signed with a key the balancer does not hold: refused.
    let mut forger = Signer::new(CONTROLLER_ID, SecretKey::generate()).unwrap();
    let forged = forger.sign(TOPIC, rotation("media", &SecretKey::generate()));
    let answer = put(config_key_path("media"), &forged).await;
    assert_eq!(
        (answer.status, reason(&answer).as_str()),
        (401, "bad_signature")
    );
    // A rotation is not a config, and vice versa.
    let misplaced = controller.sign(TOPIC, rotation("media", &new_key));
    let answer = put(config_path("media"), &misplaced).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let answer = put(
        config_key_path("media"),
        &signed(&mut controller, &config("media", 2, machines())),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    // No key to rotate on db.
    let answer = put(config_key_path("db"), &forged).await;
    assert_eq!(answer.status, 409);

    // Rotation signed with the current key.
    let answer = put(
        config_key_path("media"),
        &controller.sign(TOPIC, rotation("media", &new_key)),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer.body.contains("\"grace_ms\":60000"),
        "{}",
        answer.body
    );
    assert!(!answer.body.contains(&new_key.to_base64()));
    // Written back to the key file, so a restart keeps it.
    assert_eq!(
        BalancerKey::from_file(&key_file).unwrap().key.to_base64(),
        new_key.to_base64()
    );
    // A config the controller signs with the old key before it switches still lands (grace)...
    let late = signed(&mut controller, &config("media", 2, machines()));
    assert_eq!(put(config_path("media"), &late).await.status, 200);
    // ...then the new key is used, and from then on the old one is refused.
    controller.rotate(new_key.clone());
    let v3 = signed(&mut controller, &config("media", 3, machines()));
    assert_eq!(put(config_path("media"), &v3).await.status, 200);
    let mut stale = Signer::new(CONTROLLER_ID, old_key.clone()).unwrap();
    let answer = put(
        config_path("media"),
        &signed(&mut stale, &config("media", 4, machines())),
    )
    .await;
    assert_eq!(
        (answer.status, reason(&answer).as_str()),
        (401, "bad_signature")
    );
    assert_eq!(running_version(&http, &admin, "media", &new_key).await, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn configs_come_from_the_controllers_hub_over_server_sent_events() {
    let m1 = Machine::start("m1", Behaviour::Echo).await;
    let machines = || vec![entry("m1", "v1", &m1, PoolRole::Active)];
    let key = SecretKey::generate();
    // The controller's side: its embedded hub on an HTTP port.
    let hub_registry = prometheus::Registry::new();
    let hub = Arc::new(EmbeddedHub::new(&hub_registry).unwrap());
    let mut ring = Keyring::new();
    ring.insert(CONTROLLER_ID, SecretKey::generate()).unwrap();
    // The balancer subscribes with its own key, as the controller's hub expects by default.
    let subscriber = understudy_hub::http::balancer_subscriber("media");
    ring.insert(&subscriber, key.clone()).unwrap();
    let router = understudy_hub::http::router(Arc::new(HubHttp {
        backend: hub.clone(),
        verifier: Arc::new(Mutex::new(
            Verifier::new(ring, 1 << 20, &hub_registry).unwrap(),
        )),
        controller_id: CONTROLLER_ID.into(),
        subscriber_capacity: 16,
        subscriber_auth: true,
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let running = start_with(
        vec![config("media", 1, machines())],
        options(
            &[("media", key.clone())],
            Some(ConfigFeed::Hub {
                url: hub_url.clone(),
            }),
        ),
    );
    let admin = format!("http://{}", running.admin_addr());
    let http = Http::new();
    let subscribed = eventually(Duration::from_secs(10), || {
        hub_registry
            .gather()
            .iter()
            .filter(|f| f.name() == "understudy_hub_subscribers")
            .any(|f| f.get_metric()[0].get_gauge().get_value() >= 1.0)
    })
    .await;
    assert!(subscribed, "the balancer subscribed to the hub");

    // A forged config published on the hub is refused by the balancer.
    let mut forger = Signer::new(CONTROLLER_ID, SecretKey::generate()).unwrap();
    hub.publish(signed(&mut forger, &config("media", 9, machines())))
        .await
        .unwrap();
    let mut controller = Signer::new(CONTROLLER_ID, key.clone()).unwrap();
    hub.publish(signed(&mut controller, &config("media", 2, machines())))
        .await
        .unwrap();
    let mut version = 0;
    for _ in 0..250 {
        version = running_version(&http, &admin, "media", &key).await;
        if version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(version, 2, "the signed config arrived over the hub");
    let metrics = http.get(&format!("{admin}/metrics")).await.body;
    assert_eq!(rejected(&metrics, "media", "bad_signature"), 1);
}

#[tokio::test]
async fn configs_come_over_nats_and_forged_ones_are_refused() {
    let nats = NatsServer::start().unwrap_or_else(|e| panic!("cannot run the NATS test: {e}"));
    let m1 = Machine::start("m1", Behaviour::Echo).await;
    let machines = || vec![entry("m1", "v1", &m1, PoolRole::Active)];
    let key = SecretKey::generate();
    let running = start_with(
        vec![config("media", 1, machines())],
        options(
            &[("media", key.clone())],
            Some(ConfigFeed::Nats {
                url: nats.url().to_string(),
            }),
        ),
    );
    let admin = format!("http://{}", running.admin_addr());
    let http = Http::new();
    let controller_hub = NatsBackend::connect(nats.url(), &prometheus::Registry::new())
        .await
        .unwrap();
    let attacker = async_nats_client(nats.url()).await;
    let mut forger = Signer::new(CONTROLLER_ID, SecretKey::generate()).unwrap();
    let mut controller = Signer::new(CONTROLLER_ID, key.clone()).unwrap();
    // The balancer connects in the background: publish (as the controller does each tick)
    // until it runs the config; a forged one goes first each time.
    let mut applied = false;
    for _ in 0..100 {
        let forged = signed(&mut forger, &config("media", 9, machines()));
        attacker
            .publish(
                format!("understudy.{TOPIC}"),
                serde_json::to_vec(&forged).unwrap().into(),
            )
            .await
            .unwrap();
        attacker.flush().await.unwrap();
        controller_hub
            .publish(signed(&mut controller, &config("media", 2, machines())))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if running_version(&http, &admin, "media", &key).await == 2 {
            applied = true;
            break;
        }
    }
    assert!(applied, "the signed config arrived over NATS");
    let metrics = http.get(&format!("{admin}/metrics")).await.body;
    assert!(rejected(&metrics, "media", "bad_signature") >= 1);
    assert_eq!(running_version(&http, &admin, "media", &key).await, 2);
}

async fn async_nats_client(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.unwrap()
}
