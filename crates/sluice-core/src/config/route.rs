//! `[[route]]`: what a route matches (listeners, ALPN, SNI, TLS or not) and where it sends
//! it (a pool, an agent's resource, or the heartbeat API), incl. QUIC termination.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::listener::ListenerConfig;
use super::pending::Pending;
use super::pool::PoolConfig;
use super::raw::{OneOrMany, RawRoute};
use super::values::{
    check_name, connect_timeout, duration, human, human_opt, int_in, name_ok, proxy_protocol,
    NameRule,
};
pub use crate::agents::affinity::{Affinity, Pick};
use crate::proxy::ProxyProtocol;
use crate::route::{AlpnPattern, Match, SniPattern};

/// A route's QUIC termination: its certificate, read by whoever loads the config (see
/// `Pending::QuicTls`).
#[derive(Debug, Clone, Serialize)]
pub struct QuicTerminate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `None` until the certificate is read (a loaded config always has it).
    #[serde(skip)]
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    /// Sources this route serves; others matching it are refused (they do not fall through
    /// to later routes).
    pub acl: crate::acl::Acl,
}

const ROUTE_NAME: NameRule = NameRule {
    valid: name_ok,
    invalid: |name| format!("route name `{name}` has characters outside [A-Za-z0-9._-]"),
    invalid_fix: "rename the route",
    taken: Some((
        |name| format!("route name `{name}` is used twice"),
        "give each route its own name (names label metrics and logs)",
    )),
};

const RESOURCE_KIND: NameRule = NameRule {
    valid: name_ok,
    invalid: |_| "missing or invalid resource kind".into(),
    invalid_fix: "set kind = \"app\" (or db, kube, desktop, ... as agents announce it)",
    taken: None,
};

/// Every `[[route]]`, in order; a route that an earlier one shadows is an error.
pub(super) fn routes(
    errs: &mut Errors<'_>,
    root: &KeyPath,
    raw: Vec<RawRoute>,
    listeners: &[ListenerConfig],
    pools: &BTreeMap<String, PoolConfig>,
    default_pick: Pick,
) -> Vec<RouteConfig> {
    if raw.is_empty() {
        errs.push(
            &root.key("route"),
            "no route is configured",
            "add a [[route]] with a pool (a route without match keys takes everything TLS)",
        );
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, rr) in raw.into_iter().enumerate() {
        let route = rr.build(
            errs,
            &root.key("route").index(i),
            i,
            listeners,
            &routes,
            (pools, default_pick),
        );
        routes.push(route);
    }
    routes
}

impl RawRoute {
    fn build(
        mut self,
        errs: &mut Errors<'_>,
        at: &KeyPath,
        i: usize,
        listeners: &[ListenerConfig],
        routes: &[RouteConfig],
        (pools, default_pick): (&BTreeMap<String, PoolConfig>, Pick),
    ) -> RouteConfig {
        let rr = &mut self;
        let name = rr.name.take().unwrap_or_else(|| format!("route{i}"));
        check_name(
            errs,
            &at.key("name"),
            &name,
            &ROUTE_NAME,
            routes.iter().map(|r| r.name.as_str()),
        );
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
        let target = rr.target(errs, at, pools, &name, default_pick);
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
                at,
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
        let quic_terminate = rr.quic_terminate(errs, at, i, &target, matcher.alpn.as_deref());
        let acl = super::values::acl(errs, at, rr.allow.as_deref(), rr.deny.as_deref());
        RouteConfig {
            name,
            target,
            quic_terminate,
            matcher,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            acl,
        }
    }

    /// What a route sends to: exactly one of `pool`, `resource`, `serve`; the resource keys only
    /// with `resource`.
    fn target(
        &mut self,
        errs: &mut Errors<'_>,
        at: &KeyPath,
        pools: &BTreeMap<String, PoolConfig>,
        name: &str,
        default_pick: Pick,
    ) -> RouteTarget {
        let rr = self;
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
            check_name(
                errs,
                &rat.key("kind"),
                &kind,
                &RESOURCE_KIND,
                std::iter::empty(),
            );
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
                None => default_pick,
                Some("random") => Pick::Random,
                Some("p2c") => Pick::P2c,
                Some("rendezvous") => Pick::Rendezvous,
                Some(other) => {
                    errs.push(
                        &at.key("pick"),
                        format!("unknown pick `{other}`"),
                        "use random (uniform, as Teleport), p2c (fewer active connections of two) or rendezvous (the same agent for a session key on every edge)",
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
        &self,
        errs: &mut Errors<'_>,
        at: &KeyPath,
        route: usize,
        target: &RouteTarget,
        alpn: Option<&[AlpnPattern]>,
    ) -> Option<QuicTerminate> {
        let rr = self;
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
        // Exact ALPN names of the route are what sluice can negotiate.
        let alpn = alpn
            .unwrap_or(&[])
            .iter()
            .filter_map(|p| match p {
                AlpnPattern::Exact(a) => Some(a.as_bytes().to_vec()),
                AlpnPattern::Prefix(_) => None,
            })
            .collect();
        let place = errs.place(&at.key("cert_file"));
        errs.later(Pending::QuicTls {
            at: place,
            route,
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            alpn,
            fix: "give a PEM certificate chain and its PEM private key",
        });
        Some(QuicTerminate {
            cert_file: PathBuf::from(cert),
            key_file: PathBuf::from(key),
            tls: None,
        })
    }
}
