//! Loading the master key.
//!
//! The master key is 32 random bytes, written as base64. It comes from exactly
//! one place:
//!
//! * the environment variable [`ENV_VAR`] (`VIGIL_STORAGE_KEY`), or
//! * a key file that only its owner can read (mode `0600` or stricter), or
//! * in `vigil demo` only, an ephemeral key made at start-up
//!   ([`KeySource::Ephemeral`]); the demo says so, and its data cannot be read
//!   after it exits.
//!
//! There is no built-in default key. Make one with
//! `head -c 32 /dev/urandom | base64 > vigil.key && chmod 600 vigil.key`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

/// The environment variable that carries the base64 master key.
pub const ENV_VAR: &str = "VIGIL_STORAGE_KEY";

/// Errors while loading the master key. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither the environment variable nor a key file was given.
    #[error(
        "no storage key: set {ENV_VAR} to 32 random bytes in base64, or set store.key_file to a file holding them \
         (make one with `head -c 32 /dev/urandom | base64 > vigil.key && chmod 600 vigil.key`)"
    )]
    Missing,
    /// Both the environment variable and a key file were given; Vigil refuses to guess.
    #[error(
        "both {ENV_VAR} and the key file {path} are set: keep exactly one so it is clear which key protects the store"
    )]
    Ambiguous {
        /// The configured key file.
        path: PathBuf,
    },
    /// The key text is not valid base64.
    #[error("the storage key from {origin} is not valid base64: {source}")]
    NotBase64 {
        /// Where the key came from.
        origin: String,
        /// The decoder's complaint.
        source: base64::DecodeError,
    },
    /// The key decodes to the wrong number of bytes.
    #[error(
        "the storage key from {origin} is {found} bytes; it must be exactly 32 bytes (44 base64 characters)"
    )]
    WrongLength {
        /// Where the key came from.
        origin: String,
        /// How many bytes it decoded to.
        found: usize,
    },
    /// The key file cannot be read.
    #[error("cannot read the storage key file {path}: {source}")]
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file can be read by its group or by others.
    #[error(
        "the storage key file {path} has mode {mode:o}, readable by group or others: run `chmod 600 {path}`"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The system random source failed while making an ephemeral key.
    #[error("the system random source failed while making an ephemeral key: {0}")]
    Random(String),
}

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// [`ENV_VAR`] if set, otherwise the key file if one is configured.
    Configured {
        /// The key file from configuration, if any.
        key_file: Option<PathBuf>,
    },
    /// A fresh random key that lives only as long as the process (`vigil demo`).
    Ephemeral,
}

/// The operator's 32-byte secret. Zeroed on drop; never printed.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Wraps raw key bytes (tests and benchmarks).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// Makes a random key (demo mode).
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self { bytes })
    }

    /// Loads the key from `source`, reading the environment through `env`.
    ///
    /// Returns the key and a description of where it came from, for the start-up
    /// log line (the description never contains key material).
    pub fn load(
        source: &KeySource,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, String), KeyError> {
        match source {
            KeySource::Ephemeral => Ok((Self::generate()?, "an ephemeral demo key".into())),
            KeySource::Configured { key_file } => match (env(ENV_VAR), key_file) {
                (Some(_), Some(path)) => Err(KeyError::Ambiguous { path: path.clone() }),
                (Some(text), None) => {
                    let origin = format!("the environment variable {ENV_VAR}");
                    Ok((Self::parse(&text, &origin)?, origin))
                }
                (None, Some(path)) => {
                    let origin = format!("the key file {}", path.display());
                    Ok((Self::from_file(path)?, origin))
                }
                (None, None) => Err(KeyError::Missing),
            },
        }
    }

    /// Reads a key file, refusing one that group or others can read.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let unreadable = |source| KeyError::Unreadable {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(unreadable)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(unreadable)?);
        Self::parse(&text, &format!("the key file {}", path.display()))
    }

    /// Parses base64 key text.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyError> {
        let decoded =
            Zeroizing::new(
                BASE64
                    .decode(text.trim())
                    .map_err(|source| KeyError::NotBase64 {
                        origin: origin.to_string(),
                        source,
                    })?,
            );
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength {
                origin: origin.to_string(),
                found: decoded.len(),
            })?;
        Ok(Self::from_bytes(bytes))
    }

    /// The key as base64, for `vigil demo` to hand the same key to a child process.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(self.bytes.as_ref()))
    }

    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    const GOOD: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn env_key_is_parsed() {
        let src = KeySource::Configured { key_file: None };
        let (key, origin) = MasterKey::load(&src, |_| Some(GOOD.into())).unwrap();
        assert_eq!(key.expose()[31], 31);
        assert!(origin.contains(ENV_VAR));
    }

    #[test]
    fn missing_short_and_garbled_keys_are_refused_with_the_fix() {
        let src = KeySource::Configured { key_file: None };
        let err = MasterKey::load(&src, no_env).unwrap_err();
        assert!(err.to_string().contains("head -c 32 /dev/urandom"), "{err}");
        let err = MasterKey::load(&src, |_| Some("AAEC".into())).unwrap_err();
        assert!(
            matches!(err, KeyError::WrongLength { found: 3, .. }),
            "{err}"
        );
        let err = MasterKey::load(&src, |_| Some("not base64!".into())).unwrap_err();
        assert!(matches!(err, KeyError::NotBase64 { .. }), "{err}");
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vigil.key");
        std::fs::write(&path, format!("{GOOD}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let src = KeySource::Configured {
            key_file: Some(path.clone()),
        };
        let err = MasterKey::load(&src, no_env).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (key, _) = MasterKey::load(&src, no_env).unwrap();
        assert_eq!(key.expose()[1], 1);

        let err = MasterKey::load(&src, |_| Some(GOOD.into())).unwrap_err();
        assert!(matches!(err, KeyError::Ambiguous { .. }), "{err}");
    }

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let key = MasterKey::from_bytes([0xAB; 32]);
        assert_eq!(format!("{key:?}"), "MasterKey(<redacted>)");
    }
}
