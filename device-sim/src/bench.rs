//! `vigil-sim bench`: Vigil's performance targets measured in one run on one
//! machine, everything on loopback, printed as one table. Nothing here
//! asserts a timing: it prints figures and says whether each target holds.
//!
//! The real `vigil` binary runs as a child process (`vigil run --config`,
//! with a random `VIGIL_STORAGE_KEY`); its standard output and error go to
//! `vigil.log` in the work directory, one `=====` header per start. The load:
//! [`DEVICES`] simulated devices (rumqttc, MQTT 3.1.1, `TCP_NODELAY`, up to
//! [`INFLIGHT`] publishes in flight each) publishing [`PAYLOAD_BYTES`]-byte
//! QoS 1 payloads to Vigil's plain-TCP gate. The cloud is the simulator's
//! loopback rumqttd with mutual TLS ([`cloud::start_broker`]); Vigil forwards
//! to its MQTT 5 listener, and a counting subscriber (mutual TLS, QoS 1, on
//! the MQTT 3.1.1 listener) counts each message once in a bitmap and, for the
//! latency loads, keeps its latency.
//!
//! Every payload is JSON that starts with its stamp,
//! `{"t":<µs since the bench started, monotonic>,"r":<load>,"d":<device>,"i":<index>,"p":"xx…"}`,
//! padded to 200 bytes. Being JSON, it travels inline in Vigil's envelope, so
//! the subscriber reads the stamp from the bytes after `,"payload":` without
//! decoding the whole envelope (falling back to [`crate::envelope::verify`]
//! when that fails); the first arrival and then one in 1,024 are verified in
//! full (sha256). Latency is from the device's `publish()` call to the
//! subscriber's receipt, both clocks being this process's monotonic clock.
//!
//! The phases, in order (every message count is multiplied by `--scale`):
//!
//! 1. **Online** (store `store-online`, forwarding to the cloud): a warm-up of
//!    20 × 25 messages, counted at the cloud; *row 4*'s target: a paced load
//!    of 1,000 messages/s (20 devices × 50/s) for 10 s × scale (at least 2 s)
//!    on this steady store; then *row 1*: N = 200,000 messages as fast as the
//!    devices' windows allow, timed from the first publish until the
//!    subscriber has counted all N; then, as references, 1,000 messages/s
//!    again straight after that burst (while its compactions run) and 80 % of
//!    row 1's rate. Around each paced load Vigil's `vigil_commit_seconds`
//!    histogram is read from `/metrics`, to show the store commit's share.
//! 2. **Backlog** (store `store`): Vigil with `forward.port` at a closed
//!    loopback port. After start and a second idle: *row 5* (empty) RSS and
//!    *row 6* the empty store's allocated bytes. *Row 2*: 1,000,000 messages,
//!    timed from the first publish until the last PUBACK; Vigil's `/status`
//!    backlog must then hold all of them. After a second idle: *row 5* RSS and
//!    *row 6* allocated bytes with the backlog queued. The same load then goes
//!    to a bare rumqttd started in this process (plain TCP, the settings of
//!    Vigil's embedded broker, nothing stored) for row 2's ratio. Vigil is
//!    stopped with SIGTERM and restarted forwarding to the cloud: *row 7* is
//!    from spawning it to the first arrival at the cloud, *row 3* the backlog
//!    divided by the time from spawning it until the subscriber has counted
//!    all of it. Once `/status` shows an empty store (+2 s), *row 6* measures
//!    the store again (and once more after a SIGTERM).
//! 3. With `--ten-million`: a fresh store filled with 10,000,000 messages
//!    (cloud unreachable), then *row 5* RSS after a second idle.
//! 4. With `--mosquitto` (and `mosquitto` on `PATH`): rows 1 and 2 through a
//!    Mosquitto edge broker bridged (`topic # out 1 devices/ vigil/devices/`,
//!    MQTT 3.1.1, mutual TLS) to the same cloud, or to a closed port for row 2,
//!    and row 4's paced 1,000/s load through the same bridge after its row 1:
//!    the latency floor of this machine and load generator with a broker that
//!    does not fsync.
//!
//! "Allocated bytes" is `st_blocks × 512` summed over the store directory
//! (what `du` reports). RSS is `VmRSS` and `RssAnon` from
//! `/proc/<pid>/status`. Row 6's envelope size is the mean size of the MQTT
//! payloads (the whole JSON envelope, device payload inline) the subscriber
//! received during the drain.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cloud::{self, CloudError, Listeners};
use crate::pki::{self, DevPki, PkiError};

/// Simulated devices in every load.
pub const DEVICES: u32 = 20;
/// Bytes of every device payload.
pub const PAYLOAD_BYTES: usize = 200;
/// Publishes each device keeps in flight, at most, unless `--inflight` says
/// otherwise (Vigil's own default `gate.max_inflight`).
pub const INFLIGHT: u16 = 64;

/// Row 1's message count at scale 1.
const E2E_MESSAGES: f64 = 200_000.0;
/// The backlog of rows 2, 3, 5, 6 and 7 at scale 1.
const BACKLOG_MESSAGES: f64 = 1_000_000.0;
/// Row 5's large backlog at scale 1 (`--ten-million`).
const TEN_MILLION: f64 = 10_000_000.0;
/// Row 4's paced rate, all devices together.
const PACED_RATE: f64 = 1_000.0;
/// Row 4's first line (Mosquitto's figure goes beside it).
const LAT_1K_WHAT: &str = "latency at 1,000 msg/s, publish to cloud";
/// Row 4's duration at scale 1.
const PACED_SECONDS: f64 = 10.0;
/// Row 4's shortest duration, whatever the scale.
const MIN_PACED_SECONDS: f64 = 2.0;
/// Warm-up messages per device before row 1 (not scaled).
const WARM_UP_PER_DEVICE: u64 = 25;
/// A phase that makes no progress this long fails.
const STALL: Duration = Duration::from_secs(30);
/// How long a child process gets to listen, and to exit after SIGTERM.
const CHILD_LIMIT: Duration = Duration::from_secs(30);
/// The pause before memory and disk are read ("idle a second").
const IDLE: Duration = Duration::from_secs(1);
/// Vigil's store quota in the bench: far above 10 million messages, so
/// nothing is ever evicted.
const QUOTA_BYTES: u64 = 64 << 30;
/// The subscriber verifies one arrival in this many in full (sha256).
const VERIFY_EVERY: u64 = 1024;
/// Shown for a figure no phase got to.
const NOT_MEASURED: &str = "not measured";
/// What a row skipped by `--ingest-only` says.
const INGEST_ONLY: &str = "not run (--ingest-only)";
/// What a row skipped by `--latency-only` says.
const LATENCY_ONLY: &str = "not run (--latency-only)";

/// Why the bench, or one of its phases, could not measure something. A
/// phase's error becomes its rows' `error: ...` cells; only set-up errors
/// (before any phase) end the whole run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// `--scale` is not a finite number above 0.
    #[error("--scale {0}: give a number above 0, e.g. 0.02 for a quick run")]
    Scale(f64),
    /// There is no file where `--vigil` (or its default, next to `vigil-sim`)
    /// points.
    #[error(
        "no vigil binary at {0}: build it (cargo build --release -p vigil) or pass --vigil PATH"
    )]
    VigilMissing(PathBuf),
    /// The work directory, a file in it (configuration, log, store) or
    /// `/proc/<pid>/status` could not be created, written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The development PKI could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The loopback cloud broker did not start, or a PEM file for the
    /// counting subscriber is unusable.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The system gave no randomness for Vigil's storage key.
    #[error("no randomness for Vigil's storage key: {0}")]
    Random(String),
    /// No loopback port could be reserved.
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    /// A child process (Vigil, Mosquitto, `kill`) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error from the operating system.
        source: std::io::Error,
    },
    /// A child process exited, never listened, or did not stop after SIGTERM,
    /// while the bench needed it; its log says why.
    #[error("{what} {reason} (its log: {log})")]
    Child {
        /// Which child, e.g. `vigil (fill)`.
        what: String,
        /// What happened.
        reason: String,
        /// Where its output went.
        log: PathBuf,
    },
    /// A simulated device could not connect, or its connection failed during
    /// a load.
    #[error("device {device}: {reason}")]
    Device {
        /// The device's client id.
        device: String,
        /// rumqttc's error, or the refusal.
        reason: String,
    },
    /// The counting subscriber was not subscribed at the cloud within 20 s.
    #[error("the counting subscriber could not subscribe at {0} within 20 s")]
    Subscribe(SocketAddr),
    /// A load, or the cloud's count, made no progress for 30 s.
    #[error("{phase}: no progress for {secs} s ({have} of {want})")]
    Stalled {
        /// The phase.
        phase: String,
        /// Acknowledged or counted so far.
        have: u64,
        /// Expected.
        want: u64,
        /// How long nothing moved.
        secs: u64,
    },
    /// Vigil's `/status` could not be read, or its store did not empty.
    #[error("Vigil's /status at {addr}: {reason}")]
    Status {
        /// Vigil's operator listener.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The bare rumqttd of row 2's ratio did not start.
    #[error("the bare rumqttd did not start: {0}")]
    Bare(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to run the bench.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Multiplies every message count (1.0: the targets' own scale).
    pub scale: f64,
    /// Work directory (PKI, configurations, stores, logs). `None`: a
    /// temporary one, removed at the end unless something failed.
    pub out: Option<PathBuf>,
    /// The `vigil` binary.
    pub vigil: PathBuf,
    /// Also fill a store with 10,000,000 messages (× scale) for row 5.
    pub ten_million: bool,
    /// Also run rows 1, 2 and 4 (1,000/s) through a Mosquitto bridge, when
    /// `mosquitto` is on `PATH`.
    pub mosquitto: bool,
    /// Which rows run; the others are reported as not run.
    pub rows: Rows,
    /// Publishes each simulated device keeps in flight ([`INFLIGHT`] by
    /// default); Vigil's `gate.max_inflight` is set to the same.
    pub inflight: u16,
    /// Distinct filters a local subscriber (a simulated ward display, client
    /// id [`DISPLAY`]) holds on Vigil's gate through row 2's fill, none
    /// matching a device's topic, so that every publish goes through the
    /// gate's local-subscription check. 0, as in the table: no local
    /// subscriber.
    pub local_filters: usize,
    /// Topics each simulated device publishes to, in turn (1, as in the
    /// table: `devices/<id>/vitals`; more: `devices/<id>/vitals/<k>`). Above
    /// the gate's per-connection topic memo (32), every publish misses it.
    pub topics_per_device: u16,
}

/// The local subscriber's client id (`--local-filters`).
pub const DISPLAY: &str = "bench-display";
/// Filters per SUBSCRIBE the local subscriber sends.
const FILTERS_PER_SUBSCRIBE: usize = 100;

/// Which rows a bench runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rows {
    /// Every row.
    #[default]
    All,
    /// Only row 2: the fill and the bare rumqttd (`--ingest-only`).
    Ingest,
    /// Only row 4 at 1,000 msg/s, after the warm-up and the disk's fsync
    /// probe (`--latency-only`).
    Latency,
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The target's row, 1 to 7.
    pub row: u8,
    /// What is measured.
    pub what: String,
    /// Vigil's figure, `error: ...` or `not run (...)`.
    pub vigil: String,
    /// The target, or `(reference)`.
    pub target: String,
    /// `holds`, `does not hold`, or `-` (no target, or nothing measured).
    pub verdict: String,
    /// Mosquitto's figure and Vigil/Mosquitto, when that column is shown.
    pub mosquitto: Option<(String, String)>,
    /// Whether `vigil` is a measured figure (not an error, not "not run").
    pub measured: bool,
}

/// What the counting subscriber saw of one load (or, for the fill, what
/// Vigil's `/status` says it stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The phase.
    pub phase: String,
    /// Messages acknowledged by the edge (Vigil or Mosquitto) and expected.
    pub want: u64,
    /// Distinct messages counted.
    pub unique: u64,
    /// Second copies.
    pub duplicates: u64,
    /// Arrivals that were not one of the bench's payloads.
    pub unreadable: u64,
    /// Envelopes verified in full (sha256).
    pub verified: u64,
    /// Of those, how many failed.
    pub failed: u64,
    /// Whether this was counted by the subscriber (else: Vigil's `/status`).
    pub at_cloud: bool,
}

impl Delivery {
    /// Nothing lost, nothing unreadable, no failed digest.
    pub fn ok(&self) -> bool {
        self.unique >= self.want && self.unreadable == 0 && self.failed == 0
    }
}

/// The bench's result: print it with `{}`.
#[derive(Debug, Clone)]
pub struct Report {
    /// Lines above the table (the set-up).
    pub header: Vec<String>,
    /// The table.
    pub lines: Vec<Line>,
    /// Whether the Mosquitto columns are shown.
    pub mosquitto_column: bool,
    /// What arrived, per load.
    pub deliveries: Vec<Delivery>,
    /// How figures were taken, and anything odd seen on the way.
    pub notes: Vec<String>,
}

