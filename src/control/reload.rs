//! Reloading: from the files on disk to a new runtime snapshot, and the triggers (file
//! changes, SIGHUP, `POST /-/reload`).
//!
//! Owns: reading and validating the config files again, reporting the outcome (log lines with
//! path:line: key, metrics, systemd's RELOADING=1/READY=1), and watching the files. The
//! watcher watches directories, not files: editors replace a file by renaming a new one over
//! it, `mv` does the same, and Kubernetes swaps a `..data` symlink; a watch on the old file
//! would see none of that. Every event in the config's directory (or `conf.d/`) only
//! schedules a reload; a reload whose files hash the same as the running config changes
//! nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::runtime::{unix_now, ReloadSummary, Runtime, State};

/// How a reload ended.
#[derive(Debug)]
pub enum Outcome {
    Applied(ReloadSummary),
    /// The files hash the same as the running config.
    Unchanged,
    /// The running config stays; the message lists every problem, one per line.
    Rejected(String),
}

/// Read the config files again and apply them. `trigger` is for the log.
pub async fn reload(rt: &Arc<Runtime>, trigger: &str) -> Outcome {
    if matches!(rt.state(), State::Draining | State::Closing) {
        tracing::warn!(trigger, "reload ignored: sluice is draining");
        return Outcome::Rejected("sluice is draining; reloads are off".into());
    }
    let path = rt.snapshot().config.source.clone();
    crate::control::systemd::notify(&[
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::Status("reloading"),
    ]);
    let outcome = match crate::config::load(&path) {
        Err(errs) => {
            for e in &errs.0 {
                tracing::error!(trigger, error = %e, "reload rejected: config error");
            }
            Outcome::Rejected(errs.to_string())
        }
        Ok(config) if config.hash == rt.snapshot().config.hash => Outcome::Unchanged,
        Ok(config) => match rt.apply(config).await {
            Ok(summary) => Outcome::Applied(summary),
            Err(e) => {
                tracing::error!(trigger, error = %e, class = e.class().label(), "reload rejected");
                Outcome::Rejected(e.to_string())
            }
        },
    };
    let m = &rt.metrics;
    match &outcome {
        Outcome::Applied(s) => {
            m.reloads.with_label_values(&["success"]).inc();
            m.last_reload_successful.set(1);
            m.last_reload_success_timestamp.set(unix_now());
            tracing::info!(
                trigger,
                hash = %s.hash,
                routes = s.routes,
                backends_added = s.backends_added,
                backends_removed = s.backends_removed,
                listeners_added = ?s.listeners_added,
                listeners_removed = ?s.listeners_removed,
                listeners_updated = ?s.listeners_updated,
                "config reloaded"
            );
        }
        Outcome::Unchanged => {
            m.reloads.with_label_values(&["unchanged"]).inc();
            m.last_reload_successful.set(1);
            tracing::debug!(trigger, "config files unchanged; nothing to reload");
        }
        Outcome::Rejected(_) => {
            m.reloads.with_label_values(&["failure"]).inc();
            m.last_reload_successful.set(0);
        }
    }
    let status = match &outcome {
        Outcome::Rejected(_) => "running; last reload rejected (see log)",
        _ => "running",
    };
    crate::control::systemd::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    outcome
}

/// Watch the config's directory (and `conf.d/` beside it) and reload after `debounce` of
/// quiet following any change. Runs until `stop` fires. Errors setting up the watch are
/// logged; SIGHUP and `POST /-/reload` still work.
pub async fn watch(rt: Arc<Runtime>, stop: CancellationToken) {
    if let Some(watch) = ConfigWatch::start(rt) {
        watch.run(stop).await;
    }
}

/// The config files under watch. Once `start` has returned, every later change is seen (the
/// tests rely on that instead of sleeping).
pub struct ConfigWatch {
    rt: Arc<Runtime>,
    watcher: notify::RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
    source: PathBuf,
    dir: PathBuf,
    conf_d: PathBuf,
    debounce: Duration,
}

impl ConfigWatch {
    /// Set the watches up; `None` (logged) when the platform refuses them.
    pub fn start(rt: Arc<Runtime>) -> Option<ConfigWatch> {
        let (source, debounce) = {
            let snap = rt.snapshot();
            (snap.config.source.clone(), snap.config.reload.debounce)
        };
        let dir = source
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let conf_d = dir.join("conf.d");
        let (tx, changes) = mpsc::unbounded_channel::<()>();
        let mut watcher = match notify::recommended_watcher(
            move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if !ev.kind.is_access() => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "config watch error"),
            },
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the config files; reload with SIGHUP or POST /-/reload");
                return None;
            }
        };
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e,
                "cannot watch the config directory; reload with SIGHUP or POST /-/reload");
            return None;
        }
        watch_conf_d(&mut watcher, &conf_d);
        watch_target_dir(&mut watcher, &source, &dir);
        tracing::info!(dir = %dir.display(), debounce = ?debounce, "watching the config files");
        Some(ConfigWatch {
            rt,
            watcher,
            changes,
            source,
            dir,
            conf_d,
            debounce,
        })
    }

    /// Reload after each burst of changes until `stop` fires.
    pub async fn run(mut self, stop: CancellationToken) {
        let debounce = self.debounce;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = self.changes.recv() => if ev.is_none() { return },
            }
            // Debounce: wait until the files have been quiet for `debounce`, but no longer
            // than `max_wait` after the first change, so files rewritten more often than
            // `debounce` (a busy config generator) still get reloaded.
            let max_wait = tokio::time::sleep(max_debounce_wait(debounce));
            tokio::pin!(max_wait);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(debounce) => break,
                    _ = &mut max_wait => break,
                    ev = self.changes.recv() => if ev.is_none() { return },
                }
            }
            watch_conf_d(&mut self.watcher, &self.conf_d);
            watch_target_dir(&mut self.watcher, &self.source, &self.dir);
            reload(&self.rt, "file change").await;
        }
    }
}

/// The longest a reload waits for the files to be quiet: 10 × `debounce`, at least 1 s.
fn max_debounce_wait(debounce: Duration) -> Duration {
    (debounce * 10).max(Duration::from_secs(1))
}

/// Watch `conf.d/` whenever it exists (it may be created, or replaced, after start).
fn watch_conf_d(watcher: &mut impl Watcher, dir: &Path) {
    if dir.is_dir() {
        let _ = watcher.watch(dir, RecursiveMode::NonRecursive);
    }
}

/// When the config file is a symlink into another directory, watch that directory too, so an
/// in-place edit of the target is seen. (Kubernetes swaps the `..data` link in `dir` itself.)
fn watch_target_dir(watcher: &mut impl Watcher, source: &Path, dir: &Path) {
    let Some(target_dir) = std::fs::canonicalize(source)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return;
    };
    if std::fs::canonicalize(dir).ok().as_deref() != Some(target_dir.as_path()) {
        let _ = watcher.watch(&target_dir, RecursiveMode::NonRecursive);
    }
}
