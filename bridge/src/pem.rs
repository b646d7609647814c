//! PEM certificates and private keys for both TLS ends: the device listener
//! (gate) and the cloud uplink (forward). Every failure names the setting, the
//! file and the fix.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A certificate or key file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} ({path}): {reason}")]
pub struct PemError {
    /// The setting naming the file, e.g. `forward.tls.key`.
    pub setting: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl PemError {
    /// An error about `path`, named by `setting`.
    pub fn new(setting: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        Self {
            setting,
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Reads every certificate of a PEM file; a file with none is an error.
pub fn load_certs(
    path: &Path,
    setting: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    load_all(
        path,
        setting,
        "no CERTIFICATE block found; expected a PEM certificate",
    )
}

/// Every PEM block of type `T` in a file; none is an error (`none`).
fn load_all<T: PemObject>(
    path: &Path,
    setting: &'static str,
    none: &str,
) -> Result<Vec<T>, PemError> {
    let items = T::pem_file_iter(path)
        .map_err(|e| PemError::new(setting, path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::new(setting, path, format!("not valid PEM: {e}")))?;
    if items.is_empty() {
        return Err(PemError::new(setting, path, none));
    }
    Ok(items)
}

/// Reads a private key, refusing a file that group or others can read.
pub fn load_key(path: &Path, setting: &'static str) -> Result<PrivateKeyDer<'static>, PemError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .map_err(|e| PemError::new(setting, path, format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(PemError::new(
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
        PemError::new(
            setting,
            path,
            format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })
}

/// Reads every certificate revocation list of a PEM file (`X509 CRL`
/// blocks); a file with none is an error.
pub fn load_crls(
    path: &Path,
    setting: &'static str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    load_all(
        path,
        setting,
        "no X509 CRL block found; expected a PEM certificate revocation list",
    )
}

/// A root store of every certificate in a CA bundle.
pub fn load_roots(path: &Path, setting: &'static str) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path, setting)? {
        roots
            .add(cert)
            .map_err(|e| PemError::new(setting, path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}
