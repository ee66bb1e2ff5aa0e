//! Sending mirrored copies to simulation machines, away from the active path: a bounded queue
//! (a full queue drops the copy and counts it), a bounded number of copies in flight, all on a
//! runtime of its own, through one keep-alive HTTP client.

use std::hash::Hasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, Semaphore};

use crate::pool::Machine;
use crate::stats::{PairSlot, Stats};
use crate::wire::{JobObservation, Outcome};

/// Header set on every copy.
pub const SIMULATION_HEADER: &str = "x-understudy-simulation";

/// Limits of the mirror path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MirrorLimits {
    pub queue: usize,
    pub concurrency: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

/// One copy to send.
pub(crate) struct Copy {
    pub target: Arc<Machine>,
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub compare_body: bool,
    pub slot: Arc<PairSlot>,
    pub stats: Arc<Stats>,
}

/// The sending side, held by the data plane. Cloning is cheap.
#[derive(Clone)]
pub(crate) struct Mirror {
    queue: mpsc::Sender<Copy>,
}

impl Mirror {
    /// Starts the dispatcher on `runtime`.
    pub(crate) fn start(runtime: &tokio::runtime::Handle, limits: MirrorLimits) -> Self {
        let (queue, mut rx) = mpsc::channel::<Copy>(limits.queue.max(1));
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(limits.concurrency)
            .build(connector);
        let in_flight = Arc::new(Semaphore::new(limits.concurrency.max(1)));
        runtime.spawn(async move {
            while let Some(copy) = rx.recv().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let client = client.clone();
                tokio::spawn(async move {
                    send(&client, copy, limits.timeout).await;
                    drop(permit);
                });
            }
        });
        Mirror { queue }
    }

    /// Queues a copy without waiting; false when the queue is full (the caller counts the drop).
    pub(crate) fn try_send(&self, copy: Copy) -> bool {
        self.queue.try_send(copy).is_ok()
    }
}

/// Headers that describe one connection, not the job; the copy travels on its own connection.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::CONTENT_LENGTH,
];

async fn send(client: &Client<HttpConnector, Full<Bytes>>, copy: Copy, timeout: Duration) {
    let Copy {
        target,
        method,
        path_and_query,
        mut headers,
        body,
        compare_body,
        slot,
        stats,
    } = copy;
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.insert(SIMULATION_HEADER, HeaderValue::from_static("1"));
    let uri = format!("http://{}{}", target.address, path_and_query);
    let mut request = match Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(body))
    {
        Ok(r) => r,
        // The path came from a request pingora already parsed; it is a valid URI.
        Err(_) => return,
    };
    *request.headers_mut() = headers;

    let start = Instant::now();
    let answer = tokio::time::timeout(timeout, async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                Outcome::ConnectFailure
            } else {
                Outcome::ServerError
            }
        })?;
        let status = response.status().as_u16();
        let mut digest = compare_body.then(BodyDigest::new);
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            // A body cut short is a failed answer even though a status came.
            let frame = frame.map_err(|_| Outcome::ServerError)?;
            if let (Some(d), Some(data)) = (digest.as_mut(), frame.data_ref()) {
                d.update(data);
            }
        }
        Ok::<_, Outcome>((status, digest.map(BodyDigest::finish)))
    })
    .await;
    let latency_us = start.elapsed().as_micros() as u64;
    let (outcome, status, digest) = match answer {
        Ok(Ok((status, digest))) => (outcome_of_status(status), Some(status), digest),
        Ok(Err(outcome)) => (outcome, None, None),
        Err(_elapsed) => (Outcome::Timeout, None, None),
    };
    stats.record(&target.series, latency_us, outcome);
    slot.complete_simulation((
        JobObservation {
            machine: target.id.to_string(),
            version: target.version.to_string(),
            latency_us,
            outcome,
            status,
        },
        digest,
    ));
}

pub(crate) fn outcome_of_status(status: u16) -> Outcome {
    match status {
        400..=499 => Outcome::ClientError,
        500..=599 => Outcome::ServerError,
        _ => Outcome::Ok,
    }
}

/// Digest of an answer's body, fed chunk by chunk. SipHash with fixed keys: both answers are
/// digested in this process, so only equality matters.
pub(crate) struct BodyDigest(std::collections::hash_map::DefaultHasher);

impl BodyDigest {
    pub(crate) fn new() -> Self {
        BodyDigest(std::collections::hash_map::DefaultHasher::new())
    }
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.0.write(chunk);
    }
    pub(crate) fn finish(self) -> u64 {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_does_not_depend_on_chunking() {
        let mut whole = BodyDigest::new();
        whole.update(b"hello world, this is a body");
        let mut parts = BodyDigest::new();
        parts.update(b"hello wo");
        parts.update(b"rld, this is");
        parts.update(b" a body");
        assert_eq!(whole.finish(), parts.finish());
        let mut other = BodyDigest::new();
        other.update(b"hello world, this is a bodY");
        let mut again = BodyDigest::new();
        again.update(b"hello world, this is a body");
        assert_ne!(other.finish(), again.finish());
    }

    #[test]
    fn status_classes() {
        assert_eq!(outcome_of_status(200), Outcome::Ok);
        assert_eq!(outcome_of_status(302), Outcome::Ok);
        assert_eq!(outcome_of_status(404), Outcome::ClientError);
        assert_eq!(outcome_of_status(503), Outcome::ServerError);
    }
}
