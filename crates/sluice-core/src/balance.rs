//! Balancers: pick one backend of a pool for a new connection.
//!
//! Pure: takes the candidates' weights and active-connection counts, a hash key when the
//! balancer needs one, and a source of randomness; returns an index. Never sees a socket, so
//! every strategy is tested for fairness here. `exclude` holds backends already tried by this
//! connection (connect retries go elsewhere).

use rand::Rng;
use serde::Serialize;

/// What a `hash` balancer hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    ClientIp,
    /// The SNI; connections without one fall back to the client IP.
    Sni,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted random: the default. Tunnel agents rely on a fair random spread to find every
    /// proxy with their repeated dials; stickiness would strand them.
    Random,
    /// Weighted round robin over a shared counter.
    RoundRobin,
    /// Fewest active connections per unit of weight; ties broken at random.
    LeastConn,
    /// Power of two choices: two weighted-random candidates, the less loaded wins.
    P2c,
    /// Weighted rendezvous hashing: consistent (removing a backend only moves its own keys).
    Hash(HashKey),
}

/// What a balancer needs to know about one candidate.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub weight: u32,
    pub active: u64,
    /// A stable identity for hashing (e.g. a hash of the backend address).
    pub id: u64,
}

/// Inputs that vary per pick.
pub struct PickContext<'a> {
    pub exclude: &'a [usize],
    pub hash_key: Option<&'a [u8]>,
    /// Shared round-robin position (the pool's counter, already incremented).
    pub rr_ticket: u64,
}

impl Balance {
    pub fn pick<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        ctx: &PickContext<'_>,
        rng: &mut R,
    ) -> Option<usize> {
        let eligible = |i: usize| !ctx.exclude.contains(&i) && candidates[i].weight > 0;
        let total: u64 = (0..candidates.len())
            .filter(|&i| eligible(i))
            .map(|i| candidates[i].weight as u64)
            .sum();
        if total == 0 {
            return None;
        }
        // The eligible backend covering position `pos` of the weight line [0, total).
        let at = |mut pos: u64| -> usize {
            for (i, c) in candidates.iter().enumerate() {
                if !eligible(i) {
                    continue;
                }
                if pos < c.weight as u64 {
                    return i;
                }
                pos -= c.weight as u64;
            }
            unreachable_last(candidates, &eligible)
        };
        match self {
            Balance::Random => Some(at(rng.random_range(0..total))),
            Balance::RoundRobin => Some(at(ctx.rr_ticket % total)),
            Balance::LeastConn => {
                let n = candidates.len();
                let start = rng.random_range(0..n);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| eligible(i))
                    .min_by(|&a, &b| load(&candidates[a]).total_cmp(&load(&candidates[b])))
            }
            Balance::P2c => {
                let a = at(rng.random_range(0..total));
                let others = total - candidates[a].weight as u64;
                if others == 0 {
                    return Some(a);
                }
                // Second choice: weighted random among the rest.
                let mut pos = rng.random_range(0..others);
                let mut b = a;
                for (i, c) in candidates.iter().enumerate() {
                    if i == a || !eligible(i) {
                        continue;
                    }
                    if pos < c.weight as u64 {
                        b = i;
                        break;
                    }
                    pos -= c.weight as u64;
                }
                if load(&candidates[b]) < load(&candidates[a]) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
            Balance::Hash(_) => {
                let key = match ctx.hash_key {
                    Some(k) => k,
                    None => return Some(at(rng.random_range(0..total))),
                };
                let kh = fnv1a(key);
                (0..candidates.len())
                    .filter(|&i| eligible(i))
                    .max_by(|&a, &b| {
                        rendezvous(kh, &candidates[a]).total_cmp(&rendezvous(kh, &candidates[b]))
                    })
            }
        }
    }
}

#[inline]
fn unreachable_last(candidates: &[Candidate], eligible: &dyn Fn(usize) -> bool) -> usize {
    // Only reached through rounding; positions are always < total.
    (0..candidates.len())
        .rev()
        .find(|&i| eligible(i))
        .unwrap_or(0)
}

#[inline]
fn load(c: &Candidate) -> f64 {
    c.active as f64 / c.weight.max(1) as f64
}

