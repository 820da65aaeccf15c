//! The PROXY protocol: the header sluice sends its backends (v2, with ALPN and SNI TLVs), and
//! inbound headers from a load balancer in front of sluice (v1, v2, LOCAL and UNKNOWN,
//! trusted senders, optional mode, every refusal counted), with real HAProxy in front.

mod support;

use std::time::Duration;

use sluice_core::hello::build;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Outbound PROXY protocol: the header sluice sends its backends.

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
