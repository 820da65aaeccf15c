//! The PROXY protocol, both ways: the header sluice sends its backends (v1 text, v2 binary
//! with ALPN and authority TLVs), and the header a load balancer in front of sluice sends it,
//! with the policy of whom to believe.
//!
//! Owns: building exactly one header per backend connection from what sluice itself observed
//! (it never copies anything a client sent into the header except the SNI, as the authority
//! TLV, and an ALPN name, both already validated by the hello parser); parsing an inbound
//! header; and `inbound`, the trust policy of a listener's `accept_proxy` and
//! `trusted_proxies`. Encoding and parsing are done by the `ppp` crate. Sans-IO.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use ppp::v2::{Builder, Command, Protocol, Type, Version};
use serde::Serialize;

use crate::close::CloseReason;

/// Which PROXY header a pool's backends get before the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    None,
    V1,
    V2,
}

/// Whether a listener expects a PROXY header before the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptProxy {
    None,
    V1,
    V2,
    /// v1, v2 or nothing, from trusted sources.
    Optional,
}

/// What goes into a header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderInfo<'a> {
    pub client: SocketAddr,
    /// The address the client connected to (sluice's listener side).
    pub local: SocketAddr,
    pub alpn: Option<&'a str>,
    pub sni: Option<&'a str>,
}

/// IPv4-mapped IPv6 addresses become plain IPv4, so a v4 client on a dual-stack socket is
/// reported as TCP4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// The header bytes, or `None` for `ProxyProtocol::None`.
pub fn encode(version: ProxyProtocol, info: &HeaderInfo<'_>) -> std::io::Result<Option<Vec<u8>>> {
    let (src, dst) = (unmap(info.client), unmap(info.local));
    match version {
        ProxyProtocol::None => Ok(None),
        ProxyProtocol::V1 => {
            let addrs = ppp::v1::Addresses::from((src, dst));
            Ok(Some(addrs.to_string().into_bytes()))
        }
        ProxyProtocol::V2 => {
            let mut b = Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (src, dst),
            );
            if let Some(alpn) = info.alpn {
                b = b.write_tlv(Type::ALPN, alpn.as_bytes())?;
            }
            if let Some(sni) = info.sni {
                b = b.write_tlv(Type::Authority, sni.as_bytes())?;
            }
            Ok(Some(b.build()?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_roundtrip() {
        let info = HeaderInfo {
            client: "192.0.2.7:51000".parse().unwrap(),
            local: "[::ffff:10.0.0.1]:443".parse().unwrap(),
            alpn: Some("teleport-reversetunnel"),
            sni: Some("tunnel.example.com"),
        };
        let v1 = encode(ProxyProtocol::V1, &info).unwrap().unwrap();
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");

        let v2 = encode(ProxyProtocol::V2, &info).unwrap().unwrap();
        let parsed = ppp::v2::Header::try_from(v2.as_slice()).unwrap();
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::from((info.client, "10.0.0.1:443".parse::<SocketAddr>().unwrap()))
        );
        let tlvs: Vec<_> = parsed.tlvs().map(|t| t.unwrap()).collect();
        assert_eq!(tlvs.len(), 2);
        assert_eq!(tlvs[0].kind, Type::ALPN as u8);
        assert_eq!(&tlvs[0].value[..], b"teleport-reversetunnel");
        assert_eq!(tlvs[1].kind, Type::Authority as u8);
        assert_eq!(&tlvs[1].value[..], b"tunnel.example.com");
        assert_eq!(encode(ProxyProtocol::None, &info).unwrap(), None);
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound: sluice behind a load balancer that sends PROXY headers (an NLB, HAProxy).

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// v1 headers are at most 107 bytes (spec); v2 headers here at most this much (addresses and
/// TLVs: load balancers send a few dozen bytes).
pub const MAX_V2_HEADER: usize = 16 + 2048;

/// What the start of a connection says about a PROXY header.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Not enough bytes to tell.
    Incomplete,
    /// No PROXY header: the bytes are the client's own.
    Absent,
    /// A header of `consumed` bytes. `source`/`destination` are `None` for LOCAL (the load
    /// balancer's own health check) or UNKNOWN: the connection's own addresses stand.
    Header {
        version: u8,
        consumed: usize,
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
    },
    Malformed(String),
}

/// Look for a PROXY header (v1 or v2) at the start of `buf`. Sans-IO: call again with more
/// bytes while it says `Incomplete`.
pub fn parse_inbound(buf: &[u8]) -> Inbound {
    let n = buf.len().min(12);
    if buf[..n] == V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Inbound::Incomplete;
        }
        let total = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if total > MAX_V2_HEADER {
            return Inbound::Malformed(format!(
                "PROXY v2 header of {total} bytes is larger than {MAX_V2_HEADER}"
            ));
        }
        if buf.len() < total {
            return Inbound::Incomplete;
        }
        return match ppp::v2::Header::try_from(&buf[..total]) {
            Ok(h) => {
                let (source, destination) = match (h.command, h.addresses) {
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    _ => (None, None),
                };
                Inbound::Header {
                    version: 2,
                    consumed: total,
                    source,
                    destination,
                }
            }
            Err(e) => Inbound::Malformed(format!("PROXY v2 header: {e}")),
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == V1_PREFIX[..n] {
        // A v1 header is one line of at most 107 bytes: parse it once the line is complete.
        let Some(end) = buf.windows(2).take(106).position(|w| w == b"\r\n") else {
            return if buf.len() >= 107 {
                Inbound::Malformed("PROXY v1 header: no CRLF within 107 bytes".into())
            } else {
                Inbound::Incomplete
            };
        };
        return match ppp::v1::Header::try_from(&buf[..end + 2]) {
            Ok(h) => {
                let (source, destination) = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    ppp::v1::Addresses::Tcp6(a) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    ppp::v1::Addresses::Unknown => (None, None),
                };
                Inbound::Header {
                    version: 1,
                    consumed: h.header.len(),
                    source,
                    destination,
                }
            }
            Err(e) => Inbound::Malformed(format!("PROXY v1 header: {e}")),
        };
    }
    if buf.is_empty() {
        Inbound::Incomplete
    } else {
        Inbound::Absent
    }
}

/// Whether `peer` may send a PROXY header: it is in `trusted_proxies`. An IPv4 peer on a
/// dual-stack socket shows as `::ffff:a.b.c.d` and is matched as IPv4 too.
pub fn is_trusted(trusted_proxies: &[IpNet], peer: IpAddr) -> bool {
    trusted_proxies
        .iter()
        .any(|n| n.contains(&peer) || n.contains(&peer.to_canonical()))
}

/// Where a connection really comes from, as a trusted load balancer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub client: SocketAddr,
    pub local: Option<SocketAddr>,
}

/// The inbound policy's answer for the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read more (the buffer may hold up to `MAX_V2_HEADER` bytes).
    More,
    /// Strip `consumed` bytes; `origin` is `None` when the connection's own addresses stand
    /// (a LOCAL or UNKNOWN header, or no header where it is optional). `result` is the label
    /// of `sluice_proxy_inbound_total`: `ok`, `local` or `absent`.
    Accept {
        consumed: usize,
        origin: Option<Origin>,
        result: &'static str,
    },
    /// Close the connection: `result` labels the metric, `reason` the close.
    Refuse {
        result: &'static str,
        reason: CloseReason,
        detail: String,
    },
}

