//! Which agent a client's connection goes to: the resource name its SNI names, the session
//! key its affinity gives it, and the order to try the eligible agents in (the session's
//! agent first while it is eligible, else a new pick). Pure: the caller passes the eligible
//! records, the session's agent and a source of randomness.

use std::net::SocketAddr;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use super::table::{Record, ResourceKey};
use super::Endpoint;

/// What keeps a client on its agent (`resource.affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    ClientIp,
    ClientIpSni,
    None,
}

/// How a new session picks among eligible agents (`resource.pick`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    Random,
    P2c,
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
    use crate::balance::fnv1a_continue;
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
pub struct Plan<'a, B> {
    pub order: Vec<&'a Record<B>>,
    pub repinned: bool,
}

pub fn plan<'a, B: Endpoint>(
    eligible: Vec<&'a Record<B>>,
    session: Option<&str>,
    pick: Pick,
    rng: &mut impl Rng,
) -> Plan<'a, B> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::table::{AgentTable, Announced, Heartbeat, Version};
    use rand::SeedableRng;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// An agent's dial address and its active connections.
    struct Dial(SocketAddr, AtomicU64);

    impl Endpoint for Dial {
        fn address(&self) -> SocketAddr {
            self.0
        }
        fn active(&self) -> u64 {
            self.1.load(Ordering::Relaxed)
        }
    }

    fn table_with(ids: &[&str]) -> AgentTable<Dial> {
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
                &|_, a| Arc::new(Dial(a, AtomicU64::new(0))),
            )
            .unwrap();
        }
        t
    }

    fn first_id(p: &Plan<'_, Dial>) -> String {
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
        let without_a2: Vec<&Record<Dial>> = recs.iter().filter(|r| &*r.agent.id != "a2").collect();
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
        let busy = &recs.iter().find(|r| &*r.agent.id == "a1").unwrap().agent;
        busy.backend.1.store(5, Ordering::Relaxed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let p = plan(recs.iter().collect(), None, Pick::P2c, &mut rng);
            assert_eq!(first_id(&p), "a2");
        }
    }
}
