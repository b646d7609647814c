//! The durable, encrypted queue between the gate and the forwarder.
//!
//! # The contract this module keeps
//!
//! * [`Store::append`] completes only after the event is sealed and on disk
//!   (fjall batch persisted with `PersistMode::SyncData`). The gate releases a
//!   device's PUBACK only then.
//! * A record leaves a priority lane only by [`Store::ack`] (the cloud's PUBACK),
//!   by a dead-letter move, by quarantine, or by an eviction that is counted,
//!   logged and reported as a gap notice. Nothing else deletes.
//! * A failed persist is fatal: the store poisons itself, every pending and later
//!   write fails, and [`Store::fatal`] says why. The daemon exits non-zero and
//!   recovery runs on the next start.
//!
//! # Layout on disk
//!
//! ```text
//! <dir>/identity.json        store id + key-check value (identity.rs), written once
//! <dir>/db/                  one fjall database:
//!     priority-0 .. priority-N-1   queued events, key = store seq (u64 BE)
//!     dead-letter                  DeadLetterEntry, key = a fresh store seq
//!     quarantine                   QuarantineEntry (cleartext wrapper of the bad bytes)
//!     meta                         "epoch"         u32 BE, bumped + fsynced at every open
//!                                  "state"         postcard(PersistedState): next seq, backlog
//!                                                  figures and cursor per lane, counters
//!                                  "dev/<client>"  last device seq given to that client
//!                                  "gap/<p>/<client>"  the open gap record (see Eviction)
//! ```
//!
//! Values are sealed as described in [`record`]: AES-256-GCM under a per-store
//! key, nonce = boot epoch || seq, AAD = store id, keyspace, seq, format.
//! Every seal uses a fresh seq (a dead-letter move or requeue takes a new one),
//! so no (key, nonce) pair ever repeats.
//!
//! # Writes: one writer, group commit
//!
//! All mutations go through one bounded channel to one writer thread
//! (`writer.rs`). It takes the first command, then whatever else is already
//! queued, up to `max_batch` commands or `commit_interval` of gathering, applies
//! them to one fjall batch together with the updated `state` and device
//! counters, persists it, and only then completes each command. It never waits
//! for more work when the queue is empty, so a lone append costs one fsync and
//! no added latency, while many concurrent appends share one fsync.
//! Batches that hold only acks are written without an fsync: losing one in a
//! power cut means the message is sent again (a duplicate), never lost.
//!
//! # Reads: from the cursor, never from the head
//!
//! Each lane has a cursor: no live record in that lane has a smaller seq. After a
//! batch deletes from a lane the writer seeks once to find the new head (its seq
//! and `received_at`), from the cursor or, when the batch deleted the records
//! there, from just past that run, so reads, the backlog figures and the seek
//! itself never step over the tombstones that acked records leave behind.
//!
//! A reader that has caught up is answered from memory: after each commit the
//! writer hands the lane records of the batch to `recent` (the last 256 of
//! each lane at most), which answers a read when it holds every record after
//! the reader's position. Otherwise the read scans the disk.
//!
//! # Capacity and eviction
//!
//! `quota_bytes` bounds the bytes of all stored records (key + sealed value) in
//! the lanes, the dead-letter area and quarantine. An append that would exceed
//! it evicts the oldest records of the lowest-priority non-empty lane first,
//! among lanes whose priority is equal to or lower than the new message's and
//! never lane 0. If even evicting all of those could not make room, the append
//! is refused with [`StoreError::Full`] and nothing is evicted. Evictions free
//! `eviction_step_bytes` beyond what is needed, so a full store under steady
//! load does not evict (and fsync) once per message.
//!
//! Each eviction is counted per lane and recorded per (device, lane) as a gap:
//! the device-sequence range and count removed. A gap becomes a gap-notice event
//! in lane 0 (device [`crate::event::VIGIL_DEVICE`]). While that notice is not yet
//! acknowledged by the cloud, further evictions for the same (device, lane)
//! replace it with one whose range and count include the earlier ones, so
//! notices stay bounded by devices × lanes however long an outage lasts. Gap
//! notices may take lane 0 past the quota by their own size.
//!
//! The quota counts logical bytes; the file system can fill first (a small
//! disk, other programs). `space` keeps `min_free_bytes` free: an append
//! that would go below it is refused with [`StoreError::DiskLow`] (the device
//! keeps the reading), and space is reclaimed as the cloud acknowledges.
//!
//! # Corruption
//!
//! A value that fails to authenticate or decode is moved, as found, to
//! `quarantine` and counted. It is never forwarded, never deleted, and never
//! stops the queue. A table block fjall cannot read costs the records in it
//! (`scan`); a damaged batch in fjall's journal costs the records in it, not
//! the batches after it (`journal.rs`). Either way each lost record is counted
//! and quarantined, without its bytes when they cannot be read. A damaged
//! table is then taken out of its lane (`salvage`): fjall's compactions
//! cannot read it either, and would otherwise fail on it for ever. A table
//! fjall cannot open at all (its index, filter or metadata damaged) is set
//! aside by fjall and salvaged from its data blocks at open (`set_aside`),
//! and one whose index fails while running is taken out the same way.

#[cfg(any(test, feature = "ablation"))]
pub mod ablation;
mod identity;
mod journal;
mod recent;
pub mod record;
mod salvage;
mod scan;
mod set_aside;
mod space;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::crypto::{DataKey, MasterKey};
use crate::event::{Event, Ingest, Timestamp};
pub use record::{DeadLetterEntry, QuarantineEntry, RecordError};
pub use scan::ScannedLane;

