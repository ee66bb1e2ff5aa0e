//! Fixtures shared by the unit tests of several modules: a controller over the in-memory
//! balancer, seeded synthetic pairs, the API's JSON form of a value.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use understudy_wire::{JobObservation, JobPair, Outcome};

use crate::config::cluster::{parse, Cluster};
use crate::runtime::balancer::FakeBalancer;
use crate::runtime::controller::Core;
use crate::store::Store;

/// A small cluster: edge -> router -> media, router -> db.
pub(crate) const SAMPLE: &str = r#"
[controller]
tick_ms = 100

[defaults]
join_step_ms = 200

[services.edge]
depends_on = ["router"]
balancer = "http://127.0.0.1:9001"

[services.router]
depends_on = ["media", "db"]
requires_approval = true
balancer = "http://127.0.0.1:9001"

[services.media]
balancer = "http://127.0.0.1:9001"
join_steps = [10, 50]

[services.db]
balancer = "http://127.0.0.1:9001"

[[machines]]
id = "edge-1"
service = "edge"
version = "v1"
address = "127.0.0.1:8001"
config = "active"

[[machines]]
id = "edge-2"
service = "edge"
version = "v2"
address = "127.0.0.1:8002"
config = "simulation"

[[machines]]
id = "router-1"
service = "router"
version = "v1"
address = "127.0.0.1:8011"
config = "active"

[[machines]]
id = "router-2"
service = "router"
version = "v2"
address = "127.0.0.1:8012"
config = "simulation"

[[machines]]
id = "media-1"
service = "media"
version = "v1"
address = "127.0.0.1:8021"
config = "active"

[[machines]]
id = "media-c"
service = "media"
version = "v1"
address = "127.0.0.1:8023"
config = "simulation"

[[machines]]
id = "media-2"
service = "media"
version = "v2"
address = "127.0.0.1:8022"
config = "simulation"

[[machines]]
id = "db-1"
service = "db"
version = "v1"
address = "127.0.0.1:8031"
config = "active"

[[machines]]
id = "db-2"
service = "db"
version = "v2"
address = "127.0.0.1:8032"
config = "simulation"
"#;

/// A value as the admin API shows it in JSON, for assertions on the wire form.
pub fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("API values serialise")
}

/// Seeded synthetic latencies (µs): log-normal-ish around 2 ms with a tail.
pub(crate) fn latency(rng: &mut StdRng) -> u64 {
    let u: f64 = rng.gen_range(0.0001..1.0);
    (2_000.0 * (-u.ln()).powf(0.7) + 500.0) as u64
}

/// `n` identical v1/v2 pairs (and, when `control`, as many v1/v1 control pairs) from job `first`.
pub(crate) fn identical_pairs(
    rng: &mut StdRng,
    first: u64,
    n: u64,
    from: &str,
    to: &str,
    control: bool,
) -> Vec<JobPair> {
    let mut out = Vec::new();
    for i in 0..n {
        let l = latency(rng);
        let obs = |machine: &str, version: &str| JobObservation {
            machine: machine.to_string(),
            version: version.to_string(),
            latency_us: l,
            outcome: Outcome::Ok,
            status: Some(200),
        };
        let job = first + i;
        out.push(JobPair {
            job,
            session: None,
            active: obs("a", from),
            simulation: obs("s", to),
            matched: true,
            diff: None,
        });
        if control {
            out.push(JobPair {
                job,
                session: None,
                active: obs("a", from),
                simulation: obs("c", from),
                matched: true,
                diff: None,
            });
        }
    }
    out
}

/// v2 fails every job (a hard failure); the control copy of each job succeeds.
pub(crate) fn failing_pairs(first: u64, n: u64, from: &str, to: &str) -> Vec<JobPair> {
    let observation = |machine: &str, version: &str, outcome, status| JobObservation {
        machine: machine.into(),
        version: version.into(),
        latency_us: 1_000,
        outcome,
        status: Some(status),
    };
    (0..n)
        .flat_map(|i| {
            let active = observation("a", from, Outcome::Ok, 200);
            [
                JobPair {
                    job: first + i,
                    session: None,
                    active: active.clone(),
                    simulation: observation("s", to, Outcome::ServerError, 500),
                    matched: false,
                    diff: None,
                },
                JobPair {
                    job: first + i,
                    session: None,
                    active,
                    simulation: observation("c", from, Outcome::Ok, 200),
                    matched: true,
                    diff: None,
                },
            ]
        })
        .collect()
}

/// A controller over an in-memory balancer, its SQLite state in a temporary directory (reopened
/// by `open`, as after a restart).
pub(crate) struct Rig {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) fake: Arc<FakeBalancer>,
    pub(crate) cluster: Cluster,
}

impl Rig {
    pub(crate) fn new(text: &str) -> Rig {
        Rig {
            dir: tempfile::tempdir().expect("tempdir"),
            fake: Arc::new(FakeBalancer::new()),
            cluster: parse("test.toml", text).expect("valid cluster"),
        }
    }

    pub(crate) fn open(&self) -> Core {
        let store = Store::open(&self.dir.path().join("state.db")).expect("store");
        Core::open(
            self.cluster.clone(),
            store,
            self.fake.clone(),
            "secret".into(),
        )
        .expect("core")
    }
}
