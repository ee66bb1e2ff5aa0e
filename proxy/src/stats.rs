//! Per-service measurements: per (version, config) HDR histograms and outcome counters, and the job
//! pairs, kept in windows ("epochs") so the controller reads them since a cursor without loss.
//!
//! Every stats read closes the open epoch; its number becomes the cursor. A read `since = c` merges
//! the epochs after `c` (`c = 0`: everything since start). Closed epochs keep their histograms
//! serialized (V2, sparse), so retaining many of them is cheap.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use prometheus::IntCounter;
use understudy_wire::{
    CompareMode, JobObservation, JobPair, Outcome, OutcomeCounts, PoolRole, SeriesStats,
};

use crate::fields::{self, CaptureBudget, Compared, Comparison, Kept, SERVICE_BODY_BUDGET};
use crate::metrics::{Metrics, SeriesMetrics};

/// Latency range recorded, in microseconds: 1 us .. 1 hour, 3 significant digits.
const HIST_LOW_US: u64 = 1;
const HIST_HIGH_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
        .expect("static histogram bounds are valid")
}

/// (version, config): one measured series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SeriesKey {
    pub version: Arc<str>,
    pub role: PoolRole,
}

/// Where a job of one series is recorded: a slot in the stats and its Prometheus children.
pub(crate) struct SeriesHandle {
    index: usize,
    metrics: SeriesMetrics,
}

/// Why a stats read was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor {since} is ahead of the latest cursor {latest}")]
    Ahead { since: u64, latest: u64 },
    #[error(
        "cursor {since} is older than the retained windows (oldest readable cursor: {oldest}); \
         read since=0 for totals"
    )]
    TooOld { since: u64, oldest: u64 },
}

#[derive(Default, Clone)]
struct Counts(OutcomeCounts);

impl Counts {
    fn add_outcome(&mut self, outcome: Outcome) {
        let c = &mut self.0;
        match outcome {
            Outcome::Ok => c.ok += 1,
            Outcome::ClientError => c.client_error += 1,
            Outcome::ServerError => c.server_error += 1,
            Outcome::Timeout => c.timeout += 1,
            Outcome::ConnectFailure => c.connect_failure += 1,
        }
    }
    fn add(&mut self, other: &OutcomeCounts) {
        let c = &mut self.0;
        c.ok += other.ok;
        c.client_error += other.client_error;
        c.server_error += other.server_error;
        c.timeout += other.timeout;
        c.connect_failure += other.connect_failure;
    }
    fn total(&self) -> u64 {
        let c = &self.0;
        c.ok + c.client_error + c.server_error + c.timeout + c.connect_failure
    }
}

struct OpenSeries {
    counts: Counts,
    histogram: Histogram<u64>,
}

struct ClosedSeries {
    index: usize,
    counts: OutcomeCounts,
    histogram_v2: Vec<u8>,
}

struct Epoch {
    id: u64,
    series: Vec<ClosedSeries>,
    mirror_dropped: u64,
    pairs_evicted: u64,
}

struct Inner {
    keys: Vec<SeriesKey>,
    open: Vec<OpenSeries>,
    open_mirror_dropped: u64,
    open_pairs_evicted: u64,
    /// Everything in closed epochs, for `since = 0`.
    totals: Vec<(Counts, Histogram<u64>)>,
    total_mirror_dropped: u64,
    total_pairs_evicted: u64,
    epochs: VecDeque<Epoch>,
    /// Id of the last closed epoch.
    cursor: u64,
    /// (epoch the pair completed in, pair), oldest first.
    pairs: VecDeque<(u64, JobPair)>,
}

impl Inner {
    /// Whether anything was recorded since the last closed window.
    fn open_has_data(&self) -> bool {
        let open_id = self.cursor + 1;
        self.open.iter().any(|s| s.counts.total() > 0)
            || self.open_mirror_dropped > 0
            || self.open_pairs_evicted > 0
            || self
                .pairs
                .back()
                .is_some_and(|(epoch, _)| *epoch == open_id)
    }
}

/// Retention limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    pub epochs: usize,
    pub pairs: usize,
}

