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
use crate::balance::hrw;

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
    /// Uniform, as Teleport's proxy does. Edge-local: two edges pick independently.
    Random,
    /// The less loaded of two random agents. Edge-local (each edge counts its own
    /// connections).
    P2c,
    /// Rendezvous (highest-random-weight) hashing of the session key over the eligible agents:
    /// every edge with the same agents picks the same one for the same key, and tries the
    /// others in the same order; an agent leaving moves only the keys it ranked first.
    Rendezvous,
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
/// by `pick`; then the other eligible ones, in random order, or in rendezvous order for
/// `Pick::Rendezvous` (the same on every edge). `repinned`: the session pointed at an agent
/// that is no longer eligible.
pub struct Plan<'a, B> {
    pub order: Vec<&'a Record<B>>,
    pub repinned: bool,
}

///
/// `key` is the session key (`session_key`); without one (`affinity = "none"`) rendezvous has
/// nothing to hash and the order is random.
pub fn plan<'a, B: Endpoint>(
    eligible: Vec<&'a Record<B>>,
    session: Option<&str>,
    key: Option<u64>,
    pick: Pick,
    rng: &mut impl Rng,
) -> Plan<'a, B> {
    let mut order = eligible;
    match (pick, key) {
        (Pick::Rendezvous, Some(key)) => {
            // Highest score first; ties (a 64-bit collision) broken by id, so still the
            // same order everywhere.
            order.sort_by_cached_key(|r| {
                (
                    std::cmp::Reverse(hrw(key, r.agent.id.as_bytes())),
                    r.agent.id.clone(),
                )
            });
        }
        _ => order.shuffle(rng),
    }
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
        // The shuffle already made the first one a uniform choice; rendezvous ranked them.
        Pick::Random | Pick::Rendezvous => None,
        Pick::P2c if order.len() >= 2 => {
            // The shuffle's first two are a random pair; the one with fewer connections.
            Some(usize::from(
                order[1].agent.backend.active() < order[0].agent.backend.active(),
            ))
        }
        Pick::P2c => None,
    });
    if let Some(i) = first {
        // The others keep their order (rendezvous: the failover order every edge shares).
        order[..=i].rotate_right(1);
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
            let p = plan(
                recs.iter().collect(),
                Some("a2"),
                None,
                Pick::Random,
                &mut rng,
            );
            assert_eq!(first_id(&p), "a2");
            assert!(!p.repinned);
            assert_eq!(p.order.len(), 3, "the others follow, for dial fallback");
        }
        let without_a2: Vec<&Record<Dial>> = recs.iter().filter(|r| &*r.agent.id != "a2").collect();
        let p = plan(without_a2, Some("a2"), None, Pick::Random, &mut rng);
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
                first_id(&plan(
                    recs.iter().collect(),
                    None,
                    None,
                    Pick::Random,
                    &mut rng,
                )) == "a1"
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
            let p = plan(recs.iter().collect(), None, None, Pick::P2c, &mut rng);
            assert_eq!(first_id(&p), "a2");
        }
    }

    fn ids_of(p: &Plan<'_, Dial>) -> Vec<String> {
        p.order.iter().map(|r| r.agent.id.to_string()).collect()
    }

    #[test]
    fn rendezvous_gives_every_edge_the_same_order() {
        // Two edges whose tables learned the agents in different orders.
        let a = table_with(&["a1", "a2", "a3", "a4"]);
        let b = table_with(&["a4", "a2", "a1", "a3"]);
        let key = ResourceKey::new("app", "myapp");
        let (ra, rb) = (a.lookup(&key).unwrap(), b.lookup(&key).unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut firsts = std::collections::HashMap::new();
        for k in 0..3000u64 {
            let sk = Some(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let pa = plan(ra.iter().collect(), None, sk, Pick::Rendezvous, &mut rng);
            let pb = plan(rb.iter().collect(), None, sk, Pick::Rendezvous, &mut rng);
            assert_eq!(ids_of(&pa), ids_of(&pb), "key {k}");
            *firsts.entry(first_id(&pa)).or_insert(0) += 1;
        }
        // Spread evenly: each of four agents first for about a quarter of the keys.
        for (id, n) in &firsts {
            assert!((600..=900).contains(n), "{id} first for {n} of 3000");
        }
    }

    #[test]
    fn an_agent_leaving_moves_only_its_own_keys() {
        let t = table_with(&["a1", "a2", "a3"]);
        let recs = t.lookup(&ResourceKey::new("app", "myapp")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for k in 0..1000u64 {
            let all = plan(
                recs.iter().collect(),
                None,
                Some(k),
                Pick::Rendezvous,
                &mut rng,
            );
            let without: Vec<&Record<Dial>> =
                recs.iter().filter(|r| &*r.agent.id != "a2").collect();
            let after = plan(without, None, Some(k), Pick::Rendezvous, &mut rng);
            // The failover order without a2 is the old order without a2.
            let expected: Vec<String> = ids_of(&all).into_iter().filter(|i| i != "a2").collect();
            assert_eq!(ids_of(&after), expected, "key {k}");
        }
    }

    #[test]
    fn a_pinned_session_outranks_rendezvous_and_keeps_the_failover_order() {
        let t = table_with(&["a1", "a2", "a3"]);
        let recs = t.lookup(&ResourceKey::new("app", "myapp")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let ranked = ids_of(&plan(
            recs.iter().collect(),
            None,
            Some(42),
            Pick::Rendezvous,
            &mut rng,
        ));
        let pinned = ranked[2].clone();
        let p = plan(
            recs.iter().collect(),
            Some(&pinned),
            Some(42),
            Pick::Rendezvous,
            &mut rng,
        );
        assert!(!p.repinned);
        assert_eq!(
            ids_of(&p),
            vec![pinned, ranked[0].clone(), ranked[1].clone()]
        );
        // Without a session key (affinity = "none") there is nothing to hash: any order.
        let p = plan(
            recs.iter().collect(),
            None,
            None,
            Pick::Rendezvous,
            &mut rng,
        );
        assert_eq!(p.order.len(), 3);
    }
}
