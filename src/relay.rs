//! The relay: bytes both ways between client and backend until both sides are done.
//!
//! Owns: exact half-close (a FIN from one side becomes a shutdown(SHUT_WR) toward the other,
//! and the other direction keeps flowing), the idle timeout, and memory discipline. A relayed
//! connection is mostly an idle tunnel, so the state here is a small hand-polled future (no
//! nested async state machines), and a direction holds a buffer only while it has bytes to
//! move: the buffer is allocated when the socket becomes readable and freed as soon as a read
//! would block with nothing left to write. It never interprets the bytes.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Resolves when the connection must close, with the reason.
pub type StopSignal = Pin<Box<dyn Future<Output = End> + Send>>;

/// Buffer sizes: a direction starts small (tunnels mostly carry small messages, and many
/// connections opening at once should not each leave a large freed block in the heap) and
/// doubles whenever a read fills its buffer, up to `MAX_CHUNK` for bulk transfers.
const MIN_CHUNK: usize = 2 * 1024;
const MAX_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    ClientError,
    BackendError,
    IdleTimeout,
    /// The process stopped the connection (end of a drain).
    Shutdown,
    /// A reload removed its backend and the pool's `removed_drain_timeout` passed.
    BackendRemoved,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
            End::IdleTimeout => "idle_timeout",
            End::Shutdown => "shutdown",
            End::BackendRemoved => "backend_removed",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    pub to_backend: u64,
    pub to_client: u64,
}

/// One direction's state.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet written are `buf[pos..]`. `None` while idle.
    buf: Option<Vec<u8>>,
    pos: u32,
    /// Size of the next buffer to allocate (0 = not yet chosen).
    chunk: u32,
    eof: bool,
    done: bool,
    moved: u64,
}

/// Which socket failed.
#[derive(Clone, Copy)]
enum Failed {
    From,
    To,
}

impl Pump {
    /// Move bytes `from` → `to` until it would block (Pending) or this direction is finished.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        counter: &IntCounter,
        active: &mut bool,
    ) -> Poll<Result<(), Failed>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(buf) = &self.buf {
                if (self.pos as usize) < buf.len() {
                    match to.poll_write_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::To)),
                        Poll::Ready(Ok(())) => {}
                    }
                    match to.try_write(&buf[self.pos as usize..]) {
                        Ok(n) => {
                            self.pos += n as u32;
                            self.moved += n as u64;
                            counter.inc_by(n as u64);
                            *active = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Poll::Ready(Err(Failed::To)),
                    }
                    continue;
                }
            }
            if self.eof {
                // Pass the FIN on; the other direction keeps flowing.
                self.buf = None;
                self.done = true;
                if let Err(e) = SockRef::from(to).shutdown(Shutdown::Write) {
                    if e.kind() != io::ErrorKind::NotConnected {
                        return Poll::Ready(Err(Failed::To));
                    }
                }
                return Poll::Ready(Ok(()));
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => {
                    // Idle: hold no buffer.
                    self.buf = None;
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::From)),
                Poll::Ready(Ok(())) => {}
            }
            if self.chunk == 0 {
                self.chunk = MIN_CHUNK as u32;
            }
            let chunk = self.chunk as usize;
            // Everything buffered was written: the buffer is empty and can be resized.
            if self.buf.as_ref().is_some_and(|b| b.capacity() < chunk) {
                self.buf = None;
            }
            let buf = self.buf.get_or_insert_with(|| Vec::with_capacity(chunk));
            buf.clear();
            self.pos = 0;
            match from.try_read_buf(buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    *active = true;
                    if n == buf.capacity() && chunk < MAX_CHUNK {
                        // A full read: more is probably waiting; read more at a time.
                        self.chunk = (chunk * 2) as u32;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Poll::Ready(Err(Failed::From)),
            }
        }
    }
}

/// Idle limit, the timer, and the time of the last byte.
type IdleTimer = (Duration, Pin<Box<Sleep>>, Instant);

/// The relay state of one connection: the two directions, the idle timer and the stop
/// signal. It holds no socket: the caller owns the sockets (and the counters) next to it and
/// lends them to each `poll_relay`, so the whole connection is one flat task with no
/// self-references. Small on purpose: an idle tunnel is this struct and two sockets.
pub struct Relay {
    up: Pump,
    down: Pump,
    /// Idle limit, timer and time of the last byte; `None` for tunnels (no timer at all).
    /// Boxed: tunnels, which have none, should not carry its space.
    idle: Option<Box<IdleTimer>>,
    stop: StopSignal,
}

impl Relay {
    /// Relay until both directions are done, one fails, the idle timeout passes, or `stop`
    /// fires.
    pub fn new(idle_timeout: Option<Duration>, stop: StopSignal) -> Relay {
        let idle = idle_timeout.map(|limit| {
            let now = Instant::now();
            Box::new((limit, Box::pin(tokio::time::sleep_until(now + limit)), now))
        });
        Relay {
            up: Pump::default(),
            down: Pump::default(),
            idle,
            stop,
        }
    }

    fn outcome(&self, end: End) -> Poll<Outcome> {
        Poll::Ready(Outcome {
            end,
            to_backend: self.up.moved,
            to_client: self.down.moved,
        })
    }

    /// Move what can be moved; `Ready` once the connection is over, with why.
    /// `counters` are (to backend, to client).
    pub fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        client: &TcpStream,
        backend: &TcpStream,
        counters: (&IntCounter, &IntCounter),
    ) -> Poll<Outcome> {
        if let Poll::Ready(end) = self.stop.as_mut().poll(cx) {
            return self.outcome(end);
        }
        let mut active = false;
        let up = self.up.poll(cx, client, backend, counters.0, &mut active);
        if let Poll::Ready(Err(f)) = up {
            let end = match f {
                Failed::From => End::ClientError,
                Failed::To => End::BackendError,
            };
            return self.outcome(end);
        }
        let down = self.down.poll(cx, backend, client, counters.1, &mut active);
        if let Poll::Ready(Err(f)) = down {
            let end = match f {
                Failed::From => End::BackendError,
                Failed::To => End::ClientError,
            };
            return self.outcome(end);
        }
        if up.is_ready() && down.is_ready() {
            return self.outcome(End::Closed);
        }
        if let Some(idle) = &mut self.idle {
            let (limit, sleep, last) = &mut **idle;
            if active {
                *last = Instant::now();
            }
            // The timer is only re-armed when it fires, not on every byte.
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = *last + *limit;
                if Instant::now() >= deadline {
                    return self.outcome(End::IdleTimeout);
                }
                sleep.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}