/// The file that marks a directory as a Vigil store (written when a store is
/// first created).
pub const IDENTITY_FILE: &str = identity::FILE_NAME;

/// Figures kept in memory since the store was opened (not persisted, so they
/// start from zero after a restart, as Prometheus counters may): what the
/// metrics need beyond [`StoreStats`].
#[derive(Debug)]
pub struct StoreMetrics {
    /// Device messages committed, per priority.
    pub ingested: Vec<std::sync::atomic::AtomicU64>,
    /// Duration of each durable commit (the write batch and its fsync), in
    /// seconds: 100 µs to about 3 s in powers of two.
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Device messages refused because the disk was nearly full.
    pub refused_disk_low: std::sync::atomic::AtomicU64,
    /// Reclaims done (memtables flushed and lanes compacted to give space back).
    pub reclaims: std::sync::atomic::AtomicU64,
    /// Lane reads answered from disk (a blocking thread and a fjall scan)
    /// rather than from the records kept in memory: a caught-up forwarder
    /// makes none.
    pub lane_disk_reads: std::sync::atomic::AtomicU64,
    /// Damaged tables taken out of the lanes, dead-letter or quarantine
    /// (their readable records written again, the rest quarantined; see
    /// `salvage.rs`).
    pub damaged_tables_removed: std::sync::atomic::AtomicU64,
}

impl StoreMetrics {
    fn new(priorities: usize) -> Self {
        Self {
            ingested: (0..priorities)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            commit_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            refused_disk_low: std::sync::atomic::AtomicU64::new(0),
            reclaims: std::sync::atomic::AtomicU64::new(0),
            lane_disk_reads: std::sync::atomic::AtomicU64::new(0),
            damaged_tables_removed: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// The most priorities a store can have.
pub const MAX_PRIORITIES: u8 = 16;

/// Errors from the store. Each variant says when it happens.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store could not be created, read or written.
    #[error("store I/O on {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity file is unreadable or malformed.
    #[error("store identity file {path}: {why}")]
    Identity {
        /// The identity file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The database exists but its identity file does not: the store id (needed to
    /// derive the data key) is gone, so its records cannot be read.
    #[error(
        "the data directory {dir} holds a database but no identity.json: restore identity.json from a backup, \
         or move the directory aside to start an empty store (its records cannot be decrypted without it)"
    )]
    IdentityMissing {
        /// The data directory.
        dir: PathBuf,
    },
    /// The master key is not the one the store was created with.
    #[error(
        "the storage key does not match the key the store in {dir} was created with: start Vigil with the \
         original key (nothing was read or changed)"
    )]
    WrongKey {
        /// The data directory.
        dir: PathBuf,
    },
    /// Another process has the store open.
    #[error("the store in {dir} is in use by another process (is another Vigil running?)")]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// The storage engine failed while opening or reading.
    #[error("storage engine error: {0:?}")]
    Engine(fjall::Error),
    /// Persisting a batch failed (for example fsync returned EIO). Fatal: nothing
    /// in the batch was acknowledged and the store accepts no further writes.
    #[error("persisting to disk failed, the store is stopped (restart Vigil to recover): {0}")]
    Persist(String),
    /// An earlier persist failed; the store accepts no writes until restarted.
    #[error("the store stopped after an earlier disk failure (restart Vigil to recover): {0}")]
    Poisoned(String),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// The quota is full of records this append may not evict.
    #[error(
        "store full: a {needed}-byte priority-{priority} message does not fit in the {quota}-byte quota \
         ({used} used, {evictable} evictable at priority {priority} or lower)"
    )]
    Full {
        /// Priority of the refused message.
        priority: u8,
        /// Bytes the message needed.
        needed: u64,
        /// The configured quota.
        quota: u64,
        /// Bytes stored.
        used: u64,
        /// Bytes the message was allowed to evict.
        evictable: u64,
    },
    /// The file system holding the store has less free space than the
    /// reserve (`store.min_free_bytes`) would keep after this append. Nothing
    /// was written; the device keeps the message. Accepting resumes as the
    /// cloud acknowledges and space is reclaimed, or when space is freed.
    #[error(
        "disk nearly full: {free} bytes free on the file system of {dir}, and a {needed}-byte \
         message would leave less than the {reserve}-byte reserve (store.min_free_bytes); \
         new messages are refused until the cloud acknowledges the backlog or space is freed"
    )]
    DiskLow {
        /// The data directory.
        dir: PathBuf,
        /// Bytes free before this append (statvfs, minus this batch's writes).
        free: u64,
        /// Bytes the message needed.
        needed: u64,
        /// The configured reserve.
        reserve: u64,
    },
    /// A priority outside the configured range.
    #[error("priority {priority} is out of range: the store has priorities 0..={}", priorities - 1)]
    BadPriority {
        /// The priority asked for.
        priority: u8,
        /// How many priorities the store has.
        priorities: u8,
    },
    /// The configuration has fewer priorities than the store has data in.
    #[error(
        "the store holds {messages} messages at priority {priority}, but only {configured} priorities are configured: \
         raise store.priorities to at least {}", priority + 1
    )]
    PrioritiesShrunk {
        /// A lane beyond the configured count that still holds messages.
        priority: u8,
        /// Messages it holds.
        messages: u64,
        /// The configured count.
        configured: u8,
    },
    /// A bookkeeping value in the `meta` keyspace does not decode. Vigil stops
    /// rather than guess: a guessed counter could repeat sequence numbers.
    #[error(
        "store bookkeeping value meta/{key} is damaged ({why}): restore the data directory from a backup"
    )]
    MetaCorrupt {
        /// The meta key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A table of the store's bookkeeping (`meta`) that fjall could not open
    /// was salvaged only in part: the epoch or a counter may be among what
    /// was lost, and Vigil stops rather than guess one (a guessed counter
    /// could repeat a nonce).
    #[error(
        "a damaged table of the store's bookkeeping (meta) could be read only in part \
         ({unreadable} stretch(es) lost; the file is kept at {}): Vigil stops rather than guess \
         a counter; restore the data directory from a backup, or move it aside to start an \
         empty store",
        file.display()
    )]
    MetaTableLost {
        /// The table file, kept.
        file: PathBuf,
        /// Stretches that did not read.
        unreadable: u64,
    },
    /// The boot epoch would wrap: the key must be rotated (after 4 billion opens).
    #[error("the store's boot epoch is exhausted: re-create the store under a new key")]
    EpochExhausted,
    /// Invalid [`StoreOptions`].
    #[error("invalid store options: {0}")]
    Options(String),
    /// Sealing or decoding a record failed.
    #[error("record {keyspace}/{seq}: {source}")]
    Record {
        /// The keyspace.
        keyspace: String,
        /// The key.
        seq: u64,
        /// What failed.
        source: RecordError,
    },
    /// The writer thread ended unexpectedly (it panicked).
    #[error("the store writer thread stopped unexpectedly")]
    WriterGone,
}

