//! The job path, on pingora's server: each caller connection is one task (pingora's listener and
//! runtime hand it over) that reads a job, routes it, sends it to its machine over a pooled
//! keep-alive connection, relays the answer back, hands a copy to the mirror once the job's body
//! is complete, and records the job's latency and outcome. Messages are forwarded as bytes by
//! h1.rs.
//!
//! Why not pingora's `ProxyHttp` framework or its HTTP sessions: per job they build and clone
//! header maps on both sides, pass the body through two channels and watch each pooled
//! connection with a task of its own; measured, that cost twice nginx's CPU per job (see
//! ARCHITECTURE.md and docs/benchmarks.md). A balancer of request/answer jobs uses none of what
//! it buys (caching, HTTP/2 upstreams, upgrades).
//!
//! Latency, on both sides of a pair, is the machine's *service time as seen from the balancer*:
//! from the moment the balancer starts sending the job to the machine (connection checkout or
//! connect included) to the moment the last byte of the machine's answer arrives, minus any time
//! the balancer spent waiting for the caller's request body. The copy path (mirror.rs) measures
//! the same two points on its own client; its body is buffered before sending, so it never waits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use http::{HeaderMap, Method};
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::h1::{self, AnswerTo, BodyRelay, Framing, H1Error, Request};
use crate::mirror::{outcome_of_status, ActiveJobGuard, BodyDigest, Copy};
use crate::pool::Machine;
use crate::service::Service;
use crate::stats::PairSlot;
use crate::upstream::{ConnectError, Connection, Upstream};
use crate::wire::{JobObservation, Outcome};

/// Header naming a sustained session (a call, a stream).
pub const SESSION_HEADER: &str = "x-session-id";
/// Header marking a session's first (`start`) and last (`end`) job, as the load generator sends
/// it; after an `end` job the session's pins are released.
pub const SESSION_EVENT_HEADER: &str = "x-session-event";

/// How long a failed job waits for the rest of its body, to copy it anyway.
const LATE_BODY_WAIT: Duration = Duration::from_secs(1);

pub(crate) struct Balancer {
    pub service: Arc<Service>,
}

/// The copy being assembled while the job's body streams through.
struct CopyDraft {
    targets: Vec<Arc<Machine>>,
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    /// The routing table's `compare_body` when the job was routed: the answers are digested.
    compare_body: bool,
    body: BytesMut,
    over_limit: bool,
    /// The pair the copies and the active side report into, once the copies are queued.
    slot: Option<Arc<PairSlot>>,
    fired: bool,
}

/// Points of one attempt at the machine. Reset on every attempt (a job whose reused connection
/// failed is sent again on a new one).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UpstreamTiming {
    /// The connection is about to be checked out or established.
    begin: Option<Instant>,
    /// Connected, the request head is about to be written (jobs with a body only).
    header_sent: Option<Instant>,
    /// The whole request is in hand and written.
    request_complete: Option<Instant>,
    /// The last event of the machine's answer seen (its head, then each piece of its body).
    answer_last: Option<Instant>,
}

impl UpstreamTiming {
    fn started(now: Instant) -> Self {
        UpstreamTiming {
            begin: Some(now),
            ..UpstreamTiming::default()
        }
    }

    /// The machine's service time in microseconds. `answered`: the answer arrived complete
    /// (otherwise the attempt ended when the failure was seen, `failed_at`). None when the job
    /// never reached `upstream_peer`.
    fn service_us(&self, answered: bool, failed_at: Instant) -> Option<u64> {
        let begin = self.begin?;
        let end = match self.answer_last {
            Some(last) if answered => last,
            _ => failed_at,
        };
        // Waiting for a slow caller's body is the caller's time, not the machine's; the copy
        // carries its whole body from the start, so this keeps the two sides comparable.
        let waited_for_caller = match (self.header_sent, self.request_complete) {
            (Some(sent), Some(complete)) if complete <= end => {
                complete.saturating_duration_since(sent)
            }
            // The machine answered (or failed) before the body was complete: it did not wait
            // for the body, so nothing is taken off.
            _ => Duration::ZERO,
        };
        let total = end.saturating_duration_since(begin);
        Some(total.saturating_sub(waited_for_caller).as_micros() as u64)
    }
}

