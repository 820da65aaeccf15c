//! Several edges sharing the heartbeat table through etcd (issue 20), on this machine: a
//! three-member etcd and three `sluice run` processes, all on loopback.
//!
//! Measures: heartbeat → visible on another edge (p50/p99), sustained heartbeats/s through the
//! store (unchanged: lease keep-alives; changed: guarded puts), etcd raft proposals per
//! unchanged heartbeat (`etcd_server_proposals_committed_total` of the leader), the time a fresh
//! edge takes to list N agents × R resources, and its memory per record. One JSON line each.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// The sluice binary.
    #[arg(long)]
    sluice: PathBuf,
    /// Agents written straight into etcd for the list measurement.
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    /// Resources per agent.
    #[arg(long, default_value_t = 10)]
    resources: usize,
    /// Visibility samples.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Seconds of each sustained heartbeat phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent heartbeat clients.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Where etcd keeps its data (tmpfs by default; a disk directory measures its flushes too).
    #[arg(long, default_value = "/dev/shm")]
    etcd_data: PathBuf,
}

const TOKEN: &str = "bench-token-0123456789";

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Etcd {
    clients: Vec<String>,
    _procs: Vec<Proc>,
}

/// etcd's data dirs go under `dir` (the bench puts them on tmpfs: what is measured is sluice
/// and etcd's raft, not this machine's disk flushes).
fn etcd(dir: &Path) -> anyhow::Result<Etcd> {
    let names = ["m0", "m1", "m2"];
    let clients: Vec<String> = names
        .iter()
        .map(|_| format!("http://127.0.0.1:{}", port()))
        .collect();
    let peers: Vec<String> = names
        .iter()
        .map(|_| format!("http://127.0.0.1:{}", port()))
        .collect();
    let initial: Vec<String> = names
        .iter()
        .zip(&peers)
        .map(|(n, p)| format!("{n}={p}"))
        .collect();
    let mut procs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let child = Command::new("etcd")
            .args(["--name", n])
            .arg("--data-dir")
            .arg(dir.join(n))
            .args([
                "--listen-client-urls",
                &clients[i],
                "--advertise-client-urls",
                &clients[i],
            ])
            .args([
                "--listen-peer-urls",
                &peers[i],
                "--initial-advertise-peer-urls",
                &peers[i],
            ])
            .args([
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--quota-backend-bytes",
                "4294967296",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("etcd (Debian: etcd-server)")?;
        procs.push(Proc(child));
    }
    Ok(Etcd {
        clients,
        _procs: procs,
    })
}

/// GET over plain HTTP/1.0; the body.
async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

struct Edge {
    admin: String,
    heartbeat: SocketAddr,
    proc: Proc,
}

fn edge(
    sluice: &Path,
    dir: &Path,
    name: &str,
    endpoints: &str,
    cluster: &str,
) -> anyhow::Result<Edge> {
    let (admin, hb, main) = (port(), port(), port());
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"
[admin]
address = "127.0.0.1:{admin}"
[cluster]
name = "{cluster}"
[store]
kind = "etcd"
endpoints = [{endpoints}]
edge_id = "{name}"
[heartbeat]
address = "127.0.0.1:{hb}"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"
tokens_file = "{d}/tokens"
max_agents = 10000000
[[listener]]
name = "edge"
address = "127.0.0.1:{main}"
[[route]]
name = "apps"
resource = {{ kind = "app", sni = "*.apps.example.com" }}
"#,
            d = dir.display()
        ),
    )?;
    let child = Command::new(sluice)
        .args(["--log-level", "warn", "run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Edge {
        admin: format!("127.0.0.1:{admin}"),
        heartbeat: SocketAddr::from(([127, 0, 0, 1], hb)),
        proc: Proc(child),
    })
}

async fn ready(e: &Edge, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if matches!(get(&e.admin, "/readyz").await, Ok((200, _))) {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("edge {} not ready within {limit:?}", e.admin)
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tls = sluice::tls::testing::insecure_client_config(&["h2"]);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("sluice.test")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn post(s: &mut Sender, body: String) -> anyhow::Result<u16> {
    let req = hyper::Request::post("https://sluice.test/v1/heartbeats")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from(body)))?;
    let resp = s.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != 200 {
        eprintln!("{status}: {}", String::from_utf8_lossy(&body).trim_end());
    }
    Ok(status)
}

