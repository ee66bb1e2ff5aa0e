//! How one side of a job (the machine's connection or the caller's) failed.

use std::time::Duration;

use crate::h1::H1Error;
use crate::metrics::Limit;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Fault {
    /// A deadline of `[limits]` passed.
    #[error("{} passed ({after:?})", limit.as_str())]
    Timeout { after: Duration, limit: Limit },
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unusable message: {0}")]
    Protocol(#[from] H1Error),
    #[error("the connection closed before the message ended")]
    Truncated,
}

impl Fault {
    pub(crate) fn timeout(after: Duration, limit: Limit) -> Fault {
        Fault::Timeout { after, limit }
    }

    /// The limit this fault hit, if it is a deadline.
    pub(crate) fn limit(&self) -> Option<Limit> {
        match self {
            Fault::Timeout { limit, .. } => Some(*limit),
            _ => None,
        }
    }
}

/// Runs `io` within `after`, a deadline of `limit`.
pub(crate) async fn within<T>(
    after: Duration,
    limit: Limit,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Fault> {
    match tokio::time::timeout(after, io).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Fault::timeout(after, limit)),
    }
}
