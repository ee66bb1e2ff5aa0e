//! Sending mirrored copies to simulation machines, away from the active path, on a runtime of its
//! own, through one keep-alive HTTP client.
//!
//! Each simulation version of a service has its own *lane*: a bounded queue (a full queue drops
//! the copy and counts it) and a dispatcher that keeps no more copies in flight towards that
//! version than the service has active jobs in flight (times `per_active`). So a simulation
//! version sees the concurrency the active version sees: a slow one cannot pile up hundreds of
//! copies (inflating its own tail and costing the process CPU), and a fast one is never held back
//! by a slow one. All lanes together also stay under one global cap (`concurrency`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounter;
use tokio::sync::{mpsc, Notify, Semaphore};
use understudy_wire::{JobObservation, Outcome};

use crate::fields::{header_values, Comparison, Kept};
use crate::marker::{MarkerPolicy, SIMULATION_AUTH_HEADER, SIMULATION_HEADER};
use crate::stats::{PairSlot, SeriesHandle, Stats};

/// Limits of the mirror path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MirrorLimits {
    /// Copies waiting per lane (service, simulation version).
    pub queue: usize,
    /// Copies in flight at once, all lanes together.
    pub concurrency: usize,
    /// Copies in flight per lane for each active job in flight of the service (at least one
    /// copy may always be in flight); 0 = no per-lane cap.
    pub per_active: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

/// What a copy needs of the machine it goes to. The routing table's machines implement it
/// (`pool.rs`), so that the mirror does not depend on the table that holds its lanes.
pub(crate) trait CopyTarget: Send + Sync {
    fn id(&self) -> &str;
    fn version(&self) -> &str;
    fn address(&self) -> std::net::SocketAddr;
    /// Where the copy's latency and outcome are recorded.
    fn series(&self) -> &SeriesHandle;
}

/// One copy to send.
pub(crate) struct Copy {
    pub target: Arc<dyn CopyTarget>,
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// What is kept of the answer for its pair's comparison.
    pub compare: Comparison,
    pub slot: Arc<PairSlot>,
    pub stats: Arc<Stats>,
    /// When the copy was queued: its timeout runs from here, so a copy that waited in its
    /// queue for as long as the timeout is recorded as a timeout without being sent (a
    /// hanging simulation version keeps yielding timeout pairs at the rate jobs arrive).
    pub queued_at: Instant,
}

type CopyClient = Client<HttpConnector, Full<Bytes>>;

/// The copy path of a set of balancers: the runtime, the client and the global cap shared by
/// every lane. Cloning is cheap.
#[derive(Clone)]
pub(crate) struct Mirror {
    runtime: tokio::runtime::Handle,
    client: CopyClient,
    /// Issues each copy's marker token.
    marker: Arc<MarkerPolicy>,
    in_flight: Arc<Semaphore>,
    limits: MirrorLimits,
}

/// Jobs of a service in flight towards its active machines; lanes size their cap on it.
#[derive(Default)]
pub(crate) struct ActiveInFlight(AtomicUsize);

impl ActiveInFlight {
    /// Counts one job until the guard is dropped (the job ended, whichever way).
    pub(crate) fn enter(self: &Arc<Self>) -> ActiveJobGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        ActiveJobGuard(self.clone())
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

pub(crate) struct ActiveJobGuard(Arc<ActiveInFlight>);

impl Drop for ActiveJobGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sending side of one lane, held by the data plane.
pub(crate) struct Lane {
    queue: mpsc::Sender<Copy>,
}

impl Lane {
    /// Queues a copy without waiting; false when the queue is full (the caller counts the drop).
    pub(crate) fn try_send(&self, copy: Copy) -> bool {
        self.queue.try_send(copy).is_ok()
    }
}

/// What a lane's dispatcher and its copies share.
struct LaneState {
    active: Arc<ActiveInFlight>,
    in_flight: AtomicUsize,
    /// Signalled each time a copy of this lane ends.
    copy_done: Notify,
    /// Copies that had to wait for the per-lane cap.
    held: IntCounter,
}

impl Mirror {
    /// The copy path on `runtime` (nothing runs until a lane is opened).
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        limits: MirrorLimits,
        marker: Arc<MarkerPolicy>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let client: CopyClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(limits.concurrency)
            .build(connector);
        Mirror {
            runtime: runtime.clone(),
            client,
            marker,
            in_flight: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            limits,
        }
    }

    /// Opens a lane (one per service and simulation version) and starts its dispatcher.
    /// `held` counts copies that waited for the per-lane cap.
    pub(crate) fn open_lane(&self, active: Arc<ActiveInFlight>, held: IntCounter) -> Lane {
        let (queue, mut rx) = mpsc::channel::<Copy>(self.limits.queue.max(1));
        let state = Arc::new(LaneState {
            active,
            in_flight: AtomicUsize::new(0),
            copy_done: Notify::new(),
            held,
        });
        let Mirror {
            client,
            in_flight: global,
            limits,
            marker,
            ..
        } = self.clone();
        self.runtime.spawn(async move {
            while let Some(copy) = rx.recv().await {
                let deadline = tokio::time::Instant::from_std(copy.queued_at + limits.timeout);
                if !state.wait_for_room(limits.per_active, deadline).await {
                    expire(copy);
                    continue;
                }
                let permit =
                    match tokio::time::timeout_at(deadline, global.clone().acquire_owned()).await {
                        Ok(Ok(permit)) => permit,
                        // The semaphore is never closed; stop if it ever were.
                        Ok(Err(_closed)) => break,
                        Err(_elapsed) => {
                            expire(copy);
                            continue;
                        }
                    };
                state.in_flight.fetch_add(1, Ordering::Relaxed);
                let (client, state, marker) = (client.clone(), state.clone(), marker.clone());
                tokio::spawn(async move {
                    send(&client, &marker, copy, deadline).await;
                    drop(permit);
                    state.in_flight.fetch_sub(1, Ordering::Relaxed);
                    state.copy_done.notify_one();
                });
            }
        });
        Lane { queue }
    }
}

