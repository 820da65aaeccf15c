//! sluice: an edge load balancer for clusters reached through reverse tunnels.
//!
//! It reads each TLS ClientHello without terminating TLS, routes by ALPN and SNI, and relays
//! bytes to a backend chosen from a pool. See `DESIGN` notes at the top of each module: pure
//! cores (`tls::hello`, `route`, `upstream::balancer`, `proxy_protocol`, `config`) and thin I/O
//! shells (`listener`, `connection`, `relay`, `admin`, `server`).

// `unsafe` is allowed in two places only: `handover`, turning received descriptors into
// sockets, and `splice`, the pipe and splice(2) calls of zero-copy relaying.
#![deny(unsafe_code)]

pub mod admin;
pub mod agents;
pub mod config;
pub mod connection;
pub mod demo;
pub mod discovery;
pub mod handover;
pub mod health;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod quic;
pub mod relay;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod server;
pub mod splice;
pub mod tls;
pub mod upstream;
