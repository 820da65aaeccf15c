//! The runtime: the process-wide state, and the one place that builds and swaps it.
//!
//! Owns: the running `Snapshot` (swapped as a whole by `apply`), the listeners (TCP and
//! QUIC) and the sockets handed over to this process, the QUIC termination endpoints, DNS
//! discovery and health-check tasks, connection caps, the stop tokens and the lifecycle
//! state. Components never hold the runtime: each gets the narrow handle it uses, built here
//! once (`Edge` for listeners and connections, `Api` for the heartbeat API, the discovery
//! `Context`), so no module below `control` imports it.

mod quic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::net::TcpListener;

use crate::agents::api::Api;
use crate::agents::Agents;
use crate::config::{Config, ListenerConfig};
use crate::edge::connection::{Edge, EdgeParts, ListenerState};
use crate::edge::listener::{self, ListenerHandle};
use crate::observe::metrics::Metrics;
use crate::quic::terminate::{Terminator, TerminatorMetrics};
use crate::snapshot::{Snapshot, Snapshots, Target};
use crate::upstream::discovery;
use crate::upstream::Backends;

/// Why a config could not be applied (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("sluice is draining: listeners are closed")]
    Draining,
    /// An explicit `max_connections` beyond what the open-file limit allows.
    #[error("{0}")]
    FdBudget(String),
    #[error("listener `{listener}`: cannot bind {protocol}{address}: {source}")]
    Bind {
        listener: String,
        /// `""` for TCP, `"UDP "` for QUIC.
        protocol: &'static str,
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl ApplyError {
    /// Whose fault it was, for labels: a bind failure is the config's (an address in use or
    /// not on this machine).
    pub fn class(&self) -> sluice_core::close::ErrorClass {
        use sluice_core::close::ErrorClass;
        match self {
            ApplyError::Draining => ErrorClass::Internal,
            ApplyError::Bind { .. } | ApplyError::FdBudget(_) => ErrorClass::Config,
        }
    }
}

/// What a reload changed, for the log line.
#[derive(Debug, Default, Serialize)]
pub struct ReloadSummary {
    pub hash: String,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub listeners_updated: Vec<String>,
    pub routes: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting = 0,
    Ready = 1,
    Draining = 2,
    Closing = 3,
}

impl State {
    const ALL: [State; 4] = [
        State::Starting,
        State::Ready,
        State::Draining,
        State::Closing,
    ];
    fn label(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Closing => "closing",
        }
    }
}

pub struct Runtime {
    pub metrics: Metrics,
    snapshots: Arc<Snapshots>,
    state: AtomicU8,
    pub started: Instant,
    pub global_permits: Arc<Semaphore>,
    max_connections: AtomicUsize,
    /// Every connection task; waited on during a drain.
    pub tracker: TaskTracker,
    /// Closes every connection at once (the very end of a drain, a second signal).
    pub hard_stop: CancellationToken,
    /// Closes every connection spread over `close_spread` (drain_timeout passed). A child of
    /// `hard_stop`, and the parent of every backend's `retire` token.
    pub close_all: CancellationToken,
    /// Parent of every listener's accept loop.
    pub accepting: CancellationToken,
    listeners: Mutex<Vec<ListenerHandle>>,
    /// QUIC listeners (UDP): each holds its flow table.
    quic: Mutex<Vec<Arc<crate::quic::QuicListener>>>,
    /// Listening sockets handed to this process (systemd, an upgrade), by listener name.
    inherited: Mutex<HashMap<String, std::net::TcpListener>>,
    /// UDP sockets handed to this process (systemd's `ListenDatagram=`), by QUIC listener name.
    inherited_udp: Mutex<HashMap<String, std::net::UdpSocket>>,
    /// Upgrade: the old process's QUIC listeners' socket pair ends, by listener name.
    inherited_relays: Mutex<HashMap<String, std::os::unix::net::UnixDatagram>>,
    pub backends: Arc<Backends>,
    /// The heartbeat table and the resource routes' sessions.
    pub agents: Arc<Agents>,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// Active health checkers, one per (pool, backend).
    checkers: crate::upstream::health::Checkers,
    /// What listeners and connections hold (the parking lot lives there).
    pub edge: Arc<Edge>,
    /// What the heartbeat API holds.
    pub api: Arc<Api>,
    /// What DNS discovery holds.
    discovery: Arc<discovery::Context>,
}

