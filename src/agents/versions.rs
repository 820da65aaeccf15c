//! The version server agents' updaters ask (RFD 109): `GET
//! /v1/webapi/automaticupgrades/channel/<channel>/version` and `.../critical`, served by the
//! heartbeat API on its listener and through a `serve = "heartbeat"` route.
//!
//! Owns: the answers (static channels from the config; forwarded channels asked of their
//! upstream with a 5 s timeout and cached for `versions.cache_ttl`, a stale answer served for
//! up to `versions.max_stale` while upstream fails, one refresh at a time per upstream), the
//! per-source rate limit, and their metrics. The decisions are `sluice_core::agents::versions`.
//! Unauthenticated by design: updaters send no credential. Never answers a version above
//! `cluster.version`, and never an answer it could not get (503, so updaters do not update).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::Agents;
use crate::config::Config;
use crate::observe::metrics::Metrics;
use sluice_core::agents::rollout::{Adopter, ChannelRollout, CHANNEL_LABEL};
use sluice_core::agents::versions::{
    clamp, freshness, parse_critical_answer, parse_version_answer, resolve, retry_after_failure,
    Answer, Cached, Endpoint, Freshness, Source, Target, DEFAULT_CHANNEL, NO_VERSION,
};

/// How long one upstream refresh (both endpoints) may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// An upstream's answer is one word: anything longer is not one.
const MAX_ANSWER_BYTES: usize = 1024;

/// What a channel answers now.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub answer: Answer,
    pub critical: bool,
    /// A cached answer served because upstream fails.
    pub stale: bool,
}

/// Why a channel has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoAnswer {
    #[error("no channel `{0}`")]
    NotFound(String),
    #[error("upstream of channel `{channel}` failed and nothing usable is cached: {why}")]
    Unavailable { channel: String, why: String },
}

/// One upstream's cache: the last good answer, the last failure, one refresh at a time.
#[derive(Default)]
struct Upstream {
    cached: Mutex<Option<Cached>>,
    failed: Mutex<Option<(u64, String)>>,
    refresh: tokio::sync::Mutex<()>,
}

/// The TLS client for `https` upstreams, and the `ca_file` content it trusts (`None`: the
/// system's CAs).
type UpstreamTls = (Option<Vec<u8>>, Arc<rustls::ClientConfig>);

pub struct VersionServer {
    /// By upstream URL (a reload that changes a channel's URL starts a new cache).
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
    /// The per-source limit and the rate it was built for (rebuilt when a reload changes it).
    limiter: Mutex<(u32, Arc<DefaultKeyedRateLimiter<IpAddr>>)>,
    checks: AtomicU64,
    tls: Mutex<Option<UpstreamTls>>,
    metrics: Metrics,
}

fn limiter(rate: u32) -> Arc<DefaultKeyedRateLimiter<IpAddr>> {
    let per_second = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = per_second.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
    Arc::new(governor::RateLimiter::keyed(
        Quota::per_second(per_second).allow_burst(burst),
    ))
}

impl VersionServer {
    pub fn new(metrics: Metrics) -> VersionServer {
        VersionServer {
            upstreams: Mutex::new(HashMap::new()),
            limiter: Mutex::new((0, limiter(1))),
            checks: AtomicU64::new(0),
            tls: Mutex::new(None),
            metrics,
        }
    }

    /// Whether `source` may ask now (`versions.rate_limit` per second, twice that in a burst).
    pub fn admit(&self, source: IpAddr, rate: u32) -> bool {
        let limiter = {
            let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
            if l.0 != rate {
                *l = (rate, limiter(rate));
            }
            l.1.clone()
        };
        // Forget sources that are back to a full burst, so the map holds recent ones only.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&source).is_ok()
    }

    /// What `channel` answers under `config`.
    pub async fn resolve(&self, config: &Config, channel: &str) -> Result<Resolved, NoAnswer> {
        let cluster = config.cluster.version.map(Target::of);
        let source = resolve(&config.versions, cluster.as_ref(), channel)
            .ok_or_else(|| NoAnswer::NotFound(channel.to_owned()))?;
        let (target, critical, stale) = match source {
            Source::Static { target, critical } => (target.cloned(), critical, false),
            Source::Forward { name, url } => {
                let (cached, stale) = self.forwarded(config, name, url).await?;
                (cached.target, cached.critical, stale)
            }
        };
        Ok(Resolved {
            answer: clamp(target, cluster.as_ref()),
            critical,
            stale,
        })
    }

    fn upstream(&self, url: &str) -> Arc<Upstream> {
        let mut all = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        all.entry(url.to_owned()).or_default().clone()
    }

