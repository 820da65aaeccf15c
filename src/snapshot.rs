//! The snapshot: everything a new connection is routed with, built from one `Config` and
//! replaced as a whole by a reload. A connection loads it once when it is accepted and keeps
//! that `Arc` for its whole life, so a reload never changes an established connection.
//!
//! Owns: compiled routes (their targets and metric handles resolved once), the pools, and
//! the shared cell (`Snapshots`) the runtime swaps and every component reads.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};

use crate::agents::router::ResourceTarget;
use crate::agents::Agents;
use crate::config::{Config, RouteTarget};
use crate::observe::metrics::Metrics;
use crate::quic::terminate::Terminator;
use crate::upstream::{Backend, Backends, Pool};
use sluice_core::route::{AlpnPattern, RouteTable};

/// The running snapshot, shared: the runtime stores, everyone else loads.
pub struct Snapshots(ArcSwap<Snapshot>);

impl Snapshots {
    pub fn new(first: Snapshot) -> Snapshots {
        Snapshots(ArcSwap::from_pointee(first))
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    pub fn store(&self, next: Arc<Snapshot>) {
        self.0.store(next)
    }
}

/// Where a compiled route sends connections.
pub enum Target {
    Pool(Arc<Pool>),
    /// An agent from the heartbeat table, with session affinity.
    Resource(Arc<ResourceTarget>),
    /// Sluice itself terminates TLS and serves the heartbeat API.
    Heartbeat,
}

/// A route compiled for use: its target and its metric handles resolved once.
pub struct Route {
    pub name: String,
    pub target: Target,
    pub idle_timeout: Option<std::time::Duration>,
    pub alpn: Option<Vec<AlpnPattern>>,
    pub bytes_to_backend: IntCounter,
    pub bytes_to_client: IntCounter,
    pub active: IntGauge,
    /// `quic = "terminate"`: the quinn endpoint this route's QUIC flows go to, attached by
    /// the runtime once it started it.
    pub terminator: OnceLock<Arc<Terminator>>,
    terminate_configured: bool,
    /// Sources this route serves (`allow`/`deny`).
    pub acl: sluice_core::acl::Acl,
}

impl Route {
    /// Whether QUIC flows of this route are meant to end in sluice (even if its endpoint
    /// failed to start: then they are refused rather than passed through).
    pub fn is_terminated(&self) -> bool {
        self.terminator.get().is_some() || self.terminate_configured
    }

    /// The pool name for logs and views (`-` for agents and the API).
    pub fn pool_name(&self) -> &str {
        match &self.target {
            Target::Pool(p) => &p.name,
            Target::Resource(_) => "-",
            Target::Heartbeat => "-",
        }
    }

    pub fn proxy_protocol(&self) -> crate::config::ProxyProtocol {
        match &self.target {
            Target::Pool(p) => p.proxy_protocol,
            Target::Resource(r) => r.proxy_protocol,
            Target::Heartbeat => crate::config::ProxyProtocol::None,
        }
    }

    /// Whether a connection of this route may send a PROXY header anywhere: to its pool or
    /// agents, or to a resource route's fallback pool (which has its own setting).
    pub fn may_send_proxy_header(&self) -> bool {
        use crate::config::ProxyProtocol::None;
        self.proxy_protocol() != None
            || matches!(&self.target, Target::Resource(r)
                if r.fallback.as_ref().is_some_and(|p| p.proxy_protocol != None))
    }

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
    /// `warm`: this snapshot replaces a running one, so backends new to the process wait for
    /// their pool's `min_ready`.
    ///
    /// Binds and spawns nothing: the runtime starts the QUIC endpoints of `quic = "terminate"`
    /// routes and attaches them (`Route::terminator`) before it publishes the snapshot.
    pub fn build(
        config: Config,
        metrics: &Metrics,
        backends: &Backends,
        agents: &Agents,
        warm: bool,
    ) -> Snapshot {
        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    Arc::new(Pool::new(p, metrics, backends, warm)),
                )
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .filter_map(|r| {
                // Validation guarantees the pools exist; a missing one drops the route rather
                // than panicking.
                let target = match &r.target {
                    RouteTarget::Pool(p) => Target::Pool(pools.get(p)?.clone()),
                    RouteTarget::Resource(res) => {
                        let fallback = match &res.fallback_pool {
                            Some(p) => Some(pools.get(p)?.clone()),
                            None => None,
                        };
                        Target::Resource(Arc::new(
                            agents.target(&r.name, res, &config, fallback, metrics),
                        ))
                    }
                    RouteTarget::Heartbeat => Target::Heartbeat,
                };
                let route = Route {
                    name: r.name.clone(),
                    target,
                    terminator: OnceLock::new(),
                    terminate_configured: r.quic_terminate.is_some(),
                    acl: r.acl.clone(),
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

    pub fn backend_set(&self) -> HashSet<*const Backend> {
        self.pools
            .values()
            .flat_map(|p| p.backends().iter().map(Arc::as_ptr).collect::<Vec<_>>())
            .collect()
    }
}
