//! TLS: what sluice reads of TLS without terminating it (`hello`), and the rustls helpers the
//! demo and tests use to stand up real TLS peers.

pub mod hello;
pub mod testing;
