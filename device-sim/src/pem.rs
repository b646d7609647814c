//! Reading the development PKI's PEM files into rustls types.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} ({path}): {reason}")]
pub struct PemError {
    /// What the file is for, e.g. `--cert`.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

fn error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> PemError {
    PemError {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Every certificate of a PEM file; a file with none is an error.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(what, path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(what, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(error(what, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| error(what, path, format!("no usable private key: {e}")))
}

/// A root store of every certificate in a CA bundle.
pub fn load_roots(path: &Path, what: &'static str) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots
            .add(cert)
            .map_err(|e| error(what, path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}
