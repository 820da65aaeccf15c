//! The agent heartbeat table: resource (kind, name) → the agents that announced it.
//!
//! Owns: applying heartbeats (announce, keep-alive, goodbye), expiry and sweeping, and the
//! eligibility rules (expiry, warm-up, version skew, label selectors). Pure: time comes in as
//! milliseconds from the caller's clock, and nothing here touches a socket.
//!
//! Built for 100,000 agents × 10 resources with heartbeats arriving while the router looks up
//! at connection rate. Lookups never take a lock: both maps are `papaya` (lock-free reads), and
//! a resource's agents are an immutable `Arc<[Record<B>]>` replaced as a whole. A keep-alive that
//! changes nothing but the expiry is one atomic store. Writers for the same agent are
//! serialised by a small sharded mutex that readers never touch.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::Endpoint;

/// `kind` and `name` in one string (`kind` NUL `name`): one allocation, cheap to hash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey(Box<str>);

impl ResourceKey {
    pub fn new(kind: &str, name: &str) -> ResourceKey {
        let mut s = String::with_capacity(kind.len() + 1 + name.len());
        s.push_str(kind);
        s.push('\0');
        s.push_str(name);
        ResourceKey(s.into_boxed_str())
    }

    pub fn kind(&self) -> &str {
        self.0.split('\0').next().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.0.split_once('\0').map_or("", |(_, n)| n)
    }
}

impl fmt::Debug for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind(), self.name())
    }
}

/// Labels, sorted by key; small and immutable.
pub type Labels = Box<[(Box<str>, Box<str>)]>;

pub fn labels_from(map: &BTreeMap<String, String>) -> Labels {
    map.iter()
        .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
        .collect()
}

fn label<'a>(labels: &'a [(Box<str>, Box<str>)], key: &str) -> Option<&'a str> {
    labels
        .binary_search_by(|(k, _)| (**k).cmp(key))
        .ok()
        .map(|i| &*labels[i].1)
}

/// A `major.minor.patch` version (a pre-release or build suffix is ignored for ordering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(text: &str) -> Option<Version> {
        let core = text.trim().trim_start_matches('v');
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let mut next = || -> Option<u32> {
            match parts.next() {
                None => Some(0),
                Some(p) => p.parse().ok(),
            }
        };
        let v = Version(next()?, next()?, next()?);
        parts.next().is_none().then_some(v)
    }

    /// Teleport's rule (seeds/agent-update-management): an agent is never newer than the
    /// cluster and at most one major version older.
    pub fn compatible_with(self, cluster: Version) -> bool {
        self <= cluster && self.0 + 1 >= cluster.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Where an agent's records came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Heartbeat,
    /// An `[[agent]]` entry of the config: never expires, replaced by reloads.
    Static,
}

/// One resource as an agent announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub key: ResourceKey,
    pub labels: Labels,
}

/// An agent as of its last heartbeat. Immutable but for its expiry and owning stream: a
/// heartbeat that changes anything else builds a new `Agent` (keeping the `backend`, hence
/// the active-connection count, when the address is the same).
pub struct Agent<B> {
    pub id: Box<str>,
    /// Its dial address and active connections; `name` is the agent id.
    pub backend: Arc<B>,
    pub version: Option<Version>,
    pub labels: Labels,
    pub source: Source,
    /// The credential that announced it (a token's name, `cert`, or `config`): another
    /// scoped credential may not overwrite or delete it.
    pub owner: Box<str>,
    /// Ready for sessions from this moment (first seen + `min_ready`), ms on the table clock.
    pub ready_at: u64,
    /// First seen, ms on the table clock.
    pub since: u64,
    /// Announcing its current version since, ms on the table clock: an agent updated in
    /// place (same address) keeps `since` and its warm-up, but not this.
    pub version_since: u64,
    expires: AtomicU64,
    /// The streaming request that keeps it alive (0: none): when that stream ends, the agent
    /// goes — unless another heartbeat took it over meanwhile.
    stream: AtomicU64,
    /// What it announced, sorted.
    pub resources: Box<[Announced]>,
    /// Where it stands in a shared store (`None`: this edge's own, or static).
    pub stored: Option<Box<StoreMeta>>,
}

