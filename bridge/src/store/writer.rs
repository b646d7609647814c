//! The writer thread: every mutation of the store, group-committed.
//!
//! See the module docs of [`super`] for the batching, eviction and gap-notice
//! rules. In short: `run` takes one command, then what is already queued (up to
//! `max_batch` or `commit_interval`), applies them to a [`Batch`], and `commit`
//! writes that batch with the updated state in one fjall batch, persists it, and
//! only then replies. Any failure while committing poisons the writer: in-memory
//! state has already moved ahead of the disk, so no later write may be trusted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fjall::{PersistMode, Slice};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::recent::Change;
use super::record::{self, DeadLetterEntry, KEY_LEN, QuarantineEntry};
use super::{
    AckReport, Appended, DEAD_LETTER, Durability, Evicted, QUARANTINE, STATE_KEY, Shared,
    StoreError, StoreOptions, StoreStats, scan,
};
use crate::event::{Event, Ingest, Kind, Qos, Timestamp, VIGIL_DEVICE};

/// Topic of gap-notice events (under the cloud prefix once forwarded).
pub const GAP_NOTICE_TOPIC: &str = "vigil/gap-notice";

/// What taking a damaged table out did.
#[derive(Debug, Default)]
struct TakenOut {
    /// Readable records written again under their own keys.
    kept: u64,
    /// Records fjall could not read, quarantined.
    unreadable: u64,
    /// Older copies the drop brought back into view, deleted again.
    deleted_again: u64,
    /// Another damaged table overlaps the key range (found next time).
    overlapped: bool,
}
/// Device and gap caches are dropped (they are persisted) past this many entries.
const CACHE_LIMIT: usize = 65_536;

/// Where a record lives, for moves and quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Area {
    Lane(u8),
    DeadLetter,
    Quarantine,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A request to the writer.
pub(super) enum Command {
    Append {
        ingest: Ingest,
        done: Reply<Appended>,
    },
    Ack {
        priority: u8,
        seqs: Vec<u64>,
        done: Reply<AckReport>,
    },
    DeadLetter {
        priority: u8,
        seq: u64,
        reason: String,
        done: Reply<Option<u64>>,
    },
    Requeue {
        seq: u64,
        done: Reply<Option<u64>>,
    },
    Purge {
        seq: u64,
        done: Reply<bool>,
    },
    Quarantine {
        area: Area,
        seq: u64,
        reason: String,
        done: Reply<bool>,
    },
    /// Quarantines a record fjall cannot read (a damaged table block) if it
    /// still cannot; replies whether it did.
    QuarantineUnreadable {
        area: Area,
        seq: u64,
        reason: String,
        done: Reply<bool>,
    },
    Close {
        done: Reply<()>,
    },
    /// What a look for damaged tables found (from its own thread,
    /// `salvage::start_look`); they are taken out after the batch.
    DamageFound {
        tables: Vec<super::salvage::DamagedTable>,
    },
}

impl Command {
    fn fail(self, err: StoreError) {
        match self {
            Command::Append { done, .. } => drop(done.send(Err(err))),
            Command::Ack { done, .. } => drop(done.send(Err(err))),
            Command::DeadLetter { done, .. } | Command::Requeue { done, .. } => {
                drop(done.send(Err(err)))
            }
            Command::Purge { done, .. } | Command::Quarantine { done, .. } => {
                drop(done.send(Err(err)))
            }
            Command::QuarantineUnreadable { done, .. } => drop(done.send(Err(err))),
            Command::Close { done } => drop(done.send(Err(err))),
            Command::DamageFound { .. } => {}
        }
    }
}

/// Sends a reply given the commit's error (`None`: committed).
type SendReply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A reply sent once the batch is committed: the value on success, the
/// commit's error otherwise.
enum Deferred {
    /// An append's (one per message: no allocation of its own).
    Appended(Reply<Appended>, Appended),
    /// Any other command's, or an append's refusal.
    Other(SendReply),
}

impl Deferred {
    fn send(self, err: Option<&StoreError>) {
        match self {
            Deferred::Appended(done, appended) => {
                let _ = done.send(match err {
                    None => Ok(appended),
                    Some(e) => Err(copy_error(e)),
                });
            }
            Deferred::Other(reply) => reply(err),
        }
    }
}

fn defer<T: Send + 'static>(done: Reply<T>, value: T) -> Deferred {
    Deferred::Other(Box::new(move |err| {
        let _ = done.send(match err {
            None => Ok(value),
            Some(e) => Err(copy_error(e)),
        });
    }))
}

/// The error every waiter of a failed batch receives.
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Poisoned(m) => StoreError::Poisoned(m.clone()),
        StoreError::Persist(m) => StoreError::Persist(m.clone()),
        other => StoreError::Persist(other.to_string()),
    }
}

enum Op {
    Put(Area, u64, Slice),
    Delete(Area, u64),
    Meta(Vec<u8>, Vec<u8>),
}

/// A range of one device's messages evicted from one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct GapRange {
    first: u64,
    last: u64,
    count: u64,
    first_received_at: Timestamp,
    last_received_at: Timestamp,
}

impl GapRange {
    fn one(device_seq: u64, at: Timestamp) -> Self {
        Self {
            first: device_seq,
            last: device_seq,
            count: 1,
            first_received_at: at,
            last_received_at: at,
        }
    }

    fn merge(self, other: GapRange) -> Self {
        Self {
            first: self.first.min(other.first),
            last: self.last.max(other.last),
            count: self.count + other.count,
            first_received_at: self.first_received_at.min(other.first_received_at),
            last_received_at: self.last_received_at.max(other.last_received_at),
        }
    }
}

/// The open gap record of one (lane, device): its notice in lane 0 and what it covers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct GapState {
    notice_seq: u64,
    range: GapRange,
}

/// The JSON payload of a gap-notice event (documented in the README).
#[derive(Serialize)]
struct GapNoticePayload<'a> {
    device: &'a str,
    priority: u8,
    first_seq: u64,
    last_seq: u64,
    count: u64,
    first_received_at: String,
    last_received_at: String,
    reason: &'static str,
}

/// The vectors of a committed batch, emptied, for the next one to fill.
#[derive(Default)]
struct Spare {
    ops: Vec<Op>,
    replies: Vec<Deferred>,
    fresh: VecDeque<Arc<super::StoredEvent>>,
}

impl Spare {
    /// Vectors with room for more than this many entries are dropped rather
    /// than kept (a batch of many acknowledgements can hold a large `ops`):
    /// what is kept between batches is at most 4,096 × (48 + 72 + 8) bytes,
    /// 512 KiB (an `Op`, a `Deferred`, an `Arc`). A batch of appends holds
    /// at most `max_batch` (1,024 by default).
    const MAX_KEPT: usize = 4096;

    /// The batch's vectors emptied, each unless it has room for more than
    /// [`Self::MAX_KEPT`] entries.
    fn of(batch: &mut Batch) -> Self {
        let mut spare = Self::default();
        if batch.ops.capacity() <= Self::MAX_KEPT {
            batch.ops.clear();
            std::mem::swap(&mut spare.ops, &mut batch.ops);
        }
        if batch.replies.capacity() <= Self::MAX_KEPT {
            batch.replies.clear();
            std::mem::swap(&mut spare.replies, &mut batch.replies);
        }
        if batch.fresh.capacity() <= Self::MAX_KEPT {
            batch.fresh.clear();
            std::mem::swap(&mut spare.fresh, &mut batch.fresh);
        }
        spare
    }
}

struct Batch {
    ops: Vec<Op>,
    replies: Vec<Deferred>,
    deleted: HashSet<(Area, u64)>,
    commands: usize,
    /// Whether the batch must be fsynced before replying (it holds appends or moves).
    sync: bool,
    /// Whether `state` changed (it is written whenever it did).
    dirty: bool,
    /// Lanes whose head may have moved.
    heads: BTreeSet<u8>,
    /// Lanes with appends not yet committed (they are not eviction candidates yet).
    pending_lanes: u32,
    devices: BTreeSet<String>,
    evictions: BTreeMap<(u8, String), GapRange>,
    /// Where the next eviction scan of each lane resumes.
    scan_from: Vec<Option<u64>>,
    /// Device messages appended per lane (counted once committed).
    ingested: Vec<u64>,
    /// Bytes of the values put in this batch (for the free-space reserve).
    put_bytes: u64,
    /// The events appended in this batch, in order, for [`super::recent`].
    fresh: VecDeque<Arc<super::StoredEvent>>,
}

