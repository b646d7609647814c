//! Model check of the store: random sequences of append / ack / stale ack /
//! dead-letter / requeue / reopen run against the real store and against a
//! plain in-memory model of the delivery contract, compared after every step.
//!
//! The model decides, independently of the store's code, which records must be
//! queued and in what order, which must be evicted when the quota is full
//! (oldest of the lowest evictable priority first, never priority 0), when an
//! append must be refused, which per-device sequence number each append gets,
//! and what each gap notice must count. Record sizes are the one thing it takes
//! from the store (they depend on ciphertext lengths).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use proptest::prelude::*;
use vigil::event::Kind;
use vigil::store::{Evicted, Store, StoreError};

const PRIORITIES: usize = 4;
const QUOTA: u64 = 6_000;
const STEP: u64 = 300;
const DEVICES: [&str; 3] = ["bed-a", "bed-b", "bed-c"];

#[derive(Debug, Clone)]
enum Action {
    Append {
        priority: u8,
        device: usize,
        len: usize,
    },
    Ack {
        priority: u8,
        pick: usize,
        count: usize,
    },
    AckStale,
    DeadLetter {
        priority: u8,
        pick: usize,
    },
    Requeue {
        pick: usize,
    },
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0..4u8, 0..3usize, 0..400usize)
            .prop_map(|(priority, device, len)| Action::Append { priority, device, len }),
        3 => (0..4u8, any::<usize>(), 1..6usize)
            .prop_map(|(priority, pick, count)| Action::Ack { priority, pick, count }),
        1 => Just(Action::AckStale),
        1 => (1..4u8, any::<usize>()).prop_map(|(priority, pick)| Action::DeadLetter { priority, pick }),
        1 => any::<usize>().prop_map(|pick| Action::Requeue { pick }),
        1 => Just(Action::Reopen),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct Rec {
    seq: u64,
    device: String,
    device_seq: u64,
    size: u64,
}

/// A gap notice as the store shows it in lane 0.
#[derive(Debug, Clone)]
struct Notice {
    seq: u64,
    size: u64,
    device: String,
    lane: u8,
    count: u64,
}

#[derive(Default)]
struct Model {
    lanes: Vec<Vec<Rec>>,
    notices: Vec<Notice>,
    dead: Vec<(u64, u64, u8, Rec)>,
    next_device_seq: HashMap<String, u64>,
    /// Evictions per (lane, device) since the last acknowledged notice.
    unreported: HashMap<(u8, String), u64>,
    acked_seqs: Vec<u64>,
}

impl Model {
    fn used(&self) -> u64 {
        self.lanes.iter().flatten().map(|r| r.size).sum::<u64>()
            + self.notices.iter().map(|n| n.size).sum::<u64>()
            + self.dead.iter().map(|d| d.1).sum::<u64>()
    }

    fn evictable(&self, priority: u8) -> u64 {
        let floor = usize::from(priority.max(1));
        self.lanes
            .iter()
            .skip(floor)
            .flatten()
            .map(|r| r.size)
            .sum()
    }

    /// The contract's eviction order, computed from the model alone.
    fn victims(&self, priority: u8, size: u64) -> Option<Vec<Evicted>> {
        let used = self.used();
        if used + size <= QUOTA {
            return Some(Vec::new());
        }
        let needed = used + size - QUOTA;
        let evictable = self.evictable(priority);
        if evictable < needed {
            return None;
        }
        let target = (needed + STEP).min(evictable);
        let mut freed = 0;
        let mut out = Vec::new();
        for lane in (usize::from(priority.max(1))..PRIORITIES).rev() {
            for r in &self.lanes[lane] {
                if freed >= target {
                    break;
                }
                freed += r.size;
                out.push(Evicted {
                    priority: lane as u8,
                    seq: r.seq,
                });
            }
        }
        Some(out)
    }
}

