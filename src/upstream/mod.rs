//! Upstream: pools of backends, and connecting to one of them.
//!
//! Owns: per-backend state that outlives a single connection (active connection count, used by
//! least_conn and p2c), the connect-with-retry loop, and the socket options of the backend leg.
//! A connect is retried on another backend because nothing but the buffered hello is pending:
//! no byte has reached any backend yet. It never retries once bytes were written.

pub mod balancer;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};

use crate::config::{Keepalive, PoolConfig, ProxyProtocol};
use crate::metrics::Metrics;
use balancer::{fnv1a, Balance, Candidate, HashKey, PickContext};

/// One backend address. Shared by every connection using it.
#[derive(Debug)]
pub struct Backend {
    /// As configured (`proxy-1:3024`); also the metric label.
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    id: u64,
    active: AtomicU64,
    active_gauge: IntGauge,
}

impl Backend {
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

/// Holds one active-connection count on a backend for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    fn new(b: Arc<Backend>) -> Self {
        b.active.fetch_add(1, Ordering::Relaxed);
        b.active_gauge.inc();
        ActiveGuard(b)
    }
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.active_gauge.dec();
    }
}

pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub proxy_protocol: ProxyProtocol,
    pub keepalive: Keepalive,
    rr: AtomicU64,
    connect_seconds: Histogram,
    unavailable: IntCounter,
}

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("pool {pool} has no backend left to try after {attempts} attempt(s): {last}")]
    Exhausted {
        pool: String,
        attempts: u32,
        last: String,
    },
}

#[derive(Serialize)]
pub struct BackendView<'a> {
    pub name: &'a str,
    pub address: SocketAddr,
    pub weight: u32,
    pub active: u64,
}

#[derive(Serialize)]
pub struct PoolView<'a> {
    pub name: &'a str,
    pub balance: Balance,
    pub backends: Vec<BackendView<'a>>,
}

impl Pool {
    pub fn new(cfg: &PoolConfig, metrics: &Metrics) -> Pool {
        let backends = cfg
            .backends
            .iter()
            .map(|b| {
                Arc::new(Backend {
                    name: b.name.clone(),
                    address: b.address,
                    weight: b.weight,
                    id: fnv1a(b.address.to_string().as_bytes()),
                    active: AtomicU64::new(0),
                    active_gauge: metrics
                        .backend_active
                        .with_label_values(&[cfg.name.as_str(), b.name.as_str()]),
                })
            })
            .collect::<Vec<_>>();
        metrics
            .pool_backends
            .with_label_values(&[cfg.name.as_str()])
            .set(backends.len() as i64);
        Pool {
            name: cfg.name.clone(),
            backends,
            balance: cfg.balance,
            connect_timeout: cfg.connect_timeout,
            retries: cfg.retries,
            proxy_protocol: cfg.proxy_protocol,
            keepalive: cfg.keepalive,
            rr: AtomicU64::new(0),
            connect_seconds: metrics
                .connect_seconds
                .with_label_values(&[cfg.name.as_str()]),
            unavailable: metrics.unavailable.with_label_values(&[cfg.name.as_str()]),
        }
    }

    pub fn view(&self) -> PoolView<'_> {
        PoolView {
            name: &self.name,
            balance: self.balance,
            backends: self
                .backends
                .iter()
                .map(|b| BackendView {
                    name: &b.name,
                    address: b.address,
                    weight: b.weight,
                    active: b.active(),
                })
                .collect(),
        }
    }

    /// Choose a backend, skipping those in `exclude`. `rr_ticket` is the connection's
    /// round-robin position (one per connection, not per attempt: otherwise a dead backend
    /// would be every connection's first try).
    pub fn pick(
        &self,
        exclude: &[usize],
        client: SocketAddr,
        sni: Option<&str>,
        rr_ticket: u64,
    ) -> Option<usize> {
        let candidates: Vec<Candidate> = self
            .backends
            .iter()
            .map(|b| Candidate {
                weight: b.weight,
                active: b.active(),
                id: b.id,
            })
            .collect();
        let ip_key;
        let hash_key: Option<&[u8]> = match self.balance {
            Balance::Hash(HashKey::Sni) if sni.is_some() => sni.map(str::as_bytes),
            Balance::Hash(_) => {
                ip_key = ip_bytes(client);
                Some(&ip_key)
            }
            _ => None,
        };
        let ctx = PickContext {
            exclude,
            hash_key,
            rr_ticket,
        };
        self.balance.pick(&candidates, &ctx, &mut rand::rng())
    }

    /// Connect to a backend of this pool, retrying others on failure.
    pub async fn connect(
        &self,
        client: SocketAddr,
        sni: Option<&str>,
        metrics: &Metrics,
    ) -> Result<(TcpStream, ActiveGuard), ConnectError> {
        let mut tried: Vec<usize> = Vec::new();
        let mut last = String::from("no backends");
        let ticket = self.rr.fetch_add(1, Ordering::Relaxed);
        for attempt in 0..=self.retries {
            let Some(i) = self.pick(&tried, client, sni, ticket + attempt as u64) else {
                break;
            };
            tried.push(i);
            let backend = &self.backends[i];
            let started = Instant::now();
            match connect_one(backend.address, self.connect_timeout, &self.keepalive).await {
                Ok(stream) => {
                    self.connect_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok((stream, ActiveGuard::new(backend.clone())));
                }
                Err(e) => {
                    let reason = failure_reason(&e);
                    metrics
                        .connect_failures
                        .with_label_values(&[self.name.as_str(), reason])
                        .inc();
                    tracing::warn!(
                        pool = %self.name, backend = %backend.name, address = %backend.address,
                        reason, error = %e, "backend connect failed"
                    );
                    last = format!("{} ({}): {e}", backend.name, backend.address);
                }
            }
        }
        self.unavailable.inc();
        Err(ConnectError::Exhausted {
            pool: self.name.clone(),
            attempts: tried.len() as u32,
            last,
        })
    }
}

fn ip_bytes(addr: SocketAddr) -> Vec<u8> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

async fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: &Keepalive,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    crate::listener::apply_keepalive(&socket2::SockRef::from(&socket), keepalive)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

fn failure_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        _ => "other",
    }
}