impl Balancer {
    fn fire(&self, draft: &mut CopyDraft, job: u64, session: &Option<String>) {
        if draft.fired {
            return;
        }
        draft.fired = true;
        let copies = draft.targets.len() as u64;
        if draft.over_limit {
            self.service.stats.mirror_dropped(copies);
            return;
        }
        let slot = Arc::new(PairSlot::new(
            job,
            session.clone(),
            draft.compare_body,
            self.service.stats.clone(),
        ));
        let body = std::mem::take(&mut draft.body).freeze();
        let queued_at = Instant::now();
        let mut dropped = 0;
        for target in &draft.targets {
            // Lanes are never closed: a job routed by a table just swapped out still holds its
            // version's lane.
            let Some(lane) = &target.lane else {
                dropped += 1;
                continue;
            };
            let queued = lane.try_send(Copy {
                target: target.clone(),
                method: draft.method.clone(),
                path_and_query: draft.path_and_query.clone(),
                headers: draft.headers.clone(),
                body: body.clone(),
                compare_body: draft.compare_body,
                slot: slot.clone(),
                stats: self.service.stats.clone(),
                queued_at,
            });
            if !queued {
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.service.stats.mirror_dropped(dropped);
        }
        if dropped < copies {
            draft.slot = Some(slot);
        }
    }
}

/// How long a caller's connection may sit idle between jobs, or stall inside one.
const CALLER_IDLE: Duration = Duration::from_secs(60);
/// Read buffer of a caller's connection (it grows for a larger head or body piece).
const READ_BUFFER: usize = 8 * 1024;

/// How one side of a job (the machine's connection or the caller's) failed.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error("nothing arrived for {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unusable message: {0}")]
    Protocol(#[from] H1Error),
    #[error("the connection closed before the message ended")]
    Truncated,
}

/// Why a job got no complete answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Connect(ConnectError),
    /// The machine failed the job.
    #[error("the machine failed the job: {0}")]
    Machine(Fault),
    /// The caller went away or sent a malformed body: the machine is not to blame, and no
    /// answer can be judged.
    #[error("the caller's side failed: {0}")]
    Caller(Fault),
}

impl Failure {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Failure::Connect(_) => Some(Outcome::ConnectFailure),
            Failure::Machine(Fault::Timeout(_)) => Some(Outcome::Timeout),
            Failure::Machine(_) => Some(Outcome::ServerError),
            Failure::Caller(_) => None,
        }
    }

    /// The status of the error page a caller gets when no answer was started.
    fn status(&self) -> u16 {
        match self {
            Failure::Machine(Fault::Timeout(_)) => 504,
            Failure::Connect(_) | Failure::Machine(_) => 502,
            Failure::Caller(Fault::Protocol(_)) => 400,
            Failure::Caller(_) => 408,
        }
    }
}

/// How one attempt at the machine ended when it did not deliver the answer.
enum AttemptError {
    /// The connection failed before any byte of an answer: on a reused connection, most likely
    /// closed by the machine while it idled, and the job may be sent again on a fresh one.
    BeforeAnswer(std::io::Error),
    Failed(Failure),
}

impl From<Failure> for AttemptError {
    fn from(failure: Failure) -> Self {
        AttemptError::Failed(failure)
    }
}

/// A delivered answer.
struct Delivered {
    /// The machine's connection can carry the next job.
    machine_reusable: bool,
    /// The caller's connection can carry the next job.
    caller_keep_alive: bool,
}

/// One job on its way through the balancer.
struct Job {
    number: u64,
    start: Instant,
    timing: UpstreamTiming,
    session: Option<String>,
    machine: Arc<Machine>,
    /// Status of the machine's answer (not of an error page the balancer wrote itself).
    status: Option<u16>,
    digest: Option<BodyDigest>,
    draft: Option<CopyDraft>,
    /// Something of the answer has been written to the caller (no error page is possible).
    answer_started: bool,
    /// Counts the job among the service's active jobs in flight until the job ends.
    _active: Option<ActiveJobGuard>,
}