impl Runtime {
    pub fn new(config: Config, metrics: Metrics) -> Arc<Runtime> {
        let max_connections = config
            .limits
            .max_connections
            .unwrap_or_else(|| default_max_connections(&config));
        metrics.max_connections.set(max_connections as i64);
        metrics.init_known(&config);
        crate::edge::splice::set_max_pipes(sluice_core::fds::Budget::pipes(
            config.fd_shape(),
            max_connections,
        ));
        metrics
            .config_info
            .with_label_values(&[&config.hash])
            .set(1);
        metrics.last_reload_success_timestamp.set(unix_now());
        let hard_stop = CancellationToken::new();
        let close_all = hard_stop.child_token();
        let accepting = CancellationToken::new();
        let tracker = TaskTracker::new();
        let global_permits = Arc::new(Semaphore::new(max_connections));
        let backends = Arc::new(Backends::new(close_all.clone()));
        let close_spread = config.lifecycle.close_spread;
        let pending_caps = (
            config.limits.pending_cap(max_connections),
            config.limits.max_pending_hellos_per_source,
        );
        let agents = Arc::new(Agents::new(close_all.clone(), &config, &metrics));
        agents.configure(&config);
        let snapshot = Snapshot::build(config, &metrics, &backends, &agents, false);
        start_terminators(&snapshot, &metrics);
        let snapshots = Arc::new(Snapshots::new(snapshot));
        let rt = Arc::new_cyclic(|weak: &Weak<Runtime>| {
            let bound = weak.clone();
            let api = Arc::new(Api {
                agents: agents.clone(),
                snapshots: snapshots.clone(),
                metrics: metrics.clone(),
                tracker: tracker.clone(),
                accepting: accepting.clone(),
                close_all: close_all.clone(),
                bound: Box::new(move || bound.upgrade().map_or_else(Vec::new, |rt| rt.bound())),
            });
            let edge = Arc::new(Edge::new(EdgeParts {
                metrics: metrics.clone(),
                snapshots: snapshots.clone(),
                tracker: tracker.clone(),
                hard_stop: hard_stop.clone(),
                close_all: close_all.clone(),
                accepting: accepting.clone(),
                global_permits: global_permits.clone(),
                api: api.clone(),
                close_spread,
                pending_caps,
            }));
            let changed = weak.clone();
            let discovery = Arc::new(discovery::Context {
                metrics: metrics.clone(),
                backends: backends.clone(),
                changed: Box::new(move || {
                    if let Some(rt) = changed.upgrade() {
                        rt.sync_checks();
                    }
                }),
            });
            Runtime {
                metrics,
                snapshots,
                state: AtomicU8::new(State::Starting as u8),
                started: Instant::now(),
                global_permits,
                max_connections: AtomicUsize::new(max_connections),
                tracker,
                hard_stop,
                close_all,
                accepting,
                listeners: Mutex::new(Vec::new()),
                quic: Mutex::new(Vec::new()),
                inherited: Mutex::new(HashMap::new()),
                inherited_udp: Mutex::new(HashMap::new()),
                inherited_relays: Mutex::new(HashMap::new()),
                backends,
                agents,
                reload_lock: tokio::sync::Mutex::new(()),
                checkers: Default::default(),
                edge,
                api,
                discovery,
            }
        });
        rt.set_state(State::Starting);
        rt
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load()
    }

    /// The shared snapshot cell (for tasks that outlive a reload: the agent sweeper).
    pub fn snapshots(&self) -> Arc<Snapshots> {
        self.snapshots.clone()
    }

