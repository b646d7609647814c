//! Store benchmark: prints figures, asserts nothing about timing.
//!
//! It measures, for 200-byte payloads:
//!
//! 1. committed appends per second, with p50/p99 append latency, for 1, 16 and
//!    256 concurrent appenders (one tokio task each, all on one multi-thread
//!    runtime), once with `Durability::SyncData` (fsync before an append
//!    completes, the production setting) and once with
//!    `Durability::UnsafeBuffered` (no fsync), and the buffered/synced ratio so
//!    the cost of durability is visible;
//! 2. acks per second: read a filled lane in pages of 64 (then, on a fresh
//!    store, 1024) and ack each page, timing the read + ack loop;
//! 3. space per stored message on the ack runs' stores: `Store::disk_bytes`
//!    (fjall's file lengths, also net of the empty store's figure), blocks
//!    actually allocated (as `du` counts them) and logical bytes
//!    (`StoreStats::used_bytes`), when empty, after appending, and again after
//!    everything was acked.
//!
//! The p99 latency of many appenders includes waiting for the writer's
//! queue and for earlier batches: it is what a device would see.
//!
//! Run it with:
//!
//! ```text
//! cargo bench -p vigil --bench store
//! ```
//!
//! `VIGIL_BENCH_SCALE` (a float, default 1.0) multiplies every message count,
//! so CI can run it small (e.g. `VIGIL_BENCH_SCALE=0.05`). `VIGIL_BENCH_DIR`
//! chooses the directory the temporary stores are created under (default: the
//! system temp directory), so the disk being measured can be picked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use vigil::crypto::MasterKey;
use vigil::event::{Ingest, Kind, Qos, Timestamp};
use vigil::store::{Durability, Store, StoreOptions};

/// Payload size of every message.
const PAYLOAD: usize = 200;
/// The lane every message goes to.
const PRIORITY: u8 = 1;
/// (appenders, messages per run at scale 1.0) with `Durability::SyncData`. A
/// lone appender pays one fsync per message, so it gets fewer: on a slow disk
/// (10 ms fsync) its run alone takes 20 s at scale 1.0.
const SYNCED_RUNS: [(usize, usize); 3] = [(1, 2_000), (16, 50_000), (256, 50_000)];
/// The same with `Durability::UnsafeBuffered`: a lone appender gets more
/// messages so that its run lasts long enough to be measured.
const BUFFERED_RUNS: [(usize, usize); 3] = [(1, 20_000), (16, 50_000), (256, 50_000)];
/// Messages queued before each ack run, at scale 1.0.
const ACK_MESSAGES: usize = 100_000;
/// Page sizes of the ack runs.
const ACK_PAGES: [usize; 2] = [64, 1024];
/// Appenders used to fill the store before an ack run.
const FILL_APPENDERS: usize = 256;

struct Bench {
    scale: f64,
    base: Option<PathBuf>,
    runtime: tokio::runtime::Runtime,
}

struct AppendRun {
    durability: Durability,
    appenders: usize,
    messages: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

/// What a store takes at one moment.
#[derive(Debug, Clone, Copy)]
struct Space {
    /// Queued messages.
    messages: u64,
    /// `Store::disk_bytes`: fjall's journals and tables, by file length.
    fjall: u64,
    /// Blocks actually allocated under the store directory (what `du` shows).
    allocated: u64,
    /// `StoreStats::used_bytes`: keys and sealed values, what the quota bounds.
    logical: u64,
}

struct AckRun {
    page: usize,
    acked: u64,
    pages: usize,
    elapsed: Duration,
    reading: Duration,
    acking: Duration,
    fill: AppendRun,
    empty: Space,
    filled: Space,
    drained: Space,
}

fn main() -> Result<()> {
    let scale = match std::env::var("VIGIL_BENCH_SCALE") {
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f > 0.0)
            .with_context(|| format!("VIGIL_BENCH_SCALE={s:?} is not a positive number"))?,
        Err(_) => 1.0,
    };
    let base = std::env::var_os("VIGIL_BENCH_DIR").map(PathBuf::from);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    let bench = Bench {
        scale,
        base,
        runtime,
    };

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir_shown = bench
        .base
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .display()
        .to_string();
    println!();
    println!("Vigil store benchmark");
    println!("  machine:   {cores} cores (std::thread::available_parallelism)");
    println!("  payload:   {PAYLOAD} bytes, priority {PRIORITY}, one fresh store per run");
    println!("  scale:     {scale} (VIGIL_BENCH_SCALE)");
    println!("  stores in: {dir_shown} (VIGIL_BENCH_DIR)");
    println!("  reproduce: cargo bench -p vigil --bench store");
    println!();

