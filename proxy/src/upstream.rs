//! Keep-alive connections from a balancer to one machine address, reused from job to job.
//!
//! Why not pingora's connector pool: it spawns a task per released connection to watch it while
//! it idles, and looks the peer up (getpeername) on every reuse. At tens of thousands of jobs a
//! second both showed in profiles as a large share of the balancer's own time. Here an idle
//! connection costs nothing until it is taken again; it is checked then, every time, with one
//! non-blocking peek: a machine sends nothing unasked on an idle HTTP/1 connection, so bytes there
//! (a broken machine's stray answer bytes, which would be read as the next job's answer) or its
//! end mean the connection is not reused. A connection that fails anyway before any answer byte
//! is retried by the job path (proxy.rs) once, on a fresh connection, for idempotent methods
//! only. Each connection keeps its read buffer.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::health::Health;

/// Idle connections kept per machine address (per balancer).
const MAX_IDLE: usize = 128;

/// Why no connection to the machine could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {address}: {source}")]
    Failed {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("connecting to {address}: no answer within {after:?}")]
    TimedOut {
        address: SocketAddr,
        after: Duration,
    },
}

/// Room kept in a connection's read buffer for an answer head and a small body.
const READ_BUFFER: usize = 8 * 1024;

/// A connection to a machine with its read buffer (empty between jobs).
pub(crate) struct Connection {
    pub tcp: TcpStream,
    pub buf: BytesMut,
}

/// A connection handed to one job.
pub(crate) struct Checkout {
    pub connection: Connection,
    /// Taken from the idle list (it may have been closed by the machine meanwhile).
    pub reused: bool,
}

struct IdleConnection {
    connection: Connection,
    since: Instant,
}

/// The idle connections to one machine address.
pub(crate) struct Upstream {
    address: SocketAddr,
    connect_timeout: Duration,
    /// An idle connection older than this is closed rather than reused: machines close idle
    /// keep-alive connections after their own timeout (nginx 75 s, many servers 60 s).
    keepalive: Duration,
    idle: Mutex<Vec<IdleConnection>>,
    /// Whether the address answers (probes and jobs' connections).
    pub health: Health,
}

impl Upstream {
    pub(crate) fn new(
        address: SocketAddr,
        connect_timeout: Duration,
        keepalive: Duration,
        health_fall: u32,
    ) -> Self {
        Upstream {
            address,
            connect_timeout,
            keepalive,
            idle: Mutex::new(Vec::new()),
            health: Health::new(health_fall),
        }
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// The most recently released connection that is still usable, or a new one.
    pub(crate) async fn checkout(&self, now: Instant) -> Result<Checkout, ConnectError> {
        while let Some(idle) = self.pop_idle() {
            if now.saturating_duration_since(idle.since) > self.keepalive {
                continue;
            }
            if !still_open(&idle.connection.tcp) {
                continue;
            }
            return Ok(Checkout {
                connection: idle.connection,
                reused: true,
            });
        }
        self.connect().await.map(|connection| Checkout {
            connection,
            reused: false,
        })
    }

    /// A fresh connection, bypassing the idle list (the retry after a reused one failed).
    pub(crate) async fn connect(&self) -> Result<Connection, ConnectError> {
        let address = self.address;
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(source)) => return Err(ConnectError::Failed { address, source }),
                Err(_) => {
                    return Err(ConnectError::TimedOut {
                        address,
                        after: self.connect_timeout,
                    })
                }
            };
        // Jobs are small request/answer exchanges: never wait to coalesce segments.
        tcp.set_nodelay(true)
            .map_err(|source| ConnectError::Failed { address, source })?;
        Ok(Connection {
            tcp,
            buf: BytesMut::with_capacity(READ_BUFFER),
        })
    }

    /// Gives a connection whose last exchange ended cleanly back for the next job.
    pub(crate) fn release(&self, connection: Connection, now: Instant) {
        debug_assert!(
            connection.buf.is_empty(),
            "a released connection has nothing unread"
        );
        let mut idle = self.idle.lock().expect("upstream idle list");
        if idle.len() < MAX_IDLE {
            idle.push(IdleConnection {
                connection,
                since: now,
            });
        }
    }

    fn pop_idle(&self) -> Option<IdleConnection> {
        self.idle.lock().expect("upstream idle list").pop()
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().expect("upstream idle list").len()
    }
}

