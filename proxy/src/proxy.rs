//! The job path, on pingora's server: each caller connection is one task (pingora's listener and
//! runtime hand it over) that reads a job, admits it (the simulation marker, the session caps),
//! routes it, sends it to its machine over a pooled keep-alive connection, relays the answer
//! back, hands a copy to the mirror once the job's body is complete, and records the job's
//! latency and outcome. Messages are written by h1.rs from what it parsed.
//!
//! Why not pingora's `ProxyHttp` framework or its HTTP sessions: per job they build and clone
//! header maps on both sides, pass the body through two channels and watch each pooled
//! connection with a task of its own; measured, that cost twice nginx's CPU per job (see
//! ARCHITECTURE.md and docs/benchmarks.md). A balancer of request/answer jobs uses none of what
//! it buys (caching, HTTP/2 upstreams, upgrades).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Buf;
use http::Method;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use understudy_wire::{JobObservation, Outcome, PoolRole};

use crate::caller::Caller;
use crate::draft::CopyDraft;
use crate::fault::{within, Fault};
use crate::fields::{head_values, Capture, Kept};
use crate::h1::{self, AnswerTo, BodyRelay, Framing, Output, Request};
use crate::marker::{Verdict, SIMULATION_AUTH_HEADER, SIMULATION_HEADER};
use crate::metrics::Limit;
use crate::mirror::{outcome_of_status, ActiveJobGuard};
use crate::pool::Machine;
use crate::service::Service;
use crate::timing::UpstreamTiming;
use crate::upstream::{Checkout, ConnectError, Connection, Upstream};

/// Header naming a sustained session (a call, a stream).
pub const SESSION_HEADER: &str = "x-session-id";
/// Header marking a session's first (`start`) and last (`end`) job, as the load generator sends
/// it; after an `end` job the session's pins are released (kept a moment for jobs the end
/// overtook, see `pool::ENDED_PIN_GRACE`).
pub const SESSION_EVENT_HEADER: &str = "x-session-event";

/// How long a failed job waits for the rest of its body, to copy it anyway.
const LATE_BODY_WAIT: Duration = Duration::from_secs(1);
/// Read buffer growth of a machine connection.
const READ_BUFFER: usize = 8 * 1024;

pub(crate) struct Balancer {
    pub service: Arc<Service>,
    /// The listener is for cluster machines only (see `marker.rs`).
    pub internal: bool,
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
            Failure::Machine(Fault::Timeout { .. }) => Some(Outcome::Timeout),
            Failure::Machine(_) => Some(Outcome::ServerError),
            Failure::Caller(_) => None,
        }
    }

    /// The status of the error page a caller gets when no answer was started.
    fn status(&self) -> u16 {
        match self {
            Failure::Machine(Fault::Timeout { .. }) => 504,
            Failure::Connect(_) | Failure::Machine(_) => 502,
            Failure::Caller(Fault::Protocol(e)) => e.status(),
            Failure::Caller(_) => 408,
        }
    }

    /// The limit of `[limits]` this failure reached, if any.
    fn limit(&self) -> Option<Limit> {
        match self {
            Failure::Connect(ConnectError::TimedOut { .. }) => Some(Limit::MachineConnect),
            Failure::Connect(_) => None,
            Failure::Machine(fault) | Failure::Caller(fault) => fault.limit(),
        }
    }
}

/// How one attempt at the machine ended when it did not deliver the answer.
enum AttemptError {
    /// The connection failed before any byte of an answer: on a reused connection, most likely
    /// closed by the machine while it idled, and an idempotent job may be sent again on a fresh
    /// one.
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
    /// What is kept of the answer for its pair's comparison.
    capture: Option<Capture>,
    draft: Option<CopyDraft>,
    /// Something of the answer has been written to the caller (no error page is possible).
    answer_started: bool,
    /// Counts the job among the service's active jobs in flight until the job ends.
    _active: Option<ActiveJobGuard>,
}

