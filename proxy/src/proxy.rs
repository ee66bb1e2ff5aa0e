//! The pingora side: each caller's job goes to an active machine; a copy of it is handed to the
//! mirror once its body is complete; the job's latency and outcome are recorded when it ends.
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
use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::mirror::{outcome_of_status, ActiveJobGuard, BodyDigest, Copy, SIMULATION_HEADER};
use crate::pool::Machine;
use crate::service::Service;
use crate::stats::PairSlot;
use crate::wire::{JobObservation, Outcome};

/// Header naming a sustained session (a call, a stream).
pub const SESSION_HEADER: &str = "x-session-id";
/// Header marking a session's first (`start`) and last (`end`) job, as the load generator sends
/// it; after an `end` job the session's pins are released.
pub const SESSION_EVENT_HEADER: &str = "x-session-event";

/// How long `logging` waits for the rest of a request body it must copy after the active
/// connect failed (the body hook never ran then).
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
    body: BytesMut,
    over_limit: bool,
    /// The pair the copies and the active side report into, once the copies are queued.
    slot: Option<Arc<PairSlot>>,
    fired: bool,
}

/// Points of one attempt at the active machine, from pingora's phases. Reset on every attempt
/// (`upstream_peer` reruns on retries).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UpstreamTiming {
    /// `upstream_peer`: the connection is about to be checked out or established.
    begin: Option<Instant>,
    /// `upstream_request_filter`: connected, the request header is about to be written.
    header_sent: Option<Instant>,
    /// `request_body_filter` at end of stream: the whole request is in hand and being written.
    request_complete: Option<Instant>,
    /// The last event of the machine's answer seen (its header, then each body chunk).
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

