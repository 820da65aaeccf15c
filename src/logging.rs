//! Log output. Lines are formatted on the thread that logs them but written to stderr by a
//! dedicated thread, so a slow stderr (a full journald pipe, a slow disk) never stalls the
//! proxy's workers. When the queue is full (16,384 lines), lines are dropped and counted in
//! `sluice_log_lines_dropped_total` rather than blocking a connection.

use std::sync::OnceLock;

pub use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder};

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Install the global subscriber. `filter` uses tracing-subscriber's EnvFilter syntax;
/// `RUST_LOG`, when set and valid, wins. Keep the guard until exit: dropping it flushes.
pub fn init(json: bool, filter: &str) -> WorkerGuard {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        // 32 bytes a slot, allocated up front: 512 KiB, not the default's 4 MiB.
        .buffered_lines_limit(16_384)
        .thread_name("sluice-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    guard
}

/// Lines dropped because the log queue was full (0 before `init`).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
