//! `[store]`: where the heartbeat table lives. `memory` (the default) keeps it in this
//! process; `etcd` shares it between every edge of `[cluster] name` through etcd v3.
//!
//! Read at start only (like `admin.address`): a reload that changes it is applied except for
//! this section, with a warning (the runtime compares it).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::{FileSlot, Pending};
use super::raw::RawStore;
use super::values::{duration, human};

/// Which table the edge uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Memory,
    Etcd,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `http://host:port` or `https://host:port`, one per etcd member.
    pub endpoints: Vec<String>,
    /// Ends with `/`; this cluster's keys live under `<prefix><cluster.name>/`.
    pub prefix: String,
    /// This edge's name in the store's records, views and logs; `None`: the host name (the
    /// binary fills it in).
    pub edge_id: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The longest any one store operation may take before the request that needed it is
    /// answered `store_unavailable` (etcd hanging is detected within this).
    #[serde(with = "human")]
    pub timeout: Duration,
    /// What the files above hold, read by the loader (`Pending::ReadFile`).
    #[serde(skip)]
    pub secrets: StoreSecrets,
}

/// The contents of the store's credential files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSecrets {
    pub ca: Option<Vec<u8>>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub password: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            endpoints: Vec::new(),
            prefix: "/sluice/".into(),
            edge_id: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            timeout: Duration::from_secs(3),
            secrets: StoreSecrets::default(),
        }
    }
}

/// An etcd endpoint: `http(s)://host:port`, nothing after the port.
fn endpoint_ok(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return false;
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains('/')
        && !host.contains('@')
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// A cluster's or an edge's name: it goes in etcd keys and in records.
pub fn store_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl RawStore {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> StoreConfig {
        let at = root.key("store");
        let kind = match self.kind.as_deref() {
            None | Some("memory") => StoreKind::Memory,
            Some("etcd") => StoreKind::Etcd,
            Some(other) => {
                errs.push(
                    &at.key("kind"),
                    format!("unknown store kind `{other}`"),
                    "use memory (this edge only) or etcd (shared by every edge)",
                );
                StoreKind::Memory
            }
        };
        let endpoints = self.endpoints.clone().unwrap_or_default();
        for (i, e) in endpoints.iter().enumerate() {
            if !endpoint_ok(e) {
                errs.push(
                    &at.key("endpoints").index(i),
                    format!("`{e}` is not an etcd endpoint"),
                    "write http://host:port or https://host:port, e.g. \"http://10.0.0.1:2379\"",
                );
            }
        }
        if kind == StoreKind::Etcd && endpoints.is_empty() {
            errs.push(
                &at.key("endpoints"),
                "store.kind = \"etcd\" needs the etcd members to talk to",
                "list them, e.g. endpoints = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]",
            );
        }
        let prefix = self.prefix.clone().unwrap_or_else(|| "/sluice/".into());
        if !prefix.ends_with('/') || prefix.contains("//") || prefix.bytes().any(|b| b < 0x20) {
            errs.push(
                &at.key("prefix"),
                format!("`{prefix}` is not a key prefix"),
                "end it with / and leave no empty segment, e.g. \"/sluice/\"",
            );
        }
        let edge_id = self.edge_id.clone().filter(|s| !s.is_empty());
        if let Some(id) = edge_id.as_deref().filter(|id| !store_name_ok(id)) {
            errs.push(
                &at.key("edge_id"),
                format!("`{id}` is not an edge id"),
                "use 1 to 128 of [A-Za-z0-9._-], or remove it to use the host name",
            );
        }
        let path = |p: &Option<String>| p.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
        let (ca_file, cert_file, key_file) = (
            path(&self.ca_file),
            path(&self.cert_file),
            path(&self.key_file),
        );
        let password_file = path(&self.password_file);
        let username = self.username.clone().filter(|s| !s.is_empty());
        if cert_file.is_some() != key_file.is_some() {
            errs.push(
                &at.key("key_file"),
                "cert_file and key_file go together",
                "set both (a client certificate for etcd), or neither",
            );
        }
        if username.is_some() != password_file.is_some() {
            errs.push(
                &at.key("password_file"),
                "username and password_file go together",
                "set both (etcd authentication), or neither",
            );
        }
        let https = endpoints.iter().any(|e| e.starts_with("https://"));
        let http = endpoints.iter().any(|e| e.starts_with("http://"));
        if https && http {
            errs.push(
                &at.key("endpoints"),
                "some endpoints are https and some http",
                "use one scheme for every member",
            );
        }
        if https && ca_file.is_none() {
            errs.push(
                &at.key("ca_file"),
                "https endpoints need the CA that signed the etcd members' certificates",
                "set ca_file = \"/etc/sluice/etcd-ca.pem\"",
            );
        }
        if !https && (ca_file.is_some() || cert_file.is_some()) {
            errs.push(
                &at.key("ca_file"),
                "TLS files are set but the endpoints are http",
                "write the endpoints as https://host:port, or remove ca_file, cert_file and key_file",
            );
        }
        let files = [
            (&ca_file, "ca_file", FileSlot::StoreCa),
            (&cert_file, "cert_file", FileSlot::StoreCert),
            (&key_file, "key_file", FileSlot::StoreKey),
            (&password_file, "password_file", FileSlot::StorePassword),
        ];
        for (file, key, slot) in files {
            if let Some(file) = file {
                let place = errs.place(&at.key(key));
                errs.later(Pending::ReadFile {
                    at: place,
                    path: file.clone(),
                    slot,
                    fix: "check the path and its permissions",
                });
            }
        }
        let timeout = duration(
            errs,
            &at.key("timeout"),
            self.timeout.as_deref(),
            Duration::from_secs(3),
        );
        if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(60) {
            errs.push(
                &at.key("timeout"),
                "must be from 100ms to 60s",
                "e.g. timeout = \"3s\"",
            );
        }
        StoreConfig {
            kind,
            endpoints,
            prefix,
            edge_id,
            ca_file,
            cert_file,
            key_file,
            username,
            password_file,
            timeout,
            secrets: StoreSecrets::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_urls_with_a_port() {
        assert!(endpoint_ok("http://10.0.0.1:2379"));
        assert!(endpoint_ok("https://etcd-0.etcd:2379"));
        assert!(endpoint_ok("http://[::1]:2379"));
        assert!(!endpoint_ok("10.0.0.1:2379"));
        assert!(!endpoint_ok("http://10.0.0.1"));
        assert!(!endpoint_ok("http://10.0.0.1:2379/v3"));
        assert!(!endpoint_ok("http://user@10.0.0.1:2379"));
        assert!(!endpoint_ok("http://:2379"));
    }
}
