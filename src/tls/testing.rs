//! Real TLS peers for the demo, the tests and the benchmarks: self-signed certificates
//! (rcgen), a TLS server that says who it is, and a client that trusts anything.
//!
//! Never used on the routing path: sluice itself does not terminate TLS.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ServerConfig};

/// A rustls server config with a fresh self-signed certificate for `names`, offering `alpn`.
pub fn server_config(names: &[&str], alpn: &[&str]) -> anyhow::Result<Arc<ServerConfig>> {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client config that offers `alpn` and accepts any server certificate: for tests and
/// benchmarks against self-signed backends only.
/// A client that accepts any certificate (tests only; see `tls::client`).
pub fn insecure_client_config(alpn: &[&str]) -> Arc<ClientConfig> {
    super::client::unverified(alpn)
}