async fn check(store: &Store, model: &mut Model) {
    // Lane contents: device records exactly as modelled, in order.
    model.notices.clear();
    for p in 0..PRIORITIES {
        let events = store.read(p as u8, None, 100_000).await.unwrap();
        // Reads from a position (a caught-up forwarder's, answered from
        // memory when the store can) return exactly what the full read did.
        let starts = events
            .iter()
            .map(|e| e.seq)
            .chain(events.first().map(|e| e.seq - 1));
        for after in starts {
            let page = store.read(p as u8, Some(after), 7).await.unwrap();
            let want: Vec<_> = events
                .iter()
                .filter(|e| e.seq > after)
                .take(7)
                .map(|e| (e.seq, e.stored_bytes, &e.body))
                .collect();
            let got: Vec<_> = page
                .iter()
                .map(|e| (e.seq, e.stored_bytes, &e.body))
                .collect();
            assert_eq!(got, want, "lane {p} read after seq {after}");
        }
        let mut device_recs = Vec::new();
        for e in events {
            if e.body.kind == Kind::GapNotice {
                assert_eq!(p, 0, "gap notices live in lane 0");
                let v: serde_json::Value = serde_json::from_slice(&e.body.payload).unwrap();
                model.notices.push(Notice {
                    seq: e.seq,
                    size: e.stored_bytes,
                    device: v["device"].as_str().unwrap().to_string(),
                    lane: v["priority"].as_u64().unwrap() as u8,
                    count: v["count"].as_u64().unwrap(),
                });
            } else {
                device_recs.push(Rec {
                    seq: e.seq,
                    device: e.body.device.clone(),
                    device_seq: e.body.device_seq,
                    size: e.stored_bytes,
                });
            }
        }
        assert_eq!(
            device_recs, model.lanes[p],
            "lane {p} differs from the model"
        );
    }
    // Gap notices: one per (lane, device) with unreported evictions, counting them all.
    let mut seen = HashMap::new();
    for n in &model.notices {
        assert!(
            seen.insert((n.lane, n.device.clone()), n.count).is_none(),
            "two notices for one (lane, device)"
        );
    }
    for (k, &count) in &model.unreported {
        assert_eq!(
            seen.get(k).copied().unwrap_or(0),
            count,
            "gap notice for {k:?}"
        );
    }
    for (k, &count) in &seen {
        assert_eq!(
            model.unreported.get(k).copied().unwrap_or(0),
            count,
            "notice for {k:?} counts what was never evicted"
        );
    }
    // Dead letters.
    let dead = store.dead_letters(None, 100_000).await.unwrap();
    assert_eq!(dead.len(), model.dead.len());
    for (d, m) in dead.iter().zip(model.dead.iter_mut()) {
        assert_eq!(d.seq, m.0);
        assert_eq!(
            (d.body.event.device.as_str(), d.body.event.device_seq),
            (m.3.device.as_str(), m.3.device_seq)
        );
        m.1 = d.stored_bytes;
    }
    // Figures.
    let stats = store.stats();
    for p in 0..PRIORITIES {
        let notices: Vec<&Notice> = if p == 0 {
            model.notices.iter().collect()
        } else {
            Vec::new()
        };
        let lane = &stats.lanes[p];
        assert_eq!(
            lane.messages,
            (model.lanes[p].len() + notices.len()) as u64,
            "lane {p} count"
        );
        let bytes = model.lanes[p].iter().map(|r| r.size).sum::<u64>()
            + notices.iter().map(|n| n.size).sum::<u64>();
        assert_eq!(lane.bytes, bytes, "lane {p} bytes");
    }
    assert_eq!(stats.dead_letter.messages, model.dead.len() as u64);
    assert_eq!(stats.used_bytes(), model.used());
}

