//! One client connection, from accept to close.
//!
//! Owns: the connection's two phases. Establishing (`start`, `establish`): read the first
//! bytes (`hello`), route with the snapshot the connection was accepted under, connect a
//! backend, replay the buffered hello behind an optional PROXY header. Relaying (`Serve`,
//! `Relaying`): move bytes until both sides finish, leaving the task for the parking lot
//! while idle (`Parked`, the park/resume protocol with `parking`). Also the narrow handle
//! every connection holds (`Edge`) and the listener as its connections know it
//! (`ListenerState`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::agents::api::Api;
use crate::config::{Keepalive, ListenerConfig};
use crate::edge::access_log::{Log, Names};
use crate::edge::hello::{read_hello, read_proxy_header, Hello};
use crate::edge::parking::{self, Parking};
use crate::edge::relay::{self, Relayed};
use crate::observe::metrics::Metrics;
use crate::snapshot::{Route, Snapshot, Snapshots, Target};
use crate::upstream::{ActiveGuard, Dialed};
use sluice_core::close::CloseReason;
use sluice_core::proxy::{self, HeaderInfo};
use sluice_core::route::{Facts, TlsFacts};

/// What the edge needs of the process: the narrow handle the runtime builds once and every
/// listener, connection and the parking lot hold (never the runtime itself).
pub struct Edge {
    pub metrics: Metrics,
    pub snapshots: Arc<Snapshots>,
    /// Every connection task; waited on during a drain.
    pub tracker: TaskTracker,
    /// Closes every connection at once (the very end of a drain, a second signal).
    pub hard_stop: CancellationToken,
    /// Closes every connection spread over `close_spread` (drain_timeout passed).
    pub close_all: CancellationToken,
    /// Parent of every listener's accept loop; cancelled when a drain closes the listeners.
    pub accepting: CancellationToken,
    /// The process-wide connection cap (`limits.max_connections`).
    pub global_permits: Arc<Semaphore>,
    /// Idle established connections held without a task.
    pub parking: Parking<Parked>,
    /// Connections that have not sent their hello yet (their own caps).
    pub pending: super::pending::Pending,
    /// The heartbeat API, for routes with `serve = "heartbeat"`.
    pub api: Arc<Api>,
    next_conn_id: AtomicU64,
    close_spread_ms: AtomicU64,
}

/// The shared parts of an `Edge` (the runtime keeps the same handles).
pub struct EdgeParts {
    pub metrics: Metrics,
    pub snapshots: Arc<Snapshots>,
    pub tracker: TaskTracker,
    pub hard_stop: CancellationToken,
    pub close_all: CancellationToken,
    pub accepting: CancellationToken,
    pub global_permits: Arc<Semaphore>,
    pub api: Arc<Api>,
    pub close_spread: Duration,
    /// `(max_pending_hellos, max_pending_hellos_per_source)`, resolved.
    pub pending_caps: (usize, usize),
}

