//! The balancer end to end: in-process machines, real sockets on 127.0.0.1, the admin endpoint.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use understudy_proxy::wire::{
    self, BalancerConfig, ErrorBody, MachineState, Outcome, PoolRole, PushAck, StatsReport,
};
use understudy_proxy::{decode_histogram, LimitsSpec, SpawnOptions};

async fn stats(http: &Http, admin: std::net::SocketAddr, service: &str, since: u64) -> StatsReport {
    let answer = http
        .get(&format!(
            "http://{admin}{}",
            wire::stats_path(service, since)
        ))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).unwrap()
}

async fn push(http: &Http, admin: std::net::SocketAddr, config: &BalancerConfig) -> Answer {
    http.put_json(
        &format!("http://{admin}{}", wire::config_path(&config.service)),
        config,
    )
    .await
}

fn series_count(report: &StatsReport, version: &str, role: PoolRole) -> u64 {
    report
        .series
        .iter()
        .filter(|s| s.version == version && s.config == role)
        .map(|s| decode_histogram(&s.histogram).unwrap().len())
        .sum()
}

/// Reads stats (since 0) until `done` holds.
async fn stats_until(
    http: &Http,
    admin: std::net::SocketAddr,
    service: &str,
    done: impl Fn(&StatsReport) -> bool,
) -> StatsReport {
    for _ in 0..250 {
        let report = stats(http, admin, service, 0).await;
        if done(&report) {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("stats never reached the expected state");
}

/// Reads stats until `pairs` pairs arrived (copies finish after the active answers).
async fn pairs_after(
    http: &Http,
    admin: std::net::SocketAddr,
    service: &str,
    pairs: usize,
) -> StatsReport {
    for _ in 0..250 {
        let report = stats(http, admin, service, 0).await;
        if report.pairs.len() >= pairs {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{pairs} pairs never arrived");
}

#[tokio::test]
async fn active_answers_and_every_job_is_copied_to_the_simulation_pool() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let running = start(vec![config(
        "media",
        1,
        vec![
            entry("m1", "v1", &v1, PoolRole::Active),
            entry("m2", "v2", &v2, PoolRole::Simulation),
        ],
    )]);
    let http = Http::new();
    let lb = running.listen_addr("media").unwrap();
    assert_ne!(lb.port(), 0);
    assert_ne!(running.admin_addr().port(), 0);
    for i in 0..20 {
        let a = http.job(lb, None, &format!("job-{i}")).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, format!("v1:job-{i}"));
    }
    let report = pairs_after(&http, running.admin_addr(), "media", 20).await;
    assert_eq!(report.pairs.len(), 20);
    assert!(report.pairs.iter().all(|p| p.matched
        && p.active.version == "v1"
        && p.simulation.version == "v2"
        && p.active.outcome == Outcome::Ok));
    let jobs: HashSet<u64> = report.pairs.iter().map(|p| p.job).collect();
    assert_eq!(jobs.len(), 20);
    assert_eq!(series_count(&report, "v1", PoolRole::Active), 20);
    assert_eq!(series_count(&report, "v2", PoolRole::Simulation), 20);

    let copies = v2.requests();
    assert_eq!(copies.len(), 20);
    for c in &copies {
        assert_eq!(c.method, "POST");
        assert_eq!(c.path, "/job");
        assert_eq!(c.headers.get("x-understudy-simulation").unwrap(), "1");
        assert!(c.body.starts_with(b"job-"));
    }
    assert!(v1
        .requests()
        .iter()
        .all(|r| !r.headers.contains_key("x-understudy-simulation")));
    running.shutdown();
}

/// A simulation machine that hangs, resets or fails adds no error to active jobs and no delay
/// beyond what the same jobs take without any mirror.
#[tokio::test]
async fn a_broken_mirror_does_not_disturb_the_active_path() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let options = SpawnOptions {
        mirror_timeout: Duration::from_secs(30),
        ..insecure()
    };
    let http = Http::new();

    // Baseline: the same jobs with no simulation pool.
    let baseline = start_with(
        vec![config(
            "svc",
            1,
            vec![entry("a", "v1", &v1, PoolRole::Active)],
        )],
        options.clone(),
    );
    let mut baseline_total = Duration::ZERO;
    for _ in 0..30 {
        let a = http
            .job(baseline.listen_addr("svc").unwrap(), None, "x")
            .await;
        assert_eq!(a.status, 200);
        baseline_total += a.elapsed;
    }
    baseline.shutdown();

    for behaviour in [Behaviour::Hang, Behaviour::Reset, Behaviour::Fail] {
        let bad = Machine::start("bad", behaviour).await;
        let running = start_with(
            vec![config(
                "svc",
                1,
                vec![
                    entry("a", "v1", &v1, PoolRole::Active),
                    entry("s", "v2", &bad, PoolRole::Simulation),
                ],
            )],
            options.clone(),
        );
        let lb = running.listen_addr("svc").unwrap();
        let mut total = Duration::ZERO;
        for i in 0..30 {
            let a = http.job(lb, Some(&format!("call-{i}")), "x").await;
            assert_eq!(a.status, 200, "{behaviour:?}");
            assert_eq!(a.body, "v1:x");
            total += a.elapsed;
        }
        // Loose on purpose: a hanging mirror would add its whole 30 s timeout per job if the
        // active path waited for it; any real coupling shows up as seconds, not as noise.
        assert!(
            total < baseline_total * 5 + Duration::from_secs(2),
            "{behaviour:?}: {total:?} against baseline {baseline_total:?}"
        );
        // Jobs are recorded just after their answer left: wait for the last one.
        let report = stats_until(&http, running.admin_addr(), "svc", |r| {
            series_count(r, "v1", PoolRole::Active) == 30
        })
        .await;
        let active = report
            .series
            .iter()
            .find(|s| s.config == PoolRole::Active)
            .unwrap();
        assert_eq!(active.outcomes.ok, 30, "{behaviour:?}");
        assert_eq!(
            active.outcomes.server_error
                + active.outcomes.timeout
                + active.outcomes.connect_failure,
            0
        );
        if !matches!(behaviour, Behaviour::Hang) {
            let report = pairs_after(&http, running.admin_addr(), "svc", 30).await;
            for p in &report.pairs {
                // A reset right after accept can also surface while connecting.
                let failed = match behaviour {
                    Behaviour::Reset => matches!(
                        p.simulation.outcome,
                        Outcome::ServerError | Outcome::ConnectFailure
                    ),
                    _ => p.simulation.outcome == Outcome::ServerError,
                };
                assert!(
                    failed && !p.matched && p.active.outcome == Outcome::Ok,
                    "{behaviour:?}: {p:?}"
                );
            }
        }
        running.shutdown();
    }
}

#[tokio::test]
async fn a_hanging_mirror_times_out_into_the_pairs() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let hang = Machine::start("hang", Behaviour::Hang).await;
    let running = start_with(
        vec![config(
            "svc",
            1,
            vec![
                entry("a", "v1", &v1, PoolRole::Active),
                entry("s", "v2", &hang, PoolRole::Simulation),
            ],
        )],
        SpawnOptions {
            mirror_timeout: Duration::from_millis(200),
            ..insecure()
        },
    );
    let http = Http::new();
    for _ in 0..5 {
        assert_eq!(
            http.job(running.listen_addr("svc").unwrap(), None, "x")
                .await
                .status,
            200
        );
    }
    let report = pairs_after(&http, running.admin_addr(), "svc", 5).await;
    assert!(report
        .pairs
        .iter()
        .all(|p| p.simulation.outcome == Outcome::Timeout && p.simulation.status.is_none()));
    running.shutdown();
}