/// What an agent announced through a shared store carries besides its heartbeat: the key's
/// revision and lease, and the fields every edge must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreMeta {
    /// The revision that last wrote the agent's key: writes are guarded on it, and older
    /// events are ignored.
    pub mod_revision: i64,
    pub lease: i64,
    /// The heartbeat's TTL (the lease's), ms.
    pub ttl_ms: u64,
    /// First announced, on the first edge's wall clock (ms since the Unix epoch).
    pub first_seen_unix_ms: u64,
    /// The edge and stream that announced it, when it came on a stream.
    pub stream: Option<StreamOwner>,
}

/// A heartbeat stream, named across edges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOwner {
    pub edge: String,
    pub id: u64,
}

impl<B: Endpoint> fmt::Debug for Agent<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("address", &self.backend.address())
            .field("version", &self.version)
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl<B: Endpoint> Agent<B> {
    /// Whether `hb` (normalized) announces exactly what this agent does: same address,
    /// version, labels and resources.
    fn announces_same(&self, hb: &Heartbeat) -> bool {
        self.backend.address() == hb.address
            && self.version == hb.version
            && self.labels == hb.labels
            && *self.resources == *hb.resources
    }

    /// The dial target for `hb`: this agent's (its active count) when the address is the same.
    fn backend_for(
        old: Option<&Agent<B>>,
        hb: &Heartbeat,
        new_backend: NewBackend<'_, B>,
    ) -> Arc<B> {
        match old {
            Some(o) if o.backend.address() == hb.address => o.backend.clone(),
            _ => new_backend(&hb.agent, hb.address),
        }
    }

    pub fn expires(&self) -> u64 {
        self.expires.load(Ordering::Relaxed)
    }

    /// A label of the agent.
    pub fn label(&self, key: &str) -> Option<&str> {
        label(&self.labels, key)
    }
}

/// Why an agent can or cannot take a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Ready,
    /// Seen for less than `min_ready`.
    Warming,
    Expired,
    /// Newer than the cluster, or more than one major version older.
    VersionSkew,
}

impl AgentState {
    pub const ALL: [AgentState; 4] = [
        AgentState::Ready,
        AgentState::Warming,
        AgentState::Expired,
        AgentState::VersionSkew,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AgentState::Ready => "ready",
            AgentState::Warming => "warming",
            AgentState::Expired => "expired",
            AgentState::VersionSkew => "version_skew",
        }
    }
}

/// One (resource, agent) pair: the unit the router chooses from.
pub struct Record<B> {
    pub agent: Arc<Agent<B>>,
    /// The resource's own labels (as this agent announced them).
    pub labels: Labels,
}

impl<B> Clone for Record<B> {
    fn clone(&self) -> Self {
        Record {
            agent: self.agent.clone(),
            labels: self.labels.clone(),
        }
    }
}

impl<B: Endpoint> fmt::Debug for Record<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("agent", &self.agent)
            .field("labels", &self.labels)
            .finish()
    }
}

impl<B: Endpoint> Record<B> {
    /// A label of the resource, else of the agent.
    pub fn label(&self, key: &str) -> Option<&str> {
        label(&self.labels, key).or_else(|| self.agent.label(key))
    }

    /// Every `selector` label matches (resource labels first, then the agent's).
    pub fn selected_by(&self, selector: &[(Box<str>, Box<str>)]) -> bool {
        selector.iter().all(|(k, v)| self.label(k) == Some(&**v))
    }
}

/// The rules that decide eligibility, from `[cluster]` and `[heartbeat]`.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub cluster_version: Option<Version>,
}

impl Rules {
    pub fn state<B: Endpoint>(&self, agent: &Agent<B>, now: u64) -> AgentState {
        if agent.expires() <= now {
            return AgentState::Expired;
        }
        if let Some(cluster) = self.cluster_version {
            match agent.version {
                Some(v) if v.compatible_with(cluster) => {}
                _ => return AgentState::VersionSkew,
            }
        }
        if now < agent.ready_at {
            return AgentState::Warming;
        }
        AgentState::Ready
    }
}

/// One heartbeat, validated (the API layer parses and checks bounds).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub agent: String,
    pub address: std::net::SocketAddr,
    pub version: Option<Version>,
    pub labels: Labels,
    /// Time to live, ms.
    pub ttl: u64,
    pub resources: Vec<Announced>,
}

impl Heartbeat {
    /// Resources sorted by key, each once: the form an `Agent` keeps them in.
    pub fn normalize(&mut self) {
        self.resources.sort_by(|a, b| a.key.cmp(&b.key));
        self.resources.dedup_by(|a, b| a.key == b.key);
    }
}

