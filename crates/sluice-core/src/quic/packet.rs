//! QUIC packets as far as a passthrough router needs them: the invariant header (RFC 8999),
//! the long header of QUIC v1 (RFC 9000 §17.2) and v2 (RFC 9369), and the client's Initial
//! packets, decrypted with the keys anyone can derive from the destination connection ID
//! (RFC 9001 §5.2), to read the CRYPTO frames that carry the ClientHello.
//!
//! Owns: parsing, Initial decryption, CRYPTO reassembly (out of order, duplicated, bounded)
//! and handing the hello to the same parser TCP uses. Pure: no sockets, no clock. It never
//! modifies a datagram: sluice forwards the original bytes.

use std::collections::BTreeMap;

use rustls::quic::{Keys, Version};
use rustls::Side;

use crate::hello::{self, Parse};

pub const V1: u32 = 0x0000_0001;
pub const V2: u32 = 0x6b33_43cf;

/// The kind of a long-header packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

/// A long-header packet's header, as far as it is not protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Long<'a> {
    pub version: u32,
    pub dcid: &'a [u8],
    pub scid: &'a [u8],
    /// `None` for a version sluice does not know (only the invariant header is read).
    pub kind: Option<LongType>,
    /// Initial only: the token.
    pub token: &'a [u8],
    /// Offset of the packet number (Initial, 0-RTT, Handshake).
    pub pn_offset: usize,
    /// Total length of this packet within the datagram (coalesced packets may follow).
    pub len: usize,
}

/// What the first packet of a datagram is.
#[derive(Debug, PartialEq, Eq)]
pub enum Header<'a> {
    Long(Long<'a>),
    /// Version 0: a Version Negotiation packet.
    VersionNegotiation {
        dcid: &'a [u8],
        scid: &'a [u8],
    },
    /// A short header: the destination connection ID starts at byte 1 (its length is not
    /// in the packet; the receiver knows it).
    Short,
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64, &'static str> {
    let first = *b.get(*at).ok_or("truncated varint")?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(*at..*at + len).ok_or("truncated varint")?;
    let mut v = u64::from(first & 0x3f);
    for &x in &bytes[1..] {
        v = (v << 8) | u64::from(x);
    }
    *at += len;
    Ok(v)
}

fn cid<'a>(b: &'a [u8], at: &mut usize) -> Result<&'a [u8], &'static str> {
    let len = *b.get(*at).ok_or("truncated header")? as usize;
    if len > 20 {
        return Err("connection ID longer than 20 bytes");
    }
    let id = b.get(*at + 1..*at + 1 + len).ok_or("truncated header")?;
    *at += 1 + len;
    Ok(id)
}

/// Parse the header of the first packet in a datagram.
pub fn parse_header(b: &[u8]) -> Result<Header<'_>, &'static str> {
    let first = *b.first().ok_or("empty datagram")?;
    if first & 0x80 == 0 {
        return Ok(Header::Short);
    }
    let version = u32::from_be_bytes(
        b.get(1..5)
            .ok_or("truncated header")?
            .try_into()
            .map_err(|_| "truncated header")?,
    );
    let mut at = 5;
    let dcid = cid(b, &mut at)?;
    let scid = cid(b, &mut at)?;
    if version == 0 {
        return Ok(Header::VersionNegotiation { dcid, scid });
    }
    let bits = (first >> 4) & 0x03;
    let kind = match version {
        V1 => Some(
            [
                LongType::Initial,
                LongType::ZeroRtt,
                LongType::Handshake,
                LongType::Retry,
            ][bits as usize],
        ),
        V2 => Some(
            [
                LongType::Retry,
                LongType::Initial,
                LongType::ZeroRtt,
                LongType::Handshake,
            ][bits as usize],
        ),
        _ => None,
    };
    let mut long = Long {
        version,
        dcid,
        scid,
        kind,
        token: &[],
        pn_offset: 0,
        len: b.len(),
    };
    match kind {
        None | Some(LongType::Retry) => {}
        Some(k) => {
            if k == LongType::Initial {
                let tlen = varint(b, &mut at)? as usize;
                long.token = b
                    .get(at..at.saturating_add(tlen))
                    .ok_or("truncated token")?;
                at += tlen;
            }
            let length = varint(b, &mut at)? as usize;
            if at.saturating_add(length) > b.len() {
                return Err("packet length beyond the datagram");
            }
            long.pn_offset = at;
            long.len = at + length;
        }
    }
    Ok(Header::Long(long))
}

/// The client's Initial keys for a connection whose first Initial had `dcid`, as the server
/// derives them (only the "remote" half is used: to read the client's packets).
pub fn client_initial_keys(version: u32, dcid: &[u8]) -> Option<Keys> {
    let version = match version {
        V1 => Version::V1,
        V2 => Version::V2,
        _ => return None,
    };
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        return None;
    };
    let quic = suite.quic?;
    Some(Keys::initial(version, suite, quic, dcid, Side::Server))
}

