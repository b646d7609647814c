//! Disk space: the free-space reserve that keeps a full file system from
//! becoming a failed write, and the reclaimer that gives space back after a
//! drain.
//!
//! An LSM store cannot take a write error lightly: once a journal write or
//! fsync fails, fjall (and Vigil) cannot tell what reached the disk, so such
//! an error is fatal. Running out of space must therefore never get that far.
//! Before each batch the writer reads the file system's free space
//! (`statvfs`); an append that would leave less than `store.min_free_bytes`
//! is refused like an append to a store full of alarms (MQTT 5 PUBACK 0x97,
//! MQTT 3.1.1 no PUBACK and a disconnect): the device keeps the reading and
//! resends. The reserve is what deletes (tombstones), memtable flushes and
//! compactions need to give space back.
//!
//! Deleting records frees no space by itself: the journal holds them until
//! their memtables are flushed, and tables hold them until compaction. The
//! [`Reclaimer`] (its own thread, so the writer never waits for it) flushes
//! every keyspace's memtable, which lets fjall retire the journals, waits for
//! fjall's own compactions, compacts the lanes, dropping what the cloud
//! acknowledged, and then has fjall delete the replaced table files
//! ([`release_old_tables`]: fjall deletes them only at a later flush, and
//! after a drain there may be none). The writer asks
//! for it when the disk is low and the backlog has shrunk to half the reserve
//! (a flush and a compaction rewrite what is still live before old files go,
//! so they must fit in the reserve), and when the lanes have drained after a
//! large backlog.
//!
//! The reserve must also cover what fjall keeps regardless: its journal is
//! one file that fjall 3 rotates (and can then delete) only once a flush
//! finds it past 64 MB, and a full memtable (8 MiB per lane) is written as a
//! table before its journal can go. Hence the default of 128 MiB. After a
//! drain the journal can hold up to 64 MB of records that are all flushed or
//! deleted, and with devices refused nothing would push it past 64 MB: when
//! the disk stays low after a reclaim, the reclaimer pads the journal past
//! that mark so fjall rotates it and gives its space back
//! ([`rotate_journal`]); padding left behind by a stop in the middle of that
//! is deleted at the next open ([`remove_leftover_padding`]).

use std::path::Path;
use std::sync::{Arc, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Shared;

/// Bytes available to Vigil (not to root) on the file system holding `dir`,
/// or `None` when the file system cannot say.
pub(super) fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    st.f_bavail.checked_mul(st.f_frsize)
}

/// After a reclaim asked for because the disk is low, how many more it does
/// on its own, [`FOLLOW_UP_INTERVAL`] apart, while the disk stays low. fjall
/// keeps what a deletion removed while any older read is open and moves that
/// bound on lazily, so one compaction right after a drain can give back less
/// than was deleted; and once the drain is over nothing may reach the writer
/// (devices are being refused) to ask again.
const FOLLOW_UPS: u32 = 5;
const FOLLOW_UP_INTERVAL: Duration = Duration::from_secs(2);

