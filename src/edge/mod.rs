//! The path of a TCP connection: `listener` accepts it; `connection` runs it, reading its
//! PROXY header and hello (`hello`), routing it, connecting its backend, then relaying its
//! bytes (`relay`, through `splice` pipes when it can); `parking` holds it without a task
//! while it is idle; `access_log` writes its line when it closes.

pub mod access_log;
pub mod connection;
pub mod hello;
pub mod listener;
pub mod parking;
pub mod pending;
pub mod relay;
pub mod splice;
