//! The heartbeat API: HTTP/1.1 and HTTP/2 over TLS (rustls), on `[heartbeat] address` or
//! through the main port by a route with `serve = "heartbeat"` (ALPN `sluice-heartbeat`).
//!
//! Owns: authentication (bearer token or client certificate), request limits, the JSON shape
//! of a heartbeat, the streaming form (one heartbeat per line on one long request; when it
//! ends or breaks, the agent's records go at once), and goodbyes. Every refusal has a status,
//! a reason in the body and a count in `sluice_heartbeats_total{result}`. Never logs a token.
//! The same listener serves the version server agents' updaters ask (`versions`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::store::{Store, WriteError};
use super::Agents;
use crate::config::HeartbeatConfig;
use crate::observe::metrics::Metrics;
use crate::snapshot::{Snapshot, Snapshots};
use sluice_core::agents::auth::{find_token, Token};
use sluice_core::agents::heartbeat::{self, Limits};
pub use sluice_core::agents::heartbeat::{HeartbeatBody, ResourceBody};
use sluice_core::agents::table::{Applied, Heartbeat, Refused};

/// What the heartbeat API needs of the process: the narrow handle the runtime builds once.
pub struct Api {
    pub agents: Arc<Agents>,
    pub snapshots: Arc<Snapshots>,
    pub metrics: Metrics,
    /// Connection tasks (the API's own listener's), waited on during a drain.
    pub tracker: TaskTracker,
    /// Cancelled when a drain closes the listeners: streams are told to go elsewhere.
    pub accepting: CancellationToken,
    /// The end of a drain: every stream ends.
    pub close_all: CancellationToken,
    /// The addresses sluice's running listeners are bound to (agents may not announce them).
    pub bound: Box<dyn Fn() -> Vec<SocketAddr> + Send + Sync>,
}

impl Api {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load()
    }
}

/// A refused request: status, metric result, reason.
type Refusal = (StatusCode, &'static str, String);

/// Who is speaking.
struct Credential {
    owner: String,
    token: Option<Token>,
}

impl Credential {
    fn scoped(&self) -> bool {
        self.token.as_ref().is_some_and(Token::scoped)
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn authenticate(
    cfg: &HeartbeatConfig,
    req: &Request<Incoming>,
    cert: bool,
) -> Result<Credential, Refusal> {
    if let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) {
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        return match find_token(&cfg.tokens, secret.as_bytes()) {
            Some(t) => Ok(Credential {
                owner: t.name.clone(),
                token: Some(t.clone()),
            }),
            None => Err((
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown bearer token\n".into(),
            )),
        };
    }
    if cert {
        // rustls verified it against client_ca_file during the handshake.
        return Ok(Credential {
            owner: "cert".into(),
            token: None,
        });
    }
    Err((
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send Authorization: Bearer <token>, or a client certificate\n".into(),
    ))
}

/// Check a heartbeat against the limits, the credential's scope, and sluice's own addresses
/// (the rules are `sluice_core::agents::heartbeat::validate`).
fn validate(
    body: HeartbeatBody,
    cfg: &HeartbeatConfig,
    cred: &Credential,
    own: &[SocketAddr],
) -> Result<Heartbeat, Refusal> {
    let limits = Limits {
        default_ttl: cfg.default_ttl,
        max_ttl: cfg.max_ttl,
        max_resources: cfg.max_resources,
    };
    heartbeat::validate(body, &limits, cred.token.as_ref(), own).map_err(refusal)
}

/// The core's refusal as the HTTP layer sends it.
fn refusal(r: heartbeat::Refusal) -> Refusal {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, r.result, r.message)
}

/// Parse one heartbeat.
fn parse(text: &[u8]) -> Result<HeartbeatBody, Refusal> {
    heartbeat::parse(text).map_err(refusal)
}

/// The addresses agents may not announce: sluice's own listeners and APIs.
fn own_addresses(api: &Api) -> Vec<SocketAddr> {
    let snap = api.snapshot();
    let mut v: Vec<SocketAddr> = (api.bound)();
    v.extend(snap.config.admin.address);
    v.extend(snap.config.heartbeat.address);
    v.extend(
        snap.config
            .listeners
            .iter()
            .map(|l| l.address)
            .filter(|a| a.port() != 0),
    );
    v
}

/// The table's refusal as the HTTP layer sends it.
fn refused(e: Refused) -> Refusal {
    match e {
        Refused::Owned(_) | Refused::Static(_) => {
            (StatusCode::FORBIDDEN, "forbidden", format!("{e}\n"))
        }
        Refused::Full(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "table_full",
            format!("{e} (heartbeat.max_agents)\n"),
        ),
    }
}

/// A failed store write as the HTTP layer sends it: 503 and `store_unavailable` tell the
/// agent to try another edge.
fn write_error(e: WriteError) -> Refusal {
    match e {
        WriteError::Refused(r) => refused(r),
        WriteError::Unavailable(why) => {
            tracing::warn!(reason = %why, "heartbeat not stored");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("store_unavailable: {why}\n"),
            )
        }
    }
}

