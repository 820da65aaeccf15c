//! The admin HTTP API (HTTP/1.1 and h2c): metrics, health, readiness, debug views.
//!
//! Owns: request routing for the admin port and the JSON shapes of the debug views. It reads
//! runtime state and never changes routing. Binds to 127.0.0.1 by default: it exposes the
//! config and must not face the internet.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::runtime::{Runtime, State};

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The status page (`/status`): static HTML, CSS and a script over the JSON endpoints, built
/// into the binary (no external asset: it works offline). Nothing but this origin may be
/// loaded by it.
fn status_asset(path: &str) -> Option<Response<Body>> {
    let (content_type, body) = match path {
        "/status" => (
            "text/html; charset=utf-8",
            include_str!("status/status.html"),
        ),
        "/status.js" => (
            "text/javascript; charset=utf-8",
            include_str!("status/status.js"),
        ),
        "/status.css" => ("text/css; charset=utf-8", include_str!("status/status.css")),
        _ => return None,
    };
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("content-security-policy", "default-src 'self'")
        .header("x-content-type-options", "nosniff")
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(body.as_bytes())));
    resp.ok()
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode: {e}\n"),
        ),
    }
}

/// `/debug/agents`, optionally `?q=TEXT` (a filter) and `?limit=N`: the JSON array of the
/// agents asked for, with `X-Total-Count` (agents in the table) and `X-Matching-Count`
/// (agents the filter matches) headers, so a client can show a page of a large table.
fn agents_page(rt: &Runtime, query: &str) -> Response<Body> {
    let (mut q, mut limit) = (String::new(), None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "q" => q = value.into_owned(),
            "limit" => match value.parse::<usize>() {
                Ok(n) => limit = Some(n),
                Err(_) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("limit must be a whole number, not `{value}`\n"),
                    )
                }
            },
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown parameter `{key}`: /debug/agents takes q and limit\n"),
                )
            }
        }
    }
    let page = rt.agents.agents_page(&rt.snapshot().config, &q, limit);
    let mut response = json(&page.agents);
    let headers = response.headers_mut();
    headers.insert("x-total-count", page.total.into());
    headers.insert("x-matching-count", page.matching.into());
    response
}

#[derive(Serialize)]
struct ListenerView {
    name: String,
    /// `tcp` or `quic`.
    protocol: &'static str,
    configured: SocketAddr,
    bound: SocketAddr,
    max_connections: Option<usize>,
    available_slots: Option<usize>,
    /// QUIC: flows open now, the cap, and whether new flows are taken (false once a reload
    /// removed or moved the listener: it serves its flows until they are idle).
    #[serde(skip_serializing_if = "Option::is_none")]
    flows: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_flows: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accepting: Option<bool>,
}

#[derive(Serialize)]
struct RouteView<'a> {
    name: &'a str,
    #[serde(rename = "match")]
    matcher: &'a sluice_core::route::Match,
    pool: &'a str,
    target: Option<&'a crate::config::RouteTarget>,
    idle_timeout: String,
    active: i64,
}

/// `/debug/rollout`: the table's versions, and each channel's target (a forwarded channel may
/// ask its upstream, as an updater's request would).
pub async fn rollout(rt: &Runtime) -> sluice_core::agents::rollout::Rollout {
    let snap = rt.snapshot();
    let mut view = rt.agents.rollout(&snap.config);
    view.channels = rt.agents.versions.channels(&snap.config, &rt.agents).await;
    view
}

