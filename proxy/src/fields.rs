//! Answers compared field by field (`compare = "fields"`): what is kept of each side while its
//! pair is open, and the comparison itself, a pure function of the two kept answers.
//!
//! Paths name where JSON bodies differ (`user.name`, `items[].price`). Their number must stay
//! small whatever the answers hold, since the controller counts and tests each one: array
//! indexes always collapse to `[]`, object keys that look like ids (and every key of an object
//! with more than [`MAX_KEYS`] keys) to `{}`, the walk stops at depth [`MAX_DEPTH`], and a pair
//! reports at most [`MAX_DIFF_PATHS`] paths, then `(more)`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::HeaderMap;
use serde_json::Value;
use std::hash::Hasher;
use understudy_wire::{
    AnswerDiff, CompareMode, DiffKind, DigestReason, FieldDifference, MAX_DIFF_PATHS,
};

/// The largest body kept for a field comparison; a larger one is compared by digest.
pub(crate) const MAX_BODY: usize = 256 * 1024;
/// Bytes of answer bodies a service keeps at once for open pairs (each pair may wait for a
/// queued copy): past it, new answers are compared by digest.
pub(crate) const SERVICE_BODY_BUDGET: usize = 64 * 1024 * 1024;
const MAX_DEPTH: usize = 8;
const MAX_KEYS: usize = 32;
const SAMPLE_CHARS: usize = 80;

/// How a routing table compares the answers of its pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Comparison {
    pub mode: CompareMode,
    /// Lower-case header names compared as `header:NAME` (fields mode).
    pub headers: Arc<[String]>,
}

impl Comparison {
    /// What is to be kept of an answer: nothing (status only), a digest, or the answer, with
    /// the compared headers' values (`headers` reads them, in fields mode only).
    pub(crate) fn capture(
        &self,
        budget: &Arc<CaptureBudget>,
        headers: impl FnOnce(&[String]) -> Vec<Option<String>>,
    ) -> Capture {
        match self.mode {
            CompareMode::Status => Capture::Nothing,
            CompareMode::Body => Capture::Digest(BodyDigest::new()),
            CompareMode::Fields => Capture::Fields(FieldCapture {
                body: Vec::new(),
                digest: BodyDigest::new(),
                fallback: None,
                hold: Hold {
                    budget: budget.clone(),
                    bytes: 0,
                },
                headers: headers(&self.headers),
            }),
        }
    }
}

/// The values of the headers `names` (lower case) in a parsed header map.
pub(crate) fn header_values(map: &HeaderMap, names: &[String]) -> Vec<Option<String>> {
    names
        .iter()
        .map(|name| {
            map.get(name.as_str())
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        })
        .collect()
}

/// The values of the headers `names` (lower case) in an answer's raw head (a head that does
/// not parse has none of them).
pub(crate) fn head_values(head: &[u8], names: &[String]) -> Vec<Option<String>> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut answer = httparse::Response::new(&mut slots);
    let parsed = matches!(answer.parse(head), Ok(httparse::Status::Complete(_)));
    names
        .iter()
        .map(|name| {
            let header = answer
                .headers
                .iter()
                .filter(|_| parsed)
                .find(|h| h.name.eq_ignore_ascii_case(name))?;
            Some(String::from_utf8_lossy(header.value).into_owned())
        })
        .collect()
}

/// Bytes of bodies held by a service's open pairs.
#[derive(Debug)]
pub(crate) struct CaptureBudget {
    held: AtomicUsize,
    limit: usize,
}

impl CaptureBudget {
    pub(crate) fn new(limit: usize) -> Self {
        CaptureBudget {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= self.limit).then_some(held + bytes)
            })
            .is_ok()
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// Bytes taken from a budget, given back when dropped (the pair closed).
#[derive(Debug)]
struct Hold {
    budget: Arc<CaptureBudget>,
    bytes: usize,
}

impl Hold {
    fn take(&mut self, bytes: usize) -> bool {
        let taken = self.budget.take(bytes);
        if taken {
            self.bytes += bytes;
        }
        taken
    }

