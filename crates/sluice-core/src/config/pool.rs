//! `[pool.*]`: backends, balancing, connect settings, passive ejection, active health checks
//! and DNS discovery.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::{self, AddrSlot, Among, Pending};
use super::raw::{RawBackend, RawHealth, RawKeepalive, RawPool};
use super::values::{
    address, check_name, connect_timeout, duration, human, human_opt, int_in, keepalive, name_ok,
    proxy_protocol, Address, Keepalive, NameRule, UNRESOLVED,
};
use crate::balance::{Balance, HashKey};
use crate::proxy::ProxyProtocol;

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
    /// The PROXY header each probe sends first: the pool's (backends that require one refuse
    /// a connection without it), unless `send_proxy = false`.
    pub proxy_protocol: ProxyProtocol,
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

const POOL_NAME: NameRule = NameRule {
    valid: name_ok,
    invalid: |name| format!("pool name `{name}` has characters outside [A-Za-z0-9._-]"),
    invalid_fix: "rename the pool",
    // TOML and merging already refuse a pool defined twice.
    taken: None,
};

/// The problem of a backend listed twice (its second entry).
impl RawPool {
    pub(super) fn build(
        mut self,
        errs: &mut Errors<'_>,
        root: &KeyPath,
        name: String,
    ) -> PoolConfig {
        let at = root.key("pool").key(&name);
        check_name(errs, &at, &name, &POOL_NAME, std::iter::empty());
        let backends = self.backends(errs, &at, &name);
        let discovery = discovery(errs, &at, &self);
        if backends.is_empty() && discovery.is_none() && !errs.any_under(&at) {
            errs.push(
                &at.key("backends"),
                "the pool has no backends",
                "add backends = [\"host:port\", ...], or dns = [\"name:port\"] / srv = [\"_service._tcp.name\"]",
            );
        }
        let balance = self.balance(errs, &at);
        let proxy_protocol = proxy_protocol(errs, &at, self.proxy_protocol.as_deref());
        let connect_timeout = connect_timeout(errs, &at, self.connect_timeout.as_deref());
        let retries = int_in(errs, &at.key("retries"), self.retries, 2, 0, 16) as u32;
        let keepalive = keepalive(
            errs,
            &at,
            &RawKeepalive {
                keepalive_idle: self.keepalive_idle.take(),
                keepalive_interval: self.keepalive_interval.take(),
                keepalive_count: self.keepalive_count.take(),
            },
        );
        let min_ready = duration(
            errs,
            &at.key("min_ready"),
            self.min_ready.as_deref(),
            Duration::ZERO,
        );
        let removed_drain_timeout = self.removed_drain_timeout.as_deref().map(|text| {
            duration(
                errs,
                &at.key("removed_drain_timeout"),
                Some(text),
                Duration::ZERO,
            )
        });
        let ejection = self.ejection(errs, &at);
        let fail_open = match self.all_unhealthy.as_deref() {
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
        let health = self
            .health
            .as_ref()
            .and_then(|h| health_check(errs, &at.key("health"), h, proxy_protocol));
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
        }
    }

    /// `balance`, and `hash_key` for `balance = "hash"`.
    fn balance(&self, errs: &mut Errors<'_>, at: &KeyPath) -> Balance {
        let hash_key = match self.hash_key.as_deref() {
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
        let balance = match self.balance.as_deref() {
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
        if self.hash_key.is_some() && !matches!(balance, Balance::Hash(_)) {
            errs.push(
                &at.key("hash_key"),
                "hash_key only applies to balance = \"hash\"",
                "remove hash_key or set balance = \"hash\"",
            );
        }
        balance
    }

    /// Passive ejection: on with `eject_after_failures` > 0.
    fn ejection(&self, errs: &mut Errors<'_>, at: &KeyPath) -> Option<Ejection> {
        let eject_after = int_in(
            errs,
            &at.key("eject_after_failures"),
            self.eject_after_failures,
            0,
            0,
            1000,
        ) as u32;
        let eject_time = duration(
            errs,
            &at.key("eject_time"),
            self.eject_time.as_deref(),
            Duration::from_secs(30),
        );
        let eject_max_time = duration(
            errs,
            &at.key("eject_max_time"),
            self.eject_max_time.as_deref(),
            Duration::from_secs(300),
        );
        let max_ejected_percent = int_in(
            errs,
            &at.key("max_ejected_percent"),
            self.max_ejected_percent,
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
        (eject_after > 0).then_some(Ejection {
            after_failures: eject_after,
            time: eject_time,
            max_time: eject_max_time,
            max_percent: max_ejected_percent,
        })
    }

    /// `backends`: IP literals now (a literal listed twice is an error here), names left to
    /// resolve; whether those collide is known only then (`Among::Backends`).
    fn backends(&mut self, errs: &mut Errors<'_>, at: &KeyPath, pool: &str) -> Vec<BackendConfig> {
        let mut backends = Vec::new();
        let mut places = Vec::new();
        let mut names = false;
        for (i, rb) in std::mem::take(&mut self.backends).into_iter().enumerate() {
            let bat = at.key("backends").index(i);
            let (text, weight) = match rb {
                RawBackend::Address(a) => (a, None),
                RawBackend::Detailed { address, weight } => (address, weight),
            };
            // 0: drained (no new connections; established ones kept).
            let weight = int_in(errs, &bat.key("weight"), weight, 1, 0, 1000) as u32;
            let slot = AddrSlot::Backend {
                pool: pool.to_owned(),
                index: backends.len(),
            };
            let address = match address(
                errs,
                &bat,
                &text,
                slot,
                "write \"host:port\" with a name this machine can resolve, or an IP",
            ) {
                Address::Ip(a) => a,
                Address::Name => {
                    names = true;
                    UNRESOLVED
                }
                Address::Invalid => continue,
            };
            places.push(bat);
            backends.push(BackendConfig {
                name: text,
                address,
                weight,
            });
        }
        if names {
            let places = places.iter().map(|p| errs.place(p)).collect();
            errs.later(Pending::Distinct {
                among: Among::Backends {
                    pool: pool.to_owned(),
                },
                places,
            });
        } else {
            let mut seen = HashSet::new();
            for (b, bat) in backends.iter().zip(&places) {
                if !seen.insert(b.address) {
                    errs.push(
                        bat,
                        pending::backend_twice(&b.name, b.address),
                        pending::BACKEND_TWICE_FIX,
                    );
                }
            }
        }
        backends
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

fn health_check(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    raw: &RawHealth,
    pool_proxy: ProxyProtocol,
) -> Option<HealthCheck> {
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
        proxy_protocol: match raw.send_proxy {
            Some(false) => ProxyProtocol::None,
            _ => pool_proxy,
        },
    })
}
