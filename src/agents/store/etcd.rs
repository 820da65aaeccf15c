//! The heartbeat table in etcd v3 (3.4 and later), shared by every edge of a cluster.
//!
//! One key per agent, `<prefix><cluster>/agents/<id>`, on the agent's own lease (TTL: the
//! heartbeat's). A heartbeat that repeats the stored record only renews the lease (no write,
//! no watch event); one that changes something is a transaction guarded on the key's
//! `mod_revision` (or on its absence). A goodbye, or the end of the stream that owns the
//! record, deletes the key in a guarded transaction that also writes a short-lived
//! `gone/<id>` marker, so that watchers tell a departure from a lease expiry; then the
//! agent's lease is revoked. The decisions are `sluice_core::agents::store`'s.
//!
//! Every operation has `store.timeout`: an etcd that hangs gets the request answered
//! `store_unavailable` within it, as one that refuses does.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::lease::KeepAlives;
use super::{StoreView, WriteError};
use crate::agents::{AgentTable, Agents};
use crate::config::{StoreConfig, StoreKind};
use crate::observe::metrics::Metrics;
use crate::upstream::Backend;
use sluice_core::agents::store::{write_for, Keys, Record, StreamOwner, Write};
use sluice_core::agents::table::{Applied, Heartbeat, Refused, Source, StoreMeta};

/// How long a goodbye's marker lives: long enough for every watcher to see it with the
/// deletion (they see both in one revision), short enough to leave nothing behind.
const MARKER_TTL: i64 = 10;
/// Guarded writes retried after losing to another edge's write.
const ATTEMPTS: usize = 4;

/// Makes the dial target of an agent (the process's `Agents::new_backend`).
pub type NewBackend = Arc<dyn Fn(&str, SocketAddr) -> Arc<Backend> + Send + Sync>;

pub struct Etcd {
    pub keys: Keys,
    pub edge_id: String,
    config: StoreConfig,
    pub(super) table: Arc<AgentTable>,
    pub(super) new_backend: NewBackend,
    pub(super) metrics: Metrics,
    client: arc_swap::ArcSwapOption<Client>,
    keep_alives: KeepAlives,
    pub(super) connected: AtomicBool,
    pub(super) listed: AtomicBool,
    pub(super) revision: AtomicI64,
    /// When the watch last delivered something (ms, `Agents::now`); 0: never.
    pub(super) last_event: AtomicU64,
    pub(super) relists: AtomicU64,
}

/// What the store holds for one agent: its record, the revision that wrote it, its lease.
#[derive(Debug, Clone)]
struct Current {
    record: Record,
    mod_revision: i64,
    lease: i64,
}

/// The wall clock, ms since the Unix epoch (records carry first-seen times in it).
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The edge's name when `store.edge_id` is not set: the host name.
pub fn default_edge_id() -> String {
    let name = hostname();
    if sluice_core::config::store_name_ok(&name) {
        name
    } else {
        format!("edge-{}", std::process::id())
    }
}

