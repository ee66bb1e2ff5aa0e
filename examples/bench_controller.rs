//! Controller benchmark: release plan of a 200-service cluster, and verdicts over 1M mirrored jobs
//! (the judge alone, and the controller's whole path: stats read, SQLite, judge, restart replay).
//!
//! `cargo run --release -p understudy --example bench_controller [-- --jobs N --runs N]`
//! `... --example bench_controller -- --stores N`: only the reconcile tick on SQLite against
//! PostgreSQL (a server the bench starts on a free loopback port), N interleaved repeats.
//! Figures are recorded in docs/benchmarks.md (controller section).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use understudy::config::cluster;
use understudy::core::plan::Plan;
use understudy::runtime::balancer::FakeBalancer;
use understudy::runtime::controller::{Core, ReleaseRequest};
use understudy::store::Store;
use understudy_judge::{judge_window, Condition, Judge, PairSample, WindowOutcomes};
use understudy_wire::{JobObservation, JobPair, Outcome};

/// The controller's speed: judging, ticking and store figures.
#[derive(clap::Parser)]
struct Args {
    /// Jobs judged per run.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: u64,
    /// Runs per figure.
    #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    runs: usize,
    /// Services in the seeded cluster.
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    services: usize,
    /// Repeats of the SQLite/PostgreSQL tick comparison (0: the other sections instead).
    #[arg(long, default_value_t = 0)]
    stores: usize,
}

fn args() -> Args {
    <Args as clap::Parser>::parse()
}

/// A seeded random DAG: service i depends on up to 3 services of lower index.
fn cluster_text(services: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut text = String::from("[controller]\ntick_ms = 100\n");
    for i in 0..services {
        let deps: Vec<String> = if i == 0 {
            Vec::new()
        } else {
            let n = rng.gen_range(0..=3.min(i));
            let mut d: Vec<usize> = (0..n).map(|_| rng.gen_range(0..i)).collect();
            d.sort_unstable();
            d.dedup();
            d.iter().map(|j| format!("\"s{j:03}\"")).collect()
        };
        text.push_str(&format!(
            "[services.s{i:03}]\ndepends_on = [{}]\nbalancer = \"http://127.0.0.1:9\"\n",
            deps.join(", ")
        ));
    }
    for i in 0..services {
        for (k, (version, config)) in [("v1", "active"), ("v2", "simulation")].iter().enumerate() {
            // Each machine at its own address (a machine is declared once).
            text.push_str(&format!(
                "[[machines]]\nid = \"s{i:03}-{version}\"\nservice = \"s{i:03}\"\nversion = \"{version}\"\naddress = \"127.0.0.1:{}\"\nconfig = \"{config}\"\n",
                10_000 + 2 * i + k
            ));
        }
    }
    text
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let median = samples[samples.len() / 2];
    format!(
        "median {:.3} ms, min {:.3} ms, max {:.3} ms ({} runs)",
        median.as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    )
}

fn latency(rng: &mut StdRng) -> u64 {
    let u: f64 = rng.gen_range(0.0001..1.0);
    (2_000.0 * (-u.ln()).powf(0.7) + 500.0) as u64
}

/// v2 exactly at the default p50/p99 limit (10% slower on every job): the hardest case to decide.
fn borderline(rng: &mut StdRng) -> PairSample {
    let l = latency(rng);
    PairSample {
        v1_latency_us: l,
        v1_ok: true,
        v2_latency_us: l * 11 / 10,
        v2_ok: true,
        matched: Some(true),
    }
}

fn bench_plan(a: &Args) {
    let text = cluster_text(a.services, 42);
    let mut parse = Vec::new();
    let mut plan = Vec::new();
    let mut waves = 0;
    for _ in 0..a.runs {
        let t = Instant::now();
        let c = cluster::parse("bench.toml", &text).expect("valid");
        parse.push(t.elapsed());
        let all: BTreeMap<String, String> = c
            .services
            .keys()
            .map(|s| (s.clone(), "v2".to_string()))
            .collect();
        let t = Instant::now();
        let p = Plan::build(&c, &all).expect("plan");
        plan.push(t.elapsed());
        waves = p.waves().len();
    }
    println!(
        "plan, {} services ({} waves): parse+validate+cycle check {}",
        a.services,
        waves,
        summary(parse)
    );
    println!(
        "plan, {} services: plan of a release of all {}",
        a.services,
        summary(plan)
    );
}

