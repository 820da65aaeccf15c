//! Configuration: TOML text → raw serde structs → validated, immutable `Config`.
//!
//! Owns: the user's contract (key names, defaults, units) and every error message about it.
//! Every error carries the file, the line, the key and a way to fix it; validation collects all
//! semantic errors instead of stopping at the first. It never binds sockets or touches runtime
//! state: turning a `Config` into live objects is `snapshot`'s job. Backend host names are
//! resolved here (at load), so a typo fails the check instead of the first connection.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use sluice_core::agents::affinity::{Affinity, Pick};
use sluice_core::balance::{Balance, HashKey};
pub use sluice_core::proxy::{AcceptProxy, ProxyProtocol};
use sluice_core::route::{AlpnPattern, Match, SniPattern};

/// Hard ceiling for `max_hello_size`: a TLS handshake message split over records can in
/// principle be larger, but no real ClientHello is, and the buffer is per connection.
pub const MAX_HELLO_CAP: usize = 65536;

/// `[limits] park_idle_after` by default: long enough that request/response traffic never
/// parks, short enough that idle tunnels soon hold only their parked state.
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(5);
/// Below this, parking would happen inside ordinary request/response exchanges.
pub const MIN_PARK_IDLE_AFTER: Duration = Duration::from_millis(100);

/// The longest duration any setting accepts: far beyond any real timeout, and small enough
/// that adding it to a clock reading can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

// ---------------------------------------------------------------------------------------------
// Errors

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
        }
        write!(f, " {}: {} — {}", self.key, self.problem, self.fix)
    }
}

/// All problems found in a config; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A key path like `route[1].pool` or `pool.tunnel.backends[0]`.
#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Default)]
struct KeyPath(Vec<Seg>);

impl KeyPath {
    fn key(&self, k: &str) -> KeyPath {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_owned()));
        KeyPath(v)
    }
    fn index(&self, i: usize) -> KeyPath {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        KeyPath(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds the line of a key path in the source text, using toml_edit's spans.
struct Locator<'a> {
    src: &'a str,
    doc: Option<toml_edit::Document<&'a str>>,
}

impl<'a> Locator<'a> {
    fn new(src: &'a str) -> Self {
        // toml_edit panics on some malformed inputs (found by fuzz/route_config: an `expect`
        // in its parser). Line numbers are a courtesy; a config error must never crash a
        // running edge, so a panic here only means "no line numbers".
        let doc = std::panic::catch_unwind(|| toml_edit::Document::parse(src).ok())
            .ok()
            .flatten();
        Self { src, doc }
    }

    /// A locator that only maps offsets to lines (no document parse).
    fn lines_only(src: &'a str) -> Self {
        Self { src, doc: None }
    }

    fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The line of the deepest part of `path` that exists in the document.
    fn line(&self, path: &KeyPath) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best: Option<std::ops::Range<usize>> = None;
        for seg in &path.0 {
            let Some((next, span)) = node.child(seg) else {
                break;
            };
            if span.is_some() {
                best = span;
            }
            node = next;
        }
        best.map(|s| self.line_of_offset(s.start))
    }
}

