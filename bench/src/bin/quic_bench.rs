//! QUIC passthrough figures (issue 7): bulk transfer through sluice against the same transfer
//! straight to the server (ratio in one run, alternating), and the memory of an idle flow.
//! Everything runs in this process: a quinn server, sluice (the library, as `sluice run`
//! builds it) and quinn clients. Prints one JSON line.
//!
//! Also: several transfers at once (`--parallel`), and the latency sluice adds to one
//! datagram (a UDP echo server behind a synthetic flow, round trips direct and through sluice,
//! one at a time).
//!
//! Idle flows are opened with synthetic client Initials (a real ClientHello, encrypted with
//! the Initial keys) from one UDP socket each, toward a sink that never answers: the resident
//! memory they add, less the client sockets (opened before the first reading), is sluice's
//! cost per flow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

#[derive(Parser)]
struct Opts {
    /// Bytes per bulk transfer.
    #[arg(long, default_value_t = 64 << 20)]
    bytes: usize,
    /// Rounds of (direct, sluice).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Idle flows to open.
    #[arg(long, default_value_t = 4000)]
    flows: usize,
    /// Concurrent transfers (each of `bytes / parallel`) in the several-flows run.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Round trips of one datagram for the latency figures.
    #[arg(long, default_value_t = 5000)]
    pings: usize,
}

#[global_allocator]
static ALLOC: sluice_bench::Counting = sluice_bench::Counting;

fn rss_kib() -> u64 {
    sluice_bench::vm_rss_kib("self").unwrap_or(0)
}

/// A quinn server that reads each stream to its end and answers with the byte count.
fn server() -> anyhow::Result<SocketAddr> {
    let tls = sluice::tls::testing::server_config(&["bulk.example.com"], &["h3"])?;
    let cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse()?)?;
    let addr = ep.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut total = 0u64;
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(Some(n)) = recv.read(&mut buf).await {
                            total += n as u64;
                        }
                        let _ = send.write_all(&total.to_be_bytes()).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    Ok(addr)
}

