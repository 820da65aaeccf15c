//! Speaking to the heartbeat API and to resource routes as agents and clients do: one
//! request over TLS, a heartbeat's JSON, a client connecting from a chosen source address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use super::process::Running;
use super::read_line;

/// One HTTP/1.1 request over TLS (ALPN sluice-heartbeat) to a heartbeat API address.
pub async fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let tls = sluice::tls::testing::insecure_client_config(&["sluice-heartbeat"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("sluice.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS to the heartbeat API");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sluice.test");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

pub fn heartbeat(agent: &str, address: SocketAddr, version: &str, apps: &[&str]) -> String {
    let resources: Vec<String> = apps
        .iter()
        .map(|a| format!(r#"{{"kind":"app","name":"{a}"}}"#))
        .collect();
    format!(
        r#"{{"agent":"{agent}","address":"{address}","version":"{version}","ttl":"60s","resources":[{}]}}"#,
        resources.join(",")
    )
}

/// Connect from `source` with a hello for `sni`; the backend's first line (its tag), or ""
/// when sluice closes the connection.
pub async fn visit(edge: SocketAddr, source: Ipv4Addr, sni: &str) -> String {
    let mut s = super::connect_from(source, edge).await;
    s.write_all(&sluice_core::hello::build::hello(Some(sni), &["h2"]))
        .await
        .unwrap();
    read_line(&mut s).await
}

/// `visit`, keeping the connection open: the stream and the agent's first line.
pub async fn visit_open(edge: SocketAddr, source: Ipv4Addr, sni: &str) -> (TcpStream, String) {
    let mut s = super::connect_from(source, edge).await;
    s.write_all(&sluice_core::hello::build::hello(Some(sni), &["h2"]))
        .await
        .unwrap();
    let tag = read_line(&mut s).await;
    (s, tag)
}

/// An agent as `/debug/agents` lists it; `None` when it is not listed.
pub async fn listed(admin: SocketAddr, id: &str) -> Option<serde_json::Value> {
    let (status, body) = super::http_get(admin, "/debug/agents").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .expect("/debug/agents is a list")
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
}

/// `sluice heartbeat` for one agent, announcing `myapp` through the edge's main port.
pub fn agent_process(dir: &Path, edge: SocketAddr, id: &str, dial: SocketAddr) -> Running {
    let cfg = dir.join(format!("{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"
server = "{edge}"
server_name = "sluice.test"
insecure = true
token_file = "{d}/token"
agent = "{id}"
address = "{dial}"
version = "17.1.0"
ttl = "60s"
interval = "200ms"

[[resource]]
kind = "app"
name = "myapp"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    heartbeat_process(&cfg)
}

/// `sluice heartbeat --config CFG`, a real second process (killed when the test ends).
pub fn heartbeat_process(cfg: &Path) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["heartbeat", "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sluice heartbeat starts"),
    )
}

/// A request body fed from a channel: the lines of a heartbeat stream, sent when the test says.
pub struct Feed(pub mpsc::Receiver<Bytes>);

impl hyper::body::Body for Feed {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// A heartbeat stream opened as `sluice heartbeat` opens one (HTTP/2 over TLS, ALPN
/// sluice-heartbeat, the test token). Lines go in through the sender (dropping it ends the
/// body); the task yields sluice's answer, status and body, when sluice ends the stream.
pub async fn open_stream(
    hb: SocketAddr,
    token: &str,
) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<(u16, String)>) {
    let tls = sluice::tls::testing::insecure_client_config(&["sluice-heartbeat"]);
    let tcp = TcpStream::connect(hb).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("sluice.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS to the heartbeat API");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 to the heartbeat API");
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(8);
    let req = hyper::Request::post("https://sluice.test/v1/heartbeats/stream")
        .header("authorization", format!("Bearer {token}"))
        .body(Feed(rx))
        .unwrap();
    let answer = tokio::spawn(async move {
        let resp = sender
            .send_request(req)
            .await
            .expect("sluice answers the stream");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("the answer's body");
        (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        )
    });
    (tx, answer)
}

/// Wait (at most 10 s) for sluice to end a stream; its status and body.
pub async fn stream_end(answer: tokio::task::JoinHandle<(u16, String)>) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("sluice ends the stream within 10 s")
        .expect("the stream's task")
}

/// One heartbeat as a line of a stream.
pub fn line(body: String) -> Bytes {
    Bytes::from(body + "\n")
}
