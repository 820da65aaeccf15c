//! A pool backend's metric series: resolved once when the backend object is made (so each
//! exists at 0 from its start), and deleted when the last backend object of that (pool,
//! name) is gone — a reload removed it and its connections ended, or DNS stopped answering it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

use crate::observe::metrics::Metrics;

/// A pool backend's own series, resolved once (every one exists, at 0, from its creation).
#[derive(Debug)]
pub(super) struct BackendSeries {
    /// `sluice_backend_connections_active`
    pub(super) active: IntGauge,
    /// `sluice_backend_draining`
    pub(super) draining: IntGauge,
    /// `sluice_backend_connections_total`
    pub(super) connections: prometheus::IntCounter,
    /// `sluice_backend_connect_failures_total`
    pub(super) connect_failures: prometheus::IntCounter,
    /// `sluice_backend_bytes_total{direction}`
    pub(super) bytes_to_backend: prometheus::IntCounter,
    pub(super) bytes_to_client: prometheus::IntCounter,
}

impl BackendSeries {
    pub(super) fn new(metrics: &Metrics, pool: &str, backend: &str) -> BackendSeries {
        let labels = [pool, backend];
        BackendSeries {
            active: metrics.backend_active.with_label_values(&labels),
            draining: metrics.backend_draining.with_label_values(&labels),
            connections: metrics.backend_connections.with_label_values(&labels),
            connect_failures: metrics.backend_connect_failures.with_label_values(&labels),
            bytes_to_backend: metrics.backend_bytes.with_label_values(&[
                pool,
                backend,
                "to_backend",
            ]),
            bytes_to_client: metrics
                .backend_bytes
                .with_label_values(&[pool, backend, "to_client"]),
        }
    }
}

/// Live backend objects per (pool, backend name): a removed backend draining its connections
/// and its replacement share their series, which go when the last of them does.
pub(super) type SeriesUsers = Arc<Mutex<HashMap<(String, String), usize>>>;

/// One backend object's use of its per-backend series.
pub(super) struct SeriesUse {
    users: SeriesUsers,
    key: (String, String),
    metrics: Metrics,
}

impl std::fmt::Debug for SeriesUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SeriesUse").field(&self.key).finish()
    }
}

impl SeriesUse {
    pub(super) fn new(users: &SeriesUsers, metrics: &Metrics, key: (String, String)) -> SeriesUse {
        *users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        SeriesUse {
            users: users.clone(),
            key,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for SeriesUse {
    fn drop(&mut self) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = users.get_mut(&self.key) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        users.remove(&self.key);
        let labels = [self.key.0.as_str(), self.key.1.as_str()];
        let m = &self.metrics;
        let _ = m.backend_active.remove_label_values(&labels);
        let _ = m.backend_connections.remove_label_values(&labels);
        let _ = m.backend_draining.remove_label_values(&labels);
        let _ = m.backend_connect_failures.remove_label_values(&labels);
        for direction in ["to_backend", "to_client"] {
            let _ = m
                .backend_bytes
                .remove_label_values(&[labels[0], labels[1], direction]);
        }
        let _ = m.backend_healthy.remove_label_values(&labels);
        let _ = m.ejections.remove_label_values(&labels);
    }
}
