//! The agent side: `sluice heartbeat --config agent.toml` announces the resources of one
//! agent to sluice's heartbeat API, so that any backend can be found through the table.
//!
//! Owns: the agent config, the streaming form over HTTP/2 (one long request, one line per
//! `interval`; sluice drops the records the moment it breaks), reconnecting with jittered
//! exponential backoff, falling back to one POST per interval over HTTP/1.1 when streaming
//! keeps failing, and the goodbye (`DELETE /v1/agents/{id}`) on SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::api::{HeartbeatBody, ResourceBody};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// sluice's heartbeat address: its main port (a `serve = "heartbeat"` route) or
    /// `[heartbeat] address`.
    pub server: String,
    /// The TLS server name to send and verify (default: the host part of `server`).
    pub server_name: Option<String>,
    /// CA certificates that sign sluice's heartbeat certificate.
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification (tests only).
    #[serde(default)]
    pub insecure: bool,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// A client certificate and key (when sluice has `client_ca_file`).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// This agent: its id, where sluice dials it, its version and labels.
    pub agent: String,
    pub address: String,
    pub version: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Records live this long without a heartbeat.
    #[serde(default = "default_ttl")]
    pub ttl: String,
    /// One heartbeat per interval (keep it well under the ttl).
    #[serde(default = "default_interval")]
    pub interval: String,
    /// `stream` (HTTP/2, falling back to POST) or `post`.
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceBody>,
}

fn default_ttl() -> String {
    "30s".into()
}
fn default_interval() -> String {
    "10s".into()
}
fn default_mode() -> String {
    "stream".into()
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let file = path.display();
        for (key, value) in [("ttl", &cfg.ttl), ("interval", &cfg.interval)] {
            let d = humantime::parse_duration(value).with_context(|| {
                format!("{file}: {key}: `{value}` is not a duration — write e.g. \"10s\"")
            })?;
            // A zero interval would heartbeat in a tight loop (and a zero period panics
            // tokio's interval); a zero ttl expires every record at once.
            if d.is_zero() {
                bail!(
                    "{file}: {key}: must be more than 0 — e.g. ttl = \"30s\", interval = \"10s\""
                );
            }
        }
        if !matches!(cfg.mode.as_str(), "stream" | "post") {
            bail!("{file}: mode: must be \"stream\" or \"post\"");
        }
        if cfg.ca_file.is_none() && !cfg.insecure {
            bail!("{file}: set ca_file (the CA of sluice's heartbeat certificate), or insecure = true for tests");
        }
        if cfg.cert_file.is_some() != cfg.key_file.is_some() {
            bail!("{file}: cert_file and key_file go together: set both (a client certificate) or neither");
        }
        if cfg.token_file.is_none() && cfg.cert_file.is_none() {
            bail!(
                "{file}: set token_file or cert_file/key_file: sluice refuses anonymous heartbeats"
            );
        }
        Ok(cfg)
    }

    fn body(&self) -> HeartbeatBody {
        HeartbeatBody {
            agent: self.agent.clone(),
            address: self.address.clone(),
            version: self.version.clone(),
            labels: self.labels.clone(),
            ttl: Some(self.ttl.clone()),
            resources: self.resources.clone(),
        }
    }
}

/// A request body fed line by line from a channel (the streaming form).
struct Lines(mpsc::Receiver<Bytes>);