impl Edge {
    pub fn new(p: EdgeParts) -> Edge {
        Edge {
            parking: Parking::new(
                p.metrics.relay_parked.clone(),
                p.metrics.relay_parks.clone(),
                p.tracker.clone(),
            ),
            pending: super::pending::Pending::new(
                p.pending_caps.0,
                p.pending_caps.1,
                p.metrics.pending_hellos.clone(),
                p.metrics.pending_evictions.clone(),
            ),
            metrics: p.metrics,
            snapshots: p.snapshots,
            tracker: p.tracker,
            hard_stop: p.hard_stop,
            close_all: p.close_all,
            accepting: p.accepting,
            global_permits: p.global_permits,
            api: p.api,
            next_conn_id: AtomicU64::new(1),
            close_spread_ms: AtomicU64::new(p.close_spread.as_millis() as u64),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The window over which connections still open at a forced close are spread.
    pub fn close_spread(&self) -> Duration {
        Duration::from_millis(self.close_spread_ms.load(Ordering::Relaxed))
    }

    pub fn set_close_spread(&self, spread: Duration) {
        self.close_spread_ms
            .store(spread.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether listeners take new connections (false once a drain closed them).
    pub fn accepting_new(&self) -> bool {
        !self.accepting.is_cancelled()
    }
}

/// A listener as its connections know it.
pub struct ListenerState {
    pub config: ListenerConfig,
    pub local_addr: SocketAddr,
    pub permits: Option<Arc<Semaphore>>,
    /// `sluice_connections_active{listener}`, resolved once for all its connections.
    pub active: prometheus::IntGauge,
}

/// Serve one accepted connection: the task `listener` spawns. Two phases with different
/// shapes: establishing (reading the hello, routing, connecting; an async fn, boxed, freed
/// when it ends) and relaying (a flat struct polled by hand). A tunnel's task is only the
/// second, so it stays small; once idle for `park_idle_after` it leaves its task altogether
/// for the parking lot (`Parked`; see `parking` and `bench/findings.md`).
pub fn serve(
    edge: Arc<Edge>,
    state: Arc<ListenerState>,
    stream: std::net::TcpStream,
    client: SocketAddr,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> Serve {
    Serve::Establishing(Box::pin(start(edge, state, stream, client, permits)))
}

/// The future of one connection. The size difference between the variants is the point:
/// the long-lived one is stored inline, the short-lived one boxed.
#[allow(clippy::large_enum_variant)]
pub enum Serve {
    Establishing(std::pin::Pin<Box<dyn std::future::Future<Output = Option<Relaying>> + Send>>),
    Relaying(Relaying),
    Done,
}

impl std::future::Future for Serve {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        loop {
            match &mut *self {
                Serve::Establishing(f) => match f.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(r)) => *self = Serve::Relaying(r),
                    Poll::Ready(None) => {
                        *self = Serve::Done;
                        return Poll::Ready(());
                    }
                },
                Serve::Relaying(r) => {
                    let Poll::Ready(relayed) = r.relay.poll_relay(
                        cx,
                        &mut r.client,
                        &mut r.backend,
                        (
                            &r.conn.route.bytes_to_backend,
                            &r.conn.route.bytes_to_client,
                        ),
                    ) else {
                        return Poll::Pending;
                    };
                    let Serve::Relaying(r) = std::mem::replace(&mut *self, Serve::Done) else {
                        return Poll::Ready(());
                    };
                    match relayed {
                        Relayed::Ended(outcome) => {
                            let mut log = r.log;
                            r.conn.finish(&mut log, outcome);
                            return Poll::Ready(());
                        }
                        // Idle: the connection leaves this task for the parking lot.
                        Relayed::Idle => {
                            let mut r = r;
                            if let Some(keepalive) = r.relay.take_keepalive() {
                                arm_keepalive(r.log.id, &r.backend, &keepalive);
                            }
                            let edge = r.conn.edge.clone();
                            match edge.parking.park(r) {
                                Ok(()) => return Poll::Ready(()),
                                Err(mut r) => {
                                    r.relay.never_park();
                                    *self = Serve::Relaying(r);
                                }
                            }
                        }
                    }
                }
                Serve::Done => return Poll::Ready(()),
            }
        }
    }
}

/// An established connection: what its relay phase holds, and nothing else.
pub struct Relaying {
    client: TcpStream,
    backend: TcpStream,
    relay: relay::Relay,
    conn: Conn,
    /// For the access-log line and the close metrics; boxed, read only at the end.
    log: Box<Log>,
}

/// Set the backend leg's TCP keepalive; a failure costs the connection its keepalive, not
/// the connection.
fn arm_keepalive(conn: u64, backend: &TcpStream, keepalive: &Keepalive) {
    if let Err(e) = crate::net::apply_keepalive(&socket2::SockRef::from(backend), keepalive) {
        tracing::warn!(conn, error = %e, "cannot set TCP keepalive on the backend socket");
    }
}

/// What an established connection holds besides its sockets, relay and log, on a task or
/// parked: shared references only, no allocation of its own.
struct Conn {
    route: Arc<Route>,
    guard: ActiveGuard,
    edge: Arc<Edge>,
    state: Arc<ListenerState>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl Conn {
    fn finish(self, log: &mut Log, outcome: relay::Outcome) {
        let Conn {
            route,
            guard,
            edge,
            state,
            ..
        } = self;
        route.active.dec();
        log.to_backend += outcome.to_backend;
        log.to_client = outcome.to_client;
        log.end = outcome.end;
        if outcome.end == CloseReason::IdleTimeout {
            log.detail = "idle_timeout reached".into();
        }
        drop(guard);
        closed(&edge, &state, log);
    }

    /// Close on an internal failure while parking or resuming (the sockets are already
    /// gone or about to be dropped).
    fn fail(self, log: &mut Log, relay: &relay::Paused, detail: String) {
        tracing::error!(conn = log.id, "{detail}");
        log.detail = detail;
        self.finish(log, relay.outcome(CloseReason::InternalError));
    }

    /// Its backend was retired (removed, and `removed_drain_timeout` passed).
    fn retired(&self) -> bool {
        self.guard.backend().retire.is_cancelled()
    }

    /// When the connection must close (see `stop_signal`).
    fn stop(&self) -> relay::StopSignal {
        Box::pin(stop_signal(
            self.edge.clone(),
            self.guard.backend().retire.clone(),
        ))
    }
}

/// The sockets to watch while parked: those whose direction still reads (a finished
/// direction's socket stays readable at EOF). `reading` is `Relay::reading`.
fn watched(
    reading: (bool, bool),
    client: &impl std::os::fd::AsRawFd,
    backend: &impl std::os::fd::AsRawFd,
) -> [Option<std::os::fd::RawFd>; 2] {
    [
        reading.0.then(|| client.as_raw_fd()),
        reading.1.then(|| backend.as_raw_fd()),
    ]
}

impl parking::Pause for Relaying {
    type Parked = Parked;

    fn retired(&self) -> bool {
        self.conn.retired()
    }

    fn watched(&self) -> [Option<std::os::fd::RawFd>; 2] {
        watched(self.relay.reading(), &self.client, &self.backend)
    }

    /// Leave the task: both sockets are taken out of tokio's reactor, and the task, its
    /// registrations, its timer and its boxes are freed. What is left is one flat value that
    /// the lot stores inline. `None`: a socket could not be deregistered and is lost; the
    /// connection is closed.
    fn pause(self, tracked: TaskTrackerToken) -> Option<Parked> {
        let Relaying {
            client,
            backend,
            relay,
            conn,
            mut log,
        } = self;
        let relay = relay.pause();
        let (client, backend) = match (client.into_std(), backend.into_std()) {
            (Ok(c), Ok(b)) => (c, b),
            (Err(e), _) | (_, Err(e)) => {
                let detail = format!("cannot park the connection: {e}");
                conn.fail(&mut log, &relay, detail);
                return None;
            }
        };
        Some(Parked {
            client,
            backend,
            relay,
            conn,
            log: *log,
            _tracked: tracked,
        })
    }
}

/// A connection in the parking lot: no task, no buffers and no allocation of its own, its
/// sockets in the lot's epoll set (see `parking`). It counts as a connection task for the
/// drain (`_tracked`).
pub struct Parked {
    client: std::net::TcpStream,
    backend: std::net::TcpStream,
    relay: relay::Paused,
    conn: Conn,
    log: Log,
    _tracked: TaskTrackerToken,
}

impl parking::Park for Parked {
    fn watched(&self) -> [Option<std::os::fd::RawFd>; 2] {
        watched(self.relay.reading(), &self.client, &self.backend)
    }

    fn retired(&self) -> bool {
        self.conn.retired()
    }

    fn idle_deadline(&self) -> Option<tokio::time::Instant> {
        self.relay.idle_deadline()
    }

    fn resume(self) {
        let Parked {
            client,
            backend,
            relay,
            conn,
            mut log,
            _tracked,
        } = self;
        match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
            (Ok(client), Ok(backend)) => {
                let relay = relay.resume(conn.stop());
                let edge = conn.edge.clone();
                edge.tracker.spawn(Serve::Relaying(Relaying {
                    client,
                    backend,
                    relay,
                    conn,
                    log: Box::new(log),
                }));
            }
            (Err(e), _) | (_, Err(e)) => {
                let detail = format!("cannot resume the parked connection: {e}");
                conn.fail(&mut log, &relay, detail);
            }
        }
    }
}

/// Count a connection's end and write its access-log line.
fn closed(edge: &Edge, state: &ListenerState, log: &Log) {
    let listener = state.config.name.as_str();
    edge.metrics
        .closed
        .with_label_values(&[listener, log.route_name(), log.end.label()])
        .inc();
    if let Some(b) = &log.backend {
        b.moved(log.to_backend, log.to_client);
        edge.metrics
            .connection_duration
            .with_label_values(&[log.route_name()])
            .observe(log.started.elapsed().as_secs_f64());
    }
    state.active.dec();
    log.emit(listener);
}

/// The establishing phase: `Some` once the hello is replayed to a backend.
async fn start(
    edge: Arc<Edge>,
    state: Arc<ListenerState>,
    accepted: std::net::TcpStream,
    client: SocketAddr,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> Option<Relaying> {
    state.active.inc();
    // The first read before the socket joins the runtime's epoll set: a hello already there
    // is taken now, and the registration then finds the socket drained, so the runtime never
    // reports a readiness this read already used (which cost a wake-up of this task and a
    // `recv` answering EAGAIN per connection). A source the listener refuses is not read.
    let cfg = &state.config;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    if cfg.accept_proxy != crate::config::AcceptProxy::None || cfg.acl.permits(client.ip()) {
        let room = cfg.max_hello_size.max(sluice_core::proxy::MAX_V2_HEADER);
        let _ = crate::edge::hello::read_now(&accepted, &mut buf, room);
    }
    let mut stream = match TcpStream::from_std(accepted) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %client, error = %e, "cannot watch an accepted connection; closing it");
            state.active.dec();
            return None;
        }
    };
    let mut log = Box::new(Log {
        id: edge.next_conn_id(),
        client,
        tls_names: Names::new(""),
        route: None,
        backend: None,
        to_backend: 0,
        to_client: 0,
        started: Instant::now(),
        end: CloseReason::Closed,
        detail: String::new(),
    });
    // The config this connection lives with, whatever reloads happen later.
    let snapshot = edge.snapshot();
    // Pending until its hello is read: a newer connection may need its place.
    let (pending, evicted) = edge.pending.register(log.id, client.ip());
    let outcome = tokio::select! {
        r = establish(&edge, &state, &mut stream, buf, &snapshot, &mut log, &pending) => Ok(r),
        Ok(why) = evicted => Err(why),
    };
    drop(pending);
    let established = match outcome {
        Ok(r) => r,
        Err(why) => {
            log.end = CloseReason::PendingEvicted;
            log.detail = format!(
                "no hello yet when a newer connection needed its place ({})",
                why.label()
            );
            None
        }
    };
    let park_after = snapshot.config.limits.park_idle_after;
    drop(snapshot);
    let (backend, keepalive, route, guard) = match established {
        Some(Established::Relay(backend, keepalive, route, guard)) => {
            (backend, keepalive, route, guard)
        }
        Some(Established::Api(hello)) => {
            // The heartbeat API, on the main port: held by this task until the agent leaves.
            // Boxed: its future is large, and inline it would make every connection's
            // establishing phase that large too (4.9 KB instead of 1.3).
            let api = Box::pin(crate::agents::api::serve_tls(
                edge.api.clone(),
                crate::agents::api::Rewind::new(hello, stream),
                log.client.ip(),
            ));
            match api.await {
                Ok(()) => log.end = CloseReason::HeartbeatApi,
                Err(e) => {
                    log.end = CloseReason::HeartbeatApiError;
                    log.detail = e.to_string();
                }
            }
            closed(&edge, &state, &log);
            return None;
        }
        None => {
            closed(&edge, &state, &log);
            return None;
        }
    };
    route.active.inc();
    let conn = Conn {
        route,
        guard,
        edge,
        state,
        _permits: permits,
    };
    // The backend leg's TCP keepalive is set when the connection first goes idle, before it
    // parks (the relay holds it until then): keepalive only matters to a connection that sits
    // idle, and one that closes within seconds (most client traffic) spares the calls.
    // Without parking, nothing marks that moment: now.
    let keepalive = match park_after {
        Some(_) => Some(keepalive),
        None => {
            arm_keepalive(log.id, &backend, &keepalive);
            None
        }
    };
    Some(Relaying {
        client: stream,
        backend,
        relay: relay::Relay::new(conn.route.idle_timeout, park_after, conn.stop(), keepalive),
        conn,
        log,
    })
}

