//! Record sealing benchmark: prints figures, asserts nothing about timing.
//!
//! Every stored event is sealed once by the store writer (AES-256-GCM over
//! its postcard body) and opened at least once by the forwarder. This prints
//! the nanoseconds of one seal and one open of an event with a payload of
//! 64, 200 (the bench's and a bedside monitor's typical size), 1,000 and
//! 4,000 bytes, best of five rounds, on one thread.
//!
//! Why it exists: `aes` 0.9.3 made its VAES backends the default on CPUs
//! that have them, and they take 64 (VAES-512) or 30 (VAES-256) blocks at a
//! time, so a record under 1 KiB was encrypted one block at a time, with the
//! round keys re-broadcast on every call. Vigil pins `aes` 0.9.2 (AES-NI,
//! eight blocks at a time): see the comment on `aes` in `bridge/Cargo.toml`.
//!
//! ```text
//! cargo bench -p vigil --bench seal
//! ```
//!
//! `VIGIL_BENCH_SCALE` (a float, default 1.0) multiplies the iterations.

use std::hint::black_box;
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use uuid::Uuid;
use vigil::crypto::{DataKey, MasterKey};
use vigil::event::{Event, Ingest, Kind, Qos, Timestamp};
use vigil::store::record::Seal;

/// Payload sizes measured.
const PAYLOADS: [usize; 4] = [64, 200, 1_000, 4_000];
/// Seals (and opens) per round at scale 1.0.
const PER_ROUND: usize = 100_000;
/// Rounds; the best is printed.
const ROUNDS: usize = 5;

fn main() -> Result<()> {
    let scale: f64 = std::env::var("VIGIL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let per_round = ((PER_ROUND as f64 * scale) as usize).max(100);
    let store_id = [3u8; 16];
    let key = DataKey::derive(&MasterKey::from_bytes([7u8; 32]), &store_id);
    println!("seal: AES-256-GCM records, best of {ROUNDS} rounds of {per_round}, one thread");
    println!(
        "{:>8} {:>10} {:>12} {:>12}",
        "payload", "record", "seal ns", "open ns"
    );
    for payload in PAYLOADS {
        let event = event(payload);
        let (mut seal_ns, mut open_ns, mut record) = (f64::MAX, f64::MAX, 0);
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let mut sealed = fjall::Slice::empty();
            for seq in 0..per_round as u64 {
                let seal = Seal {
                    key: &key,
                    store_id: &store_id,
                    keyspace: "p1",
                    seq,
                };
                sealed = black_box(seal.seal(1, &event)?);
            }
            seal_ns = seal_ns.min(started.elapsed().as_nanos() as f64 / per_round as f64);
            record = sealed.len();
            let seal = Seal {
                key: &key,
                store_id: &store_id,
                keyspace: "p1",
                seq: per_round as u64 - 1,
            };
            let started = Instant::now();
            for _ in 0..per_round {
                black_box(seal.open::<Event>(black_box(&sealed))?);
            }
            open_ns = open_ns.min(started.elapsed().as_nanos() as f64 / per_round as f64);
        }
        println!("{payload:>8} {record:>10} {seal_ns:>12.0} {open_ns:>12.0}");
    }
    Ok(())
}

/// An event as the gate makes them, with a `len`-byte payload.
fn event(len: usize) -> Event {
    let ingest = Ingest {
        kind: Kind::Measurement,
        priority: 1,
        device: "monitor-0001".into(),
        topic: "devices/monitor-0001/vitals/p1".into(),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at: Timestamp::now(),
        content_type: None,
        user_properties: Vec::new(),
        payload: Bytes::from(vec![b'x'; len]),
    };
    Event::from_ingest(ingest, Uuid::now_v7(), 1)
}
