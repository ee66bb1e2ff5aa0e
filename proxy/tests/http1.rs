//! The balancer's HTTP/1.1 forwarding, seen from the wire: framing in both directions,
//! pipelining, keep-alive and close, refusals, and machines that close idle connections.

mod common;

use std::net::SocketAddr;

use common::raw::{exchange, read_until, RawMachine};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use understudy_proxy::wire::PoolRole;
use understudy_proxy::RunningBalancers;

/// A balancer for "media" in front of one echo machine ("v1:<body>").
async fn echo_balancer() -> (Machine, RunningBalancers, SocketAddr) {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let running = start(vec![config(
        "media",
        1,
        vec![entry("m1", "v1", &v1, PoolRole::Active)],
    )]);
    let lb = running.listen_addr("media").unwrap();
    (v1, running, lb)
}

#[tokio::test]
async fn chunked_bodies_pass_through_both_ways() {
    let machine = RawMachine::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        b"0\r\n\r\n",
        false,
    )
    .await;
    let running = start(vec![config("media", 1, vec![machine.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    let answer = exchange(
        lb,
        b"POST /job HTTP/1.1\r\nhost: media\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    // Framing is written by the balancer, not copied.
    assert!(
        answer.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"),
        "{answer}"
    );
    let seen = machine.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{}",
        seen[0]
    );
    assert!(
        !seen[0].to_ascii_lowercase().contains("connection:"),
        "hop-by-hop: {}",
        seen[0]
    );
    running.shutdown();
}

#[tokio::test]
async fn pipelined_jobs_are_answered_in_order_on_one_connection() {
    let (_v1, running, lb) = echo_balancer().await;
    let mut stream = TcpStream::connect(lb).await.unwrap();
    let mut pipelined = Vec::new();
    for body in ["first", "second", "third"] {
        pipelined.extend_from_slice(
            format!(
                "POST /job HTTP/1.1\r\nhost: m\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    stream.write_all(&pipelined).await.unwrap();
    let answers = read_until(&mut stream, "v1:", 3).await;
    let order: Vec<usize> = ["v1:first", "v1:second", "v1:third"]
        .iter()
        .map(|b| answers.find(b).expect(b))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{answers}");
    // The connection is still open for a fourth job.
    stream
        .write_all(b"POST /job HTTP/1.1\r\nhost: m\r\ncontent-length: 4\r\n\r\nmore")
        .await
        .unwrap();
    assert!(read_until(&mut stream, "v1:more", 1)
        .await
        .contains("200 OK"));
    running.shutdown();
}

/// A machine that closes every connection after one answer, without saying so: each pooled
/// connection is stale when the next job takes it; no job may fail for it.
#[tokio::test]
async fn a_machine_closing_its_connections_after_each_answer_costs_no_job() {
    let machine =
        RawMachine::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"", true).await;
    let running = start(vec![config("media", 1, vec![machine.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    let http = Http::new();
    for i in 0..40 {
        let answer = http.get(&format!("http://{lb}/n{i}")).await;
        assert_eq!(answer.status, 200, "job {i}: {}", answer.body);
        assert_eq!(answer.body, "ok");
    }
    assert_eq!(machine.seen().len(), 40);
    running.shutdown();
}

#[tokio::test]
async fn malformed_and_unsupported_requests_are_refused_by_name() {
    let (v1, running, lb) = echo_balancer().await;
    let garbage = exchange(lb, b"GET /\x01 HTTP/1.1\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    assert!(garbage.contains("malformed message head"), "{garbage}");
    let connect = exchange(lb, b"CONNECT example:443 HTTP/1.1\r\nhost: m\r\n\r\n").await;
    assert!(connect.starts_with("HTTP/1.1 405 "), "{connect}");
    assert!(
        connect.contains("CONNECT method is not proxied"),
        "{connect}"
    );
    let smuggled = exchange(
        lb,
        b"POST / HTTP/1.1\r\nhost: m\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(smuggled.starts_with("HTTP/1.1 400 "), "{smuggled}");
    assert!(smuggled.contains("ambiguous"), "{smuggled}");
    assert!(
        v1.requests().is_empty(),
        "nothing refused reached the machine"
    );
    running.shutdown();
}

#[tokio::test]
async fn expect_continue_is_answered_by_the_balancer() {
    let (v1, running, lb) = echo_balancer().await;
    let mut stream = TcpStream::connect(lb).await.unwrap();
    stream
        .write_all(
            b"POST /job HTTP/1.1\r\nhost: m\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let go_on = read_until(&mut stream, "\r\n\r\n", 1).await;
    assert!(go_on.starts_with("HTTP/1.1 100 Continue\r\n"), "{go_on}");
    stream.write_all(b"hello").await.unwrap();
    assert!(read_until(&mut stream, "v1:hello", 1)
        .await
        .contains("200 OK"));
    let seen = v1.requests();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("expect"));
    running.shutdown();
}

#[tokio::test]
async fn callers_asking_to_close_and_answers_ending_at_close_close_the_connection() {
    let (_v1, running, lb) = echo_balancer().await;
    let old = exchange(lb, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.1 200 OK\r\n"), "{old}");
    assert!(old.contains("connection: close\r\n"), "{old}");
    assert!(old.ends_with("v1:"), "{old}");
    running.shutdown();

    let until_close = RawMachine::start(b"HTTP/1.0 200 OK\r\n\r\nhello", b"", true).await;
    let running = start(vec![config("media", 1, vec![until_close.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    let relayed = exchange(lb, b"GET / HTTP/1.1\r\nhost: m\r\n\r\n").await;
    assert!(relayed.contains("connection: close\r\n"), "{relayed}");
    assert!(relayed.ends_with("\r\n\r\nhello"), "{relayed}");
    running.shutdown();
}

#[tokio::test]
async fn a_head_answer_has_no_body_and_the_connection_goes_on() {
    let machine =
        RawMachine::start(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", b"", false).await;
    let running = start(vec![config("media", 1, vec![machine.entry()])]);
    let lb = running.listen_addr("media").unwrap();
    let mut stream = TcpStream::connect(lb).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"HEAD / HTTP/1.1\r\nhost: m\r\n\r\n")
            .await
            .unwrap();
        let head = read_until(&mut stream, "\r\n\r\n", 1).await;
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }
    running.shutdown();
}