impl LaneState {
    /// Waits until this lane has fewer copies in flight than its cap; false when `deadline`
    /// passed first. No wake-up is missed: when the cap is reached at least one copy is in
    /// flight, and its end signals `copy_done` (a signal sent before the wait starts is kept by
    /// `Notify`).
    async fn wait_for_room(&self, per_active: usize, deadline: tokio::time::Instant) -> bool {
        if per_active == 0 {
            return true;
        }
        let mut counted = false;
        loop {
            let cap = self.active.get().max(1).saturating_mul(per_active);
            if self.in_flight.load(Ordering::Relaxed) < cap {
                return true;
            }
            if !counted {
                self.held.inc();
                counted = true;
            }
            if tokio::time::timeout_at(deadline, self.copy_done.notified())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

/// Sends one copy: the job's forwarded head (no hop-by-hop or framing headers: the client
/// writes its own framing) with the balancer's marker and its token.
async fn send(
    client: &CopyClient,
    marker: &MarkerPolicy,
    copy: Copy,
    deadline: tokio::time::Instant,
) {
    let Copy {
        target,
        method,
        path_and_query,
        mut headers,
        body,
        compare,
        slot,
        stats,
        queued_at: _,
    } = copy;
    headers.insert(SIMULATION_HEADER, HeaderValue::from_static("1"));
    if let Some(token) = marker.issue(stats.service(), slot.job()) {
        match HeaderValue::try_from(token) {
            Ok(value) => {
                headers.insert(SIMULATION_AUTH_HEADER, value);
            }
            Err(_) => return expire_now(&*target, &stats, &slot, Outcome::ServerError),
        }
    }
    let uri = format!("http://{}{}", target.address(), path_and_query);
    let mut request = match Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(body))
    {
        Ok(r) => r,
        // The path is in origin form, checked when the job was parsed; this cannot fail.
        Err(_) => return expire_now(&*target, &stats, &slot, Outcome::ServerError),
    };
    *request.headers_mut() = headers;

    let start = Instant::now();
    let answer = tokio::time::timeout_at(deadline, async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                Outcome::ConnectFailure
            } else {
                Outcome::ServerError
            }
        })?;
        let status = response.status().as_u16();
        let head = response.headers();
        let mut kept = compare.capture(&stats.capture_budget, |names| header_values(head, names));
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            // A body cut short is a failed answer even though a status came.
            let frame = frame.map_err(|_| Outcome::ServerError)?;
            if let Some(data) = frame.data_ref() {
                kept.update(data);
            }
        }
        Ok::<_, Outcome>((status, kept))
    })
    .await;
    let latency_us = start.elapsed().as_micros() as u64;
    let (outcome, status, kept) = match answer {
        Ok(Ok((status, kept))) => (outcome_of_status(status), Some(status), kept.finish()),
        Ok(Err(outcome)) => (outcome, None, Kept::Nothing),
        Err(_elapsed) => (Outcome::Timeout, None, Kept::Nothing),
    };
    record(&*target, &stats, &slot, latency_us, outcome, status, kept);
}

/// A copy that could not be built: its side of the pair completes as failed, so the pair is
/// not left waiting.
fn expire_now(target: &dyn CopyTarget, stats: &Stats, slot: &PairSlot, outcome: Outcome) {
    record(target, stats, slot, 0, outcome, None, Kept::Nothing);
}

/// A copy whose timeout ran out while it waited in its queue: a timeout, never sent.
fn expire(copy: Copy) {
    let latency_us = copy.queued_at.elapsed().as_micros() as u64;
    let Copy {
        target,
        slot,
        stats,
        ..
    } = copy;
    record(
        &*target,
        &stats,
        &slot,
        latency_us,
        Outcome::Timeout,
        None,
        Kept::Nothing,
    );
}

fn record(
    target: &dyn CopyTarget,
    stats: &Stats,
    slot: &PairSlot,
    latency_us: u64,
    outcome: Outcome,
    status: Option<u16>,
    kept: Kept,
) {
    stats.record(target.series(), latency_us, outcome);
    slot.complete_simulation((
        JobObservation {
            machine: target.id().to_string(),
            version: target.version().to_string(),
            latency_us,
            outcome,
            status,
        },
        kept,
    ));
}

pub(crate) fn outcome_of_status(status: u16) -> Outcome {
    match status {
        400..=499 => Outcome::ClientError,
        500..=599 => Outcome::ServerError,
        _ => Outcome::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(outcome_of_status(200), Outcome::Ok);
        assert_eq!(outcome_of_status(302), Outcome::Ok);
        assert_eq!(outcome_of_status(404), Outcome::ClientError);
        assert_eq!(outcome_of_status(503), Outcome::ServerError);
    }
}
