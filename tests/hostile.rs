//! Hostile clients against the edge's limits: connections that never send their hello have
//! their own caps and give way to newer ones, so a slowloris only slows itself; established
//! tunnels are never touched.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let emfile = [("listener", "edge"), ("kind", "emfile")];
    assert_eq!(s.value("sluice_accept_errors_total", &emfile), 0.0);
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

/// `limits.max_pipes` sets the pipe cap itself: with 0 no relay splices, every byte is
/// copied, and the bytes still all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pipes_zero_copies_every_relay() {
    let backend = echo_backend().await;
    let server = start(&config("max_connections = 8\nmax_pipes = 0", backend), &[]).await;
    let mut t = open_echoed_tunnel(&server).await;
    let (mut r, mut w) = t.split();
    let data = pattern(3, 8 << 20);
    let mut back = vec![0u8; data.len()];
    let (_, got) = tokio::join!(
        async { w.write_all(&data).await.unwrap() },
        r.read_exact(&mut back)
    );
    got.unwrap();
    assert!(back == data, "the echo came back whole");
    assert_eq!(
        metric(&server, "sluice_relay_spliced_bytes_total", &[]).await,
        0.0
    );
    assert!(metric(&server, "sluice_relay_pipes_unavailable_total", &[]).await > 0.0);
    drop(t);
    server.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The process's CPU time so far (user + system), in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks * 10_000
}

/// A soak of hostile input against the release binary while 200 tunnels are held:
/// slowloris on the edge and the admin port, hellos in 1-byte records and oversized ones,
/// forged PROXY headers, bad heartbeats. Every tunnel survives; each kind is refused and
/// counted; the edge's CPU per hostile connection is printed (the figures of the note).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_hostile_input_loses_no_tunnel() {
    use sluice_core::hello::build;
    let backend = echo_backend().await;
    let secrets = support::secrets("soak-token-0123456789abc name=agents\n");
    let (edge_port, lb_port, hb_port) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[admin]
address = "127.0.0.1:0"

[limits]
max_pending_hellos = 256
max_pending_hellos_per_source = 64

[heartbeat]
address = "127.0.0.1:{hb_port}"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"
tokens_file = "{d}/tokens"

[[listener]]
name = "edge"
address = "127.0.0.1:{edge_port}"
hello_timeout = "2s"

[[listener]]
name = "behind_lb"
address = "127.0.0.1:{lb_port}"
accept_proxy = "v2"
trusted_proxies = ["127.0.0.1"]
hello_timeout = "2s"

[[route]]
name = "all"
pool = "p"
idle_timeout = "0s"

