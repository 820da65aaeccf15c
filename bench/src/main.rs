//! `loadgen`: sluice's benchmark load generator, and the echo backends it talks to.
//!
//! Every scenario prints one JSON object on stdout (the figures) and nothing else there;
//! `bench/run.sh` collects them and `bench/report.py` writes `RESULTS.md`. The same client
//! code runs against every system (sluice, HAProxy, nginx, or the backends directly), so
//! the ratios compare the edges and nothing else.
//!
//! The wire protocol of a benchmark connection: the client sends a real captured ClientHello;
//! the backend, on accept, writes `pool <tag>\n` and then echoes every byte it receives. The
//! tag proves the edge routed the hello to the right pool: a wrong tag is a failure.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// OpenSSL 3.0 dialing with the tunnel ALPN (`teleport-reversetunnelv2`).
const TUNNEL_HELLO: &[u8] = include_bytes!("../../tests/fixtures/openssl-3.0-tunnel.bin");
/// Chromium 156 asking for `h2`, with a post-quantum key share (2008 bytes).
const BROWSER_HELLO: &[u8] = include_bytes!("../../tests/fixtures/chromium-pq-h2.bin");
/// The short echo after the hello.
const PING: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
/// Each scenario's connections have this long to do their part.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "sluice's benchmark load generator and echo backends"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo backends that tag themselves: each connection first receives `pool TAG\n`, then an
    /// echo of everything it sends. `--listen TAG=ADDR`, repeatable.
    Backend {
        #[arg(long = "listen", value_parser = parse_tagged, required = true)]
        listen: Vec<(String, SocketAddr)>,
    },
    /// C workers loop: connect, send a hello, read the backend's tag, a short echo, close.
    Connrate(ConnrateArgs),
    /// K streams each echo N bytes through the edge.
    Throughput(ThroughputArgs),
    /// N connections held idle for S seconds; memory per connection and connections lost.
    Idle(IdleArgs),
    /// connrate while a command reloads the edge every 100 ms, with idle tunnels held throughout.
    Reload(ReloadArgs),
}

#[derive(Args, Clone)]
struct Target {
    /// The system measured (a label in the report).
    #[arg(long)]
    system: String,
    /// Where tunnel hellos connect (the edge; the tunnel backend for `direct`).
    #[arg(long)]
    tunnel: SocketAddr,
    /// Where browser hellos connect (the edge; the client backend for `direct`).
    #[arg(long)]
    client: SocketAddr,
    /// Spread client source addresses over 127.0.0.2 ..= 127.0.0.N (0: let the kernel pick).
    #[arg(long, default_value_t = 254)]
    sources: u8,
    /// A shell command printing the edge's process ids (for RSS and process counts).
    #[arg(long)]
    pids_cmd: Option<String>,
}

#[derive(Args, Clone)]
struct ConnrateArgs {
    #[command(flatten)]
    target: Target,
    /// Concurrent workers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    target: Target,
    /// Concurrent streams.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Bytes echoed per stream.
    #[arg(long, default_value_t = 256 << 20)]
    bytes: u64,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Connections to hold.
    #[arg(long, default_value_t = 9000)]
    connections: usize,
    /// Seconds to hold them idle.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
}

#[derive(Args)]
struct ReloadArgs {
    #[command(flatten)]
    rate: ConnrateArgs,
    /// Idle tunnels opened before the first reload and checked after the last.
    #[arg(long, default_value_t = 200)]
    tunnels: usize,
    /// The shell command that reloads the edge (rewrites its config and, for the peers,
    /// signals it).
    #[arg(long)]
    reload_cmd: String,
    /// Milliseconds between reloads.
    #[arg(long, default_value_t = 100)]
    every_ms: u64,
}

fn parse_tagged(s: &str) -> Result<(String, SocketAddr), String> {
    let (tag, addr) = s.split_once('=').ok_or("expected TAG=ADDR")?;
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    Ok((tag.to_string(), addr))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match cli.cmd {
            Cmd::Backend { listen } => backend(listen).await.map(|()| Value::Null),
            Cmd::Connrate(a) => connrate(&a).await.map(|r| r.json(&a)),
            Cmd::Throughput(a) => throughput(&a).await,
            Cmd::Idle(a) => idle(&a).await,
            Cmd::Reload(a) => reload(&a).await,
        }
    })?;
    if !out.is_null() {
        println!("{out}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backends

async fn backend(listen: Vec<(String, SocketAddr)>) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (tag, addr) in listen {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr).with_context(|| format!("bind {addr}"))?;
        let listener = sock.listen(4096)?;
        let greeting: Arc<[u8]> = format!("pool {tag}\n").into_bytes().into();
        tasks.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    let _ = echo(stream, &greeting).await;
                });
            }
        });
    }
    eprintln!("loadgen backend: listening");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Greet, then echo until EOF. The buffer exists only while bytes move, so thousands of idle
