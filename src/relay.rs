//! The relay: bytes both ways between client and backend until both sides are done.
//!
//! Owns: exact half-close (a FIN from one side becomes a shutdown(SHUT_WR) toward the other, and
//! the other direction keeps flowing), the idle timeout, and memory discipline: an idle
//! connection holds no buffer. A direction allocates its buffer only when its socket is
//! readable, keeps it while data keeps coming, and frees it as soon as a read would block.
//! It never interprets the bytes.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Per-read buffer. Allocated on readiness, released when the socket runs dry.
const CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    ClientError,
    BackendError,
    IdleTimeout,
    /// The process stopped the connection (end of a drain).
    Shutdown,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
            End::IdleTimeout => "idle_timeout",
            End::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    pub to_backend: u64,
    pub to_client: u64,
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    from_side: Side,
    counter: &'a IntCounter,
    moved: &'a AtomicU64,
    last_activity: &'a AtomicU64,
    epoch: Instant,
}

impl Direction<'_> {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_activity.store(ms, Ordering::Relaxed);
    }

    fn fail(&self, reading: bool) -> Side {
        match (self.from_side, reading) {
            (s, true) => s,
            (Side::Client, false) => Side::Backend,
            (Side::Backend, false) => Side::Client,
        }
    }

    async fn run(self) -> Result<(), Side> {
        loop {
            self.from.readable().await.map_err(|_| self.fail(true))?;
            let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
            loop {
                buf.clear();
                match self.from.try_read_buf(&mut buf) {
                    Ok(0) => {
                        // FIN: pass it on; the other direction keeps going.
                        if let Err(e) = SockRef::from(self.to).shutdown(Shutdown::Write) {
                            if e.kind() != io::ErrorKind::NotConnected {
                                return Err(self.fail(false));
                            }
                        }
                        return Ok(());
                    }
                    Ok(n) => {
                        self.touch();
                        self.write_all(&buf[..n]).await?;
                        self.counter.inc_by(n as u64);
                        self.moved.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(self.fail(true)),
                }
            }
            // `buf` is dropped here: nothing is held while the socket is idle.
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> Result<(), Side> {
        while !data.is_empty() {
            match self.to.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.to.writable().await.map_err(|_| self.fail(false))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(self.fail(false)),
            }
        }
        Ok(())
    }
}

/// Relay until both directions are done, one fails, the idle timeout passes, or `stop` fires.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    idle_timeout: Option<Duration>,
    counters: (&IntCounter, &IntCounter),
    stop: &CancellationToken,
) -> Outcome {
    let epoch = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let to_backend = Direction {
        from: client,
        to: backend,
        from_side: Side::Client,
        counter: counters.0,
        moved: &up,
        last_activity: &last_activity,
        epoch,
    };
    let to_client = Direction {
        from: backend,
        to: client,
        from_side: Side::Backend,
        counter: counters.1,
        moved: &down,
        last_activity: &last_activity,
        epoch,
    };
    let idle = async {
        match idle_timeout {
            None => std::future::pending::<()>().await,
            Some(limit) => loop {
                let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
                let deadline = epoch + last + limit;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            },
        }
    };
    let end = tokio::select! {
        r = async { tokio::try_join!(to_backend.run(), to_client.run()) } => match r {
            Ok(_) => End::Closed,
            Err(Side::Client) => End::ClientError,
            Err(Side::Backend) => End::BackendError,
        },
        _ = idle => End::IdleTimeout,
        _ = stop.cancelled() => End::Shutdown,
    };
    Outcome {
        end,
        to_backend: up.load(Ordering::Relaxed),
        to_client: down.load(Ordering::Relaxed),
    }
}
