//! Which backends of a pool may take a new connection, and passive ejection (Envoy's outlier
//! detection, for connect failures only).
//!
//! Pure arithmetic on what the pool knows of each backend at one moment, with the time
//! passed in (milliseconds on the caller's monotonic clock): no clock is read here, so every
//! rule is tested with made-up times.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// What the pool knows of one backend, read once per pick (a reload may change it meanwhile,
/// and two readings could disagree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Not removed by a reload.
    pub in_service: bool,
    /// Drained by the operator (admin API, `weight = 0`): never picked.
    pub drained: bool,
    /// Not found unhealthy by the active health checks (no verdict counts as healthy).
    pub healthy: bool,
    /// Passively ejected now.
    pub ejected: bool,
    /// Past its pool's `min_ready` since it appeared.
    pub ready: bool,
    pub weight: u32,
}

/// The tier a backend ranks in for a new connection; only the best non-empty tier is picked
/// from. 3: in service, usable and ready; 2: warming; 1: ejected or unhealthy (every backend
/// failing: try anyway, as Envoy's panic mode does); 0: removed (only for a connection routed
/// just before the reload). `None`: never — weight 0, or unhealthy under `fail_open = false`.
#[inline]
pub fn tier(s: Standing, fail_open: bool) -> Option<u8> {
    if s.weight == 0 || s.drained || (!s.healthy && !fail_open) {
        return None;
    }
    let usable = s.healthy && !s.ejected;
    Some(match (s.in_service, usable, s.ready) {
        (true, true, true) => 3,
        (true, true, false) => 2,
        (true, false, _) => 1,
        (false, _, _) => 0,
    })
}

/// The best tier among the backends not in `exclude`; `None`: nothing may be picked.
#[inline]
pub fn best_tier(tiers: &[Option<u8>], exclude: &[usize]) -> Option<u8> {
    tiers
        .iter()
        .enumerate()
        .filter(|(i, _)| !exclude.contains(i))
        .filter_map(|(_, t)| *t)
        .max()
}

/// A pool's passive-ejection rule (`[pool.NAME.ejection]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionRule {
    /// Consecutive connect failures that eject a backend.
    pub after_failures: u32,
    /// The first ejection lasts this long; each further one in a row doubles it...
    pub time: Duration,
    /// ...up to this.
    pub max_time: Duration,
    /// At most this share of the pool is ejected at once (one backend always may be).
    pub max_percent: u32,
}

impl EjectionRule {
    /// How long the `n`th ejection in a row (from 0) lasts.
    pub fn length(&self, n: u32) -> Duration {
        self.time
            .saturating_mul(1u32 << n.min(20))
            .min(self.max_time)
    }

    /// Whether one more of `pool_size` backends may be ejected while `ejected` already are.
    pub fn allows(&self, ejected: usize, pool_size: usize) -> bool {
        ejected == 0 || (ejected + 1) * 100 <= self.max_percent as usize * pool_size
    }
}

/// What a connect failure did to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted; not (or already) ejected.
    Counted(u32),
    /// Ejected for this long, after this many failures in a row.
    Ejected { failures: u32, length: Duration },
    /// It should be ejected, but `max_percent` of the pool already is.
    CapReached { failures: u32, ejected: usize },
}

/// One backend's passive-ejection state, shared by every connection that uses it.
#[derive(Debug, Default)]
pub struct Outlier {
    /// Connect failures in a row.
    failures: AtomicU32,
    /// Ejected until this time (ms); 0: never ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections in a row (each doubles the next one's length); reset by a success once the
    /// ejection is over.
    ejections: AtomicU32,
}

