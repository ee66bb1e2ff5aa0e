//! End-to-end: the ops dashboard in headless Chromium, driven through WebDriver (chromedriver,
//! with the fantoccini client) against a running scenario (`scenarios/dashboard.toml`: media v2
//! passes the judge and waits for an approval that only the page gives).
//!
//! The page loads with no console error, the rollout's latency histograms and the judge's
//! evidence draw with data, a wrong token is refused (on sign-in and as a bearer on the approve
//! route), an approval made on the page moves the rollout and its operator is recorded, and the
//! machines page lists the machines. It also takes the screenshots of docs/screenshots/:
//!
//! ```sh
//! UNDERSTUDY_SCREENSHOTS=1 cargo test --release --test dashboard -- --nocapture
//! ```
//!
//! Without `UNDERSTUDY_SCREENSHOTS=1` they go to Cargo's scratch directory
//! (`target/tmp/dashboard-screenshots/`), so an ordinary `cargo test` leaves the tree clean.
//!
//! Chromium and chromedriver are Debian's (`scripts/setup.sh` installs them). Without them the
//! test fails and says so; `UNDERSTUDY_SKIP_BROWSER=1` skips it on purpose (never set in CI, so a
//! broken browser set-up cannot pass silently there).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use support::{free_port, Process, UNDERSTUDY};
use understudy::api::client::AdminClient;

