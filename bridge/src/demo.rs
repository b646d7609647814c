//! `vigil demo`: the whole promise on one machine, with zero set-up.
//!
//! A loopback cloud (rumqttd with mutual TLS and a verifying subscriber),
//! this very `vigil` binary as a child process behind a fault proxy, and
//! simulated bedside monitors; the cloud link is cut for a few seconds while
//! the monitors keep publishing; live progress from Vigil's `/status`; and
//! the oracle's verdict at the end. It is `vigil-sim scenario` with a
//! built-in timeline (the same engine CI runs), so what the demo shows is
//! what the tests check.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vigil_sim::scenario::{Outcome, RunOptions, Scenario};

use crate::operator::{Status, fetch_status};

/// The demo's timeline: 8 monitors for 16 s, the cloud link cut from 5 s to
/// 11 s (open connections reset, new ones refused).
pub const TIMELINE: &str = r#"
name = "demo"
devices = 8
rate = 5.0
duration = "16s"
drain_timeout = "30s"

[[faults]]
at = "5s"
action = "proxy"
mode = "reset"

[[faults]]
at = "5100ms"
action = "proxy"
mode = "refuse"

[[faults]]
at = "11s"
action = "proxy"
mode = "pass"
"#;

/// Runs the demo; `Ok(true)` when the oracle finds nothing lost.
pub async fn run() -> anyhow::Result<bool> {
    let scenario = Scenario::from_toml(TIMELINE, Path::new("built-in demo timeline"))?;
    let workdir = tempfile::Builder::new().prefix("vigil-demo-").tempdir()?;
    let vigil = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("cannot find the running vigil binary: {e}"))?;
    let http = free_loopback()?;
    println!(
        "vigil demo: everything lives in {}",
        workdir.path().display()
    );
    println!("  certificates  a development CA, the cloud's server certificate and Vigil's");
    println!("                client certificate, made now with rcgen (mutual TLS)");
    println!("  storage key   a random 256-bit key for this run only, given to Vigil in");
    println!("                VIGIL_STORAGE_KEY; the directory is removed at the end");
    println!(
        "  timeline      {} bedside monitors publish for {:?}; the cloud link is cut from 5 s to 11 s",
        scenario.devices, scenario.duration
    );
    println!();

    let (tx, mut milestones) = tokio::sync::mpsc::channel::<String>(64);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let progress = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last: Option<(Instant, u64)> = None;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    line = milestones.recv() => match line {
                        Some(line) => println!("{:>5.1}s  -- {line}", started.elapsed().as_secs_f64()),
                        None => break,
                    },
                    _ = tick.tick() => {
                        if let Ok(status) = fetch_status(http, Duration::from_millis(800)).await {
                            let forwarded = status.counter("acknowledged");
                            let rate = last.map_or(0.0, |(at, n): (Instant, u64)| {
                                forwarded.saturating_sub(n) as f64
                                    / at.elapsed().as_secs_f64().max(0.001)
                            });
                            last = Some((Instant::now(), forwarded));
                            println!("{:>5.1}s  {}", started.elapsed().as_secs_f64(), line(&status, rate));
                        }
                    }
                }
            }
        })
    };
    let outcome = vigil_sim::scenario::run(
        &scenario,
        &RunOptions {
            vigil,
            workdir: workdir.path().to_path_buf(),
            forward_extra: Vec::new(),
            sim: None,
            http: Some(http),
            milestones: Some(tx),
        },
    )
    .await;
    stop.cancel();
    let _ = progress.await;
    let outcome = outcome?;
    println!();
    print_verdict(&outcome);
    Ok(outcome.report.passed())
}

/// One progress line: link state, backlog per priority, delivery rate.
fn line(status: &Status, acked_per_second: f64) -> String {
    let backlog: Vec<String> = status
        .backlog
        .iter()
        .map(|l| format!("p{}={}", l.priority, l.messages))
        .collect();
    format!(
        "{:<8} backlog {}  in flight {:>3}  delivered {:>5.0}/s",
        status.link.to_string(),
        backlog.join(" "),
        status.in_flight,
        acked_per_second
    )
}

fn print_verdict(outcome: &Outcome) {
    println!("{outcome}");
    let r = &outcome.report;
    if r.passed() {
        println!(
            "\nEvery one of the {} readings Vigil acknowledged reached the cloud \
             ({} duplicates, which the envelope id lets a cloud drop).",
            r.acknowledged, r.duplicated
        );
    } else {
        println!(
            "\n{} acknowledged readings did not reach the cloud: this is a bug, please report it.",
            r.lost
        );
    }
}

fn free_loopback() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| anyhow::anyhow!("no free loopback port for the demo: {e}"))?;
    Ok(listener.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_parses() {
        let s = Scenario::from_toml(TIMELINE, Path::new("demo")).unwrap();
        assert_eq!(s.name, "demo");
        assert_eq!(s.faults.len(), 3);
    }
}