#[async_trait]
impl ServerApp for Balancer {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut caller = Caller::new(io, self.service.limits.limits, self.internal);
        loop {
            let request = match caller.read_request().await {
                Ok(Some(request)) => request,
                Ok(None) => return None,
                Err(fault) => {
                    self.refuse_head(&mut caller, fault).await;
                    return None;
                }
            };
            let keep_alive = request.keep_alive && !*shutdown.borrow();
            if !self.serve(&mut caller, request, keep_alive).await {
                caller.shutdown().await;
                return None;
            }
        }
    }
}

fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&understudy_wire::ErrorBody {
        error: message.to_owned(),
    })
    .unwrap_or_default()
}

/// What admission decided for a job that passed it.
enum Admitted {
    Plain,
    /// A verified simulation job, with the token to pass on (none in insecure mode).
    Simulation(Option<String>),
}

impl Balancer {
    /// A head that could not be read: a refusal naming the problem, then the connection closes.
    async fn refuse_head(&self, caller: &mut Caller, fault: Fault) {
        if let Some(limit) = fault.limit() {
            self.service.hits.hit(limit);
        }
        let status = match &fault {
            Fault::Protocol(e) => e.status(),
            Fault::Timeout {
                limit: Limit::HeadTimeout,
                ..
            } => 408,
            _ => return,
        };
        let body = error_body(&fault.to_string());
        caller
            .answer(status, Some("application/json"), &body, false)
            .await;
    }

    /// Refuses a job before it reaches any machine. The caller's connection is kept only when
    /// the job had no body (its body is not read).
    async fn refuse(
        &self,
        caller: &mut Caller,
        request: &Request,
        status: u16,
        message: &str,
        keep_alive: bool,
    ) -> bool {
        caller.buf.advance(request.head_len);
        let keep = keep_alive && request.framing == Framing::Empty;
        let body = error_body(message);
        caller
            .answer(status, Some("application/json"), &body, keep)
            .await;
        keep
    }

    /// Checks the simulation marker and the session id, and ends the head the machine gets;
    /// `Err` is a refusal already sent (whether the caller's connection stays).
    async fn admit(
        &self,
        caller: &mut Caller,
        request: &Request,
        keep_alive: bool,
    ) -> Result<Admitted, bool> {
        let service = &self.service;
        let internal = request.marker.is_some() && caller.is_internal(&service.marker);
        let admitted = match service.marker.judge(request.marker.as_ref(), internal) {
            Verdict::Plain { stripped } => {
                if stripped {
                    service.marker_stripped.inc();
                }
                Admitted::Plain
            }
            Verdict::Simulation { token } => Admitted::Simulation(token),
            Verdict::Refuse(rejection) => {
                service
                    .metrics
                    .refused(&service.name, rejection.reason())
                    .inc();
                let message = format!("simulation job refused: {rejection}");
                return Err(self
                    .refuse(caller, request, 403, &message, keep_alive)
                    .await);
            }
        };
        let max = service.limits.limits.max_session_id_bytes;
        if request.session.as_ref().is_some_and(|s| s.len() > max) {
            service.hits.hit(Limit::SessionIdLength);
            let message = format!("x-session-id longer than {max} bytes");
            return Err(self
                .refuse(caller, request, 431, &message, keep_alive)
                .await);
        }
        match &admitted {
            Admitted::Plain => h1::end_request_head(&mut caller.to_machine, request, &[]),
            Admitted::Simulation(token) => {
                let mut extra = vec![(SIMULATION_HEADER, b"1".as_slice())];
                if let Some(token) = token {
                    extra.push((SIMULATION_AUTH_HEADER, token.as_bytes()));
                }
                h1::end_request_head(&mut caller.to_machine, request, &extra);
            }
        }
        Ok(admitted)
    }

