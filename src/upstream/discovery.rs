//! DNS discovery: a pool's `dns` (A/AAAA) and `srv` names resolved with hickory-resolver,
//! re-resolved as the answers' TTLs run out (bounded by `dns_min_refresh`/`dns_max_refresh`).
//!
//! Owns: one task per pool that has names to resolve, which turns answers into the pool's
//! backend list. New addresses enter through the backend registry like a reload's new
//! backends (so they warm up for the pool's `min_ready`); addresses that disappear take no new
//! connections but keep their established ones (`Backend::remove`). A failed or empty answer
//! keeps that name's last good addresses, so a DNS outage never empties a pool; the last good
//! answers live in the pool and a reload hands those of the names it keeps to the new pool, so
//! a reload during an outage does not empty it either.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Instant;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, Discovery, DnsConfig, PoolConfig};
use crate::observe::metrics::Metrics;
use crate::upstream::Backends;
use crate::upstream::{Backend, Discovered, Pool};

/// Why DNS discovery cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("cannot read the system resolver configuration: {0}")]
    System(hickory_resolver::net::NetError),
    #[error("cannot build the resolver: {0}")]
    Build(hickory_resolver::net::NetError),
}

/// A resolver per the `[dns]` table: explicit nameservers, or the system's configuration.
pub fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, ResolverError> {
    let mut builder = match &cfg.nameservers {
        None => TokioResolver::builder_tokio().map_err(ResolverError::System)?,
        Some(list) => {
            let servers = list
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut ns.connections {
                        c.port = addr.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        }
    };
    let opts = builder.options_mut();
    opts.timeout = cfg.timeout;
    opts.attempts = 2;
    builder.build().map_err(ResolverError::Build)
}

/// What one round of lookups found for one name.
enum Answer {
    Found(Vec<SocketAddr>, Instant),
    Empty,
    Failed(String),
}

async fn lookup_name(resolver: &TokioResolver, host: &str, port: u16) -> Answer {
    match resolver.lookup_ip(host).await {
        Ok(found) => {
            let addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
            if addrs.is_empty() {
                Answer::Empty
            } else {
                Answer::Found(addrs, found.valid_until())
            }
        }
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Answer::Empty,
        Err(e) => Answer::Failed(e.to_string()),
    }
}

async fn lookup_srv(resolver: &TokioResolver, name: &str) -> Answer {
    let srv = match resolver.srv_lookup(name).await {
        Ok(s) => s,
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Answer::Empty,
        Err(e) => return Answer::Failed(e.to_string()),
    };
    let mut until = srv.valid_until();
    let mut addrs = Vec::new();
    for record in srv.answers() {
        let hickory_resolver::proto::rr::RData::SRV(record) = &record.data else {
            continue;
        };
        let target = record.target.to_string();
        match lookup_name(resolver, &target, record.port).await {
            Answer::Found(found, u) => {
                addrs.extend(found);
                until = until.min(u);
            }
            Answer::Empty => {}
            Answer::Failed(e) => return Answer::Failed(format!("SRV target {target}: {e}")),
        }
    }
    if addrs.is_empty() {
        Answer::Empty
    } else {
        Answer::Found(addrs, until)
    }
}

/// What discovery needs of the process: the narrow handle the runtime builds once.
pub struct Context {
    pub metrics: Metrics,
    /// The registry that gives a backend the same object (and connection count) in every
    /// pool and snapshot.
    pub backends: Arc<Backends>,
    /// Called after a pool's backends changed (the runtime matches its health checkers).
    pub changed: Box<dyn Fn() + Send + Sync>,
}

/// Resolve `pool`'s names with the resolver `dns` describes, until `stop` fires or the pool
/// or the runtime (`ctx`) is gone. `startup`: the first answers are ready at once (the
/// process has its own `min_ready`).
pub async fn run(
    ctx: Weak<Context>,
    dns: DnsConfig,
    pool: Weak<Pool>,
    cfg: PoolConfig,
    stop: CancellationToken,
    startup: bool,
) {
    let Some(d) = cfg.discovery.clone() else {
        return;
    };
    let resolver = {
        match resolver(&dns) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(pool = %cfg.name, error = %e, "DNS discovery cannot start");
                return;
            }
        }
    };
    let queries = queries(&d);
    // The last good answer of each name, carried over by a reload (`seed`).
    let mut last_good: Discovered = match pool.upgrade() {
        Some(p) => p.discovered(),
        None => return,
    };
    let mut first = true;
    loop {
        let mut next = d.max_refresh;
        for (name, query) in &queries {
            let answer = match query {
                Query::Name(host, port) => lookup_name(&resolver, host, *port).await,
                Query::Srv(srv) => lookup_srv(&resolver, srv).await,
            };
            let Some(ctx) = ctx.upgrade() else { return };
            let result = match answer {
                Answer::Found(addrs, until) => {
                    next = next.min(until.saturating_duration_since(Instant::now()));
                    last_good.insert(name.clone(), addrs);
                    "ok"
                }
                Answer::Empty => {
                    tracing::warn!(pool = %cfg.name, name = %name, kept = last_good.get(name).map_or(0, Vec::len),
                        "DNS answer is empty; keeping the last good addresses");
                    next = d.min_refresh;
                    "empty"
                }
                Answer::Failed(e) => {
                    tracing::warn!(pool = %cfg.name, name = %name, error = %e, kept = last_good.get(name).map_or(0, Vec::len),
                        "DNS lookup failed; keeping the last good addresses");
                    next = d.min_refresh;
                    "error"
                }
            };
            ctx.metrics
                .dns_resolutions
                .with_label_values(&[cfg.name.as_str(), result])
                .inc();
        }
        if stop.is_cancelled() {
            return;
        }
        let (Some(ctx), Some(pool)) = (ctx.upgrade(), pool.upgrade()) else {
            return;
        };
        let found: BTreeSet<SocketAddr> = last_good.values().flatten().copied().collect();
        pool.set_discovered(last_good.clone());
        update(&ctx, &pool, &cfg, &found, startup && first);
        first = false;
        drop((ctx, pool));
        let wait = next.clamp(d.min_refresh, d.max_refresh);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The configured backends plus `found`; swap the pool's list if it changed.
fn update(
    ctx: &Context,
    pool: &Pool,
    cfg: &PoolConfig,
    found: &BTreeSet<SocketAddr>,
    startup: bool,
) {
    let current = pool.backends();
    let configured: BTreeSet<SocketAddr> = cfg.backends.iter().map(|b| b.address).collect();
    let wanted: BTreeSet<SocketAddr> = configured.union(found).copied().collect();
    let have: BTreeSet<SocketAddr> = current.iter().map(|b| b.address).collect();
    if wanted == have {
        return;
    }
    let list: Vec<Arc<Backend>> = wanted
        .iter()
        .map(|addr| {
            let bc = cfg
                .backends
                .iter()
                .find(|b| b.address == *addr)
                .cloned()
                .unwrap_or_else(|| BackendConfig {
                    name: addr.to_string(),
                    address: *addr,
                    weight: 1,
                });
            ctx.backends.obtain(cfg, &bc, &ctx.metrics, !startup)
        })
        .collect();
    let added: Vec<String> = wanted.difference(&have).map(|a| a.to_string()).collect();
    let removed: Vec<String> = have.difference(&wanted).map(|a| a.to_string()).collect();
    for b in current.iter() {
        if !wanted.contains(&b.address) {
            b.remove(cfg.removed_drain_timeout);
        }
    }
    ctx.metrics
        .pool_backends
        .with_label_values(&[cfg.name.as_str()])
        .set(list.len() as i64);
    pool.set_backends(list);
    tracing::info!(pool = %cfg.name, added = ?added, removed = ?removed, "DNS: backends changed");
    (ctx.changed)();
}

/// One name to resolve, keyed by how the config writes it (`host:port`, or the SRV name).
enum Query {
    Name(String, u16),
    Srv(String),
}

fn queries(d: &Discovery) -> Vec<(String, Query)> {
    d.names
        .iter()
        .map(|(h, p)| (format!("{h}:{p}"), Query::Name(h.clone(), *p)))
        .chain(d.srv.iter().map(|s| (s.clone(), Query::Srv(s.clone()))))
        .collect()
}

/// A reload keeps what discovery found so far for the names a pool keeps: the new pool starts
/// with their last good answers (and those backends) instead of none until its first answer,
/// which may be a failure if DNS is down at that moment.
pub fn seed(new: &Pool, new_cfg: &PoolConfig, old: &Pool) {
    let Some(d) = &new_cfg.discovery else {
        return;
    };
    let wanted = queries(d);
    let mut kept = old.discovered();
    kept.retain(|key, _| wanted.iter().any(|(k, _)| k == key));
    if kept.is_empty() {
        return;
    }
    let old_list = old.backends();
    let mut list: Vec<Arc<Backend>> = new.backends().as_ref().clone();
    for addr in kept.values().flatten() {
        if list.iter().any(|b| b.address == *addr) {
            continue;
        }
        if let Some(b) = old_list.iter().find(|b| b.address == *addr) {
            list.push(b.clone());
        }
    }
    new.set_backends(list);
    new.set_discovered(kept);
}
