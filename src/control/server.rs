//! The server: starts the runtime's listeners and the admin API, reacts to signals, and stops
//! in order.
//!
//! Owns: startup (bind everything or fail before serving anything; sockets may come from
//! systemd or from the sluice being upgraded), readiness after `min_ready`, the reload
//! triggers (SIGHUP, the file watcher), the upgrade handover (serving the control socket,
//! SIGUSR2 starting the new binary), systemd notifications, and the drain sequence on
//! SIGTERM/SIGINT: unready → keep serving for `drain_delay` → close listeners → wait for
//! connections up to `drain_timeout` → close the rest spread over `close_spread` → exit. A
//! second signal skips to the end.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::handover::{self, ControlSocket, Takeover};
use crate::control::runtime::{ApplyError, Runtime, State};
use crate::control::systemd;
use crate::edge::connection::Edge;
use crate::observe::metrics::Metrics;

/// Why sluice could not start serving (nothing is served then).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listeners(#[from] ApplyError),
    #[error("{what}: cannot bind {address}: {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: the inherited socket cannot be used: {source}")]
    Inherited {
        what: &'static str,
        source: std::io::Error,
    },
}

/// The admin or heartbeat API's listener: the inherited socket if there is one, else a new
/// one on `addr`; none without an address.
async fn side_listener(
    what: &'static str,
    addr: Option<SocketAddr>,
    inherited: Option<std::net::TcpListener>,
) -> Result<Option<Arc<TcpListener>>, StartError> {
    let l = match (addr, inherited) {
        (None, _) => return Ok(None),
        (Some(_), Some(sock)) => sock
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(sock))
            .map_err(|source| StartError::Inherited { what, source })?,
        (Some(address), None) => {
            TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Bind {
                    what,
                    address,
                    source,
                })?
        }
    };
    Ok(Some(Arc::new(l)))
}

pub struct Server {
    pub rt: Arc<Runtime>,
    admin: Option<Arc<TcpListener>>,
    /// `[heartbeat] address`: the heartbeat API's own listener (stops with the admin API).
    heartbeat: Option<Arc<TcpListener>>,
    stop_admin: CancellationToken,
}

/// How `run_until_signal` was started.
#[derive(Default)]
pub struct RunOptions {
    /// This process took its sockets from a running sluice: finish the handover once ready.
    pub takeover: Option<Takeover>,
    /// The command that starts a new sluice in upgrade mode (on SIGUSR2).
    pub upgrade_command: Option<(PathBuf, Vec<OsString>)>,
}

