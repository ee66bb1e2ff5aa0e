//! A caller's request head: parsed, checked, and written again for the machine.

use std::mem::MaybeUninit;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::MAX_HEADERS;
use super::{head_length, write_framing, write_header, Framing, H1Error, HeadFacts, Known};
use crate::marker::MarkerClaim;

/// What the balancer needs from a caller's request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// Bytes of the head at the start of the buffer.
    pub head_len: usize,
    pub method: Method,
    pub framing: Framing,
    /// `Content-Length: 0` was given (and is written again).
    pub zero_length: bool,
    /// The caller wants the connection kept open after this job.
    pub keep_alive: bool,
    /// An HTTP/1.0 caller: keep-alive must be said in the answer, no chunked answer, no 1xx.
    pub http10: bool,
    pub expect_continue: bool,
    /// `OPTIONS *`: served, never copied (a copy needs a path).
    pub asterisk: bool,
    /// An HTTP/1.0 request without Host: forwarded as HTTP/1.1, it gets an empty one (RFC 9112
    /// 3.2, for a target with no authority).
    pub host_missing: bool,
    pub session: Option<String>,
    pub session_end: bool,
    /// The caller claims the job is a simulation job (see `crate::marker`).
    pub marker: Option<MarkerClaim>,
}

/// Checks the request line: origin form, or `*` for OPTIONS; never CONNECT.
fn check_target(method: &Method, path: &str) -> Result<bool, H1Error> {
    if *method == Method::CONNECT {
        return Err(H1Error::UnsupportedMethod(method.clone()));
    }
    if path.starts_with('/') {
        return Ok(false);
    }
    if path == "*" && *method == Method::OPTIONS {
        return Ok(true);
    }
    Err(H1Error::BadTarget(path.chars().take(200).collect()))
}

/// Session ids are visible ASCII (they key the balancer's pins and show in its status).
fn session_id(value: &[u8]) -> Result<String, H1Error> {
    if value.is_empty() || !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(H1Error::Malformed(
            "x-session-id is empty or not visible ASCII".into(),
        ));
    }
    Ok(String::from_utf8_lossy(value).into_owned())
}

/// Parses a caller's request head at the start of `buf` and writes into `out` the request line
/// and the headers its machine gets: not the hop-by-hop ones, not the framing headers nor the
/// simulation marker (the balancer writes those in [`end_request_head`]). `Ok(None)`: the head
/// is not complete yet.
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
    let asterisk = check_target(&method, path)?;
    let headers = &*request.headers;
    let facts = HeadFacts::of(headers, true)?;
    let http10 = minor == 0;
    if http10 && facts.coding.is_some() {
        return Err(H1Error::BadCoding(
            "(in an HTTP/1.0 request)".into(),
            "HTTP/1.0 has no transfer codings",
        ));
    }
    match (facts.hosts, http10) {
        (0, false) => return Err(H1Error::BadHost("an HTTP/1.1 request without Host")),
        (0..=1, _) => {}
        _ => return Err(H1Error::Repeated("Host")),
    }
    let framing = facts.framing(false)?;

    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut parsed = Request {
        head_len,
        method,
        framing,
        zero_length: facts.length == Some(0),
        keep_alive: if http10 {
            facts.keep_alive
        } else {
            !facts.close
        },
        http10,
        expect_continue: false,
        asterisk,
        host_missing: facts.hosts == 0,
        session: None,
        session_end: false,
        marker: None,
    };
    for (i, header) in headers.iter().enumerate() {
        if !read_header(&mut parsed, facts.kinds[i], header.value)?
            && !facts.is_hop_by_hop(i, header.name)
        {
            write_header(out, header.name, header.value);
        }
    }
    Ok(Some(parsed))
}

/// Takes what the balancer reads from one header; true when the balancer writes that header
/// itself (or never), so it is not copied.
fn read_header(parsed: &mut Request, kind: Known, value: &[u8]) -> Result<bool, H1Error> {
    match kind {
        // RFC 9110 10.1.1: a 100-continue expectation of an HTTP/1.0 request is ignored.
        Known::Expect => {
            parsed.expect_continue = !parsed.http10 && value.eq_ignore_ascii_case(b"100-continue")
        }
        Known::Session if parsed.session.is_some() => {
            return Err(H1Error::Repeated("x-session-id"))
        }
        Known::Session => parsed.session = Some(session_id(value)?),
        Known::SessionEvent => parsed.session_end = value == b"end",
        Known::Simulation => {
            parsed.marker.get_or_insert_with(MarkerClaim::default);
            return Ok(true);
        }
        Known::SimulationAuth => {
            let claim = parsed.marker.get_or_insert_with(MarkerClaim::default);
            if claim.token.is_some() {
                return Err(H1Error::Repeated("x-understudy-simulation-auth"));
            }
            claim.token = Some(String::from_utf8_lossy(value).into_owned());
            return Ok(true);
        }
        Known::ContentLength | Known::TransferEncoding => return Ok(true),
        _ => {}
    }
    Ok(false)
}

