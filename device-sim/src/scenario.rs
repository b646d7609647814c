//! Scenarios: the verifying cloud, the fault proxy, the real `vigil` binary
//! as a child process and the simulated devices, driven by a timeline of
//! faults; then a drain, and the oracle's report.
//!
//! A scenario file (TOML; `device-sim/scenarios/` has the shipped ones):
//!
//! ```toml
//! name = "outage"
//! devices = 10          # monitors
//! rate = 5.0            # ticks per second per monitor (vitals + ECG each)
//! duration = "12s"      # how long the devices publish
//! drain_timeout = "60s" # how long Vigil may take to deliver the backlog
//! protocol = "5"        # Vigil to cloud: "5" or "3.1.1"
//! device_protocol = "mixed"  # devices to Vigil: "3.1.1", "5" or "mixed"
//! quota_bytes = 1048576 # Vigil's store.quota_bytes (default: Vigil's, 1 GiB);
//!                       # a small one makes a long outage evict
//!
//! [[faults]]
//! at = "3s"             # from the start of the run
//! action = "proxy"      # the link between Vigil and the cloud
//! mode = "refuse"       # pass, refuse, reset, blackhole, latency=200ms,
//!                       # bandwidth=20000, one-byte, drop-pubacks
//!
//! [[faults]]
//! at = "5s"
//! action = "kill-vigil" # SIGKILL; "start-vigil" brings it back
//!
//! [[faults]]
//! at = "8s"
//! action = "restart-cloud"  # see below
//! ```
//!
//! `restart-cloud` runs the broker as a `vigil-sim cloud --broker-only` child
//! process: the link is cut (open and new connections reset), the subscriber
//! is given at least a second, and until nothing more arrives, to take what
//! the broker already acknowledged, the broker is SIGKILLed (its sessions and
//! queues die with it) and a new one starts on new ports; the subscriber and
//! the proxy follow it and the link comes back as it was.
//! The pause keeps the oracle honest: a broker killed between its PUBACK to
//! Vigil and its delivery to the subscriber loses that message itself.
//!
//! After `duration` the devices stop (waiting for their last PUBACKs), the
//! link is set back to `pass` and Vigil is started if it is down; the drain
//! time runs until every acknowledged message has reached the cloud.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::cloud::{self, Subscriber};
use crate::devices::{self, DeviceProtocol, DevicesConfig};
use crate::ledger::{self, Sent};
use crate::oracle::{self, Report};
use crate::pki;
use crate::proxy::{Mode, Proxy};

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in the report.
    pub name: String,
    /// Simulated monitors.
    #[serde(default = "default_devices")]
    pub devices: usize,
    /// Ticks per second per monitor.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// How long the devices publish.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long the drain may take.
    #[serde(with = "humantime_serde", default = "default_drain")]
    pub drain_timeout: Duration,
    /// Vigil to cloud protocol.
    #[serde(default)]
    pub protocol: CloudProtocol,
    /// Devices to Vigil: "3.1.1", "5" or "mixed" (the default: half each).
    #[serde(default)]
    pub device_protocol: DeviceProtocol,
    /// Vigil's `store.quota_bytes` (at least 1 MiB); `None`: Vigil's
    /// default. Past it Vigil evicts its oldest low-priority messages and
    /// tells the cloud with gap notices, which the oracle checks.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// The timeline.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// The MQTT version Vigil speaks to the cloud (its `forward.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum CloudProtocol {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[default]
    #[serde(rename = "5")]
    V5,
}

fn default_devices() -> usize {
    10
}
fn default_rate() -> f64 {
    5.0
}
fn default_drain() -> Duration {
    Duration::from_secs(60)
}

/// One step of the timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// When, from the start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// `proxy`, `kill-vigil`, `start-vigil` or `restart-cloud`.
    pub action: String,
    /// For `proxy`: the mode.
    #[serde(default)]
    pub mode: Option<String>,
}