/// Validate and apply one heartbeat: the agent, what applying did, and the heartbeat's TTL.
async fn apply(
    api: &Api,
    cfg: &HeartbeatConfig,
    cred: &Credential,
    body: HeartbeatBody,
    stream: u64,
) -> Result<(String, Applied, Duration), Refusal> {
    let hb = validate(body, cfg, cred, &own_addresses(api))?;
    let id = hb.agent.clone();
    let ttl = Duration::from_millis(hb.ttl);
    let agents = &api.agents;
    let applied = match &agents.store {
        Store::Memory => agents
            .table
            .apply(
                hb,
                &cred.owner,
                cred.scoped(),
                stream,
                Agents::now(),
                &|id, a| agents.new_backend(id, a),
            )
            .map_err(refused)?,
        Store::Etcd(store) => store
            .heartbeat(
                hb,
                &cred.owner,
                cred.scoped(),
                (stream != 0).then_some(stream),
                cfg.max_agents,
            )
            .await
            .map_err(write_error)?,
    };
    if applied == Applied::Joined {
        tracing::info!(agent = %id, owner = %cred.owner, "agent joined");
    }
    Ok((id, applied, ttl))
}

/// Remove an agent (a goodbye, or `stream` ending); `Ok(false)`: no such agent.
async fn remove(
    api: &Api,
    id: &str,
    stream: Option<u64>,
    owner: Option<(&str, bool)>,
) -> Result<bool, Refusal> {
    match &api.agents.store {
        Store::Memory => api.agents.table.remove(id, stream, owner).map_err(refused),
        Store::Etcd(store) => store.remove(id, stream, owner).await.map_err(write_error),
    }
}

fn count(api: &Api, result: &str) {
    api.metrics.heartbeats.with_label_values(&[result]).inc();
}

fn refuse(api: &Api, (status, result, message): Refusal) -> Response<Full<Bytes>> {
    count(api, result);
    tracing::debug!(result, %status, reason = message.trim_end(), "heartbeat refused");
    reply(status, message)
}

/// Whether this edge takes heartbeats now (`GET /readyz` here, `/readyz/heartbeat` on the
/// admin API): not while draining, nor while the shared store is unreachable or not yet
/// listed (agents should heartbeat to another edge).
pub fn readiness(api: &Api) -> Result<(), &'static str> {
    if api.accepting.is_cancelled() {
        return Err("draining");
    }
    match &api.agents.store {
        Store::Etcd(e) if !e.listed() => {
            Err("store_unavailable (the first list of the heartbeat store is not done)")
        }
        Store::Etcd(e) if !e.connected() => {
            Err("store_unavailable (the heartbeat store is unreachable)")
        }
        _ => Ok(()),
    }
}

