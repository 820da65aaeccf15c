//! The agent heartbeat table at cluster scale (issue 5's figures): fill it with N agents × R
//! resources, then run heartbeat writers and router-style lookups at the same time.
//! Prints one JSON line: apply rates, lookup latency under concurrent heartbeats, and resident
//! bytes per (resource, agent) record.
//!
//! Agents come in pairs announcing the same resources (the high-availability shape of the
//! seeds), so 100,000 agents × 10 resources are 1,000,000 records over 500,000 resources.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::Rng;
use sluice::upstream::Backend;
use sluice_core::agents::table::{
    AgentState, AgentTable, Announced, Heartbeat, ResourceKey, Rules, Version,
};

#[derive(Parser)]
struct Opts {
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    #[arg(long, default_value_t = 10)]
    resources: usize,
    /// Length of the concurrent phase.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Heartbeat writer threads and lookup threads in the concurrent phase.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    #[arg(long, default_value_t = 1)]
    readers: usize,
}

fn rss_kib() -> u64 {
    sluice_bench::vm_rss_kib("self").unwrap_or(0)
}

fn heartbeat(i: usize, per: usize, ttl: u64) -> Heartbeat {
    let pair = i / 2;
    Heartbeat {
        agent: format!("agent-{i:06}"),
        address: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 3022)),
        version: Version::parse("17.1.0"),
        labels: vec![("region".into(), format!("r{}", i % 8).into())].into_boxed_slice(),
        ttl,
        resources: (0..per)
            .map(|j| Announced {
                key: ResourceKey::new("app", &format!("app-{}", pair * per + j)),
                labels: Box::new([]),
            })
            .collect(),
    }
}

fn main() {
    let o = Opts::parse();
    let new_backend = |id: &str, a: SocketAddr| Backend::for_agent(id, a, Default::default());
    let table = Arc::new(AgentTable::new(10_000_000, 0));
    let rules = Rules {
        cluster_version: Version::parse("17.2.0"),
    };
    let ttl = 900_000;
    // Build the heartbeats first so that their memory is not counted as the table's.
    let beats: Vec<Heartbeat> = (0..o.agents)
        .map(|i| heartbeat(i, o.resources, ttl))
        .collect();
    let before = rss_kib();
    let t0 = Instant::now();
    for hb in &beats {
        table
            .apply(hb.clone(), "bench", false, 0, 1, &new_backend)
            .expect("applied");
    }
    let fill = t0.elapsed().as_secs_f64();
    let after = rss_kib();
    let records = o.agents * o.resources;
    // The clones the table kept are the table; the originals are freed below.
    let bytes_per_record = (after.saturating_sub(before) * 1024) as f64 / records as f64;

    let beats = Arc::new(beats);
    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    let changed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..o.writers {
        let (table, beats, stop, applied, changed) = (
            table.clone(),
            beats.clone(),
            stop.clone(),
            applied.clone(),
            changed.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut now = 2;
            while !stop.load(Ordering::Relaxed) {
                let i = rng.random_range(0..beats.len());
                let mut hb = beats[i].clone();
                // One heartbeat in 100 changes the agent's labels (a real update: the agent
                // and its records are rebuilt); the rest are keep-alives.
                if rng.random_ratio(1, 100) {
                    hb.labels = vec![("region".into(), format!("w{w}-{now}").into())].into();
                    changed.fetch_add(1, Ordering::Relaxed);
                }
                now += 1;
                let new_backend =
                    |id: &str, a: SocketAddr| Backend::for_agent(id, a, Default::default());
                table
                    .apply(hb, "bench", false, 0, now, &new_backend)
                    .expect("applied");
                applied.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..o.readers {
        let (table, stop) = (table.clone(), stop.clone());
        let (agents, per) = (o.agents, o.resources);
        readers.push(std::thread::spawn(move || {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let mut rng = rand::rng();
            let mut missing = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = rng.random_range(0..(agents / 2).max(1) * per);
                let name = format!("app-{r}");
                let t = Instant::now();
                // What the router does per connection: find the records, keep eligible ones.
                let key = ResourceKey::new("app", &name);
                let eligible = table.lookup(&key).map_or(0, |recs| {
                    recs.iter()
                        .filter(|rec| rules.state(&rec.agent, 10) == AgentState::Ready)
                        .count()
                });
                let ns = t.elapsed().as_nanos() as u64;
                if eligible == 0 {
                    missing += 1;
                }
                let _ = hist.record(ns.max(1));
            }
            (hist, missing)
        }));
    }
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("writer");
    }
    let elapsed = t1.elapsed().as_secs_f64();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let mut missing = 0;
    for r in readers {
        let (h, m) = r.join().expect("reader");
        hist.add(&h).expect("same bounds");
        missing += m;
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "agent_table",
            "agents": o.agents,
            "resources_per_agent": o.resources,
            "records": records,
            "distinct_resources": table.resource_count(),
            "fill_seconds": fill,
            "fill_heartbeats_per_s": o.agents as f64 / fill,
            "bytes_per_record": bytes_per_record,
            "rss_kib_before": before,
            "rss_kib_after": after,
            "writers": o.writers,
            "readers": o.readers,
            "heartbeats_per_s_concurrent": applied.load(Ordering::Relaxed) as f64 / elapsed,
            "changes": changed.load(Ordering::Relaxed),
            "lookups": hist.len(),
            "lookups_per_s": hist.len() as f64 / elapsed,
            "lookup_p50_ns": hist.value_at_quantile(0.5),
            "lookup_p99_ns": hist.value_at_quantile(0.99),
            "lookup_p999_ns": hist.value_at_quantile(0.999),
            "lookup_max_ns": hist.max(),
            "lookups_without_agent": missing,
        })
    );
}
