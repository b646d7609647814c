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
    create_valid_for(dir, leaves, None)
}

/// Like [`create`], but when `days` is given the leaf certificates are valid
/// from yesterday until `days` days from today (UTC dates) instead of rcgen's
/// 1975 to 4096: for clock-fault tests. The CA keeps the long validity.
pub fn create_valid_for(
    dir: &Path,
    leaves: &[(&str, Role, &[&str])],
    days: Option<u32>,
) -> Result<DevPki, PkiError> {
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
        if let Some(days) = days {
            let today = days_since_epoch();
            let (y, m, d) = ymd(today - 1);
            p.not_before = rcgen::date_time_ymd(y, m, d);
            let (y, m, d) = ymd(today + i64::from(days));
            p.not_after = rcgen::date_time_ymd(y, m, d);
        }
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

/// Days since 1970-01-01, UTC, by the system clock.
fn days_since_epoch() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs / 86_400).unwrap_or(0)
}

/// The UTC date `days` after 1970-01-01 (Howard Hinnant's civil-from-days).
fn ymd(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        i32::try_from(year).unwrap_or(1970),
        u8::try_from(month).unwrap_or(1),
        u8::try_from(day).unwrap_or(1),
    )
}

/// The set a loopback scenario uses: `cloud` (server for localhost and
/// 127.0.0.1), `vigil`, `subscriber` and `device` (clients).
pub fn loopback(dir: &Path) -> Result<DevPki, PkiError> {
    loopback_valid_for(dir, None)
}

/// [`loopback`] with leaf certificates valid for `days` from today (see
/// [`create_valid_for`]).
pub fn loopback_valid_for(dir: &Path, days: Option<u32>) -> Result<DevPki, PkiError> {
    create_valid_for(
        dir,
        &[
            ("cloud", Role::Server, &["localhost", "127.0.0.1"]),
            ("vigil", Role::Client, &["vigil"]),
            ("subscriber", Role::Client, &["subscriber"]),
            ("device", Role::Client, &["device"]),
        ],
        days,
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
    #[test]
    fn civil_dates() {
        let d = super::ymd;
        assert_eq!(d(0), (1970, 1, 1));
        assert_eq!(d(59), (1970, 3, 1));
        assert_eq!(d(11_016), (2000, 2, 29));
        assert_eq!(d(20_786), (2026, 11, 29));
    }

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