#[tokio::test]
async fn a_full_mirror_queue_drops_and_counts_copies() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let hang = Machine::start("hang", Behaviour::Hang).await;
    let running = start_with(
        vec![config(
            "svc",
            1,
            vec![
                entry("a", "v1", &v1, PoolRole::Active),
                entry("s", "v2", &hang, PoolRole::Simulation),
            ],
        )],
        SpawnOptions {
            mirror_queue: 1,
            mirror_concurrency: 2,
            mirror_timeout: Duration::from_secs(30),
            ..insecure()
        },
    );
    let http = Http::new();
    for _ in 0..10 {
        assert_eq!(
            http.job(running.listen_addr("svc").unwrap(), None, "x")
                .await
                .status,
            200
        );
    }
    let report = stats(&http, running.admin_addr(), "svc", 0).await;
    // Two copies in flight, one held by the dispatcher, one queued: the rest were dropped.
    assert!(report.mirror_dropped >= 6, "{}", report.mirror_dropped);
    let metrics = http
        .get(&format!("http://{}/metrics", running.admin_addr()))
        .await
        .body;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("understudy_balancer_mirror_dropped_total{service=\"svc\"}"))
        .unwrap();
    assert_eq!(
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap(),
        report.mirror_dropped
    );
    running.shutdown();
}