impl Report {
    /// Every line measured (or deliberately not run) and nothing lost.
    pub fn complete(&self) -> bool {
        self.lines
            .iter()
            .all(|l| l.measured || l.vigil.starts_with("not run"))
            && self.deliveries.iter().all(Delivery::ok)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for h in &self.header {
            writeln!(f, "{h}")?;
        }
        writeln!(f)?;
        let mut head = vec!["#", "measure", "Vigil", "target", "verdict"];
        if self.mosquitto_column {
            head.extend(["Mosquitto", "Vigil/Mosquitto"]);
        }
        let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
        for l in &self.lines {
            let mut r = vec![
                l.row.to_string(),
                l.what.clone(),
                l.vigil.clone(),
                l.target.clone(),
                l.verdict.clone(),
            ];
            if self.mosquitto_column {
                let (m, ratio) = l.mosquitto.clone().unwrap_or_default();
                r.extend([m, ratio]);
            }
            rows.push(r);
        }
        let mut widths = vec![0usize; head.len()];
        for r in &rows {
            for (w, cell) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for r in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in r.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(&format!("{cell:<w$}"));
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        if !self.deliveries.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "delivery (distinct messages counted at the cloud; for the fill, what Vigil's /status says it stored):"
            )?;
            let w = self
                .deliveries
                .iter()
                .map(|d| d.phase.chars().count())
                .max()
                .unwrap_or(0);
            for d in &self.deliveries {
                write!(
                    f,
                    "  {:<w$}  {} of {} ({})",
                    d.phase,
                    thousands(d.unique as f64),
                    thousands(d.want as f64),
                    if d.ok() { "nothing lost" } else { "MISSING" },
                )?;
                if d.at_cloud {
                    write!(
                        f,
                        ", {} duplicates, {} unreadable, sha256 verified on {} ({} failed)",
                        d.duplicates, d.unreadable, d.verified, d.failed,
                    )?;
                }
                writeln!(f)?;
            }
        }
        if !self.notes.is_empty() {
            writeln!(f)?;
            writeln!(f, "notes:")?;
            for n in &self.notes {
                writeln!(f, "  - {n}")?;
            }
        }
        Ok(())
    }
}

