//! `understudy`: the controller, its admin client, the scenario runner and the offline judge.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "understudy",
    version,
    about = "Blue-green rollout and canary simulation controller"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Play scenarios/demo.toml: a whole telephony cluster on loopback, a release, a verdict.
    Demo(understudy::scenario::DemoArgs),
    /// Scenario files.
    #[command(subcommand)]
    Scenario(understudy::scenario::ScenarioCommand),
    /// Validate a cluster or scenario file and print the release order.
    Check(understudy::cli::CheckArgs),
    /// Run the controller and its admin endpoint.
    Controller(understudy::cli::ControllerArgs),
    /// Write a fresh secret key file (a balancer's key, or the cluster's marker key).
    Keygen(understudy::cli::KeygenArgs),
    /// Show services and rollouts (admin endpoint client).
    Status(understudy::cli::StatusArgs),
    /// Start a release, or show its plan with --dry-run.
    Release(understudy::cli::ReleaseArgs),
    /// Approve a rollout that awaits approval.
    Approve(understudy::cli::RolloutIdArgs),
    /// Abort a rollout.
    Abort(understudy::cli::RolloutIdArgs),
    /// Roll a rollout back.
    Rollback(understudy::cli::RolloutIdArgs),
    /// Judge recorded mirrored-job pairs exactly as the live controller would.
    Judge(understudy::offline::judge::JudgeArgs),
    /// Run the judge's self-test battery (A/A and known regressions).
    JudgeBench(understudy::offline::judge::JudgeBenchArgs),
    /// Predict, from observed transition counts, the probability of ending in each failure state.
    Predict(understudy::offline::predict::PredictArgs),
    /// Show the live predictive models, their comparison and recent alerts (admin endpoint client).
    Predictions(understudy::cli::predictions::PredictionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.command {
        Command::Controller(_) => understudy::telemetry::SERVER_FILTER,
        _ => understudy::telemetry::QUIET_FILTER,
    };
    understudy::telemetry::init(filter);
    let code = match cli.command {
        Command::Demo(args) => understudy::scenario::demo(args),
        Command::Scenario(cmd) => understudy::scenario::command(cmd),
        Command::Check(args) => understudy::cli::check(args),
        Command::Controller(args) => understudy::cli::controller(args),
        Command::Keygen(args) => understudy::cli::keygen(args),
        Command::Status(args) => understudy::cli::status(args),
        Command::Release(args) => understudy::cli::release(args),
        Command::Approve(args) => {
            understudy::cli::rollout_action(args, understudy::core::rollout::OpsAction::Approve)
        }
        Command::Abort(args) => {
            understudy::cli::rollout_action(args, understudy::core::rollout::OpsAction::Abort)
        }
        Command::Rollback(args) => {
            understudy::cli::rollout_action(args, understudy::core::rollout::OpsAction::Rollback)
        }
        Command::Judge(args) => understudy::offline::judge::judge(args),
        Command::JudgeBench(args) => understudy::offline::judge::judge_bench(args),
        Command::Predict(args) => understudy::offline::predict::predict(args),
        Command::Predictions(args) => understudy::cli::predictions::predictions_command(args),
    };
    ExitCode::from(code)
}