/// Route one request.
async fn handle(
    api: Arc<Api>,
    req: Request<Incoming>,
    cert: bool,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    let snap = api.snapshot();
    let cfg = &snap.config.heartbeat;
    let path = req.uri().path().to_owned();
    if let Some(asked) = sluice_core::agents::versions::parse_path(&path) {
        // The version server: unauthenticated (updaters send no credential), rate limited.
        return match (req.method(), asked) {
            (&Method::GET, Ok((channel, endpoint))) => {
                let (status, body) = api
                    .agents
                    .versions
                    .answer(&snap.config, peer, channel, endpoint)
                    .await;
                reply(status, body)
            }
            (&Method::GET, Err(())) => reply(
                StatusCode::NOT_FOUND,
                "GET /v1/webapi/automaticupgrades/channel/<channel>/version or .../critical\n",
            ),
            _ => reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
        };
    }
    if req.method() == Method::GET && path == "/readyz" {
        // Unauthenticated: a load balancer's health check of the heartbeat port.
        return match readiness(&api) {
            Ok(()) => reply(StatusCode::OK, "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        };
    }
    let known = matches!(
        (req.method(), path.as_str()),
        (&Method::POST, "/v1/heartbeats") | (&Method::POST, "/v1/heartbeats/stream")
    ) || (req.method() == Method::DELETE && path.starts_with("/v1/agents/"));
    if !known {
        return reply(
            StatusCode::NOT_FOUND,
            "POST /v1/heartbeats, POST /v1/heartbeats/stream, DELETE /v1/agents/{id}, GET /readyz, \
             GET /v1/webapi/automaticupgrades/channel/<channel>/version|critical\n",
        );
    }
    let cred = match authenticate(cfg, &req, cert) {
        Ok(c) => c,
        Err(r) => return refuse(&api, r),
    };
    if req.method() == Method::DELETE {
        let id = path.trim_start_matches("/v1/agents/");
        return match remove(&api, id, None, Some((&cred.owner, cred.scoped()))).await {
            Ok(true) => {
                count(&api, "goodbye");
                tracing::info!(agent = %id, owner = %cred.owner, "agent said goodbye");
                reply(StatusCode::OK, "removed\n")
            }
            Ok(false) => reply(StatusCode::NOT_FOUND, format!("no agent `{id}`\n")),
            Err(r) => refuse(&api, r),
        };
    }
    if path == "/v1/heartbeats" {
        let http1 = req.version() < hyper::Version::HTTP_2;
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut body = req.into_body();
        let too_large = || {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "body over {} bytes (heartbeat.max_body_bytes)\n",
                    cfg.max_body_bytes
                ),
            )
        };
        // A declared length over the limit is refused before its body is read.
        if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
            return too_large_now(&api, http1, too_large());
        }
        let body = match Limited::new(&mut body, cfg.max_body_bytes).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return too_large_now(&api, http1, too_large());
            }
            Err(e) => {
                return refuse(
                    &api,
                    (
                        StatusCode::BAD_REQUEST,
                        "malformed",
                        format!("reading the body: {e}\n"),
                    ),
                )
            }
        };
        let result = match parse(&body) {
            Ok(b) => apply(&api, cfg, &cred, b, 0).await,
            Err(r) => Err(r),
        };
        return match result {
            Ok((_, applied, _)) => {
                count(&api, "ok");
                reply(StatusCode::OK, format!("{applied:?}\n").to_lowercase())
            }
            Err(r) => refuse(&api, r),
        };
    }
    drop(snap);
    stream(api.clone(), cred, req.into_body()).await
}

