//! Test support: start sluice in-process on 127.0.0.1:0, real backends that say who they are,
//! a rustls client, and a tiny HTTP getter for the admin API.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice::config::Config;
use sluice::control::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use sluice::demo::TaggedBackend;

pub mod etcd;
pub mod heartbeats;
pub mod metrics;
pub mod process;
pub mod simple;

pub use metrics::{scrape, Scrape};
pub use simple::{backend_closes_first, closed_cleanly_once, simple, Simple};

/// A config with one listener `edge` on 127.0.0.1:0 and one catch-all route `all`, without
/// an idle timeout, to pool `p`. `admin` is the admin address ("" for none), `top` goes above
/// the listener (global tables), `pool` is the body of `[pool.p]`. Line numbers are asserted
/// on: the route's `pool` key is line 12 whatever `top` holds on its one line.
pub fn one_pool_config(admin: &str, top: &str, pool: &str) -> String {
    format!(
        r#"
[admin]
address = "{admin}"
{top}

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "all"
pool = "p"
idle_timeout = "0s"

[pool.p]
{pool}
"#
    )
}

/// Addresses as the items of a TOML array: `"a", "b"`.
pub fn quoted<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Start sluice from config text. `{name}` placeholders are replaced from `vars`.
pub async fn start(config: &str, vars: &[(&str, String)]) -> Server {
    let mut text = config.to_owned();
    for (k, v) in vars {
        text = text.replace(&format!("{{{k}}}"), v);
    }
    let cfg = sluice::config::parse(Path::new("test.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let server = Server::start(cfg).await.expect("sluice starts");
    server
}

/// A TCP connection from `source` (a 127.0.0.x address: how tests play many clients).
pub async fn connect_from(source: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((source, 0))).unwrap();
    sock.connect(to).await.unwrap()
}

pub fn edge(server: &Server) -> SocketAddr {
    server.listener_addr("edge").expect("listener `edge`")
}

/// A plain TCP backend: on connect it writes `<name>\n`; it records everything it receives;
/// at the client's EOF it answers `<name> got <n> bytes\n` and closes. With `fin_first`, it
/// closes its side right after the greeting and only records.
#[derive(Clone)]
pub struct RawBackend {
    pub name: String,
    pub address: SocketAddr,
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawBackend {
    pub async fn start(name: &str, fin_first: bool) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let tag = name.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let rec = rec.clone();
                let tag = tag.clone();
                tokio::spawn(async move {
                    let idx = {
                        let mut r = rec.lock().unwrap();
                        r.push(Vec::new());
                        r.len() - 1
                    };
                    let _ = s.write_all(format!("{tag}\n").as_bytes()).await;
                    if fin_first {
                        let _ = s.shutdown().await;
                    }
                    let mut buf = vec![0u8; 65536];
                    let mut total = 0usize;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                total += n;
                                rec.lock().unwrap()[idx].extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    if !fin_first {
                        let _ = s
                            .write_all(format!("{tag} got {total} bytes\n").as_bytes())
                            .await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        RawBackend {
            name: name.to_owned(),
            address,
            received,
        }
    }

    pub fn connections(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }
}

/// An address on `ip` whose UDP port is free now: for a QUIC listener whose address a test
/// must know before sluice binds it (a socket unit's, or one kept across an upgrade).
pub fn free_udp_address(ip: &str) -> SocketAddr {
    std::net::UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An address where nothing listens (connect is refused).
pub async fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A loopback address that never answers a SYN: a listener with a full accept queue that
/// never accepts (the kernel drops further SYNs).
pub async fn black_hole() -> (socket2::Socket, Vec<TcpStream>, std::net::SocketAddr) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    (sock, fillers, addr)
}

/// A backend on a free port that greets each connection with "echo" and then hands it to
/// `serve` (`echo_backend`; `echo_later_backend` in parking.rs).
pub async fn greeting_backend<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                s.write_all(b"echo\n").await.unwrap();
                serve(s).await;
            });
        }
    });
    address
}

/// A backend that says "echo" and then sends back everything it receives.
pub async fn echo_backend() -> std::net::SocketAddr {
    greeting_backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Read one line (up to `\n`) within 5 s.
pub async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    let fut = async {
        loop {
            match s.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if byte[0] == b'\n' {
                        break;
                    }
                    out.push(byte[0]);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("a line within 5s");
    String::from_utf8_lossy(&out).into_owned()
}

/// Read until EOF within `limit`; `None` if the connection stayed open.
pub async fn read_to_end(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut out)).await {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

/// A TLS client through sluice: returns the backend's greeting line.
pub async fn tls_greeting(addr: SocketAddr, sni: &str, alpn: &[&str]) -> String {
    tls_session(addr, sni, alpn).await.1
}

/// A TLS session through sluice, kept open: the stream and the backend's greeting line.
pub async fn tls_session(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&str],
) -> (tokio_rustls::client::TlsStream<TcpStream>, String) {
    let cfg = sluice::tls::testing::insecure_client_config(alpn);
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake through sluice");
    let greeting = read_line(&mut tls).await;
    (tls, greeting)
}

/// One HTTP/1.1 request without a body on the admin API; returns (status, body). Panics when
/// there is no answer within 10 s (an admin API that stopped serving but still holds its
/// socket would otherwise hang the test).
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_response(addr, method, path).await;
    (status, body)
}

/// As `http_request`, with the response's header block too (lower-case it to look a header
/// up).
pub async fn http_response(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        std::io::Result::Ok(out)
    };
    let out = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{method} {path} on {addr}: {e}"),
        Err(_) => panic!("{method} {path} on {addr}: no answer in 10 s"),
    };
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_owned(), body.to_owned())
}