pub(crate) struct Stats {
    service: Arc<str>,
    metrics: Arc<Metrics>,
    retention: Retention,
    handles: Mutex<HashMap<SeriesKey, Arc<SeriesHandle>>>,
    inner: Mutex<Inner>,
    mirror_dropped_metric: IntCounter,
    mismatch_metrics: Mutex<HashMap<Arc<str>, IntCounter>>,
    /// Bytes of answer bodies the service's open pairs keep for field comparisons.
    pub(crate) capture_budget: Arc<CaptureBudget>,
}

/// A window of measurements, ready to send.
pub(crate) struct Window {
    pub cursor: u64,
    pub series: Vec<SeriesStats>,
    pub pairs: Vec<JobPair>,
    pub pairs_lost: u64,
    pub mirror_dropped: u64,
}

impl Stats {
    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    pub(crate) fn new(service: Arc<str>, metrics: Arc<Metrics>, retention: Retention) -> Self {
        let mirror_dropped_metric = metrics.mirror_dropped(&service);
        Stats {
            service,
            metrics,
            retention,
            handles: Mutex::new(HashMap::new()),
            inner: Mutex::new(Inner {
                keys: Vec::new(),
                open: Vec::new(),
                open_mirror_dropped: 0,
                open_pairs_evicted: 0,
                totals: Vec::new(),
                total_mirror_dropped: 0,
                total_pairs_evicted: 0,
                epochs: VecDeque::new(),
                cursor: 0,
                pairs: VecDeque::new(),
            }),
            mirror_dropped_metric,
            mismatch_metrics: Mutex::new(HashMap::new()),
            capture_budget: Arc::new(CaptureBudget::new(SERVICE_BODY_BUDGET)),
        }
    }

    /// The handle of a series, created on first use and kept for the balancer's life.
    pub(crate) fn series(&self, version: &Arc<str>, role: PoolRole) -> Arc<SeriesHandle> {
        let key = SeriesKey {
            version: version.clone(),
            role,
        };
        let mut handles = self.handles.lock().expect("stats handles lock");
        if let Some(h) = handles.get(&key) {
            return h.clone();
        }
        let index = {
            let mut inner = self.inner.lock().expect("stats lock");
            inner.keys.push(key.clone());
            inner.open.push(OpenSeries {
                counts: Counts::default(),
                histogram: new_histogram(),
            });
            inner.totals.push((Counts::default(), new_histogram()));
            inner.keys.len() - 1
        };
        let handle = Arc::new(SeriesHandle {
            index,
            metrics: self.metrics.series(&self.service, version, role),
        });
        handles.insert(key, handle.clone());
        handle
    }

    pub(crate) fn record(&self, series: &SeriesHandle, latency_us: u64, outcome: Outcome) {
        series.metrics.observe(latency_us, outcome);
        let mut inner = self.inner.lock().expect("stats lock");
        let open = &mut inner.open[series.index];
        open.counts.add_outcome(outcome);
        open.histogram
            .saturating_record(latency_us.max(HIST_LOW_US));
    }

    pub(crate) fn mirror_dropped(&self, copies: u64) {
        self.mirror_dropped_metric.inc_by(copies);
        self.inner.lock().expect("stats lock").open_mirror_dropped += copies;
    }

    pub(crate) fn push_pair(&self, pair: JobPair) {
        if let Some(reason) = pair.diff.as_ref().and_then(|d| d.digest_reason) {
            self.metrics.field_digest(&self.service, reason).inc();
        }
        if !pair.matched {
            let mut mismatch = self.mismatch_metrics.lock().expect("mismatch lock");
            let version: &str = &pair.simulation.version;
            match mismatch.get(version) {
                Some(counter) => counter.inc(),
                None => {
                    let counter = self.metrics.mismatch(&self.service, version);
                    counter.inc();
                    mismatch.insert(version.into(), counter);
                }
            }
        }
        let mut inner = self.inner.lock().expect("stats lock");
        let open_id = inner.cursor + 1;
        if inner.pairs.len() >= self.retention.pairs {
            if let Some((epoch, _)) = inner.pairs.pop_front() {
                inner.total_pairs_evicted += 1;
                if epoch == open_id {
                    inner.open_pairs_evicted += 1;
                } else if let Some(e) = inner.epochs.iter_mut().find(|e| e.id == epoch) {
                    e.pairs_evicted += 1;
                }
            }
        }
        inner.pairs.push_back((open_id, pair));
    }

