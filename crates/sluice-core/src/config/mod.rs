//! Configuration: TOML text → raw serde structs → validated, immutable `Config`.
//!
//! Owns: the user's contract (key names, defaults, units) and every error message about it.
//! Every error carries the file, the line, the key and a way to fix it; validation collects all
//! semantic errors instead of stopping at the first. It never binds sockets or touches runtime
//! state: turning a `Config` into live objects is the binary's snapshot.
//!
//! Validation is pure: it reads no file, asks no resolver and reads no clock. What needs I/O
//! (host names to resolve, the tokens file, certificates, the hash of the files the config
//! names) it records as `Pending` work, each with the place it came from and its fix; the
//! binary's `config::load` does that work and reports its failures in the same
//! `file:line: key: problem — fix` shape, so a typo in a host name still fails the check
//! instead of the first connection.
//!
//! One file per section, the checks beside the types they build: `global` (`[admin]`,
//! `[lifecycle]`, `[limits]`, `[reload]`, `[dns]`), `listener`, `route`, `pool`, `heartbeat`
//! (`[cluster]`, `[heartbeat]`, `[[agent]]`), `store`, `versions`; shared value parsers in `values`, the serde
//! layer in `raw`, errors and their places in `error`, the collector validation writes to in
//! `collect`, the pending work in `pending`.

mod collect;
mod error;
mod global;
mod heartbeat;
mod listener;
mod pending;
mod pool;
mod raw;
mod route;
mod store;
mod values;
mod versions;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use self::error::{ConfigError, ConfigErrors, Place};
pub use self::global::{AdminConfig, DnsConfig, LifecycleConfig, LimitsConfig, ReloadConfig};
pub use self::heartbeat::{ClusterConfig, HeartbeatConfig, StaticAgent, StaticResource};
pub use self::listener::{ListenerConfig, ListenerProtocol, QuicSettings};
pub use self::pending::{AddrSlot, Among, FileSlot, Pending};
pub use self::pool::{BackendConfig, CheckKind, Discovery, Ejection, HealthCheck, PoolConfig};
pub use self::route::{Affinity, Pick, QuicTerminate, ResourceRoute, RouteConfig, RouteTarget};
pub use self::store::{store_name_ok, StoreConfig, StoreKind, StoreSecrets};
pub use self::values::{literal_address, AddressError, Keepalive};
pub use self::versions::{channel_name_ok, Channel, VersionsConfig};
pub use crate::proxy::{AcceptProxy, ProxyProtocol};

use self::collect::Errors;
use self::error::{KeyPath, Locator, Origins};
use self::raw::{parse_raw, RawConfig};

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

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The main file.
    pub source: PathBuf,
    /// Every file this config was read from: the main one, then `conf.d/*.toml` in name order.
    pub files: Vec<PathBuf>,
    /// A hash of the files' contents (hex), exported as a label of `sluice_config_info`. From
    /// validation, of the config files only; loading adds the files in `Pending::Hash`.
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
    pub store: StoreConfig,
    /// `[[agent]]`: agents and resources known without heartbeats.
    pub agents: Vec<StaticAgent>,
    /// `[versions]`: the version server for agents' updaters.
    pub versions: VersionsConfig,
}

/// A config with no error that validation can see, and the work that needs I/O before it
/// can be used: names stand for `0.0.0.0:0` until resolved, TLS configs and tokens are empty
/// until read.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub pending: Vec<Pending>,
}

/// All that validation found, errors included: for a caller that does the pending work
/// anyway, to report every problem of a config in one go.
#[derive(Debug, Clone)]
pub struct Validation {
    pub config: Config,
    /// What is wrong, in the order found; the config is not to be used unless it is empty.
    pub errors: Vec<ConfigError>,
    pub pending: Vec<Pending>,
}

impl Validation {
    /// `Ok` only when there is no error.
    pub fn into_validated(self) -> Result<Validated, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(Validated {
                config: self.config,
                pending: self.pending,
            })
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

impl Config {
    /// What the open-file budget is made of (see `fds`).
    pub fn fd_shape(&self) -> crate::fds::Shape {
        let quic = |l: &&ListenerConfig| l.protocol == ListenerProtocol::Quic;
        crate::fds::Shape {
            listeners: self.listeners.iter().filter(|l| !quic(l)).count() as u64,
            quic_flows: self
                .listeners
                .iter()
                .filter(quic)
                .map(|l| l.quic.max_flows as u64)
                .sum(),
            heartbeat_listener: self.heartbeat.address.is_some(),
            pipes: self.limits.max_pipes.map(|p| p as u64),
        }
    }