impl Body for Lines {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

struct Client {
    cfg: AgentConfig,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    token: Option<String>,
    interval: Duration,
}

impl Client {
    fn new(cfg: AgentConfig) -> anyhow::Result<Client> {
        let host = cfg.server_name.clone().unwrap_or_else(|| {
            cfg.server
                .rsplit_once(':')
                .map_or(cfg.server.clone(), |(h, _)| {
                    h.trim_matches(['[', ']']).to_owned()
                })
        });
        let name = ServerName::try_from(host).map_err(|e| anyhow!("server_name: {e}"))?;
        let mut tls = if cfg.insecure {
            (*crate::tls::client::unverified(&[super::ALPN])).clone()
        } else {
            let ca = cfg.ca_file.as_deref().unwrap_or(Path::new(""));
            (*crate::tls::client::verified(ca, &[super::ALPN]).map_err(|e| anyhow!(e))?).clone()
        };
        if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| cert.display().to_string())?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| cert.display().to_string())?;
            let key =
                PrivateKeyDer::from_pem_file(key).with_context(|| key.display().to_string())?;
            let builder = rustls::ClientConfig::builder();
            tls = if cfg.insecure {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(crate::tls::client::AcceptAnything))
                    .with_client_auth_cert(chain, key)?
            } else {
                let ca = cfg.ca_file.as_deref().unwrap_or(Path::new(""));
                let mut store = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)? {
                    store.add(c?)?;
                }
                builder
                    .with_root_certificates(store)
                    .with_client_auth_cert(chain, key)?
            };
            tls.alpn_protocols = vec![super::ALPN.as_bytes().to_vec()];
        }
        let token = match &cfg.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let interval = humantime::parse_duration(&cfg.interval)?;
        Ok(Client {
            cfg,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            name,
            token,
            interval,
        })
    }

    async fn connect(&self) -> anyhow::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tcp =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.cfg.server))
                .await
                .map_err(|_| anyhow!("connect to {} timed out", self.cfg.server))??;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            Duration::from_secs(5),
            self.tls.connect(self.name.clone(), tcp),
        )
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))??;
        Ok(TokioIo::new(tls))
    }

    fn request<B>(&self, method: &str, path: &str, body: B) -> anyhow::Result<Request<B>> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.cfg.server))
            .header("content-type", "application/x-ndjson");
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        Ok(b.body(body)?)
    }

    fn line(&self) -> anyhow::Result<Bytes> {
        let mut v = serde_json::to_vec(&self.cfg.body())?;
        v.push(b'\n');
        Ok(v.into())
    }

    /// One streaming session: returns when it ends (an error or sluice's answer).
    async fn stream_once(&self, healthy: &mut bool) -> anyhow::Result<()> {
        let io = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let (tx, rx) = mpsc::channel(4);
        tx.send(self.line()?).await.ok();
        let response =
            sender.send_request(self.request("POST", "/v1/heartbeats/stream", Lines(rx))?);
        tokio::pin!(response);
        let mut tick = tokio::time::interval(self.interval);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut response => {
                    let r = r?;
                    let status = r.status();
                    let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    bail!("sluice ended the stream: {status} {}", String::from_utf8_lossy(&body).trim());
                }
                _ = tick.tick() => {
                    if tx.send(self.line()?).await.is_err() {
                        bail!("the stream closed");
                    }
                    if !*healthy {
                        tracing::info!(server = %self.cfg.server, "heartbeat stream up");
                        *healthy = true;
                    }
                }
            }
        }
    }

    async fn post_once(&self) -> anyhow::Result<()> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let r = sender
            .send_request(self.request("POST", "/v1/heartbeats", Full::new(self.line()?))?)
            .await?;
        let status = r.status();
        let body = r.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            bail!("{status} {}", String::from_utf8_lossy(&body).trim());
        }
        Ok(())
    }

    async fn goodbye(&self) -> anyhow::Result<()> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let path = format!("/v1/agents/{}", self.cfg.agent);
        let r = sender
            .send_request(self.request("DELETE", &path, Full::new(Bytes::new()))?)
            .await?;
        match goodbye_outcome(r.status().as_u16()) {
            Ok(how) => {
                tracing::info!(status = %r.status(), "said goodbye{how}");
                Ok(())
            }
            Err(e) => Err(anyhow!(e)),
        }
    }

    async fn run(&self) {
        let mut backoff = Duration::from_millis(100);
        let mut stream_failures = 0u32;
        let mut post_mode = self.cfg.mode == "post";
        loop {
            let mut healthy = false;
            let result = if post_mode {
                let r = self.post_once().await;
                if r.is_ok() {
                    backoff = Duration::from_millis(100);
                    // Try streaming again now and then.
                    stream_failures = stream_failures.saturating_sub(1);
                    if self.cfg.mode == "stream" && stream_failures == 0 {
                        post_mode = false;
                    }
                    tokio::time::sleep(self.interval).await;
                    continue;
                }
                r
            } else {
                let r = self.stream_once(&mut healthy).await;
                if healthy {
                    stream_failures = 0;
                    backoff = Duration::from_millis(100);
                } else {
                    stream_failures += 1;
                    if stream_failures >= 3 {
                        tracing::warn!("streaming keeps failing: falling back to POST");
                        post_mode = true;
                        stream_failures = 10;
                    }
                }
                r
            };
            if let Err(e) = result {
                tracing::warn!(server = %self.cfg.server, error = %format!("{e:#}"), retry_in = ?backoff, "heartbeat failed");
            }
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// What the edge's answer to a goodbye means. 404 is success too: the agent is already gone,
/// because its heartbeat stream ended first (the normal order when a streaming agent stops).
fn goodbye_outcome(status: u16) -> Result<&'static str, String> {
    match status {
        200 => Ok(""),
        404 => Ok(" (already gone: its stream ended first)"),
        other => Err(format!("the edge answered {other}")),
    }
}

/// `sluice heartbeat`: announce until SIGTERM/SIGINT, then say goodbye.
pub async fn run(config: &Path) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(config)?;
    tracing::info!(agent = %cfg.agent, server = %cfg.server, resources = cfg.resources.len(),
        mode = %cfg.mode, "announcing");
    let client = Client::new(cfg)?;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = client.run() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(3), client.goodbye())
        .await
        .unwrap_or_else(|_| Err(anyhow!("timed out")))
    {
        tracing::warn!(error = %e, "goodbye failed; the records expire with their ttl");
    }
    Ok(())
}

