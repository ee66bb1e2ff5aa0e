//! HTTP/1.1 forwarding, the way a reverse proxy moves a job: message heads are parsed with
//! `httparse` and forwarded as bytes (minus the hop-by-hop headers, plus `Connection: close` when
//! the balancer will close), bodies pass through with their own framing (Content-Length or
//! chunked, chunk boundaries tracked so that the message's end is known).
//!
//! Why not pingora's (or hyper's) HTTP sessions: they build header maps for both directions and
//! clone them, about 46 allocations and 30,000 instructions per job in callgrind, where nginx
//! forwards bytes; measured, that kept the balancer below nginx's throughput (docs/benchmarks.md,
//! ARCHITECTURE.md). Nothing here does I/O: these are functions over buffers, driven by
//! proxy.rs, so every framing rule is unit-tested with arbitrary splits of the bytes.

use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// The largest message head accepted (request line or status line and headers).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// The most trailer bytes after a chunked body.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a message cannot be forwarded.
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
    #[error("unsupported Transfer-Encoding {0:?} (only chunked)")]
    UnsupportedCoding(String),
    #[error("the {0} method is not proxied (a balancer of jobs does not tunnel)")]
    UnsupportedMethod(Method),
    #[error("malformed chunked body")]
    BadChunk,
    #[error("trailers larger than {MAX_TRAILER_BYTES} bytes")]
    TrailersTooLarge,
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

/// What the balancer needs from a caller's request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// Bytes of the head at the start of the buffer.
    pub head_len: usize,
    pub method: Method,
    pub framing: Framing,
    /// The caller wants the connection kept open after this job.
    pub keep_alive: bool,
    /// An HTTP/1.0 caller: keep-alive must be said in the answer.
    pub http10: bool,
    pub expect_continue: bool,
    pub session: Option<String>,
    pub session_end: bool,
    pub simulation: bool,
}

/// What the balancer needs from a machine's answer head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The machine's connection can carry another job after this answer.
    pub reusable: bool,
    /// The caller's connection stays open after this answer (`Connection: close` was written
    /// otherwise).
    pub caller_keep_alive: bool,
}

/// The headers the balancer reads or drops, each recognised with at most two comparisons (by
/// length first): this runs for every header of every job in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Connection,
    /// Of one connection, never forwarded (RFC 9110 7.6.1): `Keep-Alive`, `Proxy-Connection`,
    /// `TE`, `Trailer`, and `Upgrade` (not tunnelled).
    HopByHop,
    /// Answered by the balancer, not forwarded.
    Expect,
    ContentLength,
    TransferEncoding,
    Session,
    SessionEvent,
    Simulation,
    Other,
}

fn known(name: &str) -> Known {
    use crate::mirror::SIMULATION_HEADER;
    use crate::proxy::{SESSION_EVENT_HEADER, SESSION_HEADER};
    let is = |candidate: &str| name.eq_ignore_ascii_case(candidate);
    match name.len() {
        2 if is("te") => Known::HopByHop,
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
        _ => Known::Other,
    }
}

/// What one pass over a head's headers finds: each header's kind, the `Connection` tokens (the
/// headers they name are hop-by-hop too) and the framing headers.
struct HeadFacts<'a> {
    kinds: [Known; MAX_HEADERS],
    nominated: [&'a [u8]; 8],
    nominated_count: usize,
    close: bool,
    keep_alive: bool,
    length: Option<u64>,
    coding: Option<&'a [u8]>,
}

