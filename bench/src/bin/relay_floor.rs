//! The floor of a TLS-passthrough relay, two ways, for `loadgen connrate` to measure beside
//! sluice and HAProxy (`bench/findings.md` 30; `SYSTEMS="sluice haproxy floor-epoll
//! floor-io-uring" SCENARIOS=connrate bench/run.sh`).
//!
//! Both read the ClientHello, parse it with sluice-core, pick the tunnel or the client backend
//! by ALPN as `bench/conf` does, replay the hello and relay both ways with exact half-close
//! until both ends close. Nothing else: no metrics, no log, no timeout, no limit. So the two
//! differ only in how they do I/O:
//!
//! - `epoll`: tokio, the way most Rust proxies are written (`copy_bidirectional`).
//! - `io-uring`: one thread per ring, each with its own `SO_REUSEPORT` listener; accept,
//!   receive, socket, connect, send and close all go through the ring (`shutdown` is a system
//!   call: the ring hands `IORING_OP_SHUTDOWN` to a worker thread). A connection holds two
//!   16 KB buffers while it lives; this is a measuring tool, not a relay to deploy.
//!
//! Not a production path: this binary answers "how much CPU per connection would a relay save
//! that does its I/O through io_uring?", with everything else equal.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use clap::{Parser, ValueEnum};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use sluice_core::hello::{parse, ClientHello, Parse};

const BUF: usize = 16 * 1024;

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Epoll,
    IoUring,
}

#[derive(Parser)]
struct Opts {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    listen: SocketAddr,
    /// Where hellos offering `teleport-reversetunnel*` go.
    #[arg(long)]
    tunnel: SocketAddr,
    /// Where every other hello goes.
    #[arg(long)]
    client: SocketAddr,
    /// Runtime workers (`epoll`) or rings, one thread each (`io-uring`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// The two backends, as addresses (`epoll`) or as the ring's `sockaddr_in`s (`io-uring`).
#[derive(Clone, Copy)]
struct Backends<A = SocketAddr> {
    tunnel: A,
    client: A,
}

impl<A: Copy> Backends<A> {
    fn pick(&self, hello: &ClientHello) -> A {
        if hello
            .alpn
            .iter()
            .any(|p| p.starts_with("teleport-reversetunnel"))
        {
            self.tunnel
        } else {
            self.client
        }
    }
}

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let backends = Backends {
        tunnel: o.tunnel,
        client: o.client,
    };
    match o.mode {
        Mode::Epoll => epoll(o.listen, backends, o.threads),
        Mode::IoUring => {
            let threads = (0..o.threads)
                .map(|_| {
                    let l = listener(o.listen)?;
                    Ok(std::thread::spawn(move || ring(l, backends)))
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            for t in threads {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a ring thread panicked"))??;
            }
            Ok(())
        }
    }
}

fn epoll(listen: SocketAddr, backends: Backends, threads: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = listener(listen)?;
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        loop {
            let (s, _) = l.accept().await?;
            tokio::spawn(epoll_conn(s, backends));
        }
    })
}

async fn epoll_conn(mut s: tokio::net::TcpStream, backends: Backends) -> Option<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; BUF];
    let mut got = 0;
    let to = loop {
        let n = s.read(&mut buf[got..]).await.ok()?;
        if n == 0 {
            return None;
        }
        got += n;
        match parse(&buf[..got]) {
            Parse::Incomplete { .. } if got < BUF => continue,
            Parse::Hello { hello, .. } => break backends.pick(&hello),
            _ => return None,
        }
    };
    let mut b = tokio::net::TcpStream::connect(to).await.ok()?;
    b.set_nodelay(true).ok()?;
    b.write_all(&buf[..got]).await.ok()?;
    drop(buf);
    tokio::io::copy_bidirectional(&mut s, &mut b).await.ok()?;
    Some(())
}