/// When an established connection must close: its backend's `retire` token fires (a removed
/// backend's `removed_drain_timeout`, or the end of a drain, through the runtime's
/// `close_all`); then it waits a random part of `close_spread`, so that thousands of tunnels
/// do not all reconnect in the same second. `hard_stop` cuts the wait short.
async fn stop_signal(edge: Arc<Edge>, retire: CancellationToken) -> CloseReason {
    retire.cancelled().await;
    let end = if edge.close_all.is_cancelled() {
        CloseReason::Shutdown
    } else {
        CloseReason::BackendRemoved
    };
    let spread = edge.close_spread();
    if !edge.hard_stop.is_cancelled() && !spread.is_zero() {
        // Boxed: an idle connection's future only holds the first wait.
        let wait = spread.mul_f64(rand::random::<f64>());
        Box::pin(async {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = edge.hard_stop.cancelled() => {}
            }
        })
        .await;
    }
    end
}

/// Read the hello, route, connect, replay the hello. `None`: the connection is over (the log
/// says why).
async fn establish(
    edge: &Edge,
    state: &ListenerState,
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    snapshot: &Snapshot,
    log: &mut Log,
    pending: &super::pending::PendingGuard<'_>,
) -> Option<Established> {
    let listener = state.config.name.as_str();
    // TCP_NODELAY and keepalive come from the listening socket (see `ListenerHandle::start`).
    // `buf` holds what `start` read before registering the socket.
    let deadline = tokio::time::Instant::now() + state.config.hello_timeout;
    let mut local = None;
    if state.config.accept_proxy != crate::config::AcceptProxy::None {
        let outcome =
            read_proxy_header(stream, &mut buf, &state.config, log.client, deadline).await;
        let result = match &outcome {
            Ok((_, result)) | Err((result, _, _)) => *result,
        };
        edge.metrics
            .proxy_inbound
            .with_label_values(&[listener, result])
            .inc();
        match outcome {
            Ok((Some(origin), _)) => {
                log.client = origin.client;
                local = origin.local;
                pending.moved_to(origin.client.ip());
            }
            Ok((None, _)) => {}
            Err((result, end, detail)) => {
                if result != "eof" {
                    tracing::warn!(conn = log.id, peer = %log.client, listener, reason = result,
                        detail = detail.as_str(), "PROXY header refused");
                }
                log.end = end;
                log.detail = detail;
                return None;
            }
        }
    }
    // The real client's address is known: refuse it before reading anything more.
    if !state.config.acl.permits(log.client.ip()) {
        deny(edge, log, "listener", listener);
        return None;
    }
    let hello = read_hello(stream, &mut buf, &state.config, deadline).await;
    pending.done();
    let result = match &hello {
        Hello::Tls(_) => "ok",
        Hello::Plain => "not_tls",
        Hello::Rejected(result, _) => result,
    };
    edge.metrics
        .hello
        .with_label_values(&[listener, result])
        .inc();
    let tls = match hello {
        Hello::Tls(h) => Some(h),
        Hello::Plain => None,
        Hello::Rejected(result, detail) => {
            log.end = match result {
                "timeout" => CloseReason::HelloTimeout,
                "too_large" => CloseReason::HelloTooLarge,
                "malformed" => CloseReason::HelloMalformed,
                _ => CloseReason::ClientClosedEarly,
            };
            if result != "eof" {
                tracing::warn!(conn = log.id, client = %log.client, listener, reason = result,
                    detail = detail.as_str(), "hello refused");
            }
            log.detail = detail;
            return None;
        }
    };
    if let Some(h) = &tls {
        log.set_tls_names(h.sni.as_deref(), &h.alpn);
    }

    let facts = Facts {
        listener,
        tls: tls.as_ref().map(|h| TlsFacts {
            sni: h.sni.as_deref(),
            alpn: &h.alpn,
        }),
    };
    let Some(route) = snapshot.routes.select(&facts) else {
        edge.metrics
            .route_decisions
            .with_label_values(&[listener, "none"])
            .inc();
        log.end = if tls.is_some() {
            CloseReason::NoRoute
        } else {
            CloseReason::NotTls
        };
        log.detail = "no route matches this connection".into();
        return None;
    };
    edge.metrics
        .route_decisions
        .with_label_values(&[listener, route.name.as_str()])
        .inc();
    log.route = Some(route.clone());
    if !route.acl.permits(log.client.ip()) {
        deny(edge, log, "route", &route.name);
        return None;
    }

    let sni = tls.as_ref().and_then(|h| h.sni.as_deref());
    // What the backend gets first: the PROXY header if the pool wants one, then what the
    // client sent, in one write (the connect's own, when the handshake is quick).
    // getsockname only when a PROXY header needs the address.
    let local = match local {
        Some(l) => l,
        None if !route.may_send_proxy_header() => state.local_addr,
        None => stream.local_addr().unwrap_or(state.local_addr),
    };
    let info = HeaderInfo {
        client: log.client,
        local,
        alpn: tls.as_ref().and_then(|h| route.reported_alpn(&h.alpn)),
        sni,
    };
    let hello_len = buf.len();
    let first = match proxy::encode(route.proxy_protocol(), &info) {
        Ok(Some(mut header)) => {
            header.extend_from_slice(&buf);
            header
        }
        Ok(None) => buf,
        Err(e) => {
            log.end = CloseReason::InternalError;
            log.detail = format!("cannot encode PROXY header: {e}");
            return None;
        }
    };
    let connected = match &route.target {
        Target::Pool(pool) => pool.connect(log.client, sni, &first, &edge.metrics).await,
        Target::Resource(res) => {
            let hello = &first[first.len() - hello_len..];
            res.connect(log.client, sni, &first, hello, &info, &edge.metrics)
                .await
        }
        // Such a route has no PROXY header: `first` is what the client sent.
        Target::Heartbeat => return Some(Established::Api(first)),
    };
    let (
        Dialed {
            mut stream,
            sent,
            first: own_first,
            keepalive,
        },
        guard,
    ) = match connected {
        Ok(ok) => ok,
        Err(e) => {
            log.end = match e {
                crate::upstream::ConnectError::LocalResources(_) => CloseReason::LocalResources,
                _ => CloseReason::BackendUnavailable,
            };
            log.detail = e.to_string();
            return None;
        }
    };
    log.backend = Some(guard.backend().clone());
    let first = own_first.unwrap_or(first);
    if let Err(e) = stream.write_all(&first[sent..]).await {
        log.end = CloseReason::BackendError;
        log.detail = format!("writing the hello to the backend failed: {e}");
        return None;
    }
    route.bytes_to_backend.inc_by(first.len() as u64);
    log.to_backend = first.len() as u64;
    Some(Established::Relay(stream, keepalive, route.clone(), guard))
}

/// Refuse a connection by an `allow`/`deny` list of `scope` (`listener` or `route`) `name`.
fn deny(edge: &Edge, log: &mut Log, scope: &str, name: &str) {
    edge.metrics
        .access_denied
        .with_label_values(&[scope, name])
        .inc();
    log.end = CloseReason::Denied;
    log.detail = format!("source refused by the {scope} `{name}` allow/deny list");
    tracing::debug!(conn = log.id, client = %log.client, scope, name, "source refused");
}

/// How the establishing phase ended, when the connection goes on.
enum Established {
    /// Connected to a backend, the hello replayed: relay. The keepalive is not armed yet.
    Relay(TcpStream, Keepalive, Arc<Route>, ActiveGuard),
    /// A `serve = "heartbeat"` route: sluice terminates TLS itself; these bytes were read.
    Api(Vec<u8>),
}
