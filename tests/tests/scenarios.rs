//! The shipped outage scenarios, run as CI runs them: the real `vigil` and
//! `vigil-sim` binaries, the loopback mTLS cloud, the fault proxy and the
//! devices. Each must report nothing lost and nothing unexpected; and the
//! oracle must catch a Vigil that deletes messages when it sends them.
//!
//! The scenarios run one at a time (they share the machine's two cores).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vigil_sim::scenario::{Outcome, RunOptions, Scenario};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `target/<profile>/<name>`, built first if missing (when this crate's
/// tests run on their own).
fn binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(name);
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", name])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build of {name} failed");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// Writes straight to the process's stderr, past the test harness's output
/// capture, so CI logs carry the `fault=` lines of passing tests too.
fn show(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn scenario_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../device-sim/scenarios")
        .join(format!("{name}.toml"))
}

async fn run(name: &str) -> Outcome {
    run_scenario(&Scenario::load(&scenario_file(name)).unwrap()).await
}

async fn run_scenario(scenario: &Scenario) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    run_scenario_in(scenario, dir.path()).await
}

/// Runs `scenario` with its files (the ledgers among them) in `dir`.
async fn run_scenario_in(scenario: &Scenario, dir: &Path) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().await;
    let outcome = vigil_sim::scenario::run(
        scenario,
        &RunOptions {
            vigil: binary("vigil", "vigil"),
            workdir: dir.to_path_buf(),
            forward_extra: Vec::new(),
            sim: Some(binary("vigil-sim", "vigil-sim")),
            http: None,
            milestones: None,
        },
    )
    .await
    .unwrap();
    eprintln!("{outcome}");
    // The fault tier's summary line, on stdout for CI logs.
    show(&outcome.report.fault_line(&scenario.name));
    outcome
}

