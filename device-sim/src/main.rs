//! `vigil-sim`: simulated bedside devices, a fault-injecting proxy, a verifying
//! cloud and outage scenarios with a loss oracle. The parts are in the
//! `vigil_sim` library; this is the command line over them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vigil_sim::ledger::{self, Arrived, Sent};
use vigil_sim::proxy::{Mode, Proxy};

/// Simulated bedside devices, fault proxy and verifying cloud for Vigil.
#[derive(Debug, Parser)]
#[command(name = "vigil-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes the development PKI (CA; cloud server for localhost/127.0.0.1;
    /// vigil, subscriber and device client certificates) in a directory.
    Pki {
        /// Where to write the PEM files (keys get mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Judges a run from its two ledgers (JSON lines) and prints the
    /// report; exits 1 when anything acknowledged was lost, anything
    /// unexpected arrived, or a sequence gap went unannounced (evictions
    /// announced by Vigil's gap notices are not losses).
    Judge {
        /// The devices' ledger.
        #[arg(long)]
        sent: PathBuf,
        /// The verifying cloud's ledger; repeat it for each subscriber's
        /// (a scenario that restarts the cloud writes `received-0.jsonl`,
        /// `received-1.jsonl`, ...).
        #[arg(long, required = true)]
        received: Vec<PathBuf>,
        /// Vigil's operator listener (its `http.listen`, e.g.
        /// 127.0.0.1:9100): its `vigil_evicted_total` must equal what the
        /// gap notices announce. Read once, now: give it after the drain.
        #[arg(long)]
        vigil_http: Option<std::net::SocketAddr>,
    },
    /// Runs the loopback cloud (rumqttd with mutual TLS) and the verifying
    /// subscriber until Ctrl-C, writing what arrives to a ledger.
    Cloud {
        /// The development PKI (made there first if `ca.pem` is missing).
        #[arg(long, default_value = "pki")]
        pki: PathBuf,
        /// Where the cloud's ledger goes (JSON lines).
        #[arg(long, default_value = "received.jsonl")]
        ledger: PathBuf,
        /// Topic prefix Vigil forwards under.
        #[arg(long, default_value = "vigil")]
        prefix: String,
        /// Verify at an external broker (`host:port`, MQTT over TLS)
        /// instead of starting one; needs --ca, --cert and --key.
        #[arg(long, requires_all = ["ca", "cert", "key"])]
        connect: Option<String>,
        /// CA bundle the external broker's certificate chains to.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The subscriber's client certificate for the external broker.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Its key (mode 0600).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Only the broker, no subscriber: prints its ports and serves until
        /// standard input closes (how `scenario` runs a cloud it can kill).
        #[arg(long, conflicts_with = "connect")]
        broker_only: bool,
    },
    /// Simulated bedside monitors publishing to Vigil until Ctrl-C (or
    /// `--seconds`), each recording what Vigil acknowledged.
    Devices {
        /// Vigil's device listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        gate: std::net::SocketAddr,
        /// Number of monitors.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Rate multiplier: 1 = vitals and an ECG chunk once a second each.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Stop after this many seconds (default: Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Where the devices' ledger goes (JSON lines).
        #[arg(long, default_value = "sent.jsonl")]
        ledger: PathBuf,
        /// MQTT version: 3.1.1, 5 or mixed (odd devices 3.1.1, even 5).
        #[arg(long, default_value = "mixed")]
        protocol: vigil_sim::devices::DeviceProtocol,
    },
    /// A TCP fault proxy. Modes: pass, refuse, reset, blackhole,
    /// latency=<duration>, bandwidth=<bytes/s>, one-byte. Plays `--schedule`
    /// and also takes a mode per line on standard input while it runs.
    Proxy {
        /// Where clients connect.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Where the proxy connects (e.g. the cloud broker).
        #[arg(long)]
        upstream: std::net::SocketAddr,
        /// Timeline, e.g. "0s=pass,5s=blackhole,15s=pass" (offsets from start).
        #[arg(long, default_value = "0s=pass")]
        schedule: String,
        /// Terminate TLS with this development PKI (presenting the cloud's
        /// certificate, and the device certificate upstream), so faults act
        /// on MQTT packets and drop-pubacks works.
        #[arg(long)]
        tls_pki: Option<PathBuf>,
    },
    /// Runs a scenario: the loopback cloud, the fault proxy, the real
    /// `vigil` binary and the devices under the file's timeline; prints the
    /// report and exits 1 when anything was lost or unexpected, or a
    /// sequence gap went unannounced.
    Scenario {
        /// The scenario file (see device-sim/scenarios/).
        file: PathBuf,
        /// The vigil binary (default: next to this one).
        #[arg(long)]
        vigil: Option<PathBuf>,
        /// Working directory for the run (default: a temporary one).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Extra `[forward]` line for Vigil's configuration (repeatable). For
        /// the oracle's own test: `testing_only_delete_on_send = true`.
        #[arg(long, hide = true)]
        forward_setting: Vec<String>,
    },
    /// Measures Vigil's performance targets in one run, everything on
    /// loopback, and prints one table: end-to-end throughput, durable ingest
    /// (and against a bare rumqttd), drain of a 1M backlog, latency, RSS,
    /// disk per message, start-up to forwarding. Exits 1 if a row could not
    /// be measured or a message was lost; never for a missed target.
    Bench {
        /// Multiplies every message count (0.02 for a quick run).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Work directory, kept (default: a temporary one, removed unless
        /// something failed). Vigil's output goes to vigil.log there.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The vigil binary (default: next to this one).
        #[arg(long)]
        vigil: Option<PathBuf>,
        /// Also measure RSS with 10,000,000 messages queued (× scale; about
        /// 7 GB of disk at scale 1).
        #[arg(long)]
        ten_million: bool,
        /// Also run rows 1, 2 and 4 (1,000/s) through a Mosquitto bridge
        /// (needs `mosquitto` on PATH) and print the two side by side.
        #[arg(long)]
        mosquitto: bool,
        /// Only row 2: the durable ingest and the same load to a bare
        /// rumqttd, with the CPU notes (under half a minute at scale 1). For quick
        /// comparisons of builds, such as the ablation build the README's
        /// performance section describes.
        #[arg(long, conflicts_with_all = ["ten_million", "mosquitto"])]
        ingest_only: bool,
        /// Only row 4 at 1,000 msg/s (after the warm-up and the disk's fsync
        /// probe), with its breakdown notes (about 20 s). For quick looks at
        /// latency: a build, a disk, a file system (`--out` on it).
        #[arg(long, conflicts_with_all = ["ten_million", "mosquitto", "ingest_only"])]
        latency_only: bool,
        /// Publishes each simulated device keeps in flight; Vigil's
        /// `gate.max_inflight` is set to the same. The table's figures are
        /// for the default, Vigil's own default limit.
        #[arg(long, default_value_t = vigil_sim::bench::INFLIGHT,
              value_parser = clap::value_parser!(u16).range(1..))]
        inflight: u16,
        /// A local subscriber (a simulated ward display) holds this many
        /// distinct filters on Vigil's gate through row 2's fill, none
        /// matching a device's topic, so that every publish goes through the
        /// gate's local-subscription check. 0 (the default, as in the
        /// table): no local subscriber.
        #[arg(long, default_value_t = 0)]
        local_filters: usize,
        /// Topics each simulated device publishes to, in turn (1, the
        /// default and the table's: `devices/<id>/vitals`). Above 32, the
        /// gate's per-connection topic memo misses on every publish.
        #[arg(long, default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..))]
        topics_per_device: u16,
    },
}