    /// Drop the caches of upstreams no channel names any more (after a reload).
    pub fn configure(&self, config: &Config) {
        let urls: Vec<&str> = config
            .versions
            .channels
            .values()
            .filter_map(|c| match c {
                crate::config::Channel::Forward { url } => Some(url.as_str()),
                crate::config::Channel::Static { .. } => None,
            })
            .collect();
        let mut all = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|url, _| urls.contains(&url.as_str()));
    }

    /// A forwarded channel's answer: cached while fresh; else asked upstream (one request at
    /// a time per upstream: the others wait for its answer); a failure serves the stale
    /// answer while `max_stale` allows, and upstream is not asked again for a while.
    async fn forwarded(
        &self,
        config: &Config,
        name: &str,
        url: &str,
    ) -> Result<(Cached, bool), NoAnswer> {
        let v = &config.versions;
        let up = self.upstream(url);
        // The answer without asking upstream: a fresh one, or (upstream failed recently) the
        // stale one or a refusal.
        let usable = |up: &Upstream, now: u64| -> Option<Result<(Cached, bool), NoAnswer>> {
            let cached = up.cached.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(c) = cached.as_ref() {
                if freshness(c, now, v.cache_ttl, v.max_stale) == Freshness::Fresh {
                    return Some(Ok((c.clone(), false)));
                }
            }
            let failed = up.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let retry = retry_after_failure(v.cache_ttl).as_millis() as u64;
            let (_, why) = failed.filter(|(at, _)| now.saturating_sub(*at) < retry)?;
            Some(fallback(cached, now, v, name, why))
        };
        if let Some(r) = usable(&up, Agents::now()) {
            return r;
        }
        let _refreshing = up.refresh.lock().await;
        // Another request may have refreshed (or failed) while this one waited.
        if let Some(r) = usable(&up, Agents::now()) {
            return r;
        }
        let fetched = match self.tls(config) {
            Ok(tls) => fetch(url, tls).await,
            Err(e) => Err(e),
        };
        let now = Agents::now();
        match fetched {
            Ok((target, critical)) => {
                let c = Cached {
                    target,
                    critical,
                    fetched_at: now,
                };
                *up.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                *up.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok((c, false))
            }
            Err(why) => {
                self.metrics
                    .version_forward_failures
                    .with_label_values(&[name])
                    .inc();
                tracing::warn!(channel = name, upstream = url, reason = %why, "version channel's upstream failed");
                *up.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, why.clone()));
                let cached = up.cached.lock().unwrap_or_else(|e| e.into_inner()).clone();
                fallback(cached, now, v, name, why)
            }
        }
    }

    fn tls(&self, config: &Config) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut tls = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        let ca = &config.versions.ca;
        if let Some((for_ca, built)) = tls.as_ref() {
            if for_ca == ca {
                return Ok(built.clone());
            }
        }
        let built = crate::tls::client::trusting(ca.as_deref(), &["http/1.1"])
            .map_err(|e| format!("versions.{e}"))?;
        *tls = Some((ca.clone(), built.clone()));
        Ok(built)
    }

    /// The rollout view's `channels`: every configured channel and `default`, each with what
    /// it answers now and how far its agents are.
    pub async fn channels(
        &self,
        config: &Config,
        agents: &Agents,
    ) -> std::collections::BTreeMap<String, ChannelRollout> {
        let now = Agents::now();
        let stable_after = config.versions.stable_after.as_millis() as u64;
        let table = agents.table.agents();
        let rules = sluice_core::agents::table::Rules {
            cluster_version: config.cluster.version,
        };
        // One pass over the table, keeping the agents adoption counts (the stable ones): each
        // channel then looks at those, not at every agent's state again.
        let stable: Vec<Adopter<'_>> = table
            .iter()
            .filter(|a| {
                rules.state(a, now) == sluice_core::agents::table::AgentState::Ready
                    && now >= a.ready_at.max(a.version_since).saturating_add(stable_after)
            })
            .map(|a| Adopter {
                channel: a.label(CHANNEL_LABEL),
                version: a.version,
                stable: true,
            })
            .collect();
        let names = config.versions.channels.keys().map(String::as_str);
        let mut out = std::collections::BTreeMap::new();
        for name in names.chain([DEFAULT_CHANNEL]) {
            let mut view = ChannelRollout::default();
            let target = match self.resolve(config, name).await {
                Ok(r) => {
                    view.target = Some(wire(&r.answer));
                    view.critical = Some(r.critical);
                    view.clamped = r.answer.clamped;
                    view.too_old = r.answer.too_old;
                    r.answer.target.map(|t| t.version)
                }
                Err(e) => {
                    view.error = Some(e.to_string());
                    None
                }
            };
            view.adoption =
                sluice_core::agents::rollout::adoption(stable.iter().copied(), name, target);
            out.insert(name.to_owned(), view);
        }
        out
    }

    /// Answer one updater request (`channel` and `endpoint` from the path).
    pub async fn answer(
        &self,
        config: &Config,
        source: IpAddr,
        channel: &str,
        endpoint: Endpoint,
    ) -> (StatusCode, String) {
        let count = |channel: &str, answer: &str| {
            self.metrics
                .version_requests
                .with_label_values(&[channel, endpoint.label(), answer])
                .inc();
        };
        if !self.admit(source, config.versions.rate_limit) {
            // The channel name is the client's: a label only once it is known to exist.
            let known =
                sluice_core::agents::versions::resolve(&config.versions, None, channel).is_some();
            count(if known { channel } else { "unknown" }, "rate_limited");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "rate limited: over {} requests/s from {source} (versions.rate_limit)\n",
                    config.versions.rate_limit
                ),
            );
        }
        match self.resolve(config, channel).await {
            Ok(r) => {
                if r.answer.clamped {
                    self.metrics
                        .version_clamped
                        .with_label_values(&[channel])
                        .inc();
                }
                if r.stale {
                    count(channel, "stale");
                }
                let body = match endpoint {
                    Endpoint::Version => wire(&r.answer),
                    Endpoint::Critical => if r.critical { "yes" } else { "no" }.to_owned(),
                };
                let answer = match (endpoint, &r.answer.target) {
                    (Endpoint::Version, Some(_)) => "version",
                    (Endpoint::Version, None) => "none",
                    (Endpoint::Critical, _) => &body,
                };
                if !r.stale {
                    count(channel, answer);
                }
                (StatusCode::OK, body)
            }
            Err(e @ NoAnswer::NotFound(_)) => {
                count("unknown", "not_found");
                (StatusCode::NOT_FOUND, format!("{e}\n"))
            }
            Err(e @ NoAnswer::Unavailable { .. }) => {
                count(channel, "unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
            }
        }
    }
}

