//! QUIC passthrough with real quinn clients and servers on 127.0.0.1: the handshake is end to
//! end (the client sees the backend's own certificate), routing by SNI and by ALPN, a hello
//! spanning several Initial packets, a client that rebinds its socket, flow expiry, and a
//! malformed Initial dropped and counted.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::ServerName;
use sluice::control::server::Server;
use support::process::*;
use support::*;

/// A quinn endpoint on a loopback port with a fresh self-signed certificate for `cert_name`
/// (returned, DER, for the client to trust), offering `alpn`; `early_data` accepts 0-RTT.
fn quic_server(cert_name: &str, alpn: &[&str], early_data: bool) -> (quinn::Endpoint, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![cert_name.to_owned()]).unwrap();
    let der = ck.cert.der().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    tls.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    if early_data {
        // 0-RTT: QUIC requires the maximum early data size to be 0xffffffff.
        tls.max_early_data_size = u32::MAX;
    }
    let cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    (ep, der)
}

/// A quinn server that answers each bidirectional stream with `NAME:` and what it read.
async fn quic_backend(name: &'static str, cert_name: &str, alpn: &[&str]) -> (SocketAddr, Vec<u8>) {
    let (ep, der) = quic_server(cert_name, alpn, true);
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let data = recv.read_to_end(1 << 20).await.unwrap_or_default();
                        let mut out = format!("{name}:").into_bytes();
                        out.extend_from_slice(&data);
                        let _ = send.write_all(&out).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    (addr, der)
}

/// A quinn server that answers each bidirectional stream with the address it sees the
/// connection at: through sluice, the flow's own socket toward it. A datagram sluice put on
/// another flow's socket shows as the connection moving (quinn follows a connection by ID).
async fn addressed_backend() -> SocketAddr {
    let (ep, _) = quic_server("a.example.com", &["h3"], false);
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = recv.read_to_end(1 << 20).await;
                    let _ = send
                        .write_all(conn.remote_address().to_string().as_bytes())
                        .await;
                    let _ = send.finish();
                }
            });
        }
    });
    addr
}

/// A client whose connections send a keep-alive every 250 ms: an open connection's flow
/// never reaches sluice's 1 s `flow_idle_timeout`, however slowly the test runs, so flow
/// counts are exact; a closed one's flow expires.
fn client_config(tls: Arc<rustls::ClientConfig>) -> quinn::ClientConfig {
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(250)));
    cfg.transport_config(Arc::new(transport));
    cfg
}

fn client_endpoint(alpn: &[&str]) -> quinn::Endpoint {
    let tls = sluice::tls::testing::insecure_client_config(alpn);
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_config(tls));
    ep
}

async fn ask(conn: &quinn::Connection, what: &str) -> String {
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    send.write_all(what.as_bytes()).await.unwrap();
    send.finish().unwrap();
    let data = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8(data).unwrap()
}

async fn connect(ep: &quinn::Endpoint, to: SocketAddr, sni: &str) -> quinn::Connection {
    tokio::time::timeout(Duration::from_secs(5), ep.connect(to, sni).unwrap())
        .await
        .expect("handshake in time")
        .expect("handshake through sluice")
}

const CONFIG: &str = r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
name = "quic"
address = "127.0.0.1:0"
protocol = "quic"
flow_idle_timeout = "1s"
hello_timeout = "2s"

[[route]]
name = "by-sni"
listener = "quic"
sni = ["a.example.com"]
pool = "a"

[[route]]
name = "by-alpn"
listener = "quic"
alpn = ["proto-b"]
pool = "b"

[pool.a]
backends = ["{a}"]

[pool.b]
backends = ["{b}"]
"#;

async fn setup() -> (Server, SocketAddr, Vec<u8>, Vec<u8>) {
    let (a, a_cert) = quic_backend("A", "a.example.com", &["h3", "proto-b"]).await;
    let (b, b_cert) = quic_backend("B", "b.example.com", &["h3", "proto-b"]).await;
    let server = start(CONFIG, &[("a", a.to_string()), ("b", b.to_string())]).await;
    let edge = server
        .quic_addr("quic")
        .expect("the QUIC listener is bound");
    (server, edge, a_cert, b_cert)
}

