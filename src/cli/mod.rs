//! The controller's subcommands: `check`, `controller`, and the admin endpoint's client
//! (`status`, `release`, `approve`, `abort`, `rollback`). Each returns the exit code:
//! 0 done, 1 refused (or the endpoint could not be reached), 2 bad use / invalid input.

pub mod error;
pub mod predictions;

pub use error::{exit_code, CliError, CliResult};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::client::{AdminClient, ClientError};
use crate::app::ControllerConfig;
use crate::config::cluster::{self, Cluster, ConfigError};
use crate::runtime::controller::{ReleaseAnswer, RolloutDetail, RolloutView, ServiceView};
use crate::table;
use understudy_hub::subgroup::PercentAndCount;
use understudy_hub::SubgroupSpec;

const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Every `understudy` command.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Play scenarios/demo.toml: a whole telephony cluster on loopback, a release, a verdict.
    Demo(crate::scenario::DemoArgs),
    /// Scenario files.
    #[command(subcommand)]
    Scenario(crate::scenario::ScenarioCommand),
    /// Validate a cluster or scenario file and print the release order.
    Check(CheckArgs),
    /// Run the controller and its admin endpoint.
    Controller(ControllerArgs),
    /// Write a fresh secret key file (a balancer's key, or the cluster's marker key).
    Keygen(KeygenArgs),
    /// Operators files (`[controller] operators_file`).
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Show services and rollouts (admin endpoint client).
    Status(StatusArgs),
    /// Start a release, or show its plan with --dry-run.
    Release(ReleaseArgs),
    /// Approve a rollout that awaits approval.
    Approve(RolloutIdArgs),
    /// Abort a rollout.
    Abort(RolloutIdArgs),
    /// Roll a rollout back.
    Rollback(RolloutIdArgs),
    /// Judge recorded mirrored-job pairs exactly as the live controller would.
    Judge(crate::offline::judge::JudgeArgs),
    /// Run the judge's self-test battery (A/A and known regressions).
    JudgeBench(crate::offline::judge::JudgeBenchArgs),
    /// Predict, from observed transition counts, the probability of ending in each failure state.
    Predict(crate::offline::predict::PredictArgs),
    /// Show the live predictive models, their comparison and recent alerts (admin endpoint client).
    Predictions(predictions::PredictionsArgs),
}

impl Command {
    /// The log filter: the controller logs as a server, every other command quietly.
    pub fn log_filter(&self) -> &'static str {
        match self {
            Command::Controller(_) => crate::telemetry::SERVER_FILTER,
            _ => crate::telemetry::QUIET_FILTER,
        }
    }
}