    // 1. Appends.
    println!("1. Committed appends (one tokio task per appender, each awaiting its own appends)");
    println!();
    println!(
        "  {:<15} {:>9} {:>9} {:>8} {:>11} {:>9} {:>9}",
        "durability", "appenders", "messages", "seconds", "appends/s", "p50 ms", "p99 ms",
    );
    let mut runs = Vec::new();
    for (durability, plan) in [
        (Durability::SyncData, SYNCED_RUNS),
        (Durability::UnsafeBuffered, BUFFERED_RUNS),
    ] {
        for (appenders, messages) in plan {
            let messages = bench.count(messages).max(appenders);
            let run = bench.append_run(durability, appenders, messages)?;
            println!(
                "  {:<15} {:>9} {:>9} {:>8.3} {:>11.0} {:>9.3} {:>9.3}",
                format!("{:?}", run.durability),
                run.appenders,
                run.messages,
                run.elapsed.as_secs_f64(),
                run.rate(),
                run.p50.as_secs_f64() * 1e3,
                run.p99.as_secs_f64() * 1e3,
            );
            runs.push(run);
        }
    }
    println!();
    println!("  Cost of durability (buffered appends/s / synced appends/s):");
    for (appenders, _) in SYNCED_RUNS {
        let rate = |d: Durability| {
            runs.iter()
                .find(|r| r.durability == d && r.appenders == appenders)
                .map(AppendRun::rate)
        };
        if let (Some(synced), Some(buffered)) =
            (rate(Durability::SyncData), rate(Durability::UnsafeBuffered))
        {
            println!(
                "    {appenders:>3} appender{}: {:>6.1}x",
                if appenders == 1 { " " } else { "s" },
                buffered / synced
            );
        }
    }
    println!();

    // 2. Acks.
    let ack_messages = bench.count(ACK_MESSAGES).max(1);
    println!(
        "2. Acks: fill a lane with {ack_messages} messages ({FILL_APPENDERS} appenders, SyncData), \
         then read(p, after, page) + ack(p, seqs) until it is empty"
    );
    println!();
    println!(
        "  {:>5} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>12}",
        "page", "acked", "seconds", "acks/s", "pages", "read s", "ack s", "fill app/s"
    );
    let mut acks = Vec::new();
    for page in ACK_PAGES {
        let run = bench.ack_run(page, ack_messages)?;
        println!(
            "  {:>5} {:>9} {:>8.3} {:>10.0} {:>8} {:>8.3} {:>8.3} {:>12.0}",
            run.page,
            run.acked,
            run.elapsed.as_secs_f64(),
            run.acked as f64 / run.elapsed.as_secs_f64(),
            run.pages,
            run.reading.as_secs_f64(),
            run.acking.as_secs_f64(),
            run.fill.rate(),
        );
        acks.push(run);
    }
    println!();

    // 3. Space, measured on the ack runs' stores.
    println!("3. Space per stored message ({PAYLOAD}-byte payloads)");
    println!("     fjall = Store::disk_bytes (file lengths: the active journal counts at its");
    println!("             preallocated length), +empty = fjall minus the empty store's figure,");
    println!("     alloc = blocks allocated under the store directory (du), logical =");
    println!("             StoreStats::used_bytes (keys + sealed values, what the quota bounds)");
    println!();
    println!(
        "  {:<34} {:>8} {:>11} {:>8} {:>8} {:>11} {:>8} {:>10} {:>8}",
        "store", "messages", "fjall B", "B/msg", "+empty", "alloc B", "B/msg", "logical B", "B/msg"
    );
    for run in &acks {
        let rows = [
            ("empty (just opened)", run.empty),
            ("after appending", run.filled),
            ("after acking everything", run.drained),
        ];
        for (what, space) in rows {
            let per = |bytes: u64| {
                if space.messages == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}", bytes as f64 / space.messages as f64)
                }
            };
            println!(
                "  {:<34} {:>8} {:>11} {:>8} {:>8} {:>11} {:>8} {:>10} {:>8}",
                format!("{what}, page {}", run.page),
                space.messages,
                space.fjall,
                per(space.fjall),
                per(space.fjall.saturating_sub(run.empty.fjall)),
                space.allocated,
                per(space.allocated),
                space.logical,
                per(space.logical),
            );
        }
    }
    println!();
    println!("  Acked records leave tombstones and stay in journals and tables until fjall");
    println!("  compacts them and retires old journals, so space comes back only partly, if at");
    println!("  all, within a run.");
    println!();
    Ok(())
}

impl Bench {
    fn count(&self, n: usize) -> usize {
        ((n as f64) * self.scale).round() as usize
    }