    /// Admits, routes, proxies and records one job. False when the caller's connection cannot
    /// carry another job.
    async fn serve(&self, caller: &mut Caller, mut request: Request, keep_alive: bool) -> bool {
        let start = Instant::now();
        let number = self.service.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let admitted = match self.admit(caller, &request, keep_alive).await {
            Ok(admitted) => admitted,
            Err(keep) => return keep,
        };
        let session = request.session.take();
        let job = match admitted {
            Admitted::Simulation(_) => self.route_simulation(number, start, session, &request),
            Admitted::Plain => self.route(caller, number, start, session, &request),
        };
        let mut job = match job {
            Ok(job) => job,
            Err((status, message)) => {
                return self
                    .refuse(caller, &request, status, &message, keep_alive)
                    .await
            }
        };
        caller.buf.advance(request.head_len);
        let result = self.proxy(caller, &request, keep_alive, &mut job).await;
        let keep = match &result {
            Ok(keep) => *keep,
            Err(failure) => self.failed(caller, &mut job, failure).await,
        };
        self.record(&mut job, result.err().as_ref());
        keep
    }

    /// A job that carries a verified simulation marker: to a simulation machine only, never an
    /// active one (a copy made upstream of this balancer).
    fn route_simulation(
        &self,
        number: u64,
        start: Instant,
        session: Option<String>,
        request: &Request,
    ) -> Result<Job, (u16, String)> {
        let router = &self.service.router;
        match router.route_simulation_only(session.as_deref(), request.session_end, start) {
            Ok(Some(machine)) => Ok(Job::new(number, start, session, machine)),
            Ok(None) => {
                self.service.refused_no_simulation.inc();
                Err((
                    503,
                    "simulation job refused: no simulation machine in this balancer's pool".into(),
                ))
            }
            Err(full) => {
                self.service.hits.hit(Limit::Sessions);
                Err((503, full.to_string()))
            }
        }
    }

    /// A caller's job: to an active machine, with a copy drafted for each simulation version
    /// when the job is mirrored.
    fn route(
        &self,
        caller: &Caller,
        number: u64,
        start: Instant,
        session: Option<String>,
        request: &Request,
    ) -> Result<Job, (u16, String)> {
        let router = &self.service.router;
        let (route, table) =
            match router.route(number, session.as_deref(), request.session_end, start) {
                Ok(routed) => routed,
                Err(full) => {
                    self.service.hits.hit(Limit::Sessions);
                    return Err((503, full.to_string()));
                }
            };
        let mut job = Job::new(number, start, session, route.machine);
        job._active = Some(self.service.active_in_flight.enter());
        if !route.mirror.is_empty() {
            // Copies are made of the head as the machine gets it: no hop-by-hop headers, no
            // caller's marker. `OPTIONS *` has no path to copy to.
            match h1::copy_parts(&caller.to_machine) {
                Ok(parts) if !request.asterisk => {
                    let compare = table.config.compare.clone();
                    job.draft = Some(CopyDraft::new(route.mirror, parts, compare));
                }
                _ => self.service.stats.mirror_dropped(route.mirror.len() as u64),
            }
        }
        Ok(job)
    }

