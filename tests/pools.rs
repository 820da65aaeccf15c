//! How a pool chooses among its backends, end to end: weights, hashing on SNI and on the
//! client address (the PROXY-supplied one behind a load balancer), passive ejection's
//! bounds (the doubling capped by `eject_max_time`, failures forgotten after a success, a
//! pool whose every backend is ejected) and the global connection cap.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sluice_core::hello::build;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// A connection from `source` (a 127.0.0.x address) with `first` as its first bytes; the
/// backend's first line (its name).
async fn visit_from(source: Ipv4Addr, addr: SocketAddr, first: &[u8]) -> String {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((source, 0))).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    read_line(&mut s).await
}

fn pool_config(backends: &[String], pool_extra: &str) -> String {
    let list = backends.join(", ");
    one_pool_config(
        "127.0.0.1:0",
        "",
        &format!("backends = [{list}]\n{pool_extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_splits_by_weight() {
    let heavy = RawBackend::start("heavy", false).await;
    let light = RawBackend::start("light", false).await;
    let backends = [
        format!("{{ address = \"{}\", weight = 3 }}", heavy.address),
        format!("{{ address = \"{}\", weight = 1 }}", light.address),
    ];
    let server = start(
        &pool_config(&backends, "balance = \"round_robin\"\nretries = 0"),
        &[],
    )
    .await;
    let addr = edge(&server);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..8 {
        *seen.entry(open_tunnel(addr).await.1).or_default() += 1;
    }
    // Round robin walks the weight line: exactly 3 of every 4 connections go to `heavy`.
    assert_eq!(seen.get("heavy"), Some(&6), "{seen:?}");
    assert_eq!(seen.get("light"), Some(&2), "{seen:?}");
    let (_, pools) = http_get(server.admin_addr().unwrap(), "/debug/pools").await;
    assert!(pools.contains("\"weight\": 3"), "{pools}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_sni_keeps_each_name_on_one_backend() {
    let bs = [
        RawBackend::start("a", false).await,
        RawBackend::start("b", false).await,
        RawBackend::start("c", false).await,
    ];
    let list: Vec<String> = bs.iter().map(|b| format!("\"{}\"", b.address)).collect();
    let server = start(
        &pool_config(&list, "balance = \"hash\"\nhash_key = \"sni\"\nretries = 0"),
        &[],
    )
    .await;
    let addr = edge(&server);
    let mut owner: HashMap<String, String> = HashMap::new();
    for i in 0..20 {
        let sni = format!("tenant{i}.example.com");
        let hello = build::hello(Some(&sni), &["h2"]);
        // The same name from three client addresses: the name decides, not the client.
        for source in 2..5 {
            let got = visit_from(Ipv4Addr::new(127, 0, 0, source), addr, &hello).await;
            let first = owner.entry(sni.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{sni} moved between backends");
        }
    }
    // 20 names over 3 backends: all on one happens with probability 3 * 3^-20.
    let used: HashSet<&String> = owner.values().collect();
    assert!(
        used.len() >= 2,
        "every name hashed to one backend: {owner:?}"
    );
    server.shutdown().await;
}

/// Behind a load balancer, `hash` on the client address means the PROXY-supplied address:
/// every connection of one end client lands on the same backend whichever LB node (here,
/// source address) carried it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_client_ip_uses_the_proxy_supplied_address() {
    let bs = [
        RawBackend::start("a", false).await,
        RawBackend::start("b", false).await,
        RawBackend::start("c", false).await,
    ];
    let list: Vec<String> = bs.iter().map(|b| format!("\"{}\"", b.address)).collect();
    let config = pool_config(&list, "balance = \"hash\"\nretries = 0").replace(
        "address = \"127.0.0.1:0\"\n\n[[route]]",
        "address = \"127.0.0.1:0\"\naccept_proxy = \"v2\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n[[route]]",
    );
    assert!(config.contains("accept_proxy"), "{config}");
    let server = start(&config, &[]).await;
    let addr = edge(&server);
    let mut owner: HashMap<Ipv4Addr, String> = HashMap::new();
    for i in 0..20u8 {
        let client = Ipv4Addr::new(198, 51, 100, i + 1);
        let mut first = sluice_core::proxy::encode(
            sluice::config::ProxyProtocol::V2,
            &sluice_core::proxy::HeaderInfo {
                client: SocketAddr::from((client, 40000 + u16::from(i))),
                local: "203.0.113.1:443".parse().unwrap(),
                alpn: None,
                sni: None,
            },
        )
        .unwrap()
        .unwrap();
        first.extend_from_slice(&tunnel_hello());
        // Seven load-balancer nodes: were the real source hashed, all seven would land on
        // one backend for every client with probability 3^-6.
        for lb_node in 2..9 {
            let got = visit_from(Ipv4Addr::new(127, 0, 0, lb_node), addr, &first).await;
            let first_seen = owner.entry(client).or_insert_with(|| got.clone());
            assert_eq!(*first_seen, got, "client {client} moved between backends");
        }
    }
    let used: HashSet<&String> = owner.values().collect();
    assert!(
        used.len() >= 2,
        "every client hashed to one backend: {owner:?}"
    );
    server.shutdown().await;
}

/// The refused connects counted so far.
async fn refused(server: &sluice::control::server::Server) -> f64 {
    metric(
        server,
        "sluice_upstream_connect_failures_total",
        &[("reason", "refused")],
    )
    .await
}

async fn ejections(server: &sluice::control::server::Server, backend: SocketAddr) -> f64 {
    metric(
        server,
        "sluice_backend_ejections_total",
        &[("backend", &backend.to_string())],
    )
    .await
}

/// Connect through the edge until the refused-connect counter has grown by one: the
/// connection whose first try was the dead backend (round robin alternates).
async fn until_refused_once(server: &sluice::control::server::Server) {
    let before = refused(server).await;
    for _ in 0..10 {
        assert_eq!(
            open_tunnel(edge(server)).await.1,
            "live",
            "the retry hides it"
        );
        if refused(server).await > before {
            assert_eq!(refused(server).await, before + 1.0);
            return;
        }
    }
    panic!("no connection tried the dead backend");
}

/// `eject_after_failures` counts failures in a row: a success in between starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_resets_the_consecutive_failures() {
    let live = RawBackend::start("live", false).await;
    let mut flaky = Flaky::start("flaky", "127.0.0.1:0").await;
    let list = [
        format!("\"{}\"", flaky.address),
        format!("\"{}\"", live.address),
    ];
    let server = start(
        &pool_config(
            &list,
            "balance = \"round_robin\"\nretries = 1\neject_after_failures = 2\neject_time = \"30s\"",
        ),
        &[],
    )
    .await;
    flaky.kill_listener().await;
    until_refused_once(&server).await;
    // It comes back and serves one connection...
    flaky.revive().await;
    eventually("the revived backend serves", || async {
        open_tunnel(edge(&server)).await.1 == "flaky"
    })
    .await;
    // ...so one more failure is the first of a new run, not the second in a row.
    flaky.kill_listener().await;
    until_refused_once(&server).await;
    assert_eq!(ejections(&server, flaky.address).await, 0.0);
    // The second in a row ejects it.
    until_refused_once(&server).await;
    assert_eq!(ejections(&server, flaky.address).await, 1.0);
    server.shutdown().await;
}

/// Each ejection in a row lasts twice the one before, up to `eject_max_time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eject_max_time_caps_the_doubling() {
    let live = RawBackend::start("live", false).await;
    let dead = dead_address().await;
    let list = [format!("\"{dead}\""), format!("\"{}\"", live.address)];
    let server = start(
        &pool_config(
            &list,
            "balance = \"round_robin\"\nretries = 1\neject_after_failures = 1\n\
             eject_time = \"1s\"\neject_max_time = \"1500ms\"\nmax_ejected_percent = 50",
        ),
        &[],
    )
    .await;
    let admin = server.admin_addr().unwrap();
    let ejected_for = || async {
        let (_, body) = http_get(admin, "/debug/pools").await;
        let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
        pools[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == dead.to_string())
            .map(|b| b["ejected_for_seconds"].as_f64().unwrap())
            .unwrap()
    };
    for (round, length) in [(1.0, 1.0), (2.0, 1.5), (3.0, 1.5)] {
        let before = Instant::now();
        until_refused_once(&server).await;
        assert_eq!(ejections(&server, dead).await, round);
        // Read after the ejection: never more than its length (without the cap the second
        // would be 2 s and the third 4 s); close to it when read soon after.
        let left = ejected_for().await;
        assert!(
            left <= length,
            "ejection {round}: {left} s left, cap {length} s"
        );
        if before.elapsed() < Duration::from_millis(300) {
            assert!(left > length - 0.3, "ejection {round}: only {left} s left");
        }
        eventually("the ejection ends", || async { ejected_for().await == 0.0 }).await;
    }
    server.shutdown().await;
}

/// A pool whose only backend is ejected still tries it (Envoy's panic mode): ejection must
/// not turn a short outage into a long one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_every_backend_ejected_still_tries_them() {
    let mut only = Flaky::start("only", "127.0.0.1:0").await;
    let server = start(
        &pool_config(
            &[format!("\"{}\"", only.address)],
            "retries = 0\neject_after_failures = 1\neject_time = \"5m\"",
        ),
        &[],
    )
    .await;
    let addr = edge(&server);
    only.kill_listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(5)).await,
        Some(vec![])
    );
    assert_eq!(ejections(&server, only.address).await, 1.0);
    only.revive().await;
    // Ejected for 5 minutes, but the only one: the next connection gets through.
    assert_eq!(open_tunnel(addr).await.1, "only");
    server.shutdown().await;
}

