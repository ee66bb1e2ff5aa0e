//! `/metrics` is valid Prometheus text with the names of CONTRACT.md.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use understudy_proxy::wire::PoolRole;

/// One sample: metric name, labels, value. Panics on a line that is not exposition format.
fn parse_sample(line: &str) -> (String, HashMap<String, String>, f64) {
    let (series, value) = line.rsplit_once(' ').expect("sample has a value");
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), HashMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').expect("labels close");
            let mut labels = HashMap::new();
            for pair in body.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label has =");
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .expect("label value quoted");
                labels.insert(k.to_string(), v.to_string());
            }
            (name.to_string(), labels)
        }
    };
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name {name:?}"
    );
    (name, labels, value)
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_with_the_contract_names() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Fail).await;
    let running = start(vec![config(
        "media",
        1,
        vec![
            entry("a", "v1", &v1, PoolRole::Active),
            entry("s", "v2", &v2, PoolRole::Simulation),
        ],
    )]);
    let http = Http::new();
    let lb = running.listen_addr("media").unwrap();
    for i in 0..10 {
        http.job(lb, Some(&format!("call-{i}")), "x").await;
    }
    assert!(
        eventually(std::time::Duration::from_secs(5), || v2.requests().len()
            == 10)
        .await
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let page = http
        .get(&format!("http://{}/metrics", running.admin_addr()))
        .await;
    assert_eq!(page.status, 200);
    let text = page.body;

    let mut types = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with("# HELP ") {
            samples.push(parse_sample(line));
        }
    }
    assert_eq!(types["understudy_balancer_jobs_total"], "counter");
    assert_eq!(
        types["understudy_balancer_job_duration_seconds"],
        "histogram"
    );
    assert_eq!(types["understudy_balancer_mirror_dropped_total"], "counter");
    assert_eq!(
        types["understudy_balancer_response_mismatch_total"],
        "counter"
    );

    let value = |name: &str, want: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    let active_ok = [
        ("service", "media"),
        ("version", "v1"),
        ("config", "active"),
        ("outcome", "ok"),
    ];
    assert_eq!(value("understudy_balancer_jobs_total", &active_ok), 10.0);
    let sim_errors = [
        ("service", "media"),
        ("version", "v2"),
        ("config", "simulation"),
        ("outcome", "server_error"),
    ];
    assert_eq!(value("understudy_balancer_jobs_total", &sim_errors), 10.0);
    assert_eq!(
        value(
            "understudy_balancer_job_duration_seconds_count",
            &[
                ("service", "media"),
                ("version", "v1"),
                ("config", "active")
            ]
        ),
        10.0
    );
    assert_eq!(
        value(
            "understudy_balancer_response_mismatch_total",
            &[("service", "media"), ("version", "v2")]
        ),
        10.0
    );
    assert_eq!(
        value(
            "understudy_balancer_sessions",
            &[("service", "media"), ("machine", "a")]
        ),
        10.0
    );

    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Err(e) => panic!("promtool is missing ({e}): run scripts/setup.sh"),
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    running.shutdown();
}