/// A caller's connection: what was read and not yet used, and the bytes on their way to the
/// machine and to the caller (reused from job to job).
struct Caller {
    io: Stream,
    buf: BytesMut,
    to_machine: Vec<u8>,
    to_caller: Vec<u8>,
}

impl Caller {
    /// Reads until a whole request head is in the buffer; `None` when the caller closed (or
    /// idled out) between jobs. The head the machine gets is left in `to_machine`.
    async fn read_request(&mut self) -> Result<Option<Request>, Fault> {
        loop {
            if !self.buf.is_empty() {
                self.to_machine.clear();
                if let Some(request) = h1::parse_request(&self.buf, &mut self.to_machine)? {
                    return Ok(Some(request));
                }
            }
            match self.read_more().await {
                Ok(0) | Err(Fault::Timeout(_)) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(Fault::Truncated),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_more(&mut self) -> Result<usize, Fault> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BUFFER);
        }
        match tokio::time::timeout(CALLER_IDLE, self.io.read_buf(&mut self.buf)).await {
            Ok(read) => Ok(read?),
            Err(_) => Err(Fault::Timeout(CALLER_IDLE)),
        }
    }

    /// Sends what is gathered for the caller.
    async fn flush(&mut self) -> Result<(), Fault> {
        if !self.to_caller.is_empty() {
            self.io.write_all(&self.to_caller).await?;
            self.to_caller.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Writes an answer of the balancer's own and sends it; errors are moot (the caller left).
    async fn answer(&mut self, status: u16, content_type: Option<&str>, body: &[u8], keep: bool) {
        self.to_caller.clear();
        h1::own_answer(&mut self.to_caller, status, content_type, body, keep);
        let _ = self.flush().await;
    }
}

#[async_trait]
impl ServerApp for Balancer {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut caller = Caller {
            io,
            buf: BytesMut::with_capacity(READ_BUFFER),
            to_machine: Vec::with_capacity(READ_BUFFER),
            to_caller: Vec::with_capacity(READ_BUFFER),
        };
        loop {
            let request = match caller.read_request().await {
                Ok(Some(request)) => request,
                Ok(None) => return None,
                Err(fault) => {
                    if let Fault::Protocol(e) = &fault {
                        let status = match e {
                            H1Error::HeadTooLarge => 431,
                            H1Error::UnsupportedMethod(_) => 405,
                            H1Error::UnsupportedCoding(_) => 501,
                            _ => 400,
                        };
                        let body = error_body(&e.to_string());
                        caller
                            .answer(status, Some("application/json"), &body, false)
                            .await;
                    }
                    return None;
                }
            };
            let keep_alive = request.keep_alive && !*shutdown.borrow();
            if !self.serve(&mut caller, request, keep_alive).await {
                let _ = caller.io.shutdown().await;
                return None;
            }
        }
    }
}

fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&crate::wire::ErrorBody {
        error: message.to_owned(),
    })
    .unwrap_or_default()
}

