//! Where the heartbeat table lives: this process only (`memory`), or etcd, shared by every
//! edge of the cluster (`etcd`, see `etcd`).
//!
//! With etcd, each edge still holds the whole table in memory (lookups stay lock-free); etcd
//! is the source of truth. A heartbeat is written to etcd first and installed locally once
//! etcd took it; every other edge installs it from its watch. Records never expire by an
//! edge's clock: etcd deletes a key when its lease expires, and every edge lists the agent
//! as `expired` from then on.

mod etcd;
mod lease;
mod watch;

use std::sync::Arc;

use serde::Serialize;

pub use etcd::{Etcd, NewBackend};
use sluice_core::agents::table::Refused;

/// The table's home.
pub enum Store {
    Memory,
    Etcd(Arc<Etcd>),
}

/// Start the store's watch (and keep it, reconnecting) until `stop`.
pub fn start(store: &Arc<Etcd>, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(watch::run(store.clone(), stop));
}

impl Store {
    /// Ready to serve heartbeats and route from a complete table: always for memory; for
    /// etcd, once the first full list has been applied.
    pub fn listed(&self) -> bool {
        match self {
            Store::Memory => true,
            Store::Etcd(e) => e.listed(),
        }
    }

    /// Heartbeats can be taken now (the heartbeat API's readiness).
    pub fn writable(&self) -> bool {
        match self {
            Store::Memory => true,
            Store::Etcd(e) => e.listed() && e.connected(),
        }
    }

    pub fn view(&self, agents: usize) -> StoreView {
        match self {
            Store::Memory => StoreView {
                kind: "memory",
                connected: true,
                listed: true,
                revision: None,
                agents,
                edge_id: None,
                endpoints: Vec::new(),
                cluster_prefix: None,
                last_event_age_seconds: None,
                relists: 0,
            },
            Store::Etcd(e) => e.view(agents),
        }
    }
}

/// `GET /debug/store`
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StoreView {
    pub kind: &'static str,
    pub connected: bool,
    /// The first full list has been applied (the edge is ready).
    pub listed: bool,
    /// The last store revision this edge has applied.
    pub revision: Option<i64>,
    pub agents: usize,
    pub edge_id: Option<String>,
    pub endpoints: Vec<String>,
    pub cluster_prefix: Option<String>,
    pub last_event_age_seconds: Option<f64>,
    pub relists: u64,
}

/// Why a write to the store did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The table's rules refuse it (ownership, static agent, table full).
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The store did not answer in time or failed: the agent should try another edge.
    #[error("the heartbeat store is unavailable: {0}")]
    Unavailable(String),
}
