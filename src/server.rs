//! The server: binds listeners and the admin API, runs them, and stops them in order.
//!
//! Owns: startup (bind everything or fail before serving anything), readiness after
//! `min_ready`, and the drain sequence on SIGTERM/SIGINT: unready → keep serving for
//! `drain_delay` → close listeners → wait for connections up to `drain_timeout` → close the
//! rest → exit. A second signal skips to the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::listener::{self, ListenerState};
use crate::metrics::Metrics;
use crate::runtime::{Runtime, State};

pub struct Server {
    pub rt: Arc<Runtime>,
    listeners: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    /// Stops accept loops (and the admin API at the very end).
    stop_accepting: CancellationToken,
    stop_admin: CancellationToken,
}

impl Server {
    /// Bind every listener and the admin API, then start serving. Fails without serving
    /// anything if any address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let admin_addr = config.admin.address;
        let min_ready = config.lifecycle.min_ready;
        let listener_cfgs = config.listeners.clone();
        let rt = Runtime::new(config, Metrics::new());

        let mut bound = Vec::new();
        for cfg in &listener_cfgs {
            let l = listener::bind(cfg)
                .with_context(|| format!("listener `{}`: cannot bind {}", cfg.name, cfg.address))?;
            let local = l.local_addr()?;
            tracing::info!(listener = %cfg.name, address = %local, "listening");
            let state = Arc::new(ListenerState {
                config: cfg.clone(),
                local_addr: local,
                permits: cfg.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            });
            bound.push((state, l));
        }
        let admin_listener = match admin_addr {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("admin: cannot bind {addr}"))?;
                tracing::info!(address = %l.local_addr()?, "admin API listening");
                Some(l)
            }
            None => None,
        };

        let stop_accepting = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let mut listeners = Vec::new();
        for (state, l) in bound {
            listeners.push((state.config.name.clone(), state.local_addr));
            if let Ok(mut ls) = rt.listeners.lock() {
                ls.push(state.clone());
            }
            tokio::spawn(listener::accept_loop(
                rt.clone(),
                state,
                l,
                stop_accepting.clone(),
            ));
        }
        let admin = match admin_listener {
            Some(l) => {
                let addr = l.local_addr()?;
                tokio::spawn(crate::admin::serve(rt.clone(), l, stop_admin.clone()));
                Some(addr)
            }
            None => None,
        };

        // Ready once everything is bound and min_ready has passed.
        let rt2 = rt.clone();
        tokio::spawn(async move {
            tokio::time::sleep(min_ready).await;
            if rt2.state() == State::Starting {
                rt2.set_state(State::Ready);
                tracing::info!(min_ready = ?min_ready, "ready");
            }
        });

        Ok(Server {
            rt,
            listeners,
            admin,
            stop_accepting,
            stop_admin,
        })
    }

    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The drain sequence. `interrupt` resolves on a second signal: it skips to the end.
    pub async fn drain(&self, interrupt: impl std::future::Future<Output = ()>) {
        let cfg = self.rt.snapshot().config.lifecycle.clone();
        tokio::pin!(interrupt);
        let open = || self.rt.tracker.len();

        self.rt.set_state(State::Draining);
        tracing::info!(connections = open(), drain_delay = ?cfg.drain_delay,
            "draining: unready, still accepting");
        let skipped = tokio::select! {
            _ = tokio::time::sleep(cfg.drain_delay) => false,
            _ = &mut interrupt => true,
        };

        self.stop_accepting.cancel();
        self.rt.set_state(State::Closing);
        self.rt.tracker.close();
        tracing::info!(connections = open(), drain_timeout = ?cfg.drain_timeout,
            "listeners closed; waiting for connections to finish");
        if !skipped {
            tokio::select! {
                _ = self.rt.tracker.wait() => {}
                _ = tokio::time::sleep(cfg.drain_timeout) => {
                    tracing::warn!(connections = open(), "drain_timeout passed");
                }
                _ = &mut interrupt => {
                    tracing::warn!(connections = open(), "second signal: stopping now");
                }
            }
        }
        let left = open();
        if left > 0 {
            tracing::info!(connections = left, "closing remaining connections");
        }
        self.rt.hard_stop.cancel();
        // Give the closed connections a moment to log and count themselves.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.rt.tracker.wait()).await;
        self.stop_admin.cancel();
        tracing::info!("stopped");
    }

    /// Stop at once: close listeners and every connection (tests, demo).
    pub async fn shutdown(&self) {
        self.stop_accepting.cancel();
        self.rt.set_state(State::Closing);
        self.rt.tracker.close();
        self.rt.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.rt.tracker.wait()).await;
        self.stop_admin.cancel();
    }

    /// Run until SIGTERM or SIGINT, then drain.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutdown requested");
        let second = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        };
        self.drain(second).await;
        Ok(())
    }
}