fn peer_cert(conn: &quinn::Connection) -> Vec<u8> {
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    certs[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_sni_and_by_alpn_end_to_end() {
    let (server, edge, a_cert, b_cert) = setup().await;
    let ep = client_endpoint(&["h3"]);
    let conn = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&conn, "ping").await, "A:ping");
    assert_eq!(
        peer_cert(&conn),
        a_cert,
        "the client holds the backend's own certificate"
    );
    assert_eq!(
        ask(&conn, "again").await,
        "A:again",
        "a second stream, same flow"
    );

    let ep_b = client_endpoint(&["proto-b"]);
    let conn_b = connect(&ep_b, edge, "anything.example.net").await;
    assert_eq!(ask(&conn_b, "ping").await, "B:ping");
    assert_eq!(peer_cert(&conn_b), b_cert);

    let q = [("listener", "quic")];
    assert_eq!(
        metric(
            &server,
            "sluice_quic_initials_total",
            &[q[0], ("result", "ok")]
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &server,
            "sluice_quic_flows_total",
            &[q[0], ("route", "by-sni")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &server,
            "sluice_quic_flows_total",
            &[q[0], ("route", "by-alpn")]
        )
        .await,
        1.0
    );
    assert_eq!(metric(&server, "sluice_quic_flows_active", &q).await, 2.0);
    // /debug/listeners lists the QUIC listener with its flows.
    let (status, body) = http_get(server.admin_addr().unwrap(), "/debug/listeners").await;
    assert_eq!(status, 200);
    let views: serde_json::Value = serde_json::from_str(&body).unwrap();
    let quic = views
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["protocol"] == "quic")
        .unwrap_or_else(|| panic!("no QUIC listener in {body}"));
    assert_eq!(quic["bound"], edge.to_string());
    assert_eq!(quic["flows"], 2);
    assert_eq!(quic["accepting"], true);
    assert!(
        metric(
            &server,
            "sluice_quic_packets_total",
            &[q[0], ("direction", "to_client")]
        )
        .await
            > 2.0
    );

    // Unknown SNI and ALPN: no route; the client's handshake times out.
    let ep_c = client_endpoint(&["h3"]);
    let lost = tokio::time::timeout(
        Duration::from_secs(1),
        ep_c.connect(edge, "c.example.com").unwrap(),
    )
    .await;
    assert!(!matches!(lost, Ok(Ok(_))));
    assert!(
        metric(
            &server,
            "sluice_quic_initials_total",
            &[q[0], ("result", "no_route")]
        )
        .await
            >= 1.0
    );

    // Flows expire after flow_idle_timeout without datagrams.
    conn.close(0u32.into(), b"done");
    conn_b.close(0u32.into(), b"done");
    eventually("idle flows expire", || async {
        metric(&server, "sluice_quic_flows_active", &q).await == 0.0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_spanning_several_initials_is_routed() {
    let (server, edge, _, _) = setup().await;
    // 100 long ALPN names make a ClientHello of ~3 KB: three Initial packets.
    let names: Vec<String> = (0..100)
        .map(|i| format!("an-unusually-long-protocol-name-{i:03}"))
        .collect();
    let mut alpn: Vec<&str> = names.iter().map(String::as_str).collect();
    alpn.push("h3");
    let ep = client_endpoint(&alpn);
    let conn = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&conn, "big").await, "A:big");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_rebinds_its_socket_keeps_its_connection() {
    let (server, edge, _, _) = setup().await;
    let ep = client_endpoint(&["h3"]);
    let conn = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&conn, "before").await, "A:before");
    // A new local port: to sluice, a packet from a new address with a known connection ID.
    ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_eq!(ask(&conn, "after").await, "A:after");
    assert!(
        metric(
            &server,
            "sluice_quic_migrations_total",
            &[("listener", "quic")]
        )
        .await
            >= 1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_short_initials_are_dropped_and_counted() {
    let (server, edge, _, _) = setup().await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Long header, QUIC v1 Initial, 8-byte DCID, no token, a Length that fits, then garbage:
    // it cannot be decrypted.
    let initial = |len: usize| {
        let rest = (len - 18) as u16;
        let mut p = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0];
        p.extend_from_slice(&(0x4000 | rest).to_be_bytes());
        p.resize(len, 0x5a);
        p
    };
    sock.send_to(&initial(1200), edge).await.unwrap();
    // Unpadded (clients must pad Initials to 1200 bytes).
    sock.send_to(&initial(300), edge).await.unwrap();
    // A short header from nobody.
    sock.send_to(&[0x40, 1, 2, 3, 4, 5, 6, 7, 8, 9], edge)
        .await
        .unwrap();
    let q = ("listener", "quic");
    eventually("all three counted", || async {
        metric(
            &server,
            "sluice_quic_initials_total",
            &[q, ("result", "decrypt_failed")],
        )
        .await
            == 1.0
            && metric(
                &server,
                "sluice_quic_initials_total",
                &[q, ("result", "too_short")],
            )
            .await
                == 1.0
            && metric(
                &server,
                "sluice_quic_initials_total",
                &[q, ("result", "unknown_flow")],
            )
            .await
                == 1.0
    })
    .await;
    assert_eq!(metric(&server, "sluice_quic_flows_active", &[q]).await, 0.0);
    // A real client still gets through.
    let ep = client_endpoint(&["h3"]);
    let conn = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&conn, "ok").await, "A:ok");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_new_flows_and_keeps_established_ones() {
    let (a, _) = quic_backend("A", "a.example.com", &["h3"]).await;
    let (b, _) = quic_backend("B", "b.example.com", &["h3"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let write = |target: SocketAddr| {
        let text = CONFIG
            .replace("{a}", &target.to_string())
            .replace("{b}", &b.to_string());
        std::fs::write(&path, text).unwrap();
    };
    write(a);
    let server = Server::start(sluice::config::load(&path).unwrap())
        .await
        .unwrap();
    let edge = server.quic_addr("quic").unwrap();
    let ep = client_endpoint(&["h3"]);
    let old = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&old, "1").await, "A:1");
    // Pool `a` now points at B: new flows go there, the established one stays on A, on the
    // same socket (the listener's settings did not change).
    write(b);
    assert!(matches!(
        sluice::control::reload::reload(&server.rt, "test").await,
        sluice::control::reload::Outcome::Applied(_)
    ));
    assert_eq!(server.quic_addr("quic"), Some(edge));
    let ep2 = client_endpoint(&["h3"]);
    let new = connect(&ep2, edge, "a.example.com").await;
    assert_eq!(ask(&new, "2").await, "B:2");
    assert_eq!(ask(&old, "3").await, "A:3");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_bridges_each_stream_to_a_tcp_backend_behind_proxy_v2() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["t.example.com".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let tcp = RawBackend::start("tcp", false).await;
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
name = "quic"
address = "127.0.0.1:0"
protocol = "quic"

[[route]]
name = "term"
listener = "quic"
sni = ["t.example.com"]
alpn = ["agent-tunnel"]
pool = "tcp"
quic = "terminate"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"

[pool.tcp]
backends = ["{tcp}"]
proxy_protocol = "v2"
"#,
        d = dir.path().display(),
        tcp = tcp.address
    );
    let server = start(&config, &[]).await;
    let edge = server.quic_addr("quic").unwrap();
    let ep = client_endpoint(&["agent-tunnel"]);
    let conn = connect(&ep, edge, "t.example.com").await;
    assert_eq!(
        peer_cert(&conn),
        ck.cert.der().to_vec(),
        "sluice's own certificate"
    );
    assert_eq!(
        conn.handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol
            .as_deref(),
        Some(&b"agent-tunnel"[..])
    );
    for round in 1..=2usize {
        let answer = ask(&conn, "hello").await;
        let got = tcp.connections();
        assert_eq!(got.len(), round, "one TCP connection per stream");
        let header = ppp::v2::Header::try_from(got[round - 1].as_slice()).expect("PROXY v2 first");
        let ppp::v2::Addresses::IPv4(a) = header.addresses else {
            panic!("{:?}", header.addresses)
        };
        let client = ep.local_addr().unwrap();
        assert_eq!(
            (a.source_address, a.source_port),
            (std::net::Ipv4Addr::LOCALHOST, client.port())
        );
        assert!(got[round - 1].ends_with(b"hello"));
        assert_eq!(
            answer,
            format!("tcp\ntcp got {} bytes\n", got[round - 1].len())
        );
    }
    server.shutdown().await;
}