    fn release(&mut self) {
        self.budget
            .held
            .fetch_sub(std::mem::take(&mut self.bytes), Ordering::AcqRel);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

/// An answer being read, as its comparison needs it.
pub(crate) enum Capture {
    Nothing,
    Digest(BodyDigest),
    Fields(FieldCapture),
}

pub(crate) struct FieldCapture {
    body: Vec<u8>,
    digest: BodyDigest,
    /// Why the body is no longer kept (then only its digest is).
    fallback: Option<DigestReason>,
    hold: Hold,
    headers: Vec<Option<String>>,
}

impl Capture {
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        match self {
            Capture::Nothing => {}
            Capture::Digest(digest) => digest.update(chunk),
            Capture::Fields(c) => {
                c.digest.update(chunk);
                if c.fallback.is_some() {
                    return;
                }
                let reason = if c.body.len() + chunk.len() > MAX_BODY {
                    Some(DigestReason::TooLarge)
                } else if !c.hold.take(chunk.len()) {
                    Some(DigestReason::OverBudget)
                } else {
                    None
                };
                match reason {
                    None => c.body.extend_from_slice(chunk),
                    Some(reason) => {
                        c.fallback = Some(reason);
                        c.body = Vec::new();
                        c.hold.release();
                    }
                }
            }
        }
    }

    pub(crate) fn finish(self) -> Kept {
        match self {
            Capture::Nothing => Kept::Nothing,
            Capture::Digest(digest) => Kept::Digest(digest.finish()),
            Capture::Fields(c) => {
                let digest = c.digest.finish();
                let body = match c.fallback {
                    Some(reason) => KeptBody::Digest(digest, reason),
                    None => KeptBody::Whole(c.body, digest),
                };
                Kept::Answer(Arc::new(KeptAnswer {
                    body,
                    headers: c.headers,
                    _hold: c.hold,
                }))
            }
        }
    }
}

/// What one side of a pair keeps of its answer until the pair is complete.
#[derive(Debug, Clone)]
pub(crate) enum Kept {
    Nothing,
    Digest(u64),
    Answer(Arc<KeptAnswer>),
}

impl Kept {
    pub(crate) fn digest(&self) -> Option<u64> {
        match self {
            Kept::Nothing => None,
            Kept::Digest(d) => Some(*d),
            Kept::Answer(a) => Some(a.body.digest()),
        }
    }
}

#[derive(Debug)]
pub(crate) struct KeptAnswer {
    body: KeptBody,
    /// The compared headers' values, in the comparison's order.
    headers: Vec<Option<String>>,
    _hold: Hold,
}

#[derive(Debug)]
enum KeptBody {
    Whole(Vec<u8>, u64),
    Digest(u64, DigestReason),
}

impl KeptBody {
    fn digest(&self) -> u64 {
        match self {
            KeptBody::Whole(_, d) | KeptBody::Digest(d, _) => *d,
        }
    }
}

/// One side of a pair as compared: its status and what was kept of its answer (none when it
/// failed).
pub(crate) struct Compared<'a> {
    pub status: Option<u16>,
    pub answer: Option<&'a KeptAnswer>,
}

/// The differences between the active answer and a copy's, field by field.
pub(crate) fn diff(active: Compared<'_>, copy: Compared<'_>, headers: &[String]) -> AnswerDiff {
    let mut paths = Paths::default();
    if active.status != copy.status {
        let text = |s: Option<u16>| s.map(|s| s.to_string());
        paths.add("(status)", text(active.status), text(copy.status));
    }
    for (i, name) in headers.iter().enumerate() {
        let value = |a: Option<&KeptAnswer>| {
            a.and_then(|a| a.headers.get(i).cloned().flatten())
                .map(|v| sample(&Value::String(v)))
        };
        let (a, c) = (value(active.answer), value(copy.answer));
        if a != c {
            paths.add(&format!("header:{name}"), a, c);
        }
    }
    let (kind, digest_reason) = match (active.answer, copy.answer) {
        (Some(a), Some(c)) => compare_bodies(&a.body, &c.body, &mut paths),
        // A side without an answer has no body to compare: its status already differs.
        _ => (DiffKind::Fields, None),
    };
    AnswerDiff {
        kind,
        digest_reason,
        paths: paths.finish(),
    }
}

