//! The device TLS listener's rustls configuration (ring provider).
//!
//! The gate terminates TLS itself, one task per connection with a handshake
//! timeout, instead of using rumqttd's TLS listener: that one awaits each
//! handshake inline (one idle socket stalls every device), trusts only the
//! first CA in its bundle, and turns a certificate's O= field into a tenant
//! prefix (`notes/libraries.md` section 1.4).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;

use super::GateError;
use super::config::{ClientCertificates, TlsConfig};
use crate::pem::{PemError, load_certs, load_key, load_roots};

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
            let roots = load_roots(ca, "gate.tls.client_ca")?;
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
    PemError::new(setting, path, reason).into()
}
