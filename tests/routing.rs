//! Routing by the ClientHello, end to end on 127.0.0.1 with real TLS: ALPN and SNI, hellos
//! trickled byte by byte or split over records and segments, and the connections closed
//! before any backend is chosen (a slow, malformed or oversized hello, plain TCP without a
//! `tls = false` route).

mod support;

use std::time::Duration;

use sluice_core::hello::build;
use support::*;
use tokio::io::AsyncWriteExt;
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
    eventually("a close counted as hello_timeout", || async {
        closed(&server, "hello_timeout").await == 1.0
    })
    .await;
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

/// A host name with an empty label (`a.secret.example.com..`, `a..secret.example.com`) is
/// malformed: it reaches neither the wildcard route it would belong to nor the catch-all behind
/// it. One trailing dot is the same name and takes the wildcard route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_with_an_empty_label_never_falls_past_its_route() {
    let secret = RawBackend::start("secret", false).await;
    let rest = RawBackend::start("rest", false).await;
    let server = start(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "secret"
sni = ["*.secret.example.com"]
pool = "secret"

[[route]]
name = "rest"
pool = "rest"

[pool.secret]
backends = ["{secret}"]

[pool.rest]
backends = ["{rest}"]
"#,
        &[
            ("secret", secret.address.to_string()),
            ("rest", rest.address.to_string()),
        ],
    )
    .await;
    for name in [
        "a.secret.example.com..",
        "a..secret.example.com",
        ".secret.example.com",
    ] {
        let mut s = TcpStream::connect(edge(&server)).await.unwrap();
        s.write_all(&build::hello(Some(name), &["h2"]))
            .await
            .unwrap();
        assert_eq!(
            read_to_end(&mut s, Duration::from_secs(3)).await,
            Some(vec![]),
            "{name}"
        );
    }
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&build::hello(Some("a.secret.example.com."), &["h2"]))
        .await
        .unwrap();
    assert_eq!(read_line(&mut s).await, "secret");
    eventually("three malformed hellos counted", || async {
        metric(&server, "sluice_hello_total", &[("result", "malformed")]).await == 3.0
    })
    .await;
    assert!(
        rest.connections().is_empty(),
        "nothing fell to the catch-all"
    );
    assert_eq!(secret.connections().len(), 1);
    server.shutdown().await;
}
