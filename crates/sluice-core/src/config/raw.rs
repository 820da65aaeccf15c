//! The raw layer: exactly what the file says, as serde reads it. Every key is optional here;
//! defaults and checks are the sections' `build` functions.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::error::{ConfigError, ConfigErrors, Locator};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) lifecycle: RawLifecycle,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) dns: RawDns,
    #[serde(default, rename = "listener")]
    pub(super) listeners: Vec<RawListener>,
    #[serde(default, rename = "route")]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default, rename = "pool")]
    pub(super) pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    pub(super) cluster: RawCluster,
    #[serde(default)]
    pub(super) heartbeat: RawHeartbeat,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default, rename = "agent")]
    pub(super) agents: Vec<RawAgent>,
    #[serde(default)]
    pub(super) versions: RawVersions,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVersions {
    pub(super) channels: Option<BTreeMap<String, RawChannel>>,
    pub(super) cache_ttl: Option<String>,
    pub(super) max_stale: Option<String>,
    pub(super) stable_after: Option<String>,
    pub(super) rate_limit: Option<i64>,
    pub(super) ca_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChannel {
    pub(super) static_version: Option<String>,
    pub(super) critical: Option<bool>,
    pub(super) forward_url: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: Option<String>,
    pub(super) version: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) kind: Option<String>,
    pub(super) endpoints: Option<Vec<String>>,
    pub(super) prefix: Option<String>,
    pub(super) edge_id: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeartbeat {
    pub(super) address: Option<String>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) tokens_file: Option<String>,
    pub(super) client_ca_file: Option<String>,
    pub(super) max_ttl: Option<String>,
    pub(super) default_ttl: Option<String>,
    pub(super) min_ready: Option<String>,
    pub(super) keep_expired: Option<String>,
    pub(super) max_body_bytes: Option<i64>,
    pub(super) max_resources: Option<i64>,
    pub(super) max_agents: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) id: Option<String>,
    pub(super) address: Option<String>,
    pub(super) version: Option<String>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) resources: Vec<RawResource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResource {
    pub(super) kind: Option<String>,
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResourceTarget {
    pub(super) kind: Option<String>,
    pub(super) sni: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) address: Option<String>,
    pub(super) allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLifecycle {
    pub(super) min_ready: Option<String>,
    pub(super) drain_delay: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) close_spread: Option<String>,
    pub(super) upgrade_socket: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<i64>,
    pub(super) park_idle_after: Option<String>,
    pub(super) max_pending_hellos: Option<i64>,
    pub(super) max_pending_hellos_per_source: Option<i64>,
    pub(super) max_pipes: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) nameservers: Option<Vec<String>>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) watch: Option<bool>,
    pub(super) debounce: Option<String>,
}

impl RawConfig {
    /// The process-wide tables, which only the main file may set.
    pub(super) fn global_tables(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.admin.address.is_some() || self.admin.allow.is_some() {
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
        let lim = &self.limits;
        if lim.max_connections.is_some()
            || lim.park_idle_after.is_some()
            || lim.max_pending_hellos.is_some()
            || lim.max_pending_hellos_per_source.is_some()
            || lim.max_pipes.is_some()
        {
            v.push("limits");
        }
        if self.reload.watch.is_some() || self.reload.debounce.is_some() {
            v.push("reload");
        }
        if self.dns.nameservers.is_some() || self.dns.timeout.is_some() {
            v.push("dns");
        }
        if self.cluster.version.is_some() || self.cluster.name.is_some() {
            v.push("cluster");
        }
        let vs = &self.versions;
        if vs.channels.is_some()
            || vs.cache_ttl.is_some()
            || vs.max_stale.is_some()
            || vs.stable_after.is_some()
            || vs.rate_limit.is_some()
            || vs.ca_file.is_some()
        {
            v.push("versions");
        }
        let st = &self.store;
        if st.kind.is_some()
            || st.endpoints.is_some()
            || st.prefix.is_some()
            || st.edge_id.is_some()
            || st.ca_file.is_some()
            || st.cert_file.is_some()
            || st.key_file.is_some()
            || st.username.is_some()
            || st.password_file.is_some()
            || st.timeout.is_some()
        {
            v.push("store");
        }
        let hb = &self.heartbeat;
        if hb.address.is_some()
            || hb.allow.is_some()
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
pub(super) struct RawListener {
    pub(super) name: Option<String>,
    pub(super) address: Option<String>,
    pub(super) backlog: Option<i64>,
    pub(super) hello_timeout: Option<String>,
    pub(super) max_hello_size: Option<i64>,
    pub(super) max_connections: Option<i64>,
    pub(super) reuse_port: Option<bool>,
    pub(super) keepalive_idle: Option<String>,
    pub(super) keepalive_interval: Option<String>,
    pub(super) keepalive_count: Option<i64>,
    pub(super) accept_proxy: Option<String>,
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) deny: Option<Vec<String>>,
    pub(super) protocol: Option<String>,
    pub(super) flow_idle_timeout: Option<String>,
    pub(super) max_flows: Option<i64>,
    pub(super) max_pending_flows: Option<i64>,
}

/// The keepalive keys of a listener or pool (both spell them the same way).
pub(super) struct RawKeepalive {
    pub(super) keepalive_idle: Option<String>,
    pub(super) keepalive_interval: Option<String>,
    pub(super) keepalive_count: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) listener: Option<OneOrMany>,
    pub(super) alpn: Option<Vec<String>>,
    pub(super) sni: Option<Vec<String>>,
    pub(super) tls: Option<bool>,
    pub(super) pool: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) resource: Option<RawResourceTarget>,
    pub(super) serve: Option<String>,
    pub(super) labels: Option<BTreeMap<String, String>>,
    pub(super) affinity: Option<String>,
    pub(super) pick: Option<String>,
    pub(super) session_idle_ttl: Option<String>,
    pub(super) max_sessions: Option<i64>,
    pub(super) fallback_pool: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) proxy_protocol: Option<String>,
    pub(super) quic: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) deny: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
    pub(super) balance: Option<String>,
    pub(super) hash_key: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) retries: Option<i64>,
    pub(super) proxy_protocol: Option<String>,
    pub(super) keepalive_idle: Option<String>,
    pub(super) keepalive_interval: Option<String>,
    pub(super) keepalive_count: Option<i64>,
    pub(super) min_ready: Option<String>,
    pub(super) removed_drain_timeout: Option<String>,
    pub(super) eject_after_failures: Option<i64>,
    pub(super) dns: Option<Vec<String>>,
    pub(super) srv: Option<Vec<String>>,
    pub(super) dns_min_refresh: Option<String>,
    pub(super) dns_max_refresh: Option<String>,
    pub(super) all_unhealthy: Option<String>,
    pub(super) health: Option<RawHealth>,
    pub(super) eject_time: Option<String>,
    pub(super) eject_max_time: Option<String>,
    pub(super) max_ejected_percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) kind: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) jitter: Option<String>,
    pub(super) rise: Option<i64>,
    pub(super) fall: Option<i64>,
    pub(super) tls: Option<bool>,
    pub(super) sni: Option<String>,
    pub(super) alpn: Option<Vec<String>>,
    pub(super) ca_file: Option<String>,
    pub(super) path: Option<String>,
    pub(super) host: Option<String>,
    pub(super) expect_status: Option<String>,
    pub(super) send_proxy: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawBackend {
    Address(String),
    Detailed {
        address: String,
        #[serde(default)]
        weight: Option<i64>,
    },
}

pub(super) fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigErrors> {
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