impl<'a> HeadFacts<'a> {
    fn of(headers: &[httparse::Header<'a>]) -> Result<Self, H1Error> {
        let mut facts = HeadFacts {
            kinds: [Known::Other; MAX_HEADERS],
            nominated: [&[]; 8],
            nominated_count: 0,
            close: false,
            keep_alive: false,
            length: None,
            coding: None,
        };
        for (header, kind) in headers.iter().zip(facts.kinds.iter_mut()) {
            *kind = known(header.name);
            match *kind {
                Known::Connection => {
                    for token in header.value.split(|b| *b == b',') {
                        let token = token.trim_ascii();
                        if token.eq_ignore_ascii_case(b"close") {
                            facts.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            facts.keep_alive = true;
                        } else if !token.is_empty() && facts.nominated_count < facts.nominated.len()
                        {
                            facts.nominated[facts.nominated_count] = token;
                            facts.nominated_count += 1;
                        }
                    }
                }
                Known::ContentLength => {
                    // Identical repeats (also comma-joined) are one length; differing ones are
                    // refused.
                    let bad = || H1Error::BadLength(String::from_utf8_lossy(header.value).into());
                    for part in header.value.split(|b| *b == b',') {
                        let digits = part.trim_ascii();
                        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                            return Err(bad());
                        }
                        let value = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|d| d.parse::<u64>().ok())
                            .ok_or_else(bad)?;
                        if facts.length.is_some_and(|l| l != value) {
                            return Err(bad());
                        }
                        facts.length = Some(value);
                    }
                }
                Known::TransferEncoding => {
                    // The last coding decides; several headers are one comma-separated list.
                    if let Some(last) = header.value.rsplit(|b| *b == b',').next() {
                        facts.coding = Some(last.trim_ascii());
                    }
                }
                _ => {}
            }
        }
        Ok(facts)
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
    /// `answer`: an answer may end at close; a request with an unknown length is refused.
    fn framing(&self, answer: bool) -> Result<Framing, H1Error> {
        match (self.coding, self.length) {
            (Some(_), Some(_)) => Err(H1Error::AmbiguousLength),
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
            (Some(_), None) if answer => Ok(Framing::UntilClose),
            (Some(c), None) => Err(H1Error::UnsupportedCoding(
                String::from_utf8_lossy(c).into_owned(),
            )),
            (None, Some(0)) => Ok(Framing::Empty),
            (None, Some(n)) => Ok(Framing::Length(n)),
            (None, None) if answer => Ok(Framing::UntilClose),
            (None, None) => Ok(Framing::Empty),
        }
    }
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The length of a parsed head; `None` while it is incomplete and may still fit.
fn head_length(parsed: httparse::Result<usize>, buf: &[u8]) -> Result<Option<usize>, H1Error> {
    match parsed {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(H1Error::HeadTooLarge),
        Err(e) => Err(H1Error::Malformed(e.to_string())),
    }
}

/// Parses a caller's request head at the start of `buf` and writes the head its machine gets
/// into `out`. `Ok(None)`: the head is not complete yet.
pub(crate) fn parse_request(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<Request>, H1Error> {
    let mut slots: [MaybeUninit<httparse::Header>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let Some(head_len) = head_length(request.parse_with_uninit_headers(buf, &mut slots), buf)?
    else {
        return Ok(None);
    };
    let (Some(method), Some(path), Some(minor)) = (request.method, request.path, request.version)
    else {
        return Err(H1Error::Malformed("incomplete request line".into()));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| H1Error::Malformed(format!("method {method:?}")))?;
    if method == Method::CONNECT {
        return Err(H1Error::UnsupportedMethod(method));
    }
    let headers = &*request.headers;
    let facts = HeadFacts::of(headers)?;
    let framing = facts.framing(false)?;

    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut parsed = Request {
        head_len,
        method,
        framing,
        keep_alive: if minor == 0 {
            facts.keep_alive
        } else {
            !facts.close
        },
        http10: minor == 0,
        expect_continue: false,
        session: None,
        session_end: false,
        simulation: false,
    };
    for (i, header) in headers.iter().enumerate() {
        match facts.kinds[i] {
            Known::Expect => {
                parsed.expect_continue = header.value.eq_ignore_ascii_case(b"100-continue")
            }
            Known::Session => {
                parsed.session = std::str::from_utf8(header.value).ok().map(str::to_owned)
            }
            Known::SessionEvent => parsed.session_end = header.value == b"end",
            Known::Simulation => parsed.simulation = true,
            _ => {}
        }
        if !facts.is_hop_by_hop(i, header.name) {
            write_header(out, header.name, header.value);
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(parsed))
}

/// The parts of a request head a copy is made of: method, path and query, and all headers.
pub(crate) fn copy_parts(head: &[u8]) -> Result<(Method, String, HeaderMap), H1Error> {
    let mut slots: [MaybeUninit<httparse::Header>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(H1Error::Malformed("copy of an unparsable head".into())),
    }
    let method = Method::from_bytes(request.method.unwrap_or("GET").as_bytes())
        .map_err(|e| H1Error::Malformed(e.to_string()))?;
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) {
            headers.append(name, value);
        }
    }
    Ok((method, request.path.unwrap_or("/").to_owned(), headers))
}

/// The request an answer is for, as far as its head is concerned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AnswerTo {
    /// A HEAD request: the answer has no body whatever its headers say.
    pub head: bool,
    /// The caller's connection may stay open after the answer.
    pub keep_alive: bool,
    /// An HTTP/1.0 caller, told `Connection: keep-alive` when its connection stays open.
    pub http10: bool,
}

/// Parses a machine's answer head at the start of `buf`. Interim answers (1xx) come back with
/// `status` < 200 and nothing written: the caller skips them. Otherwise the head the caller gets
/// is written into `out`, with `Connection: close` when the caller's connection will be closed
/// (it asked to, or the answer ends at close). `Ok(None)`: not complete yet.
pub(crate) fn parse_answer(
    buf: &[u8],
    to: AnswerTo,
    out: &mut Vec<u8>,
) -> Result<Option<Answer>, H1Error> {
    let (head_request, caller_keep_alive) = (to.head, to.keep_alive);
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut answer = httparse::Response::new(&mut slots);
    let Some(head_len) = head_length(answer.parse(buf), buf)? else {
        return Ok(None);
    };
    let (Some(status), Some(minor)) = (answer.code, answer.version) else {
        return Err(H1Error::Malformed("incomplete status line".into()));
    };
    if (100..200).contains(&status) {
        if status == 101 {
            return Err(H1Error::Malformed(
                "101 Switching Protocols to a request that asked for no upgrade".into(),
            ));
        }
        return Ok(Some(Answer {
            head_len,
            status,
            framing: Framing::Empty,
            reusable: true,
            caller_keep_alive,
        }));
    }
    let headers = &*answer.headers;
    let facts = HeadFacts::of(headers)?;
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        facts.framing(true)?
    };
    let machine_keeps = if minor == 0 {
        facts.keep_alive
    } else {
        !facts.close
    };
    let caller_keep_alive = caller_keep_alive && framing != Framing::UntilClose;

    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse guarantees three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(answer.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (i, header) in headers.iter().enumerate() {
        if !facts.is_hop_by_hop(i, header.name) {
            write_header(out, header.name, header.value);
        }
    }
    if !caller_keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if to.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Answer {
        head_len,
        status,
        framing,
        reusable: machine_keeps && framing != Framing::UntilClose,
        caller_keep_alive,
    }))
}