/// `[limits] max_connections` caps connections across listeners: at the cap, a new
/// connection waits in the backlog (not refused, not dropped) until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_connection_cap_holds_new_connections_until_one_ends() {
    let b = RawBackend::start("b", false).await;
    let config = one_pool_config(
        "127.0.0.1:0",
        "[limits]\nmax_connections = 2",
        &format!("backends = [\"{}\"]", b.address),
    ) + "\n[[listener]]\nname = \"second\"\naddress = \"127.0.0.1:0\"\n";
    let server = start(&config, &[]).await;
    let first = edge(&server);
    let second = server.listener_addr("second").unwrap();
    assert_eq!(metric(&server, "sluice_max_connections", &[]).await, 2.0);
    let (one, _) = open_tunnel(first).await;
    let (_two, _) = open_tunnel(second).await;
    // Two connections, one on each listener: the cap is reached, and a third is accepted by
    // the kernel but not by sluice. (It goes to `edge`, whose accept loop has waited for a
    // slot longest: a freed slot goes to the loop that asked first.)
    let waiting = tokio::spawn(async move { open_tunnel(first).await });
    eventually("the accept loops wait for a slot", || async {
        metric(
            &server,
            "sluice_accept_paused_total",
            &[("listener", "edge"), ("cap", "global")],
        )
        .await
            >= 1.0
    })
    .await;
    let accepted = |listener: &'static str| {
        let server = &server;
        async move {
            metric(
                server,
                "sluice_connections_accepted_total",
                &[("listener", listener)],
            )
            .await
        }
    };
    assert_eq!(accepted("edge").await + accepted("second").await, 2.0);
    assert!(!waiting.is_finished());
    let active = metric(
        &server,
        "sluice_connections_active",
        &[("listener", "edge")],
    )
    .await
        + metric(
            &server,
            "sluice_connections_active",
            &[("listener", "second")],
        )
        .await;
    assert_eq!(active, 2.0);
    drop(one);
    let (_three, name) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("admitted once a connection ended")
        .unwrap();
    assert_eq!(name, "b");
    assert_eq!(accepted("edge").await, 2.0);
    server.shutdown().await;
}

