//! Several edges sharing one heartbeat table through a real etcd (Debian's `etcd-server`,
//! started by each test on loopback ports): what one edge is told, every edge knows and
//! routes by; they agree on affinity; goodbyes, stream ends and lease expiry are seen
//! everywhere; ownership holds across edges; and etcd failing (down, hung, one member of
//! three lost, compacted past an edge) loses nothing.

mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::control::server::Server;
use support::etcd::EtcdCluster;
use support::heartbeats::{
    agent_process, api, heartbeat, line, listed, open_stream, stream_end, visit,
};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "agents-token-0123456789";
const EAST: &str = "east-scoped-token-0123456789";
const WEST: &str = "west-scoped-token-0123456789";
const SNI: &str = "myapp.apps.example.com";

fn secrets() -> tempfile::TempDir {
    let dir = support::secrets(&format!(
        "{TOKEN} name=agents\n{EAST} name=east kinds=app\n{WEST} name=west kinds=app\n"
    ));
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    dir
}

/// An edge of cluster `test` on `endpoints` (TOML list), named `edge_id`.
fn config(dir: &Path, endpoints: &str, edge_id: &str, fb: SocketAddr) -> String {
    format!(
        r#"
[admin]
address = "127.0.0.1:0"

[cluster]
name = "test"
version = "17.2.0"

[store]
kind = "etcd"
endpoints = [{endpoints}]
edge_id = "{edge_id}"
timeout = "1s"

[heartbeat]
address = "127.0.0.1:0"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"
tokens_file = "{d}/tokens"
keep_expired = "3s"

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "heartbeat"
alpn = ["sluice-heartbeat"]
serve = "heartbeat"

[[route]]
name = "apps"
resource = {{ kind = "app", sni = "*.apps.example.com" }}
idle_timeout = "0s"

[[route]]
name = "rest"
pool = "p"

[pool.p]
backends = ["{fb}"]
"#,
        d = dir.display(),
    )
}

