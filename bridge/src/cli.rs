//! The `vigil` command: argument parsing, logging, and the subcommands.
//!
//! `main.rs` calls [`main`]; everything else lives here so tests can drive it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sha2::Digest as _;

use crate::config::{CONFIG_ENV, VigilConfig};
use crate::crypto::{KeySource, MasterKey};
use crate::event::Timestamp;
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
    /// Zero set-up demonstration (under a minute): a loopback cloud with
    /// mutual TLS, Vigil, simulated bedside monitors, the cloud link cut for
    /// a few seconds, live progress, and the loss oracle's verdict. Exits 1
    /// if anything Vigil acknowledged was lost.
    Demo,
    /// Reads a running Vigil's /status and prints it as a table.
    Status {
        /// Where its operator endpoints listen (`http.listen`).
        #[arg(long, default_value = "127.0.0.1:9731")]
        addr: std::net::SocketAddr,
    },
    /// Read-only view of a store: backlog per priority, dead-letter and
    /// quarantine counts. Needs the store's key (VIGIL_STORAGE_KEY or --key-file).
    Inspect {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Also decrypt and print queued events as JSON lines (payloads included).
        #[arg(long)]
        events: bool,
    },
    /// Messages the cloud refused for good: list them, put them back in their
    /// lane, or delete them. Works on a stopped Vigil's data directory.
    DeadLetter {
        /// What to do.
        #[command(subcommand)]
        action: DeadLetterAction,
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
    /// Certificates for development and testing.
    Certs {
        /// What to make.
        #[command(subcommand)]
        what: CertsCommand,
    },
    /// Reads a device password from standard input (one line) and prints the
    /// Argon2id hash to put in `gate.auth.users` as `password_hash`.
    HashPassword,
}

/// Which store an offline command opens.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The data directory (`store.dir`). Vigil must not be running on it.
    pub dir: PathBuf,
    /// The key file (instead of VIGIL_STORAGE_KEY).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Number of priorities the store was configured with (`store.priorities`).
    #[arg(long, default_value_t = 4)]
    pub priorities: u8,
}

/// Which dead letters a `requeue` or `purge` acts on.
#[derive(Debug, clap::Args)]
pub struct Selection {
    /// Dead-letter numbers (from `list`).
    #[arg(required_unless_present = "all")]
    pub numbers: Vec<u64>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
}

/// `vigil dead-letter ...`.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// One line per dead letter: its number, priority, device, topic,
    /// reason and when (never the payload).
    List {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Puts dead letters back at the tail of their lane, to be sent again.
    Requeue {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Which dead letters.
        #[command(flatten)]
        which: Selection,
    },
    /// Deletes dead letters for good.
    Purge {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Which dead letters.
        #[command(flatten)]
        which: Selection,
    },
}

/// `vigil certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// A development PKI made with rcgen: a CA, the cloud's server
    /// certificate, Vigil's client certificate, a server certificate for
    /// Vigil's device listener (`gateway`) and device client certificates.
    /// Keys are written with mode 0600; the CA key is not kept. Never use
    /// these in production.
    Dev {
        /// Directory to write (created; must not already hold a PKI).
        #[arg(long)]
        out: PathBuf,
        /// Device certificates to make (`device-1` ...).
        #[arg(long, default_value_t = 2)]
        devices: u16,
        /// Names the gateway and cloud certificates are valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
}

/// Entry point of the `vigil` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every device disconnect and Vigil's own readiness probe at
    // ERROR ("router-drop", "no-connection"): noise to an operator, since
    // the gate reports what matters itself (refusals, protocol errors, a
    // broker that does not start). `VIGIL_LOG=info,rumqttd=warn` shows it.
    // fjall's own error lines repeat what the store reports (once, as one
    // FATAL line naming the data directory); `VIGIL_LOG=info,fjall=warn`
    // shows them. The demo's cloud is one more in-process rumqttd.
    let default_filter = match cli.command {
        Command::Demo => "warn,rumqttd=off",
        _ => "info,rumqttd=off,fjall=off,lsm_tree=off",
    };
    init_logging(cli.log_format, default_filter);
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
            Command::Demo => match crate::demo::run().await {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!("the demo lost acknowledged readings")),
                Err(e) => Err(e),
            },
            Command::Status { addr } => {
                crate::operator::fetch_status(addr, std::time::Duration::from_secs(5))
                    .await
                    .map(|status| println!("{status}"))
                    .map_err(anyhow::Error::from)
            }
            Command::Inspect { store, events } => inspect(store, events).await,
            Command::DeadLetter { action } => dead_letter(action).await,
            Command::HashPassword => hash_password(),
            Command::Certs {
                what:
                    CertsCommand::Dev {
                        out,
                        devices,
                        names,
                    },
            } => certs_dev(&out, devices, &names),
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
            eprintln!("vigil: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: Vigil's error
/// messages already name their OS error (`{source}`), which the chain would
/// otherwise repeat at the end.
fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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

fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("VIGIL_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    log_panics();
}

/// A panic (always a bug, in Vigil or a library) becomes one ERROR log line
/// with its place. The default hook, with `RUST_BACKTRACE` set, symbolizes a
/// backtrace by loading the binary's debug info, which holds on to 100-200 MB
/// for the rest of the process's life: found as a sudden jump in resident
/// memory (a rumqttd task panicked). Panics inside connection tasks end only
/// that connection; Vigil goes on.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let message: String = message.chars().take(300).collect();
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            %place,
            %message,
            "panic (a bug: please report it with this line)"
        );
    }));
}

