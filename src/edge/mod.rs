//! The path of a TCP connection: `listener` accepts it, `connection` reads its PROXY header
//! and hello, routes it and connects its backend, `relay` moves its bytes (through `splice`
//! pipes when it can), and `parking` holds it without a task while it is idle.

pub mod connection;
pub mod listener;
pub mod parking;
pub mod relay;
pub mod splice;