/// A slow simulation version gets no more copies in flight than the service has active jobs in
/// flight: the rest wait in its queue (counted as held) and are all sent, none dropped. Without
/// the cap (`mirror_per_active: 0`) the same load piles copies up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_in_flight_follow_the_active_jobs_in_flight() {
    const CALLERS: usize = 4;
    const JOBS_EACH: usize = 10;
    let http = Http::new();
    let mut max_seen = Vec::new();
    for per_active in [1, 0] {
        let v1 = Machine::start("v1", Behaviour::Echo).await;
        let v2 = Machine::start("v2", Behaviour::Slow(Duration::from_millis(30))).await;
        let running = start_with(
            vec![config(
                "svc",
                1,
                vec![
                    entry("a", "v1", &v1, PoolRole::Active),
                    entry("s", "v2", &v2, PoolRole::Simulation),
                ],
            )],
            SpawnOptions {
                mirror_per_active: per_active,
                ..insecure()
            },
        );
        let lb = running.listen_addr("svc").unwrap();
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let http = http.clone();
                tokio::spawn(async move {
                    for _ in 0..JOBS_EACH {
                        assert_eq!(http.job(lb, None, "x").await.status, 200);
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
        let report = pairs_after(&http, running.admin_addr(), "svc", CALLERS * JOBS_EACH).await;
        assert_eq!(report.mirror_dropped, 0);
        assert!(report
            .pairs
            .iter()
            .all(|p| p.simulation.outcome == Outcome::Ok));
        let metrics = http
            .get(&format!("http://{}/metrics", running.admin_addr()))
            .await
            .body;
        let held: u64 = metrics
            .lines()
            .find(|l| l.starts_with("understudy_balancer_mirror_held_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0);
        if per_active == 1 {
            assert!(held > 0, "copies were never held back by the cap");
        } else {
            assert_eq!(held, 0);
        }
        max_seen.push(v2.concurrency.max());
        running.shutdown();
    }
    assert!(
        max_seen[0] <= CALLERS,
        "capped: {} copies at once on v2 with {CALLERS} callers",
        max_seen[0]
    );
    assert!(
        max_seen[1] > CALLERS,
        "uncapped: only {} copies at once on v2",
        max_seen[1]
    );
}

#[tokio::test]
async fn each_simulation_version_gets_a_copy_and_its_own_pair() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let control = Machine::start("v1", Behaviour::Echo).await;
    let running = start(vec![with_control(&v1, &v2, &control)]);
    let http = Http::new();
    for _ in 0..10 {
        http.job(running.listen_addr("svc").unwrap(), None, "x")
            .await;
    }
    let report = pairs_after(&http, running.admin_addr(), "svc", 20).await;
    let mut by_job: HashMap<u64, Vec<String>> = HashMap::new();
    for p in &report.pairs {
        by_job
            .entry(p.job)
            .or_default()
            .push(p.simulation.version.clone());
    }
    assert_eq!(by_job.len(), 10);
    for versions in by_job.values_mut() {
        versions.sort();
        assert_eq!(versions, &vec!["v1".to_string(), "v2".to_string()]);
    }
    assert_eq!(v2.requests().len(), 10);
    assert_eq!(control.requests().len(), 10);
    // The control's answers differ in body only; without compare_body they match.
    assert!(report.pairs.iter().all(|p| p.matched));
    running.shutdown();
}

#[tokio::test]
async fn body_digests_are_compared_when_the_service_asks() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let same = Machine::start("v1", Behaviour::Echo).await;
    let mut c = with_control(&v1, &v2, &same);
    c.compare_body = true;
    let running = start(vec![c]);
    let http = Http::new();
    for _ in 0..5 {
        http.job(running.listen_addr("svc").unwrap(), None, "x")
            .await;
    }
    let report = pairs_after(&http, running.admin_addr(), "svc", 10).await;
    for p in &report.pairs {
        // v2 answers "v2:x", the control answers "v1:x" like the active machine.
        assert_eq!(p.matched, p.simulation.version == "v1", "{p:?}");
    }
    let metrics = http
        .get(&format!("http://{}/metrics", running.admin_addr()))
        .await
        .body;
    assert!(metrics
        .contains("understudy_balancer_response_mismatch_total{service=\"svc\",version=\"v2\"} 5"));
    running.shutdown();
}

/// Answers compared field by field: v2 changes a price (and the etag naming it), every answer
/// carries its own `seq`; the control differs in `seq` only. Answers that are not JSON are
/// compared by digest and counted.
#[tokio::test]
async fn json_answers_are_compared_field_by_field() {
    use understudy_wire::{CompareMode, DiffKind, DigestReason};
    let v1 = Machine::start("v1", Behaviour::Json { price: 10 }).await;
    let v2 = Machine::start("v2", Behaviour::Json { price: 11 }).await;
    let same = Machine::start("v1", Behaviour::Json { price: 10 }).await;
    let mut c = with_control(&v1, &v2, &same);
    c.compare = Some(CompareMode::Fields);
    c.compare_headers = vec!["ETag".into()];
    let text_v1 = Machine::start("v1", Behaviour::Echo).await;
    let text_v2 = Machine::start("v2", Behaviour::Echo).await;
    let mut text = config(
        "text",
        1,
        vec![
            entry("a", "v1", &text_v1, PoolRole::Active),
            entry("s2", "v2", &text_v2, PoolRole::Simulation),
        ],
    );
    text.compare = Some(CompareMode::Fields);
    let running = start(vec![c, text]);
    let http = Http::new();
    for _ in 0..5 {
        http.job(running.listen_addr("svc").unwrap(), None, "x")
            .await;
        http.job(running.listen_addr("text").unwrap(), None, "x")
            .await;
    }
    let report = pairs_after(&http, running.admin_addr(), "svc", 10).await;
    for p in &report.pairs {
        let diff = p.diff.as_ref().expect("a field diff");
        assert_eq!((diff.kind, diff.digest_reason), (DiffKind::Fields, None));
        let mut paths: Vec<&str> = diff.paths.iter().map(|d| d.path.as_str()).collect();
        paths.sort();
        assert!(!p.matched);
        if p.simulation.version == "v2" {
            assert_eq!(
                paths,
                ["header:etag", "items[].price", "name", "seq"],
                "{p:?}"
            );
            let price = diff
                .paths
                .iter()
                .find(|d| d.path == "items[].price")
                .unwrap();
            assert_eq!(
                (price.active.as_deref(), price.simulation.as_deref()),
                (Some("10"), Some("11"))
            );
        } else {
            assert_eq!(paths, ["seq"], "{p:?}");
        }
    }
    let report = pairs_after(&http, running.admin_addr(), "text", 5).await;
    for p in &report.pairs {
        let diff = p.diff.as_ref().expect("a digest diff");
        assert_eq!(
            (diff.kind, diff.digest_reason),
            (DiffKind::Digest, Some(DigestReason::NotJson))
        );
        // "v1:x" and "v2:x".
        assert_eq!(diff.paths[0].path, "(body)");
    }
    let metrics = http
        .get(&format!("http://{}/metrics", running.admin_addr()))
        .await
        .body;
    let counted = metrics.lines().any(|l| {
        l.starts_with("understudy_balancer_field_digest_total{")
            && l.contains("reason=\"not_json\"")
            && l.contains("service=\"text\"")
            && l.ends_with(" 5")
    });
    assert!(counted, "{metrics}");
    running.shutdown();
}

#[tokio::test]
async fn mirror_fraction_copies_about_that_share() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let mut c = config(
        "svc",
        1,
        vec![
            entry("a", "v1", &v1, PoolRole::Active),
            entry("s", "v2", &v2, PoolRole::Simulation),
        ],
    );
    c.mirror_fraction = 0.5;
    let running = start(vec![c]);
    let http = Http::new();
    for _ in 0..200 {
        http.job(running.listen_addr("svc").unwrap(), None, "x")
            .await;
    }
    assert!(eventually(Duration::from_secs(5), || v2.requests().len() >= 80).await);
    let copies = v2.requests().len();
    assert!((80..=120).contains(&copies), "{copies}");
    running.shutdown();
}

#[tokio::test]
async fn simulation_traffic_never_reaches_an_active_machine() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let running = start(vec![
        config(
            "with-sim",
            1,
            vec![
                entry("a", "v1", &v1, PoolRole::Active),
                entry("s", "v2", &v2, PoolRole::Simulation),
            ],
        ),
        config("no-sim", 1, vec![entry("a", "v1", &v1, PoolRole::Active)]),
    ]);
    let http = Http::new();
    let marked = [("x-understudy-simulation", "1")];
    // From a cluster machine (the internal listener): to the simulation pool only.
    let a = http
        .send(
            "POST",
            &format!("http://{}/job", running.internal_addr("with-sim").unwrap()),
            &marked,
            "copy",
        )
        .await;
    assert_eq!((a.status, a.body.as_str()), (200, "v2:copy"));
    let refused = http
        .send(
            "POST",
            &format!("http://{}/job", running.internal_addr("no-sim").unwrap()),
            &marked,
            "copy",
        )
        .await;
    assert_eq!(refused.status, 503);
    let err: ErrorBody = serde_json::from_str(&refused.body).unwrap();
    assert!(err.error.contains("simulation"), "{}", err.error);
    assert!(v1.requests().is_empty());
    // The simulation job itself is not copied again.
    assert_eq!(v2.requests().len(), 1);
    running.shutdown();
}

