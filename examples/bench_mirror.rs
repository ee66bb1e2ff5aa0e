//! Mirror budget benchmark: copies of callers' jobs made per decision, and time to decision,
//! for a fixed `mirror_fraction` of 1.0 and 0.25 against a `mirror_budget` steered by the
//! evidence (src/core/mirror.rs).
//!
//! `cargo run --release -p understudy --example bench_mirror [-- --runs N --rate JOBS_PER_S --wait S]`
//!
//! The controller is the real one (`Core`: stats reads, SQLite in memory, the judge, the mirror
//! steering, config pushes) over the in-memory balancer, on tokio's paused clock: each 500 ms
//! round the callers send `rate / 2` jobs and the bench copies each with the probability the
//! balancer's running config says (v2 and the A/A control answer every copy), as a real
//! balancer does. Two families, seeded: an identical v2 (the judge passes it; the rollout then
//! awaits approval for `--wait` seconds and is approved) and a v2 with 2 points more errors (it
//! fails). Figures are recorded in docs/benchmarks.md ("Mirror budget").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use understudy::core::rollout::OpsAction;
use understudy::runtime::balancer::FakeBalancer;
use understudy::runtime::controller::{Core, OpsRequest, ReleaseRequest};
use understudy::store::Store;
use understudy_wire::{JobObservation, JobPair, Outcome, OutcomeCounts, PoolRole, SeriesStats};

const ROUND: Duration = Duration::from_millis(500);
/// Give up on a rollout undecided after this many rounds (not expected).
const MAX_ROUNDS: u64 = 4_000;

/// Copies per decision: a mirror budget against a fixed mirror fraction.
#[derive(clap::Parser)]
struct Args {
    /// Seeded rollouts per mode and family.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Callers' jobs per second.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// How long the passed rollout awaits approval, in seconds.
    #[arg(long = "wait", default_value_t = 120)]
    wait_s: u64,
}

fn args() -> Args {
    let args = <Args as clap::Parser>::parse();
    if !(args.rate >= 10.0 && args.rate.is_finite()) {
        eprintln!("--rate: at least 10 jobs per second, got {}", args.rate);
        std::process::exit(2);
    }
    args
}

/// How the service copies: its line in the cluster file.
struct Mode {
    name: String,
    line: String,
}

fn modes(rate: f64) -> Vec<Mode> {
    let budget = |cps: f64| Mode {
        name: format!("budget {cps:.0}/s"),
        line: format!("mirror_budget = {{ copies_per_second = {cps:.1}, watch_fraction = 0.05 }}"),
    };
    vec![
        Mode {
            name: "fixed 1.0".into(),
            line: "mirror_fraction = 1.0".into(),
        },
        Mode {
            name: "fixed 0.25".into(),
            line: "mirror_fraction = 0.25".into(),
        },
        budget(rate),
        budget(rate / 4.0),
    ]
}

fn cluster_text(mode: &Mode) -> String {
    let machine = |id: &str, version: &str, port: u16, config: &str| {
        format!(
            "[[machines]]\nid = \"{id}\"\nservice = \"svc\"\nversion = \"{version}\"\n\
             address = \"127.0.0.1:{port}\"\nconfig = \"{config}\"\n\n"
        )
    };
    format!(
        "[controller]\ntick_ms = 500\n\n[services.svc]\nbalancer = \"http://127.0.0.1:9\"\n\
         requires_approval = true\n{}\n\n{}{}{}",
        mode.line,
        machine("svc-1", "v1", 8001, "active"),
        machine("svc-c", "v1", 8002, "simulation"),
        machine("svc-2", "v2", 8003, "simulation"),
    )
}

/// v2 as the family has it: as good as v1, or with `extra_errors` more of its answers failing.
#[derive(Clone, Copy)]
struct Family {
    name: &'static str,
    extra_errors: f64,
    /// Approve once it awaited approval this long.
    approve: bool,
}

const FAMILIES: [Family; 2] = [
    Family {
        name: "identical v2 (pass, then approval)",
        extra_errors: 0.0,
        approve: true,
    },
    Family {
        name: "v2 +2 points of errors (fail)",
        extra_errors: 0.02,
        approve: false,
    },
];

/// What one rollout cost (a rollout still undecided after `MAX_ROUNDS` panics: no figure).
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    copies_to_decision: u64,
    seconds_to_decision: f64,
    /// Until the rollout left simulation (approved and joining, or rolled back).
    copies_to_leave: u64,
}

/// One answer to a job: a latency with a shared per-job difficulty; an error where the job
/// itself fails (every version answers it alike) or where this version adds its own.
fn observation(
    rng: &mut StdRng,
    difficulty: f64,
    job_fails: bool,
    extra_errors: f64,
    id: &str,
    version: &str,
) -> JobObservation {
    let failed = job_fails || (extra_errors > 0.0 && rng.gen_bool(extra_errors));
    let noise: f64 = rng.gen_range(0.8..1.25);
    JobObservation {
        machine: id.into(),
        version: version.into(),
        latency_us: (difficulty * noise) as u64,
        outcome: if failed {
            Outcome::ServerError
        } else {
            Outcome::Ok
        },
        status: Some(if failed { 500 } else { 200 }),
    }
}

