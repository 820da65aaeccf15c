//! Source-address access control (`allow`/`deny`) on a listener, a route, the admin API and
//! the heartbeat API's own listener: clients from distinct 127.0.0.x addresses (and behind a
//! trusted PROXY header) are refused before any byte reaches a backend, and counted.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send `first` (a PROXY header and/or a hello) from `source`; the backend's tag line, or ""
/// when sluice closes the connection.
async fn visit(source: Ipv4Addr, to: SocketAddr, first: &[u8]) -> String {
    let mut s = connect_from(source, to).await;
    s.write_all(first).await.unwrap();
    read_line(&mut s).await
}

fn hello(sni: &str) -> Vec<u8> {
    sluice_core::hello::build::hello(Some(sni), &["h2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_and_route_lists_refuse_sources_before_any_byte_is_relayed() {
    let (open, secret) = (
        RawBackend::start("open", false).await,
        RawBackend::start("secret", false).await,
    );
    let server = start(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
name = "edge"
address = "127.0.0.1:0"
allow = ["127.0.0.0/24", "127.0.9.0/24"]
deny = ["127.0.0.66"]

[[listener]]
name = "behind_lb"
address = "127.0.0.1:0"
accept_proxy = "v2"
trusted_proxies = ["127.0.0.1"]
allow = ["10.1.0.0/16"]

[[route]]
name = "secret"
sni = ["secret.example.com"]
allow = ["127.0.0.10", "10.1.2.3"]
pool = "secret"

[[route]]
name = "rest"
pool = "open"

[pool.open]
backends = ["{open}"]

[pool.secret]
backends = ["{secret}"]
"#,
        &[
            ("open", open.address.to_string()),
            ("secret", secret.address.to_string()),
        ],
    )
    .await;
    let edge = edge(&server);
    let ip = |d: u8| Ipv4Addr::new(127, 0, 0, d);
    assert_eq!(visit(ip(5), edge, &hello("www.example.com")).await, "open");
    // Outside `allow`, and inside `deny`: closed before the hello is even read.
    assert_eq!(
        visit(Ipv4Addr::new(127, 0, 1, 5), edge, &hello("www.example.com")).await,
        ""
    );
    assert_eq!(visit(ip(66), edge, &hello("www.example.com")).await, "");
    // The route's own list: only .10 reaches `secret`; .11 is refused, not sent elsewhere.
    assert_eq!(
        visit(ip(10), edge, &hello("secret.example.com")).await,
        "secret"
    );
    assert_eq!(visit(ip(11), edge, &hello("secret.example.com")).await, "");
    assert_eq!(
        open.connections().len(),
        1,
        "refused clients never reached a backend"
    );
    assert_eq!(secret.connections().len(), 1);

    // Behind a load balancer: the address in the trusted PROXY header is the one checked.
    let lb = server.listener_addr("behind_lb").unwrap();
    let proxied = |client: &str, sni: &str| {
        let mut first = sluice_core::proxy::encode(
            sluice_core::proxy::ProxyProtocol::V2,
            &sluice_core::proxy::HeaderInfo {
                client: client.parse().unwrap(),
                local: lb,
                alpn: None,
                sni: None,
            },
        )
        .unwrap()
        .unwrap();
        first.extend_from_slice(&hello(sni));
        first
    };
    assert_eq!(
        visit(ip(1), lb, &proxied("10.1.2.3:5000", "secret.example.com")).await,
        "secret"
    );
    assert_eq!(
        visit(ip(1), lb, &proxied("10.1.9.9:5000", "www.example.com")).await,
        "open"
    );
    assert_eq!(
        visit(ip(1), lb, &proxied("10.2.0.1:5000", "www.example.com")).await,
        ""
    );
    assert_eq!(
        visit(ip(1), lb, &proxied("10.1.9.9:5000", "secret.example.com")).await,
        ""
    );

    let denied = |scope: &'static str, name: &'static str| {
        let server = &server;
        async move {
            metric(
                server,
                "sluice_access_denied_total",
                &[("scope", scope), ("name", name)],
            )
            .await
        }
    };
    assert_eq!(denied("listener", "edge").await, 2.0);
    assert_eq!(denied("listener", "behind_lb").await, 1.0);
    assert_eq!(denied("route", "secret").await, 2.0);
    assert_eq!(
        metric(
            &server,
            "sluice_connections_closed_total",
            &[
                ("listener", "edge"),
                ("route", "secret"),
                ("reason", "denied")
            ]
        )
        .await,
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_allow_closes_other_sources_at_once() {
    let b = RawBackend::start("b", false).await;
    let server = start(
        &one_pool_config(
            "127.0.0.1:0",
            "",
            &format!("backends = [\"{}\"]", b.address),
        )
        .replace("[admin]", "[admin]\nallow = [\"127.0.0.2\"]"),
        &[],
    )
    .await;
    let admin = server.admin_addr().unwrap();
    // From 127.0.0.1: closed without an answer.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 1), admin).await;
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "closed at once");
    assert!(
        out.is_empty(),
        "no answer: {}",
        String::from_utf8_lossy(&out)
    );
    // From 127.0.0.2: served, and the refusal is counted.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), admin).await;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let scrape = Scrape::parse(text.split_once("\r\n\r\n").unwrap().1.to_owned());
    assert_eq!(
        scrape.value(
            "sluice_access_denied_total",
            &[("scope", "admin"), ("name", "admin")]
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_allow_closes_other_sources_on_the_api_listener() {
    let dir = support::secrets("acl-token-0123456789abc name=agents\n");
    let b = RawBackend::start("b", false).await;
    let top = format!(
        "[heartbeat]\naddress = \"127.0.0.1:0\"\nallow = [\"127.0.0.3\"]\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"\ntokens_file = \"{d}/tokens\"",
        d = dir.path().display()
    );
    let server = start(
        &one_pool_config(
            "127.0.0.1:0",
            &top,
            &format!("backends = [\"{}\"]", b.address),
        ),
        &[],
    )
    .await;
    let hb = server.heartbeat_addr().unwrap();
    // Refused: closed before the TLS handshake gets an answer.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 1), hb).await;
    let _ = s.write_all(&hello("sluice.test")).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok() && out.is_empty(), "closed without a byte");
    // Allowed: the API's TLS answers.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 3), hb).await;
    s.write_all(&hello("sluice.test")).await.unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    // A TLS record: the handshake, or an alert for this test's bare hello.
    assert!(matches!(first[0], 0x15 | 0x16), "a TLS record: {first:?}");
    assert_eq!(
        metric(
            &server,
            "sluice_access_denied_total",
            &[("scope", "heartbeat"), ("name", "heartbeat")]
        )
        .await,
        1.0
    );
    server.shutdown().await;
}