/// Ends the head the machine gets: its framing, written from the parsed framing, and the
/// balancer's own headers (`extra`, e.g. the simulation marker).
pub(crate) fn end_request_head(out: &mut Vec<u8>, request: &Request, extra: &[(&str, &[u8])]) {
    if request.host_missing {
        out.extend_from_slice(b"host: \r\n");
    }
    write_framing(out, request.framing, request.zero_length);
    for (name, value) in extra {
        write_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// The parts of a forwarded request head (as [`parse_request`] and [`end_request_head`] wrote
/// it) a copy is made of: method, path and query, and the end-to-end headers.
pub(crate) fn copy_parts(head: &[u8]) -> Result<(Method, String, HeaderMap), H1Error> {
    let mut slots: [MaybeUninit<httparse::Header>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(H1Error::Malformed("copy of an unparsable head".into())),
    }
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return Err(H1Error::Malformed("copy of an incomplete head".into()));
    };
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|e| H1Error::Malformed(e.to_string()))?;
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        // The copy's client writes its own framing.
        if matches!(
            super::known(header.name.as_bytes()),
            Known::ContentLength | Known::TransferEncoding
        ) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) {
            headers.append(name, value);
        }
    }
    Ok((method, path.to_owned(), headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and ends a head without extra headers: what the machine gets for a plain job.
    pub(crate) fn request(raw: &str) -> (Result<Option<Request>, H1Error>, String) {
        let mut out = Vec::new();
        let parsed = parse_request(raw.as_bytes(), &mut out);
        if let Ok(Some(r)) = &parsed {
            end_request_head(&mut out, r, &[]);
        }
        (parsed, String::from_utf8(out).unwrap())
    }

    fn refused(raw: &str) -> H1Error {
        match request(raw).0 {
            Err(e) => e,
            other => panic!("{raw:?} was not refused: {other:?}"),
        }
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
        assert_eq!(parsed.marker, None);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let close = request("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0;
        assert!(!close.unwrap().unwrap().keep_alive);
        let old = request("GET / HTTP/1.0\r\n\r\n").0;
        assert!(!old.unwrap().unwrap().keep_alive);
        let old_kept = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(old_kept.0.unwrap().unwrap().keep_alive);
        // The machine always gets HTTP/1.1 (its connection is kept for the next job), with the
        // empty Host an HTTP/1.1 request without an authority carries.
        assert_eq!(old_kept.1, "GET / HTTP/1.1\r\nhost: \r\n\r\n");
    }

    #[test]
    fn framing_headers_are_written_from_the_parsed_framing() {
        let (length, out) = request(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\ncontent-length: 5\r\n\r\nhello",
        );
        let length = length.unwrap().unwrap();
        assert_eq!(length.framing, Framing::Length(5));
        assert_eq!(
            out,
            "POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\n"
        );
        let (chunked, out) =
            request("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(chunked.unwrap().unwrap().framing, Framing::Chunked);
        assert_eq!(
            out,
            "POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let (empty, out) = request("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(empty.unwrap().unwrap().framing, Framing::Empty);
        assert!(out.ends_with("content-length: 0\r\n\r\n"), "{out}");
        let expect = request(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n",
        );
        assert!(expect.0.unwrap().unwrap().expect_continue);
        assert!(!expect.1.to_ascii_lowercase().contains("expect"));
    }

    #[test]
    fn ambiguous_or_bad_framing_is_refused_by_name() {
        let h = "Host: x\r\n";
        assert_eq!(
            refused(&format!(
                "POST / HTTP/1.1\r\n{h}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            H1Error::AmbiguousLength
        );
        for bad in [
            "Content-Length: 3\r\nContent-Length: 4",
            "Content-Length: 3, 4",
            "Content-Length: +3",
            "Content-Length: 3 4",
            "Content-Length: ",
            "Content-Length: 99999999999999999999",
        ] {
            let e = refused(&format!("POST / HTTP/1.1\r\n{h}{bad}\r\n\r\n"));
            assert!(matches!(e, H1Error::BadLength(_)), "{bad}: {e}");
        }
        for (coding, status) in [
            ("gzip", 501),
            ("identity, chunked", 501),
            ("gzip, chunked", 501),
            ("chunked, chunked", 400),
            ("chunked\r\nTransfer-Encoding: chunked", 400),
            ("chunked,", 400),
        ] {
            let e = refused(&format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: {coding}\r\n\r\n"
            ));
            assert_eq!(e.status(), status, "{coding}: {e}");
        }
        let e = refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(e, H1Error::BadCoding(..)), "{e}");
    }

    #[test]
    fn connection_cannot_remove_end_to_end_headers() {
        for name in [
            "content-length",
            "Transfer-Encoding",
            "host",
            "x-understudy-simulation",
            "X-Understudy-Anything",
            "x-session-id",
            "x-session-event",
        ] {
            let e = refused(&format!(
                "POST / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, {name}\r\nContent-Length: 0\r\n\r\n"
            ));
            assert!(matches!(e, H1Error::ProtectedNomination(_)), "{name}: {e}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("x-h{i}")).collect();
        let e = refused(&format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: {}\r\n\r\n",
            many.join(", ")
        ));
        assert_eq!(e, H1Error::TooManyNominations);
    }

    #[test]
    fn only_origin_form_targets_are_accepted() {
        for target in [
            "@127.0.0.1:18555/api/v1/anything",
            "http://other/x",
            "other:80",
            "*",
            "x/..",
        ] {
            let e = refused(&format!("POST {target} HTTP/1.1\r\nHost: x\r\n\r\n"));
            assert!(matches!(e, H1Error::BadTarget(_)), "{target}: {e}");
        }
        let (star, out) = request("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(star.unwrap().unwrap().asterisk);
        assert!(out.starts_with("OPTIONS * HTTP/1.1\r\n"));
        assert_eq!(
            refused("CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n").status(),
            405
        );
    }

    #[test]
    fn hosts_sessions_and_malformed_lines() {
        assert!(matches!(
            refused("GET / HTTP/1.1\r\n\r\n"),
            H1Error::BadHost(_)
        ));
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            H1Error::Repeated("Host")
        );
        assert!(
            request("GET / HTTP/1.0\r\n\r\n").0.is_ok(),
            "1.0 needs no Host"
        );
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nx-session-id: a\r\nx-session-id: b\r\n\r\n"),
            H1Error::Repeated("x-session-id")
        );
        assert!(matches!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nx-session-id: caf\u{e9}\r\n\r\n"),
            H1Error::Malformed(_)
        ));
        for bad in [
            "GET\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", // obs-fold
            "GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n",      // space before the colon
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",    // bare CR in a value
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",  // NUL in a value
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let e = refused(bad);
            assert!(matches!(e, H1Error::Malformed(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_bare_lf_line_end_is_read_as_one_and_written_as_crlf() {
        // RFC 9112 2.2 lets a recipient take LF as a line end; what the machine gets is
        // written with CRLF from the parsed fields, so both sides read the same headers.
        let (parsed, out) = request("GET / HTTP/1.1\nHost: a\nX: b\n\n");
        assert!(parsed.unwrap().is_some());
        assert_eq!(out, "GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\r\n");
    }

    #[test]
    fn an_incomplete_head_asks_for_more_until_it_is_too_large() {
        assert_eq!(request("GET / HTTP/1.1\r\nHost: x\r\n").0, Ok(None));
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(super::super::MAX_HEAD_BYTES)
        );
        assert_eq!(request(&huge).0, Err(H1Error::HeadTooLarge));
        let whole = format!("{huge}\r\n");
        assert_eq!(
            request(&whole).0,
            Err(H1Error::HeadTooLarge),
            "complete but too large"
        );
    }

    #[test]
    fn the_simulation_marker_is_read_and_never_forwarded_as_sent() {
        for (headers, token) in [
            ("x-understudy-simulation: 1\r\n", None),
            ("X-Understudy-Simulation: 0\r\n", None),
            (
                "x-understudy-simulation: yes\r\nx-understudy-simulation-auth: t\r\n",
                Some("t"),
            ),
            ("x-understudy-simulation-auth: t\r\n", Some("t")),
        ] {
            let (parsed, out) = request(&format!("GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n"));
            let claim = parsed.unwrap().unwrap().marker.expect("a claim");
            assert_eq!(claim.token.as_deref(), token);
            assert!(!out.to_ascii_lowercase().contains("understudy"), "{out}");
        }
        let mut out = Vec::new();
        let parsed = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut out)
            .unwrap()
            .unwrap();
        end_request_head(
            &mut out,
            &parsed,
            &[("x-understudy-simulation", b"1".as_slice())],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: x\r\nx-understudy-simulation: 1\r\n\r\n"
        );
    }

    #[test]
    fn copy_parts_keep_the_forwarded_headers_without_framing() {
        let head = b"PUT /x?y HTTP/1.1\r\nHost: h\r\ncontent-length: 3\r\nX-A: 1\r\n\r\n";
        let (method, path, headers) = copy_parts(head).unwrap();
        assert_eq!(method, Method::PUT);
        assert_eq!(path, "/x?y");
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["x-a"], "1");
    }
}