#[tokio::test]
async fn sessions_stick_through_a_pool_change() {
    let m: Vec<Machine> = futures_join(["a", "b", "c"]).await;
    let http = Http::new();
    let running = start(vec![config(
        "svc",
        1,
        vec![
            entry("a", "v1", &m[0], PoolRole::Active),
            entry("b", "v1", &m[1], PoolRole::Active),
        ],
    )]);
    let lb = running.listen_addr("svc").unwrap();
    let mut first: HashMap<String, String> = HashMap::new();
    for i in 0..10 {
        let s = format!("call-{i}");
        let a = http.job(lb, Some(&s), "x").await;
        first.insert(s, a.body);
    }
    assert!(first.values().any(|b| b.starts_with("a:")));
    assert!(first.values().any(|b| b.starts_with("b:")));
    // c joins with a big weight, b's weight changes: sessions stay put.
    let mut next = config(
        "svc",
        2,
        vec![
            entry("a", "v1", &m[0], PoolRole::Active),
            entry("b", "v1", &m[1], PoolRole::Active),
            entry("c", "v1", &m[2], PoolRole::Active),
        ],
    );
    next.machines[1].weight = 5;
    next.machines[2].weight = 1000;
    assert_eq!(push(&http, running.admin_addr(), &next).await.status, 200);
    for (s, body) in &first {
        for _ in 0..3 {
            assert_eq!(&http.job(lb, Some(s), "x").await.body, body);
        }
    }
    // New sessions follow the new weights.
    let fresh: Vec<String> = {
        let mut out = Vec::new();
        for i in 0..10 {
            out.push(http.job(lb, Some(&format!("new-{i}")), "x").await.body);
        }
        out
    };
    assert!(
        fresh.iter().filter(|b| b.starts_with("c:")).count() >= 8,
        "{fresh:?}"
    );
    running.shutdown();
}