fn compare_bodies(
    active: &KeptBody,
    copy: &KeptBody,
    paths: &mut Paths,
) -> (DiffKind, Option<DigestReason>) {
    let reason = match (active, copy) {
        (KeptBody::Whole(a, _), KeptBody::Whole(c, _)) => {
            if a.is_empty() && c.is_empty() {
                return (DiffKind::Fields, None);
            }
            match (json(a), json(c)) {
                (Some(a), Some(c)) => {
                    walk(&a, &c, "", 0, paths);
                    return (DiffKind::Fields, None);
                }
                _ => DigestReason::NotJson,
            }
        }
        (KeptBody::Digest(_, reason), _) | (_, KeptBody::Digest(_, reason)) => *reason,
    };
    if active.digest() != copy.digest() {
        paths.add("(body)", None, None);
    }
    (DiffKind::Digest, Some(reason))
}

fn json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// Compares two JSON values under `path`, adding each differing leaf (or subtree, past the
/// depth cap or where the types differ).
fn walk(a: &Value, c: &Value, path: &str, depth: usize, paths: &mut Paths) {
    if a == c || paths.full() {
        return;
    }
    if depth >= MAX_DEPTH {
        paths.add(&root(path), Some(sample(a)), Some(sample(c)));
        return;
    }
    match (a, c) {
        (Value::Object(a), Value::Object(c)) => {
            let collapse = a.len() > MAX_KEYS || c.len() > MAX_KEYS;
            let keys = a.keys().chain(c.keys().filter(|k| !a.contains_key(*k)));
            for key in keys {
                let child = if collapse || id_like(key) {
                    format!("{path}{{}}")
                } else if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                either(a.get(key), c.get(key), &child, depth, paths);
            }
        }
        (Value::Array(a), Value::Array(c)) => {
            let child = format!("{path}[]");
            for i in 0..a.len().max(c.len()) {
                either(a.get(i), c.get(i), &child, depth, paths);
            }
        }
        _ => paths.add(&root(path), Some(sample(a)), Some(sample(c))),
    }
}

fn either(a: Option<&Value>, c: Option<&Value>, path: &str, depth: usize, paths: &mut Paths) {
    match (a, c) {
        (Some(a), Some(c)) => walk(a, c, path, depth + 1, paths),
        (a, c) => paths.add(path, a.map(sample), c.map(sample)),
    }
}

/// The whole body's path.
fn root(path: &str) -> String {
    if path.is_empty() {
        "(root)".to_string()
    } else {
        path.to_string()
    }
}

/// An object key that names an instance rather than a field: all digits, a UUID, or long hex.
fn id_like(key: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.chars().all(|ch| ch.is_ascii_hexdigit());
    let digits = !key.is_empty() && key.chars().all(|ch| ch.is_ascii_digit());
    let groups: Vec<&str> = key.split('-').collect();
    let uuid = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g));
    digits || uuid || (key.len() >= 16 && hex(key))
}

/// A value as JSON text, cut to [`SAMPLE_CHARS`] characters.
fn sample(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= SAMPLE_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(SAMPLE_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The differing paths of one pair, first sample kept, capped.
#[derive(Default)]
struct Paths {
    found: Vec<FieldDifference>,
    more: bool,
}

impl Paths {
    fn full(&self) -> bool {
        self.more
    }

    fn add(&mut self, path: &str, active: Option<String>, simulation: Option<String>) {
        if self.found.iter().any(|f| f.path == path) {
            return;
        }
        if self.found.len() >= MAX_DIFF_PATHS {
            self.more = true;
            return;
        }
        self.found.push(FieldDifference {
            path: path.to_string(),
            active,
            simulation,
        });
    }

    fn finish(mut self) -> Vec<FieldDifference> {
        if self.more {
            self.found.push(FieldDifference {
                path: "(more)".to_string(),
                active: None,
                simulation: None,
            });
        }
        self.found
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
#[path = "fields_tests.rs"]
mod tests;