    fn tempdir(&self) -> Result<tempfile::TempDir> {
        let dir = match &self.base {
            Some(base) => {
                std::fs::create_dir_all(base)
                    .with_context(|| format!("create {}", base.display()))?;
                tempfile::Builder::new()
                    .prefix("vigil-bench-")
                    .tempdir_in(base)
            }
            None => tempfile::Builder::new().prefix("vigil-bench-").tempdir(),
        };
        dir.context("create a temporary store directory")
    }

    fn open(&self, dir: &Path, durability: Durability) -> Result<Store> {
        let mut options = StoreOptions::new(dir);
        options.durability = durability;
        Ok(Store::open(options, &MasterKey::from_bytes([7u8; 32]))?)
    }

    /// One append run on a fresh store.
    fn append_run(
        &self,
        durability: Durability,
        appenders: usize,
        messages: usize,
    ) -> Result<AppendRun> {
        let dir = self.tempdir()?;
        let store = self.open(&dir.path().join("store"), durability)?;
        let run = self
            .runtime
            .block_on(append_load(&store, durability, appenders, messages));
        let closed = self.runtime.block_on(store.close());
        let run = run?;
        closed?;
        Ok(run)
    }

    /// Fills a fresh store, then reads and acks it page by page.
    fn ack_run(&self, page: usize, messages: usize) -> Result<AckRun> {
        let dir = self.tempdir()?;
        let path = dir.path().join("store");
        let store = self.open(&path, Durability::SyncData)?;
        let run = self.runtime.block_on(async {
            let empty = space(&store, &path)?;
            let fill = append_load(&store, Durability::SyncData, FILL_APPENDERS, messages).await?;
            let filled = space(&store, &path)?;
            let (mut reading, mut acking) = (Duration::ZERO, Duration::ZERO);
            let (mut acked, mut pages) = (0u64, 0usize);
            let mut after = None;
            let start = Instant::now();
            loop {
                let t = Instant::now();
                let events = store.read(PRIORITY, after, page).await?;
                reading += t.elapsed();
                let Some(last) = events.last() else { break };
                after = Some(last.seq);
                let seqs = events.iter().map(|e| e.seq).collect::<Vec<_>>();
                let t = Instant::now();
                acked += store.ack(PRIORITY, seqs).await?.deleted;
                acking += t.elapsed();
                pages += 1;
            }
            let elapsed = start.elapsed();
            let drained = space(&store, &path)?;
            anyhow::ensure!(
                acked == messages as u64 && drained.messages == 0,
                "acked {acked} of {messages}; {} still queued",
                drained.messages
            );
            Ok(AckRun {
                page,
                acked,
                pages,
                elapsed,
                reading,
                acking,
                fill,
                empty,
                filled,
                drained,
            })
        });
        let closed = self.runtime.block_on(store.close());
        let run = run?;
        closed?;
        Ok(run)
    }
}

/// Appends `messages` 200-byte messages from `appenders` concurrent tasks and
/// records each append's latency.
async fn append_load(
    store: &Store,
    durability: Durability,
    appenders: usize,
    messages: usize,
) -> Result<AppendRun> {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let queued_before = store.stats().queued();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(appenders);
    for i in 0..appenders {
        let share = messages / appenders + usize::from(i < messages % appenders);
        let store = store.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let device = format!("bench-{i}");
            let mut latencies = Vec::with_capacity(share);
            for _ in 0..share {
                let ingest = ingest(&device, payload.clone());
                let t = Instant::now();
                store.append(ingest).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(messages);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let queued = store.stats().queued() - queued_before;
    anyhow::ensure!(
        queued == messages as u64,
        "appended {messages} but {queued} more are queued"
    );
    Ok(AppendRun {
        durability,
        appenders,
        messages,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

impl AppendRun {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// The store's size figures now.
fn space(store: &Store, dir: &Path) -> Result<Space> {
    let stats = store.stats();
    Ok(Space {
        messages: stats.queued(),
        fjall: store.disk_bytes()?,
        allocated: allocated_bytes(dir)?,
        logical: stats.used_bytes(),
    })
}

/// Bytes of the blocks allocated to every file under `dir`, like `du`.
fn allocated_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A device message like the gate's (see `bridge/tests/common/mod.rs`).
fn ingest(device: &str, payload: Bytes) -> Ingest {
    Ingest {
        kind: Kind::Measurement,
        priority: PRIORITY,
        device: device.to_string(),
        topic: format!("devices/{device}/vitals/p{PRIORITY}"),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at: Timestamp::now(),
        content_type: None,
        user_properties: vec![("unit".into(), "bpm".into())],
        payload,
    }
}