    /// The addresses the running listeners are bound to.
    fn bound(&self) -> Vec<std::net::SocketAddr> {
        let mut v: Vec<std::net::SocketAddr> = self
            .listener_states()
            .iter()
            .map(|l| l.local_addr)
            .collect();
        v.extend(self.quic_listeners().iter().map(|q| q.local_addr));
        v
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Starting,
            1 => State::Ready,
            2 => State::Draining,
            _ => State::Closing,
        }
    }

    pub fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
        for other in State::ALL {
            self.metrics
                .lifecycle_state
                .with_label_values(&[other.label()])
                .set((other == s) as i64);
        }
    }

    /// Whether listeners take new connections (false once a drain closed them).
    pub fn accepting_new(&self) -> bool {
        !self.accepting.is_cancelled()
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// The window over which connections still open at a forced close are spread.
    pub fn close_spread(&self) -> Duration {
        self.edge.close_spread()
    }

    pub fn listener_states(&self) -> Vec<Arc<ListenerState>> {
        self.lock_listeners()
            .iter()
            .map(|h| h.state.clone())
            .collect()
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Vec<ListenerHandle>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inherit(&self, sockets: HashMap<String, std::net::TcpListener>) {
        self.inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(sockets);
    }

    /// Duplicates of the running listeners' sockets, by name (for an upgrade handover: a
    /// reload closing one meanwhile cannot make its descriptor number mean another file).
    pub fn listener_fds(&self) -> Vec<(String, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd;
        self.lock_listeners()
            .iter()
            .filter_map(|h| {
                let fd = h.socket.as_fd().try_clone_to_owned().ok()?;
                Some((h.state.config.name.clone(), fd))
            })
            .collect()
    }

    /// Start DNS discovery for the pools of `snap` that have names to resolve.
    fn start_discovery(self: &Arc<Self>, snap: &Snapshot, startup: bool) {
        for (name, pool) in &snap.pools {
            let Some(cfg) = snap.config.pools.get(name) else {
                continue;
            };
            if cfg.discovery.is_some() {
                tokio::spawn(discovery::run(
                    Arc::downgrade(&self.discovery),
                    snap.config.dns.clone(),
                    Arc::downgrade(pool),
                    cfg.clone(),
                    pool.discovery_stop.clone(),
                    startup,
                ));
            }
        }
    }

    /// Match the health checkers to the backends now (after DNS changed a pool).
    pub fn sync_checks(&self) {
        self.checkers
            .sync(self.snapshot().pools.values(), &self.metrics);
    }

    /// Stop the active health checks (the end of a drain).
    pub fn stop_checks(&self) {
        self.checkers.stop_all();
    }

    /// Stop every accept loop and close the listening sockets (drain, or after an upgrade).
    pub fn close_listeners(&self) {
        let mut listeners = self.lock_listeners();
        self.accepting.cancel();
        listeners.clear();
        // QUIC flows share the listening socket: it stays open for them, taking no new ones.
        for q in self.quic_listeners() {
            q.close();
        }
    }

    /// Open the listeners of the running config (at startup). Fails, serving nothing, if
    /// one cannot be bound.
    pub fn open_listeners(self: &Arc<Self>) -> Result<(), ApplyError> {
        let cfgs = self.snapshot().config.listeners.clone();
        self.sync_listeners(&cfgs, &mut ReloadSummary::default(), || {})?;
        self.checkers
            .sync(self.snapshot().pools.values(), &self.metrics);
        self.start_discovery(&self.snapshot(), true);
        // A handed-over socket no listener claims would queue clients nobody accepts.
        let mut inherited = self.inherited.lock().unwrap_or_else(|e| e.into_inner());
        for (name, sock) in inherited.drain() {
            tracing::warn!(socket = %name, address = ?sock.local_addr().ok(),
                "closing an inherited listening socket: no listener of that name in the config");
        }
        Ok(())
    }

    /// Make the running listeners match `cfgs`: bind new ones first (any failure changes
    /// nothing), run `commit` (the snapshot swap, so new listeners route by the new
    /// config), then start them, restart the accept loops of changed ones on the same
    /// socket, and stop removed ones. The names go into `summary`; `commit`'s result is
    /// returned.
    fn sync_listeners<T>(
        self: &Arc<Self>,
        cfgs: &[ListenerConfig],
        summary: &mut ReloadSummary,
        commit: impl FnOnce() -> T,
    ) -> Result<T, ApplyError> {
        let mut current = self.lock_listeners();
        if self.accepting.is_cancelled() {
            return Err(ApplyError::Draining);
        }
        let (quic_cfgs, tcp_cfgs): (Vec<ListenerConfig>, Vec<ListenerConfig>) = cfgs
            .iter()
            .cloned()
            .partition(|c| c.protocol == crate::config::ListenerProtocol::Quic);
        let cfgs = &tcp_cfgs[..];
        // QUIC sockets first too: a bind failure changes nothing.
        let mut quic_fresh = Vec::new();
        {
            let running = self.quic_listeners();
            for cfg in &quic_cfgs {
                let same = running.iter().any(|q| {
                    q.is_accepting()
                        && q.name() == cfg.name
                        && listener::addresses_agree(cfg.address, q.local_addr)
                });
                if same {
                    continue;
                }
                let handed = self
                    .inherited_udp
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&cfg.name);
                let bound = match handed {
                    Some(sock) => {
                        tracing::info!(listener = %cfg.name, address = ?sock.local_addr().ok(),
                            "using an inherited UDP socket");
                        crate::quic::QuicListener::adopt(sock)
                    }
                    None => crate::quic::QuicListener::bind(cfg),
                };
                match bound {
                    Ok(sock) => quic_fresh.push((cfg.clone(), sock)),
                    Err(source) => {
                        return Err(ApplyError::Bind {
                            listener: cfg.name.clone(),
                            protocol: "UDP ",
                            address: cfg.address,
                            source,
                        })
                    }
                }
            }
        }
        let mut fresh: Vec<(ListenerConfig, Arc<TcpListener>)> = Vec::new();
        {
            let mut inherited = self.inherited.lock().unwrap_or_else(|e| e.into_inner());
            for cfg in cfgs {
                if current
                    .iter()
                    .any(|h| h.state.config.name == cfg.name && h.reusable_for(cfg))
                {
                    continue;
                }
                match listener::open(cfg, &mut inherited) {
                    Ok(l) => fresh.push((cfg.clone(), Arc::new(l))),
                    Err(source) => {
                        return Err(ApplyError::Bind {
                            listener: cfg.name.clone(),
                            protocol: "",
                            address: cfg.address,
                            source,
                        })
                    }
                }
            }
        }
        let committed = commit();
        let ReloadSummary {
            listeners_added: added,
            listeners_removed: removed,
            listeners_updated: updated,
            ..
        } = summary;
        let mut next = Vec::new();
        for cfg in cfgs {
            let old = current.iter().position(|h| h.state.config.name == cfg.name);
            let socket = fresh
                .iter()
                .position(|(c, _)| c.name == cfg.name)
                .map(|i| fresh.swap_remove(i).1);
            let (socket, old) = match (socket, old) {
                (Some(s), old) => {
                    match old {
                        Some(i) => {
                            current.swap_remove(i).stop();
                            updated.push(cfg.name.clone());
                        }
                        None => added.push(cfg.name.clone()),
                    }
                    (s, None)
                }
                (None, Some(i)) => {
                    let h = current.swap_remove(i);
                    if same_listener(&h.state.config, cfg) {
                        next.push(h);
                        continue;
                    }
                    if h.state.config.backlog != cfg.backlog {
                        if let Err(e) = h.set_backlog(cfg.backlog) {
                            tracing::warn!(listener = %cfg.name, error = %e, "cannot change the backlog");
                        }
                    }
                    updated.push(cfg.name.clone());
                    (h.socket.clone(), Some(h))
                }
                (None, None) => continue,
            };
            match ListenerHandle::start(&self.edge, cfg.clone(), socket, &self.accepting) {
                Ok(h) => {
                    tracing::info!(listener = %cfg.name, address = %h.state.local_addr, "listening");
                    next.push(h);
                }
                Err(e) => {
                    tracing::error!(listener = %cfg.name, error = %e, "cannot start listener")
                }
            }
            // The old accept loop stops once the new one runs on the same socket.
            if let Some(old) = old {
                old.stop();
            }
        }
        for h in current.drain(..) {
            removed.push(h.state.config.name.clone());
            h.stop();
        }
        *current = next;
        drop(current);
        self.sync_quic(&quic_cfgs, quic_fresh, added, removed, updated);
        Ok(committed)
    }

    /// Replace the running config with `config`. Established connections keep what they
    /// have; only new connections see the change. On error nothing changes.
    pub async fn apply(self: &Arc<Self>, config: Config) -> Result<ReloadSummary, ApplyError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        config
            .check_fd_budget(crate::net::nofile())
            .map_err(ApplyError::FdBudget)?;
        let old = self.snapshot();
        let mut summary = ReloadSummary {
            hash: config.hash.clone(),
            routes: config.routes.len(),
            ..Default::default()
        };
        for (what, old_v, new_v) in [
            (
                "admin.address",
                format!("{:?}", old.config.admin.address),
                format!("{:?}", config.admin.address),
            ),
            (
                "heartbeat.address",
                format!("{:?}", old.config.heartbeat.address),
                format!("{:?}", config.heartbeat.address),
            ),
            (
                "store",
                serde_json::to_string(&old.config.store).unwrap_or_default(),
                serde_json::to_string(&config.store).unwrap_or_default(),
            ),
            (
                "cluster.name",
                old.config.cluster.name.clone(),
                config.cluster.name.clone(),
            ),
            (
                "lifecycle.upgrade_socket",
                format!("{:?}", old.config.lifecycle.upgrade_socket),
                format!("{:?}", config.lifecycle.upgrade_socket),
            ),
        ] {
            if old_v != new_v {
                tracing::warn!(key = what, running = %old_v, new = %new_v,
                    "this setting changes only at a restart or upgrade; keeping the running one");
            }
        }
        let listeners = config.listeners.clone();
        let lifecycle_spread = config.lifecycle.close_spread;
        let max = config
            .limits
            .max_connections
            .unwrap_or_else(|| default_max_connections(&config));
        let old_hash = old.config.hash.clone();
        let new = self.sync_listeners(&listeners, &mut summary, || {
            self.agents.configure(&config);
            let snap = Arc::new(Snapshot::build(
                config,
                &self.metrics,
                &self.backends,
                &self.agents,
                true,
            ));
            start_terminators(&snap, &self.metrics);
            for (name, pool) in &snap.pools {
                if let (Some(old_pool), Some(new_cfg)) =
                    (old.pools.get(name), snap.config.pools.get(name))
                {
                    crate::upstream::discovery::seed(pool, new_cfg, old_pool);
                }
            }
            self.snapshots.store(snap.clone());
            snap
        })?;
        for pool in old.pools.values() {
            pool.discovery_stop.cancel();
        }
        self.start_discovery(&new, false);
        self.checkers.sync(new.pools.values(), &self.metrics);

        let was = self.max_connections.swap(max, Ordering::Relaxed);
        if max > was {
            self.global_permits.add_permits(max - was);
        } else if max < was {
            // Take the difference out of circulation as connections return their slots.
            let sem = self.global_permits.clone();
            let n = u32::try_from(was - max).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
        self.metrics.max_connections.set(max as i64);
        self.metrics.init_known(&new.config);
        crate::edge::splice::set_max_pipes(sluice_core::fds::Budget::pipes(
            new.config.fd_shape(),
            max,
        ));
        self.edge.set_close_spread(lifecycle_spread);
        let limits = &new.config.limits;
        self.edge.pending.set_limits(
            limits.pending_cap(max),
            limits.max_pending_hellos_per_source,
        );

        let kept = new.backend_set();
        let before = old.backend_set();
        summary.backends_added = kept.difference(&before).count();
        for pool in old.pools.values() {
            for b in pool.backends().iter() {
                if !kept.contains(&Arc::as_ptr(b)) {
                    summary.backends_removed += 1;
                    b.remove(pool.removed_drain_timeout);
                }
            }
        }
        for name in old.pools.keys() {
            if !new.pools.contains_key(name) {
                let _ = self
                    .metrics
                    .pool_backends
                    .remove_label_values(&[name.as_str()]);
            }
        }
        let _ = self
            .metrics
            .config_info
            .remove_label_values(&[old_hash.as_str()]);
        self.metrics
            .config_info
            .with_label_values(&[summary.hash.as_str()])
            .set(1);
        Ok(summary)
    }
}