/// The host name: `$HOSTNAME` (a Kubernetes pod's name), else the kernel's, else
/// `/etc/hostname` (under systemd's `ProcSubset=pid`, /proc/sys is hidden).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Etcd {
    pub fn new(
        config: &StoreConfig,
        cluster: &str,
        table: Arc<AgentTable>,
        new_backend: NewBackend,
        metrics: Metrics,
    ) -> Arc<Etcd> {
        debug_assert_eq!(config.kind, StoreKind::Etcd);
        Arc::new(Etcd {
            keys: Keys::new(&config.prefix, cluster),
            edge_id: config.edge_id.clone().unwrap_or_else(default_edge_id),
            config: config.clone(),
            table,
            new_backend,
            metrics,
            client: arc_swap::ArcSwapOption::empty(),
            keep_alives: KeepAlives::default(),
            connected: AtomicBool::new(false),
            listed: AtomicBool::new(false),
            revision: AtomicI64::new(0),
            last_event: AtomicU64::new(0),
            relists: AtomicU64::new(0),
        })
    }

    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(super) fn set_connected(&self, up: bool, why: &str) {
        let was = self.connected.swap(up, Ordering::Relaxed);
        self.metrics.store_connected.set(up as i64);
        if was != up {
            if up {
                tracing::info!(edge_id = %self.edge_id, endpoints = ?self.config.endpoints, "heartbeat store connected");
            } else {
                tracing::warn!(edge_id = %self.edge_id, reason = why, "heartbeat store connection lost; routing from the last table");
            }
        }
    }

    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    pub fn view(&self, agents: usize) -> StoreView {
        let last = self.last_event.load(Ordering::Relaxed);
        StoreView {
            kind: "etcd",
            connected: self.connected(),
            listed: self.listed(),
            revision: Some(self.revision.load(Ordering::Relaxed)),
            agents,
            edge_id: Some(self.edge_id.clone()),
            endpoints: self.config.endpoints.clone(),
            cluster_prefix: Some(self.keys.cluster_prefix().to_owned()),
            last_event_age_seconds: (last > 0)
                .then(|| Agents::now().saturating_sub(last) as f64 / 1000.0),
            relists: self.relists.load(Ordering::Relaxed),
        }
    }

    /// Refresh the gauges computed at scrape.
    pub fn export(&self) {
        let last = self.last_event.load(Ordering::Relaxed);
        if last > 0 {
            self.metrics
                .store_last_event_age
                .set(Agents::now().saturating_sub(last) as f64 / 1000.0);
        }
        self.metrics.store_connected.set(self.connected() as i64);
    }

    pub(super) fn count(&self, op: &str, result: &str) {
        self.metrics
            .store_operations
            .with_label_values(&[op, result])
            .inc();
    }

    /// Run one store operation, counting it: retried after an error (another member may
    /// answer: the client's balancer can pick a member that is down) until `store.timeout`
    /// has passed. Retrying is safe: writes are guarded on revisions, and a lease granted
    /// twice expires by itself.
    pub(super) async fn op<T, E, F>(
        &self,
        op: &'static str,
        mut f: impl FnMut() -> F,
    ) -> Result<T, String>
    where
        E: std::fmt::Display,
        F: Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut last = String::from("no answer");
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, f()).await {
                Ok(Ok(v)) => {
                    self.count(op, "ok");
                    return Ok(v);
                }
                Ok(Err(e)) => {
                    self.count(op, "error");
                    last = e.to_string();
                }
                Err(_) => {
                    self.count(op, "timeout");
                    return Err(format!("{op}: {last} within {:?}", self.config.timeout));
                }
            }
            let pause = Duration::from_millis(50)
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if pause.is_zero() {
                return Err(format!("{op}: {last}"));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// The client, connecting if there is none yet (etcd may be down when the edge starts).
    pub(super) async fn client(&self) -> Result<Arc<Client>, String> {
        if let Some(c) = self.client.load_full() {
            return Ok(c);
        }
        let c = Arc::new(self.connect().await?);
        self.client.store(Some(c.clone()));
        Ok(c)
    }

    async fn connect(&self) -> Result<Client, String> {
        let t = self.config.timeout;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t)
            // A dead or hung member is noticed by the transport, not only by timeouts.
            .with_keep_alive(Duration::from_secs(2), t)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let s = &self.config.secrets;
        if let (Some(user), Some(password)) = (&self.config.username, &s.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if self
            .config
            .endpoints
            .iter()
            .any(|e| e.starts_with("https://"))
        {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &s.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let (Some(cert), Some(key)) = (&s.cert, &s.key) {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        let endpoints = self.config.endpoints.clone();
        tokio::time::timeout(t, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| format!("connect: no answer within {t:?}"))?
            .map_err(|e| format!("connect: {e}"))
    }

    /// What the store holds for `id` now (a read at the leader).
    async fn get(&self, client: &Client, id: &str) -> Result<Option<Current>, String> {
        let key = self.keys.agent(id);
        let resp = self
            .op("get", || {
                let (mut kv, key) = (client.kv_client(), key.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.current(id, kv)))
    }

    fn current(&self, id: &str, kv: &KeyValue) -> Option<Current> {
        match Record::decode(kv.value()) {
            Ok(record) => Some(Current {
                record,
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            }),
            Err(e) => {
                tracing::warn!(agent = %id, error = %e, "unreadable record in the heartbeat store; overwriting it");
                None
            }
        }
    }

    /// What the table says the store holds for `id` (the watch keeps it current; a stale
    /// answer only costs a failed guard and a retry).
    fn cached(&self, id: &str) -> Result<Option<Current>, Refused> {
        let Some(agent) = self.table.agent(id) else {
            return Ok(None);
        };
        if agent.source == Source::Static {
            return Err(Refused::Static(id.to_owned()));
        }
        Ok(agent.stored.as_deref().and_then(|m| {
            Some(Current {
                record: Record::of_agent(&agent)?,
                mod_revision: m.mod_revision,
                lease: m.lease,
            })
        }))
    }

    fn install(&self, hb: Heartbeat, record: &Record, meta: StoreMeta) {
        let owner = record.owner.clone();
        self.table
            .put_stored(hb, &owner, meta, (Agents::now(), unix_ms()), &|id, a| {
                (self.new_backend)(id, a)
            });
    }

    /// Write a heartbeat from credential `owner` (`scoped`: it may not take over another
    /// credential's agent), on this edge's stream `stream` if it came on one.
    pub async fn heartbeat(
        &self,
        hb: Heartbeat,
        owner: &str,
        scoped: bool,
        stream: Option<u64>,
        max_agents: usize,
    ) -> Result<Applied, WriteError> {
        let id = hb.agent.clone();
        let key = self.keys.agent(&id);
        let client = self.client().await.map_err(WriteError::Unavailable)?;
        let stream = stream.map(|s| StreamOwner {
            edge: self.edge_id.clone(),
            id: s,
        });
        let mut current = self.cached(&id)?;
        for _ in 0..ATTEMPTS {
            match &current {
                Some(c) if scoped && c.record.owner != owner => {
                    return Err(Refused::Owned(id).into());
                }
                None if self.table.agent_count() >= max_agents => {
                    return Err(Refused::Full(self.table.agent_count()).into());
                }
                _ => {}
            }
            let stored = current.as_ref().map(|c| &c.record);
            match write_for(stored, &hb, owner, stream.clone(), unix_ms()) {
                Write::KeepAlive => {
                    let lease = current.as_ref().map_or(0, |c| c.lease);
                    let ttl = self
                        .op("keepalive", || self.keep_alives.renew(&client, lease))
                        .await
                        .map_err(WriteError::Unavailable)?;
                    if ttl > 0 {
                        return Ok(Applied::KeptAlive);
                    }
                    // The lease is gone (expired just now): write the record anew.
                    current = self
                        .get(&client, &id)
                        .await
                        .map_err(WriteError::Unavailable)?;
                    if current.as_ref().is_some_and(|c| c.lease == lease) {
                        current = None;
                    }
                }
                Write::Put { record, new_lease } => {
                    let old_lease = current.as_ref().map(|c| c.lease).filter(|&l| l != 0);
                    let lease = match (&current, new_lease) {
                        (Some(c), false) if c.lease != 0 => c.lease,
                        _ => self.grant(&client, record.ttl_ms).await?,
                    };
                    let granted = Some(lease) != old_lease;
                    let guard = match &current {
                        Some(c) => {
                            Compare::mod_revision(key.clone(), CompareOp::Equal, c.mod_revision)
                        }
                        None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    };
                    let txn = Txn::new()
                        .when([guard])
                        .and_then([TxnOp::put(
                            key.clone(),
                            record.encode(),
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(key.clone(), None)]);
                    let resp = self.txn(&client, txn).await?;
                    if resp.succeeded() {
                        let rev = resp.header().map_or(0, |h| h.revision());
                        if granted {
                            if let Some(old) = old_lease {
                                self.revoke_later(&client, old);
                            }
                        }
                        let applied = if current.is_some() {
                            Applied::Changed
                        } else {
                            Applied::Joined
                        };
                        let meta = record.meta(rev, lease);
                        self.install(hb, &record, meta);
                        return Ok(applied);
                    }
                    self.count("txn", "conflict");
                    if granted {
                        self.revoke_later(&client, lease);
                    }
                    current = self.in_else(&id, &resp.op_responses());
                }
            }
        }
        Err(WriteError::Unavailable(format!(
            "agent `{id}` kept changing under this heartbeat (another edge writing it)"
        )))
    }

    /// The record an `or_else` get found.
    fn in_else(&self, id: &str, responses: &[TxnOpResponse]) -> Option<Current> {
        responses.iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| self.current(id, kv)),
            _ => None,
        })
    }

    /// One transaction (retried within `store.timeout` like every operation).
    async fn txn(&self, client: &Client, txn: Txn) -> Result<etcd_client::TxnResponse, WriteError> {
        self.op("txn", || {
            let (mut kv, txn) = (client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(WriteError::Unavailable)
    }

    async fn grant(&self, client: &Client, ttl_ms: u64) -> Result<i64, WriteError> {
        let secs = ttl_ms.div_ceil(1000).max(1) as i64;
        self.op("grant", || {
            let mut leases = client.lease_client();
            async move { leases.grant(secs, None).await }
        })
        .await
        .map(|r| r.id())
        .map_err(WriteError::Unavailable)
    }

    /// Revoke a lease no key needs any more, without making the request wait (if it fails,
    /// the lease expires by itself).
    fn revoke_later(&self, client: &Client, lease: i64) {
        let mut leases = client.lease_client();
        let t = self.config.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(t, leases.revoke(lease)).await;
        });
    }

    /// Remove an agent: a goodbye from `owner` (`Some((credential, scoped))`), or the end of
    /// this edge's stream `stream` (removes it only if that stream still owns it). `Ok(false)`:
    /// no such agent (or another stream took it over).
    pub async fn remove(
        &self,
        id: &str,
        stream: Option<u64>,
        owner: Option<(&str, bool)>,
    ) -> Result<bool, WriteError> {
        let key = self.keys.agent(id);
        let client = self.client().await.map_err(WriteError::Unavailable)?;
        let mut current = self.cached(id)?;
        for _ in 0..ATTEMPTS {
            let Some(c) = &current else {
                return Ok(false);
            };
            if let Some((owner, scoped)) = owner {
                if scoped && c.record.owner != owner {
                    return Err(Refused::Owned(id.to_owned()).into());
                }
            }
            if let Some(s) = stream {
                let ours = c
                    .record
                    .stream
                    .as_ref()
                    .is_some_and(|o| o.edge == self.edge_id && o.id == s);
                if !ours {
                    return Ok(false);
                }
            }
            let marker = self.grant(&client, MARKER_TTL as u64 * 1000).await?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    c.mod_revision,
                )])
                .and_then([
                    TxnOp::delete(key.clone(), None),
                    TxnOp::put(
                        self.keys.gone(id),
                        self.edge_id.as_bytes(),
                        Some(PutOptions::new().with_lease(marker)),
                    ),
                ])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.txn(&client, txn).await?;
            if resp.succeeded() {
                let rev = resp.header().map_or(0, |h| h.revision());
                if c.lease != 0 {
                    self.revoke_later(&client, c.lease);
                }
                self.table.delete_stored(id, rev, true, Agents::now());
                return Ok(true);
            }
            self.count("txn", "conflict");
            self.revoke_later(&client, marker);
            current = self.in_else(id, &resp.op_responses());
        }
        Err(WriteError::Unavailable(format!(
            "agent `{id}` kept changing under this goodbye (another edge writing it)"
        )))
    }

    /// Drop the client (after a failure the transport did not recover from).
    pub(super) async fn reset(&self) {
        self.client.store(None);
        self.keep_alives.close().await;
    }

    /// The milliseconds the watch may stay silent before it counts as lost.
    pub(super) fn silence_limit(&self) -> u64 {
        self.config.timeout.as_millis() as u64 + 2_000
    }
}