/// A terminated stream whose backend cannot be reached is reset with sluice's error code,
/// not finished as if the backend had answered nothing, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_stream_whose_backend_fails_is_reset_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["t.example.com".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let refused = support::dead_address().await;
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
name = "quic"
address = "127.0.0.1:0"
protocol = "quic"

[[route]]
name = "term"
listener = "quic"
sni = ["t.example.com"]
alpn = ["agent-tunnel"]
pool = "down"
quic = "terminate"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"

[pool.down]
backends = ["{refused}"]
retries = 0
"#,
        d = dir.path().display(),
    );
    let server = start(&config, &[]).await;
    let ep = client_endpoint(&["agent-tunnel"]);
    let conn = connect(&ep, server.quic_addr("quic").unwrap(), "t.example.com").await;
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    send.write_all(b"hello").await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .expect("an end in time");
    match read {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => assert_eq!(
            code.into_inner(),
            u64::from(sluice::quic::terminate::RESET_BACKEND_UNAVAILABLE)
        ),
        other => panic!("expected a reset, got {other:?}"),
    }
    eventually("the reset counted", || async {
        metric(
            &server,
            "sluice_quic_stream_resets_total",
            &[("route", "term"), ("reason", "backend_unavailable")],
        )
        .await
            == 1.0
    })
    .await;
    server.shutdown().await;
}

/// rustls' in-memory session store, which says when a TLS 1.3 ticket arrives.
#[derive(Debug)]
struct TicketStore {
    inner: rustls::client::ClientSessionMemoryCache,
    arrived: tokio::sync::Notify,
}

impl TicketStore {
    fn new() -> Arc<TicketStore> {
        Arc::new(TicketStore {
            inner: rustls::client::ClientSessionMemoryCache::new(8),
            arrived: tokio::sync::Notify::new(),
        })
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }
    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(name, value)
    }
    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(name, value);
        self.arrived.notify_one();
    }
    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_on_resumption_passes_through() {
    let (server, edge, _, _) = setup().await;
    let mut tls = (*sluice::tls::testing::insecure_client_config(&["h3"])).clone();
    tls.enable_early_data = true;
    let tickets = TicketStore::new();
    tls.resumption = rustls::client::Resumption::store(tickets.clone());
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_config(Arc::new(tls)));
    // A first connection leaves a session ticket with the client.
    let first = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&first, "1").await, "A:1");
    tokio::time::timeout(Duration::from_secs(5), tickets.arrived.notified())
        .await
        .expect("the server sent a session ticket");
    first.close(0u32.into(), b"bye");
    // The second sends its request in 0-RTT packets, before the handshake completes: they
    // reach the flow while its hello is pending, or just after, and pass through.
    let connecting = ep.connect(edge, "a.example.com").unwrap();
    let (conn, accepted) = connecting
        .into_0rtt()
        .expect("the client resumes with 0-RTT");
    let answer = ask(&conn, "early").await;
    assert_eq!(answer, "A:early");
    assert!(accepted.await, "the server accepted the 0-RTT data");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_sharing_one_client_socket_are_routed_each_on_its_own() {
    let (server, edge, _, _) = setup().await;
    // One quinn endpoint (one UDP socket), two connections routed to different pools.
    let ep = client_endpoint(&["h3"]);
    let to_a = connect(&ep, edge, "a.example.com").await;
    let tls_b = sluice::tls::testing::insecure_client_config(&["proto-b"]);
    let cfg_b = client_config(tls_b);
    let to_b = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect_with(cfg_b, edge, "b.example.com").unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    for i in 0..3 {
        assert_eq!(ask(&to_a, &i.to_string()).await, format!("A:{i}"));
        assert_eq!(ask(&to_b, &i.to_string()).await, format!("B:{i}"));
    }
    assert_eq!(
        metric(&server, "sluice_quic_flows_active", &[("listener", "quic")]).await,
        2.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_refuses_new_flows_and_waits_for_established_ones() {
    let (server, edge, _, _) = setup().await;
    let ep = client_endpoint(&["h3"]);
    let conn = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&conn, "1").await, "A:1");
    let server = Arc::new(server);
    let s2 = server.clone();
    let drained = tokio::spawn(async move { s2.drain(std::future::pending(), false).await });
    // A refused Initial is dropped, so the client only sees a timeout; what proves the
    // refusal (not a slow handshake) is sluice counting this attempt's Initial as `draining`.
    let refused = || async {
        metric(
            &server,
            "sluice_quic_initials_total",
            &[("listener", "quic"), ("result", "draining")],
        )
        .await
    };
    eventually("the listener refuses new flows", || async {
        let before = refused().await;
        let ep2 = client_endpoint(&["h3"]);
        let c = tokio::time::timeout(
            Duration::from_secs(1),
            ep2.connect(edge, "a.example.com").unwrap(),
        )
        .await;
        !matches!(c, Ok(Ok(_))) && refused().await > before
    })
    .await;
    // The established flow still works, and the drain waits for it.
    assert_eq!(ask(&conn, "2").await, "A:2");
    assert!(!drained.is_finished());
    conn.close(0u32.into(), b"bye");
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the drain ends once the flow is idle")
        .unwrap();
}

