//! `understudy`: the controller, its admin client, the scenario runner and the offline judge.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "understudy",
    version,
    about = "Blue-green rollout and canary simulation controller"
)]
struct Cli {
    #[command(subcommand)]
    command: understudy::cli::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    understudy::telemetry::init(cli.command.log_filter());
    ExitCode::from(understudy::cli::exit_code(understudy::cli::run(
        cli.command,
    )))
}