/// connections cost the backend little, and it is never zeroed: the backend shares the
/// machine with the edge being measured, and the less it spends per byte, the more the
/// figures say about the edge. It copies, as a real backend (a TLS endpoint) does: a backend
/// that spliced would hand the edge skbs of another shape than real traffic has.
async fn echo(mut stream: TcpStream, greeting: &[u8]) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(greeting).await?;
    loop {
        stream.readable().await?;
        if echo_ready(&mut stream).await? {
            return stream.shutdown().await;
        }
    }
}

/// Echo what the socket holds now; true at end of stream.
async fn echo_ready(stream: &mut TcpStream) -> std::io::Result<bool> {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => stream.write_all(&buf).await?,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// What a benchmark connection asks for.
#[derive(Clone, Copy)]
enum Kind {
    Tunnel,
    Browser,
}

impl Kind {
    fn hello(self) -> &'static [u8] {
        match self {
            Kind::Tunnel => TUNNEL_HELLO,
            Kind::Browser => BROWSER_HELLO,
        }
    }
    fn tag(self) -> &'static [u8] {
        match self {
            Kind::Tunnel => b"pool tunnel\n",
            Kind::Browser => b"pool client\n",
        }
    }
    fn addr(self, t: &Target) -> SocketAddr {
        match self {
            Kind::Tunnel => t.tunnel,
            Kind::Browser => t.client,
        }
    }
}

/// Why a benchmark connection failed (the report's failure kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fail {
    Connect,
    /// The edge or backend closed or reset before the exchange finished.
    Closed,
    /// The backend's tag named the other pool.
    WrongBackend,
    /// The echo came back different.
    Corrupt,
    Timeout,
}

impl Fail {
    fn label(self) -> &'static str {
        match self {
            Fail::Connect => "connect",
            Fail::Closed => "closed",
            Fail::WrongBackend => "wrong_backend",
            Fail::Corrupt => "corrupt",
            Fail::Timeout => "timeout",
        }
    }
}

/// Source addresses, handed out round robin so no single one runs out of ephemeral ports.
struct Sources {
    n: u8,
    next: AtomicU64,
}

impl Sources {
    fn new(n: u8) -> Self {
        Sources {
            n,
            next: AtomicU64::new(0),
        }
    }
    fn next(&self, dest: SocketAddr) -> Option<SocketAddr> {
        if self.n < 2 || !dest.ip().is_loopback() || !dest.is_ipv4() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % (self.n as u64 - 1);
        let ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
        Some(SocketAddr::new(IpAddr::V4(ip), 0))
    }
}

async fn dial(dest: SocketAddr, src: Option<SocketAddr>) -> Result<TcpStream, Fail> {
    let sock = if dest.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|_| Fail::Connect)?;
    if let Some(src) = src {
        // Choose the source port at connect time, from the full 4-tuple: a bind(port 0)
        // would pick one that is unique per address and scan past every TIME_WAIT port.
        bind_address_no_port(&sock);
        sock.bind(src).map_err(|_| Fail::Connect)?;
    }
    let stream = sock.connect(dest).await.map_err(|_| Fail::Connect)?;
    stream.set_nodelay(true).map_err(|_| Fail::Connect)?;
    Ok(stream)
}

#[allow(unsafe_code)]
fn bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, an int option, and its exact size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Fill `buf` exactly, or say why not.
async fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), Fail> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => return Err(Fail::Closed),
            Ok(n) => got += n,
        }
    }
    Ok(())
}

