//! Active health checks against real backends on 127.0.0.1: a backend killed and revived, TLS
//! with ALPN, HTTP over TLS, HTTP/2 (h2c), and what happens when every backend is unhealthy.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sluice_core::hello::build;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn conf(backends: &[SocketAddr], pool_extra: &str) -> String {
    let list = quoted(backends);
    one_pool_config(
        "127.0.0.1:0",
        "",
        &format!("backends = [{list}]\nbalance = \"round_robin\"\nretries = 0\n{pool_extra}"),
    )
}

/// `sluice_backend_healthy` of one backend; `None` before its first verdict.
async fn healthy(server: &sluice::control::server::Server, backend: SocketAddr) -> Option<f64> {
    scrape(server.admin_addr().unwrap()).await.get(
        "sluice_backend_healthy",
        &[("pool", "p"), ("backend", &backend.to_string())],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_gets_no_new_connections_and_keeps_its_tunnels_until_it_is_back() {
    let mut a = Flaky::start("A", "127.0.0.1:0").await;
    let b = Flaky::start("B", "127.0.0.1:0").await;
    let server = start(
        &conf(
            &[a.address, b.address],
            "[pool.p.health]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\njitter = \"0s\"\nrise = 2\nfall = 2",
        ),
        &[],
    )
    .await;
    let addr = edge(&server);
    eventually("both healthy", || async {
        healthy(&server, a.address).await == Some(1.0)
            && healthy(&server, b.address).await == Some(1.0)
    })
    .await;
    // A tunnel through A.
    let mut tunnel = None;
    for _ in 0..4 {
        let (s, name) = open_tunnel(addr).await;
        if name == "A" {
            tunnel = Some(s);
            break;
        }
    }
    let mut tunnel = tunnel.expect("round robin reaches A");

    a.kill_listener().await;
    eventually("A unhealthy", || async {
        healthy(&server, a.address).await == Some(0.0)
    })
    .await;
    for _ in 0..8 {
        assert_eq!(
            open_tunnel(addr).await.1,
            "B",
            "an unhealthy backend takes no new connection"
        );
    }
    let (_, pools) = http_get(server.admin_addr().unwrap(), "/debug/pools").await;
    assert!(pools.contains("\"state\": \"unhealthy\""), "{pools}");
    // The check did not cut the tunnel.
    tunnel.write_all(b"still here").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut rest = String::new();
    tunnel.read_to_string(&mut rest).await.unwrap();
    assert!(rest.starts_with("A got "), "{rest}");

    a.revive().await;
    eventually("A healthy again", || async {
        healthy(&server, a.address).await == Some(1.0)
    })
    .await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(open_tunnel(addr).await.1);
    }
    assert!(names.iter().any(|n| n == "A"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_with_alpn_and_http_check_over_tls() {
    let any = "127.0.0.1:0".parse().unwrap();
    let tunnel_ok = TaggedBackend::start("tunnel", any, &["teleport-reversetunnel"])
        .await
        .unwrap();
    let wrong_alpn = TaggedBackend::start("web", any, &["h2"]).await.unwrap();
    let server = start(
        &conf(
            &[tunnel_ok.address, wrong_alpn.address],
            "[pool.p.health]\nkind = \"tls\"\nsni = \"proxy.example.com\"\nalpn = [\"teleport-reversetunnel\"]\ninterval = \"100ms\"\nrise = 1\nfall = 1",
        ),
        &[],
    )
    .await;
    eventually("verdicts", || async {
        healthy(&server, tunnel_ok.address).await == Some(1.0)
            && healthy(&server, wrong_alpn.address).await == Some(0.0)
    })
    .await;

    // HTTP/1.1 over TLS: the demo backend answers 200 on ALPN http/1.1.
    let web = TaggedBackend::start("web", any, &["http/1.1"])
        .await
        .unwrap();
    let check = |expect: &str| {
        format!("[pool.p.health]\nkind = \"http\"\ntls = true\npath = \"/healthz\"\nexpect_status = \"{expect}\"\ninterval = \"100ms\"\nrise = 1\nfall = 1")
    };
    let ok = start(&conf(&[web.address], &check("200-299")), &[]).await;
    let not_ok = start(&conf(&[web.address], &check("500")), &[]).await;
    eventually("http verdicts", || async {
        healthy(&ok, web.address).await == Some(1.0)
            && healthy(&not_ok, web.address).await == Some(0.0)
    })
    .await;
    assert!(metric(&not_ok, "sluice_health_checks_total", &[("result", "fail")]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_check_against_an_h2c_server() {
    // sluice's own admin API speaks h2c: it is the backend under check here.
    let target = start(&conf(&["127.0.0.1:9".parse().unwrap()], ""), &[]).await;
    let admin = target.admin_addr().unwrap();
    let check = |path: &str| {
        format!("[pool.p.health]\nkind = \"h2\"\npath = \"{path}\"\ninterval = \"100ms\"\nrise = 1\nfall = 1")
    };
    let ok = start(&conf(&[admin], &check("/healthz")), &[]).await;
    let missing = start(&conf(&[admin], &check("/no-such-page")), &[]).await;
    eventually("h2 verdicts", || async {
        healthy(&ok, admin).await == Some(1.0) && healthy(&missing, admin).await == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_is_unhealthy_fail_open_routes_and_fail_closed_refuses() {
    let a = Flaky::start("A", "127.0.0.1:0").await;
    // An HTTP check against a backend that does not speak HTTP: always unhealthy.
    let check =
        "[pool.p.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"100ms\"\nrise = 1\nfall = 1";
    let open_pool = start(&conf(&[a.address], check), &[]).await;
    let closed_pool = start(
        &conf(
            &[a.address],
            &format!("all_unhealthy = \"fail_closed\"\n{check}"),
        ),
        &[],
    )
    .await;
    eventually("unhealthy (A does not speak HTTP)", || async {
        healthy(&open_pool, a.address).await == Some(0.0)
            && healthy(&closed_pool, a.address).await == Some(0.0)
    })
    .await;
    assert_eq!(
        open_tunnel(edge(&open_pool)).await.1,
        "A",
        "fail_open still routes"
    );
    let mut s = TcpStream::connect(edge(&closed_pool)).await.unwrap();
    s.write_all(&build::hello(Some("a.example.com"), &["h2"]))
        .await
        .unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    eventually("refused as backend_unavailable", || async {
        metric(
            &closed_pool,
            "sluice_connections_closed_total",
            &[("reason", "backend_unavailable")],
        )
        .await
            == 1.0
    })
    .await;
}

/// A TLS server whose certificate for proxy.example.com is signed by a fresh CA; returns its
/// address and the CA's PEM.
async fn ca_signed_backend() -> (SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["proxy.example.com".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        leaf_key.serialize_der(),
    ));
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"trusted\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (address, ca.pem())
}

/// `ca_file`: a TLS check verifies the backend's certificate against the operator's CA; a
/// backend with a certificate from anyone else is unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_verifies_the_certificate_against_ca_file() {
    let (trusted, ca_pem) = ca_signed_backend().await;
    let stranger = TaggedBackend::start("stranger", "127.0.0.1:0".parse().unwrap(), &[])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let check = format!(
        "[pool.p.health]\nkind = \"tls\"\nsni = \"proxy.example.com\"\nca_file = \"{}\"\n\
         interval = \"100ms\"\nrise = 1\nfall = 1",
        ca.display()
    );
    let server = start(&conf(&[trusted, stranger.address], &check), &[]).await;
    eventually("verdicts", || async {
        healthy(&server, trusted).await == Some(1.0)
            && healthy(&server, stranger.address).await == Some(0.0)
    })
    .await;
    // Only the verified backend gets connections.
    for _ in 0..4 {
        assert_eq!(
            tls_greeting(edge(&server), "proxy.example.com", &[]).await,
            "trusted"
        );
    }
    assert_eq!(
        metric(
            &server,
            "sluice_backend_connections_active",
            &[("backend", &stranger.address.to_string())]
        )
        .await,
        0.0
    );
    server.shutdown().await;
}

/// A verdict is the backend's, not the config's: a reload that keeps the backend and its
/// check keeps both the verdict and the checker (no new probe, which with a 1 h interval
/// would only come from a restarted one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_health_verdicts() {
    let any = "127.0.0.1:0".parse().unwrap();
    // Both accept tunnels; only `healthy-b` speaks HTTP/1.1, so only it passes the check.
    let a = TaggedBackend::start("sick-a", any, &["teleport-reversetunnel"])
        .await
        .unwrap();
    let b = TaggedBackend::start("healthy-b", any, &["teleport-reversetunnel", "http/1.1"])
        .await
        .unwrap();
    let check = "[pool.p.health]\nkind = \"http\"\ntls = true\npath = \"/\"\ninterval = \"1h\"\n\
                 jitter = \"0s\"\nrise = 1\nfall = 1";
    let text = conf(&[a.address, b.address], check);
    let server = start(&text, &[]).await;
    eventually("verdicts", || async {
        healthy(&server, a.address).await == Some(0.0)
            && healthy(&server, b.address).await == Some(1.0)
    })
    .await;
    let fails =
        || async { metric(&server, "sluice_health_checks_total", &[("result", "fail")]).await };
    assert_eq!(fails().await, 1.0);
    let cfg = sluice::config::parse(
        std::path::Path::new("t.toml"),
        &text.replace("retries = 0", "retries = 1"),
    )
    .unwrap();
    server.rt.apply(cfg).await.unwrap();
    for _ in 0..6 {
        let greeting = tls_greeting(
            edge(&server),
            "proxy.example.com",
            &["teleport-reversetunnel"],
        )
        .await;
        assert!(greeting.starts_with("healthy-b "), "{greeting}");
    }
    assert_eq!(healthy(&server, a.address).await, Some(0.0));
    assert_eq!(fails().await, 1.0, "the reload restarted the checks");
    server.shutdown().await;
}

/// A backend that, like Teleport with `proxy_protocol: on`, answers only after a PROXY v2
/// header: the HTTP check sends the pool's header and finds it healthy; with
/// `send_proxy = false` it does not, and finds it unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_the_pools_proxy_header() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() || &head[..12] != b"\r\n\r\n\0\r\nQUIT\n"
                {
                    return; // no PROXY header: closed without an answer
                }
                let mut rest = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
                if s.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let check = |extra: &str| {
        format!(
            "proxy_protocol = \"v2\"\n[pool.p.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"100ms\"\nrise = 1\nfall = 1\n{extra}"
        )
    };
    let with = start(&conf(&[backend], &check("")), &[]).await;
    let without = start(&conf(&[backend], &check("send_proxy = false")), &[]).await;
    eventually("verdicts with and without the header", || async {
        healthy(&with, backend).await == Some(1.0) && healthy(&without, backend).await == Some(0.0)
    })
    .await;
    with.shutdown().await;
    without.shutdown().await;
}

/// A backend a reload removes takes its per-backend series with it once its connections are
/// gone: no `sluice_backend_healthy{backend=...}` left behind for an alert to fire on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backends_series_go_with_it() {
    let a = RawBackend::start("a", false).await;
    let b = RawBackend::start("b", false).await;
    let check = "[pool.p.health]\nkind = \"tcp\"\ninterval = \"100ms\"\nrise = 1\nfall = 1";
    let text = conf(&[a.address, b.address], check);
    let server = start(&text, &[]).await;
    eventually("both checked", || async {
        healthy(&server, a.address).await == Some(1.0)
            && healthy(&server, b.address).await == Some(1.0)
    })
    .await;
    let admin = server.admin_addr().unwrap();
    let series = |s: &support::metrics::Scrape, name: &str, backend: SocketAddr| {
        s.get(name, &[("pool", "p"), ("backend", &backend.to_string())])
    };
    // Every per-backend series exists from the backend's start, at 0.
    let counters = [
        "sluice_backend_connections_active",
        "sluice_backend_connections_total",
        "sluice_backend_connect_failures_total",
    ];
    let s = scrape(admin).await;
    for name in counters {
        assert_eq!(series(&s, name, b.address), Some(0.0), "{name}");
    }
    let bytes_of = |s: &support::metrics::Scrape, backend: SocketAddr| {
        s.family("sluice_backend_bytes_total")
            .lines()
            .filter(|l| l.contains(&format!("backend=\"{backend}\"")))
            .count()
    };
    assert_eq!(bytes_of(&s, b.address), 2, "both directions, at 0");
    let cfg =
        sluice::config::parse(std::path::Path::new("t.toml"), &conf(&[a.address], check)).unwrap();
    server.rt.apply(cfg).await.unwrap();
    eventually("b's series are gone", || async {
        let s = scrape(admin).await;
        series(&s, "sluice_backend_healthy", b.address).is_none()
            && counters.iter().all(|n| series(&s, n, b.address).is_none())
            && bytes_of(&s, b.address) == 0
    })
    .await;
    let s = scrape(admin).await;
    assert_eq!(series(&s, "sluice_backend_healthy", a.address), Some(1.0));
    assert_eq!(
        series(&s, "sluice_backend_connections_active", a.address),
        Some(0.0)
    );
    server.shutdown().await;
}