/// Whether an idle connection is still open and clean: nothing to read (a machine sends nothing
/// unasked on an idle HTTP/1 connection, so data or end of stream both mean it is unusable).
/// A real peek, not tokio's cached readiness, which may not have seen bytes that arrived since
/// the last read.
fn still_open(tcp: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking (tokio's), so the peek never waits.
    matches!(
        socket2::SockRef::from(tcp).peek(&mut byte),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const KEEPALIVE: Duration = Duration::from_secs(50);

    /// A machine that counts its connections; `close_after_first_byte` closes each connection once
    /// it has read something (a stale keep-alive connection from the balancer's side).
    async fn machine(close_after_first_byte: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || close_after_first_byte {
                            return;
                        }
                        let _ = socket.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        (address, accepted)
    }

    /// The machine's accept loop counts a connection shortly after the client side sees it open.
    async fn accepted_reaches(accepted: &AtomicUsize, expected: usize) {
        for _ in 0..200 {
            if accepted.load(Ordering::SeqCst) >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), expected);
    }

    async fn echo(tcp: &mut TcpStream) {
        tcp.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_released_connection_is_reused() {
        let (address, accepted) = machine(false).await;
        let upstream = Upstream::new(address, Duration::from_secs(1), KEEPALIVE, 2);
        for round in 0..5 {
            let mut conn = upstream.checkout(Instant::now()).await.unwrap();
            assert_eq!(conn.reused, round > 0);
            echo(&mut conn.connection.tcp).await;
            upstream.release(conn.connection, Instant::now());
        }
        accepted_reaches(&accepted, 1).await;
    }

    #[tokio::test]
    async fn a_connection_closed_or_holding_stray_bytes_is_never_handed_out() {
        let (address, accepted) = machine(true).await;
        let upstream = Upstream::new(address, Duration::from_secs(1), KEEPALIVE, 2);
        let mut conn = upstream.checkout(Instant::now()).await.unwrap();
        conn.connection.tcp.write_all(b"x").await.unwrap();
        // The machine's close arrives (it sends nothing back).
        let mut buf = [0u8; 1];
        assert_eq!(conn.connection.tcp.read(&mut buf).await.unwrap(), 0);
        let released = Instant::now();
        upstream.release(conn.connection, released);
        // Checked at once, not only after some idle time.
        let fresh = upstream.checkout(released).await.unwrap();
        assert!(!fresh.reused);
        accepted_reaches(&accepted, 2).await;

        let (address, _) = machine(false).await;
        let upstream = Upstream::new(address, Duration::from_secs(1), KEEPALIVE, 2);
        let mut conn = upstream.checkout(Instant::now()).await.unwrap();
        // The echo answers two bytes; one is read: the other is a stray byte, as a broken
        // machine's answer longer than its framing leaves.
        conn.connection.tcp.write_all(b"ab").await.unwrap();
        conn.connection.tcp.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        upstream.release(conn.connection, Instant::now());
        assert!(!upstream.checkout(Instant::now()).await.unwrap().reused);
        // A clean connection is reused.
        let mut conn = upstream.checkout(Instant::now()).await.unwrap();
        echo(&mut conn.connection.tcp).await;
        upstream.release(conn.connection, Instant::now());
        assert!(upstream.checkout(Instant::now()).await.unwrap().reused);
    }

    #[tokio::test]
    async fn old_idle_connections_are_dropped_and_the_list_is_bounded() {
        let (address, accepted) = machine(false).await;
        let upstream = Upstream::new(address, Duration::from_secs(1), KEEPALIVE, 2);
        let now = Instant::now();
        let mut connections = Vec::new();
        for _ in 0..MAX_IDLE + 3 {
            connections.push(upstream.checkout(now).await.unwrap().connection);
        }
        for connection in connections {
            upstream.release(connection, now);
        }
        assert_eq!(upstream.idle_count(), MAX_IDLE);
        let aged = upstream
            .checkout(now + KEEPALIVE + Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!aged.reused);
        assert_eq!(upstream.idle_count(), 0);
        accepted_reaches(&accepted, MAX_IDLE + 4).await;
    }

    #[tokio::test]
    async fn a_refused_connect_names_the_address() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = unused.local_addr().unwrap();
        drop(unused);
        let upstream = Upstream::new(address, Duration::from_secs(1), KEEPALIVE, 2);
        let error = upstream.checkout(Instant::now()).await.err().unwrap();
        assert!(error.to_string().contains(&address.to_string()), "{error}");
    }
}
