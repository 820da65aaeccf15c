//! Socket helpers: the options both legs of a connection share (the client's, set on the
//! listening socket and inherited by accepted ones, and the backend's), and the capped accept
//! loop of the admin and heartbeat APIs' listeners, and lingering close for refused uploads.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Keepalive;

/// The next connection of an API listener (admin, heartbeat), holding one of `slots`: at the
/// cap the listener stops accepting and new clients wait in the kernel's backlog. A failed
/// accept is retried after a pause; `None` once `stop` fires.
pub async fn accept_capped(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    what: &str,
    permits: impl Fn(std::net::IpAddr) -> bool,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        _ = stop.cancelled() => return None,
        p = slots.clone().acquire_owned() => p.ok()?,
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                // A refused source is closed at once, without a byte read or written.
                Ok((_, peer)) if !permits(peer.ip()) => {
                    tracing::debug!(%peer, "{what}: source refused by its allow list");
                }
                Ok((stream, peer)) => return Some((permit, stream, peer)),
                Err(e) => {
                    tracing::debug!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The open-file limit this process runs with (its soft limit, raised to the hard one at
/// start by `sluice run`).
pub fn nofile() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Errors that mean the process (or the system) is out of descriptors or memory, not that
/// the peer failed.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Turn TCP keepalive on with `ka`'s timings, or off when it has no idle time.
pub fn apply_keepalive(sock: &SockRef<'_>, ka: &Keepalive) -> io::Result<()> {
    match ka.idle {
        None => sock.set_keepalive(false),
        Some(idle) => {
            let params = TcpKeepalive::new()
                .with_time(idle)
                .with_interval(ka.interval)
                .with_retries(ka.count);
            sock.set_tcp_keepalive(&params)
        }
    }
}

/// An HTTP/1.1 connection that closes while its client is still sending (a refused upload)
/// lingers, as nginx's `lingering_close` does: after its last write, its read side is drained
/// and discarded (at most `LINGER_BYTES`, `LINGER_TIME`) before the socket closes, so that
/// the close does not reset the connection before the client has read the answer. `linger`
/// says whether this close needs it (set by whoever decided to refuse).
pub struct Linger<S> {
    inner: S,
    pub linger: Arc<std::sync::atomic::AtomicBool>,
    draining: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, usize)>,
}

const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

impl<S> Linger<S> {
    pub fn new(inner: S) -> Linger<S> {
        Linger {
            inner,
            linger: Arc::default(),
            draining: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Linger<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if !this.linger.load(std::sync::atomic::Ordering::Relaxed) {
            return std::pin::Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        if this.draining.is_none() {
            // The answer is out (flushed, our side closed); now drain what still comes.
            std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.draining = Some((Box::pin(tokio::time::sleep(LINGER_TIME)), LINGER_BYTES));
        }
        let mut scratch = [0u8; 8192];
        loop {
            let Some((deadline, left)) = this.draining.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            if *left == 0 || deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    *left = left.saturating_sub(buf.filled().len());
                }
                // EOF or an error: the client stopped.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
