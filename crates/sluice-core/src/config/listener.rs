//! `[[listener]]`: where sluice accepts connections (TCP) or datagrams (QUIC), and how.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::{self, AddrSlot, Among, Pending};
use super::raw::{RawKeepalive, RawListener};
use super::values::{
    address, check_name, duration, human, int_in, keepalive, literal_address, name_ok, Keepalive,
    NameRule, UNRESOLVED,
};
use super::MAX_HELLO_CAP;
use crate::proxy::AcceptProxy;

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
    /// Sources that may connect (the real client address, after a trusted PROXY header).
    pub acl: crate::acl::Acl,
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

const LISTENER_NAME: NameRule = NameRule {
    valid: name_ok,
    invalid: |_| "missing or invalid listener name".into(),
    invalid_fix: "set name = \"edge\" (letters, digits, . _ -)",
    taken: Some((
        |name| format!("listener name `{name}` is used twice"),
        "give each listener its own name",
    )),
};

/// The problem of a listener address used twice (on the second listener).
/// Every `[[listener]]`. Whether two addresses collide is checked here when all are IP
/// literals, and left for after resolution (`Among::Listeners`) when a name is among them.
pub(super) fn listeners(
    errs: &mut Errors<'_>,
    root: &KeyPath,
    raw: Vec<RawListener>,
) -> Vec<ListenerConfig> {
    if raw.is_empty() {
        errs.push(
            &root.key("listener"),
            "no listener is configured",
            "add a [[listener]] with name and address, e.g. address = \"0.0.0.0:443\"",
        );
    }
    let names = raw.iter().any(|rl| {
        rl.address
            .as_deref()
            .is_some_and(|text| matches!(literal_address(text), Ok(None)))
    });
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for (i, rl) in raw.into_iter().enumerate() {
        let at = root.key("listener").index(i);
        let listener = rl.build(errs, &at, i, &listeners, names);
        listeners.push(listener);
    }
    if names {
        let places = (0..listeners.len())
            .map(|i| errs.place(&root.key("listener").index(i).key("address")))
            .collect();
        errs.later(Pending::Distinct {
            among: Among::Listeners,
            places,
        });
    }
    listeners
}

impl RawListener {
    /// One listener; `earlier` are the ones before it, `names` says whether any listener's
    /// address is a name (then addresses are compared after resolution).
    fn build(
        self,
        errs: &mut Errors<'_>,
        at: &KeyPath,
        i: usize,
        listeners: &[ListenerConfig],
        names: bool,
    ) -> ListenerConfig {
        let rl = self;
        let name = rl.name.unwrap_or_default();
        check_name(
            errs,
            &at.key("name"),
            &name,
            &LISTENER_NAME,
            listeners.iter().map(|l| l.name.as_str()),
        );
        let address = match rl.address.as_deref() {
            None => {
                errs.push(
                    &at.key("address"),
                    "missing",
                    "set address = \"0.0.0.0:443\" (or \"[::]:443\")",
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
            Some(text) => address(
                errs,
                &at.key("address"),
                text,
                AddrSlot::Listener(i),
                "write an address like \"0.0.0.0:443\" or \"[::]:443\"",
            )
            .or_unresolved()
            .unwrap_or(UNRESOLVED),
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
        if !names
            && address.port() != 0
            && listeners
                .iter()
                .any(|l| l.address == address && l.protocol == protocol)
        {
            errs.push(
                &at.key("address"),
                pending::address_taken(address),
                pending::ADDRESS_TAKEN_FIX,
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
            at,
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
        let trusted_proxies = super::values::cidrs(
            errs,
            &at.key("trusted_proxies"),
            rl.trusted_proxies.as_deref(),
        );
        let acl = super::values::acl(errs, at, rl.allow.as_deref(), rl.deny.as_deref());
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
        ListenerConfig {
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
            acl,
            protocol,
            quic,
        }
    }
}
