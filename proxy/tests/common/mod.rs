//! In-process machines and a small client for the balancer tests. Everything on 127.0.0.1:0.
#![allow(dead_code)]

pub mod raw;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use understudy_proxy::wire::{BalancerConfig, MachineEntry, PoolRole};
use understudy_proxy::{BalancerSpec, LimitsSpec, ProcessConfig, RunningBalancers, SpawnOptions};

/// How a test machine answers.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// 200 with body "<name>:<request body>".
    Echo,
    /// Echo after a delay.
    Slow(Duration),
    /// Never answers.
    Hang,
    /// Closes every connection at once.
    Reset,
    /// 500.
    Fail,
    /// 200 with a JSON body `{"name", "echo", "items": [{"price"}], "seq"}` and an `etag` header
    /// naming the price; `seq` is new on every answer of the process (a timestamp's stand-in).
    Json { price: u32 },
}

/// Numbers the JSON answers: no two are alike in `seq`.
static JSON_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a machine saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub struct Machine {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests being answered now, and the most there ever were at once.
    pub concurrency: Arc<Concurrency>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct Concurrency {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Concurrency {
    fn enter(self: &Arc<Self>) -> ConcurrencyGuard {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        ConcurrencyGuard(self.clone())
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

struct ConcurrencyGuard(Arc<Concurrency>);

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Machine {
    pub async fn start(name: &'static str, behaviour: Behaviour) -> Machine {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        let concurrency: Arc<Concurrency> = Arc::default();
        let concurrency2 = concurrency.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if let Behaviour::Reset = behaviour {
                    // Zero linger: the close is a reset; it does not block.
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(Duration::ZERO));
                    drop(stream);
                    continue;
                }
                let seen = seen2.clone();
                let concurrency = concurrency2.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let concurrency = concurrency.clone();
                        async move {
                            let _answering = concurrency.enter();
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.to_string(),
                                headers: parts.headers.clone(),
                                body: body.clone(),
                            });
                            let answer = |status: StatusCode| {
                                let mut text = format!("{name}:").into_bytes();
                                text.extend_from_slice(&body);
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap()
                            };
                            let response = match behaviour {
                                Behaviour::Echo => answer(StatusCode::OK),
                                Behaviour::Slow(d) => {
                                    tokio::time::sleep(d).await;
                                    answer(StatusCode::OK)
                                }
                                Behaviour::Hang => {
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                }
                                Behaviour::Fail => answer(StatusCode::INTERNAL_SERVER_ERROR),
                                Behaviour::Json { price } => {
                                    let seq =
                                        JSON_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    let json = serde_json::json!({
                                        "name": name,
                                        "echo": String::from_utf8_lossy(&body),
                                        "items": [{"sku": "a", "price": price}, {"sku": "b", "price": 1}],
                                        "seq": seq,
                                    });
                                    Response::builder()
                                        .header("content-type", "application/json")
                                        .header("etag", format!("\"{price}\""))
                                        .body(Full::new(Bytes::from(json.to_string())))
                                        .unwrap()
                                }
                                Behaviour::Reset => unreachable!(),
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Machine {
            addr,
            seen,
            concurrency,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

pub fn entry(id: &str, version: &str, machine: &Machine, role: PoolRole) -> MachineEntry {
    MachineEntry {
        id: id.into(),
        version: version.into(),
        address: machine.addr.to_string(),
        weight: 100,
        config: role,
        health_path: None,
    }
}

/// Service `svc`, config version 1: `v1` active, `v2` and a v1 `control` in simulation.
pub fn with_control(v1: &Machine, v2: &Machine, control: &Machine) -> BalancerConfig {
    config(
        "svc",
        1,
        vec![
            entry("a", "v1", v1, PoolRole::Active),
            entry("s2", "v2", v2, PoolRole::Simulation),
            entry("c1", "v1", control, PoolRole::Simulation),
        ],
    )
}

pub fn config(service: &str, version: u64, machines: Vec<MachineEntry>) -> BalancerConfig {
    BalancerConfig {
        service: service.into(),
        version,
        epoch: 0,
        mirror_fraction: 1.0,
        compare_body: false,
        compare: None,
        compare_headers: Vec::new(),
        drain_timeout_ms: 30_000,
        machines,
    }
}

/// Options of a balancer process without keys: these tests are about the data plane
/// (signed_config.rs and security.rs test the keys).
pub fn insecure() -> SpawnOptions {
    SpawnOptions {
        insecure_no_key: true,
        ..SpawnOptions::default()
    }
}

pub fn start(configs: Vec<BalancerConfig>) -> RunningBalancers {
    start_with(configs, insecure())
}

/// Each balancer with a public listener and an internal one (for cluster machines).
pub fn process(configs: Vec<BalancerConfig>) -> ProcessConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ProcessConfig::new(
        any,
        configs
            .into_iter()
            .map(|config| BalancerSpec {
                internal_listen: Some(any),
                ..BalancerSpec::new(any, config)
            })
            .collect(),
    )
}

pub fn start_with(configs: Vec<BalancerConfig>, options: SpawnOptions) -> RunningBalancers {
    understudy_proxy::spawn_with(process(configs), options).unwrap()
}

/// As `start_with`, with these `[limits]`.
pub fn start_with_limits(
    configs: Vec<BalancerConfig>,
    limits: LimitsSpec,
    options: SpawnOptions,
) -> RunningBalancers {
    let mut process = process(configs);
    process.limits = limits;
    understudy_proxy::spawn_with(process, options).unwrap()
}

#[derive(Clone)]
pub struct Http(Client<HttpConnector, Full<Bytes>>);

pub struct Answer {
    pub status: u16,
    pub body: String,
    pub elapsed: Duration,
}

impl Http {
    pub fn new() -> Http {
        Http(Client::builder(TokioExecutor::new()).build_http())
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        let start = Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(20), self.0.request(req))
            .await
            .expect("request timed out")
            .expect("request failed");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            elapsed: start.elapsed(),
        }
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.send("GET", url, &[], "").await
    }

    pub async fn job(&self, balancer: SocketAddr, session: Option<&str>, body: &str) -> Answer {
        let url = format!("http://{balancer}/job");
        match session {
            Some(s) => self.send("POST", &url, &[("x-session-id", s)], body).await,
            None => self.send("POST", &url, &[], body).await,
        }
    }

    pub async fn put_json<T: serde::Serialize>(&self, url: &str, value: &T) -> Answer {
        self.send(
            "PUT",
            url,
            &[("content-type", "application/json")],
            &serde_json::to_string(value).unwrap(),
        )
        .await
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut check: F) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// The `x-understudy-auth` header of a read of `path` signed by `signer` (the controller).
pub fn signed_read(signer: &mut understudy_hub::Signer, path: &str) -> String {
    use base64::Engine;
    let envelope = signer.sign(
        understudy_hub::READ_TOPIC,
        serde_json::json!({ "path": path }),
    );
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&envelope).unwrap())
}