impl StoreError {
    /// True when the store can take no more writes and the process should exit.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::Persist(_) | StoreError::Poisoned(_) | StoreError::WriterGone
        )
    }

    fn engine(dir: &Path, e: fjall::Error) -> Self {
        match e {
            fjall::Error::Locked => StoreError::Locked { dir: dir.into() },
            fjall::Error::Io(source) => StoreError::Io {
                path: dir.into(),
                source,
            },
            other => StoreError::Engine(other),
        }
    }
}

/// How appends reach the disk before they complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` before any append completes. The only production setting.
    SyncData,
    /// Appends complete once written to the OS, before any fsync. Survives a
    /// process crash, not a power cut. **For benchmarks and negative-control
    /// tests only**; configuration files cannot select it.
    UnsafeBuffered,
}

/// Store settings. Defaults in [`StoreOptions::new`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The data directory (created with mode 0700 if missing).
    pub dir: PathBuf,
    /// Number of priority lanes; 0 is the highest. Default 4.
    pub priorities: u8,
    /// Bytes all stored records may take. Default 1 GiB.
    pub quota_bytes: u64,
    /// Extra bytes an eviction frees beyond what the append needs. Default
    /// quota / 256, capped at 4 MiB.
    pub eviction_step_bytes: u64,
    /// Longest time the writer gathers commands into one batch. Default 2 ms.
    pub commit_interval: Duration,
    /// Most commands in one batch. Default 1024.
    pub max_batch: usize,
    /// Commands that may wait for the writer; senders wait beyond it. Default 4096.
    pub queue_depth: usize,
    /// fjall block cache. Default 16 MiB.
    pub cache_bytes: u64,
    /// Free space to keep on the data directory's file system: appends that
    /// would go below it are refused ([`StoreError::DiskLow`]). It must cover
    /// what giving space back takes (tombstones, a memtable flush, a
    /// compaction's output, fjall's journal). 0 turns the check off. Default
    /// 128 MiB.
    pub min_free_bytes: u64,
    /// See [`Durability`]. Default [`Durability::SyncData`].
    pub durability: Durability,
}

impl StoreOptions {
    /// Defaults for a store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let quota_bytes = 1 << 30;
        Self {
            dir: dir.into(),
            priorities: 4,
            quota_bytes,
            eviction_step_bytes: (quota_bytes / 256).min(4 << 20),
            commit_interval: Duration::from_millis(2),
            max_batch: 1024,
            queue_depth: 4096,
            cache_bytes: 16 << 20,
            min_free_bytes: 128 << 20,
            durability: Durability::SyncData,
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        let bad = |m: String| Err(StoreError::Options(m));
        if self.priorities == 0 || self.priorities > MAX_PRIORITIES {
            return bad(format!(
                "priorities is {}; it must be 1..={MAX_PRIORITIES}",
                self.priorities
            ));
        }
        if self.max_batch == 0 || self.queue_depth == 0 {
            return bad("max_batch and queue_depth must be at least 1".into());
        }
        if self.quota_bytes < 4096 {
            return bad(format!(
                "quota_bytes is {}; it must be at least 4096",
                self.quota_bytes
            ));
        }
        Ok(())
    }
}

/// Backlog of one priority lane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneFigures {
    /// Messages queued.
    pub messages: u64,
    /// Bytes they take (keys and sealed values).
    pub bytes: u64,
    /// `received_at` of the lane's head (its oldest message), if any.
    pub oldest: Option<Timestamp>,
    /// No queued message in this lane has a smaller seq.
    pub cursor: u64,
}

/// Contents of the dead-letter area or of quarantine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaFigures {
    /// Records held.
    pub messages: u64,
    /// Bytes they take.
    pub bytes: u64,
}

