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
//! every keyspace's memtable, which lets fjall retire the journals, then
//! compacts the lanes, dropping what the cloud acknowledged. The writer asks
//! for it when the disk is low and the backlog has shrunk to half the reserve
//! (a flush and a compaction rewrite what is still live before old files go,
//! so they must fit in the reserve), and when the lanes have drained after a
//! large backlog.
//!
//! The reserve must also cover what fjall keeps regardless: its journal is
//! one file that fjall 3 rotates (and can then delete) only once it passes
//! 64 MB, and a full memtable (8 MiB per lane) is written as a table before
//! its journal can go. Hence the default of 128 MiB, and why a drain gives
//! back the flushed and compacted tables but not the current journal.

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
                        reclaim(&shared);
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

/// Flushes every memtable (so the journals can go), then compacts the lanes.
fn reclaim(shared: &Arc<Shared>) {
    let started = Instant::now();
    let before = shared.db.disk_space().unwrap_or(0);
    let flush = shared
        .lanes
        .iter()
        .chain([&shared.dead_letter, &shared.quarantine, &shared.meta]);
    for ks in flush {
        if let Err(e) = ks.rotate_memtable_and_wait() {
            tracing::warn!(keyspace = %ks.name(), error = %e, "could not flush a memtable to reclaim space");
            return;
        }
    }
    for ks in &shared.lanes {
        if let Err(e) = ks.major_compact() {
            tracing::warn!(keyspace = %ks.name(), error = %e, "could not compact a lane to reclaim space");
            return;
        }
    }
    let after = shared.db.disk_space().unwrap_or(0);
    shared
        .metrics
        .reclaims
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        before_bytes = before,
        after_bytes = after,
        took = ?started.elapsed(),
        "reclaimed disk space (flushed memtables, compacted lanes)"
    );
}