/// What applying a heartbeat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new agent.
    Joined,
    /// Its resources, address, version or labels changed.
    Changed,
    /// Only its expiry moved.
    KeptAlive,
}

/// Why a heartbeat was refused by the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("agent `{0}` was announced by another credential")]
    Owned(String),
    #[error("the table is full ({0} agents)")]
    Full(usize),
    #[error("agent `{0}` is configured statically")]
    Static(String),
}

/// Makes the `Backend` of a new agent (the caller knows metrics and stop tokens).
pub type NewBackend<'a, B> = &'a dyn Fn(&str, std::net::SocketAddr) -> Arc<B>;

const WRITE_SHARDS: usize = 64;

pub struct AgentTable<B> {
    agents: papaya::HashMap<Box<str>, Arc<Agent<B>>>,
    resources: papaya::HashMap<ResourceKey, Arc<[Record<B>]>>,
    /// Serialises writers of the same agent (by hash of its id).
    writers: [Mutex<()>; WRITE_SHARDS],
    max_agents: AtomicU64,
    min_ready: AtomicU64,
}

impl<B: Endpoint> Default for AgentTable<B> {
    fn default() -> Self {
        AgentTable::new(1_000_000, 0)
    }
}

impl<B: Endpoint> AgentTable<B> {
    pub fn new(max_agents: usize, min_ready_ms: u64) -> AgentTable<B> {
        // Blocking resizes: an incremental one only progresses on writes, and until it ends
        // every lookup searches both tables (at 1M records, lookup p99 went from 7.1 µs to
        // 1.4 µs with this; bench/RESULTS.md). Lookups run at connection rate and matter more
        // than the tail latency of the rare write that resizes.
        AgentTable {
            agents: papaya::HashMap::builder()
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            resources: papaya::HashMap::builder()
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            writers: std::array::from_fn(|_| Mutex::new(())),
            max_agents: AtomicU64::new(max_agents as u64),
            min_ready: AtomicU64::new(min_ready_ms),
        }
    }

    /// New limits (a reload).
    pub fn set_limits(&self, max_agents: usize, min_ready_ms: u64) {
        self.max_agents.store(max_agents as u64, Ordering::Relaxed);
        self.min_ready.store(min_ready_ms, Ordering::Relaxed);
    }