impl Balancer {
    /// Routes one job, proxies it and records it. False when the caller's connection cannot
    /// carry another job.
    async fn serve(&self, caller: &mut Caller, mut request: Request, keep_alive: bool) -> bool {
        let start = Instant::now();
        let number = self.service.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let router = &self.service.router;
        let session = request.session.take();
        let mut job = if request.simulation {
            // Simulation traffic (a copy made upstream of us) must never reach an active machine.
            match router.route_simulation_only(session.as_deref(), request.session_end, start) {
                Some(machine) => Job::new(number, start, session, machine),
                None => {
                    self.service.refused_no_simulation.inc();
                    caller.buf.advance(request.head_len);
                    // The body is not read: the connection closes after the refusal.
                    let keep = keep_alive && request.framing == Framing::Empty;
                    let body = error_body(
                        "simulation job refused: no simulation machine in this balancer's pool",
                    );
                    caller
                        .answer(503, Some("application/json"), &body, keep)
                        .await;
                    return keep;
                }
            }
        } else {
            let (route, table) =
                router.route(number, session.as_deref(), request.session_end, start);
            let mut job = Job::new(number, start, session, route.machine);
            job._active = Some(self.service.active_in_flight.enter());
            if !route.mirror.is_empty() {
                match h1::copy_parts(&caller.buf[..request.head_len]) {
                    Ok(parts) => {
                        let compare_body = table.config.compare_body;
                        job.draft = Some(CopyDraft::new(route.mirror, parts, compare_body));
                    }
                    Err(_) => self.service.stats.mirror_dropped(route.mirror.len() as u64),
                }
            }
            job
        };
        caller.buf.advance(request.head_len);
        let result = self.proxy(caller, &request, keep_alive, &mut job).await;
        let keep = match &result {
            Ok(keep) => *keep,
            Err(failure) => {
                tracing::debug!(
                    service = %self.service.name,
                    job = job.number,
                    machine = %job.machine.id,
                    "{failure}"
                );
                if let Some(draft) = job.draft.as_mut().filter(|d| !d.fired) {
                    // The body never arrived whole: no copy can be made of it.
                    draft.fired = true;
                    self.service
                        .stats
                        .mirror_dropped(draft.targets.len() as u64);
                }
                if !job.answer_started {
                    let body = error_body(&failure.to_string());
                    caller
                        .answer(failure.status(), Some("application/json"), &body, false)
                        .await;
                }
                // The caller's connection is in an unknown state (a half-sent answer, an unread
                // body): it is not reused.
                false
            }
        };
        self.record(&mut job, result.err().as_ref());
        keep
    }

    /// Sends the job to its machine and relays the answer to the caller. Ok: whether the
    /// caller's connection can carry another job.
    async fn proxy(
        &self,
        caller: &mut Caller,
        request: &Request,
        keep_alive: bool,
        job: &mut Job,
    ) -> Result<bool, Failure> {
        let mut body = BodyRelay::new(request.framing);
        // A small body arrives with its head: take what is here into the bytes for the machine.
        self.take_body(caller, &mut body, job)
            .map_err(Failure::Caller)?;
        let whole_request_here = body.is_done();
        if !whole_request_here && request.expect_continue {
            // The machine never sees `Expect`: the balancer asks for the body itself, as nginx.
            caller
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .and(caller.io.flush().await)
                .map_err(|e| Failure::Caller(e.into()))?;
        }
        if whole_request_here {
            self.body_complete(job);
        }
        let upstream = job.machine.upstream.clone();
        // The job's arrival stands for the start of a body-less job's attempt: routing takes
        // microseconds, and each clock read is a measurable share of a job's cost at these rates.
        let begin = if request.framing == Framing::Empty {
            job.start
        } else {
            Instant::now()
        };
        job.timing = UpstreamTiming::started(begin);
        // A request that is not all here cannot be sent twice: its connection is checked first.
        let checkout = match upstream.checkout(begin, !whole_request_here).await {
            Ok(checkout) => checkout,
            Err(e) => {
                self.copy_after_connect_failure(caller, &mut body, job)
                    .await;
                return Err(Failure::Connect(e));
            }
        };
        let mut connection = checkout.connection;
        let error = match self
            .attempt(caller, request, keep_alive, job, &mut connection, &mut body)
            .await
        {
            Ok(delivered) => return Ok(self.settle(&upstream, connection, delivered, job)),
            Err(AttemptError::BeforeAnswer(e)) if checkout.reused && whole_request_here => e,
            Err(AttemptError::BeforeAnswer(e)) => return Err(Failure::Machine(e.into())),
            Err(AttemptError::Failed(failure)) => return Err(failure),
        };
        tracing::debug!(
            machine = %upstream.address(),
            "a reused connection failed ({error}); sending the job again on a new one"
        );
        job.timing = UpstreamTiming::started(Instant::now());
        let mut fresh = upstream.connect().await.map_err(Failure::Connect)?;
        match self
            .attempt(caller, request, keep_alive, job, &mut fresh, &mut body)
            .await
        {
            Ok(delivered) => Ok(self.settle(&upstream, fresh, delivered, job)),
            Err(AttemptError::BeforeAnswer(e)) => Err(Failure::Machine(e.into())),
            Err(AttemptError::Failed(failure)) => Err(failure),
        }
    }

