//! The work validation leaves to its caller because it needs I/O: resolving host names,
//! reading the tokens file, building TLS server configs from certificate files, hashing the
//! files the config names. Each item says where in the config it came from and how to fix
//! it, so that the caller reports a failure as `file:line: key: problem — fix` like every
//! other config error.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::error::{ConfigError, Place};
use super::Config;

/// One piece of work left by validation (see `Validated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Resolve `text` (`host:port`, never an IP literal) to its first address and put it in
    /// `slot` (`Config::set_address`); a failure is reported at `at` with `fix`.
    Resolve {
        at: Place,
        slot: AddrSlot,
        text: String,
        fix: &'static str,
    },
    /// After every `Resolve`: addresses that must differ, and differ only once resolved
    /// (`Config::duplicates` reports them).
    Distinct { among: Among, places: Vec<Place> },
    /// Read `file` into `heartbeat.tokens` (`agents::auth::parse_tokens`). If it cannot be
    /// read, the error is at `at` with `fix`; a bad line is an error at that line of `file`,
    /// with key `(token)` and `line_fix`.
    Tokens {
        at: Place,
        file: PathBuf,
        fix: &'static str,
        line_fix: &'static str,
    },
    /// Build `heartbeat.tls` from these files (the client CA verifies client certificates,
    /// asked for but optional: bearer tokens and updaters come without one).
    HeartbeatTls {
        at: Place,
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        fix: &'static str,
    },
    /// Build the TLS config of `routes[route].quic_terminate` from these files, offering the
    /// route's exact ALPN names.
    QuicTls {
        at: Place,
        route: usize,
        cert: PathBuf,
        key: PathBuf,
        alpn: Vec<Vec<u8>>,
        fix: &'static str,
    },
    /// Add this file's path and content (empty if unreadable) to `Config::hash`, after the
    /// config files, in the order these items come: a reload after rotating a certificate or
    /// the tokens must not be skipped as "unchanged".
    Hash { path: PathBuf },
    /// Read `path` and put its content in `slot` (`Config::set_file`); a failure is reported
    /// at `at` with `fix`.
    ReadFile {
        at: Place,
        path: PathBuf,
        slot: FileSlot,
        fix: &'static str,
    },
}

/// Where a file read by the loader goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSlot {
    /// `store.ca_file`
    StoreCa,
    /// `store.cert_file`
    StoreCert,
    /// `store.key_file`
    StoreKey,
    /// `store.password_file` (trailing white space dropped, as `etcdctl` users write it)
    StorePassword,
    /// `versions.ca_file`
    VersionsCa,
}

/// Where a resolved address goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddrSlot {
    /// `admin.address`
    Admin,
    /// `listener[i].address`
    Listener(usize),
    /// `pool.NAME.backends[index]`
    Backend { pool: String, index: usize },
    /// `heartbeat.address`
    Heartbeat,
    /// `agent[i].address`
    Agent(usize),
}

/// Addresses that must be distinct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Among {
    /// The listeners (per protocol; port 0 excepted); `places[i]` is `listener[i].address`.
    Listeners,
    /// The backends of one pool; `places[i]` is its `backends[i]`.
    Backends { pool: String },
}

impl Config {
    /// Put a file's content where `slot` says; `Err` names what is wrong with it.
    pub fn set_file(&mut self, slot: FileSlot, content: Vec<u8>) -> Result<(), String> {
        let s = &mut self.store.secrets;
        match slot {
            FileSlot::VersionsCa => self.versions.ca = Some(content),
            FileSlot::StoreCa => s.ca = Some(content),
            FileSlot::StoreCert => s.cert = Some(content),
            FileSlot::StoreKey => s.key = Some(content),
            FileSlot::StorePassword => {
                let text = String::from_utf8(content).map_err(|_| "is not UTF-8 text")?;
                let password = text.trim_end_matches(['\n', '\r', ' ', '\t']);
                if password.is_empty() {
                    return Err("is empty".into());
                }
                s.password = Some(password.to_owned());
            }
        }
        Ok(())
    }

    /// Put a resolved address where `slot` says.
    pub fn set_address(&mut self, slot: &AddrSlot, addr: SocketAddr) {
        match slot {
            AddrSlot::Admin => self.admin.address = Some(addr),
            AddrSlot::Listener(i) => {
                if let Some(l) = self.listeners.get_mut(*i) {
                    l.address = addr;
                }
            }
            AddrSlot::Backend { pool, index } => {
                if let Some(b) = self
                    .pools
                    .get_mut(pool)
                    .and_then(|p| p.backends.get_mut(*index))
                {
                    b.address = addr;
                }
            }
            AddrSlot::Heartbeat => self.heartbeat.address = Some(addr),
            AddrSlot::Agent(i) => {
                if let Some(a) = self.agents.get_mut(*i) {
                    a.address = addr;
                }
            }
        }
    }

    /// The duplicates among addresses that are known only once names are resolved, each
    /// reported on the later of the two. `failed` are the slots whose names did not resolve:
    /// they are no address at all.
    pub fn duplicates(
        &self,
        among: &Among,
        places: &[Place],
        failed: &[AddrSlot],
    ) -> Vec<ConfigError> {
        let mut found = Vec::new();
        match among {
            Among::Listeners => {
                for (i, l) in self.listeners.iter().enumerate() {
                    let taken = self.listeners[..i]
                        .iter()
                        .any(|e| e.address == l.address && e.protocol == l.protocol);
                    if l.address.port() != 0 && taken {
                        if let Some(at) = places.get(i) {
                            found.push(at.error(address_taken(l.address), ADDRESS_TAKEN_FIX));
                        }
                    }
                }
            }
            Among::Backends { pool } => {
                let Some(p) = self.pools.get(pool) else {
                    return found;
                };
                let mut seen = std::collections::HashSet::new();
                for (i, b) in p.backends.iter().enumerate() {
                    let slot = AddrSlot::Backend {
                        pool: pool.clone(),
                        index: i,
                    };
                    if failed.contains(&slot) || seen.insert(b.address) {
                        continue;
                    }
                    if let Some(at) = places.get(i) {
                        found.push(at.error(backend_twice(&b.name, b.address), BACKEND_TWICE_FIX));
                    }
                }
            }
        }
        found
    }
}

/// The duplicate messages, the same whether the core or the loader finds the duplicate.
pub(super) fn address_taken(address: SocketAddr) -> String {
    format!("{address} is already used by another listener")
}

pub(super) const ADDRESS_TAKEN_FIX: &str = "give each listener its own address";

pub(super) fn backend_twice(text: &str, address: SocketAddr) -> String {
    format!("backend `{text}` ({address}) is listed twice")
}

pub(super) const BACKEND_TWICE_FIX: &str =
    "remove the duplicate, or use `weight` to give it more traffic";
