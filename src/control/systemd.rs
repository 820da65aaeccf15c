//! systemd's notify protocol: tell systemd (when run under it with `Type=notify`) about state
//! changes (ready, reloading, stopping, the main PID after an upgrade).

/// Send `states` to systemd; a no-op when not run under it.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
