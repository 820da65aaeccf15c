//! DNS discovery against a real DNS server on 127.0.0.1 (a tiny one here, built on
//! hickory-proto) whose records change during the test: addresses added and removed, a
//! failing server, an empty answer, and SRV records.

mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

/// What the server answers: A records by name, SRV records by name, or SERVFAIL for all.
#[derive(Default)]
struct Zone {
    a: HashMap<String, Vec<Ipv4Addr>>,
    srv: HashMap<String, Vec<(String, u16)>>,
    fail: bool,
}

async fn dns_server(zone: Arc<Mutex<Zone>>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.metadata.recursion_desired = query.metadata.recursion_desired;
            reply.metadata.recursion_available = true;
            reply.metadata.authoritative = true;
            {
                let zone = zone.lock().unwrap();
                if zone.fail {
                    reply.metadata.response_code = ResponseCode::ServFail;
                }
                for q in &query.queries {
                    reply.add_query(q.clone());
                    let name = q.name().to_string().trim_end_matches('.').to_owned();
                    if zone.fail {
                        continue;
                    }
                    match q.query_type() {
                        RecordType::A => {
                            for ip in zone.a.get(&name).into_iter().flatten() {
                                reply.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    1,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                        RecordType::SRV => {
                            for (target, port) in zone.srv.get(&name).into_iter().flatten() {
                                let target = Name::from_ascii(format!("{target}.")).unwrap();
                                reply.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    1,
                                    RData::SRV(SRV::new(0, 0, *port, target)),
                                ));
                            }
                        }
                        _ => {}
                    }
                }
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = sock.send_to(&bytes, peer).await;
            }
        }
    });
    addr
}

fn conf(dns: SocketAddr, pool_keys: &str) -> String {
    one_pool_config(
        "127.0.0.1:0",
        &format!("[dns]\nnameservers = [\"{dns}\"]\ntimeout = \"500ms\""),
        &format!(
            "balance = \"round_robin\"\nretries = 0\ndns_min_refresh = \"100ms\"\n\
             dns_max_refresh = \"1s\"\n{pool_keys}"
        ),
    )
}

