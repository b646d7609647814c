//! Disk faults against the real `vigil` binary: power cuts and fsync
//! failures.
//!
//! Power cuts: Vigil's data directory on ext4 on a loop device, cut with
//! `xfs_io -x -c shutdown` (the kernel drops the page cache and the
//! uncommitted journal, as a power cut does) while simulated monitors
//! publish through the real `vigil` binary; then SIGKILL, unmount, remount,
//! and every message Vigil acknowledged must be in the store. Vigil restarts
//! on the same store each round, so recovery from the cut is exercised too.
//!
//! The negative control runs the same rounds against a Vigil that
//! acknowledges before the fsync (`store.testing_only_ack_before_fsync`, a
//! debug-build-only setting) and asserts the test reports a loss: a test that
//! cannot fail proves nothing.
//!
//! Needs root (loop mounts) and `xfs_io` (Debian's xfsprogs, which `.ci/run`
//! installs); skips with a message otherwise.
//!
//! fsync failure: strace makes one of Vigil's fdatasyncs return EIO while
//! monitors publish. Vigil must acknowledge nothing after it, log one FATAL
//! line, exit non-zero by itself, and keep everything it acknowledged before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{KEY_B64, VigilChild as Vigil, free_port, monitors, show, spawn_vigil};
use common::rig::Rig;