/// `n` transfers of `bytes / n` at once, each on its own connection: total Gbit/s.
async fn parallel(to: SocketAddr, bytes: usize, n: usize) -> anyhow::Result<f64> {
    let each = bytes / n.max(1);
    let t = Instant::now();
    let runs: Vec<_> = (0..n).map(|_| tokio::spawn(bulk(to, each))).collect();
    for r in runs {
        r.await??;
    }
    Ok((each * n) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
}

/// Round trips of a 1,200-byte datagram to a UDP echo server, one at a time, from a socket
/// that first sent a flow's Initial (so that through sluice it is one flow): microseconds,
/// sorted.
async fn pings(to: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let hello = sluice_core::hello::build::hello(Some("echo.example.com"), &["h3"]);
    let dcid = [0x5e; 8];
    let initial = sluice_core::quic::packet::build_initial(
        sluice_core::quic::packet::V1,
        &dcid,
        &[1],
        0,
        0,
        &hello[5..],
    );
    sock.send_to(&initial, to).await?;
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .context("the echo of the Initial")??;
    let mut ping = vec![0x40u8];
    ping.extend_from_slice(&dcid);
    ping.resize(1200, 0);
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        sock.send_to(&ping, to).await?;
        tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .context("an echo")??;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

async fn bulk(to: SocketAddr, bytes: usize) -> anyhow::Result<f64> {
    let tls = sluice::tls::testing::insecure_client_config(&["h3"]);
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )));
    let conn = ep.connect(to, "bulk.example.com")?.await?;
    let chunk = vec![0x5au8; 1 << 16];
    let t = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        send.write_all(&chunk[..n]).await?;
        left -= n;
    }
    send.finish()?;
    let answer = recv.read_to_end(8).await?;
    let secs = t.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(
        answer
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad answer"))?,
    );
    anyhow::ensure!(got == bytes as u64, "the server got {got} of {bytes} bytes");
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let backend = server()?;
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let echo = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    let echo_addr = echo.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let config = format!(
        r#"
[admin]
address = ""

[limits]
max_connections = 100

[[listener]]
name = "quic"
address = "127.0.0.1:0"
protocol = "quic"
flow_idle_timeout = "5m"
max_pending_flows = 100000

[[route]]
name = "bulk"
listener = "quic"
sni = ["bulk.example.com"]
pool = "bulk"

[[route]]
name = "echo"
listener = "quic"
sni = ["echo.example.com"]
pool = "echo"

[[route]]
name = "idle"
listener = "quic"
sni = ["idle.example.com"]
pool = "sink"

[pool.bulk]
backends = ["{backend}"]

[pool.sink]
backends = ["{}"]

[pool.echo]
backends = ["{echo_addr}"]
"#,
        sink.local_addr()?
    );
    let cfg = sluice::config::parse(std::path::Path::new("quic-bench.toml"), &config)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = sluice::control::server::Server::start(cfg).await?;
    let edge = server.quic_addr("quic").context("QUIC listener")?;

    let (mut direct, mut through) = (Vec::new(), Vec::new());
    let (mut direct_n, mut through_n) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        direct.push(bulk(backend, o.bytes).await?);
        through.push(bulk(edge, o.bytes).await?);
        direct_n.push(parallel(backend, o.bytes, o.parallel).await?);
        through_n.push(parallel(edge, o.bytes, o.parallel).await?);
    }
    let direct_rtt = pings(echo_addr, o.pings).await?;
    let through_rtt = pings(edge, o.pings).await?;

    // Idle flows.
    let hello = sluice_core::hello::build::hello(Some("idle.example.com"), &["h3"]);
    let mut clients = Vec::with_capacity(o.flows);
    for _ in 0..o.flows {
        clients.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let heap_before = sluice_bench::live_heap_bytes();
    let flows_before = server.rt.quic_listeners()[0].flow_count();
    for (i, c) in clients.iter().enumerate() {
        let dcid = (i as u64 + 1).to_be_bytes();
        let initial = sluice_core::quic::packet::build_initial(
            sluice_core::quic::packet::V1,
            &dcid,
            &[1, 2, 3, 4],
            0,
            0,
            &hello[5..],
        );
        c.send_to(&initial, edge).await?;
        // Paced: a burst larger than the listener's receive buffer would be dropped.
        if i % 128 == 127 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = 0;
    while Instant::now() < deadline {
        open = server.rt.quic_listeners()[0].flow_count() - flows_before;
        if open >= o.flows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    let heap_after = sluice_bench::live_heap_bytes();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "scenario": "quic",
            "bytes": o.bytes,
            "direct_gbit_per_s": direct,
            "sluice_gbit_per_s": through,
            "ratio_sluice_to_direct": mean(&through) / mean(&direct),
            "parallel_flows": o.parallel,
            "parallel_direct_gbit_per_s": direct_n,
            "parallel_sluice_gbit_per_s": through_n,
            "parallel_ratio_sluice_to_direct": mean(&through_n) / mean(&direct_n),
            "pings": o.pings,
            "rtt_direct_us_p50_p99": [quantile(&direct_rtt, 0.5), quantile(&direct_rtt, 0.99)],
            "rtt_sluice_us_p50_p99": [quantile(&through_rtt, 0.5), quantile(&through_rtt, 0.99)],
            // A round trip crosses sluice twice: half the difference is one datagram's.
            "added_us_per_datagram_p50": (quantile(&through_rtt, 0.5) - quantile(&direct_rtt, 0.5)) / 2.0,
            "added_us_per_datagram_p99": (quantile(&through_rtt, 0.99) - quantile(&direct_rtt, 0.99)) / 2.0,
            "heap_bytes_per_idle_flow": (heap_after - heap_before) as f64 / open.max(1) as f64,
            "idle_flows_requested": o.flows,
            "idle_flows_open": open,
            "rss_kib_before": before,
            "rss_kib_after": after,
            "bytes_per_idle_flow": (after.saturating_sub(before) * 1024) as f64 / open.max(1) as f64,
        })
    );
    server.shutdown().await;
    Ok(())
}
