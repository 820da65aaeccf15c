//! Listening sockets that come from outside the process: systemd socket activation, and the
//! zero-downtime upgrade in which a new sluice takes the sockets of the running one.
//!
//! Owns: turning raw descriptors into sockets and asking a peer's pid (`unsafe` lines, each
//! with its reason; the
//! crate's other `unsafe` is in `edge::splice` and `edge::parking`), and the upgrade conversation over a Unix socket:
//!
//! ```text
//! new → old   TAKEOVER\n
//! old → new   {"pid":…,"names":["edge",…,"@admin"]}\n   + the descriptors (SCM_RIGHTS)
//!             (the new process opens its listeners on them and becomes ready; both
//!              processes accept from the same sockets meanwhile, so nothing is refused)
//! new → old   READY\n
//! old         stops accepting, stops its admin API, removes the control socket
//! old → new   DRAINING\n
//!             (the new process binds the control socket; the old one drains and exits)
//! ```
//!
//! A QUIC listener's UDP socket travels under its name too, and with it `@relay:NAME`, one
//! end of a Unix seqpacket socket pair whose other end the old process keeps: a QUIC flow
//! lives in one process, and a datagram read by the other one crosses over (`quic`).
//!
//! If the new process goes away before READY, the old one logs it and carries on serving.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};

/// The name the admin API's socket travels under (listener names cannot start with `@`).
pub const ADMIN: &str = "@admin";
/// The name the heartbeat API's own socket (`[heartbeat] address`) travels under.
pub const HEARTBEAT: &str = "@heartbeat";

/// The prefix of the name a QUIC listener's socket pair end travels under.
pub const RELAY: &str = "@relay:";

/// At most this many descriptors in one handover (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 253;

/// How long each side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old process waits for the new one to be ready (its `min_ready` included).
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Sockets passed by systemd (`LISTEN_FDS`, named by `FileDescriptorName=` in the socket
/// unit), by name. Empty when not socket-activated.
pub fn from_systemd() -> io::Result<Activated> {
    let mut out = Activated::default();
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        // SAFETY: sd_notify returns only descriptors systemd passed to this very process
        // (LISTEN_PID matched); nothing else in the process has taken ownership of them.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let taken = out.tcp.contains_key(&name) || out.udp.contains_key(&name);
        let sock = socket2::Socket::from(owned);
        let datagram = sock.r#type().is_ok_and(|t| t == socket2::Type::DGRAM);
        let context = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("socket-activated fd {fd} (`{name}`): {e}"),
            )
        };
        if taken {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "two socket-activated sockets are named `{name}`: give each ListenStream \
                     or ListenDatagram its own .socket unit with its own FileDescriptorName \
                     (= listener name)"
                ),
            ));
        }
        if datagram {
            out.udp
                .insert(name.clone(), udp_socket(sock).map_err(context)?);
        } else {
            out.tcp
                .insert(name.clone(), listening_tcp(sock.into()).map_err(context)?);
        }
    }
    Ok(out)
}

/// The sockets systemd passed, by `FileDescriptorName=`: listening TCP sockets
/// (`ListenStream=`, for TCP listeners) and UDP sockets (`ListenDatagram=`, for QUIC ones).
#[derive(Default)]
pub struct Activated {
    pub tcp: HashMap<String, TcpListener>,
    pub udp: HashMap<String, std::net::UdpSocket>,
}

/// Check that a descriptor is a bound UDP socket, and mark it close-on-exec.
fn udp_socket(sock: socket2::Socket) -> io::Result<std::net::UdpSocket> {
    sock.set_cloexec(true)?;
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a UDP socket"))?;
    Ok(sock.into())
}

/// Check that a descriptor is a listening TCP socket, and mark it close-on-exec.
fn listening_tcp(fd: OwnedFd) -> io::Result<TcpListener> {
    let sock = socket2::Socket::from(fd);
    sock.set_cloexec(true)?;
    if sock.r#type()? != socket2::Type::STREAM || !sock.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening stream socket",
        ));
    }
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a TCP socket"))?;
    Ok(sock.into())
}

#[derive(Serialize, Deserialize)]
struct Offer {
    pid: u32,
    names: Vec<String>,
}

fn read_line(r: &mut BufReader<&UnixStream>) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other process closed the control socket",
        ));
    }
    Ok(line.trim_end().to_owned())
}