/// Runs the whole bench. Set-up failures (no `vigil`, no PKI, no cloud, no
/// subscription) are errors; a phase that fails shows as `error: ...` in its
/// rows and the run goes on with the next phase.
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        return Err(BenchError::Scale(opts.scale));
    }
    if !opts.vigil.is_file() {
        return Err(BenchError::VigilMissing(opts.vigil.clone()));
    }
    let (work, temp) = match &opts.out {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            (dir.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("vigil-bench-")
                .tempdir()
                .map_err(io_error(&std::env::temp_dir()))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let log = work.join("vigil.log");
    eprintln!(
        "bench: work dir {}; Vigil's output goes to {}",
        work.display(),
        log.display()
    );
    let epoch = Instant::now();
    let load_at_start = machine_load();
    let pki = pki::loopback(&work.join("pki"))?;
    let cloud = cloud::start_broker(&pki)?;
    eprintln!(
        "bench: cloud: rumqttd with mutual TLS on {} (MQTT 5, Vigil) and {} (MQTT 3.1.1)",
        cloud.v5, cloud.v4
    );
    let counter = Counter::start(&pki, cloud.v4, epoch)?;
    if !counter.subscribed(Duration::from_secs(20)).await {
        return Err(BenchError::Subscribe(cloud.v4));
    }
    let mut bench = Bench {
        opts: opts.clone(),
        work: work.clone(),
        log,
        pki,
        cloud,
        counter,
        key: storage_key()?,
        runs: 0,
        deliveries: Vec::new(),
        notes: Vec::new(),
    };
    let mut f = Figures::default();
    if opts.rows == Rows::Ingest {
        f.fail_online(INGEST_ONLY);
    } else if let Err(e) = bench.online_phase(&mut f).await {
        eprintln!("bench: the online phase failed: {e}");
        f.fail_online(&e.to_string());
    }
    if opts.rows == Rows::Latency {
        f.fail_backlog(LATENCY_ONLY);
    } else if let Err(e) = bench.backlog_phase(&mut f).await {
        eprintln!("bench: the backlog phase failed: {e}");
        f.fail_backlog(&e.to_string());
    }
    if opts.rows == Rows::Ingest {
        // Rows 3 and 7, and row 6's figures (the envelope size and the
        // store after the drain), need the drain that was not run.
        f.fail_backlog(INGEST_ONLY);
    }
    if opts.ten_million {
        let mut ten = Err(NOT_MEASURED.to_string());
        if let Err(e) = bench.ten_million_phase(&mut ten).await {
            eprintln!("bench: the ten-million phase failed: {e}");
            ten = Err(e.to_string());
        }
        f.rss_ten = Some(ten);
    }
    if opts.mosquitto {
        let mut m = MosquittoFigures::default();
        match on_path("mosquitto") {
            Some(bin) => {
                m.bin = Some(bin.clone());
                if let Err(e) = bench.mosquitto_phase(&bin, &mut m).await {
                    eprintln!("bench: the Mosquitto phase failed: {e}");
                    m.fail(&e.to_string());
                }
            }
            None => eprintln!(
                "bench: mosquitto is not on PATH (Debian: apt-get install mosquitto); \
                 no Mosquitto column"
            ),
        }
        f.mosquitto = Some(m);
    }
    let mut report = bench.report(&f);
    drop(bench);
    report.header.push(format!(
        "machine: {} CPUs (shared by everything here); 1-minute load average {} at the start, {} at the end",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_at_start,
        machine_load()
    ));
    if opts.topics_per_device > 1 {
        report.notes.push(format!(
            "every simulated device published to {} topics in turn (--topics-per-device; \
             the table's figures are for 1)",
            opts.topics_per_device
        ));
    }
    match temp {
        Some(t) if !report.complete() => {
            let kept = t.keep();
            report.notes.push(format!(
                "work dir {} kept (something failed): logs, configurations and stores are there",
                kept.display()
            ));
        }
        Some(t) => {
            report.notes.push(format!(
                "work dir {} removed at exit (pass --out DIR to keep it, with vigil.log)",
                t.path().display()
            ));
        }
        None => report
            .notes
            .push(format!("work dir {} kept (--out)", work.display())),
    }
    Ok(report)
}

type Fig<T> = Result<T, String>;

fn not_measured<T>() -> Fig<T> {
    Err(NOT_MEASURED.to_string())
}

/// Replaces a figure still "not measured" with the failure that stopped it.
fn fail<T>(fig: &mut Fig<T>, why: &str) {
    if matches!(fig, Err(s) if s == NOT_MEASURED) {
        *fig = Err(why.to_string());
    }
}

#[derive(Debug, Clone, Copy)]
struct Throughput {
    n: u64,
    /// Until the cloud counted all.
    rate: f64,
    /// Until the last PUBACK (Vigil's side).
    ingest: f64,
}

#[derive(Debug, Clone)]
struct Latency {
    /// Offered rate, all devices.
    rate: f64,
    samples: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// How far behind its schedule the load generator fell, at worst.
    lag: Duration,
    /// The device's side: `publish()` to Vigil's PUBACK (gate and fsync).
    ack_p50: Duration,
    ack_p99: Duration,
    /// Vigil's durable store commits during the load (its
    /// `vigil_commit_seconds` histogram), when `/metrics` answered.
    commits: Option<Observed>,
    /// Vigil's own view of each message during the load: gate read to its
    /// publish leaving for the cloud (`vigil_sent_seconds`), and to the
    /// cloud's PUBACK (`vigil_delivery_seconds`).
    sent: Option<Observed>,
    deliveries: Option<Observed>,
    /// The whole machine during the load: a p99 taken while the hypervisor
    /// steals CPU time is partly the neighbours'.
    machine: Option<MachineUse>,
}

/// What one of Vigil's histograms observed during one load: how many, and
/// the bucket bounds (powers of two from 100 µs) holding their median and
/// 99th percentile.
#[derive(Debug, Clone, Copy)]
struct Observed {
    n: u64,
    p50_le: f64,
    p99_le: f64,
}

#[derive(Debug, Clone, Copy)]
struct Rss {
    vm_kib: u64,
    anon_kib: u64,
}

#[derive(Debug, Clone, Copy)]
struct Drain {
    n: u64,
    /// From spawning the restarted Vigil to the last count.
    took: Duration,
    /// From spawning it to its gate listening.
    listening: Duration,
    /// From spawning it to the first arrival (row 7).
    first: Duration,
    /// Mean MQTT payload (envelope) size at the cloud.
    envelope: f64,
}

struct Figures {
    e2e: Fig<Throughput>,
    lat_1k: Fig<Latency>,
    /// 1,000/s again, straight after row 1's burst (its compactions running).
    lat_1k_after: Fig<Latency>,
    lat_80: Fig<Latency>,
    /// (n, msg/s)
    ingest: Fig<(u64, f64)>,
    bare: Fig<f64>,
    /// CPU during row 1, from the devices connecting until the cloud counted
    /// the last message.
    cpu_e2e: Option<CpuUse>,
    /// CPU while Vigil took row 2's fill, and while the bare rumqttd did.
    cpu_fill: Option<CpuUse>,
    cpu_bare: Option<CpuUse>,
    stored: Fig<u64>,
    rss_empty: Fig<Rss>,
    rss_full: Fig<Rss>,
    rss_ten: Option<Fig<Rss>>,
    du_empty: Fig<u64>,
    du_full: Fig<u64>,
    du_full_stopped: Fig<u64>,
    drain: Fig<Drain>,
    /// The disk's own fdatasync latency in the work directory, appending and
    /// overwriting a preallocated file, measured just before row 4.
    disk_sync: Option<Fig<(SyncProbe, SyncProbe)>>,
    /// The drain in slices of [`SLICE`]: where its time went while it ran.
    drain_slices: Vec<Slice>,
    du_drained: Fig<u64>,
    du_drained_stopped: Fig<u64>,
    mosquitto: Option<MosquittoFigures>,
}

impl Default for Figures {
    fn default() -> Self {
        Self {
            e2e: not_measured(),
            lat_1k: not_measured(),
            lat_1k_after: not_measured(),
            lat_80: not_measured(),
            ingest: not_measured(),
            bare: not_measured(),
            cpu_e2e: None,
            cpu_fill: None,
            cpu_bare: None,
            stored: not_measured(),
            rss_empty: not_measured(),
            rss_full: not_measured(),
            rss_ten: None,
            du_empty: not_measured(),
            du_full: not_measured(),
            du_full_stopped: not_measured(),
            drain: not_measured(),
            disk_sync: None,
            drain_slices: Vec::new(),
            du_drained: not_measured(),
            du_drained_stopped: not_measured(),
            mosquitto: None,
        }
    }
}

impl Figures {
    fn fail_online(&mut self, why: &str) {
        fail(&mut self.e2e, why);
        fail(&mut self.lat_1k, why);
        fail(&mut self.lat_1k_after, why);
        fail(&mut self.lat_80, why);
    }

    fn fail_backlog(&mut self, why: &str) {
        fail(&mut self.ingest, why);
        fail(&mut self.bare, why);
        fail(&mut self.stored, why);
        fail(&mut self.rss_empty, why);
        fail(&mut self.rss_full, why);
        fail(&mut self.du_empty, why);
        fail(&mut self.du_full, why);
        fail(&mut self.du_full_stopped, why);
        fail(&mut self.drain, why);
        fail(&mut self.du_drained, why);
        fail(&mut self.du_drained_stopped, why);
    }
}

struct MosquittoFigures {
    bin: Option<PathBuf>,
    e2e: Fig<f64>,
    /// CPU during its row 1, as [`Figures::cpu_e2e`] (Mosquitto in place of Vigil).
    cpu_e2e: Option<CpuUse>,
    /// Row 4's paced load at 1,000/s through the same bridge.
    lat_1k: Fig<Latency>,
    ingest: Fig<f64>,
    rss_full: Fig<Rss>,
}

impl Default for MosquittoFigures {
    fn default() -> Self {
        Self {
            bin: None,
            e2e: not_measured(),
            cpu_e2e: None,
            lat_1k: not_measured(),
            ingest: not_measured(),
            rss_full: not_measured(),
        }
    }
}

impl MosquittoFigures {
    fn fail(&mut self, why: &str) {
        fail(&mut self.e2e, why);
        fail(&mut self.ingest, why);
        fail(&mut self.rss_full, why);
    }
}

/// Messages per device for a count at scale 1 (at least 1).
fn per_device(base: f64, scale: f64) -> u64 {
    ((base * scale / f64::from(DEVICES)).round() as u64).max(1)
}

fn total(per_device: u64) -> u64 {
    per_device * u64::from(DEVICES)
}

fn paced_seconds(scale: f64) -> f64 {
    (PACED_SECONDS * scale).max(MIN_PACED_SECONDS)
}

/// What a load did.
struct Loaded {
    run: u32,
    per_device: u64,
    started: Instant,
    last_ack: Instant,
    lag: Duration,
    /// Paced loads: every `publish()` to PUBACK latency (µs), unsorted.
    ack_latencies: Vec<u32>,
}

impl Loaded {
    fn acked_rate(&self) -> f64 {
        rate(
            total(self.per_device),
            self.last_ack.saturating_duration_since(self.started),
        )
    }
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// What the cloud counted of a load.
struct Counted {
    first: Instant,
    done: Instant,
    mean_bytes: f64,
    latencies: Vec<u32>,
}

struct Bench {
    opts: BenchOptions,
    work: PathBuf,
    log: PathBuf,
    pki: DevPki,
    cloud: Listeners,
    counter: Counter,
    key: String,
    runs: u32,
    deliveries: Vec<Delivery>,
    notes: Vec<String>,
}

impl Bench {
    fn next_run(&mut self) -> u32 {
        self.runs += 1;
        self.runs
    }

    /// Writes a configuration and starts Vigil with it.
    async fn start_vigil(
        &self,
        name: &str,
        store: &Path,
        forward_port: u16,
    ) -> Result<Proc, BenchError> {
        let gate = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let path = |stem: &str| self.pki.path(stem).display().to_string();
        let mut text = format!(
            "# vigil-sim bench: {name}\n\
             [store]\ndir = {store:?}\nquota_bytes = {QUOTA_BYTES}\n\n\
             [gate]\ntcp_listen = \"{gate}\"\nmax_inflight = {inflight}\n\n\
             [http]\nlisten = \"{http}\"\n\n\
             [forward]\nhost = \"127.0.0.1\"\nport = {forward_port}\n\
             backoff_min = \"100ms\"\nbackoff_max = \"1s\"\n\n\
             [forward.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            store = store.display().to_string(),
            inflight = self.opts.inflight,
            ca = path("ca.pem"),
            cert = path("vigil.pem"),
            key = path("vigil.key"),
        );
        if self.opts.local_filters > 0 {
            // The display may subscribe under `wards/`, where no device
            // publishes.
            text.push_str(&format!(
                "\n[[gate.subscribe]]\nclients = [\"{DISPLAY}\"]\nfilters = [\"wards/#\"]\n"
            ));
        }
        let config = self.work.join(format!("vigil-{name}.toml"));
        std::fs::write(&config, text).map_err(io_error(&config))?;
        let mut cmd = tokio::process::Command::new(&self.opts.vigil);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("VIGIL_STORAGE_KEY", &self.key)
            .env("NO_COLOR", "1");
        Proc::spawn(
            format!("vigil ({name})"),
            &self.opts.vigil,
            cmd,
            gate,
            Some(http),
            &self.log,
        )
        .await
    }

    /// Stops a child with SIGTERM; a slow or failed stop becomes a note.
    async fn stop(&mut self, p: Proc) {
        let what = p.what.clone();
        match p.stop().await {
            Ok((took, status)) => {
                eprintln!("bench: {what} stopped by SIGTERM in {took:.2?} ({status})");
                if !status.success() {
                    self.notes
                        .push(format!("{what} exited with {status} after SIGTERM"));
                }
            }
            Err(e) => {
                eprintln!("bench: {e}");
                self.notes.push(e.to_string());
            }
        }
    }

    /// Runs one load: every device connects, then all publish `per_device`
    /// messages (paced at `rate` per device per second, or as fast as their
    /// windows allow) until every PUBACK is in.
    async fn load(
        &self,
        phase: &str,
        target: SocketAddr,
        run: u32,
        per_device: u64,
        rate: Option<f64>,
    ) -> Result<Loaded, BenchError> {
        let mut connecting = tokio::task::JoinSet::new();
        for d in 0..DEVICES {
            connecting.spawn(connect_device(
                target,
                format!("bench-{run}-{d}"),
                d,
                self.opts.inflight,
            ));
        }
        let mut devices = Vec::new();
        while let Some(joined) = connecting.join_next().await {
            let device = joined.map_err(|e| BenchError::Device {
                device: format!("bench-{run}-?"),
                reason: e.to_string(),
            })??;
            devices.push(device);
        }
        let want = total(per_device);
        let acked = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut running = tokio::task::JoinSet::new();
        for (d, client, el) in devices {
            running.spawn(device_run(
                Spec {
                    run,
                    device: d,
                    per_device,
                    rate,
                    epoch: self.counter.epoch,
                    topics: self.opts.topics_per_device,
                },
                client,
                el,
                acked.clone(),
            ));
        }
        let mut last_ack = started;
        let mut lag = Duration::ZERO;
        let mut ack_latencies = Vec::new();
        let (mut seen, mut moved, mut shown) = (0, Instant::now(), Instant::now());
        loop {
            tokio::select! {
                joined = running.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(done))) => {
                        last_ack = last_ack.max(done.last_ack);
                        lag = lag.max(done.lag);
                        ack_latencies.extend(done.ack_latencies);
                    }
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => {
                        return Err(BenchError::Device {
                            device: format!("bench-{run}-?"),
                            reason: e.to_string(),
                        })
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    let have = acked.load(Ordering::Relaxed);
                    if have != seen {
                        (seen, moved) = (have, Instant::now());
                    } else if moved.elapsed() > STALL {
                        return Err(BenchError::Stalled {
                            phase: phase.to_string(),
                            have,
                            want,
                            secs: STALL.as_secs(),
                        });
                    }
                    if shown.elapsed() > Duration::from_secs(5) {
                        shown = Instant::now();
                        eprintln!(
                            "bench:   {phase}: {} of {} acknowledged",
                            thousands(have as f64),
                            thousands(want as f64)
                        );
                    }
                }
            }
        }
        Ok(Loaded {
            run,
            per_device,
            started,
            last_ack,
            lag,
            ack_latencies,
        })
    }

    /// Waits until the subscriber has counted everything it expects, failing
    /// when nothing new arrives for [`STALL`] or `child` exits.
    async fn wait_counted(
        &self,
        phase: &str,
        mut child: Option<&mut Proc>,
        mut slices: Option<&mut Vec<Slice>>,
    ) -> Result<Counted, BenchError> {
        let (mut seen, mut moved, mut shown) = (0, Instant::now(), Instant::now());
        let pid = child.as_deref().map(|c| c.pid);
        let mut sliced = (CpuSample::take(pid), self.counter.snapshot().unique);
        loop {
            let t = self.counter.snapshot();
            let done = t.first.is_some() && t.done.is_some();
            if let Some(out) = slices.as_deref_mut()
                && (done || sliced.0.at.elapsed() >= SLICE)
            {
                let now = CpuSample::take(pid);
                let n = t.unique.saturating_sub(sliced.1);
                out.push(Slice {
                    n,
                    cpu: now.since(&sliced.0, n.max(1)),
                });
                sliced = (now, t.unique);
            }
            if let (Some(first), Some(done)) = (t.first, t.done) {
                return Ok(Counted {
                    first,
                    done,
                    mean_bytes: t.bytes as f64 / t.unique.max(1) as f64,
                    latencies: self.counter.take_latencies(),
                });
            }
            if let Some(c) = child.as_deref_mut() {
                c.check_running()?;
            }
            if t.unique != seen {
                (seen, moved) = (t.unique, Instant::now());
            } else if moved.elapsed() > STALL {
                return Err(BenchError::Stalled {
                    phase: format!("{phase} (counting at the cloud)"),
                    have: t.unique,
                    want: t.want,
                    secs: STALL.as_secs(),
                });
            }
            if shown.elapsed() > Duration::from_secs(5) {
                shown = Instant::now();
                eprintln!(
                    "bench:   {phase}: {} of {} counted at the cloud",
                    thousands(t.unique as f64),
                    thousands(t.want as f64)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A load through an edge broker to the cloud, counted there.
    async fn through_cloud(
        &mut self,
        phase: &str,
        child: &mut Proc,
        per_device: u64,
        rate: Option<f64>,
        latencies: bool,
    ) -> Result<(Loaded, Counted), BenchError> {
        let run = self.next_run();
        self.counter.expect(run, per_device, latencies);
        let loaded = self.load(phase, child.listen, run, per_device, rate).await;
        let counted = match loaded {
            Ok(loaded) => self
                .wait_counted(phase, Some(child), None)
                .await
                .map(|counted| (loaded, counted)),
            Err(e) => Err(e),
        };
        // Recorded even when the load failed: it shows what did arrive.
        self.deliveries
            .push(self.counter.delivery(phase, total(per_device)));
        counted
    }

    /// Row 1 through `bridge` (Vigil or the peer), with the CPU it used from
    /// the devices connecting until the cloud counted the last message:
    /// per message only when all arrived (a failed row has no rate).
    async fn row_one(
        &mut self,
        phase: &str,
        bridge: &mut Proc,
        per_device: u64,
    ) -> (Result<(Loaded, Counted), BenchError>, Option<CpuUse>) {
        let before = CpuSample::take(Some(bridge.pid));
        let row = self
            .through_cloud(phase, bridge, per_device, None, false)
            .await;
        let cpu = match &row {
            Ok(_) => CpuSample::take(Some(bridge.pid)).since(&before, total(per_device)),
            Err(_) => None,
        };
        (row, cpu)
    }

    /// A paced load through Vigil, for row 4.
    async fn paced(
        &mut self,
        phase: &str,
        vigil: &mut Proc,
        rate_total: f64,
    ) -> Result<Latency, BenchError> {
        let secs = paced_seconds(self.opts.scale);
        let each = rate_total / f64::from(DEVICES);
        let per = ((each * secs).ceil() as u64).max(1);
        eprintln!(
            "bench: {phase}: {DEVICES} devices × {each:.1}/s for {secs:.0} s ({} msg/s)",
            thousands(rate_total)
        );
        let before = match vigil.http {
            Some(http) => histograms(http).await.ok(),
            None => None,
        };
        let cpu_before = CpuSample::take(None);
        let (mut loaded, mut counted) = self
            .through_cloud(phase, vigil, per, Some(each), true)
            .await?;
        let machine = CpuSample::take(None)
            .since(&cpu_before, total(per))
            .and_then(|c| c.machine);
        let after = match vigil.http {
            Some(http) => histograms(http).await.ok(),
            None => None,
        };
        let readings = before.as_ref().zip(after.as_ref());
        counted.latencies.sort_unstable();
        loaded.ack_latencies.sort_unstable();
        let l = &counted.latencies;
        let us = |v: &[u32], p: f64| Duration::from_micros(u64::from(percentile(v, p)));
        let lat = Latency {
            rate: rate_total,
            samples: l.len(),
            p50: us(l, 0.50),
            p99: us(l, 0.99),
            max: us(l, 1.0),
            lag: loaded.lag,
            ack_p50: us(&loaded.ack_latencies, 0.50),
            ack_p99: us(&loaded.ack_latencies, 0.99),
            commits: readings.and_then(|(b, a)| observed_between(&b.0, &a.0)),
            sent: readings.and_then(|(b, a)| observed_between(&b.1, &a.1)),
            deliveries: readings.and_then(|(b, a)| observed_between(&b.2, &a.2)),
            machine,
        };
        eprintln!(
            "bench: {phase}: p50 {} p99 {} max {} ({} samples)",
            ms(lat.p50),
            ms(lat.p99),
            ms(lat.max),
            lat.samples
        );
        Ok(lat)
    }

    /// Rows 1 and 4.
    async fn online_phase(&mut self, f: &mut Figures) -> Result<(), BenchError> {
        eprintln!("bench: rows 1 and 4: starting Vigil, forwarding to the loopback mTLS cloud");
        let store = self.work.join("store-online");
        let mut vigil = self
            .start_vigil("online", &store, self.cloud.v5.port())
            .await?;
        eprintln!(
            "bench: warm-up: {} messages through Vigil to the cloud",
            total(WARM_UP_PER_DEVICE)
        );
        self.through_cloud("warm-up", &mut vigil, WARM_UP_PER_DEVICE, None, false)
            .await?;
        // The floor under row 4's device side: the disk's own fsync.
        let dir = self.work.clone();
        f.disk_sync = Some(
            tokio::task::spawn_blocking(move || {
                Ok::<_, BenchError>((
                    sync_probe(&dir, SYNC_PROBES, false)?,
                    sync_probe(&dir, SYNC_PROBES, true)?,
                ))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
        );
        // Row 4's target is measured on a store in steady state; the same
        // rate right after row 1's burst (while its compactions run) is
        // shown as a reference.
        f.lat_1k = self
            .paced("row 4: latency at 1,000/s", &mut vigil, PACED_RATE)
            .await
            .map_err(|e| e.to_string());
        if self.opts.rows == Rows::Latency {
            self.stop(vigil).await;
            fail(&mut f.e2e, LATENCY_ONLY);
            fail(&mut f.lat_1k_after, LATENCY_ONLY);
            fail(&mut f.lat_80, LATENCY_ONLY);
            return Ok(());
        }
        let per = per_device(E2E_MESSAGES, self.opts.scale);
        let n = total(per);
        eprintln!(
            "bench: row 1: {DEVICES} devices publishing {} messages through Vigil to the cloud",
            thousands(n as f64)
        );
        let (row1, cpu) = self.row_one("row 1: end-to-end", &mut vigil, per).await;
        f.cpu_e2e = cpu;
        f.e2e = match row1 {
            Ok((loaded, counted)) => {
                let t = Throughput {
                    n,
                    rate: rate(n, counted.done.saturating_duration_since(loaded.started)),
                    ingest: loaded.acked_rate(),
                };
                eprintln!(
                    "bench: row 1: {} msg/s end to end ({} msg/s acknowledged by Vigil)",
                    thousands(t.rate),
                    thousands(t.ingest)
                );
                Ok(t)
            }
            Err(e) => Err(e.to_string()),
        };
        f.lat_1k_after = self
            .paced(
                "row 4: latency at 1,000/s after row 1",
                &mut vigil,
                PACED_RATE,
            )
            .await
            .map_err(|e| e.to_string());
        f.lat_80 = match &f.e2e {
            Ok(t) => self
                .paced("row 4: latency at 80 % of row 1", &mut vigil, 0.8 * t.rate)
                .await
                .map_err(|e| e.to_string()),
            Err(_) => Err("needs row 1's rate, which was not measured".into()),
        };
        self.stop(vigil).await;
        Ok(())
    }

    /// Rows 2, 3, 5 (empty, backlog), 6 and 7.
    async fn backlog_phase(&mut self, f: &mut Figures) -> Result<(), BenchError> {
        let per = per_device(BACKLOG_MESSAGES, self.opts.scale);
        let n = total(per);
        let store = self.work.join("store");
        let closed = free_port()?;
        eprintln!(
            "bench: row 2: starting Vigil with the cloud unreachable (forward.port {closed}, closed)"
        );
        let vigil = self.start_vigil("fill", &store, closed).await?;
        tokio::time::sleep(IDLE).await;
        f.rss_empty = rss(vigil.pid).map_err(|e| e.to_string());
        f.du_empty = allocated_bytes(&store).map_err(|e| e.to_string());
        let display = match self.opts.local_filters {
            0 => None,
            filters => {
                eprintln!(
                    "bench: row 2: a local subscriber ({DISPLAY}) subscribes to {filters} filters"
                );
                Some(local_display(vigil.listen, filters).await?)
            }
        };
        let run = self.next_run();
        eprintln!(
            "bench: row 2: {DEVICES} devices publishing {} messages to Vigil (cloud unreachable)",
            thousands(n as f64)
        );
        let before = CpuSample::take(Some(vigil.pid));
        let loaded = self
            .load("row 2: durable ingest", vigil.listen, run, per, None)
            .await?;
        f.cpu_fill = CpuSample::take(Some(vigil.pid)).since(&before, n);
        f.ingest = Ok((n, loaded.acked_rate()));
        eprintln!(
            "bench: row 2: {} msg/s, all {} acknowledged",
            thousands(loaded.acked_rate()),
            thousands(n as f64)
        );
        tokio::time::sleep(IDLE).await;
        f.rss_full = rss(vigil.pid).map_err(|e| e.to_string());
        f.du_full = allocated_bytes(&store).map_err(|e| e.to_string());
        if let Some(http) = vigil.http {
            f.stored = backlog(http).await.map_err(|e| e.to_string());
        }
        if let Some(display) = display {
            if let Some(http) = vigil.http {
                self.notes
                    .push(local_note(http, self.opts.local_filters, n).await);
            }
            display.abort();
        }
        self.deliveries.push(Delivery {
            phase: "row 2: fill, stored by Vigil (/status backlog)".into(),
            want: n,
            unique: f.stored.as_ref().map_or(0, |s| *s),
            duplicates: 0,
            unreadable: 0,
            verified: 0,
            failed: 0,
            at_cloud: false,
        });
        eprintln!(
            "bench: row 2: the same load to a bare rumqttd (plain TCP, nothing stored, not durable)"
        );
        f.bare = match start_bare().await {
            Ok(bare) => {
                let run = self.next_run();
                let before = CpuSample::take(None);
                let loaded = self.load("row 2: bare rumqttd", bare, run, per, None).await;
                f.cpu_bare = CpuSample::take(None).since(&before, n);
                loaded.map(|l| l.acked_rate()).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Ok(r) = &f.bare {
            eprintln!("bench: row 2: bare rumqttd {} msg/s", thousands(*r));
        }
        if self.opts.rows == Rows::Ingest {
            self.stop(vigil).await;
            return Ok(());
        }
        eprintln!(
            "bench: row 3: stopping Vigil (SIGTERM) with {} queued",
            thousands(n as f64)
        );
        self.stop(vigil).await;
        f.du_full_stopped = allocated_bytes(&store).map_err(|e| e.to_string());
        self.counter.expect(loaded.run, loaded.per_device, false);
        eprintln!(
            "bench: rows 3 and 7: restarting Vigil forwarding to the cloud; draining {}",
            thousands(n as f64)
        );
        let mut vigil = self
            .start_vigil("drain", &store, self.cloud.v5.port())
            .await?;
        let counted = self
            .wait_counted("row 3: drain", Some(&mut vigil), Some(&mut f.drain_slices))
            .await;
        let phase = "row 3: drain of the backlog";
        self.deliveries.push(self.counter.delivery(phase, n));
        let counted = counted?;
        let d = Drain {
            n,
            took: counted.done.saturating_duration_since(vigil.spawned),
            listening: vigil.listening,
            first: counted.first.saturating_duration_since(vigil.spawned),
            envelope: counted.mean_bytes,
        };
        eprintln!(
            "bench: row 3: {} msg/s; row 7: first arrival {} after the spawn",
            thousands(rate(d.n, d.took)),
            ms(d.first)
        );
        f.drain = Ok(d);
        if let Some(http) = vigil.http
            && let Err(e) = wait_empty(http).await
        {
            self.notes.push(e.to_string());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        f.du_drained = allocated_bytes(&store).map_err(|e| e.to_string());
        self.stop(vigil).await;
        f.du_drained_stopped = allocated_bytes(&store).map_err(|e| e.to_string());
        Ok(())
    }

    /// Row 5 at ten million.
    async fn ten_million_phase(&mut self, out: &mut Fig<Rss>) -> Result<(), BenchError> {
        let per = per_device(TEN_MILLION, self.opts.scale);
        let n = total(per);
        let store = self.work.join("store-10m");
        let closed = free_port()?;
        eprintln!(
            "bench: row 5: filling a fresh store with {} messages (cloud unreachable)",
            thousands(n as f64)
        );
        let vigil = self.start_vigil("ten-million", &store, closed).await?;
        let run = self.next_run();
        let loaded = self
            .load("row 5: ten-million fill", vigil.listen, run, per, None)
            .await?;
        eprintln!(
            "bench: row 5: filled at {} msg/s",
            thousands(loaded.acked_rate())
        );
        tokio::time::sleep(IDLE).await;
        *out = rss(vigil.pid).map_err(|e| e.to_string());
        if let Some(http) = vigil.http {
            match backlog(http).await {
                Ok(b) if b == n => {}
                Ok(b) => self.notes.push(format!(
                    "ten-million fill: /status backlog {b}, expected {n}"
                )),
                Err(e) => self.notes.push(e.to_string()),
            }
        }
        self.stop(vigil).await;
        Ok(())
    }

    /// Rows 1 and 2 through a Mosquitto bridge.
    async fn mosquitto_phase(
        &mut self,
        bin: &Path,
        m: &mut MosquittoFigures,
    ) -> Result<(), BenchError> {
        eprintln!(
            "bench: Mosquitto row 1: {} bridged to the cloud",
            bin.display()
        );
        match self
            .start_mosquitto(bin, "online", self.cloud.v4.port())
            .await
        {
            Ok(mut p) => {
                let per = per_device(E2E_MESSAGES, self.opts.scale);
                let n = total(per);
                let warm = self
                    .through_cloud("Mosquitto warm-up", &mut p, WARM_UP_PER_DEVICE, None, false)
                    .await;
                m.e2e = match warm {
                    Err(e) => Err(format!("warm-up: {e}")),
                    Ok(_) => {
                        let (row1, cpu) = self
                            .row_one("Mosquitto row 1: end-to-end", &mut p, per)
                            .await;
                        m.cpu_e2e = cpu;
                        row1.map(|(l, c)| rate(n, c.done.saturating_duration_since(l.started)))
                            .map_err(|e| e.to_string())
                    }
                };
                if let Ok(r) = &m.e2e {
                    eprintln!("bench: Mosquitto row 1: {} msg/s", thousands(*r));
                }
                // The peer's latency at row 4's rate, after its row 1 as
                // Vigil's first row 4 figure is not: shown for reference.
                if m.e2e.is_ok() {
                    m.lat_1k = self
                        .paced("Mosquitto row 4: latency at 1,000/s", &mut p, PACED_RATE)
                        .await
                        .map_err(|e| e.to_string());
                }
                self.stop(p).await;
            }
            Err(e) => m.e2e = Err(e.to_string()),
        }
        let per = per_device(BACKLOG_MESSAGES, self.opts.scale);
        let closed = free_port()?;
        eprintln!(
            "bench: Mosquitto row 2: {} messages with the bridge's cloud unreachable",
            thousands(total(per) as f64)
        );
        let p = self.start_mosquitto(bin, "offline", closed).await?;
        let run = self.next_run();
        let loaded = self
            .load("Mosquitto row 2: ingest", p.listen, run, per, None)
            .await?;
        m.ingest = Ok(loaded.acked_rate());
        eprintln!(
            "bench: Mosquitto row 2: {} msg/s",
            thousands(loaded.acked_rate())
        );
        tokio::time::sleep(IDLE).await;
        m.rss_full = rss(p.pid).map_err(|e| e.to_string());
        self.stop(p).await;
        Ok(())
    }

    async fn start_mosquitto(
        &self,
        bin: &Path,
        name: &str,
        bridge_port: u16,
    ) -> Result<Proc, BenchError> {
        let dir = self.work.join(format!("mosquitto-{name}"));
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let conf = dir.join("mosquitto.conf");
        let text = mosquitto_conf(&dir, listen, bridge_port, &self.pki, running_as_root());
        std::fs::write(&conf, text).map_err(io_error(&conf))?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("-c").arg(&conf);
        Proc::spawn(
            format!("mosquitto ({name})"),
            bin,
            cmd,
            listen,
            None,
            &self.work.join("mosquitto.log"),
        )
        .await
    }

    fn report(&self, f: &Figures) -> Report {
        let scale = self.opts.scale;
        let n_e2e = total(per_device(E2E_MESSAGES, scale));
        let n_backlog = total(per_device(BACKLOG_MESSAGES, scale));
        let n_ten = total(per_device(TEN_MILLION, scale));
        let inflight = self.opts.inflight;
        let mut header = vec![
            format!(
                "vigil-sim bench: {DEVICES} devices (rumqttc, MQTT 3.1.1, up to {inflight} in flight each), \
                 {PAYLOAD_BYTES}-byte QoS 1 JSON payloads, everything on loopback; scale {scale}"
            ),
            format!(
                "vigil {} (its output: {})",
                self.opts.vigil.display(),
                self.log.display()
            ),
            match self.opts.local_filters {
                0 => "no local subscriber on Vigil's gate".to_string(),
                n => format!(
                    "a local subscriber ({DISPLAY}) holds {n} filters on Vigil's gate during row 2's fill \
                     (--local-filters), none matching a device's topic"
                ),
            },
            format!(
                "cloud: rumqttd with mutual TLS, Vigil on its MQTT 5 listener {}, the counting subscriber on {}",
                self.cloud.v5, self.cloud.v4
            ),
        ];
        if (scale - 1.0).abs() > f64::EPSILON {
            header.push(format!(
                "message counts are scaled by {scale}; the targets are stated for scale 1 \
                 (e.g. row 5's \"1M\" is {} here)",
                thousands(n_backlog as f64)
            ));
        }
        let mosq = f.mosquitto.as_ref().filter(|m| m.bin.is_some());
        match &f.mosquitto {
            Some(m) if m.bin.is_none() => header.push(
                "--mosquitto: mosquitto is not on PATH (Debian: apt-get install mosquitto); \
                 the Mosquitto column is skipped"
                    .into(),
            ),
            Some(MosquittoFigures { bin: Some(b), .. }) => header.push(format!(
                "Mosquitto {} as the edge broker, bridged to the same cloud (MQTT 3.1.1, mutual TLS, \
                 topic # out 1, max_queued_messages 0, max_inflight_messages {INFLIGHT}, persistence on \
                 as Debian's default; its output: {})",
                b.display(),
                self.work.join("mosquitto.log").display()
            )),
            _ => {}
        }
        let mut lines = Vec::new();
        let mut add =
            |row: u8, what: String, vigil: Fig<String>, target: &str, ok: Option<bool>| {
                let measured = vigil.is_ok();
                lines.push(Line {
                    row,
                    what,
                    vigil: vigil.unwrap_or_else(|e| {
                        if e.starts_with("not run") {
                            e
                        } else {
                            format!("error: {e}")
                        }
                    }),
                    target: target.to_string(),
                    verdict: match ok {
                        Some(true) if measured => "holds".into(),
                        Some(false) if measured => "does not hold".into(),
                        _ => "-".into(),
                    },
                    mosquitto: None,
                    measured,
                });
            };
        let per_s = |r: f64| format!("{} msg/s", thousands(r));

        // Row 1.
        add(
            1,
            format!("end-to-end throughput, {} msgs", thousands(n_e2e as f64)),
            f.e2e.as_ref().map(|t| per_s(t.rate)).map_err(Clone::clone),
            "≥ 35,000/s",
            f.e2e.as_ref().ok().map(|t| t.rate >= 35_000.0),
        );
        // Row 2.
        add(
            2,
            format!(
                "durable ingest, cloud unreachable, {} msgs",
                thousands(n_backlog as f64)
            ),
            f.ingest
                .as_ref()
                .map(|(_, r)| per_s(*r))
                .map_err(Clone::clone),
            "≥ 75,000/s",
            f.ingest.as_ref().ok().map(|(_, r)| *r >= 75_000.0),
        );
        add(
            2,
            "same load to a bare rumqttd (not durable)".into(),
            f.bare.as_ref().map(|r| per_s(*r)).map_err(Clone::clone),
            "(reference)",
            None,
        );
        let ratio = match (&f.ingest, &f.bare) {
            (Ok((_, v)), Ok(b)) => Ok(v / b),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        add(
            2,
            "ratio Vigil / bare rumqttd".into(),
            ratio
                .as_ref()
                .map(|r| format!("{r:.2}"))
                .map_err(Clone::clone),
            "≥ 0.7",
            ratio.as_ref().ok().map(|r| *r >= 0.7),
        );
        // Row 3.
        add(
            3,
            format!(
                "drain of a {} backlog, from restart",
                thousands(n_backlog as f64)
            ),
            f.drain
                .as_ref()
                .map(|d| per_s(rate(d.n, d.took)))
                .map_err(Clone::clone),
            "≥ 55,000/s",
            f.drain.as_ref().ok().map(|d| rate(d.n, d.took) >= 55_000.0),
        );
        // Row 4.
        let lat = |l: &Latency| format!("p50 {} / p99 {}", ms(l.p50), ms(l.p99));
        add(
            4,
            LAT_1K_WHAT.into(),
            f.lat_1k.as_ref().map(lat).map_err(Clone::clone),
            "p99 ≤ 2 ms",
            f.lat_1k
                .as_ref()
                .ok()
                .map(|l| l.p99 <= Duration::from_millis(2)),
        );
        add(
            4,
            "latency at 1,000 msg/s, right after row 1".into(),
            f.lat_1k_after.as_ref().map(lat).map_err(Clone::clone),
            "(reference)",
            None,
        );
        add(
            4,
            match &f.lat_80 {
                Ok(l) => format!("latency at 80 % of row 1 ({} msg/s)", thousands(l.rate)),
                Err(_) => "latency at 80 % of row 1".into(),
            },
            f.lat_80.as_ref().map(lat).map_err(Clone::clone),
            "(reference)",
            None,
        );
        // Row 5.
        let rss_text = |r: &Rss| format!("VmRSS {} (RssAnon {})", mib(r.vm_kib), mib(r.anon_kib));
        add(
            5,
            "RSS, empty store (1 s after start)".into(),
            f.rss_empty.as_ref().map(rss_text).map_err(Clone::clone),
            "(reference)",
            None,
        );
        add(
            5,
            format!("RSS, {} queued (idle 1 s)", thousands(n_backlog as f64)),
            f.rss_full.as_ref().map(rss_text).map_err(Clone::clone),
            "VmRSS ≤ 64 MiB",
            f.rss_full.as_ref().ok().map(|r| r.vm_kib <= 64 * 1024),
        );
        let ten: Fig<Rss> = match &f.rss_ten {
            Some(r) => r.clone(),
            None => Err("not run (--ten-million)".into()),
        };
        let ten_ok = match (&ten, &f.rss_full) {
            (Ok(t), Ok(one)) => Some(t.vm_kib as f64 <= one.vm_kib as f64 * 1.05),
            _ => None,
        };
        add(
            5,
            format!("RSS, {} queued (idle 1 s)", thousands(n_ten as f64)),
            ten.as_ref()
                .map(|t| match &f.rss_full {
                    Ok(one) => format!(
                        "{} = {:+.1} % vs {}",
                        rss_text(t),
                        (t.vm_kib as f64 / one.vm_kib.max(1) as f64 - 1.0) * 100.0,
                        thousands(n_backlog as f64)
                    ),
                    Err(_) => rss_text(t),
                })
                .map_err(Clone::clone),
            "VmRSS ≤ 5 % above the 1M figure",
            ten_ok,
        );
        // Row 6.
        let per_msg: Fig<f64> = match (&f.du_full, &f.du_empty) {
            (Ok(full), Ok(empty)) => Ok(full.saturating_sub(*empty) as f64 / n_backlog as f64),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        let disk_ratio: Fig<(f64, f64)> = match (&per_msg, &f.drain) {
            (Ok(p), Ok(d)) => Ok((*p, *p / d.envelope.max(1.0))),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        add(
            6,
            "disk per stored message / envelope size".into(),
            match (&disk_ratio, &f.drain) {
                (Ok((p, r)), Ok(d)) => Ok(format!("{p:.0} B / {:.0} B = {r:.2}×", d.envelope)),
                (Err(e), _) | (_, Err(e)) => Err(e.clone()),
            },
            "≤ 1.5×",
            disk_ratio.as_ref().ok().map(|(_, r)| *r <= 1.5),
        );
        add(
            6,
            "store size after the drain".into(),
            match (&f.du_drained, &f.du_full, &f.du_empty) {
                (Ok(after), Ok(full), Ok(empty)) if after >= full => Ok(format!(
                    "{} (full {}, empty {}): not reclaimed, {:+.0} % over the full store",
                    mib_bytes(*after),
                    mib_bytes(*full),
                    mib_bytes(*empty),
                    (*after as f64 / (*full).max(1) as f64 - 1.0) * 100.0
                )),
                (Ok(after), Ok(full), Ok(empty)) => {
                    let grown = full.saturating_sub(*empty) as f64;
                    let back = full.saturating_sub(*after) as f64;
                    Ok(format!(
                        "{} (full {}, empty {}): {:.0} % of the growth reclaimed",
                        mib_bytes(*after),
                        mib_bytes(*full),
                        mib_bytes(*empty),
                        if grown > 0.0 {
                            back / grown * 100.0
                        } else {
                            0.0
                        }
                    ))
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e.clone()),
            },
            "(reference)",
            None,
        );
        // Row 7.
        add(
            7,
            format!(
                "start to forwarding, {} queued",
                thousands(n_backlog as f64)
            ),
            f.drain.as_ref().map(|d| ms(d.first)).map_err(Clone::clone),
            "< 1 s",
            f.drain
                .as_ref()
                .ok()
                .map(|d| d.first < Duration::from_secs(1)),
        );

        // The Mosquitto column: rows 1 and 2.
        if let Some(m) = mosq {
            let cell = |fig: &Fig<f64>, vigil: Option<f64>| -> (String, String) {
                match fig {
                    Ok(r) => (
                        per_s(*r),
                        vigil.map_or_else(|| "-".into(), |v| format!("{:.2}", v / r)),
                    ),
                    Err(e) => (format!("error: {e}"), "-".into()),
                }
            };
            let latency = |fig: &Fig<Latency>, vigil: Option<&Latency>| -> (String, String) {
                match fig {
                    Ok(m) => (
                        format!("p50 {} / p99 {}", ms(m.p50), ms(m.p99)),
                        vigil.map_or_else(
                            || "-".into(),
                            |v| {
                                format!(
                                    "{:.2} (p99)",
                                    v.p99.as_secs_f64() / m.p99.as_secs_f64().max(1e-6)
                                )
                            },
                        ),
                    ),
                    Err(e) => (format!("error: {e}"), "-".into()),
                }
            };
            for l in lines.iter_mut() {
                match (l.row, l.what.starts_with("durable ingest")) {
                    (1, _) => l.mosquitto = Some(cell(&m.e2e, f.e2e.as_ref().ok().map(|t| t.rate))),
                    (2, true) => {
                        l.mosquitto = Some(cell(&m.ingest, f.ingest.as_ref().ok().map(|i| i.1)))
                    }
                    (4, _) if l.what.starts_with(LAT_1K_WHAT) => {
                        l.mosquitto = Some(latency(&m.lat_1k, f.lat_1k.as_ref().ok()))
                    }
                    _ => {}
                }
            }
        }

        // Notes: how each figure was taken, and the sanity checks.
        let mut notes = Vec::new();
        if let Ok(t) = &f.e2e {
            notes.push(format!(
                "row 1: from the first publish until the cloud counted all {}; Vigil acknowledged \
                 them at {} msg/s (last PUBACK)",
                thousands(t.n as f64),
                thousands(t.ingest)
            ));
        }
        if let Some(c) = &f.cpu_e2e {
            notes.push(c.load_note("row 1", "Vigil"));
        }
        if let Some(c) = mosq.and_then(|m| m.cpu_e2e.as_ref()) {
            notes.push(c.load_note("Mosquitto row 1", "Mosquitto"));
        }
        if let (Ok((n, _)), Ok(b)) = (&f.ingest, &f.bare) {
            notes.push(format!(
                "row 2: from the first publish until the last PUBACK, {} msgs each; the bare rumqttd \
                 (in this process, plain TCP, Vigil's embedded-broker settings) shows what the load \
                 generator and loopback carry: {} msg/s",
                thousands(*n as f64),
                thousands(*b)
            ));
        }
        if let Some(c) = &f.cpu_fill {
            notes.push(format!(
                "row 2: CPU during the fill ({:.2} s): Vigil {}; this process (the 20 devices) {}; \
                 the machine {}",
                c.wall,
                c.process(c.vigil),
                c.process(c.sim),
                c.machine_text()
            ));
        }
        if let Some(c) = &f.cpu_bare {
            notes.push(format!(
                "row 2: CPU during the bare run ({:.2} s): this process (the 20 devices and the bare \
                 rumqttd) {}; the machine {}",
                c.wall,
                c.process(c.sim),
                c.machine_text()
            ));
        }
        if let (Some(v), Ok(bare)) = (&f.cpu_fill, &f.bare)
            && let Some(vm) = v.machine
            && vm.busy_us_per_msg > 0.0
            && *bare > 0.0
        {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let ceiling = cpus * 1e6 / vm.busy_us_per_msg;
            notes.push(format!(
                "row 2: per message the whole machine (every process and the kernel) spent {:.1} µs \
                 of CPU during Vigil's fill: with all {cpus} CPUs busy that caps the fill at about \
                 {} msg/s, {:.2} of the bare rate; 0.7 of it needs at most {:.1} µs per message \
                 machine-wide",
                vm.busy_us_per_msg,
                thousands(ceiling),
                ceiling / bare,
                cpus * 1e6 / (0.7 * bare)
            ));
        }
        if let Some(c) = &f.cpu_fill
            && !c.threads.is_empty()
        {
            let parts: Vec<String> = c
                .threads
                .iter()
                .map(|t| {
                    format!(
                        "{} on a CPU {:.2}, waiting for one {:.2}",
                        t.name,
                        t.run_s / c.wall,
                        t.wait_s / c.wall
                    )
                })
                .collect();
            notes.push(format!(
                "row 2: Vigil's threads during the fill, CPU-seconds per second by thread name \
                 (/proc/PID/task/*/schedstat): {}",
                parts.join("; ")
            ));
        }
        match &f.stored {
            Ok(s) => notes.push(format!(
                "row 2: Vigil's /status backlog after the fill: {} messages (expected {})",
                thousands(*s as f64),
                thousands(n_backlog as f64)
            )),
            Err(e) if e != NOT_MEASURED => notes.push(format!("row 2: /status: {e}")),
            Err(_) => {}
        }
        if let Ok(d) = &f.drain {
            let after_first = d.took.saturating_sub(d.first);
            notes.push(format!(
                "rows 3 and 7: clock from spawning the restarted Vigil; gate listening after {}, first \
                 arrival at the cloud after {}, all {} counted after {} ({} msg/s counted from the \
                 first arrival)",
                ms(d.listening),
                ms(d.first),
                thousands(d.n as f64),
                secs(d.took),
                thousands(rate(d.n, after_first))
            ));
        }
        if !f.drain_slices.is_empty() {
            let slices: Vec<String> = f
                .drain_slices
                .iter()
                .enumerate()
                .map(|(i, s)| format!("({}) {}", i + 1, s.describe()))
                .collect();
            notes.push(format!(
                "row 3: the drain in slices of {} s from the restart, counted at the cloud; per \
                 thread name its CPU-seconds per second on a CPU / waiting for one \
                 (/proc/PID/task/*/schedstat): {}",
                SLICE.as_secs(),
                slices.join("; ")
            ));
        }
        match &f.disk_sync {
            Some(Ok((append, overwrite))) => notes.push(format!(
                "row 4: the disk's own floor, just before it, in the work directory: {} \
                 400-byte appends each followed by fdatasync, about 1,000 a second (a one-message \
                 commit to fjall's journal): {}; the same overwriting a preallocated file (no \
                 size change to record): {}; a message that arrives during a commit waits for \
                 that fsync and then its own",
                thousands(SYNC_PROBES as f64),
                append.describe(),
                overwrite.describe()
            )),
            Some(Err(e)) => notes.push(format!("row 4: the disk's fsync probe failed: {e}")),
            None => {}
        }
        for (name, l) in [
            ("1,000/s", &f.lat_1k),
            ("1,000/s after row 1", &f.lat_1k_after),
            ("80 %", &f.lat_80),
        ] {
            if let Ok(l) = l {
                let commits = l.commits.map_or(String::new(), |c| {
                    format!(
                        "; Vigil's store commits (write batch and fsync) during it: {}, p50 ≤ {} \
                         / p99 ≤ {} (histogram bounds)",
                        thousands(c.n as f64),
                        ms(Duration::from_secs_f64(c.p50_le)),
                        ms(Duration::from_secs_f64(c.p99_le)),
                    )
                });
                let own = |what: &str, o: Option<Observed>| {
                    o.map_or(String::new(), |o| {
                        format!(
                            "; Vigil's own time per message, gate read to {what}: {}, p50 ≤ {} \
                             / p99 ≤ {}",
                            thousands(o.n as f64),
                            ms(Duration::from_secs_f64(o.p50_le)),
                            ms(Duration::from_secs_f64(o.p99_le)),
                        )
                    })
                };
                let deliveries =
                    own(
                        "its publish written to the cloud connection (vigil_sent_seconds)",
                        l.sent,
                    ) + &own("the cloud's PUBACK (vigil_delivery_seconds)", l.deliveries);
                notes.push(format!(
                    "row 4 at {name}: {} samples, max {}; the device's side alone, publish() to \
                     Vigil's PUBACK (gate and store commit): p50 {} / p99 {}{commits}{deliveries}; the load \
                     generator fell at most {} behind its schedule (latency is stamped at the \
                     actual publish()){}",
                    l.samples,
                    ms(l.max),
                    ms(l.ack_p50),
                    ms(l.ack_p99),
                    ms(l.lag),
                    machine_during(l.machine)
                ));
            }
        }
        if let (Ok(full), Ok(stopped)) = (&f.du_full, &f.du_full_stopped) {
            notes.push(format!(
                "row 6: allocated bytes (st_blocks × 512) of the store directory minus the empty \
                 store's, over {} messages; full store {} running, {} after SIGTERM; the envelope \
                 size is the mean MQTT payload the subscriber received during the drain (the JSON \
                 envelope with the {PAYLOAD_BYTES}-byte JSON payload inline)",
                thousands(n_backlog as f64),
                mib_bytes(*full),
                mib_bytes(*stopped)
            ));
        }
        if let (Ok(running), Ok(stopped)) = (&f.du_drained, &f.du_drained_stopped) {
            notes.push(format!(
                "row 6: after the drain: {} running (2 s after /status showed an empty store), {} after SIGTERM",
                mib_bytes(*running),
                mib_bytes(*stopped)
            ));
        }
        if let Some(Ok(l)) = mosq.map(|m| &m.lat_1k) {
            notes.push(format!(
                "Mosquitto row 4 at 1,000/s: {} samples, max {}; the device's side alone, \
                 publish() to Mosquitto's PUBACK (no fsync): p50 {} / p99 {}{}",
                l.samples,
                ms(l.max),
                ms(l.ack_p50),
                ms(l.ack_p99),
                machine_during(l.machine)
            ));
        }
        if let Some(Ok(r)) = mosq.map(|m| &m.rss_full) {
            notes.push(format!(
                "Mosquitto row 2: its RSS with {} queued in its bridge queue: {}",
                thousands(n_backlog as f64),
                rss_text(r)
            ));
        }
        let reconnects = self.counter.errors.load(Ordering::Relaxed);
        if reconnects > 0 {
            notes.push(format!(
                "the counting subscriber lost its connection {reconnects} time(s) (it resubscribes)"
            ));
        }
        notes.extend(self.notes.iter().cloned());
        Report {
            header,
            lines,
            mosquitto_column: mosq.is_some(),
            deliveries: self.deliveries.clone(),
            notes,
        }
    }
}

// ---------------------------------------------------------------------------
// Devices.

fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Connects one device (MQTT 3.1.1, clean session) and waits for CONNACK.
async fn connect_device(
    target: SocketAddr,
    id: String,
    d: u32,
    inflight: u16,
) -> Result<(u32, AsyncClient, EventLoop), BenchError> {
    let mut o = MqttOptions::new(id.clone(), target.ip().to_string(), target.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(inflight);
    o.set_clean_session(true);
    let (client, mut el) = AsyncClient::new(o, usize::from(inflight));
    el.set_network_options(nodelay());
    let connack = async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return if a.code == ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(format!("CONNACK {:?}", a.code))
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), connack).await {
        Ok(Ok(())) => Ok((d, client, el)),
        Ok(Err(reason)) => Err(BenchError::Device { device: id, reason }),
        Err(_) => Err(BenchError::Device {
            device: id,
            reason: "no CONNACK within 10 s".into(),
        }),
    }
}

#[derive(Debug, Clone, Copy)]
struct Spec {
    run: u32,
    device: u32,
    per_device: u64,
    /// Messages per second for this device; `None`: as fast as the window
    /// allows.
    rate: Option<f64>,
    epoch: Instant,
    /// Topics the device publishes to, in turn ([`BenchOptions::topics_per_device`]).
    topics: u16,
}

struct DeviceDone {
    last_ack: Instant,
    lag: Duration,
    /// Paced loads: `publish()` to the edge's PUBACK, µs, per message.
    ack_latencies: Vec<u32>,
}

/// Send instants of a device's publishes, in order, until rumqttc writes
/// them (bounded by its request channel and window).
type Sending = Arc<Mutex<std::collections::VecDeque<Instant>>>;

/// One device's load: a publisher task feeds rumqttc's bounded request
/// channel while this task polls the event loop and counts PUBACKs.
async fn device_run(
    spec: Spec,
    client: AsyncClient,
    mut el: EventLoop,
    acked: Arc<AtomicU64>,
) -> Result<DeviceDone, BenchError> {
    let id = format!("bench-{}-{}", spec.run, spec.device);
    let topics: Vec<String> = match spec.topics {
        0 | 1 => vec![format!("devices/{id}/vitals")],
        n => (0..n).map(|k| format!("devices/{id}/vitals/{k}")).collect(),
    };
    // Paced loads time each PUBACK: send instants are matched to packet ids
    // when rumqttc writes the publish, and to PUBACKs by packet id.
    let sending: Option<Sending> = spec.rate.map(|_| Sending::default());
    let mut by_pkid: HashMap<u16, Instant> = HashMap::new();
    let mut ack_latencies = Vec::new();
    let publisher = tokio::spawn(publish(spec, client.clone(), topics, sending.clone()));
    let mut acks = 0u64;
    while acks < spec.per_device {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                acks += 1;
                acked.fetch_add(1, Ordering::Relaxed);
                if let Some(sent) = by_pkid.remove(&a.pkid) {
                    let us = sent.elapsed().as_micros();
                    ack_latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(at) = sending
                    .as_ref()
                    .and_then(|s| s.lock().ok().and_then(|mut q| q.pop_front()))
                {
                    by_pkid.insert(pkid, at);
                }
            }
            Ok(_) => {}
            Err(e) => {
                publisher.abort();
                return Err(BenchError::Device {
                    device: id,
                    reason: format!("after {acks} PUBACKs: {e}"),
                });
            }
        }
    }
    let last_ack = Instant::now();
    let lag = match publisher.await {
        Ok(Ok(lag)) => lag,
        Ok(Err(e)) => {
            return Err(BenchError::Device {
                device: id,
                reason: e.to_string(),
            });
        }
        Err(e) => {
            return Err(BenchError::Device {
                device: id,
                reason: e.to_string(),
            });
        }
    };
    // A clean DISCONNECT, within a second.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    Ok(DeviceDone {
        last_ack,
        lag,
        ack_latencies,
    })
}

/// Publishes a device's messages; returns how far it fell behind its
/// schedule at worst (paced loads).
async fn publish(
    spec: Spec,
    client: AsyncClient,
    topics: Vec<String>,
    sending: Option<Sending>,
) -> Result<Duration, rumqttc::ClientError> {
    let mut lag = Duration::ZERO;
    let schedule = spec.rate.map(|r| {
        let period = 1.0 / r.max(1e-6);
        // Spread the devices over one period.
        let offset = period * f64::from(spec.device) / f64::from(DEVICES);
        (tokio::time::Instant::now(), period, offset)
    });
    for (i, topic) in (0..spec.per_device).zip(topics.iter().cycle()) {
        if let Some((start, period, offset)) = schedule {
            let due = start + Duration::from_secs_f64(offset + period * i as f64);
            tokio::time::sleep_until(due).await;
            lag = lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        }
        let now = Instant::now();
        if let Some(q) = &sending
            && let Ok(mut q) = q.lock()
        {
            q.push_back(now);
        }
        let p = payload(micros(spec.epoch, now), spec.run, spec.device, i);
        client
            .publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, p)
            .await?;
    }
    Ok(lag)
}

fn micros(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
}

const STAMP_HEAD: &[u8] = b"{\"t\":";

/// A device payload: JSON, exactly [`PAYLOAD_BYTES`] long, its stamp first.
fn payload(t: u64, run: u32, device: u32, index: u64) -> Vec<u8> {
    let mut p =
        format!("{{\"t\":{t},\"r\":{run},\"d\":{device},\"i\":{index},\"p\":\"").into_bytes();
    p.resize(PAYLOAD_BYTES - 2, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// A payload's stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    t: u64,
    run: u32,
    device: u32,
    index: u64,
}

fn number(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let (d, rest) = b.split_at(digits);
    let v = d.iter().try_fold(0u64, |v, c| {
        v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })?;
    Some((v, rest))
}

fn parse_stamp(p: &[u8]) -> Option<Stamp> {
    let rest = p.strip_prefix(STAMP_HEAD)?;
    let (t, rest) = number(rest)?;
    let (run, rest) = number(rest.strip_prefix(b",\"r\":")?)?;
    let (device, rest) = number(rest.strip_prefix(b",\"d\":")?)?;
    let (index, _) = number(rest.strip_prefix(b",\"i\":")?)?;
    Some(Stamp {
        t,
        run: u32::try_from(run).ok()?,
        device: u32::try_from(device).ok()?,
        index,
    })
}

/// The inline (JSON) payload of an envelope: the bytes after the first
/// `,"payload":` (the envelope's last member, so they start with the stamp).
fn inline_payload(envelope: &[u8]) -> Option<&[u8]> {
    const MARK: &[u8] = b",\"payload\":";
    let at = envelope.windows(MARK.len()).position(|w| w == MARK)?;
    envelope.get(at + MARK.len()..)
}

/// The stamp of an arrival: a raw payload (Mosquitto forwards those), or an
/// envelope with the payload inline, or else any envelope decoded in full.
fn read_stamp(body: &[u8]) -> Option<Stamp> {
    if body.starts_with(STAMP_HEAD) {
        return parse_stamp(body);
    }
    inline_payload(body).and_then(parse_stamp).or_else(|| {
        crate::envelope::verify(body)
            .ok()
            .and_then(|r| parse_stamp(&r.payload))
    })
}

// ---------------------------------------------------------------------------
// The counting subscriber.

/// What the subscriber expects and has seen of the current load.
#[derive(Default)]
struct Tally {
    run: u32,
    per_device: u64,
    want: u64,
    seen: Vec<u64>,
    unique: u64,
    duplicates: u64,
    stray: u64,
    unreadable: u64,
    verified: u64,
    failed: u64,
    bytes: u64,
    first: Option<Instant>,
    done: Option<Instant>,
    latencies: Option<Vec<u32>>,
    arrivals: u64,
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    want: u64,
    unique: u64,
    bytes: u64,
    first: Option<Instant>,
    done: Option<Instant>,
}

impl Tally {
    fn arrive(&mut self, body: &[u8], now: Instant, now_us: u64) {
        self.arrivals += 1;
        // The first arrival of each load, then one in VERIFY_EVERY.
        let envelope = !body.starts_with(STAMP_HEAD);
        if envelope && self.arrivals % VERIFY_EVERY == 1 {
            self.verified += 1;
            if crate::envelope::verify(body).is_err() {
                self.failed += 1;
            }
        }
        let Some(s) = read_stamp(body) else {
            self.unreadable += 1;
            return;
        };
        if s.run != self.run {
            // A late copy from an earlier load, or the warm-up.
            self.stray += 1;
            return;
        }
        if s.device >= DEVICES || s.index >= self.per_device {
            self.unreadable += 1;
            return;
        }
        let bit = u64::from(s.device) * self.per_device + s.index;
        let Some(word) = usize::try_from(bit / 64)
            .ok()
            .and_then(|w| self.seen.get_mut(w))
        else {
            self.unreadable += 1;
            return;
        };
        let mask = 1u64 << (bit % 64);
        if *word & mask != 0 {
            self.duplicates += 1;
            return;
        }
        *word |= mask;
        self.unique += 1;
        self.bytes += body.len() as u64;
        self.first.get_or_insert(now);
        if let Some(l) = self.latencies.as_mut() {
            l.push(u32::try_from(now_us.saturating_sub(s.t)).unwrap_or(u32::MAX));
        }
        if self.unique == self.want {
            self.done = Some(now);
        }
    }
}

/// The counting subscriber: mutual TLS, `vigil/#` at QoS 1.
struct Counter {
    tally: Arc<Mutex<Tally>>,
    subscribed: watch::Receiver<bool>,
    cancel: CancellationToken,
    errors: Arc<AtomicU64>,
    epoch: Instant,
}

impl Counter {
    fn start(pki: &DevPki, cloud: SocketAddr, epoch: Instant) -> Result<Self, BenchError> {
        let tls = cloud::client_tls(pki, "subscriber")?;
        let mut o = MqttOptions::new(
            format!("vigil-sim-bench-{}", std::process::id()),
            cloud.ip().to_string(),
            cloud.port(),
        );
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        o.set_max_packet_size(1 << 20, 1 << 16);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 16);
        el.set_network_options(nodelay());
        let (tx, subscribed) = watch::channel(false);
        let cancel = CancellationToken::new();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let errors = Arc::new(AtomicU64::new(0));
        let (stop, sink, errs) = (cancel.clone(), tally.clone(), errors.clone());
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("vigil/#", rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        tx.send_replace(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        if let Ok(mut t) = sink.lock() {
                            t.arrive(&p.payload, now, micros(epoch, now));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tx.send_replace(false);
                        errs.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self {
            tally,
            subscribed,
            cancel,
            errors,
            epoch,
        })
    }

    async fn subscribed(&self, limit: Duration) -> bool {
        let mut rx = self.subscribed.clone();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// From now on, counts load `run` of `per_device` messages per device.
    fn expect(&self, run: u32, per_device: u64, latencies: bool) {
        if let Ok(mut t) = self.tally.lock() {
            let want = total(per_device);
            *t = Tally {
                run,
                per_device,
                want,
                seen: vec![0; usize::try_from(want.div_ceil(64)).unwrap_or(0)],
                latencies: latencies
                    .then(|| Vec::with_capacity(usize::try_from(want).unwrap_or(0))),
                ..Tally::default()
            };
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.tally
            .lock()
            .map(|t| Snapshot {
                want: t.want,
                unique: t.unique,
                bytes: t.bytes,
                first: t.first,
                done: t.done,
            })
            .unwrap_or(Snapshot {
                want: 0,
                unique: 0,
                bytes: 0,
                first: None,
                done: None,
            })
    }

    fn take_latencies(&self) -> Vec<u32> {
        self.tally
            .lock()
            .ok()
            .and_then(|mut t| t.latencies.take())
            .unwrap_or_default()
    }

    fn delivery(&self, phase: &str, want: u64) -> Delivery {
        let t = self.tally.lock();
        let t = t.as_deref();
        Delivery {
            phase: phase.to_string(),
            want,
            unique: t.map_or(0, |t| t.unique),
            duplicates: t.map_or(0, |t| t.duplicates),
            unreadable: t.map_or(0, |t| t.unreadable),
            verified: t.map_or(0, |t| t.verified),
            failed: t.map_or(0, |t| t.failed),
            at_cloud: true,
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

// ---------------------------------------------------------------------------
// Child processes.

/// A child process (Vigil or Mosquitto), SIGKILLed if dropped.
struct Proc {
    what: String,
    child: tokio::process::Child,
    pid: u32,
    spawned: Instant,
    /// From spawn to accepting TCP connections on `listen`.
    listening: Duration,
    /// Where devices connect.
    listen: SocketAddr,
    /// Vigil's operator endpoints.
    http: Option<SocketAddr>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output appended to `log` and waits until it
    /// accepts connections on `listen`.
    async fn spawn(
        what: String,
        program: &Path,
        mut cmd: tokio::process::Command,
        listen: SocketAddr,
        http: Option<SocketAddr>,
        log: &Path,
    ) -> Result<Self, BenchError> {
        use std::io::Write as _;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error(log))?;
        writeln!(out, "===== vigil-sim bench: {what} =====").map_err(io_error(log))?;
        let err = out.try_clone().map_err(io_error(log))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let spawned = Instant::now();
        let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
        let failed = |reason: String| BenchError::Child {
            what: what.clone(),
            reason,
            log: log.to_path_buf(),
        };
        let pid = child.id().ok_or_else(|| failed("exited at once".into()))?;
        loop {
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!(
                    "exited ({status}) before listening on {listen}"
                )));
            }
            if spawned.elapsed() > CHILD_LIMIT {
                return Err(failed(format!(
                    "did not listen on {listen} within {} s",
                    CHILD_LIMIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Self {
            listening: spawned.elapsed(),
            what,
            child,
            pid,
            spawned,
            listen,
            http,
            log: log.to_path_buf(),
        })
    }

    fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Child {
                what: self.what.clone(),
                reason: format!("exited ({status})"),
                log: self.log.clone(),
            }),
            Err(e) => Err(BenchError::Child {
                what: self.what.clone(),
                reason: format!("cannot be waited for: {e}"),
                log: self.log.clone(),
            }),
        }
    }

    /// SIGTERM (by pid, with `kill`), then waits; SIGKILL after
    /// [`CHILD_LIMIT`]. Returns how long it took and the exit status.
    async fn stop(mut self) -> Result<(Duration, std::process::ExitStatus), BenchError> {
        let asked = Instant::now();
        let failed = |what: &str, log: &Path, reason: String| BenchError::Child {
            what: what.to_string(),
            reason,
            log: log.to_path_buf(),
        };
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map_err(|source| BenchError::Spawn {
                program: "kill".into(),
                source,
            })?;
        if !sent.success() {
            // Already gone: report how it ended.
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok((asked.elapsed(), status));
            }
        }
        match tokio::time::timeout(CHILD_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) => Ok((asked.elapsed(), status)),
            Ok(Err(e)) => Err(failed(
                &self.what,
                &self.log,
                format!("cannot be waited for: {e}"),
            )),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(failed(
                    &self.what,
                    &self.log,
                    format!(
                        "did not exit within {} s of SIGTERM (killed)",
                        CHILD_LIMIT.as_secs()
                    ),
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Measurements and helpers.

/// `VmRSS` and `RssAnon` of a process, KiB.
fn rss(pid: u32) -> Result<Rss, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("RssAnon:")) {
        (Some(vm_kib), Some(anon_kib)) => Ok(Rss { vm_kib, anon_kib }),
        _ => Err(BenchError::Io {
            path,
            source: std::io::Error::other("no VmRSS or RssAnon line"),
        }),
    }
}

/// Clock ticks per second of `/proc`'s CPU times: `USER_HZ`, fixed at 100 by
/// Linux's ABI on every architecture this runs on.
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds a process has used (`/proc/PID/stat`, or this
/// process's with `None`), its finished threads included.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The machine's CPU ticks, all CPUs together (`/proc/stat`'s `cpu` line):
/// (busy, steal, total). Busy is everything but idle, iowait and steal.
fn machine_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq;
    Some((busy, steal, busy + idle + iowait + steal))
}

/// Nanoseconds each thread name of a process has spent on a CPU and waiting
/// for one (`/proc/PID/task/*/schedstat`), threads of one name summed.
fn thread_times(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("schedstat")),
        ) else {
            continue;
        };
        let mut f = stat
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        let e = out.entry(comm.trim().to_string()).or_insert((0, 0));
        e.0 += run;
        e.1 += wait;
    }
    out
}

/// CPU counters at one instant.
struct CpuSample {
    at: Instant,
    vigil: Option<f64>,
    threads: BTreeMap<String, (u64, u64)>,
    sim: Option<f64>,
    sim_threads: BTreeMap<String, (u64, u64)>,
    machine: Option<(u64, u64, u64)>,
}

impl CpuSample {
    /// Vigil's (if `vigil` is given; or the peer bridge's, for Mosquitto's
    /// row 1), this process's and the machine's.
    fn take(vigil: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            vigil: vigil.and_then(|p| cpu_seconds(Some(p))),
            threads: vigil.map(thread_times).unwrap_or_default(),
            sim: cpu_seconds(None),
            sim_threads: thread_times(std::process::id()),
            machine: machine_ticks(),
        }
    }

    /// What was used between `before` and this sample, over `n` messages.
    fn since(&self, before: &CpuSample, n: u64) -> Option<CpuUse> {
        let wall = self.at.saturating_duration_since(before.at).as_secs_f64();
        if wall <= 0.0 || n == 0 {
            return None;
        }
        let per_msg = |secs: f64| secs * 1e6 / n as f64;
        let used = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some((a - b).max(0.0)),
            _ => None,
        };
        let machine = match (self.machine, before.machine) {
            (Some((b1, s1, t1)), Some((b0, s0, t0))) if t1 > t0 => {
                let total = (t1 - t0) as f64;
                let busy = b1.saturating_sub(b0) as f64;
                Some(MachineUse {
                    busy: busy / total,
                    steal: s1.saturating_sub(s0) as f64 / total,
                    busy_us_per_msg: per_msg(busy / USER_HZ),
                })
            }
            _ => None,
        };
        Some(CpuUse {
            wall,
            n,
            threads: thread_use(&self.threads, &before.threads, wall),
            sim_threads: thread_use(&self.sim_threads, &before.sim_threads, wall),
            vigil: used(self.vigil, before.vigil),
            sim: used(self.sim, before.sim),
            machine,
        })
    }
}

/// Each thread name's use between two [`thread_times`] readings, busiest
/// first, leaving out names that used under 1 % of `wall`. Threads that
/// started in between count from zero; those that ended are missing (the
/// process totals still hold them).
fn thread_use(
    now: &BTreeMap<String, (u64, u64)>,
    before: &BTreeMap<String, (u64, u64)>,
    wall: f64,
) -> Vec<ThreadUse> {
    let mut threads: Vec<ThreadUse> = now
        .iter()
        .map(|(name, (run, wait))| {
            let (r0, w0) = before.get(name).copied().unwrap_or((0, 0));
            ThreadUse {
                name: name.clone(),
                run_s: run.saturating_sub(r0) as f64 / 1e9,
                wait_s: wait.saturating_sub(w0) as f64 / 1e9,
            }
        })
        .filter(|t| t.run_s + t.wait_s >= 0.01 * wall)
        .collect();
    threads.sort_by(|a, b| b.run_s.total_cmp(&a.run_s));
    threads
}

/// A slice of a phase: messages counted at the cloud in it, and the CPU
/// used, per thread name of Vigil and of this process.
struct Slice {
    n: u64,
    cpu: Option<CpuUse>,
}

/// How long a [`Slice`] is.
const SLICE: Duration = Duration::from_secs(5);

impl Slice {
    /// "4.98 s, 66,012 msg/s; Vigil 0.74 cores (tokio-runtime-w 0.52/0.10, ...);
    /// this process 0.86 cores (...); the machine 80 % busy of its 2 CPUs (steal 0.1 %)".
    /// Per thread: on a CPU / waiting for one, CPU-seconds per second.
    fn describe(&self) -> String {
        let Some(c) = &self.cpu else {
            return format!("{} msgs, CPU not measured", thousands(self.n as f64));
        };
        let cores = |s: Option<f64>| s.map_or_else(|| "?".into(), |s| format!("{:.2}", s / c.wall));
        format!(
            "{:.2} s, {} msg/s; Vigil {} cores ({}); this process {} cores ({}); the machine {}",
            c.wall,
            thousands(self.n as f64 / c.wall),
            cores(c.vigil),
            c.busiest(&c.threads),
            cores(c.sim),
            c.busiest(&c.sim_threads),
            c.machine_text()
        )
    }
}

/// "; the machine during it: 12 % busy of its 2 CPUs (steal 0.4 %)", or nothing.
fn machine_during(m: Option<MachineUse>) -> String {
    m.map_or(String::new(), |m| {
        format!("; the machine during it: {}", m.describe())
    })
}

/// One thread name's share of a load.
#[derive(Debug, Clone)]
struct ThreadUse {
    name: String,
    /// Seconds on a CPU, and runnable but waiting for one.
    run_s: f64,
    wait_s: f64,
}

/// CPU used during a load of `n` messages.
#[derive(Debug, Clone)]
struct CpuUse {
    wall: f64,
    n: u64,
    /// Vigil's threads, busiest first.
    threads: Vec<ThreadUse>,
    /// This process's threads (the simulator: devices, cloud, subscriber).
    sim_threads: Vec<ThreadUse>,
    /// CPU seconds.
    vigil: Option<f64>,
    sim: Option<f64>,
    machine: Option<MachineUse>,
}

/// The whole machine during a load.
#[derive(Debug, Clone, Copy)]
struct MachineUse {
    /// Fractions of all CPUs' time.
    busy: f64,
    steal: f64,
    busy_us_per_msg: f64,
}

impl CpuUse {
    /// "1.02 cores, 7.3 µs per message" for a process's CPU seconds.
    fn process(&self, secs: Option<f64>) -> String {
        match secs {
            Some(s) => format!(
                "{:.2} cores, {:.1} µs per message",
                s / self.wall,
                s * 1e6 / self.n as f64
            ),
            None => "not measured".into(),
        }
    }

    fn machine_text(&self) -> String {
        self.machine
            .map_or_else(|| "not measured".into(), |m| m.describe())
    }

    /// "tokio-rt-worker 0.52/0.10, ...": the four busiest thread names, each
    /// on a CPU / waiting for one, in CPU-seconds per second.
    fn busiest(&self, threads: &[ThreadUse]) -> String {
        threads
            .iter()
            .take(4)
            .map(|t| {
                format!(
                    "{} {:.2}/{:.2}",
                    t.name,
                    t.run_s / self.wall,
                    t.wait_s / self.wall
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The note for one load through a bridge (`peer`, the process measured):
    /// its CPU and its busiest threads, this process's (the devices, the
    /// cloud and its subscriber), and the whole machine's per message.
    fn load_note(&self, row: &str, peer: &str) -> String {
        let per_msg = self.machine.map_or_else(String::new, |m| {
            format!(", {:.1} µs per message machine-wide", m.busy_us_per_msg)
        });
        format!(
            "{row}: CPU from the devices connecting until the cloud counted the last ({:.2} s): \
             {peer} {} ({}); this process (the devices, the cloud, its subscriber) {} ({}); \
             the machine {}{per_msg}",
            self.wall,
            self.process(self.vigil),
            self.busiest(&self.threads),
            self.process(self.sim),
            self.busiest(&self.sim_threads),
            self.machine_text()
        )
    }
}

impl MachineUse {
    /// "80 % busy of its 2 CPUs (steal 0.1 %)".
    fn describe(&self) -> String {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "{:.0} % busy of its {cpus} CPUs (steal {:.1} %)",
            self.busy * 100.0,
            self.steal * 100.0
        )
    }
}

/// Samples of the disk's fsync probe.
const SYNC_PROBES: usize = 2_000;

/// Percentiles of one fsync probe.
#[derive(Debug, Clone, Copy)]
struct SyncProbe {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
}

impl SyncProbe {
    /// "p50 0.25 ms / p99 0.90 ms / p99.9 1.10 ms / max 5.91 ms".
    fn describe(&self) -> String {
        format!(
            "p50 {} / p99 {} / p99.9 {} / max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}

/// Writes `n` 400-byte records to a file in `dir`, each followed by
/// `fdatasync` (`sync_data`) and a 0.7 ms pause (about 1,000 a second, as in
/// row 4), and returns the percentiles of write plus sync. Appending grows the
/// file, so each sync also records its size, as fjall's journal's do; with
/// `preallocated` the records overwrite a file already written and synced to
/// its full length. The file is removed afterwards.
fn sync_probe(dir: &Path, n: usize, preallocated: bool) -> Result<SyncProbe, BenchError> {
    use std::io::{Seek as _, Write as _};
    let path = dir.join(if preallocated {
        "sync-probe-preallocated"
    } else {
        "sync-probe-append"
    });
    let record = [0x5a_u8; 400];
    let mut file = std::fs::File::create(&path).map_err(io_error(&path))?;
    if preallocated {
        file.write_all(&vec![0u8; n * record.len()])
            .and_then(|()| file.sync_all())
            .and_then(|()| file.rewind())
            .map_err(io_error(&path))?;
    }
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        file.write_all(&record)
            .and_then(|()| file.sync_data())
            .map_err(io_error(&path))?;
        // Whole microseconds, rounded up, as `percentile` takes them.
        took.push(u32::try_from(started.elapsed().as_nanos().div_ceil(1_000)).unwrap_or(u32::MAX));
        std::thread::sleep(Duration::from_micros(700));
    }
    drop(file);
    std::fs::remove_file(&path).map_err(io_error(&path))?;
    took.sort_unstable();
    let at = |q: f64| Duration::from_micros(u64::from(percentile(&took, q)));
    Ok(SyncProbe {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
        max: at(1.0),
    })
}

/// Allocated bytes (`st_blocks` × 512, as `du` counts) of a directory tree.
/// Files that vanish while it is walked (compaction) are skipped.
fn allocated_bytes(dir: &Path) -> Result<u64, BenchError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut sum = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&d) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(io_error(&d)(e)),
        };
        sum += meta.blocks() * 512;
        if !meta.is_dir() {
            continue;
        }
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(io_error(&d)(e)),
        };
        for entry in entries {
            match entry {
                Ok(e) => stack.push(e.path()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&d)(e)),
            }
        }
    }
    Ok(sum)
}

/// A local subscriber on Vigil's gate (client id [`DISPLAY`]) holding
/// `filters` distinct filters, `wards/display-<i>/#`, every one granted; its
/// event loop keeps running (answering pings) until the task is aborted.
async fn local_display(
    gate: SocketAddr,
    filters: usize,
) -> Result<tokio::task::JoinHandle<()>, BenchError> {
    let fail = |reason: String| BenchError::Device {
        device: DISPLAY.to_string(),
        reason,
    };
    let (_, client, mut el) = connect_device(gate, DISPLAY.to_string(), 0, 10).await?;
    let all: Vec<String> = (0..filters)
        .map(|i| format!("wards/display-{i}/#"))
        .collect();
    // One SUBSCRIBE at a time, each answered before the next.
    let subscribed =
        async {
            let mut granted = 0usize;
            for chunk in all.chunks(FILTERS_PER_SUBSCRIBE) {
                client
                    .subscribe_many(chunk.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtMostOnce)
                    }))
                    .await
                    .map_err(|e| e.to_string())?;
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            for code in &ack.return_codes {
                                match code {
                                    rumqttc::SubscribeReasonCode::Success(_) => granted += 1,
                                    rumqttc::SubscribeReasonCode::Failure => {
                                        return Err(format!(
                                            "Vigil refused a filter after {granted} were granted \
                                         (is the gate.subscribe rule in its configuration?)"
                                        ));
                                    }
                                }
                            }
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
            Ok(granted)
        };
    match tokio::time::timeout(Duration::from_secs(30), subscribed).await {
        Ok(Ok(granted)) if granted == filters => {}
        Ok(Ok(granted)) => return Err(fail(format!("{granted} of {filters} filters granted"))),
        Ok(Err(e)) => return Err(fail(e)),
        Err(_) => return Err(fail("no SUBACK within 30 s".into())),
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        while el.poll().await.is_ok() {}
    }))
}

/// Row 2's note on the local subscriber: how many of the fill's `n`
/// publishes Vigil's gate checked against its `filters` and kept from the
/// embedded broker (`vigil_not_routed_locally_total`: the Vigil of the fill
/// saw no other publish).
async fn local_note(http: SocketAddr, filters: usize, n: u64) -> String {
    let counted = http_get(http, "/metrics").await.and_then(|body| {
        crate::operator::counter_sum(
            &String::from_utf8_lossy(&body),
            "vigil_not_routed_locally_total",
        )
        .ok_or_else(|| BenchError::Status {
            addr: http,
            reason: "no vigil_not_routed_locally_total in /metrics".into(),
        })
    });
    match counted {
        Ok(skipped) => format!(
            "row 2: a local subscriber ({DISPLAY}) held {filters} distinct filters \
             (wards/display-<i>/#, none matching a device's topic) through the fill; \
             Vigil's gate kept {} of the fill's {} from the embedded broker, having \
             found no local filter for them (vigil_not_routed_locally_total)",
            thousands(skipped as f64),
            thousands(n as f64)
        ),
        Err(e) => format!("row 2: the local subscriber's count: {e}"),
    }
}

/// Sum of Vigil's `/status` backlog over every priority.
async fn backlog(http: SocketAddr) -> Result<u64, BenchError> {
    let body = http_get(http, "/status").await?;
    let fail = |reason: String| BenchError::Status { addr: http, reason };
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| fail(e.to_string()))?;
    let lanes = v
        .get("backlog")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| fail("no backlog in the body".into()))?;
    Ok(lanes
        .iter()
        .filter_map(|l| l.get("messages").and_then(serde_json::Value::as_u64))
        .sum())
}