    /// A job that got no answer: its copy abandoned if the body never completed, an error page
    /// if nothing was answered yet. The caller's connection is never reused after (a half-sent
    /// answer, an unread body).
    async fn failed(&self, caller: &mut Caller, job: &mut Job, failure: &Failure) -> bool {
        tracing::debug!(
            service = %self.service.name,
            job = job.number,
            machine = %job.machine.id,
            "{failure}"
        );
        if let Some(limit) = failure.limit() {
            self.service.hits.hit(limit);
        }
        if let Some(draft) = job.draft.as_mut() {
            draft.abandon(&self.service.stats);
        }
        if !job.answer_started {
            let body = error_body(&failure.to_string());
            caller
                .answer(failure.status(), Some("application/json"), &body, false)
                .await;
        }
        false
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
        let mut body = BodyRelay::new(request.framing, Output::Framed);
        // A small body arrives with its head: take what is here into the bytes for the machine.
        self.take_body(caller, &mut body, job)
            .map_err(Failure::Caller)?;
        let whole_request_here = body.is_done();
        if !whole_request_here && request.expect_continue {
            // The machine never sees `Expect`: the balancer asks for the body itself, as nginx.
            caller
                .send_now(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(Failure::Caller)?;
        }
        if whole_request_here {
            self.body_complete(job);
        }
        // The job's arrival stands for the start of a body-less job's attempt: routing takes
        // microseconds, and each clock read is a measurable share of a job's cost at these rates.
        let begin = if request.framing == Framing::Empty {
            job.start
        } else {
            Instant::now()
        };
        job.timing = UpstreamTiming::started(begin);
        let checkout = match self.checkout(job, begin).await {
            Ok(checkout) => checkout,
            Err(e) => {
                self.copy_after_connect_failure(caller, &mut body, job)
                    .await;
                return Err(Failure::Connect(e));
            }
        };
        let upstream = job.machine.upstream.clone();
        let mut connection = checkout.connection;
        // Sent again only if nothing can have happened twice: the machine took nothing of it
        // (no answer byte), the request is whole here, and its method is idempotent.
        let may_retry = checkout.reused && whole_request_here && request.method.is_idempotent();
        let error = match self
            .attempt(caller, request, keep_alive, job, &mut connection, &mut body)
            .await
        {
            Ok(delivered) => return Ok(self.settle(&upstream, connection, delivered, job)),
            Err(AttemptError::BeforeAnswer(e)) if may_retry => e,
            Err(AttemptError::BeforeAnswer(e)) => return Err(Failure::Machine(e.into())),
            Err(AttemptError::Failed(failure)) => return Err(failure),
        };
        tracing::debug!(
            machine = %upstream.address(),
            "a reused connection failed ({error}); sending the job again on a new one"
        );
        job.timing = UpstreamTiming::started(Instant::now());
        let mut fresh = match upstream.connect().await {
            Ok(fresh) => fresh,
            Err(e) => {
                self.unreachable(&job.machine, &e);
                return Err(Failure::Connect(e));
            }
        };
        match self
            .attempt(caller, request, keep_alive, job, &mut fresh, &mut body)
            .await
        {
            Ok(delivered) => Ok(self.settle(&upstream, fresh, delivered, job)),
            Err(AttemptError::BeforeAnswer(e)) => Err(Failure::Machine(e.into())),
            Err(AttemptError::Failed(failure)) => Err(failure),
        }
    }

    /// A connection to the job's machine. When none can be had, the machine got no byte of the
    /// job, so an active job goes (whatever its method) to another active machine that answers,
    /// once; the job then counts as that machine's.
    async fn checkout(&self, job: &mut Job, begin: Instant) -> Result<Checkout, ConnectError> {
        let failed = match job.machine.upstream.checkout(begin).await {
            Ok(checkout) => return Ok(checkout),
            Err(e) => e,
        };
        self.unreachable(&job.machine, &failed);
        if job.machine.role != PoolRole::Active {
            return Err(failed);
        }
        let table = self.service.router.table();
        let Some(other) = table.active.other_than(&job.machine).cloned() else {
            return Err(failed);
        };
        tracing::debug!(
            service = %self.service.name,
            job = job.number,
            "{failed}; sending the job to {} instead",
            other.id
        );
        match other.upstream.checkout(Instant::now()).await {
            Ok(checkout) => {
                job.machine = other;
                Ok(checkout)
            }
            Err(e) => {
                self.unreachable(&other, &e);
                Err(failed)
            }
        }
    }

    /// A job's connection to `machine` failed: a failed probe, as far as its health goes.
    fn unreachable(&self, machine: &Machine, error: &ConnectError) {
        if let Some(change) = machine.upstream.health.failed(error.to_string()) {
            change.log(&self.service.name, &machine.id, machine.address);
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

    /// Writes bytes to the machine within `machine_write`.
    async fn to_machine(&self, machine: &mut Connection, bytes: &[u8]) -> Result<(), Fault> {
        let write = self.service.limits.limits.machine_write;
        within(write, Limit::MachineWrite, machine.tcp.write_all(bytes)).await
    }

    /// The request: its head and body so far are in `to_machine`; the rest is read from the
    /// caller and sent on.
    async fn send_request(
        &self,
        caller: &mut Caller,
        request: &Request,
        job: &mut Job,
        machine: &mut Connection,
        body: &mut BodyRelay,
    ) -> Result<(), AttemptError> {
        let has_body = request.framing != Framing::Empty;
        if has_body {
            // Only a job with a body can keep the machine waiting for its caller.
            job.timing.header_sent = Some(Instant::now());
        }
        match self.to_machine(machine, &caller.to_machine).await {
            Ok(()) => {}
            Err(Fault::Io(e)) => return Err(AttemptError::BeforeAnswer(e)),
            Err(fault) => return Err(Failure::Machine(fault).into()),
        }
        while !body.is_done() {
            caller.to_machine.clear();
            match caller.read_body().await {
                Ok(0) => return Err(Failure::Caller(Fault::Truncated).into()),
                Ok(_) => {}
                Err(fault) => return Err(Failure::Caller(fault).into()),
            }
            self.take_body(caller, body, job).map_err(Failure::Caller)?;
            self.to_machine(machine, &caller.to_machine)
                .await
                .map_err(Failure::Machine)?;
        }
        if has_body {
            if job.timing.request_complete.is_none() {
                job.timing.request_complete = Some(Instant::now());
            }
            self.body_complete(job);
        }
        Ok(())
    }

    /// One exchange with the machine: the request, then the answer, relayed to the caller.
    async fn attempt(
        &self,
        caller: &mut Caller,
        request: &Request,
        keep_alive: bool,
        job: &mut Job,
        machine: &mut Connection,
        body: &mut BodyRelay,
    ) -> Result<Delivered, AttemptError> {
        self.send_request(caller, request, job, machine, body)
            .await?;
        let timeout = self.service.limits.limits.machine_answer;
        let machine_failed = |fault: Fault| AttemptError::Failed(Failure::Machine(fault));
        caller.to_caller.clear();
        let to = AnswerTo {
            head: request.method == Method::HEAD,
            keep_alive,
            http10: request.http10,
        };
        let answer = loop {
            if !machine.buf.is_empty() {
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
        if let Some(draft) = job.draft.as_ref().filter(|d| d.slot.is_some() || !d.fired) {
            let head = &machine.buf[..answer.head_len];
            let budget = &self.service.stats.capture_budget;
            job.capture = Some(
                draft
                    .compare
                    .capture(budget, |names| head_values(head, names)),
            );
        }
        machine.buf.advance(answer.head_len);
        job.status = Some(answer.status);
        self.relay_answer(caller, job, machine, &answer, timeout)
            .await?;
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

    /// Relays the answer's body to the caller as it arrives.
    async fn relay_answer(
        &self,
        caller: &mut Caller,
        job: &mut Job,
        machine: &mut Connection,
        answer: &h1::Answer,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        let machine_failed = |fault: Fault| AttemptError::Failed(Failure::Machine(fault));
        // The answer's last event: its last body bytes' arrival (its head's, without a body).
        let mut answer_last = None;
        let mut relay = BodyRelay::new(answer.framing, answer.output);
        loop {
            {
                let capture = &mut job.capture;
                relay
                    .relay(&mut machine.buf, &mut caller.to_caller, |data| {
                        if let Some(capture) = capture.as_mut() {
                            capture.update(data);
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
        Ok(())
    }

    /// The job's body is complete: its copy leaves.
    fn body_complete(&self, job: &mut Job) {
        if let Some(draft) = job.draft.as_mut() {
            draft.fire(job.number, &job.session, &self.service.stats);
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
                if !matches!(caller.read_body().await, Ok(n) if n > 0) {
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
                job.capture.take().map_or(Kept::Nothing, Capture::finish),
            ));
        }
    }
}

/// Reads more of the machine's answer, within the answer timeout.
async fn read_machine(machine: &mut Connection, timeout: Duration) -> Result<usize, Fault> {
    if machine.buf.capacity() - machine.buf.len() < 1024 {
        machine.buf.reserve(READ_BUFFER);
    }
    within(
        timeout,
        Limit::MachineAnswer,
        machine.tcp.read_buf(&mut machine.buf),
    )
    .await
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
            capture: None,
            draft: None,
            answer_started: false,
            _active: None,
        }
    }
}
