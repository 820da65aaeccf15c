//! Log output. Lines are formatted on the thread that logs them, appended to a shared buffer,
//! and written to stderr in batches by a dedicated thread, so a slow stderr (a full journald
//! pipe, a slow disk) never stalls the proxy's workers, and a busy edge pays one `write(2)` per
//! batch instead of a thread wake-up and a write per access-log line.
//!
//! The writer thread sleeps until the buffer stops being empty, then lingers `LINGER` so that
//! the lines of that moment share one write: a line reaches stderr at most a few milliseconds
//! after it was logged, and an idle process does not wake at all. When more than
//! `MAX_PENDING` bytes wait (stderr stalled), new lines are dropped and counted in
//! `sluice_log_lines_dropped_total` rather than blocking a connection.
//! (`bench/findings.md`, item 10: the per-line hand-off cost about 7 system calls a
//! connection.)

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer waits after the first line of a batch for more to join it.
const LINGER: Duration = Duration::from_millis(5);
/// A batch this large is written without lingering.
const BATCH: usize = 64 * 1024;
/// Bytes that may wait for stderr before lines are dropped.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// How long exiting waits for the last lines to be written.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(1);

struct Shared {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    stop: AtomicBool,
    dropped: AtomicU64,
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    /// Queue one formatted line (tracing-subscriber writes each event with one `write_all`).
    fn push(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() + line.len() > MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = pending.is_empty();
        pending.extend_from_slice(line);
        drop(pending);
        // Only the first line of a batch wakes the writer; the others find it lingering.
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// The writer thread: batches to `out` until stopped, then writes what is left.
    fn run(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                while pending.is_empty() && !self.stop.load(Ordering::Acquire) {
                    pending = self.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
                }
                if pending.is_empty() {
                    return; // stopped, everything written
                }
                if pending.len() < BATCH && !self.stop.load(Ordering::Acquire) {
                    drop(pending);
                    std::thread::sleep(LINGER);
                    pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                }
                std::mem::swap(&mut *pending, &mut batch);
            }
            // A failed write (stderr closed) loses this batch, as a blocking logger would.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // A stall's backlog should not stay allocated once it has been written.
            if batch.capacity() > 4 * BATCH {
                batch = Vec::new();
            }
        }
    }
}

/// What tracing-subscriber writes each formatted line to.
#[derive(Clone)]
struct Queue(Arc<Shared>);

impl Write for Queue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queue {
    type Writer = Queue;

    fn make_writer(&'a self) -> Queue {
        self.clone()
    }
}

/// Keep until exit: dropping it writes the lines still queued (waiting at most 1 s).
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Under the lock, so the writer cannot check `stop` and then miss the wake-up.
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.stop.store(true, Ordering::Release);
        drop(pending);
        self.shared.wake.notify_one();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + FLUSH_ON_EXIT;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

/// Install the global subscriber. `filter` uses tracing-subscriber's EnvFilter syntax;
/// `RUST_LOG`, when set and valid, wins.
pub fn init(json: bool, filter: &str) -> LogGuard {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shared = SHARED.get_or_init(Shared::new).clone();
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("sluice-log".into())
        .spawn(move || worker.run(std::io::stderr()))
        .ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Queue(shared.clone()));
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    LogGuard { shared, thread }
}

/// Lines dropped because too much was waiting for stderr (0 before `init`).
pub fn dropped_lines() -> u64 {
    SHARED
        .get()
        .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records each write it receives.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_in_batches_and_flushed_on_stop() {
        let shared = Shared::new();
        let sink = Sink::default();
        let worker = shared.clone();
        let out = sink.clone();
        let thread = std::thread::spawn(move || worker.run(out));
        for i in 0..1000 {
            shared.push(format!("line {i}\n").as_bytes());
        }
        let guard = LogGuard {
            shared: shared.clone(),
            thread: Some(thread),
        };
        drop(guard);
        let writes = sink.0.lock().unwrap();
        let all: Vec<u8> = writes.concat();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&all), expected);
        assert!(
            writes.len() < 1000,
            "{} writes for 1000 lines",
            writes.len()
        );
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_instead_of_growing() {
        let shared = Shared::new();
        let line = vec![b'x'; 1024];
        // No writer thread: nothing drains the queue.
        for _ in 0..(MAX_PENDING / 1024 + 10) {
            shared.push(&line);
        }
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 10);
        assert!(shared.pending.lock().unwrap().len() <= MAX_PENDING);
    }
}