/// A position in a toml_edit tree: tables of arrays (`[[route]]`) are `Table`s, inline values
/// are `Value`s.
#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d toml_edit::Item),
    Table(&'d toml_edit::Table),
    Value(&'d toml_edit::Value),
}

type Span = Option<std::ops::Range<usize>>;

impl<'d> Node<'d> {
    /// The child at `seg` and the span that best points at it (its key if it has one).
    fn child(self, seg: &Seg) -> Option<(Node<'d>, Span)> {
        use toml_edit::{Item, Value};
        match (self, seg) {
            (Node::Item(Item::Table(t)), Seg::Key(_)) => Node::Table(t).child(seg),
            (Node::Item(Item::Value(v)), _) => Node::Value(v).child(seg),
            (Node::Item(Item::ArrayOfTables(a)), Seg::Index(i)) => {
                let t = a.get(*i)?;
                Some((Node::Table(t), t.span()))
            }
            (Node::Table(t), Seg::Key(k)) => {
                let item = t.get(k)?;
                let span = t.key(k).and_then(|k| k.span()).or_else(|| item.span());
                Some((Node::Item(item), span))
            }
            (Node::Value(Value::InlineTable(t)), Seg::Key(k)) => {
                let v = t.get(k)?;
                let span = t.key(k).and_then(|k| k.span()).or_else(|| v.span());
                Some((Node::Value(v), span))
            }
            (Node::Value(Value::Array(a)), Seg::Index(i)) => {
                let v = a.get(*i)?;
                Some((Node::Value(v), v.span()))
            }
            _ => None,
        }
    }
}

/// Where each merged `[[listener]]`, `[[route]]` and `[pool.*]` came from: (file, index there).
#[derive(Default)]
struct Origins {
    listeners: Vec<(usize, usize)>,
    routes: Vec<(usize, usize)>,
    agents: Vec<(usize, usize)>,
    pools: BTreeMap<String, usize>,
}

impl Origins {
    /// The file a merged key path lives in, and the path as that file spells it.
    fn locate(&self, at: &KeyPath) -> (usize, KeyPath) {
        let mut local = at.clone();
        let file = match at.0.as_slice() {
            [Seg::Key(k), Seg::Index(i), ..] if k == "listener" || k == "route" || k == "agent" => {
                let table = match k.as_str() {
                    "listener" => &self.listeners,
                    "route" => &self.routes,
                    _ => &self.agents,
                };
                match table.get(*i) {
                    Some(&(file, j)) => {
                        local.0[1] = Seg::Index(j);
                        file
                    }
                    None => 0,
                }
            }
            [Seg::Key(k), Seg::Key(name), ..] if k == "pool" => {
                self.pools.get(name).copied().unwrap_or(0)
            }
            _ => 0,
        };
        (file, local)
    }
}

/// Collects errors during validation.
struct Errors<'a> {
    files: Vec<(&'a Path, Locator<'a>)>,
    origins: Origins,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, at: &KeyPath, problem: impl Into<String>, fix: impl Into<String>) {
        let (file, local) = self.origins.locate(at);
        let (path, locator) = &self.files[file.min(self.files.len() - 1)];
        self.list.push(ConfigError {
            path: path.to_path_buf(),
            line: locator.line(&local),
            key: local.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The raw layer: exactly what the file says.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    lifecycle: RawLifecycle,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    dns: RawDns,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
    #[serde(default, rename = "pool")]
    pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    heartbeat: RawHeartbeat,
    #[serde(default, rename = "agent")]
    agents: Vec<RawAgent>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    version: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    address: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    tokens_file: Option<String>,
    client_ca_file: Option<String>,
    max_ttl: Option<String>,
    default_ttl: Option<String>,
    min_ready: Option<String>,
    keep_expired: Option<String>,
    max_body_bytes: Option<i64>,
    max_resources: Option<i64>,
    max_agents: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Option<String>,
    address: Option<String>,
    version: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    resources: Vec<RawResource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    kind: Option<String>,
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResourceTarget {
    kind: Option<String>,
    sni: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLifecycle {
    min_ready: Option<String>,
    drain_delay: Option<String>,
    drain_timeout: Option<String>,
    close_spread: Option<String>,
    upgrade_socket: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<i64>,
    park_idle_after: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    nameservers: Option<Vec<String>>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    debounce: Option<String>,
}

impl RawConfig {
    /// The process-wide tables, which only the main file may set.
    fn global_tables(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.admin.address.is_some() {
            v.push("admin");
        }
        let lc = &self.lifecycle;
        if lc.min_ready.is_some()
            || lc.drain_delay.is_some()
            || lc.drain_timeout.is_some()
            || lc.close_spread.is_some()
            || lc.upgrade_socket.is_some()
        {
            v.push("lifecycle");
        }
        if self.limits.max_connections.is_some() || self.limits.park_idle_after.is_some() {
            v.push("limits");
        }
        if self.reload.watch.is_some() || self.reload.debounce.is_some() {
            v.push("reload");
        }
        if self.dns.nameservers.is_some() || self.dns.timeout.is_some() {
            v.push("dns");
        }
        if self.cluster.version.is_some() {
            v.push("cluster");
        }
        let hb = &self.heartbeat;
        if hb.address.is_some()
            || hb.cert_file.is_some()
            || hb.key_file.is_some()
            || hb.tokens_file.is_some()
            || hb.client_ca_file.is_some()
            || hb.max_ttl.is_some()
            || hb.default_ttl.is_some()
            || hb.min_ready.is_some()
            || hb.keep_expired.is_some()
            || hb.max_body_bytes.is_some()
            || hb.max_resources.is_some()
            || hb.max_agents.is_some()
        {
            v.push("heartbeat");
        }
        v
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<String>,
    address: Option<String>,
    backlog: Option<i64>,
    hello_timeout: Option<String>,
    max_hello_size: Option<i64>,
    max_connections: Option<i64>,
    reuse_port: Option<bool>,
    keepalive_idle: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_count: Option<i64>,
    accept_proxy: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    protocol: Option<String>,
    flow_idle_timeout: Option<String>,
    max_flows: Option<i64>,
    max_pending_flows: Option<i64>,
}

/// The keepalive keys of a listener or pool (both spell them the same way).
struct RawKeepalive {
    keepalive_idle: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_count: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    listener: Option<OneOrMany>,
    alpn: Option<Vec<String>>,
    sni: Option<Vec<String>>,
    tls: Option<bool>,
    pool: Option<String>,
    idle_timeout: Option<String>,
    resource: Option<RawResourceTarget>,
    serve: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    affinity: Option<String>,
    pick: Option<String>,
    session_idle_ttl: Option<String>,
    max_sessions: Option<i64>,
    fallback_pool: Option<String>,
    connect_timeout: Option<String>,
    proxy_protocol: Option<String>,
    quic: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default)]
    backends: Vec<RawBackend>,
    balance: Option<String>,
    hash_key: Option<String>,
    connect_timeout: Option<String>,
    retries: Option<i64>,
    proxy_protocol: Option<String>,
    keepalive_idle: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_count: Option<i64>,
    min_ready: Option<String>,
    removed_drain_timeout: Option<String>,
    eject_after_failures: Option<i64>,
    dns: Option<Vec<String>>,
    srv: Option<Vec<String>>,
    dns_min_refresh: Option<String>,
    dns_max_refresh: Option<String>,
    all_unhealthy: Option<String>,
    health: Option<RawHealth>,
    eject_time: Option<String>,
    eject_max_time: Option<String>,
    max_ejected_percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    jitter: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
    tls: Option<bool>,
    sni: Option<String>,
    alpn: Option<Vec<String>>,
    ca_file: Option<String>,
    path: Option<String>,
    host: Option<String>,
    expect_status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBackend {
    Address(String),
    Detailed {
        address: String,
        #[serde(default)]
        weight: Option<i64>,
    },
}

// ---------------------------------------------------------------------------------------------
// The validated config.

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The main file.
    pub source: PathBuf,
    /// Every file this config was read from: the main one, then `conf.d/*.toml` in name order.
    pub files: Vec<PathBuf>,
    /// A hash of the files' contents (hex), exported as a label of `sluice_config_info`.
    pub hash: String,
    pub admin: AdminConfig,
    pub lifecycle: LifecycleConfig,
    pub limits: LimitsConfig,
    pub reload: ReloadConfig,
    pub dns: DnsConfig,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
    pub cluster: ClusterConfig,
    pub heartbeat: HeartbeatConfig,
    /// `[[agent]]`: agents and resources known without heartbeats.
    pub agents: Vec<StaticAgent>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterConfig {
    /// Agents newer than this, or more than one major version older, get no sessions.
    pub version: Option<sluice_core::agents::table::Version>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatConfig {
    /// Its own TLS listener (besides routes with `serve = "heartbeat"` on the main port).
    pub address: Option<SocketAddr>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub tokens_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    #[serde(with = "human")]
    pub max_ttl: Duration,
    #[serde(with = "human")]
    pub default_ttl: Duration,
    #[serde(with = "human")]
    pub min_ready: Duration,
    #[serde(with = "human")]
    pub keep_expired: Duration,
    pub max_body_bytes: usize,
    pub max_resources: usize,
    pub max_agents: usize,
    /// The bearer tokens (digests only), read from `tokens_file`.
    pub tokens: Vec<sluice_core::agents::auth::Token>,
    /// The TLS server config of the API (certificate, client CA); `None` when no
    /// certificate is configured, and then nothing may serve the API.
    #[serde(skip)]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl HeartbeatConfig {
    pub fn enabled(&self) -> bool {
        self.tls.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StaticAgent {
    pub id: String,
    pub address: SocketAddr,
    pub version: Option<sluice_core::agents::table::Version>,
    pub labels: BTreeMap<String, String>,
    pub resources: Vec<StaticResource>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StaticResource {
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A route's QUIC termination: its certificate (read at load).
#[derive(Debug, Clone, Serialize)]
pub struct QuicTerminate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(skip)]
    pub tls: Arc<rustls::ServerConfig>,
}

/// Where a route sends its connections.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteTarget {
    /// `pool = "NAME"`
    Pool(String),
    /// `resource = { kind, sni }`: an agent from the heartbeat table.
    Resource(ResourceRoute),
    /// `serve = "heartbeat"`: sluice terminates TLS and serves the heartbeat API itself.
    Heartbeat,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceRoute {
    pub kind: String,
    /// The pattern as written (`*.apps.example.com`).
    pub sni: String,
    /// What follows the resource name in the SNI (`.apps.example.com`).
    #[serde(skip)]
    pub suffix: String,
    /// Agents (or their resources) must carry these labels.
    pub labels: BTreeMap<String, String>,
    pub affinity: Affinity,
    pub pick: Pick,
    #[serde(with = "human")]
    pub session_idle_ttl: Duration,
    pub max_sessions: u64,
    pub fallback_pool: Option<String>,
    #[serde(with = "human")]
    pub connect_timeout: Duration,
    pub proxy_protocol: ProxyProtocol,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// `None` when `address = ""`: no admin server.
    pub address: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LifecycleConfig {
    #[serde(with = "human")]
    pub min_ready: Duration,
    #[serde(with = "human")]
    pub drain_delay: Duration,
    #[serde(with = "human")]
    pub drain_timeout: Duration,
    /// Connections still open at the end of a drain (or of a removed backend's
    /// `removed_drain_timeout`) are closed at random moments over this window, not all at once.
    #[serde(with = "human")]
    pub close_spread: Duration,
    /// The Unix socket a running sluice hands its listeners over on (`sluice run --upgrade`).
    pub upgrade_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadConfig {
    /// Watch the config files and reload when they change.
    pub watch: bool,
    /// Wait this long after the last file event before reloading.
    #[serde(with = "human")]
    pub debounce: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitsConfig {
    /// Global cap on connections being handled; `None` derives it from the open-file limit.
    pub max_connections: Option<usize>,
    /// An established connection with no byte either way for this long leaves its task for
    /// the parking lot (see `parking`); `None` never parks.
    #[serde(with = "human_opt")]
    pub park_idle_after: Option<Duration>,
}

/// TCP keepalive for one leg; `None` idle means keepalive is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Keepalive {
    #[serde(with = "human_opt")]
    pub idle: Option<Duration>,
    #[serde(with = "human")]
    pub interval: Duration,
    pub count: u32,
}

impl Keepalive {
    /// The defaults of listeners and pools (and of legs with no config of their own: agents,
    /// the heartbeat API's listener): probes after 60 s idle, every 15 s, 4 of them.
    pub const DEFAULT: Keepalive = Keepalive {
        idle: Some(Duration::from_secs(60)),
        interval: Duration::from_secs(15),
        count: 4,
    };
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub backlog: i32,
    #[serde(with = "human")]
    pub hello_timeout: Duration,
    pub max_hello_size: usize,
    pub max_connections: Option<usize>,
    pub reuse_port: bool,
    pub keepalive: Keepalive,
    /// Inbound PROXY protocol (sluice behind an NLB or HAProxy).
    pub accept_proxy: AcceptProxy,
    /// `tcp` (the default) or `quic` (UDP, QUIC passthrough).
    pub protocol: ListenerProtocol,
    /// QUIC listeners only.
    pub quic: QuicSettings,
    /// Sources allowed to send a PROXY header.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    Tcp,
    Quic,
}

/// Settings of a QUIC listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuicSettings {
    /// A flow with no datagram either way for this long is forgotten.
    #[serde(with = "human")]
    pub flow_idle_timeout: Duration,
    pub max_flows: usize,
    /// Clients whose hello is incomplete (a flood of spoofed Initials stops here).
    pub max_pending: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    pub name: String,
    pub target: RouteTarget,
    /// `quic = "terminate"`: QUIC flows of this route end in sluice (quinn); each stream
    /// becomes a TCP connection to the pool.
    pub quic_terminate: Option<QuicTerminate>,
    #[serde(rename = "match")]
    pub matcher: Match,
    /// `None`: never time out (tunnels).
    #[serde(with = "human_opt")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendConfig {
    /// As written in the config (`proxy-1.internal:3024`).
    pub name: String,
    /// What it resolved to at load.
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    pub balance: Balance,
    #[serde(with = "human")]
    pub connect_timeout: Duration,
    pub retries: u32,
    pub proxy_protocol: ProxyProtocol,
    pub keepalive: Keepalive,
    /// A backend added by a reload takes new connections only after this long.
    #[serde(with = "human")]
    pub min_ready: Duration,
    /// After a reload removes a backend, its established connections are closed (spread over
    /// `lifecycle.close_spread`) once this has passed. `None`: they live until they end.
    #[serde(with = "human_opt")]
    pub removed_drain_timeout: Option<Duration>,
    /// Passive ejection on consecutive connect failures; `None`: off.
    pub ejection: Option<Ejection>,
    /// Active health checks; `None`: off.
    pub health: Option<HealthCheck>,
    /// DNS discovery of more backends; `None`: only the configured ones.
    pub discovery: Option<Discovery>,
    /// When every backend is unhealthy: use them anyway (`true`, the default) or refuse.
    pub fail_open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// A full TLS handshake (with SNI and ALPN).
    Tls,
    /// An HTTP/1.1 GET (plain, or over TLS with `tls = true`).
    Http,
    /// An HTTP/2 GET (h2c prior knowledge, or over TLS with ALPN h2).
    H2,
}

/// An active health check, per pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    #[serde(with = "human")]
    pub interval: Duration,
    #[serde(with = "human")]
    pub timeout: Duration,
    /// Each wait is `interval` plus a random part of this.
    #[serde(with = "human")]
    pub jitter: Duration,
    /// Successes in a row that make a backend healthy...
    pub rise: u32,
    /// ...failures in a row that make it unhealthy.
    pub fall: u32,
    pub tls: bool,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// Verify the certificate against these CAs; `None`: no verification.
    pub ca_file: Option<PathBuf>,
    pub path: String,
    pub host: Option<String>,
    /// Accepted status codes, inclusive.
    pub expect_status: (u16, u16),
}

/// Backends found in DNS, re-resolved as the records' TTLs run out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// `name:port` looked up as A and AAAA.
    pub names: Vec<(String, u16)>,
    /// SRV names (`_service._proto.name`): each target's A/AAAA at the record's port.
    pub srv: Vec<String>,
    /// Re-resolve no sooner than this...
    #[serde(with = "human")]
    pub min_refresh: Duration,
    /// ...and no later than this, whatever the TTL.
    #[serde(with = "human")]
    pub max_refresh: Duration,
}

/// The resolver DNS discovery uses.
#[derive(Debug, Clone, Serialize)]
pub struct DnsConfig {
    /// `None`: the system's resolver configuration (/etc/resolv.conf).
    pub nameservers: Option<Vec<SocketAddr>>,
    #[serde(with = "human")]
    pub timeout: Duration,
}

/// Passive ejection (Envoy's outlier detection, for connect failures only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ejection {
    /// Consecutive connect failures (refused, timeout) that eject a backend.
    pub after_failures: u32,
    /// The first ejection lasts this long; each further one in a row doubles it...
    #[serde(with = "human")]
    pub time: Duration,
    /// ...up to this.
    #[serde(with = "human")]
    pub max_time: Duration,
    /// At most this share of the pool is ejected at once (one backend always may be).
    pub max_percent: u32,
}

mod human {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod human_opt {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("0s"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and validation.

impl Config {
    /// Read, parse and validate a config file, and the `conf.d/*.toml` files beside it.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    path: p.to_path_buf(),
                    line: None,
                    key: "(file)".into(),
                    problem: format!("cannot read: {e}"),
                    fix: "check the path given to --config and its permissions".into(),
                }])
            })
        };
        let mut files = vec![(path.to_path_buf(), read(path)?)];
        for extra in conf_d_files(path) {
            files.push((extra.clone(), read(&extra)?));
        }
        Self::parse_files(&files)
    }

    /// Parse and validate config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        Self::parse_files(&[(path.to_path_buf(), text.to_owned())])
    }

    /// Parse the main file and extra files (`conf.d`), merge them, validate the whole.
    /// Extra files may hold `[[listener]]`, `[[route]]` (appended after the main file's, in
    /// file order) and `[pool.*]` (each pool defined once).
    pub fn parse_files(files: &[(PathBuf, String)]) -> Result<Config, ConfigErrors> {
        let mut list = Vec::new();
        let mut raws = Vec::new();
        for (path, text) in files {
            match parse_raw(path, text) {
                Ok(raw) => raws.push(raw),
                Err(e) => list.extend(e.0),
            }
        }
        if !list.is_empty() {
            return Err(ConfigErrors(list));
        }
        let mut errs = Errors {
            files: files
                .iter()
                .map(|(p, t)| (p.as_path(), Locator::new(t)))
                .collect(),
            origins: Origins::default(),
            list,
        };
        let mut raws = raws.into_iter().enumerate();
        let Some((_, mut merged)) = raws.next() else {
            return Err(ConfigErrors(vec![]));
        };
        let origins = &mut errs.origins;
        origins.listeners = (0..merged.listeners.len()).map(|i| (0, i)).collect();
        origins.routes = (0..merged.routes.len()).map(|i| (0, i)).collect();
        origins.agents = (0..merged.agents.len()).map(|i| (0, i)).collect();
        origins.pools = merged.pools.keys().map(|k| (k.clone(), 0)).collect();
        let mut merge_errors = Vec::new();
        for (fi, raw) in raws {
            let (path, locator) = &errs.files[fi];
            for table in raw.global_tables() {
                merge_errors.push(ConfigError {
                    path: path.to_path_buf(),
                    line: locator.line(&KeyPath::default().key(table)),
                    key: table.into(),
                    problem: format!("[{table}] may only be set in the main config file"),
                    fix: format!("move it to {}", files[0].0.display()),
                });
            }
            let origins = &mut errs.origins;
            for (i, l) in raw.listeners.into_iter().enumerate() {
                origins.listeners.push((fi, i));
                merged.listeners.push(l);
            }
            for (i, r) in raw.routes.into_iter().enumerate() {
                origins.routes.push((fi, i));
                merged.routes.push(r);
            }
            for (i, a) in raw.agents.into_iter().enumerate() {
                origins.agents.push((fi, i));
                merged.agents.push(a);
            }
            for (name, pool) in raw.pools {
                if let Some(&first) = origins.pools.get(&name) {
                    merge_errors.push(ConfigError {
                        path: path.to_path_buf(),
                        line: locator.line(&KeyPath::default().key("pool").key(&name)),
                        key: format!("pool.{name}"),
                        problem: format!(
                            "pool `{name}` is already defined in {}",
                            files[first].0.display()
                        ),
                        fix: "define each pool in one file only".into(),
                    });
                    continue;
                }
                origins.pools.insert(name.clone(), fi);
                merged.pools.insert(name, pool);
            }
        }
        errs.list.extend(merge_errors);
        let mut config = validate(&files[0].0, merged, &mut errs);
        if !errs.list.is_empty() {
            return Err(ConfigErrors(errs.list));
        }
        config.files = files.iter().map(|(p, _)| p.clone()).collect();
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for (p, t) in files {
            for chunk in [p.as_os_str().as_encoded_bytes(), t.as_bytes(), b"\0"] {
                hash = sluice_core::balance::fnv1a_continue(hash, chunk);
            }
        }
        // The files the config names and sluice reads at load (tokens, certificates): a
        // reload after rotating one must not be skipped as "unchanged".
        let hb = &config.heartbeat;
        for p in [
            &hb.tokens_file,
            &hb.cert_file,
            &hb.key_file,
            &hb.client_ca_file,
        ]
        .into_iter()
        .flatten()
        {
            let content = std::fs::read(p).unwrap_or_default();
            for chunk in [p.as_os_str().as_encoded_bytes(), &content, b"\0"] {
                hash = sluice_core::balance::fnv1a_continue(hash, chunk);
            }
        }
        config.hash = format!("{hash:016x}");
        Ok(config)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// The `conf.d/*.toml` files beside the main config, in name order (none if no such directory).
pub fn conf_d_files(main: &Path) -> Vec<PathBuf> {
    let dir = main.parent().unwrap_or(Path::new(".")).join("conf.d");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
                && p.is_file()
        })
        .collect();
    files.sort();
    files
}