/// Upstream failed: the cached answer while `max_stale` allows, else a refusal with the reason.
fn fallback(
    cached: Option<Cached>,
    now: u64,
    v: &crate::config::VersionsConfig,
    name: &str,
    why: String,
) -> Result<(Cached, bool), NoAnswer> {
    match cached {
        Some(c) if freshness(&c, now, v.cache_ttl, v.max_stale) != Freshness::Expired => {
            Ok((c, true))
        }
        _ => Err(NoAnswer::Unavailable {
            channel: name.to_owned(),
            why,
        }),
    }
}

/// `v17.1.0` or `none`, as updaters read it.
fn wire(answer: &Answer) -> String {
    answer
        .target
        .as_ref()
        .map_or_else(|| NO_VERSION.to_owned(), Target::wire)
}

/// Ask `<url>/version` and `<url>/critical` (both, within `FORWARD_TIMEOUT`).
async fn fetch(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(Option<Target>, bool), String> {
    let ask = async {
        let version = get(&format!("{url}/version"), tls.clone()).await?;
        let target = parse_version_answer(&version).map_err(|e| format!("{url}/version: {e}"))?;
        let critical = get(&format!("{url}/critical"), tls).await?;
        let critical =
            parse_critical_answer(&critical).map_err(|e| format!("{url}/critical: {e}"))?;
        Ok((target, critical))
    };
    tokio::time::timeout(FORWARD_TIMEOUT, ask)
        .await
        .map_err(|_| format!("{url}: no answer within {FORWARD_TIMEOUT:?}"))?
}

/// One GET over HTTP/1.1 (TLS for `https`): the body of a 200, as text.
async fn get(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().unwrap_or_default().to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host_port = format!(
        "{}:{port}",
        host.trim_start_matches('[').trim_end_matches(']')
    );
    let tcp = tokio::net::TcpStream::connect(&host_port)
        .await
        .map_err(|e| format!("{url}: connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    let req = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "sluice-version-server")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    if https {
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|e| format!("{url}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        exchange(url, TokioIo::new(stream), req).await
    } else {
        exchange(url, TokioIo::new(tcp), req).await
    }
}

async fn exchange<IO>(url: &str, io: IO, req: Request<Empty<Bytes>>) -> Result<String, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the answer: {e}"))?
        .to_bytes();
    conn.abort();
    if status != StatusCode::OK {
        return Err(format!("{url}: HTTP {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| format!("{url}: the answer is not text"))
}
