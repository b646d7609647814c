//! The records committed last in each lane, kept in memory so a forwarder
//! that has caught up reads them without going to disk.
//!
//! A caught-up forwarder reads each message right after its commit. From the
//! disk that is a hop to a blocking thread, a fjall range scan and an
//! AES-GCM open per record, on the latency path of every message (row 4 of
//! the benchmark). The writer already has each record's event in hand when it
//! commits, so after every successful commit it hands the lane records of
//! the batch to [`Recent`]; [`Recent::read`] answers a read from memory when
//! it holds every record of the lane after the reader's position, and says
//! it cannot otherwise (the caller then scans the disk as before).
//!
//! Correctness rests on one invariant per lane: every record of the lane
//! with a seq at or above `covers_from` is in `records`, and nothing else is.
//! The writer keeps it by applying, after each commit and in the batch's
//! order, every put to a lane (an append pushes its event; any other put,
//! such as a requeue, resets the lane past it and past every record kept) and
//! every deletion from a lane (removed here too). Records enter only after their commit (so a
//! reader never sees what is not on disk) and before the append signal is
//! sent (so a woken reader finds them).
//!
//! A reader that has sent nothing from a lane yet (a fresh connection, or a
//! lane that has been empty since) reads "from the head", not "after a seq".
//! That is answered here too when the lane is known to be *complete*: every
//! live record of the lane is in `records`. The writer says so when a commit
//! leaves a lane empty (it finds the head again after deletions; finding
//! nothing from the old head on, the lane is empty on disk), and at open for
//! each lane found empty; the lane then stays complete while appends are
//! kept and stops being complete when one is not (a put without its event, a
//! record dropped from the bounded window). Without this, each append signal
//! sent a reader at a lane it never used (lane 0 when devices publish at
//! priority 1) to the disk through a blocking thread, before the lane the
//! new message was in: on the latency path of every message.
//!
//! Bounded: at most [`MAX_RECORDS`] records and [`MAX_BYTES`] of stored
//! bytes per lane; the oldest go first and `covers_from` moves past them.
//! With a backlog (more than [`KEEP_UP_TO_QUEUED`] queued in the lane) the
//! writer keeps nothing: the reader is far behind and reads from disk.

use std::collections::VecDeque;
use std::sync::Arc;

use super::StoredEvent;

/// Records kept per lane at most.
pub(super) const MAX_RECORDS: usize = 256;
/// Stored bytes kept per lane at most.
pub(super) const MAX_BYTES: u64 = 512 << 10;

/// The writer keeps an appended record only while its lane holds at most
/// this many: beyond it a forwarder reads from disk anyway (it cannot be
/// within [`MAX_RECORDS`] of the tail), and the lane is reset past the record.
pub(super) const KEEP_UP_TO_QUEUED: u64 = 4 * MAX_RECORDS as u64;

/// What a commit did to a lane, for [`Recent::apply`].
pub(super) enum Change {
    /// An appended record, with its event.
    Append(u8, Arc<StoredEvent>),
    /// A record put into the lane without its event at hand (a requeue, or a
    /// record written again under its own seq when a damaged table is taken
    /// out).
    Put(u8, u64),
    /// A record deleted from the lane (acknowledged, evicted, moved).
    Delete(u8, u64),
    /// The lane holds no record: every later one has a seq at or above the
    /// given one (the store's next seq when it was found empty).
    Emptied(u8, u64),
}

/// The last committed records of every lane.
pub(super) struct Recent {
    lanes: Vec<Lane>,
}

struct Lane {
    /// Every record of the lane with a seq at or above this is in `records`.
    covers_from: u64,
    /// Every live record of the lane is in `records` (none below
    /// `covers_from`): a read from the head can be answered.
    complete: bool,
    /// In seq order.
    records: VecDeque<Arc<StoredEvent>>,
    bytes: u64,
}

impl Lane {
    /// Forgets every record: only those from `from` on will be known, and
    /// the lane is not complete (older records may be live).
    fn reset(&mut self, from: u64) {
        self.records.clear();
        self.bytes = 0;
        self.covers_from = from;
        self.complete = false;
    }
}

impl Recent {
    /// Empty, for a store whose next seq is `next_seq`: every later record
    /// will pass through [`Recent::apply`].
    pub(super) fn new(lanes: usize, next_seq: u64) -> Self {
        Self {
            lanes: (0..lanes)
                .map(|_| Lane {
                    covers_from: next_seq,
                    complete: false,
                    records: VecDeque::new(),
                    bytes: 0,
                })
                .collect(),
        }
    }

