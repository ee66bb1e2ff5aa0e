//! Logging set-up shared by every subcommand.

/// Logs to stderr, filtered by `RUST_LOG`, else by `default_filter`. Pingora's proxy logs an ERROR
/// for every job a client cuts off, which is noise for a balancer, so it stays off unless asked for.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// For long-running servers: what they do is the log.
pub const SERVER_FILTER: &str = "info,pingora_proxy=off";
/// For commands that print their own progress (scenarios, the demo, the CLI client).
pub const QUIET_FILTER: &str = "warn,pingora_proxy=off,pingora_core=warn";
