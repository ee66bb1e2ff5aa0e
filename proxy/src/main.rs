//! `understudy-proxy --config FILE`: runs the balancers described in FILE (TOML, see
//! docs/balancer.md) until SIGINT or SIGTERM; with `--check`, only checks it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use understudy_proxy::{
    spawn_with, BalancerKey, ConfigFeed, ConfigSigning, ProcessConfig, SpawnOptions,
};

// The data plane allocates per job (headers, buffers); mimalloc measured faster than glibc's
// malloc here (see docs/benchmarks.md, balancer section).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Understudy's per-service balancers (active pool, simulation mirroring)"
)]
struct Args {
    /// Process config: admin address and one [[balancers]] table per service.
    #[arg(long)]
    config: PathBuf,
    /// Worker threads serving callers' jobs.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Use pingora's work-stealing scheduler for the worker threads (default: one current-thread
    /// runtime per worker, which costs less CPU per job).
    #[arg(long)]
    work_stealing: bool,
    /// Worker threads sending mirrored copies.
    #[arg(long, default_value_t = 1)]
    mirror_threads: usize,
    /// Copies waiting to be sent, per simulation version, before new ones are dropped.
    #[arg(long, default_value_t = 4096)]
    mirror_queue: usize,
    /// Copies in flight at once, all simulation versions together.
    #[arg(long, default_value_t = 512)]
    mirror_concurrency: usize,
    /// Copies in flight towards one simulation version per active job in flight (0 = no cap).
    #[arg(long, default_value_t = 2)]
    mirror_per_active: usize,
    /// Timeout of one copy, in milliseconds, from the moment it is queued.
    #[arg(long, default_value_t = 5000)]
    mirror_timeout_ms: u64,
    /// SERVICE=PATH: the balancer of SERVICE takes only configs signed with the key in PATH
    /// (base64; rewritten on rotation). Repeatable. See docs/balancer.md, "Signed configs".
    #[arg(long = "key-file", value_name = "SERVICE=PATH")]
    key_files: Vec<String>,
    /// SERVICE=VAR: as --key-file, the key read from the environment variable VAR.
    #[arg(long = "key-env", value_name = "SERVICE=VAR")]
    key_envs: Vec<String>,
    /// The cluster's simulation-marker key (base64), the same file on every balancer: copies are
    /// marked with a token made with it, and simulation jobs from cluster machines must carry a
    /// token it verifies. See docs/security.md.
    #[arg(long, value_name = "PATH", conflicts_with = "marker_key_env")]
    marker_key_file: Option<PathBuf>,
    /// As --marker-key-file, the key read from the environment variable VAR.
    #[arg(long, value_name = "VAR")]
    marker_key_env: Option<String>,
    /// Start without keys: configs and stats reads of keyless balancers are unauthenticated and
    /// simulation markers from internal callers are believed unchecked. A warning is logged at
    /// every start. For a trial on a laptop, never for a cluster others can reach.
    #[arg(long)]
    insecure_no_key: bool,
    /// Also take signed configs from the controller's hub at this base URL (server-sent events).
    #[arg(long, value_name = "URL", conflicts_with = "config_feed_nats")]
    config_feed_hub: Option<String>,
    /// Also take signed configs from this NATS server (nats://host:port).
    #[arg(long, value_name = "URL")]
    config_feed_nats: Option<String>,
    /// After a key rotation, the previous key is accepted this long at most (ms).
    #[arg(long, default_value_t = 60_000)]
    key_rotation_grace_ms: u64,
    /// A session with no job for this long (ms) releases its machine.
    #[arg(long, default_value_t = 60_000)]
    session_idle_ms: u64,
    /// How far the controller's clock may lag this machine's (ms, 1..=3600000): at start, signed
    /// messages numbered below the clock less this are refused, so a config captured before a
    /// restart is not applied after it.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    max_clock_skew_ms: u64,
    /// Check the config file and the keys as a start would, print what would run, and exit
    /// (0 when valid, 2 naming the problem otherwise) without binding anything.
    #[arg(long)]
    check: bool,
}

