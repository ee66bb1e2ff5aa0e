//! Properties of the head and chunk parsers over generated input: random bytes never panic,
//! what the balancer writes parses again to the same message (a fixed point: written once,
//! written again the same), and a chunked body's data survives any chunking, extensions,
//! trailers and splits of the wire.

use bytes::BytesMut;
use proptest::prelude::*;

use super::body::tests::{relay_in_pieces, Relayed};
use super::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The head the machine gets for `raw`, when the balancer accepts it.
fn forwarded(raw: &[u8]) -> Option<(Request, Vec<u8>)> {
    let mut out = Vec::new();
    let request = parse_request(raw, &mut out).ok()??;
    end_request_head(&mut out, &request, &[]);
    Some((request, out))
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
}

/// Header names: ordinary ones and every name the balancer reads, in any case.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        token(),
        Just("Content-Length".to_string()),
        Just("transfer-encoding".to_string()),
        Just("Connection".to_string()),
        Just("Keep-Alive".to_string()),
        Just("TE".to_string()),
        Just("Expect".to_string()),
        Just("x-session-id".to_string()),
        Just("X-Understudy-Simulation".to_string()),
        Just("x-understudy-simulation-auth".to_string()),
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,24}",
        Just("chunked".to_string()),
        Just("0".to_string()),
        Just("5".to_string()),
        Just("close, x-a".to_string()),
        Just("keep-alive".to_string()),
        Just("100-continue".to_string()),
    ]
}

/// Request heads built from the pieces a caller may send, valid or not.
fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("OPTIONS"),
        Just("HEAD")
    ];
    let target = prop_oneof![
        "/[a-z0-9/?=&.-]{0,16}",
        Just("*".to_string()),
        "[a-z@:.0-9]{1,12}"
    ];
    let version = prop_oneof![Just("1.1"), Just("1.0")];
    let headers = proptest::collection::vec((header_name(), header_value()), 0..10);
    (method, target, version, any::<bool>(), headers).prop_map(
        |(method, target, version, host, headers)| {
            let mut raw = format!("{method} {target} HTTP/{version}\r\n");
            if host {
                raw.push_str("Host: a\r\n");
            }
            for (name, value) in headers {
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            raw.push_str("\r\n");
            raw.into_bytes()
        },
    )
}