fn bench_judge(a: &Args) {
    let mut rng = StdRng::seed_from_u64(5);
    let pairs: Vec<PairSample> = (0..a.jobs).map(|_| borderline(&mut rng)).collect();
    let t = Instant::now();
    let mut judge = Judge::new(Condition::default());
    let mut decided_at = None;
    for p in &pairs {
        judge.observe(p);
        if decided_at.is_none() && judge.is_final() {
            decided_at = Some(judge.jobs());
        }
    }
    let verdict = judge.verdict();
    let elapsed = t.elapsed();
    println!(
        "judge alone, {} borderline pairs: {:.1} ms ({:.0} ns/pair), verdict {} after {} jobs",
        a.jobs,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_nanos() as f64 / a.jobs as f64,
        verdict.decision.as_str(),
        decided_at.map_or("(none)".to_string(), |j| j.to_string())
    );
}

/// The windowed rule over two HDR histograms of `jobs` jobs each (v2 at the limit): its cost does
/// not grow with the number of jobs, only with the histograms' buckets.
fn bench_window(a: &Args) {
    let mut rng = StdRng::seed_from_u64(6);
    let mut v1 = Histogram::<u64>::new(3).expect("3 significant figures");
    let mut v2 = v1.clone();
    for _ in 0..a.jobs {
        let p = borderline(&mut rng);
        v1.saturating_record(p.v1_latency_us);
        v2.saturating_record(p.v2_latency_us);
    }
    let outcomes = WindowOutcomes {
        jobs: a.jobs,
        errors: 0,
        mismatches: 0,
    };
    let condition = Condition::default();
    let mut samples = Vec::new();
    let mut decision = "";
    for _ in 0..a.runs {
        let t = Instant::now();
        let verdict = judge_window(&condition, &v1, &v2, outcomes, outcomes);
        samples.push(t.elapsed());
        decision = verdict.verdict.decision.as_str();
    }
    println!(
        "windowed verdict over histograms of {} jobs each: {} (verdict {decision})",
        a.jobs,
        summary(samples)
    );
}

fn job_pairs(rng: &mut StdRng, first: u64, n: u64) -> Vec<JobPair> {
    (0..n)
        .map(|i| {
            let p = borderline(rng);
            let obs = |machine: &str, version: &str, latency_us: u64| JobObservation {
                machine: machine.to_string(),
                version: version.to_string(),
                latency_us,
                outcome: Outcome::Ok,
                status: Some(200),
            };
            JobPair {
                job: first + i,
                session: None,
                active: obs("s000-v1", "v1", p.v1_latency_us),
                simulation: obs("s000-v2", "v2", p.v2_latency_us),
                matched: true,
                diff: None,
            }
        })
        .collect()
}

/// A two-service cluster whose condition never decides (every job goes the whole way), a
/// controller over `store` and the in-memory balancer, and a release of `s000` begun (one tick).
async fn releasing(store: Store) -> (cluster::Cluster, Arc<FakeBalancer>, Core) {
    let text = cluster_text(2, 1).replace(
        "[controller]\ntick_ms = 100\n",
        "[controller]\ntick_ms = 100\n[defaults.condition]\nfalse_fail_rate = 0.000001\nfalse_pass_rate = 0.000001\n",
    );
    let cluster = cluster::parse("bench.toml", &text).expect("valid");
    let fake = Arc::new(FakeBalancer::new());
    let core = Core::open(cluster.clone(), store, fake.clone(), "t".into()).expect("core");
    let request = ReleaseRequest {
        services: BTreeMap::from([("s000".to_string(), "v2".to_string())]),
        ..ReleaseRequest::default()
    };
    core.release(&request, "bench").expect("release");
    core.tick().await;
    (cluster, fake, core)
}

