//! sluice: an edge load balancer for clusters reached through reverse tunnels.
//!
//! It reads each TLS ClientHello without terminating TLS, routes by ALPN and SNI, and relays
//! bytes to a backend chosen from a pool. Every decision (parsing, routing, balancing, the
//! agent table, the config model) is made in the `sluice-core` crate, which does no I/O; this
//! crate is the I/O around it, in folders that follow a connection and the control plane:
//!
//! - `edge`: a TCP connection from accept to close (listener, connection, relay, splice,
//!   parking);
//! - `upstream`: pools and backends, dialing, health checks, DNS discovery;
//! - `agents`: the heartbeat API, its TLS, the agent client, resource routing;
//! - `quic`: QUIC passthrough and termination on UDP;
//! - `control`: the runtime state, reload, lifecycle and drain, upgrade handover, the admin API;
//! - `observe`: metrics and logging;
//! - `snapshot`: what a new connection is routed with, replaced whole by a reload; `net`:
//!   socket options; `tls`: outbound TLS configs and the demo's certificates.
//!
//! `docs/architecture.md` shows the layers and what each may import.

// `unsafe` is allowed in three places only: `control::handover`, turning received descriptors
// into sockets; `edge::splice`, the pipe and splice(2) calls of zero-copy relaying; and
// `edge::parking`, registering its epoll set with tokio's reactor (an API that is unsafe for
// descriptors the caller does not own for the registration's whole life).
#![deny(unsafe_code)]

pub mod agents;
pub mod config;
pub mod control;
pub mod demo;
pub mod edge;
pub mod net;
pub mod observe;
pub mod quic;
pub mod snapshot;
pub mod tls;
pub mod upstream;
