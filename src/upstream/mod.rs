//! Upstream: pools of backends, and connecting to one of them.
//!
//! Owns: per-backend state that outlives a single connection (active connection count, used by
//! least_conn and p2c), the connect-with-retry loop, and the socket options of the backend leg.
//! A connect is retried on another backend because nothing but the buffered hello is pending:
//! no byte has reached any backend yet. It never retries once a backend accepted bytes (the
//! connect's speculative first write, see `connect_one`). Health checks (`health`) and DNS
//! discovery (`discovery`) change which backends a pool has and which of them are eligible.

pub mod discovery;
pub mod health;
mod series;

use series::{BackendSeries, SeriesUse, SeriesUsers};

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, Ejection, HealthCheck, Keepalive, PoolConfig, ProxyProtocol};
use crate::observe::metrics::Metrics;
use sluice_core::agents::Endpoint;
use sluice_core::balance::{fnv1a, Balance, Candidate, HashKey, PickContext};
use sluice_core::eligibility::{self, EjectionRule, Failure, Outlier, Standing};

/// One backend address. Shared by every connection using it, and by successive snapshots:
/// a reload that keeps a backend keeps this object (its active count, its ready time).
#[derive(Debug)]
pub struct Backend {
    /// As configured (`proxy-1:3024`); also the metric label.
    pub name: String,
    pub address: SocketAddr,
    weight: AtomicU32,
    id: u64,
    active: AtomicU64,
    /// Its per-backend series; none for agents (their number is unbounded, so they are not
    /// metric labels).
    series: Option<BackendSeries>,
    /// Its per-backend series, deleted when the last backend object of that (pool, name) is
    /// gone (a reload removed it and its connections ended, or DNS stopped answering it).
    _series: Option<SeriesUse>,
    /// It takes new connections from this moment on (the pool's `min_ready` after it appeared).
    ready_at: Instant,
    /// False once a reload removed it: it takes no new connections.
    in_service: AtomicBool,
    /// Drained at run time (the admin API): no new connections, established ones kept.
    drained: AtomicBool,
    /// Bumped on each removal and return, so a delayed close applies only to its own removal.
    /// Removal, return and the delayed close change `in_service`/`retire` under this lock.
    generation: Mutex<u64>,
    /// Fires when its established connections must close (`removed_drain_timeout`, or the end
    /// of a drain: it is a child of the runtime's close token).
    pub retire: CancellationToken,
    /// Passive ejection: failures in a row, ejected until when (ms on `epoch()`).
    outlier: Outlier,
    /// The active health checks' verdict (`Health` as u8).
    health: AtomicU8,
}

/// An active health check's verdict on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No verdict yet (or no checks): eligible.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }
}

/// The process's reference instant for times kept in atomics.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ms_since_epoch(t: Instant) -> u64 {
    sluice_core::clock::millis_since(epoch(), t)
}

/// Milliseconds on the process clock (the agent table keeps its times this way).
pub fn clock_ms(t: Instant) -> u64 {
    ms_since_epoch(t)
}

impl Endpoint for Backend {
    fn address(&self) -> SocketAddr {
        self.address
    }
    fn active(&self) -> u64 {
        Backend::active(self)
    }
}

impl Backend {
    /// The dial target of a heartbeat agent: named by the agent id, ready at once (the agent
    /// table applies its own `min_ready`), closed with the process (`retire`).
    pub fn for_agent(id: &str, address: SocketAddr, retire: CancellationToken) -> Arc<Backend> {
        Arc::new(Backend {
            name: id.to_owned(),
            address,
            weight: AtomicU32::new(1),
            id: fnv1a(id.as_bytes()),
            active: AtomicU64::new(0),
            series: None,
            _series: None,
            ready_at: epoch(),
            in_service: AtomicBool::new(true),
            drained: AtomicBool::new(false),
            generation: Mutex::new(0),
            retire,
            outlier: Outlier::default(),
            health: AtomicU8::new(Health::Unknown as u8),
        })
    }