    /// Applies a committed batch's changes, in the batch's order.
    pub(super) fn apply(&mut self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            match change {
                Change::Append(priority, record) => {
                    let Some(lane) = self.lanes.get_mut(usize::from(priority)) else {
                        continue;
                    };
                    let seq = record.seq;
                    if lane.records.back().is_some_and(|last| last.seq >= seq)
                        || seq < lane.covers_from
                    {
                        // Out of order: cannot happen with one writer
                        // handing out seqs in order; stay correct anyway.
                        lane.reset(seq.saturating_add(1));
                        continue;
                    }
                    lane.bytes += record.stored_bytes;
                    lane.records.push_back(record);
                    while lane.records.len() > MAX_RECORDS || lane.bytes > MAX_BYTES {
                        let Some(oldest) = lane.records.pop_front() else {
                            break;
                        };
                        lane.bytes -= oldest.stored_bytes;
                        lane.covers_from = oldest.seq.saturating_add(1);
                        // It is still stored, and no longer here.
                        lane.complete = false;
                    }
                }
                Change::Put(priority, seq) => {
                    if let Some(lane) = self.lanes.get_mut(usize::from(priority)) {
                        if seq >= lane.covers_from {
                            // Start past the put and past every record kept
                            // (a put may rewrite a kept record, `salvage.rs`:
                            // those after it must not drop out of view).
                            let past_kept = lane.records.back().map_or(0, |r| r.seq + 1);
                            lane.reset(seq.saturating_add(1).max(past_kept));
                        } else {
                            // Below what is kept (cannot happen with seqs
                            // handed out in order): live, and not here.
                            lane.complete = false;
                        }
                    }
                }
                Change::Delete(priority, seq) => {
                    let Some(lane) = self.lanes.get_mut(usize::from(priority)) else {
                        continue;
                    };
                    if seq < lane.covers_from {
                        continue;
                    }
                    if let Ok(i) = lane.records.binary_search_by_key(&seq, |r| r.seq)
                        && let Some(gone) = lane.records.remove(i)
                    {
                        lane.bytes -= gone.stored_bytes;
                    }
                }
                Change::Emptied(priority, next_seq) => {
                    if let Some(lane) = self.lanes.get_mut(usize::from(priority)) {
                        lane.reset(next_seq);
                        lane.complete = true;
                    }
                }
            }
        }
    }

    /// Whether the lane holds `seq`, and its stored size: `Some(Some(bytes))`
    /// it does, `Some(None)` it does not, `None` not known here (look on
    /// disk). For acknowledgements of what a caught-up reader was given.
    pub(super) fn stored_bytes(&self, priority: u8, seq: u64) -> Option<Option<u64>> {
        let lane = self.lanes.get(usize::from(priority))?;
        if seq < lane.covers_from {
            return None;
        }
        Some(
            lane.records
                .binary_search_by_key(&seq, |r| r.seq)
                .ok()
                .and_then(|i| lane.records.get(i))
                .map(|r| r.stored_bytes),
        )
    }

    /// The lane's first records, up to `limit`, if this holds every live
    /// record of the lane; `None` if the disk must be read.
    pub(super) fn read_head(&self, priority: u8, limit: usize) -> Option<Vec<Arc<StoredEvent>>> {
        let lane = self.lanes.get(usize::from(priority))?;
        lane.complete
            .then(|| lane.records.iter().take(limit).cloned().collect())
    }

    /// The lane's records after `after`, up to `limit`, if this holds every
    /// one of them; `None` if the disk must be read.
    pub(super) fn read(
        &self,
        priority: u8,
        after: u64,
        limit: usize,
    ) -> Option<Vec<Arc<StoredEvent>>> {
        let lane = self.lanes.get(usize::from(priority))?;
        if after.saturating_add(1) < lane.covers_from {
            return None;
        }
        let start = lane.records.partition_point(|r| r.seq <= after);
        Some(lane.records.range(start..).take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Ingest, Kind, Qos, Timestamp};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn record(seq: u64, bytes: u64) -> Arc<StoredEvent> {
        let ingest = Ingest {
            kind: Kind::Measurement,
            priority: 0,
            device: "bed-1".into(),
            topic: "devices/bed-1/vitals/hr".into(),
            qos: Qos::AtLeastOnce,
            retain: false,
            received_at: Timestamp(0),
            content_type: None,
            user_properties: Vec::new(),
            payload: bytes::Bytes::from_static(b"{}"),
        };
        Arc::new(StoredEvent {
            seq,
            stored_bytes: bytes,
            body: Event::from_ingest(ingest, uuid::Uuid::nil(), seq),
        })
    }

    #[derive(Debug, Clone)]
    enum Step {
        Append(u64),
        Put,
        /// A record of the lane written again under its own seq (a damaged
        /// table taken out, `salvage.rs`): the lane's content is unchanged.
        Rewrite(usize),
        Delete(usize),
        Read(usize, usize),
        /// The writer found the lane empty (only taken when it is).
        Emptied,
        ReadHead(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1u64..40_000).prop_map(Step::Append),
            1 => Just(Step::Put),
            2 => (0usize..1000).prop_map(Step::Rewrite),
            4 => (0usize..1000).prop_map(Step::Delete),
            4 => (0usize..1000, 1usize..300).prop_map(|(a, l)| Step::Read(a, l)),
            2 => Just(Step::Emptied),
            3 => (1usize..300).prop_map(Step::ReadHead),
        ]
    }

    proptest! {
        /// Against a model of the lane (the set of seqs in it): whenever
        /// `read` or `read_head` answers, it answers exactly what a scan of
        /// the lane would.
        #[test]
        fn a_read_it_answers_is_what_the_lane_holds(steps in proptest::collection::vec(step(), 1..400)) {
            let mut recent = Recent::new(1, 1);
            let mut lane = BTreeSet::new();
            let mut next = 1u64;
            let (mut emptied_once, mut answered_head) = (false, false);
            for s in steps {
                match s {
                    Step::Append(bytes) => {
                        recent.apply([Change::Append(0, record(next, bytes))]);
                        lane.insert(next);
                        next += 1;
                    }
                    Step::Put => {
                        recent.apply([Change::Put(0, next)]);
                        lane.insert(next);
                        next += 1;
                    }
                    Step::Rewrite(i) => {
                        if let Some(&seq) = lane.iter().nth(i % lane.len().max(1)) {
                            recent.apply([Change::Put(0, seq)]);
                        }
                    }
                    Step::Delete(i) => {
                        if let Some(&seq) = lane.iter().nth(i % lane.len().max(1)) {
                            recent.apply([Change::Delete(0, seq)]);
                            lane.remove(&seq);
                        }
                    }
                    Step::Read(a, limit) => {
                        let after = (a as u64) % next;
                        if let Some(got) = recent.read(0, after, limit) {
                            let got: Vec<u64> = got.iter().map(|r| r.seq).collect();
                            let want: Vec<u64> = lane.range(after + 1..).take(limit).copied().collect();
                            prop_assert_eq!(got, want);
                        }
                    }
                    Step::Emptied => {
                        if lane.is_empty() {
                            recent.apply([Change::Emptied(0, next)]);
                            emptied_once = true;
                        }
                    }
                    Step::ReadHead(limit) => {
                        if let Some(got) = recent.read_head(0, limit) {
                            let got: Vec<u64> = got.iter().map(|r| r.seq).collect();
                            let want: Vec<u64> = lane.iter().take(limit).copied().collect();
                            prop_assert_eq!(got, want);
                            answered_head = true;
                        }
                    }
                }
                if let Some(known) = recent.stored_bytes(0, next) {
                    prop_assert_eq!(known, None);
                }
                for seq in 0..next {
                    if let Some(known) = recent.stored_bytes(0, seq) {
                        prop_assert_eq!(known.is_some(), lane.contains(&seq));
                    }
                }
                let l = &recent.lanes[0];
                prop_assert!(l.records.len() <= MAX_RECORDS && l.bytes <= MAX_BYTES);
            }
            // Never complete before the writer says the lane is empty.
            prop_assert!(emptied_once || !answered_head);
        }
    }

    #[test]
    fn a_lane_found_empty_answers_reads_from_its_head_until_a_record_is_not_kept() {
        let mut recent = Recent::new(2, 10);
        // Not known to be complete: a head read goes to disk.
        assert!(recent.read_head(0, 10).is_none());
        recent.apply([Change::Emptied(0, 10)]);
        assert_eq!(recent.read_head(0, 10).map(|v| v.len()), Some(0));
        recent.apply((10..13).map(|s| Change::Append(0, record(s, 100))));
        let seqs = |v: Vec<Arc<StoredEvent>>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(recent.read_head(0, 2).map(seqs), Some(vec![10, 11]));
        recent.apply([Change::Delete(0, 10)]);
        assert_eq!(recent.read_head(0, 10).map(seqs), Some(vec![11, 12]));
        // A put without its event: older records may be live on disk only.
        recent.apply([Change::Put(0, 13)]);
        assert!(recent.read_head(0, 10).is_none());
        // Empty again, then more appends than the window keeps.
        recent.apply([Change::Emptied(0, 14)]);
        recent.apply((14..14 + MAX_RECORDS as u64 + 1).map(|s| Change::Append(0, record(s, 10))));
        assert!(recent.read_head(0, 10).is_none());
        // The other lane was never said to be empty.
        assert!(recent.read_head(1, 10).is_none());
    }

    #[test]
    fn a_caught_up_reader_is_answered_and_a_late_one_is_sent_to_disk() {
        let mut recent = Recent::new(2, 10);
        recent.apply((10..10 + MAX_RECORDS as u64 + 5).map(|s| Change::Append(1, record(s, 100))));
        // The five oldest were dropped: a reader at 9..=14 must go to disk.
        assert!(recent.read(1, 9, 10).is_none());
        assert!(recent.read(1, 13, 10).is_none());
        let got = recent.read(1, 14, 3).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [15, 16, 17]);
        // Nothing newer: an empty answer, not a disk read.
        assert_eq!(
            recent
                .read(1, 10 + MAX_RECORDS as u64 + 4, 10)
                .map(|v| v.len()),
            Some(0)
        );
        // The other lane covers everything from seq 10 on, and holds nothing.
        assert_eq!(recent.read(0, 9, 10).map(|v| v.len()), Some(0));
        assert!(recent.read(0, 8, 10).is_none());
    }
}
