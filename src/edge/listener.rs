//! Listeners: binding sockets with the options an edge needs, and the accept loop.
//!
//! Owns: socket2 setup (reuseaddr/reuseport, v6-only, backlog), keepalive and nodelay on
//! accepted sockets, connection caps (global and per listener, as semaphores: at the cap the
//! loop stops accepting and connections wait in the kernel backlog, as HAProxy's maxconn does),
//! and surviving accept errors. It never reads from a connection: each accepted socket is
//! handed to `connection::serve` in its own task.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::edge::connection::{Edge, ListenerState};

/// A listening socket for `cfg`: one handed over (systemd socket activation, or the previous
/// sluice in an upgrade) under the listener's name if there is one, else a new one.
pub fn open(
    cfg: &ListenerConfig,
    inherited: &mut HashMap<String, std::net::TcpListener>,
) -> io::Result<TcpListener> {
    if let Some(sock) = inherited.remove(&cfg.name) {
        let local = sock.local_addr()?;
        if !addresses_agree(cfg.address, local) {
            tracing::warn!(listener = %cfg.name, configured = %cfg.address, inherited = %local,
                "using the inherited socket, whose address differs from the config");
        }
        sock.set_nonblocking(true)?;
        tracing::info!(listener = %cfg.name, address = %local, "using an inherited listening socket");
        return TcpListener::from_std(sock);
    }
    bind(cfg)
}

/// Same address, or the configured one asks for any port (0) on the same IP.
pub fn addresses_agree(configured: SocketAddr, actual: SocketAddr) -> bool {
    configured == actual || (configured.port() == 0 && configured.ip() == actual.ip())
}

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

/// A running listener: its socket and the accept loop's stop token. Connections never hold
/// this (only `ListenerState`), so dropping it closes the listening socket while the
/// connections it accepted live on.
pub struct ListenerHandle {
    pub state: Arc<ListenerState>,
    pub socket: Arc<TcpListener>,
    stop: CancellationToken,
}

impl ListenerHandle {
    /// Start accepting on `socket`. `parent` stops every listener at once (drain).
    pub fn start(
        edge: &Arc<Edge>,
        config: ListenerConfig,
        socket: Arc<TcpListener>,
        parent: &CancellationToken,
    ) -> io::Result<ListenerHandle> {
        // Linux copies TCP_NODELAY and the keepalive options of a listening socket to the
        // sockets it accepts: set once here instead of five setsockopt calls per connection.
        // Set again whenever the listener (re)starts, so a reload's new values reach the
        // connections accepted after it (an inherited socket gets them here too).
        let sock = SockRef::from(&*socket);
        sock.set_tcp_nodelay(true)?;
        crate::net::apply_keepalive(&sock, &config.keepalive)?;
        // The listener's counters exist from its start, at 0 (an alert on accept errors has
        // a series to watch before the first one).
        for kind in ["emfile", "enfile", "enobufs", "enomem", "other"] {
            edge.metrics
                .accept_errors
                .with_label_values(&[config.name.as_str(), kind]);
        }
        edge.metrics
            .accepted
            .with_label_values(&[config.name.as_str()]);
        let state = Arc::new(ListenerState {
            local_addr: socket.local_addr()?,
            permits: config.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            active: edge
                .metrics
                .active
                .with_label_values(&[config.name.as_str()]),
            config,
        });
        let stop = parent.child_token();
        tokio::spawn(accept_loop(
            edge.clone(),
            state.clone(),
            socket.clone(),
            stop.clone(),
        ));
        Ok(ListenerHandle {
            state,
            socket,
            stop,
        })
    }

    /// Stop accepting. The socket closes when the last handle to it is dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The socket can be kept when only these options changed (a new accept loop takes the
    /// new ones); a new address or `reuse_port` needs a new socket.
    pub fn reusable_for(&self, cfg: &ListenerConfig) -> bool {
        let old = &self.state.config;
        old.address == cfg.address && old.reuse_port == cfg.reuse_port
    }