    /// One more connection on it until the guard drops (agents are dialled outside a pool).
    pub fn guard(self: &Arc<Self>) -> ActiveGuard {
        ActiveGuard::new(self.clone())
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Past its `min_ready`.
    pub fn is_ready(&self, now: Instant) -> bool {
        now >= self.ready_at
    }

    /// Drained: at run time, or by `weight = 0` in the config.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed) || self.weight() == 0
    }

    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Ordering::Relaxed);
        if let Some(s) = &self.series {
            s.draining.set(self.drained() as i64);
        }
    }

    pub fn in_service(&self) -> bool {
        self.in_service.load(Ordering::Acquire)
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    /// Record a verdict; returns the previous one.
    pub fn set_health(&self, h: Health) -> Health {
        Health::from_u8(self.health.swap(h as u8, Ordering::AcqRel))
    }

    /// Time left of its passive ejection (zero when not ejected).
    pub fn ejected_for(&self, now: Instant) -> Duration {
        self.outlier.ejected_for(ms_since_epoch(now))
    }

    fn connected(&self) {
        self.outlier.succeeded(ms_since_epoch(Instant::now()));
        if let Some(s) = &self.series {
            s.connections.inc();
        }
    }

    /// A connection through it ended, having moved these bytes (counted at the end, once).
    pub fn moved(&self, to_backend: u64, to_client: u64) {
        if let Some(s) = &self.series {
            s.bytes_to_backend.inc_by(to_backend);
            s.bytes_to_client.inc_by(to_client);
        }
    }

    /// A reload removed it: no new connections; after `drain`, close the established ones.
    pub fn remove(self: &Arc<Self>, drain: Option<Duration>) {
        let generation = {
            let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
            self.in_service.store(false, Ordering::Release);
            *g += 1;
            *g
        };
        let Some(drain) = drain else { return };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            let Some(b) = me.upgrade() else { return };
            let g = b.generation.lock().unwrap_or_else(|e| e.into_inner());
            if *g == generation && !b.in_service() {
                tracing::info!(backend = %b.name, connections = b.active(),
                    "removed_drain_timeout passed: closing the removed backend's connections");
                b.retire.cancel();
                RETIREMENTS.fetch_add(1, Ordering::Release);
            }
        });
    }
}

/// Bumped after a backend retires on its own (`remove`, once `removed_drain_timeout` passed;
/// the end of a drain closes everything through the parent token instead). The parking lot
/// checks its connections' backends only when this moved, not on every sweep. Process-wide:
/// a bump from another runtime in the same process (tests) costs a lot one needless check.
static RETIREMENTS: AtomicU64 = AtomicU64::new(0);

/// How many backends have retired in this process so far (see `RETIREMENTS`).
pub fn retirements() -> u64 {
    RETIREMENTS.load(Ordering::Acquire)
}

/// Every live backend object, keyed by (pool, address), so a reload finds the ones it keeps.
pub struct Backends {
    map: Mutex<HashMap<(String, SocketAddr), Weak<Backend>>>,
    series: SeriesUsers,
    /// Parent of every backend's `retire` token.
    close_all: CancellationToken,
}

impl Backends {
    pub fn new(close_all: CancellationToken) -> Backends {
        epoch();
        Backends {
            map: Mutex::new(HashMap::new()),
            series: Default::default(),
            close_all,
        }
    }

    /// The backend object for `b` in `pool`: the live one if there is one (updated to the new
    /// weight, back in service), else a new one, ready at once or after the pool's
    /// `min_ready` (`warm`: it appears in a running process).
    pub fn obtain(
        &self,
        pool: &PoolConfig,
        b: &BackendConfig,
        metrics: &Metrics,
        warm: bool,
    ) -> Arc<Backend> {
        let key = (pool.name.clone(), b.address);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
            let mut g = existing
                .generation
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !existing.retire.is_cancelled() {
                existing.weight.store(b.weight, Ordering::Relaxed);
                if let Some(s) = &existing.series {
                    s.draining.set(existing.drained() as i64);
                }
                if !existing.in_service.swap(true, Ordering::AcqRel) {
                    *g += 1;
                }
                drop(g);
                return existing;
            }
        }
        let backend = Arc::new(Backend {
            name: b.name.clone(),
            address: b.address,
            weight: AtomicU32::new(b.weight),
            id: fnv1a(b.address.to_string().as_bytes()),
            active: AtomicU64::new(0),
            series: Some(BackendSeries::new(metrics, &pool.name, &b.name)),
            _series: Some(SeriesUse::new(
                &self.series,
                metrics,
                (pool.name.clone(), b.name.clone()),
            )),
            ready_at: Instant::now() + if warm { pool.min_ready } else { Duration::ZERO },
            in_service: AtomicBool::new(true),
            drained: AtomicBool::new(false),
            generation: Mutex::new(0),
            retire: self.close_all.child_token(),
            outlier: Outlier::default(),
            health: AtomicU8::new(Health::Unknown as u8),
        });
        if let Some(s) = &backend.series {
            s.draining.set(backend.drained() as i64);
        }
        map.insert(key, Arc::downgrade(&backend));
        map.retain(|_, w| w.strong_count() > 0);
        backend
    }
}

