//! The copy of a job being assembled while its body streams through, and its departure to the
//! mirror lanes once the body is complete.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::{HeaderMap, Method};

use crate::fields::Comparison;
use crate::mirror::Copy;
use crate::pool::Machine;
use crate::stats::{PairSlot, Stats};

pub(crate) struct CopyDraft {
    targets: Vec<Arc<Machine>>,
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    /// The routing table's comparison when the job was routed: what is kept of the answers.
    pub compare: Comparison,
    body: BytesMut,
    over_limit: bool,
    /// The pair the copies and the active side report into, once the copies are queued.
    pub slot: Option<Arc<PairSlot>>,
    pub fired: bool,
}

impl CopyDraft {
    pub(crate) fn new(
        targets: Vec<Arc<Machine>>,
        (method, path_and_query, headers): (Method, String, HeaderMap),
        compare: Comparison,
    ) -> Self {
        CopyDraft {
            targets,
            method,
            path_and_query,
            headers,
            compare,
            body: BytesMut::new(),
            over_limit: false,
            slot: None,
            fired: false,
        }
    }

    pub(crate) fn copies(&self) -> u64 {
        self.targets.len() as u64
    }

    /// Tees a piece of the job's body into the copy (dropped whole past `limit`).
    pub(crate) fn append(&mut self, data: &[u8], limit: usize) {
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

    /// The job's body is complete: queues one copy per target (once), counting the ones that
    /// could not be queued as dropped.
    pub(crate) fn fire(&mut self, job: u64, session: &Option<String>, stats: &Arc<Stats>) {
        if self.fired {
            return;
        }
        self.fired = true;
        let copies = self.copies();
        if self.over_limit {
            stats.mirror_dropped(copies);
            return;
        }
        let slot = Arc::new(PairSlot::new(
            job,
            session.clone(),
            self.compare.clone(),
            stats.clone(),
        ));
        let body = std::mem::take(&mut self.body).freeze();
        let queued_at = Instant::now();
        let mut dropped = 0;
        for target in &self.targets {
            // Lanes are never closed: a job routed by a table just swapped out still holds its
            // version's lane.
            let Some(lane) = &target.lane else {
                dropped += 1;
                continue;
            };
            let queued = lane.try_send(Copy {
                target: target.clone(),
                method: self.method.clone(),
                path_and_query: self.path_and_query.clone(),
                headers: self.headers.clone(),
                body: body.clone(),
                compare: self.compare.clone(),
                slot: slot.clone(),
                stats: stats.clone(),
                queued_at,
            });
            if !queued {
                dropped += 1;
            }
        }
        if dropped > 0 {
            stats.mirror_dropped(dropped);
        }
        if dropped < copies {
            self.slot = Some(slot);
        }
    }

    /// The body never arrived whole: no copy can be made of it.
    pub(crate) fn abandon(&mut self, stats: &Stats) {
        if !self.fired {
            self.fired = true;
            stats.mirror_dropped(self.copies());
        }
    }
}
