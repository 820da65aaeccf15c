//! `[cluster]`, `[heartbeat]` (the agent heartbeat API) and `[[agent]]` (agents known
//! without heartbeats).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::{AddrSlot, Pending};
use super::raw::{RawAgent, RawCluster, RawHeartbeat};
use super::values::{
    address, check_name, duration, human, int_in, name_ok, Address, NameRule, UNRESOLVED,
};
use crate::agents::table::Version;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterConfig {
    /// One etcd can hold several clusters: this one's keys are under
    /// `<store.prefix><name>/`.
    pub name: String,
    /// Agents newer than this, or more than one major version older, get no sessions.
    pub version: Option<crate::agents::table::Version>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatConfig {
    /// Its own TLS listener (besides routes with `serve = "heartbeat"` on the main port).
    pub address: Option<SocketAddr>,
    /// `heartbeat.allow`: sources that may connect to that listener (empty: every source).
    /// On the main port, the `serve = "heartbeat"` route's own `allow`/`deny` apply.
    pub allow: crate::acl::Acl,
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
    /// The bearer tokens (digests only), read from `tokens_file` (see `Pending::Tokens`).
    pub tokens: Vec<crate::agents::auth::Token>,
    /// The TLS server config of the API (certificate, client CA); `None` when no
    /// certificate is configured, and then nothing may serve the API. Built by whoever loads
    /// the config (see `Pending::HeartbeatTls`).
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
    pub version: Option<crate::agents::table::Version>,
    pub labels: BTreeMap<String, String>,
    pub resources: Vec<StaticResource>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StaticResource {
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

const AGENT_ID: NameRule = NameRule {
    valid: crate::agents::agent_id_ok,
    invalid: |_| "missing, or not 1 to 256 of [A-Za-z0-9._:-]".into(),
    invalid_fix: "set id = \"agent-1\"",
    taken: Some((
        |id| format!("agent `{id}` is listed twice"),
        "give each agent its own id",
    )),
};

impl RawCluster {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> ClusterConfig {
        let version = self.version.as_deref().and_then(|v| {
            let parsed = Version::parse(v);
            if parsed.is_none() {
                errs.push(
                    &root.key("cluster").key("version"),
                    format!("`{v}` is not a version"),
                    "write major.minor.patch, e.g. \"17.2.1\"",
                );
            }
            parsed
        });
        let name = self.name.clone().unwrap_or_else(|| "default".into());
        if !super::store::store_name_ok(&name) {
            errs.push(
                &root.key("cluster").key("name"),
                format!("`{name}` is not a cluster name"),
                "use 1 to 128 of [A-Za-z0-9._-], e.g. name = \"prod\"",
            );
        }
        ClusterConfig { name, version }
    }
}

impl RawHeartbeat {
    /// `[heartbeat]`: limits, and the tokens file and TLS config left to read (so that
    /// `sluice check` and a reload report a bad file instead of the first agent). `served`:
    /// a route serves the API.
    pub(super) fn build(
        &self,
        errs: &mut Errors<'_>,
        root: &KeyPath,
        served: bool,
    ) -> HeartbeatConfig {
        let raw = self;
        let at = root.key("heartbeat");
        let path = |p: &Option<String>| p.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
        let (cert_file, key_file) = (path(&raw.cert_file), path(&raw.key_file));
        let (tokens_file, client_ca_file) = (path(&raw.tokens_file), path(&raw.client_ca_file));
        let address = raw.address.as_deref().and_then(|text| {
            address(
                errs,
                &at.key("address"),
                text,
                AddrSlot::Heartbeat,
                "write an address like \"0.0.0.0:3025\", or remove it to serve heartbeats only through a serve = \"heartbeat\" route",
            )
            .or_unresolved()
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
        if let Some(file) = &tokens_file {
            let place = errs.place(&at.key("tokens_file"));
            errs.later(Pending::Tokens {
                at: place,
                file: file.clone(),
                fix: "check the path and its permissions",
                line_fix: "write one token of 16+ characters per line, then optional name=, kinds=a,b, labels=k=v",
            });
        }
        let wanted = served || address.is_some();
        match (&cert_file, &key_file) {
            (Some(cert), Some(key)) => {
                let place = errs.place(&at.key("cert_file"));
                errs.later(Pending::HeartbeatTls {
                    at: place,
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: client_ca_file.clone(),
                    fix: "give a PEM certificate chain and its PEM private key",
                });
            }
            (None, None) => {
                if wanted {
                    errs.push(
                        &at.key("cert_file"),
                        "the heartbeat API is served but has no certificate",
                        "set cert_file and key_file under [heartbeat] (agents connect with TLS)",
                    );
                }
            }
            _ => {
                errs.push(
                    &at.key("key_file"),
                    "cert_file and key_file go together",
                    "set both, or neither",
                );
            }
        }
        if wanted && tokens_file.is_none() && client_ca_file.is_none() {
            errs.push(
                &at.key("tokens_file"),
                "the heartbeat API would accept anyone's heartbeats",
                "set tokens_file (bearer tokens) and/or client_ca_file (client certificates)",
            );
        }
        // The files sluice reads at load count in the config's hash: a reload after rotating
        // one must not be skipped as "unchanged".
        for file in [&tokens_file, &cert_file, &key_file, &client_ca_file]
            .into_iter()
            .flatten()
        {
            errs.later(Pending::Hash { path: file.clone() });
        }
        let allow = crate::acl::Acl {
            allow: super::values::cidrs(errs, &at.key("allow"), raw.allow.as_deref()),
            deny: Vec::new(),
        };
        HeartbeatConfig {
            address,
            allow,
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
            tokens: Vec::new(),
            tls: None,
        }
    }
}

/// Every `[[agent]]`; one whose address is missing or invalid is left out.
pub(super) fn static_agents(
    errs: &mut Errors<'_>,
    root: &KeyPath,
    raw: &[RawAgent],
) -> Vec<StaticAgent> {
    let mut out: Vec<StaticAgent> = Vec::new();
    for (i, ra) in raw.iter().enumerate() {
        let at = root.key("agent").index(i);
        if let Some(agent) = ra.build(errs, &at, &out) {
            out.push(agent);
        }
    }
    out
}

impl RawAgent {
    fn build(
        &self,
        errs: &mut Errors<'_>,
        at: &KeyPath,
        earlier: &[StaticAgent],
    ) -> Option<StaticAgent> {
        let ra = self;
        let id = ra.id.clone().unwrap_or_default();
        check_name(
            errs,
            &at.key("id"),
            &id,
            &AGENT_ID,
            earlier.iter().map(|a| a.id.as_str()),
        );
        let fix = "write \"host:port\" where the agent listens";
        let address = match ra.address.as_deref() {
            Some(text) => match address(
                errs,
                &at.key("address"),
                text,
                AddrSlot::Agent(earlier.len()),
                fix,
            ) {
                Address::Ip(a) => a,
                Address::Name => UNRESOLVED,
                Address::Invalid => return None,
            },
            None => {
                errs.push(&at.key("address"), "missing", fix);
                return None;
            }
        };
        let version = ra.version.as_deref().and_then(|v| {
            let parsed = Version::parse(v);
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
            if !name_ok(&kind) || !crate::agents::resource_name_ok(&name) {
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
        Some(StaticAgent {
            id,
            address,
            version,
            labels: ra.labels.clone(),
            resources,
        })
    }
}