/// What went wrong running a scenario (not a verdict: see [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file is unreadable or not a scenario.
    #[error("scenario {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A component could not be started.
    #[error("scenario set-up: {0}")]
    Setup(String),
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        Self::check(
            config::File::from(path).format(config::FileFormat::Toml),
            path,
        )
    }

    /// Parses and checks a scenario given as TOML text; `origin` names it in
    /// errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ScenarioError> {
        Self::check(
            config::File::from_str(text, config::FileFormat::Toml),
            origin,
        )
    }

    fn check<S>(source: S, path: &Path) -> Result<Self, ScenarioError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        let bad = |reason: String| ScenarioError::File {
            path: path.to_path_buf(),
            reason,
        };
        let s: Scenario = config::Config::builder()
            .add_source(source)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| bad(e.to_string()))?;
        for (i, f) in s.faults.iter().enumerate() {
            match (f.action.as_str(), &f.mode) {
                ("proxy", Some(m)) => {
                    m.parse::<Mode>()
                        .map_err(|e| bad(format!("faults[{i}]: {e}")))?;
                }
                ("proxy", None) => return Err(bad(format!("faults[{i}]: proxy needs a mode"))),
                ("kill-vigil" | "start-vigil" | "restart-cloud", None) => {}
                (other, _) => {
                    return Err(bad(format!(
                        "faults[{i}]: unknown action {other:?}; use proxy (with mode), \
                         kill-vigil, start-vigil or restart-cloud"
                    )));
                }
            }
        }
        if s.devices == 0 || s.rate <= 0.0 {
            return Err(bad("devices and rate must be above 0".into()));
        }
        if let Some(q) = s.quota_bytes.filter(|q| *q < 1 << 20) {
            return Err(bad(format!(
                "quota_bytes is {q}; Vigil's store needs at least 1 MiB (1048576)"
            )));
        }
        Ok(s)
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `vigil` binary.
    pub vigil: PathBuf,
    /// Working directory (PKI, Vigil's store and config, ledgers).
    pub workdir: PathBuf,
    /// Extra `[forward]` lines for Vigil's configuration (e.g. the oracle
    /// test's deliberately broken setting).
    pub forward_extra: Vec<String>,
    /// The `vigil-sim` binary, for scenarios that restart the cloud.
    pub sim: Option<PathBuf>,
    /// Where Vigil's operator endpoints (`/status`, `/metrics`) listen
    /// (`None`: a free loopback port, not reported).
    pub http: Option<SocketAddr>,
    /// Milestones as they happen, one human-readable line each (Vigil up,
    /// each fault, devices stopped, drained). Sent with `try_send`: a slow
    /// reader misses lines, the run never waits for it.
    pub milestones: Option<tokio::sync::mpsc::Sender<String>>,
}

impl RunOptions {
    fn milestone(&self, line: impl FnOnce() -> String) {
        if let Some(tx) = &self.milestones {
            let _ = tx.try_send(line());
        }
    }
}

/// The cloud broker: in this process, or a child process that can be killed.
enum Broker {
    InProcess,
    Child(Child),
}

impl Broker {
    fn kill(&mut self) {
        if let Broker::Child(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `vigil-sim cloud --broker-only` and reads its ports.
fn child_broker(
    sim: &Path,
    pki: &pki::DevPki,
) -> Result<(Broker, cloud::Listeners), ScenarioError> {
    use std::io::BufRead as _;
    let setup = |e: String| ScenarioError::Setup(e);
    let mut child = Command::new(sim)
        .args(["cloud", "--broker-only", "--pki"])
        .arg(&pki.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| setup(format!("{}: {e}", sim.display())))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let mut addrs = line.split_whitespace().map(|a| a.parse::<SocketAddr>());
    match (addrs.next(), addrs.next()) {
        (Some(Ok(v4)), Some(Ok(v5))) => Ok((Broker::Child(child), cloud::Listeners { v4, v5 })),
        _ => {
            let _ = child.kill();
            Err(setup(format!(
                "the cloud child printed {line:?}, not its ports"
            )))
        }
    }
}

/// A scenario's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario's name.
    pub name: String,
    /// The oracle's verdict.
    pub report: Report,
    /// From the devices' stop until every acknowledged message had arrived
    /// (`None`: the drain timed out).
    pub drain_time: Option<Duration>,
    /// Vigil's peak resident set size (KiB) over the run, sampled.
    pub peak_rss_kib: u64,
    /// For each restart of Vigil after the first start: time from spawning
    /// it to its device listener accepting connections.
    pub restarts: Vec<Duration>,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "scenario      {}", self.name)?;
        writeln!(f, "{}", self.report)?;
        match self.drain_time {
            Some(d) => writeln!(f, "drain time    {:.2} s", d.as_secs_f64())?,
            None => writeln!(f, "drain time    timed out")?,
        }
        if !self.restarts.is_empty() {
            let mut ms: Vec<u128> = self.restarts.iter().map(Duration::as_millis).collect();
            ms.sort_unstable();
            writeln!(
                f,
                "restarts      {} (to accepting devices: median {} ms, max {} ms)",
                ms.len(),
                ms.get(ms.len() / 2).copied().unwrap_or(0),
                ms.last().copied().unwrap_or(0)
            )?;
        }
        write!(f, "peak RSS      {} KiB (vigil)", self.peak_rss_kib)
    }
}

