//! Listeners: binding sockets with the options an edge needs, and the accept loop.
//!
//! Owns: socket2 setup (reuseaddr/reuseport, v6-only, backlog), keepalive and nodelay on
//! accepted sockets, connection caps (global and per listener, as semaphores: at the cap the
//! loop stops accepting and connections wait in the kernel backlog, as HAProxy's maxconn does),
//! and surviving accept errors. It never reads from a connection: each accepted socket is
//! handed to `connection::serve` in its own task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Keepalive, ListenerConfig};
use crate::runtime::Runtime;

/// Bind a listening socket for `cfg`.
pub fn bind(cfg: &ListenerConfig) -> io::Result<TcpListener> {
    let addr = cfg.address;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // "[::]:443" and "0.0.0.0:443" can then be two listeners, as in nginx.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if cfg.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(cfg.backlog)?;
    TcpListener::from_std(socket.into())
}

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

/// A listener as the runtime knows it.
pub struct ListenerState {
    pub config: ListenerConfig,
    pub local_addr: SocketAddr,
    pub permits: Option<Arc<Semaphore>>,
}

/// Errors that mean the process is out of a resource: back off instead of spinning.
fn is_resource_exhaustion(e: &io::Error) -> Option<&'static str> {
    match e.raw_os_error() {
        Some(libc::EMFILE) => Some("emfile"),
        Some(libc::ENFILE) => Some("enfile"),
        Some(libc::ENOBUFS) => Some("enobufs"),
        Some(libc::ENOMEM) => Some("enomem"),
        _ => None,
    }
}

async fn acquire(
    sem: &Arc<Semaphore>,
    rt: &Runtime,
    listener: &str,
    cap: &'static str,
) -> Option<OwnedSemaphorePermit> {
    match sem.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(tokio::sync::TryAcquireError::Closed) => None,
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            rt.metrics
                .accept_paused
                .with_label_values(&[listener, cap])
                .inc();
            tracing::warn!(listener, cap, "connection cap reached; accepting paused");
            sem.clone().acquire_owned().await.ok()
        }
    }
}

/// Accept until `stop` is cancelled. Each connection runs in its own task on the runtime's
/// tracker, holding its permits until it ends.
pub async fn accept_loop(
    rt: Arc<Runtime>,
    state: Arc<ListenerState>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let name = state.config.name.clone();
    let accepted = rt.metrics.accepted.with_label_values(&[name.as_str()]);
    let mut backoff = Duration::from_millis(5);
    loop {
        // Take the slots first: at a cap, the loop waits here and new clients wait in the
        // backlog instead of being accepted and dropped.
        let permits = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = async {
                let local = match &state.permits {
                    Some(s) => Some(acquire(s, &rt, &name, "listener").await?),
                    None => None,
                };
                let global = acquire(&rt.global_permits, &rt, &name, "global").await?;
                Some((global, local))
            } => match p {
                Some(p) => p,
                None => break,
            },
        };
        let accepted_conn = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted_conn {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                accepted.inc();
                let rt2 = rt.clone();
                let st = state.clone();
                rt.tracker.spawn(async move {
                    crate::connection::serve(rt2, st, stream, peer, permits).await;
                });
            }
            Err(e) => {
                drop(permits);
                if let Some(kind) = is_resource_exhaustion(&e) {
                    rt.metrics
                        .accept_errors
                        .with_label_values(&[name.as_str(), kind])
                        .inc();
                    tracing::error!(listener = %name, error = %e, backoff_ms = backoff.as_millis() as u64,
                        "accept failed: out of resources; backing off");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                } else {
                    // ECONNABORTED and friends: the client gave up; nothing to do.
                    rt.metrics
                        .accept_errors
                        .with_label_values(&[name.as_str(), "other"])
                        .inc();
                    tracing::debug!(listener = %name, error = %e, "accept failed");
                }
            }
        }
    }
    tracing::info!(listener = %name, address = %state.local_addr, "listener closed");
}
