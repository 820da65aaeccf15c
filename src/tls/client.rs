//! TLS client configurations for sluice's own outbound TLS (health checks).
//!
//! Owns: the two ways sluice trusts a backend's certificate: not at all (`unverified`, like
//! HAProxy's `verify none`: a health check then proves only that TLS and ALPN work), or against
//! a CA file (`verified`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

fn with_alpn(mut cfg: ClientConfig, alpn: &[&str]) -> Arc<ClientConfig> {
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// Accepts any certificate.
pub fn unverified(alpn: &[&str]) -> Arc<ClientConfig> {
    let cfg = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    with_alpn(cfg, alpn)
}

/// Verifies the server's certificate against the CA certificates in a PEM file.
pub fn verified(ca_file: &Path, alpn: &[&str]) -> Result<Arc<ClientConfig>, String> {
    let pem =
        std::fs::read(ca_file).map_err(|e| format!("cannot read {}: {e}", ca_file.display()))?;
    let roots = roots_from_pem(&pem, &ca_file.display().to_string())?;
    Ok(with_alpn(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        alpn,
    ))
}

/// Trust the CAs of `ca_pem`, or the system's when `None` (for upstreams on the internet,
/// as the version server's `forward_url`).
pub fn trusting(ca_pem: Option<&[u8]>, alpn: &[&str]) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca_pem {
        Some(pem) => roots_from_pem(pem, "ca_file")?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no system CA certificate found ({} errors); set a ca_file",
                    found.errors.len()
                ));
            }
            roots
        }
    };
    Ok(with_alpn(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        alpn,
    ))
}

/// The CAs of a PEM file's content; `name` says which file in messages.
fn roots_from_pem(pem: &[u8], name: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.map_err(|e| format!("{name}: {e}"))?)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{name} holds no certificate"));
    }
    Ok(roots)
}

#[derive(Debug)]
pub(crate) struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