/// Counters since the store was created. They survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Appends completed (device messages only).
    pub appended: u64,
    /// Messages evicted, per lane.
    pub evicted: Vec<u64>,
    /// Gap-notice events emitted.
    pub gap_notices: u64,
    /// Appends refused because the quota was full of what they may not evict.
    pub refused_full: u64,
    /// Records acknowledged by the cloud and deleted.
    pub acked: u64,
    /// Acks for records that were no longer queued (already acked or evicted).
    pub stale_acks: u64,
    /// Records moved to dead-letter.
    pub dead_lettered: u64,
    /// Dead letters put back in their lane.
    pub requeued: u64,
    /// Dead letters deleted by an operator.
    pub purged: u64,
    /// Records moved to quarantine.
    pub quarantined: u64,
}

/// What the store holds: figures kept up to date by the writer, persisted in
/// `meta/state` with every batch, never computed by scanning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// The next store seq to be given out.
    pub next_seq: u64,
    /// One entry per priority.
    pub lanes: Vec<LaneFigures>,
    /// The dead-letter area.
    pub dead_letter: AreaFigures,
    /// Quarantine.
    pub quarantine: AreaFigures,
    /// Counters.
    pub counters: Counters,
}

impl StoreStats {
    /// Bytes of all stored records: what the quota bounds.
    pub fn used_bytes(&self) -> u64 {
        self.lanes.iter().map(|l| l.bytes).sum::<u64>()
            + self.dead_letter.bytes
            + self.quarantine.bytes
    }

    /// Messages queued in all lanes.
    pub fn queued(&self) -> u64 {
        self.lanes.iter().map(|l| l.messages).sum()
    }
}

/// A completed append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The event's store seq (its key in its lane).
    pub seq: u64,
    /// The device sequence number it was given.
    pub device_seq: u64,
    /// Its id.
    pub id: uuid::Uuid,
    /// Bytes it takes on disk (key and sealed value).
    pub stored_bytes: u64,
    /// Records evicted to make room for it, oldest first.
    pub evicted: Vec<Evicted>,
}

/// One evicted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Its lane.
    pub priority: u8,
    /// Its store seq.
    pub seq: u64,
}

/// What an ack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckReport {
    /// Records deleted.
    pub deleted: u64,
    /// Seqs that were not queued (already acked or evicted).
    pub stale: u64,
}

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read.
    pub checked: u64,
    /// Records that failed and were moved to quarantine.
    pub quarantined: u64,
}

/// An append the writer has queued; [`PendingAppend::committed`] resolves when
/// it is durable (or refused).
#[derive(Debug)]
pub struct PendingAppend {
    wait: oneshot::Receiver<Result<Appended, StoreError>>,
}

impl PendingAppend {
    /// Waits for the commit: `Ok` means the message is on disk under the
    /// configured durability.
    pub async fn committed(self) -> Result<Appended, StoreError> {
        self.wait.await.map_err(|_| StoreError::Closed)?
    }

    /// The outcome if the commit has already happened, without waiting.
    pub fn try_committed(&mut self) -> Option<Result<Appended, StoreError>> {
        match self.wait.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(StoreError::Closed)),
        }
    }
}

/// Keeps commits on hold while alive: see [`Store::hold_commits`].
#[doc(hidden)]
pub struct CommitHold {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CommitHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitHold")
    }
}

impl Drop for CommitHold {
    fn drop(&mut self) {
        self.shared.hold.set(false);
    }
}

/// A flag the writer waits on before committing appends (tests only).
#[derive(Default)]
struct Hold {
    held: Mutex<bool>,
    released: std::sync::Condvar,
}

impl Hold {
    fn set(&self, held: bool) {
        match self.held.lock() {
            Ok(mut h) => *h = held,
            Err(poisoned) => *poisoned.into_inner() = held,
        }
        self.released.notify_all();
    }

    /// Blocks the calling (writer) thread while a hold is in place.
    fn wait(&self) {
        let Ok(guard) = self.held.lock() else { return };
        let _released = self.released.wait_while(guard, |held| *held);
    }
}

/// A record read from the store, with its key and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    /// Its key.
    pub seq: u64,
    /// Bytes it takes on disk.
    pub stored_bytes: u64,
    /// The decoded body.
    pub body: T,
}

/// An event read from a priority lane.
pub type StoredEvent = Stored<Event>;

/// Keyspace names.
fn lane_name(priority: u8) -> String {
    format!("priority-{priority}")
}
const META: &str = "meta";
const DEAD_LETTER: &str = "dead-letter";
const QUARANTINE: &str = "quarantine";
const EPOCH_KEY: &[u8] = b"epoch";
const STATE_KEY: &[u8] = b"state";

/// What the writer and the readers share.
struct Shared {
    dir: PathBuf,
    db: Database,
    lanes: Vec<Keyspace>,
    lane_names: Vec<String>,
    meta: Keyspace,
    dead_letter: Keyspace,
    quarantine: Keyspace,
    key: DataKey,
    store_id: [u8; 16],
    epoch: u32,
    stats: RwLock<StoreStats>,
    fatal: watch::Sender<Option<String>>,
    /// Bumped after every commit that queued records in a lane.
    appends: watch::Sender<u64>,
    /// The last committed records of each lane, for caught-up reads. A
    /// poisoned lock means "not known": reads go to disk.
    recent: Mutex<recent::Recent>,
    hold: Hold,
    metrics: StoreMetrics,
    /// A benchmark-only build's ablation (`VIGIL_ABLATE`).
    #[cfg(any(test, feature = "ablation"))]
    ablation: Option<ablation::Ablation>,
}