async fn futures_join(names: [&'static str; 3]) -> Vec<Machine> {
    let mut out = Vec::new();
    for n in names {
        out.push(Machine::start(n, Behaviour::Echo).await);
    }
    out
}

#[tokio::test]
async fn config_versions_are_ordered_and_idempotent() {
    let m = futures_join(["a", "b", "c"]).await;
    let http = Http::new();
    let running = start(vec![config(
        "svc",
        5,
        vec![entry("a", "v1", &m[0], PoolRole::Active)],
    )]);
    let admin = running.admin_addr();
    let lb = running.listen_addr("svc").unwrap();

    let v6 = config("svc", 6, vec![entry("b", "v1", &m[1], PoolRole::Active)]);
    let ok = push(&http, admin, &v6).await;
    assert_eq!(ok.status, 200);
    let ack: PushAck = serde_json::from_str(&ok.body).unwrap();
    assert_eq!((ack.service.as_str(), ack.version), ("svc", 6));
    assert!(http.job(lb, None, "x").await.body.starts_with("b:"));

    // Same version again: a no-op, even with other content.
    let again = config("svc", 6, vec![entry("c", "v1", &m[2], PoolRole::Active)]);
    assert_eq!(push(&http, admin, &again).await.status, 200);
    assert!(http.job(lb, None, "x").await.body.starts_with("b:"));

    // Older: refused, nothing changes.
    let old = config("svc", 4, vec![entry("c", "v1", &m[2], PoolRole::Active)]);
    let refused = push(&http, admin, &old).await;
    assert_eq!(refused.status, 409);
    let err: ErrorBody = serde_json::from_str(&refused.body).unwrap();
    assert!(err.error.contains("older"), "{}", err.error);
    assert!(http.job(lb, None, "x").await.body.starts_with("b:"));
    assert_eq!(stats(&http, admin, "svc", 0).await.config_version, 6);

    // Unknown service.
    let other = config("nope", 9, vec![entry("c", "v1", &m[2], PoolRole::Active)]);
    assert_eq!(push(&http, admin, &other).await.status, 404);
    running.shutdown();
}

#[tokio::test]
async fn a_swap_does_not_drop_jobs_in_flight() {
    let slow = Machine::start("slow", Behaviour::Slow(Duration::from_millis(400))).await;
    let fast = Machine::start("fast", Behaviour::Echo).await;
    let http = Http::new();
    let running = start(vec![config(
        "svc",
        1,
        vec![entry("s", "v1", &slow, PoolRole::Active)],
    )]);
    let lb = running.listen_addr("svc").unwrap();
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.job(lb, None, "x").await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || slow.requests().len() == 5).await);
    let next = config("svc", 2, vec![entry("f", "v1", &fast, PoolRole::Active)]);
    assert_eq!(push(&http, running.admin_addr(), &next).await.status, 200);
    assert_eq!(http.job(lb, None, "x").await.body, "fast:x");
    for job in in_flight {
        let a = job.await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "slow:x"));
    }
    running.shutdown();
}

#[tokio::test]
async fn a_removed_machine_drains_its_sessions() {
    let m = futures_join(["a", "b", "c"]).await;
    let http = Http::new();
    let running = start(vec![config(
        "svc",
        1,
        vec![
            entry("a", "v1", &m[0], PoolRole::Active),
            entry("b", "v1", &m[1], PoolRole::Active),
        ],
    )]);
    let (admin, lb) = (running.admin_addr(), running.listen_addr("svc").unwrap());
    let mut on_a = Vec::new();
    for i in 0..6 {
        let s = format!("call-{i}");
        if http.job(lb, Some(&s), "x").await.body.starts_with("a:") {
            on_a.push(s);
        }
    }
    assert!(!on_a.is_empty());
    let next = config("svc", 2, vec![entry("b", "v1", &m[1], PoolRole::Active)]);
    assert_eq!(push(&http, admin, &next).await.status, 200);

    let report = stats(&http, admin, "svc", 0).await;
    let a = report.machines.iter().find(|s| s.id == "a").unwrap();
    assert_eq!(a.state, MachineState::Draining);
    assert_eq!(a.sessions, on_a.len() as u64);
    // Calls on a go on there; new calls never go to a.
    for s in &on_a {
        assert!(http.job(lb, Some(s), "x").await.body.starts_with("a:"));
    }
    for i in 0..10 {
        assert!(http
            .job(lb, Some(&format!("new-{i}")), "x")
            .await
            .body
            .starts_with("b:"));
    }
    // The calls end (tear-down job); the drain is over and a leaves.
    for s in &on_a {
        let url = format!("http://{lb}/hangup");
        let a = http
            .send(
                "POST",
                &url,
                &[("x-session-id", s), ("x-session-event", "end")],
                "",
            )
            .await;
        assert!(a.body.starts_with("a:"));
    }
    let mut gone = false;
    for _ in 0..100 {
        let report = stats(&http, admin, "svc", 0).await;
        if report.machines.iter().all(|s| s.id != "a") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "a never left the stats");
    running.shutdown();
}

