//! The scenario report: `--json` output (see CONTRACT.md) and the verdict table.

use crate::core::verdict::{PairSummary, RolloutVerdict};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use understudy_loadgen::LoadReport;

use super::spec::Expected;

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    /// Every outcome as expected, no caller hurt, no simulation job on an active machine nor
    /// caller's job on a simulation-only one, no call moved, no simulation side effect.
    pub passed: bool,
    /// Why `passed` is false, one line per reason.
    pub failures: Vec<String>,
    /// Each released service as its last release left it.
    pub services: BTreeMap<String, ServiceReport>,
    /// Every release of the scenario, in order, with the outcome of each of its services.
    pub releases: Vec<ReleaseReport>,
    /// Services in the order their balancers took v2 into the active configuration.
    pub release_order: Vec<String>,
    pub active_jobs: ActiveJobs,
    pub dropped_sessions: u64,
    /// Side effects the machines performed for simulation jobs (only a machine with the
    /// `leaks_side_effects` fault counts them).
    pub simulation_side_effects: u64,
    /// Where simulation and callers' jobs landed, as the machines counted them.
    #[serde(flatten)]
    pub isolation: Isolation,
    /// Calls whose jobs reached a machine that did not see them start, over every machine.
    pub calls_moved: u64,
    /// The machines that counted such calls, with their count.
    pub calls_moved_by_machine: BTreeMap<String, u64>,
    pub ops: Vec<OpsRecord>,
    /// The load generator's own report.
    pub load: Option<LoadReport>,
    /// The controller's machine registry at the end of the run: each machine's last reported
    /// state (machines publish it to the controller's hub).
    pub machines: Vec<understudy_hub::MachineRecord>,
    /// What the controller's monitor loop did during the run (`GET /api/v1/monitor/actions`).
    pub monitor_actions: Vec<crate::core::monitor::ActionRecord>,
}

/// One release of the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseReport {
    /// The controller's release id (none when it was never started).
    pub release: Option<i64>,
    pub services: BTreeMap<String, ServiceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    pub outcome: Expected,
    pub expected: Expected,
    /// The rollout's last phase (none when it never started).
    pub phase: Option<String>,
    pub jobs_compared: u64,
    /// The judge's last verdict with the numbers behind it.
    pub verdict: Option<RolloutVerdict>,
    /// Quantiles and rates of both versions over every compared job.
    pub numbers: Option<PairSummary>,
}

/// The witness of isolation: jobs counted by the machines that received them, by the role the
/// scenario and the controller's rollouts give each machine, never by a balancer's view.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Isolation {
    /// Simulation jobs (`x-understudy-simulation: 1`) received by a machine while it was active:
    /// by the machines active from the start (until retired or taken out), and by candidates
    /// after they joined (once copies made before could no longer arrive). Must be 0.
    pub active_machines_simulation_jobs: u64,
    /// Callers' jobs received by a machine while it was only in the simulation pool: by controls
    /// and candidates that never joined, and by candidates before they joined. Must be 0.
    pub simulation_only_plain_jobs: u64,
    /// The machines behind the counts, by role.
    pub always_active_machines: Vec<String>,
    pub simulation_only_machines: Vec<String>,
    pub joined_machines: Vec<String>,
}

/// Jobs as the callers saw them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ActiveJobs {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpsRecord {
    pub action: String,
    pub service: String,
    pub at_s: f64,
    pub accepted: bool,
    pub error: Option<String>,
}

impl ScenarioReport {
    /// The verdict table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<14} {:<12} {:<12} {:>8} {:>10} {:>10} {:>9} {:>9}  rule",
            "service", "expected", "outcome", "jobs", "v1 p99", "v2 p99", "v1 err", "v2 err"
        );
        // One row per service of each release; a sequence numbers its releases.
        let several = self.releases.len() > 1;
        for (index, release) in self.releases.iter().enumerate() {
            for (name, s) in &release.services {
                let name = if several {
                    format!("{index}: {name}")
                } else {
                    name.clone()
                };
                service_row(&mut out, &name, s);
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "release order     {}", self.release_order.join(" -> "));
        let _ = writeln!(
            out,
            "callers           {} sent, {} ok, {} errors; {} sessions dropped",
            self.active_jobs.sent,
            self.active_jobs.ok,
            self.active_jobs.errors,
            self.dropped_sessions
        );
        let i = &self.isolation;
        let _ = writeln!(
            out,
            "isolation         {} simulation jobs on active machines, {} callers' jobs on \
             simulation-only machines; {} calls moved",
            i.active_machines_simulation_jobs, i.simulation_only_plain_jobs, self.calls_moved
        );
        let _ = writeln!(
            out,
            "simulation        {} side effects performed for mirrored jobs",
            self.simulation_side_effects
        );
        if self.passed {
            let _ = writeln!(out, "RESULT            as expected");
        } else {
            let _ = writeln!(out, "RESULT            NOT as expected:");
            for f in &self.failures {
                let _ = writeln!(out, "  - {f}");
            }
        }
        out
    }
}

/// One line of the verdict table.
fn service_row(out: &mut String, name: &str, s: &ServiceReport) {
    let side = |v2: bool| s.numbers.as_ref().map(|n| if v2 { &n.v2 } else { &n.v1 });
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |us| format!("{:.2}ms", us / 1e3));
    let rate = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |r| format!("{:.2}%", r * 100.0));
    let rule = s.verdict.as_ref().map_or("-", |v| v.rule.as_str());
    let mark = if s.outcome == s.expected {
        ""
    } else {
        "  <-- unexpected"
    };
    let _ = writeln!(
        out,
        "{:<14} {:<12} {:<12} {:>8} {:>10} {:>10} {:>9} {:>9}  {rule}{mark}",
        name,
        s.expected.as_str(),
        s.outcome.as_str(),
        s.jobs_compared,
        us(side(false).map(|n| n.p99_us)),
        us(side(true).map(|n| n.p99_us)),
        rate(side(false).map(|n| n.error_rate)),
        rate(side(true).map(|n| n.error_rate)),
    );
}