/// Connect, send the hello, check the tag and the echoed hello. The connection is then
/// established through the edge to the right backend.
async fn open(kind: Kind, dest: SocketAddr, src: Option<SocketAddr>) -> Result<TcpStream, Fail> {
    let mut s = dial(dest, src).await?;
    let hello = kind.hello();
    s.write_all(hello).await.map_err(|_| Fail::Closed)?;
    let tag = kind.tag();
    let mut buf = vec![0u8; tag.len() + hello.len()];
    read_exact(&mut s, &mut buf[..tag.len()]).await?;
    if &buf[..tag.len()] != tag {
        return Err(if buf.starts_with(b"pool ") {
            Fail::WrongBackend
        } else {
            Fail::Corrupt
        });
    }
    read_exact(&mut s, &mut buf[tag.len()..]).await?;
    if &buf[tag.len()..] != hello {
        return Err(Fail::Corrupt);
    }
    Ok(s)
}

/// One echo of `data` on an established connection.
async fn ping(s: &mut TcpStream, data: &[u8]) -> Result<(), Fail> {
    s.write_all(data).await.map_err(|_| Fail::Closed)?;
    let mut back = vec![0u8; data.len()];
    read_exact(s, &mut back).await?;
    if back != data {
        return Err(Fail::Corrupt);
    }
    Ok(())
}

async fn with_timeout<T>(f: impl std::future::Future<Output = Result<T, Fail>>) -> Result<T, Fail> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .unwrap_or(Err(Fail::Timeout))
}

