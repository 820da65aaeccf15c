//! `sluice demo`: the edge and two TLS backends in one process, nothing else installed.
//!
//! The backends are real TLS servers with self-signed certificates standing for a Teleport
//! tunnel proxy and a client (web) proxy. Each says who it is, so a user can see the ALPN
//! split with openssl and curl. Also used by the integration tests as "backends that report
//! who they are".

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::control::server::Server;
use crate::tls::testing::server_config;

/// A TLS backend that names itself. With ALPN `http/1.1` (or none) and an HTTP request it
/// answers `HTTP/1.1 200` with a body naming itself; otherwise it sends one greeting line
/// `<name> alpn=<negotiated> sni=<sni>` and then echoes.
pub struct TaggedBackend {
    pub name: String,
    pub address: SocketAddr,
}

impl TaggedBackend {
    pub async fn start(
        name: &str,
        bind: SocketAddr,
        alpn: &[&str],
    ) -> anyhow::Result<TaggedBackend> {
        let cfg = server_config(&["localhost", "*.example.com", "127.0.0.1"], alpn)?;
        let listener = TcpListener::bind(bind).await?;
        let address = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(cfg);
        let tag = name.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let tag = tag.clone();
                tokio::spawn(async move {
                    let _ = serve_tagged(acceptor, tcp, &tag).await;
                });
            }
        });
        Ok(TaggedBackend {
            name: name.to_owned(),
            address,
        })
    }
}

async fn serve_tagged(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    tag: &str,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let (alpn, sni) = {
        let (_, conn) = tls.get_ref();
        (
            conn.alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
            conn.server_name().map(str::to_owned),
        )
    };
    let alpn_s = alpn.clone().unwrap_or_else(|| "-".into());
    let sni_s = sni.unwrap_or_else(|| "-".into());
    if alpn.as_deref().is_none_or(|a| a == "http/1.1") {
        let mut reader = BufReader::new(tls);
        let mut first = String::new();
        reader.read_line(&mut first).await?;
        if first.contains("HTTP/1.") {
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).await? == 0 || line == "\r\n" || line == "\n" {
                    break;
                }
            }
            let body = format!("hello from {tag} (alpn={alpn_s} sni={sni_s})\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-backend: {tag}\r\n\r\n{body}",
                body.len()
            );
            reader.get_mut().write_all(resp.as_bytes()).await?;
            reader.get_mut().shutdown().await?;
            return Ok(());
        }
        let mut tls = reader.into_inner();
        tls.write_all(format!("{tag} alpn={alpn_s} sni={sni_s}\n").as_bytes())
            .await?;
        tls.write_all(first.as_bytes()).await?;
        return echo(tls).await;
    }
    let mut tls = tls;
    tls.write_all(format!("{tag} alpn={alpn_s} sni={sni_s}\n").as_bytes())
        .await?;
    echo(tls).await
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            s.shutdown().await?;
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// The demo config: tunnels by ALPN to one backend, everything else TLS to the other. It
/// lives in no file, so nothing is watched: a watch would fall back to the current directory
/// and every file written there (the demo's own redirected log) would trigger a reload of a
/// file that does not exist. Ctrl-C closes what is left at once (no close spread).
pub fn demo_config(port: u16, admin: &str, tunnel: SocketAddr, client: SocketAddr) -> String {
    format!(
        r#"
[admin]
address = "{admin}"

[lifecycle]
drain_delay = "0s"
drain_timeout = "5s"
close_spread = "0s"

[reload]
watch = false

[[listener]]
name = "edge"
address = "127.0.0.1:{port}"

[[route]]
name = "tunnels"
alpn = ["teleport-reversetunnelv2", "teleport-reversetunnel"]
pool = "tunnel"
idle_timeout = "0s"

[[route]]
name = "clients"
pool = "client"

[pool.tunnel]
backends = ["{tunnel}"]

[pool.client]
backends = ["{client}"]
"#
    )
}

pub async fn run(port: u16, admin: &str) -> anyhow::Result<()> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let tunnel = TaggedBackend::start(
        "tunnel-proxy",
        any,
        &["teleport-reversetunnelv2", "teleport-reversetunnel"],
    )
    .await?;
    let client = TaggedBackend::start("client-proxy", any, &["http/1.1"]).await?;
    let text = demo_config(port, admin, tunnel.address, client.address);
    let config =
        crate::config::parse(Path::new("(demo)"), &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = Server::start(config).await?;
    let edge = server
        .listener_addr("edge")
        .ok_or_else(|| anyhow::anyhow!("demo listener missing"))?;
    let admin = server
        .admin_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    println!(
        r#"
sluice demo: edge on {edge}, admin on http://{admin}
  tunnel-proxy backend on {tunnel_addr}  (ALPN teleport-reversetunnel[v2])
  client-proxy backend on {client_addr}  (everything else TLS)

Try, in another terminal:

  # an agent's reverse tunnel: routed by ALPN to tunnel-proxy
  timeout 2 openssl s_client -connect {edge} -servername tunnel.example.com -alpn teleport-reversetunnel -quiet -ign_eof </dev/null

  # a browser / tsh: routed to client-proxy
  curl -k https://localhost:{port}/

  # what sluice saw
  curl -s http://{admin}/metrics | grep -E 'sluice_(route_decisions|hello)_total'

Ctrl-C stops everything (it waits up to 5 s for open connections; a second Ctrl-C quits at once).
"#,
        tunnel_addr = tunnel.address,
        client_addr = client.address,
        port = edge.port(),
    );
    server.run_until_signal(Default::default()).await
}