/// Answer 413 while the client may still be uploading, and close (over HTTP/1.1 the rest of
/// the body is never read, so the connection cannot carry another request); the close
/// lingers (`net::Linger`) so that the client reads the answer instead of a reset.
fn too_large_now(api: &Api, http1: bool, refusal: Refusal) -> Response<Full<Bytes>> {
    let mut resp = refuse(api, refusal);
    if http1 {
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// Removes the stream's agent when the stream ends, however it ends (the handler returning,
/// or hyper dropping it because the connection broke).
struct StreamOwner {
    api: Arc<Api>,
    agent: Option<String>,
    stream: u64,
}

impl Drop for StreamOwner {
    fn drop(&mut self) {
        let Some(id) = self.agent.take() else { return };
        let (api, stream) = (self.api.clone(), self.stream);
        let ended = |api: &Api, id: &str| {
            count(api, "stream_ended");
            tracing::info!(agent = %id, "heartbeat stream ended: the agent's records are gone");
        };
        match &api.agents.store {
            Store::Memory => {
                if let Ok(true) = api.agents.table.remove(&id, Some(stream), None) {
                    ended(&api, &id);
                }
            }
            // This edge is draining: the agent reconnects to another edge, which takes the
            // record over; deleting it would make every edge forget the agent meanwhile. Its
            // lease removes it if it does not come back.
            Store::Etcd(_) if api.accepting.is_cancelled() => {
                tracing::info!(agent = %id, "heartbeat stream closed by the drain: the record stays for its lease");
            }
            Store::Etcd(_) => {
                tokio::spawn(async move {
                    match remove(&api, &id, Some(stream), None).await {
                        Ok(true) => ended(&api, &id),
                        Ok(false) => {}
                        Err((_, _, why)) => {
                            tracing::warn!(agent = %id, reason = why.trim_end(), "heartbeat stream ended but its record could not be removed: it goes with its lease");
                        }
                    }
                });
            }
        }
    }
}

/// `POST /v1/heartbeats/stream`: newline-delimited heartbeats of one agent.
///
/// Each line is checked against the config running *now*: a token removed or narrowed by a
/// reload ends the streams it authenticated. The stream also ends when sluice starts to
/// drain (so agents reconnect to the process that stays), and when no line arrives within
/// the agent's TTL (its records would have expired anyway).
async fn stream(api: Arc<Api>, cred: Credential, mut body: Incoming) -> Response<Full<Bytes>> {
    let mut owner = StreamOwner {
        api: api.clone(),
        agent: None,
        stream: api.agents.next_stream(),
    };
    let mut cred = cred;
    let mut pending: Vec<u8> = Vec::new();
    let mut scanned = 0usize;
    let mut applied = 0u64;
    let mut ttl = api.snapshot().config.heartbeat.default_ttl;
    let draining = api.accepting.clone();
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(ttl, body.frame()) => f,
            _ = draining.cancelled() => {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sluice is draining: reconnect (to the process that takes over)\n",
                );
            }
        };
        let frame = match frame {
            Err(_) => {
                return refuse(
                    &api,
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        "stream_idle",
                        format!("no heartbeat for {ttl:?} (the agent's ttl)\n"),
                    ),
                )
            }
            Ok(None) => break,
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "heartbeat stream broke");
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        let snap = api.snapshot();
        let cfg = &snap.config.heartbeat;
        // Only the new bytes are searched; consumed lines are dropped once per frame.
        let mut start = 0;
        while let Some(nl) = pending[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + nl;
            scanned = end + 1;
            if end - start > cfg.max_body_bytes {
                // A whole line that came in one frame is held to the same limit as one
                // still arriving.
                return refuse(&api, line_too_large(cfg.max_body_bytes));
            }
            let line = pending[start..end].trim_ascii();
            start = scanned;
            if line.is_empty() {
                continue;
            }
            if let Err(r) = recheck(cfg, &mut cred) {
                return refuse(&api, r);
            }
            let parsed = match parse(line) {
                Ok(b) => b,
                Err(r) => return refuse(&api, r),
            };
            if owner.agent.as_deref().is_some_and(|a| a != parsed.agent) {
                return refuse(
                    &api,
                    (
                        StatusCode::BAD_REQUEST,
                        "malformed",
                        "one stream carries one agent's heartbeats\n".into(),
                    ),
                );
            }
            match apply(&api, cfg, &cred, parsed, owner.stream).await {
                Ok((id, _, hb_ttl)) => {
                    ttl = hb_ttl.max(Duration::from_secs(1));
                    owner.agent = Some(id);
                    applied += 1;
                    count(&api, "ok");
                }
                Err(r) => return refuse(&api, r),
            }
        }
        pending.drain(..start);
        scanned -= start;
        if pending.len() > cfg.max_body_bytes {
            return refuse(&api, line_too_large(cfg.max_body_bytes));
        }
    }
    drop(owner);
    reply(
        StatusCode::OK,
        format!("stream ended after {applied} heartbeats\n"),
    )
}

/// A stream line over `heartbeat.max_body_bytes`.
fn line_too_large(max: usize) -> Refusal {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("a line over {max} bytes (heartbeat.max_body_bytes)\n"),
    )
}

/// A token credential against the running config: still there (its scope as configured
/// now), or the stream it authenticated ends.
fn recheck(cfg: &HeartbeatConfig, cred: &mut Credential) -> Result<(), Refusal> {
    let Some(t) = &cred.token else {
        return Ok(());
    };
    match sluice_core::agents::auth::token_by_digest(&cfg.tokens, &t.digest) {
        Some(t) => {
            cred.owner = t.name.clone();
            cred.token = Some(t.clone());
            Ok(())
        }
        None => Err((
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the token of this stream was removed by a reload\n".into(),
        )),
    }
}