/// The process ids `pids_cmd` prints.
fn edge_pids(pids_cmd: &Option<String>) -> Vec<String> {
    let Some(cmd) = pids_cmd else { return vec![] };
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// CPU seconds the edge's processes have used so far (`None` without `--pids-cmd`).
/// Taken before and after a run: CPU per connection or per byte is a steadier figure than a
/// rate on a shared, noisy machine (it does not count the time the edge waited for a core).
fn edge_cpu(pids_cmd: &Option<String>) -> Option<f64> {
    let pids = edge_pids(pids_cmd);
    (!pids.is_empty()).then(|| {
        pids.iter()
            .filter_map(|p| sluice_bench::cpu_seconds(p))
            .sum()
    })
}

/// Resident memory (KiB) and number of the processes `pids_cmd` prints.
fn edge_rss(pids_cmd: &Option<String>) -> Option<(u64, usize)> {
    let mut total = 0;
    let mut n = 0;
    for pid in edge_pids(pids_cmd) {
        if let Some(kb) = sluice_bench::vm_rss_kib(&pid) {
            total += kb;
            n += 1;
        }
    }
    (n > 0).then_some((total, n))
}

// ---------------------------------------------------------------------------------------------
// connrate

struct Rate {
    ok: u64,
    fails: BTreeMap<&'static str, u64>,
    hist: Histogram<u64>,
    elapsed: Duration,
    /// The edge's CPU seconds during the run, with `--pids-cmd`.
    edge_cpu_s: Option<f64>,
}

impl Rate {
    fn json(&self, a: &ConnrateArgs) -> Value {
        let q = |p: f64| self.hist.value_at_quantile(p);
        json!({
            "scenario": "connrate",
            "system": a.target.system,
            "concurrency": a.concurrency,
            "seconds": self.elapsed.as_secs_f64(),
            "ok": self.ok,
            "failed": self.fails.values().sum::<u64>(),
            "failures": self.fails,
            "conns_per_s": self.ok as f64 / self.elapsed.as_secs_f64(),
            "p50_us": q(0.50),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "edge_cpu_us_per_conn": self.edge_cpu_s.map(|c| c * 1e6 / self.ok.max(1) as f64),
        })
    }
}

/// Run connrate for `a.seconds`.
async fn connrate(a: &ConnrateArgs) -> Result<Rate> {
    let sources = Arc::new(Sources::new(a.target.sources));
    let cpu_before = edge_cpu(&a.target.pids_cmd);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.seconds);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..a.concurrency {
        let t = a.target.clone();
        let sources = sources.clone();
        workers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut fails: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut ok = 0u64;
            let mut i = w;
            while Instant::now() < end {
                let kind = if i % 2 == 0 {
                    Kind::Tunnel
                } else {
                    Kind::Browser
                };
                i += 1;
                let dest = kind.addr(&t);
                let t0 = Instant::now();
                let r = with_timeout(async {
                    let mut s = open(kind, dest, sources.next(dest)).await?;
                    ping(&mut s, PING).await
                })
                .await;
                match r {
                    Ok(()) => {
                        ok += 1;
                        let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                    Err(f) => {
                        *fails.entry(f.label()).or_default() += 1;
                        if f == Fail::Connect {
                            // Do not spin on a refused port.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            (ok, fails, hist)
        });
    }
    let mut rate = Rate {
        ok: 0,
        fails: BTreeMap::new(),
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
        edge_cpu_s: None,
    };
    while let Some(r) = workers.join_next().await {
        let (ok, fails, hist) = r?;
        rate.ok += ok;
        for (k, v) in fails {
            *rate.fails.entry(k).or_default() += v;
        }
        rate.hist.add(hist)?;
    }
    rate.elapsed = start.elapsed();
    rate.edge_cpu_s = cpu_before
        .zip(edge_cpu(&a.target.pids_cmd))
        .map(|(b, a)| a - b);
    Ok(rate)
}

// ---------------------------------------------------------------------------------------------
// throughput

async fn throughput(a: &ThroughputArgs) -> Result<Value> {
    let sources = Sources::new(a.target.sources);
    let mut conns = Vec::new();
    for _ in 0..a.streams {
        let dest = a.target.tunnel;
        let s = with_timeout(open(Kind::Tunnel, dest, sources.next(dest)))
            .await
            .map_err(|f| anyhow::anyhow!("opening a stream: {}", f.label()))?;
        conns.push(s);
    }
    let cpu_before = edge_cpu(&a.target.pids_cmd);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in conns {
        let bytes = a.bytes;
        tasks.spawn(async move {
            // The writer stays at most WINDOW bytes ahead of what has come back. Unbounded,
            // every socket buffer on the path autotunes to tens of MiB, the kernel starts
            // dropping on loopback, and streams stall for seconds in retransmission backoff
            // (seen here): that would measure the kernel's worst case, not the edge.
            const WINDOW: u64 = 2 << 20;
            let echoed = Arc::new((AtomicU64::new(0), tokio::sync::Notify::new()));
            let (mut r, mut w) = s.into_split();
            let writer = {
                let echoed = echoed.clone();
                tokio::spawn(async move {
                    let chunk = vec![0x5au8; 64 * 1024];
                    let mut sent = 0u64;
                    while sent < bytes {
                        let room = WINDOW.saturating_sub(sent - echoed.0.load(Ordering::Acquire));
                        if room == 0 {
                            let wake = echoed.1.notified();
                            if sent - echoed.0.load(Ordering::Acquire) >= WINDOW {
                                wake.await;
                            }
                            continue;
                        }
                        let n = room.min(bytes - sent).min(chunk.len() as u64) as usize;
                        w.write_all(&chunk[..n]).await?;
                        sent += n as u64;
                    }
                    w.shutdown().await?;
                    Ok::<_, std::io::Error>(w)
                })
            };
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            let mut corrupt = false;
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        // A fold without an early exit compiles to vector code: checking
                        // every byte then costs little beside the copy that brought it.
                        corrupt |= buf[..n].iter().fold(0u8, |acc, &b| acc | (b ^ 0x5a)) != 0;
                        got += n as u64;
                        echoed.0.store(got, Ordering::Release);
                        echoed.1.notify_one();
                    }
                    Err(_) => break,
                }
            }
            let _ = writer.await;
            (got, corrupt)
        });
    }
    let mut total = 0u64;
    let mut bad_streams = 0;
    while let Some(r) = tasks.join_next().await {
        let (got, corrupt) = r?;
        total += got;
        if got != a.bytes || corrupt {
            bad_streams += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(edge_cpu(&a.target.pids_cmd))
        .map(|(b, a)| a - b);
    Ok(json!({
        "scenario": "throughput",
        "edge_cpu_s_per_gib": cpu.map(|c| c / (total as f64 / (1u64 << 30) as f64)),
        "system": a.target.system,
        "streams": a.streams,
        "bytes_per_stream": a.bytes,
        "seconds": secs,
        "failed_streams": bad_streams,
        "gbit_per_s": total as f64 * 8.0 / secs / 1e9,
    }))
}

// ---------------------------------------------------------------------------------------------
// idle

/// Open `n` connections of `kind`, 256 at a time. Returns the open ones and failures by kind.
async fn open_many(
    t: &Target,
    kind: Kind,
    n: usize,
) -> (Vec<TcpStream>, BTreeMap<&'static str, u64>) {
    let sources = Arc::new(Sources::new(t.sources));
    let dest = kind.addr(t);
    let mut conns = Vec::with_capacity(n);
    let mut fails = BTreeMap::new();
    let mut left = n;
    while left > 0 {
        let batch = left.min(256);
        left -= batch;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let src = sources.next(dest);
            set.spawn(with_timeout(open(kind, dest, src)));
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => conns.push(s),
                Ok(Err(f)) => *fails.entry(f.label()).or_default() += 1,
                Err(_) => *fails.entry("panic").or_default() += 1,
            }
        }
    }
    (conns, fails)
}

