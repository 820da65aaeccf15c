//! A sans-IO TLS ClientHello parser.
//!
//! Owns: turning the first bytes a client sent into the facts routing needs (SNI, ALPN in
//! client order, versions). It never touches a socket or a clock: callers feed it everything
//! buffered so far and get back `Incomplete`, `Hello`, `NotTls` or `Malformed`.
//!
//! The hello may be split across any number of TCP segments (the caller just buffers) and across
//! several TLS handshake records (reassembled here). It must never guess: anything ambiguous —
//! a duplicate extension, two host names, an empty ALPN name — is `Malformed`, because a
//! parser that is lenient where the backend is strict is how SNI rules get bypassed.

use std::fmt;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 5;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// What the routing layer learns from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `host_name` from server_name, lowercased, trailing dot removed.
    pub sni: Option<String>,
    /// ALPN protocol names in the order the client offered them.
    pub alpn: Vec<String>,
    /// `legacy_version` of the ClientHello body (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// The supported_versions extension, in client order (empty if absent).
    pub supported_versions: Vec<u16>,
}

/// Why a hello was rejected. Displayed in logs; `label()` is the bounded metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The outcome of parsing what has been buffered so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed. `hello_len`, once the handshake header is in, is the total number
    /// of buffered bytes the complete hello would need at minimum (lets the caller reject an
    /// oversized hello before reading it all).
    Incomplete {
        needed_at_least: Option<usize>,
    },
    /// A complete ClientHello; `consumed` is the byte length of the records that carried it.
    Hello {
        hello: ClientHello,
        consumed: usize,
    },
    /// The bytes are not a TLS handshake at all (plain HTTP, SSH, ...).
    NotTls,
    Malformed(Malformed),
}

fn bad(reason: &'static str) -> Parse {
    Parse::Malformed(Malformed(reason))
}

/// Records one hello may be split into. Real clients send one (a post-quantum hello: one or
/// two); this still takes a 2 KB hello split into one-byte records, and refuses a longer flood
/// of tiny records instead of reassembling it (each costs a record header for one byte).
pub const MAX_RECORDS: usize = 4096;

/// Parse a ClientHello from the start of `buf` (everything the client sent so far).
pub fn parse(buf: &[u8]) -> Parse {
    Reassembly::default().parse(buf)
}

/// `parse` for a buffer that grows: call it with the whole buffer each time more bytes
/// arrived, and it resumes at the first record it has not seen whole, so parsing a hello costs
/// time linear in its bytes however the client splits it into records and segments. The
/// answer for a buffer is the same as `parse`'s.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// Where the first record not yet taken starts.
    pos: usize,
    /// Handshake bytes of the records taken, when the hello spans more than one record.
    handshake: Vec<u8>,
    /// Handshake bytes the message needs (header and body), once known.
    needed: Option<usize>,
    records: usize,
}

