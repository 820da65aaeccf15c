//! Agents: the heartbeat table, the heartbeat API that feeds it, and the session-affine
//! router that reads it (`seeds/agent-high-availability.txt` at the edge).
//!
//! Owns: the process-wide `Agents` (the table, the session tables that outlive reloads, the
//! stream ids), building a route's `ResourceTarget`, the sweeper, and the agent metrics. The
//! pure parts are `table` (records, eligibility), `router` (names, sessions, the plan) and
//! `auth` (tokens, scope); `api` is the HTTP shell.

pub mod api;
pub mod client;
pub mod router;
pub mod store;
pub mod versions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ResourceRoute, StoreKind};
use crate::observe::metrics::Metrics;
use crate::upstream::{clock_ms, Backend, Pool};
use router::{ResourceTarget, Sessions};
use sluice_core::agents::table::{self, AgentState, Announced, Heartbeat, ResourceKey, Rules};
use store::Store;

pub use sluice_core::agents::ALPN;

/// The heartbeat table, each agent dialed through a `Backend` (its connection count, its stop
/// token).
pub type AgentTable = table::AgentTable<Backend>;
pub type Agent = table::Agent<Backend>;
pub type Record = table::Record<Backend>;

pub struct Agents {
    pub table: Arc<AgentTable>,
    /// Session tables by route name: a reload keeps a route's sessions (same limits).
    sessions: Mutex<HashMap<String, Arc<Sessions>>>,
    next_stream: AtomicU64,
    /// Parent of every agent backend's `retire` (the runtime's close-all token).
    close_all: CancellationToken,
    /// Where the table lives (read at start: `[store]` changes need a restart).
    pub store: Store,
    /// What agents' updaters are told to run (`[versions]`).
    pub versions: versions::VersionServer,
}

impl Agents {
    pub fn new(close_all: CancellationToken, config: &Config, metrics: &Metrics) -> Agents {
        let table = Arc::new(AgentTable::default());
        let store = match config.store.kind {
            StoreKind::Memory => Store::Memory,
            StoreKind::Etcd => {
                let parent = close_all.clone();
                let new_backend: store::NewBackend = Arc::new(move |id, address| {
                    Backend::for_agent(id, address, parent.child_token())
                });
                Store::Etcd(store::Etcd::new(
                    &config.store,
                    &config.cluster.name,
                    table.clone(),
                    new_backend,
                    metrics.clone(),
                ))
            }
        };
        Agents {
            table,
            sessions: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            close_all,
            store,
            versions: versions::VersionServer::new(metrics.clone()),
        }
    }

    pub fn now() -> u64 {
        clock_ms(Instant::now())
    }

    pub fn next_stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    pub fn new_backend(&self, id: &str, address: std::net::SocketAddr) -> Arc<Backend> {
        Backend::for_agent(id, address, self.close_all.child_token())
    }

