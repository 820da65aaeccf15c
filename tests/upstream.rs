//! Connecting to backends: a refused or black-holed backend retried on another, every
//! backend dead, and passive ejection (consecutive failures, `max_ejected_percent`, connect
//! timeouts). Ejection's bounds over time (the doubling, `eject_max_time`) are in `pools.rs`.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Retries: a failed connect is tried again on another backend.

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
    // Per backend: the dead one's failures, the live one's connections; bytes and the
    // duration histogram once the connections end.
    let b = |addr: std::net::SocketAddr| addr.to_string();
    let (dead, live) = (b(dead), b(live.address));
    let per = |name: &'static str, backend: String| {
        let server = &server;
        async move { metric(server, name, &[("pool", "main"), ("backend", &backend)]).await }
    };
    assert_eq!(
        per("sluice_backend_connect_failures_total", dead.clone()).await,
        2.0
    );
    assert_eq!(
        per("sluice_backend_connections_total", live.clone()).await,
        4.0
    );
    assert_eq!(per("sluice_backend_connections_total", dead).await, 0.0);
    eventually(
        "the four connections ended and counted their bytes",
        || async {
            let s = scrape(server.admin_addr().unwrap()).await;
            s.sum(
                "sluice_backend_bytes_total",
                &[
                    ("pool", "main"),
                    ("backend", &live),
                    ("direction", "to_client"),
                ],
            ) > 0.0
                && s.sum("sluice_connection_duration_seconds_count", &[]) == 4.0
        },
    )
    .await;
    assert!(
        metric(
            &server,
            "sluice_backend_bytes_total",
            &[
                ("pool", "main"),
                ("backend", &live),
                ("direction", "to_backend")
            ]
        )
        .await
            >= 4.0 * tunnel_hello().len() as f64
    );
    // The process's own series.
    let s = scrape(server.admin_addr().unwrap()).await;
    assert!(s.value("process_open_fds", &[]) > 0.0);
    assert!(s.value("process_start_time_seconds", &[]) > 1.0e9);
    assert!(s.value("process_resident_memory_bytes", &[]) > 0.0);
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