impl Reassembly {
    pub fn parse(&mut self, buf: &[u8]) -> Parse {
        if buf.is_empty() {
            return Parse::Incomplete {
                needed_at_least: None,
            };
        }
        if buf[0] != CONTENT_HANDSHAKE {
            // SSLv2-compatible hellos (first bit set) are TLS-ish but carry no extensions;
            // nothing modern sends them, and routing them anywhere would be a guess. Whether
            // one is needs three bytes: until then the answer waits, so that it never depends
            // on how the bytes were split.
            if buf[0] & 0x80 != 0 {
                if buf.len() < 3 {
                    return Parse::Incomplete {
                        needed_at_least: None,
                    };
                }
                if buf[2] == 1 {
                    return bad("sslv2_hello");
                }
            }
            return Parse::NotTls;
        }
        if buf.len() >= 2 && buf[1] != 3 {
            return Parse::NotTls;
        }
        // Walk the records not taken yet, gathering handshake bytes until the ClientHello
        // message is complete. A hello in one record (nearly all) is parsed where it lies;
        // only one split over records is copied together, each byte once.
        loop {
            let have = self.handshake.len();
            let rest = &buf[self.pos..];
            if rest.len() < RECORD_HEADER {
                return incomplete(self.pos, self.needed, have);
            }
            if rest[0] != CONTENT_HANDSHAKE {
                return bad("interleaved_record");
            }
            if rest[1] != 3 {
                return bad("record_version");
            }
            let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            if len == 0 {
                return bad("empty_record");
            }
            if len > MAX_RECORD {
                return bad("record_overflow");
            }
            if self.records >= MAX_RECORDS {
                return bad("too_many_records");
            }
            let frag_end = RECORD_HEADER + len;
            let available = rest.len().min(frag_end);
            let frag = &rest[RECORD_HEADER..available];
            // The message header, from what is taken and this record (whole or not).
            let needed = match self.needed {
                Some(n) => Some(n),
                None => {
                    let mut head = [0u8; 4];
                    let known = self
                        .handshake
                        .iter()
                        .chain(frag)
                        .take(4)
                        .enumerate()
                        .map(|(i, &b)| head[i] = b)
                        .count();
                    if known >= 1 && head[0] != HANDSHAKE_CLIENT_HELLO {
                        return bad("not_client_hello");
                    }
                    (known == 4)
                        .then(|| 4 + u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize)
                }
            };
            if available < frag_end {
                // A partial record: wait for the rest of it (nothing of it is taken).
                return incomplete(self.pos, needed, have);
            }
            self.needed = needed;
            self.records += 1;
            let total = have + frag.len();
            if let Some(n) = needed.filter(|&n| total >= n) {
                if total > n {
                    // Another handshake message follows in the same flight: not a client's
                    // first flight.
                    return bad("trailing_handshake_data");
                }
                let consumed = self.pos + frag_end;
                let body = if have == 0 {
                    // The whole message in this one record: parsed where it lies.
                    parse_body(&frag[4..n])
                } else {
                    self.handshake.extend_from_slice(frag);
                    parse_body(&self.handshake[4..n])
                };
                return match body {
                    Ok(hello) => Parse::Hello { hello, consumed },
                    Err(m) => Parse::Malformed(m),
                };
            }
            self.handshake.extend_from_slice(frag);
            self.pos += frag_end;
        }
    }
}

/// Estimate of the minimum total buffer a complete hello needs, from what is known so far.
fn incomplete(pos: usize, needed: Option<usize>, have: usize) -> Parse {
    let needed_at_least = needed.map(|n| {
        let missing = n.saturating_sub(have);
        // At least one more record header for whatever is missing.
        pos + RECORD_HEADER + missing
    });
    Parse::Incomplete { needed_at_least }
}