/// A one-client UDP NAT: the client talks to `front`; datagrams go on to `to` from a back
/// socket that `rebind` replaces (a new source port, as a NAT rebinding gives).
struct Nat {
    front: Arc<tokio::net::UdpSocket>,
    back: Arc<std::sync::Mutex<Arc<tokio::net::UdpSocket>>>,
    client: Arc<std::sync::Mutex<Option<SocketAddr>>>,
}

impl Nat {
    async fn start(to: SocketAddr) -> Nat {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let nat = Nat {
            front: front.clone(),
            back: Arc::new(std::sync::Mutex::new(Arc::new(
                tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            ))),
            client: Arc::new(std::sync::Mutex::new(None)),
        };
        nat.spawn_back_reader();
        let (back, client) = (nat.back.clone(), nat.client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                let b = back.lock().unwrap().clone();
                let _ = b.send_to(&buf[..n], to).await;
            }
        });
        nat
    }

    fn spawn_back_reader(&self) {
        let back = self.back.lock().unwrap().clone();
        let (front, client) = (self.front.clone(), self.client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }

    async fn rebind(&self) {
        let fresh = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        *self.back.lock().unwrap() = fresh;
        self.spawn_back_reader();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nat_rebinding_is_followed_by_connection_id() {
    let (server, edge, _, _) = setup().await;
    // Another flow from 127.0.0.1, so that only the connection ID can tell who moved.
    let other = client_endpoint(&["proto-b"]);
    let other_conn = connect(&other, edge, "b.example.com").await;
    let nat = Nat::start(edge).await;
    let ep = client_endpoint(&["h3"]);
    let conn = connect(&ep, nat.front.local_addr().unwrap(), "a.example.com").await;
    assert_eq!(ask(&conn, "before").await, "A:before");
    nat.rebind().await;
    // The client does not know it moved: same connection ID, new source port.
    assert_eq!(ask(&conn, "after").await, "A:after");
    assert_eq!(ask(&other_conn, "still").await, "B:still");
    assert!(
        metric(
            &server,
            "sluice_quic_migrations_total",
            &[("listener", "quic")]
        )
        .await
            >= 1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_incomplete_hellos_is_capped() {
    let (a, _) = quic_backend("A", "a.example.com", &["h3"]).await;
    let (b, _) = quic_backend("B", "b.example.com", &["h3"]).await;
    let config = CONFIG.replace(
        "hello_timeout = \"2s\"",
        "hello_timeout = \"1s\"\nmax_pending_flows = 4",
    );
    let server = start(&config, &[("a", a.to_string()), ("b", b.to_string())]).await;
    let edge = server.quic_addr("quic").unwrap();
    // The first 1000 bytes of a 3 KB hello, from 10 addresses: 4 wait, 6 are refused.
    let names: Vec<String> = (0..100)
        .map(|i| format!("an-unusually-long-protocol-name-{i:03}"))
        .collect();
    let alpn: Vec<&str> = names.iter().map(String::as_str).collect();
    let hello = sluice_core::hello::build::hello(Some("a.example.com"), &alpn);
    let mut socks = Vec::new();
    for i in 0..10u8 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let pkt = sluice_core::quic::packet::build_initial(
            sluice_core::quic::packet::V1,
            &[i; 8],
            &[],
            0,
            0,
            &hello[5..1005],
        );
        s.send_to(&pkt, edge).await.unwrap();
        socks.push(s);
    }
    let q = ("listener", "quic");
    eventually("6 refused", || async {
        metric(
            &server,
            "sluice_quic_initials_total",
            &[q, ("result", "pending_full")],
        )
        .await
            == 6.0
    })
    .await;
    // They time out after hello_timeout; then a real client gets through.
    eventually("the 4 pending time out", || async {
        metric(
            &server,
            "sluice_quic_initials_total",
            &[q, ("result", "timeout")],
        )
        .await
            == 4.0
    })
    .await;
    let ep = client_endpoint(&["h3"]);
    let conn = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&conn, "ok").await, "A:ok");
    server.shutdown().await;
}

/// `max_flows`: a client past the cap is refused (its Initial counted as `table_full`), the
/// flows already in the table keep working, and a slot freed by an expired flow is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_flows_refuses_new_flows_past_the_cap() {
    let (a, _) = quic_backend("A", "a.example.com", &["h3", "proto-b"]).await;
    let (b, _) = quic_backend("B", "b.example.com", &["h3", "proto-b"]).await;
    let config = CONFIG.replace(
        "flow_idle_timeout = \"1s\"",
        "flow_idle_timeout = \"1s\"\nmax_flows = 1",
    );
    assert!(config.contains("max_flows = 1"));
    let server = start(&config, &[("a", a.to_string()), ("b", b.to_string())]).await;
    let edge = server.quic_addr("quic").unwrap();
    let ep = client_endpoint(&["h3"]);
    let first = connect(&ep, edge, "a.example.com").await;
    assert_eq!(ask(&first, "1").await, "A:1");

    let full = || async {
        metric(
            &server,
            "sluice_quic_initials_total",
            &[("listener", "quic"), ("result", "table_full")],
        )
        .await
    };
    let second_ep = client_endpoint(&["h3"]);
    let before = full().await;
    let refused = tokio::time::timeout(
        Duration::from_secs(1),
        second_ep.connect(edge, "a.example.com").unwrap(),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a second flow past max_flows = 1"
    );
    assert!(
        full().await > before,
        "the refusal is counted as table_full"
    );
    assert_eq!(
        ask(&first, "2").await,
        "A:2",
        "the flow in the table still works"
    );

    // The first flow ends and expires after flow_idle_timeout: a new client gets its slot.
    first.close(0u32.into(), b"done");
    eventually("the closed flow expires", || async {
        metric(&server, "sluice_quic_flows_active", &[("listener", "quic")]).await == 0.0
    })
    .await;
    let third = connect(&client_endpoint(&["h3"]), edge, "a.example.com").await;
    assert_eq!(ask(&third, "3").await, "A:3");
    server.shutdown().await;
}

