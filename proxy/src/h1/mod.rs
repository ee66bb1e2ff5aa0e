//! HTTP/1.1 forwarding, the way a reverse proxy moves a job: message heads are parsed with
//! `httparse` and forwarded as bytes, bodies pass through with their boundaries tracked.
//!
//! What a machine or a caller receives is *written from what was parsed*, never copied: the
//! request line and status line are rebuilt, hop-by-hop headers (and what `Connection` names)
//! are dropped, the framing headers are written from the parsed framing (`content-length: N` or
//! exactly `transfer-encoding: chunked`), chunk-size lines are rewritten without extensions and
//! trailers are checked and dropped. Anything that two parsers could read two ways (RFC 9112
//! section 11.2, request smuggling) is refused by name: both Content-Length and
//! Transfer-Encoding, differing lengths, a coding other than one `chunked`, `Connection` naming a
//! framing or Understudy header, a target not in origin form, bare CR or LF, obs-fold.
//!
//! Why not pingora's (or hyper's) HTTP sessions: they build header maps for both directions and
//! clone them, about 46 allocations and 30,000 instructions per job in callgrind, where nginx
//! forwards bytes; measured, that kept the balancer below nginx's throughput (docs/benchmarks.md,
//! ARCHITECTURE.md). Nothing here does I/O: these are functions over buffers, driven by
//! proxy.rs, so every framing rule is unit-tested with arbitrary splits of the bytes.

mod answer;
mod body;
mod chunked;
#[cfg(test)]
mod props;
mod request;

pub(crate) use answer::{parse_answer, Answer, AnswerTo};
pub(crate) use body::{BodyRelay, Output};
pub(crate) use request::{copy_parts, end_request_head, parse_request, Request};

use http::Method;