/// The body of `GET path` from Vigil's operator endpoint.
async fn http_get(http: SocketAddr, path: &str) -> Result<Vec<u8>, BenchError> {
    crate::operator::get(http, path)
        .await
        .map_err(|e| BenchError::Status {
            addr: http,
            reason: e.to_string(),
        })
}

/// Vigil's `vigil_commit_seconds`, `vigil_sent_seconds` and
/// `vigil_delivery_seconds` histograms from `/metrics`: (upper bound in
/// seconds, cumulative count) per bucket, `+Inf` last. The last two are
/// empty when Vigil does not serve them (a build before session 11, given
/// with `--vigil` for a comparison).
type Histograms = (Vec<(f64, u64)>, Vec<(f64, u64)>, Vec<(f64, u64)>);

async fn histograms(http: SocketAddr) -> Result<Histograms, BenchError> {
    let body = http_get(http, "/metrics").await?;
    let text = String::from_utf8_lossy(&body);
    let buckets = |name: &str| -> Result<Vec<(f64, u64)>, BenchError> {
        let prefix = format!("{name}_bucket{{le=\"");
        let found: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        if found.is_empty() {
            return Err(BenchError::Status {
                addr: http,
                reason: format!("no {name} histogram in /metrics"),
            });
        }
        Ok(found)
    };
    Ok((
        buckets("vigil_commit_seconds")?,
        buckets("vigil_sent_seconds").unwrap_or_default(),
        buckets("vigil_delivery_seconds").unwrap_or_default(),
    ))
}