    #[cfg(test)]
    pub(crate) fn latest_cursor(&self) -> u64 {
        self.inner.lock().expect("stats lock").cursor
    }

    /// Closes the open epoch and returns what happened after `since`.
    pub(crate) fn read_since(&self, since: u64) -> Result<Window, CursorError> {
        let (closed_blobs, totals, pairs, pairs_lost, mirror_dropped, cursor) = {
            let mut inner = self.inner.lock().expect("stats lock");
            if since > inner.cursor {
                return Err(CursorError::Ahead {
                    since,
                    latest: inner.cursor,
                });
            }
            // A read closes the open window only when something happened in it: reads of an
            // idle balancer (however many) use up none of the kept windows.
            if inner.open_has_data() {
                close_epoch(&mut inner, self.retention.epochs);
            }
            let oldest_readable = inner.epochs.front().map_or(inner.cursor, |e| e.id - 1);
            if since != 0 && since < oldest_readable {
                return Err(CursorError::TooOld {
                    since,
                    oldest: oldest_readable,
                });
            }
            let pairs: Vec<JobPair> = inner
                .pairs
                .iter()
                .filter(|(epoch, _)| *epoch > since)
                .map(|(_, p)| p.clone())
                .collect();
            if since == 0 {
                let totals: Vec<(usize, OutcomeCounts, Histogram<u64>)> = inner
                    .totals
                    .iter()
                    .enumerate()
                    .filter(|(_, (c, _))| c.total() > 0)
                    .map(|(i, (c, h))| (i, c.0.clone(), h.clone()))
                    .collect();
                (
                    Vec::new(),
                    totals,
                    pairs,
                    inner.total_pairs_evicted,
                    inner.total_mirror_dropped,
                    inner.cursor,
                )
            } else {
                let mut blobs = Vec::new();
                let mut lost = 0;
                let mut dropped = 0;
                for epoch in inner.epochs.iter().filter(|e| e.id > since) {
                    lost += epoch.pairs_evicted;
                    dropped += epoch.mirror_dropped;
                    for s in &epoch.series {
                        blobs.push((s.index, s.counts.clone(), s.histogram_v2.clone()));
                    }
                }
                (blobs, Vec::new(), pairs, lost, dropped, inner.cursor)
            }
        };
        let keys = self.inner.lock().expect("stats lock").keys.clone();

        // Merge outside the lock: deserializing must not stall the job path.
        let mut merged: Vec<Option<(Counts, Histogram<u64>)>> = vec![None; keys.len()];
        for (index, counts, histogram) in totals {
            merged[index] = Some((Counts(counts), histogram));
        }
        let mut deserializer = Deserializer::new();
        for (index, counts, blob) in closed_blobs {
            let histogram: Histogram<u64> = deserializer
                .deserialize(&mut blob.as_slice())
                .expect("histograms serialized by this process deserialize");
            let slot = merged[index].get_or_insert_with(|| (Counts::default(), new_histogram()));
            slot.0.add(&counts);
            slot.1
                .add(&histogram)
                .expect("histograms share their bounds");
        }
        let series = merged
            .into_iter()
            .enumerate()
            .filter_map(|(i, slot)| slot.map(|(counts, h)| (i, counts, h)))
            .map(|(i, counts, h)| SeriesStats {
                version: keys[i].version.to_string(),
                config: keys[i].role,
                outcomes: counts.0,
                histogram: encode_histogram(&h),
            })
            .collect();
        Ok(Window {
            cursor,
            series,
            pairs,
            pairs_lost,
            mirror_dropped,
        })
    }
}