fn assert_clean(o: &Outcome) {
    assert!(o.report.passed(), "{o}");
    assert_eq!(o.report.reordered, 0, "{o}");
    assert_eq!(o.report.sequence_gaps, 0, "{o}");
    assert!(o.report.acknowledged > 500, "{o}");
    assert!(o.drain_time.is_some(), "{o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_loses_nothing() {
    assert_clean(&run("outage").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_loses_nothing() {
    assert_clean(&run("flapping").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_pubacks_lose_nothing_and_are_resent() {
    let o = run("withheld-pubacks").await;
    assert_clean(&o);
    assert!(
        o.report.duplicated > 0,
        "the unacknowledged ones were sent again: {o}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_broker_restart_loses_nothing() {
    assert_clean(&run("cloud-restart").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_outage_loses_nothing() {
    assert_clean(&run("crash-during-outage").await);
}

/// A long outage on a gateway with a 1 MiB store, and a crash while it
/// evicts: Vigil evicts its oldest waveform chunks (the contract's one loss
/// path) and announces them with gap notices, as many as its own counter
/// (`vigil_evicted_total`) says. The oracle excuses a missing reading only
/// as far as the notices announce it: the same ledgers judged without the
/// notices fail with every evicted reading lost, and with each notice one
/// short, with that many lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_evicts_only_what_it_announces() {
    use vigil_sim::ledger::{self, Arrived, Sent};
    use vigil_sim::oracle;

    let dir = tempfile::tempdir().unwrap();
    let o = run_scenario_in(
        &Scenario::load(&scenario_file("full-store")).unwrap(),
        dir.path(),
    )
    .await;
    assert!(o.report.passed(), "{o}");
    assert!(o.report.evicted > 500, "the 1 MiB store must evict: {o}");
    assert_eq!(
        o.report.evicted_by_vigil,
        Some(o.report.announced),
        "every eviction Vigil counted is announced, and no more: {o}"
    );
    assert!(o.report.announced >= o.report.evicted, "{o}");
    assert_eq!(o.report.unannounced_gaps, 0, "{o}");
    assert!(o.report.sequence_gaps >= o.report.evicted, "{o}");
    assert_eq!(o.report.reordered, 0, "{o}");
    assert_eq!(o.restarts.len(), 1, "{o}");
    assert!(o.drain_time.is_some(), "{o}");

    let sent: Vec<Sent> = ledger::read(&dir.path().join("sent.jsonl")).unwrap();
    let received: Vec<Arrived> = ledger::read(&dir.path().join("received-0.jsonl")).unwrap();
    let notices: Vec<_> = received.iter().filter_map(|a| a.notice.as_ref()).collect();
    assert_eq!(notices.len() as u64, o.report.gap_notices, "{o}");
    assert!(
        notices.iter().all(|n| n.priority == 3),
        "only waveforms (priority 3) may be evicted: {notices:?}"
    );
    assert_eq!(oracle::judge(&sent, &received).evicted, o.report.evicted);

    let without: Vec<Arrived> = received
        .iter()
        .filter(|a| a.notice.is_none())
        .cloned()
        .collect();
    let r = oracle::judge(&sent, &without);
    assert!(!r.passed(), "{r}");
    assert_eq!((r.evicted, r.lost), (0, o.report.evicted), "{r}");
    assert_eq!(r.unannounced_gaps, r.sequence_gaps, "{r}");

    // Each notice one short (at least 1): the notices announce fewer than
    // were evicted, and the difference is lost.
    let short: Vec<Arrived> = received
        .iter()
        .cloned()
        .map(|mut a| {
            if let Some(n) = a.notice.as_mut() {
                n.count = n.count.saturating_sub(1).max(1);
            }
            a
        })
        .collect();
    let r = oracle::judge(&sent, &short);
    assert!(!r.passed(), "{r}");
    assert!(r.lost > 0 && r.lost + r.evicted == o.report.evicted, "{r}");
}

/// Crash: Vigil is SIGKILLed 20 times at random moments while the monitors
/// publish and the cloud link is up, so kills land during ingest and during
/// forwarding; each time it is restarted 50 to 350 ms later. Everything it
/// acknowledged must reach the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_during_ingest_and_forwarding_lose_nothing() {
    let mut seed = u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut text = String::from(
        "name = \"sigkill\"\ndevices = 10\nrate = 5.0\nduration = \"28s\"\ndrain_timeout = \"60s\"\n",
    );
    let mut at = 1_000;
    for _ in 0..20 {
        at += 700 + next(500);
        let back = at + 50 + next(300);
        text.push_str(&format!(
            "[[faults]]\nat = \"{at}ms\"\naction = \"kill-vigil\"\n\
             [[faults]]\nat = \"{back}ms\"\naction = \"start-vigil\"\n"
        ));
        at = back;
    }
    let scenario = Scenario::from_toml(&text, Path::new("sigkill timeline")).unwrap();
    let o = run_scenario(&scenario).await;
    assert_eq!(o.restarts.len(), 20, "{o}");
    assert!(o.report.passed(), "{o}");
    assert_eq!(o.report.sequence_gaps, 0, "{o}");
    assert!(o.report.acknowledged > 1000, "{o}");
    assert!(o.drain_time.is_some(), "{o}");
}

/// The oracle has teeth: with the test-only setting that deletes each
/// message when it is sent rather than when the cloud acknowledges it, a
/// blackholed-then-reset link swallows a window of messages; `vigil-sim
/// scenario` reports them lost and exits 1. The same timeline against a
/// correct Vigil loses nothing (it resends them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_catches_a_vigil_that_deletes_on_send() {
    let _one = ONE_AT_A_TIME.lock().await;
    let vigil = binary("vigil", "vigil");
    let sim = binary("vigil-sim", "vigil-sim");
    let dir = tempfile::tempdir().unwrap();
    // Messages pile up in flight in a blackhole, then the link is reset, so
    // what was in flight never reaches the cloud (a correct Vigil resends it).
    let text = "name = \"delete-on-send\"\nduration = \"8s\"\ndrain_timeout = \"8s\"\n\
                [[faults]]\nat = \"2s\"\naction = \"proxy\"\nmode = \"blackhole\"\n\
                [[faults]]\nat = \"4s\"\naction = \"proxy\"\nmode = \"reset\"\n\
                [[faults]]\nat = \"4100ms\"\naction = \"proxy\"\nmode = \"pass\"\n";
    let file = dir.path().join("blackhole-then-reset.toml");
    std::fs::write(&file, text).unwrap();
    let run_cli = |extra: &'static [&'static str]| {
        let (sim, vigil, file) = (sim.clone(), vigil.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            let out = Command::new(sim)
                .arg("scenario")
                .arg(&file)
                .arg("--vigil")
                .arg(vigil)
                .args(extra)
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&out.stdout).to_string();
            eprintln!("{report}");
            let lost: u64 = report
                .lines()
                .find_map(|l| l.strip_prefix("lost"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a lost line");
            (out.status.code(), lost, report)
        })
    };
    let (code, lost, report) = run_cli(&[]).await.unwrap();
    assert_eq!((code, lost), (Some(0), 0), "a correct Vigil: {report}");
    let (code, lost, report) =
        run_cli(&["--forward-setting", "testing_only_delete_on_send = true"])
            .await
            .unwrap();
    assert_eq!(code, Some(1), "a lossy Vigil must fail the run: {report}");
    assert!(lost > 0, "{report}");
    assert!(report.contains("verdict       FAIL"), "{report}");
}

/// `vigil-sim judge` reads one ledger per subscriber: a reading that reached
/// only the second (after a cloud restart) is delivered, not lost.
#[test]
fn judge_takes_every_subscribers_ledger() {
    use vigil_sim::ledger::{self, Arrived, Sent};

    let dir = tempfile::tempdir().unwrap();
    let sent: Vec<Sent> = (1..=3)
        .map(|i| Sent {
            device: "bed-1".into(),
            counter: i,
            priority: 1,
            sha256: format!("sha-{i}"),
            acked: true,
        })
        .collect();
    fn write<T: serde::Serialize>(path: PathBuf, items: impl IntoIterator<Item = T>) -> PathBuf {
        let mut w = ledger::Writer::create(&path).unwrap();
        items.into_iter().for_each(|i| w.append(&i).unwrap());
        path
    }
    let in_dir = |name: &str| dir.path().join(name);
    let sent_path = write(in_dir("sent.jsonl"), &sent);
    let first = write(
        in_dir("received-0.jsonl"),
        sent[..2].iter().map(Arrived::as_sent),
    );
    let second = write(
        in_dir("received-1.jsonl"),
        sent[2..].iter().map(Arrived::as_sent),
    );
    let judge = |received: &[&Path], extra: &[String]| {
        let mut cmd = Command::new(binary("vigil-sim", "vigil-sim"));
        cmd.arg("judge").arg("--sent").arg(&sent_path);
        for r in received {
            cmd.arg("--received").arg(r);
        }
        let out = cmd.args(extra).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, report) = judge(&[&first, &second], &[]);
    assert_eq!(code, Some(0), "{report}");
    assert!(report.contains("received      3"), "{report}");
    let (code, report) = judge(&[&first], &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("lost          1"), "{report}");

    // `--vigil-http`: Vigil's own eviction count must match the notices
    // (none here). A stand-in for Vigil's `/metrics` that reports 4.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = metrics.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut conn in metrics.incoming().flatten().take(1) {
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let _ =
                conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nvigil_evicted_total{priority=\"3\"} 4\n");
        }
    });
    let (code, report) = judge(
        &[&first, &second],
        &["--vigil-http".into(), addr.to_string()],
    );
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("FAIL: Vigil counted 4 evictions, its gap notices announce 0"),
        "{report}"
    );
    server.join().unwrap(); // the listener is closed now
    // Nothing listening: an error that names the endpoint, not a verdict.
    let (code, report) = judge(
        &[&first, &second],
        &["--vigil-http".into(), addr.to_string()],
    );
    assert_ne!(code, Some(0), "{report}");
    assert!(
        report.contains(&format!("http://{addr}/metrics")),
        "{report}"
    );
}
