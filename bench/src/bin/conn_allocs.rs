//! Heap allocations per relayed TCP connection (issue 24): sluice runs in this process under a
//! counting allocator, with a backend and a client that do what `loadgen connrate` does (hello
//! in, a 64-byte answer out, close). The same loop straight to the backend gives the
//! harness's own share, subtracted. Prints one JSON line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static ALLOC: sluice_bench::Counting = sluice_bench::Counting;

#[derive(Parser)]
struct Opts {
    /// Connections measured (after as many again to warm up).
    #[arg(long, default_value_t = 5000)]
    connections: usize,
}

/// Reads the hello (or whatever comes first), answers 64 bytes, reads to EOF.
async fn backend() -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = s.write_all(&[0x42; 64]).await;
                while s.read(&mut buf).await.unwrap_or(0) > 0 {}
            });
        }
    });
    Ok(addr)
}

/// `n` connections one after the other: allocations and bytes allocated per connection.
async fn run(to: SocketAddr, hello: &[u8], n: usize) -> anyhow::Result<(f64, f64)> {
    let (a0, b0) = (sluice_bench::allocations(), sluice_bench::allocated_bytes());
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(to).await?;
        s.write_all(hello).await?;
        s.read_exact(&mut buf).await?;
        drop(s);
    }
    // Let the last connections' tasks finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a1, b1) = (sluice_bench::allocations(), sluice_bench::allocated_bytes());
    Ok(((a1 - a0) as f64 / n as f64, (b1 - b0) as f64 / n as f64))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let backend = backend().await?;
    let config = format!(
        r#"
[admin]
address = ""

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "clients"
pool = "client"
idle_timeout = "1h"

[pool.client]
backends = ["{backend}"]
"#
    );
    let cfg = sluice::config::parse(std::path::Path::new("conn-allocs.toml"), &config)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = sluice::control::server::Server::start(cfg).await?;
    let edge = server
        .listener_addr("edge")
        .ok_or_else(|| anyhow::anyhow!("no edge listener"))?;
    let hello = sluice_core::hello::build::hello(Some("app.example.com"), &["h2", "http/1.1"]);
    run(backend, &hello, o.connections).await?;
    run(edge, &hello, o.connections).await?;
    let (direct_allocs, direct_bytes) = run(backend, &hello, o.connections).await?;
    let (through_allocs, through_bytes) = run(edge, &hello, o.connections).await?;
    println!(
        "{}",
        serde_json::json!({
            "scenario": "conn_allocs",
            "connections": o.connections,
            "harness_allocations_per_conn": direct_allocs,
            "sluice_allocations_per_conn": through_allocs - direct_allocs,
            "sluice_bytes_allocated_per_conn": through_bytes - direct_bytes,
        })
    );
    server.shutdown().await;
    Ok(())
}