#[tokio::test]
async fn every_bad_push_names_its_field_and_changes_nothing() {
    let m = futures_join(["a", "b", "c"]).await;
    let http = Http::new();
    let good = config("svc", 1, vec![entry("a", "v1", &m[0], PoolRole::Active)]);
    let running = start(vec![good.clone()]);
    let admin = running.admin_addr();
    let url = format!("http://{admin}{}", wire::config_path("svc"));

    let mut cases: Vec<(String, &str)> = Vec::new();
    let mut value = serde_json::to_value(config(
        "svc",
        2,
        vec![entry("b", "v1", &m[1], PoolRole::Active)],
    ))
    .unwrap();
    value["mirror_fractoin"] = 0.5.into();
    cases.push((value.to_string(), "mirror_fractoin"));
    let mut value = serde_json::to_value(config(
        "svc",
        2,
        vec![entry("b", "v1", &m[1], PoolRole::Active)],
    ))
    .unwrap();
    value["machines"][0]["wieght"] = 3.into();
    cases.push((value.to_string(), "wieght"));
    let mut bad = config("svc", 2, vec![entry("b", "v1", &m[1], PoolRole::Active)]);
    bad.machines[0].address = "not-an-address".into();
    cases.push((serde_json::to_string(&bad).unwrap(), "machines[0].address"));
    let bad = config(
        "svc",
        2,
        vec![entry("b", "v1", &m[1], PoolRole::Simulation)],
    );
    cases.push((serde_json::to_string(&bad).unwrap(), "machines"));
    let mut bad = config("svc", 2, vec![entry("b", "v1", &m[1], PoolRole::Active)]);
    bad.machines[0].weight = 0;
    cases.push((serde_json::to_string(&bad).unwrap(), "machines[0].weight"));
    let mut bad = config("svc", 2, vec![entry("b", "v1", &m[1], PoolRole::Active)]);
    bad.machines[0].weight = 5000;
    cases.push((serde_json::to_string(&bad).unwrap(), "machines[0].weight"));
    let bad = config(
        "svc",
        2,
        vec![
            entry("b", "v1", &m[1], PoolRole::Active),
            entry("b", "v1", &m[2], PoolRole::Active),
        ],
    );
    cases.push((serde_json::to_string(&bad).unwrap(), "machines[1].id"));
    cases.push(("{not json".into(), "key must be a string"));

    for (body, field) in cases {
        let a = http
            .send("PUT", &url, &[("content-type", "application/json")], &body)
            .await;
        assert_eq!(a.status, 400, "{field}: {}", a.body);
        let err: ErrorBody = serde_json::from_str(&a.body).unwrap();
        assert!(
            err.error.contains(field),
            "expected {field:?} in {:?}",
            err.error
        );
        let running_config: BalancerConfig =
            serde_json::from_str(&http.get(&url).await.body).unwrap();
        assert_eq!(running_config, good);
    }
    assert!(http
        .job(running.listen_addr("svc").unwrap(), None, "x")
        .await
        .body
        .starts_with("a:"));
    running.shutdown();
}

#[tokio::test]
async fn bad_configs_are_refused_at_start() {
    let m = Machine::start("a", Behaviour::Echo).await;
    let mut bad = config("svc", 1, vec![entry("a", "v1", &m, PoolRole::Active)]);
    bad.machines[0].weight = 0;
    let err = understudy_proxy::spawn_with(
        understudy_proxy::ProcessConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![understudy_proxy::BalancerSpec::new(
                "127.0.0.1:0".parse().unwrap(),
                bad,
            )],
        ),
        insecure(),
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string()
            .contains("balancers[0].config.machines[0].weight"),
        "{err}"
    );

    // A listen address already taken is refused with the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = understudy_proxy::spawn_with(
        understudy_proxy::ProcessConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![understudy_proxy::BalancerSpec::new(
                addr,
                config("svc", 1, vec![entry("a", "v1", &m, PoolRole::Active)]),
            )],
        ),
        insecure(),
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let text = r#"
admin = "127.0.0.1:0"
[[balancers]]
listen = "127.0.0.1:0"
lisen = "x"
"#;
    let err = understudy_proxy::ProcessConfig::from_toml_str(text).unwrap_err();
    assert!(err.to_string().contains("lisen"), "{err}");
}

