//! The uplink's MQTT login: `forward.username` and the password in
//! `forward.password_file`, read again before every connection attempt (like
//! the certificates, [`super::tls`]), so a rotated password is picked up
//! without a restart.
//!
//! The password is a secret of the same rank as the TLS key: its file must not
//! be readable by group or others, it is never written to the log, and
//! [`Login`]'s `Debug` form leaves it out.

use std::path::{Path, PathBuf};

use super::config::ForwardConfig;

/// The longest password MQTT can carry (a 16-bit length).
const MAX_PASSWORD_BYTES: u64 = 65_535;

/// A password file that cannot be used; nothing is sent and the connection
/// attempt fails with this (messages stay in the store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("forward.password_file ({path}): {reason}")]
pub struct LoginError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl LoginError {
    fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// What CONNECT carries: a user name and, when a file names one, a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// `forward.username`.
    pub username: String,
    /// The password file's content (empty when no file is set: rumqttc then
    /// sends no password).
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    "none"
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

/// The login for the next connection attempt: `None` without
/// `forward.username`. The password file is checked as a private key is (its
/// mode) and must hold 1 to 65,535 bytes of UTF-8 once one trailing line
/// break (`\n` or `\r\n`) is removed.
pub fn load(config: &ForwardConfig) -> Result<Option<Login>, LoginError> {
    let Some(username) = &config.username else {
        return Ok(None);
    };
    let password = match &config.password_file {
        Some(path) => read_password(path)?,
        None => String::new(),
    };
    Ok(Some(Login {
        username: username.clone(),
        password,
    }))
}

fn read_password(path: &Path) -> Result<String, LoginError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let file = std::fs::File::open(path)
        .map_err(|e| LoginError::new(path, format!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| LoginError::new(path, format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(LoginError::new(
            path,
            format!(
                "the password file is readable by group or others (mode {:o}); run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        ));
    }
    if !meta.is_file() {
        return Err(LoginError::new(
            path,
            "not a regular file: point forward.password_file at the file holding the password",
        ));
    }
    // Read one byte past the limit (and the line break), so a huge file is
    // refused without being read whole.
    let mut bytes = Vec::new();
    file.take(MAX_PASSWORD_BYTES + 3)
        .read_to_end(&mut bytes)
        .map_err(|e| LoginError::new(path, format!("cannot read: {e}")))?;
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.is_empty() {
        return Err(LoginError::new(
            path,
            "the password file is empty: write the password in it, or remove \
             forward.password_file to connect with the user name alone",
        ));
    }
    if bytes.len() as u64 > MAX_PASSWORD_BYTES {
        return Err(LoginError::new(
            path,
            format!(
                "longer than MQTT allows ({MAX_PASSWORD_BYTES} bytes): is this the right file?"
            ),
        ));
    }
    // The bytes are not quoted back: they are the secret.
    String::from_utf8(bytes).map_err(|_| {
        LoginError::new(
            path,
            "the password is not UTF-8 text (the MQTT client sends text): write it as text",
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn config(dir: &Path, content: Option<&[u8]>, mode: u32) -> ForwardConfig {
        let path = dir.join("cloud.pass");
        if let Some(c) = content {
            std::fs::write(&path, c).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        ForwardConfig {
            username: Some("ward-3".into()),
            password_file: Some(path),
            ..ForwardConfig::default()
        }
    }

    #[test]
    fn the_password_is_the_file_without_its_final_line_break() {
        let dir = tempfile::tempdir().unwrap();
        for (content, want) in [
            (&b"s3cret\n"[..], "s3cret"),
            (b"s3cret\r\n", "s3cret"),
            (b"s3cret", "s3cret"),
            (b"two\nlines\n", "two\nlines"),
            (b" spaced \n\n", " spaced \n"),
        ] {
            let login = load(&config(dir.path(), Some(content), 0o600))
                .unwrap()
                .unwrap();
            assert_eq!(login.username, "ward-3");
            assert_eq!(login.password, want, "{content:?}");
        }
        // A user name alone: no password.
        let name_only = ForwardConfig {
            username: Some("ward-3".into()),
            ..ForwardConfig::default()
        };
        assert_eq!(load(&name_only).unwrap().unwrap().password, "");
        assert_eq!(load(&ForwardConfig::default()).unwrap(), None);
    }

    #[test]
    fn unusable_password_files_are_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(Option<&[u8]>, u32, &str); 6] = [
            (Some(b"s3cret\n"), 0o640, "chmod 600"),
            (Some(b"s3cret\n"), 0o604, "chmod 600"),
            (Some(b"\n"), 0o600, "is empty"),
            (Some(&[0xff, 0xfe, b'x']), 0o600, "not UTF-8"),
            (Some(&[b'x'; 65_536]), 0o600, "longer than MQTT allows"),
            (None, 0o600, "cannot read"),
        ];
        for (i, (content, mode, needle)) in cases.into_iter().enumerate() {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            let err = load(&config(&sub, content, mode)).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("forward.password_file (") && text.contains(needle),
                "{text}"
            );
            assert!(!text.contains("s3cret"), "the secret leaked: {text}");
        }
        // A directory is not a password file.
        let as_dir = ForwardConfig {
            username: Some("ward-3".into()),
            password_file: Some(dir.path().to_path_buf()),
            ..ForwardConfig::default()
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = load(&as_dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // The longest password MQTT carries is accepted.
        let max = dir.path().join("max");
        std::fs::create_dir(&max).unwrap();
        let long = load(&config(&max, Some(&[b'x'; 65_535]), 0o600)).unwrap();
        assert_eq!(long.unwrap().password.len(), 65_535);
    }

    #[test]
    fn the_debug_form_leaves_the_password_out() {
        let login = Login {
            username: "ward-3".into(),
            password: "s3cret".into(),
        };
        let shown = format!("{login:?}");
        assert!(
            shown.contains("ward-3") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
