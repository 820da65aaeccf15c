//! The first bytes of a connection: an inbound PROXY header (when the listener accepts one)
//! and the TLS ClientHello, read under `hello_timeout` and `max_hello_size`.
//!
//! Owns: the I/O shell around two sans-IO cores, `sluice_core::proxy::inbound` (whom to
//! believe) and `sluice_core::hello::parse`. A header or hello that is malformed, oversized
//! or too slow ends the connection with a counted reason; it is never routed to a default
//! pool.

use std::net::SocketAddr;

use bytes::BufMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ListenerConfig;
use sluice_core::close::CloseReason;
use sluice_core::hello::{self, ClientHello, Parse};
use sluice_core::proxy::{self, Origin, Step};

/// How reading the first bytes ended.
pub enum Hello {
    Tls(ClientHello),
    Plain,
    /// The connection is over; the label is both the hello metric result and the close reason.
    Rejected(&'static str, String),
}

/// Read and strip an inbound PROXY header per the listener's `accept_proxy` (the policy is
/// `sluice_core::proxy::inbound`). On success the bytes after the header stay in `buf` (the
/// start of the hello), with the metric result: `ok` (an origin), `local` (a LOCAL/UNKNOWN
/// header: the connection's own addresses stand), `absent` (optional mode, no header).
/// `Err((result, reason, detail))`: the connection is closed.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cfg: &ListenerConfig,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(Option<Origin>, &'static str), (&'static str, CloseReason, String)> {
    let trusted = proxy::is_trusted(&cfg.trusted_proxies, peer.ip());
    loop {
        match proxy::inbound(cfg.accept_proxy, trusted, peer, buf) {
            Step::More => {}
            Step::Accept {
                consumed,
                origin,
                result,
            } => {
                buf.drain(..consumed);
                return Ok((origin, result));
            }
            Step::Refuse {
                result,
                reason,
                detail,
            } => return Err((result, reason, detail)),
        }
        if buf.capacity() == buf.len() {
            buf.reserve(512);
        }
        let room = proxy::MAX_V2_HEADER.saturating_sub(buf.len());
        match read_more(stream, buf, room, deadline).await {
            Err(_) => {
                return Err((
                    "timeout",
                    CloseReason::ProxyTimeout,
                    "no complete PROXY header within hello_timeout".into(),
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err((
                    "eof",
                    CloseReason::ClientClosedEarly,
                    "client closed before a complete PROXY header".into(),
                ))
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Read more of what the client sends first into `buf`, at most `room` bytes, by `deadline`.
///
/// The socket is tried before its readiness is awaited, as HAProxy's speculative I/O does: a
/// connection just accepted nearly always has its hello waiting, but tokio learns a new
/// socket's readiness only from the poller, so an awaited read would first park the task for
/// a turn of the poller (and arm the timer) to read bytes that are already there.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    room: usize,
    deadline: tokio::time::Instant,
) -> Result<std::io::Result<usize>, tokio::time::error::Elapsed> {
    if let Some(read) = read_now(stream, buf, room) {
        return Ok(read);
    }
    tokio::time::timeout_at(deadline, stream.read_buf(&mut (&mut *buf).limit(room))).await
}

/// One read on the socket, bypassing tokio's readiness (or before the socket is registered
/// with the runtime at all); `None` if nothing is there yet.
pub fn read_now(
    stream: &impl std::os::fd::AsFd,
    buf: &mut Vec<u8>,
    room: usize,
) -> Option<std::io::Result<usize>> {
    use std::io::Read as _;
    let start = buf.len();
    let want = room.min((buf.capacity() - start).max(512));
    buf.resize(start + want, 0);
    let read = (&*socket2::SockRef::from(stream)).read(&mut buf[start..]);
    buf.truncate(start + *read.as_ref().unwrap_or(&0));
    match read {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        read => Some(read),
    }
}

pub async fn read_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cfg: &ListenerConfig,
    deadline: tokio::time::Instant,
) -> Hello {
    let cap = cfg.max_hello_size;
    // Resumes where the last read stopped: linear in the bytes however they are split.
    let mut reassembly = hello::Reassembly::default();
    loop {
        match reassembly.parse(buf) {
            Parse::Hello { hello, .. } => return Hello::Tls(hello),
            Parse::NotTls => return Hello::Plain,
            Parse::Malformed(m) => {
                return Hello::Rejected("malformed", format!("malformed ClientHello: {m}"))
            }
            Parse::Incomplete { needed_at_least } => {
                if needed_at_least.is_some_and(|n| n > cap) {
                    return Hello::Rejected(
                        "too_large",
                        format!(
                            "ClientHello needs at least {} bytes; max_hello_size is {cap}",
                            needed_at_least.unwrap_or(0)
                        ),
                    );
                }
                if buf.len() >= cap {
                    return Hello::Rejected(
                        "too_large",
                        format!("ClientHello larger than max_hello_size ({cap} bytes)"),
                    );
                }
            }
        }
        let room = cap - buf.len();
        if buf.len() == buf.capacity() {
            // Grow by doubling: most hellos fit the first 1 KiB, Chrome's in 2 KiB.
            buf.reserve(buf.capacity().max(512).min(room));
        }
        match read_more(stream, buf, room, deadline).await {
            Err(_) => {
                return Hello::Rejected(
                    "timeout",
                    format!(
                        "no complete ClientHello within hello_timeout ({} bytes received)",
                        buf.len()
                    ),
                )
            }
            Ok(Ok(0)) => {
                return Hello::Rejected(
                    "eof",
                    format!(
                        "client closed after {} bytes, before a complete hello",
                        buf.len()
                    ),
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Hello::Rejected("eof", format!("read error before hello: {e}")),
        }
    }
}
