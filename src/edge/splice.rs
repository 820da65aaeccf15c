//! Zero-copy relaying for bulk transfers: `splice(2)` from one socket into a pipe and from the
//! pipe into the other socket, so the bytes never cross into user space (HAProxy's
//! `splice-auto`). A pipe costs two file descriptors, so a direction takes one only while it
//! is moving bulk data (a read filled the whole scratch buffer) and gives it back, empty, as
//! soon as it goes idle; idle tunnels hold none. Pipes are pooled, and at most a quarter of
//! `max_connections` exist at once (HAProxy's `maxpipes` default; the open-file budget of
//! `sluice_core::fds` counts them): past that, a direction just keeps copying, counted in
//! `sluice_relay_pipes_unavailable_total`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Pipes in use or pooled, at most (2 descriptors each); set from `max_connections`.
static MAX_PIPES: AtomicUsize = AtomicUsize::new(1024);
/// Times a relay wanted a pipe and got none (it copied instead).
static UNAVAILABLE: AtomicU64 = AtomicU64::new(0);

/// The pipe cap (start, reload; 0: relays always copy). Pipes above a lowered cap are closed
/// as they come back.
pub fn set_max_pipes(n: usize) {
    MAX_PIPES.store(n, Ordering::Relaxed);
}

/// Times a relay found no pipe and copied instead, since start.
pub fn unavailable() -> u64 {
    UNAVAILABLE.load(Ordering::Relaxed)
}
/// Empty pipes kept for reuse.
const POOL: usize = 64;
/// What one splice asks for: the pipe's capacity (set with F_SETPIPE_SZ where allowed).
pub const PIPE_SIZE: usize = 256 * 1024;

static POOLED: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
static OPEN: AtomicUsize = AtomicUsize::new(0);
static SPLICED: AtomicU64 = AtomicU64::new(0);

/// A pipe and how many bytes sit in it.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet out.
    pub len: usize,
}

impl Pipe {
    /// A pipe from the pool or a new one; `None` at `MAX_PIPES` or if the system refuses.
    pub fn take() -> Option<Pipe> {
        if let Some(p) = POOLED.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(p);
        }
        if OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES.load(Ordering::Relaxed) {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            UNAVAILABLE.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds` on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            UNAVAILABLE.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Larger pipes mean fewer splices per byte; the default (64 KiB) is fine if refused.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Some(Pipe {
            read,
            write,
            len: 0,
        })
    }

    /// Give an empty pipe back (a pipe with bytes in it is closed instead: never reused dirty).
    pub fn give_back(self) {
        if self.len == 0 {
            let mut pool = POOLED.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL {
                pool.push(self);
                return;
            }
        }
        drop(self);
    }

    /// Socket → pipe, at most `PIPE_SIZE` bytes. `Ok(0)`: end of stream.
    pub fn fill_from(&mut self, socket: RawFd) -> io::Result<usize> {
        let n = splice(socket, self.write.as_raw_fd(), PIPE_SIZE - self.len)?;
        self.len += n;
        Ok(n)
    }

    /// Pipe → socket.
    pub fn drain_to(&mut self, socket: RawFd) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), socket, self.len)?;
        self.len -= n;
        SPLICED.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain descriptors, no offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Pipes open now (in use or pooled).
pub fn open_pipes() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Bytes moved out of pipes into sockets since the process started.
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}