fn expect(r: &mut BufReader<&UnixStream>, want: &str) -> io::Result<()> {
    let got = read_line(r)?;
    if got == want {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected `{want}`, got `{got}`"),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The new process.

/// The sockets taken from the running sluice; `finish` completes the handover.
pub struct Takeover {
    stream: UnixStream,
    pub old_pid: u32,
    pub sockets: HashMap<String, TcpListener>,
    /// QUIC listeners' UDP sockets, by listener name.
    pub udp: HashMap<String, std::net::UdpSocket>,
    /// QUIC listeners' ends of the socket pair toward the old process, by listener name
    /// (`SOCK_SEQPACKET` sockets, held as std's datagram type: plain `send` and `recv`).
    pub relays: HashMap<String, std::os::unix::net::UnixDatagram>,
}

/// Ask the sluice serving upgrades at `path` for its listening sockets.
pub fn take_over(path: &Path) -> io::Result<Takeover> {
    let stream = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "no running sluice answers at {} ({e}); start without --upgrade",
                path.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    (&stream).write_all(b"TAKEOVER\n")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds: Vec<RawFd> = vec![-1; MAX_FDS];
    let (n, nfds) = stream.recv_with_fd(&mut buf, &mut fds)?;
    // SAFETY: the kernel installed these descriptors in this process for this message
    // (SCM_RIGHTS); nothing else refers to them yet.
    let owned: Vec<OwnedFd> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let text = std::str::from_utf8(&buf[..n])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "offer is not UTF-8"))?;
    let offer: Offer = serde_json::from_str(text.trim_end())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad offer: {e}")))?;
    if offer.names.len() != owned.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "offer names {} sockets but carried {}",
                offer.names.len(),
                owned.len()
            ),
        ));
    }
    let (mut sockets, mut udp, mut relays) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (name, fd) in offer.names.into_iter().zip(owned) {
        let sock = socket2::Socket::from(fd);
        sock.set_cloexec(true)?;
        if let Some(listener) = name.strip_prefix(RELAY) {
            let unix = sock.local_addr().is_ok_and(|a| a.is_unix());
            if !unix || sock.r#type()? != socket2::Type::SEQPACKET {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("`{name}` is not a Unix seqpacket socket"),
                ));
            }
            relays.insert(
                listener.to_owned(),
                std::os::unix::net::UnixDatagram::from(OwnedFd::from(sock)),
            );
        } else if sock.r#type()? == socket2::Type::DGRAM {
            udp.insert(name, udp_socket(sock)?);
        } else {
            sockets.insert(name, listening_tcp(sock.into())?);
        }
    }
    Ok(Takeover {
        stream,
        old_pid: offer.pid,
        sockets,
        udp,
        relays,
    })
}

impl Takeover {
    /// Tell the old process this one is ready; returns once it has stopped accepting.
    pub fn finish(self) -> io::Result<()> {
        (&self.stream).write_all(b"READY\n")?;
        expect(&mut BufReader::new(&self.stream), "DRAINING")
    }
}

// ---------------------------------------------------------------------------------------------
// The running process.

/// The control socket a running sluice waits for its successor on.
pub struct ControlSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// Cleared once a successor has taken the path over: it is no longer ours to remove.
    owns_path: bool,
}

impl ControlSocket {
    /// Bind `path` (from within the tokio runtime). A stale socket file (nobody answers) is
    /// replaced; a live one is an error: another sluice is running and `--upgrade` is how
    /// to replace it.
    pub fn bind(path: &Path) -> io::Result<ControlSocket> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another sluice serves upgrades at {}; use `sluice run --upgrade` to replace it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener: tokio::net::UnixListener::from_std(listener)?,
            path: path.to_path_buf(),
            owns_path: true,
        })
    }

    /// Serve successors until one completes a handover (`Ok(true)`) or `shutdown` fires
    /// (`Ok(false)`). `offer` lists the sockets to hand over at the moment of asking; `stop`
    /// makes this process stop accepting, and runs before DRAINING is sent.
    pub async fn serve(
        mut self,
        offer: impl Fn() -> Vec<(String, OwnedFd)> + Send + Sync + 'static,
        stop: impl FnOnce(),
        shutdown: tokio_util::sync::CancellationToken,
    ) -> io::Result<bool> {
        let offer = std::sync::Arc::new(offer);
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            let offer = offer.clone();
            // The conversation blocks (it waits for the successor to be ready).
            let talked =
                tokio::task::spawn_blocking(move || hand_over(&stream, &*offer).map(|()| stream))
                    .await
                    .map_err(io::Error::other)?;
            match talked {
                Ok(stream) => {
                    // The successor is ready: it is the service's main process from now on.
                    // This (still the main) process says so, so that systemd can accept
                    // notifications from the main process only (NotifyAccess=main).
                    if let Some(pid) = peer_pid(&stream) {
                        crate::control::systemd::notify(&[sd_notify::NotifyState::MainPid(pid)]);
                        tracing::info!(
                            new_pid = pid,
                            "upgrade: the new process is the main one now"
                        );
                    }
                    // Stop accepting, then let it take the path.
                    stop();
                    let _ = std::fs::remove_file(&self.path);
                    self.owns_path = false;
                    (&stream).write_all(b"DRAINING\n")?;
                    return Ok(true);
                }
                Err(e) => tracing::warn!(error = %e,
                    "upgrade aborted before the new process was ready; still serving"),
            }
        }
    }
}

/// The process at the other end of a Unix socket (SO_PEERCRED).
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a `ucred`, which is what SO_PEERCRED
    // fills in; the descriptor is the stream's own, open for this call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

fn hand_over(stream: &UnixStream, offer: &dyn Fn() -> Vec<(String, OwnedFd)>) -> io::Result<()> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    expect(&mut reader, "TAKEOVER")?;
    let sockets = offer();
    if sockets.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} sockets are more than one handover carries ({MAX_FDS})",
            sockets.len()
        )));
    }
    let (names, owned): (Vec<String>, Vec<OwnedFd>) = sockets.into_iter().unzip();
    // Held open (`owned`) until sent.
    let fds: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
    let mut msg = serde_json::to_vec(&Offer {
        pid: std::process::id(),
        names,
    })
    .map_err(io::Error::other)?;
    msg.push(b'\n');
    tracing::info!(
        sockets = fds.len(),
        "upgrade: handing the listening sockets over"
    );
    stream.send_with_fd(&msg, &fds)?;
    // The new process has its copies now. Ours go at once: a QUIC listener's socket pair end
    // the new process drops (its config moved the listener) must show as closed to this one.
    drop(owned);
    // The new process becomes ready first (its min_ready included).
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    expect(&mut reader, "READY")
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.owns_path {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