/// The `vigil` child process.
struct Vigil {
    bin: PathBuf,
    config: PathBuf,
    key: String,
    gate: SocketAddr,
    child: Option<Child>,
    pid: Arc<AtomicU32>,
    /// Start-up times, in order.
    starts: Vec<Duration>,
}

impl Vigil {
    async fn start(&mut self) -> Result<(), ScenarioError> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("VIGIL_STORAGE_KEY", &self.key)
            .env("VIGIL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ScenarioError::Setup(format!("{}: {e}", self.bin.display())))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        let spawned = Instant::now();
        let deadline = spawned + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.gate).await.is_err() {
            if Instant::now() > deadline {
                return Err(ScenarioError::Setup("vigil did not start listening".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.starts.push(spawned.elapsed());
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.pid.store(0, Ordering::Relaxed);
    }

    /// SIGTERM and wait (SIGKILL after 20 s).
    async fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        self.pid.store(0, Ordering::Relaxed);
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    return status.success();
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await;
        waited.unwrap_or(false)
    }
}

impl Drop for Vigil {
    fn drop(&mut self) {
        self.kill();
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn free_port() -> Result<u16, ScenarioError> {
    crate::ports::free_loopback_port()
        .map_err(|e| ScenarioError::Setup(format!("no free port: {e}")))
}

/// Gives the subscriber what a cut-off broker already acknowledged (a
/// broker killed between its PUBACK to Vigil and its delivery loses that
/// message itself): at least a second, then until nothing new has arrived
/// for half a second (ten checks in a row, so a stalled process does not
/// count as quiet), at most ten seconds.
async fn passed_on(sub: &Subscriber) {
    let started = Instant::now();
    let mut seen = sub.arrived().len();
    let mut quiet = 0;
    while quiet < 10 || started.elapsed() < Duration::from_secs(1) {
        if started.elapsed() > Duration::from_secs(10) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sub.arrived().len();
        if now == seen {
            quiet += 1;
        } else {
            (seen, quiet) = (now, 0);
        }
    }
}

/// Runs `scenario` and judges it.
pub async fn run(scenario: &Scenario, opts: &RunOptions) -> Result<Outcome, ScenarioError> {
    let setup = |e: &dyn std::fmt::Display| ScenarioError::Setup(e.to_string());
    std::fs::create_dir_all(&opts.workdir).map_err(|e| setup(&e))?;
    let pki = pki::loopback(&opts.workdir.join("pki")).map_err(|e| setup(&e))?;
    let restarts = scenario.faults.iter().any(|f| f.action == "restart-cloud");
    let (mut broker, listeners) = match (&opts.sim, restarts) {
        (Some(sim), true) => child_broker(sim, &pki)?,
        (None, true) => {
            return Err(setup(
                &"restart-cloud needs the vigil-sim binary (RunOptions::sim)",
            ));
        }
        (_, false) => (
            Broker::InProcess,
            cloud::start_broker(&pki).map_err(|e| setup(&e))?,
        ),
    };
    let subscribe = |v4: SocketAddr, n: usize| {
        Subscriber::start(
            &pki,
            v4,
            "vigil",
            Some(&opts.workdir.join(format!("received-{n}.jsonl"))),
        )
    };
    let mut subscribers = vec![subscribe(listeners.v4, 0).map_err(|e| setup(&e))?];
    if !subscribers[0].subscribed(Duration::from_secs(20)).await {
        return Err(setup(&"the verifying subscriber could not subscribe"));
    }
    let upstream_of = |l: &cloud::Listeners| match scenario.protocol {
        CloudProtocol::V311 => l.v4,
        CloudProtocol::V5 => l.v5,
    };
    let upstream = upstream_of(&listeners);
    // TLS-terminating, so faults act on MQTT packets (drop-pubacks).
    let proxy = Proxy::start_tls(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream,
        cloud::proxy_tls(&pki).map_err(|e| setup(&e))?,
    )
    .await
    .map_err(|e| setup(&e))?;
    let gate = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let http = match opts.http {
        Some(a) => a,
        None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
    };
    let config = opts.workdir.join("vigil.toml");
    let protocol = match scenario.protocol {
        CloudProtocol::V311 => "3.1.1",
        CloudProtocol::V5 => "5",
    };
    let text = format!(
        "[store]\ndir = {store:?}\n{quota}\n[gate]\ntcp_listen = \"{gate}\"\n\n[http]\nlisten = \"{http}\"\n\n[forward]\n\
         host = \"127.0.0.1\"\nport = {port}\nprotocol = \"{protocol}\"\n\
         ack_timeout = \"5s\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n{extra}\n\n\
         [forward.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
        store = opts.workdir.join("store").display().to_string(),
        quota = scenario
            .quota_bytes
            .map(|q| format!("quota_bytes = {q}\n"))
            .unwrap_or_default(),
        port = proxy.addr().port(),
        extra = opts.forward_extra.join("\n"),
        ca = pki.path("ca.pem").display().to_string(),
        cert = pki.path("vigil.pem").display().to_string(),
        key = pki.path("vigil.key").display().to_string(),
    );
    std::fs::write(&config, text).map_err(|e| setup(&e))?;
    let key = {
        use base64::Engine as _;
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| setup(&e))?;
        base64::engine::general_purpose::STANDARD.encode(k)
    };
    let pid = Arc::new(AtomicU32::new(0));
    let mut vigil = Vigil {
        bin: opts.vigil.clone(),
        config,
        key,
        gate,
        child: None,
        pid: pid.clone(),
        starts: Vec::new(),
    };
    vigil.start().await?;
    opts.milestone(|| format!("vigil is up: devices on {gate}, cloud via the fault proxy"));

    // Sample Vigil's RSS throughout.
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = CancellationToken::new();
    {
        let (pid, peak, stop) = (pid.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Some(kib) = rss_kib(pid.load(Ordering::Relaxed)) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    let stop_devices = CancellationToken::new();
    let sent_path = opts.workdir.join("sent.jsonl");
    let writer = ledger::Writer::create(&sent_path).map_err(|e| setup(&e))?;
    let devices = tokio::spawn(devices::run(
        DevicesConfig {
            gate,
            count: scenario.devices,
            rate: scenario.rate,
            prefix: "bed".into(),
            protocol: scenario.device_protocol,
        },
        Some(writer),
        stop_devices.clone(),
        Duration::from_secs(10),
    ));
    let start = tokio::time::Instant::now();
    let mut faults = scenario.faults.clone();
    faults.sort_by_key(|f| f.at);
    for f in &faults {
        tokio::time::sleep_until(start + f.at).await;
        opts.milestone(|| match &f.mode {
            Some(mode) => format!("{:?}: {} {mode}", f.at, f.action),
            None => format!("{:?}: {}", f.at, f.action),
        });
        match f.action.as_str() {
            "proxy" => {
                if let Some(mode) = f.mode.as_deref().and_then(|m| m.parse().ok()) {
                    proxy.set(mode);
                }
            }
            "kill-vigil" => vigil.kill(),
            "start-vigil" => vigil.start().await?,
            "restart-cloud" => {
                let (Some(sim), before) = (opts.sim.as_deref(), proxy.mode()) else {
                    continue;
                };
                // Cut the link and keep it cut: `reset` resets open
                // connections at their next chunk (before passing it on) and
                // new ones at once. A mode reaches an open connection only
                // with its next chunk, so `refuse` set straight after would
                // replace the reset before the open connection saw it: Vigil
                // would go on forwarding to the broker up to its kill.
                proxy.set(Mode::Reset);
                if let Some(sub) = subscribers.last() {
                    passed_on(sub).await;
                }
                broker.kill();
                let (fresh, listeners) = child_broker(sim, &pki)?;
                broker = fresh;
                let sub = subscribe(listeners.v4, subscribers.len()).map_err(|e| setup(&e))?;
                if !sub.subscribed(Duration::from_secs(20)).await {
                    return Err(setup(&"the subscriber could not resubscribe"));
                }
                subscribers.push(sub);
                proxy.set_upstream(upstream_of(&listeners));
                proxy.set(before);
            }
            _ => {}
        }
    }
    tokio::time::sleep_until(start + scenario.duration).await;
    // Heal everything, then let the devices finish.
    proxy.set(Mode::Pass);
    vigil.start().await?;
    stop_devices.cancel();
    let sent: Vec<Sent> = devices
        .await
        .map_err(|e| setup(&e))?
        .map_err(|e| setup(&e))?;
    let stopped = Instant::now();
    opts.milestone(|| {
        format!(
            "devices stopped: {} readings sent, {} acknowledged by Vigil; link healed, draining",
            sent.len(),
            sent.iter().filter(|s| s.acked).count()
        )
    });
    let want: std::collections::HashSet<String> = sent
        .iter()
        .filter(|s| s.acked)
        .map(|s| s.sha256.clone())
        .collect();
    let arrived = |subs: &[Subscriber]| -> Vec<crate::ledger::Arrived> {
        subs.iter().flat_map(Subscriber::arrived).collect()
    };
    let mut pause = Duration::from_millis(50);
    let drain_time = loop {
        let now = arrived(&subscribers);
        let have: std::collections::HashSet<&str> = now
            .iter()
            .filter(|a| a.verified)
            .map(|a| a.sha256.as_str())
            .collect();
        let all_arrived = want.iter().all(|w| have.contains(w.as_str()));
        // Drained when the oracle has nothing left to wait for: every
        // acknowledged message arrived or was announced evicted by a gap
        // notice, and every device sequence number below the highest
        // arrived or was announced (a message Vigil stored without its
        // PUBACK reaching the device still comes, after the acknowledged
        // ones of higher priorities).
        if all_arrived || now.iter().any(|a| a.notice.is_some()) {
            let judging = Instant::now();
            let r = oracle::judge(&sent, &now);
            pause = pause.max(judging.elapsed() * 2);
            if r.lost == 0 && r.unannounced_gaps == 0 {
                break Some(stopped.elapsed());
            }
        }
        if stopped.elapsed() > scenario.drain_timeout {
            break None;
        }
        tokio::time::sleep(pause).await;
    };
    opts.milestone(|| match drain_time {
        Some(d) => format!(
            "drained: every acknowledged reading reached the cloud or was announced evicted, in {d:.2?}"
        ),
        None => format!("drain timed out after {:?}", scenario.drain_timeout),
    });
    // Late duplicates still in flight are counted too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Vigil's own count of evictions, which the gap notices must announce
    // exactly; a notice replaced while in flight may take a moment more.
    let counted_by_vigil = || async {
        match crate::operator::evictions(http).await {
            Ok(counted) => counted,
            Err(e) => {
                opts.milestone(|| format!("Vigil's eviction count not read: {e}"));
                None
            }
        }
    };
    let settle = Instant::now() + Duration::from_secs(5);
    let mut evicted_by_vigil = counted_by_vigil().await;
    while let Some(n) = evicted_by_vigil
        && n != oracle::judge(&sent, &arrived(&subscribers)).announced
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        evicted_by_vigil = counted_by_vigil().await;
    }
    sampling.cancel();
    vigil.stop().await;
    let mut report = oracle::judge(&sent, &arrived(&subscribers));
    report.evicted_by_vigil = evicted_by_vigil;
    drop(broker);
    Ok(Outcome {
        name: scenario.name.clone(),
        report,
        drain_time,
        peak_rss_kib: peak.load(Ordering::Relaxed),
        restarts: vigil.starts.iter().skip(1).copied().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let s = Scenario::load(&path).unwrap();
            names.push(s.name);
        }
        names.sort();
        assert_eq!(
            names,
            [
                "cloud-restart",
                "crash-during-outage",
                "flapping",
                "full-store",
                "outage",
                "slow-link",
                "soak",
                "ward-3-outage",
                "withheld-pubacks"
            ]
        );
    }

    #[test]
    fn a_quota_vigil_would_refuse_is_refused_here_first() {
        let text = "name = \"x\"\nduration = \"1s\"\nquota_bytes = 4096\n";
        let err = Scenario::from_toml(text, Path::new("small.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("small.toml")
                && err.contains("quota_bytes is 4096")
                && err.contains("1048576"),
            "{err}"
        );
        let s = Scenario::from_toml(
            "name = \"x\"\nduration = \"1s\"\nquota_bytes = 1048576\n",
            Path::new("ok.toml"),
        )
        .unwrap();
        assert_eq!(s.quota_bytes, Some(1 << 20));
    }

    #[test]
    fn a_bad_timeline_names_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "name = \"x\"\nduration = \"1s\"\n[[faults]]\nat = \"1s\"\naction = \"proxy\"\nmode = \"slow\"\n",
        )
        .unwrap();
        let err = Scenario::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("faults[0]") && err.contains("blackhole"),
            "{err}"
        );
    }
}