/// The observations between two readings of a histogram, with the bucket
/// bounds holding their median and 99th percentile.
fn observed_between(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<Observed> {
    if before.len() != after.len() {
        return None;
    }
    let delta: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a.saturating_sub(*b)))
        .collect();
    let n = delta.last()?.1;
    let bound = |p: f64| {
        let want = (n as f64 * p).ceil() as u64;
        delta.iter().find(|(_, c)| *c >= want).map(|(le, _)| *le)
    };
    (n > 0).then_some(())?;
    Some(Observed {
        n,
        p50_le: bound(0.50)?,
        p99_le: bound(0.99)?,
    })
}

/// Waits (at most 30 s) until Vigil's store is empty.
async fn wait_empty(http: SocketAddr) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = backlog(http).await?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Status {
                addr: http,
                reason: format!("{left} messages still queued 30 s after the drain"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bare rumqttd on a plain-TCP loopback listener, in this process, with
/// the settings of Vigil's embedded broker (`broker-config/rumqttd.toml`).
/// Like the cloud, it lives as long as the process.
async fn start_bare() -> Result<SocketAddr, BenchError> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let server = rumqttd::ServerSettings {
        name: "bare-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1100,
            max_outgoing_packet_count: 200,
            max_segment_size: 256 * 1024,
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(HashMap::from([("bare-v4".to_string(), server)])),
        ..Default::default()
    };
    // Blocking for at most a moment, at set-up.
    crate::cloud::run_broker(config, "bare", &[listen.port()]).map_err(BenchError::Bare)?;
    Ok(listen)
}

/// Mosquitto as the edge broker, bridged to `bridge_port` (the cloud's MQTT
/// 3.1.1 listener, or a closed port).
fn mosquitto_conf(
    dir: &Path,
    listen: SocketAddr,
    bridge_port: u16,
    pki: &DevPki,
    root: bool,
) -> String {
    let user = if root { "user root\n" } else { "" };
    format!(
        "# vigil-sim bench: Mosquitto as the edge broker, bridged to the loopback cloud.\n\
         # Persistence as Debian's /etc/mosquitto/mosquitto.conf has it (on; saved every\n\
         # autosave_interval, 1800 s by default, and at exit); an unlimited bridge queue.\n\
         {user}listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {dir}/\n\
         max_queued_messages 0\n\
         max_inflight_messages {INFLIGHT}\n\
         log_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\n\
         \n\
         connection cloud\n\
         address localhost:{bridge_port}\n\
         bridge_protocol_version mqttv311\n\
         try_private false\n\
         notifications false\n\
         cleansession false\n\
         clientid vigil-sim-bench-mosquitto\n\
         restart_timeout 1\n\
         bridge_cafile {ca}\n\
         bridge_certfile {cert}\n\
         bridge_keyfile {key}\n\
         topic # out 1 devices/ vigil/devices/\n",
        port = listen.port(),
        dir = dir.display(),
        ca = pki.path("ca.pem").display(),
        cert = pki.path("vigil.pem").display(),
        key = pki.path("vigil.key").display(),
    )
}

/// Whether this process runs as root (Mosquitto then needs `user root` to
/// read the bridge's key, which only its owner may read).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1))
                .map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The 1-minute load average, as `/proc/loadavg` shows it.
fn machine_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

fn free_port() -> Result<u16, BenchError> {
    crate::ports::free_loopback_port().map_err(BenchError::Port)
}

fn storage_key() -> Result<String, BenchError> {
    use base64::Engine as _;
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| BenchError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(k))
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=1).
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0)
}