/// GET a path on the admin API; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A real-looking agent tunnel ClientHello (SNI agent.example.com, ALPN teleport-reversetunnel).
pub fn tunnel_hello() -> Vec<u8> {
    sluice_core::hello::build::hello(Some("agent.example.com"), &["teleport-reversetunnel"])
}

/// Connect through the edge with a tunnel hello; returns the stream and the backend's first
/// line (its name).
pub async fn open_tunnel(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("edge accepts");
    s.write_all(&tunnel_hello()).await.unwrap();
    let name = read_line(&mut s).await;
    (s, name)
}

/// A tunnel through sluice to an echo backend (`echo_backend`, or `echo_later_backend` in
/// parking.rs): its greeting read and its hello echoed back whole.
pub async fn open_echoed_tunnel(server: &sluice::control::server::Server) -> TcpStream {
    let hello = tunnel_hello();
    let mut s = TcpStream::connect(edge(server)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(read_line(&mut s).await, "echo");
    let mut echoed = vec![0; hello.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello);
    s
}

/// Bytes `from..from + len` of a pattern that depends on the position, so that data shifted
/// or lost on the way does not match.
pub fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect()
}

/// The value of one series of `server`'s `/metrics`, scraped over HTTP from its admin API as
/// Prometheus does, e.g. `metric(&s, "sluice_hello_total", &[("result", "ok")])`. Labels may
/// be given in any order and must pick one series. A series not (yet) exported reads as 0,
/// but only for a name sluice declares: a renamed or misspelled metric fails the test.
pub async fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    let admin = server
        .admin_addr()
        .expect("metric() scrapes /metrics: give the test's config an [admin] address");
    scrape(admin).await.counter(name, labels)
}

/// `sluice_connections_closed_total` for one close reason (all listeners and routes must share
/// one series of it: the labels pick one).
pub async fn closed(server: &Server, reason: &str) -> f64 {
    metric(
        server,
        "sluice_connections_closed_total",
        &[("reason", reason)],
    )
    .await
}

/// `metric` for a server whose admin API has stopped (after `drain` or `shutdown`): the
/// registry's own rendering, which is what the last scrape would have shown.
pub fn metric_after_stop(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    Scrape::parse(server.rt.metrics.render()).counter(name, labels)
}

/// Poll until `f` holds, for up to 15 s. The budget is for a loaded machine (`cargo test` runs
/// a file's tests side by side in one process, on two cores here): a condition that holds
/// returns at its first poll after it does, so only a failing test waits it out.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// `[limits] park_idle_after` short enough for tests.
pub const PARK_FAST: &str = "[limits]\npark_idle_after = \"100ms\"";

/// Wait until `n` connections are parked.
pub async fn parked(server: &sluice::control::server::Server, n: f64) {
    eventually(&format!("{n} parked"), || async {
        metric(server, "sluice_relay_parked", &[]).await == n
    })
    .await;
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

/// A temp dir with a self-signed certificate for sluice.test (`cert.pem`, `key.pem`) and a
/// heartbeat `tokens` file holding `tokens`: what a [heartbeat] table needs.
pub fn secrets(tokens: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["sluice.test".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("tokens"), tokens).unwrap();
    dir
}

/// A PROXY v2 header's TLVs as (type, value), in order.
pub fn proxy_v2_tlvs(header: &ppp::v2::Header<'_>) -> Vec<(u8, Vec<u8>)> {
    header
        .tlvs()
        .map(|t| t.expect("a well-formed TLV"))
        .map(|t| (t.kind, t.value.to_vec()))
        .collect()
}

/// Strip TLS record framing: the handshake message(s) alone.
pub fn handshake_of(records: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= records.len() {
        let len = u16::from_be_bytes([records[pos + 3], records[pos + 4]]) as usize;
        out.extend_from_slice(&records[pos + 5..pos + 5 + len]);
        pos += 5 + len;
    }
    out
}

/// An HTTP/1.1 GET over TLS (ALPN http/1.1) through sluice; returns the whole response.
pub async fn tls_http_get(addr: SocketAddr, sni: &str) -> String {
    let cfg = sluice::tls::testing::insecure_client_config(&["http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("handshake through sluice");
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {sni}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A backend whose listening socket can be closed and opened again on the same port while
/// the connections it accepted live on (a proxy restarting its listener, or dying and
/// coming back).
pub struct Flaky {
    pub name: &'static str,
    pub address: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

impl Flaky {
    pub async fn start(name: &'static str, at: &str) -> Flaky {
        let l = TcpListener::bind(at).await.unwrap();
        let address = l.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let s2 = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    _ = s2.cancelled() => return,
                    r = l.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                tokio::spawn(async move {
                    let _ = c.write_all(format!("{name}\n").as_bytes()).await;
                    let mut total = 0;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        total += n;
                    }
                    let _ = c
                        .write_all(format!("{name} got {total} bytes\n").as_bytes())
                        .await;
                });
            }
        });
        Flaky {
            name,
            address,
            stop,
        }
    }

    /// Close the listening socket and wait until the port refuses connections. (The accept
    /// task drops the socket after it sees the stop: a connect before that would still be
    /// taken by the kernel's backlog, then reset, which is not a refused connect.)
    pub async fn kill_listener(&self) {
        self.stop.cancel();
        eventually("the killed listener refuses connections", || async {
            TcpStream::connect(self.address).await.is_err()
        })
        .await;
    }

    pub async fn revive(&mut self) {
        *self = Flaky::start(self.name, &self.address.to_string()).await;
    }
}