pub fn handle(rt: &Runtime, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is supported here\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            rt.agents.export(&rt.snapshot().config, &rt.metrics);
            rt.metrics.mirror_relay(
                crate::edge::splice::open_pipes(),
                crate::edge::splice::spliced_bytes(),
                crate::edge::splice::unavailable(),
            );
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                rt.metrics.render(),
            )
        }
        "/debug/agents" => agents_page(rt, req.uri().query().unwrap_or("")),
        "/debug/resources" => json(&rt.agents.resources_view(&rt.snapshot().config)),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz/heartbeat" => match crate::agents::api::readiness(&rt.api) {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/debug/store" => json(&rt.agents.store.view(rt.agents.table.agent_count())),
        "/readyz" => match rt.state() {
            // Routing from half a table would send clients to `unknown_resource`.
            State::Ready if !rt.agents.store.listed() => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: the heartbeat store has not been listed yet\n",
            ),
            State::Ready => reply(StatusCode::OK, "text/plain", "ready\n"),
            s => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", serde_json::to_string(&s).unwrap_or_default()),
            ),
        },
        "/debug/config" => json(&*rt.snapshot().config),
        "/debug/routes" => {
            let snap = rt.snapshot();
            let views: Vec<RouteView<'_>> = snap
                .routes
                .iter()
                .map(|(m, r)| RouteView {
                    name: &r.name,
                    matcher: m,
                    pool: r.pool_name(),
                    target: snap
                        .config
                        .routes
                        .iter()
                        .find(|c| c.name == r.name)
                        .map(|c| &c.target),
                    idle_timeout: r
                        .idle_timeout
                        .map(|d| humantime::format_duration(d).to_string())
                        .unwrap_or_else(|| "0s".into()),
                    active: r.active.get(),
                })
                .collect();
            json(&views)
        }
        "/debug/pools" => {
            let snap = rt.snapshot();
            let views: Vec<_> = snap.pools.values().map(|p| p.view()).collect();
            json(&views)
        }
        "/debug/process" => {
            let snap = rt.snapshot();
            json(&serde_json::json!({
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "state": rt.state(),
                "uptime_seconds": rt.started.elapsed().as_secs_f64(),
                "config_files": snap.config.files,
                "config_hash": snap.config.hash,
                "connections": rt.tracker.len(),
            }))
        }
        "/debug/listeners" => {
            let views: Vec<ListenerView> = rt
                .listener_states()
                .iter()
                .map(|l| ListenerView {
                    name: l.config.name.clone(),
                    protocol: "tcp",
                    configured: l.config.address,
                    bound: l.local_addr,
                    max_connections: l.config.max_connections,
                    available_slots: l.permits.as_ref().map(|p| p.available_permits()),
                    flows: None,
                    max_flows: None,
                    accepting: None,
                })
                .chain(rt.quic_listeners().iter().map(|q| {
                    let cfg = q.config.load();
                    ListenerView {
                        name: cfg.name.clone(),
                        protocol: "quic",
                        configured: cfg.address,
                        bound: q.local_addr,
                        max_connections: None,
                        available_slots: None,
                        flows: Some(q.flow_count()),
                        max_flows: Some(cfg.quic.max_flows),
                        accepting: Some(q.is_accepting()),
                    }
                }))
                .collect();
            json(&views)
        }
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "sluice admin: /status (the status page) /metrics /healthz /readyz /debug/config /debug/routes /debug/pools /debug/listeners /debug/process /debug/agents /debug/resources /debug/rollout /debug/store /readyz/heartbeat, POST /-/reload\n",
        ),
        path => status_asset(path)
            .unwrap_or_else(|| reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")),
    }
}

/// `POST /-/reload`: reload the config files now; 200 with the summary, 400 with the
/// config errors (the running config stays).
async fn reload(rt: &Arc<Runtime>, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST /-/reload\n",
        );
    }
    match crate::control::reload::reload(rt, "POST /-/reload").await {
        crate::control::reload::Outcome::Applied(summary) => json(&summary),
        crate::control::reload::Outcome::Unchanged => {
            reply(StatusCode::OK, "text/plain", "unchanged\n")
        }
        crate::control::reload::Outcome::Rejected(errors) => reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("reload rejected; the running config stays:\n{errors}\n"),
        ),
    }
}

/// Admin connections served at once: 512, less with a small open-file limit (the budget of
/// `sluice_core::fds` counts them). At the cap, new ones wait in the listen backlog until a
/// slot frees (idle and slow connections free theirs within seconds).
fn budget_connections() -> usize {
    sluice_core::fds::Budget {
        nofile: crate::net::nofile(),
    }
    .admin_connections()
}