/// A bounds-checked big-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn take(&mut self, n: usize, why: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(why));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, why: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, why)?[0])
    }
    fn u16(&mut self, why: &'static str) -> Result<u16, Malformed> {
        let b = self.take(2, why)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize, why: &'static str) -> Result<Reader<'a>, Malformed> {
        let len = match width {
            1 => self.u8(why)? as usize,
            _ => self.u16(why)? as usize,
        };
        Ok(Reader::new(self.take(len, why)?))
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, Malformed> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("truncated_version")?;
    r.take(32, "truncated_random")?;
    let session_id = r.vec(1, "truncated_session_id")?;
    if session_id.buf.len() > 32 {
        return Err(Malformed("session_id_too_long"));
    }
    let suites = r.vec(2, "truncated_cipher_suites")?;
    if suites.buf.is_empty() || suites.buf.len() % 2 != 0 {
        return Err(Malformed("bad_cipher_suites"));
    }
    let compression = r.vec(1, "truncated_compression")?;
    if compression.buf.is_empty() {
        return Err(Malformed("bad_compression_methods"));
    }
    let mut hello = ClientHello {
        legacy_version,
        ..ClientHello::default()
    };
    if r.is_empty() {
        // A hello without extensions is legal (old clients): no SNI, no ALPN.
        return Ok(hello);
    }
    let mut exts = r.vec(2, "truncated_extensions")?;
    if !r.is_empty() {
        return Err(Malformed("trailing_bytes"));
    }
    let mut seen = Seen::default();
    while !exts.is_empty() {
        let kind = exts.u16("truncated_extension")?;
        let data = exts.vec(2, "truncated_extension")?;
        if !seen.insert(kind) {
            return Err(Malformed("duplicate_extension"));
        }
        match kind {
            EXT_SERVER_NAME => hello.sni = parse_sni(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => hello.supported_versions = parse_versions(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

/// The extension types of a hello, to refuse duplicates. A real hello has about 20: they are
/// kept inline and compared one by one. Past `INLINE`, a bitmap of all 65,536 types takes
/// over, so that a hello padded with thousands of extensions costs linear time, not
/// quadratic (16,000 extensions in a 64 KiB hello took 5 ms with a list).
#[derive(Default)]
struct Seen {
    inline: [u16; Seen::INLINE],
    len: usize,
    bitmap: Option<Box<[u64; 1024]>>,
}

impl Seen {
    const INLINE: usize = 32;

    /// False if `kind` was seen before.
    fn insert(&mut self, kind: u16) -> bool {
        if let Some(bits) = &mut self.bitmap {
            let (word, bit) = (kind as usize / 64, 1u64 << (kind % 64));
            let new = bits[word] & bit == 0;
            bits[word] |= bit;
            return new;
        }
        if self.inline[..self.len].contains(&kind) {
            return false;
        }
        if self.len < Self::INLINE {
            self.inline[self.len] = kind;
            self.len += 1;
            return true;
        }
        let mut bits = Box::new([0u64; 1024]);
        for k in self.inline.iter().copied().chain([kind]) {
            bits[k as usize / 64] |= 1u64 << (k % 64);
        }
        self.bitmap = Some(bits);
        true
    }
}

fn parse_sni(mut data: Reader<'_>) -> Result<Option<String>, Malformed> {
    if data.is_empty() {
        // An empty server_name extension is what a server sends back; tolerate it from a client.
        return Ok(None);
    }
    let mut list = data.vec(2, "truncated_sni")?;
    if !data.is_empty() {
        return Err(Malformed("trailing_sni_bytes"));
    }
    let mut host: Option<String> = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated_sni")?;
        let name = list.vec(2, "truncated_sni")?.buf;
        if name_type != 0 {
            continue; // unknown name types are skipped per RFC 6066
        }
        if host.is_some() {
            return Err(Malformed("duplicate_sni"));
        }
        host = Some(normalize_host(name)?);
    }
    Ok(host)
}

/// Lowercase ASCII host name without a trailing dot; anything else is malformed so that logs
/// and route matching only ever see clean names. One trailing dot (the root) is dropped; an
/// empty label anywhere else (`a..b`, `.a`, `a..`) is malformed: such a name could otherwise
/// slip past a wildcard route it belongs under.
fn normalize_host(name: &[u8]) -> Result<String, Malformed> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(Malformed("bad_sni_length"));
    }
    let ok = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !ok {
        return Err(Malformed("bad_sni_character"));
    }
    if name.split(|&b| b == b'.').any(<[u8]>::is_empty) {
        return Err(Malformed("empty_sni_label"));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

fn parse_alpn(mut data: Reader<'_>) -> Result<Vec<String>, Malformed> {
    let mut list = data.vec(2, "truncated_alpn")?;
    if !data.is_empty() {
        return Err(Malformed("trailing_alpn_bytes"));
    }
    if list.is_empty() {
        return Err(Malformed("empty_alpn_list"));
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let name = list.vec(1, "truncated_alpn")?.buf;
        if name.is_empty() {
            // RFC 7301 §3.1: empty strings MUST NOT be included.
            return Err(Malformed("empty_alpn_name"));
        }
        out.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(out)
}

fn parse_versions(mut data: Reader<'_>) -> Result<Vec<u16>, Malformed> {
    let mut list = data.vec(1, "truncated_supported_versions")?;
    if !data.is_empty() || list.buf.len() % 2 != 0 || list.is_empty() {
        return Err(Malformed("bad_supported_versions"));
    }
    let mut out = Vec::with_capacity(list.buf.len() / 2);
    while !list.is_empty() {
        out.push(list.u16("bad_supported_versions")?);
    }
    Ok(out)
}

/// Builders for synthetic hellos: used by unit tests, property tests, the fuzz target's seeds
/// and the benchmarks. Public so integration tests and `bench/` can share them.
#[cfg(any(test, feature = "testkit"))]
pub mod build {
    /// Extensions of a synthetic ClientHello.
    #[derive(Debug, Clone, Default)]
    pub struct Spec {
        pub sni: Option<String>,
        pub alpn: Vec<Vec<u8>>,
        pub supported_versions: Vec<u16>,
        /// Extra opaque extensions (type, body), e.g. a large key share.
        pub extra: Vec<(u16, Vec<u8>)>,
        /// `legacy_version`; `None`: 0x0303, as every TLS 1.2 and 1.3 client sends.
        pub legacy_version: Option<u16>,
    }

    fn vec16(out: &mut Vec<u8>, body: &[u8]) {
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }

    /// The handshake message (type + 3-byte length + body), without record framing.
    pub fn handshake(spec: &Spec) -> Vec<u8> {
        let mut body = spec.legacy_version.unwrap_or(0x0303).to_be_bytes().to_vec();
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(32);
        body.extend_from_slice(&[9u8; 32]); // session id
        vec16(&mut body, &[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]);
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(sni) = &spec.sni {
            let mut entry = vec![0u8];
            vec16(&mut entry, sni.as_bytes());
            let mut list = Vec::new();
            vec16(&mut list, &entry);
            exts.extend_from_slice(&0u16.to_be_bytes());
            vec16(&mut exts, &list);
        }
        if !spec.alpn.is_empty() {
            let mut names = Vec::new();
            for p in &spec.alpn {
                names.push(p.len() as u8);
                names.extend_from_slice(p);
            }
            let mut list = Vec::new();
            vec16(&mut list, &names);
            exts.extend_from_slice(&16u16.to_be_bytes());
            vec16(&mut exts, &list);
        }
        if !spec.supported_versions.is_empty() {
            let mut list = vec![(spec.supported_versions.len() * 2) as u8];
            for v in &spec.supported_versions {
                list.extend_from_slice(&v.to_be_bytes());
            }
            exts.extend_from_slice(&43u16.to_be_bytes());
            vec16(&mut exts, &list);
        }
        for (kind, data) in &spec.extra {
            exts.extend_from_slice(&kind.to_be_bytes());
            vec16(&mut exts, data);
        }
        vec16(&mut body, &exts);
        let mut msg = vec![1u8];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// Frame a handshake message into TLS records of at most `max_fragment` bytes each.
    pub fn records(handshake: &[u8], max_fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(max_fragment.max(1)) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A complete single-record hello.
    pub fn hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let spec = Spec {
            sni: sni.map(str::to_owned),
            alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
            supported_versions: vec![0x0304, 0x0303],
            ..Spec::default()
        };
        records(&handshake(&spec), 1 << 14)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    fn hello_of(p: Parse) -> ClientHello {
        match p {
            Parse::Hello { hello, .. } => hello,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    #[test]
    fn simple_hello() {
        let buf = hello(
            Some("Tunnel.Example.COM."),
            &["teleport-reversetunnel", "h2"],
        );
        let h = hello_of(parse(&buf));
        assert_eq!(h.sni.as_deref(), Some("tunnel.example.com"));
        assert_eq!(h.alpn, vec!["teleport-reversetunnel", "h2"]);
        assert_eq!(h.legacy_version, 0x0303);
        assert_eq!(h.supported_versions, vec![0x0304, 0x0303]);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let buf = hello(Some("a.example.com"), &["h2"]);
        for i in 0..buf.len() {
            assert!(
                matches!(parse(&buf[..i]), Parse::Incomplete { .. }),
                "prefix {i}"
            );
        }
    }

    #[test]
    fn split_over_many_records() {
        let spec = Spec {
            sni: Some("db.example.com".into()),
            alpn: vec![
                b"teleport-postgres-ping".to_vec(),
                b"teleport-postgres".to_vec(),
            ],
            ..Spec::default()
        };
        let hs = handshake(&spec);
        for frag in [1, 2, 3, 7, 50, hs.len() - 1] {
            let buf = records(&hs, frag);
            let parsed = parse(&buf);
            let consumed = match &parsed {
                Parse::Hello { consumed, .. } => *consumed,
                _ => 0,
            };
            assert_eq!(consumed, buf.len());
            assert_eq!(hello_of(parsed).sni.as_deref(), Some("db.example.com"));
            for i in 0..buf.len() {
                assert!(matches!(parse(&buf[..i]), Parse::Incomplete { .. }));
            }
        }
    }

    #[test]
    fn large_post_quantum_sized_hello() {
        // X25519MLKEM768 key share: 2 + 2 + 1216 bytes.
        let mut ks = vec![0u8, 0];
        ks.extend_from_slice(&0x11ecu16.to_be_bytes());
        ks.extend_from_slice(&1216u16.to_be_bytes());
        ks.extend_from_slice(&[0xab; 1216]);
        let len = (ks.len() - 2) as u16;
        ks[..2].copy_from_slice(&len.to_be_bytes());
        let spec = Spec {
            sni: Some("x.example.com".into()),
            alpn: vec![b"h2".to_vec()],
            // ... plus padding (ext 21), as Chrome sends: ~1.8 KB in all.
            extra: vec![(51, ks), (21, vec![0; 400])],
            ..Spec::default()
        };
        let buf = records(&handshake(&spec), 1 << 14);
        assert!(buf.len() > 1500, "{}", buf.len());
        assert_eq!(hello_of(parse(&buf)).alpn, vec!["h2"]);
    }

    #[test]
    fn not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parse::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Parse::NotTls);
        assert_eq!(parse(&[22, 9, 9]), Parse::NotTls);
    }

    #[test]
    fn duplicate_extensions_are_found_among_many() {
        let with = |extra: Vec<(u16, Vec<u8>)>| {
            let spec = build::Spec {
                sni: Some("a.example".into()),
                extra,
                ..Default::default()
            };
            parse(&build::records(&build::handshake(&spec), 1 << 14))
        };
        // Thousands of distinct extensions: a valid hello, whose SNI still counts.
        let many: Vec<(u16, Vec<u8>)> = (0..3000).map(|i| (1000 + i, vec![])).collect();
        assert_eq!(
            hello_of(with(many.clone())).sni.as_deref(),
            Some("a.example")
        );
        // A repeat is refused wherever it falls: among the first few (compared inline), after
        // the bitmap took over, of a type first seen inline (server_name, type 0, comes first)
        // or of one first seen in the bitmap.
        for (at, kind) in [(5, 1003), (2000, 0), (2000, 1010), (2999, 2500)] {
            let mut exts = many.clone();
            exts.insert(at, (kind, vec![]));
            assert_eq!(
                with(exts),
                Parse::Malformed(Malformed("duplicate_extension")),
                "type {kind} repeated at {at}"
            );
        }
    }

    #[test]
    fn rejects_ambiguity() {
        let zero = Spec {
            alpn: vec![b"h2".to_vec(), vec![]],
            ..Spec::default()
        };
        assert_eq!(
            parse(&records(&handshake(&zero), 1 << 14)),
            Parse::Malformed(Malformed("empty_alpn_name"))
        );
        let dup = Spec {
            sni: Some("a.example.com".into()),
            extra: vec![(0, {
                let mut e = vec![0, 6, 0, 0, 3];
                e.extend_from_slice(b"b.c");
                e
            })],
            ..Spec::default()
        };
        assert_eq!(
            parse(&records(&handshake(&dup), 1 << 14)),
            Parse::Malformed(Malformed("duplicate_extension"))
        );
        let weird = Spec {
            sni: Some("evil\nhost".into()),
            ..Spec::default()
        };
        assert_eq!(
            parse(&records(&handshake(&weird), 1 << 14)),
            Parse::Malformed(Malformed("bad_sni_character"))
        );
    }

    #[test]
    fn reassembly_resumes_and_answers_as_parse_for_every_split() {
        // Chromium's 2 KB hello re-framed into 41 records, fed as it trickles in: each prefix,
        // through one `Reassembly` that resumes, gives what a fresh `parse` of it gives.
        let hs = handshake(&Spec {
            sni: Some("www.example.com".into()),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            extra: vec![(0x11ec, vec![7; 1900])],
            ..Spec::default()
        });
        let buf = records(&hs, 50);
        let mut r = Reassembly::default();
        for i in 0..=buf.len() {
            assert_eq!(r.parse(&buf[..i]), parse(&buf[..i]), "prefix {i}");
        }
        assert!(matches!(parse(&buf), Parse::Hello { .. }));
        // An SSLv2-style hello is refused whatever its first segment holds (its first byte
        // alone used to read as "not TLS").
        let v2 = [0x80, 0x2e, 0x01, 0x03, 0x01];
        for i in 1..3 {
            assert!(matches!(parse(&v2[..i]), Parse::Incomplete { .. }), "{i}");
        }
        for i in 3..=v2.len() {
            assert_eq!(parse(&v2[..i]), bad("sslv2_hello"), "{i}");
        }
    }

    #[test]
    fn a_flood_of_one_byte_records_is_refused_at_the_record_limit() {
        // A 10 KB hello in one-byte records (60 KB on the wire), read 6 bytes at a time: every
        // read resumes where the last stopped, and the hello is refused at the record limit.
        let hs = handshake(&Spec {
            extra: vec![(0x11ec, vec![7; 10_000])],
            ..Spec::default()
        });
        let buf = records(&hs, 1);
        let mut r = Reassembly::default();
        let mut last = Parse::Incomplete {
            needed_at_least: None,
        };
        let mut end = 0;
        while end < buf.len() && matches!(last, Parse::Incomplete { .. }) {
            end = (end + 6).min(buf.len());
            last = r.parse(&buf[..end]);
        }
        assert_eq!(last, bad("too_many_records"));
        assert_eq!(
            end,
            6 * MAX_RECORDS + 6,
            "refused at the record over the limit"
        );
    }

    #[test]
    fn host_names_with_empty_labels_are_malformed() {
        for name in [
            "a..secret.example.com",
            "a.secret.example.com..",
            "..",
            ".secret.example.com",
        ] {
            assert_eq!(
                parse(&hello(Some(name), &["h2"])),
                Parse::Malformed(Malformed("empty_sni_label")),
                "{name}"
            );
        }
        // One trailing dot is the root: the same name.
        let Parse::Hello { hello: h, .. } = parse(&hello(Some("A.Secret.example.com."), &["h2"]))
        else {
            panic!("a trailing dot is allowed")
        };
        assert_eq!(h.sni.as_deref(), Some("a.secret.example.com"));
    }

    #[test]
    fn rejects_bad_framing() {
        let mut buf = hello(Some("a.b"), &["h2"]);
        buf[5] = 2; // ServerHello
        assert_eq!(parse(&buf), Parse::Malformed(Malformed("not_client_hello")));
        // An alert record in the middle of a split hello.
        let hs = handshake(&Spec::default());
        let mut buf = records(&hs[..10], 10);
        buf.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(
            parse(&buf),
            Parse::Malformed(Malformed("interleaved_record"))
        );
        // A record claiming more than 2^14 bytes.
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0x01, 1]),
            Parse::Malformed(Malformed("record_overflow"))
        );
    }

    #[test]
    fn needed_at_least_reports_declared_size() {
        let spec = Spec {
            extra: vec![(0xffaa, vec![0; 40000])],
            ..Spec::default()
        };
        let buf = records(&handshake(&spec), 1 << 14);
        match parse(&buf[..100]) {
            Parse::Incomplete {
                needed_at_least: Some(n),
            } => assert!(n > 40000),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_tls_shaped_input(
            mut bytes in proptest::collection::vec(any::<u8>(), 6..2048), len in 0u16..3000
        ) {
            bytes[0] = 22; bytes[1] = 3; bytes[3..5].copy_from_slice(&len.to_be_bytes()); bytes[5] = 1;
            let _ = parse(&bytes);
        }

        /// Every field the parser reads comes back as built, whatever the records look like:
        /// the same handshake bytes cut into records at arbitrary points (not just a fixed
        /// fragment size) parse to the same hello, and every prefix of them is incomplete.
        #[test]
        fn roundtrip(
            sni in proptest::option::of("[a-zA-Z0-9_-]{1,20}(\\.[a-zA-Z0-9-]{1,20}){0,3}\\.?"),
            alpn in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            legacy_version in prop_oneof![Just(0x0303u16), Just(0x0301), any::<u16>()],
            supported_versions in proptest::collection::vec(any::<u16>(), 0..8),
            extra in proptest::collection::btree_map(
                (100u16..0xfff0).prop_filter("not a parsed type", |t| ![0, 16, 43].contains(t)),
                proptest::collection::vec(any::<u8>(), 0..300),
                0..6,
            ),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
        ) {
            let spec = Spec {
                sni: sni.clone(),
                alpn: alpn.clone(),
                supported_versions: supported_versions.clone(),
                extra: extra.into_iter().collect(),
                legacy_version: Some(legacy_version),
            };
            let hs = handshake(&spec);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(hs.len())).collect();
            points.extend([0, hs.len()]);
            points.sort_unstable();
            points.dedup();
            let mut buf = Vec::new();
            for w in points.windows(2) {
                buf.extend_from_slice(&records(&hs[w[0]..w[1]], 1 << 14));
            }
            let expected = ClientHello {
                sni: sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()),
                alpn: alpn.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect(),
                legacy_version,
                supported_versions,
            };
            prop_assert_eq!(
                parse(&buf),
                Parse::Hello { hello: expected, consumed: buf.len() }
            );
            for i in 0..buf.len() {
                prop_assert!(
                    matches!(parse(&buf[..i]), Parse::Incomplete { .. }),
                    "prefix {} of {}", i, buf.len()
                );
            }
        }
    }

    // Crafted hellos for every rejection the parser has.

    fn v8(b: &[u8]) -> Vec<u8> {
        [&[b.len() as u8][..], b].concat()
    }

    fn v16(b: &[u8]) -> Vec<u8> {
        [&(b.len() as u16).to_be_bytes()[..], b].concat()
    }

    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        [&kind.to_be_bytes()[..], &v16(data)].concat()
    }

    /// version, random, session id, cipher suites, compression: all well formed.
    fn head() -> Vec<u8> {
        [
            &[3u8, 3][..],
            &[7; 32],
            &v8(&[9; 32]),
            &v16(&[0x13, 1]),
            &v8(&[0]),
        ]
        .concat()
    }

    /// A hello whose body is `body`, in one record.
    fn framed(body: &[u8]) -> Vec<u8> {
        let mut hs = vec![1u8];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(body);
        records(&hs, 1 << 14)
    }

    fn with_exts(exts: &[u8]) -> Vec<u8> {
        framed(&[head(), v16(exts)].concat())
    }

    /// Every label `parse` can reject a hello with, each hit by crafted bytes; the list is
    /// checked against the labels written in this file, so a new one needs a case here.
    #[test]
    fn every_rejection_label_is_reachable() {
        let good = hello(Some("a.example.com"), &["h2"]);
        let hs = &good[5..];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("sslv2_hello", vec![0x80, 0x2e, 0x01, 0x03, 0x01]),
            (
                "trailing_handshake_data",
                records(&[hs, &[20, 0, 0, 0]].concat(), 1 << 14),
            ),
            (
                "interleaved_record",
                [records(&hs[..10], 1 << 14), vec![21, 3, 3, 0, 2, 1, 0]].concat(),
            ),
            (
                "record_version",
                [records(&hs[..10], 1 << 14), vec![22, 2, 0, 0, 1, 0]].concat(),
            ),
            ("empty_record", vec![22, 3, 1, 0, 0]),
            (
                "too_many_records",
                records(
                    &handshake(&Spec {
                        extra: vec![(0x11ec, vec![7; 5000])],
                        ..Spec::default()
                    }),
                    1,
                ),
            ),
            ("record_overflow", vec![22, 3, 1, 0xff, 0xff]),
            ("not_client_hello", records(&[2, 0, 0, 1, 0], 1 << 14)),
            ("truncated_version", framed(&[3])),
            ("truncated_random", framed(&[3, 3, 7, 7])),
            (
                "truncated_session_id",
                framed(&[&[3u8, 3][..], &[7; 32], &[5, 1, 2]].concat()),
            ),
            (
                "session_id_too_long",
                framed(&[&[3u8, 3][..], &[7; 32], &v8(&[9; 33])].concat()),
            ),
            (
                "truncated_cipher_suites",
                framed(&[&[3u8, 3][..], &[7; 32], &[0, 0, 4, 0x13]].concat()),
            ),
            (
                "bad_cipher_suites",
                framed(&[&[3u8, 3][..], &[7; 32], &[0], &v16(&[0x13])].concat()),
            ),
            (
                "truncated_compression",
                framed(&[&[3u8, 3][..], &[7; 32], &[0], &v16(&[0x13, 1]), &[1]].concat()),
            ),
            (
                "bad_compression_methods",
                framed(&[&[3u8, 3][..], &[7; 32], &[0], &v16(&[0x13, 1]), &[0]].concat()),
            ),
            (
                "truncated_extensions",
                framed(&[head(), vec![0, 10, 0, 0]].concat()),
            ),
            (
                "trailing_bytes",
                framed(&[head(), v16(&[]), vec![0]].concat()),
            ),
            ("truncated_extension", with_exts(&[0xff])),
            (
                "duplicate_extension",
                with_exts(&[ext(0xffaa, &[]), ext(0xffaa, &[])].concat()),
            ),
            ("truncated_sni", with_exts(&ext(0, &v16(&[0])))),
            (
                "trailing_sni_bytes",
                with_exts(&ext(0, &[v16(&[0, 0, 1, b'a']), vec![0]].concat())),
            ),
            (
                "duplicate_sni",
                with_exts(&ext(0, &v16(&[0, 0, 1, b'a', 0, 0, 1, b'b']))),
            ),
            ("bad_sni_length", with_exts(&ext(0, &v16(&[0, 0, 1, b'.'])))),
            (
                "bad_sni_character",
                with_exts(&ext(0, &v16(&[0, 0, 3, b'a', b' ', b'b']))),
            ),
            (
                "empty_sni_label",
                with_exts(&ext(0, &v16(&[0, 0, 4, b'a', b'.', b'.', b'b']))),
            ),
            ("truncated_alpn", with_exts(&ext(16, &[0, 5, 1]))),
            (
                "trailing_alpn_bytes",
                with_exts(&ext(16, &[v16(&v8(b"h2")), vec![0]].concat())),
            ),
            ("empty_alpn_list", with_exts(&ext(16, &v16(&[])))),
            ("empty_alpn_name", with_exts(&ext(16, &v16(&[0])))),
            ("truncated_supported_versions", with_exts(&ext(43, &[]))),
            (
                "bad_supported_versions",
                with_exts(&ext(43, &v8(&[3, 4, 3]))),
            ),
        ];
        for (label, bytes) in &cases {
            assert_eq!(parse(bytes), bad(label), "{label}");
        }
        let source = include_str!("hello.rs");
        let parser = &source[..source.find("#[cfg(any(test, feature").unwrap()];
        let mut labels: Vec<&str> = parser
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|l| {
                l.len() > 1
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            })
            .collect();
        labels.sort_unstable();
        labels.dedup();
        let mut tested: Vec<&str> = cases.iter().map(|(l, _)| *l).collect();
        tested.sort_unstable();
        assert_eq!(tested, labels, "every label in the parser has a case");
    }
}
