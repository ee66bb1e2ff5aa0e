use super::*;
use http::HeaderValue;

fn fields(headers: &[&str]) -> Comparison {
    Comparison {
        mode: CompareMode::Fields,
        headers: headers.iter().map(|h| h.to_string()).collect(),
    }
}

fn kept_with(
    comparison: &Comparison,
    budget: &Arc<CaptureBudget>,
    body: &[u8],
    head: &[(&str, &str)],
) -> Kept {
    let mut map = HeaderMap::new();
    for (name, value) in head {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        map.insert(name, HeaderValue::from_str(value).unwrap());
    }
    let mut capture = comparison.capture(budget, |names| header_values(&map, names));
    // Fed in pieces, as bodies arrive.
    for chunk in body.chunks(7) {
        capture.update(chunk);
    }
    capture.finish()
}

fn kept(body: &str) -> Arc<KeptAnswer> {
    let budget = Arc::new(CaptureBudget::new(SERVICE_BODY_BUDGET));
    match kept_with(&fields(&[]), &budget, body.as_bytes(), &[]) {
        Kept::Answer(a) => a,
        other => panic!("{other:?}"),
    }
}

fn compare(a: &str, c: &str) -> AnswerDiff {
    let (a, c) = (kept(a), kept(c));
    diff(side(&a), side(&c), &[])
}

fn side(answer: &KeptAnswer) -> Compared<'_> {
    Compared {
        status: Some(200),
        answer: Some(answer),
    }
}

fn paths(diff: &AnswerDiff) -> Vec<&str> {
    diff.paths.iter().map(|p| p.path.as_str()).collect()
}

