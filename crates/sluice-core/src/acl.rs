//! Source-address access control: `allow` and `deny` CIDR lists, on a listener, a route, the
//! admin API and the heartbeat API's own listener. Evaluated on the real client address (after
//! a trusted PROXY header), as HAProxy's `tcp-request connection reject if !{ src ... }` and
//! Envoy's RBAC `remote_ip` do: a source in `deny` is refused; with a non-empty `allow`, a
//! source outside it is refused too.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Acl {
    /// Empty: every source not denied.
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl Acl {
    /// Whether `ip` may connect. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, how a
    /// dual-stack socket reports an IPv4 client) is checked as the IPv4 address it is.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// No list: every source may connect (nothing to check).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        Acl {
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    #[test]
    fn deny_wins_and_a_non_empty_allow_is_exclusive() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(Acl::default().permits(ip("203.0.113.9")));
        let a = acl(&["10.0.0.0/8", "2001:db8::/32"], &["10.9.0.0/16"]);
        assert!(a.permits(ip("10.1.2.3")));
        assert!(!a.permits(ip("10.9.0.1")), "deny wins over allow");
        assert!(!a.permits(ip("192.0.2.1")), "outside allow");
        assert!(a.permits(ip("2001:db8::1")));
        assert!(a.permits(ip("::ffff:10.1.2.3")), "IPv4-mapped is IPv4");
        assert!(!a.permits(ip("::ffff:10.9.0.1")));
        let only_deny = acl(&[], &["192.0.2.0/24"]);
        assert!(only_deny.permits(ip("198.51.100.1")));
        assert!(!only_deny.permits(ip("192.0.2.200")));
    }
}