/// Holds one active-connection count on a backend for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    fn new(b: Arc<Backend>) -> Self {
        b.active.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = b.series.as_ref().map(|s| &s.active) {
            g.inc();
        }
        ActiveGuard(b)
    }
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(g) = self.0.series.as_ref().map(|s| &s.active) {
            g.dec();
        }
    }
}

/// DNS discovery's last good addresses per name, keyed as the config writes the name.
pub type Discovered = HashMap<String, Vec<SocketAddr>>;

pub struct Pool {
    pub name: String,
    /// The configured backends, plus those DNS discovery found (swapped as answers change).
    backends: ArcSwap<Vec<Arc<Backend>>>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub proxy_protocol: ProxyProtocol,
    pub keepalive: Keepalive,
    pub removed_drain_timeout: Option<Duration>,
    pub ejection: Option<Ejection>,
    pub health: Option<HealthCheck>,
    pub fail_open: bool,
    /// Stops this pool's DNS discovery (a reload replaced the pool).
    pub discovery_stop: CancellationToken,
    /// DNS discovery's last good answer per name, which a reload carries over.
    discovered: Mutex<Discovered>,
    rr: AtomicU64,
    ejections: prometheus::IntCounterVec,
    connect_seconds: Histogram,
    unavailable: IntCounter,
}

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("pool {pool} has no backend left to try after {attempts} attempt(s): {last}")]
    Exhausted {
        pool: String,
        attempts: u32,
        last: String,
    },
    /// A resource route found no agent (the reason is the miss metric's label).
    #[error("{reason}: {detail}")]
    NoAgent {
        reason: &'static str,
        detail: String,
    },
    /// sluice itself is out of descriptors or memory: not the backend's fault (no failure
    /// counted against it, no ejection, no other backend tried).
    #[error("no local resources to open a connection: {0} (see limits.max_connections and the open-file limit)")]
    LocalResources(String),
}

#[derive(Serialize)]
pub struct BackendView {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub active: u64,
    /// Active checks' verdict: unknown (no checks, or none yet), healthy, unhealthy.
    pub health: Health,
    /// "unhealthy", "ejected", "warming" until the pool's `min_ready` has passed, or "ready".
    pub state: &'static str,
    /// Seconds until it takes new connections (0 when ready).
    pub ready_in_seconds: f64,
    /// Seconds left of a passive ejection (0 when not ejected).
    pub ejected_for_seconds: f64,
}

#[derive(Serialize)]
pub struct PoolView<'a> {
    pub name: &'a str,
    pub balance: Balance,
    pub backends: Vec<BackendView>,
}

impl Pool {
    /// `warm`: backends new to this process wait for the pool's `min_ready` (a reload); at
    /// startup every backend is ready at once (the process has its own `min_ready`).
    pub fn new(cfg: &PoolConfig, metrics: &Metrics, registry: &Backends, warm: bool) -> Pool {
        let backends = cfg
            .backends
            .iter()
            .map(|b| registry.obtain(cfg, b, metrics, warm))
            .collect::<Vec<_>>();
        metrics
            .pool_backends
            .with_label_values(&[cfg.name.as_str()])
            .set(backends.len() as i64);
        Pool {
            name: cfg.name.clone(),
            backends: ArcSwap::from_pointee(backends),
            balance: cfg.balance,
            connect_timeout: cfg.connect_timeout,
            retries: cfg.retries,
            proxy_protocol: cfg.proxy_protocol,
            keepalive: cfg.keepalive,
            removed_drain_timeout: cfg.removed_drain_timeout,
            ejection: cfg.ejection,
            health: cfg.health.clone(),
            fail_open: cfg.fail_open,
            discovery_stop: CancellationToken::new(),
            discovered: Mutex::default(),
            rr: AtomicU64::new(0),
            ejections: metrics.ejections.clone(),
            connect_seconds: metrics
                .connect_seconds
                .with_label_values(&[cfg.name.as_str()]),
            unavailable: metrics.unavailable.with_label_values(&[cfg.name.as_str()]),
        }
    }

