//! Values every section spells the same way: durations, bounded integers, TCP keepalive,
//! names, PROXY protocol versions, connect timeouts and `host:port` addresses.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::{AddrSlot, Pending};
use super::raw::RawKeepalive;
use super::MAX_DURATION;
use crate::proxy::ProxyProtocol;

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

pub(super) fn duration(
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

pub(super) fn int_in(
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

pub(super) fn keepalive(errs: &mut Errors<'_>, at: &KeyPath, raw: &RawKeepalive) -> Keepalive {
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

/// `proxy_protocol` of a pool or a resource route.
pub(super) fn proxy_protocol(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    raw: Option<&str>,
) -> ProxyProtocol {
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
pub(super) fn connect_timeout(errs: &mut Errors<'_>, at: &KeyPath, raw: Option<&str>) -> Duration {
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

pub(super) mod human {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

pub(super) mod human_opt {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("0s"),
        }
    }
}

/// Names of pools, listeners, routes and resource kinds: they label metrics and logs.
pub(super) fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The problem of a name taken by an earlier one, and its fix.
pub(super) type Taken = (fn(&str) -> String, &'static str);

/// How one kind of name is checked, and what is said when it is invalid or taken.
pub(super) struct NameRule {
    pub(super) valid: fn(&str) -> bool,
    pub(super) invalid: fn(&str) -> String,
    pub(super) invalid_fix: &'static str,
    /// What is said of a name an earlier one of its kind has (`None`: names may repeat, or
    /// cannot, as pool names).
    pub(super) taken: Option<Taken>,
}

/// Checks a name at `at`: is it valid, and (when it is) is it unused by the `earlier` ones of
/// its kind? Reports at most one error.
pub(super) fn check_name<'n>(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    name: &str,
    rule: &NameRule,
    mut earlier: impl Iterator<Item = &'n str>,
) {
    if !(rule.valid)(name) {
        errs.push(at, (rule.invalid)(name), rule.invalid_fix);
    } else if let Some((taken, fix)) = rule.taken {
        if earlier.any(|e| e == name) {
            errs.push(at, taken(name), fix);
        }
    }
}

/// Where a name's address stands before it is resolved.
pub(super) const UNRESOLVED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A `host:port` that cannot be an address, whatever DNS says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No `:port` at all.
    #[error("`{0}` has no port")]
    NoPort(String),
    /// The port is not a number from 0 to 65535 (worded as the resolver words it).
    #[error("cannot resolve `{0}`: invalid port value")]
    BadPort(String),
}

/// `host:port` as far as it can be read without DNS: `Ok(Some(_))` for an IP literal,
/// `Ok(None)` for a name to resolve, `Err` for what no resolver would take (the checks that
/// `ToSocketAddrs` makes before it looks a name up, with its wording).
pub fn literal_address(text: &str) -> Result<Option<SocketAddr>, AddressError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    match text.rsplit_once(':') {
        None => Err(AddressError::NoPort(text.to_owned())),
        Some((_, port)) if port.parse::<u16>().is_err() => {
            Err(AddressError::BadPort(text.to_owned()))
        }
        Some(_) => Ok(None),
    }
}

/// What an address key holds.
pub(super) enum Address {
    /// An IP literal: the address itself.
    Ip(SocketAddr),
    /// A name, left to resolve (`Pending::Resolve`); `UNRESOLVED` stands for it meanwhile.
    Name,
    /// Not an address; the error is reported.
    Invalid,
}

/// The `host:port` at `at`: an IP is parsed now; a name is recorded for the caller to
/// resolve into `slot` (errors then point at `at` with `fix`).
pub(super) fn address(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    text: &str,
    slot: AddrSlot,
    fix: &'static str,
) -> Address {
    match literal_address(text) {
        Ok(Some(addr)) => Address::Ip(addr),
        Ok(None) => {
            let at = errs.place(at);
            errs.later(Pending::Resolve {
                at,
                slot,
                text: text.to_owned(),
                fix,
            });
            Address::Name
        }
        Err(problem) => {
            errs.push(at, problem.to_string(), fix);
            Address::Invalid
        }
    }
}

impl Address {
    /// The address, `UNRESOLVED` for a name, `None` if invalid.
    pub(super) fn or_unresolved(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(a) => Some(*a),
            Address::Name => Some(UNRESOLVED),
            Address::Invalid => None,
        }
    }
}

/// A list of CIDR blocks (or single addresses) at `at`; each bad entry is an error at its index.
pub(super) fn cidrs(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    list: Option<&[String]>,
) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    for (j, text) in list.into_iter().flatten().enumerate() {
        let parsed = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => nets.push(net),
            Err(_) => errs.push(
                &at.index(j),
                format!("`{text}` is not an address or CIDR block"),
                "write e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\"",
            ),
        }
    }
    nets
}

/// `allow` and `deny` under `at`.
pub(super) fn acl(
    errs: &mut Errors<'_>,
    at: &KeyPath,
    allow: Option<&[String]>,
    deny: Option<&[String]>,
) -> crate::acl::Acl {
    crate::acl::Acl {
        allow: cidrs(errs, &at.key("allow"), allow),
        deny: cidrs(errs, &at.key("deny"), deny),
    }
}