    fn writer(&self, id: &str) -> std::sync::MutexGuard<'_, ()> {
        let shard = crate::balance::fnv1a(id.as_bytes()) as usize % WRITE_SHARDS;
        self.writers[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn agent(&self, id: &str) -> Option<Arc<Agent<B>>> {
        self.agents.pin().get(id).cloned()
    }

    /// The records of one resource; lock-free.
    pub fn lookup(&self, key: &ResourceKey) -> Option<Arc<[Record<B>]>> {
        self.resources.pin().get(key).cloned()
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Every agent (for views and metrics; a copy of the `Arc`s).
    pub fn agents(&self) -> Vec<Arc<Agent<B>>> {
        self.agents.pin().values().cloned().collect()
    }

    /// Every resource with its records, sorted by key.
    pub fn resources(&self) -> Vec<(ResourceKey, Arc<[Record<B>]>)> {
        let mut v: Vec<_> = self
            .resources
            .pin()
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Apply one heartbeat at `now` from credential `owner` (`scoped`: it may not take over
    /// an agent another credential announced), on streaming request `stream` (0: a POST).
    pub fn apply(
        &self,
        mut hb: Heartbeat,
        owner: &str,
        scoped: bool,
        stream: u64,
        now: u64,
        new_backend: NewBackend<'_, B>,
    ) -> Result<Applied, Refused> {
        let _w = self.writer(&hb.agent);
        let old = self.agent(&hb.agent);
        if let Some(old) = &old {
            if old.source == Source::Static {
                return Err(Refused::Static(hb.agent));
            }
            if scoped && *old.owner != *owner && old.expires() > now {
                return Err(Refused::Owned(hb.agent));
            }
        } else if self.agents.len() as u64 >= self.max_agents.load(Ordering::Relaxed) {
            return Err(Refused::Full(self.agents.len()));
        }
        hb.normalize();
        let expires = now.saturating_add(hb.ttl);
        if let Some(old) = &old {
            if *old.owner == *owner && old.announces_same(&hb) {
                old.expires.store(expires, Ordering::Relaxed);
                old.stream.store(stream, Ordering::Relaxed);
                return Ok(Applied::KeptAlive);
            }
        }
        let backend = Agent::backend_for(old.as_deref(), &hb, new_backend);
        // First seen: kept while the address is (the agent keeps its warm-up).
        let since = match &old {
            Some(o) if Arc::ptr_eq(&o.backend, &backend) => o.since,
            _ => now,
        };
        let version_since = match &old {
            Some(o) if o.version == hb.version => o.version_since.max(since),
            _ => now,
        };
        let agent = Arc::new(Agent {
            id: hb.agent.into_boxed_str(),
            backend,
            version: hb.version,
            labels: hb.labels,
            source: Source::Heartbeat,
            owner: owner.into(),
            ready_at: since.saturating_add(self.min_ready.load(Ordering::Relaxed)),
            since,
            version_since,
            expires: AtomicU64::new(expires),
            stream: AtomicU64::new(stream),
            resources: hb.resources.into_boxed_slice(),
            stored: None,
        });
        let applied = if old.is_some() {
            Applied::Changed
        } else {
            Applied::Joined
        };
        self.install(agent, old.as_deref());
        Ok(applied)
    }

    /// Put `agent` in both maps, replacing `old` (same id) in every resource either lists.
    fn install(&self, agent: Arc<Agent<B>>, old: Option<&Agent<B>>) {
        let id = agent.id.clone();
        for a in agent.resources.iter() {
            let record = Record {
                agent: agent.clone(),
                labels: a.labels.clone(),
            };
            self.resources.pin().compute(a.key.clone(), |entry| {
                let mut list: Vec<Record<B>> = match entry {
                    Some((_, records)) => records
                        .iter()
                        .filter(|r| r.agent.id != id)
                        .cloned()
                        .collect(),
                    None => Vec::with_capacity(1),
                };
                list.push(record.clone());
                papaya::Operation::Insert::<_, ()>(list.into())
            });
        }
        if let Some(old) = old {
            for a in old.resources.iter() {
                if agent
                    .resources
                    .binary_search_by(|x| x.key.cmp(&a.key))
                    .is_err()
                {
                    self.drop_record(&a.key, &id);
                }
            }
        }
        self.agents.pin().insert(id, agent);
    }

    fn drop_record(&self, key: &ResourceKey, id: &str) {
        self.resources
            .pin()
            .compute(key.clone(), |entry| match entry {
                Some((_, records)) => {
                    let list: Vec<Record<B>> = records
                        .iter()
                        .filter(|r| &*r.agent.id != id)
                        .cloned()
                        .collect();
                    if list.is_empty() {
                        papaya::Operation::Remove
                    } else if list.len() == records.len() {
                        papaya::Operation::Abort(())
                    } else {
                        papaya::Operation::Insert(list.into())
                    }
                }
                None => papaya::Operation::Abort(()),
            });
    }

    /// Remove an agent and all its records. `stream`: only if that stream still owns it (a
    /// stream that ended after the agent reconnected must not remove the new session).
    /// `owner`/`scoped` as for `apply`.
    pub fn remove(
        &self,
        id: &str,
        stream: Option<u64>,
        owner: Option<(&str, bool)>,
    ) -> Result<bool, Refused> {
        let _w = self.writer(id);
        let Some(agent) = self.agent(id) else {
            return Ok(false);
        };
        if let Some(s) = stream {
            if agent.stream.load(Ordering::Relaxed) != s {
                return Ok(false);
            }
        }
        if let Some((owner, scoped)) = owner {
            if agent.source == Source::Static {
                return Err(Refused::Static(id.into()));
            }
            if scoped && *agent.owner != *owner {
                return Err(Refused::Owned(id.into()));
            }
        }
        self.evict(&agent);
        Ok(true)
    }

    fn evict(&self, agent: &Agent<B>) {
        for a in agent.resources.iter() {
            self.drop_record(&a.key, &agent.id);
        }
        self.agents.pin().remove(&agent.id);
    }

    /// Drop agents expired for longer than `keep_expired` ms (they are listed as expired
    /// until then). Returns how many went.
    pub fn sweep(&self, now: u64, keep_expired: u64) -> usize {
        let dead: Vec<Arc<Agent<B>>> = self
            .agents
            .pin()
            .values()
            .filter(|a| {
                a.source == Source::Heartbeat && a.expires().saturating_add(keep_expired) <= now
            })
            .cloned()
            .collect();
        let mut n = 0;
        for a in dead {
            let _w = self.writer(&a.id);
            // Still the same, still expired (a heartbeat may have come in between).
            let current = self.agent(&a.id);
            if current.as_ref().is_some_and(|c| {
                Arc::ptr_eq(c, &a) && c.expires().saturating_add(keep_expired) <= now
            }) {
                self.evict(&a);
                n += 1;
            }
        }
        n
    }

    /// Install what the shared store says of an agent (a watched put, or this edge's own
    /// write once the store took it): it never expires by this edge's clock, and counts as
    /// first seen when the store says (`now_unix`: the wall clock at `now`). Ignored when the
    /// table already holds that revision or a later one, or a static agent of that id.
    pub fn put_stored(
        &self,
        mut hb: Heartbeat,
        owner: &str,
        meta: StoreMeta,
        (now, now_unix): (u64, u64),
        new_backend: NewBackend<'_, B>,
    ) -> Option<Applied> {
        let _w = self.writer(&hb.agent);
        let old = self.agent(&hb.agent);
        if let Some(o) = &old {
            if o.source == Source::Static
                || o.stored
                    .as_ref()
                    .is_some_and(|m| m.mod_revision >= meta.mod_revision)
            {
                return None;
            }
        }
        hb.normalize();
        let backend = Agent::backend_for(old.as_deref(), &hb, new_backend);
        let age = now_unix.saturating_sub(meta.first_seen_unix_ms);
        let since = now.saturating_sub(age);
        // A version change is dated when this edge hears of it (the record has no field for
        // it): within the watch's delay of the other edges.
        let version_since = match &old {
            Some(o) if o.version == hb.version => o.version_since,
            Some(_) => now,
            None => since,
        };
        let agent = Arc::new(Agent {
            id: hb.agent.into_boxed_str(),
            backend,
            version: hb.version,
            labels: hb.labels,
            source: Source::Heartbeat,
            owner: owner.into(),
            ready_at: since.saturating_add(self.min_ready.load(Ordering::Relaxed)),
            since,
            version_since,
            expires: AtomicU64::new(u64::MAX),
            stream: AtomicU64::new(0),
            resources: hb.resources.into_boxed_slice(),
            stored: Some(Box::new(meta)),
        });
        let applied = if old.is_some() {
            Applied::Changed
        } else {
            Applied::Joined
        };
        self.install(agent, old.as_deref());
        Some(applied)
    }

    /// The store deleted an agent's key at `revision`: gone at once when it `left` (goodbye,
    /// stream end), else expired from `now` (listed as expired for `keep_expired`). Ignored
    /// when the table holds a later revision, or an agent that is not the store's.
    pub fn delete_stored(&self, id: &str, revision: i64, left: bool, now: u64) -> bool {
        let _w = self.writer(id);
        let Some(agent) = self.agent(id) else {
            return false;
        };
        match &agent.stored {
            Some(m) if m.mod_revision < revision => {}
            _ => return false,
        }
        if left {
            self.evict(&agent);
        } else if agent.expires() > now {
            agent.expires.store(now, Ordering::Relaxed);
        }
        true
    }

    /// Make the static agents exactly `agents` (a config load): new ones join, changed ones
    /// are replaced, ones no longer configured leave. A heartbeat agent with the same id is
    /// replaced by the static one.
    pub fn set_static(&self, agents: Vec<Heartbeat>, now: u64, new_backend: NewBackend<'_, B>) {
        let wanted: std::collections::HashSet<String> =
            agents.iter().map(|a| a.agent.clone()).collect();
        for old in self.agents() {
            if old.source == Source::Static && !wanted.contains(&*old.id) {
                let _w = self.writer(&old.id);
                self.evict(&old);
            }
        }
        for mut hb in agents {
            let _w = self.writer(&hb.agent);
            let old = self.agent(&hb.agent);
            hb.normalize();
            if old
                .as_ref()
                .is_some_and(|o| o.source == Source::Static && o.announces_same(&hb))
            {
                continue;
            }
            let backend = Agent::backend_for(old.as_deref(), &hb, new_backend);
            let agent = Arc::new(Agent {
                id: hb.agent.into_boxed_str(),
                backend,
                version: hb.version,
                labels: hb.labels,
                source: Source::Static,
                owner: "config".into(),
                ready_at: now,
                since: now,
                version_since: now,
                expires: AtomicU64::new(u64::MAX),
                stream: AtomicU64::new(0),
                resources: hb.resources.into_boxed_slice(),
                stored: None,
            });
            self.install(agent, old.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    struct Dial(SocketAddr);

    impl Endpoint for Dial {
        fn address(&self) -> SocketAddr {
            self.0
        }
        fn active(&self) -> u64 {
            0
        }
    }

    fn backend(_id: &str, addr: SocketAddr) -> Arc<Dial> {
        Arc::new(Dial(addr))
    }

    fn hb(agent: &str, port: u16, version: &str, ttl: u64, names: &[&str]) -> Heartbeat {
        Heartbeat {
            agent: agent.into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            version: Version::parse(version),
            labels: Box::new([]),
            ttl,
            resources: names
                .iter()
                .map(|n| Announced {
                    key: ResourceKey::new("app", n),
                    labels: Box::new([]),
                })
                .collect(),
        }
    }

    /// `apply` as most tests call it: one token ("t"), unscoped, outside any stream.
    fn beat(t: &AgentTable<Dial>, h: Heartbeat, now: u64) -> Result<Applied, Refused> {
        t.apply(h, "t", false, 0, now, &backend)
    }

    fn ids(t: &AgentTable<Dial>, name: &str) -> Vec<String> {
        let mut v: Vec<String> = t
            .lookup(&ResourceKey::new("app", name))
            .map(|r| r.iter().map(|r| r.agent.id.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn versions_parse_and_follow_the_update_rules() {
        assert_eq!(Version::parse("17.2.1"), Some(Version(17, 2, 1)));
        assert_eq!(Version::parse("v16.4"), Some(Version(16, 4, 0)));
        assert_eq!(Version::parse("18.0.0-beta.1"), Some(Version(18, 0, 0)));
        assert_eq!(Version::parse("x.1"), None);
        assert_eq!(Version::parse("1.2.3.4"), None);
        let cluster = Version(17, 2, 0);
        assert!(Version(17, 2, 0).compatible_with(cluster));
        assert!(Version(16, 0, 0).compatible_with(cluster));
        assert!(!Version(17, 2, 1).compatible_with(cluster), "newer patch");
        assert!(
            !Version(15, 9, 9).compatible_with(cluster),
            "two majors older"
        );
    }

    #[test]
    fn two_agents_one_resource_two_records() {
        let t = AgentTable::default();
        beat(&t, hb("a1", 1, "17.0.0", 1000, &["myapp"]), 0).unwrap();
        beat(&t, hb("a2", 2, "17.0.0", 1000, &["myapp", "other"]), 0).unwrap();
        assert_eq!(ids(&t, "myapp"), ["a1", "a2"]);
        assert_eq!(ids(&t, "other"), ["a2"]);
        assert_eq!(t.resource_count(), 2);
        assert_eq!(t.agent_count(), 2);
        // a2 stops announcing myapp: its record goes, a1's stays.
        let r = beat(&t, hb("a2", 2, "17.0.0", 1000, &["other"]), 5);
        assert_eq!(r, Ok(Applied::Changed));
        assert_eq!(ids(&t, "myapp"), ["a1"]);
    }

    #[test]
    fn keepalive_moves_only_the_expiry_and_keeps_the_object() {
        let t = AgentTable::default();
        beat(&t, hb("a1", 1, "17.0.0", 100, &["x"]), 0).unwrap();
        let before = t.agent("a1").unwrap();
        let r = beat(&t, hb("a1", 1, "17.0.0", 100, &["x"]), 50);
        assert_eq!(r, Ok(Applied::KeptAlive));
        let after = t.agent("a1").unwrap();
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(after.expires(), 150);
        // A new address is a change; a new backend object.
        beat(&t, hb("a1", 9, "17.0.0", 100, &["x"]), 60).unwrap();
        let moved = t.agent("a1").unwrap();
        assert!(!Arc::ptr_eq(&before.backend, &moved.backend));
        assert_eq!(moved.since, 60);
    }

    #[test]
    fn an_update_in_place_keeps_the_warm_up_but_dates_the_new_version() {
        let t = AgentTable::default();
        beat(&t, hb("a1", 1, "17.0.0", 100, &["x"]), 10).unwrap();
        beat(&t, hb("a1", 1, "17.0.0", 100, &["x", "y"]), 40).unwrap();
        let a = t.agent("a1").unwrap();
        assert_eq!(
            (a.since, a.version_since),
            (10, 10),
            "same version: unchanged"
        );
        beat(&t, hb("a1", 1, "17.1.0", 100, &["x", "y"]), 70).unwrap();
        let a = t.agent("a1").unwrap();
        assert_eq!((a.since, a.version_since), (10, 70));
    }

    #[test]
    fn states_expiry_warmup_and_version_skew() {
        let t = AgentTable::new(10, 30);
        let rules = Rules {
            cluster_version: Version::parse("17.2.0"),
        };
        beat(&t, hb("ok", 1, "17.1.0", 100, &["x"]), 0).unwrap();
        beat(&t, hb("new", 2, "18.0.0", 100, &["x"]), 0).unwrap();
        beat(&t, hb("old", 3, "15.0.0", 100, &["x"]), 0).unwrap();
        beat(&t, hb("nover", 4, "", 100, &["x"]), 0).unwrap();
        let s = |id: &str, now| rules.state(&t.agent(id).unwrap(), now);
        assert_eq!(s("ok", 10), AgentState::Warming);
        assert_eq!(s("ok", 30), AgentState::Ready);
        assert_eq!(s("new", 30), AgentState::VersionSkew);
        assert_eq!(s("old", 30), AgentState::VersionSkew);
        assert_eq!(s("nover", 30), AgentState::VersionSkew);
        assert_eq!(s("ok", 100), AgentState::Expired);
        let any = Rules {
            cluster_version: None,
        };
        assert_eq!(any.state(&t.agent("new").unwrap(), 50), AgentState::Ready);
    }

    #[test]
    fn sweep_keeps_expired_agents_listed_for_a_while_then_drops_them() {
        let t = AgentTable::default();
        beat(&t, hb("a1", 1, "1.0.0", 100, &["x"]), 0).unwrap();
        beat(&t, hb("a2", 2, "1.0.0", 1000, &["x"]), 0).unwrap();
        assert_eq!(t.sweep(150, 100), 0);
        assert_eq!(t.sweep(200, 100), 1);
        assert_eq!(ids(&t, "x"), ["a2"]);
        assert_eq!(t.sweep(5000, 0), 1);
        assert_eq!(t.resource_count(), 0);
        assert_eq!(t.agent_count(), 0);
    }

    #[test]
    fn a_stream_removes_only_what_it_still_owns() {
        let t = AgentTable::default();
        t.apply(
            hb("a1", 1, "1.0.0", 1000, &["x"]),
            "t",
            false,
            7,
            0,
            &backend,
        )
        .unwrap();
        // The agent reconnected on stream 8 before stream 7's end was noticed.
        t.apply(
            hb("a1", 1, "1.0.0", 1000, &["x"]),
            "t",
            false,
            8,
            1,
            &backend,
        )
        .unwrap();
        assert_eq!(t.remove("a1", Some(7), None), Ok(false));
        assert_eq!(ids(&t, "x"), ["a1"]);
        assert_eq!(t.remove("a1", Some(8), None), Ok(true));
        assert!(ids(&t, "x").is_empty());
    }

    #[test]
    fn scoped_credentials_cannot_take_over_or_delete_others_agents() {
        let t = AgentTable::default();
        t.apply(
            hb("a1", 1, "1.0.0", 1000, &["x"]),
            "east",
            true,
            0,
            0,
            &backend,
        )
        .unwrap();
        let r = t.apply(
            hb("a1", 6, "1.0.0", 1000, &["x"]),
            "west",
            true,
            0,
            1,
            &backend,
        );
        assert_eq!(r, Err(Refused::Owned("a1".into())));
        assert_eq!(t.agent("a1").unwrap().backend.address().port(), 1);
        assert_eq!(
            t.remove("a1", None, Some(("west", true))),
            Err(Refused::Owned("a1".into()))
        );
        // An unscoped credential may.
        assert_eq!(t.remove("a1", None, Some(("admin", false))), Ok(true));
    }

    #[test]
    fn the_table_is_bounded() {
        let t = AgentTable::new(2, 0);
        for (i, id) in ["a", "b"].iter().enumerate() {
            beat(&t, hb(id, i as u16, "1.0.0", 10, &["x"]), 0).unwrap();
        }
        let r = beat(&t, hb("c", 3, "1.0.0", 10, &["x"]), 0);
        assert_eq!(r, Err(Refused::Full(2)));
        // Known agents still heartbeat.
        assert!(beat(&t, hb("a", 0, "1.0.0", 10, &["x"]), 1).is_ok());
    }

    #[test]
    fn static_agents_follow_the_config_and_never_expire() {
        let t = AgentTable::default();
        t.set_static(
            vec![
                hb("s1", 1, "1.0.0", 0, &["x"]),
                hb("s2", 2, "1.0.0", 0, &["y"]),
            ],
            0,
            &backend,
        );
        assert_eq!(ids(&t, "x"), ["s1"]);
        let rules = Rules {
            cluster_version: None,
        };
        assert_eq!(
            rules.state(&t.agent("s1").unwrap(), u64::MAX - 1),
            AgentState::Ready
        );
        let r = beat(&t, hb("s1", 5, "1.0.0", 10, &["x"]), 0);
        assert_eq!(r, Err(Refused::Static("s1".into())));
        t.set_static(vec![hb("s2", 2, "1.0.0", 0, &["y", "z"])], 1, &backend);
        assert!(ids(&t, "x").is_empty());
        assert_eq!(ids(&t, "z"), ["s2"]);
        assert_eq!(t.sweep(u64::MAX, 0), 0);
    }

    #[test]
    fn selectors_match_resource_then_agent_labels() {
        let agent_labels: Labels = Box::new([("region".into(), "east".into())]);
        let mut h = hb("a1", 1, "1.0.0", 10, &[]);
        h.labels = agent_labels;
        h.resources.push(Announced {
            key: ResourceKey::new("db", "pg"),
            labels: Box::new([
                ("env".into(), "prod".into()),
                ("region".into(), "west".into()),
            ]),
        });
        let t = AgentTable::default();
        beat(&t, h, 0).unwrap();
        let recs = t.lookup(&ResourceKey::new("db", "pg")).unwrap();
        let sel = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (Box::from(*k), Box::from(*v)))
                .collect()
        };
        assert!(recs[0].selected_by(&sel(&[("env", "prod")])));
        assert!(
            recs[0].selected_by(&sel(&[("region", "west")])),
            "the resource's label wins"
        );
        assert!(!recs[0].selected_by(&sel(&[("region", "east")])));
        assert!(!recs[0].selected_by(&sel(&[("team", "x")])));
    }

    fn meta(rev: i64) -> StoreMeta {
        StoreMeta {
            mod_revision: rev,
            lease: 7,
            ttl_ms: 1000,
            first_seen_unix_ms: 50_000,
            stream: None,
        }
    }

    #[test]
    fn the_store_orders_by_revision_and_decides_expiry() {
        let t: AgentTable<Dial> = AgentTable::new(10, 2_000);
        let put = |rev, names: &[&str], now| {
            t.put_stored(
                hb("a1", 1, "17.0.0", 1000, names),
                "east",
                meta(rev),
                (now, 60_000),
                &backend,
            )
        };
        assert_eq!(put(5, &["x"], 100_000), Some(Applied::Joined));
        let a = t.agent("a1").unwrap();
        // First seen 10 s ago by the store's wall clock: the warm-up is over already.
        assert_eq!(a.since, 90_000);
        assert_eq!(a.ready_at, 92_000);
        // Never expires by this edge's clock.
        assert_eq!(a.expires(), u64::MAX);
        // An older event after a newer write is ignored.
        assert_eq!(put(4, &["y"], 100_000), None);
        assert_eq!(ids(&t, "x"), ["a1"]);
        assert_eq!(put(6, &["y"], 100_000), Some(Applied::Changed));
        assert_eq!(ids(&t, "y"), ["a1"]);
        assert!(ids(&t, "x").is_empty());
        // A deletion older than the record means nothing; a lease expiry lists it expired.
        assert!(!t.delete_stored("a1", 6, false, 101_000));
        assert!(t.delete_stored("a1", 7, false, 101_000));
        let rules = Rules {
            cluster_version: None,
        };
        assert_eq!(
            rules.state(&t.agent("a1").unwrap(), 101_000),
            AgentState::Expired
        );
        assert_eq!(t.sweep(101_500, 1_000), 0);
        assert_eq!(t.sweep(102_000, 1_000), 1);
        // A goodbye removes at once.
        put(8, &["y"], 103_000);
        assert!(t.delete_stored("a1", 9, true, 103_000));
        assert!(t.agent("a1").is_none());
        // The config's agent wins over the store's.
        t.set_static(vec![hb("a2", 2, "17.0.0", 0, &["z"])], 0, &backend);
        assert_eq!(
            t.put_stored(
                hb("a2", 3, "17.0.0", 1000, &["z"]),
                "east",
                meta(10),
                (0, 0),
                &backend
            ),
            None
        );
        assert!(!t.delete_stored("a2", 11, true, 0));
        assert_eq!(t.agent("a2").unwrap().source, Source::Static);
    }
}