/// Decrypt the Initial packet `packet` (one packet: `&datagram[..long.len]`) with the client's
/// keys; returns the plaintext frames.
pub fn decrypt_initial(
    packet: &[u8],
    long: &Long<'_>,
    keys: &Keys,
) -> Result<Vec<u8>, &'static str> {
    let hp = &keys.remote.header;
    let sample_at = long.pn_offset + 4;
    let sample = packet
        .get(sample_at..sample_at + hp.sample_len())
        .ok_or("packet too short for a header protection sample")?;
    let mut first = packet[0];
    let mut pn = [0u8; 4];
    let avail = packet.len().saturating_sub(long.pn_offset).min(4);
    pn[..avail].copy_from_slice(&packet[long.pn_offset..long.pn_offset + avail]);
    hp.decrypt_in_place(sample, &mut first, &mut pn)
        .map_err(|_| "header protection")?;
    let pn_len = usize::from(first & 0x03) + 1;
    let payload_at = long.pn_offset + pn_len;
    if payload_at > long.len || long.len > packet.len() {
        return Err("packet too short");
    }
    let mut header = packet[..payload_at].to_vec();
    header[0] = first;
    header[long.pn_offset..payload_at].copy_from_slice(&pn[..pn_len]);
    let pn_value = pn[..pn_len]
        .iter()
        .fold(0u64, |v, &x| (v << 8) | u64::from(x));
    let mut payload = packet[payload_at..long.len].to_vec();
    let plain_len = keys
        .remote
        .packet
        .decrypt_in_place(pn_value, &header, &mut payload)
        .map_err(|_| "decryption failed (not an Initial for this connection ID, or corrupted)")?
        .len();
    payload.truncate(plain_len);
    Ok(payload)
}

/// The CRYPTO frames of a decrypted Initial payload, as (offset, data). Frames allowed in an
/// Initial (RFC 9000 §12.4): PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE.
pub fn crypto_frames(plain: &[u8]) -> Result<Vec<(u64, &[u8])>, &'static str> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < plain.len() {
        let t = varint(plain, &mut at)?;
        match t {
            0x00 | 0x01 => {}
            0x02 | 0x03 => {
                varint(plain, &mut at)?; // largest acknowledged
                varint(plain, &mut at)?; // delay
                let ranges = varint(plain, &mut at)?;
                varint(plain, &mut at)?; // first range
                for _ in 0..ranges {
                    varint(plain, &mut at)?;
                    varint(plain, &mut at)?;
                }
                if t == 0x03 {
                    for _ in 0..3 {
                        varint(plain, &mut at)?;
                    }
                }
            }
            0x06 => {
                let offset = varint(plain, &mut at)?;
                let len = varint(plain, &mut at)? as usize;
                let data = plain
                    .get(at..at.saturating_add(len))
                    .ok_or("CRYPTO frame beyond the packet")?;
                at += len;
                out.push((offset, data));
            }
            0x1c => {
                varint(plain, &mut at)?;
                varint(plain, &mut at)?;
                let len = varint(plain, &mut at)? as usize;
                at = at.saturating_add(len);
            }
            _ => return Err("a frame type not allowed in an Initial packet"),
        }
    }
    Ok(out)
}

/// The CRYPTO stream of a client's Initials, reassembled from frames that may arrive out of
/// order or twice. Bounded: data beyond `cap` bytes is an error.
#[derive(Debug, Default)]
pub struct CryptoStream {
    chunks: BTreeMap<u64, Vec<u8>>,
    /// Bytes stored (duplicates overlap and are stored once per chunk start).
    stored: usize,
}

impl CryptoStream {
    pub fn add(&mut self, offset: u64, data: &[u8], cap: usize) -> Result<(), &'static str> {
        let end = offset.saturating_add(data.len() as u64);
        if end > cap as u64 {
            return Err("ClientHello larger than max_hello_size");
        }
        if data.is_empty() {
            return Ok(());
        }
        let longer = self
            .chunks
            .get(&offset)
            .is_none_or(|c| c.len() < data.len());
        if longer {
            self.stored += data.len();
            if self.stored > cap.saturating_mul(4) {
                return Err("too much duplicated CRYPTO data");
            }
            self.chunks.insert(offset, data.to_vec());
        }
        Ok(())
    }

    /// The contiguous bytes from offset 0.
    pub fn prefix(&self) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::new();
        for (&off, data) in &self.chunks {
            let off = off as usize;
            if off > out.len() {
                break;
            }
            let skip = out.len() - off;
            if skip < data.len() {
                out.extend_from_slice(&data[skip..]);
            }
        }
        out
    }
}