impl Batch {
    fn new(lanes: usize) -> Self {
        Self::reusing(lanes, Spare::default())
    }

    /// A batch in the emptied vectors of an earlier one: growing them from
    /// empty in every batch cost about 400 instructions per message in
    /// reallocations.
    fn reusing(lanes: usize, spare: Spare) -> Self {
        Self {
            ops: spare.ops,
            replies: spare.replies,
            deleted: HashSet::new(),
            commands: 0,
            sync: false,
            dirty: false,
            heads: BTreeSet::new(),
            pending_lanes: 0,
            devices: BTreeSet::new(),
            evictions: BTreeMap::new(),
            scan_from: vec![None; lanes],
            ingested: vec![0; lanes],
            put_bytes: 0,
            fresh: spare.fresh,
        }
    }

    fn delete(&mut self, area: Area, seq: u64) {
        self.deleted.insert((area, seq));
        self.ops.push(Op::Delete(area, seq));
        self.dirty = true;
        if let Area::Lane(p) = area {
            self.heads.insert(p);
        }
    }

    fn put(&mut self, area: Area, seq: u64, value: Slice) {
        self.put_bytes += size_of(value.len());
        self.ops.push(Op::Put(area, seq, value));
        self.dirty = true;
        self.sync = true;
    }
}

enum Room {
    /// Commit what is pending and try once more: uncommitted appends may be evictable.
    Flush,
    Refuse(StoreError),
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    state: StoreStats,
    quota: u64,
    step: u64,
    durability: Durability,
    commit_interval: Duration,
    max_batch: usize,
    /// The last committed batch's vectors, emptied, for the next batch.
    spare: Spare,
    /// Each device's last number (a cache of the store's counters), looked
    /// up twice per message: ahash rather than SipHash, still keyed at random
    /// so device names cannot be chosen to collide.
    devices: HashMap<String, u64, ahash::RandomState>,
    gaps: HashMap<(u8, String), Option<GapState>>,
    fatal: Option<String>,
    /// `store.min_free_bytes`; 0: no check.
    min_free: u64,
    /// Free bytes on the file system when this batch began (None: unknown or
    /// no check).
    free: Option<u64>,
    /// Bytes appended since the last reclaim was asked for.
    appended_since_reclaim: u64,
    /// When a reclaim was last asked for.
    last_reclaim: Option<Instant>,
    /// Records were deleted since the last reclaim was asked for.
    deleted_since_reclaim: bool,
    reclaimer: super::space::Reclaimer,
    /// When to look for damaged tables, and what a look found.
    damage: super::salvage::Watch,
    /// This writer's own channel, for the look's answer (weak: it does not
    /// keep the channel open once every store handle is gone).
    commands: mpsc::WeakSender<Command>,
    /// The `log` ablation's file, opened with the store
    /// ([`Self::with_ablation_log`]).
    #[cfg(any(test, feature = "ablation"))]
    log: Option<super::ablation::SegmentLog>,
}

/// A drain after this many appended bytes (counting the backlog found at
/// open) triggers a reclaim.
const RECLAIM_AFTER_BYTES: u64 = 16 << 20;
/// Least time between reclaims asked for because the disk is low.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(2);

fn dev_key(device: &str) -> Vec<u8> {
    [b"dev/".as_slice(), device.as_bytes()].concat()
}

fn gap_key(lane: u8, device: &str) -> Vec<u8> {
    format!("gap/{lane}/{device}").into_bytes()
}

fn size_of(value_len: usize) -> u64 {
    (KEY_LEN + value_len) as u64
}

/// The stored sizes of a run of records, read with one range scan: a
/// draining forwarder acknowledges runs of consecutive records, and one scan
/// costs far less than a point lookup each.
struct ScannedSizes {
    from: u64,
    /// Stored size of record `from + i`, `None` where there is none.
    sizes: Vec<Option<u64>>,
}

impl ScannedSizes {
    /// Fewer records than this are looked up one by one.
    const MIN_RUN: usize = 8;

    /// Scans `from..=to` of `seqs` when they are dense enough (at least half
    /// of the range). Anything unusual (an error from the scan, a bad key)
    /// gives up the whole scan: point lookups then decide, as for a sparse
    /// run, so a damaged table is met, and reported, the way it always was.
    fn scan(ks: &fjall::Keyspace, seqs: &[u64]) -> Self {
        let none = Self {
            from: 0,
            sizes: Vec::new(),
        };
        let (Some(&from), Some(&to)) = (seqs.iter().min(), seqs.iter().max()) else {
            return none;
        };
        let span = usize::try_from(to - from)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        if seqs.len() < Self::MIN_RUN || span > seqs.len().saturating_mul(2) {
            return none;
        }
        let mut sizes = vec![None; span];
        for guard in ks.range(record::key(from)..=record::key(to)) {
            let Ok((k, v)) = guard.into_inner() else {
                return none;
            };
            let Some(slot) = record::seq_of(&k)
                .ok()
                .and_then(|seq| usize::try_from(seq.checked_sub(from)?).ok())
                .and_then(|i| sizes.get_mut(i))
            else {
                return none;
            };
            *slot = Some(size_of(v.len()));
        }
        Self { from, sizes }
    }

