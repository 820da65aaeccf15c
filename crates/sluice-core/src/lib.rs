//! sluice-core: everything sluice decides, with no I/O.
//!
//! The edge binary (`sluice`) reads sockets, files, DNS and the clock, and hands what it read
//! to the functions here: the TLS ClientHello parser (`hello`), the PROXY protocol codec and
//! inbound trust policy (`proxy`), the route table (`route`), the balancers (`balance`),
//! backend eligibility and passive ejection (`eligibility`), the heartbeat table, affinity
//! ranking and heartbeat rules (`agents`), QUIC Initial decoding and the QUIC flow table
//! (`quic`), the config model with its validation (`config`), and the close reasons shared by
//! the access log and the metrics (`close`).
//!
//! This crate depends on no async runtime, socket, resolver or metrics library; `clippy.toml`
//! keeps `Instant::now` and `SystemTime::now` out of it: every time-based decision takes the
//! time as an argument (`clock`), so tests pass made-up times.

#![forbid(unsafe_code)]

pub mod acl;
pub mod agents;
pub mod balance;
pub mod clock;
pub mod close;
pub mod config;
pub mod eligibility;
pub mod fds;
pub mod hello;
pub mod pending;
pub mod proxy;
pub mod quic;
pub mod route;