/// The tests here load the machine's two cores (and share loop devices):
/// one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Why this machine cannot run the test, if it cannot.
fn cannot_run() -> Option<&'static str> {
    if !is_root() {
        return Some("needs root for loop mounts");
    }
    if !have("xfs_io", "-V") {
        return Some("needs xfs_io (apt-get install xfsprogs)");
    }
    if !have("mkfs.ext4", "-V") {
        return Some("needs mkfs.ext4 (e2fsprogs)");
    }
    None
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image mounted on a loop device; unmounted on drop.
struct Ext4 {
    image: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Ext4 {
    fn new(dir: &Path) -> Self {
        let image = dir.join("disk.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let mut fs = Self {
            image,
            mnt,
            mounted: false,
        };
        fs.mount();
        fs
    }

    fn mount(&mut self) {
        run(
            "mount",
            &[
                "-o",
                "loop",
                self.image.to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ],
        );
        self.mounted = true;
    }

    /// The power cut.
    fn shutdown(&self) {
        run(
            "xfs_io",
            &["-x", "-c", "shutdown", self.mnt.to_str().unwrap()],
        );
    }

    fn umount(&mut self) {
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success())
            {
                self.mounted = false;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot unmount {}", self.mnt.display());
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

static STRACE_N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Starts `vigil run` on `store` with an unreachable cloud (everything
/// stays stored); returns it and how long it took to accept devices.
async fn start_vigil(
    work: &Path,
    store: &Path,
    gate: SocketAddr,
    unsafe_ack: bool,
) -> (Vigil, Duration) {
    start_vigil_with(work, store, gate, unsafe_ack, &[]).await
}

/// As [`start_vigil`], run under `wrapper` (a program and its arguments,
/// e.g. strace's) when one is given.
async fn start_vigil_with(
    work: &Path,
    store: &Path,
    gate: SocketAddr,
    unsafe_ack: bool,
    wrapper: &[&str],
) -> (Vigil, Duration) {
    let config = work.join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ndir = {store:?}\n{unsafe_line}\n[gate]\ntcp_listen = \"{gate}\"\n\n\
             [http]\nenabled = false\n\n[forward]\nhost = \"127.0.0.1\"\nport = {cloud}\n\n\
             [forward.tls]\nca = {ca:?}\n",
            store = store.display().to_string(),
            unsafe_line = if unsafe_ack {
                "testing_only_ack_before_fsync = true\n"
            } else {
                ""
            },
            cloud = free_port(),
            ca = work.join("no-ca.pem").display().to_string(),
        ),
    )
    .unwrap();
    // Debugging aid: POWER_CUT_STRACE=<dir> runs Vigil under strace.
    let command = match std::env::var("POWER_CUT_STRACE") {
        _ if !wrapper.is_empty() => {
            let mut c = Command::new(wrapper[0]);
            c.args(&wrapper[1..]).arg(env!("CARGO_BIN_EXE_vigil"));
            c
        }
        Ok(dir) => {
            let mut c = Command::new("strace");
            c.args([
                "-f",
                "-tt",
                "-e",
                "trace=fdatasync,fsync,write,writev,sendto,sendmsg",
                "-o",
            ])
            .arg(format!(
                "{dir}/strace.{:03}",
                STRACE_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))
            .arg(env!("CARGO_BIN_EXE_vigil"));
            c
        }
        Err(_) => Command::new(env!("CARGO_BIN_EXE_vigil")),
    };
    spawn_vigil(command, &config, &work.join("vigil.log"), gate).await
}

/// Payload SHA-256 of every event in the store, with its count.
fn stored(store: &Path) -> HashMap<String, u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("inspect")
        .arg(store)
        .arg("--events")
        .env("VIGIL_STORAGE_KEY", KEY_B64)
        .env("VIGIL_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vigil inspect after the power cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v.get("corrupt").is_none(), "a corrupt record: {line}");
        *seen
            .entry(v["payload_sha256"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    seen
}

/// What a series of power-cut rounds found.
#[derive(Debug, Default)]
struct Tally {
    rounds: usize,
    acked: usize,
    lost: usize,
    recovered: usize,
    unexpected: usize,
    duplicated: u64,
    restart: Vec<Duration>,
    remount: Vec<Duration>,
}

/// Up to `rounds` cuts; stops early at the first loss when `stop_at_loss`.
async fn power_cuts(rounds: usize, unsafe_ack: bool, stop_at_loss: bool) -> Tally {
    let work = tempfile::tempdir().unwrap();
    let mut fs = Ext4::new(work.path());
    let store = fs.mnt.join("store");
    let gate = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut acked: HashSet<String> = HashSet::new();
    let mut who: HashMap<String, (usize, vigil_sim::ledger::Sent)> = HashMap::new();
    let mut sent: HashSet<String> = HashSet::new();
    let mut tally = Tally::default();
    let mut seed = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    for round in 0..rounds {
        let (vigil, took) = start_vigil(work.path(), &store, gate, unsafe_ack).await;
        if round > 0 {
            tally.restart.push(took);
        }
        let (stop, devices) = monitors(
            gate,
            &format!("r{round}-bed"),
            10,
            40.0,
            Duration::from_secs(2),
        );
        // Cut at a different moment each round: 300 to 1500 ms into ingest.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(300 + seed % 1200)).await;
        // A power cut stops the process and the disk in the same instant:
        // Vigil is frozen (SIGSTOP) first, so it can send nothing after the
        // cut. (Cutting first and killing later lets a running Vigil see an
        // fdatasync that raced with the shutdown return 0 and acknowledge
        // data the "dead" disk never got: a fault no real power cut makes.)
        run("kill", &["-STOP", &vigil.0.id().to_string()]);
        fs.shutdown();
        let cut = Instant::now();
        drop(vigil);
        stop.cancel();
        let round_sent = devices.await.unwrap();
        fs.umount();
        fs.mount();
        tally.remount.push(cut.elapsed());
        for s in &round_sent {
            who.insert(s.sha256.clone(), (round, s.clone()));
            sent.insert(s.sha256.clone());
            if s.acked {
                acked.insert(s.sha256.clone());
            }
        }
        let present = stored(&store);
        let lost: Vec<&String> = acked.iter().filter(|a| !present.contains_key(*a)).collect();
        for l in &lost {
            if let Some((r, s)) = who.get(*l) {
                let last_acked = round_sent
                    .iter()
                    .filter(|x| x.device == s.device && x.acked)
                    .map(|x| x.counter)
                    .max();
                println!(
                    "  LOST: round {r} {} #{} priority {} (device's last acknowledged this round: {last_acked:?})",
                    s.device, s.counter, s.priority
                );
            }
        }
        tally.rounds = round + 1;
        tally.acked = acked.len();
        tally.lost = lost.len();
        tally.recovered = present.keys().filter(|p| !acked.contains(*p)).count();
        tally.unexpected = present.keys().filter(|p| !sent.contains(*p)).count();
        tally.duplicated = present.values().map(|n| n - 1).sum();
        println!(
            "round {round}: {} sent, {} acknowledged this round; store holds {}; lost so far {}",
            round_sent.len(),
            round_sent.iter().filter(|s| s.acked).count(),
            present.len(),
            tally.lost
        );
        if stop_at_loss && tally.lost > 0 {
            break;
        }
    }
    tally
}

fn report(name: &str, t: &Tally) {
    let ms = |d: &[Duration]| -> String {
        let mut v: Vec<u128> = d.iter().map(Duration::as_millis).collect();
        v.sort_unstable();
        match (v.first(), v.get(v.len() / 2), v.last()) {
            (Some(a), Some(m), Some(z)) => format!("min {a} ms, median {m} ms, max {z} ms"),
            _ => "-".into(),
        }
    };
    show(&format!(
        "fault={name} lost={} recovered={} unexpected={} duplicated={}",
        t.lost, t.recovered, t.unexpected, t.duplicated
    ));
    show(&format!(
        "  rounds {}, acknowledged {}, restart on the recovered store: {}, cut to remount: {}",
        t.rounds,
        t.acked,
        ms(&t.restart),
        ms(&t.remount)
    ));
}

/// Both halves in one test: they share the machine's loop devices and two
/// cores, and the negative control is only meaningful beside the real run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_nothing_acknowledged_and_the_negative_control_loses() {
    let _one = ONE_AT_A_TIME.lock().await;
    if let Some(why) = cannot_run() {
        show(&format!("SKIP power-cut test: {why}"));
        return;
    }
    let real = power_cuts(10, false, false).await;
    report("power-cut", &real);
    assert_eq!(real.rounds, 10);
    assert!(real.acked > 1000, "too little traffic to mean anything");
    assert_eq!(real.lost, 0, "acknowledged messages lost in a power cut");
    assert_eq!(real.unexpected, 0);
    assert_eq!(real.duplicated, 0, "a record stored twice");

    let broken = power_cuts(10, true, true).await;
    report("power-cut-negative-control", &broken);
    assert!(
        broken.lost > 0,
        "acknowledging before the fsync lost nothing in {} power cuts: the test has no teeth",
        broken.rounds
    );
}

/// Compares the monitors' ledger (plus `also_sent`: payload hashes of other
/// messages the test published) with the store, prints the `fault=` line
/// and returns (acknowledged, lost).
fn judge_store(
    name: &str,
    sent: &[vigil_sim::ledger::Sent],
    also_sent: &[String],
    store: &Path,
) -> (usize, usize) {
    let present = stored(store);
    let acked: HashSet<&str> = sent
        .iter()
        .filter(|s| s.acked)
        .map(|s| s.sha256.as_str())
        .chain(also_sent.iter().map(String::as_str))
        .collect();
    let all: HashSet<&str> = sent
        .iter()
        .map(|s| s.sha256.as_str())
        .chain(also_sent.iter().map(String::as_str))
        .collect();
    let lost = acked.iter().filter(|a| !present.contains_key(**a)).count();
    show(&format!(
        "fault={name} lost={lost} recovered={} unexpected={} duplicated={}",
        present
            .keys()
            .filter(|k| !acked.contains(k.as_str()))
            .count(),
        present.keys().filter(|k| !all.contains(k.as_str())).count(),
        present.values().map(|n| n - 1).sum::<u64>()
    ));
    (acked.len() - also_sent.len(), lost)
}

/// `vigil run` under strace with one fault injected into fdatasync.
async fn start_vigil_with_fdatasync(
    work: &Path,
    store: &Path,
    gate: SocketAddr,
    inject: &str,
) -> Vigil {
    let inject = format!("inject=fdatasync:{inject}");
    let args = [
        "strace",
        "-f",
        "-q",
        "-o",
        "/dev/null",
        "-e",
        "trace=fdatasync",
        "-e",
        inject.as_str(),
    ];
    start_vigil_with(work, store, gate, false, &args).await.0
}

/// How many acknowledged messages an fsync failure may not lose: all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_failure_is_fatal_and_loses_nothing_acknowledged() {
    let _one = ONE_AT_A_TIME.lock().await;
    if !have("strace", "-V") {
        show("SKIP fsync-failure test: needs strace (apt-get install strace)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let gate = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // The 60th fdatasync fails: well into the traffic (opening the store
    // uses fsync, not fdatasync).
    let mut vigil =
        start_vigil_with_fdatasync(work.path(), &store, gate, "error=EIO:when=60").await;
    let (stop, devices) = monitors(gate, "bed", 10, 20.0, Duration::from_secs(2));
    // Vigil must stop by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = vigil.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "vigil kept running after its fsync failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.cancel();
    let sent = devices.await.unwrap();
    drop(vigil);
    assert!(
        !status.success(),
        "a fatal store error must exit non-zero: {status:?}"
    );
    let log = std::fs::read_to_string(work.path().join("vigil.log")).unwrap();
    let fatal: Vec<&str> = log.lines().filter(|l| l.contains("FATAL")).collect();
    assert_eq!(
        fatal.len(),
        1,
        "one FATAL line, not {}:\n{log}",
        fatal.len()
    );
    assert!(fatal[0].contains("could not persist"), "{}", fatal[0]);

    let (acked, lost) = judge_store("fsync-eio", &sent, &[], &store);
    show(&format!(
        "  {} sent, {acked} acknowledged before the failure, vigil exited with {status}",
        sent.len()
    ));
    assert!(acked > 20, "the failure came too early to mean much");
    assert_eq!(
        lost, 0,
        "acknowledged messages missing after the fsync failure"
    );
    // And the store opens again: a restart recovers.
    let (vigil, took) = start_vigil(work.path(), &store, gate, false).await;
    println!("  restart after the failure: {took:?}");
    drop(vigil);
}

/// Publishes `n` QoS 1 messages one at a time and returns each PUBACK's
/// latency.
async fn puback_latencies(gate: SocketAddr, n: usize) -> Vec<Duration> {
    use rumqttc::{Event, Packet, QoS};
    let mut o = rumqttc::MqttOptions::new("latency-probe", gate.ip().to_string(), gate.port());
    o.set_inflight(1);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sent = Instant::now();
        client
            .publish(
                "devices/latency-probe/vitals/hr",
                QoS::AtLeastOnce,
                false,
                format!("{{\"probe\":{i}}}"),
            )
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no PUBACK: {other:?}"),
            }
        }
        out.push(sent.elapsed());
    }
    out
}

/// The process whose parent is `parent` (Vigil under strace).
fn child_pid(parent: u32) -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &parent.to_string()])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether `pid` has exited: gone, or a zombie (whose files are closed).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // `pid (comm) state ...`; comm may hold spaces and parentheses.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// A slow disk: every fdatasync takes 20 ms longer (strace delay
/// injection). Device PUBACKs wait for it, group commit keeps the devices
/// going, memory stays bounded, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_delays_acknowledgements_and_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    if !have("strace", "-V") || !have("pgrep", "-V") {
        show("SKIP slow-disk test: needs strace and pgrep");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let gate = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let vigil = start_vigil_with_fdatasync(work.path(), &store, gate, "delay_enter=20000").await;
    let (stop, devices) = monitors(gate, "slow", 10, 20.0, Duration::from_secs(10));
    let mut latencies = puback_latencies(gate, 100).await;
    stop.cancel();
    let sent = devices.await.unwrap();
    let traced = child_pid(vigil.0.id()).expect("vigil under strace");
    let peak_kib = proc_status_kib(traced, "VmHWM:").unwrap_or(0);
    // Dropping the guard kills Vigil (strace's child) first, then strace;
    // nobody here reaps Vigil, so wait until it is gone (or a zombie: its
    // files, and the store's lock, are released) before reading the store.
    drop(vigil);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exited(traced) {
        assert!(Instant::now() < deadline, "vigil {traced} outlived SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort_unstable();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let probes: Vec<String> = (0..100)
        .map(|i| {
            use sha2::Digest as _;
            vigil::event::hex(&sha2::Sha256::digest(format!("{{\"probe\":{i}}}")))
        })
        .collect();
    let (acked, lost) = judge_store("slow-disk", &sent, &probes, &store);
    show(&format!(
        "  fdatasync +20 ms: probe PUBACK latency p50 {p50:.1?}, p99 {p99:.1?}; {acked} of {} monitor messages acknowledged; vigil peak RSS {peak_kib} KiB",
        sent.len(),
    ));
    assert_eq!(lost, 0);
    assert!(
        p50 >= Duration::from_millis(20),
        "every PUBACK waits for the (slow) fdatasync: p50 {p50:?}"
    );
    assert!(acked > 100, "group commit keeps devices going");
    assert!(peak_kib < 128 * 1024, "memory bounded: {peak_kib} KiB");
}

/// Disk full, as the delivery contract says (fault-testing S5): the data
/// directory on a 192 MiB tmpfs with the default 128 MiB reserve
/// (`store.min_free_bytes`; it must cover fjall's journal, which is rotated
/// only past 64 MB, and its memtable flushes),
/// the cloud unreachable, monitors publishing. When the reserve is reached
/// Vigil refuses new messages (MQTT 5 PUBACK 0x97, MQTT 3.1.1 no PUBACK and a
/// disconnect: the devices keep them), counts the refusals, and stays up; when
/// the cloud comes back it drains, reclaims the space, and accepts again.
/// Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_refuses_new_messages_and_accepts_again_after_the_drain() {
    use vigil_sim::proxy::{Mode, Proxy};
    let _one = ONE_AT_A_TIME.lock().await;
    if !is_root() {
        show("SKIP disk-full test: needs root to mount a tmpfs");
        return;
    }
    let (mut rig, listeners) = Rig::new().await;
    let tmpfs = Tmpfs::mount(&rig.work.join("mnt"), "vigil-disk-full", 192);
    let mnt = tmpfs.0.clone();
    let free_mib = || tmpfs.free_mib();
    rig.store = mnt.join("store");
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), listeners.v5)
        .await
        .unwrap();
    proxy.set(Mode::Refuse);
    let config = rig.config(proxy.addr().port(), "");
    let mut vigil = rig.start(&config, &[]).await;
    let (stop, devices) = monitors(rig.gate, "full", 10, 300.0, Duration::from_secs(5));

    // Fill until the reserve is reached.
    let deadline = Instant::now() + Duration::from_secs(120);
    let full = loop {
        assert!(
            vigil.0.try_wait().unwrap().is_none(),
            "vigil exited while filling the disk:\n{}",
            rig.log()
        );
        if let Some(s) = rig.status().await
            && s.counter("refused_disk_low") > 0
        {
            break s;
        }
        assert!(Instant::now() < deadline, "the disk never filled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let queued_at_full: u64 = full.backlog.iter().map(|l| l.messages).sum();
    let free_at_full = free_mib();
    // Refusing, and up, for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refusing = rig.status().await.expect("status while the disk is full");
    assert!(vigil.0.try_wait().unwrap().is_none(), "{}", rig.log());
    let ingested_then = refusing.counter("ingested");
    assert!(
        ingested_then <= full.counter("ingested") + 50,
        "nothing (or a batch in flight) accepted while full: {} then {ingested_then}",
        full.counter("ingested")
    );
    let refused = refusing.counter("refused_disk_low");
    assert!(refused > full.counter("refused_disk_low"), "{refusing}");

    // The cloud comes back: drain, reclaim, accept again.
    proxy.set(Mode::Pass);
    let healed = Instant::now();
    let accepting_again = loop {
        if let Some(s) = rig.status().await
            && s.counter("ingested") > ingested_then + 100
        {
            break healed.elapsed();
        }
        assert!(
            healed.elapsed() < Duration::from_secs(120),
            "never accepted again after the cloud came back: {:?}\n{}\n{}",
            rig.status().await,
            rig.log(),
            String::from_utf8_lossy(
                &Command::new("du")
                    .args(["-a", "-B1"])
                    .arg(&rig.store)
                    .output()
                    .unwrap()
                    .stdout
            )
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.cancel();
    let sent = devices.await.unwrap();
    let report = rig.judge(&sent, Duration::from_secs(60)).await;
    // The reclaim counts itself once it has compacted every lane, which can
    // be after its first deletions already let the devices in again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let end = loop {
        let end = rig.status().await.expect("status after the drain");
        if end.counter("reclaims") >= 1 || Instant::now() > deadline {
            break end;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(vigil.0.try_wait().unwrap().is_none(), "{}", rig.log());
    show(&report.fault_line("disk-full"));
    show(&format!(
        "  192 MiB tmpfs, 128 MiB reserve: refusing from {queued_at_full} queued ({free_at_full:.1} MiB \
         free); {refused} refusals in the next 3 s ({} device messages never acknowledged); \
         accepting again {accepting_again:.1?} after the cloud came back; {} reclaims; \
         {:.1} MiB free at the end",
        sent.iter().filter(|s| !s.acked).count(),
        end.counter("reclaims"),
        free_mib()
    ));
    assert!(report.passed(), "{report}\n{end}");
    assert!(end.counter("reclaims") >= 1, "{end}");
    assert!(
        rig.log().lines().all(|l| !l.contains("FATAL")),
        "{}",
        rig.log()
    );
    drop(vigil);
}

/// The space fjall's journal holds comes back after a drain, even though
/// nothing is written after it. fjall rotates (and can then delete) its
/// journal only when a flush finds it past 64 MB; a drain that ends with it
/// at, say, 40 MB used to leave those 40 MB on disk for good, and on a small
/// disk below the reserve the store, empty, refused every new message
/// (this test's e2e sibling above failed that way now and then). Likewise
/// the table files a compaction replaced: fjall deletes them only at a later
/// memtable flush, so they stayed too. The store
/// alone on a 192 MiB tmpfs with a 100 MiB reserve (so the disk counts as low
/// throughout): 40 MB of records appended and all acknowledged; the free
/// space must come back to within 16 MiB of the whole disk, and the store
/// must take, keep and reopen with new records afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_the_journal_is_rotated_and_its_space_comes_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    if !is_root() {
        show("SKIP journal-rotation test: needs root to mount a tmpfs");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&work.path().join("mnt"), "vigil-journal", 192);
    let mnt = tmpfs.0.clone();
    let free_mib = || tmpfs.free_mib();
    let total_mib = {
        let st = rustix::fs::statvfs(&mnt).unwrap();
        (st.f_blocks * st.f_frsize) as f64 / f64::from(1u32 << 20)
    };
    let key = vigil::crypto::MasterKey::from_bytes([0x42; 32]);
    let mut options = vigil::store::StoreOptions::new(mnt.join("store"));
    options.min_free_bytes = 100 << 20;
    let ingest = |n: u32| vigil::event::Ingest {
        kind: vigil::event::Kind::Measurement,
        priority: 1,
        device: "bed-1".into(),
        topic: "devices/bed-1/waveforms/ecg".into(),
        qos: vigil::event::Qos::AtLeastOnce,
        retain: false,
        received_at: vigil::event::Timestamp::now(),
        content_type: None,
        user_properties: vec![],
        payload: bytes::Bytes::from(format!("{n:08}").repeat(500)),
    };
    let store = vigil::store::Store::open(options.clone(), &key).unwrap();
    let records = 10_000u32;
    for chunk in 0..records / 500 {
        let mut pending = Vec::new();
        for n in chunk * 500..(chunk + 1) * 500 {
            pending.push(store.submit(ingest(n)).await.unwrap());
        }
        for p in pending {
            p.committed().await.unwrap();
        }
    }
    let free_full = free_mib();
    let journal_mib = || {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::read_dir(mnt.join("store/db"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jnl"))
            .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
            .sum::<u64>() as f64
            / f64::from(1u32 << 20)
    };
    let journal_full = journal_mib();
    let mut after = None;
    loop {
        let page = store.read(1, after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        let seqs = page.iter().map(|e| e.seq).collect();
        assert_eq!(store.ack(1, seqs).await.unwrap().deleted, page.len() as u64);
    }
    assert_eq!(store.stats().queued(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while free_mib() < total_mib - 16.0 {
        assert!(
            Instant::now() < deadline,
            "the space did not come back after the drain: {:.1} of {total_mib:.1} MiB free \
             ({free_full:.1} MiB when full, {} reclaims)\n{}",
            free_mib(),
            store
                .metrics()
                .reclaims
                .load(std::sync::atomic::Ordering::Relaxed),
            String::from_utf8_lossy(
                &Command::new("du")
                    .args(["-a", "-B1"])
                    .arg(mnt.join("store"))
                    .output()
                    .unwrap()
                    .stdout
            )
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let free_drained = free_mib();
    let journal_drained = journal_mib();
    assert!(
        journal_full > 30.0,
        "the fill did not reach the journal: {journal_full:.1} MiB"
    );
    assert!(
        journal_drained < 8.0,
        "{journal_drained:.1} MiB of journal left"
    );
    // The store goes on: it takes new records and keeps them across a reopen.
    for n in 0..100 {
        store.append(ingest(records + n)).await.unwrap();
    }
    store.close().await.unwrap();
    drop(store);
    let store = vigil::store::Store::open(options, &key).unwrap();
    assert_eq!(store.stats().queued(), 100);
    let back = store.read(1, None, 1000).await.unwrap();
    assert_eq!(back.len(), 100);
    store.close().await.unwrap();
    show(&format!(
        "  journal rotation: {records} records of 4 KB appended and acknowledged on a \
         {total_mib:.0} MiB tmpfs: {free_full:.1} MiB free when full ({journal_full:.1} MiB of \
         journal), {free_drained:.1} MiB after the drain ({journal_drained:.1} MiB of journal)"
    ));
}

/// A tmpfs of a given size mounted for one test; unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, name: &str, mib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                name,
                dir.to_str().unwrap(),
            ],
        );
        Self(dir.to_path_buf())
    }

    /// Space available on it, in MiB.
    fn free_mib(&self) -> f64 {
        let st = rustix::fs::statvfs(&self.0).unwrap();
        (st.f_bavail * st.f_frsize) as f64 / f64::from(1u32 << 20)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// RssAnon of `pid` in KiB: the heap, not the mapped binary.
fn anon_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "RssAnon:")
}

/// A `kB` field of /proc/<pid>/status (`field` with its colon).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A long outage compressed in time, Vigil in a memory cgroup: the backlog
/// grows on disk, not in memory. Anonymous RSS is sampled as the backlog
/// grows and must stay flat; Vigil must not be OOM-killed; nothing
/// acknowledged is lost. The cgroup allows 192 MiB because cgroup v1 also
/// charges the mapped pages of this debug build's 250 MB binary (~50 MB
/// resident): at 64 MiB a fresh clone's run was OOM-killed with the heap far
/// below that. The 64 MiB target for a release build is issue 8's benchmark.
/// 90,000 readings is about an hour of a ten-bed ward at the monitors' normal
/// rate, compressed into ~45 s. This test once found Vigil's RSS jumping by
/// ~190 MB: a rumqttd panic (rumqtt#1062) symbolizing its backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_in_a_memory_cgroup_keeps_memory_flat() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(memory) = cgroup_v1_memory() else {
        show("SKIP cgroup outage test: needs root and a cgroup v1 memory hierarchy");
        return;
    };
    let cg = memory.join(format!("vigil-test-{}", std::process::id()));
    std::fs::create_dir_all(&cg).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(cg.clone());
    std::fs::write(cg.join("memory.limit_in_bytes"), (192u64 << 20).to_string()).unwrap();
    // Into the cgroup, and with /status on (environment overrides the file).
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let enter = format!(
        "echo $$ > {}/cgroup.procs && VIGIL__HTTP__ENABLED=true VIGIL__HTTP__LISTEN={http} \
         exec \"$0\" \"$@\"",
        cg.display()
    );
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let gate = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (mut vigil, _) =
        start_vigil_with(work.path(), &store, gate, false, &["sh", "-c", &enter]).await;
    let pid = vigil.0.id();
    let (stop, devices) = monitors(gate, "ward", 10, 200.0, Duration::from_secs(5));
    // RSS when the backlog passes each milestone (the memtables fill first,
    // then memory must stay where it is while the backlog keeps growing).
    let milestones = [10_000u64, 30_000, 50_000, 70_000, 90_000];
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while samples.len() < milestones.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(status) = vigil::operator::fetch_status(http, Duration::from_secs(2)).await else {
            continue;
        };
        let queued: u64 = status.backlog.iter().map(|l| l.messages).sum();
        if queued >= milestones[samples.len()] {
            samples.push((queued, anon_rss_kib(pid).unwrap_or(0)));
        }
    }
    stop.cancel();
    let sent = devices.await.unwrap();
    let alive = vigil.0.try_wait().unwrap().is_none();
    let peak = std::fs::read_to_string(cg.join("memory.max_usage_in_bytes"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    drop(vigil);
    let (acked, lost) = judge_store("outage-memory-cgroup", &sent, &[], &store);
    show(&format!(
        "  {acked} acknowledged; vigil anonymous RSS as the backlog grew, (queued, KiB): {samples:?}; cgroup peak (incl. page cache and the mapped binary) {} MiB of 192",
        peak >> 20
    ));
    assert!(alive, "vigil was killed (OOM?) in its memory cgroup");
    assert_eq!(lost, 0);
    assert_eq!(
        samples.len(),
        milestones.len(),
        "the backlog never reached 90,000"
    );
    // From 50,000 to 90,000 queued (+80 %), the heap stays within 4 MiB.
    let at_50k = samples[2].1;
    let at_90k = samples[4].1;
    assert!(
        at_90k <= at_50k + 4 * 1024,
        "RSS grew with the backlog: {samples:?}"
    );
}

/// The cgroup v1 memory hierarchy, when this process may use it.
fn cgroup_v1_memory() -> Option<PathBuf> {
    if !is_root() {
        return None;
    }
    let out = Command::new("findmnt")
        .args(["-n", "-o", "TARGET", "-t", "cgroup", "-O", "memory"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    path.join("memory.limit_in_bytes").exists().then_some(path)
}

/// Corruption through the binary: a store with 2,000 queued readings whose
/// largest table file gets one flipped bit (below the record layer: fjall's
/// block checksum fails, so the keys in that block cannot even be listed),
/// then `vigil run` on it with the cloud up. Vigil stays up, quarantines and
/// counts the records it cannot read, delivers every other one, and nothing
/// that reaches the cloud is corrupted (the verifying subscriber checks each
/// payload against the envelope's SHA-256 and against what was stored). The
/// damaged table is taken out of its lane (counted on `/status`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_is_quarantined_and_counted_and_the_rest_delivered() {
    damaged_store_delivers_all_but_what_it_counts(Damage::Table).await;
}

/// The same with the records still in fjall's journal (not yet flushed to a
/// table) and one bit flipped at each of five places in it. fjall alone
/// would refuse to open on some of these flips and, on others, silently
/// drop every batch after the flip (store/journal.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_costs_only_the_damaged_batches_counted_and_the_rest_delivered() {
    damaged_store_delivers_all_but_what_it_counts(Damage::Journal).await;
}

/// One bit flipped in the index block of the lane's table: fjall could not
/// open the store at all before; now it sets the table aside, Vigil salvages
/// every record from its data blocks at start-up (store/set_aside.rs), and
/// all 2,000 reach the cloud, none quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_a_damaged_index_is_salvaged_at_start_and_everything_delivered() {
    damaged_store_delivers_all_but_what_it_counts(Damage::TableIndex).await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Damage {
    /// One bit in the largest table file.
    Table,
    /// One bit in the index block of the lane's table.
    TableIndex,
    /// One bit at each of five places in the journal.
    Journal,
}

async fn damaged_store_delivers_all_but_what_it_counts(damage: Damage) {
    use sha2::Digest as _;
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut rig, listeners) = Rig::new().await;
    rig.store = rig.work.join("store");
    let key = vigil::crypto::MasterKey::from_bytes([0x42; 32]);
    let mut stored_sha = HashSet::new();
    {
        let store =
            vigil::store::Store::open(vigil::store::StoreOptions::new(&rig.store), &key).unwrap();
        for n in 0..2000u32 {
            let payload = format!(
                "{{\"hr\":{},\"n\":{n},\"pad\":\"{}\"}}",
                60 + n % 40,
                "x".repeat(150)
            );
            stored_sha.insert(hex(&sha2::Sha256::digest(payload.as_bytes())));
            store
                .append(vigil::event::Ingest {
                    kind: vigil::event::Kind::Measurement,
                    priority: 1,
                    device: "bed-1".into(),
                    topic: "devices/bed-1/vitals/hr".into(),
                    qos: vigil::event::Qos::AtLeastOnce,
                    retain: false,
                    received_at: vigil::event::Timestamp::now(),
                    content_type: None,
                    user_properties: vec![],
                    payload: bytes::Bytes::from(payload),
                })
                .await
                .unwrap();
        }
        store.close().await.unwrap();
    }
    if damage != Damage::Journal {
        let db = fjall::Database::builder(rig.store.join("db"))
            .open()
            .unwrap();
        let lane = db
            .keyspace("priority-1", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        lane.rotate_memtable_and_wait().unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let (what, most) = match damage {
        Damage::Table => {
            let len = common::flip_bit_in_largest_table(&rig.store, 0.5);
            (format!("one flipped bit in a {len}-byte table"), 100)
        }
        Damage::TableIndex => {
            let (path, _) = common::tables_of(&rig.store, "priority-1")[0].clone();
            let at =
                common::flip_bit_in_part(&rig.store, "priority-1", &path, common::TablePart::Index);
            (
                format!("one flipped bit in a table's index block, at byte {at}"),
                0,
            )
        }
        Damage::Journal => {
            let (journal, end) = common::journals(&rig.store).remove(0);
            let mut bytes = std::fs::read(&journal).unwrap();
            for at in [0.2, 0.4, 0.5, 0.6, 0.8] {
                bytes[(end as f64 * at) as usize] ^= 0x10;
            }
            std::fs::write(&journal, bytes).unwrap();
            (format!("five flipped bits in the {end}-byte journal"), 5)
        }
    };

    let config = rig.config(listeners.v5.port(), "");
    let mut vigil = rig.start(&config, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = rig.status().await
            && s.backlog.iter().all(|l| l.messages == 0)
            && (damage != Damage::Table || s.counter("quarantined") > 0)
        {
            break s;
        }
        assert!(
            Instant::now() < deadline && vigil.0.try_wait().unwrap().is_none(),
            "never drained: {:?}\n{}",
            rig.status().await,
            rig.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every record is now acknowledged by the cloud or quarantined (both
    // leave the lane in the commit that counts them), but the cloud may
    // acknowledge the last ones before its subscriber has them: wait for it.
    let quarantined = status.counter("quarantined");
    common::cloud::eventually(
        Duration::from_secs(30),
        "every record not quarantined at the subscriber",
        || {
            let arrived = rig.subscriber.arrived();
            let delivered: HashSet<&str> = arrived
                .iter()
                .map(|a| a.sha256.as_str())
                .filter(|s| stored_sha.contains(*s))
                .collect();
            delivered.len() as u64 + quarantined >= 2000
        },
    )
    .await;
    let arrived = rig.subscriber.arrived();
    let unique: HashSet<&str> = arrived.iter().map(|a| a.sha256.as_str()).collect();
    let unverified = arrived.iter().filter(|a| !a.verified).count();
    let unexpected = unique.iter().filter(|s| !stored_sha.contains(**s)).count();
    let missing = 2000 - unique.len() as u64;
    let name = match damage {
        Damage::Table => "corruption",
        Damage::TableIndex => "corruption-index",
        Damage::Journal => "corruption-journal",
    };
    show(&format!(
        "fault={name} lost={} recovered=0 unexpected={unexpected} duplicated={}",
        missing.saturating_sub(quarantined),
        arrived.len() - unique.len()
    ));
    show(&format!(
        "  {what}: {quarantined} records quarantined, {} of 2000 delivered, {unverified} failed verification",
        unique.len()
    ));
    assert!(vigil.0.try_wait().unwrap().is_none(), "vigil stays up");
    assert_eq!(unverified, 0, "nothing corrupted reaches the cloud");
    assert_eq!(unexpected, 0);
    assert!(quarantined <= most, "{quarantined}");
    if damage == Damage::Table {
        assert!(quarantined > 0, "the flip reached a record");
        // And the damaged table itself was taken out of the lane, so fjall's
        // compactions can go on (store/salvage.rs).
        assert_eq!(status.counter("damaged_tables_removed"), 1, "{}", rig.log());
    }
    if damage == Damage::TableIndex {
        // Set aside by fjall and salvaged whole at start-up.
        assert_eq!(status.counter("damaged_tables_removed"), 1, "{}", rig.log());
        assert!(
            rig.log()
                .contains("was set aside; every entry it held was read and written back"),
            "{}",
            rig.log()
        );
    }
    assert_eq!(
        missing, quarantined,
        "exactly the quarantined ones are missing"
    );
    drop(vigil);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
