//! Salvaging the tables fjall set aside as it opened the store.
//!
//! # Why
//!
//! fjall opens every table of every keyspace when it opens the database: it
//! reads each table's trailer, table of contents and metadata block, and
//! for the first levels its index and filter blocks. One flipped bit in any
//! of them (a few percent of a table's bytes; most of a small `meta` table)
//! made that open fail, and with it Vigil: it could not start on its store at
//! all, and every message in it waited for someone to repair the files.
//!
//! # What this does
//!
//! The vendored fjall and lsm-tree (`vendor/lsm-tree/VIGIL-PATCH.md`) now
//! move such a table into its keyspace's `damaged` folder, write the tree's
//! version without it, and open. Its data blocks are usually intact: they lie
//! at the start of the file, each with its own header and checksum.
//! [`salvage`] reads them in order without the index and writes each entry
//! back, unless the keyspace holds a newer entry for its key: a record under
//! its own key with the very bytes it had (same seq, same sealed value,
//! same place in its lane: nothing reordered, nothing resent), a deletion
//! (an acknowledgement) as a deletion. Salvaged entries are committed with an
//! fsync before the file is removed, so a crash in between salvages it again
//! (the same decisions; writing a record back twice is harmless).
//!
//! This runs at open, before anything else reads or writes the keyspace, so
//! "newer" is a comparison of the seqnos fjall gave the entries when they
//! were written. A stretch of data blocks that does not read either (a
//! second damage in the same table) is lost: its records cannot be named, so
//! one quarantine entry says so, the areas are counted again and the file is
//! kept (`<id>.unreadable`) for whoever examines the disk. In `meta` (the
//! epoch, the seq counter, the device counters) such a loss stops the open
//! instead ([`StoreError::MetaTableLost`]): a guessed counter could repeat a
//! nonce.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fjall::salvage::{DAMAGED_FOLDER, Found, InternalValue, ValueType};
use fjall::{AbstractTree as _, AnyTree, Database, Keyspace, PersistMode, SeqNo, Slice};

use super::record::QuarantineEntry;
use super::{Shared, StoreError, StoreStats};
use crate::event::Timestamp;

/// Entries written back per commit (each commit is fsynced).
const BATCH: usize = 4096;

/// What the salvage of one table set aside found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Salvaged {
    /// The keyspace it belonged to.
    pub(super) keyspace: String,
    /// The table file (removed once salvaged whole; kept otherwise, renamed
    /// `<id>.unreadable`).
    pub(super) file: PathBuf,
    /// Entries written back (records and deletions).
    pub(super) written: u64,
    /// Entries the keyspace already held something newer for.
    pub(super) superseded: u64,
    /// Stretches of data blocks that did not read (their entries are lost).
    pub(super) unreadable: u64,
}

/// Salvages every table fjall set aside in `ks` (named `name`) as it opened,
/// oldest table id first, and returns what each gave. Must run before
/// anything else writes to `ks` in this open.
pub(super) fn salvage(
    db: &Database,
    ks: &Keyspace,
    name: &str,
    dir: &Path,
) -> Result<Vec<Salvaged>, StoreError> {
    let folder = ks.tree.tree_config().path.join(DAMAGED_FOLDER);
    let io = |source| StoreError::Io {
        path: folder.clone(),
        source,
    };
    let mut pending = Vec::new();
    match std::fs::read_dir(&folder) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(io)?;
                // Tables already salvaged in part are named `<id>.unreadable`.
                if let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    pending.push((id, entry.path()));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    }
    pending.sort();
    let AnyTree::Standard(tree) = &ks.tree else {
        return Err(StoreError::Options(format!(
            "keyspace {name} is not a standard tree; its damaged tables cannot be salvaged"
        )));
    };
    let engine = |e: fjall::LsmError| StoreError::engine(dir, fjall::Error::from(e));
    // The original seqno of each key written back so far: a later (older or
    // newer) entry for the same key in another set-aside table is compared
    // with it, not with the seqno the write-back got.
    let mut written_back: HashMap<Slice, SeqNo> = HashMap::new();
    let mut out = Vec::new();
    for (id, file) in pending {
        let mut found = Salvaged {
            keyspace: name.to_string(),
            file: file.clone(),
            written: 0,
            superseded: 0,
            unreadable: 0,
        };
        let mut batch = Vec::with_capacity(BATCH);
        let mut failed = None;
        let read = fjall::salvage::salvage(&file, |found_here| {
            // Stretches that do not read are counted by the salvage itself.
            let Found::Item(item) = found_here else {
                return Ok(());
            };
            let key = item.key.user_key.clone();
            let seqno = item.key.seqno;
            let newer = match written_back.get(&key) {
                Some(&s) => s >= seqno,
                None => tree
                    .newest_entry(&key, None)?
                    .is_some_and(|e| e.key.seqno >= seqno),
            };
            if newer {
                found.superseded += 1;
                return Ok(());
            }
            written_back.insert(key, seqno);
            found.written += 1;
            batch.push(item);
            if batch.len() >= BATCH
                && let Err(e) = write_back(db, ks, &mut batch)
            {
                failed = Some(e);
                return Err(fjall::LsmError::Unrecoverable);
            }
            Ok(())
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let read = read.map_err(engine)?;
        write_back(db, ks, &mut batch)?;
        found.unreadable = read.unreadable;
        if found.unreadable == 0 {
            std::fs::remove_file(&file).map_err(|source| StoreError::Io {
                path: file.clone(),
                source,
            })?;
        } else {
            let kept = file.with_file_name(format!("{id}.unreadable"));
            std::fs::rename(&file, &kept).map_err(|source| StoreError::Io {
                path: file.clone(),
                source,
            })?;
            found.file = kept;
        }
        fsync_dir(&folder).map_err(io)?;
        out.push(found);
    }
    Ok(out)
}

/// Commits `items` (values written back, tombstones as deletions) with an
/// fsync, and empties it.
fn write_back(
    db: &Database,
    ks: &Keyspace,
    items: &mut Vec<InternalValue>,
) -> Result<(), StoreError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut wb = db.batch().durability(Some(PersistMode::SyncAll));
    for item in items.drain(..) {
        match item.key.value_type {
            ValueType::Value => wb.insert(ks, item.key.user_key, item.value),
            ValueType::Tombstone | ValueType::WeakTombstone => wb.remove(ks, item.key.user_key),
            // A value stored apart from its table (key-value separation):
            // Vigil's keyspaces never do that.
            ValueType::Indirection => continue,
        }
    }
    wb.commit()
        .map_err(|e| StoreError::Persist(format!("{e:?}")))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// After the salvage of lanes, dead-letter and quarantine: one quarantine
/// entry per table that lost stretches, every area counted again and the
/// state persisted. Nothing to do when every table was salvaged whole.
pub(super) fn settle(
    shared: &Shared,
    state: &mut StoreStats,
    found: &[Salvaged],
) -> Result<(), StoreError> {
    let entries: Vec<QuarantineEntry> = found
        .iter()
        .filter(|s| s.unreadable > 0)
        .map(|s| QuarantineEntry {
            keyspace: s.keyspace.clone(),
            seq: 0,
            reason: format!(
                "lost: {} stretch(es) of the damaged table {} could not be read; the records \
                 they held are not known ({} entries were salvaged)",
                s.unreadable,
                s.file.display(),
                s.written
            ),
            quarantined_at: Timestamp::now(),
            raw: Vec::new(),
        })
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let wb = shared.db.batch().durability(Some(PersistMode::SyncAll));
    super::journal::record_losses(shared, state, wb, &entries)
}