/// QUIC v2 (RFC 9369) end to end: a v2 Initial, built and sealed as a client does, is routed
/// by the SNI inside it and passed on byte for byte; the backend's answer comes back to the
/// client's address. (quinn speaks only v1, so the client here is a UDP socket.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_v2_initials_are_routed_and_relayed_both_ways() {
    use sluice_core::quic::packet::{build_initial, V2};
    let backend_a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = start(
        CONFIG,
        &[
            ("a", backend_a.local_addr().unwrap().to_string()),
            ("b", backend_b.local_addr().unwrap().to_string()),
        ],
    )
    .await;
    let edge = server.quic_addr("quic").unwrap();
    let hello = sluice_core::hello::build::hello(Some("a.example.com"), &["h3"]);
    let initial = build_initial(V2, &[0x42; 8], &[7, 7, 7, 7], 0, 0, &hello[5..]);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&initial, edge).await.unwrap();

    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), backend_a.recv_from(&mut buf))
        .await
        .expect("the v2 Initial reaches the backend of a.example.com")
        .unwrap();
    assert_eq!(&buf[..n], &initial[..], "forwarded unchanged");
    backend_a.send_to(b"from A", from).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("the backend's answer reaches the client")
        .unwrap();
    assert_eq!(&buf[..n], b"from A");
    let q = ("listener", "quic");
    assert_eq!(
        metric(
            &server,
            "sluice_quic_flows_total",
            &[q, ("route", "by-sni")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &server,
            "sluice_quic_bytes_total",
            &[q, ("direction", "from_client")]
        )
        .await,
        initial.len() as f64
    );
    assert_eq!(
        metric(
            &server,
            "sluice_quic_bytes_total",
            &[q, ("direction", "to_client")]
        )
        .await,
        6.0
    );
    server.shutdown().await;
}

/// `allow`/`deny` on a QUIC listener and on a route: a refused source's Initials are dropped
/// and counted; an allowed one connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sources_get_no_flow() {
    let (a, _) = quic_backend("A", "a.example.com", &["h3", "proto-b"]).await;
    let (b, _) = quic_backend("B", "b.example.com", &["h3", "proto-b"]).await;
    let config = CONFIG
        .replace(
            "hello_timeout = \"2s\"",
            "hello_timeout = \"2s\"\ndeny = [\"127.0.0.9\"]",
        )
        .replace(
            "sni = [\"a.example.com\"]",
            "sni = [\"a.example.com\"]\nallow = [\"127.0.0.1\"]",
        );
    let server = start(&config, &[("a", a.to_string()), ("b", b.to_string())]).await;
    let edge = server.quic_addr("quic").unwrap();
    let from = |ip: &str| {
        let tls = sluice::tls::testing::insecure_client_config(&["h3"]);
        let mut ep = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
        ep.set_default_client_config(client_config(tls));
        ep
    };
    let ok = connect(&from("127.0.0.1"), edge, "a.example.com").await;
    assert_eq!(ask(&ok, "1").await, "A:1");
    for (ip, scope, name) in [
        ("127.0.0.9", "listener", "quic"),
        ("127.0.0.5", "route", "by-sni"),
    ] {
        let refused = tokio::time::timeout(
            Duration::from_secs(1),
            from(ip).connect(edge, "a.example.com").unwrap(),
        )
        .await;
        assert!(!matches!(refused, Ok(Ok(_))), "{ip} got a flow");
        assert!(
            metric(
                &server,
                "sluice_access_denied_total",
                &[("scope", scope), ("name", name)]
            )
            .await
                >= 1.0,
            "{ip}: counted under {scope} {name}"
        );
    }
    assert!(
        metric(
            &server,
            "sluice_quic_initials_total",
            &[("listener", "quic"), ("result", "denied")]
        )
        .await
            >= 2.0
    );
    server.shutdown().await;
}

