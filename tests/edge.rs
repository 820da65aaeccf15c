//! End to end on 127.0.0.1: real sockets, real TLS, sluice in-process.

mod support;

use std::time::Duration;

use sluice_core::hello::build;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROUTING: &str = r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
name = "edge"
address = "127.0.0.1:0"
hello_timeout = "2s"

[[route]]
name = "tunnels"
alpn = ["teleport-reversetunnelv2", "teleport-reversetunnel"]
pool = "tunnel"
idle_timeout = "0s"

[[route]]
name = "kube"
sni = ["kube-teleport-proxy-alpn.*"]
pool = "kube"

[[route]]
name = "db"
alpn = ["teleport-postgres*", "teleport-mysql-*"]
sni = ["*.db.example.com"]
pool = "db"

[[route]]
name = "clients"
pool = "client"

[pool.tunnel]
backends = ["{tunnel}"]
[pool.kube]
backends = ["{kube}"]
[pool.db]
backends = ["{db}"]
[pool.client]
backends = ["{client}"]
"#;

async fn routing_setup() -> (sluice::control::server::Server, Vec<TaggedBackend>) {
    let any = "127.0.0.1:0".parse().unwrap();
    let tunnel = TaggedBackend::start(
        "tunnel-proxy",
        any,
        &["teleport-reversetunnelv2", "teleport-reversetunnel"],
    )
    .await
    .unwrap();
    let kube = TaggedBackend::start("kube-proxy", any, &["h2", "http/1.1"])
        .await
        .unwrap();
    let db = TaggedBackend::start(
        "db-proxy",
        any,
        &[
            "teleport-postgres-ping",
            "teleport-postgres",
            "teleport-mysql-8.0.36",
        ],
    )
    .await
    .unwrap();
    let client = TaggedBackend::start("client-proxy", any, &["h2", "http/1.1"])
        .await
        .unwrap();
    let server = start(
        ROUTING,
        &[
            ("tunnel", tunnel.address.to_string()),
            ("kube", kube.address.to_string()),
            ("db", db.address.to_string()),
            ("client", client.address.to_string()),
        ],
    )
    .await;
    (server, vec![tunnel, kube, db, client])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_alpn_and_sni_with_real_tls() {
    let (server, _backends) = routing_setup().await;
    let addr = edge(&server);
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "agent.example.com",
            &["teleport-reversetunnelv2"],
            "tunnel-proxy alpn=teleport-reversetunnelv2",
        ),
        (
            "agent.example.com",
            &["h2", "teleport-reversetunnel"],
            "tunnel-proxy alpn=teleport-reversetunnel",
        ),
        (
            "kube-teleport-proxy-alpn.teleport.example.com",
            &["h2"],
            "kube-proxy alpn=h2",
        ),
        (
            "pg.db.example.com",
            &["teleport-postgres-ping"],
            "db-proxy alpn=teleport-postgres-ping",
        ),
        (
            "MY.DB.Example.COM",
            &["teleport-mysql-8.0.36"],
            "db-proxy alpn=teleport-mysql-8.0.36",
        ),
        // Right ALPN, wrong SNI: not the db route.
        ("pg.example.com", &["h2"], "client-proxy alpn=h2"),
        (
            "www.example.com",
            &["h2", "http/1.1"],
            "client-proxy alpn=h2",
        ),
    ];
    for (sni, alpn, expect) in cases {
        let line = tls_greeting(addr, sni, alpn).await;
        assert!(
            line.starts_with(expect),
            "{sni} {alpn:?}: got `{line}`, want `{expect}`"
        );
    }
    // SNI reaches the backend unchanged (TLS is not terminated).
    let line = tls_greeting(addr, "kube-teleport-proxy-alpn.x", &["h2"]).await;
    assert!(line.ends_with("sni=kube-teleport-proxy-alpn.x"), "{line}");

    assert_eq!(
        metric(
            &server,
            "sluice_route_decisions_total",
            &[("route", "tunnels")]
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(&server, "sluice_route_decisions_total", &[("route", "db")]).await,
        2.0
    );
    assert_eq!(
        metric(&server, "sluice_hello_total", &[("result", "ok")]).await,
        8.0
    );
    eventually("bytes counted", || async {
        metric(
            &server,
            "sluice_bytes_total",
            &[("route", "tunnels"), ("direction", "to_client")],
        )
        .await
            > 0.0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_written_one_byte_at_a_time_is_routed() {
    let tunnel = RawBackend::start("tunnel", false).await;
    let kube = RawBackend::start("kube", false).await;
    let client = RawBackend::start("client", false).await;
    let server = start(
        ROUTING,
        &[
            ("tunnel", tunnel.address.to_string()),
            ("kube", kube.address.to_string()),
            ("db", client.address.to_string()),
            ("client", client.address.to_string()),
        ],
    )
    .await;
    // Chromium's captured 2 KB post-quantum hello (SNI kube-teleport-proxy-alpn.example.com),
    // re-framed over 41 records of at most 50 bytes, then trickled byte by byte.
    let captured = fixture("chromium-pq-h2.bin");
    assert!(captured.len() > 2000, "{}", captured.len());
    let handshake = handshake_of(&captured);
    let hello = build::records(&handshake, 50);
    assert_eq!(
        hello.len(),
        handshake.len() + 5 * handshake.len().div_ceil(50)
    );
    assert!(handshake.len().div_ceil(50) > 40);
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.set_nodelay(true).unwrap();
    // One segment per byte (no Nagle); a pause every 64 bytes so that sluice reads the hello
    // in many pieces. (tokio sleeps at least 1 ms: a pause per byte would pass hello_timeout.)
    for (i, b) in hello.iter().enumerate() {
        s.write_all(&[*b]).await.unwrap();
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(read_line(&mut s).await, "kube");
    s.shutdown().await.unwrap();
    assert_eq!(
        read_line(&mut s).await,
        format!("kube got {} bytes", hello.len()),
        "the backend received exactly the hello"
    );
    assert_eq!(kube.connections()[0], hello, "replayed byte for byte");
    assert!(tunnel.connections().is_empty() && client.connections().is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_pq_hello_split_over_records_and_segments() {
    let backend = RawBackend::start("kube", false).await;
    let other = RawBackend::start("other", false).await;
    let server = start(
        ROUTING,
        &[
            ("tunnel", other.address.to_string()),
            ("kube", backend.address.to_string()),
            ("db", other.address.to_string()),
            ("client", other.address.to_string()),
        ],
    )
    .await;
    let original = fixture("chromium-pq-h2.bin");
    // Re-frame the handshake into 100-byte records and send it in 7 segments.
    let hs = original[5..].to_vec();
    let framed = build::records(&hs, 100);
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.set_nodelay(true).unwrap();
    for chunk in framed.chunks(framed.len() / 7 + 1) {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read_line(&mut s).await, "kube");
    drop(s);
    eventually("backend got the whole hello", || async {
        backend
            .connections()
            .first()
            .map(|c| c == &framed)
            .unwrap_or(false)
    })
    .await;
    server.shutdown().await;
}

const SIMPLE: &str = r#"
[admin]
address = "127.0.0.1:0"

{top}

[[listener]]
name = "edge"
address = "{listen}"
hello_timeout = "{hello_timeout}"
max_hello_size = {max_hello}
{listener_extra}

[[route]]
name = "main"
pool = "main"
idle_timeout = "{idle}"

{extra}

[pool.main]
backends = [{backends}]
balance = "round_robin"
retries = {retries}
proxy_protocol = "{pp}"
connect_timeout = "500ms"
{pool_extra}
"#;

struct Simple<'a> {
    backends: Vec<String>,
    hello_timeout: &'a str,
    max_hello: usize,
    idle: &'a str,
    retries: u32,
    pp: &'a str,
    /// More routes and pools after the main ones.
    extra: String,
    /// Top-level sections before the listener (e.g. `[lifecycle]`).
    top: &'a str,
    listen: &'a str,
    /// More keys for the listener.
    listener_extra: &'a str,
    /// More keys for `[pool.main]`.
    pool_extra: &'a str,
}

impl Default for Simple<'_> {
    fn default() -> Self {
        Simple {
            backends: vec![],
            hello_timeout: "2s",
            max_hello: 16384,
            idle: "1h",
            retries: 2,
            pp: "none",
            extra: String::new(),
            top: "",
            listen: "127.0.0.1:0",
            listener_extra: "",
            pool_extra: "",
        }
    }
}

async fn simple(s: Simple<'_>) -> sluice::control::server::Server {
    let backends = s
        .backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    start(
        SIMPLE,
        &[
            ("backends", backends),
            ("hello_timeout", s.hello_timeout.into()),
            ("max_hello", s.max_hello.to_string()),
            ("idle", s.idle.into()),
            ("retries", s.retries.to_string()),
            ("pp", s.pp.into()),
            ("extra", s.extra),
            ("top", s.top.into()),
            ("listen", s.listen.into()),
            ("listener_extra", s.listener_extra.into()),
            ("pool_extra", s.pool_extra.into()),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hello_times_out_and_is_counted() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        hello_timeout: "300ms",
        ..Simple::default()
    })
    .await;
    let hello = tunnel_hello();
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&hello[..20]).await.unwrap();
    let started = std::time::Instant::now();
    let got = read_to_end(&mut s, Duration::from_secs(3)).await;
    assert_eq!(got, Some(vec![]), "closed without a byte from any backend");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        metric(&server, "sluice_hello_total", &[("result", "timeout")]).await,
        1.0
    );
    assert!(b.connections().is_empty(), "never routed anywhere");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_hellos_are_closed_not_routed() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        max_hello: 1024,
        ..Simple::default()
    })
    .await;
    // Duplicate SNI extension: the classic way to confuse a lenient parser.
    let mut spec = build::Spec {
        sni: Some("good.example.com".into()),
        ..Default::default()
    };
    spec.extra.push((0, vec![0, 6, 0, 0, 3, b'e', b'v', b'l']));
    let bad = build::records(&build::handshake(&spec), 16384);
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&bad).await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );

    // A 2 KB hello against max_hello_size = 1024.
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&fixture("chromium-pq-h2.bin")).await.unwrap();
    // Closed (possibly with a reset, as the client had unsent bytes) without a byte back.
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );

    // A client that gives up halfway through its hello.
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&tunnel_hello()[..20]).await.unwrap();
    drop(s);

    eventually("all three counted", || async {
        metric(&server, "sluice_hello_total", &[("result", "malformed")]).await == 1.0
            && metric(&server, "sluice_hello_total", &[("result", "too_large")]).await == 1.0
            && metric(&server, "sluice_hello_total", &[("result", "eof")]).await == 1.0
    })
    .await;
    for reason in ["hello_malformed", "hello_too_large", "client_closed_early"] {
        eventually(&format!("a close counted as {reason}"), || async {
            metric(
                &server,
                "sluice_connections_closed_total",
                &[("reason", reason)],
            )
            .await
                == 1.0
        })
        .await;
    }
    assert!(b.connections().is_empty(), "never routed anywhere");
    server.shutdown().await;
}

