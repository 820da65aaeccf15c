//! `Simple`: the config most end-to-end tests start from (one listener `edge` with an admin
//! API, one route `main` to a round-robin pool `main` of the test's backends), with knobs, and
//! what tests built on it share.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{
    edge, eventually, metric, parked, quoted, read_line, read_to_end, start, tunnel_hello,
    RawBackend, PARK_FAST,
};

const SIMPLE: &str = r#"
[admin]
address = "127.0.0.1:0"

{top}

[[listener]]
name = "edge"
address = "{listen}"
hello_timeout = "{hello_timeout}"
max_hello_size = {max_hello}
{listener_extra}

[[route]]
name = "main"
pool = "main"
idle_timeout = "{idle}"

{extra}

[pool.main]
backends = [{backends}]
balance = "round_robin"
retries = {retries}
proxy_protocol = "{pp}"
connect_timeout = "500ms"
{pool_extra}
"#;

pub struct Simple<'a> {
    pub backends: Vec<String>,
    pub hello_timeout: &'a str,
    pub max_hello: usize,
    pub idle: &'a str,
    pub retries: u32,
    pub pp: &'a str,
    /// More routes and pools after the main ones.
    pub extra: String,
    /// Top-level sections before the listener (e.g. `[lifecycle]`).
    pub top: &'a str,
    pub listen: &'a str,
    /// More keys for the listener.
    pub listener_extra: &'a str,
    /// More keys for `[pool.main]`.
    pub pool_extra: &'a str,
}

impl Default for Simple<'_> {
    fn default() -> Self {
        Simple {
            backends: vec![],
            hello_timeout: "2s",
            max_hello: 16384,
            idle: "1h",
            retries: 2,
            pp: "none",
            extra: String::new(),
            top: "",
            listen: "127.0.0.1:0",
            listener_extra: "",
            pool_extra: "",
        }
    }
}

pub async fn simple(s: Simple<'_>) -> sluice::control::server::Server {
    let backends = quoted(&s.backends);
    start(
        SIMPLE,
        &[
            ("backends", backends),
            ("hello_timeout", s.hello_timeout.into()),
            ("max_hello", s.max_hello.to_string()),
            ("idle", s.idle.into()),
            ("retries", s.retries.to_string()),
            ("pp", s.pp.into()),
            ("extra", s.extra),
            ("top", s.top.into()),
            ("listen", s.listen.into()),
            ("listener_extra", s.listener_extra.into()),
            ("pool_extra", s.pool_extra.into()),
        ],
    )
    .await
}

/// The one connection of a test ended with both FINs passed on (`reason="closed"`).
pub async fn closed_cleanly_once(server: &sluice::control::server::Server) {
    eventually("closed cleanly", || async {
        metric(
            server,
            "sluice_connections_closed_total",
            &[("route", "main"), ("reason", "closed")],
        )
        .await
            == 1.0
    })
    .await;
}

/// The backend says its line and closes its side at once; the client sees EOF and can still
/// send. `park`: the connection parks in between, with one direction finished.
pub async fn backend_closes_first(park: bool) {
    let b = RawBackend::start("b", true).await;
    let server = simple(Simple {
        backends: vec![b.address.to_string()],
        top: if park { PARK_FAST } else { "" },
        ..Simple::default()
    })
    .await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    s.write_all(&tunnel_hello()).await.unwrap();
    // The backend said its line and closed its side: the client sees EOF...
    assert_eq!(read_line(&mut s).await, "b");
    assert_eq!(
        read_to_end(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    if park {
        // Only the client's socket is watched (the backend's, at EOF, would wake it at
        // once, forever).
        parked(&server, 1.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metric(&server, "sluice_relay_parks_total", &[]).await, 1.0);
    }
    // ...and can still send: the client-to-backend direction keeps flowing.
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    eventually("backend received data after its own FIN", || async {
        b.connections()
            .first()
            .is_some_and(|c| c.ends_with(b"still here"))
    })
    .await;
    closed_cleanly_once(&server).await;
    server.shutdown().await;
}
