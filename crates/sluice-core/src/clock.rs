//! Time, injected. Nothing in this crate reads the clock: every time-based decision (backend
//! ejection and readiness, agent expiry and readiness, QUIC flow expiry) takes `now` as an
//! argument, as quinn-proto does. Components of the binary that keep time hold a `Clock`, so
//! a test can drive them with `ManualClock`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A monotonic clock.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

impl ManualClock {
    /// Starts at `start` (a test takes it from the real clock once).
    pub fn new(start: Instant) -> ManualClock {
        ManualClock(Mutex::new(start))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Milliseconds since `epoch`, saturating at zero: the compact timestamps the agent table and
/// the QUIC flow table store in atomics.
pub fn millis_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_millis() as u64
}