/// Run the TCP hello parser over CRYPTO stream bytes (a bare handshake message): they are
/// framed as TLS records first, which is all that differs.
pub fn parse_hello(crypto: &[u8]) -> Parse {
    let mut framed = Vec::with_capacity(crypto.len() + 5 * (crypto.len() / 16384 + 1));
    for chunk in crypto.chunks(16384) {
        framed.extend_from_slice(&[0x16, 0x03, 0x01]);
        framed.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        framed.extend_from_slice(chunk);
    }
    hello::parse(&framed)
}

#[cfg(any(test, feature = "testkit"))]
/// Build a client Initial packet carrying `crypto` at `offset` (tests and fuzzing: the
/// inverse of `decrypt_initial`). Padded to 1200 bytes as clients must.
pub fn build_initial(
    version: u32,
    dcid: &[u8],
    scid: &[u8],
    pn: u32,
    offset: u64,
    crypto: &[u8],
) -> Vec<u8> {
    let v = match version {
        V2 => Version::V2,
        _ => Version::V1,
    };
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    let keys = Keys::initial(v, suite, suite.quic.expect("quic"), dcid, Side::Client);
    let mut frames = vec![0x06];
    put_varint(&mut frames, offset);
    put_varint(&mut frames, crypto.len() as u64);
    frames.extend_from_slice(crypto);
    let type_bits = if version == V2 { 0x01 } else { 0x00 };
    let mut header = vec![0xc0 | (type_bits << 4) | 0x03];
    header.extend_from_slice(&version.to_be_bytes());
    header.push(dcid.len() as u8);
    header.extend_from_slice(dcid);
    header.push(scid.len() as u8);
    header.extend_from_slice(scid);
    header.push(0); // no token
                    // Pad so the whole packet is at least 1200 bytes.
    let fixed = header.len() + 2 + 4 + 16;
    if fixed + frames.len() < 1200 {
        frames.resize(1200 - fixed, 0);
    }
    let length = 4 + frames.len() + 16;
    header.extend_from_slice(&(0x4000u16 | length as u16).to_be_bytes());
    let pn_offset = header.len();
    header.extend_from_slice(&pn.to_be_bytes());
    let tag = keys
        .local
        .packet
        .encrypt_in_place(u64::from(pn), &header, &mut frames)
        .expect("encrypt");
    let mut packet = header;
    packet.extend_from_slice(&frames);
    packet.extend_from_slice(tag.as_ref());
    let sample_at = pn_offset + 4;
    let sample = packet[sample_at..sample_at + 16].to_vec();
    let (first, rest) = packet.split_at_mut(1);
    keys.local
        .header
        .encrypt_in_place(
            &sample,
            &mut first[0],
            &mut rest[pn_offset - 1..pn_offset + 3],
        )
        .expect("header protection");
    packet
}

