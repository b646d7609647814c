//! Local-subscription matching benchmark: prints figures, asserts nothing
//! about timing.
//!
//! With any local subscriber on the embedded broker (a ward display, the
//! nurse station), every device publish asks [`LocalSubscriptions::any_match`]
//! whether some local filter may match its topic, to skip rumqttd when none
//! does. This prints the nanoseconds of one such question, best of five
//! rounds, for a topic no filter matches (every filter is tried), with 1 to
//! 10,000 distinct filters held, and the same with ten sessions holding each
//! filter (matched once per distinct filter, so it should cost the same), on
//! one thread and on two at once (a read lock: device connections match
//! concurrently, so once a question takes more than a few hundred
//! nanoseconds two threads each take about as long as one alone; with a
//! single filter the lock's own reader count, shared by the two CPUs, is
//! most of the cost).
//!
//! ```text
//! cargo bench -p vigil --bench local
//! ```
//!
//! `VIGIL_BENCH_SCALE` (a float, default 1.0) multiplies the iterations.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Result;
use vigil::gate::local::LocalSubscriptions;

/// Distinct filters held.
const FILTERS: [usize; 5] = [1, 10, 100, 1_000, 10_000];
/// Sessions holding each filter in the "shared" case.
const SHARING: usize = 10;
/// Matches (filters × questions) per round at scale 1.0.
const WORK: usize = 20_000_000;
/// Rounds; the best is printed.
const ROUNDS: usize = 5;
/// A device topic none of the filters matches (each is tried to its
/// second level).
const TOPIC: &str = "devices/mon-99999/vitals/hr";

fn main() -> Result<()> {
    let scale: f64 = std::env::var("VIGIL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    println!(
        "local: LocalSubscriptions::any_match for a topic no filter matches ({TOPIC}), \
         best of {ROUNDS} rounds; ns per question per thread"
    );
    println!(
        "{:>9} {:>10} {:>14} {:>16} {:>18}",
        "filters", "questions", "1 thread", "2 threads, each", "x10 sessions, 1 thr"
    );
    for n in FILTERS {
        let questions = ((WORK as f64 * scale) as usize / n).max(100);
        let alone = held(n, 1);
        let shared = held(n, SHARING);
        let one = best(|| per_question(&alone, questions, 1));
        let two = best(|| per_question(&alone, questions, 2));
        let tenfold = best(|| per_question(&shared, questions, 1));
        println!(
            "{n:>9} {questions:>10} {:>14.1} {:>16.1} {:>18.1}",
            ns(one),
            ns(two),
            ns(tenfold)
        );
    }
    Ok(())
}

/// `n` distinct filters (`devices/mon-<i>/#`), each held by `sessions`
/// connected clients.
fn held(n: usize, sessions: usize) -> LocalSubscriptions {
    let local = LocalSubscriptions::default();
    let filters: Vec<String> = (0..n).map(|i| format!("devices/mon-{i}/#")).collect();
    for s in 0..sessions {
        let client = format!("display-{s}");
        // Persistent sessions: their filters stay after the guard drops.
        drop(local.connected(&client, false));
        local.subscribed(&client, &filters);
    }
    local
}

/// Time per question on each of `threads` threads asking at once.
fn per_question(local: &LocalSubscriptions, questions: usize, threads: usize) -> Duration {
    let elapsed = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let started = Instant::now();
                    let mut hits = 0usize;
                    for _ in 0..questions {
                        hits += usize::from(local.any_match(black_box(TOPIC)));
                    }
                    assert_eq!(hits, 0, "no filter matches {TOPIC}");
                    started.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().ok())
            .max()
            .unwrap_or_default()
    });
    elapsed / u32::try_from(questions).unwrap_or(u32::MAX)
}

fn best(mut f: impl FnMut() -> Duration) -> Duration {
    (0..ROUNDS).map(|_| f()).min().unwrap_or_default()
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}
