//! The control plane: `runtime` (the process-wide state, the one place that builds and swaps
//! the snapshot and hands each component its narrow handle), `reload` (config changes,
//! applied without touching established connections), `server` (the process lifecycle:
//! start, ready, drain, stop), `handover` (passing listeners to a new binary), `systemd` (its
//! notify protocol), and `admin` (the HTTP API operators and Prometheus read).

pub mod admin;
pub mod handover;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod systemd;
