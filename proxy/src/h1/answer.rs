//! A machine's answer head: parsed, checked, and written again for the caller.

use super::{head_length, write_framing, write_header, Framing, H1Error, HeadFacts};
use super::{Known, Output};

/// What the balancer needs from a machine's answer head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// How the body is written for the caller.
    pub output: Output,
    /// The machine's connection can carry another job after this answer.
    pub reusable: bool,
    /// The caller's connection stays open after this answer (`Connection: close` was written
    /// otherwise).
    pub caller_keep_alive: bool,
}

/// The request an answer is for, as far as its head is concerned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AnswerTo {
    /// A HEAD request: the answer has no body whatever its headers say.
    pub head: bool,
    /// The caller's connection may stay open after the answer.
    pub keep_alive: bool,
    /// An HTTP/1.0 caller: told `Connection: keep-alive` when its connection stays open, never
    /// sent a chunked body.
    pub http10: bool,
}

/// Parses a machine's answer head at the start of `buf`. Interim answers (1xx) come back with
/// `status` < 200 and nothing written: the caller skips them. Otherwise the head the caller gets
/// is written into `out`: the machine's status and end-to-end headers, the framing written from
/// the parsed framing (and for the caller's version), `Connection: close` when the caller's
/// connection will be closed. `Ok(None)`: not complete yet.
pub(crate) fn parse_answer(
    buf: &[u8],
    to: AnswerTo,
    out: &mut Vec<u8>,
) -> Result<Option<Answer>, H1Error> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut answer = httparse::Response::new(&mut slots);
    let Some(head_len) = head_length(answer.parse(buf), buf)? else {
        return Ok(None);
    };
    let (Some(status), Some(minor)) = (answer.code, answer.version) else {
        return Err(H1Error::Malformed("incomplete status line".into()));
    };
    if !(100..=599).contains(&status) {
        return Err(H1Error::BadStatus(status));
    }
    if (100..200).contains(&status) {
        return interim(head_len, status, to);
    }
    let headers = &*answer.headers;
    let facts = HeadFacts::of(headers, false)?;
    if minor == 0 && facts.coding.is_some() {
        return Err(H1Error::BadCoding(
            "(in an HTTP/1.0 answer)".into(),
            "HTTP/1.0 has no transfer codings",
        ));
    }
    // The framing is read even where the answer has no body, so a malformed one is refused.
    let parsed_framing = facts.framing(true)?;
    let bodiless = to.head || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else {
        parsed_framing
    };
    let machine_keeps = if minor == 0 {
        facts.keep_alive
    } else {
        !facts.close
    };
    // An HTTP/1.0 caller cannot read chunks: it gets the data, delimited by the close.
    let output = if framing == Framing::Chunked && to.http10 {
        Output::DataOnly
    } else {
        Output::Framed
    };
    let parsed = Answer {
        head_len,
        status,
        framing,
        output,
        reusable: machine_keeps && parsed_framing != Framing::UntilClose,
        caller_keep_alive: to.keep_alive
            && framing != Framing::UntilClose
            && output == Output::Framed,
    };
    write_status_line(out, status, answer.reason.unwrap_or(""));
    write_answer_headers(out, headers, &facts, &parsed, bodiless, to.http10);
    Ok(Some(parsed))
}

/// An interim (1xx) answer: skipped by the caller, except `101`, which this balancer never
/// asked for.
fn interim(head_len: usize, status: u16, to: AnswerTo) -> Result<Option<Answer>, H1Error> {
    if status == 101 {
        return Err(H1Error::Malformed(
            "101 Switching Protocols to a request that asked for no upgrade".into(),
        ));
    }
    Ok(Some(Answer {
        head_len,
        status,
        framing: Framing::Empty,
        output: Output::Framed,
        reusable: true,
        caller_keep_alive: to.keep_alive,
    }))
}

