//! An established connection, relayed: half-closes from either side, resets counted against
//! the side that sent them, the idle timeout, TCP keepalive on both legs, and a bulk transfer
//! through splice pipes arriving exact both ways.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