    /// Apply a new backlog to the listening socket (listen(2) again updates it on Linux).
    pub fn set_backlog(&self, backlog: i32) -> io::Result<()> {
        SockRef::from(&*self.socket).listen(backlog)
    }
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
    edge: &Edge,
    listener: &str,
    cap: &'static str,
) -> Option<OwnedSemaphorePermit> {
    match sem.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(tokio::sync::TryAcquireError::Closed) => None,
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            edge.metrics
                .accept_paused
                .with_label_values(&[listener, cap])
                .inc();
            tracing::warn!(listener, cap, "connection cap reached; accepting paused");
            sem.clone().acquire_owned().await.ok()
        }
    }
}

/// Accepts connections without registering them with the runtime (`connection::start` reads
/// the hello first): a duplicate of the listening descriptor in the runtime's epoll set, and
/// `accept4` with `SOCK_NONBLOCK` (through mio). The listener itself stays a tokio
/// `TcpListener` for everything else (its address, backlog, hand-over).
struct Acceptor(tokio::io::unix::AsyncFd<mio::net::TcpListener>);

impl Acceptor {
    fn of(listener: &TcpListener) -> io::Result<Acceptor> {
        let fd = std::os::fd::AsFd::as_fd(listener).try_clone_to_owned()?;
        let mio = mio::net::TcpListener::from_std(std::net::TcpListener::from(fd));
        // SAFETY: the mio listener owns its (duplicated) descriptor for its whole life and
        // never replaces it; the AsyncFd owns the listener.
        #[allow(unsafe_code)]
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(mio, tokio::io::Interest::READABLE)
        }?;
        Ok(Acceptor(fd))
    }

    async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|l| l.get_ref().accept()) {
                Ok(r) => return r.map(|(s, peer)| (std::net::TcpStream::from(s), peer)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Accept until `stop` is cancelled. Each connection runs in its own task on the runtime's
/// tracker, holding its permits until it ends.
async fn accept_loop(
    edge: Arc<Edge>,
    state: Arc<ListenerState>,
    listener: Arc<TcpListener>,
    stop: CancellationToken,
) {
    let name = state.config.name.clone();
    let accepted = edge.metrics.accepted.with_label_values(&[name.as_str()]);
    let mut backoff = Duration::from_millis(5);
    let acceptor = match Acceptor::of(&listener) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(listener = %name, error = %e, "cannot watch the listening socket; not accepting");
            return;
        }
    };
    loop {
        // Take the slots first: at a cap, the loop waits here and new clients wait in the
        // backlog instead of being accepted and dropped.
        let permits = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = async {
                let local = match &state.permits {
                    Some(s) => Some(acquire(s, &edge, &name, "listener").await?),
                    None => None,
                };
                // At the connection cap with connections still waiting for their hello, a
                // new connection is accepted anyway: the oldest of them gives it its slot.
                let global = match edge.global_permits.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(tokio::sync::TryAcquireError::NoPermits) if !edge.pending.is_empty() => None,
                    Err(_) => Some(acquire(&edge.global_permits, &edge, &name, "global").await?),
                };
                Some((global, local))
            } => match p {
                Some(p) => p,
                None => break,
            },
        };
        let accepted_conn = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = acceptor.accept() => r,
        };
        match accepted_conn {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let permits = match permits {
                    (Some(global), local) => (global, local),
                    (None, local) => {
                        edge.pending.evict_oldest();
                        let Ok(global) = edge.global_permits.clone().acquire_owned().await else {
                            break;
                        };
                        (global, local)
                    }
                };
                accepted.inc();
                let edge2 = edge.clone();
                let st = state.clone();
                edge.tracker.spawn(crate::edge::connection::serve(
                    edge2, st, stream, peer, permits,
                ));
            }
            Err(e) => {
                drop(permits);
                if let Some(kind) = is_resource_exhaustion(&e) {
                    edge.metrics
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
                    edge.metrics
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