/// TOML text → the raw layer; syntax and type errors carry this file's path and line.
fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        let locator = Locator::lines_only(text);
        let (line, key) = match e.span() {
            Some(span) => {
                let snippet = text.get(span.clone()).unwrap_or("").trim();
                let key = if !snippet.is_empty()
                    && snippet.len() <= 64
                    && snippet
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.\"[]".contains(&b))
                {
                    snippet.trim_matches(|c| c == '[' || c == ']').to_owned()
                } else {
                    "(syntax)".to_owned()
                };
                (Some(locator.line_of_offset(span.start)), key)
            }
            None => (None, "(syntax)".to_owned()),
        };
        let message = e.message().trim().to_owned();
        let fix = if message.starts_with("unknown field") {
            "remove the key or fix its spelling (see docs/config.md)"
        } else if message.contains("untagged enum RawBackend") {
            "write a backend as \"host:port\" or { address = \"host:port\", weight = 2 }"
        } else if message.contains("OneOrMany") {
            "write listener = \"name\" or listener = [\"a\", \"b\"]"
        } else {
            "fix the TOML at this line"
        };
        let message = message
            .replace("untagged enum RawBackend", "a backend")
            .replace("untagged enum OneOrMany", "a listener name or list");
        ConfigErrors(vec![ConfigError {
            path: path.to_path_buf(),
            line,
            key,
            problem: message,
            fix: fix.into(),
        }])
    })
}

fn duration(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    value: Option<&str>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(text) => match humantime::parse_duration(text.trim()) {
            Ok(d) if d > MAX_DURATION => {
                errs.push(
                    at,
                    format!("`{text}` is longer than sluice allows (10 years)"),
                    "use a shorter duration; \"0s\" means never where a timeout allows it",
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                errs.push(
                    at,
                    format!("`{text}` is not a duration ({e})"),
                    "write a number with a unit, e.g. \"250ms\", \"10s\", \"5m\", \"1h\"",
                );
                default
            }
        },
    }
}

fn int_in(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    value: Option<i64>,
    default: i64,
    min: i64,
    max: i64,
) -> i64 {
    match value {
        None => default,
        Some(v) if (min..=max).contains(&v) => v,
        Some(v) => {
            errs.push(
                at,
                format!("{v} is out of range"),
                format!("use a value from {min} to {max}"),
            );
            default
        }
    }
}

fn keepalive(errs: &mut Errors<'_>, at: &KeyPath, raw: &RawKeepalive) -> Keepalive {
    let idle = duration(
        errs,
        &at.key("keepalive_idle"),
        raw.keepalive_idle.as_deref(),
        Keepalive::DEFAULT.idle.unwrap_or_default(),
    );
    let interval = duration(
        errs,
        &at.key("keepalive_interval"),
        raw.keepalive_interval.as_deref(),
        Keepalive::DEFAULT.interval,
    );
    let count = int_in(
        errs,
        &at.key("keepalive_count"),
        raw.keepalive_count,
        i64::from(Keepalive::DEFAULT.count),
        1,
        127,
    ) as u32;
    if !idle.is_zero() && interval.is_zero() {
        errs.push(
            &at.key("keepalive_interval"),
            "must not be 0 while keepalive is on",
            "set e.g. \"15s\", or keepalive_idle = \"0s\" to turn keepalive off",
        );
    }
    Keepalive {
        idle: (!idle.is_zero()).then_some(idle),
        interval,
        count,
    }
}