    /// `Some(size or None)` for a record the scan covered.
    fn get(&self, seq: u64) -> Option<Option<u64>> {
        let i = usize::try_from(seq.checked_sub(self.from)?).ok()?;
        self.sizes.get(i).copied()
    }
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        options: &StoreOptions,
        state: StoreStats,
        commands: mpsc::WeakSender<Command>,
    ) -> Self {
        let reclaimer = super::space::Reclaimer::start(Arc::downgrade(&shared));
        let backlog_bytes = state.used_bytes();
        Self {
            shared,
            state,
            quota: options.quota_bytes,
            step: options.eviction_step_bytes,
            durability: options.durability,
            commit_interval: options.commit_interval,
            max_batch: options.max_batch,
            spare: Spare::default(),
            devices: HashMap::default(),
            gaps: HashMap::new(),
            fatal: None,
            min_free: options.min_free_bytes,
            free: None,
            // A backlog found at open (after a restart) counts: its drain
            // must give the space back too.
            appended_since_reclaim: backlog_bytes,
            last_reclaim: None,
            deleted_since_reclaim: false,
            reclaimer,
            damage: super::salvage::Watch::new(),
            commands,
            #[cfg(any(test, feature = "ablation"))]
            log: None,
        }
    }

    /// Opens the `log` ablation's file before the first commit (a
    /// preallocated one takes a while to write); nothing in any other build.
    #[cfg(any(test, feature = "ablation"))]
    pub(super) fn with_ablation_log(mut self) -> Result<Self, StoreError> {
        if let Some(super::ablation::Ablation::Log { preallocated }) = self.shared.ablation {
            self.log = Some(super::ablation::SegmentLog::open(
                &self.shared.dir,
                preallocated,
            )?);
        }
        Ok(self)
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let started = Instant::now();
            self.free = (self.min_free > 0)
                .then(|| super::space::free_bytes(&self.shared.dir))
                .flatten();
            let spare = std::mem::take(&mut self.spare);
            let mut batch = Batch::reusing(self.state.lanes.len(), spare);
            let mut closing = None;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                if let Command::Close { done } = cmd {
                    closing = Some(done);
                    break;
                }
                batch.commands += 1;
                self.apply(cmd, &mut batch);
                if batch.commands >= self.max_batch || started.elapsed() >= self.commit_interval {
                    break;
                }
                next = rx.try_recv().ok();
            }
            self.commit(batch);
            self.take_out_damaged_tables();
            if let Some(done) = closing {
                let _ = done.send(self.close());
                rx.close();
                while let Ok(cmd) = rx.try_recv() {
                    cmd.fail(StoreError::Closed);
                }
                return;
            }
        }
        // Every handle is gone: leave the disk synced.
        let _ = self.close();
    }

    fn close(&mut self) -> Result<(), StoreError> {
        if let Some(reason) = &self.fatal {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        // The heads found after the last batch are not persisted yet.
        let state = postcard::to_allocvec(&self.state)
            .map_err(|e| StoreError::Persist(format!("cannot encode the store state: {e}")))?;
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncAll));
        wb.insert(&self.shared.meta, STATE_KEY, state);
        wb.commit()
            .map_err(|e| StoreError::Persist(format!("{e:?}")))?;
        Ok(())
    }

    fn apply(&mut self, cmd: Command, batch: &mut Batch) {
        if let Some(reason) = &self.fatal {
            cmd.fail(StoreError::Poisoned(reason.clone()));
            return;
        }
        match cmd {
            Command::Append { ingest, done } => self.append(ingest, done, batch),
            Command::Ack {
                priority,
                seqs,
                done,
            } => match self.ack(priority, &seqs, batch) {
                Ok(report) => batch.replies.push(defer(done, report)),
                Err(e) => drop(done.send(Err(e))),
            },
            Command::DeadLetter {
                priority,
                seq,
                reason,
                done,
            } => match self.dead_letter(priority, seq, reason, batch) {
                Ok(moved) => batch.replies.push(defer(done, moved)),
                Err(e) => drop(done.send(Err(e))),
            },
            Command::Requeue { seq, done } => match self.requeue(seq, batch) {
                Ok(moved) => batch.replies.push(defer(done, moved)),
                Err(e) => drop(done.send(Err(e))),
            },
            Command::Purge { seq, done } => match self.purge(seq, batch) {
                Ok(found) => batch.replies.push(defer(done, found)),
                Err(e) => drop(done.send(Err(e))),
            },
            Command::Quarantine {
                area,
                seq,
                reason,
                done,
            } => match self.quarantine_if_bad(area, seq, reason, batch) {
                Ok(moved) => batch.replies.push(defer(done, moved)),
                Err(e) => drop(done.send(Err(e))),
            },
            Command::QuarantineUnreadable {
                area,
                seq,
                reason,
                done,
            } => match self.quarantine_unreadable(area, seq, &reason, batch) {
                Ok(moved) => batch.replies.push(defer(done, moved)),
                Err(e) => drop(done.send(Err(e))),
            },
            Command::Close { done } => drop(done.send(Ok(()))),
            Command::DamageFound { tables } => self.damage.answered(tables),
        }
    }

    fn engine(&self, e: fjall::Error) -> StoreError {
        StoreError::engine(&self.shared.dir, e)
    }

    fn area_name(&self, area: Area) -> String {
        match area {
            Area::Lane(p) => super::lane_name(p),
            Area::DeadLetter => DEAD_LETTER.into(),
            Area::Quarantine => QUARANTINE.into(),
        }
    }

    fn keyspace(&self, area: Area) -> Result<&fjall::Keyspace, StoreError> {
        match area {
            Area::Lane(p) => Ok(self.shared.lane(p)?.0),
            Area::DeadLetter => Ok(&self.shared.dead_letter),
            Area::Quarantine => Ok(&self.shared.quarantine),
        }
    }

    fn get(&self, area: Area, seq: u64, batch: &Batch) -> Result<Option<Vec<u8>>, StoreError> {
        if batch.deleted.contains(&(area, seq)) {
            return Ok(None);
        }
        let value = self
            .keyspace(area)?
            .get(record::key(seq))
            .map_err(|e| self.engine(e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        seq
    }

    /// Counts a record added to `area` under `seq`. A record added to an empty
    /// lane is its head: the cursor and oldest age point at it.
    fn figures_add(&mut self, area: Area, seq: u64, bytes: u64, oldest: Option<Timestamp>) {
        match area {
            Area::Lane(p) => {
                if let Some(lane) = self.state.lanes.get_mut(usize::from(p)) {
                    if lane.messages == 0 {
                        lane.oldest = oldest;
                        lane.cursor = seq;
                    }
                    lane.messages += 1;
                    lane.bytes += bytes;
                }
            }
            Area::DeadLetter => {
                self.state.dead_letter.messages += 1;
                self.state.dead_letter.bytes += bytes;
            }
            Area::Quarantine => {
                self.state.quarantine.messages += 1;
                self.state.quarantine.bytes += bytes;
            }
        }
    }

    fn figures_sub(&mut self, area: Area, bytes: u64) {
        let (messages, total) = match area {
            Area::Lane(p) => match self.state.lanes.get_mut(usize::from(p)) {
                Some(lane) => (&mut lane.messages, &mut lane.bytes),
                None => return,
            },
            Area::DeadLetter => (
                &mut self.state.dead_letter.messages,
                &mut self.state.dead_letter.bytes,
            ),
            Area::Quarantine => (
                &mut self.state.quarantine.messages,
                &mut self.state.quarantine.bytes,
            ),
        };
        *messages = messages.saturating_sub(1);
        *total = total.saturating_sub(bytes);
    }

    fn peek_device_seq(&mut self, device: &str) -> Result<u64, StoreError> {
        if let Some(last) = self.devices.get(device) {
            return Ok(last + 1);
        }
        let stored = match self.shared.meta.get(dev_key(device)) {
            Ok(Some(v)) => <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| format!("{} bytes instead of 8", v.len())),
            Ok(None) => Ok(0),
            Err(e) if super::scan::is_damage(&e) => Err(format!("{e:?}")),
            Err(e) => return Err(self.engine(e)),
        };
        let last = stored.unwrap_or_else(|why| {
            // The counter is damaged. Every device number given out so far
            // took a store seq of its own, so none has reached the store's
            // next seq: resuming there repeats no (device, seq) pair. The
            // cloud sees a jump in this device's numbers; the next commit
            // writes the counter again.
            let resume = self.state.next_seq;
            tracing::error!(
                device,
                resume_after = resume,
                why = %why,
                "a device's sequence counter in the store cannot be read (damaged); its \
                 numbering resumes past every store seq given out, so none repeats"
            );
            resume
        });
        self.devices.insert(device.to_string(), last);
        Ok(last + 1)
    }

    fn take_device_seq(&mut self, device: &str, seq: u64, batch: &mut Batch) {
        // A device's name is copied once per cache entry and batch, not per
        // message.
        match self.devices.get_mut(device) {
            Some(last) => *last = seq,
            None => {
                self.devices.insert(device.to_string(), seq);
            }
        }
        if !batch.devices.contains(device) {
            batch.devices.insert(device.to_string());
        }
    }

    fn append(&mut self, ingest: Ingest, done: Reply<Appended>, batch: &mut Batch) {
        let priority = ingest.priority;
        // Its own handle, so the lane's name is borrowed, not copied, while
        // `self` changes below.
        let shared = self.shared.clone();
        let name = match shared.lane(priority) {
            Ok((_, name)) => name,
            Err(e) => return drop(done.send(Err(e))),
        };
        // The device's number stays the same if a flush below makes room (it
        // commits other devices' messages and gap notices only); the seq may
        // not (the flush's gap notices take seqs), so the event is sealed
        // again under the seq it is finally stored at.
        let device_seq = match self.peek_device_seq(&ingest.device) {
            Ok(s) => s,
            Err(e) => return drop(done.send(Err(e))),
        };
        let event = Event::from_ingest(ingest, Uuid::now_v7(), device_seq);
        let seal = |seq: u64| {
            shared
                .seal_for(name, seq)
                .seal(shared.epoch, &event)
                .map_err(|source| StoreError::Record {
                    keyspace: name.to_string(),
                    seq,
                    source,
                })
        };
        let mut seq = self.state.next_seq;
        let mut value = match seal(seq) {
            Ok(v) => v,
            Err(e) => return drop(done.send(Err(e))),
        };
        let mut allow_flush = true;
        loop {
            let stored_bytes = size_of(value.len());
            if let Some(free) = self.free.map(|f| f.saturating_sub(batch.put_bytes))
                && free < self.min_free.saturating_add(stored_bytes)
            {
                self.shared
                    .metrics
                    .refused_disk_low
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let e = StoreError::DiskLow {
                    dir: self.shared.dir.clone(),
                    free,
                    needed: stored_bytes,
                    reserve: self.min_free,
                };
                batch.replies.push(Deferred::Other(Box::new(move |err| {
                    let _ = done.send(Err(err.map_or(e, copy_error)));
                })));
                return;
            }
            match self.make_room(priority, stored_bytes, batch, allow_flush) {
                Ok(evicted) => {
                    self.take_device_seq(&event.device, device_seq, batch);
                    self.take_seq();
                    self.figures_add(
                        Area::Lane(priority),
                        seq,
                        stored_bytes,
                        Some(event.received_at),
                    );
                    self.state.counters.appended += 1;
                    self.appended_since_reclaim += stored_bytes;
                    if let Some(n) = batch.ingested.get_mut(usize::from(priority)) {
                        *n += 1;
                    }
                    batch.put(Area::Lane(priority), seq, value);
                    let appended = Appended {
                        seq,
                        device_seq,
                        id: event.id,
                        stored_bytes,
                        evicted,
                    };
                    // Kept for a caught-up forwarder; with a backlog it reads
                    // from disk anyway, and the copies would only cost the
                    // writer (the lane is then reset past this record).
                    if self
                        .state
                        .lanes
                        .get(usize::from(priority))
                        .is_some_and(|l| l.messages <= super::recent::KEEP_UP_TO_QUEUED)
                    {
                        // Its own copy of the payload: the device's bytes are a
                        // view into the gate's read buffer, which they would pin.
                        let mut body = event;
                        body.payload = Bytes::copy_from_slice(&body.payload);
                        batch.fresh.push_back(Arc::new(super::Stored {
                            seq,
                            stored_bytes,
                            body,
                        }));
                    }
                    batch.pending_lanes |= 1 << priority;
                    batch.replies.push(Deferred::Appended(done, appended));
                    return;
                }
                Err(Room::Flush) => {
                    let full = std::mem::replace(batch, Batch::new(self.state.lanes.len()));
                    batch.commands = full.commands;
                    self.commit(full);
                    if let Some(reason) = &self.fatal {
                        return drop(done.send(Err(StoreError::Poisoned(reason.clone()))));
                    }
                    if self.state.next_seq != seq {
                        // One seq, one nonce: never reuse the sealed value.
                        seq = self.state.next_seq;
                        value = match seal(seq) {
                            Ok(v) => v,
                            Err(e) => return drop(done.send(Err(e))),
                        };
                    }
                    allow_flush = false;
                }
                Err(Room::Refuse(e)) => {
                    // Reply after the commit, so the refusal is counted on disk
                    // and in the figures before the device hears of it.
                    self.state.counters.refused_full += 1;
                    batch.dirty = true;
                    batch.replies.push(Deferred::Other(Box::new(move |err| {
                        let _ = done.send(Err(err.map_or(e, copy_error)));
                    })));
                    return;
                }
            }
        }
    }

    /// Evicts what a `size`-byte append at `priority` needs, or says why not.
    fn make_room(
        &mut self,
        priority: u8,
        size: u64,
        batch: &mut Batch,
        allow_flush: bool,
    ) -> Result<Vec<Evicted>, Room> {
        let used = self.state.used_bytes();
        if used + size <= self.quota {
            return Ok(Vec::new());
        }
        let needed = used + size - self.quota;
        let floor = usize::from(priority.max(1));
        let evictable: u64 = self.state.lanes.iter().skip(floor).map(|l| l.bytes).sum();
        let quota = self.quota;
        let full = |evictable| {
            Room::Refuse(StoreError::Full {
                priority,
                needed: size,
                quota,
                used,
                evictable,
            })
        };
        if evictable < needed {
            return Err(full(evictable));
        }
        let target = needed.saturating_add(self.step).min(evictable);
        let mut freed = 0u64;
        let mut evicted = Vec::new();
        for lane in (floor..self.state.lanes.len()).rev() {
            let Ok(q) = u8::try_from(lane) else { break };
            while freed < target {
                let Some((seq, value)) = self.next_victim(q, batch).map_err(Room::Refuse)? else {
                    break;
                };
                let vsize = size_of(value.len());
                let name = super::lane_name(q);
                match self.shared.seal_for(&name, seq).open::<Event>(&value) {
                    Ok(event) => {
                        batch.delete(Area::Lane(q), seq);
                        self.figures_sub(Area::Lane(q), vsize);
                        if let Some(n) = self.state.counters.evicted.get_mut(lane) {
                            *n += 1;
                        }
                        let one = GapRange::one(event.device_seq, event.received_at);
                        batch
                            .evictions
                            .entry((q, event.device))
                            .and_modify(|g| *g = g.merge(one))
                            .or_insert(one);
                        evicted.push(Evicted { priority: q, seq });
                        freed += vsize;
                    }
                    Err(e) => {
                        self.stage_quarantine(Area::Lane(q), seq, value, e.to_string(), batch)
                    }
                }
            }
            if freed >= target {
                break;
            }
        }
        if freed >= needed {
            return Ok(evicted);
        }
        let uncommitted = batch.pending_lanes >> floor != 0;
        if allow_flush && uncommitted {
            Err(Room::Flush)
        } else {
            Err(full(evictable))
        }
    }

    /// The oldest committed record of lane `q` not yet deleted in this batch.
    fn next_victim(&self, q: u8, batch: &mut Batch) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let lane = usize::from(q);
        let from = batch
            .scan_from
            .get(lane)
            .copied()
            .flatten()
            .unwrap_or_else(|| self.state.lanes.get(lane).map_or(0, |l| l.cursor));
        let ks = self.keyspace(Area::Lane(q))?;
        for guard in ks.range(record::key(from)..) {
            let (k, v) = guard.into_inner().map_err(|e| self.engine(e))?;
            let Ok(seq) = record::seq_of(&k) else {
                continue;
            };
            if let Some(slot) = batch.scan_from.get_mut(lane) {
                *slot = Some(seq + 1);
            }
            if batch.deleted.contains(&(Area::Lane(q), seq)) {
                continue;
            }
            return Ok(Some((seq, v.to_vec())));
        }
        Ok(None)
    }

    fn ack(
        &mut self,
        priority: u8,
        seqs: &[u64],
        batch: &mut Batch,
    ) -> Result<AckReport, StoreError> {
        let area = Area::Lane(priority);
        let ks = self.keyspace(area)?.clone();
        let mut report = AckReport::default();
        // What a caught-up forwarder acknowledges was committed moments ago:
        // whether it is still queued, and its size, are known without a
        // lookup on disk (taken first: the lock is not held across those).
        let known: Vec<Option<Option<u64>>> = match self.shared.recent.lock() {
            Ok(recent) => seqs
                .iter()
                .map(|&seq| recent.stored_bytes(priority, seq))
                .collect(),
            Err(_) => Vec::new(),
        };
        let unknown: Vec<u64> = seqs
            .iter()
            .enumerate()
            .filter(|&(i, seq)| {
                !matches!(known.get(i), Some(Some(_))) && !batch.deleted.contains(&(area, *seq))
            })
            .map(|(_, &seq)| seq)
            .collect();
        let scanned = ScannedSizes::scan(&ks, &unknown);
        for (i, &seq) in seqs.iter().enumerate() {
            let stored = if batch.deleted.contains(&(area, seq)) {
                None
            } else if let Some(Some(known)) = known.get(i) {
                *known
            } else if let Some(found) = scanned.get(seq) {
                found
            } else {
                ks.size_of(record::key(seq))
                    .map_err(|e| self.engine(e))?
                    .map(|len| size_of(len as usize))
            };
            match stored {
                Some(bytes) => {
                    batch.delete(area, seq);
                    self.figures_sub(area, bytes);
                    self.state.counters.acked += 1;
                    report.deleted += 1;
                }
                None => {
                    self.state.counters.stale_acks += 1;
                    batch.dirty = true;
                    report.stale += 1;
                }
            }
        }
        Ok(report)
    }

    fn dead_letter(
        &mut self,
        priority: u8,
        seq: u64,
        reason: String,
        batch: &mut Batch,
    ) -> Result<Option<u64>, StoreError> {
        let area = Area::Lane(priority);
        let Some(value) = self.get(area, seq, batch)? else {
            return Ok(None);
        };
        let name = super::lane_name(priority);
        let event = match self.shared.seal_for(&name, seq).open::<Event>(&value) {
            Ok(event) => event,
            Err(e) => {
                self.stage_quarantine(area, seq, value, e.to_string(), batch);
                return Ok(None);
            }
        };
        let dl_seq = self.take_seq();
        let entry = DeadLetterEntry {
            event,
            original_seq: seq,
            reason,
            dead_lettered_at: Timestamp::now(),
        };
        let sealed = self
            .shared
            .seal_for(DEAD_LETTER, dl_seq)
            .seal(self.shared.epoch, &entry)
            .map_err(|source| StoreError::Record {
                keyspace: DEAD_LETTER.into(),
                seq: dl_seq,
                source,
            })?;
        tracing::warn!(
            priority,
            seq,
            dead_letter_seq = dl_seq,
            device = %entry.event.device,
            device_seq = entry.event.device_seq,
            reason = %entry.reason,
            "message moved to dead-letter"
        );
        batch.delete(area, seq);
        self.figures_sub(area, size_of(value.len()));
        self.figures_add(Area::DeadLetter, dl_seq, size_of(sealed.len()), None);
        batch.put(Area::DeadLetter, dl_seq, sealed);
        self.state.counters.dead_lettered += 1;
        Ok(Some(dl_seq))
    }

    fn requeue(&mut self, dl_seq: u64, batch: &mut Batch) -> Result<Option<u64>, StoreError> {
        let Some(value) = self.get(Area::DeadLetter, dl_seq, batch)? else {
            return Ok(None);
        };
        let entry = match self
            .shared
            .seal_for(DEAD_LETTER, dl_seq)
            .open::<DeadLetterEntry>(&value)
        {
            Ok(entry) => entry,
            Err(e) => {
                self.stage_quarantine(Area::DeadLetter, dl_seq, value, e.to_string(), batch);
                return Ok(None);
            }
        };
        let last = self.shared.priorities().saturating_sub(1);
        let priority = entry.event.priority.min(last);
        let name = super::lane_name(priority);
        let seq = self.take_seq();
        let sealed = self
            .shared
            .seal_for(&name, seq)
            .seal(self.shared.epoch, &entry.event)
            .map_err(|source| StoreError::Record {
                keyspace: name.clone(),
                seq,
                source,
            })?;
        batch.delete(Area::DeadLetter, dl_seq);
        self.figures_sub(Area::DeadLetter, size_of(value.len()));
        self.figures_add(
            Area::Lane(priority),
            seq,
            size_of(sealed.len()),
            Some(entry.event.received_at),
        );
        batch.put(Area::Lane(priority), seq, sealed);
        batch.pending_lanes |= 1 << priority;
        self.state.counters.requeued += 1;
        tracing::info!(
            dead_letter_seq = dl_seq,
            priority,
            seq,
            "dead letter requeued"
        );
        Ok(Some(seq))
    }

    fn purge(&mut self, dl_seq: u64, batch: &mut Batch) -> Result<bool, StoreError> {
        let Some(value) = self.get(Area::DeadLetter, dl_seq, batch)? else {
            return Ok(false);
        };
        batch.delete(Area::DeadLetter, dl_seq);
        self.figures_sub(Area::DeadLetter, size_of(value.len()));
        self.state.counters.purged += 1;
        tracing::warn!(dead_letter_seq = dl_seq, "dead letter purged by operator");
        Ok(true)
    }

    fn quarantine_if_bad(
        &mut self,
        area: Area,
        seq: u64,
        reason: String,
        batch: &mut Batch,
    ) -> Result<bool, StoreError> {
        let Some(value) = self.get(area, seq, batch)? else {
            return Ok(false);
        };
        let name = self.area_name(area);
        let seal = self.shared.seal_for(&name, seq);
        let still_bad = match area {
            Area::Lane(_) => seal.open::<Event>(&value).is_err(),
            Area::DeadLetter => seal.open::<DeadLetterEntry>(&value).is_err(),
            Area::Quarantine => false,
        };
        if still_bad {
            self.stage_quarantine(area, seq, value, reason, batch);
        }
        Ok(still_bad)
    }

    /// Quarantines `seq` if fjall still cannot read it as damaged.
    fn quarantine_unreadable(
        &mut self,
        area: Area,
        seq: u64,
        reason: &str,
        batch: &mut Batch,
    ) -> Result<bool, StoreError> {
        if batch.deleted.contains(&(area, seq)) {
            return Ok(false);
        }
        let ks = self.keyspace(area)?.clone();
        let got = ks.get(record::key(seq));
        match got {
            Ok(_) => Ok(false),
            Err(e) if super::scan::is_damage(&e) => {
                // A table whose index or filter does not read fails every
                // read in its range, though its records may all be intact:
                // take it out (reading its data blocks) after this batch, and
                // quarantine nothing yet.
                if let Some(table) = self.damage.unsound_index_covering(area, &ks, seq)
                    && self.damage.take_out_next(table)
                {
                    return Ok(false);
                }
                self.stage_unreadable(area, seq, reason, batch);
                Ok(true)
            }
            Err(e) => Err(self.engine(e)),
        }
    }

    /// Quarantines a record fjall cannot read: a quarantine entry with the
    /// reason and no bytes, and a tombstone over the damaged key so reads go
    /// past it. Its size is not known; the lane's average is taken off.
    fn stage_unreadable(&mut self, from: Area, seq: u64, reason: &str, batch: &mut Batch) {
        let average = match from {
            Area::Lane(p) => self
                .state
                .lanes
                .get(usize::from(p))
                .map_or(0, |l| l.bytes / l.messages.max(1)),
            Area::DeadLetter => {
                self.state.dead_letter.bytes / self.state.dead_letter.messages.max(1)
            }
            Area::Quarantine => 0,
        };
        let keyspace = self.area_name(from);
        tracing::error!(
            keyspace = %keyspace,
            seq,
            reason = %reason,
            "stored record cannot be read (damaged table block); quarantined without its bytes"
        );
        let entry = QuarantineEntry {
            keyspace,
            seq,
            reason: format!("unreadable: {reason}"),
            quarantined_at: Timestamp::now(),
            raw: Vec::new(),
        };
        let Ok(encoded) = record::encode_quarantine(&entry) else {
            return;
        };
        let qseq = self.take_seq();
        self.damage.suspect();
        batch.delete(from, seq);
        self.figures_sub(from, average);
        self.figures_add(Area::Quarantine, qseq, size_of(encoded.len()), None);
        batch.put(Area::Quarantine, qseq, encoded.into());
        self.state.counters.quarantined += 1;
    }

    fn stage_quarantine(
        &mut self,
        from: Area,
        seq: u64,
        raw: Vec<u8>,
        reason: String,
        batch: &mut Batch,
    ) {
        let keyspace = self.area_name(from);
        tracing::error!(
            keyspace = %keyspace,
            seq,
            reason = %reason,
            "stored record failed authentication or decoding; moved to quarantine"
        );
        let raw_len = raw.len();
        let entry = QuarantineEntry {
            keyspace,
            seq,
            reason,
            quarantined_at: Timestamp::now(),
            raw,
        };
        let Ok(encoded) = record::encode_quarantine(&entry) else {
            // postcard cannot fail on this struct; leave the record where it is.
            return;
        };
        let qseq = self.take_seq();
        batch.delete(from, seq);
        self.figures_sub(from, size_of(raw_len));
        self.figures_add(Area::Quarantine, qseq, size_of(encoded.len()), None);
        batch.put(Area::Quarantine, qseq, encoded.into());
        self.state.counters.quarantined += 1;
    }

    /// Looks for damaged tables when fjall reports a failed compaction or a
    /// record could not be read (when, `salvage::Watch` says), and takes out
    /// each one found (see [`super::salvage`]). The look (a read of every
    /// table of the lanes, dead-letter and quarantine) runs on its own
    /// thread; the take-out runs here, between batches: appends wait for it,
    /// which only happens after the disk has damaged something.
    fn take_out_damaged_tables(&mut self) {
        if self.fatal.is_some() {
            return;
        }
        if let Some(found) = self.damage.take_found() {
            self.take_out_found(found);
            return;
        }
        if !self
            .damage
            .start_if_due(self.shared.db.failed_compactions())
        {
            return;
        }
        let shared = Arc::downgrade(&self.shared);
        if !super::salvage::start_look(shared.clone(), self.commands.clone(), |tables| {
            Command::DamageFound { tables }
        }) {
            // No thread for it: look here.
            self.damage.look_ran_in_place();
            let found = super::salvage::damaged_tables(&shared);
            self.take_out_found(found);
        }
    }

    /// Takes out what a look found.
    fn take_out_found(&mut self, mut damaged: Vec<super::salvage::DamagedTable>) {
        damaged.retain(|t| {
            self.keyspace(t.area)
                .is_ok_and(|ks| super::salvage::still_holds(ks, t.id))
        });
        if damaged.is_empty() {
            let next = self.damage.back_off();
            tracing::warn!(
                failed_compactions = self.damage.failed_seen(),
                next_look_in = ?next,
                "fjall reported a failed compaction or an unreadable record, but no lane, \
                 dead-letter or quarantine table fails to read whole: the damage is in `meta` \
                 or gone. Check the disk; drain the store and move it aside if compactions \
                 keep failing"
            );
        }
        let mut overlapped = false;
        for table in &damaged {
            let started = Instant::now();
            match self.take_out(table) {
                Ok(taken) => {
                    overlapped |= taken.overlapped;
                    self.damage.took_out();
                    self.shared
                        .metrics
                        .damaged_tables_removed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        keyspace = %self.area_name(table.area),
                        table = table.id,
                        first_seq = table.first,
                        last_seq = table.last,
                        kept = taken.kept,
                        unreadable = taken.unreadable,
                        deleted_again = taken.deleted_again,
                        took_ms = started.elapsed().as_millis() as u64,
                        damage = %table.why,
                        "a damaged store table was taken out: its readable records were written \
                         again, its unreadable ones are quarantined. The disk corrupted data: \
                         check it (SMART, dmesg) and plan to replace it"
                    );
                }
                Err(e) => {
                    // Tried again later, but not every 30 s, and reads stop
                    // waiting for it.
                    self.damage.give_up(table.area, table.id);
                    let next = self.damage.back_off();
                    tracing::error!(
                        keyspace = %self.area_name(table.area),
                        table = table.id,
                        error = %e,
                        next_look_in = ?next,
                        "could not take a damaged store table out; fjall's compactions over it \
                         keep failing. Drain the store and move it aside (see the README)"
                    );
                }
            }
            if self.fatal.is_some() {
                return;
            }
        }
        // What the rewrites quarantined was in the tables just taken out.
        let failed_now = (!damaged.is_empty()).then(|| self.shared.db.failed_compactions());
        self.damage.settled(failed_now, overlapped);
    }

    /// Takes one damaged table out of its area (a lane, dead-letter or
    /// quarantine). Every record still in its key range that opens is written
    /// again under its own key (the same sealed bytes: a newer version of it
    /// in the memtable, so its seq, its place in the lane and the forwarder's
    /// view of it stay as they were); one that does not open, or that fjall
    /// cannot read, is quarantined (a quarantine entry is kept as found). Each
    /// batch of those also deletes a fresh seq past the range, so the table a
    /// flush makes of it never lies wholly inside the range. Committed with an
    /// fsync; then fjall drops every table lying wholly inside the range (the
    /// damaged one among them: everything live in them has a newer copy), and
    /// whatever the drop brings back into view (an older copy whose
    /// tombstone was in a dropped table) is deleted again.
    fn take_out(&mut self, table: &super::salvage::DamagedTable) -> Result<TakenOut, StoreError> {
        use fjall::AbstractTree as _;
        let shared = self.shared.clone();
        let area = table.area;
        let name = self.area_name(area);
        let ks = self.keyspace(area)?.clone();
        let mut taken = TakenOut::default();
        // In seq order, as visited.
        let mut kept = Vec::new();
        let lanes = self.state.lanes.len();
        let mut batch = Batch::new(lanes);
        // Seqs whose point read failed on the damage, settled after the loop.
        let mut failed = Vec::new();
        // With its index or filter unsound every point read in the range
        // would fail (each reading the damaged block again): every seq is
        // settled from the table's data blocks and the other tables instead.
        let point_reads = match table.index_unsound {
            true => None,
            false => Some(table.first..=table.last),
        };
        for seq in point_reads.into_iter().flatten() {
            match ks.get(record::key(seq)) {
                Ok(None) => {}
                Ok(Some(value)) => {
                    self.keep_or_quarantine(area, &name, seq, value.to_vec(), &mut batch, &mut kept)
                }
                Err(e) if super::scan::is_damage(&e) => failed.push(seq),
                Err(e) => return Err(self.engine(e)),
            }
            if batch.ops.len() >= self.max_batch {
                let full = std::mem::replace(&mut batch, Batch::new(lanes));
                self.commit_fenced(full, area)?;
            }
        }
        if table.index_unsound {
            let mut all = table.first..=table.last;
            self.rescue(table, &name, &mut all, &mut batch, &mut kept, &mut taken)?;
        } else if !failed.is_empty() {
            let mut failed = failed.into_iter();
            self.rescue(table, &name, &mut failed, &mut batch, &mut kept, &mut taken)?;
            kept.sort_unstable();
        }
        self.commit_fenced(batch, area)?;
        ks.tree
            .drop_range(record::key(table.first)..=record::key(table.last))
            .map_err(|e| StoreError::engine(&shared.dir, e.into()))?;
        let mut batch = Batch::new(lanes);
        for guard in ks.range(record::key(table.first)..=record::key(table.last)) {
            match guard.into_inner() {
                Ok((k, _)) => {
                    if let Ok(seq) = record::seq_of(&k)
                        && kept.binary_search(&seq).is_err()
                    {
                        batch.delete(area, seq);
                        taken.deleted_again += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        keyspace = %name,
                        error = ?e,
                        "another damaged table overlaps the one taken out; it is looked for next time"
                    );
                    taken.overlapped = true;
                    break;
                }
            }
        }
        self.commit_or_fail(batch)?;
        taken.kept = kept.len() as u64;
        Ok(taken)
    }

    /// Writes a record read during a take-out again under its own key, or
    /// quarantines it when it does not open.
    fn keep_or_quarantine(
        &mut self,
        area: Area,
        name: &str,
        seq: u64,
        value: Vec<u8>,
        batch: &mut Batch,
        kept: &mut Vec<u64>,
    ) {
        let seal = self.shared.seal_for(name, seq);
        let opened = match area {
            Area::Lane(_) => seal.open::<Event>(&value).map(drop),
            Area::DeadLetter => seal.open::<DeadLetterEntry>(&value).map(drop),
            // Kept as found, whatever it holds: it is the evidence.
            Area::Quarantine => Ok(()),
        };
        match opened {
            Ok(()) => {
                batch.put(area, seq, value.into());
                kept.push(seq);
            }
            Err(e) => self.stage_quarantine(area, seq, value, e.to_string(), batch),
        }
    }

    /// Settles the seqs of a take-out whose point reads failed: the damaged
    /// table's data blocks are read in order without its index (a damaged
    /// index or filter fails every point read in its range, though the
    /// records may all be intact), and each failed seq takes the newest of
    /// the damaged table's entry and every other table's: a record is kept
    /// (or quarantined when it does not open), a deletion stays a deletion.
    /// A seq with neither is quarantined as unreadable only when a stretch
    /// of the table that did not read could have held it.
    fn rescue(
        &mut self,
        table: &super::salvage::DamagedTable,
        name: &str,
        failed: &mut dyn Iterator<Item = u64>,
        batch: &mut Batch,
        kept: &mut Vec<u64>,
        taken: &mut TakenOut,
    ) -> Result<(), StoreError> {
        use fjall::salvage::{Found, InternalValue, ValueType};
        let area = table.area;
        let ks = self.keyspace(area)?.clone();
        let lanes = self.state.lanes.len();
        let fjall::AnyTree::Standard(tree) = &ks.tree else {
            for seq in failed {
                self.stage_unreadable(area, seq, &table.why, batch);
                taken.unreadable += 1;
            }
            return Ok(());
        };
        // Settles one failed seq given the damaged table's entry for it (if
        // it read) and whether a stretch that did not read could hold it.
        let mut settle = |this: &mut Self,
                          seq: u64,
                          here: Option<InternalValue>,
                          maybe_lost: bool,
                          batch: &mut Batch|
         -> Result<(), StoreError> {
            let elsewhere = match tree.newest_entry(&record::key(seq), Some(table.id)) {
                Ok(e) => e,
                // Another damaged table: counted as unreadable, as before.
                Err(e) => {
                    this.stage_unreadable(area, seq, &format!("{e:?}"), batch);
                    taken.unreadable += 1;
                    return Ok(());
                }
            };
            let newest = match (here, elsewhere) {
                (Some(a), Some(b)) => Some(if a.key.seqno >= b.key.seqno { a } else { b }),
                (a, b) => a.or(b),
            };
            match newest {
                Some(entry) if entry.key.value_type == ValueType::Value => {
                    this.keep_or_quarantine(area, name, seq, entry.value.to_vec(), batch, kept);
                }
                // Deleted (or a value kept apart, which Vigil never writes).
                Some(_) => {}
                None if maybe_lost => {
                    this.stage_unreadable(area, seq, &table.why, batch);
                    taken.unreadable += 1;
                }
                None => {}
            }
            if batch.ops.len() >= this.max_batch {
                let full = std::mem::replace(batch, Batch::new(lanes));
                this.commit_fenced(full, area)?;
            }
            Ok(())
        };
        let mut failed = failed.peekable();
        let mut lost_since_last = false;
        let mut last_seq = None;
        let mut stopped = None;
        let walked = fjall::salvage::salvage(&table.path, |found| {
            let item = match found {
                Found::Unreadable => {
                    lost_since_last = true;
                    return Ok(());
                }
                Found::Item(item) => item,
            };
            let Ok(seq) = record::seq_of(&item.key.user_key) else {
                return Ok(());
            };
            // A key's versions come newest first.
            if last_seq == Some(seq) {
                return Ok(());
            }
            last_seq = Some(seq);
            let mut settle_one = |seq, here| {
                settle(self, seq, here, lost_since_last, batch).map_err(|e| {
                    stopped = Some(e);
                    fjall::LsmError::Unrecoverable
                })
            };
            while let Some(before) = failed.next_if(|&f| f < seq) {
                settle_one(before, None)?;
            }
            if failed.next_if_eq(&seq).is_some() {
                settle_one(seq, Some(item))?;
            }
            lost_since_last = false;
            Ok(())
        });
        if let Some(e) = stopped {
            return Err(e);
        }
        let tail_lost = match walked {
            Ok(w) => lost_since_last || !w.end_known,
            Err(e) => {
                tracing::warn!(
                    keyspace = %name,
                    table = table.id,
                    error = ?e,
                    "the damaged table's file could not be read through; what it holds past \
                     the point reached is quarantined as unreadable"
                );
                true
            }
        };
        for seq in failed {
            settle(self, seq, None, tail_lost, batch)?;
        }
        Ok(())
    }

    /// Commits one batch of [`Self::take_out`]'s rewrites together with the
    /// deletion of a fresh seq (nothing was ever stored there): the table a
    /// flush makes of that memtable then reaches past the damaged range, so
    /// `drop_range` cannot drop the rewritten copies with the damaged table.
    fn commit_fenced(&mut self, mut batch: Batch, area: Area) -> Result<(), StoreError> {
        if batch.ops.is_empty() {
            return Ok(());
        }
        let fence = self.take_seq();
        batch.ops.push(Op::Delete(area, fence));
        batch.dirty = true;
        self.commit_or_fail(batch)
    }

    /// Commits `batch` (no replies wait on it) and says whether the store is
    /// still healthy.
    fn commit_or_fail(&mut self, batch: Batch) -> Result<(), StoreError> {
        self.commit(batch);
        match &self.fatal {
            Some(reason) => Err(StoreError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    fn gap_state(&mut self, lane: u8, device: &str) -> Result<Option<GapState>, StoreError> {
        let k = (lane, device.to_string());
        if let Some(g) = self.gaps.get(&k) {
            return Ok(*g);
        }
        let g = match self
            .shared
            .meta
            .get(gap_key(lane, device))
            .map_err(|e| self.engine(e))?
        {
            Some(v) => Some(
                postcard::from_bytes(&v).map_err(|e| StoreError::MetaCorrupt {
                    key: format!("gap/{lane}/{device}"),
                    why: e.to_string(),
                })?,
            ),
            None => None,
        };
        self.gaps.insert(k, g);
        Ok(g)
    }

    /// Turns this batch's evictions into gap-notice events in lane 0.
    fn emit_gap_notices(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        let evictions = std::mem::take(&mut batch.evictions);
        for ((lane, device), delta) in evictions {
            let mut range = delta;
            if let Some(prev) = self.gap_state(lane, &device)? {
                // The earlier notice is still queued: replace it with a superset.
                if let Some(old) = self.get(Area::Lane(0), prev.notice_seq, batch)? {
                    batch.delete(Area::Lane(0), prev.notice_seq);
                    self.figures_sub(Area::Lane(0), size_of(old.len()));
                    range = prev.range.merge(delta);
                }
            }
            let payload = GapNoticePayload {
                device: &device,
                priority: lane,
                first_seq: range.first,
                last_seq: range.last,
                count: range.count,
                first_received_at: range.first_received_at.to_rfc3339(),
                last_received_at: range.last_received_at.to_rfc3339(),
                reason: "evicted: the store quota was full",
            };
            let payload = serde_json::to_vec(&payload)
                .map_err(|e| StoreError::Persist(format!("cannot encode a gap notice: {e}")))?;
            let device_seq = self.peek_device_seq(VIGIL_DEVICE)?;
            self.take_device_seq(VIGIL_DEVICE, device_seq, batch);
            let ingest = Ingest {
                kind: Kind::GapNotice,
                priority: 0,
                device: VIGIL_DEVICE.into(),
                topic: GAP_NOTICE_TOPIC.into(),
                qos: Qos::AtLeastOnce,
                retain: false,
                received_at: Timestamp::now(),
                content_type: Some("application/json".into()),
                user_properties: Vec::new(),
                payload: Bytes::from(payload),
            };
            let event = Event::from_ingest(ingest, Uuid::now_v7(), device_seq);
            let seq = self.take_seq();
            let name = super::lane_name(0);
            let sealed = self
                .shared
                .seal_for(&name, seq)
                .seal(self.shared.epoch, &event)
                .map_err(|source| StoreError::Record {
                    keyspace: name,
                    seq,
                    source,
                })?;
            self.figures_add(
                Area::Lane(0),
                seq,
                size_of(sealed.len()),
                Some(event.received_at),
            );
            batch.put(Area::Lane(0), seq, sealed);
            self.state.counters.gap_notices += 1;
            let state = GapState {
                notice_seq: seq,
                range,
            };
            let encoded = postcard::to_allocvec(&state)
                .map_err(|e| StoreError::Persist(format!("cannot encode a gap record: {e}")))?;
            batch.ops.push(Op::Meta(gap_key(lane, &device), encoded));
            self.gaps.insert((lane, device.clone()), Some(state));
            tracing::warn!(
                device = %device,
                priority = lane,
                evicted = delta.count,
                first_seq = delta.first,
                last_seq = delta.last,
                "store quota full: evicted messages; a gap notice will tell the cloud"
            );
        }
        Ok(())
    }

    fn commit(&mut self, mut batch: Batch) {
        #[cfg(any(test, feature = "ablation"))]
        if self.shared.ablation == Some(super::ablation::Ablation::Engine) {
            batch.dirty = false;
        }
        let outcome = if self.fatal.is_some() || !batch.dirty {
            Ok(())
        } else {
            self.write(&mut batch)
        };
        if let Err(e) = outcome {
            let reason = match &e {
                StoreError::Persist(m) => m.clone(),
                other => other.to_string(),
            };
            tracing::error!(
                error = %reason,
                dir = %self.shared.dir.display(),
                "FATAL: the store could not persist a batch (write or fsync failed); no further \
                 message will be acknowledged. Check the disk, then restart Vigil to recover"
            );
            self.fatal = Some(reason.clone());
            self.shared.fatal.send_replace(Some(reason));
            let err = StoreError::Persist(self.fatal.clone().unwrap_or_default());
            for reply in batch.replies {
                reply.send(Some(&err));
            }
            return;
        }
        let deleted = !batch.heads.is_empty();
        let mut emptied = Vec::new();
        for lane in std::mem::take(&mut batch.heads) {
            let gone = |seq| batch.deleted.contains(&(Area::Lane(lane), seq));
            match scan::refresh_head(&self.shared, &mut self.state, lane, gone) {
                Err(e) => {
                    tracing::warn!(priority = lane, error = %e, "could not find the lane's new head");
                }
                // Nothing from the old head on: the lane is empty on disk,
                // and every later record will pass through `recent`.
                Ok(()) if self.lane_is_empty(lane) => {
                    emptied.push(Change::Emptied(lane, self.state.next_seq));
                }
                Ok(()) => {}
            }
        }
        if !emptied.is_empty()
            && let Ok(mut recent) = self.shared.recent.lock()
        {
            recent.apply(emptied);
        }
        if let Ok(mut shared) = self.shared.stats.write() {
            shared.clone_from(&self.state);
        }
        for (counter, n) in self.shared.metrics.ingested.iter().zip(&batch.ingested) {
            counter.fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
        }
        for reply in batch.replies.drain(..) {
            reply.send(None);
        }
        self.spare = Spare::of(&mut batch);
        self.deleted_since_reclaim |= deleted;
        if deleted || self.disk_low() {
            self.maybe_reclaim();
        }
        if self.devices.len() > CACHE_LIMIT {
            self.devices.clear();
        }
        if self.gaps.len() > CACHE_LIMIT {
            self.gaps.clear();
        }
    }

    /// Whether the lane's head, as last found, is past every record.
    fn lane_is_empty(&self, lane: u8) -> bool {
        self.state
            .lanes
            .get(usize::from(lane))
            .is_some_and(|l| l.cursor >= self.state.next_seq && l.oldest.is_none())
    }

    /// Whether free space is under twice the reserve.
    fn disk_low(&self) -> bool {
        self.free.is_some_and(|f| f < self.low_watermark())
    }

    /// Free bytes below which the disk counts as low: twice the reserve.
    fn low_watermark(&self) -> u64 {
        self.min_free.saturating_mul(2)
    }

    /// Asks for a reclaim when the lanes have drained after
    /// [`RECLAIM_AFTER_BYTES`] of appends, or, at most every
    /// [`RECLAIM_INTERVAL`], when the disk is low, records were deleted since
    /// the last one, and the backlog has shrunk to half the reserve (a flush
    /// and a compaction write what is still live before the old files go, so
    /// that must fit well inside the reserve). Called after deletions and,
    /// while the disk is low, after every batch. A reclaim asked for because
    /// the disk is low is followed up by the reclaimer itself while the disk
    /// stays low (`space::FOLLOW_UPS`): deletions after it, when no later
    /// batch comes to ask again, are still given back.
    fn maybe_reclaim(&mut self) {
        let empty = self.state.lanes.iter().all(|l| l.messages == 0);
        let drained = empty && self.appended_since_reclaim >= RECLAIM_AFTER_BYTES;
        let due = self
            .last_reclaim
            .is_none_or(|t| t.elapsed() >= RECLAIM_INTERVAL);
        let shrinking = self.disk_low()
            && due
            && self.deleted_since_reclaim
            && self.state.used_bytes() <= self.min_free / 2;
        if drained || shrinking {
            self.appended_since_reclaim = 0;
            self.deleted_since_reclaim = false;
            self.last_reclaim = Some(Instant::now());
            self.reclaimer
                .request(shrinking.then_some(self.low_watermark()));
        }
    }

    fn write(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        if batch.sync {
            self.shared.hold.wait();
        }
        self.emit_gap_notices(batch)?;
        let mode = match (batch.sync, self.durability) {
            (true, Durability::SyncData) => PersistMode::SyncData,
            _ => PersistMode::Buffer,
        };
        // What the batch does to the lanes, for `recent` once committed.
        let mut changes = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            match op {
                Op::Put(Area::Lane(p), seq, _) => changes.push(
                    if batch.fresh.front().is_some_and(|f| f.seq == *seq)
                        && let Some(event) = batch.fresh.pop_front()
                    {
                        Change::Append(*p, event)
                    } else {
                        Change::Put(*p, *seq)
                    },
                ),
                Op::Delete(Area::Lane(p), seq) => changes.push(Change::Delete(*p, *seq)),
                _ => {}
            }
        }
        let queued_more = changes
            .iter()
            .any(|c| matches!(c, Change::Append(..) | Change::Put(..)));
        let state = postcard::to_allocvec(&self.state)
            .map_err(|e| StoreError::Persist(format!("cannot encode the store state: {e}")))?;
        #[cfg(any(test, feature = "ablation"))]
        let logged = self.write_to_ablation_log(batch, &state, mode)?;
        #[cfg(not(any(test, feature = "ablation")))]
        let logged = false;
        if !logged {
            let items = batch.ops.len() + batch.devices.len() + 1;
            let mut wb = fjall::OwnedWriteBatch::with_capacity(self.shared.db.clone(), items)
                .durability(Some(mode));
            for op in batch.ops.drain(..) {
                match op {
                    Op::Put(area, seq, value) => {
                        wb.insert(self.keyspace(area)?, record::key(seq), value)
                    }
                    Op::Delete(area, seq) => wb.remove(self.keyspace(area)?, record::key(seq)),
                    Op::Meta(k, v) => wb.insert(&self.shared.meta, k, v),
                }
            }
            for device in &batch.devices {
                if let Some(last) = self.devices.get(device) {
                    wb.insert(
                        &self.shared.meta,
                        dev_key(device),
                        last.to_be_bytes().to_vec(),
                    );
                }
            }
            wb.insert(&self.shared.meta, STATE_KEY, state);
            let started = Instant::now();
            wb.commit()
                .map_err(|e| StoreError::Persist(format!("{e:?}")))?;
            if batch.sync {
                self.shared
                    .metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        // Committed: the caught-up reads may see it now, before the signal.
        if !changes.is_empty()
            && let Ok(mut recent) = self.shared.recent.lock()
        {
            recent.apply(changes);
        }
        if queued_more {
            self.shared.appends.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// The `log` ablation's commit, in place of fjall's: what fjall's batch
    /// would hold (records, device counters, state), written once to a plain
    /// file and fdatasynced when fjall's would be (see [`super::ablation`]).
    /// False, with nothing done, unless that ablation is on.
    #[cfg(any(test, feature = "ablation"))]
    fn write_to_ablation_log(
        &mut self,
        batch: &mut Batch,
        state: &[u8],
        mode: PersistMode,
    ) -> Result<bool, StoreError> {
        let Some(log) = self.log.as_mut() else {
            return Ok(false);
        };
        for op in batch.ops.drain(..) {
            match op {
                Op::Put(_, seq, value) => log.push(&record::key(seq), &value),
                Op::Delete(_, seq) => log.push(&record::key(seq), &[]),
                Op::Meta(k, v) => log.push(&k, &v),
            }
        }
        for device in &batch.devices {
            if let Some(last) = self.devices.get(device) {
                log.push(&dev_key(device), &last.to_be_bytes());
            }
        }
        log.push(STATE_KEY, state);
        log.commit(mode == PersistMode::SyncData)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deletes(n: u64) -> impl Iterator<Item = Op> {
        (0..n).map(|seq| Op::Delete(Area::Lane(0), seq))
    }

    #[test]
    fn a_batch_starts_in_the_last_batchs_emptied_vectors() {
        let mut batch = Batch::new(3);
        batch.ops.extend(deletes(100));
        batch.dirty = true;
        let spare = Spare::of(&mut batch);
        let next = Batch::reusing(3, spare);
        assert!(
            next.ops.is_empty(),
            "nothing of the last batch is carried over"
        );
        assert!(next.ops.capacity() >= 100, "its room is");
        assert!(!next.dirty && next.replies.is_empty() && next.fresh.is_empty());
    }

    #[test]
    fn a_vector_past_the_bound_is_dropped_not_kept() {
        let mut batch = Batch::new(3);
        batch.ops.extend(deletes(Spare::MAX_KEPT as u64 + 1));
        let spare = Spare::of(&mut batch);
        assert_eq!(spare.ops.capacity(), 0);
    }
}