impl Shared {
    fn lane(&self, priority: u8) -> Result<(&Keyspace, &str), StoreError> {
        match (
            self.lanes.get(usize::from(priority)),
            self.lane_names.get(usize::from(priority)),
        ) {
            (Some(ks), Some(name)) => Ok((ks, name)),
            _ => Err(StoreError::BadPriority {
                priority,
                priorities: self.priorities(),
            }),
        }
    }

    fn priorities(&self) -> u8 {
        u8::try_from(self.lanes.len()).unwrap_or(MAX_PRIORITIES)
    }

    fn seal_for<'a>(&'a self, keyspace: &'a str, seq: u64) -> record::Seal<'a> {
        record::Seal {
            key: &self.key,
            store_id: &self.store_id,
            keyspace,
            seq,
        }
    }

    fn stats(&self) -> StoreStats {
        match self.stats.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A handle to an open store. Clones share the store; the writer thread stops
/// when [`Store::close`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Command>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    options: Arc<StoreOptions>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.shared.dir)
            .field("epoch", &self.shared.epoch)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `options.dir` and starts its writer thread.
    ///
    /// Blocking: call it before starting the runtime, or from `spawn_blocking`.
    /// The master key is checked against the identity file before anything on
    /// disk is opened, so a wrong key changes nothing.
    pub fn open(options: StoreOptions, master: &MasterKey) -> Result<Self, StoreError> {
        options.validate()?;
        let (shared, state) = open_shared(&options, master)?;
        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::channel(options.queue_depth);
        let writer = writer::Writer::new(shared.clone(), &options, state, tx.downgrade());
        #[cfg(any(test, feature = "ablation"))]
        let writer = writer.with_ablation_log()?;
        let handle = std::thread::Builder::new()
            .name("vigil-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io {
                path: options.dir.clone(),
                source,
            })?;
        Ok(Self {
            shared,
            tx,
            writer: Arc::new(Mutex::new(Some(handle))),
            options: Arc::new(options),
        })
    }

    /// Seals and persists a device message; completes once it is on disk.
    pub async fn append(&self, ingest: Ingest) -> Result<Appended, StoreError> {
        self.submit(ingest).await?.committed().await
    }