/// A connection must send a complete request head within this long (a slowloris is closed).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no request in flight for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST /-/pools/{pool}/backends/{backend}/drain` (or `/undrain`): the backend (by its name
/// as configured, or its address) takes no new connection and keeps its established ones,
/// until undrained; it stays drained across reloads while it stays in the config. A backend
/// with `weight = 0` is drained by the config and cannot be undrained here.
fn drain_backend(rt: &Runtime, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST /-/pools/{pool}/backends/{backend}/drain or /undrain\n",
        );
    }
    let rest = req.uri().path().trim_start_matches("/-/pools/");
    let parts: Vec<&str> = rest.split('/').collect();
    let [pool, "backends", backend, action] = parts[..] else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "POST /-/pools/{pool}/backends/{backend}/drain or /undrain\n",
        );
    };
    let drain = match action {
        "drain" => true,
        "undrain" => false,
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "the action is drain or undrain\n",
            )
        }
    };
    let snap = rt.snapshot();
    let Some(p) = snap.pools.get(pool) else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no pool `{pool}`\n"),
        );
    };
    let list = p.backends();
    let Some(b) = list
        .iter()
        .find(|b| b.name == backend || b.address.to_string() == backend)
    else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("pool `{pool}` has no backend `{backend}`\n"),
        );
    };
    if !drain && b.weight() == 0 {
        return reply(
            StatusCode::CONFLICT,
            "text/plain",
            format!("`{backend}` has weight = 0 in the config: change the config to undrain it\n"),
        );
    }
    b.set_drained(drain);
    tracing::info!(pool, backend = %b.name, drained = drain, "backend drain changed through the admin API");
    let state = if drain { "draining" } else { "undrained" };
    reply(
        StatusCode::OK,
        "text/plain",
        format!(
            "{pool} {}: {state} ({} connections open)\n",
            b.name,
            b.active()
        ),
    )
}

/// Serve the admin API on `listener` until `stop` fires.
pub async fn serve(rt: Arc<Runtime>, listener: Arc<TcpListener>, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(budget_connections()));
    while let Some((permit, stream, _)) =
        crate::net::accept_capped(&listener, &slots, &stop, "admin", |ip| {
            let ok = rt.snapshot().config.admin.allow.permits(ip);
            if !ok {
                let denied = rt
                    .metrics
                    .access_denied
                    .with_label_values(&["admin", "admin"]);
                denied.inc();
            }
            ok
        })
        .await
    {
        let rt = rt.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Requests in flight, and when the last one ended (or the connection opened).
            let activity = Arc::new(Activity::default());
            let seen = activity.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (rt, seen) = (rt.clone(), seen.clone());
                async move {
                    let _busy = seen.start();
                    let path = req.uri().path();
                    let resp = if path == "/-/reload" {
                        reload(&rt, &req).await
                    } else if path.starts_with("/-/pools/") {
                        drain_backend(&rt, &req)
                    } else if path == "/debug/rollout"
                        && matches!(*req.method(), Method::GET | Method::HEAD)
                    {
                        json(&rollout(&rt).await)
                    } else {
                        handle(&rt, &req)
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "admin connection error");
                        }
                        return;
                    }
                    _ = tick.tick() => {
                        // No request yet within HEADER_TIMEOUT (any protocol, before hyper
                        // knows which), or idle past IDLE_TIMEOUT: close.
                        if let Some(idle) = activity.idle() {
                            let limit = if activity.served() { IDLE_TIMEOUT } else { HEADER_TIMEOUT };
                            if idle >= limit {
                                return;
                            }
                        }
                    }
                }
            }
        });
    }
}

/// What an admin connection is doing: requests in flight, and since when it has been idle.
struct Activity {
    inflight: std::sync::atomic::AtomicUsize,
    served: std::sync::atomic::AtomicBool,
    idle_since: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            inflight: Default::default(),
            served: Default::default(),
            idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Activity {
    /// A request starts; the guard marks its end.
    fn start(self: &Arc<Self>) -> Busy {
        use std::sync::atomic::Ordering::Relaxed;
        self.inflight.fetch_add(1, Relaxed);
        self.served.store(true, Relaxed);
        Busy(self.clone())
    }

    /// How long no request has been in flight; `None` while one is.
    fn idle(&self) -> Option<Duration> {
        if self.inflight.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(since.elapsed())
    }

    fn served(&self) -> bool {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