fn discovery(errs: &mut Errors<'_>, at: &KeyPath, rp: &RawPool) -> Option<Discovery> {
    if rp.dns.is_none() && rp.srv.is_none() {
        return None;
    }
    let mut names = Vec::new();
    for (i, text) in rp.dns.iter().flatten().enumerate() {
        let parsed = text
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .filter(|(h, p)| !h.is_empty() && *p > 0 && h.parse::<std::net::IpAddr>().is_err());
        match parsed {
            Some(n) => names.push(n),
            None => errs.push(
                &at.key("dns").index(i),
                format!("`{text}` is not name:port"),
                "write e.g. \"proxy.teleport.svc.cluster.local:3024\" (an IP belongs in backends)",
            ),
        }
    }
    let srv: Vec<String> = rp.srv.clone().unwrap_or_default();
    for (i, name) in srv.iter().enumerate() {
        if !name.starts_with('_') || name.contains(':') {
            errs.push(
                &at.key("srv").index(i),
                format!("`{name}` is not an SRV name"),
                "write e.g. \"_reversetunnel._tcp.proxy.example.com\" (the port comes from the record)",
            );
        }
    }
    let min_refresh = duration(
        errs,
        &at.key("dns_min_refresh"),
        rp.dns_min_refresh.as_deref(),
        Duration::from_secs(1),
    );
    let max_refresh = duration(
        errs,
        &at.key("dns_max_refresh"),
        rp.dns_max_refresh.as_deref(),
        Duration::from_secs(300),
    );
    if min_refresh.is_zero() || max_refresh < min_refresh {
        errs.push(
            &at.key("dns_max_refresh"),
            "dns_min_refresh must be more than 0 and at most dns_max_refresh",
            "e.g. dns_min_refresh = \"1s\", dns_max_refresh = \"5m\"",
        );
    }
    Some(Discovery {
        names,
        srv,
        min_refresh,
        max_refresh,
    })
}