/// One round of callers: their jobs (reported as the active series) and the copies the running
/// config asks for, each answered by v2 and by the control. Gives the copies made.
fn callers_round(
    fake: &FakeBalancer,
    rng: &mut StdRng,
    jobs: u64,
    family: Family,
    next_job: &mut u64,
) -> u64 {
    let fraction = fake.config("svc").map_or(0.0, |c| c.mirror_fraction);
    let mut pairs = Vec::new();
    for _ in 0..jobs {
        *next_job += 1;
        if fraction <= 0.0 || !rng.gen_bool(fraction.min(1.0)) {
            continue;
        }
        let difficulty = 2_000.0 * (-rng.gen_range(0.0001f64..1.0).ln()).powf(0.7) + 500.0;
        let job_fails = rng.gen_bool(0.005);
        let active = observation(rng, difficulty, job_fails, 0.0, "svc-1", "v1");
        for (id, version, extra) in [("svc-2", "v2", family.extra_errors), ("svc-c", "v1", 0.0)] {
            let simulation = observation(rng, difficulty, job_fails, extra, id, version);
            pairs.push(JobPair {
                job: *next_job,
                session: None,
                matched: simulation.outcome == active.outcome,
                active: active.clone(),
                simulation,
                diff: None,
            });
        }
    }
    let copies = pairs.len() as u64;
    fake.add_pairs("svc", pairs);
    fake.add_series(
        "svc",
        vec![SeriesStats {
            version: "v1".into(),
            config: PoolRole::Active,
            outcomes: OutcomeCounts {
                ok: jobs,
                ..OutcomeCounts::default()
            },
            histogram: String::new(),
        }],
    );
    copies
}

async fn one_rollout(mode: &Mode, family: Family, seed: u64, args: &Args) -> Run {
    let cluster = understudy::config::cluster::parse("bench.toml", &cluster_text(mode))
        .expect("valid cluster");
    let fake = Arc::new(FakeBalancer::new());
    let store = Store::open_in_memory().expect("store");
    let core = Core::open(cluster, store, fake.clone(), "token".into()).expect("core");
    let mut rng = StdRng::seed_from_u64(seed);
    let jobs = (args.rate * ROUND.as_secs_f64()) as u64;
    let mut next_job = 0;
    // The callers' rate is measured before the release, as it is on a live service.
    for _ in 0..6 {
        tokio::time::advance(ROUND).await;
        callers_round(&fake, &mut rng, jobs, family, &mut next_job);
        core.tick().await;
    }
    let request = ReleaseRequest {
        services: BTreeMap::from([("svc".to_string(), "v2".to_string())]),
        ..ReleaseRequest::default()
    };
    let id = core.release(&request, "bench").expect("release").rollouts[0].id;
    core.tick().await;
    let mut run = Run::default();
    let (mut copies, mut rounds, mut waited) = (0, 0, 0u64);
    let phase = |core: &Core| core.rollout(id).expect("rollout").rollout.phase;
    while rounds < MAX_ROUNDS {
        tokio::time::advance(ROUND).await;
        copies += callers_round(&fake, &mut rng, jobs, family, &mut next_job);
        core.tick().await;
        rounds += 1;
        let now = phase(&core);
        if run.seconds_to_decision == 0.0 && now != "simulating" {
            run.copies_to_decision = copies;
            run.seconds_to_decision = rounds as f64 * ROUND.as_secs_f64();
        }
        if now == "awaiting_approval" {
            waited += ROUND.as_millis() as u64;
            if family.approve && waited >= args.wait_s * 1_000 {
                let shown = core.rollout(id).and_then(|d| d.evidence).and_then(|e| e.id);
                let request = OpsRequest {
                    action: OpsAction::Approve,
                    operator: "ops",
                    evidence: shown.as_deref(),
                };
                core.act(id, &request).expect("approved");
                break;
            }
        } else if now != "simulating" {
            break;
        }
    }
    assert!(
        run.seconds_to_decision > 0.0,
        "{}: undecided after {rounds} rounds",
        mode.name
    );
    run.copies_to_leave = copies;
    run
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!(
        "callers {:.0} jobs/s, {} seeded runs per row, an approval after {} s of waiting; medians; \
         copies = v2 + control answers",
        args.rate, args.runs, args.wait_s
    );
    for family in FAMILIES {
        println!("\n{}", family.name);
        println!(
            "| mirror | copies to decision | x fixed 1.0 | time to decision (s) | x fixed 1.0 | copies until it left simulation | x fixed 1.0 |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut base: Option<(f64, f64, f64)> = None;
        for mode in modes(args.rate) {
            let runs: Vec<Run> = (0..args.runs)
                .map(|seed| runtime.block_on(one_rollout(&mode, family, 1_000 + seed, &args)))
                .collect();
            let copies = median(runs.iter().map(|r| r.copies_to_decision as f64).collect());
            let seconds = median(runs.iter().map(|r| r.seconds_to_decision).collect());
            let leave = median(runs.iter().map(|r| r.copies_to_leave as f64).collect());
            let (c0, s0, l0) = *base.get_or_insert((copies, seconds, leave));
            println!(
                "| {} | {copies:.0} | {:.2} | {seconds:.1} | {:.2} | {leave:.0} | {:.2} |",
                mode.name,
                copies / c0,
                seconds / s0,
                leave / l0
            );
        }
    }
}
