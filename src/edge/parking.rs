//! The parking lot: established connections that have been idle for `park_idle_after`, held
//! without a task.
//!
//! Owns: one epoll set (through mio) in which parked connections' sockets wait for a byte, a
//! FIN or an error; a slab of the parked connections; and the hand-back to a task of their
//! own when a socket wakes, when the connection is due (its backend retired, its idle timeout
//! passed) or when the lot closes (the end of a drain).
//!
//! Why: most of a cluster's connections are agents' reverse tunnels, idle for minutes. On a
//! task, an idle tunnel holds tokio's task cell and a reactor registration per socket (about
//! 900 bytes that no trimming of sluice's own state can remove); parked, it holds its state
//! here and two entries in the kernel's epoll set. The lot never reads or writes a byte: a
//! woken connection goes back to a task and relays exactly as before, with its byte counts,
//! half-close state and idle clock.
//!
//! Readiness is edge-triggered: a socket registered here reports what already waits on it
//! (epoll checks at registration), so a byte that arrived while the connection left its
//! task is never missed. Keys are reused only after both sockets left the epoll set, under
//! the same lock, so a wake-up never reaches the wrong connection.

use std::os::fd::RawFd;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use prometheus::{IntCounter, IntGauge};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// A connection that can leave its task (`connection::Relaying`).
pub trait Pause: Sized {
    type Parked: Park;
    /// Its backend was retired: it must not park (its stop signal is about to close it).
    fn retired(&self) -> bool;
    /// The sockets the lot must watch.
    fn watched(&self) -> [Option<RawFd>; 2];
    /// Leave the task, counted by `tracked` as a connection task for the drain. `None`: the
    /// connection could not be paused and is closed.
    fn pause(self, tracked: TaskTrackerToken) -> Option<Self::Parked>;
}

/// A connection in the lot (`connection::Parked`).
pub trait Park: Send + 'static {
    /// The sockets the lot watches.
    fn watched(&self) -> [Option<RawFd>; 2];
    /// Its backend was retired: the lot must hand it back (its task then closes it).
    fn retired(&self) -> bool;
    /// When its idle timeout passes (the lot must hand it back then); `None`: never.
    fn idle_deadline(&self) -> Option<tokio::time::Instant>;
    /// Back to a task of its own, relaying where it left off.
    fn resume(self);
}

/// How often parked connections are checked for a retired backend or a passed idle timeout.
const SWEEP: Duration = Duration::from_secs(1);
/// Slab keys looked at per step of a scan (one hold of the lot's lock, about 50 µs).
const SCAN_CHUNK: usize = 1024;

/// Memory is given back to the OS (`trim`) once this many connections parked since the last
/// trim, as soon as parking settles (a sweep interval with no new park), or after
/// `TRIM_EVERY` if it never does.
const TRIM_AFTER_PARKS: usize = 256;
const TRIM_EVERY: Duration = Duration::from_secs(10);

pub struct Parking<P> {
    /// `None`: no epoll set could be made; connections stay on their tasks.
    registry: Option<mio::Registry>,
    /// The epoll set itself, until `run` takes it.
    poll: Mutex<Option<mio::Poll>>,
    lot: Mutex<Lot<P>>,
    /// `sluice_relay_parked`, `sluice_relay_parks_total`.
    parked_gauge: IntGauge,
    parks: IntCounter,
    /// The runtime's connection tracker: a parked connection still counts for the drain.
    tracker: TaskTracker,
}

struct Lot<P> {
    /// Connections parked since the last `trim`, and when that was.
    parks_since_trim: usize,
    last_trim: Option<std::time::Instant>,
    /// `parks_since_trim` at the previous sweep: unchanged means parking has settled.
    parks_at_last_sweep: usize,
    /// Inline, not boxed: parked connections live in the slab's few large blocks, not in
    /// small allocations scattered over the heap (which would pin its pages; see `trim`).
    parked: Slab<P>,
    /// `run` is serving the lot; false before it starts and after the lot closed.
    open: bool,
    /// The earliest idle deadline of a parked connection, or earlier (a connection that
    /// left keeps it until the next scan); `None`: none has one.
    next_idle_due: Option<tokio::time::Instant>,
    /// `upstream::retirements()` when the lot last checked every backend.
    retirements_seen: u64,
}

