//! The ClientHello parser over hellos captured from real clients (see tests/fixtures/README).

mod support;

use sluice_core::hello::{build, parse, ClientHello, Parse};
use support::{fixture, handshake_of};

fn expect_hello(bytes: &[u8]) -> ClientHello {
    match parse(bytes) {
        Parse::Hello { hello, consumed } => {
            assert_eq!(consumed, bytes.len());
            hello
        }
        other => panic!("expected a hello, got {other:?}"),
    }
}

fn check_all_forms(bytes: &[u8]) -> ClientHello {
    let hello = expect_hello(bytes);
    // Every prefix is Incomplete: never a guess on partial data.
    for i in 0..bytes.len() {
        assert!(
            matches!(parse(&bytes[..i]), Parse::Incomplete { .. }),
            "prefix of {i} bytes"
        );
    }
    // The same handshake split over 2..N records parses to the same facts.
    let hs = handshake_of(bytes);
    for frag in [1, 2, 5, 64, 300, hs.len() / 2 + 1] {
        let reframed = build::records(&hs, frag);
        assert_eq!(expect_hello(&reframed), hello, "fragment size {frag}");
    }
    hello
}

#[test]
fn openssl_tunnel_hello() {
    let h = check_all_forms(&fixture("openssl-3.0-tunnel.bin"));
    assert_eq!(h.sni.as_deref(), Some("tunnel.example.com"));
    assert_eq!(
        h.alpn,
        ["teleport-reversetunnelv2", "teleport-reversetunnel"]
    );
    assert!(h.supported_versions.contains(&0x0304));
}

#[test]
fn curl_h2_hello() {
    let h = check_all_forms(&fixture("curl-h2.bin"));
    assert_eq!(h.sni.as_deref(), Some("localhost"));
    assert_eq!(h.alpn, ["h2", "http/1.1"]);
}

#[test]
fn python_ssl_postgres_hello() {
    let h = check_all_forms(&fixture("python-ssl-postgres.bin"));
    assert_eq!(h.sni.as_deref(), Some("db.example.com"));
    assert_eq!(h.alpn, ["teleport-postgres-ping", "teleport-postgres"]);
}

#[test]
fn openssl_tls12_without_sni() {
    let h = check_all_forms(&fixture("openssl-tls12-nosni.bin"));
    assert_eq!(h.sni, None);
    assert!(h.alpn.is_empty());
    assert_eq!(h.legacy_version, 0x0303);
}

#[test]
fn chromium_post_quantum_hello_is_larger_than_one_mss() {
    let bytes = fixture("chromium-pq-h2.bin");
    assert!(bytes.len() > 1500, "{}", bytes.len());
    let h = check_all_forms(&bytes);
    assert_eq!(
        h.sni.as_deref(),
        Some("kube-teleport-proxy-alpn.example.com")
    );
    assert_eq!(h.alpn, ["h2", "http/1.1"]);
}

#[test]
fn rustls_client_hello() {
    // Generated live from rustls' own client state machine.
    let cfg = sluice::tls::testing::insecure_client_config(&["teleport-reversetunnelv2", "h2"]);
    let name = rustls::pki_types::ServerName::try_from("agent.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut bytes = Vec::new();
    conn.write_tls(&mut bytes).unwrap();
    let h = check_all_forms(&bytes);
    assert_eq!(h.sni.as_deref(), Some("agent.example.com"));
    assert_eq!(h.alpn, ["teleport-reversetunnelv2", "h2"]);
}
