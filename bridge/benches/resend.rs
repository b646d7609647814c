//! The gate's resend memory ([`vigil::gate::resend`]): prints what it adds
//! to each device QoS 1 publish, asserts nothing about timing.
//!
//! Every QoS 1 publish is fingerprinted (SHA-256 of the packet) when read,
//! and its fingerprint recorded in its client's window once committed; a
//! publish with DUP set is also looked up. Printed: nanoseconds per
//! fingerprint for packets of 64 to 4,096 bytes, per record and per lookup
//! in a full window of 64 (the default `gate.max_inflight`), best of five
//! rounds.
//!
//! ```text
//! cargo bench -p vigil --bench resend
//! ```
//!
//! `VIGIL_BENCH_SCALE` (a float, default 1.0) multiplies the iterations.

use std::hint::black_box;
use std::time::Instant;

use vigil::gate::resend::{Resends, fingerprint, lock};

const ROUNDS: usize = 5;

fn scale() -> f64 {
    std::env::var("VIGIL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// Best of `ROUNDS` of `n` calls of `f`, in nanoseconds per call.
fn best(n: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let n = ((1_000_000.0 * scale()) as usize).max(1);
    println!("resend memory, ns per call (best of {ROUNDS} rounds of {n})");
    for size in [64usize, 256, 1024, 4096] {
        let packet = vec![0x32u8; size];
        let ns = best(n, |_| {
            black_box(fingerprint(black_box(&packet)));
        });
        println!("  fingerprint, {size:>5}-byte packet  {ns:>8.1}");
    }
    let resends = Resends::new(2, 64);
    let window = resends.window("bench");
    let f = fingerprint(&[0x32; 256]);
    let ns = best(n, |i| lock(&window).committed(i as u16, f));
    println!("  record a commit (window of 64)   {ns:>8.1}");
    let ns = best(n, |i| {
        black_box(lock(&window).holds((i % 64) as u16, &f));
    });
    println!("  look up a resend (window of 64)  {ns:>8.1}");
}
