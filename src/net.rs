//! Socket helpers: the options both legs of a connection share (the client's, set on the
//! listening socket and inherited by accepted ones, and the backend's), and the capped accept
//! loop of the admin and heartbeat APIs' listeners.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
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
