//! The relay: bytes both ways between client and backend until both sides are done.
//!
//! Owns: exact half-close (a FIN from one side becomes a shutdown(SHUT_WR) toward the other,
//! and the other direction keeps flowing), the idle timeout, and memory discipline. A relayed
//! connection is mostly an idle tunnel, so the state here is a small hand-polled future (no
//! nested async state machines). Bytes are read into a per-thread scratch buffer and written
//! on at once; a direction holds a buffer of its own only while its target is behind, and
//! frees it when the direction goes idle. After `park_after` without a byte it reports
//! `Idle`, and the connection may leave its task for the parking lot (`Relay::pause`, see
//! `parking`). It never interprets the bytes.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::Keepalive;
use crate::edge::splice::Pipe;
use sluice_core::close::CloseReason;

/// Resolves when the connection must close, with the reason.
pub type StopSignal = Pin<Box<dyn Future<Output = CloseReason> + Send>>;

/// Each worker thread reads into one scratch buffer of this size and writes from it at once;
/// a connection holds bytes of its own only when its target would block.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: CloseReason,
    pub to_backend: u64,
    pub to_client: u64,
}

/// One direction's state.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet written, because the target would block: `stash[pos..]`.
    /// Unallocated unless the target is behind.
    stash: Vec<u8>,
    pos: u32,
    eof: bool,
    done: bool,
    /// splice(2) failed as unsupported here: copy only.
    no_splice: bool,
    moved: u64,
    /// While moving bulk data: a pipe to splice through (see `splice`).
    pipe: Option<Box<Pipe>>,
}

/// Which socket failed.
#[derive(Clone, Copy)]
enum Failed {
    From,
    To,
}

/// Write to `to`; `Ok(0)` (a zero-length write) is a failure, `Pending` registers the waker.
fn poll_write(cx: &mut Context<'_>, to: &mut TcpStream, buf: &[u8]) -> Poll<Result<usize, Failed>> {
    match Pin::new(to).poll_write(cx, buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(Failed::To)),
        Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
    }
}

impl Pump {
    /// `n` bytes reached the target.
    fn wrote(&mut self, n: usize, counter: &IntCounter) {
        self.moved += n as u64;
        counter.inc_by(n as u64);
    }

    /// Give the pipe (if any) back to the pool.
    fn release_pipe(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            pipe.give_back();
        }
    }

    /// Move bytes `from` → `to` until it would block (Pending) or this direction is finished.
    /// `other_done`: the opposite direction has finished, so this one finishing ends the
    /// connection, and closing the sockets passes the FIN on without a `shutdown`.
    ///
    /// Reads go through tokio's `poll_read`, which takes a short read as proof that the
    /// socket is drained: the next poll waits for readiness without a `recv` that would
    /// only answer EAGAIN (likewise for short writes).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        counter: &IntCounter,
        other_done: bool,
        active: &mut bool,
    ) -> Poll<Result<(), Failed>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if (self.pos as usize) < self.stash.len() {
                let n = ready!(poll_write(cx, to, &self.stash[self.pos as usize..]))?;
                self.pos += n as u32;
                self.wrote(n, counter);
                *active = true;
                continue;
            }
            if let Some(pipe) = &mut self.pipe {
                if pipe.len > 0 {
                    ready!(to.poll_write_ready(cx)).map_err(|_| Failed::To)?;
                    match to.try_io(Interest::WRITABLE, || pipe.drain_to(to.as_raw_fd())) {
                        Ok(n) => {
                            self.wrote(n, counter);
                            *active = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Poll::Ready(Err(Failed::To)),
                    }
                    continue;
                }
                if !self.eof {
                    match from.poll_read_ready(cx) {
                        Poll::Pending => {
                            // Idle: the (empty) pipe goes back to the pool.
                            self.release_pipe();
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::From)),
                        Poll::Ready(Ok(())) => {}
                    }
                    match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_raw_fd())) {
                        Ok(0) => self.eof = true,
                        Ok(_) => *active = true,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            // Not spliceable after all: copy from now on.
                            self.no_splice = true;
                            self.release_pipe();
                        }
                        Err(_) => return Poll::Ready(Err(Failed::From)),
                    }
                    continue;
                }
                self.release_pipe();
            }
            if self.eof {
                self.stash = Vec::new();
                self.done = true;
                // Pass the FIN on; the other direction keeps flowing.
                if !other_done {
                    if let Err(e) = SockRef::from(&*to).shutdown(Shutdown::Write) {
                        if e.kind() != io::ErrorKind::NotConnected {
                            return Poll::Ready(Err(Failed::To));
                        }
                    }
                }
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH_BUF.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut read = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::From)),
                    Poll::Ready(Ok(())) => {}
                }
                let n = read.filled().len();
                if n == 0 {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                *active = true;
                let mut written = 0;
                while written < n {
                    match poll_write(cx, to, &scratch[written..n]) {
                        Poll::Ready(Ok(w)) => written += w,
                        Poll::Ready(Err(f)) => return Poll::Ready(Err(f)),
                        Poll::Pending => break,
                    }
                }
                self.wrote(written, counter);
                if n == SCRATCH && written == n && !self.no_splice {
                    // A full buffer: bulk data is flowing; move the rest without copying.
                    self.pipe = Pipe::take().map(Box::new);
                }
                if written < n {
                    // The target is behind: keep the rest (and its waker is registered).
                    self.stash.clear();
                    self.stash.extend_from_slice(&scratch[written..n]);
                    self.pos = 0;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(()))
            });
            match step {
                Poll::Pending => {
                    // Idle (or waiting for the target with the stash full): while idle,
                    // hold no buffer.
                    if (self.pos as usize) >= self.stash.len() {
                        self.stash = Vec::new();
                        self.pos = 0;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(f)) => return Poll::Ready(Err(f)),
                Poll::Ready(Ok(())) => {}
            }
        }
    }
}

