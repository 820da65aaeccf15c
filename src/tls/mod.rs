//! TLS: what sluice reads of TLS without terminating it (`hello`), client configs for its own
//! outbound TLS (`client`: health checks), and the rustls helpers the demo and tests use to
//! stand up real TLS peers.

pub mod client;
pub mod server;
pub mod testing;