async fn idle(a: &IdleArgs) -> Result<Value> {
    let t = &a.target;
    if a.connections > 19_000 {
        bail!("one loadgen process holds at most 19000 connections (the open-file cap is 20000); run several");
    }
    let before = edge_rss(&t.pids_cmd);
    let (conns, fails) = open_many(t, Kind::Tunnel, a.connections).await;
    let opened = conns.len();
    // Let the edge settle (freed buffers, finished handshakes) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_open = edge_rss(&t.pids_cmd);
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    // Again at the end of the hold: what an idle connection costs once it has been idle
    // (sluice parks idle connections after `park_idle_after`, 5 s by default).
    let after = edge_rss(&t.pids_cmd);
    let lost = check_alive(conns).await;
    let per_conn = |after: Option<(u64, usize)>| match (before, after) {
        (Some((b, _)), Some((a, _))) if opened > 0 => {
            json!((a as f64 - b as f64) * 1024.0 / opened as f64)
        }
        _ => Value::Null,
    };
    Ok(json!({
        "scenario": "idle",
        "system": t.system,
        "connections": a.connections,
        "opened": opened,
        "open_failures": fails,
        "hold_s": a.hold,
        "lost": lost,
        "rss_before_kib": before.map(|r| r.0),
        "rss_after_open_kib": after_open.map(|r| r.0),
        "rss_after_kib": after.map(|r| r.0),
        "processes": after.map(|r| r.1),
        "bytes_per_conn_open": per_conn(after_open),
        "bytes_per_conn": per_conn(after),
    }))
}

/// Echo one byte on each connection (512 at a time); how many did not answer.
async fn check_alive(conns: Vec<TcpStream>) -> usize {
    let lost = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for mut s in conns {
        let lost = lost.clone();
        set.spawn(async move {
            if with_timeout(ping(&mut s, b"!")).await.is_err() {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        });
        if set.len() >= 512 {
            let _ = set.join_next().await;
        }
    }
    while set.join_next().await.is_some() {}
    lost.load(Ordering::Relaxed) as usize
}

// ---------------------------------------------------------------------------------------------
// reload under load

async fn reload(a: &ReloadArgs) -> Result<Value> {
    let t = &a.rate.target;
    let (tunnels, tunnel_fails) = open_many(t, Kind::Tunnel, a.tunnels).await;
    if tunnels.len() != a.tunnels {
        bail!("could not open the idle tunnels before reloading: {tunnel_fails:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = edge_rss(&t.pids_cmd);
    let reloader = {
        let cmd = a.reload_cmd.clone();
        let every = Duration::from_millis(a.every_ms);
        let end = Instant::now() + Duration::from_secs_f64(a.rate.seconds);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < end {
                tick.tick().await;
                let st = tokio::process::Command::new("sh")
                    .args(["-c", &cmd])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .await;
                match st {
                    Ok(s) if s.success() => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    let rate = connrate(&a.rate).await?;
    let (reloads, reload_failures) = reloader.await?;
    // Give the edge a moment to finish its last reload before checking the tunnels.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = check_alive(tunnels).await;
    let after = edge_rss(&t.pids_cmd);
    let mut out = rate.json(&a.rate);
    out["scenario"] = json!("reload");
    out["reloads"] = json!(reloads);
    out["reload_cmd_failures"] = json!(reload_failures);
    out["tunnels"] = json!(a.tunnels);
    out["tunnels_cut"] = json!(cut);
    out["rss_before_kib"] = json!(before.map(|r| r.0));
    out["rss_after_kib"] = json!(after.map(|r| r.0));
    out["processes_before"] = json!(before.map(|r| r.1));
    out["processes_after"] = json!(after.map(|r| r.1));
    Ok(out)
}
