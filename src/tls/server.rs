//! TLS server configs sluice terminates with: the heartbeat API's (its certificate, and client
//! certificates verified against a CA by rustls) and a `quic = "terminate"` route's. Tokens
//! and scopes are pure and live in `sluice_core::agents::auth`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS server config of the heartbeat API: its certificate, and a client-certificate
/// verifier when `client_ca` is given. A client certificate is asked for but optional at the
/// handshake: bearer tokens and the version server's updaters come without one, and every
/// heartbeat request is checked for a credential (`api::authenticate`).
pub fn server_tls(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert_file.display()));
    }
    if is_ca(&certs[0]) {
        return Err(format!(
            "{} is a CA certificate (basicConstraints cA); clients refuse it as a server's",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: no usable private key: {e}", key_file.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("cannot read {}: {e}", ca.display()))?
            {
                let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated();
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?,
            )
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not make a TLS config: {e}"))?;
    cfg.alpn_protocols = vec![
        sluice_core::agents::ALPN.as_bytes().to_vec(),
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
    ];
    Ok(Arc::new(cfg))
}

/// Whether `cert` says it is a certificate authority: TLS clients refuse such a certificate as
/// a server's own (webpki: `CaUsedAsEndEntity`), so the check says so at load rather than every
/// agent at its handshake. webpki checks basic constraints before it looks for an issuer, so
/// no trust anchor is needed to find out.
fn is_ca(cert: &CertificateDer<'_>) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let checked = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[],
        &[],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    matches!(checked, Err(webpki::Error::CaUsedAsEndEntity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_certificate_is_refused_as_the_servers_and_a_leaf_is_not() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ca.example.com".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        assert!(is_ca(ca.der()));
        let leaf = rcgen::generate_simple_self_signed(vec!["api.example.com".into()]).unwrap();
        assert!(!is_ca(leaf.cert.der()));

        let dir = tempfile::tempdir().unwrap();
        let (cert, keyf) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, ca.pem()).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        let err = server_tls(&cert, &keyf, None).unwrap_err();
        assert!(err.contains("is a CA certificate"), "{err}");
        std::fs::write(&cert, leaf.cert.pem()).unwrap();
        std::fs::write(&keyf, leaf.key_pair.serialize_pem()).unwrap();
        assert!(server_tls(&cert, &keyf, None).is_ok());
    }
}