impl<P: Park> Parking<P> {
    pub fn new(parked_gauge: IntGauge, parks: IntCounter, tracker: TaskTracker) -> Parking<P> {
        let poll = mio::Poll::new().and_then(|p| Ok((p.registry().try_clone()?, p)));
        let (registry, poll) = match poll {
            Ok((r, p)) => (Some(r), Some(p)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the parking lot's epoll set; idle connections stay on their tasks");
                (None, None)
            }
        };
        Parking {
            registry,
            poll: Mutex::new(poll),
            lot: Mutex::new(Lot {
                parks_since_trim: 0,
                last_trim: None,
                parks_at_last_sweep: 0,
                parked: Slab::new(),
                open: false,
                next_idle_due: None,
                retirements_seen: crate::upstream::retirements(),
            }),
            parked_gauge,
            parks,
            tracker,
        }
    }

    fn lot(&self) -> std::sync::MutexGuard<'_, Lot<P>> {
        self.lot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take `r` off its task. `Err` gives it back when the lot is closed or its sockets cannot
    /// be watched; the caller relays on.
    // The refused connection goes back into its task by value: boxing it would cost an
    // allocation per parking for a path that is rare.
    #[allow(clippy::result_large_err)]
    pub fn park<R: Pause<Parked = P>>(&self, r: R) -> Result<(), R> {
        let Some(registry) = &self.registry else {
            return Err(r);
        };
        let mut lot = self.lot();
        // A retired backend's connection stays on its task, whose stop signal closes it.
        // Checked under the lock: a retirement after this is seen by the lot's next sweep.
        if !lot.open || r.retired() {
            return Err(r);
        }
        let key = lot.parked.vacant_key();
        // Registered before the sockets leave tokio: readiness that arrives in between is
        // reported here (the lot's wake-ups wait for this lock, so they find the entry).
        let fds = r.watched();
        for (i, fd) in fds.iter().enumerate() {
            let Some(fd) = fd else { continue };
            if let Err(e) = registry.register(&mut SourceFd(fd), Token(key), Interest::READABLE) {
                tracing::warn!(error = %e, "cannot park a connection; it stays on its task");
                for fd in fds[..i].iter().flatten() {
                    let _ = registry.deregister(&mut SourceFd(fd));
                }
                return Err(r);
            }
        }
        // On `None` the connection is closed and logged; closing its sockets removed them
        // from the epoll set.
        if let Some(parked) = r.pause(self.tracker.token()) {
            if let Some(at) = parked.idle_deadline() {
                lot.next_idle_due = Some(lot.next_idle_due.map_or(at, |due| due.min(at)));
            }
            lot.parked.insert(parked);
            lot.parks_since_trim += 1;
            self.parked_gauge.inc();
            self.parks.inc();
        }
        Ok(())
    }

    /// Hand the connections at the keys `pick` returns (those still there) back to tasks of
    /// their own: out of the lot and the epoll set under the lock (so a key is reused only
    /// once its sockets left the set), resumed outside it.
    fn hand_back(&self, pick: impl FnOnce(&mut Lot<P>) -> Vec<usize>) {
        let mut taken = Vec::new();
        {
            let mut lot = self.lot();
            for key in pick(&mut lot) {
                let Some(p) = lot.parked.try_remove(key) else {
                    continue;
                };
                if let Some(registry) = &self.registry {
                    for fd in p.watched().iter().flatten() {
                        let _ = registry.deregister(&mut SourceFd(fd));
                    }
                }
                taken.push(p);
            }
        }
        self.parked_gauge.sub(taken.len() as i64);
        for p in taken {
            p.resume();
        }
    }