async fn names(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(open_tunnel(addr).await.1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_added_removed_failing_and_empty() {
    let a = Flaky::start("A", "127.0.0.1:0").await;
    let port = a.address.port();
    let _b = Flaky::start("B", &format!("127.0.0.2:{port}")).await;
    let zone = Arc::new(Mutex::new(Zone::default()));
    zone.lock()
        .unwrap()
        .a
        .insert("proxies.test".into(), vec![Ipv4Addr::new(127, 0, 0, 1)]);
    let dns = dns_server(zone.clone()).await;
    let server = start(&conf(dns, &format!("dns = [\"proxies.test:{port}\"]")), &[]).await;
    let addr = edge(&server);
    eventually("the first answer is in", || async {
        server.rt.snapshot().pools["p"].backends().len() == 1
    })
    .await;
    assert!(names(addr, 4).await.iter().all(|n| n == "A"));
    let (mut tunnel, _) = open_tunnel(addr).await;

    // A second address appears.
    zone.lock().unwrap().a.insert(
        "proxies.test".into(),
        vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)],
    );
    eventually("B is discovered", || async {
        names(addr, 2).await.contains(&"B".to_owned())
    })
    .await;

    // The first one goes: no new connections to it, its tunnel lives on.
    zone.lock()
        .unwrap()
        .a
        .insert("proxies.test".into(), vec![Ipv4Addr::new(127, 0, 0, 2)]);
    eventually("A is gone from the pool", || async {
        server.rt.snapshot().pools["p"].backends().len() == 1
    })
    .await;
    assert!(names(addr, 4).await.iter().all(|n| n == "B"));
    tunnel.write_all(b"x").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut rest = String::new();
    tunnel.read_to_string(&mut rest).await.unwrap();
    assert!(rest.starts_with("A got "), "{rest}");

    // The server fails, then answers nothing: the last good set stays.
    zone.lock().unwrap().fail = true;
    eventually("failures counted", || async {
        metric(
            &server,
            "sluice_dns_resolutions_total",
            &[("result", "error")],
        )
        .await
            >= 2.0
    })
    .await;
    assert!(names(addr, 3).await.iter().all(|n| n == "B"));
    {
        let mut z = zone.lock().unwrap();
        z.fail = false;
        z.a.clear();
    }
    eventually("empty answers counted", || async {
        metric(
            &server,
            "sluice_dns_resolutions_total",
            &[("result", "empty")],
        )
        .await
            >= 2.0
    })
    .await;
    assert!(names(addr, 3).await.iter().all(|n| n == "B"));
    assert_eq!(server.rt.snapshot().pools["p"].backends().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_targets_and_ports() {
    let a = Flaky::start("A", "127.0.0.1:0").await;
    let b = Flaky::start("B", "127.0.0.1:0").await;
    let zone = Arc::new(Mutex::new(Zone::default()));
    {
        let mut z = zone.lock().unwrap();
        z.a.insert("proxy-a.test".into(), vec![Ipv4Addr::LOCALHOST]);
        z.a.insert("proxy-b.test".into(), vec![Ipv4Addr::LOCALHOST]);
        z.srv.insert(
            "_tunnel._tcp.proxies.test".into(),
            vec![
                ("proxy-a.test".into(), a.address.port()),
                ("proxy-b.test".into(), b.address.port()),
            ],
        );
    }
    let dns = dns_server(zone.clone()).await;
    let server = start(&conf(dns, "srv = [\"_tunnel._tcp.proxies.test\"]"), &[]).await;
    let addr = edge(&server);
    eventually("both SRV targets", || async {
        server.rt.snapshot().pools["p"].backends().len() == 2
    })
    .await;
    let seen = names(addr, 4).await;
    assert!(
        seen.contains(&"A".to_owned()) && seen.contains(&"B".to_owned()),
        "{seen:?}"
    );
}

/// Backend A found as proxies.test; the zone, the config text and the running sluice.
async fn discovered_one() -> (
    Flaky,
    Arc<Mutex<Zone>>,
    String,
    sluice::control::server::Server,
) {
    let a = Flaky::start("A", "127.0.0.1:0").await;
    let port = a.address.port();
    let zone = Arc::new(Mutex::new(Zone::default()));
    zone.lock()
        .unwrap()
        .a
        .insert("proxies.test".into(), vec![Ipv4Addr::LOCALHOST]);
    let dns = dns_server(zone.clone()).await;
    let text = conf(dns, &format!("dns = [\"proxies.test:{port}\"]"));
    let server = start(&text, &[]).await;
    eventually("discovered", || async {
        server.rt.snapshot().pools["p"].backends().len() == 1
    })
    .await;
    (a, zone, text, server)
}

/// A reload that keeps a pool's names keeps what discovery found (no window without backends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_discovered_backends() {
    let (_a, _zone, text, server) = discovered_one().await;
    let cfg = sluice::config::parse(
        std::path::Path::new("t.toml"),
        &text.replace("retries = 0", "retries = 1"),
    )
    .unwrap();
    server.rt.apply(cfg).await.unwrap();
    assert_eq!(
        server.rt.snapshot().pools["p"].backends().len(),
        1,
        "the new pool starts with the discovered backend"
    );
    assert_eq!(open_tunnel(edge(&server)).await.1, "A");
}

/// A reload while the DNS server fails keeps the discovered backends: the new pool starts
/// from the old one's last good answer, and its own first (failed) lookup changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_dns_outage_keeps_discovered_backends() {
    let (_a, zone, text, server) = discovered_one().await;
    zone.lock().unwrap().fail = true;
    let errors = || async {
        metric(
            &server,
            "sluice_dns_resolutions_total",
            &[("pool", "p"), ("result", "error")],
        )
        .await
    };
    eventually("the outage is seen", || async { errors().await >= 1.0 }).await;
    let cfg = sluice::config::parse(
        std::path::Path::new("t.toml"),
        &text.replace("retries = 0", "retries = 1"),
    )
    .unwrap();
    server.rt.apply(cfg).await.unwrap();
    // Three more failures: at most one is the old pool's last round, so the new pool's
    // discovery has failed twice and its first round's update has run.
    let before = errors().await;
    eventually("the new pool's lookups fail", || async {
        errors().await >= before + 3.0
    })
    .await;
    assert_eq!(
        server.rt.snapshot().pools["p"].backends().len(),
        1,
        "the reload emptied the pool during the outage"
    );
    assert_eq!(open_tunnel(edge(&server)).await.1, "A");
}
