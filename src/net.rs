//! Socket options both legs of a connection share (the client's, set on the listening socket
//! and inherited by accepted ones, and the backend's).

use std::io;

use socket2::{SockRef, TcpKeepalive};

use crate::config::Keepalive;

/// Turn TCP keepalive on with `ka`'s timings, or off when it has no idle time.
pub fn apply_keepalive(sock: &SockRef<'_>, ka: &Keepalive) -> io::Result<()> {
    match ka.idle {
        None => sock.set_keepalive(false),
        Some(idle) => {
            let params = TcpKeepalive::new()
                .with_time(idle)
                .with_interval(ka.interval)
                .with_retries(ka.count);
            sock.set_tcp_keepalive(&params)
        }
    }
}