/// Bytes already read from a socket (the ClientHello sluice peeked at), then the socket.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a heartbeat API connection ended early (the access log's detail).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the heartbeat API has no certificate configured")]
    NoCertificate,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake took over 10s")]
    HandshakeTimeout,
    #[error("heartbeat API connection: {0}")]
    Http(Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// Whose fault it was, for labels.
    pub fn class(&self) -> sluice_core::close::ErrorClass {
        use sluice_core::close::ErrorClass;
        match self {
            ApiError::NoCertificate => ErrorClass::Config,
            _ => ErrorClass::Client,
        }
    }
}

/// Terminate TLS on `io` and serve the API until the client leaves or sluice closes its
/// connections; `peer` is the client's address (after a trusted PROXY header), the key of
/// the version server's rate limit. `Err` says why the connection ended early (for the
/// access log).
pub async fn serve_tls<IO>(api: Arc<Api>, io: IO, peer: IpAddr) -> Result<(), ApiError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(tls) = api.snapshot().config.heartbeat.tls.clone() else {
        return Err(ApiError::NoCertificate);
    };
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(io);
    let stream = match tokio::time::timeout(Duration::from_secs(10), accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            count(&api, "tls_error");
            return Err(ApiError::Handshake(e));
        }
        Err(_) => {
            count(&api, "tls_error");
            return Err(ApiError::HandshakeTimeout);
        }
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let stream = crate::net::Linger::new(stream);
    let linger = stream.linger.clone();
    // Idle connections close: an agent keeps requests in flight (a stream) or reconnects;
    // anyone else holding a TLS connection open without a request is let go.
    let inflight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last = Arc::new(AtomicU64::new(Agents::now()));
    let api2 = api.clone();
    let (inflight2, last2) = (inflight.clone(), last.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (api, inflight, last) = (api2.clone(), inflight2.clone(), last2.clone());
        let linger = linger.clone();
        async move {
            inflight.fetch_add(1, Ordering::Relaxed);
            let resp = handle(api, req, cert, peer).await;
            if resp
                .headers()
                .get(hyper::header::CONNECTION)
                .is_some_and(|v| v == "close")
            {
                // A refused upload: let the client read the answer before the socket closes.
                linger.store(true, Ordering::Relaxed);
            }
            inflight.fetch_sub(1, Ordering::Relaxed);
            last.store(Agents::now(), Ordering::Relaxed);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut shutting = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(ApiError::Http),
            // Draining (or handing over to a new binary): streams end themselves with 503.
            _ = api.accepting.cancelled(), if !shutting => {
                shutting = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = api.close_all.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let idle = Agents::now().saturating_sub(last.load(Ordering::Relaxed));
                if inflight.load(Ordering::Relaxed) == 0 && idle >= IDLE_MS {
                    return Ok(());
                }
            }
        }
    }
}

/// A heartbeat API connection with no request in flight for this long is closed.
const IDLE_MS: u64 = 15_000;

/// Serve the API on its own listener (`[heartbeat] address`) until `stop`.
pub async fn listen(api: Arc<Api>, listener: Arc<TcpListener>, stop: CancellationToken) {
    let cap = sluice_core::fds::Budget {
        nofile: crate::net::nofile(),
    }
    .heartbeat_connections();
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    // At the cap, connections wait in the kernel's backlog.
    while let Some((permit, stream, peer)) =
        crate::net::accept_capped(&listener, &slots, &stop, "heartbeat", |ip| {
            let ok = api.snapshot().config.heartbeat.allow.permits(ip);
            if !ok {
                let denied = api
                    .metrics
                    .access_denied
                    .with_label_values(&["heartbeat", "heartbeat"]);
                denied.inc();
            }
            ok
        })
        .await
    {
        let _ = stream.set_nodelay(true);
        let _ = crate::net::apply_keepalive(
            &socket2::SockRef::from(&stream),
            &crate::config::Keepalive::DEFAULT,
        );
        let api2 = api.clone();
        api.tracker.spawn(async move {
            if let Err(e) = serve_tls(api2, stream, peer.ip()).await {
                tracing::debug!(%peer, error = %e, "heartbeat connection ended");
            }
            drop(permit);
        });
    }
}
