//! The session-affine resource router: a route whose target is a resource in the agent table.
//!
//! Owns: turning an SNI into a resource name, the session table (bounded, least recently used
//! out first, idle sessions expire), choosing an eligible agent (the session's, else a random
//! one), and dialling with fallback to the other eligible agents in random order, as
//! Teleport's proxy does. A session points at an agent id; it dies with its agent: once that
//! agent is no longer eligible, the next connection starts a new session elsewhere (a re-pin).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec};
use rand::seq::SliceRandom;
use rand::Rng;

use super::{AgentTable, Record};
use crate::config::{Affinity, Keepalive, Pick, ProxyProtocol};
use crate::upstream::{ActiveGuard, ConnectError, Dialed, Pool};
use sluice_core::agents::table::{AgentState, Labels, ResourceKey, Rules};

/// Sessions of one route: a hash of (resource, client IP[, SNI]) → agent id.
pub struct Sessions {
    cache: moka::sync::Cache<u64, Arc<str>>,
    pub max: u64,
    pub idle_ttl: Duration,
}

impl Sessions {
    pub fn new(max: u64, idle_ttl: Duration) -> Sessions {
        let mut b = moka::sync::Cache::builder()
            .max_capacity(max)
            .eviction_policy(moka::policy::EvictionPolicy::lru());
        if !idle_ttl.is_zero() {
            b = b.time_to_idle(idle_ttl);
        }
        Sessions {
            cache: b.build(),
            max,
            idle_ttl,
        }
    }

    pub fn get(&self, key: u64) -> Option<Arc<str>> {
        self.cache.get(&key)
    }

    pub fn pin(&self, key: u64, agent: Arc<str>) {
        self.cache.insert(key, agent);
    }

    pub fn forget(&self, key: u64) {
        self.cache.invalidate(&key);
    }