const TOKEN: &str = "dashboard-test-token";
const WRONG_TOKEN: &str = "not-the-token";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole test, a safety net over the bounded waits below (a run takes 10-20 s).
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// The rollout reaches `awaiting_approval` 8-10 s after the scenario starts on an idle machine;
/// a busy 2-core machine may take a few times longer.
const APPROVAL_LIMIT: Duration = Duration::from_secs(40);
/// Anything the page draws from data it already has.
const PAGE_LIMIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let Some(chromedriver) = browser_or_skip() else {
        return;
    };
    let started = Instant::now();
    tokio::time::timeout(TEST_LIMIT, drive_dashboard(chromedriver))
        .await
        .unwrap_or_else(|_| panic!("the dashboard test ran past {TEST_LIMIT:?}"));
    eprintln!(
        "dashboard: passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// chromedriver's path, or `None` when the browser is missing and `UNDERSTUDY_SKIP_BROWSER=1`
/// asks to skip; a missing browser otherwise fails the test.
fn browser_or_skip() -> Option<PathBuf> {
    let chromedriver = which("chromedriver");
    let chromium = Path::new(CHROMIUM).is_file();
    if let (Some(path), true) = (&chromedriver, chromium) {
        return Some(path.clone());
    }
    let missing = match (chromedriver.is_none(), chromium) {
        (true, false) => "chromedriver and chromium are",
        (true, true) => "chromedriver is",
        _ => "chromium is",
    };
    if std::env::var("UNDERSTUDY_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("dashboard: SKIPPED: {missing} not installed and UNDERSTUDY_SKIP_BROWSER=1");
        return None;
    }
    panic!(
        "{missing} not installed: run `bash scripts/setup.sh` (Debian's chromium and \
         chromium-driver), or set UNDERSTUDY_SKIP_BROWSER=1 to skip this test on purpose"
    );
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

async fn drive_dashboard(chromedriver: PathBuf) {
    let scenario = Scenario::start();
    let driver = Chromedriver::start(&chromedriver).await;
    let client = driver.session().await;
    let page = &Page {
        client: &client,
        driver: &driver,
        scenario: &scenario,
        admin: scenario.admin.clone(),
    };
    let api = scenario.api();
    let shots = Screenshots::new();

    release_page_awaits_approval(page).await;
    wrong_token_is_refused(page).await;
    let (id, evidence) = rollout_page_draws_its_charts(page).await;
    wrong_bearer_cannot_approve(page, &api, id, &evidence).await;
    let signed_in = right_token_signs_in(page, &shots).await;
    release_page_signed_in(page, &shots, id).await;
    refused_release_shows_its_error(page, &api).await;
    approval_on_the_page_moves_the_rollout(page, &api, id, &signed_in).await;
    machines_page_lists_the_registry(page).await;

    // The page never shows the token: not in its markup, its text, an input or the URL.
    let shown = page
        .js(&format!(
            "const t = {TOKEN:?}; return document.documentElement.outerHTML.includes(t) \
             || document.body.innerText.includes(t) || location.href.includes(t) \
             || [...document.querySelectorAll('input')].some(i => i.value.includes(t));"
        ))
        .await;
    assert_eq!(shown, json!(false), "the page shows the token");

    // No console error, seen from the page and from the browser's log.
    let errors = page.js("return window.__understudyErrors").await;
    assert_eq!(
        errors,
        json!([]),
        "window.__understudyErrors is not empty (or missing)"
    );
    driver.assert_no_severe_log(&client).await;

    client.close().await.unwrap();
    driver.closed();
}

/// media's node on the release page.
const MEDIA: &str = ".service-node[data-service=media]";

async fn release_page_awaits_approval(page: &Page<'_>) {
    // The release page: media's node shows the rollout waiting for ops.
    page.client.goto(&format!("{}/", page.admin)).await.unwrap();
    let media = MEDIA;
    page.wait_for(
        "media's node in `awaiting_approval` on the release page",
        APPROVAL_LIMIT,
        || async move {
            let phase = page.attr(media, "data-phase").await?;
            (phase == "awaiting_approval").then_some(())
        },
    )
    .await;
    eprintln!(
        "dashboard: media awaits approval {:.1}s after the scenario started",
        page.scenario.started.elapsed().as_secs_f64()
    );
    page.wait_for("#release-graph, #release-form and #releases", PAGE_LIMIT, || async move {
        let all = page
            .js("return ['#release-graph', '#release-form', 'select.release-version[data-service=media]', '#releases'].every(s => document.querySelector(s) !== null)")
            .await;
        (all == json!(true)).then_some(())
    })
    .await;
    page.wait_for("#signin-status signed-out", PAGE_LIMIT, || async move {
        (page.attr("#signin-status", "data-state").await? == "signed-out").then_some(())
    })
    .await;
}

async fn wrong_token_is_refused(page: &Page<'_>) {
    // A wrong token is refused, and nothing can be changed with it.
    page.sign_in(WRONG_TOKEN).await;
    page.wait_for("#signin-status refused", PAGE_LIMIT, || async move {
        (page.attr("#signin-status", "data-state").await? == "refused").then_some(())
    })
    .await;
    assert!(
        !page.enabled("#release-button").await,
        "#release-button is enabled after a refused sign-in"
    );
}

async fn rollout_page_draws_its_charts(page: &Page<'_>) -> (i64, String) {
    let media = MEDIA;
    // The rollout page, through the node's link.
    let href = page
        .attr(&format!("{media} a.rollout-link"), "href")
        .await
        .unwrap_or_else(|| panic!("media's node has no a.rollout-link"));
    let id: i64 = href
        .rsplit("#/rollouts/")
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a.rollout-link goes to {href:?}, not #/rollouts/ID"));
    page.click(&format!("{media} a.rollout-link")).await;
    page.wait_for(
        "#rollout-phase awaiting_approval",
        PAGE_LIMIT,
        || async move { (page.text("#rollout-phase").await? == "awaiting_approval").then_some(()) },
    )
    .await;
    // The histogram overlay (v1, control and v2 latencies) and the evidence chart drew data.
    for chart in ["#latency-chart", "#evidence-chart"] {
        let points = page
            .wait_for(
                &format!("{chart}[data-points] > 0"),
                PAGE_LIMIT,
                || async move {
                    let points: u64 = page.attr(chart, "data-points").await?.parse().ok()?;
                    (points > 0).then_some(points)
                },
            )
            .await;
        eprintln!("dashboard: {chart} drew {points} points");
    }
    let evidence = page
        .wait_for("#evidence-id", PAGE_LIMIT, || async move {
            page.text("#evidence-id")
                .await
                .filter(|text| !text.is_empty())
        })
        .await;
    // The judge's rule and the quantiles table (a row a quantile) are filled in.
    for shown in ["#rollout-rule", "#quantiles tbody tr"] {
        page.wait_for(shown, PAGE_LIMIT, || async move {
            page.text(shown).await.filter(|text| !text.is_empty())
        })
        .await;
    }
    for button in ["#approve-button", "#abort-button", "#rollback-button"] {
        assert!(
            !page.enabled(button).await,
            "{button} is enabled after a refused sign-in"
        );
    }
    (id, evidence)
}

async fn wrong_bearer_cannot_approve(page: &Page<'_>, api: &AdminClient, id: i64, evidence: &str) {
    // The approve route itself refuses a wrong bearer, from the page's own origin.
    let status = page
        .client
        .execute_async(
            "const [id, evidence, token, done] = arguments;
             fetch(`/api/v1/rollouts/${id}/approve`, {
               method: 'POST',
               headers: {'Authorization': `Bearer ${token}`, 'Content-Type': 'application/json'},
               body: JSON.stringify({evidence}),
             }).then(r => done(r.status), e => done(String(e)));",
            vec![json!(id), json!(evidence), json!(WRONG_TOKEN)],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(401), "approve with a wrong bearer");
    let detail: Value = api.get(&format!("/api/v1/rollouts/{id}")).await.unwrap();
    assert_eq!(
        detail["phase"], "awaiting_approval",
        "the refused approve moved the rollout: {detail}"
    );
}

async fn right_token_signs_in(page: &Page<'_>, shots: &Screenshots) -> String {
    // The right token: signed in as the token's operator, the approve button enabled.
    page.sign_in(TOKEN).await;
    let signed_in = page
        .wait_for("#signin-status signed-in", PAGE_LIMIT, || async move {
            (page.attr("#signin-status", "data-state").await? == "signed-in").then_some(())?;
            page.text("#signin-status").await
        })
        .await;
    assert!(
        signed_in.starts_with("signed in as "),
        "#signin-status says {signed_in:?}"
    );
    page.wait_for("#approve-button enabled", PAGE_LIMIT, || async move {
        page.enabled("#approve-button").await.then_some(())
    })
    .await;
    shots.take(page, "rollout.png").await;
    signed_in
}

async fn release_page_signed_in(page: &Page<'_>, shots: &Screenshots, id: i64) {
    let media = MEDIA;
    // The release page signed in (the sign-in holds across the page's routes), then back.
    page.js("location.hash = '#/'").await;
    page.wait_for(
        "media's node after returning to #/",
        PAGE_LIMIT,
        || async move {
            let phase = page.attr(media, "data-phase").await?;
            let link = page
                .attr(&format!("{media} a.rollout-link"), "href")
                .await?;
            (phase == "awaiting_approval" && link.ends_with(&format!("#/rollouts/{id}")))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        page.attr("#signin-status", "data-state").await.as_deref(),
        Some("signed-in"),
        "the sign-in did not hold on the release page"
    );
    page.wait_for("#release-button enabled", PAGE_LIMIT, || async move {
        page.enabled("#release-button").await.then_some(())
    })
    .await;
    shots.take(page, "release.png").await;
}

async fn refused_release_shows_its_error(page: &Page<'_>, api: &AdminClient) {
    // A refused action shows the endpoint's error: media is already in an unfinished release.
    let chosen = page
        .js("const s = document.querySelector('select.release-version[data-service=media]'); \
             s.value = 'v2'; s.dispatchEvent(new Event('change', {bubbles: true})); return s.value;")
        .await;
    assert_eq!(chosen, json!("v2"), "media's version select has no v2");
    page.click("#release-button").await;
    let refused = page
        .wait_for("#error-banner with the 409", PAGE_LIMIT, || async move {
            (page.attr("#error-banner", "data-status").await.as_deref() == Some("409"))
                .then_some(())?;
            page.text("#error-banner")
                .await
                .filter(|t| t.contains("media"))
        })
        .await;
    eprintln!("dashboard: refused release shown: {refused}");
    let releases: Value = api.get("/api/v1/releases").await.unwrap();
    assert_eq!(
        releases.as_array().map(Vec::len),
        Some(1),
        "nothing changed"
    );
}

async fn approval_on_the_page_moves_the_rollout(
    page: &Page<'_>,
    api: &AdminClient,
    id: i64,
    signed_in: &str,
) {
    let media = MEDIA;
    // The approval made on the page moves the rollout.
    page.click(&format!("{media} a.rollout-link")).await;
    page.wait_for(
        "#approve-button enabled on the rollout page",
        PAGE_LIMIT,
        || async move {
            (page.text("#rollout-phase").await? == "awaiting_approval").then_some(())?;
            page.enabled("#approve-button").await.then_some(())
        },
    )
    .await;

    page.click("#approve-button").await;
    let moved = page
        .wait_for(
            "#rollout-phase past awaiting_approval",
            PAGE_LIMIT,
            || async move {
                let phase = page.text("#rollout-phase").await?;
                ["joining", "retiring", "complete"]
                    .iter()
                    .any(|p| phase.starts_with(p))
                    .then_some(phase)
            },
        )
        .await;
    eprintln!("dashboard: approved on the page, the rollout is now {moved}");
    let detail: Value = api.get(&format!("/api/v1/rollouts/{id}")).await.unwrap();
    let approval = detail["transitions"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["from"] == "awaiting_approval"))
        .unwrap_or_else(|| panic!("no transition out of awaiting_approval: {detail}"));
    let operator = approval["operator"]
        .as_str()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| panic!("the approval records no operator: {approval}"))
        .to_string();
    assert!(
        signed_in.ends_with(&operator),
        "signed in as {signed_in:?}, the approval was recorded for {operator:?}"
    );
    page.wait_for("the operator in #transitions", PAGE_LIMIT, || {
        let operator = operator.clone();
        async move {
            let shown = page
                .js("return [...document.querySelectorAll('#transitions tr.transition td.operator')].map(td => td.textContent.trim())")
                .await;
            shown
                .as_array()?
                .iter()
                .any(|name| name == &json!(operator))
                .then_some(())
        }
    })
    .await;
}

async fn machines_page_lists_the_registry(page: &Page<'_>) {
    // The machines page lists every machine of the scenario.
    page.js("location.hash = '#/machines'").await;
    let machines = page
        .wait_for("five tr.machine rows", PAGE_LIMIT, || async move {
            let ids = page
                .js("return [...document.querySelectorAll('#machines-table tr.machine')].map(tr => tr.dataset.id)")
                .await;
            let ids: Vec<String> = serde_json::from_value(ids).ok()?;
            (ids.len() >= 5).then_some(ids)
        })
        .await;
    for id in ["router-1", "media-1", "media-2", "media-c", "media-3"] {
        assert!(machines.iter().any(|m| m == id), "{id} not in {machines:?}");
    }

    // The page kept itself up to date all along.
    let updated = page.text("#updated").await.unwrap_or_default();
    assert!(
        !updated.is_empty() && updated != "not updated yet",
        "#updated says {updated:?}"
    );
}

/// The page under test, with what a failure report needs.
struct Page<'a> {
    client: &'a Client,
    driver: &'a Chromedriver,
    scenario: &'a Scenario,
    admin: String,
}