[pool.p]
backends = ["{backend}"]
"#,
            d = secrets.path().display()
        ),
    )
    .unwrap();
    let mut child = support::process::sluice_run(&path, &[]);
    let pid = child.id();
    let (_, admin, log) = support::process::bound_addresses(&mut child);
    let admin: SocketAddr = admin.parse().unwrap();
    let edge = SocketAddr::from(([127, 0, 0, 1], edge_port));
    let lb = SocketAddr::from(([127, 0, 0, 1], lb_port));
    let hb = SocketAddr::from(([127, 0, 0, 1], hb_port));

    // 200 established tunnels, held through everything.
    let mut tunnels = Vec::new();
    for i in 0..200u32 {
        let source = Ipv4Addr::new(127, 0, 1 + (i / 200) as u8, 1 + (i % 200) as u8);
        let mut t = connect_from(source, edge).await;
        t.write_all(&tunnel_hello()).await.unwrap();
        if read_line(&mut t).await != "echo" {
            drop(child);
            panic!("tunnel {i} refused:\n{}", log.join().unwrap());
        }
        let mut echoed = vec![0u8; tunnel_hello().len()];
        t.read_exact(&mut echoed).await.unwrap();
        tunnels.push(t);
    }

    let mut report = Vec::new();
    let mut phase = |name: &'static str, n: usize, before: u64| {
        let us = cpu_us(pid).saturating_sub(before);
        report.push(format!(
            "{name}: {n} connections, {} us of edge CPU each",
            us / n as u64
        ));
    };

    // 1. Slowloris on the edge: 600 connections, 100 from each of 6 sources, send one byte
    //    and wait: each source's and the global pending cap close the oldest.
    let before = cpu_us(pid);
    let mut slow = Vec::new();
    for i in 0..600u32 {
        let mut s = connect_from(Ipv4Addr::new(127, 0, 2, 1 + (i / 100) as u8), edge).await;
        let _ = s.write_all(&[0x16]).await;
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // hello_timeout passes
    drop(slow);
    phase("slowloris (edge)", 600, before);

    // 2. Slowloris on the admin port: 300 connections with half a request each.
    let before = cpu_us(pid);
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n").await;
        slow.push(s);
    }
    // The admin API keeps answering under it.
    let (status, _) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200);
    drop(slow);
    phase("slowloris (admin)", 300, before);

    // 3. Hellos in 1-byte TLS records (routed), and oversized ones (refused).
    let before = cpu_us(pid);
    let hello = build::hello(Some("frag.example.com"), &["h2"]);
    let fragmented = build::records(&handshake_of(&hello), 1);
    for _ in 0..200 {
        let mut s = TcpStream::connect(edge).await.unwrap();
        s.write_all(&fragmented).await.unwrap();
        assert_eq!(read_line(&mut s).await, "echo");
    }
    phase("hello in 1-byte records", 200, before);
    let before = cpu_us(pid);
    let mut oversized = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
    oversized.resize(70_000, 0x41);
    for _ in 0..200 {
        let mut s = TcpStream::connect(edge).await.unwrap();
        let _ = s.write_all(&oversized).await;
        assert_eq!(read_line(&mut s).await, "", "refused");
    }
    phase("oversized hello", 200, before);

    // 4. Forged PROXY headers from an untrusted source.
    let before = cpu_us(pid);
    let forged = sluice_core::proxy::encode(
        sluice_core::proxy::ProxyProtocol::V2,
        &sluice_core::proxy::HeaderInfo {
            client: "10.9.9.9:1234".parse().unwrap(),
            local: lb,
            alpn: None,
            sni: None,
        },
    )
    .unwrap()
    .unwrap();
    for _ in 0..200 {
        let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), lb).await;
        let mut first = forged.clone();
        first.extend_from_slice(&tunnel_hello());
        let _ = s.write_all(&first).await;
        assert_eq!(read_line(&mut s).await, "", "refused");
    }
    phase("forged PROXY header", 200, before);

    // 5. Bad heartbeats: an unknown token, then malformed JSON with the right one.
    let before = cpu_us(pid);
    for i in 0..100 {
        let (status, _) = support::heartbeats::api(
            hb,
            "POST",
            "/v1/heartbeats",
            Some("wrong-token-0123456789"),
            "{}",
        )
        .await;
        assert_eq!(status, 401);
        let (status, _) = support::heartbeats::api(
            hb,
            "POST",
            "/v1/heartbeats",
            Some("soak-token-0123456789abc"),
            &format!("{{\"agent\": \"a{i}\", \"address\": 5"),
        )
        .await;
        assert_eq!(status, 400);
    }
    phase("bad heartbeat (TLS + HTTP each)", 200, before);

    // Every tunnel is still there.
    for t in &mut tunnels {
        t.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut b))
            .await
            .expect("the tunnel answers")
            .unwrap();
        assert_eq!(&b, b"ping");
    }
    let s = support::scrape(admin).await;
    for (reason, at_least) in [
        ("hello_timeout", 1.0),
        ("hello_too_large", 200.0),
        ("proxy_untrusted", 200.0),
    ] {
        let n = s.sum("sluice_connections_closed_total", &[("reason", reason)]);
        assert!(n >= at_least, "{reason}: {n}");
    }
    assert!(
        s.value(
            "sluice_pending_hello_evictions_total",
            &[("reason", "source_cap")]
        ) > 0.0
    );
    assert_eq!(
        s.value("sluice_connections_active", &[("listener", "edge")]),
        200.0
    );
    for line in &report {
        eprintln!("soak: {line}");
    }
}
