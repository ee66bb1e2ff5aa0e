//! `understudy judge-bench --record PREFIX`: records A/A job pairs through the real balancer path,
//! for `judge-bench` to replay. Three simulated machines of one service run the same behaviour
//! (their work depends on the job's input, as a real service's does): v1 in the active pool, and in
//! the simulation pool a v1 control and a "v2" that is v1 again; a real balancer copies every job to
//! both, and the load generator sends an open-loop call/SMS mix. Two files in `understudy judge`'s
//! CSV form come out, one row per job that both copies answered:
//! - `PREFIX-control-pairs.csv`: the control's answer against v2's, what the live judge sees with
//!   the default baseline (`understudy_judge::Baseline::Control`, see src/core/pairing.rs);
//! - `PREFIX-active-pairs.csv`: the active machine's answer against v2's (baseline `active`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use understudy_judge::PairSample;
use understudy_loadgen::{run_load, spawn_machine, LoadSpec, MachineHandle, MachineSpec};
use understudy_proxy::{BalancerSpec, ProcessConfig};
use understudy_wire::{BalancerConfig, MachineEntry, PoolRole, StatsReport};

use crate::core::pairing::{same_path_pair, sample_of, JobJoiner};
use crate::runtime::balancer::{BalancerClient, HttpBalancerClient};

const SERVICE: &str = "media";

/// The machines' behaviour: input-dependent work with a spread like the judge-bench model's, a
/// heavy tail and input-caused errors.
const MACHINE: &str = r#"
service = "media"
seed = 7
latency = { kind = "lognormal", median_ms = 2.0, sigma = 0.6 }
tail = { fraction = 0.01, multiplier = 4.0 }
error_rate = 0.005
"#;

/// What a recording run does (`judge-bench --record-rate`, `--record-seconds`, `--seed`).
#[derive(Debug, Clone)]
pub struct RecordPlan {
    /// Arrivals per second (an SMS is one job, a call several).
    pub rate: f64,
    pub duration_s: f64,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording setup: {0}")]
    Setup(String),
    #[error("balancer stats: {0}")]
    Stats(String),
    #[error("the balancer lost {0} pairs (retention overflow): the recording would have holes")]
    Lost(u64),
    #[error("load: {0}")]
    Load(String),
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// One job as the balancer saw it: v2's copy against the active answer and against the control's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordedJob {
    pub against_active: PairSample,
    pub against_control: PairSample,
}

/// Runs the recording and returns the jobs both copies answered, in arrival order.
pub async fn record(plan: &RecordPlan) -> Result<Vec<RecordedJob>, RecordError> {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let machines = Machines::spawn(any).await?;
    // A recording balancer in this process, read by this process only: no keys to guard it.
    let options = understudy_proxy::SpawnOptions {
        insecure_no_key: true,
        ..understudy_proxy::SpawnOptions::default()
    };
    let balancers = understudy_proxy::spawn_with(machines.balancer_process(any), options)
        .map_err(|e| RecordError::Setup(e.to_string()))?;
    let target = balancers
        .listen_addr(SERVICE)
        .expect("the balancer listens");
    let admin = format!("http://{}", balancers.admin_addr());

    let mut load = tokio::spawn(run_load(load_spec(plan)?, target, |_| {}));
    let mut reader = PairReader::new(admin);
    let outcome = reader.follow(&mut load).await?;
    // The last copies finish after their active jobs: wait for the mirror to settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.read().await?;
    let _ = tokio::task::spawn_blocking(move || balancers.shutdown()).await;
    machines.shutdown().await;
    outcome
        .map_err(|e| RecordError::Load(e.to_string()))?
        .map_err(|e| RecordError::Load(e.to_string()))?;
    Ok(reader.into_jobs())
}

/// The three machines of the recording, all running [`MACHINE`].
struct Machines {
    active: MachineHandle,
    control: MachineHandle,
    candidate: MachineHandle,
}

impl Machines {
    async fn spawn(any: SocketAddr) -> Result<Machines, RecordError> {
        let spec: MachineSpec =
            toml::from_str(MACHINE).map_err(|e| RecordError::Setup(e.to_string()))?;
        let spawn = move |spec: MachineSpec| async move {
            spawn_machine(spec, any)
                .await
                .map_err(|e| RecordError::Setup(e.to_string()))
        };
        Ok(Machines {
            active: spawn(spec.clone()).await?,
            control: spawn(spec.clone()).await?,
            candidate: spawn(spec).await?,
        })
    }

    /// One balancer for the service: v1 active, and the v1 control and "v2" simulated, with
    /// every job copied to both.
    fn balancer_process(&self, any: SocketAddr) -> ProcessConfig {
        let entry = |id: &str, version: &str, addr: SocketAddr, config: PoolRole| MachineEntry {
            id: id.to_string(),
            version: version.to_string(),
            address: addr.to_string(),
            weight: 1,
            config,
            health_path: None,
        };
        ProcessConfig::new(
            any,
            vec![BalancerSpec::new(
                any,
                BalancerConfig {
                    service: SERVICE.to_string(),
                    version: 1,
                    epoch: 0,
                    mirror_fraction: 1.0,
                    compare_body: true,
                    compare: None,
                    compare_headers: Vec::new(),
                    drain_timeout_ms: 1_000,
                    machines: vec![
                        entry("media-active", "v1", self.active.addr(), PoolRole::Active),
                        entry(
                            "media-control",
                            "v1",
                            self.control.addr(),
                            PoolRole::Simulation,
                        ),
                        entry(
                            "media-v2",
                            "v2",
                            self.candidate.addr(),
                            PoolRole::Simulation,
                        ),
                    ],
                },
            )],
        )
    }