/// The relay's clock: the idle limit, when to park, and the time of the last byte. Plain
/// values, so a parked connection keeps it as is.
#[derive(Clone, Copy)]
struct Clock {
    last: Instant,
    /// When the connection came onto its task: a resumed connection is not parked again
    /// before it had `park_after` to read what woke it (tokio reports a socket's readiness
    /// only once its reactor has turned, after the task's first poll).
    awake: Instant,
    /// Close after this long without a byte (the route's `idle_timeout`).
    idle_limit: Option<Duration>,
    /// Hand the connection to the parking lot after this long without a byte.
    park_after: Option<Duration>,
}

impl Clock {
    /// `None` when there is neither an idle limit nor parking: no clock at all.
    fn new(
        idle_limit: Option<Duration>,
        park_after: Option<Duration>,
        last: Instant,
    ) -> Option<Clock> {
        (idle_limit.is_some() || park_after.is_some()).then_some(Clock {
            last,
            awake: last,
            idle_limit,
            park_after,
        })
    }

    fn idle_at(&self) -> Option<Instant> {
        self.idle_limit.map(|l| self.last + l)
    }

    fn park_at(&self) -> Option<Instant> {
        self.park_after.map(|p| self.last.max(self.awake) + p)
    }

    /// The next moment something is due, given that nothing can be parked before `now` if
    /// `park_due` is false.
    fn next(&self, now: Instant, park_due: bool) -> Option<Instant> {
        let park = self.park_at().zip(self.park_after).map(|(at, p)| {
            if at <= now && !park_due {
                now + p
            } else {
                at
            }
        });
        match (self.idle_at(), park) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The clock and the one timer that fires when it says something is due.
struct Timer {
    clock: Clock,
    sleep: Pin<Box<Sleep>>,
    /// The backend leg's TCP keepalive, not yet set: the connection takes it (`take_keepalive`)
    /// when the relay first reports it idle. Kept here, on the heap while the connection is on
    /// its task, so that it costs the task itself nothing.
    keepalive: Option<Keepalive>,
}

/// What `poll_relay` came to.
pub enum Relayed {
    /// The connection is over.
    Ended(Outcome),
    /// Nothing moved for `park_after` and nothing is buffered: the caller may `pause` the
    /// relay and park the connection (or call `never_park` and poll on).
    Idle,
}

/// The relay state of one connection: the two directions, the timer and the stop signal. It
/// holds no socket: the caller owns the sockets (and the counters) next to it and lends them
/// to each `poll_relay`, so the whole connection is one flat task with no self-references.
/// Small on purpose: a connection is this struct and two sockets until it parks (then only
/// `Paused`).
pub struct Relay {
    up: Pump,
    down: Pump,
    /// `None` when there is neither an idle limit nor parking.
    timer: Option<Box<Timer>>,
    stop: StopSignal,
}

/// What a direction keeps while parked: nothing is buffered, and a finished direction has
/// both seen its EOF and passed it on.
struct Frozen {
    moved: u64,
    done: bool,
    no_splice: bool,
}

impl Pump {
    fn freeze(mut self) -> Frozen {
        self.release_pipe();
        Frozen {
            moved: self.moved,
            done: self.done,
            no_splice: self.no_splice,
        }
    }
}

impl Frozen {
    fn thaw(self) -> Pump {
        Pump {
            moved: self.moved,
            eof: self.done,
            done: self.done,
            no_splice: self.no_splice,
            ..Pump::default()
        }
    }
}

/// A relay taken off its task while its connection is parked: the byte counts and the
/// directions' state, and the clock as numbers (no timer, no stop signal, no buffers).
pub struct Paused {
    up: Frozen,
    down: Frozen,
    clock: Option<Clock>,
}

impl Paused {
    /// Which directions still read: (client → backend, backend → client). A finished
    /// direction's socket is not watched (it stays readable at EOF).
    pub fn reading(&self) -> (bool, bool) {
        (!self.up.done, !self.down.done)
    }

    /// The connection ends here, with what it moved.
    pub fn outcome(&self, end: CloseReason) -> Outcome {
        Outcome {
            end,
            to_backend: self.up.moved,
            to_client: self.down.moved,
        }
    }

    /// When the idle timeout closes the connection, if it has one.
    pub fn idle_deadline(&self) -> Option<Instant> {
        self.clock.and_then(|c| c.idle_at())
    }

    /// Back on a task: a new timer from the same clock, and a new stop signal.
    pub fn resume(self, stop: StopSignal) -> Relay {
        let mut relay = Relay {
            up: self.up.thaw(),
            down: self.down.thaw(),
            timer: None,
            stop,
        };
        relay.set_timer(
            self.clock.map(|c| Clock {
                awake: Instant::now(),
                ..c
            }),
            None,
        );
        relay
    }
}

impl Relay {
    /// Relay until both directions are done, one fails, the idle timeout passes, or `stop`
    /// fires; report `Idle` after `park_after` without a byte. `keepalive` is held for the
    /// caller until then (`take_keepalive`); it needs `park_after`.
    pub fn new(
        idle_timeout: Option<Duration>,
        park_after: Option<Duration>,
        stop: StopSignal,
        keepalive: Option<Keepalive>,
    ) -> Relay {
        let mut relay = Relay {
            up: Pump::default(),
            down: Pump::default(),
            timer: None,
            stop,
        };
        relay.set_timer(
            Clock::new(idle_timeout, park_after, Instant::now()),
            keepalive,
        );
        relay
    }

    /// Arm one timer for what `clock` says is due next.
    fn set_timer(&mut self, clock: Option<Clock>, keepalive: Option<Keepalive>) {
        self.timer = clock.and_then(|clock| {
            let at = clock.next(clock.awake, true)?;
            Some(Box::new(Timer {
                clock,
                sleep: Box::pin(tokio::time::sleep_until(at)),
                keepalive,
            }))
        });
    }

    /// The keepalive given to `new`, once: when `poll_relay` has reported `Idle`.
    pub fn take_keepalive(&mut self) -> Option<Keepalive> {
        self.timer.as_mut().and_then(|t| t.keepalive.take())
    }

    /// Which directions still read: (client → backend, backend → client).
    pub fn reading(&self) -> (bool, bool) {
        (!self.up.done, !self.down.done)
    }

    /// Parking was refused (the lot is closed or full): relay on this task, as before.
    pub fn never_park(&mut self) {
        if let Some(t) = &self.timer {
            let clock = Clock::new(t.clock.idle_limit, None, t.clock.last);
            self.set_timer(clock, None);
        }
    }

    /// Take the relay off its task (after `Idle`): the timer and the stop signal are
    /// dropped, and with them every waker that refers to the task.
    pub fn pause(self) -> Paused {
        Paused {
            up: self.up.freeze(),
            down: self.down.freeze(),
            clock: self.timer.map(|t| t.clock),
        }
    }

    /// Nothing is held for a target that is behind: the connection can be parked.
    fn nothing_buffered(&self) -> bool {
        [&self.up, &self.down].iter().all(|p| {
            p.pos as usize >= p.stash.len() && p.pipe.as_ref().is_none_or(|pipe| pipe.len == 0)
        })
    }

    fn outcome(&self, end: CloseReason) -> Poll<Relayed> {
        Poll::Ready(Relayed::Ended(Outcome {
            end,
            to_backend: self.up.moved,
            to_client: self.down.moved,
        }))
    }

    /// Move what can be moved; `Ready(Ended)` once the connection is over, with why;
    /// `Ready(Idle)` when it may be parked. `counters` are (to backend, to client).
    pub fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut TcpStream,
        backend: &mut TcpStream,
        counters: (&IntCounter, &IntCounter),
    ) -> Poll<Relayed> {
        if let Poll::Ready(end) = self.stop.as_mut().poll(cx) {
            return self.outcome(end);
        }
        let mut active = false;
        let up = self
            .up
            .poll(cx, client, backend, counters.0, self.down.done, &mut active);
        if let Poll::Ready(Err(f)) = up {
            let end = match f {
                Failed::From => CloseReason::ClientError,
                Failed::To => CloseReason::BackendError,
            };
            return self.outcome(end);
        }
        let down = self
            .down
            .poll(cx, backend, client, counters.1, self.up.done, &mut active);
        if let Poll::Ready(Err(f)) = down {
            let end = match f {
                Failed::From => CloseReason::BackendError,
                Failed::To => CloseReason::ClientError,
            };
            return self.outcome(end);
        }
        if up.is_ready() && down.is_ready() {
            return self.outcome(CloseReason::Closed);
        }
        let parkable = self.nothing_buffered();
        if let Some(t) = &mut self.timer {
            if active {
                t.clock.last = Instant::now();
            }
            // The timer is only re-armed when it fires, not on every byte.
            while t.sleep.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if t.clock.idle_at().is_some_and(|at| now >= at) {
                    let end = CloseReason::IdleTimeout;
                    return self.outcome(end);
                }
                if parkable && t.clock.park_at().is_some_and(|at| now >= at) {
                    return Poll::Ready(Relayed::Idle);
                }
                match t.clock.next(now, parkable) {
                    Some(at) => t.sleep.as_mut().reset(at),
                    None => break,
                }
            }
        }
        Poll::Pending
    }
}