async fn start_edge(dir: &Path, endpoints: &str, edge_id: &str, fb: SocketAddr) -> Server {
    let server = start(&config(dir, endpoints, edge_id, fb), &[]).await;
    let admin = server.admin_addr().unwrap();
    eventually(&format!("{edge_id} has listed the store"), || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;
    server
}

async fn post(edge: &Server, token: &str, body: &str) -> (u16, String) {
    api(
        edge.heartbeat_addr().unwrap(),
        "POST",
        "/v1/heartbeats",
        Some(token),
        body,
    )
    .await
}

async fn goodbye(edge: &Server, token: &str, id: &str) -> (u16, String) {
    let path = format!("/v1/agents/{id}");
    api(
        edge.heartbeat_addr().unwrap(),
        "DELETE",
        &path,
        Some(token),
        "",
    )
    .await
}

/// The agent's state on `edge` (`None`: not listed).
async fn state(edge: &Server, id: &str) -> Option<String> {
    listed(edge.admin_addr().unwrap(), id)
        .await
        .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
}

async fn on_every(edges: &[Server], what: &str, id: &str, want: Option<&str>) {
    for (i, e) in edges.iter().enumerate() {
        eventually(&format!("{id} {what} on edge {i}"), || async {
            state(e, id).await.as_deref() == want
        })
        .await;
    }
}

fn hb_ttl(agent: &str, address: SocketAddr, ttl: &str) -> String {
    heartbeat(agent, address, "17.2.0", &["myapp"]).replace("\"60s\"", &format!("\"{ttl}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_edge_is_told_every_edge_knows_and_routes_by() {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let agents: Vec<RawBackend> = futures_join(["a1", "a2", "a3", "a4"]).await;
    let mut edges = Vec::new();
    for i in 0..3 {
        let id = format!("edge-{i}");
        edges.push(start_edge(dir.path(), &etcd.endpoints(), &id, fb.address).await);
    }

    // Each agent heartbeats to another edge; each is listed, ready, on every edge.
    for (i, a) in agents.iter().take(3).enumerate() {
        let body = heartbeat(&a.name, a.address, "17.2.0", &["myapp"]);
        let started = Instant::now();
        let (status, text) = post(&edges[i], TOKEN, &body).await;
        assert_eq!((status, text.as_str()), (200, "joined\n"));
        on_every(&edges, "is listed", &a.name, Some("ready")).await;
        eprintln!(
            "{} visible on every edge after {:?}",
            a.name,
            started.elapsed()
        );
    }
    // The same heartbeat again, to another edge: only the lease is renewed.
    let again = heartbeat("a1", agents[0].address, "17.2.0", &["myapp"]);
    assert_eq!(
        post(&edges[2], TOKEN, &again).await,
        (200, "keptalive\n".into())
    );
    let view: serde_json::Value = serde_json::from_str(
        &http_get(edges[1].admin_addr().unwrap(), "/debug/store")
            .await
            .1,
    )
    .unwrap();
    assert_eq!(view["kind"], "etcd");
    assert_eq!(view["connected"], true);
    assert_eq!(view["edge_id"], "edge-1");
    assert_eq!(view["agents"], 3);
    let a1 = listed(edges[1].admin_addr().unwrap(), "a1").await.unwrap();
    assert_eq!(a1["source"], "store");
    assert!(a1["expires_in_seconds"].is_null(), "etcd decides: {a1}");
    assert!(view["revision"].as_i64().unwrap() > 0);

    // Rendezvous is the default with etcd: every client gets the same agent on every edge.
    let mut first: HashMap<Ipv4Addr, String> = HashMap::new();
    for i in 0..60u8 {
        let client = Ipv4Addr::new(127, 0, 20, 10 + i);
        let on: Vec<String> = futures_visits(&edges, client).await;
        assert!(
            on.iter().all(|t| *t == on[0]),
            "{client}: the edges disagree: {on:?}"
        );
        first.insert(client, on[0].clone());
    }
    let spread: std::collections::HashSet<&String> = first.values().collect();
    assert_eq!(spread.len(), 3, "60 clients over three agents: {first:?}");

    // A fourth agent joins: every pinned client keeps its agent on every edge.
    let a4 = &agents[3];
    let (status, _) = post(
        &edges[1],
        TOKEN,
        &heartbeat("a4", a4.address, "17.2.0", &["myapp"]),
    )
    .await;
    assert_eq!(status, 200);
    on_every(&edges, "is listed", "a4", Some("ready")).await;
    for (client, agent) in &first {
        for e in &edges {
            assert_eq!(&visit(edge(e), *client, SNI).await, agent, "{client} moved");
        }
    }

    // A goodbye on one edge: gone at once from every edge (not listed as expired).
    assert_eq!(goodbye(&edges[0], TOKEN, "a2").await.0, 200);
    on_every(&edges, "is gone", "a2", None).await;
    assert_eq!(goodbye(&edges[1], TOKEN, "a2").await.0, 404);

    // Expiry belongs to etcd: a 2 s lease never renewed is expired on every edge, then
    // swept after keep_expired (3 s).
    let (status, _) = post(&edges[2], TOKEN, &hb_ttl("short", agents[1].address, "2s")).await;
    assert_eq!(status, 200);
    on_every(&edges, "is listed", "short", Some("ready")).await;
    on_every(&edges, "expired", "short", Some("expired")).await;
    on_every(&edges, "is swept", "short", None).await;

    // Ownership holds across edges: a scoped credential's agent is refused to another
    // scoped credential on every edge.
    let owned = heartbeat("owned", agents[1].address, "17.2.0", &["myapp"]);
    assert_eq!(post(&edges[0], EAST, &owned).await.0, 200);
    on_every(&edges, "is listed", "owned", Some("ready")).await;
    for e in &edges {
        let (status, body) = post(e, WEST, &owned).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(goodbye(e, WEST, "owned").await.0, 403);
    }
    assert_eq!(goodbye(&edges[2], EAST, "owned").await.0, 200);
    on_every(&edges, "is gone", "owned", None).await;

    // A heartbeat stream's end removes its agent from every edge.
    let mut p = agent_process(dir.path(), edge(&edges[1]), "streamed", agents[1].address);
    on_every(&edges, "is listed", "streamed", Some("ready")).await;
    p.kill().unwrap();
    p.wait().unwrap();
    on_every(&edges, "is gone", "streamed", None).await;
    assert!(
        metric(
            &edges[1],
            "sluice_heartbeats_total",
            &[("result", "stream_ended")]
        )
        .await
            >= 1.0
    );
    assert_eq!(metric(&edges[0], "sluice_store_connected", &[]).await, 1.0);
    // Each edge wrote through guarded transactions and renewed leases on its stream; the
    // watch hears from etcd every second (progress notifications).
    let ops = |op: &'static str| [("op", op), ("result", "ok")];
    assert!(metric(&edges[0], "sluice_store_operations_total", &ops("txn")).await >= 1.0);
    assert!(
        metric(
            &edges[2],
            "sluice_store_operations_total",
            &ops("keepalive")
        )
        .await
            >= 1.0
    );
    let age = metric(&edges[1], "sluice_store_last_event_age_seconds", &[]).await;
    assert!((0.0..3.0).contains(&age), "last event {age} s ago");
    for e in edges {
        e.shutdown().await;
    }
}

async fn futures_join<const N: usize>(names: [&str; N]) -> Vec<RawBackend> {
    let mut v = Vec::new();
    for n in names {
        v.push(RawBackend::start(n, false).await);
    }
    v
}

async fn futures_visits(edges: &[Server], client: Ipv4Addr) -> Vec<String> {
    let mut v = Vec::new();
    for e in edges {
        v.push(visit(edge(e), client, SNI).await);
    }
    v
}

/// A TCP relay between an edge and etcd that the test can cut (every connection dropped,
/// new ones closed) or make hang (connections held, nothing forwarded): etcd failing for one
/// edge only.
struct Relay {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    hung: Arc<AtomicBool>,
    drop_all: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Copy `r` to `w`, holding the bytes while `hung`.
async fn forward(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    hung: Arc<AtomicBool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while hung.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let hung = Arc::new(AtomicBool::new(false));
        let drop_all = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (c, h, d) = (cut.clone(), hung.clone(), drop_all.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let (h, mut dropped) = (h.clone(), d.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = forward(cr, sw, h.clone()) => {}
                        _ = forward(sr, cw, h) => {}
                        _ = dropped.changed() => {}
                    }
                });
            }
        });
        Relay {
            address,
            cut,
            hung,
            drop_all,
        }
    }

    fn endpoint(&self) -> String {
        format!("\"http://{}\"", self.address)
    }

    fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            self.drop_all.send_modify(|g| *g += 1);
        }
    }

    fn hang(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
    }
}

