//! What sluice tells its operators: Prometheus metrics (`metrics`) and logs (`logging`).

pub mod logging;
pub mod metrics;
