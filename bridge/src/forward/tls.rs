//! The uplink's rustls client configuration (ring provider), rebuilt from
//! the files before every connection attempt.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::config::UplinkTls;
use crate::pem::{PemError, load_certs, load_key, load_roots};

/// Builds the client configuration for connecting to `host`, checking every
/// file (and that Vigil's own certificate is within its validity period).
pub fn client_config(tls: &UplinkTls, host: &str) -> Result<Arc<rustls::ClientConfig>, PemError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(load_roots(&tls.ca, "forward.tls.ca")?);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PemError::new("forward.tls.ca", &tls.ca, e.to_string()))?;
    let mut verifier = WebPkiServerVerifier::builder_with_provider(roots, provider);
    if let Some(crl) = &tls.crl {
        verifier = verifier
            .with_crls(crate::pem::load_crls(crl, "forward.tls.crl")?)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let inner = verifier
        .build()
        .map_err(|e| PemError::new("forward.tls.ca", &tls.ca, e.to_string()))?;
    let builder = match tls.server_name.as_deref() {
        Some(name) if name != host => {
            let name = ServerName::try_from(name.to_string()).map_err(|e| {
                PemError::new(
                    "forward.tls.ca",
                    &tls.ca,
                    format!("forward.tls.server_name {name:?}: {e}"),
                )
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }))
        }
        _ => builder.with_webpki_verifier(inner),
    };
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert, "forward.tls.cert")?;
            check_validity(&chain, cert)?;
            let key_der = load_key(key, "forward.tls.key")?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                PemError::new(
                    "forward.tls.key",
                    key,
                    format!("the key does not fit the certificate in forward.tls.cert: {e}"),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Refuses Vigil's own certificate outside its validity period, with the
/// dates, rather than letting the cloud answer with a bare TLS alert.
fn check_validity(chain: &[CertificateDer<'_>], path: &std::path::Path) -> Result<(), PemError> {
    let Some(leaf) = chain.first() else {
        return Ok(());
    };
    let bad = |reason: String| PemError::new("forward.tls.cert", path, reason);
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| bad(format!("not a valid X.509 certificate: {e}")))?;
    let now = x509_parser::time::ASN1Time::now();
    let validity = cert.validity();
    if validity.not_after < now {
        return Err(bad(format!(
            "Vigil's client certificate expired on {} and the gateway's clock says {now}: \
             if the clock is wrong, fix it; otherwise install a renewed certificate \
             (it is picked up on the next connection attempt)",
            validity.not_after
        )));
    }
    if validity.not_before > now {
        return Err(bad(format!(
            "Vigil's client certificate is not valid before {} and the gateway's clock \
             says {now}; check the gateway's clock",
            validity.not_before
        )));
    }
    Ok(())
}

/// Full WebPKI verification against a configured name instead of the host
/// connected to (like `curl --connect-to`): for clouds reached by IP address
/// or through a tunnel.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Turns a connection failure into a sentence naming the cause and the fix.
/// `detail` is the error's text and `debug` its `Debug` form (rumqttc wraps
/// rustls and I/O errors; the variant names are in the latter).
pub fn explain(detail: &str, debug: &str) -> String {
    let hint = [
        (
            "CertificateRequired",
            "the cloud requires a client certificate: set forward.tls.cert and forward.tls.key",
        ),
        (
            "UnknownCA",
            "the cloud does not trust Vigil's client certificate (forward.tls.cert)",
        ),
        (
            "BadCertificate",
            "the cloud rejected Vigil's client certificate (forward.tls.cert)",
        ),
        (
            "CertificateExpired",
            "the cloud says Vigil's client certificate has expired (forward.tls.cert)",
        ),
        (
            "UnknownIssuer",
            "the cloud's certificate is not signed by a CA in forward.tls.ca (wrong CA bundle? \
             or the cloud does not send its intermediate certificates: add them to \
             forward.tls.ca, or fix the cloud's chain)",
        ),
        (
            "Revoked",
            "the cloud's certificate has been revoked (it is in forward.tls.crl)",
        ),
        (
            "InvalidPurpose",
            "the cloud's certificate is not a TLS server certificate (its extended key usage \
             lacks serverAuth): the cloud must present a server certificate",
        ),
        (
            "BadSignature",
            "the cloud's certificate is not signed by a CA in forward.tls.ca (a CA of the same \
             name but another key: wrong CA bundle?)",
        ),
        (
            "NotValidForName",
            "the cloud's certificate is not valid for the name Vigil connects to \
             (forward.host, or forward.tls.server_name)",
        ),
        (
            "Expired",
            "the cloud's certificate has expired (or the gateway's clock is wrong)",
        ),
        (
            "NotValidYet",
            "the cloud's certificate is not valid yet (is the gateway's clock right?)",
        ),
        (
            "ConnectionRefused, message",
            "nothing accepts connections at forward.host:forward.port",
        ),
        (
            "BadUserNamePassword",
            "the cloud refused Vigil's user name or password (check forward.username and the \
             password in forward.password_file; a fixed file is read on the next attempt)",
        ),
        (
            "NotAuthorized",
            "the cloud says Vigil is not authorized to connect (check forward.username, \
             forward.password_file, forward.client_id and the cloud's rules for them)",
        ),
        (
            "Connection refused, return code",
            "the cloud broker refused the MQTT connection (check forward.client_id and its ACLs)",
        ),
    ]
    .iter()
    .find(|(needle, _)| detail.contains(needle) || debug.contains(needle))
    .map(|(_, hint)| *hint);
    match hint {
        Some(hint) => format!("{hint} ({detail})"),
        None => detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::explain;

    /// A CONNACK refusal of the login, as rumqttc reports it on either
    /// protocol, names the settings to check.
    #[test]
    fn a_refused_login_is_explained_on_both_protocols() {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5;
        let cases = [
            (
                format!(
                    "{}",
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::BadUserNamePassword
                    )
                ),
                format!(
                    "{:?}",
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::BadUserNamePassword
                    )
                ),
                "refused Vigil's user name or password",
            ),
            (
                rumqttc::v5::ConnectionError::ConnectionRefused(V5::BadUserNamePassword)
                    .to_string(),
                format!(
                    "{:?}",
                    rumqttc::v5::ConnectionError::ConnectionRefused(V5::BadUserNamePassword)
                ),
                "refused Vigil's user name or password",
            ),
            (
                rumqttc::ConnectionError::ConnectionRefused(
                    rumqttc::ConnectReturnCode::NotAuthorized,
                )
                .to_string(),
                format!(
                    "{:?}",
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::NotAuthorized
                    )
                ),
                "not authorized to connect",
            ),
            (
                rumqttc::v5::ConnectionError::ConnectionRefused(V5::NotAuthorized).to_string(),
                format!(
                    "{:?}",
                    rumqttc::v5::ConnectionError::ConnectionRefused(V5::NotAuthorized)
                ),
                "not authorized to connect",
            ),
        ];
        for (text, debug, want) in cases {
            let said = explain(&text, &debug);
            assert!(
                said.contains(want) && said.contains("forward.username"),
                "{said}"
            );
        }
    }
}