impl Server {
    /// Bind every listener and the admin API, then start serving. Fails without serving
    /// anything if any address cannot be bound.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Self::start_with(config, HashMap::new()).await
    }

    /// As `start`, using the listening sockets in `inherited` (by listener name; the admin
    /// API's under `handover::ADMIN`) instead of binding new ones.
    pub async fn start_with(
        config: Config,
        inherited: HashMap<String, std::net::TcpListener>,
    ) -> Result<Server, StartError> {
        Self::start_activated(config, inherited, HashMap::new()).await
    }

    /// As `start_with`, also with UDP sockets for QUIC listeners (systemd's
    /// `ListenDatagram=`), by listener name.
    pub async fn start_activated(
        config: Config,
        inherited: HashMap<String, std::net::TcpListener>,
        inherited_udp: HashMap<String, std::net::UdpSocket>,
    ) -> Result<Server, StartError> {
        Self::start_upgraded(config, inherited, inherited_udp, HashMap::new()).await
    }

    /// As `start_activated`, in an upgrade: `relays` are the socket pair ends toward the old
    /// process, by QUIC listener name (`handover::RELAY`).
    pub async fn start_upgraded(
        config: Config,
        mut inherited: HashMap<String, std::net::TcpListener>,
        inherited_udp: HashMap<String, std::net::UdpSocket>,
        relays: HashMap<String, std::os::unix::net::UnixDatagram>,
    ) -> Result<Server, StartError> {
        let admin_addr = config.admin.address;
        let heartbeat_addr = config.heartbeat.address;
        let min_ready = config.lifecycle.min_ready;
        let rt = Runtime::new(config, Metrics::new());
        let admin_inherited = inherited.remove(handover::ADMIN);
        let heartbeat_inherited = inherited.remove(handover::HEARTBEAT);
        rt.inherit(inherited);
        rt.inherit_udp(inherited_udp);
        rt.inherit_relays(relays);
        rt.open_listeners()?;
        let admin = side_listener("admin", admin_addr, admin_inherited).await?;
        let heartbeat = side_listener("heartbeat", heartbeat_addr, heartbeat_inherited).await?;
        let stop_admin = CancellationToken::new();
        if let Some(l) = &admin {
            tracing::info!(address = %l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "admin API listening");
            tokio::spawn(crate::control::admin::serve(
                rt.clone(),
                l.clone(),
                stop_admin.clone(),
            ));
        }
        if let Some(l) = &heartbeat {
            tracing::info!(address = %l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "heartbeat API listening");
            tokio::spawn(crate::agents::api::listen(
                rt.api.clone(),
                l.clone(),
                stop_admin.clone(),
            ));
        }
        tokio::spawn(crate::edge::parking::run(
            Arc::downgrade(&rt.edge),
            |edge: &Edge| &edge.parking,
            rt.close_all.clone(),
        ));
        if let crate::agents::store::Store::Etcd(store) = &rt.agents.store {
            crate::agents::store::start(store, rt.hard_stop.clone());
        }
        let snapshots = rt.snapshots();
        tokio::spawn(crate::agents::Agents::sweep(
            Arc::downgrade(&rt.agents),
            move || snapshots.load().config.heartbeat.keep_expired,
            rt.hard_stop.clone(),
        ));

        // Ready once everything is bound and min_ready has passed.
        let rt2 = rt.clone();
        tokio::spawn(async move {
            tokio::time::sleep(min_ready).await;
            if rt2.state() == State::Starting {
                rt2.set_state(State::Ready);
                tracing::info!(min_ready = ?min_ready, "ready");
                systemd::notify(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status("running"),
                ]);
            }
        });

        Ok(Server {
            rt,
            admin,
            heartbeat,
            stop_admin,
        })
    }

    /// The bound address of a QUIC listener.
    pub fn quic_addr(&self, name: &str) -> Option<SocketAddr> {
        self.rt
            .quic_listeners()
            .iter()
            .find(|q| q.name() == name)
            .map(|q| q.local_addr)
    }

    /// The bound address of the heartbeat API's own listener.
    pub fn heartbeat_addr(&self) -> Option<SocketAddr> {
        self.heartbeat.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.rt
            .listener_states()
            .iter()
            .find(|l| l.config.name == name)
            .map(|l| l.local_addr)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Wait until `/readyz` would say ready (or the process is already stopping).
    pub async fn ready(&self) {
        while self.rt.state() == State::Starting {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The drain sequence. `interrupt` resolves on a second signal: it skips to the end.
    /// `delay`: hold `drain_delay` first (not after an upgrade handover: the new process
    /// already serves the sockets).
    pub async fn drain(&self, interrupt: impl std::future::Future<Output = ()>, delay: bool) {
        let cfg = self.rt.snapshot().config.lifecycle.clone();
        tokio::pin!(interrupt);
        // Connections, and QUIC flows (they share the listening socket, so they outlive its
        // closing; they end when idle).
        let open = || self.rt.tracker.len() + self.rt.quic_flow_count();
        let finished = || async {
            self.rt.tracker.wait().await;
            while self.rt.quic_flow_count() > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };

        self.rt.set_state(State::Draining);
        // After a handover the successor is the service's main process: STOPPING=1 from
        // here would make systemd stop the whole unit, successor included.
        if delay {
            systemd::notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("draining"),
            ]);
        }
        let mut skipped = false;
        if delay {
            tracing::info!(connections = open(), drain_delay = ?cfg.drain_delay,
                "drain 1/4: unready, still accepting for drain_delay");
            skipped = tokio::select! {
                _ = tokio::time::sleep(cfg.drain_delay) => false,
                _ = &mut interrupt => true,
            };
        }

        self.rt.close_listeners();
        self.rt.set_state(State::Closing);
        self.rt.tracker.close();
        tracing::info!(connections = open(), drain_timeout = ?cfg.drain_timeout,
            "drain 2/4: listeners closed; waiting for connections to finish");
        if !skipped {
            skipped = tokio::select! {
                _ = finished() => false,
                _ = tokio::time::sleep(cfg.drain_timeout) => {
                    tracing::warn!(connections = open(), "drain_timeout passed");
                    false
                }
                _ = &mut interrupt => true,
            };
        }
        let left = open();
        if left > 0 && !skipped {
            let spread = self.rt.close_spread();
            tracing::info!(connections = left, close_spread = ?spread,
                "drain 3/4: closing the remaining connections spread over close_spread");
            self.rt.close_all.cancel();
            for q in self.rt.quic_listeners() {
                q.stop();
            }
            skipped = tokio::select! {
                _ = self.rt.tracker.wait() => false,
                _ = tokio::time::sleep(spread + Duration::from_secs(1)) => false,
                _ = &mut interrupt => true,
            };
        }
        if skipped {
            tracing::warn!(
                connections = open(),
                "second signal: closing everything now"
            );
        }
        self.rt.hard_stop.cancel();
        self.rt.stop_checks();
        // Give the closed connections a moment to log and count themselves.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.rt.tracker.wait()).await;
        self.stop_admin.cancel();
        tracing::info!(connections = open(), "drain 4/4: stopped");
    }

    /// Stop at once: close listeners and every connection (tests, demo).
    pub async fn shutdown(&self) {
        self.rt.close_listeners();
        self.rt.set_state(State::Closing);
        self.rt.tracker.close();
        self.rt.hard_stop.cancel();
        self.rt.stop_checks();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.rt.tracker.wait()).await;
        self.stop_admin.cancel();
    }

    /// The sockets a successor takes over: every listener (QUIC ones with their socket
    /// pair ends), and the admin and heartbeat APIs'.
    fn offer(
        rt: &Runtime,
        admin: &Option<Arc<TcpListener>>,
        heartbeat: &Option<Arc<TcpListener>>,
    ) -> Vec<(String, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd;
        let mut v = rt.listener_fds();
        v.extend(rt.quic_fds());
        for (name, l) in [(handover::ADMIN, admin), (handover::HEARTBEAT, heartbeat)] {
            if let Some(fd) = l.as_ref().and_then(|a| a.as_fd().try_clone_to_owned().ok()) {
                v.push((name.to_owned(), fd));
            }
        }
        v
    }

    /// Serve until SIGTERM/SIGINT or a completed upgrade handover, then drain. SIGHUP
    /// reloads; SIGUSR2 starts an upgrade.
    pub async fn run_until_signal(self, opts: RunOptions) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        let config = self.rt.snapshot().config.clone();

        if let Some(takeover) = opts.takeover {
            self.ready().await;
            let old = takeover.old_pid;
            match tokio::task::spawn_blocking(move || takeover.finish()).await {
                Ok(Ok(())) => {
                    systemd::notify(&[sd_notify::NotifyState::MainPid(std::process::id())]);
                    tracing::info!(
                        old_pid = old,
                        "upgrade complete: the old process is draining"
                    );
                }
                // Keep serving: the sockets are shared, so whether the old process died or
                // gave up waiting, nothing is lost by this one staying up.
                Ok(Err(e)) => tracing::error!(old_pid = old, error = %e,
                    "upgrade: the old process did not confirm the handover; serving anyway"),
                Err(e) => tracing::error!(error = %e, "upgrade: handover failed; serving anyway"),
            }
        }

        // The upgrade control socket: a successor takes the sockets over through it.
        let handed_over = CancellationToken::new();
        let stop_control = CancellationToken::new();
        if let Some(path) = &config.lifecycle.upgrade_socket {
            match ControlSocket::bind(path) {
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "cannot serve upgrades on the control socket");
                }
                Ok(control) => {
                    let rt = self.rt.clone();
                    let admin = self.admin.clone();
                    let heartbeat = self.heartbeat.clone();
                    let stop_admin = self.stop_admin.clone();
                    let rt_stop = self.rt.clone();
                    let done = handed_over.clone();
                    let shutdown = stop_control.clone();
                    tokio::spawn(async move {
                        let offer = move || Self::offer(&rt, &admin, &heartbeat);
                        let stop = move || {
                            rt_stop.set_state(State::Draining);
                            rt_stop.hand_over_quic();
                            rt_stop.close_listeners();
                            stop_admin.cancel();
                        };
                        match control.serve(offer, stop, shutdown).await {
                            Ok(true) => done.cancel(),
                            Ok(false) => {}
                            Err(e) => tracing::error!(error = %e, "upgrade socket failed"),
                        }
                    });
                }
            }
        }

        let stop_watch = CancellationToken::new();
        if config.reload.watch {
            tokio::spawn(crate::control::reload::watch(
                self.rt.clone(),
                stop_watch.clone(),
            ));
        }

        let delay = loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!(signal = "SIGTERM", "shutdown requested");
                    break true;
                }
                _ = int.recv() => {
                    tracing::info!(signal = "SIGINT", "shutdown requested");
                    break true;
                }
                _ = hup.recv() => {
                    crate::control::reload::reload(&self.rt, "SIGHUP").await;
                }
                _ = usr2.recv() => start_upgrade(&config, &opts.upgrade_command),
                _ = handed_over.cancelled() => {
                    tracing::info!("upgrade: a new sluice took over the sockets; draining");
                    break false;
                }
            }
        };
        stop_watch.cancel();
        stop_control.cancel();
        let second = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        };
        self.drain(second, delay).await;
        Ok(())
    }
}

