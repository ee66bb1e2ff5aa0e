//! When a job's machine was at work: the points of one attempt, and the machine's service time
//! drawn from them.
//!
//! Latency, on both sides of a pair, is the machine's *service time as seen from the balancer*:
//! from the moment the balancer starts sending the job to the machine (connection checkout or
//! connect included) to the moment the last byte of the machine's answer arrives, minus any time
//! the balancer spent waiting for the caller's request body. The copy path (mirror.rs) measures
//! the same two points on its own client; its body is buffered before sending, so it never waits.

use std::time::{Duration, Instant};

/// Points of one attempt at the machine. Reset on every attempt (a job whose reused connection
/// failed is sent again on a new one).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UpstreamTiming {
    /// The connection is about to be checked out or established.
    pub begin: Option<Instant>,
    /// Connected, the request head is about to be written (jobs with a body only).
    pub header_sent: Option<Instant>,
    /// The whole request is in hand and written.
    pub request_complete: Option<Instant>,
    /// The last event of the machine's answer seen (its head, then each piece of its body).
    pub answer_last: Option<Instant>,
}

impl UpstreamTiming {
    pub(crate) fn started(now: Instant) -> Self {
        UpstreamTiming {
            begin: Some(now),
            ..UpstreamTiming::default()
        }
    }

    /// The machine's service time in microseconds. `answered`: the answer arrived complete
    /// (otherwise the attempt ended when the failure was seen, `failed_at`). None when the job
    /// never reached `upstream_peer`.
    pub(crate) fn service_us(&self, answered: bool, failed_at: Instant) -> Option<u64> {
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