fn health_check(errs: &mut Errors<'_>, at: &KeyPath, raw: &RawHealth) -> Option<HealthCheck> {
    let kind = match raw.kind.as_deref() {
        Some("tcp") => CheckKind::Tcp,
        Some("tls") => CheckKind::Tls,
        Some("http") => CheckKind::Http,
        Some("h2") => CheckKind::H2,
        Some(other) => {
            errs.push(
                &at.key("kind"),
                format!("unknown check kind `{other}`"),
                "use one of: tcp, tls, http, h2",
            );
            return None;
        }
        None => {
            errs.push(
                &at.key("kind"),
                "missing",
                "set kind = \"tcp\" (or tls, http, h2)",
            );
            return None;
        }
    };
    let interval = duration(
        errs,
        &at.key("interval"),
        raw.interval.as_deref(),
        Duration::from_secs(5),
    );
    let timeout = duration(
        errs,
        &at.key("timeout"),
        raw.timeout.as_deref(),
        Duration::from_secs(2),
    );
    let jitter = duration(
        errs,
        &at.key("jitter"),
        raw.jitter.as_deref(),
        interval / 10,
    );
    for (key, d) in [("interval", interval), ("timeout", timeout)] {
        if d.is_zero() {
            errs.push(&at.key(key), "must be more than 0", "set e.g. \"5s\"");
        }
    }
    let rise = int_in(errs, &at.key("rise"), raw.rise, 2, 1, 100) as u32;
    let fall = int_in(errs, &at.key("fall"), raw.fall, 3, 1, 100) as u32;
    let path = raw.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        errs.push(
            &at.key("path"),
            format!("`{path}` is not a request path"),
            "write e.g. \"/healthz\"",
        );
    }
    let expect_status = match raw
        .expect_status
        .as_deref()
        .unwrap_or("200-399")
        .split_once('-')
    {
        Some((a, b)) => (a.trim().parse::<u16>(), b.trim().parse::<u16>()),
        None => {
            let one = raw
                .expect_status
                .as_deref()
                .unwrap_or("")
                .trim()
                .parse::<u16>();
            (one.clone(), one)
        }
    };
    let expect_status = match expect_status {
        (Ok(a), Ok(b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => (a, b),
        _ => {
            errs.push(
                &at.key("expect_status"),
                "not a status code or range",
                "write e.g. \"200\" or \"200-399\"",
            );
            (200, 399)
        }
    };
    if let Some(alpn) = &raw.alpn {
        if alpn.iter().any(|a| a.is_empty() || a.len() > 255) {
            errs.push(
                &at.key("alpn"),
                "ALPN names are 1 to 255 bytes",
                "fix the list",
            );
        }
    }
    let tls = raw.tls.unwrap_or(kind == CheckKind::Tls);
    if kind == CheckKind::Tcp && (raw.tls.is_some() || raw.sni.is_some() || raw.alpn.is_some()) {
        errs.push(
            &at.key("kind"),
            "a tcp check has no TLS settings",
            "use kind = \"tls\", or remove tls/sni/alpn",
        );
    }
    if kind == CheckKind::Tls && raw.tls == Some(false) {
        errs.push(
            &at.key("tls"),
            "a tls check is always TLS",
            "remove tls = false",
        );
    }
    Some(HealthCheck {
        kind,
        interval,
        timeout,
        jitter,
        rise,
        fall,
        tls,
        sni: raw.sni.clone(),
        alpn: raw.alpn.clone().unwrap_or_default(),
        ca_file: raw.ca_file.as_ref().map(PathBuf::from),
        path,
        host: raw.host.clone(),
        expect_status,
    })
}

/// `host:port` → the first address it resolves to (as HAProxy does at start).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !text.contains(':') {
        return Err(format!("`{text}` has no port"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{text}` resolved to no address")),
        Err(e) => Err(format!("cannot resolve `{text}`: {e}")),
    }
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn validate(path: &Path, raw: RawConfig, errs: &mut Errors<'_>) -> Config {
    let root = KeyPath::default();

    // [admin]
    let admin_at = root.key("admin").key("address");
    let admin_address = match raw.admin.address.as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
        Some("") => None,
        Some(text) => match resolve(text) {
            Ok(a) => Some(a),
            Err(problem) => {
                errs.push(
                    &admin_at,
                    problem,
                    "write an address like \"127.0.0.1:9901\", or \"\" to disable the admin API",
                );
                None
            }
        },
    };

    // [lifecycle]
    let lc = root.key("lifecycle");
    let lifecycle = LifecycleConfig {
        min_ready: duration(
            errs,
            &lc.key("min_ready"),
            raw.lifecycle.min_ready.as_deref(),
            Duration::ZERO,
        ),
        drain_delay: duration(
            errs,
            &lc.key("drain_delay"),
            raw.lifecycle.drain_delay.as_deref(),
            Duration::from_secs(5),
        ),
        drain_timeout: duration(
            errs,
            &lc.key("drain_timeout"),
            raw.lifecycle.drain_timeout.as_deref(),
            Duration::from_secs(600),
        ),
        close_spread: duration(
            errs,
            &lc.key("close_spread"),
            raw.lifecycle.close_spread.as_deref(),
            Duration::from_secs(10),
        ),
        upgrade_socket: match raw.lifecycle.upgrade_socket.as_deref() {
            None | Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
        },
    };

    // [dns]
    let dns_at = root.key("dns");
    let nameservers = raw.dns.nameservers.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let parsed = text.parse::<SocketAddr>().or_else(|_| {
                    text.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                match parsed {
                    Ok(a) => Some(a),
                    Err(_) => {
                        errs.push(
                            &dns_at.key("nameservers").index(i),
                            format!("`{text}` is not an IP or IP:port"),
                            "write e.g. \"10.96.0.10\" or \"127.0.0.1:5353\"",
                        );
                        None
                    }
                }
            })
            .collect::<Vec<_>>()
    });
    let dns = DnsConfig {
        nameservers,
        timeout: duration(
            errs,
            &dns_at.key("timeout"),
            raw.dns.timeout.as_deref(),
            Duration::from_secs(2),
        ),
    };

    // [reload]
    let reload = ReloadConfig {
        watch: raw.reload.watch.unwrap_or(true),
        debounce: duration(
            errs,
            &root.key("reload").key("debounce"),
            raw.reload.debounce.as_deref(),
            Duration::from_millis(200),
        ),
    };

    // [limits]
    let limits = LimitsConfig {
        max_connections: raw.limits.max_connections.map(|_| {
            int_in(
                errs,
                &root.key("limits").key("max_connections"),
                raw.limits.max_connections,
                0,
                1,
                10_000_000,
            ) as usize
        }),
        park_idle_after: {
            let at = root.key("limits").key("park_idle_after");
            let d = duration(
                errs,
                &at,
                raw.limits.park_idle_after.as_deref(),
                DEFAULT_PARK_IDLE_AFTER,
            );
            if !d.is_zero() && d < MIN_PARK_IDLE_AFTER {
                errs.push(
                    &at,
                    format!(
                        "{d:?} would park connections between the packets of one exchange, \
                         costing system calls each time"
                    ),
                    "use at least \"100ms\" (the default is \"5s\"), or \"0s\" to never park",
                );
            }
            (!d.is_zero()).then_some(d)
        },
    };

    // [pool.*] first: routes refer to them.
    let mut pools = BTreeMap::new();
    for (name, mut rp) in raw.pools {
        let at = root.key("pool").key(&name);
        if !name_ok(&name) {
            errs.push(
                &at,
                format!("pool name `{name}` has characters outside [A-Za-z0-9._-]"),
                "rename the pool",
            );
        }
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for (i, rb) in std::mem::take(&mut rp.backends).into_iter().enumerate() {
            let bat = at.key("backends").index(i);
            let (text, weight) = match rb {
                RawBackend::Address(a) => (a, None),
                RawBackend::Detailed { address, weight } => (address, weight),
            };
            let weight = int_in(errs, &bat.key("weight"), weight, 1, 1, 1000) as u32;
            match resolve(&text) {
                Ok(address) => {
                    if !seen.insert(address) {
                        errs.push(
                            &bat,
                            format!("backend `{text}` ({address}) is listed twice"),
                            "remove the duplicate, or use `weight` to give it more traffic",
                        );
                    }
                    backends.push(BackendConfig {
                        name: text,
                        address,
                        weight,
                    });
                }
                Err(problem) => errs.push(
                    &bat,
                    problem,
                    "write \"host:port\" with a name this machine can resolve, or an IP",
                ),
            }
        }
        let discovery = discovery(errs, &at, &rp);
        if backends.is_empty()
            && discovery.is_none()
            && !errs.list.iter().any(|e| e.key.starts_with(&at.to_string()))
        {
            errs.push(
                &at.key("backends"),
                "the pool has no backends",
                "add backends = [\"host:port\", ...], or dns = [\"name:port\"] / srv = [\"_service._tcp.name\"]",
            );
        }
        let hash_key = match rp.hash_key.as_deref() {
            None | Some("client_ip") => HashKey::ClientIp,
            Some("sni") => HashKey::Sni,
            Some(other) => {
                errs.push(
                    &at.key("hash_key"),
                    format!("unknown hash key `{other}`"),
                    "use \"client_ip\" or \"sni\"",
                );
                HashKey::ClientIp
            }
        };
        let balance = match rp.balance.as_deref() {
            None | Some("random") => Balance::Random,
            Some("round_robin") => Balance::RoundRobin,
            Some("least_conn") => Balance::LeastConn,
            Some("p2c") => Balance::P2c,
            Some("hash") => Balance::Hash(hash_key),
            Some(other) => {
                errs.push(
                    &at.key("balance"),
                    format!("unknown balancer `{other}`"),
                    "use one of random, round_robin, least_conn, p2c, hash",
                );
                Balance::Random
            }
        };
        if rp.hash_key.is_some() && !matches!(balance, Balance::Hash(_)) {
            errs.push(
                &at.key("hash_key"),
                "hash_key only applies to balance = \"hash\"",
                "remove hash_key or set balance = \"hash\"",
            );
        }
        let proxy_protocol = proxy_protocol(errs, &at, rp.proxy_protocol.as_deref());
        let connect_timeout = connect_timeout(errs, &at, rp.connect_timeout.as_deref());
        let retries = int_in(errs, &at.key("retries"), rp.retries, 2, 0, 16) as u32;
        let keepalive = keepalive(
            errs,
            &at,
            &RawKeepalive {
                keepalive_idle: rp.keepalive_idle,
                keepalive_interval: rp.keepalive_interval,
                keepalive_count: rp.keepalive_count,
            },
        );
        let min_ready = duration(
            errs,
            &at.key("min_ready"),
            rp.min_ready.as_deref(),
            Duration::ZERO,
        );
        let removed_drain_timeout = rp.removed_drain_timeout.as_deref().map(|text| {
            duration(
                errs,
                &at.key("removed_drain_timeout"),
                Some(text),
                Duration::ZERO,
            )
        });
        let eject_after = int_in(
            errs,
            &at.key("eject_after_failures"),
            rp.eject_after_failures,
            0,
            0,
            1000,
        ) as u32;
        let eject_time = duration(
            errs,
            &at.key("eject_time"),
            rp.eject_time.as_deref(),
            Duration::from_secs(30),
        );
        let eject_max_time = duration(
            errs,
            &at.key("eject_max_time"),
            rp.eject_max_time.as_deref(),
            Duration::from_secs(300),
        );
        let max_ejected_percent = int_in(
            errs,
            &at.key("max_ejected_percent"),
            rp.max_ejected_percent,
            10,
            0,
            100,
        ) as u32;
        if eject_after > 0 && (eject_time.is_zero() || eject_max_time < eject_time) {
            errs.push(
                &at.key("eject_max_time"),
                "eject_time must be more than 0 and at most eject_max_time",
                "e.g. eject_time = \"30s\", eject_max_time = \"5m\"",
            );
        }
        let fail_open = match rp.all_unhealthy.as_deref() {
            None | Some("fail_open") => true,
            Some("fail_closed") => false,
            Some(other) => {
                errs.push(
                    &at.key("all_unhealthy"),
                    format!("unknown mode `{other}`"),
                    "use fail_open (use unhealthy backends when none is healthy) or fail_closed",
                );
                true
            }
        };
        let health = rp
            .health
            .as_ref()
            .and_then(|h| health_check(errs, &at.key("health"), h));
        let ejection = (eject_after > 0).then_some(Ejection {
            after_failures: eject_after,
            time: eject_time,
            max_time: eject_max_time,
            max_percent: max_ejected_percent,
        });
        pools.insert(
            name.clone(),
            PoolConfig {
                discovery,
                ejection,
                health,
                fail_open,
                name,
                backends,
                balance,
                connect_timeout,
                retries,
                proxy_protocol,
                keepalive,
                min_ready,
                removed_drain_timeout,
            },
        );
    }

    // [[listener]]
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    if raw.listeners.is_empty() {
        errs.push(
            &root.key("listener"),
            "no listener is configured",
            "add a [[listener]] with name and address, e.g. address = \"0.0.0.0:443\"",
        );
    }
    for (i, rl) in raw.listeners.into_iter().enumerate() {
        let at = root.key("listener").index(i);
        let name = rl.name.unwrap_or_default();
        if !name_ok(&name) {
            errs.push(
                &at.key("name"),
                "missing or invalid listener name",
                "set name = \"edge\" (letters, digits, . _ -)",
            );
        } else if listeners.iter().any(|l| l.name == name) {
            errs.push(
                &at.key("name"),
                format!("listener name `{name}` is used twice"),
                "give each listener its own name",
            );
        }
        let address = match rl.address.as_deref() {
            None => {
                errs.push(
                    &at.key("address"),
                    "missing",
                    "set address = \"0.0.0.0:443\" (or \"[::]:443\")",
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
            Some(text) => resolve(text).unwrap_or_else(|problem| {
                errs.push(
                    &at.key("address"),
                    problem,
                    "write an address like \"0.0.0.0:443\" or \"[::]:443\"",
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }),
        };
        let protocol = match rl.protocol.as_deref() {
            None | Some("tcp") => ListenerProtocol::Tcp,
            Some("quic") => ListenerProtocol::Quic,
            Some(other) => {
                errs.push(
                    &at.key("protocol"),
                    format!("unknown protocol `{other}`"),
                    "use \"tcp\" (TLS over TCP) or \"quic\" (QUIC over UDP)",
                );
                ListenerProtocol::Tcp
            }
        };
        let quic = QuicSettings {
            flow_idle_timeout: duration(
                errs,
                &at.key("flow_idle_timeout"),
                rl.flow_idle_timeout.as_deref(),
                Duration::from_secs(60),
            ),
            max_flows: int_in(
                errs,
                &at.key("max_flows"),
                rl.max_flows,
                100_000,
                1,
                10_000_000,
            ) as usize,
            max_pending: int_in(
                errs,
                &at.key("max_pending_flows"),
                rl.max_pending_flows,
                4096,
                1,
                1_000_000,
            ) as usize,
        };
        if protocol == ListenerProtocol::Tcp {
            for (key, set) in [
                ("flow_idle_timeout", rl.flow_idle_timeout.is_some()),
                ("max_flows", rl.max_flows.is_some()),
                ("max_pending_flows", rl.max_pending_flows.is_some()),
            ] {
                if set {
                    errs.push(
                        &at.key(key),
                        format!("`{key}` applies to QUIC listeners only"),
                        "set protocol = \"quic\", or remove it",
                    );
                }
            }
        } else if quic.flow_idle_timeout.is_zero() {
            errs.push(
                &at.key("flow_idle_timeout"),
                "must be more than 0 (flows would never be forgotten)",
                "set e.g. \"60s\"",
            );
        }
        if protocol == ListenerProtocol::Quic && rl.accept_proxy.is_some() {
            errs.push(
                &at.key("accept_proxy"),
                "a QUIC listener cannot read PROXY headers (UDP has none)",
                "remove accept_proxy from this listener",
            );
        }
        if address.port() != 0
            && listeners
                .iter()
                .any(|l| l.address == address && l.protocol == protocol)
        {
            errs.push(
                &at.key("address"),
                format!("{address} is already used by another listener"),
                "give each listener its own address",
            );
        }
        let max_hello_size = int_in(
            errs,
            &at.key("max_hello_size"),
            rl.max_hello_size,
            16384,
            512,
            MAX_HELLO_CAP as i64,
        ) as usize;
        let hello_timeout = duration(
            errs,
            &at.key("hello_timeout"),
            rl.hello_timeout.as_deref(),
            Duration::from_secs(10),
        );
        if hello_timeout.is_zero() {
            errs.push(
                &at.key("hello_timeout"),
                "must be more than 0 (a client that never sends a hello would hold a slot forever)",
                "set e.g. \"10s\"",
            );
        }
        let backlog = int_in(errs, &at.key("backlog"), rl.backlog, 1024, 1, 65535) as i32;
        let max_connections = rl
            .max_connections
            .map(|v| int_in(errs, &at.key("max_connections"), Some(v), 1, 1, 10_000_000) as usize);
        let keepalive = keepalive(
            errs,
            &at,
            &RawKeepalive {
                keepalive_idle: rl.keepalive_idle,
                keepalive_interval: rl.keepalive_interval,
                keepalive_count: rl.keepalive_count,
            },
        );
        let accept_proxy = match rl.accept_proxy.as_deref() {
            None | Some("none") => AcceptProxy::None,
            Some("v1") => AcceptProxy::V1,
            Some("v2") => AcceptProxy::V2,
            Some("optional") => AcceptProxy::Optional,
            Some(other) => {
                errs.push(
                    &at.key("accept_proxy"),
                    format!("unknown PROXY protocol mode `{other}`"),
                    "use one of: none, v1, v2, optional",
                );
                AcceptProxy::None
            }
        };
        let mut trusted_proxies = Vec::new();
        for (j, text) in rl.trusted_proxies.iter().flatten().enumerate() {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => errs.push(
                    &at.key("trusted_proxies").index(j),
                    format!("`{text}` is not an address or CIDR block"),
                    "write e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\"",
                ),
            }
        }
        if accept_proxy != AcceptProxy::None && rl.trusted_proxies.is_none() {
            errs.push(
                &at.key("accept_proxy"),
                "accept_proxy needs trusted_proxies: a PROXY header from anyone else would let them choose their address",
                "list the load balancers' addresses, e.g. trusted_proxies = [\"10.0.0.0/8\"] (\"0.0.0.0/0\" and \"::/0\" trust everyone)",
            );
        }
        if accept_proxy == AcceptProxy::None && rl.trusted_proxies.is_some() {
            errs.push(
                &at.key("trusted_proxies"),
                "has no effect without accept_proxy",
                "set accept_proxy = \"v2\" (or v1, optional), or remove trusted_proxies",
            );
        }
        listeners.push(ListenerConfig {
            name,
            address,
            backlog,
            hello_timeout,
            max_hello_size,
            max_connections,
            reuse_port: rl.reuse_port.unwrap_or(true),
            keepalive,
            accept_proxy,
            trusted_proxies,
            protocol,
            quic,
        });
    }

    // [[route]]
    let mut routes: Vec<RouteConfig> = Vec::new();
    if raw.routes.is_empty() {
        errs.push(
            &root.key("route"),
            "no route is configured",
            "add a [[route]] with a pool (a route without match keys takes everything TLS)",
        );
    }
    for (i, mut rr) in raw.routes.into_iter().enumerate() {
        let at = root.key("route").index(i);
        let name = rr.name.take().unwrap_or_else(|| format!("route{i}"));
        if !name_ok(&name) {
            errs.push(
                &at.key("name"),
                format!("route name `{name}` has characters outside [A-Za-z0-9._-]"),
                "rename the route",
            );
        } else if routes.iter().any(|r| r.name == name) {
            errs.push(
                &at.key("name"),
                format!("route name `{name}` is used twice"),
                "give each route its own name (names label metrics and logs)",
            );
        }
        let listeners_key = rr.listener.take().map(OneOrMany::into_vec);
        if let Some(ls) = &listeners_key {
            for (j, l) in ls.iter().enumerate() {
                if !listeners.iter().any(|x| &x.name == l) {
                    let known: Vec<_> = listeners.iter().map(|l| l.name.as_str()).collect();
                    errs.push(
                        &at.key("listener").index(j),
                        format!("no listener is named `{l}`"),
                        format!("use one of: {}", known.join(", ")),
                    );
                }
            }
        }
        let tls = rr.tls.unwrap_or(true);
        let alpn = rr.alpn.take().map(|list| {
            if list.is_empty() {
                errs.push(
                    &at.key("alpn"),
                    "an empty list matches nothing",
                    "list protocols, or remove the key to match any ALPN",
                );
            }
            for (j, a) in list.iter().enumerate() {
                if a.is_empty() || a.len() > 255 || a == "*" {
                    errs.push(
                        &at.key("alpn").index(j),
                        format!("`{a}` is not a protocol name or prefix"),
                        "write e.g. \"h2\" or \"teleport-*\"; remove the key to match anything",
                    );
                }
            }
            list.iter()
                .map(|a| AlpnPattern::parse(a))
                .collect::<Vec<_>>()
        });
        let sni = rr.sni.take().map(|list| {
            if list.is_empty() {
                errs.push(
                    &at.key("sni"),
                    "an empty list matches nothing",
                    "list server names, or remove the key to match any SNI",
                );
            }
            list.iter()
                .enumerate()
                .filter_map(|(j, s)| match SniPattern::parse(s) {
                    Ok(p) => Some(p),
                    Err(problem) => {
                        errs.push(
                            &at.key("sni").index(j),
                            problem,
                            "write \"host.example.com\", \"*.example.com\" or \"prefix.*\"",
                        );
                        None
                    }
                })
                .collect::<Vec<_>>()
        });
        if !tls && (alpn.is_some() || sni.is_some()) {
            errs.push(
                &at.key("tls"),
                "a tls = false route cannot match alpn or sni (non-TLS traffic has neither)",
                "remove alpn/sni from this route, or remove tls = false",
            );
        }
        let target = route_target(errs, &at, &mut rr, &pools, &name);
        let idle = duration(
            errs,
            &at.key("idle_timeout"),
            rr.idle_timeout.as_deref(),
            Duration::from_secs(3600),
        );
        // A resource route without its own `sni` matches the names its resource pattern covers.
        let sni = match (&sni, &target) {
            (None, RouteTarget::Resource(r)) => SniPattern::parse(&r.sni).ok().map(|p| vec![p]),
            _ => sni,
        };
        let matcher = Match {
            listeners: listeners_key,
            alpn,
            sni,
            tls,
        };
        if let Some(earlier) = routes.iter().find(|r| matcher.shadowed_by(&r.matcher)) {
            let what = if earlier.matcher.is_catch_all() {
                "catch-all route"
            } else {
                "route"
            };
            errs.push(
                &at,
                format!(
                    "route `{name}` can never match: the earlier {what} `{}` takes all its traffic",
                    earlier.name
                ),
                format!(
                    "move `{name}` above `{}`, or narrow `{}`",
                    earlier.name, earlier.name
                ),
            );
        }
        let quic_terminate = quic_terminate(errs, &at, &rr, &target, matcher.alpn.as_deref());
        routes.push(RouteConfig {
            name,
            target,
            quic_terminate,
            matcher,
            idle_timeout: (!idle.is_zero()).then_some(idle),
        });
    }

    let cluster = cluster_config(errs, &raw.cluster);
    let served = routes
        .iter()
        .any(|r| matches!(r.target, RouteTarget::Heartbeat));
    let heartbeat = heartbeat_config(errs, &raw.heartbeat, served);
    let agents = static_agents(errs, &raw.agents);
    Config {
        source: path.to_path_buf(),
        files: vec![path.to_path_buf()],
        hash: String::new(),
        admin: AdminConfig {
            address: admin_address,
        },
        lifecycle,
        limits,
        reload,
        dns,
        listeners,
        routes,
        pools,
        cluster,
        heartbeat,
        agents,
    }
}

/// `proxy_protocol` of a pool or a resource route.
fn proxy_protocol(errs: &mut Errors<'_>, at: &KeyPath, raw: Option<&str>) -> ProxyProtocol {
    match raw {
        None | Some("none") => ProxyProtocol::None,
        Some("v1") => ProxyProtocol::V1,
        Some("v2") => ProxyProtocol::V2,
        Some(other) => {
            errs.push(
                &at.key("proxy_protocol"),
                format!("unknown PROXY protocol version `{other}`"),
                "use \"none\", \"v1\" or \"v2\"",
            );
            ProxyProtocol::None
        }
    }
}

/// `connect_timeout` of a pool or a resource route: 3 s by default, never 0.
fn connect_timeout(errs: &mut Errors<'_>, at: &KeyPath, raw: Option<&str>) -> Duration {
    let t = duration(
        errs,
        &at.key("connect_timeout"),
        raw,
        Duration::from_secs(3),
    );
    if t.is_zero() {
        errs.push(
            &at.key("connect_timeout"),
            "must be more than 0",
            "set e.g. \"3s\"",
        );
    }
    t
}

/// What a route sends to: exactly one of `pool`, `resource`, `serve`; the resource keys only
/// with `resource`.
fn route_target(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    rr: &mut RawRoute,
    pools: &BTreeMap<String, PoolConfig>,
    name: &str,
) -> RouteTarget {
    let pool_ref = |errs: &mut Errors<'_>, key: &str, p: &str| {
        if !pools.contains_key(p) {
            let known: Vec<_> = pools.keys().map(String::as_str).collect();
            errs.push(
                &at.key(key),
                format!("no pool is named `{p}`"),
                if known.is_empty() {
                    "define it as [pool.NAME] with backends".to_owned()
                } else {
                    format!("use one of: {} — or define [pool.{p}]", known.join(", "))
                },
            );
        }
    };
    let given = [rr.pool.is_some(), rr.resource.is_some(), rr.serve.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if given > 1 {
        errs.push(
            at,
            format!("route `{name}` has more than one of pool, resource and serve"),
            "give each route one target: pool = \"NAME\", resource = { ... } or serve = \"heartbeat\"",
        );
    }
    let resource_keys: Vec<&str> = [
        ("labels", rr.labels.is_some()),
        ("affinity", rr.affinity.is_some()),
        ("pick", rr.pick.is_some()),
        ("session_idle_ttl", rr.session_idle_ttl.is_some()),
        ("max_sessions", rr.max_sessions.is_some()),
        ("fallback_pool", rr.fallback_pool.is_some()),
        ("connect_timeout", rr.connect_timeout.is_some()),
        ("proxy_protocol", rr.proxy_protocol.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(k, _)| *k)
    .collect();
    if rr.resource.is_none() {
        for k in &resource_keys {
            errs.push(
                &at.key(k),
                format!("`{k}` only applies to a route with resource = {{ ... }}"),
                "remove it (a pool route takes these settings from its [pool.NAME])",
            );
        }
    }
    if let Some(serve) = rr.serve.take() {
        if serve != "heartbeat" {
            errs.push(
                &at.key("serve"),
                format!("sluice cannot serve `{serve}`"),
                "use serve = \"heartbeat\" (the agent heartbeat API)",
            );
        }
        return RouteTarget::Heartbeat;
    }
    if let Some(res) = rr.resource.take() {
        let rat = at.key("resource");
        let kind = res.kind.unwrap_or_default();
        if !name_ok(&kind) {
            errs.push(
                &rat.key("kind"),
                "missing or invalid resource kind",
                "set kind = \"app\" (or db, kube, desktop, ... as agents announce it)",
            );
        }
        let sni = res.sni.unwrap_or_default();
        let suffix = match SniPattern::parse(&sni) {
            Ok(SniPattern::Suffix(suffix)) => suffix,
            _ => {
                errs.push(
                    &rat.key("sni"),
                    format!("`{sni}` is not a `*.domain` pattern"),
                    "write sni = \"*.apps.example.com\": the part the * matches names the resource",
                );
                String::new()
            }
        };
        let affinity = match rr.affinity.as_deref() {
            None | Some("client_ip") => Affinity::ClientIp,
            Some("client_ip_sni") => Affinity::ClientIpSni,
            Some("none") => Affinity::None,
            Some(other) => {
                errs.push(
                    &at.key("affinity"),
                    format!("unknown affinity `{other}`"),
                    "use client_ip, client_ip_sni or none",
                );
                Affinity::ClientIp
            }
        };
        let pick = match rr.pick.as_deref() {
            None | Some("random") => Pick::Random,
            Some("p2c") => Pick::P2c,
            Some(other) => {
                errs.push(
                    &at.key("pick"),
                    format!("unknown pick `{other}`"),
                    "use random (uniform, as Teleport) or p2c (fewer active connections of two)",
                );
                Pick::Random
            }
        };
        if let Some(p) = &rr.fallback_pool {
            pool_ref(errs, "fallback_pool", p);
        }
        let proxy_protocol = proxy_protocol(errs, at, rr.proxy_protocol.as_deref());
        let connect_timeout = connect_timeout(errs, at, rr.connect_timeout.as_deref());
        return RouteTarget::Resource(ResourceRoute {
            kind,
            sni,
            suffix,
            labels: rr.labels.take().unwrap_or_default(),
            affinity,
            pick,
            session_idle_ttl: duration(
                errs,
                &at.key("session_idle_ttl"),
                rr.session_idle_ttl.as_deref(),
                Duration::from_secs(3600),
            ),
            max_sessions: int_in(
                errs,
                &at.key("max_sessions"),
                rr.max_sessions,
                1_000_000,
                1,
                100_000_000,
            ) as u64,
            fallback_pool: rr.fallback_pool.take(),
            connect_timeout,
            proxy_protocol,
        });
    }
    match rr.pool.take() {
        Some(p) => {
            pool_ref(errs, "pool", &p);
            RouteTarget::Pool(p)
        }
        None => {
            errs.push(
                &at.key("pool"),
                "missing",
                "set pool = \"NAME\" naming a [pool.NAME] table (or resource = { kind, sni }, or serve = \"heartbeat\")",
            );
            RouteTarget::Pool(String::new())
        }
    }
}

/// `quic = "terminate"` with `cert_file` and `key_file`, on a pool route.
fn quic_terminate(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    rr: &RawRoute,
    target: &RouteTarget,
    alpn: Option<&[AlpnPattern]>,
) -> Option<QuicTerminate> {
    let mode = rr.quic.as_deref();
    match mode {
        None | Some("passthrough") => {
            for (key, set) in [
                ("cert_file", rr.cert_file.is_some()),
                ("key_file", rr.key_file.is_some()),
            ] {
                if set {
                    errs.push(
                        &at.key(key),
                        format!("`{key}` only applies with quic = \"terminate\""),
                        "set quic = \"terminate\", or remove it (passthrough needs no certificate)",
                    );
                }
            }
            return None;
        }
        Some("terminate") => {}
        Some(other) => {
            errs.push(
                &at.key("quic"),
                format!("unknown QUIC mode `{other}`"),
                "use \"passthrough\" (the default) or \"terminate\"",
            );
            return None;
        }
    }
    if !matches!(target, RouteTarget::Pool(_)) {
        errs.push(
            &at.key("quic"),
            "quic = \"terminate\" bridges streams to a pool's TCP backends",
            "give this route a pool = \"NAME\"",
        );
        return None;
    }
    let (Some(cert), Some(key)) = (rr.cert_file.as_deref(), rr.key_file.as_deref()) else {
        errs.push(
            &at.key("cert_file"),
            "quic = \"terminate\" needs the certificate sluice presents",
            "set cert_file and key_file (PEM)",
        );
        return None;
    };
    match crate::agents::auth::server_tls(Path::new(cert), Path::new(key), None, false) {
        Ok(tls) => {
            let mut tls = (*tls).clone();
            // Exact ALPN names of the route are what sluice can negotiate.
            tls.alpn_protocols = alpn
                .unwrap_or(&[])
                .iter()
                .filter_map(|p| match p {
                    AlpnPattern::Exact(a) => Some(a.as_bytes().to_vec()),
                    AlpnPattern::Prefix(_) => None,
                })
                .collect();
            tls.max_early_data_size = u32::MAX;
            Some(QuicTerminate {
                cert_file: PathBuf::from(cert),
                key_file: PathBuf::from(key),
                tls: Arc::new(tls),
            })
        }
        Err(problem) => {
            errs.push(
                &at.key("cert_file"),
                problem,
                "give a PEM certificate chain and its PEM private key",
            );
            None
        }
    }
}

fn cluster_config(errs: &mut Errors<'_>, raw: &RawCluster) -> ClusterConfig {
    let version = raw.version.as_deref().and_then(|v| {
        let parsed = sluice_core::agents::table::Version::parse(v);
        if parsed.is_none() {
            errs.push(
                &KeyPath::default().key("cluster").key("version"),
                format!("`{v}` is not a version"),
                "write major.minor.patch, e.g. \"17.2.1\"",
            );
        }
        parsed
    });
    ClusterConfig { version }
}

/// `[heartbeat]`: limits, the tokens file and the TLS config, read now so that `sluice
/// check` and a reload report a bad file instead of the first agent.
fn heartbeat_config(errs: &mut Errors<'_>, raw: &RawHeartbeat, served: bool) -> HeartbeatConfig {
    let at = KeyPath::default().key("heartbeat");
    let path = |p: &Option<String>| p.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
    let (cert_file, key_file) = (path(&raw.cert_file), path(&raw.key_file));
    let (tokens_file, client_ca_file) = (path(&raw.tokens_file), path(&raw.client_ca_file));
    let address = raw.address.as_deref().and_then(|text| match resolve(text) {
        Ok(a) => Some(a),
        Err(problem) => {
            errs.push(
                &at.key("address"),
                problem,
                "write an address like \"0.0.0.0:3025\", or remove it to serve heartbeats only through a serve = \"heartbeat\" route",
            );
            None
        }
    });
    let max_ttl = duration(
        errs,
        &at.key("max_ttl"),
        raw.max_ttl.as_deref(),
        Duration::from_secs(900),
    );
    let default_ttl = duration(
        errs,
        &at.key("default_ttl"),
        raw.default_ttl.as_deref(),
        Duration::from_secs(90).min(max_ttl),
    );
    if max_ttl.is_zero() || default_ttl.is_zero() || default_ttl > max_ttl {
        errs.push(
            &at.key("default_ttl"),
            "default_ttl and max_ttl must be more than 0, and default_ttl at most max_ttl",
            "e.g. default_ttl = \"90s\", max_ttl = \"15m\"",
        );
    }
    let mut tokens = Vec::new();
    if let Some(file) = &tokens_file {
        match std::fs::read_to_string(file) {
            Ok(text) => match sluice_core::agents::auth::parse_tokens(&text) {
                Ok(t) => tokens = t,
                Err(list) => {
                    for (line, problem) in list {
                        errs.list.push(ConfigError {
                            path: file.clone(),
                            line: Some(line),
                            key: "(token)".into(),
                            problem,
                            fix: "write one token of 16+ characters per line, then optional name=, kinds=a,b, labels=k=v".into(),
                        });
                    }
                }
            },
            Err(e) => errs.push(
                &at.key("tokens_file"),
                format!("cannot read {}: {e}", file.display()),
                "check the path and its permissions",
            ),
        }
    }
    let wanted = served || address.is_some();
    let tls = match (&cert_file, &key_file) {
        (Some(cert), Some(key)) => {
            match crate::agents::auth::server_tls(
                cert,
                key,
                client_ca_file.as_deref(),
                tokens_file.is_some(),
            ) {
                Ok(cfg) => Some(cfg),
                Err(problem) => {
                    errs.push(
                        &at.key("cert_file"),
                        problem,
                        "give a PEM certificate chain and its PEM private key",
                    );
                    None
                }
            }
        }
        (None, None) => {
            if wanted {
                errs.push(
                    &at.key("cert_file"),
                    "the heartbeat API is served but has no certificate",
                    "set cert_file and key_file under [heartbeat] (agents connect with TLS)",
                );
            }
            None
        }
        _ => {
            errs.push(
                &at.key("key_file"),
                "cert_file and key_file go together",
                "set both, or neither",
            );
            None
        }
    };
    if wanted && tokens_file.is_none() && client_ca_file.is_none() {
        errs.push(
            &at.key("tokens_file"),
            "the heartbeat API would accept anyone's heartbeats",
            "set tokens_file (bearer tokens) and/or client_ca_file (client certificates)",
        );
    }
    HeartbeatConfig {
        address,
        cert_file,
        key_file,
        tokens_file,
        client_ca_file,
        max_ttl,
        default_ttl,
        min_ready: duration(
            errs,
            &at.key("min_ready"),
            raw.min_ready.as_deref(),
            Duration::ZERO,
        ),
        keep_expired: duration(
            errs,
            &at.key("keep_expired"),
            raw.keep_expired.as_deref(),
            Duration::from_secs(60),
        ),
        max_body_bytes: int_in(
            errs,
            &at.key("max_body_bytes"),
            raw.max_body_bytes,
            1 << 20,
            1024,
            64 << 20,
        ) as usize,
        max_resources: int_in(
            errs,
            &at.key("max_resources"),
            raw.max_resources,
            1000,
            1,
            1_000_000,
        ) as usize,
        max_agents: int_in(
            errs,
            &at.key("max_agents"),
            raw.max_agents,
            1_000_000,
            1,
            100_000_000,
        ) as usize,
        tokens,
        tls,
    }
}

fn static_agents(errs: &mut Errors<'_>, raw: &[RawAgent]) -> Vec<StaticAgent> {
    let mut out: Vec<StaticAgent> = Vec::new();
    for (i, ra) in raw.iter().enumerate() {
        let at = KeyPath::default().key("agent").index(i);
        let id = ra.id.clone().unwrap_or_default();
        if !sluice_core::agents::agent_id_ok(&id) {
            errs.push(
                &at.key("id"),
                "missing, or not 1 to 256 of [A-Za-z0-9._:-]",
                "set id = \"agent-1\"",
            );
        } else if out.iter().any(|a| a.id == id) {
            errs.push(
                &at.key("id"),
                format!("agent `{id}` is listed twice"),
                "give each agent its own id",
            );
        }
        let address = match ra.address.as_deref().map(resolve) {
            Some(Ok(a)) => a,
            Some(Err(problem)) => {
                errs.push(
                    &at.key("address"),
                    problem,
                    "write \"host:port\" where the agent listens",
                );
                continue;
            }
            None => {
                errs.push(
                    &at.key("address"),
                    "missing",
                    "write \"host:port\" where the agent listens",
                );
                continue;
            }
        };
        let version = ra.version.as_deref().and_then(|v| {
            let parsed = sluice_core::agents::table::Version::parse(v);
            if parsed.is_none() {
                errs.push(
                    &at.key("version"),
                    format!("`{v}` is not a version"),
                    "write e.g. \"17.2.1\"",
                );
            }
            parsed
        });
        let mut resources = Vec::new();
        for (j, r) in ra.resources.iter().enumerate() {
            let (kind, name) = (
                r.kind.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            );
            if !name_ok(&kind) || !sluice_core::agents::resource_name_ok(&name) {
                errs.push(
                    &at.key("resources").index(j),
                    "a resource needs a kind ([A-Za-z0-9._-]) and a name of [a-z0-9._-] (names are matched against the lowercased SNI)",
                    "write { kind = \"app\", name = \"myapp\" }",
                );
                continue;
            }
            resources.push(StaticResource {
                kind,
                name,
                labels: r.labels.clone(),
            });
        }
        out.push(StaticAgent {
            id,
            address,
            version,
            labels: ra.labels.clone(),
            resources,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("t.toml"), text)
    }

    const GOOD: &str = r#"
[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "tunnels"
alpn = ["teleport-reversetunnel*"]
pool = "tunnel"
idle_timeout = "0s"

[[route]]
name = "clients"
pool = "client"

[pool.tunnel]
backends = ["127.0.0.1:3024", { address = "127.0.0.2:3024", weight = 3 }]
balance = "p2c"
proxy_protocol = "v2"

[pool.client]
backends = ["localhost:3080"]
"#;

    #[test]
    fn accept_proxy_needs_trusted_proxies() {
        let with = |keys: &str| {
            GOOD.replacen(
                "address = \"127.0.0.1:0\"\n",
                &format!("address = \"127.0.0.1:0\"\n{keys}\n"),
                1,
            )
        };
        let errs = parse(&with("accept_proxy = \"v2\""))
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("t.toml:5: listener[0].accept_proxy: accept_proxy needs trusted_proxies"),
            "{errs}"
        );
        let errs = parse(&with("trusted_proxies = [\"10.0.0.0/8\"]"))
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("trusted_proxies: has no effect without accept_proxy"),
            "{errs}"
        );
        let errs = parse(&with(
            "accept_proxy = \"v3\"\ntrusted_proxies = [\"10.0.0.0/8\", \"nope\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(errs.contains("unknown PROXY protocol mode `v3`"), "{errs}");
        assert!(
            errs.contains("trusted_proxies[1]: `nope` is not an address or CIDR block"),
            "{errs}"
        );
        let ok = parse(&with("accept_proxy = \"optional\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"::/0\"]")).unwrap();
        assert_eq!(ok.listeners[0].trusted_proxies.len(), 3);
    }

    #[test]
    fn absurd_durations_are_errors_not_overflows() {
        let text = format!("{GOOD}\n[lifecycle]\nclose_spread = \"20years\"\n");
        let errs = parse(&text).unwrap_err().to_string();
        assert!(
            errs.contains("lifecycle.close_spread: `20years` is longer than sluice allows"),
            "{errs}"
        );
        let text = GOOD.replace(
            "balance = \"p2c\"",
            "balance = \"p2c\"\nmin_ready = \"9999999years\"",
        );
        assert!(parse(&text).is_err());
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].idle_timeout, None);
        assert_eq!(c.routes[1].idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.pools["tunnel"].backends[1].weight, 3);
        assert_eq!(c.pools["tunnel"].proxy_protocol, ProxyProtocol::V2);
        assert_eq!(c.listeners[0].max_hello_size, 16384);
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad = GOOD
            .replace("pool = \"client\"", "pool = \"nope\"")
            .replace("balance = \"p2c\"", "balance = \"fastest\"");
        let errs = parse(&bad).unwrap_err().0;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("t.toml:14: route[1].pool: no pool is named `nope`")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("t.toml:18: pool.tunnel.balance: unknown balancer")),
            "{text:?}"
        );
    }

    #[test]
    fn park_idle_after_defaults_turns_off_and_has_a_floor() {
        let with = |v: &str| format!("[limits]\npark_idle_after = \"{v}\"\n{GOOD}");
        let c = parse(GOOD).unwrap();
        assert_eq!(c.limits.park_idle_after, Some(DEFAULT_PARK_IDLE_AFTER));
        assert_eq!(parse(&with("0s")).unwrap().limits.park_idle_after, None);
        assert_eq!(
            parse(&with("100ms")).unwrap().limits.park_idle_after,
            Some(Duration::from_millis(100))
        );
        let errs = parse(&with("10ms")).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "limits.park_idle_after");
        assert!(errs[0].to_string().contains("at least"), "{}", errs[0]);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let bad = GOOD.replace("idle_timeout = \"0s\"", "idle_timout = \"0s\"");
        let errs = parse(&bad).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(10));
        assert_eq!(errs[0].key, "idle_timout");
        assert!(errs[0].problem.contains("unknown field"), "{:?}", errs[0]);
    }

    #[test]
    fn inputs_found_by_fuzzing_are_errors_not_panics() {
        // fuzz/artifacts/route_config: made toml_edit 0.23 panic.
        for text in ["==\x0f\n\n[.\n", "a.b=1\na=2\n[a]\n", "[x]\n[x.y]\nx.y=1\n"] {
            assert!(parse(text).is_err(), "{text:?}");
        }
        // The same kind of input behind an otherwise valid config keeps line numbers working.
        assert!(Locator::new("==\x0f\n\n[.\n").doc.is_none());
    }

    #[test]
    fn shadowed_route_is_rejected() {
        let bad = GOOD.replace(
            "[pool.tunnel]",
            "[[route]]\nname = \"late\"\nalpn = [\"h2\"]\npool = \"client\"\n\n[pool.tunnel]",
        );
        let errs = parse(&bad).unwrap_err().0;
        assert!(
            errs[0].problem.contains("catch-all route `clients`"),
            "{errs:?}"
        );
        assert_eq!(errs[0].line, Some(16)); // the `[[route]]` header of the shadowed route
    }

    #[test]
    fn bad_values() {
        let bad = GOOD
            .replace("idle_timeout = \"0s\"", "idle_timeout = \"soon\"")
            .replace(
                "address = \"127.0.0.1:0\"",
                "address = \"127.0.0.1:0\"\nmax_hello_size = 100000",
            );
        let errs = parse(&bad).unwrap_err().0;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.key == "listener[0].max_hello_size"));
        assert!(errs.iter().any(|e| e.key == "route[0].idle_timeout"));
    }
}