    /// Queues an append and returns as soon as the writer has it, without
    /// waiting for the commit. Messages submitted one after another by one task
    /// are stored in that order (and get increasing device sequence numbers),
    /// which `append` from concurrent tasks cannot promise. Waits only when the
    /// writer's queue (`queue_depth`) is full.
    ///
    /// The gate uses this to pass a device's publish on at once and release the
    /// device's PUBACK when [`PendingAppend::committed`] resolves.
    pub async fn submit(&self, ingest: Ingest) -> Result<PendingAppend, StoreError> {
        let (done, wait) = oneshot::channel();
        #[cfg(any(test, feature = "ablation"))]
        if self.shared.ablation == Some(ablation::Ablation::Gate) {
            drop(ingest);
            let _ = done.send(Ok(Appended {
                seq: 0,
                device_seq: 0,
                id: uuid::Uuid::nil(),
                stored_bytes: 0,
                evicted: Vec::new(),
            }));
            return Ok(PendingAppend { wait });
        }
        self.tx
            .send(writer::Command::Append { ingest, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(PendingAppend { wait })
    }

    /// Holds every commit that would make an append durable until the returned
    /// guard is dropped. Appends queue up meanwhile; nothing is acknowledged.
    ///
    /// For tests that must show an acknowledgement waits for the commit (the
    /// gate's PUBACK, for one). Never used by Vigil itself.
    #[doc(hidden)]
    pub fn hold_commits(&self) -> CommitHold {
        self.shared.hold.set(true);
        CommitHold {
            shared: self.shared.clone(),
        }
    }

    /// Deletes records the cloud acknowledged. Seqs no longer queued are counted
    /// as stale and otherwise ignored.
    pub async fn ack(&self, priority: u8, seqs: Vec<u64>) -> Result<AckReport, StoreError> {
        self.shared.lane(priority)?;
        self.call(|done| writer::Command::Ack {
            priority,
            seqs,
            done,
        })
        .await
    }

    /// Moves a queued record to dead-letter with `reason`. Returns its key there,
    /// or `None` if it was no longer queued (or turned out corrupt and went to
    /// quarantine instead).
    pub async fn dead_letter(
        &self,
        priority: u8,
        seq: u64,
        reason: String,
    ) -> Result<Option<u64>, StoreError> {
        self.shared.lane(priority)?;
        self.call(|done| writer::Command::DeadLetter {
            priority,
            seq,
            reason,
            done,
        })
        .await
    }

    /// Puts a dead letter back at the tail of its lane. Returns its new seq.
    pub async fn requeue(&self, dead_letter_seq: u64) -> Result<Option<u64>, StoreError> {
        self.call(|done| writer::Command::Requeue {
            seq: dead_letter_seq,
            done,
        })
        .await
    }

    /// Deletes a dead letter for good (an operator's decision). Returns whether
    /// it existed.
    pub async fn purge_dead_letter(&self, dead_letter_seq: u64) -> Result<bool, StoreError> {
        self.call(|done| writer::Command::Purge {
            seq: dead_letter_seq,
            done,
        })
        .await
    }

    /// Reads up to `limit` queued events of a lane in order, starting after
    /// `after` (or at the lane's cursor). Records that fail to authenticate or
    /// decode are moved to quarantine on the way and not returned.
    pub async fn read(
        &self,
        priority: u8,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if let Some(recent) = self.shared.recent.lock().ok().and_then(|r| match after {
            Some(after) => r.read(priority, after, limit),
            None => r.read_head(priority, limit),
        }) {
            return Ok(recent.into_iter().map(Arc::unwrap_or_clone).collect());
        }
        self.shared
            .metrics
            .lane_disk_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shared = self.shared.clone();
        let scanned =
            tokio::task::spawn_blocking(move || scan::lane(&shared, priority, after, limit))
                .await
                .map_err(|_| StoreError::WriterGone)??;
        for bad in scanned.corrupt {
            self.quarantine(writer::Area::Lane(priority), bad.seq, bad.reason)
                .await?;
        }
        let still_there = self
            .quarantine_unreadable(writer::Area::Lane(priority), scanned.unreadable)
            .await?;
        let mut events = scanned.events;
        // A record read around that was not quarantined (it reads now, or its
        // table is being taken out and it will): nothing past it is handed
        // out yet, so the reader comes back for it in order.
        if let Some(seq) = still_there {
            events.retain(|e| e.seq < seq);
        }
        Ok(events)
    }

    /// Checks every stored record, from the very first key of every lane and of
    /// the dead-letter area (not just from the cursors), and quarantines each one
    /// that fails to authenticate or decode. Slow: it reads the whole store and
    /// the tombstones acked records leave behind. For `vigil inspect --verify`
    /// and after suspected tampering; normal reads already catch corruption at or
    /// after each cursor, and nothing below a cursor is ever read or forwarded.
    pub async fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        for priority in 0..self.priorities() {
            self.verify_area(
                writer::Area::Lane(priority),
                &mut report,
                move |shared, after| {
                    let start = after.map_or(0, |a| a.saturating_add(1));
                    scan::lane_from(shared, priority, record::key(start), 1024)
                        .map(scan::Scanned::outline)
                },
            )
            .await?;
        }
        self.verify_area(writer::Area::DeadLetter, &mut report, |shared, after| {
            scan::dead_letters(shared, after, 1024).map(scan::Scanned::outline)
        })
        .await?;
        Ok(report)
    }

    /// Pages through one area with `page` (from the start, then after the last
    /// key seen) and quarantines what fails.
    async fn verify_area(
        &self,
        area: writer::Area,
        report: &mut VerifyReport,
        page: impl Fn(&Shared, Option<u64>) -> Result<scan::Outline, StoreError> + Send + Copy + 'static,
    ) -> Result<(), StoreError> {
        let mut after = None;
        loop {
            let shared = self.shared.clone();
            let outline = tokio::task::spawn_blocking(move || page(&shared, after))
                .await
                .map_err(|_| StoreError::WriterGone)??;
            report.checked += outline.checked;
            for bad in outline.corrupt {
                if self.quarantine(area, bad.seq, bad.reason).await? {
                    report.quarantined += 1;
                }
            }
            for (seq, reason) in outline.unreadable {
                if self.quarantine_one_unreadable(area, seq, reason).await? {
                    report.quarantined += 1;
                }
            }
            match outline.last {
                Some(seq) => after = Some(seq),
                None => return Ok(()),
            }
        }
    }

    /// Reads dead letters in key order, after `after`.
    pub async fn dead_letters(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Stored<DeadLetterEntry>>, StoreError> {
        let shared = self.shared.clone();
        let scanned =
            tokio::task::spawn_blocking(move || scan::dead_letters(&shared, after, limit))
                .await
                .map_err(|_| StoreError::WriterGone)??;
        for bad in scanned.corrupt {
            self.quarantine(writer::Area::DeadLetter, bad.seq, bad.reason)
                .await?;
        }
        // Entries fjall cannot read (a damaged table block) are quarantined
        // and counted as the lanes' are, not skipped in silence.
        self.quarantine_unreadable(writer::Area::DeadLetter, scanned.unreadable)
            .await?;
        Ok(scanned.events)
    }

    /// Has the writer quarantine each seq a read could not get from fjall
    /// (if it still cannot, and its table is not to be taken out). Returns
    /// the first seq it did not quarantine.
    async fn quarantine_unreadable(
        &self,
        area: writer::Area,
        unreadable: Vec<(u64, String)>,
    ) -> Result<Option<u64>, StoreError> {
        let mut still_there = None;
        for (seq, reason) in unreadable {
            if !self.quarantine_one_unreadable(area, seq, reason).await? {
                still_there = Some(still_there.map_or(seq, |s: u64| s.min(seq)));
            }
        }
        Ok(still_there)
    }

    /// Has the writer quarantine one seq a read could not get from fjall;
    /// returns whether it did.
    async fn quarantine_one_unreadable(
        &self,
        area: writer::Area,
        seq: u64,
        reason: String,
    ) -> Result<bool, StoreError> {
        self.call(|done| writer::Command::QuarantineUnreadable {
            area,
            seq,
            reason,
            done,
        })
        .await
    }

    /// Reads quarantined records in key order, after `after`.
    pub fn quarantined(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Stored<QuarantineEntry>>, StoreError> {
        scan::quarantine(&self.shared, after, limit)
    }

    /// Reads a lane without moving anything (for `vigil inspect` and tests):
    /// good events and the seqs of corrupt records.
    pub fn scan_lane(
        &self,
        priority: u8,
        after: Option<u64>,
        limit: usize,
    ) -> Result<ScannedLane, StoreError> {
        scan::lane(&self.shared, priority, after, limit)
    }

    /// In-memory figures since the store was opened (commit latency,
    /// ingested per priority).
    pub fn metrics(&self) -> &StoreMetrics {
        &self.shared.metrics
    }

    /// The current figures.
    pub fn stats(&self) -> StoreStats {
        self.shared.stats()
    }

    /// Number of priorities.
    pub fn priorities(&self) -> u8 {
        self.shared.priorities()
    }

    /// The boot epoch of this open.
    pub fn epoch(&self) -> u32 {
        self.shared.epoch
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Bytes fjall's files take on disk (journals and tables).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.shared
            .db
            .disk_space()
            .map_err(|e| StoreError::engine(&self.shared.dir, e))
    }

    /// `None` while the store is healthy; the reason once a persist failed.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.shared.fatal.subscribe()
    }

    /// Changes (to a new, meaningless value) after every commit that queued
    /// records in a lane: device messages, gap notices, requeued dead letters.
    /// The forwarder waits on it when it has nothing to send.
    pub fn appends(&self) -> watch::Receiver<u64> {
        self.shared.appends.subscribe()
    }

    /// Commits what is pending, persists with fsync and stops the writer.
    /// Later calls on any clone fail with [`StoreError::Closed`].
    pub async fn close(&self) -> Result<(), StoreError> {
        let result = self.call(|done| writer::Command::Close { done }).await;
        let handle = match self.writer.lock() {
            Ok(mut h) => h.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        match result {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }

    async fn quarantine(
        &self,
        area: writer::Area,
        seq: u64,
        reason: String,
    ) -> Result<bool, StoreError> {
        self.call(|done| writer::Command::Quarantine {
            area,
            seq,
            reason,
            done,
        })
        .await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> writer::Command,
    ) -> Result<T, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(make(done))
            .await
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }
}

/// Opens fjall and the keyspaces, bumps the epoch, and loads the persisted state.
/// What a check of fjall's journal found, before fjall opens it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalCheck {
    /// Batches that verified.
    pub batches: u64,
    /// Damaged stretches cut out (each costs the records of its batch).
    pub damaged: usize,
}

/// Checks (and repairs) the fjall journal in `db_dir` as [`Store::open`] does
/// before fjall replays it, without opening the store. For the fuzz target.
#[doc(hidden)]
pub fn check_journal(db_dir: &Path) -> Result<JournalCheck, StoreError> {
    let found = journal::inspect(db_dir)?;
    Ok(JournalCheck {
        batches: found.batches,
        damaged: found.damage.len(),
    })
}

/// The error log of a table fjall set aside as it opened the store.
fn log_set_aside(found: &set_aside::Salvaged) {
    if found.unreadable == 0 {
        tracing::error!(
            keyspace = %found.keyspace,
            written_back = found.written,
            superseded = found.superseded,
            "a store table fjall could not open (its index, filter or metadata is damaged) was \
             set aside; every entry it held was read and written back, the file removed \
             (counted in vigil_damaged_tables_removed_total): the disk corrupted data, check it"
        );
    } else {
        tracing::error!(
            keyspace = %found.keyspace,
            file = %found.file.display(),
            written_back = found.written,
            superseded = found.superseded,
            unreadable = found.unreadable,
            "a store table fjall could not open was set aside and read only in part: its \
             readable entries were written back, the rest are lost (one quarantine entry says \
             so) and the file is kept for examination: the disk corrupted data, check it"
        );
    }
}

fn open_shared(
    options: &StoreOptions,
    master: &MasterKey,
) -> Result<(Shared, StoreStats), StoreError> {
    let dir = &options.dir;
    let io = |source| StoreError::Io {
        path: dir.clone(),
        source,
    };
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let db_dir = dir.join("db");
    let ident = if identity::path(dir).exists() {
        identity::load(dir, master)?
    } else if db_dir.exists() {
        return Err(StoreError::IdentityMissing { dir: dir.clone() });
    } else {
        identity::create(dir, master)?
    };

    // Damage inside fjall's journal is cut out before fjall replays it.
    let journal = journal::inspect(&db_dir)?;
    let engine = |e| StoreError::engine(dir, e);
    let db = Database::builder(&db_dir)
        .cache_size(options.cache_bytes)
        .max_journaling_size(64 << 20)
        // A table fjall cannot open is set aside rather than stop the open;
        // its entries are salvaged below (set_aside.rs).
        .set_aside_damaged_tables(true)
        .open()
        .map_err(engine)?;
    let small = || KeyspaceCreateOptions::default().max_memtable_size(8 << 20);
    let meta = db.keyspace(META, small).map_err(engine)?;
    // Salvaged before anything is read from it; a part lost stops the open.
    let mut set_aside = Vec::new();
    for found in set_aside::salvage(&db, &meta, META, dir)? {
        log_set_aside(&found);
        if found.unreadable > 0 {
            return Err(StoreError::MetaTableLost {
                file: found.file,
                unreadable: found.unreadable,
            });
        }
        set_aside.push(found);
    }
    // Queues: nothing pinned. fjall pins the index and filter blocks of its
    // first levels for the life of a table, and a queue's tables (keys only
    // ever grow) reach deeper levels by being moved, not rewritten, so pinned
    // blocks would grow with the backlog (measured: 3.9 bytes per queued
    // record). Unpinned, they go through the bounded block cache.
    let queue = || {
        small()
            .index_block_pinning_policy(PinningPolicy::all(false))
            .filter_block_pinning_policy(PinningPolicy::all(false))
    };

    // The epoch goes first and is fsynced before anything is sealed in this run.
    let old_epoch = match meta.get(EPOCH_KEY).map_err(engine)? {
        None => 0,
        Some(v) => {
            u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::MetaCorrupt {
                key: "epoch".into(),
                why: format!("{} bytes instead of 4", v.len()),
            })?)
        }
    };
    let epoch = old_epoch.checked_add(1).ok_or(StoreError::EpochExhausted)?;
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    batch.insert(&meta, EPOCH_KEY, epoch.to_be_bytes().to_vec());
    batch
        .commit()
        .map_err(|e| StoreError::Persist(format!("{e:?}")))?;