    /// Gives the machine's connection back when it can carry another job.
    fn settle(
        &self,
        upstream: &Upstream,
        connection: Connection,
        delivered: Delivered,
        job: &Job,
    ) -> bool {
        // Bytes after the answer's end would be a broken machine: such a connection is closed.
        if delivered.machine_reusable && connection.buf.is_empty() {
            upstream.release(connection, job.timing.answer_last.unwrap_or(job.start));
        }
        delivered.caller_keep_alive
    }

    /// Moves what the caller's buffer holds of the body into the bytes for the machine.
    fn take_body(
        &self,
        caller: &mut Caller,
        body: &mut BodyRelay,
        job: &mut Job,
    ) -> Result<(), Fault> {
        let Caller {
            buf, to_machine, ..
        } = caller;
        match job.draft.as_mut().filter(|d| !d.fired) {
            Some(draft) => {
                let limit = self.service.limits.mirror_body_limit;
                body.relay(buf, to_machine, |data| draft.append(data, limit))?
            }
            None => body.relay(buf, to_machine, |_| {})?,
        }
        Ok(())
    }

    /// One exchange with the machine: the request (its head and body so far are in
    /// `to_machine`; the rest is read from the caller and sent on), then the answer, relayed to
    /// the caller.
    async fn attempt(
        &self,
        caller: &mut Caller,
        request: &Request,
        keep_alive: bool,
        job: &mut Job,
        machine: &mut Connection,
        body: &mut BodyRelay,
    ) -> Result<Delivered, AttemptError> {
        let has_body = request.framing != Framing::Empty;
        if has_body {
            // Only a job with a body can keep the machine waiting for its caller.
            job.timing.header_sent = Some(Instant::now());
        }
        machine
            .tcp
            .write_all(&caller.to_machine)
            .await
            .map_err(AttemptError::BeforeAnswer)?;
        while !body.is_done() {
            caller.to_machine.clear();
            match caller.read_more().await {
                Ok(0) => return Err(Failure::Caller(Fault::Truncated).into()),
                Ok(_) => {}
                Err(fault) => return Err(Failure::Caller(fault).into()),
            }
            self.take_body(caller, body, job).map_err(Failure::Caller)?;
            machine
                .tcp
                .write_all(&caller.to_machine)
                .await
                .map_err(|e| Failure::Machine(e.into()))?;
        }
        if has_body {
            if job.timing.request_complete.is_none() {
                job.timing.request_complete = Some(Instant::now());
            }
            self.body_complete(job);
        }

        let limits = &self.service.limits;
        let timeout = limits.upstream_timeout;
        let machine_failed = |fault: Fault| AttemptError::Failed(Failure::Machine(fault));
        caller.to_caller.clear();
        let answer = loop {
            if !machine.buf.is_empty() {
                let to = AnswerTo {
                    head: request.method == Method::HEAD,
                    keep_alive,
                    http10: request.http10,
                };
                let parsed = h1::parse_answer(&machine.buf, to, &mut caller.to_caller)
                    .map_err(|e| machine_failed(e.into()))?;
                match parsed {
                    // Interim answers (103 Early Hints, a stray 100) are not passed on.
                    Some(interim) if interim.status < 200 => machine.buf.advance(interim.head_len),
                    Some(answer) => break answer,
                    None => {}
                }
            }
            let nothing_yet = machine.buf.is_empty();
            match read_machine(machine, timeout).await {
                Ok(0) if nothing_yet => {
                    return Err(AttemptError::BeforeAnswer(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(0) => return Err(machine_failed(Fault::Truncated)),
                Ok(_) => {}
                Err(Fault::Io(e)) if nothing_yet => return Err(AttemptError::BeforeAnswer(e)),
                Err(fault) => return Err(machine_failed(fault)),
            }
        };
        machine.buf.advance(answer.head_len);
        job.status = Some(answer.status);
        if job
            .draft
            .as_ref()
            .is_some_and(|d| d.compare_body && (d.slot.is_some() || !d.fired))
        {
            job.digest = Some(BodyDigest::new());
        }
        // The answer's last event: its last body bytes' arrival (its head's, without a body).
        let mut answer_last = None;
        let mut relay = BodyRelay::new(answer.framing);
        loop {
            {
                let digest = &mut job.digest;
                relay
                    .relay(&mut machine.buf, &mut caller.to_caller, |data| {
                        if let Some(digest) = digest.as_mut() {
                            digest.update(data);
                        }
                    })
                    .map_err(|e| machine_failed(e.into()))?;
            }
            if relay.is_done() {
                break;
            }
            if !caller.to_caller.is_empty() {
                // Pass on what is here before waiting for more (a slow or streaming answer).
                job.answer_started = true;
                caller
                    .flush()
                    .await
                    .map_err(|fault| AttemptError::Failed(Failure::Caller(fault)))?;
            }
            match read_machine(machine, timeout).await {
                Ok(0) if relay.end_of_input() => break,
                Ok(0) => return Err(machine_failed(Fault::Truncated)),
                Ok(_) => answer_last = Some(Instant::now()),
                Err(fault) => return Err(machine_failed(fault)),
            }
        }
        job.timing.answer_last = answer_last.or_else(|| Some(Instant::now()));
        job.answer_started = true;
        let caller_keep_alive = match caller.flush().await {
            Ok(()) => answer.caller_keep_alive,
            // The machine did its job; the caller left before taking the answer.
            Err(_) => false,
        };
        Ok(Delivered {
            machine_reusable: answer.reusable,
            caller_keep_alive,
        })
    }

    /// The job's body is complete: its copy leaves.
    fn body_complete(&self, job: &mut Job) {
        if let Some(draft) = job.draft.as_mut() {
            self.fire(draft, job.number, &job.session);
        }
    }

    /// No connection to the machine: the copy still leaves, so that v2 is also measured on the
    /// jobs v1 failed, if the rest of the body can be had in time.
    async fn copy_after_connect_failure(
        &self,
        caller: &mut Caller,
        body: &mut BodyRelay,
        job: &mut Job,
    ) {
        if job.draft.as_ref().is_none_or(|d| d.fired) {
            return;
        }
        let _ = tokio::time::timeout(LATE_BODY_WAIT, async {
            while !body.is_done() {
                caller.to_machine.clear();
                if !matches!(caller.read_more().await, Ok(n) if n > 0) {
                    return;
                }
                if self.take_body(caller, body, job).is_err() {
                    return;
                }
            }
        })
        .await;
        if body.is_done() {
            self.body_complete(job);
        }
    }

    /// Records the job's latency and outcome, and the active side of its pair.
    fn record(&self, job: &mut Job, failure: Option<&Failure>) {
        let now = match (failure, job.timing.answer_last) {
            (None, Some(answered)) => answered,
            _ => Instant::now(),
        };
        let latency_us = job
            .timing
            .service_us(failure.is_none(), now)
            .unwrap_or_else(|| now.duration_since(job.start).as_micros() as u64);
        let outcome = match (job.status, failure) {
            (Some(status), None) => Some(outcome_of_status(status)),
            (_, Some(failure)) => failure.outcome(),
            (None, None) => None,
        };
        let Some(outcome) = outcome else {
            return;
        };
        let machine = &job.machine;
        self.service
            .stats
            .record(&machine.series, latency_us, outcome);
        if let Some(slot) = job.draft.as_ref().and_then(|d| d.slot.as_ref()) {
            slot.complete_active((
                JobObservation {
                    machine: machine.id.to_string(),
                    version: machine.version.to_string(),
                    latency_us,
                    outcome,
                    status: job.status,
                },
                job.digest.take().map(BodyDigest::finish),
            ));
        }
    }
}

/// Reads more of the machine's answer, within the upstream timeout.
async fn read_machine(machine: &mut Connection, timeout: Duration) -> Result<usize, Fault> {
    if machine.buf.capacity() - machine.buf.len() < 1024 {
        machine.buf.reserve(READ_BUFFER);
    }
    match tokio::time::timeout(timeout, machine.tcp.read_buf(&mut machine.buf)).await {
        Ok(read) => Ok(read?),
        Err(_) => Err(Fault::Timeout(timeout)),
    }
}

impl Job {
    fn new(number: u64, start: Instant, session: Option<String>, machine: Arc<Machine>) -> Self {
        Job {
            number,
            start,
            timing: UpstreamTiming::default(),
            session,
            machine,
            status: None,
            digest: None,
            draft: None,
            answer_started: false,
            _active: None,
        }
    }
}

impl CopyDraft {
    fn new(
        targets: Vec<Arc<Machine>>,
        (method, path_and_query, headers): (Method, String, HeaderMap),
        compare_body: bool,
    ) -> Self {
        CopyDraft {
            targets,
            method,
            path_and_query,
            headers,
            compare_body,
            body: BytesMut::new(),
            over_limit: false,
            slot: None,
            fired: false,
        }
    }

    /// Tees a piece of the job's body into the copy (dropped whole past `limit`).
    fn append(&mut self, data: &[u8], limit: usize) {
        if self.over_limit {
            return;
        }
        if self.body.len() + data.len() > limit {
            self.over_limit = true;
            self.body = BytesMut::new();
        } else {
            self.body.extend_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing(
        t0: Instant,
        header: u32,
        complete: Option<u32>,
        answer: Option<u32>,
    ) -> UpstreamTiming {
        UpstreamTiming {
            begin: Some(t0),
            header_sent: Some(t0 + MS * header),
            request_complete: complete.map(|c| t0 + MS * c),
            answer_last: answer.map(|a| t0 + MS * a),
        }
    }

    #[test]
    fn service_time_runs_from_checkout_to_the_last_answer_byte() {
        let t0 = Instant::now();
        let connect_and_answer = timing(t0, 2, Some(2), Some(22));
        // The failure time is ignored when the answer arrived complete.
        assert_eq!(
            connect_and_answer.service_us(true, t0 + MS * 500),
            Some(22_000)
        );
    }

    #[test]
    fn waiting_for_the_callers_body_is_not_the_machines_time() {
        let t0 = Instant::now();
        let slow_body = timing(t0, 1, Some(301), Some(321));
        assert_eq!(slow_body.service_us(true, t0 + MS * 400), Some(21_000));
    }

    #[test]
    fn a_failed_attempt_ends_when_the_failure_is_seen() {
        let t0 = Instant::now();
        // Connect failed: nothing after `begin`.
        let refused = UpstreamTiming::started(t0);
        assert_eq!(refused.service_us(false, t0 + MS * 3), Some(3_000));
        // An answer broken off: the failure, not the last chunk, ends it.
        let broken = timing(t0, 1, Some(1), Some(10));
        assert_eq!(broken.service_us(false, t0 + MS * 15), Some(15_000));
    }

    #[test]
    fn an_early_answer_before_the_body_ended_is_not_shortened() {
        let t0 = Instant::now();
        let early = timing(t0, 1, None, Some(5));
        assert_eq!(early.service_us(true, t0 + MS * 9), Some(5_000));
        // The rest of the body arriving after the answer takes nothing off either.
        let late_body = timing(t0, 1, Some(8), Some(5));
        assert_eq!(late_body.service_us(true, t0 + MS * 9), Some(5_000));
    }

    #[test]
    fn no_attempt_no_service_time() {
        assert_eq!(
            UpstreamTiming::default().service_us(true, Instant::now()),
            None
        );
    }
}
