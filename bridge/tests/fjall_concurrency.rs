//! fjall under Vigil's access pattern: one writer appending increasing keys
//! in batches and deleting from the front, one reader paging forward with
//! `range(after..)`, while memtables are rotated and the tree is compacted
//! from a third thread (what the reclaimer does). The reader must never skip
//! a key that was committed before its read began.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[test]
fn paging_reads_never_skip_committed_keys_while_memtables_rotate_and_compact() {
    let dir = tempfile::tempdir().unwrap();
    let db = fjall::Database::builder(dir.path().join("db"))
        .open()
        .unwrap();
    let ks = db
        .keyspace("lane", || {
            fjall::KeyspaceCreateOptions::default().max_memtable_size(1 << 20)
        })
        .unwrap();
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let total: u64 = 200_000;
    let writer = {
        let (db, ks, committed) = (db.clone(), ks.clone(), committed.clone());
        std::thread::spawn(move || {
            let mut next = 1u64;
            while next <= total {
                let mut b = db.batch();
                for _ in 0..64 {
                    b.insert(&ks, next.to_be_bytes(), vec![0x5a; 250]);
                    next += 1;
                }
                b.commit().unwrap();
                committed.store(next - 1, Ordering::Release);
            }
        })
    };
    let reclaimer = {
        let (ks, stop) = (ks.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Acquire) {
                ks.rotate_memtable_and_wait().unwrap();
                ks.major_compact().unwrap();
                rounds += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            rounds
        })
    };
    // The reader: pages of up to 32 after the last key seen; deletes what it
    // read (as acks do) in batches.
    let mut last = 0u64;
    let mut skipped = Vec::new();
    while last < total {
        let visible = committed.load(Ordering::Acquire);
        let page: Vec<u64> = ks
            .range((last + 1).to_be_bytes()..)
            .take(32)
            .map(|g| {
                let k = g.key().unwrap();
                u64::from_be_bytes(k.as_ref().try_into().unwrap())
            })
            .collect();
        if page.is_empty() {
            assert!(
                visible <= last,
                "nothing read after {last} although {visible} committed"
            );
            continue;
        }
        for k in &page {
            if *k != last + 1 && *k <= visible + 64 {
                skipped.push((last + 1, *k));
            }
            last = *k;
        }
        let mut b = db.batch();
        for k in &page {
            b.remove(&ks, k.to_be_bytes());
        }
        b.commit().unwrap();
        assert!(skipped.len() < 10, "keys skipped: {skipped:?}");
    }
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    let rounds = reclaimer.join().unwrap();
    eprintln!("{total} keys read in order with {rounds} rotate+compact rounds beside");
    assert!(skipped.is_empty(), "keys skipped: {skipped:?}");
}