/// Everything logged, as JSON lines (the process's subscriber; nextest runs each test in its
/// own process).
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A QUIC flow gets one access-log line when it ends, as a TCP connection does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_flow_has_an_access_log_line() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        return; // another test of this process took the subscriber (plain `cargo test`)
    }
    let (server, edge, _, _) = setup().await;
    let conn = connect(&client_endpoint(&["h3"]), edge, "a.example.com").await;
    assert_eq!(ask(&conn, "hello").await, "A:hello");
    conn.close(0u32.into(), b"done");
    // flow_idle_timeout is 1 s: the flow expires and is logged.
    let line = || {
        let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains("\"protocol\":\"quic\""))
            .map(str::to_owned)
            .next()
    };
    eventually("the flow's access-log line", || async { line().is_some() }).await;
    let v: serde_json::Value = serde_json::from_str(&line().unwrap()).unwrap();
    assert_eq!(v["target"], "sluice::access", "{v}");
    assert_eq!(v["listener"], "quic");
    assert_eq!(v["sni"], "a.example.com");
    assert_eq!(v["alpn"], "h3");
    assert_eq!(v["route"], "by-sni");
    assert_eq!(v["pool"], "a");
    assert_eq!(v["end"], "idle_timeout");
    assert!(v["bytes_to_backend"].as_u64().unwrap() > 1200, "{v}");
    assert!(v["bytes_to_client"].as_u64().unwrap() > 0, "{v}");
    assert!(v["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    server.shutdown().await;
}

/// Batching never reorders a flow: 3,000 numbered datagrams each way, sent in GSO bursts
/// (and one by one between them), arrive in the order they were sent, whatever sluice read
/// or sent them with (recvmmsg, GRO, GSO). UDP may drop some under load; none may overtake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_keeps_each_flows_datagrams_in_order_both_ways() {
    use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
    use sluice_core::quic::packet::{build_initial, V1};
    use std::io::IoSliceMut;

    const N: u32 = 3000;
    const SIZE: usize = 1200;
    const DCID: [u8; 8] = [0x42; 8];
    let backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = start(
        &CONFIG.replace("flow_idle_timeout = \"1s\"", "flow_idle_timeout = \"30s\""),
        &[
            ("a", backend.local_addr().unwrap().to_string()),
            ("b", other.local_addr().unwrap().to_string()),
        ],
    )
    .await;
    let edge = server.quic_addr("quic").unwrap();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (cs, bs) = (
        UdpSocketState::new(UdpSockRef::from(&client)).unwrap(),
        UdpSocketState::new(UdpSockRef::from(&backend)).unwrap(),
    );
    // A datagram of the flow: a short header with the flow's DCID (or, from the backend, any
    // first byte), then its number.
    let numbered = |i: u32| {
        let mut d = vec![0x40u8];
        d.extend_from_slice(&DCID);
        d.extend_from_slice(&i.to_be_bytes());
        d.resize(SIZE, 0xab);
        d
    };
    let number = |d: &[u8]| u32::from_be_bytes(d[9..13].try_into().unwrap());
    // Sends 0..N to `to`: bursts of up to 16 segments in one GSO sendmsg, and single ones.
    async fn send_all(
        sock: &tokio::net::UdpSocket,
        state: &UdpSocketState,
        to: SocketAddr,
        numbered: &dyn Fn(u32) -> Vec<u8>,
    ) {
        let mut i = 0;
        while i < N {
            let burst = if i % 3 == 0 { 1 } else { 16.min(N - i) };
            let contents: Vec<u8> = (i..i + burst).flat_map(numbered).collect();
            let t = Transmit {
                destination: to,
                ecn: None,
                contents: &contents,
                segment_size: (burst > 1).then_some(SIZE),
                src_ip: None,
            };
            loop {
                sock.writable().await.unwrap();
                match sock.try_io(tokio::io::Interest::WRITABLE, || {
                    state.try_send(UdpSockRef::from(sock), &t)
                }) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("send: {e}"),
                }
            }
            i += burst;
            // Paced, so that sluice and the receiver keep up most of the time.
            if i % 64 < burst {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    // Reads datagrams (split at GRO boundaries) until `last` or a quiet second; their
    // numbers and where the last read came from.
    async fn receive(
        sock: &tokio::net::UdpSocket,
        state: &UdpSocketState,
        number: &dyn Fn(&[u8]) -> u32,
    ) -> (Vec<u32>, Option<SocketAddr>) {
        let mut buf = vec![0u8; 65535];
        let mut seen = Vec::new();
        let mut from = None;
        loop {
            let mut meta = [RecvMeta::default()];
            let got = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    sock.readable().await.unwrap();
                    let r = sock.try_io(tokio::io::Interest::READABLE, || {
                        state.recv(
                            UdpSockRef::from(sock),
                            &mut [IoSliceMut::new(&mut buf)],
                            &mut meta,
                        )
                    });
                    if r.is_ok() {
                        return;
                    }
                }
            })
            .await;
            if got.is_err() {
                return (seen, from);
            }
            from = Some(meta[0].addr);
            let stride = if meta[0].stride == 0 {
                meta[0].len
            } else {
                meta[0].stride
            };
            for d in buf[..meta[0].len].chunks(stride) {
                if d.len() >= 13 && d[0] == 0x40 {
                    seen.push(number(d));
                }
            }
            if seen.last() == Some(&(N - 1)) {
                return (seen, from);
            }
        }
    }
    let in_order = |what: &str, seen: &[u32]| {
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{what}: reordered: {:?}",
            seen.windows(2).find(|w| w[0] >= w[1])
        );
        assert!(
            seen.len() as u32 >= N / 2,
            "{what}: only {} of {N} arrived",
            seen.len()
        );
    };

    let hello = sluice_core::hello::build::hello(Some("a.example.com"), &["h3"]);
    let initial = build_initial(V1, &DCID, &[7, 7, 7, 7], 0, 0, &hello[5..]);
    client.send_to(&initial, edge).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (_, flow_socket) =
        tokio::time::timeout(Duration::from_secs(5), backend.recv_from(&mut buf))
            .await
            .expect("the Initial reaches the backend")
            .unwrap();

    let (up, down) = tokio::join!(
        async {
            send_all(&client, &cs, edge, &numbered).await;
        },
        receive(&backend, &bs, &number),
    );
    let ((), (seen, from)) = (up, down);
    assert_eq!(from, Some(flow_socket), "one flow socket carried them");
    in_order("client to backend", &seen);

    let ((), (seen, _)) = tokio::join!(
        send_all(&backend, &bs, flow_socket, &numbered),
        receive(&client, &cs, &number),
    );
    in_order("backend to client", &seen);
    server.shutdown().await;
}

