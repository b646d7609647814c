//! Running the real `vigil` binary in tests: ports, the child's guard, the
//! key, simulated monitors, and output that reaches CI logs.

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vigil_sim::devices::{self, DeviceProtocol, DevicesConfig};
use vigil_sim::ledger::Sent;

/// `super::KEY` in base64, for `VIGIL_STORAGE_KEY`.
pub const KEY_B64: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

/// A free loopback port below the kernel's ephemeral range, so that no
/// `bind(0)` (Vigil's embedded broker, a cloud broker) takes it before the
/// process it is meant for binds it.
pub fn free_port() -> u16 {
    vigil_sim::ports::free_loopback_port().unwrap()
}

/// Writes straight to the process's stderr, past the test harness's output
/// capture, so CI logs carry the `fault=` lines of passing tests too.
pub fn show(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// A child process killed (and reaped) when the test drops it or panics.
pub struct VigilChild(pub Child);

impl std::ops::Deref for VigilChild {
    type Target = Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for VigilChild {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for VigilChild {
    fn drop(&mut self) {
        // A wrapper's child (Vigil under strace) would outlive the wrapper.
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-P", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `count` simulated monitors (mixed MQTT versions) publishing to `gate` at
/// `rate` until the token is cancelled; the task returns their ledger.
pub fn monitors(
    gate: SocketAddr,
    prefix: &str,
    count: usize,
    rate: f64,
    grace: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<Vec<Sent>>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(devices::run(
        DevicesConfig {
            gate,
            count,
            rate,
            prefix: prefix.into(),
            protocol: DeviceProtocol::Mixed,
        },
        None,
        stop.clone(),
        grace,
    ));
    (
        stop,
        tokio::spawn(async move { task.await.unwrap().unwrap() }),
    )
}

impl VigilChild {
    /// SIGTERM, then wait for the exit (at most 20 s).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vigil did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `command` (the `vigil` binary, or a wrapper whose last argument is
/// it) as `run --config <config>` with the test key and its log appended to
/// `log`; waits until the device listener `gate` accepts connections and
/// returns the child with how long that took.
pub async fn spawn_vigil(
    mut command: std::process::Command,
    config: &std::path::Path,
    log: &std::path::Path,
    gate: SocketAddr,
) -> (VigilChild, Duration) {
    use std::process::Stdio;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let started = std::time::Instant::now();
    let child = command
        .args(["run", "--config"])
        .arg(config)
        .env("VIGIL_STORAGE_KEY", KEY_B64)
        .env_remove("VIGIL_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let vigil = VigilChild(child);
    while tokio::net::TcpStream::connect(gate).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "vigil did not start listening on {gate}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (vigil, started.elapsed())
}
