//! A caller's connection: what was read and not yet used, the bytes on their way to the machine
//! and to the caller (reused from job to job), and the caller-side deadlines of `[limits]`: a
//! whole request head within `head_timeout` of its first byte (slowloris), no body byte for
//! `caller_body_idle`, an answer the caller does not read for `caller_write`.

use std::net::IpAddr;

use bytes::BytesMut;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Limits;
use crate::fault::{within, Fault};
use crate::h1::{self, Request};
use crate::marker::MarkerPolicy;
use crate::metrics::Limit;

/// Read buffer of a caller's connection (it grows for a larger head or body piece).
const READ_BUFFER: usize = 8 * 1024;

pub(crate) struct Caller {
    io: Stream,
    pub buf: BytesMut,
    pub to_machine: Vec<u8>,
    pub to_caller: Vec<u8>,
    limits: Limits,
    /// Accepted on an internal listener: a cluster machine whatever its address.
    on_internal_listener: bool,
    /// Whether the caller is a cluster machine, once asked (the peer address costs a syscall).
    internal: Option<bool>,
}

impl Caller {
    pub(crate) fn new(io: Stream, limits: Limits, on_internal_listener: bool) -> Self {
        Caller {
            io,
            buf: BytesMut::with_capacity(READ_BUFFER),
            to_machine: Vec::with_capacity(READ_BUFFER),
            to_caller: Vec::with_capacity(READ_BUFFER),
            limits,
            on_internal_listener,
            internal: None,
        }
    }

    /// Whether the caller is a cluster machine: on an internal listener, or from an internal
    /// source network.
    pub(crate) fn is_internal(&mut self, policy: &MarkerPolicy) -> bool {
        let on_listener = self.on_internal_listener;
        let io = &self.io;
        *self
            .internal
            .get_or_insert_with(|| on_listener || policy.is_internal_source(peer_ip(io)))
    }

    /// Reads until a whole request head is in the buffer; `None` when the caller closed (or
    /// idled out) between jobs. The request line and headers the machine gets are left in
    /// `to_machine` (the head is not ended: see `h1::end_request_head`).
    pub(crate) async fn read_request(&mut self) -> Result<Option<Request>, Fault> {
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() {
                self.to_machine.clear();
                if let Some(request) = h1::parse_request(&self.buf, &mut self.to_machine)? {
                    return Ok(Some(request));
                }
                deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + self.limits.head_timeout);
            }
            let read = match deadline {
                Some(deadline) => self.read_until(deadline).await,
                None => {
                    self.reserve();
                    let idle = self.limits.caller_idle;
                    within(idle, Limit::CallerIdle, self.io.read_buf(&mut self.buf)).await
                }
            };
            match read {
                Ok(0) | Err(Fault::Timeout { .. }) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(Fault::Truncated),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads more of a request head, until `deadline` at most.
    async fn read_until(&mut self, deadline: tokio::time::Instant) -> Result<usize, Fault> {
        self.reserve();
        match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
            Ok(read) => Ok(read?),
            Err(_) => Err(Fault::timeout(self.limits.head_timeout, Limit::HeadTimeout)),
        }
    }

    /// Reads more of a request body (`caller_body_idle` at most without a byte).
    pub(crate) async fn read_body(&mut self) -> Result<usize, Fault> {
        self.reserve();
        let idle = self.limits.caller_body_idle;
        within(idle, Limit::CallerBodyIdle, self.io.read_buf(&mut self.buf)).await
    }

    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BUFFER);
        }
    }

    /// Sends what is gathered for the caller, within `caller_write`.
    pub(crate) async fn flush(&mut self) -> Result<(), Fault> {
        let write = self.limits.caller_write;
        if !self.to_caller.is_empty() {
            within(
                write,
                Limit::CallerWrite,
                self.io.write_all(&self.to_caller),
            )
            .await?;
            self.to_caller.clear();
        }
        within(write, Limit::CallerWrite, self.io.flush()).await
    }

    /// Sends bytes the balancer writes itself between a request and its answer (`100
    /// Continue`).
    pub(crate) async fn send_now(&mut self, bytes: &[u8]) -> Result<(), Fault> {
        let write = self.limits.caller_write;
        within(write, Limit::CallerWrite, self.io.write_all(bytes)).await?;
        within(write, Limit::CallerWrite, self.io.flush()).await
    }

    /// Writes an answer of the balancer's own and sends it; errors are moot (the caller left).
    pub(crate) async fn answer(
        &mut self,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
        keep: bool,
    ) {
        self.to_caller.clear();
        h1::own_answer(&mut self.to_caller, status, content_type, body, keep);
        let _ = self.flush().await;
    }

    /// Closes the sending side (the caller's connection is done).
    pub(crate) async fn shutdown(&mut self) {
        let _ = within(
            self.limits.caller_write,
            Limit::CallerWrite,
            self.io.shutdown(),
        )
        .await;
    }
}

fn peer_ip(io: &Stream) -> Option<IpAddr> {
    let digest = io.get_socket_digest()?;
    digest.peer_addr()?.as_inet().map(|a| a.ip())
}
