//! The `vigil` command: argument parsing, logging, and the subcommands.
//!
//! `main.rs` calls [`main`]; everything else lives here so tests can drive it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{CONFIG_ENV, VigilConfig};
use crate::crypto::{KeySource, MasterKey};
use crate::event::{Ingest, Kind, Qos, Timestamp};
use crate::store::{Store, StoreOptions, StoreStats};

/// Vigil: a store-and-forward MQTT bridge whose PUBACK means "on disk".
#[derive(Debug, Parser)]
#[command(name = "vigil", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Zero set-up demonstration: an encrypted store in a temporary directory
    /// under an ephemeral key, simulated bedside readings appended durably,
    /// some acknowledged, and the backlog reported.
    Demo {
        /// Readings to append.
        #[arg(long, default_value_t = 2_000)]
        messages: u64,
    },
    /// Read-only view of a store: backlog per priority, dead-letter and
    /// quarantine counts. Needs the store's key (VIGIL_STORAGE_KEY or --key-file).
    Inspect {
        /// The data directory.
        dir: PathBuf,
        /// The key file (instead of VIGIL_STORAGE_KEY).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Number of priorities the store was configured with.
        #[arg(long, default_value_t = 4)]
        priorities: u8,
        /// Also decrypt and print queued events as JSON lines (payloads included).
        #[arg(long)]
        events: bool,
    },
    /// The daemon: gate, store and forwarder, until SIGTERM or Ctrl-C.
    Run {
        /// Configuration file (default: $VIGIL_CONFIG, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Loads the configuration as `run` would and reports every problem.
    CheckConfig {
        /// Configuration file (default: $VIGIL_CONFIG, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Reads a device password from standard input (one line) and prints the
    /// Argon2id hash to put in `gate.auth.users` as `password_hash`.
    HashPassword,
}

/// Entry point of the `vigil` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vigil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo { messages } => demo(messages).await,
            Command::Inspect {
                dir,
                key_file,
                priorities,
                events,
            } => inspect(dir, key_file, priorities, events).await,
            Command::HashPassword => hash_password(),
            Command::Run { config } => run(config).await,
            Command::CheckConfig { config } => check_config(config).map(|c| {
                println!(
                    "configuration OK: devices on {}, cloud {}:{} ({}), store in {}",
                    c.gate
                        .tcp_listen
                        .map_or("TLS only".to_string(), |a| a.to_string()),
                    c.forward.host,
                    c.forward.port,
                    match c.forward.protocol {
                        crate::forward::config::Protocol::V311 => "MQTT 3.1.1",
                        crate::forward::config::Protocol::V5 => "MQTT 5",
                    },
                    c.store.dir.display()
                );
            }),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the configuration from `--config`, else `VIGIL_CONFIG`, else the
/// built-in defaults, with `VIGIL__*` environment overrides.
fn check_config(path: Option<PathBuf>) -> anyhow::Result<VigilConfig> {
    let path = path.or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    Ok(VigilConfig::load(path.as_deref(), &env)?)
}

async fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let stop = crate::daemon::stop_signal();
    let config = check_config(path)?;
    let source = KeySource::Configured {
        key_file: config.store.key_file.clone(),
    };
    let (key, origin) = MasterKey::load(&source, |k| std::env::var(k).ok())?;
    tracing::info!(key = %origin, "storage key loaded");
    crate::daemon::run(config, key, stop).await?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VIGIL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn demo(messages: u64) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let (key, origin) = MasterKey::load(&KeySource::Ephemeral, |_| None)?;
    println!("vigil demo: store in {} under {origin}", dir.display());
    println!("  (the key lives only in this process; the data is unreadable after it exits)");
    let options = StoreOptions::new(&dir);
    let store = tokio::task::spawn_blocking(move || Store::open(options, &key)).await??;

    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for bed in 0..8u64 {
        let store = store.clone();
        let per_bed = messages / 8;
        tasks.spawn(async move {
            for n in 0..per_bed {
                let alarm = n % 97 == 0;
                let ingest = Ingest {
                    kind: if alarm {
                        Kind::Alert
                    } else {
                        Kind::Measurement
                    },
                    priority: if alarm { 0 } else { 1 + (n % 3) as u8 },
                    device: format!("bed-{bed}"),
                    topic: format!("devices/bed-{bed}/vitals/hr"),
                    qos: Qos::AtLeastOnce,
                    retain: false,
                    received_at: Timestamp::now(),
                    content_type: None,
                    user_properties: Vec::new(),
                    payload: format!("{{\"hr\":{}}}", 60 + n % 40).into(),
                };
                store.append(ingest).await?;
            }
            Ok::<_, crate::store::StoreError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    let stats = store.stats();
    println!(
        "appended {} readings durably (fsynced) in {:.2?}: {:.0}/s",
        stats.counters.appended,
        elapsed,
        stats.counters.appended as f64 / elapsed.as_secs_f64()
    );
    print_stats(&stats);

    // Acknowledge the first half of each lane, as a cloud would.
    for p in 0..store.priorities() {
        let queued = stats.lanes.get(usize::from(p)).map_or(0, |l| l.messages);
        let events = store.read(p, None, (queued / 2) as usize).await?;
        store.ack(p, events.iter().map(|e| e.seq).collect()).await?;
    }
    println!("after the cloud acknowledged half of each priority:");
    print_stats(&store.stats());
    store.close().await?;
    drop(store);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vigil-demo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn inspect(
    dir: PathBuf,
    key_file: Option<PathBuf>,
    priorities: u8,
    events: bool,
) -> anyhow::Result<()> {
    let (key, _) = MasterKey::load(&KeySource::Configured { key_file }, |k| {
        std::env::var(k).ok()
    })?;
    let mut options = StoreOptions::new(&dir);
    options.priorities = priorities;
    let store = tokio::task::spawn_blocking(move || Store::open(options, &key)).await??;
    print_stats(&store.stats());
    if events {
        for p in 0..store.priorities() {
            let mut after = None;
            loop {
                let scanned = store.scan_lane(p, after, 1000)?;
                for bad in &scanned.corrupt {
                    println!(
                        "{}",
                        serde_json::json!({"priority": p, "seq": bad.seq, "corrupt": bad.reason})
                    );
                }
                let Some(last) = scanned
                    .events
                    .last()
                    .map(|e| e.seq)
                    .or(scanned.corrupt.last().map(|c| c.seq))
                else {
                    break;
                };
                for e in &scanned.events {
                    let ev = &e.body;
                    println!(
                        "{}",
                        serde_json::json!({
                            "seq": e.seq, "priority": ev.priority, "id": ev.id.to_string(),
                            "kind": ev.kind.as_str(), "device": ev.device, "device_seq": ev.device_seq,
                            "topic": ev.topic, "received_at": ev.received_at.to_rfc3339(),
                            "sha256": ev.sha256_hex(), "payload_bytes": ev.payload.len(),
                            "payload": String::from_utf8_lossy(&ev.payload),
                        })
                    );
                }
                after = Some(last);
            }
        }
    }
    store.close().await?;
    Ok(())
}

fn print_stats(stats: &StoreStats) {
    let now = Timestamp::now();
    println!(
        "  {:<10} {:>10} {:>12} {:>12}",
        "priority", "messages", "bytes", "oldest age"
    );
    for (p, lane) in stats.lanes.iter().enumerate() {
        let age = lane
            .oldest
            .map_or_else(|| "-".to_string(), |t| format!("{:.1?}", t.age(now)));
        println!(
            "  {:<10} {:>10} {:>12} {:>12}",
            p, lane.messages, lane.bytes, age
        );
    }
    println!(
        "  dead-letter {} ({} bytes), quarantine {} ({} bytes), evicted {:?}, refused {}",
        stats.dead_letter.messages,
        stats.dead_letter.bytes,
        stats.quarantine.messages,
        stats.quarantine.bytes,
        stats.counters.evicted,
        stats.counters.refused_full
    );
}

fn hash_password() -> anyhow::Result<()> {
    let mut line = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| anyhow::anyhow!("cannot read the password from standard input: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!(
            "empty password: pipe the password in, e.g. `printf %s \"$PW\" | vigil hash-password`"
        );
    }
    let hash = crate::gate::auth::hash_password(password)?;
    println!("{hash}");
    Ok(())
}
