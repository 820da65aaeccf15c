//! Micro-benchmarks of sluice's pure parts: the ClientHello parser, the route table, and the
//! balancers. `cargo bench -p sluice-bench` (or `bench/run.sh`, which records the figures).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{rngs::SmallRng, SeedableRng};
use sluice_core::balance::{Balance, Candidate, HashKey, PickContext};
use sluice_core::hello::{self, Parse};
use sluice_core::route::{AlpnPattern, Facts, Match, RouteTable, SniPattern, TlsFacts};

const TUNNEL_HELLO: &[u8] = include_bytes!("../../tests/fixtures/openssl-3.0-tunnel.bin");
const PQ_HELLO: &[u8] = include_bytes!("../../tests/fixtures/chromium-pq-h2.bin");

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("hello_parse");
    for (name, bytes) in [
        ("openssl_tunnel_517B", TUNNEL_HELLO),
        ("chromium_pq_2008B", PQ_HELLO),
    ] {
        assert!(matches!(hello::parse(bytes), Parse::Hello { .. }), "{name}");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(name, |b| b.iter(|| hello::parse(black_box(bytes))));
    }
    g.finish();
}

/// 1000 routes, each for one SNI name (`svc{i}.example.com`, or `*.t{i}.example.com` for the
/// wildcard group) and the h2 ALPN, then a catch-all; the connection matches route `hit`
/// (0 = first, 999 = last) or none of the named ones (the catch-all).
fn routes(c: &mut Criterion) {
    for (group, pattern, cases) in [
        (
            "route_select_1000",
            "svc{}.example.com",
            [
                ("first", "svc0.example.com", 0),
                ("last", "svc999.example.com", 999),
                ("catch_all", "other.example.org", 1000),
            ],
        ),
        (
            "route_select_1000_wildcard",
            "*.t{}.example.com",
            [
                ("first", "db.t0.example.com", 0),
                ("last", "db.t999.example.com", 999),
                ("catch_all", "db.other.example.org", 1000),
            ],
        ),
    ] {
        route_group(c, group, pattern, &cases);
    }
}

fn route_group(c: &mut Criterion, group: &str, pattern: &str, cases: &[(&str, &str, usize)]) {
    let mut table = Vec::new();
    for i in 0..1000 {
        table.push((
            Match {
                listeners: None,
                alpn: Some(vec![
                    AlpnPattern::parse("h2"),
                    AlpnPattern::parse("http/1.1"),
                ]),
                sni: Some(vec![SniPattern::parse(
                    &pattern.replace("{}", &i.to_string()),
                )
                .expect("pattern")]),
                tls: true,
            },
            i,
        ));
    }
    table.push((
        Match {
            listeners: None,
            alpn: None,
            sni: None,
            tls: true,
        },
        1000,
    ));
    let table = RouteTable::new(table);
    let alpn = vec!["h2".to_string(), "http/1.1".to_string()];
    let mut g = c.benchmark_group(group);
    for &(label, sni, want) in cases {
        let facts = Facts {
            listener: "edge",
            tls: Some(TlsFacts {
                sni: Some(sni),
                alpn: &alpn,
            }),
        };
        assert_eq!(table.select(&facts), Some(&want));
        g.bench_function(label, |b| b.iter(|| table.select(black_box(&facts))));
    }
    g.finish();
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer_pick");
    let mut rng = SmallRng::seed_from_u64(7);
    for n in [3usize, 100] {
        let candidates: Vec<Candidate> = (0..n)
            .map(|i| Candidate {
                weight: 1 + (i % 3) as u32,
                active: (i * 7 % 13) as u64,
                id: sluice_core::balance::fnv1a(format!("10.0.0.{i}:3024").as_bytes()),
            })
            .collect();
        for (name, balance) in [
            ("random", Balance::Random),
            ("round_robin", Balance::RoundRobin),
            ("least_conn", Balance::LeastConn),
            ("p2c", Balance::P2c),
            ("hash_client_ip", Balance::Hash(HashKey::ClientIp)),
        ] {
            let ctx = PickContext {
                exclude: &[],
                hash_key: Some(b"203.0.113.9"),
                rr_ticket: 12345,
            };
            g.bench_with_input(BenchmarkId::new(name, n), &candidates, |b, cands| {
                b.iter(|| balance.pick(black_box(cands), &ctx, &mut rng))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, parse, routes, pick);
criterion_main!(benches);