pub(crate) struct JobCtx {
    job: u64,
    start: Instant,
    timing: UpstreamTiming,
    session: Option<String>,
    machine: Option<Arc<Machine>>,
    /// Status of the upstream answer (not of an error page pingora wrote itself).
    status: Option<u16>,
    digest: Option<BodyDigest>,
    draft: Option<CopyDraft>,
    /// Counts the job among the service's active jobs in flight until the job ends.
    _active: Option<ActiveJobGuard>,
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
        let table_compare = self.service.router.table().config.compare_body;
        let slot = Arc::new(PairSlot::new(
            job,
            session.clone(),
            table_compare,
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
                compare_body: table_compare,
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

    fn append_body(&self, draft: &mut CopyDraft, chunk: &Bytes) {
        if draft.over_limit {
            return;
        }
        if draft.body.len() + chunk.len() > self.service.limits.mirror_body_limit {
            draft.over_limit = true;
            draft.body = BytesMut::new();
        } else {
            draft.body.extend_from_slice(chunk);
        }
    }

    async fn refuse(&self, session: &mut Session, status: u16, message: &str) -> Result<bool> {
        let body = Bytes::from(
            serde_json::to_vec(&crate::wire::ErrorBody {
                error: message.to_owned(),
            })
            .unwrap_or_default(),
        );
        let mut header = ResponseHeader::build(status, Some(2))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", body.len().to_string())?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }
}

fn header_str<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
}

/// Outcome of a job that got no answer from its machine.
fn outcome_of_error(error: &Error) -> Option<Outcome> {
    use ErrorType::*;
    match error.etype() {
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
        | SocketError | BindError | TLSHandshakeFailure | TLSHandshakeTimedout => {
            Some(Outcome::ConnectFailure)
        }
        ReadTimedout | WriteTimedout | TLSWantX509Lookup => Some(Outcome::Timeout),
        // The caller went away: the machine is not to blame and no answer can be judged.
        _ if error.esource() == &ErrorSource::Downstream => None,
        _ => Some(Outcome::ServerError),
    }
}

#[async_trait]
impl ProxyHttp for Balancer {
    type CTX = JobCtx;

    fn new_ctx(&self) -> JobCtx {
        JobCtx {
            job: self.service.jobs.fetch_add(1, Ordering::Relaxed) + 1,
            start: Instant::now(),
            timing: UpstreamTiming::default(),
            session: None,
            machine: None,
            status: None,
            digest: None,
            draft: None,
            _active: None,
        }
    }

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // No response compression (pingora's default adds the module, disabled, to every job).
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut JobCtx) -> Result<bool> {
        ctx.start = Instant::now();
        ctx.session = header_str(session, SESSION_HEADER).map(str::to_owned);
        let ends_session = header_str(session, SESSION_EVENT_HEADER).is_some_and(|v| v == "end");
        if session.req_header().headers.contains_key(SIMULATION_HEADER) {
            // Simulation traffic (a copy made upstream of us) must never reach an active machine.
            let machine = self.service.router.route_simulation_only(
                ctx.session.as_deref(),
                ends_session,
                ctx.start,
            );
            return match machine {
                Some(m) => {
                    ctx.machine = Some(m);
                    Ok(false)
                }
                None => {
                    self.service.refused_no_simulation.inc();
                    self.refuse(
                        session,
                        503,
                        "simulation job refused: no simulation machine in this balancer's pool",
                    )
                    .await
                }
            };
        }
        let (route, _table) =
            self.service
                .router
                .route(ctx.job, ctx.session.as_deref(), ends_session, ctx.start);
        ctx.machine = Some(route.machine);
        ctx._active = Some(self.service.active_in_flight.enter());
        if !route.mirror.is_empty() {
            let req = session.req_header();
            ctx.draft = Some(CopyDraft {
                targets: route.mirror,
                method: req.method.clone(),
                path_and_query: req
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                headers: req.headers.clone(),
                body: BytesMut::new(),
                over_limit: false,
                slot: None,
                fired: false,
            });
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut JobCtx,
    ) -> Result<Box<HttpPeer>> {
        let machine = ctx
            .machine
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "job was not routed"))?;
        ctx.timing = UpstreamTiming::started(Instant::now());
        // Reruns on retry: the body is teed again from the start.
        if let Some(draft) = ctx.draft.as_mut().filter(|d| !d.fired) {
            draft.body.clear();
            draft.over_limit = false;
        }
        let mut peer = HttpPeer::new(machine.address, false, String::new());
        let limits = &self.service.limits;
        peer.options.connection_timeout = Some(limits.connect_timeout);
        // A hung machine shows as a read timeout. No write timeout and no idle timeout on pooled
        // connections: each would arm a timer per job (a pooled connection the machine closes
        // is noticed and dropped by the pool anyway).
        peer.options.read_timeout = Some(limits.upstream_timeout);
        Ok(Box::new(peer))
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut JobCtx,
    ) -> Result<()> {
        if end_of_stream && ctx.timing.request_complete.is_none() {
            ctx.timing.request_complete = Some(Instant::now());
        }
        let Some(draft) = ctx.draft.as_mut() else {
            return Ok(());
        };
        if draft.fired {
            return Ok(());
        }
        if let Some(chunk) = body.as_ref() {
            self.append_body(draft, chunk);
        }
        if end_of_stream {
            self.fire(draft, ctx.job, &ctx.session);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        _upstream_request: &mut RequestHeader,
        ctx: &mut JobCtx,
    ) -> Result<()> {
        ctx.timing.header_sent = Some(Instant::now());
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut JobCtx,
    ) -> Result<Option<Duration>> {
        // Every chunk moves the stamp: the last one is when the answer was complete (the end of
        // an answer may come as an empty end-of-stream chunk or with the last data).
        ctx.timing.answer_last = Some(Instant::now());
        Ok(None)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut JobCtx,
    ) -> Result<()> {
        ctx.timing.answer_last = Some(Instant::now());
        ctx.status = Some(upstream_response.status.as_u16());
        if ctx
            .draft
            .as_ref()
            .is_some_and(|d| d.slot.is_some() || !d.fired)
            && self.service.router.table().config.compare_body
        {
            ctx.digest = Some(BodyDigest::new());
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut JobCtx,
    ) -> Result<Option<Duration>> {
        if let (Some(digest), Some(chunk)) = (ctx.digest.as_mut(), body.as_ref()) {
            digest.update(chunk);
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut JobCtx) {
        let now = Instant::now();
        let latency_us = ctx
            .timing
            .service_us(error.is_none(), now)
            .unwrap_or_else(|| now.duration_since(ctx.start).as_micros() as u64);
        let outcome = match (ctx.status, error) {
            (Some(status), None) => Some(outcome_of_status(status)),
            (Some(_), Some(e)) => outcome_of_error(e).map(|o| match o {
                // An answer started but broke off: the machine failed this job.
                Outcome::ConnectFailure => Outcome::ServerError,
                other => other,
            }),
            (None, Some(e)) => outcome_of_error(e),
            // Answered by the balancer itself (refused): not a machine's job.
            (None, None) => None,
        };
        // The active connect failed before the body hook ran: copy the job anyway, so that v2 is
        // also measured on the jobs v1 failed.
        if let Some(draft) = ctx.draft.as_mut().filter(|d| !d.fired) {
            if !session.is_body_done() {
                let _ = tokio::time::timeout(LATE_BODY_WAIT, async {
                    while let Ok(Some(chunk)) = session.read_request_body().await {
                        if draft.body.len() + chunk.len() > self.service.limits.mirror_body_limit {
                            draft.over_limit = true;
                        } else {
                            draft.body.extend_from_slice(&chunk);
                        }
                    }
                })
                .await;
            }
            if session.is_body_done() {
                self.fire(draft, ctx.job, &ctx.session);
            } else {
                draft.fired = true;
                self.service
                    .stats
                    .mirror_dropped(draft.targets.len() as u64);
            }
        }
        let (Some(machine), Some(outcome)) = (ctx.machine.as_ref(), outcome) else {
            return;
        };
        self.service
            .stats
            .record(&machine.series, latency_us, outcome);
        if let Some(slot) = ctx.draft.as_ref().and_then(|d| d.slot.as_ref()) {
            slot.complete_active((
                JobObservation {
                    machine: machine.id.to_string(),
                    version: machine.version.to_string(),
                    latency_us,
                    outcome,
                    status: ctx.status,
                },
                ctx.digest.take().map(BodyDigest::finish),
            ));
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &JobCtx, error: &Error) -> bool {
        // A caller hanging up is routine; pingora would log an ERROR line per job.
        error.esource() == &ErrorSource::Downstream
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
