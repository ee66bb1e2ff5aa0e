//! The pingora side: each caller's job goes to an active machine; a copy of it is handed to the
//! mirror once its body is complete; the job's latency and outcome are recorded when it ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::Method;
use pingora::http::ResponseHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::mirror::{outcome_of_status, BodyDigest, Copy, SIMULATION_HEADER};
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

pub(crate) struct JobCtx {
    job: u64,
    start: Instant,
    session: Option<String>,
    machine: Option<Arc<Machine>>,
    /// Status of the upstream answer (not of an error page pingora wrote itself).
    status: Option<u16>,
    digest: Option<BodyDigest>,
    draft: Option<CopyDraft>,
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
        let mut dropped = 0;
        for target in &draft.targets {
            let queued = self.service.mirror.try_send(Copy {
                target: target.clone(),
                method: draft.method.clone(),
                path_and_query: draft.path_and_query.clone(),
                headers: draft.headers.clone(),
                body: body.clone(),
                compare_body: table_compare,
                slot: slot.clone(),
                stats: self.service.stats.clone(),
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
            session: None,
            machine: None,
            status: None,
            digest: None,
            draft: None,
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

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut JobCtx,
    ) -> Result<()> {
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
        let latency_us = ctx.start.elapsed().as_micros() as u64;
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