/// Runs a command. Scenario and offline commands print their own outcome and give its code.
pub fn run(command: Command) -> CliResult {
    match command {
        Command::Demo(args) => CliError::from_code(crate::scenario::demo(args)),
        Command::Scenario(cmd) => CliError::from_code(crate::scenario::command(cmd)),
        Command::Check(args) => check(args),
        Command::Controller(args) => controller(args),
        Command::Keygen(args) => keygen(args),
        Command::Operator(OperatorCommand::Add(args)) => operator(args),
        Command::Status(args) => status(args),
        Command::Release(args) => release(args),
        Command::Approve(args) => rollout_action(args, OpsAction::Approve),
        Command::Abort(args) => rollout_action(args, OpsAction::Abort),
        Command::Rollback(args) => rollout_action(args, OpsAction::Rollback),
        Command::Judge(args) => CliError::from_code(crate::offline::judge::judge(args)),
        Command::JudgeBench(args) => CliError::from_code(crate::offline::judge::judge_bench(args)),
        Command::Predict(args) => CliError::from_code(crate::offline::predict::predict(args)),
        Command::Predictions(args) => predictions::predictions_command(args),
    }
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Cluster or scenario file (TOML).
    pub file: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Cluster file (TOML) with its [controller] table.
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EndpointArgs {
    /// Base URL of the controller's admin endpoint.
    #[arg(long, env = "UNDERSTUDY_URL", default_value = DEFAULT_URL)]
    pub url: String,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// Refresh until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
}

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// SERVICE=VERSION, one or more.
    #[arg(required = true)]
    pub services: Vec<String>,
    /// Show the plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: plan from this cluster file (declared versions) instead of asking the controller.
    #[arg(long, requires = "dry_run")]
    pub config: Option<PathBuf>,
    /// When a service fails, roll back what already joined, in reverse dependency order.
    #[arg(long)]
    pub rollback_on_failure: bool,
    /// Move only a sub-group of a service's active machines: SERVICE:count=N, SERVICE:percent=P,
    /// SERVICE:machines=ID,ID, SERVICE:version=V, SERVICE:larger_of=P,N or SERVICE:smaller_of=P,N
    /// (P percent, N machines). Repeat for several services.
    #[arg(long = "subgroup", value_name = "SERVICE:RULE")]
    pub subgroups: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct RolloutIdArgs {
    /// Rollout id (see `understudy status`).
    pub id: String,
    /// (approve) The evidence id approved, as `GET /api/v1/rollouts/{id}` showed it; by default
    /// the evidence the endpoint shows now, printed with the answer.
    #[arg(long)]
    pub evidence: Option<String>,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

use crate::core::rollout::OpsAction;

/// What `check` prints for a valid cluster: counts and the release order in waves.
pub fn describe_cluster(cluster: &Cluster) -> String {
    let mut out = format!(
        "valid: {} services, {} machines\nrelease order:\n",
        cluster.services.len(),
        cluster.machines.len()
    );
    for (i, wave) in crate::core::plan::release_waves(cluster).iter().enumerate() {
        out.push_str(&format!("  {}. {}\n", i + 1, wave.join(", ")));
    }
    out
}

/// Validates a cluster file; the text to print or the error naming file, line and field.
pub fn check_cluster_file(file: &std::path::Path) -> Result<String, ConfigError> {
    cluster::load_file(file).map(|c| describe_cluster(&c))
}

/// Validates a cluster or a scenario file (one with a `[scenario]` table).
pub fn check_file(file: &std::path::Path) -> Result<String, ConfigError> {
    let (name, text) = cluster::read_file(file)?;
    if crate::scenario::is_scenario(&text) {
        crate::scenario::check_text(&name, &text)
    } else {
        cluster::parse(&name, &text).map(|c| describe_cluster(&c))
    }
}

pub fn check(args: CheckArgs) -> CliResult {
    let text = check_file(&args.file).map_err(|e| CliError::usage(format!("invalid: {e}")))?;
    print!("{text}");
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key: base64 of 32 random bytes, mode 0600.
    pub file: PathBuf,
    /// Replace the file when it exists (whoever holds the old key then refuses the new one).
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum OperatorCommand {
    /// Add an operator: a fresh token, printed once; only its SHA-256 is written to the file.
    Add(OperatorArgs),
}

#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// The operator's name (letters, digits, '-', '_', '.', '@').
    pub name: String,
    /// The operators file (`[controller] operators_file`), created with mode 0600 if missing.
    #[arg(long)]
    pub file: PathBuf,
}

/// Adds an operator: a fresh token printed once, only its SHA-256 appended to the file. The
/// whole file is checked with the new entry before it is written, so a clash changes nothing.
pub fn operator(args: OperatorArgs) -> CliResult {
    use crate::config::operators::{file_entry, new_token, Operators};
    use std::io::Write;
    let path = args.file.display();
    let existing = match std::fs::read_to_string(&args.file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(CliError::usage(format!("cannot read {path}: {e}"))),
    };
    let token = new_token();
    let entry = file_entry(&args.name, &token);
    let separator = if existing.is_empty() || existing.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let updated = format!("{existing}{separator}{entry}");
    Operators::parse(&updated).map_err(|e| CliError::usage(format!("{path}: {e}")))?;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(&args.file)
        .and_then(|mut f| f.write_all(format!("{separator}{entry}").as_bytes()))
        .map_err(|e| CliError::usage(format!("cannot write {path}: {e}")))?;
    eprintln!(
        "operator `{}` added to {path}; their token (shown once):",
        args.name
    );
    println!("{token}");
    Ok(())
}

/// Writes a fresh secret key: a balancer's key (`balancer_key_file`, `--key-file`) or the
/// cluster's marker key (`--marker-key-file`).
pub fn keygen(args: KeygenArgs) -> CliResult {
    let path = args.file.display();
    if args.file.exists() && !args.force {
        return Err(CliError::usage(format!(
            "{path} exists: not replaced (--force replaces it)"
        )));
    }
    let key = understudy_hub::SecretKey::generate();
    understudy_wire::write_key_file(&args.file, &key)
        .map_err(|e| CliError::usage(format!("cannot write {path}: {e}")))?;
    println!("key written to {path} (mode 0600)");
    Ok(())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::usage(format!("cannot start the async runtime: {e}")))
}

pub fn controller(args: ControllerArgs) -> CliResult {
    let cluster =
        cluster::load_file(&args.config).map_err(|e| CliError::usage(format!("invalid: {e}")))?;
    let token = std::env::var("UNDERSTUDY_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cluster.controller.token.clone())
        .unwrap_or_default();
    let config = ControllerConfig::from_cluster(cluster, token);
    runtime()?.block_on(async {
        let handle = crate::app::start(config)
            .await
            .map_err(|e| CliError::usage(format!("controller: {e}")))?;
        println!("admin endpoint: {}", handle.admin_url());
        stop_signal().await;
        handle.shutdown().await;
        Ok(())
    })
}

/// SIGINT (a terminal) or SIGTERM (a supervisor such as systemd): either stops cleanly.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub(crate) fn admin(endpoint: &EndpointArgs) -> Result<AdminClient, CliError> {
    let token = std::env::var("UNDERSTUDY_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    AdminClient::new(&endpoint.url, token).map_err(|e| CliError::usage(e.to_string()))
}

fn phase_cell(r: &RolloutView) -> String {
    match r.step {
        Some(step) => format!("{}[{}]", r.phase, step),
        None => r.phase.clone(),
    }
}

fn verdict_cells(r: &RolloutView) -> [String; 4] {
    let decision = r.verdict.as_ref().map_or("-", |v| v.decision.as_str());
    let n = &r.numbers;
    [
        decision.to_string(),
        n.jobs.to_string(),
        format!("{:.0}/{:.0}", n.v1.p99_us, n.v2.p99_us),
        format!(
            "{:.2}%/{:.2}%",
            n.v1.error_rate * 100.0,
            n.v2.error_rate * 100.0
        ),
    ]
}

pub fn rollouts_table(rollouts: &[RolloutView]) -> String {
    let mut rows = vec![[
        "id",
        "release",
        "service",
        "from",
        "to",
        "phase",
        "verdict",
        "jobs",
        "p99 us v1/v2",
        "errors v1/v2",
        "machines",
    ]
    .map(String::from)
    .to_vec()];
    for r in rollouts {
        let [decision, jobs, p99, errors] = verdict_cells(r);
        rows.push(vec![
            r.id.to_string(),
            r.release.to_string(),
            r.service.clone(),
            r.from_version.clone(),
            r.to_version.clone(),
            phase_cell(r),
            decision,
            jobs,
            p99,
            errors,
            crate::core::plan::describe_moves(&r.machines),
        ]);
    }
    table::render(&rows)
}

fn services_table(services: &[ServiceView]) -> String {
    let mut rows = vec![[
        "service",
        "version",
        "versions",
        "depends on",
        "approval",
        "rollout",
    ]
    .map(String::from)
    .to_vec()];
    for s in services {
        rows.push(vec![
            s.name.clone(),
            s.version.clone(),
            s.versions.join(","),
            if s.depends_on.is_empty() {
                "-".to_string()
            } else {
                s.depends_on.join(",")
            },
            if s.requires_approval { "yes" } else { "no" }.to_string(),
            match (&s.rollout, &s.phase) {
                (Some(id), Some(phase)) => format!("{id} ({phase})"),
                _ => "-".to_string(),
            },
        ]);
    }
    table::render(&rows)
}

async fn status_once(client: &AdminClient) -> Result<String, ClientError> {
    let services: Vec<ServiceView> = client.get("/api/v1/services").await?;
    let rollouts: Vec<RolloutView> = client.get("/api/v1/rollouts").await?;
    Ok(format!(
        "SERVICES\n{}\nROLLOUTS\n{}",
        services_table(&services),
        rollouts_table(&rollouts)
    ))
}

pub fn status(args: StatusArgs) -> CliResult {
    let client = admin(&args.endpoint)?;
    if !(args.interval.is_finite() && args.interval > 0.0) {
        return Err(CliError::usage(
            "--interval must be a positive number of seconds",
        ));
    }
    runtime()?.block_on(async {
        loop {
            match status_once(&client).await {
                Ok(text) => {
                    if args.watch {
                        // Clear the screen and go home, like watch(1).
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{text}");
                }
                Err(e) if !args.watch => return Err(e.into()),
                Err(e) => eprintln!("error: {e}"),
            }
            if !args.watch {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(args.interval)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}

/// Parses `SERVICE=VERSION` arguments.
pub fn parse_release_targets(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in items {
        let (service, version) = item
            .split_once('=')
            .filter(|(s, v)| !s.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("`{item}`: expected SERVICE=VERSION"))?;
        if out
            .insert(service.to_string(), version.to_string())
            .is_some()
        {
            return Err(format!("service `{service}` named twice"));
        }
    }
    Ok(out)
}

/// Parses `--subgroup SERVICE:RULE` arguments (see [`ReleaseArgs::subgroups`]).
pub fn parse_subgroups(items: &[String]) -> Result<BTreeMap<String, SubgroupSpec>, String> {
    let mut out = BTreeMap::new();
    for item in items {
        let bad = |why: &str| format!("--subgroup `{item}`: {why}");
        let (service, rule) = item
            .split_once(':')
            .filter(|(s, r)| !s.is_empty() && !r.is_empty())
            .ok_or_else(|| bad("expected SERVICE:RULE, e.g. media:percent=25"))?;
        let (kind, value) = rule
            .split_once('=')
            .ok_or_else(|| bad("expected RULE as KIND=VALUE, e.g. count=3"))?;
        let number = |text: &str| {
            text.trim()
                .trim_end_matches('%')
                .parse::<u32>()
                .map_err(|_| bad(&format!("`{text}` is not a whole number")))
        };
        let pair = |text: &str| -> Result<PercentAndCount, String> {
            let (p, c) = text
                .split_once(',')
                .ok_or_else(|| bad("expected PERCENT,COUNT, e.g. larger_of=33,20"))?;
            Ok(PercentAndCount {
                percent: number(p)?,
                count: number(c)?,
            })
        };
        let mut spec = SubgroupSpec::default();
        match kind {
            "count" => spec.count = Some(number(value)?),
            "percent" => spec.percent = Some(number(value)?),
            "version" => spec.version = Some(value.to_string()),
            "machines" => {
                spec.machines = Some(value.split(',').map(|s| s.trim().to_string()).collect())
            }
            "larger_of" => spec.larger_of = Some(pair(value)?),
            "smaller_of" => spec.smaller_of = Some(pair(value)?),
            other => {
                return Err(bad(&format!(
                "unknown rule `{other}` (count, percent, machines, version, larger_of, smaller_of)"
            )))
            }
        }
        spec.validate().map_err(|e| bad(&e.to_string()))?;
        if out.insert(service.to_string(), spec).is_some() {
            return Err(format!("--subgroup: service `{service}` named twice"));
        }
    }
    Ok(out)
}

pub fn plan_table(answer: &ReleaseAnswer) -> String {
    let mut rows = vec![["wave", "service", "from", "to", "after", "machines"]
        .map(String::from)
        .to_vec()];
    for line in &answer.plan {
        rows.push(vec![
            line.wave.to_string(),
            line.service.clone(),
            line.from_version.clone(),
            line.to_version.clone(),
            if line.after.is_empty() {
                "-".to_string()
            } else {
                line.after.join(",")
            },
            crate::core::plan::describe_moves(&line.machines),
        ]);
    }
    table::render(&rows)
}

pub fn release(args: ReleaseArgs) -> CliResult {
    let bad = |e: String| CliError::usage(format!("error: {e}"));
    let services = parse_release_targets(&args.services).map_err(bad)?;
    let subgroups = parse_subgroups(&args.subgroups).map_err(bad)?;
    if let Some(file) = &args.config {
        let answer = plan_from_file(file, &services, &subgroups).map_err(bad)?;
        println!("plan (dry run from {}, nothing changed)", file.display());
        print!("{}", plan_table(&answer));
        return Ok(());
    }
    let client = admin(&args.endpoint)?;
    let body = serde_json::json!({
        "services": services,
        "rollback_on_failure": args.rollback_on_failure,
        "dry_run": args.dry_run,
        "subgroup": subgroups,
    });
    let answer: ReleaseAnswer = runtime()?.block_on(client.post("/api/v1/releases", &body))?;
    match answer.release {
        Some(id) => println!("release {id} started"),
        None => println!("plan (dry run, nothing changed)"),
    }
    print!("{}", plan_table(&answer));
    if !answer.rollouts.is_empty() {
        println!();
        print!("{}", rollouts_table(&answer.rollouts));
    }
    Ok(())
}

/// The plan of a release from a cluster file alone, against the versions the file declares active.
pub fn plan_from_file(
    file: &std::path::Path,
    services: &BTreeMap<String, String>,
    subgroups: &BTreeMap<String, SubgroupSpec>,
) -> Result<ReleaseAnswer, String> {
    let cluster = cluster::load_file(file).map_err(|e| e.to_string())?;
    let current: BTreeMap<String, String> = cluster
        .services
        .values()
        .map(|s| (s.name.clone(), s.declared_version.clone()))
        .collect();
    let roles = crate::core::plan::declared_roles(&cluster);
    let busy = std::collections::BTreeSet::new();
    let plan =
        crate::core::plan::plan_release(&cluster, &roles, &current, &busy, services, subgroups)
            .map_err(|e| e.to_string())?;
    Ok(ReleaseAnswer {
        release: None,
        dry_run: true,
        plan,
        rollouts: Vec::new(),
    })
}

pub fn rollout_action(args: RolloutIdArgs, action: OpsAction) -> CliResult {
    if args.id.parse::<i64>().is_err() {
        return Err(CliError::usage(format!(
            "error: rollout id `{}` is not a number",
            args.id
        )));
    }
    let client = admin(&args.endpoint)?;
    let id = args.id.parse::<i64>().unwrap_or_default();
    let detail = runtime()?.block_on(client.act(id, action, args.evidence.clone()))?;
    print!("{}", rollouts_table(std::slice::from_ref(&detail.rollout)));
    if action == OpsAction::Approve {
        print!("{}", approval_lines(&detail));
    }
    Ok(())
}

/// What an approval approved: the evidence's tests, and the approvals standing.
fn approval_lines(detail: &RolloutDetail) -> String {
    let mut out = String::new();
    if let Some(e) = &detail.evidence {
        out.push_str(&format!(
            "evidence {} ({} pairs, decision {}):\n",
            e.id.as_deref().unwrap_or("-"),
            e.jobs,
            e.decision.as_str()
        ));
        for t in &e.tests {
            out.push_str(&format!(
                "  {:<14} estimate {:>9.5}  margin {:>9.5}  {}\n",
                t.name,
                t.estimate,
                t.margin,
                if t.beyond_margin {
                    "PAST its margin"
                } else {
                    "within"
                }
            ));
        }
    }
    for a in &detail.approvals {
        out.push_str(&format!(
            "approved by {} (evidence {})\n",
            a.operator, a.evidence
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_targets() {
        let parsed = parse_release_targets(&["db=v2".into(), "media=v3".into()]).unwrap();
        assert_eq!(parsed["db"], "v2");
        assert_eq!(parsed["media"], "v3");
        assert!(parse_release_targets(&["db".into()]).is_err());
        assert!(parse_release_targets(&["db=v2".into(), "db=v3".into()]).is_err());
        assert!(parse_release_targets(&["=v2".into()]).is_err());
    }

    #[test]
    fn operators_are_added_by_name_and_a_clash_changes_nothing() {
        use crate::config::operators::Operators;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("operators.toml");
        let add = |name: &str| {
            operator(OperatorArgs {
                name: name.into(),
                file: file.clone(),
            })
        };
        add("alice").unwrap();
        add("bob").unwrap();
        let written = std::fs::read_to_string(&file).unwrap();
        let operators = Operators::parse(&written).unwrap();
        assert_eq!(operators.names().collect::<Vec<_>>(), ["alice", "bob"]);
        assert!(add("alice").is_err(), "a name twice");
        assert!(add("no way").is_err(), "a bad name");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            written,
            "nothing half-written"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn check_prints_order_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, crate::testing::SAMPLE).unwrap();
        let text = check_cluster_file(&good).unwrap();
        assert!(text.contains("1. db, media"), "{text}");
        assert!(text.contains("3. edge"), "{text}");
        assert_eq!(exit_code(check(CheckArgs { file: good })), 0);
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[services.a]\nfoo = 1\n").unwrap();
        let err = check_cluster_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.toml:2") && err.contains("foo"), "{err}");
        assert_eq!(exit_code(check(CheckArgs { file: bad })), 2);
    }

    /// A controller file whose `[controller]` table is `table`; the controller's result.
    fn controller_with(table: &str) -> CliResult {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.toml");
        let text = crate::testing::SAMPLE.replace(
            "[controller]\ntick_ms = 100\n",
            &format!("[controller]\ntick_ms = 100\ntoken = \"t\"\nadmin_addr = \"127.0.0.1:0\"\n{table}\n"),
        );
        std::fs::write(&file, text).unwrap();
        controller(ControllerArgs { config: file })
    }

    #[test]
    fn a_store_url_that_does_not_parse_or_answer_stops_the_controller_naming_it() {
        let err = controller_with("store = \"mysql://db/understudy\"").unwrap_err();
        assert_eq!(err.code(), 2);
        let shown = err.to_string();
        assert!(
            shown.contains("controller.store") && shown.contains("postgres://"),
            "{shown}"
        );
        let both =
            controller_with("store = \"postgres://u@h/d\"\ndatabase = \"x.db\"").unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        // A port where nothing listens: refused at start, the message names the store.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://ops:secret@127.0.0.1:{port}/understudy");
        let err = controller_with(&format!("store = \"{url}\"")).unwrap_err();
        assert_eq!(err.code(), 2);
        let shown = err.to_string();
        let named = format!("postgres://ops@127.0.0.1:{port}/understudy");
        assert!(
            shown.contains(&named) && shown.contains("cannot be reached"),
            "{shown}"
        );
        assert!(!shown.contains("secret"), "{shown}");
    }
}
