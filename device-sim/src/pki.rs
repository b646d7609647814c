//! The development PKI: one CA and the leaf certificates a loopback set-up
//! needs, written as PEM files (keys with mode 0600). For development and
//! CI only: the CA key is thrown away once the leaves are signed.

use std::path::{Path, PathBuf};

/// Why the PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("cannot make the certificate {name}: {source}")]
    Certificate {
        /// The certificate's file name stem.
        name: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Paths of the files [`create`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The directory.
    pub dir: PathBuf,
}

impl DevPki {
    /// `<dir>/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A TLS server (the cloud broker): names become SANs.
    Server,
    /// A TLS client (Vigil, a device, the verifying subscriber).
    Client,
}

/// Writes `ca.pem`, then for each `(stem, role, names)` a `<stem>.pem` and a
/// `<stem>.key` signed by that CA. The first name is the common name; all of
/// them are subject alternative names (IP addresses are recognised).
pub fn create(dir: &Path, leaves: &[(&str, Role, &[&str])]) -> Result<DevPki, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let cert_err = |name: &str| {
        let name = name.to_string();
        move |source| PkiError::Certificate {
            name: name.clone(),
            source,
        }
    };
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(cert_err("ca"))?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "vigil-sim development CA");
    let ca_key = rcgen::KeyPair::generate().map_err(cert_err("ca"))?;
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err("ca"))?;
    write(&dir.join("ca.pem"), &ca_cert.pem(), false)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for (stem, role, names) in leaves {
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(sans).map_err(cert_err(stem))?;
        if let Some(cn) = names.first() {
            p.distinguished_name.push(rcgen::DnType::CommonName, *cn);
        }
        p.use_authority_key_identifier_extension = true;
        p.extended_key_usages.push(match role {
            Role::Server => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            Role::Client => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        });
        let key = rcgen::KeyPair::generate().map_err(cert_err(stem))?;
        let cert = p.signed_by(&key, &issuer).map_err(cert_err(stem))?;
        write(&dir.join(format!("{stem}.pem")), &cert.pem(), false)?;
        write(&dir.join(format!("{stem}.key")), &key.serialize_pem(), true)?;
    }
    Ok(DevPki {
        dir: dir.to_path_buf(),
    })
}

/// The set a loopback scenario uses: `cloud` (server for localhost and
/// 127.0.0.1), `vigil`, `subscriber` and `device` (clients).
pub fn loopback(dir: &Path) -> Result<DevPki, PkiError> {
    create(
        dir,
        &[
            ("cloud", Role::Server, &["localhost", "127.0.0.1"]),
            ("vigil", Role::Client, &["vigil"]),
            ("subscriber", Role::Client, &["subscriber"]),
            ("device", Role::Client, &["device"]),
        ],
    )
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_pki_has_private_keys_and_loadable_certificates() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pki = loopback(dir.path()).unwrap();
        for stem in ["cloud", "vigil", "subscriber", "device"] {
            let mode = std::fs::metadata(pki.path(&format!("{stem}.key")))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{stem}.key is private");
            assert!(crate::pem::load_certs(&pki.path(&format!("{stem}.pem")), "test").is_ok());
            assert!(crate::pem::load_key(&pki.path(&format!("{stem}.key")), "test").is_ok());
        }
        assert!(crate::pem::load_roots(&pki.path("ca.pem"), "test").is_ok());
    }
}
