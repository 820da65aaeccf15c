//! The control plane: `runtime` (the state every connection shares, and the snapshot it
//! routes with), `reload` (config changes, applied without touching established connections),
//! `server` (the process lifecycle: start, ready, drain, stop), `handover` (passing listeners
//! to a new binary), and `admin` (the HTTP API operators and Prometheus read).

pub mod admin;
pub mod handover;
pub mod reload;
pub mod runtime;
pub mod server;