/// Flushes and compacts on request, on its own thread.
pub(super) struct Reclaimer {
    /// `Some(min_free)`: the disk is low; follow up while free space stays
    /// below `min_free`.
    tx: Option<mpsc::SyncSender<Option<u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl Reclaimer {
    /// Starts the thread. It holds the store weakly, so it never keeps a
    /// closed store open.
    pub(super) fn start(shared: Weak<Shared>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Option<u64>>(1);
        let thread = std::thread::Builder::new()
            .name("vigil-reclaim".into())
            .spawn(move || {
                while let Ok(mut low) = rx.recv() {
                    let mut follow_ups = FOLLOW_UPS;
                    loop {
                        let Some(shared) = shared.upgrade() else {
                            return;
                        };
                        reclaim(&shared, low);
                        let still_low = low.is_some_and(|min_free| {
                            free_bytes(&shared.dir).is_some_and(|f| f < min_free)
                        });
                        drop(shared);
                        if !still_low || follow_ups == 0 {
                            break;
                        }
                        follow_ups -= 1;
                        match rx.recv_timeout(FOLLOW_UP_INTERVAL) {
                            // A new request while following up is merged in.
                            Ok(next) => low = next.or(low),
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            });
        match thread {
            Ok(thread) => Self {
                tx: Some(tx),
                thread: Some(thread),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no thread for reclaiming disk space; space comes back only as fjall compacts by itself");
                Self {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    /// Asks for a reclaim; a request while one is pending is merged into it.
    /// `low`: `Some(min_free)` when the disk is low (see [`FOLLOW_UPS`]).
    pub(super) fn request(&self, low: Option<u64>) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(low);
        }
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Flushes every memtable (so the journals can go), waits for fjall's own
/// compactions, compacts the lanes and has fjall delete the tables that
/// compaction replaced; when the disk stays below `low` after that, has fjall
/// rotate its journal if that gives back more than it costs
/// ([`rotate_journal`]).
fn reclaim(shared: &Arc<Shared>, low: Option<u64>) {
    let started = Instant::now();
    let before = shared.db.disk_space().unwrap_or(0);
    if !flush_all(shared) {
        return;
    }
    settle_compactions(shared);
    for ks in &shared.lanes {
        if let Err(e) = ks.major_compact() {
            tracing::warn!(keyspace = %ks.name(), error = %e, "could not compact a lane to reclaim space");
            return;
        }
    }
    release_old_tables(shared);
    let mut rotated = false;
    if let Some(low) = low
        && free_bytes(&shared.dir).is_some_and(|f| f < low)
    {
        rotated = rotate_journal(shared);
    }
    let after = shared.db.disk_space().unwrap_or(0);
    shared
        .metrics
        .reclaims
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        before_bytes = before,
        after_bytes = after,
        journal_rotated = rotated,
        free_bytes = free_bytes(&shared.dir).unwrap_or(0),
        took = ?started.elapsed(),
        "reclaimed disk space (flushed memtables, compacted lanes)"
    );
}

/// Flushes every keyspace's memtable; false (logged) if one cannot be.
fn flush_all(shared: &Shared) -> bool {
    let all = shared
        .lanes
        .iter()
        .chain([&shared.dead_letter, &shared.quarantine, &shared.meta]);
    for ks in all {
        if let Err(e) = ks.rotate_memtable_and_wait() {
            tracing::warn!(keyspace = %ks.name(), error = %e, "could not flush a memtable to reclaim space");
            return false;
        }
    }
    true
}

/// fjall 3.1 rotates its journal (after which the old file is deleted once
/// every memtable it covers is flushed) only when a memtable flush finds the
/// journal past this many bytes (`worker_pool.rs`). Each journal file is
/// sized to 64 MiB up front, sparse, so what it holds on disk is what was
/// written to it.
const JOURNAL_ROTATES_AT: u64 = 64_000_000;
/// Padding written to push the journal past [`JOURNAL_ROTATES_AT`], in
/// values of this size, under [`PAD_PREFIX`] in `meta`.
const PAD_VALUE: usize = 256 << 10;
const PAD_PREFIX: &[u8] = b"reclaim-pad/";
/// Free space the padding must leave (the padded memtable's flush, version
/// files).
const PAD_MARGIN: u64 = 16 << 20;

/// Has fjall rotate its active journal, when that gives back more than it
/// costs. Returns whether it did.
///
/// After a drain the flushed memtables leave the active journal holding
/// records that are all in tables (or deleted) already, up to 64 MB of them,
/// and fjall rotates it only when a later flush finds it past 64 MB: that
/// takes new writes, but while the disk is below the reserve the writer
/// refuses them, so the space never came back (on a small disk the store
/// could stay empty and refusing for good). Writing `64 MB - journal` of
/// padding to `meta` and flushing it makes the flush rotate the journal; the
/// padding is deleted again, flushed, and `meta` compacted, and the old
/// journal, padding included, goes once every memtable is flushed.
///
/// Done only when the journal holds at least as much as the padding costs
/// and the padding fits in the free space with [`PAD_MARGIN`] to spare.
fn rotate_journal(shared: &Shared) -> bool {
    let Some(journal) = active_journal_bytes(&shared.dir.join("db")) else {
        return false;
    };
    let pad = JOURNAL_ROTATES_AT.saturating_sub(journal) + PAD_VALUE as u64;
    let free = free_bytes(&shared.dir).unwrap_or(0);
    if journal < pad || free < pad.saturating_add(PAD_MARGIN) {
        return false;
    }
    let values = usize::try_from(pad.div_ceil(PAD_VALUE as u64)).unwrap_or(usize::MAX);
    let key = |i: usize| [PAD_PREFIX, &(i as u64).to_be_bytes()].concat();
    let zeros = vec![0u8; PAD_VALUE];
    let write = |insert: bool| {
        let mut wb = shared
            .db
            .batch()
            .durability(Some(fjall::PersistMode::Buffer));
        for i in 0..values {
            if insert {
                wb.insert(&shared.meta, key(i), zeros.as_slice());
            } else {
                wb.remove(&shared.meta, key(i));
            }
        }
        wb.commit()
    };
    let rotated = write(true)
        .and_then(|()| write(false))
        .map(|()| flush_all(shared))
        .and_then(|flushed| shared.meta.major_compact().map(|()| flushed));
    match rotated {
        Ok(flushed) => {
            let now = active_journal_bytes(&shared.dir.join("db")).unwrap_or(0);
            tracing::info!(
                journal_bytes = journal,
                padding_bytes = pad,
                journal_bytes_now = now,
                "rotated fjall's journal to give back what it held after the drain"
            );
            flushed
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not rotate fjall's journal to reclaim space");
            false
        }
    }
}

/// Deletes journal padding a reclaim left in `meta` when Vigil stopped
/// between writing it and deleting it (a crash or a power cut in
/// [`rotate_journal`]); otherwise those keys, up to 32 MB, would stay for
/// good. Run at open; fsynced when it deletes anything. Returns how many
/// padding values it deleted.
pub(super) fn remove_leftover_padding(
    db: &fjall::Database,
    meta: &fjall::Keyspace,
) -> Result<usize, fjall::Error> {
    let mut wb = db.batch().durability(Some(fjall::PersistMode::SyncData));
    let mut found = 0;
    for guard in meta.prefix(PAD_PREFIX) {
        wb.remove(meta, guard.key()?);
        found += 1;
    }
    if found > 0 {
        wb.commit()?;
        tracing::info!(
            values = found,
            bytes = found * PAD_VALUE,
            "deleted journal padding a reclaim left behind when Vigil stopped during it"
        );
    }
    Ok(found)
}

/// Bytes the newest journal file (`<id>.jnl`, the one being written) takes
/// on disk, by its allocated blocks.
fn active_journal_bytes(db_dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let newest = std::fs::read_dir(db_dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_suffix(".jnl")?.parse::<u64>().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id)?;
    let meta = std::fs::metadata(newest.1).ok()?;
    Some(meta.blocks().saturating_mul(512))
}

/// How long a reclaim waits for fjall's own compactions to finish.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Waits (at most [`SETTLE_LIMIT`]) until fjall runs no compaction of its own.
/// Every flush sets its workers compacting, and a major compaction finding any
/// table of the tree taken by one does nothing at all (lsm-tree 3.1
/// `compaction/major.rs`): right after [`flush_all`] it would give back
/// nothing, and the deleted records stay on disk until a later reclaim.
fn settle_compactions(shared: &Shared) {
    let started = Instant::now();
    while shared.db.active_compactions() > 0 && started.elapsed() < SETTLE_LIMIT {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Written to `meta` so that [`release_old_tables`] has a memtable to flush.
const MARK_KEY: &[u8] = b"reclaim-mark";

/// Has fjall delete the table files a compaction replaced. fjall keeps the
/// tree's old versions (and with them the replaced tables' files) until a
/// version-history cleanup finds them older than every open read, and runs
/// that cleanup when a memtable is flushed. After a drain nothing is written,
/// so the lanes' old tables stayed on disk, up to the whole backlog. A small
/// mark written to `meta` and flushed runs the cleanup for every keyspace.
fn release_old_tables(shared: &Shared) {
    let stamp = crate::event::Timestamp::now().0.to_be_bytes();
    let done = shared
        .meta
        .insert(MARK_KEY, stamp.as_slice())
        .and_then(|()| shared.meta.rotate_memtable_and_wait());
    if let Err(e) = done {
        tracing::warn!(error = %e, "could not have fjall delete the tables a compaction replaced");
    }
}
