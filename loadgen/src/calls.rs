//! What a machine knows of the calls (sessions) whose jobs it serves: each call's status as the
//! machine sees it (published on topic `call.state`, see docs/loadgen.md), and the state behind
//! the `late_failure` fault (a call fails only once it has been in media long enough).

use crate::spec::{check_range, SpecError};
use fnv::FnvHasher;
use http::StatusCode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hasher;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Calls tracked at once; beyond this, new calls are served but not tracked (no status events,
/// no late failure) and counted, so a flood of never-ended sessions cannot grow memory.
pub const MAX_TRACKED_CALLS: usize = 100_000;

/// Calls remembered as lately ended, and as lately moved here (see [`CallBook`]).
const RECENT_CALLS: usize = 10_000;

/// `x-session-event`: the first or the last job of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEvent {
    Start,
    End,
}

impl SessionEvent {
    pub(crate) fn of(value: &[u8]) -> Option<SessionEvent> {
        match value {
            b"start" => Some(SessionEvent::Start),
            b"end" => Some(SessionEvent::End),
            _ => None,
        }
    }
}

/// Where a job's call began, as far as one machine can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whereabouts {
    /// Here, or the call was already counted as moved here.
    Here,
    /// The first job here of a call that started on another machine.
    MovedHere,
    /// The start of a call counted as moved here: a later job had only overtaken it.
    StartOvertaken,
}

/// The calls a machine saw start and not yet end, and what it takes to tell a call that moved
/// here from jobs of one call overtaking each other on the way: the load is open-loop, so a
/// call's next job does not wait for the answer to the one before.
#[derive(Debug, Default)]
pub(crate) struct CallBook {
    open: HashSet<String>,
    /// A job overtaken by its call's end arrives after it: late, not moved.
    ended: Recent,
    /// Calls counted as moved here, so each counts once and an overtaken start undoes it.
    moved_in: Recent,
}

impl CallBook {
    pub(crate) fn open_calls(&self) -> usize {
        self.open.len()
    }

    /// Books a job of call `id`: a start opens the call, an end closes it.
    pub(crate) fn arrive(&mut self, id: &str, event: Option<SessionEvent>) -> Whereabouts {
        let known = match event {
            Some(SessionEvent::Start) => {
                self.open.insert(id.to_string());
                if self.moved_in.remove(id) {
                    return Whereabouts::StartOvertaken;
                }
                true
            }
            Some(SessionEvent::End) => {
                let open = self.open.remove(id);
                self.ended.insert(id);
                open
            }
            None => self.open.contains(id) || self.ended.contains(id),
        };
        if known || self.moved_in.contains(id) {
            return Whereabouts::Here;
        }
        self.moved_in.insert(id);
        Whereabouts::MovedHere
    }
}

/// A set that keeps its latest [`RECENT_CALLS`] members.
#[derive(Debug, Default)]
struct Recent {
    /// Each member with the number of its last insertion.
    members: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
    inserted: u64,
}

impl Recent {
    fn insert(&mut self, id: &str) {
        self.inserted += 1;
        self.members.insert(id.to_string(), self.inserted);
        self.order.push_back((self.inserted, id.to_string()));
        if self.order.len() > RECENT_CALLS {
            if let Some((number, oldest)) = self.order.pop_front() {
                // Only if it was not inserted again since.
                if self.members.get(&oldest) == Some(&number) {
                    self.members.remove(&oldest);
                }
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.members.contains_key(id)
    }

    fn remove(&mut self, id: &str) -> bool {
        self.members.remove(id).is_some()
    }
}

/// A call's status as one machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// The first job of the session reached this machine.
    Received,
    /// A job whose path ends in `/route` was answered ok.
    Routed,
    /// A job whose path ends in `/queue` was answered ok.
    Queued,
    /// A job whose path ends in `/media` or `/frame` was answered ok.
    Media,
    /// The job with `x-session-event: end` was answered ok.
    Completed,
    /// A job of the call was answered with an error status, or its connection was reset.
    Error,
    /// The machine hung a job of the call (it will never answer it).
    Timeout,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Received => "received",
            CallStatus::Routed => "routed",
            CallStatus::Queued => "queued",
            CallStatus::Media => "media",
            CallStatus::Completed => "completed",
            CallStatus::Error => "error",
            CallStatus::Timeout => "timeout",
        }
    }

    /// Completed, error and timeout end a call: later jobs of it change nothing.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CallStatus::Completed | CallStatus::Error | CallStatus::Timeout
        )
    }

    /// The status a job's path names when it is answered ok: the last path segment
    /// (`/voice/media` -> media). Paths naming none (set-up, SMS, ...) leave the status as is.
    pub fn from_path(path: &str) -> Option<CallStatus> {
        match path.trim_end_matches('/').rsplit('/').next()? {
            "route" | "routing" => Some(CallStatus::Routed),
            "queue" => Some(CallStatus::Queued),
            "media" | "frame" => Some(CallStatus::Media),
            _ => None,
        }
    }
}