    /// The backends now (a reference-counted list: DNS discovery may replace it).
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    /// Replace the backend list (DNS discovery).
    pub fn set_backends(&self, list: Vec<Arc<Backend>>) {
        self.backends.store(Arc::new(list));
    }

    /// DNS discovery's last good answer per name (`host:port` or the SRV name).
    pub fn discovered(&self) -> Discovered {
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_discovered(&self, answers: Discovered) {
        *self.discovered.lock().unwrap_or_else(|e| e.into_inner()) = answers;
    }

    pub fn view(&self) -> PoolView<'_> {
        let now = Instant::now();
        PoolView {
            name: &self.name,
            balance: self.balance,
            backends: self
                .backends()
                .iter()
                .map(|b| {
                    let wait = b.ready_at.saturating_duration_since(now);
                    let ejected = b.ejected_for(now);
                    BackendView {
                        name: b.name.clone(),
                        address: b.address,
                        weight: b.weight(),
                        active: b.active(),
                        health: b.health(),
                        state: if b.drained() {
                            "draining"
                        } else if b.health() == Health::Unhealthy {
                            "unhealthy"
                        } else if !ejected.is_zero() {
                            "ejected"
                        } else if wait.is_zero() {
                            "ready"
                        } else {
                            "warming"
                        },
                        ready_in_seconds: wait.as_secs_f64(),
                        ejected_for_seconds: ejected.as_secs_f64(),
                    }
                })
                .collect(),
        }
    }

    /// Choose a backend, skipping those in `exclude`. `rr_ticket` is the connection's
    /// round-robin position (one per connection, not per attempt: otherwise a dead backend
    /// would be every connection's first try).
    pub fn pick(
        &self,
        list: &[Arc<Backend>],
        exclude: &[usize],
        client: SocketAddr,
        sni: Option<&str>,
        rr_ticket: u64,
    ) -> Option<usize> {
        // Prefer backends in service, not ejected and past their min_ready; then warming
        // ones; then ejected ones (every backend failing: try anyway, as Envoy's panic mode
        // does); a removed backend only for a connection routed just before the reload.
        // Unhealthy backends (active checks) rank with ejected ones under
        // all_unhealthy = "fail_open", and are never chosen under "fail_closed".
        let now = Instant::now();
        // Each backend's state is read once: a reload may change it meanwhile, and two
        // readings could disagree (a backend found the best in service, then weighed 0 as a
        // removed one, would leave nothing to pick; seen under a reload every 100 ms).
        let mut candidates: Vec<Candidate> = Vec::with_capacity(list.len());
        let mut tiers: Vec<Option<u8>> = Vec::with_capacity(list.len());
        for b in list {
            let standing = Standing {
                in_service: b.in_service(),
                drained: b.drained(),
                healthy: b.health() != Health::Unhealthy,
                ejected: !b.ejected_for(now).is_zero(),
                ready: b.is_ready(now),
                weight: b.weight(),
            };
            tiers.push(eligibility::tier(standing, self.fail_open));
            candidates.push(Candidate {
                weight: standing.weight,
                active: b.active(),
                id: b.id,
            });
        }
        let best = eligibility::best_tier(&tiers, exclude)?;
        for (c, t) in candidates.iter_mut().zip(&tiers) {
            if *t != Some(best) {
                c.weight = 0;
            }
        }
        let ip_key;
        let hash_key: Option<&[u8]> = match self.balance {
            Balance::Hash(HashKey::Sni) if sni.is_some() => sni.map(str::as_bytes),
            Balance::Hash(_) => {
                ip_key = ip_bytes(client);
                Some(&ip_key)
            }
            _ => None,
        };
        let ctx = PickContext {
            exclude,
            hash_key,
            rr_ticket,
        };
        self.balance.pick(&candidates, &ctx, &mut rand::rng())
    }

