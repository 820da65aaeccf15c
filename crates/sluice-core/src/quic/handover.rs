//! The messages two sluice processes pass each other during a binary upgrade, when both serve
//! one QUIC listener's socket and each has flows of its own: datagrams one of them read but
//! cannot place for sure (`Ask`: are they yours?), or ones the other sends back (`Returned`:
//! not mine), with the client's address (the socket pair between them knows nothing of it),
//! the ECN bits and the size of each datagram when several of one sender travel together;
//! and `Leave`: the sender hands its part on to a newer process and will pass nothing more.
//!
//! ```text
//! 1 byte   version (1)
//! 1 byte   kind (0: ask, 2: ask, and the asker has a flow at that address,
//!                1: returned, 3: leave: nothing follows)
//! 1 byte   ECN bits (0: not ECN-capable)
//! 2 bytes  datagram size (big endian; the last datagram may be shorter)
//! 1 byte   4 or 6: the client's address family
//! 4/16     the client's IP
//! 2 bytes  the client's port
//! rest     the datagrams
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const VERSION: u8 = 1;
/// The longest header (IPv6).
pub const MAX_HEADER: usize = 1 + 1 + 1 + 2 + 1 + 16 + 2;

/// Why datagrams cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read from the socket, of no flow the reader knows by connection ID: the other
    /// process serves them if they are surely its own, else returns them. `asker_has_address`:
    /// the asker has a flow at the client's address, so the address alone says nothing.
    Ask { asker_has_address: bool },
    /// Not the other process's: the reader handles them after all (and never asks again).
    Returned,
}

/// One message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Datagrams(Relayed<'a>),
    Leave,
}

/// The `Leave` message.
pub const LEAVE: [u8; 2] = [VERSION, 3];

/// Datagrams of one client, as carried between the processes.
#[derive(Debug, PartialEq, Eq)]
pub struct Relayed<'a> {
    pub kind: Kind,
    pub client: SocketAddr,
    pub ecn: u8,
    pub stride: u16,
    pub data: &'a [u8],
}

/// Write the header for `client`'s datagrams into `out` (cleared first); the datagrams
/// follow it.
pub fn encode_header(out: &mut Vec<u8>, kind: Kind, client: SocketAddr, ecn: u8, stride: u16) {
    out.clear();
    let kind = match kind {
        Kind::Ask {
            asker_has_address: false,
        } => 0,
        Kind::Returned => 1,
        Kind::Ask {
            asker_has_address: true,
        } => 2,
    };
    out.extend_from_slice(&[VERSION, kind, ecn & 0b11]);
    out.extend_from_slice(&stride.to_be_bytes());
    match client.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
}

/// Read one message; an error names what is wrong with it.
pub fn decode(msg: &[u8]) -> Result<Message<'_>, &'static str> {
    if msg == LEAVE {
        return Ok(Message::Leave);
    }
    let [version, kind, ecn, s0, s1, family, rest @ ..] = msg else {
        return Err("too_short");
    };
    if *version != VERSION {
        return Err("unknown_version");
    }
    let kind = match kind {
        0 | 2 => Kind::Ask {
            asker_has_address: *kind == 2,
        },
        1 => Kind::Returned,
        _ => return Err("unknown_kind"),
    };
    let (ip, rest) = match family {
        4 => {
            let (ip, rest) = rest.split_first_chunk::<4>().ok_or("too_short")?;
            (IpAddr::V4(Ipv4Addr::from(*ip)), rest)
        }
        6 => {
            let (ip, rest) = rest.split_first_chunk::<16>().ok_or("too_short")?;
            (IpAddr::V6(Ipv6Addr::from(*ip)), rest)
        }
        _ => return Err("bad_family"),
    };
    let (port, data) = rest.split_first_chunk::<2>().ok_or("too_short")?;
    if data.is_empty() {
        return Err("empty");
    }
    Ok(Message::Datagrams(Relayed {
        kind,
        client: SocketAddr::new(ip, u16::from_be_bytes(*port)),
        ecn: ecn & 0b11,
        stride: u16::from_be_bytes([*s0, *s1]),
        data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(client: &str, ecn: u8, stride: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_header(
            &mut out,
            Kind::Returned,
            client.parse().unwrap(),
            ecn,
            stride,
        );
        assert!(out.len() <= MAX_HEADER);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn round_trips_both_families() {
        for client in ["192.0.2.7:4433", "[2001:db8::1]:65535"] {
            let msg = message(client, 2, 1200, b"datagrams");
            let Message::Datagrams(r) = decode(&msg).unwrap() else {
                panic!("datagrams");
            };
            assert_eq!(r.kind, Kind::Returned);
            assert_eq!(r.client, client.parse().unwrap());
            assert_eq!((r.ecn, r.stride, r.data), (2, 1200, &b"datagrams"[..]));
        }
    }

    #[test]
    fn every_truncation_and_bad_field_is_an_error() {
        let msg = message("[2001:db8::1]:443", 1, 1200, b"x");
        for n in 0..msg.len() - 1 {
            assert!(decode(&msg[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut bad = msg.clone();
        bad[0] = 9;
        assert_eq!(decode(&bad), Err("unknown_version"));
        let mut bad = msg.clone();
        bad[1] = 4;
        assert_eq!(decode(&bad), Err("unknown_kind"));
        assert_eq!(decode(&LEAVE), Ok(Message::Leave));
        assert_eq!(decode(&[VERSION, 3, 0]), Err("too_short"));
        let mut bad = msg.clone();
        bad[5] = 5;
        assert_eq!(decode(&bad), Err("bad_family"));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn what_is_encoded_is_decoded(
            ip in proptest::num::u128::ANY,
            v4 in proptest::bool::ANY,
            ask in proptest::bool::ANY,
            has in proptest::bool::ANY,
            port in proptest::num::u16::ANY,
            ecn in 0u8..4,
            stride in proptest::num::u16::ANY,
            data in proptest::collection::vec(proptest::num::u8::ANY, 1..64),
        ) {
            let client = if v4 {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip as u32)), port)
            } else {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)
            };
            let kind = match (ask, has) {
                (true, has) => Kind::Ask { asker_has_address: has },
                (false, _) => Kind::Returned,
            };
            let mut msg = Vec::new();
            encode_header(&mut msg, kind, client, ecn, stride);
            msg.extend_from_slice(&data);
            let r = decode(&msg).unwrap();
            proptest::prop_assert_eq!(r, Message::Datagrams(Relayed { kind, client, ecn, stride, data: &data }));
        }
    }
}