#[cfg(any(test, feature = "testkit"))]
fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 64 {
        out.push(v as u8);
    } else if v < 16384 {
        out.extend_from_slice(&(0x4000u16 | v as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&(0x8000_0000u32 | v as u32).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare ClientHello handshake message (no record header), as QUIC carries it.
    fn hello_message(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let rec = hello::build::hello(Some(sni), alpn);
        // One record: strip its 5-byte header.
        rec[5..].to_vec()
    }

    fn hello_of(crypto: &[u8]) -> (Option<String>, Vec<String>) {
        match parse_hello(crypto) {
            Parse::Hello { hello, .. } => (hello.sni, hello.alpn),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_initial_round_trips_for_v1_and_v2() {
        let msg = hello_message("a.example.com", &["h3"]);
        for version in [V1, V2] {
            let dcid = [7u8; 8];
            let pkt = build_initial(version, &dcid, &[1, 2, 3], 0, 0, &msg);
            assert!(pkt.len() >= 1200);
            let Header::Long(long) = parse_header(&pkt).unwrap() else {
                panic!()
            };
            assert_eq!(long.kind, Some(LongType::Initial));
            assert_eq!(
                (long.version, long.dcid, long.scid),
                (version, &dcid[..], &[1u8, 2, 3][..])
            );
            let keys = client_initial_keys(version, long.dcid).unwrap();
            let plain = decrypt_initial(&pkt[..long.len], &long, &keys).unwrap();
            let frames = crypto_frames(&plain).unwrap();
            assert_eq!(frames, vec![(0, &msg[..])]);
            assert_eq!(
                hello_of(&msg),
                (Some("a.example.com".into()), vec!["h3".into()])
            );
        }
    }

    /// RFC 9001 Appendix A.2: the client Initial the RFC protects, decrypted with the keys
    /// derived from its connection ID, gives back the RFC's unprotected payload byte for byte
    /// (a CRYPTO frame with the ClientHello, then PADDING), and the hello in it is read.
    #[test]
    fn rfc9001_appendix_a2_client_initial() {
        let packet = include_bytes!("../../tests/fixtures/rfc9001-a2-client-initial.bin");
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let payload = hex(concat!(
            "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868",
            "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578",
            "616d706c652e636f6dff01000100000a00080006001d00170018001000070005",
            "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba",
            "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400",
            "0d0010000e0403050306030203080408050806002d00020101001c0002400100",
            "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000",
            "75300901100f088394c8f03e51570806048000ffff",
        ));
        let Header::Long(long) = parse_header(packet).unwrap() else {
            panic!("a long header")
        };
        assert_eq!(long.kind, Some(LongType::Initial));
        assert_eq!(long.version, V1);
        assert_eq!(long.dcid, hex("8394c8f03e515708"));
        assert!(long.scid.is_empty() && long.token.is_empty());
        assert_eq!((long.pn_offset, long.len), (18, 1200));
        let keys = client_initial_keys(V1, long.dcid).unwrap();
        let plain = decrypt_initial(packet, &long, &keys).unwrap();
        // 1200 - 18 header bytes - 4 packet number bytes - 16 tag bytes.
        assert_eq!(plain.len(), 1162);
        assert_eq!(plain[..payload.len()], payload[..]);
        assert!(plain[payload.len()..].iter().all(|&b| b == 0), "PADDING");
        let frames = crypto_frames(&plain).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!((frames[0].0, frames[0].1.len()), (0, 0xf1));
        assert_eq!(
            hello_of(frames[0].1),
            (Some("example.com".into()), vec!["alpn".into()])
        );
        // One flipped bit anywhere in the protected payload fails authentication.
        let mut corrupt = packet.to_vec();
        corrupt[600] ^= 1;
        assert!(decrypt_initial(&corrupt, &long, &keys).is_err());
        // Keys from another connection ID cannot read it.
        let other = client_initial_keys(V1, &[0; 8]).unwrap();
        assert!(decrypt_initial(packet, &long, &other).is_err());
    }

    #[test]
    fn a_hello_over_several_packets_out_of_order_and_duplicated() {
        let alpn: Vec<String> = (0..80).map(|i| format!("protocol-number-{i:03}")).collect();
        let alpn: Vec<&str> = alpn.iter().map(String::as_str).collect();
        let msg = hello_message("big.example.com", &alpn);
        assert!(msg.len() > 1500, "{}", msg.len());
        let dcid = [9u8; 12];
        let keys = client_initial_keys(V1, &dcid).unwrap();
        let parts: Vec<(u64, &[u8])> = msg
            .chunks(1000)
            .enumerate()
            .map(|(i, c)| ((i * 1000) as u64, c))
            .collect();
        let mut stream = CryptoStream::default();
        // Second part first, then it again, then the first.
        for &i in &[1usize, 1, 0] {
            let (off, data) = parts[i];
            let pkt = build_initial(V1, &dcid, &[], i as u32, off, data);
            let Header::Long(long) = parse_header(&pkt).unwrap() else {
                panic!()
            };
            let plain = decrypt_initial(&pkt, &long, &keys).unwrap();
            for (o, d) in crypto_frames(&plain).unwrap() {
                stream.add(o, d, 16384).unwrap();
            }
            if i == 1 {
                assert!(matches!(
                    parse_hello(&stream.prefix()),
                    Parse::Incomplete { .. }
                ));
            }
        }
        let prefix = stream.prefix();
        assert_eq!(prefix.len(), msg.len());
        assert_eq!(hello_of(&prefix).0.as_deref(), Some("big.example.com"));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let dcid = [1u8; 8];
        let keys = client_initial_keys(V1, &dcid).unwrap();
        let good = build_initial(
            V1,
            &dcid,
            &[],
            0,
            0,
            &hello_message("x.example.com", &["h3"]),
        );
        // A corrupted byte in the payload fails authentication.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 20] ^= 1;
        let Header::Long(long) = parse_header(&bad).unwrap() else {
            panic!()
        };
        assert!(decrypt_initial(&bad, &long, &keys).is_err());
        // Every prefix parses to an error or a header, never a panic.
        for cut in 0..good.len() {
            if let Ok(Header::Long(long)) = parse_header(&good[..cut]) {
                let _ = decrypt_initial(&good[..cut], &long, &keys);
            }
        }
        // Random bytes.
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let len = (x % 1400) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if let Ok(Header::Long(long)) = parse_header(&bytes) {
                let _ = decrypt_initial(&bytes, &long, &keys);
            }
            let _ = crypto_frames(&bytes);
        }
        assert!(CryptoStream::default()
            .add(16000, &[0; 1000], 16384)
            .is_err());
    }
}