    /// Connect to a backend of this pool, retrying others on failure.
    pub async fn connect(
        &self,
        client: SocketAddr,
        sni: Option<&str>,
        first: &[u8],
        metrics: &Metrics,
    ) -> Result<(Dialed, ActiveGuard), ConnectError> {
        let mut tried: Vec<usize> = Vec::new();
        let mut last = String::from("no backends");
        let ticket = self.rr.fetch_add(1, Ordering::Relaxed);
        let list = self.backends();
        for attempt in 0..=self.retries {
            let Some(i) = self.pick(&list, &tried, client, sni, ticket + attempt as u64) else {
                break;
            };
            tried.push(i);
            let backend = &list[i];
            let started = Instant::now();
            match connect_one(
                backend.address,
                self.connect_timeout,
                &self.keepalive,
                first,
            )
            .await
            {
                Ok(dialed) => {
                    backend.connected();
                    self.connect_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok((dialed, ActiveGuard::new(backend.clone())));
                }
                Err(e) if crate::net::is_local_exhaustion(&e) => {
                    tracing::error!(pool = %self.name, error = %e,
                        "cannot open a socket to connect a backend: out of local resources");
                    return Err(ConnectError::LocalResources(e.to_string()));
                }
                Err(e) => {
                    let reason = failure_reason(&e);
                    if let Some(s) = &backend.series {
                        s.connect_failures.inc();
                    }
                    metrics
                        .connect_failures
                        .with_label_values(&[self.name.as_str(), reason])
                        .inc();
                    tracing::warn!(
                        pool = %self.name, backend = %backend.name, address = %backend.address,
                        reason, error = %e, "backend connect failed"
                    );
                    last = format!("{} ({}): {e}", backend.name, backend.address);
                    if matches!(reason, "refused" | "timeout") {
                        self.connect_failed(backend);
                    }
                }
            }
        }
        self.unavailable.inc();
        Err(ConnectError::Exhausted {
            pool: self.name.clone(),
            attempts: tried.len() as u32,
            last,
        })
    }
}

impl Pool {
    /// Count a connect failure; eject the backend after `after_failures` in a row, unless
    /// that would eject more than `max_percent` of the pool (one backend always may be).
    fn connect_failed(&self, backend: &Backend) {
        let now = Instant::now();
        let rule = self.ejection.map(|e| EjectionRule {
            after_failures: e.after_failures,
            time: e.time,
            max_time: e.max_time,
            max_percent: e.max_percent,
        });
        let in_pool = || {
            let list = self.backends();
            let ejected = list
                .iter()
                .filter(|b| !b.ejected_for(now).is_zero())
                .count();
            (ejected, list.len())
        };
        match backend
            .outlier
            .failed(rule.as_ref(), ms_since_epoch(now), in_pool)
        {
            Failure::Counted(_) => {}
            Failure::CapReached { ejected, .. } => {
                tracing::warn!(pool = %self.name, backend = %backend.name, ejected,
                    max_ejected_percent = rule.map_or(0, |r| r.max_percent),
                    "backend keeps failing but max_ejected_percent is reached; not ejecting");
            }
            Failure::Ejected { failures, length } => {
                self.ejections
                    .with_label_values(&[self.name.as_str(), backend.name.as_str()])
                    .inc();
                tracing::warn!(pool = %self.name, backend = %backend.name, address = %backend.address,
                    failures, ejected_for = ?length, "backend ejected after consecutive connect failures");
            }
        }
    }
}

fn ip_bytes(addr: SocketAddr) -> Vec<u8> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A new backend connection, and how many of the bytes it was to send first it has sent.
pub struct Dialed {
    pub stream: TcpStream,
    pub sent: usize,
    /// The bytes it was to send first when they are not the caller's: a resource route's
    /// fallback pool sends its own PROXY header, not the route's. `sent` counts these then.
    pub first: Option<Vec<u8>>,
    /// The keepalive its pool (or agent route) asks for, not yet set on the socket: see
    /// `arm_keepalive`.
    pub keepalive: Keepalive,
}

impl Dialed {
    /// Set TCP keepalive on the backend socket. A relayed connection does this when it first
    /// goes idle (or at once when parking is off): keepalive only matters to a connection that
    /// sits idle, and the many that close within seconds spare its four `setsockopt` calls.
    pub fn arm_keepalive(&self) -> io::Result<()> {
        crate::net::apply_keepalive(&socket2::SockRef::from(&self.stream), &self.keepalive)
    }
}