/// Opens a stopped Vigil's store with its key.
async fn open_store(args: StoreArgs) -> anyhow::Result<Store> {
    // Opening creates a store where there is none: refuse instead.
    if !args.dir.join(crate::store::IDENTITY_FILE).exists() {
        anyhow::bail!(
            "{}: not a Vigil data directory (no {}); pass the `store.dir` of your configuration",
            args.dir.display(),
            crate::store::IDENTITY_FILE
        );
    }
    let (key, _) = MasterKey::load(
        &KeySource::Configured {
            key_file: args.key_file,
        },
        |k| std::env::var(k).ok(),
    )?;
    let mut options = StoreOptions::new(&args.dir);
    options.priorities = args.priorities;
    Ok(tokio::task::spawn_blocking(move || Store::open(options, &key)).await??)
}

/// Every dead letter's number, in order.
async fn all_numbers(store: &Store) -> anyhow::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    let mut after = None;
    loop {
        let page = store.dead_letters(after, 1000).await?;
        let Some(last) = page.last().map(|d| d.seq) else {
            return Ok(numbers);
        };
        numbers.extend(page.iter().map(|d| d.seq));
        after = Some(last);
    }
}

/// Requeues (or with `purge`, deletes) the numbered dead letters, or all.
async fn change_dead_letters(args: StoreArgs, which: Selection, purge: bool) -> anyhow::Result<()> {
    let store = open_store(args).await?;
    let numbers = if which.all {
        all_numbers(&store).await?
    } else {
        which.numbers
    };
    let mut missing = Vec::new();
    for n in numbers {
        let done = if purge {
            store
                .purge_dead_letter(n)
                .await?
                .then(|| format!("dead letter {n} purged"))
        } else {
            store
                .requeue(n)
                .await?
                .map(|seq| format!("dead letter {n} requeued (lane seq {seq})"))
        };
        match done {
            Some(line) => println!("{line}"),
            None => missing.push(n),
        }
    }
    store.close().await?;
    if !missing.is_empty() {
        anyhow::bail!("no dead letter numbered {missing:?}; see `vigil dead-letter list`");
    }
    Ok(())
}

async fn dead_letter(action: DeadLetterAction) -> anyhow::Result<()> {
    match action {
        DeadLetterAction::List { store } => {
            let store = open_store(store).await?;
            let mut after = None;
            let mut total = 0u64;
            println!(
                "{:>8} {:>8} {:<20} {:<40} {:<24} reason",
                "number", "priority", "device", "topic", "dead-lettered at"
            );
            loop {
                let page = store.dead_letters(after, 1000).await?;
                let Some(last) = page.last().map(|d| d.seq) else {
                    break;
                };
                for d in &page {
                    let e = &d.body.event;
                    println!(
                        "{:>8} {:>8} {:<20} {:<40} {:<24} {}",
                        d.seq,
                        e.priority,
                        e.device,
                        e.topic,
                        d.body.dead_lettered_at.to_rfc3339(),
                        d.body.reason
                    );
                }
                total += page.len() as u64;
                after = Some(last);
            }
            println!("{total} dead letters");
            store.close().await?;
        }
        DeadLetterAction::Requeue { store, which } => {
            change_dead_letters(store, which, false).await?
        }
        DeadLetterAction::Purge { store, which } => change_dead_letters(store, which, true).await?,
    }
    Ok(())
}

async fn inspect(args: StoreArgs, events: bool) -> anyhow::Result<()> {
    let store = open_store(args).await?;
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
                            "sha256": ev.sha256_hex(),
                            "payload_sha256": crate::event::hex(&sha2::Sha256::digest(&ev.payload)),
                            "payload_bytes": ev.payload.len(),
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

fn certs_dev(out: &std::path::Path, devices: u16, names: &[String]) -> anyhow::Result<()> {
    use vigil_sim::pki::Role;
    if out.join("ca.pem").exists() {
        anyhow::bail!(
            "{} already holds a PKI (ca.pem); choose another --out or remove it first",
            out.display()
        );
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let device_names: Vec<String> = (1..=devices).map(|n| format!("device-{n}")).collect();
    let device_cns: Vec<[&str; 1]> = device_names.iter().map(|n| [n.as_str()]).collect();
    let mut leaves: Vec<(&str, Role, &[&str])> = vec![
        ("cloud", Role::Server, &names),
        ("vigil", Role::Client, &["vigil"]),
        ("gateway", Role::Server, &names),
    ];
    for (name, cn) in device_names.iter().zip(&device_cns) {
        leaves.push((name.as_str(), Role::Client, cn));
    }
    let pki = vigil_sim::pki::create(out, &leaves)?;
    let p = |f: &str| pki.path(f).display().to_string();
    println!(
        "development PKI written to {} (CA, cloud, vigil, gateway, {} device certificates)",
        out.display(),
        devices
    );
    println!("for vigil.toml:\n");
    println!(
        "[forward.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        p("ca.pem"),
        p("vigil.pem"),
        p("vigil.key")
    );
    println!(
        "[gate.tls]\nlisten = \"0.0.0.0:8883\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}",
        p("gateway.pem"),
        p("gateway.key"),
        p("ca.pem")
    );
    println!("\nThe cloud broker serves cloud.pem/cloud.key and trusts ca.pem for clients.");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::report;

    #[test]
    fn an_error_report_names_each_cause_once() {
        let os = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let bind = crate::operator::OperatorError::Bind {
            addr: "127.0.0.1:9000".parse().unwrap(),
            source: os,
        };
        let line = report(&anyhow::Error::new(bind).context("starting vigil"));
        assert!(
            line.starts_with("starting vigil: http.listen 127.0.0.1:9000: "),
            "{line}"
        );
        assert!(line.ends_with("set http.enabled = false"), "{line}");
        let os_text = std::io::Error::from(std::io::ErrorKind::AddrInUse).to_string();
        assert_eq!(line.matches(&os_text).count(), 1, "{line}");
    }
}