fn close_epoch(inner: &mut Inner, retain: usize) {
    let id = inner.cursor + 1;
    let mut series = Vec::new();
    let mut serializer = V2Serializer::new();
    for index in 0..inner.open.len() {
        let open = &mut inner.open[index];
        if open.counts.total() == 0 {
            continue;
        }
        let counts = std::mem::take(&mut open.counts);
        let mut blob = Vec::new();
        serializer
            .serialize(&open.histogram, &mut blob)
            .expect("V2 serialization into memory");
        let (total_counts, total_hist) = &mut inner.totals[index];
        total_counts.add(&counts.0);
        total_hist
            .add(&open.histogram)
            .expect("histograms share their bounds");
        open.histogram.reset();
        series.push(ClosedSeries {
            index,
            counts: counts.0,
            histogram_v2: blob,
        });
    }
    inner.total_mirror_dropped += inner.open_mirror_dropped;
    inner.epochs.push_back(Epoch {
        id,
        series,
        mirror_dropped: std::mem::take(&mut inner.open_mirror_dropped),
        pairs_evicted: std::mem::take(&mut inner.open_pairs_evicted),
    });
    while inner.epochs.len() > retain {
        inner.epochs.pop_front();
    }
    inner.cursor = id;
}

/// HdrHistogram V2 serialization (uncompressed), base64 (standard alphabet, padded).
pub fn encode_histogram(histogram: &Histogram<u64>) -> String {
    let mut blob = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut blob)
        .expect("V2 serialization into memory");
    base64::engine::general_purpose::STANDARD.encode(blob)
}

/// Inverse of [`encode_histogram`], for the controller and tests.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut blob.as_slice())
        .map_err(|e| format!("histogram is not HdrHistogram V2: {e:?}"))
}

/// Joins the two sides of a mirrored job, which finish in either order, into [`JobPair`]s: one per
/// simulation copy.
pub(crate) struct PairSlot {
    job: u64,
    session: Option<String>,
    compare: Comparison,
    stats: Arc<Stats>,
    state: Mutex<PairState>,
}

/// One finished side: what was observed and what was kept of its answer for the comparison.
pub(crate) type Side = (JobObservation, Kept);

#[derive(Default)]
struct PairState {
    active: Option<Side>,
    waiting: Vec<Side>,
}

impl PairSlot {
    /// The balancer's number of the job this pair is of.
    pub(crate) fn job(&self) -> u64 {
        self.job
    }

    pub(crate) fn new(
        job: u64,
        session: Option<String>,
        compare: Comparison,
        stats: Arc<Stats>,
    ) -> Self {
        PairSlot {
            job,
            session,
            compare,
            stats,
            state: Mutex::new(PairState::default()),
        }
    }

    pub(crate) fn complete_active(&self, side: Side) {
        let waiting = {
            let mut state = self.state.lock().expect("pair lock");
            state.active = Some(side.clone());
            std::mem::take(&mut state.waiting)
        };
        for sim in waiting {
            self.emit(&side, sim);
        }
    }

    pub(crate) fn complete_simulation(&self, side: Side) {
        let active = {
            let mut state = self.state.lock().expect("pair lock");
            match &state.active {
                Some(active) => active.clone(),
                None => {
                    state.waiting.push(side);
                    return;
                }
            }
        };
        self.emit(&active, side);
    }

    fn emit(&self, active: &Side, simulation: Side) {
        let status_matched = active.0.status.is_some() && active.0.status == simulation.0.status;
        let (matched, diff) = match self.compare.mode {
            CompareMode::Status => (status_matched, None),
            CompareMode::Body => (
                status_matched && active.1.digest() == simulation.1.digest(),
                None,
            ),
            CompareMode::Fields => {
                let diff = fields::diff(
                    compared(active),
                    compared(&simulation),
                    &self.compare.headers,
                );
                (status_matched && diff.paths.is_empty(), Some(diff))
            }
        };
        self.stats.push_pair(JobPair {
            job: self.job,
            session: self.session.clone(),
            active: active.0.clone(),
            simulation: simulation.0,
            matched,
            diff,
        });
    }
}