impl Page<'_> {
    /// Runs `script` in the page; `null` when the page could not run it (navigating).
    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or(Value::Null)
    }

    async fn attr(&self, selector: &str, name: &str) -> Option<String> {
        let value = self
            .client
            .execute(
                "const e = document.querySelector(arguments[0]);
                 return e === null ? null : e.getAttribute(arguments[1]);",
                vec![json!(selector), json!(name)],
            )
            .await
            .ok()?;
        value.as_str().map(str::to_string)
    }

    async fn text(&self, selector: &str) -> Option<String> {
        let value = self
            .client
            .execute(
                "const e = document.querySelector(arguments[0]);
                 return e === null ? null : e.textContent.trim();",
                vec![json!(selector)],
            )
            .await
            .ok()?;
        value.as_str().map(str::to_string)
    }

    /// Present and not disabled.
    async fn enabled(&self, selector: &str) -> bool {
        self.client
            .execute(
                "const e = document.querySelector(arguments[0]);
                 return e !== null && !e.disabled;",
                vec![json!(selector)],
            )
            .await
            .ok()
            == Some(json!(true))
    }

    /// Polls `ready` until it gives a value; past `limit` fails with the page's state, the
    /// browser's log and the scenario's output.
    async fn wait_for<T, F, Fut>(&self, what: &str, limit: Duration, mut ready: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = ready().await {
                return value;
            }
            if Instant::now() >= deadline {
                let report = self.report().await;
                panic!("waited {limit:?} for {what}\n{report}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A real click (WebDriver's), retried while the page re-renders the element.
    async fn click(&self, selector: &str) {
        let deadline = Instant::now() + PAGE_LIMIT;
        loop {
            let error = match self.client.find(Locator::Css(selector)).await {
                Ok(element) => match element.click().await {
                    Ok(()) => return,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let report = self.report().await;
                panic!("could not click {selector}: {error}\n{report}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Types `token` into the sign-in field as a person would and presses the button.
    async fn sign_in(&self, token: &str) {
        let field = self
            .client
            .wait()
            .at_most(PAGE_LIMIT)
            .for_element(Locator::Css("#signin-token"))
            .await
            .unwrap_or_else(|e| panic!("no #signin-token: {e}"));
        field.clear().await.unwrap();
        field.send_keys(token).await.unwrap();
        self.click("#signin-button").await;
    }

    /// What a failure needs to be understood.
    async fn report(&self) -> String {
        let url = self
            .client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default();
        let text = self
            .js("return document.body ? document.body.innerText : ''")
            .await;
        let text: String = text.as_str().unwrap_or("").chars().take(6_000).collect();
        let errors = self.js("return window.__understudyErrors").await;
        let log = self
            .driver
            .log(self.client)
            .await
            .unwrap_or_else(|e| vec![e]);
        let rollouts = match self.scenario.api().get::<Value>("/api/v1/rollouts").await {
            Ok(Value::Array(all)) => all
                .iter()
                .map(|r| {
                    format!(
                        "#{} {} {}: {} ({} jobs)",
                        r["id"],
                        r["service"],
                        r["phase"],
                        r["verdict"]["rule"],
                        r["verdict"]["jobs"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            other => format!("{other:?}"),
        };
        format!(
            "--- page {url}\n{text}\n--- window.__understudyErrors: {errors}\n--- browser log:\n{}\n--- rollouts (API):\n{rollouts}\n--- scenario output (last lines, without load):\n{}",
            log.join("\n"),
            self.scenario.tail(40)
        )
    }
}

/// `understudy scenario run scenarios/dashboard.toml --linger 30`, killed when dropped; its
/// output is kept for failure reports.
struct Scenario {
    _process: Process,
    started: Instant,
    output: Arc<Mutex<Vec<String>>>,
    admin: String,
}

impl Scenario {
    fn start() -> Scenario {
        let started = Instant::now();
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/dashboard.toml");
        let mut child = Command::new(UNDERSTUDY)
            .args(["scenario", "run"])
            .arg(&file)
            .args(["--linger", "30"])
            .env("UNDERSTUDY_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn understudy scenario run");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let process = Process(child);
        // Both pipes are drained to the end by threads, so the child never blocks on a full pipe.
        for (pipe, tx) in [
            (Box::new(stdout) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(stderr) as Box<dyn Read + Send>, None),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &tx {
                        let _ = tx.send(line.clone());
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let mut words = line.split_whitespace();
                    if words.next() == Some("admin") {
                        break words.next().expect("admin URL").to_string();
                    }
                }
                Err(e) => panic!(
                    "the scenario printed no admin URL ({e:?}):\n{}",
                    output.lock().unwrap().join("\n")
                ),
            }
        };
        Scenario {
            _process: process,
            started,
            output,
            admin,
        }
    }

    /// The last `lines` lines of its output, less the load generator's progress lines.
    fn tail(&self, lines: usize) -> String {
        let output = self.output.lock().unwrap();
        let kept: Vec<&str> = output
            .iter()
            .filter(|line| !line.starts_with("load "))
            .map(String::as_str)
            .collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }

    fn api(&self) -> AdminClient {
        AdminClient::new(&self.admin, Some(TOKEN.to_string())).unwrap()
    }
}

/// chromedriver on a free loopback port, in a process group of its own: dropping it kills the
/// group, the browsers it started with it, even when a failing test never closed its session.
struct Chromedriver {
    process: Process,
    url: String,
    session: Mutex<Option<String>>,
    http: understudy::http_json::JsonClient,
}

impl Chromedriver {
    async fn start(program: &Path) -> Chromedriver {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        let driver = Chromedriver {
            process: Process(child),
            url: format!("http://127.0.0.1:{port}"),
            session: Mutex::new(None),
            http: understudy::http_json::client(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = driver.call(http::Method::GET, "/status", None).await;
            if status.is_some_and(|s| s["value"]["ready"] == json!(true)) {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver at {} did not answer /status ready within 20s",
                driver.url
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A new headless Chromium session, its browser log kept at every level.
    async fn session(&self) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--window-size=1400,1000",
                    "--disable-dev-shm-usage",
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("no Chromium session from chromedriver: {e}"));
        let id = client.session_id().await.unwrap();
        *self.session.lock().unwrap() = id;
        client
    }

    async fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> Option<Value> {
        let url = format!("{}{path}", self.url);
        let body = body.map(|b| b.to_string().into_bytes());
        let (_, bytes) = understudy::http_json::exchange(
            &self.http,
            method,
            &url,
            None,
            body,
            Duration::from_secs(10),
        )
        .await
        .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The browser's log since the last read (chromedriver's `se/log` route; each read drains
    /// it): `level source message` an entry.
    async fn log(&self, client: &Client) -> Result<Vec<String>, String> {
        let id = match client.session_id().await {
            Ok(Some(id)) => id,
            other => return Err(format!("no session: {other:?}")),
        };
        let answer = self
            .call(
                http::Method::POST,
                &format!("/session/{id}/se/log"),
                Some(json!({"type": "browser"})),
            )
            .await;
        let Some(entries) = answer.as_ref().and_then(|a| a["value"].as_array()) else {
            return Err(format!("no browser log from chromedriver: {answer:?}"));
        };
        Ok(entries
            .iter()
            .map(|e| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
                format!(
                    "{} {} {}",
                    text(&e["level"]),
                    text(&e["source"]),
                    text(&e["message"])
                )
            })
            .collect())
    }

    /// Reads the browser's log and fails on any SEVERE entry but the answers the test asked to
    /// be refused (the wrong token's 401s, the second release's 409) and a missing favicon.
    async fn assert_no_severe_log(&self, client: &Client) {
        let log = self
            .log(client)
            .await
            .unwrap_or_else(|e| panic!("the browser log cannot be read: {e}"));
        let (expected, severe): (Vec<&String>, Vec<&String>) = log
            .iter()
            .filter(|line| line.starts_with("SEVERE "))
            .partition(|line| {
                // The refusals the test causes itself: the wrong token's 401s, the release's 409.
                ["status of 401", "status of 409", "favicon.ico"]
                    .iter()
                    .any(|expected| line.contains(expected))
            });
        eprintln!(
            "dashboard: browser log: {} entries, {} SEVERE expected (the refusals asked for), {} other SEVERE",
            log.len(),
            expected.len(),
            severe.len()
        );
        assert!(
            severe.is_empty(),
            "the browser logged errors:\n{}",
            severe
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// The session was closed: nothing left for `Drop` to quit.
    fn closed(&self) {
        self.session.lock().unwrap().take();
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // A session still open (a failed test): ask chromedriver to quit its browser first.
        if let Some(id) = self.session.lock().unwrap().take() {
            let _ = delete_session(&self.url, &id);
        }
        let group = format!("-{}", self.process.0.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        self.process.kill9();
    }
}

/// `DELETE /session/ID` without an async runtime (from `Drop`), within a few seconds.
fn delete_session(url: &str, id: &str) -> std::io::Result<()> {
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "DELETE /session/{id} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    Ok(())
}

/// Where screenshots go: docs/screenshots/ with `UNDERSTUDY_SCREENSHOTS=1`, otherwise Cargo's
/// scratch directory for tests.
struct Screenshots {
    dir: PathBuf,
}

impl Screenshots {
    fn new() -> Screenshots {
        let dir = if std::env::var("UNDERSTUDY_SCREENSHOTS").as_deref() == Ok("1") {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
        } else {
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots")
        };
        std::fs::create_dir_all(&dir).unwrap();
        Screenshots { dir }
    }

    /// The whole page, 1400 pixels wide: the window grows (or shrinks) to the page's content for
    /// the shot, then returns to its size.
    async fn take(&self, page: &Page<'_>, name: &str) {
        let client = page.client;
        let (width, height) = client.get_window_size().await.unwrap();
        let fit = page
            .js("const bottoms = [...document.body.children].map(e => e.getBoundingClientRect().bottom + window.scrollY);
             return [Math.ceil(Math.max(0, ...bottoms)) + 16, window.outerHeight - window.innerHeight]")
            .await;
        let content = fit[0].as_u64().unwrap_or(height).clamp(600, 3_000);
        let frame = fit[1].as_u64().unwrap_or(0);
        client
            .set_window_size(width as u32, (content + frame) as u32)
            .await
            .unwrap();
        // The charts redraw at the new size: two frames, then the shot.
        page.client
            .execute_async(
                "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done()));",
                vec![],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = client.screenshot().await.unwrap();
        client
            .set_window_size(width as u32, height as u32)
            .await
            .unwrap();
        let path = self.dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("dashboard: screenshot {}", path.display());
    }
}