/// The inbound PROXY policy of a listener with `accept_proxy` set, for the first bytes of a
/// connection from `peer` (`trusted`: `is_trusted`). Sans-IO: the caller reads while it says
/// `More`; a timeout or EOF meanwhile is the caller's `proxy_timeout` / `client_closed_early`.
pub fn inbound(accept: AcceptProxy, trusted: bool, peer: SocketAddr, buf: &[u8]) -> Step {
    let required = matches!(accept, AcceptProxy::V1 | AcceptProxy::V2);
    let refuse = |result, reason, detail| Step::Refuse {
        result,
        reason,
        detail,
    };
    if !trusted && required {
        return refuse(
            "untrusted",
            CloseReason::ProxyUntrusted,
            format!("{peer} is not in trusted_proxies; this listener requires a PROXY header"),
        );
    }
    match parse_inbound(buf) {
        Inbound::Incomplete if buf.len() >= MAX_V2_HEADER => refuse(
            "malformed",
            CloseReason::ProxyMalformed,
            "PROXY header too large".into(),
        ),
        Inbound::Incomplete => Step::More,
        Inbound::Absent if required => refuse(
            "missing",
            CloseReason::ProxyMissing,
            "no PROXY header; this listener requires one".into(),
        ),
        Inbound::Absent => Step::Accept {
            consumed: 0,
            origin: None,
            result: "absent",
        },
        Inbound::Malformed(m) => refuse("malformed", CloseReason::ProxyMalformed, m),
        Inbound::Header { .. } if !trusted => refuse(
            "untrusted",
            CloseReason::ProxyUntrusted,
            format!("PROXY header from {peer}, which is not in trusted_proxies"),
        ),
        Inbound::Header { version, .. }
            if (accept == AcceptProxy::V1 && version != 1)
                || (accept == AcceptProxy::V2 && version != 2) =>
        {
            refuse(
                "malformed",
                CloseReason::ProxyMalformed,
                format!("PROXY v{version} header; this listener accepts only {accept:?}"),
            )
        }
        Inbound::Header {
            consumed,
            source,
            destination,
            ..
        } => {
            let origin = source.map(|client| Origin {
                client,
                local: destination,
            });
            Step::Accept {
                consumed,
                origin,
                result: if origin.is_some() { "ok" } else { "local" },
            }
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.5:4000".parse().unwrap()
    }

    const V1: &[u8] = b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 443\r\nhello";

    #[test]
    fn trust_matches_v4_mapped_peers() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted(&nets, "10.1.2.3".parse().unwrap()));
        assert!(is_trusted(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!is_trusted(&nets, "192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn a_trusted_header_gives_the_origin_and_its_length() {
        let Step::Accept {
            consumed,
            origin,
            result,
        } = inbound(AcceptProxy::V1, true, peer(), V1)
        else {
            panic!("accepted")
        };
        assert_eq!(&V1[consumed..], b"hello");
        assert_eq!(origin.unwrap().client, "192.0.2.1:5000".parse().unwrap());
        assert_eq!(result, "ok");
    }

    #[test]
    fn refusals_carry_their_close_reason() {
        let reason = |step| match step {
            Step::Refuse { reason, .. } => Some(reason),
            _ => None,
        };
        let p = peer();
        assert_eq!(
            reason(inbound(AcceptProxy::V1, false, p, V1)),
            Some(CloseReason::ProxyUntrusted)
        );
        assert_eq!(
            reason(inbound(AcceptProxy::Optional, false, p, V1)),
            Some(CloseReason::ProxyUntrusted)
        );
        assert_eq!(
            reason(inbound(AcceptProxy::V2, true, p, V1)),
            Some(CloseReason::ProxyMalformed)
        );
        assert_eq!(
            reason(inbound(AcceptProxy::V1, true, p, b"\x16\x03\x01")),
            Some(CloseReason::ProxyMissing)
        );
        let no_crlf = [&b"PROXY "[..], &[b'x'; 120]].concat();
        assert_eq!(
            reason(inbound(AcceptProxy::V1, true, p, &no_crlf)),
            Some(CloseReason::ProxyMalformed)
        );
        // Optional and untrusted, no header: the client's own bytes.
        assert_eq!(
            inbound(AcceptProxy::Optional, false, p, b"\x16\x03\x01"),
            Step::Accept {
                consumed: 0,
                origin: None,
                result: "absent"
            }
        );
        assert_eq!(inbound(AcceptProxy::V1, true, p, b"PROX"), Step::More);
    }
}

#[cfg(test)]
mod inbound_tests {
    use super::*;

    fn v2(src: &str, dst: &str) -> Vec<u8> {
        encode(
            ProxyProtocol::V2,
            &HeaderInfo {
                client: src.parse().unwrap(),
                local: dst.parse().unwrap(),
                alpn: Some("h2"),
                sni: Some("a.example.com"),
            },
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn v2_with_tlvs_and_the_hello_after_it() {
        let mut buf = v2("192.0.2.7:51000", "10.0.0.1:443");
        let header_len = buf.len();
        buf.extend_from_slice(b"\x16\x03\x01rest of the hello");
        for cut in 0..header_len {
            assert_eq!(parse_inbound(&buf[..cut]), Inbound::Incomplete, "cut {cut}");
        }
        assert_eq!(
            parse_inbound(&buf),
            Inbound::Header {
                version: 2,
                consumed: header_len,
                source: Some("192.0.2.7:51000".parse().unwrap()),
                destination: Some("10.0.0.1:443".parse().unwrap()),
            }
        );
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n\x16\x03\x01";
        for cut in 0..line.len() - 3 {
            assert_eq!(
                parse_inbound(&line[..cut]),
                Inbound::Incomplete,
                "cut {cut}"
            );
        }
        assert_eq!(
            parse_inbound(line),
            Inbound::Header {
                version: 1,
                consumed: line.len() - 3,
                source: Some("192.0.2.7:51000".parse().unwrap()),
                destination: Some("10.0.0.1:443".parse().unwrap()),
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n";
        assert!(matches!(
            parse_inbound(v6),
            Inbound::Header { version: 1, source: Some(s), .. } if s.is_ipv6()
        ));
        assert!(matches!(
            parse_inbound(b"PROXY UNKNOWN\r\n"),
            Inbound::Header { source: None, .. }
        ));
    }

    #[test]
    fn absent_and_malformed() {
        assert_eq!(parse_inbound(b"\x16\x03\x01\x02\x00"), Inbound::Absent);
        assert_eq!(parse_inbound(b"GET / HTTP/1.1\r\n"), Inbound::Absent);
        assert!(matches!(
            parse_inbound(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n"),
            Inbound::Malformed(_)
        ));
        assert!(matches!(
            parse_inbound(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat()),
            Inbound::Malformed(_)
        ));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse_inbound(&big), Inbound::Malformed(_)));
        let mut bad_version = V2_SIGNATURE.to_vec();
        bad_version.extend_from_slice(&[0x31, 0x11, 0x00, 0x0c]);
        bad_version.extend_from_slice(&[0; 12]);
        assert!(matches!(parse_inbound(&bad_version), Inbound::Malformed(_)));
    }
}
