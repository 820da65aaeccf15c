//! Time, injected. Nothing in this crate reads the clock (`clippy.toml` forbids
//! `Instant::now` and `SystemTime::now` here): every time-based decision takes the time as an
//! argument, as quinn-proto does — backend readiness and passive ejection
//! (`eligibility::Outlier`), agent expiry, readiness and sweeping (`agents::table`), QUIC flow
//! expiry and pending hellos (`quic::flows`). Times are milliseconds on the caller's
//! monotonic clock (`millis_since` a fixed epoch), so they fit the atomics the tables keep them
//! in, and a test passes made-up ones.

use std::time::Instant;

/// Milliseconds from `epoch` to `t`, zero if `t` is earlier: the compact timestamps the
/// tables store.
#[inline]
pub fn millis_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_millis() as u64
}