/// A reset from either side ends the relay as an error of that side, counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_counted_against_the_side_that_sent_it() {
    // A backend that greets, then resets its connection when told to.
    let backend = greeting_backend(|s| async move {
        let mut s = s;
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || buf[..n].ends_with(b"reset") {
                break;
            }
        }
        // SO_LINGER 0: the close sends a reset.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
    .await;
    let server = simple(Simple {
        backends: vec![backend.to_string()],
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);

    // The backend resets: the client's connection ends too, counted as backend_error.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "echo");
    s.write_all(b"reset").await.unwrap();
    let _ = read_to_end(&mut s, Duration::from_secs(5)).await;
    eventually("counted as backend_error", || async {
        closed(&server, "backend_error").await == 1.0
    })
    .await;

    // The client resets (SO_LINGER 0, then close): counted as client_error.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "echo");
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    eventually("counted as client_error", || async {
        closed(&server, "client_error").await == 1.0
    })
    .await;
    server.shutdown().await;
}

/// The gauges and counters a dashboard reads, each seen doing its job once: lifecycle
/// state, reload timestamp, per-route and per-backend active connections, connect
/// durations, pipes and dropped log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_metrics_follow_a_connection() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        ..Simple::default()
    })
    .await;
    server.ready().await;
    let admin = server.admin_addr().unwrap();
    let m = scrape(admin).await;
    assert_eq!(
        m.value("sluice_lifecycle_state", &[("state", "ready")]),
        1.0
    );
    assert_eq!(
        m.value("sluice_lifecycle_state", &[("state", "starting")]),
        0.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let loaded = m.value("sluice_config_last_reload_success_timestamp_seconds", &[]);
    assert!(
        loaded <= now && loaded > now - 600.0,
        "startup counts: {loaded} vs {now}"
    );
    // Pipes and dropped log lines are counted per process, and `cargo test` runs every test
    // of this file in one: other tests' pipes may be open now. Each series must be there.
    assert!(m.value("sluice_log_lines_dropped_total", &[]) >= 0.0);
    assert!(m.value("sluice_relay_pipes", &[]) >= 0.0);

    let (tunnel, _) = open_tunnel(edge(&server)).await;
    let m = scrape(admin).await;
    assert_eq!(
        m.value("sluice_route_connections_active", &[("route", "main")]),
        1.0
    );
    let backend = b.address.to_string();
    assert_eq!(
        m.value(
            "sluice_backend_connections_active",
            &[("pool", "main"), ("backend", &backend)]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sluice_upstream_connect_duration_seconds_count",
            &[("pool", "main")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sluice_upstream_connect_duration_seconds_bucket",
            &[("pool", "main"), ("le", "+Inf")]
        ),
        1.0
    );
    drop(tunnel);
    eventually("the gauges come back down", || async {
        let m = scrape(admin).await;
        m.value("sluice_route_connections_active", &[("route", "main")]) == 0.0
            && m.value(
                "sluice_backend_connections_active",
                &[("pool", "main"), ("backend", &backend)],
            ) == 0.0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_tls_is_closed_unless_a_route_takes_it() {
    let tls_backend = RawBackend::start("tls", false).await;
    let server = simple(Simple {
        backends: vec![tls_backend.address.to_string()],
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    assert_eq!(
        metric(&server, "sluice_hello_total", &[("result", "not_tls")]).await,
        1.0
    );
    assert_eq!(
        metric(
            &server,
            "sluice_route_decisions_total",
            &[("route", "none")]
        )
        .await,
        1.0
    );
    assert!(tls_backend.connections().is_empty());
    server.shutdown().await;

    // With a `tls = false` route, plain traffic goes there (and TLS still goes to the TLS route).
    let plain_backend = RawBackend::start("plain", false).await;
    let server = simple(Simple {
        backends: vec![tls_backend.address.to_string()],
        extra: format!(
            "[[route]]\nname = \"plain\"\ntls = false\npool = \"plain\"\n\
             [pool.plain]\nbackends = [\"{}\"]",
            plain_backend.address
        ),
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    assert_eq!(read_line(&mut s).await, "plain");
    let mut t = TcpStream::connect(edge(&server)).await.unwrap();
    t.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut t).await, "tls");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_is_retried_on_another() {
    let live = RawBackend::start("live", false).await;
    let dead = dead_address().await;
    let server = simple(Simple {
        backends: vec![dead.to_string(), live.address.to_string()],
        ..Simple::default()
    })
    .await;
    // Round robin: half the connections try the dead backend first.
    for _ in 0..4 {
        let mut s = TcpStream::connect(edge(&server)).await.unwrap();
        s.write_all(&tunnel_hello()).await.unwrap();
        assert_eq!(read_line(&mut s).await, "live");
    }
    assert_eq!(
        metric(
            &server,
            "sluice_upstream_connect_failures_total",
            &[("pool", "main"), ("reason", "refused")]
        )
        .await,
        2.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_dead_closes_the_client_and_counts() {
    let server = simple(Simple {
        backends: vec![
            dead_address().await.to_string(),
            dead_address().await.to_string(),
        ],
        retries: 3,
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    assert_eq!(
        metric(
            &server,
            "sluice_upstream_unavailable_total",
            &[("pool", "main")]
        )
        .await,
        1.0
    );
    // Two distinct backends: retries never pick the same one twice.
    assert_eq!(
        metric(
            &server,
            "sluice_upstream_connect_failures_total",
            &[("reason", "refused")]
        )
        .await,
        2.0
    );
    server.shutdown().await;
}

/// The one connection of a test ended with both FINs passed on (`reason="closed"`).
async fn closed_cleanly_once(server: &sluice::control::server::Server) {
    eventually("closed cleanly", || async {
        metric(
            server,
            "sluice_connections_closed_total",
            &[("route", "main"), ("reason", "closed")],
        )
        .await
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_first() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        ..Simple::default()
    })
    .await;
    let hello = tunnel_hello();
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    s.write_all(&[7u8; 100_000]).await.unwrap();
    // Client FIN: the backend must see EOF, and its answer must still reach the client.
    s.shutdown().await.unwrap();
    assert_eq!(
        read_line(&mut s).await,
        format!("b got {} bytes", hello.len() + 100_000)
    );
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    closed_cleanly_once(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_backend_first() {
    backend_closes_first(false).await;
}

/// The backend says its line and closes its side at once; the client sees EOF and can still
/// send. `park`: the connection parks in between, with one direction finished.
async fn backend_closes_first(park: bool) {
    let b = RawBackend::start("b", true).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        top: if park { PARK_FAST } else { "" },
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    // The backend said its line and closed its side: the client sees EOF...
    assert_eq!(read_line(&mut s).await, "b");
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    if park {
        // Only the client's socket is watched (the backend's, at EOF, would wake it at
        // once, forever).
        parked(&server, 1.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metric(&server, "sluice_relay_parks_total", &[]).await, 1.0);
    }
    // ...and can still send: the client-to-backend direction keeps flowing.
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    eventually("backend received data after its own FIN", || async {
        b.connections()
            .first()
            .is_some_and(|c| c.ends_with(b"still here"))
    })
    .await;
    closed_cleanly_once(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_header_reaches_the_backend() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        pp: "v2",
        ..Simple::default()
    })
    .await;
    let hello = build::hello(Some("agent.example.com"), &["h2", "teleport-reversetunnel"]);
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    let client_addr = s.local_addr().unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    drop(s);
    eventually("received", || async {
        b.connections()
            .first()
            .is_some_and(|c| c.len() > hello.len())
    })
    .await;
    let got = b.connections()[0].clone();
    let header = ppp::v2::Header::try_from(got.as_slice()).expect("a PROXY v2 header first");
    assert_eq!(
        header.addresses,
        ppp::v2::Addresses::from((client_addr, edge(&server)))
    );
    let tlvs = proxy_v2_tlvs(&header);
    assert_eq!(
        tlvs,
        vec![
            (ppp::v2::Type::ALPN as u8, b"h2".to_vec()),
            (
                ppp::v2::Type::Authority as u8,
                b"agent.example.com".to_vec()
            ),
        ]
    );
    let header_len = header.len();
    assert_eq!(
        &got[header_len..],
        &hello[..],
        "exactly one header, then the hello"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_and_counts() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        idle: "300ms",
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    let got = read_to_end(&mut s, Duration::from_secs(3)).await;
    assert_eq!(got, Some(vec![]));
    eventually("idle close counted", || async {
        metric(
            &server,
            "sluice_connections_closed_total",
            &[("reason", "idle_timeout")],
        )
        .await
            == 1.0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_connection_cap_waits_in_backlog() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        hello_timeout: "5s",
        listener_extra: "max_connections = 1",
        ..Simple::default()
    })
    .await;
    let mut first = TcpStream::connect(edge(&server)).await.unwrap();
    first.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut first).await, "b");
    // The second connects (kernel backlog) but is not served while the first holds the slot.
    let mut second = TcpStream::connect(edge(&server)).await.unwrap();
    second.write_all(&tunnel_hello()).await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(400), second.read(&mut byte))
            .await
            .is_err(),
        "second connection must wait"
    );
    assert_eq!(
        metric(
            &server,
            "sluice_accept_paused_total",
            &[("cap", "listener")]
        )
        .await,
        1.0
    );
    drop(first);
    assert_eq!(read_line(&mut second).await, "b");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reports_listeners_routes_and_health() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        ..Simple::default()
    })
    .await;
    let admin = server.admin_addr().unwrap();
    let (status, body) = http_get(admin, "/debug/listeners").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("\"bound\": \"{}\"", edge(&server))),
        "{body}"
    );
    assert!(body.contains("\"configured\": \"127.0.0.1:0\""), "{body}");
    eventually("ready", || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    let (status, routes) = http_get(admin, "/debug/routes").await;
    assert_eq!(status, 200);
    assert!(routes.contains("\"pool\": \"main\""), "{routes}");
    let (_, config) = http_get(admin, "/debug/config").await;
    assert!(config.contains("\"balance\": \"round_robin\""), "{config}");
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(metrics.contains("sluice_build_info{version="), "{metrics}");
    assert!(
        metrics.contains("sluice_pool_backends{pool=\"main\"} 1"),
        "{metrics}"
    );
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    let addr = edge(&server);
    server.shutdown().await;
    // Shut down: neither the edge nor the admin API takes a connection.
    eventually("the edge refuses connections", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(matches!(
        server.rt.state(),
        sluice::control::runtime::State::Closing
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_established_connections_until_they_end() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        idle: "0s",
        top: "[lifecycle]\ndrain_delay = \"200ms\"\ndrain_timeout = \"5s\"",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    let mut tunnel = TcpStream::connect(addr).await.unwrap();
    tunnel.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut tunnel).await, "b");
    let admin = server.admin_addr().unwrap();
    eventually("ready", || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;

    let server = std::sync::Arc::new(server);
    let s2 = server.clone();
    let drain = tokio::spawn(async move { s2.drain(std::future::pending(), true).await });
    // Unready at once, but still accepting during drain_delay.
    eventually("unready", || async {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    let mut during = TcpStream::connect(addr).await.unwrap();
    during.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut during).await, "b");
    drop(during);
    // After the delay the listener is closed...
    eventually("listener closed after drain_delay", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    // ...but the established tunnel still works, and the drain ends when it does.
    tunnel.write_all(b"ping").await.unwrap();
    assert!(!drain.is_finished());
    tunnel.shutdown().await.unwrap();
    assert!(read_line(&mut tunnel).await.starts_with("b got"));
    tokio::time::timeout(Duration::from_secs(3), drain)
        .await
        .unwrap()
        .unwrap();
}

/// A loopback address that never answers a SYN: a listener with a full accept queue that
/// never accepts (the kernel drops further SYNs).
async fn black_hole() -> (socket2::Socket, Vec<TcpStream>, std::net::SocketAddr) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_backend_times_out_and_is_retried() {
    let live = RawBackend::start("live", false).await;
    let (_hole, _fillers, hole) = black_hole().await;
    let server = simple(Simple {
        backends: vec![hole.to_string(), live.address.to_string()],
        ..Simple::default()
    })
    .await;
    for _ in 0..2 {
        let mut s = TcpStream::connect(edge(&server)).await.unwrap();
        s.write_all(&tunnel_hello()).await.unwrap();
        assert_eq!(read_line(&mut s).await, "live");
    }
    assert_eq!(
        metric(
            &server,
            "sluice_upstream_connect_failures_total",
            &[("reason", "timeout")]
        )
        .await,
        1.0,
        "connect_timeout (500ms) fired once, then the retry went to the live backend"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_and_backend() {
    if !process::available(
        "no IPv6 loopback ([::1]) here",
        std::net::TcpListener::bind("[::1]:0").is_ok(),
    ) {
        return;
    }
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s
                    .write_all(format!("v6 backend saw {}\n", peer.ip()).as_bytes())
                    .await;
                let mut sink = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let server = simple(Simple {
        backends: vec![backend.to_string()],
        retries: 0,
        listen: "[::1]:0",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    assert!(addr.is_ipv6(), "{addr}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "v6 backend saw ::1");
    server.shutdown().await;
}

/// TCP keepalive is on for both legs of a relayed connection: `ss -o` shows a keepalive timer
/// on sluice's client-side socket from the start (it comes from the listening socket), and on
/// its backend-side socket once the connection has gone idle (set then, so that connections
/// that close soon spare the calls; see `Relaying::backend_keepalive`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_on_both_legs() {
    if !process::have("ss") {
        return;
    }
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        top: "[limits]\npark_idle_after = \"2s\"",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    let client_port = s.local_addr().unwrap().port();
    let ss = |filter: String| {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", &filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // sluice's accepted socket: local port = edge port, peer = our client.
    let client_leg = ss(format!(
        "( sport = :{} and dport = :{client_port} )",
        addr.port()
    ));
    assert!(
        client_leg.contains("timer:(keepalive,"),
        "client leg: {client_leg}"
    );
    // sluice's backend socket: peer port = the backend's. Not idle yet: no keepalive.
    let backend_leg = || ss(format!("( dport = :{} )", b.address.port()));
    let busy = backend_leg();
    assert!(
        busy.contains(&format!(":{}", b.address.port())) && !busy.contains("timer:(keepalive,"),
        "backend leg before it went idle: {busy}"
    );
    parked(&server, 1.0).await;
    let idle = backend_leg();
    assert!(
        idle.contains("timer:(keepalive,"),
        "backend leg once idle: {idle}"
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Inbound PROXY protocol: sluice behind a load balancer.

fn v2_header(src: &str, dst: &str) -> Vec<u8> {
    sluice_core::proxy::encode(
        sluice::config::ProxyProtocol::V2,
        &sluice_core::proxy::HeaderInfo {
            client: src.parse().unwrap(),
            local: dst.parse().unwrap(),
            alpn: None,
            sni: None,
        },
    )
    .unwrap()
    .unwrap()
}

async fn behind_lb(mode: &str, trusted: &str) -> (sluice::control::server::Server, RawBackend) {
    let b = RawBackend::start("b", false).await;
    let listener_extra = format!("accept_proxy = \"{mode}\"\ntrusted_proxies = [{trusted}]");
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        pp: "v1",
        listener_extra: &listener_extra,
        ..Simple::default()
    })
    .await;
    (server, b)
}

/// The first line the backend received (sluice's own PROXY v1 header). The backend records a
/// connection when it accepts it and its bytes as they arrive, so wait for a whole line.
async fn backend_first_line(b: &RawBackend, conn: usize) -> String {
    eventually("the backend got the header", || async {
        b.connections()
            .get(conn)
            .is_some_and(|c| c.contains(&b'\n'))
    })
    .await;
    let got = b.connections()[conn].clone();
    String::from_utf8_lossy(&got[..got.iter().position(|&c| c == b'\n').unwrap_or(got.len())])
        .trim_end()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_v2_gives_the_real_client_address() {
    let (server, b) = behind_lb("v2", "\"127.0.0.0/8\"").await;
    let addr = edge(&server);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut first = v2_header("192.0.2.7:51000", "203.0.113.1:443");
    first.extend_from_slice(&tunnel_hello());
    s.write_all(&first).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    // The backend hears of the real client, and of the address it connected to.
    assert_eq!(
        backend_first_line(&b, 0).await,
        "PROXY TCP4 192.0.2.7 203.0.113.1 51000 443"
    );
    // ...and gets the hello intact after it.
    eventually("the hello follows the header", || async {
        b.connections()[0].ends_with(&tunnel_hello())
    })
    .await;
    assert_eq!(
        metric(
            &server,
            "sluice_proxy_protocol_inbound_total",
            &[("result", "ok")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_rejects_untrusted_missing_and_malformed_headers() {
    // Not from a trusted proxy: closed before anything reaches a backend.
    let (server, b) = behind_lb("v2", "\"10.0.0.0/8\"").await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    let mut first = v2_header("192.0.2.7:51000", "203.0.113.1:443");
    first.extend_from_slice(&tunnel_hello());
    s.write_all(&first).await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![]),
        "closed"
    );
    assert_eq!(
        metric(
            &server,
            "sluice_proxy_protocol_inbound_total",
            &[("result", "untrusted")]
        )
        .await,
        1.0
    );
    assert!(b.connections().is_empty());

    let (server, b) = behind_lb("v2", "\"127.0.0.1\"").await;
    let addr = edge(&server);
    // Required but absent (a client that bypassed the load balancer).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    // A v1 header where v2 is required, and a broken v2 header.
    for bad in [
        b"PROXY TCP4 192.0.2.7 203.0.113.1 51000 443\r\n".to_vec(),
        [
            &b"\r\n\r\n\0\r\nQUIT\n"[..],
            &[0x21, 0x11, 0x00, 0x02, 0, 0],
        ]
        .concat(),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&bad).await.unwrap();
        assert_eq!(
            read_to_end(&mut s, Duration::from_secs(3)).await,
            Some(vec![])
        );
    }
    for (result, n) in [("missing", 1.0), ("malformed", 2.0)] {
        assert_eq!(
            metric(
                &server,
                "sluice_proxy_protocol_inbound_total",
                &[("result", result)]
            )
            .await,
            n,
            "{result}"
        );
    }
    eventually("closes counted with their reason", || async {
        metric(
            &server,
            "sluice_connections_closed_total",
            &[("reason", "proxy_malformed")],
        )
        .await
            == 2.0
    })
    .await;
    assert!(b.connections().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_optional_takes_both() {
    let (server, b) = behind_lb("optional", "\"127.0.0.1\"").await;
    let addr = edge(&server);
    let mut direct = TcpStream::connect(addr).await.unwrap();
    direct.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut direct).await, "b");
    let direct_line = backend_first_line(&b, 0).await;
    assert!(
        direct_line.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{direct_line}"
    );

    let mut via = TcpStream::connect(addr).await.unwrap();
    via.write_all(b"PROXY TCP4 198.51.100.9 203.0.113.1 40000 443\r\n")
        .await
        .unwrap();
    via.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut via).await, "b");
    assert_eq!(
        backend_first_line(&b, 1).await,
        "PROXY TCP4 198.51.100.9 203.0.113.1 40000 443"
    );
}

/// A LOCAL (v2) or UNKNOWN (v1) header is a health check or a proxy that does not know the
/// client: the connection goes on with its own addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_local_and_unknown_keep_the_connection_addresses() {
    let (server, b) = behind_lb("optional", "\"127.0.0.1\"").await;
    let addr = edge(&server);
    // v2 LOCAL: signature, version 2 / command LOCAL, family UNSPEC, no addresses.
    let local = [&b"\r\n\r\n\0\r\nQUIT\n"[..], &[0x20, 0x00, 0x00, 0x00]].concat();
    for (i, header) in [local, b"PROXY UNKNOWN\r\n".to_vec()]
        .into_iter()
        .enumerate()
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let client = s.local_addr().unwrap();
        s.write_all(&[header, tunnel_hello()].concat())
            .await
            .unwrap();
        assert_eq!(read_line(&mut s).await, "b");
        let line = backend_first_line(&b, i).await;
        assert!(
            line.starts_with(&format!(
                "PROXY TCP4 127.0.0.1 127.0.0.1 {} ",
                client.port()
            )),
            "{line}"
        );
        eventually("the hello follows sluice's own header", || async {
            b.connections()[i].ends_with(&tunnel_hello())
        })
        .await;
    }
    assert_eq!(
        metric(
            &server,
            "sluice_proxy_protocol_inbound_total",
            &[("result", "local")]
        )
        .await,
        2.0
    );
}

/// The closes an inbound PROXY header can cause, each counted with its reason: a header from
/// an untrusted sender in optional mode, a required header that is missing, and a header
/// that never completes (`hello_timeout` bounds it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_refusals_are_counted_by_reason() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        hello_timeout: "500ms",
        listener_extra: "accept_proxy = \"optional\"\ntrusted_proxies = [\"10.0.0.0/8\"]",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    // Optional mode, untrusted sender: no header is fine...
    assert_eq!(open_tunnel(addr).await.1, "b");
    // ...a header is a spoofing attempt.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        &[
            v2_header("192.0.2.7:51000", "203.0.113.1:443"),
            tunnel_hello(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );

    let (required, _) = behind_lb("v1", "\"127.0.0.1\"").await;
    let raddr = edge(&required);
    let mut s = TcpStream::connect(raddr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    // Half a header, then silence: closed at hello_timeout (2 s here), not held forever.
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(raddr).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2").await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(10)).await,
        Some(vec![])
    );
    assert!(started.elapsed() >= Duration::from_secs(2));

    for (srv, result, reason) in [
        (&server, "absent", None),
        (&server, "untrusted", Some("proxy_untrusted")),
        (&required, "missing", Some("proxy_missing")),
        (&required, "timeout", Some("proxy_timeout")),
    ] {
        assert_eq!(
            metric(
                srv,
                "sluice_proxy_protocol_inbound_total",
                &[("result", result)]
            )
            .await,
            1.0,
            "{result}"
        );
        if let Some(reason) = reason {
            eventually(&format!("a close counted as {reason}"), || async {
                metric(
                    srv,
                    "sluice_connections_closed_total",
                    &[("reason", reason)],
                )
                .await
                    == 1.0
            })
            .await;
        }
    }
    assert_eq!(
        b.connections().len(),
        1,
        "only the header-less connection got through"
    );
}

/// Real HAProxy in front of sluice with `send-proxy-v2`: the client's own address (here
/// 127.0.0.2) reaches the backend, not HAProxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_real_haproxy_with_send_proxy_v2() {
    if !support::process::have("haproxy") {
        return;
    }
    let (server, b) = behind_lb("v2", "\"127.0.0.1\"").await;
    // Its own loopback address: HAProxy sets SO_REUSEPORT, so a port number reused on
    // 127.0.0.1 by a test running in parallel could share its connections.
    let port = std::net::TcpListener::bind("127.0.0.4:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.4:{port}\n  default_backend b\n\
             backend b\n  server s {} send-proxy-v2\n",
            edge(&server)
        ),
    )
    .unwrap();
    let _haproxy = support::process::Running(
        std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let front: std::net::SocketAddr = format!("127.0.0.4:{port}").parse().unwrap();
    let connect = || async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        sock.connect(front).await
    };
    let mut s = None;
    for _ in 0..100 {
        if let Ok(c) = connect().await {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = s.expect("haproxy listens");
    let client = s.local_addr().unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    let line = backend_first_line(&b, 0).await;
    assert!(
        line.starts_with(&format!(
            "PROXY TCP4 127.0.0.2 127.0.0.4 {} {port}",
            client.port()
        )),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------------
// Passive ejection.

async fn through(addr: std::net::SocketAddr) -> String {
    open_tunnel(addr).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_connect_failures_eject_a_backend_for_a_while() {
    let live = RawBackend::start("live", false).await;
    let dead = dead_address().await;
    let eject_time = Duration::from_secs(1);
    let server = simple(Simple {
        backends: vec![dead.to_string(), live.address.to_string()],
        retries: 1,
        pool_extra: "eject_after_failures = 2\neject_time = \"1s\"\nmax_ejected_percent = 50",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    let admin = server.admin_addr().unwrap();
    let refused = || {
        metric(
            &server,
            "sluice_upstream_connect_failures_total",
            &[("reason", "refused")],
        )
    };
    let dead_label = dead.to_string();
    let ejections = || async {
        metric(
            &server,
            "sluice_backend_ejections_total",
            &[("backend", &dead_label)],
        )
        .await
    };
    // Round robin tries the dead one on every other connection until it is ejected; the
    // retry hides every failure. Connections stop at the ejection, so the count is exact
    // however long each one takes.
    let mut ejected_after = None;
    for _ in 0..10 {
        let attempt = std::time::Instant::now();
        assert_eq!(through(addr).await, "live", "a retry hides every failure");
        if ejections().await == 1.0 {
            ejected_after = Some(attempt);
            break;
        }
    }
    let ejected_after = ejected_after.expect("two refused connects eject the backend");
    assert_eq!(refused().await, 2.0);
    let (_, pools) = http_get(admin, "/debug/pools").await;
    if ejected_after.elapsed() + Duration::from_millis(2) < eject_time {
        assert!(pools.contains("\"state\": \"ejected\""), "{pools}");
    }
    // After eject_time it is tried again (and, still dead, ejected again, for twice as long).
    eventually("the ejection ends", || async {
        !http_get(admin, "/debug/pools")
            .await
            .1
            .contains("\"state\": \"ejected\"")
    })
    .await;
    // (Ejection deadlines are kept in whole milliseconds: the end may come up to 1 ms early.)
    assert!(ejected_after.elapsed() + Duration::from_millis(1) >= eject_time);
    for _ in 0..6 {
        assert_eq!(through(addr).await, "live");
        if ejections().await == 2.0 {
            break;
        }
    }
    assert_eq!(ejections().await, 2.0);
    assert_eq!(refused().await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejected_percent_caps_ejection() {
    let live = RawBackend::start("live", false).await;
    let (d1, d2) = (dead_address().await, dead_address().await);
    let server = simple(Simple {
        backends: vec![d1.to_string(), d2.to_string(), live.address.to_string()],
        retries: 2,
        pool_extra: "eject_after_failures = 1\nmax_ejected_percent = 50",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    for _ in 0..9 {
        assert_eq!(through(addr).await, "live");
    }
    // One of three may be ejected (one always may); a second would be 67% > 50%.
    let mut ejected = 0.0;
    for d in [d1, d2] {
        ejected += metric(
            &server,
            "sluice_backend_ejections_total",
            &[("backend", &d.to_string())],
        )
        .await;
    }
    assert_eq!(ejected, 1.0);
    let refused = metric(
        &server,
        "sluice_upstream_connect_failures_total",
        &[("reason", "refused")],
    )
    .await;
    assert!(
        refused > 2.0,
        "the other dead backend is still tried: {refused}"
    );
}

/// A black-holed backend (SYNs unanswered): connect timeouts count like refusals, and once
/// ejected it no longer costs each new connection a connect_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_backend_is_ejected_after_timeouts() {
    let live = RawBackend::start("live", false).await;
    let (_hole, _fillers, hole) = black_hole().await;
    let server = simple(Simple {
        backends: vec![hole.to_string(), live.address.to_string()],
        retries: 1,
        pool_extra: "eject_after_failures = 1\nmax_ejected_percent = 50",
        ..Simple::default()
    })
    .await;
    let addr = edge(&server);
    // Round robin: one of the first two connections tries the hole first (500 ms
    // connect_timeout), then retries on the live one.
    let started = std::time::Instant::now();
    for _ in 0..2 {
        assert_eq!(through(addr).await, "live");
    }
    assert!(started.elapsed() >= Duration::from_millis(450));
    eventually("ejected", || async {
        metric(
            &server,
            "sluice_backend_ejections_total",
            &[("backend", &hole.to_string())],
        )
        .await
            == 1.0
    })
    .await;
    // Now every connection goes straight to the live backend: no further timeout.
    for _ in 0..4 {
        assert_eq!(through(addr).await, "live");
    }
    assert_eq!(
        metric(
            &server,
            "sluice_upstream_connect_failures_total",
            &[("reason", "timeout")]
        )
        .await,
        1.0
    );
}

/// A backend on a free port that greets each connection with "echo" and then hands it to
/// `serve` (`echo_backend`, `echo_later_backend`).
async fn greeting_backend<F, Fut>(serve: F) -> std::net::SocketAddr
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
async fn echo_backend() -> std::net::SocketAddr {
    greeting_backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A tunnel through sluice to an echo backend (`echo_backend`, `echo_later_backend`): its
/// greeting read and its hello echoed back whole.
async fn open_echoed_tunnel(server: &sluice::control::server::Server) -> TcpStream {
    let hello = tunnel_hello();
    let mut s = TcpStream::connect(edge(server)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(read_line(&mut s).await, "echo");
    let mut echoed = vec![0; hello.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello);
    s
}

fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_goes_through_pipes_and_arrives_exact_both_ways() {
    const TOTAL: usize = 24 << 20;
    let backend = echo_backend().await;
    let server = simple(Simple {
        backends: vec![backend.to_string()],
        ..Simple::default()
    })
    .await;
    let spliced_before = metric(&server, "sluice_relay_spliced_bytes_total", &[]).await;
    let s = open_echoed_tunnel(&server).await;

    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for chunk in (0..TOTAL).step_by(1 << 20) {
            w.write_all(&pattern(chunk, 1 << 20)).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = 0;
    let mut buf = vec![0; 256 << 10];
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n] == pattern(got, n)[..], "corrupt at byte {got}");
            got += n;
        }
    })
    .await
    .expect("the echo ended within 60 s");
    writer.await.unwrap();
    assert_eq!(got, TOTAL, "every byte came back, then EOF");
    let spliced = metric(&server, "sluice_relay_spliced_bytes_total", &[]).await - spliced_before;
    assert!(
        spliced >= (TOTAL / 2) as f64,
        "only {spliced} bytes were spliced of {} relayed",
        2 * TOTAL
    );
    closed_cleanly_once(&server).await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Parking: idle connections leave their task (see `src/edge/parking.rs`).

/// `[limits] park_idle_after` short enough for tests.
const PARK_FAST: &str = "[limits]\npark_idle_after = \"100ms\"";

/// Wait until `n` connections are parked.
async fn parked(server: &sluice::control::server::Server, n: f64) {
    eventually(&format!("{n} parked"), || async {
        metric(server, "sluice_relay_parked", &[]).await == n
    })
    .await;
}

/// A backend that says "echo", echoes what it gets, and answers "later" with "late" only
/// when the test releases it: by then the connection is parked, so only the backend's side
/// can wake it.
async fn echo_later_backend(release: std::sync::Arc<tokio::sync::Notify>) -> std::net::SocketAddr {
    greeting_backend(move |mut s| {
        let release = release.clone();
        async move {
            let mut buf = vec![0; 64 << 10];
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    let _ = s.shutdown().await;
                    return;
                }
                if &buf[..n] == b"later" {
                    release.notified().await;
                    s.write_all(b"late\n").await.unwrap();
                } else {
                    s.write_all(&buf[..n]).await.unwrap();
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_wakes_from_either_side_and_loses_nothing() {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let backend = echo_later_backend(release.clone()).await;
    let server = simple(Simple {
        backends: vec![backend.to_string()],
        top: PARK_FAST,
        ..Simple::default()
    })
    .await;
    let mut s = open_echoed_tunnel(&server).await;
    parked(&server, 1.0).await;

    // The client's side wakes it: 1 MiB echoed exactly (spliced or copied), then it parks
    // again.
    let data = pattern(0, 1 << 20);
    let (mut r, mut w) = s.split();
    let (_, got) = tokio::join!(async { w.write_all(&data).await.unwrap() }, async {
        let mut got = vec![0; data.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    });
    assert!(got == data, "the echo differs");
    eventually("parked a second time", || async {
        metric(&server, "sluice_relay_parks_total", &[]).await == 2.0
    })
    .await;

    // The backend's side wakes it: "later" wakes it and is passed on, it parks again while
    // the backend waits, and the backend's late answer wakes it once more.
    s.write_all(b"later").await.unwrap();
    eventually("parked while the backend waits", || async {
        metric(&server, "sluice_relay_parks_total", &[]).await == 3.0
    })
    .await;
    release.notify_one();
    assert_eq!(read_line(&mut s).await, "late");
    eventually("parked after the late answer", || async {
        metric(&server, "sluice_relay_parks_total", &[]).await == 4.0
    })
    .await;

    // A FIN while parked: passed on, and the backend's FIN comes back.
    s.shutdown().await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    closed_cleanly_once(&server).await;
    parked(&server, 0.0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_parks_and_its_open_side_still_flows() {
    backend_closes_first(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_still_times_out() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        idle: "1s",
        top: PARK_FAST,
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut s).await, "b");
    parked(&server, 1.0).await;
    // Closed by the lot's once-a-second sweep: between 1 s and 2 s of silence.
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(4)).await,
        Some(vec![])
    );
    assert_eq!(
        metric(
            &server,
            "sluice_connections_closed_total",
            &[("reason", "idle_timeout")]
        )
        .await,
        1.0
    );
    parked(&server, 0.0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_parked_connections_then_closes_them() {
    let backend = echo_backend().await;
    let server = simple(Simple {
        backends: vec![backend.to_string()],
        idle: "0s",
        top: &format!(
            "{PARK_FAST}\n[lifecycle]\ndrain_delay = \"0s\"\ndrain_timeout = \"1500ms\"\nclose_spread = \"0s\""
        ),
        ..Simple::default()
    })
    .await;
    let mut s = open_echoed_tunnel(&server).await;
    parked(&server, 1.0).await;

    let server = std::sync::Arc::new(server);
    let s2 = server.clone();
    let started = std::time::Instant::now();
    let drain = tokio::spawn(async move { s2.drain(std::future::pending(), true).await });
    // A parked connection has no task, yet the drain waits for it (drain_timeout, 1.5 s)...
    eventually("the listeners are closed", || async {
        server.rt.state() == sluice::control::runtime::State::Closing
    })
    .await;
    // (The registry read directly: the admin API stops when the drain ends.)
    assert_eq!(metric_after_stop(&server, "sluice_relay_parked", &[]), 1.0);
    let finished = drain.is_finished();
    if started.elapsed() < Duration::from_millis(1500) {
        assert!(!finished, "the drain ended with a tunnel open");
    }
    // ...and closes it when drain_timeout has passed.
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(4)).await,
        Some(vec![])
    );
    tokio::time::timeout(Duration::from_secs(4), drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        metric_after_stop(
            &server,
            "sluice_connections_closed_total",
            &[("reason", "shutdown")]
        ),
        1.0
    );
}
