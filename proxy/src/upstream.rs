//! Keep-alive connections from a balancer to one machine address, reused from job to job.
//!
//! Why not pingora's connector pool: it spawns a task per released connection to watch it while
//! it idles, and looks the peer up (getpeername) on every reuse. At tens of thousands of jobs a
//! second both showed in profiles as a large share of the balancer's own time. Here an idle
//! connection costs nothing until it is taken again; it is checked then (one non-blocking read),
//! and only when it sat idle long enough for its machine to have closed it, or when the job's
//! body could not be sent again. A connection that turns out closed anyway is retried by the job
//! path (proxy.rs) once, on a fresh connection. Each connection keeps its read buffer.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Idle connections kept per machine address (per balancer).
const MAX_IDLE: usize = 128;
/// An idle connection older than this is closed rather than reused: machines close idle
/// keep-alive connections after their own timeout (nginx 75 s, many servers 60 s).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);
/// A connection idle for less than this is reused without a liveness check: under load
/// connections idle for microseconds, and a machine that closed one in that window is caught by
/// the job path's one retry.
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(100);

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
    idle: Mutex<Vec<IdleConnection>>,
}

impl Upstream {
    pub(crate) fn new(address: SocketAddr, connect_timeout: Duration) -> Self {
        Upstream {
            address,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// The most recently released connection that is still usable, or a new one.
    /// `check_always`: check liveness whatever the idle time (the job's body is not replayable).
    pub(crate) async fn checkout(
        &self,
        now: Instant,
        check_always: bool,
    ) -> Result<Checkout, ConnectError> {
        while let Some(idle) = self.pop_idle() {
            let idle_for = now.saturating_duration_since(idle.since);
            if idle_for > MAX_IDLE_AGE {
                continue;
            }
            if (check_always || idle_for >= CHECK_AFTER_IDLE) && !still_open(&idle.connection.tcp) {
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

/// Whether an idle connection is still open: nothing to read (a machine sends nothing unasked
/// on an idle HTTP/1 connection, so data or end of stream both mean it is unusable).
fn still_open(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

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
        let upstream = Upstream::new(address, Duration::from_secs(1));
        for round in 0..5 {
            let mut conn = upstream.checkout(Instant::now(), false).await.unwrap();
            assert_eq!(conn.reused, round > 0);
            echo(&mut conn.connection.tcp).await;
            upstream.release(conn.connection, Instant::now());
        }
        accepted_reaches(&accepted, 1).await;
    }

    #[tokio::test]
    async fn a_connection_the_machine_closed_is_not_handed_out() {
        let (address, accepted) = machine(true).await;
        let upstream = Upstream::new(address, Duration::from_secs(1));
        let mut conn = upstream.checkout(Instant::now(), false).await.unwrap();
        conn.connection.tcp.write_all(b"x").await.unwrap();
        // The machine's close arrives (it sends nothing back).
        let mut buf = [0u8; 1];
        assert_eq!(conn.connection.tcp.read(&mut buf).await.unwrap(), 0);
        let released = Instant::now();
        upstream.release(conn.connection, released);
        // Checked because the job cannot be replayed (or because it idled long enough).
        let fresh = upstream.checkout(released, true).await.unwrap();
        assert!(!fresh.reused);
        upstream.release(fresh.connection, released);
        let later = released + CHECK_AFTER_IDLE;
        let open = upstream.checkout(later, false).await.unwrap();
        assert!(
            open.reused,
            "an open connection idle for a while is still reused"
        );
        accepted_reaches(&accepted, 2).await;
    }

    #[tokio::test]
    async fn old_idle_connections_are_dropped_and_the_list_is_bounded() {
        let (address, accepted) = machine(false).await;
        let upstream = Upstream::new(address, Duration::from_secs(1));
        let now = Instant::now();
        let mut connections = Vec::new();
        for _ in 0..MAX_IDLE + 3 {
            connections.push(upstream.checkout(now, false).await.unwrap().connection);
        }
        for connection in connections {
            upstream.release(connection, now);
        }
        assert_eq!(upstream.idle_count(), MAX_IDLE);
        let aged = upstream
            .checkout(now + MAX_IDLE_AGE + Duration::from_secs(1), false)
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
        let upstream = Upstream::new(address, Duration::from_secs(1));
        let error = upstream
            .checkout(Instant::now(), false)
            .await
            .err()
            .unwrap();
        assert!(error.to_string().contains(&address.to_string()), "{error}");
    }
}
