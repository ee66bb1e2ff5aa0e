//! Request smuggling and framing, from the wire: each classic desync and each case of the
//! balancer's own threat model sent over raw sockets to a real balancer, with a raw machine
//! behind it that records the bytes it got (or, for the answer side, sends what a broken machine
//! would). Every case ends in a refusal naming the problem, or in a message the balancer wrote
//! again from what it parsed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{exchange, read_until, RawMachine, Reply};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use understudy_proxy::RunningBalancers;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A balancer in front of one raw machine answering `OK` to each request (read up to
/// `request_end` after the head).
async fn balancer_over_raw(
    request_end: &'static [u8],
) -> (RawMachine, RunningBalancers, SocketAddr) {
    let machine = RawMachine::start(OK, request_end, false).await;
    let running = start(vec![config("media", 1, vec![machine.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    (machine, running, lb)
}

/// The status code of the first answer in `answer`.
fn status(answer: &str) -> u16 {
    answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

/// Requests refused before any machine sees them: (case, bytes, status, words of the error).
const REFUSED: &[(&str, &[u8], u16, &str)] = &[
    (
        "CL.TE: both framing headers",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        400,
        "ambiguous",
    ),
    (
        "TE.CL: both, the other order",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        400,
        "ambiguous",
    ),
    (
        "two differing Content-Length",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
        400,
        "Content-Length",
    ),
    (
        "Content-Length list with differing values",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabc",
        400,
        "Content-Length",
    ),
    (
        "signed Content-Length",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
        400,
        "Content-Length",
    ),
    (
        "Transfer-Encoding: identity, chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        501,
        "only one chunked",
    ),
    (
        "Transfer-Encoding: chunked, chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
        "more than once",
    ),
    (
        "chunked in two Transfer-Encoding fields",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "more than once",
    ),
    (
        "Transfer-Encoding: gzip",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "gzip",
    ),
    (
        "Transfer-Encoding in an HTTP/1.0 request",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "HTTP/1.0",
    ),
    (
        "Connection: content-length",
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 40\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "Connection names",
    ),
    (
        "Connection: transfer-encoding",
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Connection names",
    ),
    (
        "Connection: x-understudy-simulation",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-understudy-simulation\r\nx-understudy-simulation: 0\r\n\r\n",
        400,
        "Connection names",
    ),
    (
        "Connection: host",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
        400,
        "Connection names",
    ),
    (
        "obs-fold",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
        400,
        "malformed",
    ),
    (
        "bare CR in a header",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\rTransfer-Encoding: chunked\r\n\r\n",
        400,
        "malformed",
    ),
    (
        "space before the colon",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
        "malformed",
    ),
    (
        "NUL in a header value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x00\r\n\r\n",
        400,
        "malformed",
    ),
    (
        "target not in origin form (aims a copy at another host)",
        b"POST @127.0.0.1:18555/api/v1/anything HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        400,
        "origin form",
    ),
    (
        "absolute-form target",
        b"GET http://127.0.0.1:18555/ HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "origin form",
    ),
    (
        "asterisk with GET",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "origin form",
    ),
    (
        "HTTP/1.1 without Host",
        b"GET / HTTP/1.1\r\n\r\n",
        400,
        "without Host",
    ),
    (
        "two Host headers",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        "Host appears more than once",
    ),
    (
        "CONNECT",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        405,
        "CONNECT",
    ),
    (
        "more than 128 headers",
        b"",
        431,
        "larger than",
    ),
];

fn many_headers() -> Vec<u8> {
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..130 {
        raw.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw
}

#[tokio::test]
async fn smuggling_shapes_are_refused_before_any_machine_sees_them() {
    let (machine, running, lb) = balancer_over_raw(b"").await;
    println!("| case | answer |\n| --- | --- |");
    for (case, raw, expected, words) in REFUSED {
        let raw = if raw.is_empty() {
            many_headers()
        } else {
            raw.to_vec()
        };
        let answer = exchange(lb, &raw).await;
        println!("| {case} | {} |", answer.lines().next().unwrap_or(""));
        assert_eq!(status(&answer), *expected, "{case}: {answer}");
        assert!(answer.contains(words), "{case}: {answer}");
        assert!(
            answer.contains("content-type: application/json\r\n") && answer.contains("{\"error\":"),
            "{case}: a JSON error: {answer}"
        );
        assert!(machine.seen().is_empty(), "{case} reached the machine");
    }
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    assert_eq!(status(&exchange(lb, huge.as_bytes()).await), 431);
    assert!(machine.seen().is_empty());
    running.shutdown();
}

/// Chunked bodies whose framing lines are malformed: the job fails with 400 and the machine's
/// connection, which got part of a request, is closed rather than reused.
#[tokio::test]
async fn malformed_chunks_fail_the_job_and_the_machine_connection_is_dropped() {
    let cases: &[(&str, &[u8])] = &[
        ("empty chunk size", b"\r\n"),
        ("bare LF after the size", b"5\nhello\r\n0\r\n\r\n"),
        ("bare LF after the data", b"5\r\nhello\n0\r\n\r\n"),
        ("NUL in an extension", b"5;a\x00=1\r\nhello\r\n0\r\n\r\n"),
        (
            "size overflowing 64 bits",
            b"10000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
        ("control byte in a trailer", b"0\r\nX-T: \x01\r\n\r\n"),
        ("trailer without a colon", b"0\r\nX-T 1\r\n\r\n"),
    ];
    let (machine, running, lb) = balancer_over_raw(b"0\r\n\r\n").await;
    for (case, body) in cases {
        // The head and a good first chunk go first, so that the machine has them when the bad
        // part arrives.
        let mut stream = TcpStream::connect(lb).await.unwrap();
        stream
            .write_all(
                b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut rest = body.to_vec();
        rest.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
        stream.write_all(&rest).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        println!("| {case} | {} |", answer.lines().next().unwrap_or(""));
        assert_eq!(status(&answer), 400, "{case}: {answer}");
        assert!(answer.contains("chunked"), "{case}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{case}: one answer");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = machine.seen();
    // Each job's machine connection got the head and the good chunk, then was closed: no
    // connection carried anything after a broken body.
    assert_eq!(seen.len(), cases.len(), "{seen:?}");
    assert!(
        seen.iter().all(|r| r.ends_with("\r\n\r\n1\r\nx\r\n")),
        "{seen:?}"
    );
    assert_eq!(machine.connections(), cases.len());
    running.shutdown();
}

#[tokio::test]
async fn framing_is_written_again_from_what_was_parsed() {
    let (machine, running, lb) = balancer_over_raw(b"0\r\n\r\n").await;
    let answer = exchange(
        lb,
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ChUnKeD\r\nConnection: close, x-drop\r\n\
          X-Drop: 1\r\nTE: trailers\r\n\r\n5;name=\"v\"\r\nhello\r\n0;last\r\nX-Trailer: t\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    let seen = machine.seen();
    assert_eq!(
        seen,
        ["POST /c HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
    );
    running.shutdown();

    let (machine, running, lb) = balancer_over_raw(b"").await;
    let answer = exchange(
        lb,
        b"GET /d HTTP/1.0\r\nContent-Length: 0, 0\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(
        !answer.contains("100 Continue"),
        "no 1xx to HTTP/1.0: {answer}"
    );
    assert_eq!(
        machine.seen(),
        ["GET /d HTTP/1.1\r\nhost: \r\ncontent-length: 0\r\n\r\n"]
    );
    running.shutdown();
}

/// A zero-length body followed by a second request is two jobs: both answered, in order, each
/// seen by the machine as a whole request.
#[tokio::test]
async fn pipelined_requests_stay_separate_requests() {
    let (machine, running, lb) = balancer_over_raw(b"").await;
    let mut stream = TcpStream::connect(lb).await.unwrap();
    stream
        .write_all(
            b"GET /one HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n\
              GET /two HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let answers = read_until(&mut stream, "ok", 2).await;
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
    let seen = machine.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].starts_with("GET /one HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen[1].starts_with("GET /two HTTP/1.1\r\n"), "{seen:?}");
    running.shutdown();
}

/// What a broken machine answers and what the caller gets.
#[tokio::test]
async fn a_broken_machines_answers_are_refused_or_written_again() {
    let cases: &[(&str, &'static [u8], Option<&str>)] = &[
        ("status 099", b"HTTP/1.1 099 X\r\ncontent-length: 0\r\n\r\n", None),
        ("status 600", b"HTTP/1.1 600 X\r\ncontent-length: 0\r\n\r\n", None),
        (
            "both framing headers",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\nok",
            None,
        ),
        (
            "chunked, chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            None,
        ),
        (
            "101 to a request that asked no upgrade",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            None,
        ),
        (
            "bare LF in a chunk line",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
            None,
        ),
        (
            "chunk extensions and trailers",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: x-a\r\nx-a: 1\r\n\r\n\
              2;ext=1\r\nok\r\n0\r\nx-trailer: 1\r\n\r\n",
            Some("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ),
    ];
    for (case, answer, expected) in cases {
        let machine = RawMachine::start(answer, b"", true).await;
        let running = start(vec![config("media", 1, vec![machine.entry()])]);
        let lb = running.listen_addr("media").unwrap();
        let got = exchange(
            lb,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        println!(
            "| machine answers {case} | {} |",
            got.lines().next().unwrap_or("")
        );
        match expected {
            Some(expected) => assert_eq!(&got, expected, "{case}"),
            None => assert_eq!(status(&got), 502, "{case}: {got}"),
        }
        running.shutdown();
    }
}

#[tokio::test]
async fn a_chunked_answer_reaches_an_http10_caller_as_data_ended_by_close() {
    let machine = RawMachine::start(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"",
        false,
    )
    .await;
    let running = start(vec![config("media", 1, vec![machine.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    let got = exchange(lb, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
    assert_eq!(got, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabcde");
    running.shutdown();
}

/// Bytes a machine sends past its answer's end would be read as the next job's answer on that
/// connection: the connection is never reused.
#[tokio::test]
async fn stray_bytes_after_an_answer_never_reach_the_next_caller() {
    let machine = RawMachine::scripted(b"", |_| {
        Reply::Answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON"
                .to_vec(),
        )
    })
    .await;
    let running = start(vec![config("media", 1, vec![machine.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    for i in 0..5 {
        // A pause lets the stray bytes arrive after the answer was read.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = exchange(
            lb,
            format!("GET /{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(got.ends_with("\r\n\r\nok"), "job {i}: {got}");
        assert!(!got.contains("POISON"), "job {i}: {got}");
    }
    assert_eq!(machine.connections(), 5, "no connection was reused");
    running.shutdown();
}

/// A reused connection that the machine drops after reading a request: an idempotent job is
/// sent again on a fresh connection, a POST never (it may have been performed).
#[tokio::test]
async fn only_idempotent_jobs_are_sent_again_after_a_reused_connection_fails() {
    for (method, sent, status_seen) in [("GET", 3, 200), ("POST", 2, 502)] {
        // First request on a connection: answered; second: dropped without an answer.
        let machine = RawMachine::scripted(b"", |n| match n {
            0 => Reply::Answer(OK.to_vec()),
            _ => Reply::Close,
        })
        .await;
        let running = start(vec![config("media", 1, vec![machine.entry()])]);
        let lb = running.listen_addr("media").unwrap();
        let first = exchange(
            lb,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&first), 200);
        let raw = format!(
            "{method} /job HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let second = exchange(lb, raw.as_bytes()).await;
        assert_eq!(status(&second), status_seen, "{method}: {second}");
        let jobs = machine
            .seen()
            .iter()
            .filter(|r| r.starts_with(&format!("{method} /job")))
            .count();
        assert_eq!(1 + jobs, sent, "{method}: {:?}", machine.seen());
        running.shutdown();
    }
}

/// `x-session-id` longer than allowed is refused; past the cap of pinned sessions a new session
/// is refused while known ones and session-less jobs go on.
#[tokio::test]
async fn session_ids_and_pinned_sessions_are_bounded() {
    let machine = RawMachine::start(OK, b"", false).await;
    let limits = understudy_proxy::LimitsSpec {
        max_sessions: 2,
        max_session_id_bytes: 16,
        ..understudy_proxy::LimitsSpec::default()
    };
    let running = start_with_limits(
        vec![config("media", 1, vec![machine.entry()])],
        limits,
        insecure(),
    );
    let lb = running.listen_addr("media").unwrap();
    let job = |session: String| async move {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nx-session-id: {session}\r\nConnection: close\r\n\r\n"
        );
        exchange(lb, raw.as_bytes()).await
    };
    assert_eq!(status(&job("a".repeat(17)).await), 431);
    assert_eq!(status(&job("call-1".into()).await), 200);
    assert_eq!(status(&job("call-2".into()).await), 200);
    let full = job("call-3".into()).await;
    assert_eq!(status(&full), 503, "{full}");
    assert!(full.contains("sessions are pinned already"), "{full}");
    assert_eq!(status(&job("call-1".into()).await), 200, "a known session");
    let plain = exchange(
        lb,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&plain), 200);
    let metrics = Http::new()
        .get(&format!("http://{}/metrics", running.admin_addr()))
        .await
        .body;
    for limit in ["max_sessions", "max_session_id_bytes"] {
        let line = format!(
            "understudy_balancer_limit_hits_total{{limit=\"{limit}\",service=\"media\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    running.shutdown();
}

/// A slowloris head is cut at the head deadline (408); a caller that stops reading a large
/// answer is cut at the write deadline; both are counted.
#[tokio::test]
async fn slow_callers_are_cut_at_the_deadlines() {
    let big: &'static [u8] = Box::leak(
        [
            b"HTTP/1.1 200 OK\r\ncontent-length: 8388608\r\n\r\n".as_slice(),
            &vec![b'x'; 8 << 20],
        ]
        .concat()
        .into_boxed_slice(),
    );
    let machine = RawMachine::start(big, b"", false).await;
    let limits = understudy_proxy::LimitsSpec {
        head_timeout_ms: 300,
        caller_write_timeout_ms: 300,
        ..understudy_proxy::LimitsSpec::default()
    };
    let running = start_with_limits(
        vec![config("media", 1, vec![machine.entry()])],
        limits,
        insecure(),
    );
    let lb = running.listen_addr("media").unwrap();

    let mut slow = TcpStream::connect(lb).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_string(&mut answer))
        .await
        .expect("the balancer closes a slow head")
        .unwrap();
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A reader that never reads: the balancer gives up writing and closes.
    let mut stuck = TcpStream::connect(lb).await.unwrap();
    stuck
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let metrics_url = format!("http://{}/metrics", running.admin_addr());
    let http = Http::new();
    let mut cut = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let metrics = http.get(&metrics_url).await.body;
        if metrics.contains(
            "understudy_balancer_limit_hits_total{limit=\"caller_write_timeout\",service=\"media\"} 1",
        ) {
            assert!(metrics.contains(
                "understudy_balancer_limit_hits_total{limit=\"head_timeout\",service=\"media\"} 1"
            ));
            cut = true;
            break;
        }
    }
    assert!(cut, "the stuck reader was cut");
    drop(stuck);
    running.shutdown();
}