/// Keys (never printed) and the config feed from the command line.
fn config_signing(args: &Args) -> Result<ConfigSigning, String> {
    let mut signing = ConfigSigning {
        rotation_grace: Duration::from_millis(args.key_rotation_grace_ms),
        ..ConfigSigning::default()
    };
    let split = |flag: &str, text: &str| -> Result<(String, String), String> {
        match text.split_once('=') {
            Some((service, value)) if !service.is_empty() && !value.is_empty() => {
                Ok((service.to_string(), value.to_string()))
            }
            _ => Err(format!("{flag} {text:?}: expected SERVICE=VALUE")),
        }
    };
    let keys = args
        .key_files
        .iter()
        .map(|t| ("--key-file", t))
        .chain(args.key_envs.iter().map(|t| ("--key-env", t)));
    for (flag, text) in keys {
        let (service, value) = split(flag, text)?;
        let key = if flag == "--key-file" {
            BalancerKey::from_file(std::path::Path::new(&value))
        } else {
            BalancerKey::from_env(&value)
        }
        .map_err(|e| format!("{flag} {service}: {e}"))?;
        if signing.keys.insert(service.clone(), key).is_some() {
            return Err(format!("{flag}: a key for {service:?} is given twice"));
        }
    }
    signing.feed = match (&args.config_feed_hub, &args.config_feed_nats) {
        (Some(url), _) => Some(ConfigFeed::Hub { url: url.clone() }),
        (None, Some(url)) => Some(ConfigFeed::Nats { url: url.clone() }),
        (None, None) => None,
    };
    Ok(signing)
}

/// The process config and options from the command line; a message naming the problem when
/// something is wrong with them (exit code 2).
fn load(args: &Args) -> Result<(ProcessConfig, SpawnOptions), String> {
    let path = args.config.display();
    let text =
        std::fs::read_to_string(&args.config).map_err(|e| format!("cannot read {path}: {e}"))?;
    let config = ProcessConfig::from_toml_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let signing = config_signing(args)?;
    let marker_key = match (&args.marker_key_file, &args.marker_key_env) {
        (Some(path), _) => BalancerKey::from_file(path).map(|k| Some(k.key)),
        (None, Some(var)) => BalancerKey::from_env(var).map(|k| Some(k.key)),
        (None, None) => Ok(None),
    }
    .map_err(|e| format!("marker key: {e}"))?;
    let options = SpawnOptions {
        signing,
        marker_key,
        insecure_no_key: args.insecure_no_key,
        threads: args.threads,
        work_stealing: args.work_stealing,
        mirror_threads: args.mirror_threads,
        mirror_queue: args.mirror_queue,
        mirror_concurrency: args.mirror_concurrency,
        mirror_per_active: args.mirror_per_active,
        mirror_timeout: Duration::from_millis(args.mirror_timeout_ms),
        session_idle: Duration::from_millis(args.session_idle_ms),
        max_clock_skew: Duration::from_millis(args.max_clock_skew_ms),
        ..SpawnOptions::default()
    };
    Ok((config, options))
}

/// Until SIGINT or SIGTERM.
fn wait_for_a_signal() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start signal handling: {e}"))?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}

fn main() -> ExitCode {
    // Pingora logs an ERROR per job whose caller hung up; those are routine here.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_proxy=off,pingora_core=warn")
    });
    // Logs on stderr: stdout carries the addresses a script reads.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let args = Args::parse();
    let (config, options) = match load(&args) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return match understudy_proxy::check(&config, &options) {
            Ok(services) => {
                println!("valid: balancers of {}", services.join(", "));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", args.config.display());
                ExitCode::from(2)
            }
        };
    }
    let running = match spawn_with(config, options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    println!(
        "admin http://{}/ (metrics http://{}/metrics)",
        running.admin_addr(),
        running.admin_addr()
    );
    let mut services: Vec<_> = running.listen_addrs().iter().collect();
    services.sort();
    for (service, addr) in services {
        println!("balancer {service} listening on {addr}");
    }
    let waited = wait_for_a_signal();
    running.shutdown();
    match waited {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
