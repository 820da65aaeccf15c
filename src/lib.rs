//! sluice: an edge load balancer for clusters reached through reverse tunnels.
//!
//! It reads each TLS ClientHello without terminating TLS, routes by ALPN and SNI, and relays
//! bytes to a backend chosen from a pool. See `DESIGN` notes at the top of each module: pure
//! cores (`tls::hello`, `route`, `upstream::balancer`, `proxy_protocol`, `config`) and thin I/O
//! shells (`listener`, `connection`, `relay`, `admin`, `server`).

// `unsafe` is allowed in three places only: `handover`, turning received descriptors into
// sockets; `splice`, the pipe and splice(2) calls of zero-copy relaying; and `parking`,
// registering its epoll set with tokio's reactor (an API that is unsafe for descriptors the
// caller does not own for the registration's whole life).
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
pub mod parking;
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