/// The answer's end-to-end headers, its framing written for the caller, and `Connection`.
fn write_answer_headers(
    out: &mut Vec<u8>,
    headers: &[httparse::Header<'_>],
    facts: &HeadFacts<'_>,
    answer: &Answer,
    bodiless: bool,
    http10: bool,
) {
    for (i, header) in headers.iter().enumerate() {
        let framing_header = matches!(
            facts.kinds[i],
            Known::ContentLength | Known::TransferEncoding
        );
        if !framing_header && !facts.is_hop_by_hop(i, header.name) {
            write_header(out, header.name, header.value);
        }
    }
    match (bodiless, answer.status) {
        // No framing header in a 204 (RFC 9110 8.6).
        (_, 204) => {}
        // A HEAD or 304 answer's length describes the body it does not carry.
        (true, _) => {
            if let Some(length) = facts.length {
                write_framing(out, Framing::Length(length), length == 0);
            }
        }
        (false, _) if answer.output == Output::DataOnly => {}
        (false, _) => write_framing(out, answer.framing, facts.length == Some(0)),
    }
    if !answer.caller_keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn write_status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_to(raw: &str, to: AnswerTo) -> (Result<Option<Answer>, H1Error>, String) {
        let mut out = Vec::new();
        let parsed = parse_answer(raw.as_bytes(), to, &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    fn answer(raw: &str, head: bool, keep: bool) -> (Result<Option<Answer>, H1Error>, String) {
        let to = AnswerTo {
            head,
            keep_alive: keep,
            http10: false,
        };
        answer_to(raw, to)
    }

    #[test]
    fn an_answer_is_forwarded_with_its_framing_written() {
        let (parsed, out) = answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=4\r\nDate: d\r\n\r\nok",
            false,
            true,
        );
        let parsed = parsed.unwrap().unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nDate: d\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(parsed.framing, Framing::Length(2));
        assert!(parsed.reusable && parsed.caller_keep_alive);
        assert_eq!(parsed.status, 200);
        let (chunked, out) = answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding:  chunked \r\nConnection: x-a\r\nX-A: 1\r\n\r\n",
            false,
            true,
        );
        assert_eq!(chunked.unwrap().unwrap().framing, Framing::Chunked);
        assert_eq!(out, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
    }

    #[test]
    fn answers_without_a_body_and_answers_that_end_at_close() {
        let (head, out) = answer("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, true);
        assert_eq!(head.unwrap().unwrap().framing, Framing::Empty);
        assert!(
            out.contains("content-length: 9\r\n"),
            "HEAD keeps its length: {out}"
        );
        let (no_content, out) = answer(
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            false,
            true,
        );
        assert_eq!(no_content.unwrap().unwrap().framing, Framing::Empty);
        assert!(!out.contains("content-length"), "{out}");
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
    }

    #[test]
    fn an_http10_caller_gets_no_chunks_and_is_told_keep_alive() {
        let old = AnswerTo {
            head: false,
            keep_alive: true,
            http10: true,
        };
        let (kept, out) = answer_to("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", old);
        assert!(kept.unwrap().unwrap().caller_keep_alive);
        assert!(out.ends_with("connection: keep-alive\r\n\r\n"), "{out}");
        let (chunked, out) =
            answer_to("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", old);
        let chunked = chunked.unwrap().unwrap();
        assert_eq!(chunked.output, Output::DataOnly);
        assert!(!chunked.caller_keep_alive && chunked.reusable);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
    }

    #[test]
    fn interim_answers_are_skipped_and_bad_statuses_refused() {
        let (interim, out) = answer("HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n", false, true);
        assert_eq!(interim.unwrap().unwrap().status, 103);
        assert!(out.is_empty());
        let upgrade = answer("HTTP/1.1 101 Switching Protocols\r\n\r\n", false, true).0;
        assert!(matches!(upgrade, Err(H1Error::Malformed(_))));
        for status in ["000", "099", "600", "999"] {
            let raw = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            assert!(
                matches!(answer(&raw, false, true).0, Err(H1Error::BadStatus(_))),
                "{status}"
            );
        }
    }

    #[test]
    fn ambiguous_answers_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        ] {
            assert!(answer(bad, false, true).0.is_err(), "{bad:?}");
        }
    }
}