    /// Sessions held now (settles pending evictions first).
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a connection found no agent. The label of `sluice_resource_misses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No SNI, or one the route's `resource.sni` pattern does not cover.
    NoName,
    /// No agent announced the resource.
    UnknownResource,
    /// Agents announced it, but none is eligible (expired, warming, version skew, labels).
    NoEligibleAgent,
    /// Every eligible agent refused or timed out.
    AllFailed,
}

impl Miss {
    pub fn label(self) -> &'static str {
        match self {
            Miss::NoName => "no_name",
            Miss::UnknownResource => "unknown_resource",
            Miss::NoEligibleAgent => "no_eligible_agent",
            Miss::AllFailed => "all_agents_failed",
        }
    }
}

/// A route's resource target, compiled.
pub struct ResourceTarget {
    pub route: String,
    pub kind: String,
    /// `.apps.example.com` for `*.apps.example.com`: the name is what comes before it.
    pub suffix: String,
    pub selector: Labels,
    pub affinity: Affinity,
    pub pick: Pick,
    pub connect_timeout: Duration,
    pub keepalive: Keepalive,
    pub proxy_protocol: ProxyProtocol,
    pub fallback: Option<Arc<Pool>>,
    pub sessions: Arc<Sessions>,
    pub table: Arc<AgentTable>,
    pub rules: Rules,
    pub misses: IntCounterVec,
    pub repins: IntCounter,
    pub connect_failures: IntCounterVec,
}

/// The resource name an SNI names under `suffix` (`myapp.apps.example.com` → `myapp`).
pub fn resource_name<'a>(sni: Option<&'a str>, suffix: &str) -> Option<&'a str> {
    let name = sni?.strip_suffix(suffix)?;
    (!name.is_empty()).then_some(name)
}

/// The session key: FNV-1a over the route, the resource, the client IP and, for
/// `client_ip_sni`, the full SNI. `None` for `affinity = "none"`.
pub fn session_key(
    affinity: Affinity,
    key: &ResourceKey,
    client: SocketAddr,
    sni: Option<&str>,
) -> Option<u64> {
    use sluice_core::balance::fnv1a_continue;
    let ip = match client.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let h = fnv1a_continue(0xcbf2_9ce4_8422_2325, format!("{key:?}").as_bytes());
    let h = fnv1a_continue(h, &ip);
    match affinity {
        Affinity::None => None,
        Affinity::ClientIp => Some(h),
        Affinity::ClientIpSni => Some(fnv1a_continue(h, sni.unwrap_or("").as_bytes())),
    }
}

/// The order to try agents in: the session's agent if it is still eligible, else one chosen
/// by `pick`; then the other eligible ones in random order. `repinned`: the session pointed
/// at an agent that is no longer eligible.
#[derive(Debug)]
pub struct Plan<'a> {
    pub order: Vec<&'a Record>,
    pub repinned: bool,
}

pub fn plan<'a>(
    eligible: Vec<&'a Record>,
    session: Option<&str>,
    pick: Pick,
    rng: &mut impl Rng,
) -> Plan<'a> {
    let mut order = eligible;
    order.shuffle(rng);
    let mut repinned = false;
    let first = match session {
        Some(id) => match order.iter().position(|r| &*r.agent.id == id) {
            Some(i) => Some(i),
            None => {
                repinned = true;
                None
            }
        },
        None => None,
    };
    let first = first.or_else(|| match pick {
        // The shuffle already made the first one a uniform choice.
        Pick::Random => None,
        Pick::P2c if order.len() >= 2 => {
            // The shuffle's first two are a random pair; the one with fewer connections.
            Some(usize::from(
                order[1].agent.backend.active() < order[0].agent.backend.active(),
            ))
        }
        Pick::P2c => None,
    });
    if let Some(i) = first {
        order.swap(0, i);
    }
    Plan { order, repinned }
}

impl ResourceTarget {
    /// Connect to an agent serving the resource the SNI names; on a miss, to the fallback
    /// pool if there is one. `first` is what an agent gets first (this route's PROXY header,
    /// if any, then `hello`); the fallback pool gets its own header (`info`) before `hello`.
    pub async fn connect(
        &self,
        client: SocketAddr,
        sni: Option<&str>,
        first: &[u8],
        hello: &[u8],
        info: &sluice_core::proxy::HeaderInfo<'_>,
        metrics: &crate::observe::metrics::Metrics,
    ) -> Result<(Dialed, ActiveGuard), ConnectError> {
        let miss = match self.try_agents(client, sni, first).await {
            Ok(ok) => return Ok(ok),
            Err(miss) => miss,
        };
        self.misses
            .with_label_values(&[self.route.as_str(), miss.0.label()])
            .inc();
        if let Some(pool) = &self.fallback {
            tracing::debug!(route = %self.route, reason = miss.0.label(), pool = %pool.name,
                "no agent for the resource: using the fallback pool");
            if pool.proxy_protocol == self.proxy_protocol {
                return pool.connect(client, sni, first, metrics).await;
            }
            let mut own = match sluice_core::proxy::encode(pool.proxy_protocol, info) {
                Ok(header) => header.unwrap_or_default(),
                Err(e) => {
                    return Err(ConnectError::Exhausted {
                        pool: pool.name.clone(),
                        attempts: 0,
                        last: format!("cannot encode the fallback pool's PROXY header: {e}"),
                    })
                }
            };
            own.extend_from_slice(hello);
            let (mut dialed, guard) = pool.connect(client, sni, &own, metrics).await?;
            dialed.first = Some(own);
            return Ok((dialed, guard));
        }
        Err(ConnectError::NoAgent {
            reason: miss.0.label(),
            detail: miss.1,
        })
    }

    async fn try_agents(
        &self,
        client: SocketAddr,
        sni: Option<&str>,
        first: &[u8],
    ) -> Result<(Dialed, ActiveGuard), (Miss, String)> {
        let Some(name) = resource_name(sni, &self.suffix) else {
            return Err((
                Miss::NoName,
                format!(
                    "SNI {:?} does not name a resource under *{}",
                    sni.unwrap_or(""),
                    self.suffix
                ),
            ));
        };
        let key = ResourceKey::new(&self.kind, name);
        let Some(records) = self.table.lookup(&key) else {
            return Err((
                Miss::UnknownResource,
                format!("no agent announces {} `{name}`", self.kind),
            ));
        };
        let now = crate::upstream::clock_ms(Instant::now());
        let eligible: Vec<&Record> = records
            .iter()
            .filter(|r| {
                self.rules.state(&r.agent, now) == AgentState::Ready
                    && r.selected_by(&self.selector)
            })
            .collect();
        if eligible.is_empty() {
            let states: Vec<String> = records
                .iter()
                .map(|r| format!("{}={}", r.agent.id, self.rules.state(&r.agent, now).label()))
                .collect();
            return Err((
                Miss::NoEligibleAgent,
                format!(
                    "no eligible agent for {} `{name}` ({}; label selector applied)",
                    self.kind,
                    states.join(", ")
                ),
            ));
        }
        let skey = session_key(self.affinity, &key, client, sni);
        let pinned = skey.and_then(|k| self.sessions.get(k));
        let plan = plan(eligible, pinned.as_deref(), self.pick, &mut rand::rng());
        if plan.repinned {
            self.repins.inc();
        }
        let mut last = String::new();
        for (i, record) in plan.order.iter().enumerate() {
            let agent = &record.agent;
            match crate::upstream::connect_one(
                agent.backend.address,
                self.connect_timeout,
                &self.keepalive,
                first,
            )
            .await
            {
                Ok(dialed) => {
                    if let Some(k) = skey {
                        if i > 0 || pinned.as_deref() != Some(&*agent.id) {
                            self.sessions.pin(k, Arc::from(&*agent.id));
                        }
                    }
                    return Ok((dialed, agent.backend.guard()));
                }
                Err(e) => {
                    let reason = crate::upstream::failure_reason(&e);
                    self.connect_failures
                        .with_label_values(&[self.route.as_str(), reason])
                        .inc();
                    tracing::warn!(route = %self.route, agent = %agent.id,
                        address = %agent.backend.address, reason, error = %e,
                        "agent dial failed; trying another");
                    last = format!("{} ({}): {e}", agent.id, agent.backend.address);
                }
            }
        }
        if let Some(k) = skey {
            self.sessions.forget(k);
        }
        Err((
            Miss::AllFailed,
            format!(
                "every eligible agent for {} `{name}` failed ({} tried); last: {last}",
                self.kind,
                plan.order.len()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::Agent;
    use crate::upstream::Backend;
    use rand::SeedableRng;
    use sluice_core::agents::table::{Announced, Heartbeat, Version};

    fn table_with(ids: &[&str]) -> AgentTable {
        let t = AgentTable::default();
        for (i, id) in ids.iter().enumerate() {
            t.apply(
                Heartbeat {
                    agent: id.to_string(),
                    address: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    version: Version::parse("1.0.0"),
                    labels: Box::new([]),
                    ttl: 1000,
                    resources: vec![Announced {
                        key: ResourceKey::new("app", "myapp"),
                        labels: Box::new([]),
                    }],
                },
                "t",
                false,
                0,
                0,
                &|id, a| Backend::for_agent(id, a, Default::default()),
            )
            .unwrap();
        }
        t
    }

    fn first_id(p: &Plan<'_>) -> String {
        p.order[0].agent.id.to_string()
    }

    #[test]
    fn names_come_from_the_wildcard_part() {
        assert_eq!(
            resource_name(Some("myapp.apps.example.com"), ".apps.example.com"),
            Some("myapp")
        );
        assert_eq!(
            resource_name(Some("apps.example.com"), ".apps.example.com"),
            None
        );
        assert_eq!(
            resource_name(Some("x.other.com"), ".apps.example.com"),
            None
        );
        assert_eq!(resource_name(None, ".apps.example.com"), None);
    }

    #[test]
    fn session_keys_follow_the_affinity() {
        let k = ResourceKey::new("app", "myapp");
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:2000".parse().unwrap();
        let c: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let ip = Affinity::ClientIp;
        assert_eq!(session_key(ip, &k, a, None), session_key(ip, &k, b, None));
        assert_ne!(session_key(ip, &k, a, None), session_key(ip, &k, c, None));
        let other = ResourceKey::new("app", "other");
        assert_ne!(
            session_key(ip, &k, a, None),
            session_key(ip, &other, a, None)
        );
        let ips = Affinity::ClientIpSni;
        assert_ne!(
            session_key(ips, &k, a, Some("x.a.com")),
            session_key(ips, &k, a, Some("X.b.com"))
        );
        assert_eq!(session_key(Affinity::None, &k, a, None), None);
    }

    #[test]
    fn a_session_keeps_its_agent_while_eligible_and_repins_when_gone() {
        let t = table_with(&["a1", "a2", "a3"]);
        let recs = t.lookup(&ResourceKey::new("app", "myapp")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let p = plan(recs.iter().collect(), Some("a2"), Pick::Random, &mut rng);
            assert_eq!(first_id(&p), "a2");
            assert!(!p.repinned);
            assert_eq!(p.order.len(), 3, "the others follow, for dial fallback");
        }
        let without_a2: Vec<&Record> = recs.iter().filter(|r| &*r.agent.id != "a2").collect();
        let p = plan(without_a2, Some("a2"), Pick::Random, &mut rng);
        assert!(p.repinned);
        assert_ne!(first_id(&p), "a2");
    }

    #[test]
    fn new_sessions_spread_uniformly() {
        let t = table_with(&["a1", "a2"]);
        let recs = t.lookup(&ResourceKey::new("app", "myapp")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let firsts = (0..1000)
            .filter(|_| {
                first_id(&plan(recs.iter().collect(), None, Pick::Random, &mut rng)) == "a1"
            })
            .count();
        assert!(
            (400..=600).contains(&firsts),
            "a1 first {firsts} times of 1000"
        );
    }

    #[test]
    fn p2c_prefers_the_agent_with_fewer_connections() {
        let t = table_with(&["a1", "a2"]);
        let recs = t.lookup(&ResourceKey::new("app", "myapp")).unwrap();
        let busy: &Arc<Agent> = &recs.iter().find(|r| &*r.agent.id == "a1").unwrap().agent;
        let _guards: Vec<_> = (0..5).map(|_| busy.backend.guard()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let p = plan(recs.iter().collect(), None, Pick::P2c, &mut rng);
            assert_eq!(first_id(&p), "a2");
        }
    }

    #[test]
    fn sessions_are_bounded_least_recently_used_first() {
        // moka applies reads and writes to its LRU order in batches; settle each step.
        let s = Sessions::new(2, Duration::ZERO);
        s.pin(1, "a".into());
        s.cache.run_pending_tasks();
        s.pin(2, "b".into());
        s.cache.run_pending_tasks();
        assert_eq!(s.get(1).as_deref(), Some("a")); // 1 is now the most recent
        s.cache.run_pending_tasks();
        s.pin(3, "c".into());
        s.cache.run_pending_tasks();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(2), None, "the least recently used went");
        assert_eq!(s.get(1).as_deref(), Some("a"));
    }
}
