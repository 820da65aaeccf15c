//! One client connection, from accept to close.
//!
//! Owns: the I/O shell around the hello parser (read until complete, under `hello_timeout`
//! and `max_hello_size`), the routing decision, the backend connect, replaying the buffered
//! hello (behind an optional PROXY header), the relay, and the access-log line. A hello that is
//! malformed, oversized or too slow is closed with a counted reason; it is never routed to a
//! default pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::Keepalive;
use crate::control::runtime::{Route, Runtime, Snapshot, Target};
use crate::edge::listener::ListenerState;
use crate::edge::relay::{self, Relayed};
use crate::upstream::{ActiveGuard, Backend, Dialed};
use sluice_core::close::CloseReason;
use sluice_core::hello::{self, ClientHello, Parse};
use sluice_core::proxy::{self, HeaderInfo, Origin, Step};
use sluice_core::route::{Facts, TlsFacts};

/// How reading the first bytes ended.
enum Hello {
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
async fn read_proxy_header(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cfg: &crate::config::ListenerConfig,
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

/// One read on the socket, bypassing tokio's readiness; `None` if nothing is there yet.
fn read_now(stream: &TcpStream, buf: &mut Vec<u8>, room: usize) -> Option<std::io::Result<usize>> {
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

async fn read_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    state: &ListenerState,
    deadline: tokio::time::Instant,
) -> Hello {
    let cap = state.config.max_hello_size;
    loop {
        match hello::parse(buf) {
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

/// The hello's SNI and ALPN list as the log prints them, `sni '\n' alpn,alpn` (`-` for
/// none; empty before a hello is parsed). Inline when it fits, as nearly all do: a parked
/// connection then holds no allocation of its own (see `parking`).
enum Names {
    Inline { len: u8, bytes: [u8; NAMES_INLINE] },
    Boxed(Box<str>),
}

/// Room for a long SNI and Teleport's two tunnel ALPN names.
const NAMES_INLINE: usize = 94;

impl Names {
    fn new(text: &str) -> Names {
        if text.len() > NAMES_INLINE {
            return Names::Boxed(text.into());
        }
        let mut bytes = [0; NAMES_INLINE];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Names::Inline {
            len: text.len() as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied from a `str` whole: always valid UTF-8.
            Names::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or("")
            }
            Names::Boxed(b) => b,
        }
    }
}

/// The access-log record, filled in as the connection progresses.
struct Log {
    id: u64,
    client: SocketAddr,
    tls_names: Names,
    /// Names come from these at emit time: no per-connection string copies.
    route: Option<Arc<Route>>,
    backend: Option<Arc<Backend>>,
    to_backend: u64,
    to_client: u64,
    started: Instant,
    end: CloseReason,
    detail: String,
}

impl Log {
    /// Record the hello's names.
    fn set_tls_names(&mut self, sni: Option<&str>, alpn: &[String]) {
        let mut names = String::with_capacity(
            sni.map_or(1, str::len) + 1 + alpn.iter().map(|a| a.len() + 1).sum::<usize>(),
        );
        names.push_str(sni.unwrap_or("-"));
        names.push('\n');
        if alpn.is_empty() {
            names.push('-');
        }
        for (i, a) in alpn.iter().enumerate() {
            if i > 0 {
                names.push(',');
            }
            names.push_str(a);
        }
        self.tls_names = Names::new(&names);
    }

    /// (SNI, ALPN list) as logged.
    fn tls_names(&self) -> (&str, &str) {
        self.tls_names
            .as_str()
            .split_once('\n')
            .unwrap_or(("-", "-"))
    }

    fn route_name(&self) -> &str {
        self.route.as_ref().map_or("none", |r| r.name.as_str())
    }

    fn emit(&self, listener: &str) {
        let (sni, alpn) = self.tls_names();
        tracing::info!(
            target: "sluice::access",
            conn = self.id,
            client = %self.client,
            listener,
            sni,
            alpn = %alpn,
            route = self.route_name(),
            pool = self.route.as_ref().map_or("-", |r| r.pool_name()),
            backend = self.backend.as_ref().map_or("-", |b| b.name.as_str()),
            bytes_to_backend = self.to_backend,
            bytes_to_client = self.to_client,
            duration_ms = self.started.elapsed().as_millis() as u64,
            end = self.end.label(),
            detail = %self.detail,
            "connection closed"
        );
    }
}

/// Serve one accepted connection: the task `listener` spawns. Two phases with different
/// shapes: establishing (reading the hello, routing, connecting; an async fn, boxed, freed
/// when it ends) and relaying (a flat struct polled by hand). A tunnel's task is only the
/// second, so it stays small; once idle for `park_idle_after` it leaves its task altogether
/// for the parking lot (`Parked`; see `parking` and `bench/findings.md`).
pub fn serve(
    rt: Arc<Runtime>,
    state: Arc<ListenerState>,
    stream: TcpStream,
    client: SocketAddr,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> Serve {
    Serve::Establishing(Box::pin(start(rt, state, stream, client, permits)))
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
                            let rt = r.conn.rt.clone();
                            match crate::edge::parking::Parking::park(&rt, r) {
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
    if let Err(e) =
        crate::edge::listener::apply_keepalive(&socket2::SockRef::from(backend), keepalive)
    {
        tracing::warn!(conn, error = %e, "cannot set TCP keepalive on the backend socket");
    }
}

/// What an established connection holds besides its sockets, relay and log, on a task or
/// parked: shared references only, no allocation of its own.
struct Conn {
    route: Arc<Route>,
    guard: ActiveGuard,
    rt: Arc<Runtime>,
    state: Arc<ListenerState>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl Conn {
    fn finish(self, log: &mut Log, outcome: relay::Outcome) {
        let Conn {
            route,
            guard,
            rt,
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
        closed(&rt, &state, log);
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
            self.rt.clone(),
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

impl Relaying {
    /// Its backend was retired: it must not park (its stop signal is about to close it).
    pub(crate) fn retired(&self) -> bool {
        self.conn.retired()
    }

    /// The sockets the parking lot must watch.
    pub(crate) fn watched(&self) -> [Option<std::os::fd::RawFd>; 2] {
        watched(self.relay.reading(), &self.client, &self.backend)
    }

    /// Leave the task: both sockets are taken out of tokio's reactor, and the task, its
    /// registrations, its timer and its boxes are freed. What is left is one flat value that
    /// the lot stores inline. `Err`: a socket could not be deregistered and is lost; the
    /// connection is closed.
    pub(crate) fn pause(self, tracked: TaskTrackerToken) -> Result<Parked, ()> {
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
                return Err(());
            }
        };
        Ok(Parked {
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

impl Parked {
    /// The sockets the lot watches.
    pub(crate) fn watched(&self) -> [Option<std::os::fd::RawFd>; 2] {
        watched(self.relay.reading(), &self.client, &self.backend)
    }

    /// Its backend was retired: the lot must hand it back (its task then closes it).
    pub(crate) fn retired(&self) -> bool {
        self.conn.retired()
    }

    /// When its idle timeout passes (the lot must hand it back then); `None`: never.
    pub(crate) fn idle_deadline(&self) -> Option<tokio::time::Instant> {
        self.relay.idle_deadline()
    }

    /// Back to a task of its own (inside the runtime), relaying where it left off.
    pub(crate) fn resume(self) {
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
                let rt = conn.rt.clone();
                rt.tracker.spawn(Serve::Relaying(Relaying {
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
fn closed(rt: &Runtime, state: &ListenerState, log: &Log) {
    let listener = state.config.name.as_str();
    rt.metrics
        .closed
        .with_label_values(&[listener, log.route_name(), log.end.label()])
        .inc();
    state.active.dec();
    log.emit(listener);
}

/// The establishing phase: `Some` once the hello is replayed to a backend.
async fn start(
    rt: Arc<Runtime>,
    state: Arc<ListenerState>,
    mut stream: TcpStream,
    client: SocketAddr,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> Option<Relaying> {
    state.active.inc();
    let mut log = Box::new(Log {
        id: rt.next_conn_id(),
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
    let snapshot = rt.snapshot();
    let established = establish(&rt, &state, &mut stream, &snapshot, &mut log).await;
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
                rt.clone(),
                crate::agents::api::Rewind::new(hello, stream),
            ));
            match api.await {
                Ok(()) => log.end = CloseReason::HeartbeatApi,
                Err(e) => {
                    log.end = CloseReason::HeartbeatApiError;
                    log.detail = e;
                }
            }
            closed(&rt, &state, &log);
            return None;
        }
        None => {
            closed(&rt, &state, &log);
            return None;
        }
    };
    route.active.inc();
    let conn = Conn {
        route,
        guard,
        rt,
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
async fn stop_signal(rt: Arc<Runtime>, retire: CancellationToken) -> CloseReason {
    retire.cancelled().await;
    let end = if rt.close_all.is_cancelled() {
        CloseReason::Shutdown
    } else {
        CloseReason::BackendRemoved
    };
    let spread = rt.close_spread();
    if !rt.hard_stop.is_cancelled() && !spread.is_zero() {
        // Boxed: an idle connection's future only holds the first wait.
        let wait = spread.mul_f64(rand::random::<f64>());
        Box::pin(async {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = rt.hard_stop.cancelled() => {}
            }
        })
        .await;
    }
    end
}

/// Read the hello, route, connect, replay the hello. `None`: the connection is over (the log
/// says why).
async fn establish(
    rt: &Runtime,
    state: &ListenerState,
    stream: &mut TcpStream,
    snapshot: &Snapshot,
    log: &mut Log,
) -> Option<Established> {
    let listener = state.config.name.as_str();
    // TCP_NODELAY and keepalive come from the listening socket (see `ListenerHandle::start`).
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + state.config.hello_timeout;
    let mut local = None;
    if state.config.accept_proxy != crate::config::AcceptProxy::None {
        let outcome =
            read_proxy_header(stream, &mut buf, &state.config, log.client, deadline).await;
        let result = match &outcome {
            Ok((_, result)) | Err((result, _, _)) => *result,
        };
        rt.metrics
            .proxy_inbound
            .with_label_values(&[listener, result])
            .inc();
        match outcome {
            Ok((Some(origin), _)) => {
                log.client = origin.client;
                local = origin.local;
            }
            Ok((None, _)) => {}
            Err((result, end, detail)) => {
                if result != "eof" {
                    tracing::warn!(conn = log.id, peer = %log.client, listener, reason = result, "{detail}");
                }
                log.end = end;
                log.detail = detail;
                return None;
            }
        }
    }
    let hello = read_hello(stream, &mut buf, state, deadline).await;
    let result = match &hello {
        Hello::Tls(_) => "ok",
        Hello::Plain => "not_tls",
        Hello::Rejected(result, _) => result,
    };
    rt.metrics
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
                tracing::warn!(conn = log.id, client = %log.client, listener, reason = result, "{detail}");
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
        rt.metrics
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
    rt.metrics
        .route_decisions
        .with_label_values(&[listener, route.name.as_str()])
        .inc();
    log.route = Some(route.clone());

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
        Target::Pool(pool) => pool.connect(log.client, sni, &first, &rt.metrics).await,
        Target::Resource(res) => {
            let hello = &first[first.len() - hello_len..];
            res.connect(log.client, sni, &first, hello, &info, &rt.metrics)
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
            log.end = CloseReason::BackendUnavailable;
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

/// How the establishing phase ended, when the connection goes on.
enum Established {
    /// Connected to a backend, the hello replayed: relay. The keepalive is not armed yet.
    Relay(TcpStream, Keepalive, Arc<Route>, ActiveGuard),
    /// A `serve = "heartbeat"` route: sluice terminates TLS itself; these bytes were read.
    Api(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::Names;

    #[test]
    fn names_are_inline_when_short_and_exact_either_way() {
        let short = "tunnel.example.com\nteleport-reversetunnelv2,teleport-reversetunnel";
        assert!(matches!(Names::new(short), Names::Inline { .. }));
        assert_eq!(Names::new(short).as_str(), short);
        let long = format!("{}.example.com\nh2", "a".repeat(200));
        assert!(matches!(Names::new(&long), Names::Boxed(_)));
        assert_eq!(Names::new(&long).as_str(), long);
        assert_eq!(Names::new("").as_str(), "");
    }
}
