//! Connections that have not sent their hello yet (nor their PROXY header): how many may wait
//! at once, in all and per source, and which one goes when a new one needs room.
//!
//! A slowloris that opens connections and sends nothing must not keep agents out. Pending
//! connections have their own cap, `limits.max_pending_hellos`, and a per-source one,
//! `limits.max_pending_hellos_per_source`; at a cap the **oldest** pending connection (of
//! all, or of that source) is closed to make room for the new one. A slowloris then only
//! slows itself, and a client that sends its hello at once always gets in. Established
//! connections are never touched. The same rule frees a slot when the connection cap
//! (`max_connections`) is reached and some of its slots are pending connections.
//!
//! Ids are the edge's connection ids: they grow, so the smallest is the oldest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// Why a pending connection was closed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Eviction {
    /// `max_pending_hellos` was reached.
    PendingCap,
    /// Its source had `max_pending_hellos_per_source` pending connections.
    SourceCap,
    /// The connection cap (`max_connections`) was reached.
    ConnectionCap,
}

impl Eviction {
    pub const ALL: [Eviction; 3] = [
        Eviction::PendingCap,
        Eviction::SourceCap,
        Eviction::ConnectionCap,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Eviction::PendingCap => "pending_cap",
            Eviction::SourceCap => "source_cap",
            Eviction::ConnectionCap => "connection_cap",
        }
    }
}

#[derive(Debug)]
pub struct PendingSet {
    /// id → source, oldest first.
    order: BTreeMap<u64, IpAddr>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
    max: usize,
    per_source: usize,
}

impl PendingSet {
    pub fn new(max: usize, per_source: usize) -> PendingSet {
        PendingSet {
            order: BTreeMap::new(),
            by_source: HashMap::new(),
            max: max.max(1),
            per_source: per_source.max(1),
        }
    }

    /// New caps (a reload); connections over them go as new ones arrive.
    pub fn set_limits(&mut self, max: usize, per_source: usize) {
        self.max = max.max(1);
        self.per_source = per_source.max(1);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// A new pending connection `id` from `source`: the connections to close to make room
    /// (the oldest of its source, then the oldest of all), already removed from the set.
    pub fn insert(&mut self, id: u64, source: IpAddr) -> Vec<(u64, Eviction)> {
        let mut out = self.make_room_for(source);
        while self.order.len() >= self.max {
            match self.pop_oldest() {
                Some(old) => out.push((old, Eviction::PendingCap)),
                None => break,
            }
        }
        self.order.insert(id, source);
        self.by_source.entry(source).or_default().insert(id);
        out
    }

    /// The connection's real source is known (a trusted PROXY header): it counts there now,
    /// and that source's oldest go if it is over its cap.
    pub fn move_to(&mut self, id: u64, source: IpAddr) -> Vec<(u64, Eviction)> {
        let Some(old) = self.order.get(&id).copied() else {
            return Vec::new();
        };
        if old == source {
            return Vec::new();
        }
        self.unlink(id, old);
        let out = self.make_room_for(source);
        self.order.insert(id, source);
        self.by_source.entry(source).or_default().insert(id);
        out
    }

    /// Close room for one more from `source`.
    fn make_room_for(&mut self, source: IpAddr) -> Vec<(u64, Eviction)> {
        let mut out = Vec::new();
        while let Some(ids) = self.by_source.get(&source) {
            if ids.len() < self.per_source {
                break;
            }
            let Some(&oldest) = ids.first() else { break };
            self.remove(oldest);
            out.push((oldest, Eviction::SourceCap));
        }
        out
    }

    /// The oldest pending connection, removed (the connection cap needs a slot).
    pub fn pop_oldest(&mut self) -> Option<u64> {
        let (&id, _) = self.order.iter().next()?;
        self.remove(id);
        Some(id)
    }

    /// `id` sent its hello, or closed: it is no longer pending.
    pub fn remove(&mut self, id: u64) {
        if let Some(source) = self.order.remove(&id) {
            self.unlink(id, source);
        }
    }

    fn unlink(&mut self, id: u64, source: IpAddr) {
        self.order.remove(&id);
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_oldest_goes_first_at_either_cap() {
        let mut p = PendingSet::new(4, 2);
        assert!(p.insert(1, ip(1)).is_empty());
        assert!(p.insert(2, ip(1)).is_empty());
        // A third from 10.0.0.1: its oldest goes.
        assert_eq!(p.insert(3, ip(1)), vec![(1, Eviction::SourceCap)]);
        assert!(p.insert(4, ip(2)).is_empty());
        assert!(p.insert(5, ip(3)).is_empty());
        assert_eq!(p.len(), 4);
        // The set is full: the oldest of all (2) goes for a newcomer from elsewhere.
        assert_eq!(p.insert(6, ip(4)), vec![(2, Eviction::PendingCap)]);
        // Sending a hello takes a connection out; it can never be evicted after.
        p.remove(3);
        assert_eq!(p.len(), 3);
        assert_eq!(p.pop_oldest(), Some(4));
        assert_eq!(p.pop_oldest(), Some(5));
        assert_eq!(p.pop_oldest(), Some(6));
        assert_eq!(p.pop_oldest(), None);
        assert!(p.by_source.is_empty(), "no empty source entries left");
    }

    #[test]
    fn a_proxy_header_moves_a_connection_to_its_real_source() {
        // Behind one load balancer every connection first counts for the balancer.
        let lb = ip(100);
        let mut p = PendingSet::new(100, 2);
        assert!(p.insert(1, lb).is_empty());
        assert!(p.insert(2, lb).is_empty());
        assert!(p.move_to(1, ip(1)).is_empty());
        assert!(p.move_to(2, ip(1)).is_empty());
        assert!(p.insert(3, lb).is_empty(), "the balancer's count went down");
        // A third from the same real client: its oldest goes.
        assert_eq!(p.move_to(3, ip(1)), vec![(1, Eviction::SourceCap)]);
        assert_eq!(p.move_to(99, ip(1)), vec![], "an unknown id is ignored");
    }
}