fn etcd_addr(etcd: &EtcdCluster, i: usize) -> SocketAddr {
    etcd.members[i]
        .client
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

/// A heartbeat to `edge` must be refused as `store_unavailable` within a few seconds.
async fn refused_fast(edge: &Server, body: &str) {
    let started = Instant::now();
    let (status, text) = post(edge, TOKEN, body).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.starts_with("store_unavailable"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused after {:?}",
        started.elapsed()
    );
}

async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_or_hung_keeps_routing_refuses_heartbeats_fast_and_loses_nothing() {
    let Some(mut etcd) = EtcdCluster::start(1) else {
        return;
    };
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let a1 = RawBackend::start("a1", false).await;
    let a2 = RawBackend::start("a2", false).await;
    let relay = Relay::start(etcd_addr(&etcd, 0)).await;
    // Edge 0 reaches etcd through the relay; edge 1 directly.
    let edges = [
        start_edge(dir.path(), &relay.endpoint(), "edge-0", fb.address).await,
        start_edge(dir.path(), &etcd.endpoints(), "edge-1", fb.address).await,
    ];
    let (e0, e1) = (&edges[0], &edges[1]);
    let body = heartbeat("a1", a1.address, "17.2.0", &["myapp"]);
    assert_eq!(post(e0, TOKEN, &body).await.0, 200);
    on_every(&edges, "is listed", "a1", Some("ready")).await;
    let client = Ipv4Addr::new(127, 0, 30, 1);

    // etcd hangs for edge 0: its heartbeats are refused within seconds, its heartbeat
    // readiness fails (agents go elsewhere), user traffic stays ready and routed.
    relay.hang(true);
    refused_fast(e0, &body).await;
    let (admin0, hb0) = (e0.admin_addr().unwrap(), e0.heartbeat_addr().unwrap());
    eventually("edge 0 notices the silent store", || async {
        get_status(admin0, "/readyz/heartbeat").await == 503
    })
    .await;
    assert_eq!(get_status(admin0, "/readyz").await, 200);
    assert_eq!(metric(e0, "sluice_store_connected", &[]).await, 0.0);
    let (status, text) = api(hb0, "GET", "/readyz", None, "").await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("store_unavailable"), "{text}");
    assert_eq!(visit(edge(e0), client, SNI).await, "a1");
    assert!(
        metric(
            e0,
            "sluice_heartbeats_total",
            &[("result", "store_unavailable")]
        )
        .await
            >= 1.0
    );
    relay.hang(false);
    eventually("edge 0 takes heartbeats again", || async {
        get_status(admin0, "/readyz/heartbeat").await == 200
    })
    .await;
    assert_eq!(post(e0, TOKEN, &body).await.0, 200);

    // etcd goes down for everyone: both edges route from their tables, expire nothing,
    // refuse heartbeats fast.
    etcd.kill(0);
    for e in &edges {
        refused_fast(e, &body).await;
        assert_eq!(visit(edge(e), client, SNI).await, "a1");
        assert_eq!(get_status(e.admin_addr().unwrap(), "/readyz").await, 200);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for e in &edges {
        assert_eq!(state(e, "a1").await.as_deref(), Some("ready"));
    }

    // etcd comes back with its data: heartbeats work again within seconds, nothing lost,
    // and the watch resumes (a new agent on one edge is seen by the other).
    etcd.restart(0);
    etcd.wait_healthy();
    for e in &edges {
        eventually("heartbeats are taken again", || async {
            post(e, TOKEN, &body).await.0 == 200
        })
        .await;
    }
    let b2 = heartbeat("a2", a2.address, "17.2.0", &["other"]);
    assert_eq!(post(e1, TOKEN, &b2).await.0, 200);
    on_every(&edges, "is listed", "a2", Some("ready")).await;
    assert_eq!(state(e0, "a1").await.as_deref(), Some("ready"));
    for e in edges {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_etcd_leader_costs_seconds_of_heartbeats_and_expires_nothing() {
    let Some(mut etcd) = EtcdCluster::start(3) else {
        return;
    };
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let a1 = RawBackend::start("a1", false).await;
    let mut edges = Vec::new();
    for i in 0..3 {
        let id = format!("edge-{i}");
        edges.push(start_edge(dir.path(), &etcd.endpoints(), &id, fb.address).await);
    }
    // A 3 s lease: had heartbeats stopped for longer, it would expire.
    let body = hb_ttl("a1", a1.address, "3s");
    assert_eq!(post(&edges[0], TOKEN, &body).await.0, 200);
    on_every(&edges, "is listed", "a1", Some("ready")).await;

    let leader = etcd.leader();
    let started = Instant::now();
    let mut refused: Vec<Duration> = Vec::new();
    let mut killed = false;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        if !killed && started.elapsed() > Duration::from_secs(1) {
            etcd.kill(leader);
            killed = true;
        }
        let (status, text) = post(&edges[n % 3], TOKEN, &body).await;
        if status != 200 {
            assert!(text.starts_with("store_unavailable"), "{status} {text}");
            refused.push(started.elapsed());
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{n} heartbeats, refused at {refused:?}");
    if let (Some(first), Some(last)) = (refused.first(), refused.last()) {
        assert!(
            *last - *first < Duration::from_secs(4),
            "heartbeats refused from {first:?} to {last:?}"
        );
    }
    for e in &edges {
        assert_eq!(state(e, "a1").await.as_deref(), Some("ready"));
    }
    etcd.restart(leader);
    for e in edges {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_lists_before_it_is_ready_and_relists_after_a_compaction() {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let a1 = RawBackend::start("a1", false).await;
    let a2 = RawBackend::start("a2", false).await;
    let e1 = start_edge(dir.path(), &etcd.endpoints(), "edge-1", fb.address).await;
    let b1 = heartbeat("a1", a1.address, "17.2.0", &["myapp"]);
    assert_eq!(post(&e1, TOKEN, &b1).await.0, 200);

    // An edge that cannot reach etcd at start is not ready, and takes no heartbeat.
    let relay = Relay::start(etcd_addr(&etcd, 0)).await;
    relay.cut(true);
    let e0 = start(
        &config(dir.path(), &relay.endpoint(), "edge-0", fb.address),
        &[],
    )
    .await;
    let admin0 = e0.admin_addr().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get_status(admin0, "/readyz").await, 503);
    assert_eq!(get_status(admin0, "/readyz/heartbeat").await, 503);
    relay.cut(false);
    eventually("edge 0 lists and is ready", || async {
        get_status(admin0, "/readyz").await == 200
    })
    .await;
    assert_eq!(state(&e0, "a1").await.as_deref(), Some("ready"));

    // Edge 0 is cut off while a1 leaves and a2 joins, and etcd compacts its history: when
    // it is back, it cannot resume, lists again, and agrees with edge 1.
    relay.cut(true);
    eventually("edge 0 notices", || async {
        get_status(admin0, "/readyz/heartbeat").await == 503
    })
    .await;
    assert_eq!(goodbye(&e1, TOKEN, "a1").await.0, 200);
    let b2 = heartbeat("a2", a2.address, "17.2.0", &["myapp"]);
    assert_eq!(post(&e1, TOKEN, &b2).await.0, 200);
    let out = etcd.ctl(&["get", "/", "--prefix", "--keys-only", "-w", "json"]);
    let rev = serde_json::from_str::<serde_json::Value>(&out).unwrap()["header"]["revision"]
        .as_i64()
        .unwrap();
    etcd.ctl(&["compact", &rev.to_string()]);
    let relists = metric(&e0, "sluice_store_relists_total", &[]).await;
    relay.cut(false);
    eventually("edge 0 relists", || async {
        metric(&e0, "sluice_store_relists_total", &[]).await > relists
    })
    .await;
    assert_eq!(state(&e0, "a2").await.as_deref(), Some("ready"));
    assert_eq!(
        state(&e0, "a1").await,
        None,
        "a1's goodbye marker is listed with the rest"
    );

    // An edge restarted comes back with the whole table.
    e1.shutdown().await;
    let e1 = start_edge(dir.path(), &etcd.endpoints(), "edge-1", fb.address).await;
    assert_eq!(state(&e1, "a2").await.as_deref(), Some("ready"));
    assert_eq!(
        visit(edge(&e1), Ipv4Addr::new(127, 0, 31, 1), SNI).await,
        "a2"
    );
    e0.shutdown().await;
    e1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_another_edge_took_over_is_not_ended_by_the_first_edge() {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let a1 = RawBackend::start("a1", false).await;
    let edges = [
        start_edge(dir.path(), &etcd.endpoints(), "edge-0", fb.address).await,
        start_edge(dir.path(), &etcd.endpoints(), "edge-1", fb.address).await,
    ];
    let beat = || line(heartbeat("roamer", a1.address, "17.2.0", &["myapp"]));
    let (first, first_end) = open_stream(edges[0].heartbeat_addr().unwrap(), TOKEN).await;
    first.send(beat()).await.unwrap();
    on_every(&edges, "is listed", "roamer", Some("ready")).await;
    let owner = || etcd.ctl(&["get", "/sluice/test/agents/roamer", "--print-value-only"]);
    assert!(owner().contains(r#""edge":"edge-0""#), "{}", owner());

    // The agent reconnects through edge 1 before edge 0 noticed its first stream died.
    let (second, second_end) = open_stream(edges[1].heartbeat_addr().unwrap(), TOKEN).await;
    second.send(beat()).await.unwrap();
    eventually("edge 1's stream owns the record", || async {
        owner().contains(r#""edge":"edge-1""#)
    })
    .await;
    // The first stream ends now: the record is edge 1's, so it stays on every edge.
    drop(first);
    assert_eq!(stream_end(first_end).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for e in &edges {
        assert_eq!(state(e, "roamer").await.as_deref(), Some("ready"));
    }
    // Its own stream's end removes it everywhere.
    drop(second);
    assert_eq!(stream_end(second_end).await.0, 200);
    on_every(&edges, "is gone", "roamer", None).await;
    for e in edges {
        e.shutdown().await;
    }
}

/// A CA, etcd's server certificate for 127.0.0.1 and a client certificate for user `sluice`.
fn etcd_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "etcd CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    for (name, san, usage) in [
        ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", "sluice", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![san.to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, san);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reaches_etcd_over_tls_with_a_client_certificate_and_a_password() {
    let certs = tempfile::tempdir().unwrap();
    etcd_certs(certs.path());
    let Some(mut etcd) = EtcdCluster::start_tls(certs.path()) else {
        return;
    };
    // Authentication on: sluice's user may read and write its cluster's keys only.
    etcd.ctl(&["user", "add", "root", "--new-user-password=root-pw"]);
    etcd.ctl(&["user", "add", "sluice", "--new-user-password=edge-pw"]);
    etcd.ctl(&["role", "add", "edge"]);
    etcd.ctl(&[
        "role",
        "grant-permission",
        "edge",
        "--prefix=true",
        "readwrite",
        "/sluice/test/",
    ]);
    etcd.ctl(&["user", "grant-role", "sluice", "edge"]);
    etcd.ctl(&["auth", "enable"]);
    etcd.user = Some("root:root-pw".into());

    let dir = secrets();
    let c = certs.path().display();
    std::fs::write(dir.path().join("etcd-password"), "edge-pw\n").unwrap();
    let fb = RawBackend::start("fallback", false).await;
    let a1 = RawBackend::start("a1", false).await;
    let secure = |password_file: &str| {
        config(dir.path(), &etcd.endpoints(), "edge-tls", fb.address).replace(
            "timeout = \"1s\"",
            &format!(
                "timeout = \"1s\"\nca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/client.pem\"\nkey_file = \"{c}/client-key.pem\"\nusername = \"sluice\"\npassword_file = \"{}/{password_file}\"",
                dir.path().display()
            ),
        )
    };
    let text = secure("etcd-password");
    let e = start(&text, &[]).await;
    let admin = e.admin_addr().unwrap();
    eventually("the TLS edge lists the store", || async {
        get_status(admin, "/readyz").await == 200
    })
    .await;
    let body = heartbeat("a1", a1.address, "17.2.0", &["myapp"]);
    assert_eq!(post(&e, TOKEN, &body).await.0, 200);
    let stored = etcd.ctl(&["get", "/sluice/test/agents/a1", "--print-value-only"]);
    assert!(stored.contains("\"owner\":\"agents\""), "{stored}");
    e.shutdown().await;

    // A wrong password: the edge never lists, so it is never ready.
    std::fs::write(dir.path().join("wrong-password"), "nope\n").unwrap();
    let e = start(&secure("wrong-password"), &[]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get_status(e.admin_addr().unwrap(), "/readyz").await, 503);
    let view: serde_json::Value =
        serde_json::from_str(&http_get(e.admin_addr().unwrap(), "/debug/store").await.1).unwrap();
    assert_eq!(view["connected"], false);
    e.shutdown().await;
}
