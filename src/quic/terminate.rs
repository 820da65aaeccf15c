//! QUIC termination for routes with `quic = "terminate"`: sluice accepts the QUIC connection
//! with quinn and bridges each bidirectional stream to a new TCP connection to a backend of
//! the route's pool (behind an optional PROXY header naming the QUIC client).
//!
//! Owns: one quinn endpoint per such route, on 127.0.0.1, fed by the QUIC listener exactly like
//! a passthrough backend (the listener routed the flow by its ClientHello, and keeps
//! following the client across address changes, so quinn never sees one), the map from a
//! flow's socket to its real client (for PROXY headers), and the stream bridges. A reload
//! builds a new endpoint for new flows; the old one serves its connections until they end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;
use crate::upstream::Pool;
use sluice_core::proxy::{self, HeaderInfo};

/// Why a route's QUIC endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the certificate's TLS config cannot serve QUIC: {0}")]
    Tls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot open the QUIC endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
}

/// Why a stream's bridge ended early. The stream is then reset (and its receiving side
/// stopped) with `code()`, so the client can tell a failed stream from a finished one.
#[derive(Debug, thiserror::Error)]
enum BridgeError {
    #[error(transparent)]
    Connect(#[from] crate::upstream::ConnectError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The application error code of a stream reset because no backend could be connected.
pub const RESET_BACKEND_UNAVAILABLE: u32 = 0x5301;
/// ...because the backend connection failed after it was established.
pub const RESET_BACKEND_ERROR: u32 = 0x5302;

impl BridgeError {
    fn code(&self) -> u32 {
        match self {
            BridgeError::Connect(_) => RESET_BACKEND_UNAVAILABLE,
            BridgeError::Io(_) => RESET_BACKEND_ERROR,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            BridgeError::Connect(_) => "backend_unavailable",
            BridgeError::Io(_) => "backend_error",
        }
    }
}

pub struct Terminator {
    /// Where the QUIC listener sends this route's flows.
    pub address: SocketAddr,
    /// The port of each flow's socket toward `address` → the QUIC client behind it.
    clients: Mutex<HashMap<u16, SocketAddr>>,
    /// Stops accepting (the route was replaced); open connections go on.
    stop: CancellationToken,
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Terminator {
    /// Start the endpoint of route `route` with `tls` (its certificate; ALPN as configured).
    pub fn start(
        route: &str,
        tls: Arc<rustls::ServerConfig>,
        pool: Arc<Pool>,
        metrics: Arc<TerminatorMetrics>,
    ) -> Result<Arc<Terminator>, StartError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let t = Arc::new(Terminator {
            address: endpoint.local_addr()?,
            clients: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept(
            endpoint,
            Arc::downgrade(&t),
            t.stop.clone(),
            pool,
            route.to_owned(),
            metrics,
        ));
        Ok(t)
    }

    /// A flow's socket (its local port) carries `client`'s connection.
    pub fn register(&self, port: u16, client: SocketAddr) {
        self.lock().insert(port, client);
    }

    pub fn unregister(&self, port: u16) {
        self.lock().remove(&port);
    }

    fn client_of(&self, peer: SocketAddr) -> SocketAddr {
        self.lock().get(&peer.port()).copied().unwrap_or(peer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, SocketAddr>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the bridges need from the metrics.
pub struct TerminatorMetrics {
    pub metrics: Arc<Metrics>,
}

async fn accept(
    endpoint: quinn::Endpoint,
    me: std::sync::Weak<Terminator>,
    stop: CancellationToken,
    pool: Arc<Pool>,
    route: String,
    m: Arc<TerminatorMetrics>,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Some(t) = me.upgrade() else { break };
        let client = t.client_of(incoming.remote_address());
        drop(t);
        let (pool, route, m) = (pool.clone(), route.clone(), m.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%client, route = %route, error = %e, "QUIC handshake failed");
                    return;
                }
            };
            let (sni, alpn) = match conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            {
                Some(d) => (
                    d.server_name.clone(),
                    d.protocol.map(|p| String::from_utf8_lossy(&p).into_owned()),
                ),
                None => (None, None),
            };
            tracing::debug!(%client, route = %route, ?sni, ?alpn, "QUIC connection terminated");
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (pool, m, sni, alpn) = (pool.clone(), m.clone(), sni.clone(), alpn.clone());
                let route = route.clone();
                tokio::spawn(async move {
                    if let Err(e) = bridge(send, recv, client, &pool, &m, sni, alpn).await {
                        m.metrics
                            .quic_stream_resets
                            .with_label_values(&[route.as_str(), e.reason()])
                            .inc();
                        tracing::debug!(%client, route = %route, error = %e,
                            "QUIC stream reset: its backend failed");
                    }
                });
            }
        });
    }
    // Open connections keep the endpoint's driver alive until they close.
}

/// One QUIC stream ↔ one new TCP connection to a backend of the pool. On a backend failure
/// the stream is reset with the failure's code rather than finished.
async fn bridge(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    client: SocketAddr,
    pool: &Pool,
    m: &TerminatorMetrics,
    sni: Option<String>,
    alpn: Option<String>,
) -> Result<(), BridgeError> {
    let result = relay(&mut send, &mut recv, client, pool, m, sni, alpn).await;
    if let Err(e) = &result {
        let code = quinn::VarInt::from_u32(e.code());
        let _ = send.reset(code);
        let _ = recv.stop(code);
    }
    result
}

async fn relay(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    client: SocketAddr,
    pool: &Pool,
    m: &TerminatorMetrics,
    sni: Option<String>,
    alpn: Option<String>,
) -> Result<(), BridgeError> {
    // Nothing to send first: the PROXY header names this connection's own local address.
    let (dialed, _guard) = pool
        .connect(client, sni.as_deref(), &[], &m.metrics)
        .await?;
    dialed.arm_keepalive()?;
    let mut tcp = dialed.stream;
    let info = HeaderInfo {
        client,
        local: tcp.local_addr()?,
        alpn: alpn.as_deref(),
        sni: sni.as_deref(),
    };
    if let Some(header) = proxy::encode(pool.proxy_protocol, &info)? {
        tcp.write_all(&header).await?;
    }
    // Both directions ending cleanly finishes the stream (copy_bidirectional shuts the
    // writing side down).
    let mut quic = tokio::io::join(recv, send);
    tokio::io::copy_bidirectional(&mut quic, &mut tcp).await?;
    Ok(())
}
