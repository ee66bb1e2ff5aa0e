//! Scenarios: a whole telephony cluster and a release, played on loopback by one command.
//!
//! [`spec`] reads and validates a scenario file, [`runner`] starts machines, balancers and the
//! controller and drives the release through the admin endpoint, [`report`] is what comes out.

pub mod report;
pub mod runner;
pub mod spec;

use std::path::PathBuf;
use std::time::Duration;

pub use report::ScenarioReport;
pub use runner::{run, RunError, RunOptions};
pub use spec::{is_scenario, Expected, Scenario};

/// The demo: 4 services, one promotes and one rolls back. Embedded so `understudy demo` works
/// from any directory.
pub const DEMO: &str = include_str!("../../scenarios/demo.toml");

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the cluster up this many seconds after the verdict, for a look or a scrape.
    #[arg(long, value_name = "SECS")]
    pub linger: Option<u64>,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ScenarioCommand {
    /// Play a scenario file; exit 0 when the outcome is as expected, 1 when not, 2 on a bad file.
    Run {
        file: PathBuf,
        /// Write the report as JSON to this file.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
        /// Keep the cluster up this many seconds after the verdict.
        #[arg(long, value_name = "SECS")]
        linger: Option<u64>,
    },
}

pub fn demo(args: DemoArgs) -> u8 {
    match spec::parse("scenarios/demo.toml (embedded)", DEMO) {
        Ok(scenario) => play(&scenario, args.json, args.linger),
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

pub fn command(cmd: ScenarioCommand) -> u8 {
    match cmd {
        ScenarioCommand::Run { file, json, linger } => match spec::load_file(&file) {
            Ok(scenario) => play(&scenario, json, linger),
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
    }
}

fn play(scenario: &Scenario, json: Option<PathBuf>, linger: Option<u64>) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let options = RunOptions {
        linger: linger.map(Duration::from_secs),
        verbose: true,
    };
    let report = match runtime.block_on(run(scenario, &options)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    println!();
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("report serializes");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return 1;
        }
    }
    u8::from(!report.passed)
}

/// Validates a scenario file for `understudy check`: the release order of its cluster and of its
/// release.
pub fn check_text(file: &str, text: &str) -> Result<String, crate::config::cluster::ConfigError> {
    let scenario = spec::parse(file, text)?;
    let mut current: std::collections::BTreeMap<String, String> = scenario
        .cluster
        .services
        .iter()
        .map(|(name, s)| (name.clone(), s.declared_version.clone()))
        .collect();
    let mut out = format!(
        "{file}: valid scenario `{}` ({} services, {} machines)\n",
        scenario.name,
        scenario.cluster.services.len(),
        scenario.machines.len()
    );
    let several = scenario.releases.len() > 1;
    for (index, release) in scenario.releases.iter().enumerate() {
        if several {
            out.push_str(&format!("release {index}:\n"));
        }
        let plan =
            crate::core::plan::Plan::for_release(&scenario.cluster, &current, &release.services);
        match plan {
            Ok(plan) => out.push_str(&plan.table()),
            Err(e) => out.push_str(&format!("release plan: {e}\n")),
        }
        // The next release starts from what this one is expected to leave.
        for (service, version) in &release.services {
            if release.expect.get(service) == Some(&spec::Expected::Promoted) {
                current.insert(service.clone(), version.clone());
            }
        }
    }
    Ok(out)
}