/// The largest message head accepted (request line or status line and headers).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// The most headers one `Connection` field list may name.
const MAX_NOMINATED: usize = 16;
/// The most trailer bytes after a chunked body.
pub(crate) const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a message cannot be forwarded. Each is a status the caller gets (see [`H1Error::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("malformed message head: {0}")]
    Malformed(String),
    #[error("message head larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("both Content-Length and Transfer-Encoding: the body's length is ambiguous")]
    AmbiguousLength,
    #[error("invalid Content-Length {0:?}")]
    BadLength(String),
    #[error("unsupported Transfer-Encoding {0:?} (only one chunked coding)")]
    UnsupportedCoding(String),
    #[error("invalid Transfer-Encoding {0:?}: {1}")]
    BadCoding(String, &'static str),
    #[error("the {0} method is not proxied (a balancer of jobs does not tunnel)")]
    UnsupportedMethod(Method),
    #[error("request target {0:?} is not in origin form (a path starting with '/')")]
    BadTarget(String),
    #[error("Connection names {0:?}, which is end-to-end (framing, Host or an Understudy header)")]
    ProtectedNomination(String),
    #[error("Connection names more than {MAX_NOMINATED} headers")]
    TooManyNominations,
    #[error("{0}")]
    BadHost(&'static str),
    #[error("header {0} appears more than once")]
    Repeated(&'static str),
    #[error("status {0} is not a final or interim HTTP status (100-599)")]
    BadStatus(u16),
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    #[error("trailers larger than {MAX_TRAILER_BYTES} bytes")]
    TrailersTooLarge,
}

impl H1Error {
    /// The status of the refusal a caller gets for its request.
    pub(crate) fn status(&self) -> u16 {
        match self {
            H1Error::HeadTooLarge => 431,
            H1Error::UnsupportedMethod(_) => 405,
            H1Error::UnsupportedCoding(_) => 501,
            _ => 400,
        }
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes (answers only).
    UntilClose,
}

/// The headers the balancer reads, writes itself or drops, each recognised with at most two
/// comparisons (by length first): this runs for every header of every job in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Connection,
    /// Of one connection, never forwarded (RFC 9110 7.6.1): `Keep-Alive`, `Proxy-Connection`,
    /// `TE`, `Trailer`, and `Upgrade` (not tunnelled).
    HopByHop,
    /// Answered by the balancer, not forwarded.
    Expect,
    Host,
    ContentLength,
    TransferEncoding,
    Session,
    SessionEvent,
    Simulation,
    SimulationAuth,
    Other,
}

impl Known {
    /// Headers that `Connection` may not name: dropping them on one hop would change how the
    /// next hop frames, addresses or routes the message.
    fn is_end_to_end(self) -> bool {
        !matches!(self, Known::Other | Known::HopByHop | Known::Connection)
    }
}

fn known(name: &[u8]) -> Known {
    use crate::marker::{SIMULATION_AUTH_HEADER, SIMULATION_HEADER};
    use crate::proxy::{SESSION_EVENT_HEADER, SESSION_HEADER};
    let is = |candidate: &str| name.eq_ignore_ascii_case(candidate.as_bytes());
    match name.len() {
        2 if is("te") => Known::HopByHop,
        4 if is("host") => Known::Host,
        6 if is("expect") => Known::Expect,
        7 if is("trailer") || is("upgrade") => Known::HopByHop,
        10 if is("connection") => Known::Connection,
        10 if is("keep-alive") => Known::HopByHop,
        14 if is("content-length") => Known::ContentLength,
        16 if is("proxy-connection") => Known::HopByHop,
        17 if is("transfer-encoding") => Known::TransferEncoding,
        n if n == SESSION_HEADER.len() && is(SESSION_HEADER) => Known::Session,
        n if n == SESSION_EVENT_HEADER.len() && is(SESSION_EVENT_HEADER) => Known::SessionEvent,
        n if n == SIMULATION_HEADER.len() && is(SIMULATION_HEADER) => Known::Simulation,
        n if n == SIMULATION_AUTH_HEADER.len() && is(SIMULATION_AUTH_HEADER) => {
            Known::SimulationAuth
        }
        _ => Known::Other,
    }
}

/// Whether a name is one of Understudy's own (`x-understudy-...`): reserved for the balancers.
fn is_understudy_name(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-understudy-";
    name.len() >= PREFIX.len() && name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
}

/// What one pass over a head's headers finds: each header's kind, the `Connection` tokens (the
/// headers they name are hop-by-hop too) and the framing headers.
struct HeadFacts<'a> {
    kinds: [Known; MAX_HEADERS],
    nominated: [&'a [u8]; MAX_NOMINATED],
    nominated_count: usize,
    close: bool,
    keep_alive: bool,
    length: Option<u64>,
    /// Transfer-Encoding present, and its codings are exactly one `chunked`.
    coding: Option<Result<(), H1Error>>,
    hosts: usize,
}

impl<'a> HeadFacts<'a> {
    /// `strict`: a request, where `Connection` naming an end-to-end header is refused (an
    /// answer's nominations are only dropped: its framing is written by the balancer anyway).
    fn of(headers: &[httparse::Header<'a>], strict: bool) -> Result<Self, H1Error> {
        let mut facts = HeadFacts {
            kinds: [Known::Other; MAX_HEADERS],
            nominated: [&[]; MAX_NOMINATED],
            nominated_count: 0,
            close: false,
            keep_alive: false,
            length: None,
            coding: None,
            hosts: 0,
        };
        let mut codings = Codings::default();
        for (i, header) in headers.iter().enumerate() {
            let kind = known(header.name.as_bytes());
            facts.kinds[i] = kind;
            match kind {
                Known::Connection => facts.nominate(header.value, strict)?,
                Known::ContentLength => facts.length(header.value)?,
                Known::TransferEncoding => codings.add(header.value),
                Known::Host => facts.hosts += 1,
                _ => {}
            }
        }
        if codings.seen {
            facts.coding = Some(codings.verdict());
        }
        Ok(facts)
    }

    fn nominate(&mut self, value: &'a [u8], strict: bool) -> Result<(), H1Error> {
        for token in value.split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.is_empty() {
            } else if strict && (known(token).is_end_to_end() || is_understudy_name(token)) {
                return Err(H1Error::ProtectedNomination(
                    String::from_utf8_lossy(token).into_owned(),
                ));
            } else if self.nominated_count == MAX_NOMINATED {
                return Err(H1Error::TooManyNominations);
            } else {
                self.nominated[self.nominated_count] = token;
                self.nominated_count += 1;
            }
        }
        Ok(())
    }

    /// Identical repeats (also comma-joined) are one length; differing ones are refused.
    fn length(&mut self, value: &[u8]) -> Result<(), H1Error> {
        let bad = || H1Error::BadLength(String::from_utf8_lossy(value).into());
        for part in value.split(|b| *b == b',') {
            let digits = part.trim_ascii();
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            let value = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if self.length.is_some_and(|l| l != value) {
                return Err(bad());
            }
            self.length = Some(value);
        }
        Ok(())
    }

    /// Whether the `i`th header stays on this hop.
    fn is_hop_by_hop(&self, i: usize, name: &str) -> bool {
        match self.kinds[i] {
            Known::Connection | Known::HopByHop | Known::Expect => true,
            _ => self.nominated[..self.nominated_count]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes())),
        }
    }

    /// The body framing given by `Content-Length` and `Transfer-Encoding` (RFC 9112 6.1-6.3).
    /// `answer`: an answer without either ends at close; a request without either is empty.
    fn framing(&self, answer: bool) -> Result<Framing, H1Error> {
        match (&self.coding, self.length) {
            (Some(_), Some(_)) => Err(H1Error::AmbiguousLength),
            (Some(Ok(())), None) => Ok(Framing::Chunked),
            (Some(Err(e)), None) => Err(e.clone()),
            (None, Some(0)) => Ok(Framing::Empty),
            (None, Some(n)) => Ok(Framing::Length(n)),
            (None, None) if answer => Ok(Framing::UntilClose),
            (None, None) => Ok(Framing::Empty),
        }
    }
}

/// The codings of every `Transfer-Encoding` field of a message, as one list.
#[derive(Default)]
struct Codings {
    seen: bool,
    chunked: usize,
    other: Option<String>,
    empty: bool,
    all: String,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for coding in value.split(|b| *b == b',') {
            let coding = coding.trim_ascii();
            if !self.all.is_empty() {
                self.all.push_str(", ");
            }
            self.all.push_str(&String::from_utf8_lossy(coding));
            if coding.is_empty() {
                self.empty = true;
            } else if coding.eq_ignore_ascii_case(b"chunked") {
                self.chunked += 1;
            } else if self.other.is_none() {
                self.other = Some(String::from_utf8_lossy(coding).into_owned());
            }
        }
    }

    /// Exactly one `chunked` and nothing else is accepted.
    fn verdict(&self) -> Result<(), H1Error> {
        if self.other.is_some() {
            return Err(H1Error::UnsupportedCoding(self.all.clone()));
        }
        if self.empty {
            return Err(H1Error::BadCoding(self.all.clone(), "an empty coding"));
        }
        if self.chunked > 1 {
            return Err(H1Error::BadCoding(
                self.all.clone(),
                "chunked applied more than once",
            ));
        }
        Ok(())
    }
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `content-length: n` (no allocation: this runs per job).
fn write_length(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    write_header(out, "content-length", &digits[at..]);
}

/// Writes the framing header of a message about to be sent with `framing` (none for an empty
/// body unless the sender gave a zero length, none for a body that ends at close).
fn write_framing(out: &mut Vec<u8>, framing: Framing, zero_length: bool) {
    match framing {
        Framing::Length(n) => write_length(out, n),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty if zero_length => out.extend_from_slice(b"content-length: 0\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
}

/// The length of a parsed head; `None` while it is incomplete and may still fit.
fn head_length(parsed: httparse::Result<usize>, buf: &[u8]) -> Result<Option<usize>, H1Error> {
    match parsed {
        // A head that arrived whole in one read is held to the same limit.
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(H1Error::HeadTooLarge),
        Err(e) => Err(H1Error::Malformed(e.to_string())),
    }
}

/// A short answer the balancer writes itself (refusals, error pages). The caller's connection is
/// closed after it unless `keep_alive`.
pub(crate) fn own_answer(
    out: &mut Vec<u8>,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    keep_alive: bool,
) {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    if let Some(content_type) = content_type {
        write_header(out, "content-type", content_type.as_bytes());
    }
    write_length(out, body.len() as u64);
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_answers_are_complete_messages() {
        let mut out = Vec::new();
        own_answer(&mut out, 503, Some("application/json"), b"{}", false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: 2\r\nconnection: close\r\n\r\n{}"
        );
    }

    #[test]
    fn lengths_are_written_in_decimal() {
        for n in [0u64, 7, 10, 1234567, u64::MAX] {
            let mut out = Vec::new();
            write_length(&mut out, n);
            assert_eq!(out, format!("content-length: {n}\r\n").into_bytes());
        }
    }

    #[test]
    fn one_chunked_coding_is_the_only_transfer_encoding() {
        let verdict = |values: &[&str]| {
            let mut codings = Codings::default();
            for v in values {
                codings.add(v.as_bytes());
            }
            codings.verdict()
        };
        assert_eq!(verdict(&["chunked"]), Ok(()));
        assert_eq!(verdict(&[" Chunked "]), Ok(()));
        assert!(matches!(
            verdict(&["chunked, chunked"]),
            Err(H1Error::BadCoding(..))
        ));
        assert!(matches!(
            verdict(&["chunked", "chunked"]),
            Err(H1Error::BadCoding(..))
        ));
        assert!(matches!(
            verdict(&["identity, chunked"]),
            Err(H1Error::UnsupportedCoding(_))
        ));
        assert!(matches!(
            verdict(&["gzip", "chunked"]),
            Err(H1Error::UnsupportedCoding(_))
        ));
        assert!(matches!(verdict(&[""]), Err(H1Error::BadCoding(..))));
        assert!(matches!(
            verdict(&["chunked,"]),
            Err(H1Error::BadCoding(..))
        ));
    }
}
