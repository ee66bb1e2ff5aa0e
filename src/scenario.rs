//! PLACEHOLDER written by the lead: the scenario runner (issue 4) replaces this file.
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[arg(long)]
    pub linger: Option<u64>,
}
#[derive(clap::Subcommand, Debug)]
pub enum ScenarioCommand {
    Run {
        file: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}
pub fn demo(_: DemoArgs) -> u8 {
    2
}
pub fn command(_: ScenarioCommand) -> u8 {
    2
}