/// A backend drained at run time (admin API) or by `weight = 0` takes no new connection and
/// keeps its established ones; it stays drained across a reload while it stays configured,
/// and shows as `draining` in `/debug/pools` and in `sluice_backend_draining`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_keeps_its_connections_and_gets_no_new_ones() {
    let (a, b) = (
        RawBackend::start("a", false).await,
        RawBackend::start("b", false).await,
    );
    let text = one_pool_config(
        "127.0.0.1:0",
        "",
        &format!(
            "backends = [\"{}\", \"{}\"]\nbalance = \"round_robin\"",
            a.address, b.address
        ),
    );
    let server = start(&text, &[]).await;
    let admin = server.admin_addr().unwrap();
    let edge = edge(&server);
    // One established tunnel on each.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(open_tunnel(edge).await);
    }
    let on_b = held.iter().position(|(_, tag)| tag == "b").unwrap();
    let drain = format!("/-/pools/p/backends/{}/drain", b.address);
    let (status, body) = http_request(admin, "POST", &drain).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("draining (1 connections open)"), "{body}");
    assert_eq!(http_request(admin, "GET", &drain).await.0, 405);
    assert_eq!(
        http_request(admin, "POST", "/-/pools/p/backends/10.9.9.9:1/drain")
            .await
            .0,
        404
    );
    assert_eq!(
        http_request(admin, "POST", "/-/pools/nope/backends/x/drain")
            .await
            .0,
        404
    );
    // New connections all go to a; b's tunnel still relays.
    for _ in 0..6 {
        assert_eq!(open_tunnel(edge).await.1, "a");
    }
    let (s, _) = &mut held[on_b];
    s.write_all(b"still here").await.unwrap();
    let (_, pools) = http_get(admin, "/debug/pools").await;
    assert!(pools.contains("\"draining\""), "{pools}");
    let labels = [("pool", "p"), ("backend", &*b.address.to_string())];
    assert_eq!(
        metric(&server, "sluice_backend_draining", &labels).await,
        1.0
    );
    // A reload keeps it drained while b stays in the config.
    let cfg = sluice::config::parse(
        std::path::Path::new("t.toml"),
        &text.replace("round_robin", "random"),
    )
    .unwrap();
    server.rt.apply(cfg).await.unwrap();
    for _ in 0..6 {
        assert_eq!(open_tunnel(edge).await.1, "a");
    }
    // Undrained: b takes connections again.
    let undrain = format!("/-/pools/p/backends/{}/undrain", b.address);
    assert_eq!(http_request(admin, "POST", &undrain).await.0, 200);
    let mut tags = std::collections::HashSet::new();
    for _ in 0..20 {
        tags.insert(open_tunnel(edge).await.1);
    }
    assert!(tags.contains("b"), "{tags:?}");
    assert_eq!(
        metric(&server, "sluice_backend_draining", &labels).await,
        0.0
    );
    // weight = 0 in the config drains it too, and the admin API cannot undrain that.
    let zero = text.replace(
        &format!("\"{}\"]", b.address),
        &format!("{{ address = \"{}\", weight = 0 }}]", b.address),
    );
    assert!(zero.contains("weight = 0"));
    server
        .rt
        .apply(sluice::config::parse(std::path::Path::new("t.toml"), &zero).unwrap())
        .await
        .unwrap();
    for _ in 0..6 {
        assert_eq!(open_tunnel(edge).await.1, "a");
    }
    assert_eq!(http_request(admin, "POST", &undrain).await.0, 409);
    server.shutdown().await;
}
