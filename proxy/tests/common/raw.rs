//! A machine speaking raw HTTP/1 bytes, for what a well-behaved server would never send, and a
//! raw caller that reads whatever comes back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use understudy_proxy::wire::{MachineEntry, PoolRole};

/// What a raw machine does after reading its `n`th request on a connection (from 0).
#[derive(Clone, Debug)]
pub enum Reply {
    Answer(Vec<u8>),
    AnswerAndClose(Vec<u8>),
    /// Closes without answering.
    Close,
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

/// A machine speaking raw HTTP/1: for each request it reads (a head, and a body up to
/// `request_end` when given) it replies as its script says. The raw requests it saw are kept.
pub struct RawMachine {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<AtomicUsize>,
}

impl RawMachine {
    /// Answers every request with `answer` (closing after each one when `close_after`).
    pub async fn start(
        answer: &'static [u8],
        request_end: &'static [u8],
        close_after: bool,
    ) -> Self {
        RawMachine::scripted(request_end, move |_| {
            if close_after {
                Reply::AnswerAndClose(answer.to_vec())
            } else {
                Reply::Answer(answer.to_vec())
            }
        })
        .await
    }

    pub async fn scripted(
        request_end: &'static [u8],
        script: impl Fn(usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (log, count, script): (_, _, Script) =
            (seen.clone(), connections.clone(), Arc::new(script));
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let job = Job {
                    log: log.clone(),
                    connections: count.clone(),
                    script: script.clone(),
                };
                tokio::spawn(serve(socket, request_end, job));
            }
        });
        RawMachine {
            addr,
            seen,
            connections,
        }
    }

    pub fn entry(&self) -> MachineEntry {
        self.entry_as("raw", "v1", PoolRole::Active)
    }

    pub fn entry_as(&self, id: &str, version: &str, role: PoolRole) -> MachineEntry {
        MachineEntry {
            id: id.into(),
            version: version.into(),
            address: self.addr.to_string(),
            weight: 100,
            config: role,
            health_path: None,
        }
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }

    /// Connections the balancer opened to this machine that carried bytes (its health probe, a
    /// bare TCP connect, sends none).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// What one connection's task shares with the machine.
struct Job {
    log: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<AtomicUsize>,
    script: Script,
}

async fn serve(mut socket: TcpStream, request_end: &'static [u8], job: Job) {
    let Job {
        log,
        connections,
        script,
    } = job;
    let mut pending = Vec::new();
    let mut n = 0;
    let mut counted = false;
    loop {
        let mut buf = [0u8; 4096];
        let Ok(read) = socket.read(&mut buf).await else {
            return;
        };
        if read > 0 && !counted {
            counted = true;
            connections.fetch_add(1, Ordering::SeqCst);
        }
        if read == 0 {
            // What arrived without ending a request is kept too: a partial request.
            if !pending.is_empty() {
                log.lock().unwrap().push(pending);
            }
            return;
        }
        pending.extend_from_slice(&buf[..read]);
        while let Some(end) = request_length(&pending, request_end) {
            log.lock().unwrap().push(pending.drain(..end).collect());
            let reply = script(n);
            n += 1;
            let (bytes, close) = match reply {
                Reply::Answer(b) => (b, false),
                Reply::AnswerAndClose(b) => (b, true),
                Reply::Close => (Vec::new(), true),
            };
            if socket.write_all(&bytes).await.is_err() || close {
                return;
            }
        }
    }
}

fn request_length(pending: &[u8], request_end: &[u8]) -> Option<usize> {
    let head_end = find(pending, b"\r\n\r\n")? + 4;
    if request_end.is_empty() {
        return Some(head_end);
    }
    find(&pending[head_end..], request_end).map(|at| head_end + at + request_end.len())
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends raw bytes to the balancer and reads until it closes the connection.
pub async fn exchange(lb: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(lb).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the balancer closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads from `stream` until `marker` was seen `count` times.
pub async fn read_until(stream: &mut TcpStream, marker: &str, count: usize) -> String {
    let mut got = Vec::new();
    while String::from_utf8_lossy(&got).matches(marker).count() < count {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answers in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}
