//! Hostile clients against the edge's limits: connections that never send their hello have
//! their own caps and give way to newer ones, so a slowloris only slows itself; established
//! tunnels are never touched.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    sock.connect(to).await.unwrap()
}

/// Whether sluice closed `s` (EOF or reset) within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn config(limits: &str, backend: SocketAddr) -> String {
    format!(
        r#"
[admin]
address = "127.0.0.1:0"

[limits]
{limits}

[[listener]]
name = "edge"
address = "127.0.0.1:0"
hello_timeout = "30s"

[[route]]
name = "all"
pool = "p"
idle_timeout = "0s"

[pool.p]
backends = ["{backend}"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_give_way_oldest_first_per_source_and_in_all() {
    let backend = echo_backend().await;
    let server = start(
        &config(
            "max_pending_hellos = 4\nmax_pending_hellos_per_source = 2",
            backend,
        ),
        &[],
    )
    .await;
    let edge = edge(&server);
    let ip = |d: u8| Ipv4Addr::new(127, 0, 0, d);
    let evictions = |reason: &'static str| {
        let server = &server;
        async move {
            metric(
                server,
                "sluice_pending_hello_evictions_total",
                &[("reason", reason)],
            )
            .await
        }
    };
    // Each waits until the one before is registered: ids (and so age) follow this order.
    let pending = |n: f64| {
        let server = &server;
        async move {
            eventually(&format!("{n} pending"), || async {
                metric(server, "sluice_pending_hellos", &[]).await == n
            })
            .await
        }
    };
    let mut a1 = connect_from(ip(20), edge).await;
    pending(1.0).await;
    let mut a2 = connect_from(ip(20), edge).await;
    pending(2.0).await;
    // A third from the same source: its oldest goes.
    let mut a3 = connect_from(ip(20), edge).await;
    assert!(closed_within(&mut a1, Duration::from_secs(5)).await);
    assert_eq!(evictions("source_cap").await, 1.0);
    pending(2.0).await;
    // Two more sources fill the set (4); the next newcomer closes the oldest of all (a2).
    let _b = connect_from(ip(21), edge).await;
    pending(3.0).await;
    let _c = connect_from(ip(22), edge).await;
    pending(4.0).await;
    let mut d = connect_from(ip(23), edge).await;
    assert!(closed_within(&mut a2, Duration::from_secs(5)).await);
    assert_eq!(evictions("pending_cap").await, 1.0);
    // A client that sends its hello at once gets through, and is never evicted after.
    d.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut d).await, "echo");
    assert!(
        !closed_within(&mut a3, Duration::from_millis(100)).await,
        "a3 still waits"
    );
    assert_eq!(
        metric(
            &server,
            "sluice_connections_closed_total",
            &[
                ("listener", "edge"),
                ("route", "none"),
                ("reason", "pending_evicted")
            ]
        )
        .await,
        2.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_a_new_agent_takes_a_silent_connections_slot() {
    let backend = echo_backend().await;
    let server = start(&config("max_connections = 6", backend), &[]).await;
    let edge = edge(&server);
    // Three established tunnels and three silent connections: the cap is reached.
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(open_echoed_tunnel(&server).await);
    }
    let mut silent = Vec::new();
    for i in 0..3u8 {
        silent.push(connect_from(Ipv4Addr::new(127, 0, 0, 30 + i), edge).await);
        let n = f64::from(i + 1);
        eventually(&format!("{n} pending"), || async {
            metric(&server, "sluice_pending_hellos", &[]).await == n
        })
        .await;
    }
    // A new agent does not wait behind them: the oldest silent one gives its slot.
    let started = Instant::now();
    let mut agent = TcpStream::connect(edge).await.unwrap();
    agent.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(read_line(&mut agent).await, "echo", "the agent is served");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The oldest of them gave its slot; the others still wait.
    assert!(closed_within(&mut silent[0], Duration::from_secs(5)).await);
    for s in &mut silent[1..] {
        assert!(!closed_within(s, Duration::from_millis(100)).await);
    }
    assert_eq!(
        metric(
            &server,
            "sluice_pending_hello_evictions_total",
            &[("reason", "connection_cap")]
        )
        .await,
        1.0
    );
    // The established tunnels were not touched.
    for t in &mut tunnels {
        t.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        t.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }
    server.shutdown().await;
}