#[tokio::test]
async fn stats_windows_since_a_cursor_are_lossless() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let running = start(vec![config(
        "svc",
        1,
        vec![
            entry("a", "v1", &v1, PoolRole::Active),
            entry("s", "v2", &v2, PoolRole::Simulation),
        ],
    )]);
    let (admin, lb) = (running.admin_addr(), running.listen_addr("svc").unwrap());
    let http = Http::new();
    let mut cursor = 0;
    let mut active_seen = 0;
    let mut pairs_seen = HashSet::new();
    for round in 1..=4u64 {
        for _ in 0..round * 5 {
            assert_eq!(http.job(lb, None, "x").await.status, 200);
        }
        let report = stats(&http, admin, "svc", cursor).await;
        assert!(report.cursor > cursor);
        assert_eq!(report.pairs_lost, 0);
        // A job is recorded when pingora has finished it, just after the caller got its
        // answer, so a window may miss the last jobs; the next window has them.
        active_seen += series_count(&report, "v1", PoolRole::Active);
        assert!(active_seen <= (1..=round).map(|r| r * 5).sum::<u64>());
        for p in &report.pairs {
            assert!(pairs_seen.insert(p.job), "pair {} counted twice", p.job);
        }
        cursor = report.cursor;
    }
    // Copies still in flight land in a later window; in the end every one is seen once.
    assert!(
        eventually(Duration::from_secs(5), || v2.requests().len() == 50).await,
        "copies missing"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = stats(&http, admin, "svc", cursor).await;
    active_seen += series_count(&last, "v1", PoolRole::Active);
    for p in &last.pairs {
        assert!(pairs_seen.insert(p.job), "pair {} counted twice", p.job);
    }
    assert_eq!(pairs_seen.len(), 50);
    assert_eq!(active_seen, 50);
    let total = stats(&http, admin, "svc", 0).await;
    assert_eq!(series_count(&total, "v1", PoolRole::Active), 50);
    assert_eq!(series_count(&total, "v2", PoolRole::Simulation), 50);
    assert_eq!(
        total
            .series
            .iter()
            .find(|s| s.version == "v1")
            .unwrap()
            .outcomes
            .ok,
        50
    );

    // A cursor from the future is refused.
    let a = http
        .get(&format!(
            "http://{admin}{}",
            wire::stats_path("svc", 1_000_000)
        ))
        .await;
    assert_eq!(a.status, 400);
    running.shutdown();
}

#[tokio::test]
async fn outcomes_of_failing_active_machines_are_classified() {
    let fail = Machine::start("fail", Behaviour::Fail).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let v2 = Machine::start("v2", Behaviour::Echo).await;
    let mut c = config(
        "svc",
        1,
        vec![
            entry("f", "v1", &fail, PoolRole::Active),
            entry("s", "v2", &v2, PoolRole::Simulation),
        ],
    );
    let running = start(vec![c.clone()]);
    let (admin, lb) = (running.admin_addr(), running.listen_addr("svc").unwrap());
    let http = Http::new();
    assert_eq!(http.job(lb, None, "x").await.status, 500);
    c.version = 2;
    c.machines[0].address = dead_addr.to_string();
    assert_eq!(push(&http, admin, &c).await.status, 200);
    // The active connect fails: the caller gets 502, and the POST is still copied to v2.
    assert_eq!(http.job(lb, None, "posted-body").await.status, 502);
    let report = pairs_after(&http, admin, "svc", 2).await;
    let v1 = report.series.iter().find(|s| s.version == "v1").unwrap();
    assert_eq!(v1.outcomes.server_error, 1);
    assert_eq!(v1.outcomes.connect_failure, 1);
    let failed = report
        .pairs
        .iter()
        .find(|p| p.active.outcome == Outcome::ConnectFailure)
        .unwrap();
    assert_eq!(failed.simulation.outcome, Outcome::Ok);
    assert!(!failed.matched);
    assert!(v2.requests().iter().any(|r| &r.body[..] == b"posted-body"));
    running.shutdown();
}

#[tokio::test]
async fn sets_run_side_by_side_and_shutdown_closes_the_listeners() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let one = start(vec![config(
        "svc",
        1,
        vec![entry("a", "v1", &v1, PoolRole::Active)],
    )]);
    let two = start(vec![
        config("svc", 1, vec![entry("a", "v1", &v1, PoolRole::Active)]),
        config("other", 1, vec![entry("a", "v1", &v1, PoolRole::Active)]),
    ]);
    let http = Http::new();
    for lb in [
        one.listen_addr("svc").unwrap(),
        two.listen_addr("svc").unwrap(),
        two.listen_addr("other").unwrap(),
    ] {
        assert_eq!(http.job(lb, None, "x").await.body, "v1:x");
    }
    let (lb, admin) = (one.listen_addr("svc").unwrap(), one.admin_addr());
    let health = http.get(&format!("http://{admin}/healthz")).await;
    assert_eq!(health.status, 200);
    one.shutdown();
    assert!(std::net::TcpStream::connect(lb).is_err());
    assert!(std::net::TcpStream::connect(admin).is_err());
    assert_eq!(
        http.job(two.listen_addr("svc").unwrap(), None, "x")
            .await
            .status,
        200
    );
    two.shutdown();
}

#[tokio::test]
async fn a_hanging_active_machine_times_out() {
    let hang = Machine::start("hang", Behaviour::Hang).await;
    let running = start_with_limits(
        vec![config(
            "svc",
            1,
            vec![entry("h", "v1", &hang, PoolRole::Active)],
        )],
        LimitsSpec {
            machine_answer_timeout_ms: 300,
            ..LimitsSpec::default()
        },
        insecure(),
    );
    let http = Http::new();
    let answer = http
        .job(running.listen_addr("svc").unwrap(), None, "x")
        .await;
    assert!(answer.status >= 500, "{}", answer.status);
    let report = stats_until(&http, running.admin_addr(), "svc", |r| {
        series_count(r, "v1", PoolRole::Active) == 1
    })
    .await;
    assert_eq!(report.series[0].outcomes.timeout, 1);
    running.shutdown();
}