/// How one job of a call ended on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Answered 2xx; `ends_call` when it carried `x-session-event: end`.
    Ok {
        path_status: Option<CallStatus>,
        ends_call: bool,
    },
    /// Answered 4xx/5xx, or reset.
    Failed,
    /// Hung by the machine.
    Hung,
}

impl JobOutcome {
    /// The one transition function of a call's status: the status after this outcome, if it
    /// changes. Final statuses never change.
    pub fn next_status(self, current: CallStatus) -> Option<CallStatus> {
        if current.is_final() {
            return None;
        }
        let next = match self {
            JobOutcome::Ok {
                ends_call: true, ..
            } => CallStatus::Completed,
            JobOutcome::Ok {
                path_status: Some(status),
                ..
            } => status,
            JobOutcome::Ok {
                path_status: None, ..
            } => current,
            JobOutcome::Failed => CallStatus::Error,
            JobOutcome::Hung => CallStatus::Timeout,
        };
        (next != current).then_some(next)
    }
}

/// The `late_failure` fault as written in a machine spec (`[faults] late_failure = {...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LateFailureSpec {
    /// Seeded fraction of calls that will fail late (default 1: every long call).
    #[serde(default = "one")]
    pub fraction: f64,
    /// The call is long once this many of its media jobs were answered here.
    #[serde(default)]
    pub after_media_jobs: Option<u64>,
    /// The call is long once its first media job is this old.
    #[serde(default)]
    pub after_media_ms: Option<u64>,
    /// Status of the failed jobs (default: the machine's `error_status`).
    #[serde(default)]
    pub status: Option<u16>,
}

fn one() -> f64 {
    1.0
}

/// A validated `late_failure`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LateFailure {
    fraction: f64,
    after_media_jobs: Option<u64>,
    after_media: Option<Duration>,
    pub(crate) status: Option<StatusCode>,
}

impl LateFailureSpec {
    pub(crate) fn validate(&self, field: &str) -> Result<LateFailure, SpecError> {
        let fraction = check_range(&format!("{field}.fraction"), self.fraction, 0.0, 1.0)?;
        if self.after_media_jobs.is_none() && self.after_media_ms.is_none() {
            return Err(SpecError::new(
                field,
                "set after_media_jobs or after_media_ms (or both: whichever comes first)",
            ));
        }
        if self.after_media_jobs == Some(0) {
            return Err(SpecError::new(
                format!("{field}.after_media_jobs"),
                "must be at least 1",
            ));
        }
        if self.after_media_ms == Some(0) {
            return Err(SpecError::new(
                format!("{field}.after_media_ms"),
                "must be at least 1",
            ));
        }
        let status = self
            .status
            .map(|code| {
                StatusCode::from_u16(code)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .ok_or_else(|| {
                        SpecError::new(
                            format!("{field}.status"),
                            format!("must be a 4xx or 5xx status, got {code}"),
                        )
                    })
            })
            .transpose()?;
        Ok(LateFailure {
            fraction,
            after_media_jobs: self.after_media_jobs,
            after_media: self.after_media_ms.map(Duration::from_millis),
            status,
        })
    }
}

impl LateFailure {
    /// Whether this call is one that fails late: drawn from the seed and the session id alone,
    /// so the same calls fail on every run and on every machine with that seed.
    fn dooms(&self, seed: u64, session: &str) -> bool {
        let mut h = FnvHasher::default();
        h.write(b"late_failure");
        h.write(session.as_bytes());
        StdRng::seed_from_u64(seed ^ h.finish()).gen::<f64>() < self.fraction
    }

    fn is_long(&self, media_jobs: u64, media_since: Option<Instant>, now: Instant) -> bool {
        self.after_media_jobs.is_some_and(|n| media_jobs >= n)
            || match (self.after_media, media_since) {
                (Some(after), Some(since)) => now.duration_since(since) >= after,
                _ => false,
            }
    }
}

#[derive(Debug)]
struct Call {
    status: CallStatus,
    /// Media jobs of this call that arrived here.
    media_jobs: u64,
    media_since: Option<Instant>,
    doomed: bool,
}

/// What the arrival of a job means for its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// The first job of this call here: the call is now `received`.
    pub(crate) first: bool,
    /// The late-failure fault hits this job.
    pub(crate) fails_late: bool,
    /// The call could not be tracked (too many calls at once).
    pub(crate) untracked: bool,
}

/// Every call the machine is serving.
#[derive(Debug)]
pub(crate) struct CallTracker {
    seed: u64,
    late_failure: Option<LateFailure>,
    calls: Mutex<HashMap<String, Call>>,
}