/// A chunked body of `data`, cut into chunks of the given sizes, with extensions and trailers.
fn chunked_wire(data: &[u8], cuts: &[usize], ext: bool, trailers: &[(String, String)]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut at = 0;
    for cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
        if at >= data.len() {
            break;
        }
        let end = data.len().min(at.saturating_add((*cut).max(1)));
        wire.extend_from_slice(format!("{:X}", end - at).as_bytes());
        if ext {
            wire.extend_from_slice(b" ; name=\"quoted \\\" value\";flag");
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(&data[at..end]);
        wire.extend_from_slice(b"\r\n");
        at = end;
    }
    wire.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic_any_parser(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = forwarded(&raw);
        let to = AnswerTo { head: false, keep_alive: true, http10: false };
        let _ = parse_answer(&raw, to, &mut Vec::new());
        for framing in [Framing::Chunked, Framing::Length(300), Framing::UntilClose] {
            let _ = relay_in_pieces(framing, Output::Framed, &raw, &[7, 1, 13]);
        }
        let _ = chunked::chunk_line(&raw);
        let _ = chunked::trailer_line(&raw);
    }

    #[test]
    fn what_the_balancer_writes_is_a_fixed_point(raw in request_head()) {
        if let Some((first, written)) = forwarded(&raw) {
            let reparsed = forwarded(&written);
            prop_assert!(
                reparsed.is_some(),
                "{:?} was written for {:?} and does not parse",
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&raw)
            );
            let (second, rewritten) = reparsed.unwrap();
            prop_assert_eq!(&written, &rewritten);
            prop_assert_eq!(first.method, second.method);
            prop_assert_eq!(first.framing, second.framing);
            prop_assert_eq!(first.session, second.session);
            prop_assert!(second.marker.is_none(), "the caller's marker is never forwarded");
            // One framing header at most, and exactly what the framing says.
            let text = String::from_utf8_lossy(&written).to_ascii_lowercase();
            let framing_headers = text.matches("\r\ncontent-length:").count()
                + text.matches("\r\ntransfer-encoding:").count();
            prop_assert!(framing_headers <= 1, "{}", text);
            prop_assert!(!text.contains("\r\nconnection:") && !text.contains("\r\nkeep-alive:"));
        }
    }

    #[test]
    fn a_head_split_anywhere_parses_the_same(raw in request_head(), cut in 0usize..200) {
        let cut = cut.min(raw.len());
        let mut out = Vec::new();
        match parse_request(&raw[..cut], &mut out) {
            Ok(None) => {}
            // A prefix is refused only for what the whole head is refused for too.
            Err(e) => prop_assert!(parse_request(&raw, &mut Vec::new()).is_err(), "{}", e),
            Ok(Some(_)) => prop_assert_eq!(cut, raw.len()),
        }
    }

    #[test]
    fn a_chunked_bodys_data_survives_any_framing_and_split(
        data in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(1usize..64, 0..12),
        ext in any::<bool>(),
        trailers in proptest::collection::vec((token(), "[ -~]{0,12}"), 0..3),
        splits in proptest::collection::vec(1usize..9, 1..40),
    ) {
        let mut wire = chunked_wire(&data, &cuts, ext, &trailers);
        let body_len = wire.len();
        wire.extend_from_slice(b"GET /next");
        let Relayed { out, data: seen, done, rest } =
            relay_in_pieces(Framing::Chunked, Output::Framed, &wire, &splits).unwrap();
        prop_assert!(done);
        prop_assert_eq!(&seen, &data);
        prop_assert_eq!(rest, b"GET /next".to_vec());
        // Extensions and trailers are dropped: never more written than received.
        prop_assert!(out.len() <= body_len);
        // What was written is a bare chunked body that relays to the same bytes again.
        let Relayed { out: again, data: seen_again, done: done_again, rest: _ } =
            relay_in_pieces(Framing::Chunked, Output::Framed, &out, &[usize::MAX]).unwrap();
        prop_assert!(done_again);
        prop_assert_eq!(&again, &out);
        prop_assert_eq!(&seen_again, &data);
        let Relayed { out: only_data, data: _, done: _, rest: _ } =
            relay_in_pieces(Framing::Chunked, Output::DataOnly, &wire, &splits).unwrap();
        prop_assert_eq!(&only_data, &data);
    }

    #[test]
    fn a_corrupted_chunked_body_is_refused_or_read_consistently(
        data in proptest::collection::vec(any::<u8>(), 1..100),
        at in any::<usize>(),
        byte in any::<u8>(),
    ) {
        let mut wire = chunked_wire(&data, &[17], false, &[]);
        let at = at % wire.len();
        wire[at] = byte;
        if let Ok(Relayed { out, data: seen, done: true, .. }) =
            relay_in_pieces(Framing::Chunked, Output::Framed, &wire, &[5, 3])
        {
            // Whatever the balancer accepted, it wrote a body that reads back as what it saw.
            let Relayed { out: _, data: again, done, rest } =
                relay_in_pieces(Framing::Chunked, Output::Framed, &out, &[usize::MAX]).unwrap();
            prop_assert!(done && rest.is_empty());
            prop_assert_eq!(again, seen);
        }
    }

    #[test]
    fn answers_written_for_the_caller_parse_again(
        status in 100u16..700,
        headers in proptest::collection::vec((header_name(), header_value()), 0..8),
        http10 in any::<bool>(),
    ) {
        let mut raw = format!("HTTP/1.1 {status} Reason\r\n");
        for (name, value) in &headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        let to = AnswerTo { head: false, keep_alive: true, http10 };
        let mut out = Vec::new();
        if let Ok(Some(answer)) = parse_answer(raw.as_bytes(), to, &mut out) {
            prop_assert!((100..600).contains(&answer.status));
            if answer.status >= 200 {
                let mut again = Vec::new();
                let reparsed = parse_answer(&out, to, &mut again).unwrap().unwrap();
                prop_assert_eq!(reparsed.framing, match answer.output {
                    Output::Framed => answer.framing,
                    Output::DataOnly => Framing::UntilClose,
                });
                prop_assert_eq!(&again, &out);
            }
        }
    }
}

#[test]
fn a_relay_keeps_nothing_it_did_not_consume() {
    let mut relay = BodyRelay::new(Framing::Length(3), Output::Framed);
    let mut input = BytesMut::from(&b"abcdef"[..]);
    relay.relay(&mut input, &mut Vec::new(), |_| {}).unwrap();
    assert_eq!(&input[..], b"def");
}
