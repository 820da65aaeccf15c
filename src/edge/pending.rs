//! The connections that have not sent their hello yet, with the power to close the oldest to
//! make room (the rule is `sluice_core::pending`). Each pending connection holds a
//! `PendingGuard` and waits on its eviction signal beside its hello; the guard takes it out
//! of the set once the hello is read, or when the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use prometheus::{IntCounterVec, IntGauge};
use sluice_core::pending::{Eviction, PendingSet};
use tokio::sync::oneshot;

pub struct Pending {
    inner: Mutex<Inner>,
    gauge: IntGauge,
    evictions: IntCounterVec,
}

struct Inner {
    set: PendingSet,
    /// How to tell each pending connection it was evicted.
    signals: HashMap<u64, oneshot::Sender<Eviction>>,
}

/// A pending connection's place in the set; dropping it takes the connection out.
pub struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Pending {
    pub fn new(
        max: usize,
        per_source: usize,
        gauge: IntGauge,
        evictions: IntCounterVec,
    ) -> Pending {
        // Every reason is exported from the start, at 0.
        for why in Eviction::ALL {
            evictions.with_label_values(&[why.label()]);
        }
        Pending {
            inner: Mutex::new(Inner {
                set: PendingSet::new(max, per_source),
                signals: HashMap::new(),
            }),
            gauge,
            evictions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_limits(&self, max: usize, per_source: usize) {
        self.lock().set.set_limits(max, per_source);
    }

    /// Connection `id` from `source` starts waiting for its hello; the receiver fires if it
    /// is evicted to make room for a newer one.
    pub fn register(
        &self,
        id: u64,
        source: IpAddr,
    ) -> (PendingGuard<'_>, oneshot::Receiver<Eviction>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        let evicted = inner.set.insert(id, source);
        inner.signals.insert(id, tx);
        self.fire(&mut inner, evicted);
        (PendingGuard { pending: self, id }, rx)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().set.is_empty()
    }

    /// Close the oldest pending connection (the connection cap needs a slot): whether there
    /// was one.
    pub fn evict_oldest(&self) -> bool {
        let mut inner = self.lock();
        match inner.set.pop_oldest() {
            Some(id) => {
                self.fire(&mut inner, vec![(id, Eviction::ConnectionCap)]);
                true
            }
            None => false,
        }
    }

    fn fire(&self, inner: &mut Inner, evicted: Vec<(u64, Eviction)>) {
        for (id, why) in evicted {
            if let Some(tx) = inner.signals.remove(&id) {
                let _ = tx.send(why);
            }
            self.evictions.with_label_values(&[why.label()]).inc();
        }
        self.gauge.set(inner.set.len() as i64);
    }
}

impl PendingGuard<'_> {
    /// The real source is known (a trusted PROXY header).
    pub fn moved_to(&self, source: IpAddr) {
        let mut inner = self.pending.lock();
        let evicted = inner.set.move_to(self.id, source);
        self.pending.fire(&mut inner, evicted);
    }

    /// The hello is read: no longer pending, never evicted from now on.
    pub fn done(&self) {
        let mut inner = self.pending.lock();
        inner.set.remove(self.id);
        inner.signals.remove(&self.id);
        self.pending.gauge.set(inner.set.len() as i64);
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.done();
    }
}
