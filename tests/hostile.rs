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

/// `sluice run` under `ulimit -n 300` (soft and hard): its stderr piped, JSON logs.
fn run_with_nofile(config: &std::path::Path, nofile: u32) -> support::process::Running {
    use support::process::SpawnRunning;
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile} && exec \"$0\" --log-format json run --config \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .spawn_running()
}

#[test]
fn an_explicit_cap_the_open_file_limit_cannot_honour_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        config("max_connections = 1000", "127.0.0.1:9".parse().unwrap()),
    )
    .unwrap();
    let mut child = run_with_nofile(&path, 300);
    let status = support::process::exits_within(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("limits.max_connections = 1000 needs about 2581 open files")
            && err.contains("the open-file limit is 300")
            && err.contains("lower max_connections to 87"),
        "{err}"
    );
    // `sluice check` may run on another machine: a warning, and success.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 300 && exec \"$0\" check --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: limits.max_connections = 1000"),
        "{err}"
    );
}

/// With `ulimit -n 300` the derived cap leaves room for every connection's sockets and
/// pipes: 87 tunnels, some moving bulk data at once, are all relayed; none fails for lack of
/// a descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_derived_cap_fits_the_open_file_limit_with_bulk_transfers() {
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config("", backend)).unwrap();
    let mut child = run_with_nofile(&path, 300);
    let (edge, admin, _log) = support::process::bound_addresses(&mut child);
    let admin: SocketAddr = admin.parse().unwrap();
    let scrape = || async move { support::scrape(admin).await };
    // The README's and config.md's formula, for one listener and no heartbeat listener.
    assert_eq!(scrape().await.value("sluice_max_connections", &[]), 87.0);
    let edge: SocketAddr = edge.parse().unwrap();
    let mut tunnels = Vec::new();
    for _ in 0..87 {
        let mut t = TcpStream::connect(edge).await.unwrap();
        t.write_all(&tunnel_hello()).await.unwrap();
        assert_eq!(read_line(&mut t).await, "echo");
        let mut echoed = vec![0u8; tunnel_hello().len()];
        t.read_exact(&mut echoed).await.unwrap();
        tunnels.push(t);
    }
    // 30 of them move 4 MiB each way at once (splice pipes where the cap allows, copies past it).
    let bulk: Vec<_> = tunnels
        .drain(..30)
        .map(|mut t| {
            tokio::spawn(async move {
                let (mut r, mut w) = t.split();
                let data = pattern(0, 4 << 20);
                let send = async {
                    w.write_all(&data).await.unwrap();
                };
                let mut back = vec![0u8; data.len()];
                let recv = r.read_exact(&mut back);
                let (_, got) = tokio::join!(send, recv);
                got.unwrap();
                assert!(back == data, "the echo came back whole");
            })
        })
        .collect();
    for b in bulk {
        b.await.unwrap();
    }
    // The idle ones still work.
    for t in &mut tunnels {
        t.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        t.read_exact(&mut b).await.unwrap();
    }
    let s = scrape().await;
    for reason in ["local_resources", "backend_unavailable", "internal_error"] {
        assert_eq!(
            s.sum("sluice_connections_closed_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    // Pipes stay under their cap, a quarter of 87.
    assert!(s.value("sluice_relay_pipes", &[]) <= 21.0);
    let accept_errors = s.family("sluice_accept_errors_total");
    assert!(!accept_errors.contains("emfile"), "{accept_errors}");
}

/// Past the pipe cap (a quarter of `max_connections`), bulk relays copy instead of splicing:
/// counted, and every byte still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pipe_cap_bulk_relays_copy_and_are_counted() {
    let backend = echo_backend().await;
    let server = start(&config("max_connections = 8", backend), &[]).await;
    let mut bulk = Vec::new();
    for i in 0..8 {
        let mut t = open_echoed_tunnel(&server).await;
        bulk.push(tokio::spawn(async move {
            let (mut r, mut w) = t.split();
            let data = pattern(i * 7, 8 << 20);
            let send = async {
                w.write_all(&data).await.unwrap();
            };
            let mut back = vec![0u8; data.len()];
            let (_, got) = tokio::join!(send, r.read_exact(&mut back));
            got.unwrap();
            assert!(back == data, "the echo came back whole");
        }));
    }
    for b in bulk {
        b.await.unwrap();
    }
    assert!(metric(&server, "sluice_relay_pipes", &[]).await <= 2.0);
    assert!(metric(&server, "sluice_relay_pipes_unavailable_total", &[]).await > 0.0);
    assert!(metric(&server, "sluice_relay_spliced_bytes_total", &[]).await > 0.0);
    server.shutdown().await;
}