/// Where a body relay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes seen so far.
    Trailers(usize),
}

/// Moves one message body from an input buffer to an output buffer, byte for byte in its own
/// framing, and tells when the body ended. The data bytes (without chunk framing) are handed to
/// a callback: the copy and the answer digest are made of them.
#[derive(Debug)]
pub(crate) struct BodyRelay {
    framing: Framing,
    remaining: u64,
    chunk: ChunkState,
    done: bool,
}

impl BodyRelay {
    pub(crate) fn new(framing: Framing) -> Self {
        BodyRelay {
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunk: ChunkState::Size,
            done: framing == Framing::Empty,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The sender closed: a body delimited by close ends here; any other is cut short.
    pub(crate) fn end_of_input(&mut self) -> bool {
        if self.framing == Framing::UntilClose {
            self.done = true;
        }
        self.done
    }

    /// Moves what `input` holds of the body to `out` (and its data to `data`), consuming it.
    /// Bytes after the body's end stay in `input` (a pipelined next message).
    pub(crate) fn relay(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
        mut data: impl FnMut(&[u8]),
    ) -> Result<(), H1Error> {
        while !self.done && !input.is_empty() {
            match self.framing {
                Framing::Empty => self.done = true,
                Framing::Length(_) => {
                    let take = input
                        .len()
                        .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    data(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input.advance(take);
                    self.remaining -= take as u64;
                    self.done = self.remaining == 0;
                }
                Framing::UntilClose => {
                    data(input);
                    out.extend_from_slice(input);
                    input.clear();
                }
                Framing::Chunked => {
                    if !self.relay_chunked(input, out, &mut data)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// One step of a chunked body; false when `input` holds too little to go on.
    fn relay_chunked(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
        data: &mut impl FnMut(&[u8]),
    ) -> Result<bool, H1Error> {
        match self.chunk {
            ChunkState::Size => match httparse::parse_chunk_size(input) {
                Ok(httparse::Status::Complete((line, size))) => {
                    out.extend_from_slice(&input[..line]);
                    input.advance(line);
                    self.chunk = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                Ok(httparse::Status::Partial) if input.len() > 1024 => {
                    return Err(H1Error::BadChunk)
                }
                Ok(httparse::Status::Partial) => return Ok(false),
                Err(_) => return Err(H1Error::BadChunk),
            },
            ChunkState::Data(left) => {
                let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                data(&input[..take]);
                out.extend_from_slice(&input[..take]);
                input.advance(take);
                let left = left - take as u64;
                self.chunk = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                };
            }
            ChunkState::DataEnd => {
                if input.len() < 2 {
                    return Ok(false);
                }
                if &input[..2] != b"\r\n" {
                    return Err(H1Error::BadChunk);
                }
                out.extend_from_slice(b"\r\n");
                input.advance(2);
                self.chunk = ChunkState::Size;
            }
            ChunkState::Trailers(seen) => {
                let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
                    if seen + input.len() > MAX_TRAILER_BYTES {
                        return Err(H1Error::TrailersTooLarge);
                    }
                    return Ok(false);
                };
                let line = end + 2;
                if seen + line > MAX_TRAILER_BYTES {
                    return Err(H1Error::TrailersTooLarge);
                }
                out.extend_from_slice(&input[..line]);
                input.advance(line);
                if end == 0 {
                    self.done = true;
                } else {
                    self.chunk = ChunkState::Trailers(seen + line);
                }
            }
        }
        Ok(true)
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
    write_header(out, "content-length", body.len().to_string().as_bytes());
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> (Result<Option<Request>, H1Error>, String) {
        let mut out = Vec::new();
        let parsed = parse_request(raw.as_bytes(), &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_request_is_forwarded_without_its_hop_by_hop_headers() {
        let (parsed, out) = request(
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Trace\r\nX-Trace: 1\r\n\
             Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nx-session-id: call-7\r\n\
             x-session-event: end\r\nAccept: */*\r\n\r\n",
        );
        let parsed = parsed.unwrap().unwrap();
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nx-session-id: call-7\r\nx-session-event: end\r\n\
             Accept: */*\r\n\r\n"
        );
        assert_eq!(parsed.method, Method::GET);
        assert_eq!(parsed.framing, Framing::Empty);
        assert!(parsed.keep_alive);
        assert_eq!(parsed.session.as_deref(), Some("call-7"));
        assert!(parsed.session_end);
        assert!(!parsed.simulation);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let close = request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").0;
        assert!(!close.unwrap().unwrap().keep_alive);
        let old = request("GET / HTTP/1.0\r\n\r\n").0;
        assert!(!old.unwrap().unwrap().keep_alive);
        let old_kept = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(old_kept.0.unwrap().unwrap().keep_alive);
        // The machine always gets HTTP/1.1 (its connection is kept for the next job).
        assert!(old_kept.1.starts_with("GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn request_bodies_are_framed_by_length_or_chunks() {
        let length = request("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").0;
        let length = length.unwrap().unwrap();
        assert_eq!(length.framing, Framing::Length(5));
        assert_eq!(length.head_len, 38);
        let chunked = request("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").0;
        assert_eq!(chunked.unwrap().unwrap().framing, Framing::Chunked);
        let expect =
            request("POST / HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n");
        assert!(expect.0.unwrap().unwrap().expect_continue);
        assert!(!expect.1.to_ascii_lowercase().contains("expect"));
    }

    #[test]
    fn ambiguous_or_bad_framing_is_refused_by_name() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(request(both).0, Err(H1Error::AmbiguousLength));
        let differing = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(request(differing).0, Err(H1Error::BadLength(_))));
        let same = "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n";
        assert_eq!(
            request(same).0.unwrap().unwrap().framing,
            Framing::Length(3)
        );
        let signed = "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n";
        assert!(matches!(request(signed).0, Err(H1Error::BadLength(_))));
        let gzip = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert!(matches!(
            request(gzip).0,
            Err(H1Error::UnsupportedCoding(_))
        ));
        let connect = "CONNECT x:443 HTTP/1.1\r\n\r\n";
        assert!(matches!(
            request(connect).0,
            Err(H1Error::UnsupportedMethod(_))
        ));
        assert!(matches!(
            request("GET\r\n\r\n").0,
            Err(H1Error::Malformed(_))
        ));
    }

    #[test]
    fn an_incomplete_head_asks_for_more_until_it_is_too_large() {
        assert_eq!(request("GET / HTTP/1.1\r\nHost: x\r\n").0, Ok(None));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(request(&huge).0, Err(H1Error::HeadTooLarge));
    }

    #[test]
    fn the_simulation_header_is_seen_and_forwarded() {
        let (parsed, out) = request("GET / HTTP/1.1\r\nx-understudy-simulation: 1\r\n\r\n");
        assert!(parsed.unwrap().unwrap().simulation);
        assert!(out.contains("x-understudy-simulation: 1\r\n"));
    }

    #[test]
    fn copy_parts_keep_every_header() {
        let head = b"PUT /x?y HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-A: 1\r\n\r\n";
        let (method, path, headers) = copy_parts(head).unwrap();
        assert_eq!(method, Method::PUT);
        assert_eq!(path, "/x?y");
        assert_eq!(headers.len(), 3);
        assert_eq!(headers["x-a"], "1");
    }

    fn answer(raw: &str, head: bool, keep: bool) -> (Result<Option<Answer>, H1Error>, String) {
        let mut out = Vec::new();
        let to = AnswerTo {
            head,
            keep_alive: keep,
            http10: false,
        };
        let parsed = parse_answer(raw.as_bytes(), to, &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    #[test]
    fn an_answer_is_forwarded_and_its_framing_read() {
        let (parsed, out) = answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=4\r\nDate: d\r\n\r\nok",
            false,
            true,
        );
        let parsed = parsed.unwrap().unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: d\r\n\r\n"
        );
        assert_eq!(parsed.framing, Framing::Length(2));
        assert!(parsed.reusable && parsed.caller_keep_alive);
        assert_eq!(parsed.status, 200);
    }

    #[test]
    fn answers_without_a_body_and_answers_that_end_at_close() {
        let head = answer("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, true).0;
        assert_eq!(head.unwrap().unwrap().framing, Framing::Empty);
        let no_content = answer("HTTP/1.1 204 No Content\r\n\r\n", false, true).0;
        assert_eq!(no_content.unwrap().unwrap().framing, Framing::Empty);
        let (until_close, out) = answer("HTTP/1.0 200 OK\r\n\r\n", false, true);
        let until_close = until_close.unwrap().unwrap();
        assert_eq!(until_close.framing, Framing::UntilClose);
        assert!(!until_close.reusable && !until_close.caller_keep_alive);
        assert!(out.ends_with("connection: close\r\n\r\n"));
        let closing = answer(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
            true,
        )
        .0;
        let closing = closing.unwrap().unwrap();
        assert!(!closing.reusable && closing.caller_keep_alive);
        let mut out = Vec::new();
        let to_old_caller = AnswerTo {
            head: false,
            keep_alive: true,
            http10: true,
        };
        let kept = parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            to_old_caller,
            &mut out,
        );
        assert!(kept.unwrap().unwrap().caller_keep_alive);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("connection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn interim_answers_are_skipped_and_upgrades_refused() {
        let (interim, out) = answer("HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n", false, true);
        assert_eq!(interim.unwrap().unwrap().status, 103);
        assert!(out.is_empty());
        let upgrade = answer("HTTP/1.1 101 Switching Protocols\r\n\r\n", false, true).0;
        assert!(matches!(upgrade, Err(H1Error::Malformed(_))));
    }

    /// Relays `wire` split into pieces of the given sizes; returns what was written, the data
    /// seen, whether the body ended and what was left over.
    fn relay_in_pieces(
        framing: Framing,
        wire: &[u8],
        pieces: &[usize],
    ) -> (Vec<u8>, Vec<u8>, bool, Vec<u8>) {
        let mut relay = BodyRelay::new(framing);
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut data = Vec::new();
        let mut at = 0;
        for &size in pieces.iter().chain(std::iter::repeat(&usize::MAX)) {
            if at >= wire.len() {
                break;
            }
            let end = wire.len().min(at.saturating_add(size));
            input.extend_from_slice(&wire[at..end]);
            at = end;
            relay
                .relay(&mut input, &mut out, |d| data.extend_from_slice(d))
                .unwrap();
            if relay.is_done() {
                break;
            }
        }
        input.extend_from_slice(&wire[at..]);
        (out, data, relay.is_done(), input.to_vec())
    }

    /// A deterministic spread of split sizes (seeded LCG), so that every framing boundary is
    /// crossed by some split.
    fn splits(seed: u64, count: usize) -> Vec<usize> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (state >> 33) as usize % 7
            })
            .collect()
    }

    #[test]
    fn a_chunked_body_passes_through_whatever_the_splits() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        let body_len = wire.len() - b"GET /next".len();
        for seed in 0..200 {
            let (out, data, done, rest) =
                relay_in_pieces(Framing::Chunked, wire, &splits(seed, 64));
            assert!(done, "seed {seed}");
            assert_eq!(out, &wire[..body_len], "seed {seed}");
            assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.", "seed {seed}");
            assert_eq!(rest, b"GET /next", "seed {seed}");
        }
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_leaves_the_next_message() {
        for seed in 0..50 {
            let (out, data, done, rest) =
                relay_in_pieces(Framing::Length(5), b"helloGET /", &splits(seed, 16));
            assert!(done);
            assert_eq!(
                (out.as_slice(), data.as_slice()),
                (&b"hello"[..], &b"hello"[..])
            );
            assert_eq!(rest, b"GET /");
        }
        let (_, _, done, _) = relay_in_pieces(Framing::Length(9), b"hel", &[3]);
        assert!(!done, "three bytes of nine");
    }

    #[test]
    fn a_body_until_close_ends_only_at_close() {
        let mut relay = BodyRelay::new(Framing::UntilClose);
        let mut input = BytesMut::from(&b"abc"[..]);
        let mut out = Vec::new();
        relay.relay(&mut input, &mut out, |_| {}).unwrap();
        assert!(!relay.is_done());
        assert!(relay.end_of_input());
        assert!(
            !BodyRelay::new(Framing::Length(3)).end_of_input(),
            "cut short"
        );
        assert!(BodyRelay::new(Framing::Empty).is_done());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for wire in [&b"zz\r\n"[..], b"3\r\nabcXY", b"0\r\n"] {
            let mut relay = BodyRelay::new(Framing::Chunked);
            let mut input = BytesMut::from(wire);
            let result = relay.relay(&mut input, &mut Vec::new(), |_| {});
            if wire == b"0\r\n" {
                // The trailer section is not over yet: more input is needed, no error.
                assert_eq!(result, Ok(()));
                assert!(!relay.is_done());
            } else {
                assert_eq!(result, Err(H1Error::BadChunk), "{wire:?}");
            }
        }
        let mut relay = BodyRelay::new(Framing::Chunked);
        let mut huge = BytesMut::from(&b"0\r\n"[..]);
        huge.extend_from_slice(&vec![b'a'; MAX_TRAILER_BYTES + 1]);
        assert_eq!(
            relay.relay(&mut huge, &mut Vec::new(), |_| {}),
            Err(H1Error::TrailersTooLarge)
        );
    }

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
}