    /// Take a config's limits and static agents (startup and every reload).
    pub fn configure(&self, config: &Config) {
        self.versions.configure(config);
        let hb = &config.heartbeat;
        self.table
            .set_limits(hb.max_agents, hb.min_ready.as_millis() as u64);
        let statics = config
            .agents
            .iter()
            .map(|a| Heartbeat {
                agent: a.id.clone(),
                address: a.address,
                version: a.version,
                labels: table::labels_from(&a.labels),
                ttl: u64::MAX,
                resources: a
                    .resources
                    .iter()
                    .map(|r| Announced {
                        key: ResourceKey::new(&r.kind, &r.name),
                        labels: table::labels_from(&r.labels),
                    })
                    .collect(),
            })
            .collect();
        self.table
            .set_static(statics, Self::now(), &|id, a| self.new_backend(id, a));
        // Session tables of routes that are gone.
        let names: std::collections::HashSet<&str> =
            config.routes.iter().map(|r| r.name.as_str()).collect();
        self.lock_sessions()
            .retain(|k, _| names.contains(k.as_str()));
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sessions>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The compiled target of a resource route (its session table kept across reloads when
    /// its limits are unchanged).
    pub fn target(
        &self,
        route: &str,
        r: &ResourceRoute,
        config: &Config,
        fallback: Option<Arc<Pool>>,
        metrics: &Metrics,
    ) -> ResourceTarget {
        let sessions = {
            let mut map = self.lock_sessions();
            match map.get(route) {
                Some(s) if s.max == r.max_sessions && s.idle_ttl == r.session_idle_ttl => s.clone(),
                _ => {
                    let s = Arc::new(Sessions::new(r.max_sessions, r.session_idle_ttl));
                    map.insert(route.to_owned(), s.clone());
                    s
                }
            }
        };
        ResourceTarget {
            route: route.to_owned(),
            kind: r.kind.clone(),
            suffix: r.suffix.clone(),
            selector: table::labels_from(&r.labels),
            affinity: r.affinity,
            pick: r.pick,
            connect_timeout: r.connect_timeout,
            // The pools' defaults: agents hold tunnels for days.
            keepalive: crate::config::Keepalive::DEFAULT,
            proxy_protocol: r.proxy_protocol,
            fallback,
            sessions,
            table: self.table.clone(),
            rules: Rules {
                cluster_version: config.cluster.version,
            },
            misses: metrics.resource_misses.clone(),
            repins: metrics.session_repins.with_label_values(&[route]),
            connect_failures: metrics.agent_connect_failures.clone(),
        }
    }

    /// Refresh the gauges that are counted rather than tracked: agents by state, resources,
    /// sessions by route (at each scrape).
    pub fn export(&self, config: &Config, metrics: &Metrics) {
        // One pass over the table: agents by version and state; by state is their sum.
        let mut by_state: HashMap<AgentState, i64> = HashMap::new();
        // Versions seen in the table now: a version no agent runs any more leaves the metric.
        metrics.agent_versions.reset();
        for c in self.rollout(config).versions {
            for (state, n) in c.by_state() {
                *by_state.entry(state).or_default() += n as i64;
                metrics
                    .agent_versions
                    .with_label_values(&[c.version.as_str(), state.label()])
                    .set(n as i64);
            }
        }
        for s in AgentState::ALL {
            metrics
                .agents
                .with_label_values(&[s.label()])
                .set(by_state.get(&s).copied().unwrap_or(0));
        }
        metrics.resources.set(self.table.resource_count() as i64);
        if let Store::Etcd(e) = &self.store {
            e.export();
        }
        metrics.sessions_active.reset();
        for (route, s) in self.lock_sessions().iter() {
            metrics
                .sessions_active
                .with_label_values(&[route.as_str()])
                .set(s.len() as i64);
        }
    }

    /// Drop records expired for longer than `keep_expired()` (the running config's), every
    /// second, until `stop`.
    pub async fn sweep(
        agents: std::sync::Weak<Agents>,
        keep_expired: impl Fn() -> Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(agents) = agents.upgrade() else {
                return;
            };
            let keep = keep_expired().as_millis() as u64;
            let gone = agents.table.sweep(Self::now(), keep);
            if gone > 0 {
                tracing::info!(agents = gone, "swept expired agents");
            }
        }
    }

    /// `/debug/rollout`: agents by version and state, and the skewed ones with the reason.
    pub fn rollout(&self, config: &Config) -> sluice_core::agents::rollout::Rollout {
        let rules = Rules {
            cluster_version: config.cluster.version,
        };
        let now = Self::now();
        let agents = self.table.agents();
        sluice_core::agents::rollout::summarize(
            agents
                .iter()
                .map(|a| (&*a.id, a.version, rules.state(a, now))),
            config.cluster.version,
        )
    }

    /// `/debug/agents?q=TEXT&limit=N`: the agents whose id, address, version, state or one of
    /// whose resources contains `q` (any case; every agent without one), sorted by id, at
    /// most `limit` of them; with how many there are and how many match. Views are built for
    /// the agents returned only: with 100k agents a page of 500 stays cheap.
    pub fn agents_page(&self, config: &Config, q: &str, limit: Option<usize>) -> AgentsPage {
        let rules = Rules {
            cluster_version: config.cluster.version,
        };
        let now = Self::now();
        let q = q.trim().to_lowercase();
        let table = self.table.agents();
        let mut found: Vec<(&Arc<Agent>, AgentState)> = table
            .iter()
            .map(|a| (a, rules.state(a, now)))
            .filter(|&(a, state)| q.is_empty() || mentions(a, state, &q))
            .collect();
        let matching = found.len();
        found.sort_unstable_by(|x, y| x.0.id.cmp(&y.0.id));
        found.truncate(limit.unwrap_or(usize::MAX));
        AgentsPage {
            agents: found
                .into_iter()
                .map(|(a, state)| AgentView::of(a, state, now))
                .collect(),
            total: table.len(),
            matching,
        }
    }

    /// `/debug/resources`: each resource once, with its agents.
    pub fn resources_view(&self, config: &Config) -> Vec<ResourceView> {
        let rules = Rules {
            cluster_version: config.cluster.version,
        };
        let now = Self::now();
        self.table
            .resources()
            .into_iter()
            .map(|(key, records)| ResourceView {
                kind: key.kind().to_owned(),
                name: key.name().to_owned(),
                agents: records
                    .iter()
                    .map(|r| {
                        let mut view = AgentView::of(&r.agent, rules.state(&r.agent, now), now);
                        view.labels = r
                            .labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect();
                        view.resources = None;
                        view
                    })
                    .collect(),
            })
            .collect()
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AgentView {
    pub id: String,
    pub address: String,
    pub version: Option<String>,
    pub state: String,
    pub source: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds until it expires (negative: expired; absent: never, a static agent, or when
    /// etcd's lease runs out, `source = "store"`).
    pub expires_in_seconds: Option<f64>,
    pub ready_for_seconds: f64,
    pub active_connections: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<String>>,
}

impl AgentView {
    fn of(a: &Agent, state: AgentState, now: u64) -> AgentView {
        AgentView {
            id: a.id.to_string(),
            address: a.backend.address.to_string(),
            version: a.version.map(|v| v.to_string()),
            state: state.label().to_owned(),
            // An agent from the shared store expires when etcd says: no deadline here.
            source: if a.stored.is_some() {
                "store".to_owned()
            } else {
                format!("{:?}", a.source).to_lowercase()
            },
            labels: a
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            expires_in_seconds: (a.expires() != u64::MAX)
                .then(|| (a.expires() as f64 - now as f64) / 1000.0),
            ready_for_seconds: now.saturating_sub(a.ready_at) as f64 / 1000.0,
            active_connections: a.backend.active(),
            resources: Some(a.resources.iter().map(|r| format!("{:?}", r.key)).collect()),
        }
    }
}

/// A page of `/debug/agents`.
pub struct AgentsPage {
    pub agents: Vec<AgentView>,
    /// Agents in the table.
    pub total: usize,
    /// Agents matching the query (before the limit).
    pub matching: usize,
}

/// Whether `q` (lower case) is in the agent's id, address, version, state or a resource.
fn mentions(a: &Agent, state: AgentState, q: &str) -> bool {
    let has = |s: &str| s.to_lowercase().contains(q);
    has(&a.id)
        || has(&a.backend.address.to_string())
        || a.version.is_some_and(|v| has(&v.to_string()))
        || state.label().contains(q)
        || a.resources.iter().any(|r| has(&format!("{:?}", r.key)))
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ResourceView {
    pub kind: String,
    pub name: String,
    pub agents: Vec<AgentView>,
}