/// The `vigil` binary next to this one (`--vigil` overrides it).
fn vigil_next_to_me(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(v) => Ok(v),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("vigil"))
            .ok_or_else(|| anyhow::anyhow!("cannot find the vigil binary; pass --vigil")),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil-sim: {e}");
            ExitCode::from(2)
        }
    }
}

/// Lets the subscriber verify until Ctrl-C, then prints what arrived.
async fn verify_until_ctrl_c(sub: &vigil_sim::cloud::Subscriber) -> anyhow::Result<ExitCode> {
    tokio::signal::ctrl_c().await?;
    let arrived = sub.arrived();
    let bad = arrived.iter().filter(|a| !a.verified).count();
    println!(
        "received {} envelopes, {bad} failing verification",
        arrived.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pki { out } => {
            let pki = vigil_sim::pki::loopback(&out)?;
            println!("development PKI written to {}", pki.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Judge {
            sent,
            received,
            vigil_http,
        } => {
            let sent: Vec<Sent> = ledger::read(&sent)?;
            let mut all: Vec<Arrived> = Vec::new();
            for path in &received {
                all.extend(ledger::read::<Arrived>(path)?);
            }
            let received = all;
            let mut report = vigil_sim::oracle::judge(&sent, &received);
            if let Some(addr) = vigil_http {
                let counted = tokio::runtime::Runtime::new()?
                    .block_on(vigil_sim::operator::evictions(addr))?;
                report.evicted_by_vigil = Some(counted.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{addr}/metrics has no vigil_evicted_total: is it Vigil's operator listener?"
                    )
                })?);
            }
            println!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Cloud {
            pki,
            ledger,
            prefix,
            connect: Some(target),
            ca,
            cert,
            key,
            ..
        } => {
            let (host, port) = target
                .rsplit_once(':')
                .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
                .ok_or_else(|| anyhow::anyhow!("--connect {target:?}: write host:port"))?;
            let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
                anyhow::bail!("--connect needs --ca, --cert and --key");
            };
            let _ = pki;
            let tls = vigil_sim::cloud::tls_from_files(&ca, &cert, &key)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let sub = vigil_sim::cloud::Subscriber::connect(
                    tls,
                    &host,
                    port,
                    &prefix,
                    Some(&ledger),
                )?;
                if !sub.subscribed(std::time::Duration::from_secs(30)).await {
                    anyhow::bail!("could not subscribe at {host}:{port} (certificates? ACLs?)");
                }
                println!(
                    "verifying {prefix}/# at {host}:{port} into {}; Ctrl-C to stop",
                    ledger.display()
                );
                verify_until_ctrl_c(&sub).await
            })
        }
        Command::Cloud {
            pki,
            broker_only: true,
            ..
        } => {
            let pki = vigil_sim::pki::DevPki { dir: pki };
            let listeners = vigil_sim::cloud::start_broker(&pki)?;
            println!("{} {}", listeners.v4, listeners.v5);
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            Ok(ExitCode::SUCCESS)
        }
        Command::Cloud {
            pki,
            ledger,
            prefix,
            ..
        } => {
            let pki = if pki.join("ca.pem").exists() {
                vigil_sim::pki::DevPki { dir: pki }
            } else {
                vigil_sim::pki::loopback(&pki)?
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let listeners = vigil_sim::cloud::start_broker(&pki)?;
                let sub = vigil_sim::cloud::Subscriber::start(
                    &pki,
                    listeners.v4,
                    &prefix,
                    Some(&ledger),
                )?;
                if !sub.subscribed(std::time::Duration::from_secs(20)).await {
                    anyhow::bail!("the verifying subscriber could not subscribe");
                }
                println!(
                    "cloud: MQTT 3.1.1 on {}, MQTT 5 on {} (mutual TLS, CA {}); \
                     verifying {prefix}/# into {}; Ctrl-C to stop",
                    listeners.v4,
                    listeners.v5,
                    pki.path("ca.pem").display(),
                    ledger.display()
                );
                verify_until_ctrl_c(&sub).await
            })
        }
        Command::Devices {
            gate,
            count,
            rate,
            seconds,
            ledger,
            protocol,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let stop = tokio_util::sync::CancellationToken::new();
                let trigger = stop.clone();
                tokio::spawn(async move {
                    match seconds {
                        Some(s) => tokio::time::sleep(std::time::Duration::from_secs(s)).await,
                        None => {
                            let _ = tokio::signal::ctrl_c().await;
                        }
                    }
                    trigger.cancel();
                });
                let writer = ledger::Writer::create(&ledger)?;
                let config = vigil_sim::devices::DevicesConfig {
                    gate,
                    count,
                    rate,
                    prefix: "bed".into(),
                    protocol,
                };
                let sent = vigil_sim::devices::run(
                    config,
                    Some(writer),
                    stop,
                    std::time::Duration::from_secs(10),
                )
                .await?;
                let acked = sent.iter().filter(|s| s.acked).count();
                println!(
                    "{} messages sent, {acked} acknowledged by Vigil; ledger in {}",
                    sent.len(),
                    ledger.display()
                );
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Proxy {
            listen,
            upstream,
            schedule,
            tls_pki,
        } => {
            let mut steps = Vec::new();
            for step in schedule.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let Some((at, mode)) = step.split_once('=') else {
                    anyhow::bail!(
                        "schedule step {step:?}: write <offset>=<mode>, e.g. 5s=blackhole"
                    );
                };
                let at = humantime::parse_duration(at.trim())
                    .map_err(|e| anyhow::anyhow!("schedule step {step:?}: {e}"))?;
                let mode: Mode = mode.parse().map_err(anyhow::Error::msg)?;
                steps.push((at, mode));
            }
            steps.sort_by_key(|(at, _)| *at);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let proxy = match tls_pki {
                    Some(dir) => {
                        let ends = vigil_sim::cloud::proxy_tls(&vigil_sim::pki::DevPki { dir })?;
                        Proxy::start_tls(listen, upstream, ends).await?
                    }
                    None => Proxy::start(listen, upstream).await?,
                };
                let proxy = std::sync::Arc::new(proxy);
                println!("proxy: {} -> {upstream}", proxy.addr());
                let timeline = proxy.clone();
                tokio::spawn(async move {
                    let start = tokio::time::Instant::now();
                    for (at, mode) in steps {
                        tokio::time::sleep_until(start + at).await;
                        timeline.set(mode);
                        println!("proxy: {at:?}: {mode:?}");
                    }
                });
                let control = proxy.clone();
                std::thread::spawn(move || {
                    for line in std::io::stdin().lines().map_while(Result::ok) {
                        match line.parse::<Mode>() {
                            Ok(mode) => {
                                control.set(mode);
                                println!("proxy: {mode:?}");
                            }
                            Err(e) => eprintln!("proxy: {e}"),
                        }
                    }
                });
                tokio::signal::ctrl_c().await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Scenario {
            file,
            vigil,
            workdir,
            forward_setting,
        } => {
            let scenario = vigil_sim::scenario::Scenario::load(&file)?;
            let vigil = vigil_next_to_me(vigil)?;
            let temp;
            let workdir = match workdir {
                Some(w) => w,
                None => {
                    temp = tempfile::tempdir()?;
                    temp.path().to_path_buf()
                }
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let outcome = runtime.block_on(vigil_sim::scenario::run(
                &scenario,
                &vigil_sim::scenario::RunOptions {
                    vigil,
                    workdir,
                    forward_extra: forward_setting,
                    sim: std::env::current_exe().ok(),
                    http: None,
                    milestones: None,
                },
            ))?;
            println!("{outcome}");
            Ok(if outcome.report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            scale,
            out,
            vigil,
            ten_million,
            mosquitto,
            ingest_only,
            latency_only,
            inflight,
            local_filters,
            topics_per_device,
        } => {
            let rows = match (ingest_only, latency_only) {
                (true, _) => vigil_sim::bench::Rows::Ingest,
                (_, true) => vigil_sim::bench::Rows::Latency,
                _ => vigil_sim::bench::Rows::All,
            };
            let opts = vigil_sim::bench::BenchOptions {
                scale,
                out,
                vigil: vigil_next_to_me(vigil)?,
                ten_million,
                mosquitto,
                rows,
                inflight,
                local_filters,
                topics_per_device,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(vigil_sim::bench::run(&opts))?;
            println!("{report}");
            Ok(if report.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