/// What a request is, in the low byte of its `user_data` (the slot is in the high bits).
const ACCEPT: u64 = 0;
const HELLO: u64 = 1;
const SOCKET: u64 = 2;
const CONNECT: u64 = 3;
/// A request whose result is not needed (setsockopt, close).
const IGNORE: u64 = 4;
/// Receive and send, client → backend (direction 0) and backend → client (direction 1).
const RECV: [u64; 2] = [5, 6];
const SEND: [u64; 2] = [7, 8];

struct Conn {
    /// client, backend (-1 until the socket exists).
    fds: [RawFd; 2],
    /// One buffer per direction; direction 0's holds the hello first.
    bufs: [Box<[u8]>; 2],
    /// Per direction: `bufs[d][off..end]` is being sent.
    sending: [(usize, usize); 2],
    eof: [bool; 2],
    addr: libc::sockaddr_in,
    inflight: u32,
    closing: bool,
}

struct Ring {
    ring: IoUring,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    /// Buffers of closed connections, reused (a fresh one would be zeroed each time).
    pool: Vec<Box<[u8]>>,
    backends: Backends<libc::sockaddr_in>,
    listen: RawFd,
}

fn sockaddr(a: SocketAddr) -> Option<libc::sockaddr_in> {
    let SocketAddr::V4(a) = a else { return None };
    Some(libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    })
}