    async fn shutdown(self) {
        for machine in [self.active, self.control, self.candidate] {
            machine.shutdown().await;
        }
    }
}

/// The open-loop call/SMS mix of the recording.
fn load_spec(plan: &RecordPlan) -> Result<LoadSpec, RecordError> {
    LoadSpec::from_toml_str(&format!(
        "rate = {}\nduration_s = {}\nseed = {}\n[mix]\nsms = 0.7\nvoice = 0.3\n",
        plan.rate, plan.duration_s, plan.seed
    ))
    .map_err(|e| RecordError::Setup(e.to_string()))
}

/// Reads the balancer's pairs from a cursor and joins each job's two copies.
struct PairReader {
    client: HttpBalancerClient,
    admin: String,
    cursor: u64,
    joiner: JobJoiner,
    /// (job number, job): copies complete in any order, sorted once the reading is over.
    jobs: Vec<(u64, RecordedJob)>,
}

impl PairReader {
    fn new(admin: String) -> PairReader {
        PairReader {
            client: HttpBalancerClient::new(Duration::from_secs(5)),
            admin,
            cursor: 0,
            joiner: JobJoiner::default(),
            jobs: Vec::new(),
        }
    }

    /// Reads the pairs while the load runs, so the balancer's retention never overflows; gives
    /// the load task's outcome.
    async fn follow<T>(
        &mut self,
        load: &mut tokio::task::JoinHandle<T>,
    ) -> Result<Result<T, tokio::task::JoinError>, RecordError> {
        loop {
            tokio::select! {
                finished = &mut *load => return Ok(finished),
                _ = tokio::time::sleep(Duration::from_millis(250)) => self.read().await?,
            }
        }
    }

    /// One read of the pairs since the cursor.
    async fn read(&mut self) -> Result<(), RecordError> {
        let report = self
            .client
            .stats(&self.admin, SERVICE, self.cursor)
            .await
            .map_err(|e| RecordError::Stats(e.to_string()))?;
        self.cursor = self.collect(report)?;
        Ok(())
    }

    fn collect(&mut self, report: StatsReport) -> Result<u64, RecordError> {
        if report.pairs_lost > 0 {
            return Err(RecordError::Lost(report.pairs_lost));
        }
        for pair in &report.pairs {
            let control = pair.simulation.version != "v2";
            if let Some((control, v2)) = self.joiner.offer(pair.job, control, sample_of(pair)) {
                self.jobs.push((
                    pair.job,
                    RecordedJob {
                        against_active: v2,
                        against_control: same_path_pair(&control, &v2),
                    },
                ));
            }
        }
        Ok(report.cursor)
    }

    /// The jobs in arrival order, as the judge reads them.
    fn into_jobs(mut self) -> Vec<RecordedJob> {
        self.jobs.sort_by_key(|(job, _)| *job);
        self.jobs.into_iter().map(|(_, job)| job).collect()
    }
}

/// The pairs in `understudy judge`'s CSV form.
pub fn pairs_csv(pairs: &[PairSample]) -> String {
    let mut out = String::from("v1_latency_us,v1_ok,v2_latency_us,v2_ok,match\n");
    for p in pairs {
        let _ = writeln!(
            out,
            "{},{},{},{},{}",
            p.v1_latency_us,
            u8::from(p.v1_ok),
            p.v2_latency_us,
            u8::from(p.v2_ok),
            u8::from(p.matched.unwrap_or(true))
        );
    }
    out
}

/// Records and writes `PREFIX-control-pairs.csv` and `PREFIX-active-pairs.csv`; returns the
/// files and the number of jobs.
pub async fn record_to(
    prefix: &Path,
    plan: &RecordPlan,
) -> Result<(Vec<String>, usize), RecordError> {
    let jobs = record(plan).await?;
    let mut written = Vec::new();
    for (suffix, pick) in [
        (
            "control",
            (|j: &RecordedJob| j.against_control) as fn(&RecordedJob) -> PairSample,
        ),
        ("active", |j: &RecordedJob| j.against_active),
    ] {
        let path = format!("{}-{suffix}-pairs.csv", prefix.display());
        let pairs: Vec<PairSample> = jobs.iter().map(pick).collect();
        std::fs::write(&path, pairs_csv(&pairs)).map_err(|source| RecordError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok((written, jobs.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_every_mirrored_job_as_a_pair_through_the_real_balancer() {
        let plan = RecordPlan {
            rate: 200.0,
            duration_s: 1.5,
            seed: 5,
        };
        let jobs = record(&plan).await.unwrap();
        // 1.5 s of 200 arrivals/s, 30% of them calls of several jobs: a few hundred jobs, all
        // mirrored to both simulation machines at this load.
        assert!(jobs.len() > 250, "{} jobs", jobs.len());
        for job in &jobs {
            // The same job: v2's half is one answer, seen against two baselines.
            let (a, c) = (job.against_active, job.against_control);
            assert_eq!((a.v2_latency_us, a.v2_ok), (c.v2_latency_us, c.v2_ok));
            // The three machines do the same input-dependent work: the same jobs fail on all.
            assert_eq!((a.v1_ok, c.v1_ok), (a.v2_ok, a.v2_ok));
        }
        let pairs: Vec<PairSample> = jobs.iter().map(|j| j.against_control).collect();
        let csv = pairs_csv(&pairs);
        assert_eq!(csv.lines().count(), pairs.len() + 1);
        assert!(csv.starts_with("v1_latency_us,v1_ok,v2_latency_us,v2_ok,match\n"));
    }
}