    let mut state: StoreStats = match meta.get(STATE_KEY).map_err(engine)? {
        None => StoreStats::default(),
        Some(v) => postcard::from_bytes(&v).map_err(|e| StoreError::MetaCorrupt {
            key: "state".into(),
            why: e.to_string(),
        })?,
    };
    let configured = usize::from(options.priorities);
    if let Some((p, lane)) = state
        .lanes
        .iter()
        .enumerate()
        .skip(configured)
        .find(|(_, l)| l.messages > 0)
    {
        return Err(StoreError::PrioritiesShrunk {
            priority: u8::try_from(p).unwrap_or(u8::MAX),
            messages: lane.messages,
            configured: options.priorities,
        });
    }
    state.lanes.resize(configured, LaneFigures::default());
    state.counters.evicted.resize(configured, 0);

    let mut lanes = Vec::with_capacity(configured);
    let mut lane_names = Vec::with_capacity(configured);
    for p in 0..options.priorities {
        let name = lane_name(p);
        lanes.push(db.keyspace(&name, queue).map_err(engine)?);
        lane_names.push(name);
    }
    let dead_letter = db.keyspace(DEAD_LETTER, queue).map_err(engine)?;
    let quarantine = db.keyspace(QUARANTINE, queue).map_err(engine)?;
    for (ks, name) in lanes
        .iter()
        .zip(&lane_names)
        .map(|(ks, name)| (ks, name.as_str()))
        .chain([(&dead_letter, DEAD_LETTER), (&quarantine, QUARANTINE)])
    {
        for found in set_aside::salvage(&db, ks, name, dir)? {
            log_set_aside(&found);
            set_aside.push(found);
        }
    }