    /// The open-file budget's verdict on an explicit `limits.max_connections` with `nofile`
    /// descriptors: `Err` names both numbers and the fix.
    pub fn check_fd_budget(&self, nofile: u64) -> Result<(), String> {
        let Some(mc) = self.limits.max_connections else {
            return Ok(());
        };
        let budget = crate::fds::Budget { nofile };
        let needed = budget.needed(self.fd_shape(), mc);
        if needed <= nofile {
            return Ok(());
        }
        Err(format!(
            "limits.max_connections = {mc} needs about {needed} open files (2 per connection, \
             splice pipes, listeners, QUIC flows, the APIs), but the open-file limit is {nofile}: \
             raise it (LimitNOFILE= in the systemd unit, ulimit -n) to at least {needed}, or \
             lower max_connections to {} (or remove it: sluice derives it from the limit), or \
             set fewer limits.max_pipes",
            budget.max_connections(self.fd_shape())
        ))
    }

    /// Parse and validate config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Validated, ConfigErrors> {
        Self::parse_files(&[(path.to_path_buf(), text.to_owned())])
    }

    /// Parse the main file and extra files (`conf.d`), merge them, validate the whole.
    /// Extra files may hold `[[listener]]`, `[[route]]` (appended after the main file's, in
    /// file order) and `[pool.*]` (each pool defined once). Any error is `Err`.
    pub fn parse_files(files: &[(PathBuf, String)]) -> Result<Validated, ConfigErrors> {
        Self::validate_files(files)?.into_validated()
    }

    /// As `parse_files`, but a config that parses is returned with its errors and its
    /// pending work; `Err` only when no config can be built (TOML syntax or types).
    pub fn validate_files(files: &[(PathBuf, String)]) -> Result<Validation, ConfigErrors> {
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
            pending: Vec::new(),
        };
        let Some(merged) = merge(files, raws, &mut errs) else {
            return Err(ConfigErrors(vec![]));
        };
        let mut config = validate(&files[0].0, merged, &mut errs);
        config.files = files.iter().map(|(p, _)| p.clone()).collect();
        config.hash = content_hash(files.iter().map(|(p, t)| (p.as_path(), t.as_bytes())));
        Ok(Validation {
            config,
            errors: errs.list,
            pending: errs.pending,
        })
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// The hash of a config (`Config::hash`): each file's path and content, in order (the config
/// files, then the files of `Pending::Hash`), as 16 hex digits.
pub fn content_hash<'a>(files: impl IntoIterator<Item = (&'a Path, &'a [u8])>) -> String {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (path, content) in files {
        for chunk in [path.as_os_str().as_encoded_bytes(), content, b"\0"] {
            hash = crate::balance::fnv1a_continue(hash, chunk);
        }
    }
    format!("{hash:016x}")
}

/// The files' raw configs as one, and where each listener, route, agent and pool came from
/// (into `errs.origins`). `None` when there is no file.
fn merge(
    files: &[(PathBuf, String)],
    raws: Vec<RawConfig>,
    errs: &mut Errors<'_>,
) -> Option<RawConfig> {
    let mut raws = raws.into_iter().enumerate();
    let (_, mut merged) = raws.next()?;
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
    Some(merged)
}

/// The merged raw config → `Config`, section by section (pools before routes: routes refer
/// to them).
fn validate(path: &Path, raw: RawConfig, errs: &mut Errors<'_>) -> Config {
    let root = KeyPath::default();
    let admin = raw.admin.build(errs, &root);
    let lifecycle = raw.lifecycle.build(errs, &root);
    let dns = raw.dns.build(errs, &root);
    let reload = raw.reload.build(errs, &root);
    let limits = raw.limits.build(errs, &root);
    let pools: BTreeMap<String, PoolConfig> = raw
        .pools
        .into_iter()
        .map(|(name, rp)| (name.clone(), rp.build(errs, &root, name)))
        .collect();
    let listeners = listener::listeners(errs, &root, raw.listeners);
    let store = raw.store.build(errs, &root);
    let default_pick = match store.kind {
        StoreKind::Etcd => Pick::Rendezvous,
        StoreKind::Memory => Pick::Random,
    };
    let routes = route::routes(errs, &root, raw.routes, &listeners, &pools, default_pick);
    let cluster = raw.cluster.build(errs, &root);
    let served = routes
        .iter()
        .any(|r| matches!(r.target, RouteTarget::Heartbeat));
    let heartbeat = raw.heartbeat.build(errs, &root, served);
    let agents = heartbeat::static_agents(errs, &root, &raw.agents);
    let versions = raw.versions.build(errs, &root);
    Config {
        source: path.to_path_buf(),
        files: vec![path.to_path_buf()],
        hash: String::new(),
        admin,
        lifecycle,
        limits,
        reload,
        dns,
        listeners,
        routes,
        pools,
        cluster,
        heartbeat,
        store,
        agents,
        versions,
    }
}