/// One side of a pair as the field comparison reads it.
fn compared(side: &Side) -> Compared<'_> {
    Compared {
        status: side.0.status,
        answer: match &side.1 {
            Kept::Answer(a) => Some(a),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pairs: usize, epochs: usize) -> Arc<Stats> {
        Arc::new(Stats::new(
            "svc".into(),
            Arc::new(Metrics::new().unwrap()),
            Retention { epochs, pairs },
        ))
    }

    fn obs(version: &str, status: Option<u16>) -> JobObservation {
        JobObservation {
            machine: format!("{version}-m"),
            version: version.into(),
            latency_us: 100,
            outcome: Outcome::Ok,
            status,
        }
    }

    fn total(window: &Window) -> u64 {
        window
            .series
            .iter()
            .map(|s| decode_histogram(&s.histogram).unwrap().len())
            .sum()
    }

    #[test]
    fn windows_are_lossless_and_never_double_count() {
        let stats = stats(1000, 100);
        let v1 = stats.series(&"v1".into(), PoolRole::Active);
        let mut cursor = 0;
        let mut seen = 0;
        for round in 1..=5u64 {
            for i in 0..round * 10 {
                stats.record(&v1, 100 + i, Outcome::Ok);
            }
            let w = stats.read_since(cursor).unwrap();
            assert_eq!(total(&w), round * 10);
            assert_eq!(w.series[0].outcomes.ok, round * 10);
            seen += total(&w);
            cursor = w.cursor;
        }
        let all = stats.read_since(0).unwrap();
        assert_eq!(total(&all), seen);
        assert_eq!(seen, 150);
        // An older cursor still merges exactly the windows after it.
        let from_two = stats.read_since(2).unwrap();
        assert_eq!(total(&from_two), 30 + 40 + 50);
    }

    #[test]
    fn cursor_errors() {
        let stats = stats(10, 2);
        assert!(matches!(
            stats.read_since(5),
            Err(CursorError::Ahead {
                since: 5,
                latest: 0
            })
        ));
        let v1 = stats.series(&"v1".into(), PoolRole::Active);
        // Reads of an idle balancer close nothing: however many, no window is used up.
        for _ in 0..5 {
            assert_eq!(stats.read_since(stats.latest_cursor()).unwrap().cursor, 0);
        }
        for _ in 0..5 {
            stats.record(&v1, 100, Outcome::Ok);
            stats.read_since(stats.latest_cursor()).unwrap();
        }
        stats.record(&v1, 100, Outcome::Ok);
        // This read closes epoch 6; epochs 5 and 6 are kept, so cursor 4 is the oldest readable.
        assert!(stats.read_since(4).is_ok());
        assert!(matches!(
            stats.read_since(1),
            Err(CursorError::TooOld { .. })
        ));
        assert!(stats.read_since(0).is_ok());
    }

    #[test]
    fn pairs_join_in_either_order_and_overflow_is_counted() {
        let stats = stats(3, 100);
        let slot = PairSlot::new(
            7,
            Some("call-1".into()),
            Comparison::default(),
            stats.clone(),
        );
        slot.complete_simulation((obs("v2", Some(200)), Kept::Nothing));
        slot.complete_active((obs("v1", Some(200)), Kept::Nothing));
        slot.complete_simulation((obs("v1", Some(500)), Kept::Nothing));
        let w = stats.read_since(0).unwrap();
        assert_eq!(w.pairs.len(), 2);
        assert!(w.pairs.iter().all(|p| p.job == 7));
        assert!(w.pairs[0].matched);
        assert!(!w.pairs[1].matched);

        for job in 0..4 {
            let slot = PairSlot::new(job, None, Comparison::default(), stats.clone());
            slot.complete_active((obs("v1", Some(200)), Kept::Nothing));
            slot.complete_simulation((obs("v2", Some(200)), Kept::Nothing));
        }
        let w2 = stats.read_since(w.cursor).unwrap();
        assert_eq!(w2.pairs.len(), 3);
        // Two pairs of the first window and one of the second were evicted.
        assert_eq!(w2.pairs_lost, 1);
        assert_eq!(stats.read_since(0).unwrap().pairs_lost, 3);
    }

    #[test]
    fn body_digests_decide_the_match_when_asked() {
        let stats = stats(10, 10);
        let body = Comparison {
            mode: CompareMode::Body,
            headers: Arc::new([]),
        };
        let slot = PairSlot::new(1, None, body, stats.clone());
        slot.complete_active((obs("v1", Some(200)), Kept::Digest(1)));
        slot.complete_simulation((obs("v2", Some(200)), Kept::Digest(2)));
        let w = stats.read_since(0).unwrap();
        assert!(!w.pairs[0].matched);
    }
}