/// SIGUSR2: start the binary at the same path (a new version once it was replaced) in
/// upgrade mode. It takes the sockets over through the control socket.
fn start_upgrade(config: &Config, command: &Option<(PathBuf, Vec<OsString>)>) {
    if config.lifecycle.upgrade_socket.is_none() {
        tracing::error!(
            "SIGUSR2: upgrades need lifecycle.upgrade_socket in the config; ignoring the signal"
        );
        return;
    }
    let Some((exe, args)) = command else {
        tracing::error!("SIGUSR2: this process does not know its own command; ignoring");
        return;
    };
    match std::process::Command::new(exe).args(args).spawn() {
        Ok(mut child) => {
            tracing::info!(pid = child.id(), exe = %exe.display(),
                "SIGUSR2: started the new sluice; it takes over once ready");
            // Reap it if it fails before taking over.
            std::thread::spawn(move || child.wait());
        }
        Err(e) => tracing::error!(exe = %exe.display(), error = %e,
            "SIGUSR2: cannot start the new sluice"),
    }
}

#[cfg(test)]
mod tests {
    //! The lifecycle's phases on tokio's paused clock: what happens when, to the second,
    //! without waiting for it.
    use super::*;
    use tokio::time::Instant;

    async fn server(lifecycle: &str) -> Server {
        let text = format!(
            "[admin]\naddress = \"\"\n[lifecycle]\n{lifecycle}\n\
             [[listener]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\n\
             [[route]]\nname = \"all\"\npool = \"p\"\n\
             [pool.p]\nbackends = [\"127.0.0.1:9\"]\n"
        );
        let config = crate::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        Server::start(config).await.unwrap()
    }