/// GET `path` from the admin API at `admin`; the body.
async fn admin_get(admin: &str, path: &str) -> anyhow::Result<Bytes> {
    let tcp = TcpStream::connect(admin)
        .await
        .with_context(|| format!("cannot reach the admin API at {admin}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(format!("http://{admin}{path}"))
        .header("host", admin)
        .body(Full::new(Bytes::new()))?;
    let r = sender.send_request(req).await?;
    if r.status() != StatusCode::OK {
        bail!("admin API answered {}", r.status());
    }
    Ok(r.into_body().collect().await?.to_bytes())
}

/// Rows as aligned columns, the first row the header.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `sluice resources --admin ADDR`: the table as text, one line per (resource, agent).
pub async fn print_resources(admin: &str) -> anyhow::Result<String> {
    let body = admin_get(admin, "/debug/resources").await?;
    let list: Vec<super::ResourceView> = serde_json::from_slice(&body)?;
    let mut rows = vec![[
        "KIND".to_owned(),
        "NAME".to_owned(),
        "AGENT".to_owned(),
        "ADDRESS".to_owned(),
        "VERSION".to_owned(),
        "STATE".to_owned(),
        "EXPIRES IN".to_owned(),
        "CONNS".to_owned(),
    ]];
    for r in &list {
        for a in &r.agents {
            rows.push([
                r.kind.clone(),
                r.name.clone(),
                a.id.clone(),
                a.address.clone(),
                a.version.clone().unwrap_or_else(|| "-".into()),
                a.state.clone(),
                a.expires_in_seconds.map_or_else(
                    || {
                        if a.source == "store" {
                            "lease"
                        } else {
                            "never"
                        }
                        .into()
                    },
                    |s| format!("{s:.0}s"),
                ),
                a.active_connections.to_string(),
            ]);
        }
    }
    let mut out = table(&rows);
    out.push_str(&format!("{} resources\n", list.len()));
    Ok(out)
}

/// `sluice agents versions --admin ADDR`: the rollout view as text: agents by version and
/// state, then the skewed ones and why.
pub async fn print_versions(admin: &str) -> anyhow::Result<String> {
    let body = admin_get(admin, "/debug/rollout").await?;
    let r: sluice_core::agents::rollout::Rollout = serde_json::from_slice(&body)?;
    let mut rows = vec![[
        "VERSION".to_owned(),
        "READY".to_owned(),
        "WARMING".to_owned(),
        "EXPIRED".to_owned(),
        "VERSION SKEW".to_owned(),
    ]];
    for c in &r.versions {
        rows.push([
            c.version.clone(),
            c.ready.to_string(),
            c.warming.to_string(),
            c.expired.to_string(),
            c.version_skew.to_string(),
        ]);
    }
    let mut out = format!(
        "cluster version: {}\n",
        r.cluster_version
            .as_deref()
            .unwrap_or("not set (no version rule)")
    );
    out.push_str(&table(&rows));
    if !r.skewed.is_empty() {
        out.push_str("\nskewed (no sessions):\n");
        let mut rows = vec![[
            "AGENT".to_owned(),
            "VERSION".to_owned(),
            "REASON".to_owned(),
        ]];
        for s in &r.skewed {
            rows.push([
                s.agent.clone(),
                s.version.clone().unwrap_or_else(|| "-".into()),
                s.reason.clone(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !r.channels.is_empty() {
        out.push_str(
            "\nchannels (agents at the target / agents ready for versions.stable_after):\n",
        );
        let mut rows = vec![[
            "CHANNEL".to_owned(),
            "TARGET".to_owned(),
            "CRITICAL".to_owned(),
            "ADOPTION".to_owned(),
            "NOTE".to_owned(),
        ]];
        for (name, c) in &r.channels {
            let note = match (&c.error, c.clamped, c.too_old) {
                (Some(e), _, _) => e.clone(),
                (None, true, _) => "clamped to the cluster version".into(),
                (None, false, true) => "more than one major version below the cluster".into(),
                _ => String::new(),
            };
            rows.push([
                name.clone(),
                c.target.clone().unwrap_or_else(|| "-".into()),
                c.critical
                    .map_or("-", |c| if c { "yes" } else { "no" })
                    .to_owned(),
                format!(
                    "{}/{} ({:.0}%)",
                    c.adoption.at_target,
                    c.adoption.stable,
                    c.adoption.share * 100.0
                ),
                note,
            ]);
        }
        out.push_str(&table(&rows));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_goodbye_after_the_stream_ended_is_a_success() {
        assert_eq!(goodbye_outcome(200), Ok(""));
        assert!(goodbye_outcome(404).is_ok());
        assert_eq!(goodbye_outcome(403), Err("the edge answered 403".into()));
        assert!(goodbye_outcome(503).is_err());
    }
}
