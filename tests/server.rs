//! The server around its connections: the admin API and the metrics a dashboard reads,
//! listeners (the connection cap, IPv6), shutdown and the drain.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Slowloris on the admin port: connections that never send a request, or trickle a request
/// head, are closed within seconds, more of them than the cap do not lock Prometheus out, and
/// /readyz and /metrics keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_slowloris_is_closed_within_seconds_and_metrics_still_answer() {
    let b = RawBackend::start("b", false).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        ..Simple::default()
    })
    .await;
    let admin = server.admin_addr().unwrap();
    let start = tokio::time::Instant::now();
    let mut idle = Vec::new();
    for i in 0..600 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        if i % 2 == 1 {
            // A request head that never ends.
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    // More than the cap (512) are open: a scrape still gets through within seconds.
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), http_get(admin, "/readyz"))
        .await
        .expect("/readyz answers under slowloris");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("sluice_connections_accepted_total"));
    // Every idle connection was closed by sluice, within seconds.
    for mut s in idle {
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "an idle admin connection was held");
    }
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    server.shutdown().await;
}