/// Start the QUIC endpoints of the `quic = "terminate"` routes of `snap` and attach them to
/// their routes (before the snapshot is published). A route whose endpoint cannot start
/// refuses its QUIC flows rather than passing them through.
fn start_terminators(snap: &Snapshot, metrics: &Metrics) {
    for r in &snap.config.routes {
        // A loaded config has the certificate of every terminating route.
        let Some(tls) = r.quic_terminate.as_ref().and_then(|q| q.tls.clone()) else {
            continue;
        };
        let Some((_, route)) = snap.routes.iter().find(|(_, route)| route.name == r.name) else {
            continue;
        };
        let Target::Pool(pool) = &route.target else {
            continue;
        };
        let m = Arc::new(TerminatorMetrics {
            metrics: Arc::new(metrics.clone()),
        });
        match Terminator::start(&r.name, tls, pool.clone(), m) {
            Ok(t) => {
                let _ = route.terminator.set(t);
            }
            Err(e) => {
                tracing::error!(route = %r.name, error = %e,
                    "cannot start the QUIC termination endpoint");
            }
        }
    }
}

fn same_listener(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.address == b.address
        && a.backlog == b.backlog
        && a.hello_timeout == b.hello_timeout
        && a.max_hello_size == b.max_hello_size
        && a.max_connections == b.max_connections
        && a.reuse_port == b.reuse_port
        && a.keepalive == b.keepalive
        && a.accept_proxy == b.accept_proxy
        && a.trusted_proxies == b.trusted_proxies
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Half the open-file limit (each relayed connection holds two descriptors), less a reserve
/// for listeners, logs and the admin API — the same rule HAProxy uses for its default maxconn.
/// `max_connections` when the config does not set it: what the open-file budget allows.
fn default_max_connections(config: &Config) -> usize {
    sluice_core::fds::Budget {
        nofile: crate::net::nofile(),
    }
    .max_connections(config.fd_shape())
}