/// `1234567.8` → `1,234,568`.
fn thousands(x: f64) -> String {
    let n = if x.is_finite() && x > 0.0 {
        x.round() as u64
    } else {
        0
    };
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mib_bytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_accounting_sees_a_busy_thread() {
        let me = std::process::id();
        let name = "bench-cpu-test";
        let busy = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let before = CpuSample::take(Some(me));
                let started = Instant::now();
                let mut x = 0u64;
                while started.elapsed() < Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                CpuSample::take(Some(me)).since(&before, 1_000)
            })
            .unwrap();
        let used = busy.join().unwrap().expect("a CPU figure");
        // The spinning thread ran for most of the 300 ms (a loaded machine
        // may take some of it), and its name is among the threads.
        let vigil = used.vigil.expect("this process's CPU seconds");
        assert!((0.05..=used.wall * 4.0).contains(&vigil), "{used:?}");
        let sim = used.sim.expect("this process's CPU seconds");
        // Two reads of the same counters a moment apart: ticks of 10 ms.
        assert!((sim - vigil).abs() <= 0.1, "{used:?}");
        let t = used
            .threads
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} not among {:?}", used.threads));
        assert!(t.run_s >= 0.05 && t.run_s <= used.wall + 0.01, "{t:?}");
        let m = used.machine.expect("/proc/stat");
        assert!(m.busy > 0.0 && m.busy <= 1.0 && m.steal >= 0.0, "{m:?}");
        assert!(m.busy_us_per_msg > 0.0, "{m:?}");
        assert!(used.process(used.vigil).contains("µs per message"));
    }

    /// Row 1's note names the process measured, its busiest threads per
    /// second of the load, this process's share and the machine's CPU per
    /// message; a thread beyond the four busiest is left out.
    #[test]
    fn a_load_note_shows_where_the_cpu_went() {
        let t = |name: &str, run_s: f64| ThreadUse {
            name: name.into(),
            run_s,
            wait_s: run_s / 2.0,
        };
        let c = CpuUse {
            wall: 2.0,
            n: 200_000,
            threads: vec![t("mosquitto", 1.6)],
            sim_threads: vec![
                t("a", 1.0),
                t("b", 0.8),
                t("c", 0.6),
                t("d", 0.4),
                t("e", 0.2),
            ],
            vigil: Some(1.6),
            sim: Some(3.0),
            machine: Some(MachineUse {
                busy: 0.9,
                steal: 0.0,
                busy_us_per_msg: 18.0,
            }),
        };
        let note = c.load_note("Mosquitto row 1", "Mosquitto");
        assert!(note.starts_with("Mosquitto row 1: CPU from"), "{note}");
        assert!(note.contains("(2.00 s)"), "{note}");
        assert!(
            note.contains("Mosquitto 0.80 cores, 8.0 µs per message (mosquitto 0.80/0.40)"),
            "{note}"
        );
        assert!(note.contains("1.50 cores, 15.0 µs per message (a 0.50/0.25, b 0.40/0.20, c 0.30/0.15, d 0.20/0.10)"), "{note}");
        assert!(!note.contains("e 0.10"), "{note}");
        assert!(note.contains("90 % busy"), "{note}");
        assert!(note.ends_with("18.0 µs per message machine-wide"), "{note}");
    }

    /// Two readings of a cumulative histogram: only what came between them
    /// counts, and the bounds are those of the buckets holding the median
    /// and the 99th percentile.
    #[test]
    fn histogram_readings_give_what_was_observed_between_them() {
        let before = [(0.001, 5), (0.002, 10), (0.004, 10), (f64::INFINITY, 10)];
        // 100 more: 60 under 1 ms, 39 more under 2 ms, 1 above 4 ms.
        let after = [
            (0.001, 65),
            (0.002, 109),
            (0.004, 109),
            (f64::INFINITY, 110),
        ];
        let o = observed_between(&before, &after).expect("observations");
        assert_eq!(o.n, 100);
        assert_eq!(o.p50_le, 0.001);
        assert_eq!(o.p99_le, 0.002);
        assert!(observed_between(&before, &before).is_none(), "none between");
        assert!(
            observed_between(&before, &after[..3]).is_none(),
            "other buckets"
        );
    }

    #[test]
    fn payloads_are_json_of_the_right_size_and_their_stamps_read_back() {
        let p = payload(1_234_567_890, 7, 19, 999_999);
        assert_eq!(p.len(), PAYLOAD_BYTES);
        assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
        let want = Stamp {
            t: 1_234_567_890,
            run: 7,
            device: 19,
            index: 999_999,
        };
        assert_eq!(parse_stamp(&p), Some(want));
        // Inline in an envelope, as Vigil forwards it.
        let mut env = br#"{"v":1,"id":"x","payload_encoding":"json","payload":"#.to_vec();
        env.extend_from_slice(&p);
        env.push(b'}');
        assert_eq!(read_stamp(&env), Some(want));
        assert_eq!(read_stamp(b"{\"v\":1}"), None);
    }

    #[test]
    fn the_tally_counts_each_message_once() {
        let epoch = Instant::now();
        let mut t = Tally {
            run: 3,
            per_device: 2,
            want: total(2),
            seen: vec![0; 1],
            ..Tally::default()
        };
        for d in 0..DEVICES {
            for i in 0..2 {
                t.arrive(&payload(0, 3, d, i), epoch, 10);
            }
        }
        t.arrive(&payload(0, 3, 0, 0), epoch, 10);
        t.arrive(&payload(0, 2, 0, 0), epoch, 10);
        t.arrive(b"garbage", epoch, 10);
        assert_eq!(t.unique, total(2));
        assert!(t.done.is_some());
        assert_eq!((t.duplicates, t.stray, t.unreadable), (1, 1, 1));
    }

    #[test]
    fn figures_format() {
        assert_eq!(thousands(1_234_567.6), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.99), 4);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(per_device(200_000.0, 0.002), 20);
    }

    /// The fsync probe writes and syncs for real, orders its percentiles and
    /// leaves nothing behind.
    #[test]
    fn the_fsync_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        for preallocated in [false, true] {
            let p = sync_probe(dir.path(), 50, preallocated).unwrap();
            assert!(p.p50 > Duration::ZERO, "{p:?}");
            assert!(
                p.p50 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max,
                "{p:?}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