async fn run(actions: Vec<Action>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = |dir: &std::path::Path| {
        let mut o = common::options(dir);
        o.quota_bytes = QUOTA;
        o.eviction_step_bytes = STEP;
        o.priorities = PRIORITIES as u8;
        o
    };
    let mut store = Store::open(opts(dir.path()), &common::key()).unwrap();
    let mut model = Model {
        lanes: vec![Vec::new(); PRIORITIES],
        ..Model::default()
    };
    for action in actions {
        match action {
            Action::Append {
                priority,
                device,
                len,
            } => {
                let dev = DEVICES[device];
                let expected_dseq = model.next_device_seq.get(dev).copied().unwrap_or(0) + 1;
                let used_before = model.used();
                match store.append(common::ingest(dev, priority, len)).await {
                    Ok(a) => {
                        let predicted = model.victims(priority, a.stored_bytes);
                        assert_eq!(
                            Some(a.evicted.clone()),
                            predicted,
                            "eviction differs from the contract"
                        );
                        assert_eq!(
                            a.device_seq, expected_dseq,
                            "device sequence must be gap-free"
                        );
                        model.next_device_seq.insert(dev.to_string(), expected_dseq);
                        for v in &a.evicted {
                            let lane = &mut model.lanes[usize::from(v.priority)];
                            let idx = lane.iter().position(|r| r.seq == v.seq).unwrap();
                            let r = lane.remove(idx);
                            *model.unreported.entry((v.priority, r.device)).or_default() += 1;
                        }
                        model.lanes[usize::from(priority)].push(Rec {
                            seq: a.seq,
                            device: dev.to_string(),
                            device_seq: a.device_seq,
                            size: a.stored_bytes,
                        });
                    }
                    Err(StoreError::Full {
                        needed,
                        used,
                        evictable,
                        ..
                    }) => {
                        assert_eq!(
                            used, used_before,
                            "the store's used bytes differ from the model"
                        );
                        assert_eq!(evictable, model.evictable(priority));
                        assert!(
                            model.victims(priority, needed).is_none(),
                            "refused although the contract allows eviction"
                        );
                    }
                    Err(e) => panic!("unexpected append error: {e}"),
                }
            }
            Action::Ack {
                priority,
                pick,
                count,
            } => {
                let p = usize::from(priority);
                let mut queued: Vec<(u64, Option<usize>)> =
                    model.lanes[p].iter().map(|r| (r.seq, None)).collect();
                if p == 0 {
                    queued.extend(
                        model
                            .notices
                            .iter()
                            .enumerate()
                            .map(|(i, n)| (n.seq, Some(i))),
                    );
                }
                queued.sort();
                if queued.is_empty() {
                    continue;
                }
                let start = pick % queued.len();
                let chosen: Vec<(u64, Option<usize>)> = queued
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(count.min(queued.len()))
                    .copied()
                    .collect();
                let report = store
                    .ack(priority, chosen.iter().map(|c| c.0).collect())
                    .await
                    .unwrap();
                assert_eq!(report.deleted, chosen.len() as u64);
                for (seq, notice) in chosen {
                    model.acked_seqs.push(seq);
                    match notice {
                        Some(i) => {
                            let n = &model.notices[i];
                            model.unreported.remove(&(n.lane, n.device.clone()));
                        }
                        None => model.lanes[p].retain(|r| r.seq != seq),
                    }
                }
            }
            Action::AckStale => {
                let mut stale: Vec<u64> = model.acked_seqs.iter().rev().take(3).copied().collect();
                stale.push(u64::MAX / 2);
                let report = store.ack(1, stale.clone()).await.unwrap();
                assert_eq!((report.deleted, report.stale), (0, stale.len() as u64));
            }
            Action::DeadLetter { priority, pick } => {
                let p = usize::from(priority);
                if model.lanes[p].is_empty() {
                    continue;
                }
                let idx = pick % model.lanes[p].len();
                let r = model.lanes[p].remove(idx);
                let dl = store
                    .dead_letter(priority, r.seq, "model".into())
                    .await
                    .unwrap()
                    .unwrap();
                model.dead.push((dl, 0, priority, r));
            }
            Action::Requeue { pick } => {
                if model.dead.is_empty() {
                    continue;
                }
                let idx = pick % model.dead.len();
                let (dl, _, priority, mut r) = model.dead.remove(idx);
                let seq = store.requeue(dl).await.unwrap().unwrap();
                r.seq = seq;
                model.lanes[usize::from(priority)].push(r);
            }
            Action::Reopen => {
                let before = store.stats();
                store.close().await.unwrap();
                drop(store);
                store = Store::open(opts(dir.path()), &common::key()).unwrap();
                let after = store.stats();
                assert_eq!(after.lanes, before.lanes, "figures changed across reopen");
                assert_eq!(after.counters, before.counters);
            }
        }
        check(&store, &mut model).await;
    }
    store.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn store_follows_the_delivery_contract_model(actions in proptest::collection::vec(action(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(actions));
    }
}