/// A running `sluice` binary with a QUIC listener on a known port and an upgrade socket,
/// for the binary-upgrade tests.
struct Upgradable {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    edge: SocketAddr,
    admin: SocketAddr,
    old: Running,
    old_log: Log,
}

impl Upgradable {
    async fn start(backend: SocketAddr) -> Upgradable {
        let port = free_udp_address("127.0.0.1").port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        let config = format!(
            r#"
[admin]
address = "127.0.0.1:0"

[lifecycle]
upgrade_socket = "{sock}"
drain_delay = "0s"
drain_timeout = "30s"

[reload]
watch = false

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[listener]]
name = "quic"
address = "127.0.0.1:{port}"
protocol = "quic"
flow_idle_timeout = "1s"

[[route]]
name = "tcp"
listener = "edge"
sni = ["tcp.example.com"]
pool = "tcp"

[[route]]
name = "a"
listener = "quic"
sni = ["a.example.com"]
pool = "a"

[pool.tcp]
backends = ["{dead}"]

[pool.a]
backends = ["{backend}"]
"#,
            sock = dir.path().join("upgrade.sock").display(),
            dead = dead_address().await,
        );
        std::fs::write(&path, config).unwrap();
        let mut old = sluice_run(&path, &[]);
        let (_, admin, old_log) = bound_addresses(&mut old);
        Upgradable {
            edge: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: admin.parse().unwrap(),
            _dir: dir,
            path,
            old,
            old_log,
        }
    }

    /// `sluice run --upgrade`: returns once the new process serves and the old one has
    /// stopped reading the QUIC socket. Blocks its thread while it waits: the runtime's other
    /// worker keeps the test's QUIC connections alive meanwhile.
    fn upgrade(&self) -> (Running, Log) {
        let (new, new_log) = self.upgrade_started();
        let wait = Duration::from_secs(10);
        tokio::task::block_in_place(|| {
            self.old_log
                .wait_for("the new process reads the QUIC socket", wait);
            new_log.wait_for("using an inherited UDP socket", wait);
        });
        (new, new_log)
    }

    /// `sluice run --upgrade`, until the old process has handed its sockets over.
    fn upgrade_started(&self) -> (Running, Log) {
        tokio::task::block_in_place(|| {
            let mut new = sluice_run(&self.path, &["--upgrade"]);
            let (_, admin, new_log) = bound_addresses(&mut new);
            assert_eq!(
                admin,
                self.admin.to_string(),
                "the admin socket is handed over too"
            );
            self.old_log.wait_for(
                "a new sluice took over the sockets",
                Duration::from_secs(10),
            );
            (new, new_log)
        })
    }
}

