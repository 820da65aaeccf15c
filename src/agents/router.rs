//! The session-affine resource router: a route whose target is a resource in the agent table.
//!
//! Owns: the session table (bounded, least recently used out first, idle sessions expire) and
//! dialling the agents in the order `sluice_core::agents::affinity::plan` gives (the
//! session's agent, else a new pick; then the other eligible agents in random order), with
//! fallback to the route's pool, as Teleport's proxy does. A session points at an agent id; it dies with its agent: once that
//! agent is no longer eligible, the next connection starts a new session elsewhere (a re-pin).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec};

use super::{AgentTable, Record};
use crate::config::{Affinity, Keepalive, Pick, ProxyProtocol};
use crate::upstream::{ActiveGuard, ConnectError, Dialed, Pool};
use sluice_core::agents::affinity::{plan, resource_name, session_key, Miss};
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

/// A route's resource target, compiled.
/// Why no agent took a connection: a miss (counted, maybe the fallback pool's turn), or
/// sluice out of local resources.
enum Failed {
    Miss(Miss, String),
    Local(String),
}

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
            Err(Failed::Local(e)) => return Err(ConnectError::LocalResources(e)),
            Err(Failed::Miss(miss, detail)) => (miss, detail),
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
    ) -> Result<(Dialed, ActiveGuard), Failed> {
        let Some(name) = resource_name(sni, &self.suffix) else {
            return Err(Failed::Miss(
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
            return Err(Failed::Miss(
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
            return Err(Failed::Miss(
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
        let plan = plan(
            eligible,
            pinned.as_deref(),
            skey,
            self.pick,
            &mut rand::rng(),
        );
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
                Err(e) if crate::net::is_local_exhaustion(&e) => {
                    tracing::error!(route = %self.route, error = %e,
                        "cannot open a socket to dial an agent: out of local resources");
                    return Err(Failed::Local(e.to_string()));
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
        Err(Failed::Miss(
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
