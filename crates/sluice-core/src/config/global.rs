//! The process-wide tables, which only the main file may set: `[admin]`, `[lifecycle]`,
//! `[limits]`, `[reload]` and `[dns]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::AddrSlot;
use super::raw::{RawAdmin, RawDns, RawLifecycle, RawLimits, RawReload};
use super::values::{address, duration, human, human_opt, int_in};
use super::{DEFAULT_PARK_IDLE_AFTER, MIN_PARK_IDLE_AFTER};

#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// `None` when `address = ""`: no admin server.
    pub address: Option<SocketAddr>,
    /// `admin.allow`: sources that may use the admin API (empty: every source, as before).
    pub allow: crate::acl::Acl,
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
    /// Connections that have not sent their hello (or PROXY header) yet, at most; `None`:
    /// a quarter of `max_connections` (see `pending_cap`).
    pub max_pending_hellos: Option<usize>,
    /// Pending connections from one source (the address after a trusted PROXY header).
    pub max_pending_hellos_per_source: usize,
    /// Splice pipes at most (2 descriptors each); `None`: a quarter of `max_connections`.
    /// Past them, relays copy through sluice's memory.
    pub max_pipes: Option<usize>,
}

/// `max_pending_hellos_per_source` when not set.
pub const DEFAULT_PENDING_PER_SOURCE: usize = 128;

impl LimitsConfig {
    /// The pending cap for a connection cap of `max_connections`.
    pub fn pending_cap(&self, max_connections: usize) -> usize {
        self.max_pending_hellos
            .unwrap_or((max_connections / 4).max(16))
    }
}

/// The resolver DNS discovery uses.
#[derive(Debug, Clone, Serialize)]
pub struct DnsConfig {
    /// `None`: the system's resolver configuration (/etc/resolv.conf).
    pub nameservers: Option<Vec<SocketAddr>>,
    #[serde(with = "human")]
    pub timeout: Duration,
}

impl RawAdmin {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> AdminConfig {
        let at = root.key("admin").key("address");
        let address = match self.address.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            Some("") => None,
            Some(text) => address(
                errs,
                &at,
                text,
                AddrSlot::Admin,
                "write an address like \"127.0.0.1:9901\", or \"\" to disable the admin API",
            )
            .or_unresolved(),
        };
        let allow = crate::acl::Acl {
            allow: super::values::cidrs(
                errs,
                &root.key("admin").key("allow"),
                self.allow.as_deref(),
            ),
            deny: Vec::new(),
        };
        AdminConfig { address, allow }
    }
}

impl RawLifecycle {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> LifecycleConfig {
        let lc = root.key("lifecycle");
        LifecycleConfig {
            min_ready: duration(
                errs,
                &lc.key("min_ready"),
                self.min_ready.as_deref(),
                Duration::ZERO,
            ),
            drain_delay: duration(
                errs,
                &lc.key("drain_delay"),
                self.drain_delay.as_deref(),
                Duration::from_secs(5),
            ),
            drain_timeout: duration(
                errs,
                &lc.key("drain_timeout"),
                self.drain_timeout.as_deref(),
                Duration::from_secs(600),
            ),
            close_spread: duration(
                errs,
                &lc.key("close_spread"),
                self.close_spread.as_deref(),
                Duration::from_secs(10),
            ),
            upgrade_socket: match self.upgrade_socket.as_deref() {
                None | Some("") => None,
                Some(p) => Some(PathBuf::from(p)),
            },
        }
    }
}

impl RawDns {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> DnsConfig {
        let dns_at = root.key("dns");
        let nameservers = self.nameservers.as_ref().map(|list| {
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
        DnsConfig {
            nameservers,
            timeout: duration(
                errs,
                &dns_at.key("timeout"),
                self.timeout.as_deref(),
                Duration::from_secs(2),
            ),
        }
    }
}

impl RawReload {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> ReloadConfig {
        ReloadConfig {
            watch: self.watch.unwrap_or(true),
            debounce: duration(
                errs,
                &root.key("reload").key("debounce"),
                self.debounce.as_deref(),
                Duration::from_millis(200),
            ),
        }
    }
}

impl RawLimits {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> LimitsConfig {
        LimitsConfig {
            max_connections: self.max_connections.map(|_| {
                int_in(
                    errs,
                    &root.key("limits").key("max_connections"),
                    self.max_connections,
                    0,
                    1,
                    10_000_000,
                ) as usize
            }),
            max_pending_hellos: self.max_pending_hellos.map(|_| {
                int_in(
                    errs,
                    &root.key("limits").key("max_pending_hellos"),
                    self.max_pending_hellos,
                    0,
                    1,
                    10_000_000,
                ) as usize
            }),
            max_pipes: self.max_pipes.map(|_| {
                int_in(
                    errs,
                    &root.key("limits").key("max_pipes"),
                    self.max_pipes,
                    0,
                    0,
                    10_000_000,
                ) as usize
            }),
            max_pending_hellos_per_source: int_in(
                errs,
                &root.key("limits").key("max_pending_hellos_per_source"),
                self.max_pending_hellos_per_source,
                DEFAULT_PENDING_PER_SOURCE as i64,
                1,
                10_000_000,
            ) as usize,
            park_idle_after: {
                let at = root.key("limits").key("park_idle_after");
                let d = duration(
                    errs,
                    &at,
                    self.park_idle_after.as_deref(),
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
        }
    }
}