async fn bench_controller_path(a: &Args) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let (cluster, fake, core) = releasing(Store::open(&db).expect("store")).await;
    let mut rng = StdRng::seed_from_u64(9);
    let batch = 10_000.min(a.jobs);
    let mut fed = 0;
    let mut busy = Duration::ZERO;
    while fed < a.jobs {
        let n = batch.min(a.jobs - fed);
        fake.add_pairs("s000", job_pairs(&mut rng, fed + 1, n));
        let t = Instant::now();
        core.tick().await;
        busy += t.elapsed();
        fed += n;
    }
    let rollout = core
        .rollouts()
        .into_iter()
        .find(|r| r.service == "s000")
        .expect("rollout");
    println!(
        "controller path, {} pairs in ticks of {}: {:.1} ms ({:.0} ns/pair: stats, SQLite, judge), phase {}, verdict jobs {}",
        fed,
        batch,
        busy.as_secs_f64() * 1e3,
        busy.as_nanos() as f64 / fed as f64,
        rollout.phase,
        rollout.numbers.jobs
    );
    drop(core);
    let t = Instant::now();
    let core =
        Core::open(cluster, Store::open(&db).expect("store"), fake, "t".into()).expect("core");
    let elapsed = t.elapsed();
    let r = core
        .rollouts()
        .into_iter()
        .find(|r| r.service == "s000")
        .expect("rollout");
    println!(
        "restart: reopen and replay {} recorded pairs into the judge: {:.1} ms ({})",
        r.numbers.jobs,
        elapsed.as_secs_f64() * 1e3,
        r.phase
    );
    let t = Instant::now();
    let csv = core.pairs_csv(r.id, false).expect("csv");
    println!(
        "pairs.csv of {} rows: {:.1} ms, {} bytes",
        csv.lines().count() - 1,
        t.elapsed().as_secs_f64() * 1e3,
        csv.len()
    );
}

/// One release on a fresh store: 50 ticks of 1,000 mirrored pairs each (a service mirroring
/// 10,000 jobs a second at the default 100 ms tick), then 50 ticks with nothing new. Returns the
/// tick times of both kinds.
async fn store_ticks(store: Store) -> (Vec<Duration>, Vec<Duration>) {
    let (_, fake, core) = releasing(store).await;
    let mut rng = StdRng::seed_from_u64(9);
    let (mut busy, mut idle) = (Vec::new(), Vec::new());
    for i in 0..50 {
        fake.add_pairs("s000", job_pairs(&mut rng, i * 1000 + 1, 1000));
        let t = Instant::now();
        core.tick().await;
        busy.push(t.elapsed());
    }
    for _ in 0..50 {
        let t = Instant::now();
        core.tick().await;
        idle.push(t.elapsed());
    }
    (busy, idle)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The reconcile tick on SQLite and on PostgreSQL, side by side in interleaved repeats.
async fn bench_stores(a: &Args) {
    let server = understudy_testkit::postgres::PgServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut sqlite, mut postgres) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for run in 0..a.stores {
        let file = Store::open(&dir.path().join(format!("run{run}.db"))).expect("sqlite");
        let (busy, idle) = store_ticks(file).await;
        sqlite.0.push(median(busy));
        sqlite.1.push(median(idle));
        server.psql(&format!("CREATE DATABASE run{run}"));
        let url = server.url().replace("/understudy", &format!("/run{run}"));
        let shared = Store::open_postgres(&url.parse().expect("url")).expect("postgres");
        let (busy, idle) = store_ticks(shared).await;
        postgres.0.push(median(busy));
        postgres.1.push(median(idle));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (what, s, p) in [
        ("tick with 1,000 new pairs", sqlite.0, postgres.0),
        ("tick with nothing new", sqlite.1, postgres.1),
    ] {
        let (s, p) = (median(s), median(p));
        println!(
            "{what}: SQLite {:.3} ms, PostgreSQL {:.3} ms, PostgreSQL/SQLite {:.2}x (median of {} runs' medians)",
            ms(s),
            ms(p),
            p.as_secs_f64() / s.as_secs_f64(),
            a.stores
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    if a.stores > 0 {
        bench_stores(&a).await;
        return;
    }
    bench_plan(&a);
    bench_judge(&a);
    bench_window(&a);
    bench_controller_path(&a).await;
}
