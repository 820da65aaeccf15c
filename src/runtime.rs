//! The runtime: the process-wide state every connection and the admin API share.
//!
//! Owns: the current `Snapshot` (compiled routes and pools, swapped atomically as a whole),
//! metrics, connection caps, the task tracker and stop tokens, and the lifecycle state. A
//! connection loads the snapshot once when it is accepted and keeps that `Arc` for its whole
//! life, so replacing the snapshot can never change an established connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener::ListenerState;
use crate::metrics::Metrics;
use crate::route::{AlpnPattern, RouteTable};
use crate::upstream::Pool;

/// A route compiled for use: its pool and its metric handles resolved once.
pub struct Route {
    pub name: String,
    pub pool: Arc<Pool>,
    pub idle_timeout: Option<std::time::Duration>,
    pub alpn: Option<Vec<AlpnPattern>>,
    pub bytes_to_backend: IntCounter,
    pub bytes_to_client: IntCounter,
    pub active: IntGauge,
}

impl Route {
    /// The ALPN name reported upstream in a PROXY v2 header: the first offered protocol this
    /// route matched on, else the client's first choice. (Sluice does not terminate TLS, so the
    /// protocol actually negotiated is not known to it.)
    pub fn reported_alpn<'a>(&self, offered: &'a [String]) -> Option<&'a str> {
        match &self.alpn {
            Some(pats) => offered
                .iter()
                .find(|o| pats.iter().any(|p| p.matches(o)))
                .map(String::as_str),
            None => offered.first().map(String::as_str),
        }
    }
}

/// Everything a connection needs to be routed, built from one `Config`.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: RouteTable<Arc<Route>>,
    pub pools: BTreeMap<String, Arc<Pool>>,
}

impl Snapshot {
    pub fn build(config: Config, metrics: &Metrics) -> Snapshot {
        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, p)| (name.clone(), Arc::new(Pool::new(p, metrics))))
            .collect();
        let routes = config
            .routes
            .iter()
            .filter_map(|r| {
                // Validation guarantees the pool exists; a missing one drops the route rather
                // than panicking.
                let pool = pools.get(&r.pool)?.clone();
                let route = Route {
                    name: r.name.clone(),
                    pool,
                    idle_timeout: r.idle_timeout,
                    alpn: r.matcher.alpn.clone(),
                    bytes_to_backend: metrics
                        .bytes
                        .with_label_values(&[r.name.as_str(), "to_backend"]),
                    bytes_to_client: metrics
                        .bytes
                        .with_label_values(&[r.name.as_str(), "to_client"]),
                    active: metrics.route_active.with_label_values(&[r.name.as_str()]),
                };
                Some((r.matcher.clone(), Arc::new(route)))
            })
            .collect();
        Snapshot {
            config: Arc::new(config),
            routes: RouteTable::new(routes),
            pools,
        }
    }
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
    snapshot: ArcSwap<Snapshot>,
    state: AtomicU8,
    pub started: Instant,
    next_conn_id: AtomicU64,
    pub global_permits: Arc<Semaphore>,
    pub max_connections: usize,
    /// Every connection task; waited on during a drain.
    pub tracker: TaskTracker,
    /// Fired at the end of a drain: connections still open are closed.
    pub hard_stop: CancellationToken,
    pub listeners: Mutex<Vec<Arc<ListenerState>>>,
}

impl Runtime {
    pub fn new(config: Config, metrics: Metrics) -> Arc<Runtime> {
        let max_connections = config
            .limits
            .max_connections
            .unwrap_or_else(default_max_connections);
        metrics.max_connections.set(max_connections as i64);
        let snapshot = Snapshot::build(config, &metrics);
        let rt = Runtime {
            metrics,
            snapshot: ArcSwap::from_pointee(snapshot),
            state: AtomicU8::new(State::Starting as u8),
            started: Instant::now(),
            next_conn_id: AtomicU64::new(1),
            global_permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            tracker: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            listeners: Mutex::new(Vec::new()),
        };
        rt.set_state(State::Starting);
        Arc::new(rt)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
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

    pub fn listener_states(&self) -> Vec<Arc<ListenerState>> {
        self.listeners.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Half the open-file limit (each relayed connection holds two descriptors), less a reserve
/// for listeners, logs and the admin API — the same rule HAProxy uses for its default maxconn.
fn default_max_connections() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    (soft.saturating_sub(64) / 2).clamp(16, 10_000_000) as usize
}