    /// `Some(parks)` when the memory freed by the connections parked since the last trim
    /// should go back to the OS now (called once per sweep interval): enough of them, and
    /// either the crowd has settled or the last trim is `TRIM_EVERY` old. Waiting for the
    /// crowd matters: tunnels opened over several seconds park over several seconds, and a
    /// trim after the first few hundred would leave the rest's memory for `TRIM_EVERY`.
    fn trim_due(&self, now: std::time::Instant) -> Option<usize> {
        let mut lot = self.lot();
        let parks = lot.parks_since_trim;
        let settled = parks == lot.parks_at_last_sweep;
        lot.parks_at_last_sweep = parks;
        let waited = lot.last_trim.is_none_or(|t| now - t >= TRIM_EVERY);
        if parks < TRIM_AFTER_PARKS || !(settled || waited) {
            return None;
        }
        lot.parks_since_trim = 0;
        lot.parks_at_last_sweep = 0;
        lot.last_trim = Some(now);
        Some(parks)
    }

    /// Connections whose sockets woke.
    fn woken(&self, events: &Events) {
        self.hand_back(|_| events.iter().map(|e| e.token().0).collect());
    }

    /// Whether a sweep has anything to look for: a backend retired since the last scan, or
    /// an idle deadline passed. With neither (tunnels have no idle timeout; backends rarely
    /// retire), a sweep costs nothing however many connections are parked.
    fn sweep_due(&self, now: tokio::time::Instant) -> bool {
        let lot = self.lot();
        lot.retirements_seen != crate::upstream::retirements()
            || lot.next_idle_due.is_some_and(|due| due <= now)
    }

    /// One step of a scan for connections that are due (a retired backend, a passed idle
    /// timeout): `SCAN_CHUNK` slab keys from `from`, under the lock, handed back outside it.
    /// Returns where the next step starts, `None` when the scan is over. The lock is held for
    /// one step at a time, so parking and waking go on during a scan of a very large lot.
    fn scan_step(&self, now: tokio::time::Instant, from: usize) -> Option<usize> {
        let mut next_step = None;
        self.hand_back(|lot| {
            if from == 0 {
                // A new scan: it recomputes the earliest deadline from what it finds
                // (connections parked meanwhile add theirs), and sees every retirement
                // counted until now.
                lot.retirements_seen = crate::upstream::retirements();
                lot.next_idle_due = None;
            }
            let to = (from + SCAN_CHUNK).min(lot.parked.capacity());
            let mut due = Vec::new();
            let mut earliest = lot.next_idle_due;
            for key in from..to {
                let Some(p) = lot.parked.get(key) else {
                    continue;
                };
                let deadline = p.idle_deadline();
                if p.retired() || deadline.is_some_and(|at| at <= now) {
                    due.push(key);
                } else if let Some(at) = deadline {
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                }
            }
            lot.next_idle_due = earliest;
            next_step = (to < lot.parked.capacity()).then_some(to);
            due
        });
        next_step
    }

    /// After a crowd woke (a backend's broadcast, the end of a burst), give the slab's room
    /// back: up to its last occupied entry, the rest is freed.
    fn compact(&self) {
        let mut lot = self.lot();
        if lot.parked.capacity() >= 1024 && lot.parked.len() * 4 < lot.parked.capacity() {
            lot.parked.shrink_to_fit();
        }
    }

    /// No more parking; every parked connection goes back to a task, where its stop signal
    /// (already fired) closes it.
    fn close(&self) {
        self.hand_back(|lot| {
            lot.open = false;
            lot.parked.iter().map(|(k, _)| k).collect()
        });
    }
}