fn heartbeat(agent: &str, resources: usize, label: u64) -> String {
    let rs: Vec<String> = (0..resources)
        .map(|r| format!(r#"{{"kind":"app","name":"{agent}-r{r}"}}"#))
        .collect();
    format!(
        r#"{{"agent":"{agent}","address":"10.1.0.1:3022","version":"17.1.0","ttl":"5m","labels":{{"gen":"{label}"}},"resources":[{}]}}"#,
        rs.join(",")
    )
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The leader's committed proposals (the largest of the members' counters).
async fn proposals(etcd: &Etcd) -> f64 {
    let mut best: f64 = 0.0;
    for c in &etcd.clients {
        if let Ok((_, text)) = get(c.trim_start_matches("http://"), "/metrics").await {
            for l in text.lines() {
                if let Some(v) = l.strip_prefix("etcd_server_proposals_committed_total ") {
                    best = best.max(v.trim().parse().unwrap_or(0.0));
                }
            }
        }
    }
    best
}

/// `workers` clients over the edges for `seconds`; `changed`: every heartbeat changes its
/// agent (a label), else it repeats it. Heartbeats/s and failures.
async fn sustained(
    edges: &[Edge],
    workers: usize,
    seconds: u64,
    changed: bool,
) -> anyhow::Result<(f64, u64)> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let addr = edges[w % edges.len()].heartbeat;
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = connect(addr).await?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let agent = format!("w{w}-a{}", n % 20);
                let label = if changed { n } else { 0 };
                match post(&mut s, heartbeat(&agent, 1, label)).await {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    Ok((
        ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    ))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let ck = rcgen::generate_simple_self_signed(vec!["sluice.test".to_owned()])?;
    std::fs::write(dir.join("cert.pem"), ck.cert.pem())?;
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem())?;
    std::fs::write(dir.join("tokens"), format!("{TOKEN} name=bench\n"))?;
    let data = tempfile::Builder::new()
        .prefix("sluice-etcd")
        .tempdir_in(&args.etcd_data)?;
    let etcd = etcd(data.path())?;
    for c in &etcd.clients {
        let started = Instant::now();
        while !matches!(get(c.trim_start_matches("http://"), "/health").await, Ok((200, ref b)) if b.contains("true"))
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("etcd {c} never became healthy");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let endpoints = etcd
        .clients
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut edges = Vec::new();
    for i in 0..3 {
        edges.push(edge(
            &args.sluice,
            &dir,
            &format!("edge-{i}"),
            &endpoints,
            "bench",
        )?);
    }
    for e in &edges {
        ready(e, Duration::from_secs(60)).await?;
    }

    // 1. Heartbeat on edge i → listed on edge i+1.
    let mut lat = Vec::new();
    let mut senders = Vec::new();
    for e in &edges {
        senders.push(connect(e.heartbeat).await?);
    }
    for n in 0..args.samples {
        let (from, to) = (n % 3, (n + 1) % 3);
        let agent = format!("vis-{n}");
        let started = Instant::now();
        let status = post(&mut senders[from], heartbeat(&agent, 1, 0)).await?;
        if status != 200 {
            bail!("heartbeat refused: {status}");
        }
        let needle = format!("\"id\": \"{agent}\"");
        loop {
            let (_, body) = get(&edges[to].admin, "/debug/agents").await?;
            if body.contains(&needle) {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("{agent} never seen on edge {to}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        lat.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "{}",
        json!({"scenario": "visible_on_another_edge", "samples": lat.len(), "p50_ms": pct(&mut lat, 0.5), "p99_ms": pct(&mut lat, 0.99)})
    );

    // 2. Sustained heartbeats, changed then unchanged; raft proposals per unchanged one.
    let (rate, failed) = sustained(&edges, args.workers, args.seconds, true).await?;
    println!(
        "{}",
        json!({"scenario": "heartbeats_changed", "per_second": rate, "failed": failed, "workers": args.workers})
    );
    // One unchanged round first: the changed phase left other labels behind.
    sustained(&edges, args.workers, 1, false).await?;
    let before = proposals(&etcd).await;
    let (rate, failed) = sustained(&edges, args.workers, args.seconds, false).await?;
    let after = proposals(&etcd).await;
    let n = rate * args.seconds as f64;
    println!(
        "{}",
        json!({"scenario": "heartbeats_unchanged", "per_second": rate, "failed": failed, "proposals": after - before, "proposals_per_heartbeat": (after - before) / n.max(1.0)})
    );

    // 3. N agents × R resources written straight into etcd under another cluster; a fresh
    //    edge of that cluster lists them. Its RSS against an edge of an empty cluster.
    let client = etcd_client::Client::connect(etcd.clients.clone(), None).await?;
    let keys = sluice_core::agents::store::Keys::new("/sluice/", "big");
    let written = Instant::now();
    let mut kv = client.kv_client();
    let mut batch = Vec::new();
    for a in 0..args.agents {
        let id = format!("agent-{a:06}");
        let hb: serde_json::Value = serde_json::from_str(&heartbeat(&id, args.resources, 0))?;
        let record = json!({
            "address": format!("10.{}.{}.{}:3022", a >> 16 & 255, a >> 8 & 255, a & 255),
            "version": "17.1.0",
            "labels": {"gen": "0"},
            "resources": hb["resources"],
            "ttl_ms": 300000,
            "owner": "bench",
            "first_seen_unix_ms": 0,
        });
        batch.push(etcd_client::TxnOp::put(
            keys.agent(&id),
            serde_json::to_vec(&record)?,
            None,
        ));
        if batch.len() == 100 || a + 1 == args.agents {
            kv.txn(etcd_client::Txn::new().and_then(std::mem::take(&mut batch)))
                .await?;
        }
    }
    eprintln!("wrote {} agents in {:?}", args.agents, written.elapsed());
    let empty = edge(&args.sluice, &dir, "edge-empty", &endpoints, "nothing")?;
    ready(&empty, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(empty.proc.0.id());
    let fresh = edge(&args.sluice, &dir, "edge-fresh", &endpoints, "big")?;
    let took = ready(&fresh, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, store) = get(&fresh.admin, "/debug/store").await?;
    let listed: serde_json::Value = serde_json::from_str(&store)?;
    if listed["agents"].as_u64() != Some(args.agents as u64) {
        bail!("the fresh edge listed {} agents", listed["agents"]);
    }
    let rss = rss_kib(fresh.proc.0.id());
    let records = (args.agents * args.resources) as f64;
    println!(
        "{}",
        json!({"scenario": "fresh_edge_lists", "agents": args.agents, "resources": args.resources, "seconds_to_ready": took.as_secs_f64(), "rss_mib": rss as f64 / 1024.0, "bytes_per_record": (rss.saturating_sub(base) as f64 * 1024.0) / records})
    );
    Ok(())
}