impl Outlier {
    /// Time left of its ejection at `now_ms` (zero when not ejected).
    #[inline]
    pub fn ejected_for(&self, now_ms: u64) -> Duration {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(now_ms))
    }

    /// A connect succeeded at `now_ms`.
    #[inline]
    pub fn succeeded(&self, now_ms: u64) {
        self.failures.store(0, Ordering::Relaxed);
        if self.ejected_for(now_ms).is_zero() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failed at `now_ms`. With a `rule`, enough failures in a row eject the
    /// backend, unless `ejected_in_pool()` (the pool's backends ejected now, and its size)
    /// says the pool's share is reached.
    pub fn failed(
        &self,
        rule: Option<&EjectionRule>,
        now_ms: u64,
        ejected_in_pool: impl FnOnce() -> (usize, usize),
    ) -> Failure {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(rule) = rule else {
            return Failure::Counted(failures);
        };
        if failures < rule.after_failures || !self.ejected_for(now_ms).is_zero() {
            return Failure::Counted(failures);
        }
        let (ejected, size) = ejected_in_pool();
        if !rule.allows(ejected, size) {
            return Failure::CapReached { failures, ejected };
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed);
        let length = rule.length(n);
        let until = now_ms.saturating_add(length.as_millis() as u64);
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        Failure::Ejected { failures, length }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: EjectionRule = EjectionRule {
        after_failures: 3,
        time: Duration::from_secs(10),
        max_time: Duration::from_secs(60),
        max_percent: 50,
    };

    fn standing() -> Standing {
        Standing {
            in_service: true,
            drained: false,
            healthy: true,
            ejected: false,
            ready: true,
            weight: 1,
        }
    }

    #[test]
    fn tiers_rank_ready_then_warming_then_failing_then_removed() {
        let s = standing();
        assert_eq!(tier(s, true), Some(3));
        assert_eq!(tier(Standing { ready: false, ..s }, true), Some(2));
        assert_eq!(tier(Standing { ejected: true, ..s }, true), Some(1));
        assert_eq!(
            tier(
                Standing {
                    healthy: false,
                    ..s
                },
                true
            ),
            Some(1)
        );
        assert_eq!(
            tier(
                Standing {
                    healthy: false,
                    ..s
                },
                false
            ),
            None
        );
        assert_eq!(
            tier(
                Standing {
                    in_service: false,
                    ..s
                },
                true
            ),
            Some(0)
        );
        assert_eq!(tier(Standing { weight: 0, ..s }, true), None);
        assert_eq!(tier(Standing { drained: true, ..s }, true), None);
        assert_eq!(best_tier(&[Some(1), Some(3), None], &[]), Some(3));
        assert_eq!(best_tier(&[Some(1), Some(3), None], &[1]), Some(1));
        assert_eq!(best_tier(&[None, Some(3)], &[1]), None);
    }

    #[test]
    fn ejection_after_consecutive_failures_doubles_and_expires() {
        let o = Outlier::default();
        let pool = || (0, 4);
        assert_eq!(o.failed(Some(&RULE), 0, pool), Failure::Counted(1));
        assert_eq!(o.failed(Some(&RULE), 0, pool), Failure::Counted(2));
        assert_eq!(
            o.failed(Some(&RULE), 1_000, pool),
            Failure::Ejected {
                failures: 3,
                length: Duration::from_secs(10)
            }
        );
        assert_eq!(o.ejected_for(1_000), Duration::from_secs(10));
        assert_eq!(o.ejected_for(6_000), Duration::from_secs(5));
        assert!(o.ejected_for(11_000).is_zero());
        // Failing again right after the ejection: the next one lasts twice as long.
        for _ in 0..2 {
            o.failed(Some(&RULE), 12_000, pool);
        }
        assert_eq!(
            o.failed(Some(&RULE), 12_000, pool),
            Failure::Ejected {
                failures: 3,
                length: Duration::from_secs(20)
            }
        );
        // A success during an ejection does not reset the doubling; one after it does.
        o.succeeded(13_000);
        assert!(!o.ejected_for(13_000).is_zero());
        o.succeeded(40_000);
        for _ in 0..2 {
            o.failed(Some(&RULE), 40_000, pool);
        }
        assert_eq!(
            o.failed(Some(&RULE), 40_000, pool),
            Failure::Ejected {
                failures: 3,
                length: Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn ejections_are_capped_per_pool_and_in_length() {
        assert_eq!(RULE.length(0), Duration::from_secs(10));
        assert_eq!(RULE.length(2), Duration::from_secs(40));
        assert_eq!(RULE.length(3), Duration::from_secs(60));
        assert_eq!(RULE.length(u32::MAX), Duration::from_secs(60));
        // One backend may always be ejected; then at most half of four.
        assert!(RULE.allows(0, 1));
        assert!(RULE.allows(1, 4));
        assert!(!RULE.allows(2, 4));
        let o = Outlier::default();
        for _ in 0..2 {
            o.failed(Some(&RULE), 0, || (2, 4));
        }
        assert_eq!(
            o.failed(Some(&RULE), 0, || (2, 4)),
            Failure::CapReached {
                failures: 3,
                ejected: 2
            }
        );
        assert!(o.ejected_for(0).is_zero());
        // Without a rule, failures are only counted.
        assert_eq!(o.failed(None, 0, || (0, 1)), Failure::Counted(4));
    }
}