    /// A connection that ends when its stop signal fires (as a tunnel does at close_all).
    fn tunnel(s: &Server) -> tokio::sync::oneshot::Receiver<Instant> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let close_all = s.rt.close_all.clone();
        s.rt.tracker.spawn(async move {
            close_all.cancelled().await;
            let _ = tx.send(Instant::now());
        });
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_min_ready_then_drain_in_four_phases() {
        let s = server("min_ready = \"3s\"\ndrain_delay = \"5s\"\ndrain_timeout = \"30s\"\nclose_spread = \"0s\"").await;
        let t0 = Instant::now();
        assert_eq!(s.rt.state(), State::Starting);
        s.ready().await;
        let ready = t0.elapsed();
        assert!(
            ready >= Duration::from_secs(3) && ready < Duration::from_millis(3100),
            "{ready:?}"
        );

        let closed = tunnel(&s);
        let t1 = Instant::now();
        let rt = s.rt.clone();
        let phases = tokio::spawn(async move {
            // Phase 1: unready but accepting for drain_delay.
            tokio::time::sleep(Duration::from_millis(4900)).await;
            let during_delay = (rt.state(), rt.edge.accepting_new());
            tokio::time::sleep(Duration::from_millis(200)).await;
            (during_delay, (rt.state(), rt.edge.accepting_new()))
        });
        s.drain(std::future::pending(), true).await;
        let (during_delay, after_delay) = phases.await.unwrap();
        assert_eq!(during_delay, (State::Draining, true));
        assert_eq!(after_delay, (State::Closing, false));
        // Phase 3 at drain_delay + drain_timeout: the remaining connection is closed.
        let at = closed.await.unwrap() - t1;
        assert!(
            at >= Duration::from_secs(35) && at < Duration::from_millis(35_100),
            "{at:?}"
        );
        assert!(s.rt.hard_stop.is_cancelled());
        assert_eq!(s.rt.tracker.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_skips_to_the_end() {
        let s =
            server("drain_delay = \"5s\"\ndrain_timeout = \"10m\"\nclose_spread = \"10s\"").await;
        s.ready().await;
        let closed = tunnel(&s);
        let t1 = Instant::now();
        s.drain(tokio::time::sleep(Duration::from_secs(2)), true)
            .await;
        // Everything closed at the second signal, 2 s in: no drain_delay, drain_timeout or
        // close_spread waited for.
        let at = closed.await.unwrap() - t1;
        assert!(
            at >= Duration::from_secs(2) && at < Duration::from_millis(2100),
            "{at:?}"
        );
        assert!(t1.elapsed() < Duration::from_secs(5));
        assert!(s.rt.hard_stop.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_no_connections_left_ends_after_drain_delay() {
        let s = server("drain_delay = \"5s\"\ndrain_timeout = \"10m\"").await;
        s.ready().await;
        let t1 = Instant::now();
        s.drain(std::future::pending(), true).await;
        let took = t1.elapsed();
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(6),
            "{took:?}"
        );
        // After an upgrade handover there is no delay at all.
        let s = server("drain_delay = \"5s\"").await;
        s.ready().await;
        let t1 = Instant::now();
        s.drain(std::future::pending(), false).await;
        assert!(t1.elapsed() < Duration::from_secs(1));
    }
}