/// FNV-1a: stable across builds and processes, so hashing survives restarts and upgrades.
#[inline]
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(0xcbf2_9ce4_8422_2325, bytes)
}

/// FNV-1a over `bytes`, starting from the hash of what came before.
#[inline]
pub fn fnv1a_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The rendezvous (highest-random-weight) score of `id` for `key`: who ranks first for a key
/// depends only on the key and the candidates' ids, so every process agrees.
#[inline]
pub fn hrw(key: u64, id: &[u8]) -> u64 {
    mix(fnv1a_continue(key, id))
}

#[inline]
fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Weighted rendezvous score: w / -ln(u), u uniform in (0, 1).
#[inline]
fn rendezvous(key_hash: u64, c: &Candidate) -> f64 {
    let h = mix(key_hash ^ mix(c.id));
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    c.weight as f64 / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate {
                weight: w,
                active: 0,
                id: i as u64 * 7919,
            })
            .collect()
    }

    fn ctx<'a>(exclude: &'a [usize], key: Option<&'a [u8]>, t: u64) -> PickContext<'a> {
        PickContext {
            exclude,
            hash_key: key,
            rr_ticket: t,
        }
    }

    fn histogram(b: Balance, c: &[Candidate], n: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(1);
        let mut h = vec![0; c.len()];
        for t in 0..n {
            h[b.pick(c, &ctx(&[], None, t as u64), &mut rng).unwrap()] += 1;
        }
        h
    }

    #[test]
    fn random_and_round_robin_follow_weights() {
        let c = cands(&[1, 2, 1]);
        for b in [Balance::Random, Balance::RoundRobin, Balance::P2c] {
            let h = histogram(b, &c, 40_000);
            assert!(
                (h[1] as f64 / h[0] as f64 - 2.0).abs() < 0.25,
                "{b:?} {h:?}"
            );
            assert!(
                (h[2] as f64 / h[0] as f64 - 1.0).abs() < 0.15,
                "{b:?} {h:?}"
            );
        }
    }

    #[test]
    fn exclusion_and_empty() {
        let c = cands(&[1, 1]);
        let mut rng = StdRng::seed_from_u64(2);
        for b in [
            Balance::Random,
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::P2c,
        ] {
            for t in 0..50 {
                assert_eq!(b.pick(&c, &ctx(&[0], None, t), &mut rng), Some(1));
                assert_eq!(b.pick(&c, &ctx(&[0, 1], None, t), &mut rng), None);
            }
        }
        assert_eq!(
            Balance::Random.pick(&[], &ctx(&[], None, 0), &mut rng),
            None
        );
    }

    #[test]
    fn least_conn_and_p2c_prefer_idle() {
        let mut c = cands(&[1, 1, 1]);
        c[0].active = 10;
        c[1].active = 0;
        c[2].active = 10;
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(
            Balance::LeastConn.pick(&c, &ctx(&[], None, 0), &mut rng),
            Some(1)
        );
        let h = histogram(Balance::P2c, &c, 3000);
        // backend 1 wins whenever it is one of the two candidates: 2/3 of picks.
        assert!(h[1] > 1800, "{h:?}");
    }

    #[test]
    fn hash_is_consistent() {
        let c = cands(&[1, 1, 1, 1]);
        let mut rng = StdRng::seed_from_u64(4);
        let keys: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let b = Balance::Hash(HashKey::ClientIp);
        let before: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&c, &ctx(&[], Some(k), 0), &mut rng).unwrap())
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&c, &ctx(&[], Some(k), 0), &mut rng).unwrap())
            .collect();
        assert_eq!(before, again);
        // Removing backend 2 moves only the keys that were on it.
        let after: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&c, &ctx(&[2], Some(k), 0), &mut rng).unwrap())
            .collect();
        for (x, y) in before.iter().zip(&after) {
            if *x != 2 {
                assert_eq!(x, y);
            }
        }
        let on_each = (0..4).map(|i| before.iter().filter(|&&x| x == i).count());
        for n in on_each {
            assert!((180..320).contains(&n), "uneven hash spread: {n}");
        }
    }
}
