//! Local-subscription matching benchmark: prints figures, asserts nothing
//! about timing.
//!
//! With any local subscriber on the embedded broker (a ward display, the
//! nurse station), every device publish asks [`LocalSubscriptions::any_match`]
//! whether some local filter may match its topic, to skip rumqttd when none
//! does. This prints the nanoseconds of one such question, best of five
//! rounds, for a topic no filter matches, with 1 to 10,000 distinct filters
//! held, and the same with ten sessions holding each filter (filed once per
//! distinct filter, so it should cost the same), on one thread and on two at
//! once (a read lock: device connections match concurrently; the lock's own
//! reader count, shared by the two CPUs, is most of the cost of a question
//! on two threads). The filters are indexed by level, so a question should
//! cost about the same whatever their number (until session 21 each filter
//! was tried in turn, about 57 ns each: 622 µs a question with 10,000).
//!
//! ```text
//! cargo bench -p vigil --bench local
//! ```
//!
//! The last two columns ask through a per-connection [`MatchMemo`], as the
//! gate does: the topic is matched once and its answer remembered until the
//! filters change.
//!
//! `VIGIL_BENCH_SCALE` (a float, default 1.0) multiplies the iterations.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Result;
use vigil::gate::local::{LocalSubscriptions, MatchMemo};

/// Distinct filters held.
const FILTERS: [usize; 5] = [1, 10, 100, 1_000, 10_000];
/// Sessions holding each filter in the "shared" case.
const SHARING: usize = 10;
/// Questions per round (on each thread) at scale 1.0.
const QUESTIONS: usize = 2_000_000;
/// Rounds; the best is printed.
const ROUNDS: usize = 5;
/// A device topic none of the filters matches (it parts from all of them
/// at its second level).
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
        "{:>9} {:>10} {:>14} {:>16} {:>18} {:>16} {:>18}",
        "filters",
        "questions",
        "1 thread",
        "2 threads, each",
        "x10 sessions, 1 thr",
        "memo, 1 thread",
        "memo, 2 thr, each"
    );
    for n in FILTERS {
        let questions = ((QUESTIONS as f64 * scale) as usize).max(100);
        let alone = held(n, 1);
        let shared = held(n, SHARING);
        let (alone, shared) = (&alone, &shared);
        // Asking the set directly, as the gate did before each connection
        // kept a memo.
        let ask_alone = || move |topic: &str| alone.any_match(topic);
        let ask_shared = || move |topic: &str| shared.any_match(topic);
        // Through a memo of each thread's own, as each device connection has.
        let ask_memo = || {
            let mut memo = MatchMemo::default();
            move |topic: &str| memo.any_match(alone, topic)
        };
        let one = best(|| per_question(questions, 1, ask_alone));
        let two = best(|| per_question(questions, 2, ask_alone));
        let tenfold = best(|| per_question(questions, 1, ask_shared));
        let memo_one = best(|| per_question(questions, 1, ask_memo));
        let memo_two = best(|| per_question(questions, 2, ask_memo));
        println!(
            "{n:>9} {questions:>10} {:>14.1} {:>16.1} {:>18.1} {:>16.1} {:>18.1}",
            ns(one),
            ns(two),
            ns(tenfold),
            ns(memo_one),
            ns(memo_two)
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

/// Time per question on each of `threads` threads asking at once, each
/// through the asker `make` gives it.
fn per_question<A: FnMut(&str) -> bool>(
    questions: usize,
    threads: usize,
    make: impl Fn() -> A + Sync,
) -> Duration {
    let elapsed = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut ask = make();
                    let started = Instant::now();
                    let mut hits = 0usize;
                    for _ in 0..questions {
                        hits += usize::from(ask(black_box(TOPIC)));
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
    elapsed / u32::try_from(questions.max(1)).unwrap_or(u32::MAX)
}

fn best(mut f: impl FnMut() -> Duration) -> Duration {
    (0..ROUNDS).map(|_| f()).min().unwrap_or_default()
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}
