//! `understudy-loadgen`: run load against a target, or play a simulated machine.
//! Exit codes: 0 done, 1 the run failed, 2 bad use (arguments, spec or target).

use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use understudy_loadgen::{
    run_load, spawn_machine, spawn_machine_with_hub, Arrivals, DelaySpec, HubOptions, LoadSpec,
    MachineSpec, MixSpec, Mode, ProfileSpec, SpecError, StepSpec,
};

#[derive(Parser, Debug)]
#[command(
    name = "understudy-loadgen",
    version,
    about = "Open-loop telephony load generator and simulated machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send jobs to a target at a rate; print progress and a final report.
    Run(RunArgs),
    /// Play one simulated machine until interrupted (or until its crash fault fires).
    Machine(MachineArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Target, e.g. http://127.0.0.1:8080
    #[arg(long)]
    target: String,
    /// A load spec in TOML; the flags below override its fields.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Arrivals per second (jobs per second with the default SMS-only mix).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds during which arrivals are sent.
    #[arg(long)]
    duration: Option<f64>,
    /// constant | ramp[:FROM[:OVER_S]] | step:AT_S=RATE,... | spike:AT_S+LEN_S=RATE
    #[arg(long)]
    profile: Option<String>,
    /// Arrival weights, e.g. sms=3,voice=1,video=0 (kinds left out weigh 0).
    #[arg(long)]
    mix: Option<String>,
    /// In-call job interval of voice calls, ms.
    #[arg(long)]
    call_interval_ms: Option<u64>,
    /// Median voice call length, ms (lognormal, sigma 0.5).
    #[arg(long)]
    call_median_ms: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    max_jobs: Option<u64>,
    #[arg(long)]
    connections: Option<usize>,
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// uniform (exact spacing) or poisson
    #[arg(long)]
    arrivals: Option<String>,
    /// Closed loop: each connection sends its next job as soon as the last is answered (maximum
    /// throughput); --rate and --profile are ignored.
    #[arg(long)]
    closed: bool,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// Runtime threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args, Debug)]
struct MachineArgs {
    /// A machine spec in TOML.
    #[arg(long, conflicts_with_all = ["service", "latency_ms"])]
    config: Option<PathBuf>,
    /// Without --config: the service this machine belongs to.
    #[arg(long)]
    service: Option<String>,
    /// Without --config: the version (default v1).
    #[arg(long)]
    version_label: Option<String>,
    /// Without --config: constant latency in ms.
    #[arg(long)]
    latency_ms: Option<f64>,
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// NAME=HOST:PORT for each dependency's balancer.
    #[arg(long = "dependency")]
    dependencies: Vec<String>,
    /// Runtime threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    hub: HubArgs,
}

/// Publishing to the controller's hub. The key is never taken on the command line: from
/// --hub-key-file, else from the environment variable UNDERSTUDY_HUB_KEY.
#[derive(Args, Debug)]
struct HubArgs {
    /// The controller's base URL, e.g. http://127.0.0.1:9000; enables publishing.
    #[arg(long, requires = "hub_id")]
    hub_url: Option<String>,
    /// This machine's id as registered (the envelopes' sender).
    #[arg(long, requires = "hub_url")]
    hub_id: Option<String>,
    /// A file holding the base64 key from the registration answer.
    #[arg(long, requires = "hub_url")]
    hub_key_file: Option<PathBuf>,
    /// Reported role: active, control, standby or retired.
    #[arg(long, default_value = "standby")]
    hub_role: String,
    /// Reported capacity (sessions at once).
    #[arg(long, default_value_t = 100)]
    hub_capacity: u32,
    /// Advertised HOST:PORT (default: the bound address).
    #[arg(long)]
    hub_address: Option<String>,
    /// Interval of machine.state heartbeats, ms.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// Longest wait for one publish, ms.
    #[arg(long, default_value_t = 2_000)]
    publish_timeout_ms: u64,
    /// What a machine whose every job hangs reports: down, or silent.
    #[arg(long, default_value = "down")]
    hang_report: String,
}

/// Environment variable holding the hub key when no --hub-key-file is given.
const HUB_KEY_ENV: &str = "UNDERSTUDY_HUB_KEY";

/// The hub option from the flags, or None without --hub-url. Checked before anything starts.
fn hub_options(args: &HubArgs) -> Result<Option<HubOptions>, UsageError> {
    let (Some(url), Some(id)) = (&args.hub_url, &args.hub_id) else {
        return Ok(None);
    };
    let key = match &args.hub_key_file {
        Some(path) => read(path)?,
        None => std::env::var(HUB_KEY_ENV).map_err(|_| {
            usage(format!(
                "--hub-url needs a key: --hub-key-file PATH or the environment variable {HUB_KEY_ENV}"
            ))
        })?,
    };
    // The key's text is never part of an error message.
    let mut options =
        HubOptions::new(url.clone(), id.clone(), key.trim()).map_err(|e| usage(format!("{e}")))?;
    options.role = serde_json::from_value(serde_json::Value::String(args.hub_role.clone()))
        .map_err(|_| {
            usage(format!(
                "--hub-role {:?}: must be active, control, standby or retired",
                args.hub_role
            ))
        })?;
    options.hang_report = serde_json::from_value(serde_json::Value::String(
        args.hang_report.clone(),
    ))
    .map_err(|_| {
        usage(format!(
            "--hang-report {:?}: must be down or silent",
            args.hang_report
        ))
    })?;
    options.capacity = args.hub_capacity;
    options.address = args.hub_address.clone();
    options.heartbeat_ms = args.heartbeat_ms;
    options.publish_timeout_ms = args.publish_timeout_ms;
    Ok(Some(options))
}

/// A refusal of the command line or of a file: exit 2.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("{0}")]
    Message(String),
    #[error("{path}: {source}")]
    Spec { path: String, source: SpecError },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

fn usage(message: impl Into<String>) -> UsageError {
    UsageError::Message(message.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Run(args) => args.threads,
        Command::Machine(args) => args.threads,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            builder.worker_threads(threads);
        }
        builder.enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Machine(args) => {
                // Hub publishing problems are logged (once each) on stderr.
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .init();
                machine(args).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: RunArgs) -> Result<ExitCode, UsageError> {
    let spec = load_spec(&args)?;
    let target = resolve_target(&args.target)?;
    let quiet = args.quiet;
    let report = run_load(spec, target, |p| {
        if !quiet {
            eprintln!("{p}");
        }
    })
    .await
    .map_err(|e| usage(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::other)
            .and_then(|_| writeln!(out))
    } else {
        write!(out, "{report}")
    };
    Ok(if written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn read(path: &PathBuf) -> Result<String, UsageError> {
    std::fs::read_to_string(path).map_err(|source| UsageError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn load_spec(args: &RunArgs) -> Result<LoadSpec, UsageError> {
    let from_file = |path: &PathBuf| -> Result<LoadSpec, UsageError> {
        LoadSpec::from_toml_str(&read(path)?).map_err(|source| UsageError::Spec {
            path: path.display().to_string(),
            source,
        })
    };
    let mut spec = match &args.spec {
        Some(path) => from_file(path)?,
        None => {
            let rate = args
                .rate
                .or(args.closed.then_some(0.0))
                .ok_or_else(|| usage("--rate is required (or --spec FILE, or --closed)"))?;
            let duration = args
                .duration
                .ok_or_else(|| usage("--duration is required (or --spec FILE)"))?;
            LoadSpec::constant(rate, duration)
        }
    };
    if let Some(rate) = args.rate {
        spec.rate = rate;
    }
    if let Some(duration) = args.duration {
        spec.duration_s = duration;
    }
    if let Some(profile) = &args.profile {
        spec.profile = parse_profile(profile).map_err(|e| usage(format!("--profile: {e}")))?;
    }
    if let Some(mix) = &args.mix {
        let shapes = spec.mix.clone();
        spec.mix = parse_mix(mix, shapes).map_err(|e| usage(format!("--mix: {e}")))?;
    }
    if let Some(interval) = args.call_interval_ms {
        spec.mix.voice_call.interval_ms = interval;
    }
    if let Some(median) = args.call_median_ms {
        spec.mix.voice_call.length = DelaySpec::Lognormal {
            median_ms: median,
            sigma: 0.5,
        };
    }
    if let Some(seed) = args.seed {
        spec.seed = seed;
    }
    if args.max_jobs.is_some() {
        spec.max_jobs = args.max_jobs;
    }
    if let Some(c) = args.connections {
        spec.connections = c;
    }
    if let Some(t) = args.timeout_ms {
        spec.timeout_ms = t;
    }
    if let Some(a) = &args.arrivals {
        spec.arrivals = match a.as_str() {
            "uniform" => Arrivals::Uniform,
            "poisson" => Arrivals::Poisson,
            other => {
                return Err(usage(format!(
                    "--arrivals: expected uniform or poisson, got {other:?}"
                )))
            }
        };
    }
    if args.closed {
        spec.mode = Mode::Closed;
    }
    spec.plan()
        .map_err(|e| usage(format!("invalid load: {e}")))?;
    Ok(spec)
}

fn number(text: &str, what: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("{what} must be a number, got {text:?}"))
}

fn parse_profile(text: &str) -> Result<ProfileSpec, String> {
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    match kind {
        "constant" if rest.is_empty() => Ok(ProfileSpec::Constant),
        "ramp" => {
            let mut parts = rest.split(':').filter(|p| !p.is_empty());
            let from_rate = parts.next().map(|p| number(p, "ramp FROM")).transpose()?.unwrap_or(0.0);
            let over_s = parts.next().map(|p| number(p, "ramp OVER_S")).transpose()?;
            Ok(ProfileSpec::Ramp { from_rate, over_s })
        }
        "step" => {
            let steps = rest
                .split(',')
                .map(|step| {
                    let (at, rate) = step
                        .split_once('=')
                        .ok_or_else(|| format!("step {step:?} must be AT_S=RATE"))?;
                    Ok(StepSpec {
                        at_s: number(at, "step AT_S")?,
                        rate: number(rate, "step RATE")?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(ProfileSpec::Step { steps })
        }
        "spike" => {
            let (window, rate) = rest
                .split_once('=')
                .ok_or("spike must be spike:AT_S+LEN_S=RATE")?;
            let (at, length) = window
                .split_once('+')
                .ok_or("spike must be spike:AT_S+LEN_S=RATE")?;
            Ok(ProfileSpec::Spike {
                at_s: number(at, "spike AT_S")?,
                length_s: number(length, "spike LEN_S")?,
                spike_rate: number(rate, "spike RATE")?,
            })
        }
        _ => Err(format!(
            "expected constant, ramp[:FROM[:OVER_S]], step:AT_S=RATE,... or spike:AT_S+LEN_S=RATE, got {text:?}"
        )),
    }
}

fn parse_mix(text: &str, shapes: MixSpec) -> Result<MixSpec, String> {
    let mut mix = MixSpec {
        sms: 0.0,
        voice: 0.0,
        video: 0.0,
        ..shapes
    };
    for part in text.split(',') {
        let (kind, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} must be KIND=WEIGHT"))?;
        let weight = number(weight, kind)?;
        match kind.trim() {
            "sms" => mix.sms = weight,
            "voice" => mix.voice = weight,
            "video" => mix.video = weight,
            other => return Err(format!("unknown job kind {other:?} (sms, voice, video)")),
        }
    }
    Ok(mix)
}

/// Accepts `http://host:port[/...]` or `host:port`; only plain HTTP.
fn resolve_target(target: &str) -> Result<SocketAddr, UsageError> {
    let uri: http::Uri = target
        .parse()
        .map_err(|e| usage(format!("--target {target:?}: {e}")))?;
    if let Some(scheme) = uri.scheme_str() {
        if scheme != "http" {
            return Err(usage(format!(
                "--target {target:?}: only http:// is supported"
            )));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| usage(format!("--target {target:?}: expected http://HOST:PORT")))?;
    let port = authority.port_u16().unwrap_or(80);
    (authority.host().trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .map_err(|e| usage(format!("--target {target:?}: {e}")))?
        .next()
        .ok_or_else(|| usage(format!("--target {target:?}: no address")))
}

async fn machine(args: MachineArgs) -> Result<ExitCode, UsageError> {
    let spec = match (&args.config, &args.service) {
        (Some(path), _) => {
            MachineSpec::from_toml_str(&read(path)?).map_err(|source| UsageError::Spec {
                path: path.display().to_string(),
                source,
            })?
        }
        (None, Some(service)) => {
            let mut spec = MachineSpec::new(
                service.clone(),
                args.version_label
                    .clone()
                    .unwrap_or_else(|| "v1".to_string()),
            );
            if let Some(ms) = args.latency_ms {
                spec.latency = DelaySpec::constant_ms(ms);
            }
            spec
        }
        (None, None) => return Err(usage("give --config FILE or --service NAME")),
    };
    let mut dependencies = BTreeMap::new();
    for dep in &args.dependencies {
        let (name, addr) = dep
            .split_once('=')
            .ok_or_else(|| usage(format!("--dependency {dep:?} must be NAME=HOST:PORT")))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| usage(format!("--dependency {dep:?}: {e}")))?;
        dependencies.insert(name.to_string(), addr);
    }
    let hub = hub_options(&args.hub)?;
    let handle = match hub {
        Some(hub) => spawn_machine_with_hub(spec, args.bind, hub).await,
        None => spawn_machine(spec, args.bind).await,
    }
    .map_err(|e| usage(e.to_string()))?;
    handle
        .set_dependencies(dependencies)
        .map_err(|e| usage(format!("--dependency: {e}")))?;
    println!("listening on http://{}", handle.addr());
    let _ = std::io::stdout().flush();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = handle.stopped() => eprintln!("machine stopped (crash fault)"),
    }
    let stats = handle.stats();
    handle.shutdown().await;
    eprintln!(
        "{}",
        serde_json::to_string(&stats).unwrap_or_else(|e| format!("stats: {e}"))
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub_args(extra: &[&str]) -> HubArgs {
        let mut argv = vec!["understudy-loadgen", "machine", "--service", "media"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Machine(args) => args.hub,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hub_flags_take_the_key_from_a_file_and_check_every_value() {
        assert!(hub_options(&hub_args(&[])).unwrap().is_none());
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let path = std::env::temp_dir().join(format!("understudy-hub-key-{}", std::process::id()));
        std::fs::write(&path, format!("{key}\n")).unwrap();
        let file = path.to_str().unwrap();
        let base = [
            "--hub-url",
            "http://127.0.0.1:9000",
            "--hub-id",
            "media-1",
            "--hub-key-file",
            file,
        ];
        let options = hub_options(&hub_args(&base)).unwrap().unwrap();
        assert_eq!(
            (options.id.as_str(), options.role),
            ("media-1", understudy_hub::Role::Standby)
        );
        let with = |more: &[&str]| {
            let mut argv = base.to_vec();
            argv.extend_from_slice(more);
            hub_options(&hub_args(&argv))
        };
        let options = with(&[
            "--hub-role",
            "active",
            "--hang-report",
            "silent",
            "--heartbeat-ms",
            "250",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(options.role, understudy_hub::Role::Active);
        assert_eq!(options.hang_report, understudy_loadgen::HangReport::Silent);
        assert_eq!(options.heartbeat_ms, 250);
        let err = with(&["--hub-role", "boss"]).unwrap_err().to_string();
        assert!(err.contains("--hub-role"), "{err}");
        let err = with(&["--hang-report", "loud"]).unwrap_err().to_string();
        assert!(err.contains("--hang-report"), "{err}");
        // A bad key is refused without showing it.
        std::fs::write(&path, "c2hvcnQ=").unwrap();
        let err = hub_options(&hub_args(&base)).unwrap_err().to_string();
        assert!(err.contains("hub.key") && !err.contains("c2hvcnQ"), "{err}");
        std::fs::remove_file(&path).unwrap();
        // --hub-id alone is refused by the parser (it needs --hub-url).
        let argv = [
            "understudy-loadgen",
            "machine",
            "--service",
            "m",
            "--hub-id",
            "x",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn profiles_parse_from_their_short_forms() {
        assert_eq!(parse_profile("constant").unwrap(), ProfileSpec::Constant);
        assert_eq!(
            parse_profile("ramp:10:5").unwrap(),
            ProfileSpec::Ramp {
                from_rate: 10.0,
                over_s: Some(5.0)
            }
        );
        assert_eq!(
            parse_profile("step:2=300,4=0").unwrap(),
            ProfileSpec::Step {
                steps: vec![
                    StepSpec {
                        at_s: 2.0,
                        rate: 300.0
                    },
                    StepSpec {
                        at_s: 4.0,
                        rate: 0.0
                    }
                ]
            }
        );
        assert_eq!(
            parse_profile("spike:10+5=2000").unwrap(),
            ProfileSpec::Spike {
                at_s: 10.0,
                length_s: 5.0,
                spike_rate: 2000.0
            }
        );
        assert!(parse_profile("wave").unwrap_err().contains("wave"));
        assert!(parse_profile("spike:10=3").is_err());
    }

    #[test]
    fn mixes_parse_and_leave_out_kinds_at_zero() {
        let mix = parse_mix("voice=1,sms=3", MixSpec::default()).unwrap();
        assert_eq!((mix.sms, mix.voice, mix.video), (3.0, 1.0, 0.0));
        assert!(parse_mix("fax=1", MixSpec::default())
            .unwrap_err()
            .contains("fax"));
    }

    #[test]
    fn targets_resolve_with_or_without_scheme() {
        let expected: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(resolve_target("http://127.0.0.1:8080").unwrap(), expected);
        assert_eq!(resolve_target("127.0.0.1:8080").unwrap(), expected);
        assert!(resolve_target("https://127.0.0.1:8080").is_err());
    }
}
