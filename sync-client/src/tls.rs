//! How a replica trusts a `wss://` server: the usual web roots, an organisation's own CA,
//! or one pinned certificate (a sub-office server with a self-signed certificate).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::ClientError;

/// Which server certificates a replica accepts on `wss://`.
#[derive(Debug, Clone, Default)]
pub enum TlsTrust {
    /// Certificates issued under the public web roots (Mozilla's list, built in).
    #[default]
    WebRoots,
    /// Certificates issued under these CA certificates only.
    Ca(Vec<CertificateDer<'static>>),
    /// Exactly the certificate whose DER encoding has this SHA-256, whoever issued it.
    Pinned([u8; 32]),
}

impl TlsTrust {
    /// Trust the CA certificates in a PEM file.
    pub fn ca_file(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Tls(format!("cannot read CA {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Tls(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        Ok(TlsTrust::Ca(certs))
    }

    /// Pin a certificate by the hex SHA-256 of its DER encoding (as `openssl x509 -outform
    /// der | sha256sum` prints it; colons are ignored).
    pub fn pinned_hex(hex_digest: &str) -> Result<Self, ClientError> {
        let clean: String = hex_digest.chars().filter(|c| *c != ':').collect();
        let bytes = (0..clean.len())
            .step_by(2)
            .map(|i| {
                clean
                    .get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>();
        match bytes.and_then(|b| <[u8; 32]>::try_from(b).ok()) {
            Some(pin) => Ok(TlsTrust::Pinned(pin)),
            None => Err(ClientError::Tls(format!(
                "pin {hex_digest:?} is not a hex SHA-256 (64 hex digits)"
            ))),
        }
    }

    /// The rustls client configuration for this trust.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let cfg = match self {
            TlsTrust::WebRoots => {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            TlsTrust::Ca(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    roots
                        .add(c.clone())
                        .map_err(|e| ClientError::Tls(format!("unusable CA certificate: {e}")))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            TlsTrust::Pinned(pin) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pin {
                    pin: *pin,
                    provider,
                }))
                .with_no_client_auth(),
        };
        Ok(Arc::new(cfg))
    }
}

/// Accepts exactly one certificate, still checking that the server holds its key.
#[derive(Debug)]
struct Pin {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "server certificate does not match the pinned SHA-256".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        let hex = "ab".repeat(32);
        assert!(matches!(TlsTrust::pinned_hex(&hex), Ok(TlsTrust::Pinned(p)) if p == [0xab; 32]));
        let colons = vec!["ab"; 32].join(":");
        assert!(TlsTrust::pinned_hex(&colons).is_ok());
        assert!(TlsTrust::pinned_hex("abcd").is_err());
        assert!(TlsTrust::pinned_hex(&"zz".repeat(32)).is_err());
    }
}
