//! Parking: idle connections leave their task (see `src/edge/parking.rs`). A parked
//! connection wakes from either side and loses nothing, parks half-closed, still times out,
//! and holds a drain until `drain_timeout`.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
