//! Outbound PROXY protocol headers (v1 text, v2 binary with ALPN and authority TLVs).
//!
//! Owns: building exactly one header per backend connection from what sluice itself observed.
//! It never copies anything a client sent into the header except the SNI (as the authority
//! TLV) and an ALPN name, both already validated by the hello parser. Encoding is done by the
//! `ppp` crate.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Type, Version};

use crate::config::ProxyProtocol;

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