#[test]
fn equal_answers_have_no_differing_path_whatever_their_key_order() {
    let d = compare(r#"{"a": 1, "b": [1, 2]}"#, r#"{"b": [1, 2], "a": 1}"#);
    assert_eq!(d.kind, DiffKind::Fields);
    assert!(d.paths.is_empty(), "{d:?}");
    assert!(compare("", "").paths.is_empty());
}

#[test]
fn nested_objects_and_arrays_are_named_by_path_with_indexes_collapsed() {
    let d = compare(
        r#"{"user": {"name": "ann", "age": 3}, "items": [{"price": 1}, {"price": 2}], "t": 1}"#,
        r#"{"user": {"name": "bob", "age": 3}, "items": [{"price": 1}, {"price": 5}], "t": 1}"#,
    );
    assert_eq!(paths(&d), ["items[].price", "user.name"]);
    let price = &d.paths[0];
    assert_eq!(
        (price.active.as_deref(), price.simulation.as_deref()),
        (Some("2"), Some("5"))
    );
    assert_eq!(d.paths[1].active.as_deref(), Some("\"ann\""));
    // A field one side lacks, an element one side lacks, a type change.
    let d = compare(
        r#"{"a": [1], "b": 1, "c": "1"}"#,
        r#"{"a": [1, 2], "c": 1, "d": null}"#,
    );
    assert_eq!(paths(&d), ["a[]", "b", "c", "d"]);
    assert_eq!(d.paths[0].active, None);
    assert_eq!(d.paths[0].simulation.as_deref(), Some("2"));
    assert_eq!(d.paths[1].simulation, None);
    assert_eq!(d.paths[3].active, None);
    assert_eq!(paths(&compare("[1, 2]", "[1, 3]")), ["[]"]);
    assert_eq!(paths(&compare("1", "2")), ["(root)"]);
}

#[test]
fn id_like_keys_and_wide_objects_collapse() {
    let d = compare(
        r#"{"users": {"123": {"n": 1}, "3f2b1c9e-1d2a-4b6c-9e8f-0a1b2c3d4e5f": {"n": 1}, "deadbeefdeadbeef01": 1, "name": 1}}"#,
        r#"{"users": {"123": {"n": 2}, "3f2b1c9e-1d2a-4b6c-9e8f-0a1b2c3d4e5f": {"n": 3}, "deadbeefdeadbeef01": 2, "name": 2}}"#,
    );
    assert_eq!(paths(&d), ["users{}.n", "users{}", "users.name"]);
    let wide = |v: u32| {
        let map: serde_json::Map<String, Value> = (0..40)
            .map(|i| (format!("k{i}"), Value::from(if i == 7 { v } else { 0 })))
            .collect();
        Value::Object(map).to_string()
    };
    assert_eq!(paths(&compare(&wide(1), &wide(2))), ["{}"]);
}

#[test]
fn depth_and_path_count_are_capped() {
    let deep = |v: u32| {
        let mut s = v.to_string();
        for _ in 0..12 {
            s = format!(r#"{{"a": {s}}}"#);
        }
        s
    };
    let d = compare(&deep(1), &deep(2));
    assert_eq!(paths(&d), ["a.a.a.a.a.a.a.a"]);
    assert!(d.paths[0]
        .active
        .as_deref()
        .unwrap()
        .starts_with(r#"{"a":"#));
    let many = |v: u32| {
        let map: serde_json::Map<String, Value> = (0..30)
            .map(|i| (format!("f{i:02}"), Value::from(v)))
            .collect();
        Value::Object(map).to_string()
    };
    let d = compare(&many(1), &many(2));
    assert_eq!(d.paths.len(), MAX_DIFF_PATHS + 1);
    assert_eq!(d.paths.last().unwrap().path, "(more)");
}

#[test]
fn samples_are_cut_to_eighty_characters() {
    let long = "x".repeat(200);
    let d = compare(&format!(r#"{{"s": "{long}"}}"#), r#"{"s": "y"}"#);
    let sample = d.paths[0].active.as_deref().unwrap();
    assert_eq!(sample.chars().count(), 80);
    assert!(sample.ends_with('…'));
}

#[test]
fn bodies_that_are_not_json_are_compared_by_digest() {
    let d = compare("plain text", r#"{"a": 1}"#);
    assert_eq!(
        (d.kind, d.digest_reason),
        (DiffKind::Digest, Some(DigestReason::NotJson))
    );
    assert_eq!(paths(&d), ["(body)"]);
    let d = compare("plain text", "plain text");
    assert_eq!(d.kind, DiffKind::Digest);
    assert!(d.paths.is_empty());
}

#[test]
fn a_body_too_large_is_compared_by_digest_and_gives_its_bytes_back() {
    let budget = Arc::new(CaptureBudget::new(SERVICE_BODY_BUDGET));
    let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_BODY));
    let comparison = fields(&[]);
    let (Kept::Answer(a), Kept::Answer(c)) = (
        kept_with(&comparison, &budget, big.as_bytes(), &[]),
        kept_with(&comparison, &budget, big.as_bytes(), &[]),
    ) else {
        panic!("answers kept")
    };
    assert_eq!(budget.held(), 0, "a body past the cap holds nothing");
    let d = diff(side(&a), side(&c), &[]);
    assert_eq!(
        (d.kind, d.digest_reason),
        (DiffKind::Digest, Some(DigestReason::TooLarge))
    );
    assert!(d.paths.is_empty());
    // Within the cap, a body holds its bytes until its pair closes.
    let small = kept_with(&comparison, &budget, b"{\"a\": 1}", &[]);
    assert_eq!(budget.held(), 8);
    drop(small);
    assert_eq!(budget.held(), 0);
}

#[test]
fn past_the_services_budget_answers_are_compared_by_digest() {
    let budget = Arc::new(CaptureBudget::new(10));
    let comparison = fields(&[]);
    let first = kept_with(&comparison, &budget, b"[1, 2, 3]", &[]);
    let (Kept::Answer(a), Kept::Answer(c)) =
        (first, kept_with(&comparison, &budget, b"[1, 2, 4]", &[]))
    else {
        panic!("answers kept")
    };
    let d = diff(side(&a), side(&c), &[]);
    assert_eq!(d.digest_reason, Some(DigestReason::OverBudget));
    assert_eq!(paths(&d), ["(body)"]);
}

#[test]
fn named_headers_and_the_status_are_fields() {
    let budget = Arc::new(CaptureBudget::new(SERVICE_BODY_BUDGET));
    let comparison = fields(&["etag", "x-absent"]);
    let (Kept::Answer(a), Kept::Answer(c)) = (
        kept_with(
            &comparison,
            &budget,
            b"{}",
            &[("etag", "\"v1\""), ("date", "1")],
        ),
        kept_with(
            &comparison,
            &budget,
            b"{}",
            &[("etag", "\"v2\""), ("date", "2")],
        ),
    ) else {
        panic!("answers kept")
    };
    let d = diff(
        Compared {
            status: Some(200),
            answer: Some(&a),
        },
        Compared {
            status: Some(201),
            answer: Some(&c),
        },
        &comparison.headers,
    );
    assert_eq!(paths(&d), ["(status)", "header:etag"]);
    assert_eq!(d.paths[0].simulation.as_deref(), Some("201"));
    assert_eq!(d.paths[1].active.as_deref(), Some(r#""\"v1\"""#));
    // A side that failed has no answer: only its status differs.
    let d = diff(
        side(&a),
        Compared {
            status: None,
            answer: None,
        },
        &comparison.headers,
    );
    assert_eq!(paths(&d), ["(status)", "header:etag"]);
}

#[test]
fn header_values_are_read_from_a_raw_answer_head() {
    let head = b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 2\r\n\r\n";
    let names = ["etag".to_string(), "x-absent".to_string()];
    assert_eq!(
        head_values(head, &names),
        [Some("\"v1\"".to_string()), None]
    );
    assert_eq!(head_values(b"garbage", &names), [None, None]);
}

#[test]
fn status_and_body_modes_keep_no_answer() {
    let budget = Arc::new(CaptureBudget::new(SERVICE_BODY_BUDGET));
    let status = Comparison::default();
    assert!(matches!(
        kept_with(&status, &budget, b"{}", &[]),
        Kept::Nothing
    ));
    let body = Comparison {
        mode: CompareMode::Body,
        headers: Arc::new([]),
    };
    let (a, c) = (
        kept_with(&body, &budget, b"abc", &[]),
        kept_with(&body, &budget, b"abc", &[]),
    );
    assert!(matches!(a, Kept::Digest(_)));
    assert_eq!(a.digest(), c.digest());
    assert_eq!(budget.held(), 0);
}

#[test]
fn digest_does_not_depend_on_chunking() {
    let mut whole = BodyDigest::new();
    whole.update(b"hello world, this is a body");
    let mut parts = BodyDigest::new();
    parts.update(b"hello wo");
    parts.update(b"rld, this is");
    parts.update(b" a body");
    assert_eq!(whole.finish(), parts.finish());
    let mut other = BodyDigest::new();
    other.update(b"hello world, this is a bodY");
    let mut again = BodyDigest::new();
    again.update(b"hello world, this is a body");
    assert_ne!(other.finish(), again.finish());
}