/// Connect to `addr` and try sending `first` at once. TCP keepalive is left to the caller
/// (`Dialed::arm_keepalive`).
///
/// The write is speculative, as HAProxy's I/O is: on a fast path (loopback, a local network)
/// the handshake is over by the time a non-blocking `connect` returns, so the bytes go out
/// immediately, and their acceptance proves the connection. That spares a turn of the poller
/// (waiting for writability) and the `SO_ERROR` query. When the handshake is still under
/// way the write sends nothing (EAGAIN), and the connect completes as usual. A refused
/// connection fails here either way, before any byte reached the backend, so the caller
/// may retry elsewhere.
pub(crate) async fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: &Keepalive,
    first: &[u8],
) -> io::Result<Dialed> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::Write as _;
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let socket = std::net::TcpStream::from(socket);
    let sent = match (&socket).write(first) {
        Ok(n) if !first.is_empty() => Some(n),
        Ok(_) => None,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    let stream = TcpStream::from_std(socket)?;
    if sent.is_none() {
        match tokio::time::timeout(timeout, stream.writable()).await {
            Ok(ready) => ready?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(Dialed {
        stream,
        sent: sent.unwrap_or(0),
        first: None,
        keepalive: *keepalive,
    })
}

pub(crate) fn failure_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const FIRST: &[u8] = b"\x16\x03\x01 the hello, replayed";

    async fn dial(addr: SocketAddr, first: &[u8]) -> io::Result<Dialed> {
        connect_one(addr, Duration::from_millis(300), &Keepalive::DEFAULT, first).await
    }

    #[tokio::test]
    async fn the_first_bytes_arrive_once_whether_or_not_the_connect_sent_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for first in [FIRST, b"".as_slice()] {
            let mut dialed = dial(addr, first).await.unwrap();
            assert!(dialed.sent <= first.len());
            dialed
                .stream
                .write_all(&first[dialed.sent..])
                .await
                .unwrap();
            dialed.stream.shutdown().await.unwrap();
            let (mut accepted, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            accepted.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, first);
        }
    }

    #[tokio::test]
    async fn a_pick_racing_a_reload_always_finds_the_backend() {
        // A pool of one backend, which a reload keeps removing and adding back (the bench's
        // reload scenario flips a pool's only backend every 100 ms). Whether it is in service
        // or removed, a connection routed to the pool must get it: a removed backend is
        // still chosen when it is the only one.
        let text = "[[listener]]\nname = \"e\"\naddress = \"127.0.0.1:0\"\n\
                    [[route]]\nname = \"r\"\npool = \"p\"\n\
                    [pool.p]\nbackends = [\"127.0.0.1:9\"]\n";
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let registry = Backends::new(CancellationToken::new());
        let pool = Pool::new(&cfg.pools["p"], &Metrics::new(), &registry, false);
        let list = pool.backends();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (b, stop) = (list[0].clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    b.in_service.store(false, Ordering::Release);
                    b.in_service.store(true, Ordering::Release);
                }
            })
        };
        let client = SocketAddr::from(([127, 0, 0, 1], 1));
        let missed = (0..200_000u64)
            .filter(|&n| pool.pick(&list, &[], client, None, n).is_none())
            .count();
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert_eq!(missed, 0, "picks that found no backend");
    }

    #[tokio::test]
    async fn a_refused_connect_fails_before_any_byte_is_sent() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap(); // the listener is dropped: nothing listens there now
        let e = dial(addr, FIRST).await.err().expect("nothing listens");
        assert_eq!(failure_reason(&e), "refused", "{e}");
    }

    #[tokio::test]
    async fn a_connect_that_gets_no_answer_times_out_with_nothing_sent() {
        // A listener whose accept queue is full drops further SYNs.
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        hole.listen(0).unwrap();
        let addr = hole.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(d)) =
                tokio::time::timeout(Duration::from_millis(200), dial(addr, b"")).await
            {
                fillers.push(d);
            }
        }
        let e = dial(addr, FIRST).await.err().expect("the SYN is dropped");
        assert_eq!(failure_reason(&e), "timeout", "{e}");
    }
}
