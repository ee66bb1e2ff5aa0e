//! `understudy-proxy --config FILE`: runs the balancers described in FILE (TOML, see
//! docs/balancer.md) until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use understudy_proxy::{spawn_with, ProcessConfig, SpawnOptions};

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
    /// Worker threads sending mirrored copies.
    #[arg(long, default_value_t = 1)]
    mirror_threads: usize,
    /// Copies waiting to be sent before new ones are dropped.
    #[arg(long, default_value_t = 4096)]
    mirror_queue: usize,
    /// Copies in flight at once.
    #[arg(long, default_value_t = 512)]
    mirror_concurrency: usize,
    /// Timeout of one copy, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    mirror_timeout_ms: u64,
    /// A session with no job for this long (ms) releases its machine.
    #[arg(long, default_value_t = 60_000)]
    session_idle_ms: u64,
}

fn main() -> ExitCode {
    // Pingora logs an ERROR per job whose caller hung up; those are routine here.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_proxy=off,pingora_core=warn")
    });
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let config = match ProcessConfig::from_toml_str(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let options = SpawnOptions {
        threads: args.threads,
        mirror_threads: args.mirror_threads,
        mirror_queue: args.mirror_queue,
        mirror_concurrency: args.mirror_concurrency,
        mirror_timeout: Duration::from_millis(args.mirror_timeout_ms),
        session_idle: Duration::from_millis(args.session_idle_ms),
        ..SpawnOptions::default()
    };
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

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start signal handling: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    running.shutdown();
    ExitCode::SUCCESS
}