/// Median of the per-pair ratio simulation latency / active latency.
fn median_pair_ratio(report: &StatsReport) -> f64 {
    let mut ratios: Vec<f64> = report
        .pairs
        .iter()
        .map(|p| p.simulation.latency_us as f64 / p.active.latency_us.max(1) as f64)
        .collect();
    assert!(!ratios.is_empty());
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn series_median_us(report: &StatsReport, version: &str, role: PoolRole) -> u64 {
    let series = report
        .series
        .iter()
        .find(|s| s.version == version && s.config == role)
        .expect("series present");
    decode_histogram(&series.histogram)
        .unwrap()
        .value_at_quantile(0.5)
}

/// Both sides of a pair measure the same thing (the machine's service time seen from the
/// balancer): identical machines give a per-pair ratio near 1, in the pairs and in the series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_machines_measure_alike_on_both_sides_of_a_pair() {
    // Long enough that scheduling noise on a busy 2-core host (a few ms) stays small beside it.
    let delay = Behaviour::Slow(Duration::from_millis(80));
    let v1 = Machine::start("same", delay).await;
    let v2 = Machine::start("same", delay).await;
    let running = start(vec![config(
        "media",
        1,
        vec![
            entry("m1", "v1", &v1, PoolRole::Active),
            entry("m2", "v2", &v2, PoolRole::Simulation),
        ],
    )]);
    let http = Http::new();
    let lb = running.listen_addr("media").unwrap();
    const CALLERS: usize = 10;
    const JOBS_EACH: usize = 30;
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let http = http.clone();
            tokio::spawn(async move {
                for j in 0..JOBS_EACH {
                    let a = http.job(lb, None, &format!("job-{c}-{j}")).await;
                    assert_eq!(a.status, 200);
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    let jobs = CALLERS * JOBS_EACH;
    let report = pairs_after(&http, running.admin_addr(), "media", jobs).await;
    assert!(report
        .pairs
        .iter()
        .all(|p| p.active.outcome == Outcome::Ok && p.simulation.outcome == Outcome::Ok));
    let ratio = median_pair_ratio(&report);
    eprintln!("median v2/v1 per pair over {jobs} jobs: {ratio:.3}");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "median per-pair ratio v2/v1 on identical machines is {ratio:.3}"
    );
    // The series use the very same latencies as the pairs.
    let active = series_median_us(&report, "v1", PoolRole::Active) as f64;
    let simulation = series_median_us(&report, "v2", PoolRole::Simulation) as f64;
    assert!(
        (0.9..=1.1).contains(&(simulation / active)),
        "series medians: v1 active {active} us, v2 simulation {simulation} us"
    );
    running.shutdown();
}

/// Sends one job whose body arrives in two parts `gap` apart (a slow caller), reads the answer.
async fn job_with_slow_body(lb: std::net::SocketAddr, gap: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(lb).await.unwrap();
    stream
        .write_all(
            b"POST /job HTTP/1.1\r\nhost: media\r\ncontent-length: 10\r\nconnection: close\r\n\r\nhello",
        )
        .await
        .unwrap();
    tokio::time::sleep(gap).await;
    stream.write_all(b"world").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Time the balancer spends waiting for a slow caller's body is not the active machine's: the
/// copy gets its whole body at once, so counting that wait would bias the pair (the definition
/// that ran from `request_filter` to `logging` counted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_body_does_not_inflate_the_active_side() {
    // Long enough that scheduling noise on a busy 2-core host (a few ms) stays small beside it.
    let delay = Behaviour::Slow(Duration::from_millis(80));
    let v1 = Machine::start("same", delay).await;
    let v2 = Machine::start("same", delay).await;
    let running = start(vec![config(
        "media",
        1,
        vec![
            entry("m1", "v1", &v1, PoolRole::Active),
            entry("m2", "v2", &v2, PoolRole::Simulation),
        ],
    )]);
    let http = Http::new();
    let lb = running.listen_addr("media").unwrap();
    let gap = Duration::from_millis(300);
    const JOBS: usize = 12;
    let jobs: Vec<_> = (0..JOBS)
        .map(|_| tokio::spawn(job_with_slow_body(lb, gap)))
        .collect();
    for job in jobs {
        let answer = job.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("same:helloworld"), "{answer}");
    }
    let report = pairs_after(&http, running.admin_addr(), "media", JOBS).await;
    for pair in &report.pairs {
        assert!(
            pair.active.latency_us < gap.as_micros() as u64,
            "active side counted the caller's {gap:?} body wait: {} us",
            pair.active.latency_us
        );
    }
    let ratio = median_pair_ratio(&report);
    assert!(
        (0.8..=1.25).contains(&ratio),
        "median per-pair ratio v2/v1 with slow bodies is {ratio:.3}"
    );
    let histogram_max = decode_histogram(
        &report
            .series
            .iter()
            .find(|s| s.version == "v1" && s.config == PoolRole::Active)
            .unwrap()
            .histogram,
    )
    .unwrap()
    .max();
    assert!(histogram_max < gap.as_micros() as u64);
    running.shutdown();
}