/// A binary upgrade (`sluice run --upgrade`, the real binary twice) keeps QUIC flows: the new
/// process takes the UDP socket over, the old one serves its established flow with the
/// datagrams the new one asks it about until the flow is idle, then exits; new flows are the
/// new process's. Flows of one address in both processes are never mixed up: a second client
/// from the same IP, and a second connection from the very socket of the old flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_keeps_established_quic_flows() {
    let mut u = Upgradable::start(addressed_backend().await).await;
    let ep = client_endpoint(&["h3"]);
    let established = connect(&ep, u.edge, "a.example.com").await;
    // The backend sees each flow at its own socket of sluice's: it never changes.
    let old_flow = ask(&established, "before").await;

    let (mut new, new_log) = u.upgrade();
    for _ in 0..10 {
        assert_eq!(ask(&established, "during").await, old_flow);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New connections are the new process's: one from another socket of the same IP, one
    // from the old flow's own socket (same address, another connection).
    let fresh = connect(&client_endpoint(&["h3"]), u.edge, "a.example.com").await;
    let same_socket = connect(&ep, u.edge, "a.example.com").await;
    let flows = [
        ask(&established, "x").await,
        ask(&fresh, "x").await,
        ask(&same_socket, "x").await,
    ];
    assert_eq!(flows[0], old_flow);
    assert!(
        flows[0] != flows[1] && flows[1] != flows[2] && flows[0] != flows[2],
        "{flows:?}"
    );
    for _ in 0..10 {
        for (conn, flow) in [&established, &fresh, &same_socket].into_iter().zip(&flows) {
            assert_eq!(
                &ask(conn, "x").await,
                flow,
                "each connection keeps its own flow"
            );
        }
    }
    let crossed = |direction| {
        let admin = u.admin;
        async move {
            scrape(admin).await.sum(
                "sluice_quic_handover_datagrams_total",
                &[("listener", "quic"), ("direction", direction)],
            )
        }
    };
    // At least a datagram for each of the old connection's 21 streams since the upgrade;
    // the new connections' first Initials were asked about too, and sent back.
    let asked = crossed("sent").await;
    assert!(asked >= 21.0, "datagrams asked about across: {asked}");
    let returned = crossed("returned").await;
    assert!(returned >= 2.0, "datagrams sent back: {returned}");
    assert_eq!(crossed("dropped").await, 0.0);
    assert!(
        u.old.try_wait().unwrap().is_none(),
        "the old process waits for its flow"
    );

    // Once its flow is idle, the old process exits; the new one serves on alone.
    established.close(0u32.into(), b"done");
    let status = exits(&mut u.old, Duration::from_secs(20)).await;
    assert!(status.success(), "old process exit: {status:?}");
    assert_eq!(ask(&fresh, "after").await, flows[1]);
    assert_eq!(ask(&same_socket, "after").await, flows[2]);
    let old_log = u.old_log.join().unwrap();
    assert!(!old_log.contains("malformed message"), "{old_log}");
    fresh.close(0u32.into(), b"done");
    same_socket.close(0u32.into(), b"done");
    signal(new.id(), "TERM");
    assert!(exits(&mut new, Duration::from_secs(20)).await.success());
    assert!(new_log.join().unwrap().contains("upgrade complete"));
}

/// An upgrade whose config moves the QUIC listener: the new process binds the new address
/// and drops its end of the pair, so the old one keeps reading its socket for its flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_quic_listener_leaves_the_old_process_reading() {
    let (a, _) = quic_backend("A", "a.example.com", &["h3"]).await;
    let mut u = Upgradable::start(a).await;
    let established = connect(&client_endpoint(&["h3"]), u.edge, "a.example.com").await;
    let moved = free_udp_address("127.0.0.1");
    let text = std::fs::read_to_string(&u.path).unwrap();
    let text = text.replace(&u.edge.to_string(), &moved.to_string());
    std::fs::write(&u.path, text).unwrap();
    let (mut new, new_log) = u.upgrade_started();
    tokio::task::block_in_place(|| {
        new_log.wait_for("not taking this QUIC socket over", Duration::from_secs(5))
    });
    for i in 0..5 {
        let what = format!("kept-{i}");
        assert_eq!(ask(&established, &what).await, format!("A:{what}"));
    }
    let fresh = connect(&client_endpoint(&["h3"]), moved, "a.example.com").await;
    assert_eq!(ask(&fresh, "moved").await, "A:moved");
    established.close(0u32.into(), b"done");
    fresh.close(0u32.into(), b"done");
    assert!(exits(&mut u.old, Duration::from_secs(20)).await.success());
    signal(new.id(), "TERM");
    assert!(exits(&mut new, Duration::from_secs(20)).await.success());
}

/// If the new process dies after taking over, the old one sees the socket pair close, reads
/// the QUIC socket again and its flows go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_process_reads_again_when_the_new_one_dies() {
    let (a, _) = quic_backend("A", "a.example.com", &["h3"]).await;
    let mut u = Upgradable::start(a).await;
    let established = connect(&client_endpoint(&["h3"]), u.edge, "a.example.com").await;
    let (mut new, _new_log) = u.upgrade();
    assert_eq!(ask(&established, "across").await, "A:across");
    signal(new.id(), "KILL");
    let _ = exits(&mut new, Duration::from_secs(10)).await;
    tokio::task::block_in_place(|| {
        u.old_log
            .wait_for("reading the QUIC socket again", Duration::from_secs(10))
    });
    for i in 0..5 {
        let what = format!("alone-{i}");
        assert_eq!(ask(&established, &what).await, format!("A:{what}"));
    }
    established.close(0u32.into(), b"done");
    let status = exits(&mut u.old, Duration::from_secs(20)).await;
    assert!(status.success(), "old process exit: {status:?}");
}

/// `exits_within` without blocking the runtime's thread (the test's QUIC clients run on it).
async fn exits(child: &mut Running, limit: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process still running after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
