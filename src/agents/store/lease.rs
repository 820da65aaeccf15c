//! Lease keep-alives for every agent on a few shared gRPC streams.
//!
//! `etcd-client`'s `LeaseKeeper` opens one stream per lease; 100,000 agents would be 100,000
//! streams. etcd's keep-alive stream takes any lease id and answers each request in order, so
//! one stream serves many leases: requests go out through the stream's sender (a
//! `LeaseKeeper` made for each id, sharing it), answers come back by lease id. etcd handles
//! one stream's requests one after another (a renewal that reaches a follower is forwarded to
//! the leader), so an edge opens `STREAMS` of them and spreads the leases by id. Each stream
//! is opened on a lease of the edge's own (agents' leases come and go), which it also keeps
//! alive.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, LeaseKeeper};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The edge's own lease: what the shared stream is opened on.
const EDGE_LEASE_TTL: i64 = 10;

/// Keep-alive streams per edge: renewals in flight at once.
const STREAMS: usize = 8;

type Waiting = Arc<Mutex<HashMap<i64, VecDeque<oneshot::Sender<i64>>>>>;

struct Open {
    keeper: LeaseKeeper,
    waiting: Waiting,
    closed: CancellationToken,
}

pub struct KeepAlives {
    streams: [tokio::sync::Mutex<Option<Open>>; STREAMS],
}

impl Default for KeepAlives {
    fn default() -> Self {
        KeepAlives {
            streams: std::array::from_fn(|_| tokio::sync::Mutex::new(None)),
        }
    }
}

fn lock(w: &Waiting) -> std::sync::MutexGuard<'_, HashMap<i64, VecDeque<oneshot::Sender<i64>>>> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl KeepAlives {
    /// Renew `lease`: its remaining TTL in seconds (0 or less: the lease is gone).
    pub async fn renew(&self, client: &Client, lease: i64) -> Result<i64, String> {
        let (tx, rx) = oneshot::channel();
        {
            let slot = lease.rem_euclid(STREAMS as i64) as usize;
            let mut open = self.streams[slot].lock().await;
            if open.as_ref().is_none_or(|o| o.closed.is_cancelled()) {
                *open = Some(Self::open(client).await?);
            }
            let Some(o) = open.as_ref() else {
                return Err("no keep-alive stream".into());
            };
            lock(&o.waiting).entry(lease).or_default().push_back(tx);
            let mut keeper = LeaseKeeper {
                id: lease,
                sender: o.keeper.sender.clone(),
            };
            if let Err(e) = keeper.keep_alive().await {
                o.closed.cancel();
                return Err(format!("keep-alive stream closed: {e}"));
            }
        }
        rx.await
            .map_err(|_| "the keep-alive stream broke before answering".to_owned())
    }

    async fn open(client: &Client) -> Result<Open, String> {
        let mut leases = client.lease_client();
        let edge = leases
            .grant(EDGE_LEASE_TTL, None)
            .await
            .map_err(|e| format!("granting the edge's lease: {e}"))?
            .id();
        let (keeper, mut stream) = leases
            .keep_alive(edge)
            .await
            .map_err(|e| format!("opening the keep-alive stream: {e}"))?;
        let waiting: Waiting = Arc::default();
        let closed = CancellationToken::new();
        let own = LeaseKeeper {
            id: edge,
            sender: keeper.sender.clone(),
        };
        let (w, c) = (waiting.clone(), closed.clone());
        tokio::spawn(async move {
            let mut own = own;
            let mut tick = tokio::time::interval(Duration::from_secs(EDGE_LEASE_TTL as u64 / 3));
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {
                        if own.keep_alive().await.is_err() {
                            break;
                        }
                    }
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            let (id, ttl) = (resp.id(), resp.ttl());
                            if id == edge && ttl <= 0 {
                                tracing::warn!("the edge's own etcd lease expired; reopening the keep-alive stream");
                                break;
                            }
                            let tx = lock(&w).get_mut(&id).and_then(VecDeque::pop_front);
                            if let Some(tx) = tx {
                                let _ = tx.send(ttl);
                            }
                            lock(&w).retain(|_, q| !q.is_empty());
                        }
                        Ok(None) => {
                            tracing::warn!("etcd closed the lease keep-alive stream");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the lease keep-alive stream broke");
                            break;
                        }
                    },
                }
            }
            c.cancel();
            // Waiters see their sender dropped: the request failed.
            lock(&w).clear();
        });
        Ok(Open {
            keeper,
            waiting,
            closed,
        })
    }

    /// Close the streams (the store's client is going away).
    pub async fn close(&self) {
        for s in &self.streams {
            if let Some(o) = s.lock().await.take() {
                o.closed.cancel();
            }
        }
    }
}