    let mut shared = Shared {
        dir: dir.clone(),
        db,
        lanes,
        lane_names,
        meta,
        dead_letter,
        quarantine,
        key: DataKey::derive(master, &ident.store_id),
        store_id: ident.store_id,
        epoch,
        stats: RwLock::new(StoreStats::default()),
        fatal: watch::Sender::new(None),
        appends: watch::Sender::new(0),
        // Covers nothing until the store is open and its next seq known.
        recent: Mutex::new(recent::Recent::new(configured, u64::MAX)),
        hold: Hold::default(),
        metrics: StoreMetrics::new(configured),
        #[cfg(any(test, feature = "ablation"))]
        ablation: ablation::Ablation::from_env()?,
    };

    // Defensive: the seq counter is written in the same batch as the records it
    // numbers, but never trust it below a key that exists.
    for ks in shared
        .lanes
        .iter()
        .chain([&shared.dead_letter, &shared.quarantine])
    {
        if let Some(last) = ks.last_key_value() {
            let (k, _) = last.into_inner().map_err(engine)?;
            if let Ok(seq) = record::seq_of(&k) {
                state.next_seq = state.next_seq.max(seq + 1);
            }
        }
    }
    state.next_seq = state.next_seq.max(1);
    if !journal.damage.is_empty() {
        journal::settle(&shared, &mut state, &journal)?;
    }
    set_aside::settle(&shared, &mut state, &set_aside)?;
    // Best effort: leftover padding costs only space, so a read of `meta`
    // that fails here (a damaged older table) must not stop the open.
    if let Err(e) = space::remove_leftover_padding(&shared.db, &shared.meta) {
        tracing::warn!(error = %e, "could not look for journal padding left by a stopped reclaim; it stays in meta");
    }
    shared
        .metrics
        .damaged_tables_removed
        .fetch_add(set_aside.len() as u64, std::sync::atomic::Ordering::Relaxed);
    // A lane's persisted head may lag (it is found after each batch and written
    // with the next): find it again. An empty lane's cursor is already a valid
    // lower bound; one found empty on disk (no key from its cursor on) is
    // complete in `recent` from the start, so a forwarder's reads of it are
    // answered from memory.
    let mut emptied = Vec::new();
    for p in 0..options.priorities {
        let Some((messages, cursor)) = state
            .lanes
            .get(usize::from(p))
            .map(|l| (l.messages, l.cursor))
        else {
            continue;
        };
        if messages > 0 {
            scan::refresh_head(&shared, &mut state, p, |_| false)?;
        } else if scan::nothing_from(&shared, p, cursor)? {
            // Its figures stay as they are; only whether anything is there
            // is looked at.
            emptied.push(recent::Change::Emptied(p, state.next_seq));
        }
    }
    if let Ok(mut s) = shared.stats.write() {
        *s = state.clone();
    }
    if let Ok(recent) = shared.recent.get_mut() {
        *recent = recent::Recent::new(state.lanes.len(), state.next_seq);
        recent.apply(emptied);
    }
    Ok((shared, state))
}
