//! The device TLS listener's rustls configuration (ring provider).
//!
//! The gate terminates TLS itself, one task per connection with a handshake
//! timeout, instead of using rumqttd's TLS listener: that one awaits each
//! handshake inline (one idle socket stalls every device), trusts only the
//! first CA in its bundle, and turns a certificate's O= field into a tenant
//! prefix (`notes/libraries.md` section 1.4).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use super::GateError;
use super::config::{ClientCertificates, TlsConfig};

/// Builds the server configuration, checking every file with a clear error.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, GateError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_certs(&config.cert, "gate.tls.cert")?;
    let key = load_key(&config.key, "gate.tls.key")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("gate.tls", &config.cert, e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca, "gate.tls.client_ca")? {
                roots.add(cert).map_err(|e| {
                    tls_err(
                        "gate.tls.client_ca",
                        ca,
                        format!("unusable CA certificate: {e}"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match config.client_certificates {
                ClientCertificates::Required => verifier,
                ClientCertificates::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| tls_err("gate.tls.client_ca", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_single_cert(chain, key).map_err(|e| {
        tls_err(
            "gate.tls.key",
            &config.key,
            format!("the key does not fit the certificate in gate.tls.cert: {e}"),
        )
    })?;
    Ok(Arc::new(server))
}

fn tls_err(setting: &'static str, path: &Path, reason: String) -> GateError {
    GateError::Tls {
        setting,
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads every certificate of a PEM file; none is an error.
pub fn load_certs(
    path: &Path,
    setting: &'static str,
) -> Result<Vec<CertificateDer<'static>>, GateError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(setting, path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(setting, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(
            setting,
            path,
            "no CERTIFICATE block found; expected a PEM certificate".into(),
        ));
    }
    Ok(certs)
}

/// Reads a private key, refusing a file group or others can read.
pub fn load_key(path: &Path, setting: &'static str) -> Result<PrivateKeyDer<'static>, GateError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta =
        std::fs::metadata(path).map_err(|e| tls_err(setting, path, format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(tls_err(
            setting,
            path,
            format!(
                "the private key is readable by group or others (mode {:o}); run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        ));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        tls_err(
            setting,
            path,
            format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })
}
