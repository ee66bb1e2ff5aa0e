//! Logging set-up shared by every subcommand.

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Pingora's proxy logs an ERROR for
/// every job a client cuts off, which is noise for a balancer, so it is kept at `off` unless asked for.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pingora_proxy=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