impl CallTracker {
    pub(crate) fn new(seed: u64, late_failure: Option<LateFailure>) -> Self {
        CallTracker {
            seed,
            late_failure,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Records a job of `session` arriving for `path`; decides whether the late failure hits
    /// it (counted on the media jobs that arrived before this one).
    pub(crate) fn arrive(&self, session: &str, path: &str, now: Instant) -> Arrival {
        let mut calls = self.calls.lock().expect("calls lock");
        let first = !calls.contains_key(session);
        if first && calls.len() >= MAX_TRACKED_CALLS {
            return Arrival {
                first: false,
                fails_late: false,
                untracked: true,
            };
        }
        let call = calls.entry(session.to_string()).or_insert_with(|| Call {
            status: CallStatus::Received,
            media_jobs: 0,
            media_since: None,
            doomed: self
                .late_failure
                .is_some_and(|late| late.dooms(self.seed, session)),
        });
        let fails_late = call.doomed
            && self
                .late_failure
                .is_some_and(|late| late.is_long(call.media_jobs, call.media_since, now));
        if CallStatus::from_path(path) == Some(CallStatus::Media) {
            call.media_jobs += 1;
            call.media_since.get_or_insert(now);
        }
        Arrival {
            first,
            fails_late,
            untracked: false,
        }
    }

    /// Records how a job of `session` ended; returns the call's new status when it changed.
    /// A call is forgotten at its end job (answered or not), so memory follows open calls.
    pub(crate) fn finish(
        &self,
        session: &str,
        outcome: JobOutcome,
        ends_call: bool,
    ) -> Option<CallStatus> {
        let mut calls = self.calls.lock().expect("calls lock");
        let call = calls.get_mut(session)?;
        let next = outcome.next_status(call.status);
        if let Some(status) = next {
            call.status = status;
        }
        if ends_call {
            calls.remove(session);
        }
        next
    }

    #[cfg(test)]
    pub(crate) fn open_calls(&self) -> usize {
        self.calls.lock().expect("calls lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_moved_here_counts_once_and_overtaking_jobs_do_not_count() {
        use SessionEvent::{End, Start};
        use Whereabouts::{Here, MovedHere, StartOvertaken};
        let mut book = CallBook::default();
        let jobs = |book: &mut CallBook, id, events: &[Option<SessionEvent>]| -> Vec<Whereabouts> {
            events.iter().map(|e| book.arrive(id, *e)).collect()
        };
        assert_eq!(
            jobs(&mut book, "here", &[Some(Start), None, Some(End)]),
            [Here, Here, Here]
        );
        // An in-call job overtaken by the end.
        assert_eq!(jobs(&mut book, "here", &[None]), [Here]);
        assert_eq!(
            jobs(&mut book, "moved", &[None, None, Some(End)]),
            [MovedHere, Here, Here]
        );
        // An in-call job that overtook the start: counted, then undone.
        assert_eq!(
            jobs(
                &mut book,
                "late-start",
                &[None, Some(Start), None, Some(End)]
            ),
            [MovedHere, StartOvertaken, Here, Here]
        );
        assert_eq!(jobs(&mut book, "open", &[Some(Start)]), [Here]);
        assert_eq!(book.open_calls(), 1);
    }

    #[test]
    fn recent_keeps_only_its_latest_members() {
        let mut recent = Recent::default();
        recent.insert("first");
        for i in 0..RECENT_CALLS {
            recent.insert(&format!("call-{i}"));
        }
        assert!(!recent.contains("first"));
        assert!(
            recent.contains("call-0") && recent.contains(&format!("call-{}", RECENT_CALLS - 1))
        );
        // Inserted again: the older entry's eviction leaves it.
        recent.insert("call-0");
        recent.insert("one-more");
        assert!(recent.contains("call-0"));
        assert!(recent.remove("call-0") && !recent.contains("call-0"));
    }

    #[test]
    fn paths_name_statuses_by_their_last_segment() {
        assert_eq!(
            CallStatus::from_path("/voice/media"),
            Some(CallStatus::Media)
        );
        assert_eq!(
            CallStatus::from_path("/video/frame"),
            Some(CallStatus::Media)
        );
        assert_eq!(
            CallStatus::from_path("/call/route"),
            Some(CallStatus::Routed)
        );
        assert_eq!(CallStatus::from_path("/queue/"), Some(CallStatus::Queued));
        assert_eq!(CallStatus::from_path("/voice/setup"), None);
        assert_eq!(CallStatus::from_path("/voice/teardown"), None);
        assert_eq!(CallStatus::from_path("/sms/send"), None);
    }

    #[test]
    fn the_transition_function_follows_a_call_and_final_statuses_stay() {
        let ok = |path| JobOutcome::Ok {
            path_status: CallStatus::from_path(path),
            ends_call: false,
        };
        let end = JobOutcome::Ok {
            path_status: None,
            ends_call: true,
        };
        let mut status = CallStatus::Received;
        let mut seen = vec![status];
        for outcome in [
            ok("/voice/setup"),
            ok("/x/route"),
            ok("/x/queue"),
            ok("/voice/media"),
            ok("/voice/media"),
            end,
        ] {
            if let Some(next) = outcome.next_status(status) {
                status = next;
                seen.push(next);
            }
        }
        use CallStatus::*;
        assert_eq!(seen, [Received, Routed, Queued, Media, Completed]);
        for outcome in [
            ok("/voice/media"),
            JobOutcome::Failed,
            JobOutcome::Hung,
            end,
        ] {
            for last in [Completed, Error, Timeout] {
                assert_eq!(outcome.next_status(last), None);
            }
        }
        assert_eq!(JobOutcome::Failed.next_status(Media), Some(Error));
        assert_eq!(JobOutcome::Hung.next_status(Received), Some(Timeout));
    }

    #[test]
    fn late_failure_spec_is_validated_naming_the_field() {
        let spec = |after_media_jobs, after_media_ms, fraction, status| LateFailureSpec {
            fraction,
            after_media_jobs,
            after_media_ms,
            status,
        };
        let f = "faults.late_failure";
        assert_eq!(
            spec(None, None, 1.0, None).validate(f).unwrap_err().field,
            f
        );
        assert_eq!(
            spec(Some(0), None, 1.0, None)
                .validate(f)
                .unwrap_err()
                .field,
            "faults.late_failure.after_media_jobs"
        );
        assert_eq!(
            spec(None, Some(0), 1.0, None)
                .validate(f)
                .unwrap_err()
                .field,
            "faults.late_failure.after_media_ms"
        );
        assert_eq!(
            spec(Some(3), None, 1.5, None)
                .validate(f)
                .unwrap_err()
                .field,
            "faults.late_failure.fraction"
        );
        assert_eq!(
            spec(Some(3), None, 1.0, Some(200))
                .validate(f)
                .unwrap_err()
                .field,
            "faults.late_failure.status"
        );
        assert!(spec(Some(3), Some(100), 0.5, Some(503)).validate(f).is_ok());
    }

    #[test]
    fn a_doomed_call_fails_from_its_nth_media_job_or_after_its_media_time() {
        let late = LateFailureSpec {
            fraction: 1.0,
            after_media_jobs: Some(3),
            after_media_ms: Some(10_000),
            status: None,
        }
        .validate("late")
        .unwrap();
        let tracker = CallTracker::new(1, Some(late));
        let t0 = Instant::now();
        let mut fails = Vec::new();
        assert!(tracker.arrive("c1", "/voice/setup", t0).first);
        for _ in 0..6 {
            let arrival = tracker.arrive("c1", "/voice/media", t0);
            assert!(!arrival.first);
            fails.push(arrival.fails_late);
        }
        // The 4th media job (3 before it) is the first to fail, and every later one fails.
        assert_eq!(fails, [false, false, false, true, true, true]);
        assert!(tracker.arrive("c1", "/voice/teardown", t0).fails_late);

        // By time: one media job, then 10 s later the next one fails.
        assert!(!tracker.arrive("c2", "/voice/media", t0).fails_late);
        assert!(
            !tracker
                .arrive("c2", "/voice/media", t0 + Duration::from_millis(9_999))
                .fails_late
        );
        assert!(
            tracker
                .arrive("c2", "/voice/media", t0 + Duration::from_secs(10))
                .fails_late
        );

        // The call's status stays `error`; its end job forgets it.
        assert_eq!(
            tracker.finish("c2", JobOutcome::Failed, false),
            Some(CallStatus::Error)
        );
        assert!(
            tracker
                .arrive("c2", "/voice/media", t0 + Duration::from_secs(11))
                .fails_late
        );
        assert_eq!(tracker.finish("c2", JobOutcome::Failed, true), None);
        assert_eq!(tracker.open_calls(), 1);
    }

    #[test]
    fn the_doomed_calls_depend_on_seed_and_session_only() {
        let late = LateFailureSpec {
            fraction: 0.3,
            after_media_jobs: Some(1),
            after_media_ms: None,
            status: None,
        }
        .validate("late")
        .unwrap();
        let doomed = |seed| -> Vec<usize> {
            (0..1_000)
                .filter(|i| late.dooms(seed, &format!("voice-{i}")))
                .collect()
        };
        assert_eq!(doomed(7), doomed(7));
        assert_ne!(doomed(7), doomed(8));
        assert!((240..360).contains(&doomed(7).len()), "{}", doomed(7).len());
    }
}