fn ring(l: std::net::TcpListener, backends: Backends) -> anyhow::Result<()> {
    let (Some(tunnel), Some(client)) = (sockaddr(backends.tunnel), sockaddr(backends.client))
    else {
        anyhow::bail!("the io-uring mode takes IPv4 backends");
    };
    let ring = IoUring::builder().setup_coop_taskrun().build(4096)?;
    let mut r = Ring {
        ring,
        conns: Vec::new(),
        free: Vec::new(),
        pool: Vec::new(),
        backends: Backends { tunnel, client },
        listen: l.as_raw_fd(),
    };
    r.accept();
    let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    loop {
        r.ring.submit_and_wait(1)?;
        done.clear();
        done.extend(
            r.ring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &done {
            r.complete(ud, res, flags);
        }
    }
}

impl Ring {
    fn push(&mut self, slot: usize, op: u64, e: squeue::Entry) {
        if op != ACCEPT {
            if let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
                c.inflight += 1;
            }
        }
        let e = e.user_data((slot as u64) << 8 | op);
        // SAFETY: every buffer and address a request names lives in a boxed `Conn` that is
        // freed only when none of its requests is in flight (`inflight`).
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                let _ = self.ring.submit();
            }
        }
    }

    fn accept(&mut self) {
        let e = opcode::AcceptMulti::new(types::Fd(self.listen)).build();
        self.push(0, ACCEPT, e);
    }

    fn buffer(&mut self) -> Box<[u8]> {
        self.pool
            .pop()
            .unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice())
    }

    fn conn(&mut self, slot: usize) -> &mut Conn {
        self.conns[slot].as_mut().expect("a live slot")
    }

    /// Receive into direction `dir`'s buffer from `from` on (the hello grows from the start).
    fn recv(&mut self, slot: usize, dir: usize, from: usize, op: u64) {
        let c = self.conn(slot);
        let fd = c.fds[dir];
        let ptr = c.bufs[dir][from..].as_mut_ptr();
        let e = opcode::Recv::new(types::Fd(fd), ptr, (BUF - from) as u32).build();
        self.push(slot, op, e);
    }

    fn send(&mut self, slot: usize, dir: usize) {
        let c = self.conn(slot);
        let (off, end) = c.sending[dir];
        let fd = c.fds[1 - dir];
        let ptr = c.bufs[dir][off..end].as_ptr();
        let e = opcode::Send::new(types::Fd(fd), ptr, (end - off) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.push(slot, SEND[dir], e);
    }

    fn close(&mut self, slot: usize) {
        let c = self.conn(slot);
        if c.closing {
            return;
        }
        c.closing = true;
        let fds = c.fds;
        for fd in fds.into_iter().filter(|&fd| fd >= 0) {
            self.push(slot, IGNORE, opcode::Close::new(types::Fd(fd)).build());
        }
        self.free_if_done(slot);
    }

    fn free_if_done(&mut self, slot: usize) {
        let c = self.conn(slot);
        if c.closing && c.inflight == 0 {
            if let Some(c) = self.conns[slot].take() {
                let [a, b] = c.bufs;
                self.pool.extend([a, b]);
            }
            self.free.push(slot);
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let slot = (ud >> 8) as usize;
        let op = ud & 0xff;
        if op == ACCEPT {
            if !cqueue::more(flags) {
                self.accept();
            }
            if res >= 0 {
                self.accepted(res);
            }
            return;
        }
        let backends = self.backends;
        let c = self.conn(slot);
        c.inflight -= 1;
        if c.closing {
            return self.free_if_done(slot);
        }
        match op {
            HELLO => {
                if res <= 0 {
                    return self.close(slot);
                }
                let got = c.sending[0].1 + res as usize;
                c.sending[0] = (0, got);
                match parse(&c.bufs[0][..got]) {
                    Parse::Incomplete { .. } if got < BUF => self.recv(slot, 0, got, HELLO),
                    Parse::Hello { hello, .. } => {
                        c.addr = backends.pick(&hello);
                        let e = opcode::Socket::new(
                            libc::AF_INET,
                            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                            0,
                        )
                        .build();
                        self.push(slot, SOCKET, e);
                    }
                    _ => self.close(slot),
                }
            }
            SOCKET => {
                if res < 0 {
                    return self.close(slot);
                }
                c.fds[1] = res;
                let addr = &c.addr as *const libc::sockaddr_in as *const libc::sockaddr;
                static ONE: libc::c_int = 1;
                let nodelay = opcode::SetSockOpt::new(
                    types::Fd(res),
                    libc::IPPROTO_TCP as u32,
                    libc::TCP_NODELAY as u32,
                    &ONE as *const libc::c_int as *const libc::c_void,
                    4,
                )
                .build()
                .flags(squeue::Flags::IO_LINK);
                self.push(slot, IGNORE, nodelay);
                let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                self.push(
                    slot,
                    CONNECT,
                    opcode::Connect::new(types::Fd(res), addr, len).build(),
                );
            }
            CONNECT => {
                if res < 0 {
                    return self.close(slot);
                }
                self.send(slot, 0);
                self.recv(slot, 1, 0, RECV[1]);
            }
            IGNORE => {}
            _ => {
                let (dir, is_recv) = match op {
                    o if o == RECV[0] => (0, true),
                    o if o == RECV[1] => (1, true),
                    o if o == SEND[0] => (0, false),
                    _ => (1, false),
                };
                if is_recv {
                    if res <= 0 {
                        c.eof[dir] = true;
                        if c.eof[0] && c.eof[1] {
                            return self.close(slot);
                        }
                        let to = c.fds[1 - dir];
                        // SAFETY: `to` is a socket this connection owns.
                        unsafe { libc::shutdown(to, libc::SHUT_WR) };
                        return;
                    }
                    c.sending[dir] = (0, res as usize);
                    self.send(slot, dir);
                } else {
                    if res <= 0 {
                        return self.close(slot);
                    }
                    let (off, end) = c.sending[dir];
                    c.sending[dir] = (off + res as usize, end);
                    if off + (res as usize) < end {
                        self.send(slot, dir);
                    } else {
                        self.recv(slot, dir, 0, RECV[dir]);
                    }
                }
            }
        }
    }

    fn accepted(&mut self, fd: RawFd) {
        let bufs = [self.buffer(), self.buffer()];
        let conn = Box::new(Conn {
            fds: [fd, -1],
            bufs,
            sending: [(0, 0); 2],
            eof: [false; 2],
            // Replaced once the hello named the backend.
            addr: self.backends.client,
            inflight: 0,
            closing: false,
        });
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.recv(slot, 0, 0, HELLO);
    }
}
