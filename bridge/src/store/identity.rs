//! The store's identity file: `<data dir>/identity.json`.
//!
//! Written once, atomically, when the store is created, and only read after. It
//! holds the random store id (the HKDF salt) and the key-check value, so a wrong
//! master key is refused *before* fjall opens: nothing on disk changes.
//!
//! ```json
//! {"format":1,"store_id":"0193…","key_check":"<base64 of 32 bytes>","created_at":"2026-11-22T10:00:00Z"}
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;
use crate::crypto::{self, MasterKey};
use crate::event::Timestamp;

/// File name of the identity file inside the data directory.
pub const FILE_NAME: &str = "identity.json";
const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    format: u32,
    store_id: Uuid,
    key_check: String,
    created_at: String,
}

/// A store's identity, after the master key has been checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The random store id.
    pub store_id: [u8; 16],
}

/// Path of the identity file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads the identity in `dir` and checks `master` against it.
pub fn load(dir: &Path, master: &MasterKey) -> Result<Identity, StoreError> {
    let file = path(dir);
    let bad = |why: String| StoreError::Identity {
        path: file.clone(),
        why,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let parsed: IdentityFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("it is not valid: {e}")))?;
    if parsed.format != FORMAT {
        return Err(bad(format!(
            "identity format {} is not known to this build (it reads {FORMAT})",
            parsed.format
        )));
    }
    let stored: [u8; 32] = BASE64
        .decode(&parsed.key_check)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| bad("its key_check is not 32 bytes of base64".into()))?;
    let store_id = *parsed.store_id.as_bytes();
    if !crypto::key_check_matches(&stored, &crypto::key_check_value(master, &store_id)) {
        return Err(StoreError::WrongKey { dir: dir.into() });
    }
    Ok(Identity { store_id })
}

/// Creates a new identity in `dir` (which must exist): temp file, fsync, rename,
/// fsync of the directory, so a crash leaves either no identity or a whole one.
pub fn create(dir: &Path, master: &MasterKey) -> Result<Identity, StoreError> {
    let store_id = *Uuid::new_v4().as_bytes();
    let body = IdentityFile {
        format: FORMAT,
        store_id: Uuid::from_bytes(store_id),
        key_check: BASE64.encode(crypto::key_check_value(master, &store_id)),
        created_at: Timestamp::now().to_rfc3339(),
    };
    let file = path(dir);
    let io = |source| StoreError::Io {
        path: file.clone(),
        source,
    };
    let text = serde_json::to_string(&body).map_err(|e| StoreError::Identity {
        path: file.clone(),
        why: format!("cannot encode it: {e}"),
    })?;
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &file).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(Identity { store_id })
}
