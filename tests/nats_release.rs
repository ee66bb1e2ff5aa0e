//! End to end through NATS: a real nats-server; the controller's hub on it (`[hub] backend =
//! "nats"`); balancers that take their configs only from NATS (signed, verified); machines that
//! publish their state through the controller; a release of media v1 -> v2 to completion.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use understudy::scenario::{self, Expected, RunOptions};
use understudy_hub::nats::NatsServer;
use understudy_hub::Envelope;

#[test]
fn a_release_runs_through_nats() {
    let nats =
        NatsServer::start().unwrap_or_else(|e| panic!("cannot run the NATS release test: {e}"));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/identical.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("[hub]"),
        "identical.toml already has a [hub]"
    );
    let text = format!(
        "{text}\n[hub]\nbackend = \"nats\"\nnats_url = \"{}\"\n",
        nats.url()
    );
    let scenario = scenario::spec::parse("identical.toml (+ [hub] on NATS)", &text)
        .unwrap_or_else(|e| panic!("{e}"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(async {
        // A bystander on the NATS server: every config version the controller published,
        // and every machine state message, by topic.
        let watcher = async_nats::connect(nats.url()).await.unwrap();
        let mut seen = watcher.subscribe("understudy.>").await.unwrap();
        watcher.flush().await.unwrap();
        let observed: Arc<Mutex<BTreeMap<String, Vec<Envelope>>>> = Arc::default();
        let record = observed.clone();
        let watching = tokio::spawn(async move {
            while let Some(message) = seen.next().await {
                if let Ok(envelope) = serde_json::from_slice::<Envelope>(&message.payload) {
                    let mut map = record.lock().unwrap();
                    map.entry(envelope.topic.clone())
                        .or_default()
                        .push(envelope);
                }
            }
        });
        let report = tokio::time::timeout(
            Duration::from_secs(90),
            scenario::run(&scenario, &RunOptions::default()),
        )
        .await
        .expect("the release ends within 90 s")
        .unwrap_or_else(|e| panic!("{e}"));
        watching.abort();
        let observed = observed.lock().unwrap().clone();
        (report, observed)
    });
    let (report, observed) = report;
    println!("{}", report.table());
    assert!(report.passed, "not as expected: {:?}", report.failures);
    assert_eq!(report.services["media"].outcome, Expected::Promoted);
    assert_eq!(report.active_jobs.errors, 0, "callers saw errors");

    // The configs travelled over NATS, signed by the controller: media's went from the
    // simulation configuration to v2 active with v1 gone.
    let configs: Vec<understudy_wire::BalancerConfig> = observed
        .get(understudy_hub::CONFIG_TOPIC)
        .map(|envelopes| {
            envelopes
                .iter()
                .inspect(|e| {
                    assert_eq!(e.sender, "controller");
                    assert!(e.signature.is_some());
                })
                .filter(|e| e.payload["service"] == "media")
                .map(|e| serde_json::from_value(e.payload.clone()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        configs.len() >= 2,
        "media's configs did not go through NATS: {configs:?}"
    );
    let last = configs.last().unwrap();
    assert!(
        last.machines
            .iter()
            .filter(|m| m.config == understudy_wire::PoolRole::Active)
            .all(|m| m.version == "v2"),
        "the last config over NATS has v2 alone active: {last:?}"
    );
    // Machines' state reached the controller's hub and went out on NATS too.
    assert!(
        observed.contains_key("machine.state"),
        "{:?}",
        observed.keys()
    );
}