/// Serve the lot until `close_all` (the end of a drain, or a hard stop): wake connections
/// whose sockets are ready, sweep for due ones every second, then hand back every one.
pub async fn run<O, P>(owner: Weak<O>, lot: fn(&O) -> &Parking<P>, close_all: CancellationToken)
where
    O: Send + Sync + 'static,
    P: Park,
{
    let Some(poll) = owner.upgrade().and_then(|o| {
        lot(&o)
            .poll
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }) else {
        return;
    };
    // SAFETY: the `mio::Poll` owns its epoll descriptor for its whole life and never
    // replaces it; the AsyncFd owns the Poll.
    #[allow(unsafe_code)]
    let epoll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) };
    let mut epoll = match epoll {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the parking lot's epoll set; idle connections stay on their tasks");
            return;
        }
    };
    match owner.upgrade() {
        Some(o) => lot(&o).lot().open = true,
        None => return,
    }
    let mut events = Events::with_capacity(1024);
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = epoll.readable_mut() => {
                let Ok(mut ready) = ready else { break };
                let Some(o) = owner.upgrade() else { return };
                let parking = lot(&o);
                // Until the set is empty: the runtime reports the epoll fd again only for
                // new readiness.
                let failed = loop {
                    match ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => break Some(e),
                    }
                    if events.is_empty() {
                        ready.clear_ready();
                        break None;
                    }
                    parking.woken(&events);
                    // Thousands of tunnels waking at once: let this worker's other tasks
                    // (the woken ones among them) run between batches.
                    tokio::task::yield_now().await;
                };
                if let Some(e) = failed {
                    tracing::error!(error = %e, "the parking lot's epoll set failed; no more parking");
                    break;
                }
            }
            _ = sweep.tick() => {
                let Some(o) = owner.upgrade() else { return };
                let parking = lot(&o);
                parking.compact();
                let now = tokio::time::Instant::now();
                if parking.sweep_due(now) {
                    // In steps, letting this worker's other tasks run between them.
                    let mut from = 0;
                    while let Some(next) = parking.scan_step(now, from) {
                        from = next;
                        tokio::task::yield_now().await;
                    }
                }
                if let Some(parks) = parking.trim_due(std::time::Instant::now()) {
                    tokio::task::spawn_blocking(move || trim(parks));
                }
            }
            _ = close_all.cancelled() => break,
        }
    }
    if let Some(o) = owner.upgrade() {
        lot(&o).close();
    }
}

/// Give the heap's free pages back to the OS. A parked connection frees its task, its
/// reactor registrations and its buffers, but glibc keeps freed memory resident until whole
/// pages are free and it is asked to return them; the parked state itself lives in the
/// slab's large blocks, so those pages do come free. Runs on a blocking thread (it walks
/// every arena's free lists, about 0.1 ms for a 25 MB heap).
fn trim(parks: usize) {
    let started = std::time::Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only takes the allocator's own locks.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    tracing::debug!(
        parks,
        micros = started.elapsed().as_micros() as u64,
        "returned free heap pages to the OS"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Parks since the last trim as each sweep finds them, and what `trim_due` says.
    struct Nothing;

    impl Park for Nothing {
        fn watched(&self) -> [Option<RawFd>; 2] {
            [None, None]
        }
        fn retired(&self) -> bool {
            false
        }
        fn idle_deadline(&self) -> Option<tokio::time::Instant> {
            None
        }
        fn resume(self) {}
    }

    fn new_lot() -> Parking<Nothing> {
        Parking::new(
            IntGauge::new("parked", "parked").unwrap(),
            IntCounter::new("parks", "parks").unwrap(),
            TaskTracker::new(),
        )
    }

    fn sweeps(lot: &Parking<Nothing>, start: Instant, parks: &[usize]) -> Vec<Option<usize>> {
        parks
            .iter()
            .enumerate()
            .map(|(second, &n)| {
                lot.lot().parks_since_trim += n;
                lot.trim_due(start + Duration::from_secs(second as u64))
            })
            .collect()
    }

    #[test]
    fn memory_is_trimmed_once_a_crowd_has_parked_or_every_ten_seconds() {
        let t0 = Instant::now();
        // A crowd parking over four seconds: the first trim comes at once, the next one the
        // second after the crowd settled (not ten seconds later).
        let lot = new_lot();
        assert_eq!(
            sweeps(&lot, t0, &[300, 2000, 4000, 2700, 0, 0]),
            [Some(300), None, None, None, Some(8700), None]
        );
        // Too few parked: never, settled or not.
        let lot = new_lot();
        assert_eq!(sweeps(&lot, t0, &[100, 0, 100, 0]), [None; 4]);
        // Parking that never settles: every ten seconds.
        let lot = new_lot();
        let trims = sweeps(&lot, t0, &[300; 21]);
        let at: Vec<usize> = (0..21).filter(|&i| trims[i].is_some()).collect();
        assert_eq!(at, [0, 10, 20]);
        assert_eq!(trims[10], Some(3000));
    }
}
