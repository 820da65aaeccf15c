//! Active health checks: one task per (pool, backend) probing on an interval, moving the
//! backend between unknown, healthy and unhealthy after `rise`/`fall` results in a row.
//!
//! Owns: the probes (tcp connect, TLS handshake with SNI and ALPN, HTTP/1.1 and HTTP/2 GET),
//! the state machine, and keeping one checker per backend object across reloads (a reload
//! that keeps a backend and its pool's check keeps the checker, and its state). It never
//! touches a connection: an unhealthy backend only stops getting new ones (`Pool::pick`).
//! Transitions are logged once, not per probe.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http_body_util::Empty;
use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{CheckKind, HealthCheck, ProxyProtocol};
use crate::observe::metrics::Metrics;
use crate::upstream::{Backend, Health, Pool};
use sluice_core::proxy::{self, HeaderInfo};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The host part of a backend as configured (`proxy-1.internal:3024` → `proxy-1.internal`).
fn host_of(name: &str) -> &str {
    let host = name.rsplit_once(':').map_or(name, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// One probe. `Err` says why it failed.
async fn probe(check: &HealthCheck, addr: SocketAddr, name: &str) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // The pool's PROXY header first, naming this probe's own addresses (a backend that
    // requires one refuses a connection without it).
    if check.proxy_protocol != ProxyProtocol::None {
        let info = HeaderInfo {
            client: tcp
                .local_addr()
                .map_err(|e| format!("local address: {e}"))?,
            local: addr,
            alpn: None,
            sni: None,
        };
        if let Some(header) =
            proxy::encode(check.proxy_protocol, &info).map_err(|e| format!("PROXY header: {e}"))?
        {
            tcp.write_all(&header)
                .await
                .map_err(|e| format!("PROXY header: {e}"))?;
        }
    }
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let host = check.host.as_deref().unwrap_or(host_of(name));
    let mut io: Box<dyn Io> = if check.tls {
        let mut alpn: Vec<&str> = check.alpn.iter().map(String::as_str).collect();
        if alpn.is_empty() {
            match check.kind {
                CheckKind::Http => alpn.push("http/1.1"),
                CheckKind::H2 => alpn.push("h2"),
                _ => {}
            }
        }
        let cfg = match &check.ca_file {
            Some(ca) => crate::tls::client::verified(ca, &alpn)?,
            None => crate::tls::client::unverified(&alpn),
        };
        let sni = check.sni.as_deref().unwrap_or(host);
        let server_name = rustls::pki_types::ServerName::try_from(sni.to_owned())
            .map_err(|e| format!("bad SNI `{sni}`: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        if !alpn.is_empty() {
            let chosen = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if !chosen
                .as_deref()
                .is_some_and(|c| alpn.iter().any(|a| a.as_bytes() == c))
            {
                return Err(format!(
                    "TLS handshake: the server chose no ALPN of {alpn:?}"
                ));
            }
        }
        if check.kind == CheckKind::Tls {
            return Ok(());
        }
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let status = match check.kind {
        CheckKind::H2 => h2_status(io, host, &check.path).await?,
        _ => http1_status(&mut io, host, &check.path).await?,
    };
    let (lo, hi) = check.expect_status;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}, expected {lo}-{hi}"))
    }
}

async fn http1_status(io: &mut Box<dyn Io>, host: &str, path: &str) -> Result<u16, String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: sluice-health-check\r\nconnection: close\r\n\r\n"
    );
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        if head.len() > 4096 {
            return Err("status line longer than 4 KiB".into());
        }
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a status line".into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!(
            "not an HTTP/1.x status line: {:?}",
            line.lines().next().unwrap_or("")
        )),
    }
}

async fn h2_status(io: Box<dyn Io>, host: &str, path: &str) -> Result<u16, String> {
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{host}{path}"))
        .header("user-agent", "sluice-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = send
        .send_request(req)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("HTTP/2 request: {e}"));
    driver.abort();
    result
}

/// Probe until `stop` fires or the backend object is gone.
async fn check_loop(
    backend: Weak<Backend>,
    pool: String,
    check: HealthCheck,
    stop: CancellationToken,
    healthy: IntGaugeVec,
    checks: IntCounterVec,
) {
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    let mut wait = check.jitter.mul_f64(rand::random::<f64>());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = check.interval + check.jitter.mul_f64(rand::random::<f64>());
        let Some(b) = backend.upgrade() else { return };
        let result =
            match tokio::time::timeout(check.timeout, probe(&check, b.address, &b.name)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", check.timeout)),
            };
        checks
            .with_label_values(&[pool.as_str(), if result.is_ok() { "ok" } else { "fail" }])
            .inc();
        let next = match &result {
            Ok(()) => {
                ok_run += 1;
                fail_run = 0;
                (ok_run >= check.rise).then_some(Health::Healthy)
            }
            Err(_) => {
                fail_run += 1;
                ok_run = 0;
                (fail_run >= check.fall).then_some(Health::Unhealthy)
            }
        };
        let Some(next) = next else { continue };
        let was = b.set_health(next);
        if was != next {
            healthy
                .with_label_values(&[pool.as_str(), b.name.as_str()])
                .set((next == Health::Healthy) as i64);
            match &result {
                Ok(()) => tracing::info!(pool = %pool, backend = %b.name, from = ?was,
                    successes = ok_run, "backend is healthy"),
                Err(why) => tracing::warn!(pool = %pool, backend = %b.name, from = ?was,
                    failures = fail_run, reason = %why, "backend is unhealthy"),
            }
        }
    }
}

/// One checker per (pool, backend object), kept across reloads while its check is unchanged.
#[derive(Default)]
pub struct Checkers {
    running: Mutex<HashMap<(String, usize), (HealthCheck, CancellationToken)>>,
}

impl Checkers {
    /// Make the running checkers match `pools` (the running snapshot's): start new ones, stop
    /// those whose backend or check is gone or changed.
    pub fn sync<'a>(&self, pools: impl IntoIterator<Item = &'a Arc<Pool>>, metrics: &Metrics) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut keep = HashMap::new();
        for pool in pools {
            let Some(check) = pool.health.clone() else {
                continue;
            };
            for b in pool.backends().iter() {
                let key = (pool.name.clone(), Arc::as_ptr(b) as usize);
                if let Some((old, token)) = running.remove(&key) {
                    if old == check {
                        keep.insert(key, (old, token));
                        continue;
                    }
                    token.cancel();
                }
                let token = CancellationToken::new();
                tokio::spawn(check_loop(
                    Arc::downgrade(b),
                    pool.name.clone(),
                    check.clone(),
                    token.clone(),
                    metrics.backend_healthy.clone(),
                    metrics.health_checks.clone(),
                ));
                keep.insert(key, (check.clone(), token));
            }
        }
        for (_, (_, token)) in running.drain() {
            token.cancel();
        }
        *running = keep;
    }

    pub fn stop_all(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (_, token)) in running.drain() {
            token.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("proxy-1.internal:3024"), "proxy-1.internal");
        assert_eq!(host_of("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(host_of("[2001:db8::1]:443"), "2001:db8::1");
    }
}
