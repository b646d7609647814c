//! Faults between Vigil and the cloud, against the real `vigil` binary and a
//! loopback mutual-TLS cloud (rumqttd with the simulator's verifying
//! subscriber):
//!
//! - a gateway clock at 1970 (`faketime`): a clear certificate error naming
//!   the clock, buffering continues, and delivery resumes once Vigil runs
//!   with the right time;
//! - a half-open cloud connection (the link stalls after connecting: the
//!   fault proxy's blackhole, and iptables DROP rules when root): detected
//!   within 1.5 keep-alives, and nothing lost;
//! - a flapping link (iptables DROP on and off, when root): nothing lost.
//!
//! Each prints a `fault=` line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::process::show;
use common::rig::Rig;

/// The tests here load the machine's two cores (and share loop devices):
/// one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// libfaketime's multi-threaded preload library (Debian's `faketime`
/// package), used directly so the child is Vigil itself, not a wrapper.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

/// A gateway whose clock says 1970 (a dead RTC): TLS fails with an error
/// that names the clock, Vigil keeps taking readings, and once it runs with
/// the right time everything it took reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_at_1970_is_explained_buffering_continues_and_delivery_resumes() {
    wrong_clock(
        "clock-1970",
        "@1970-01-02 00:00:00",
        None,
        &["clock", "1970"],
    )
    .await;
}

/// A gateway clock two years ahead, with certificates valid for a year (as
/// real ones are): Vigil's own certificate looks expired, the error says so
/// with the date the clock shows, buffering continues, and with the right
/// time everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_two_years_ahead_is_explained_buffering_continues_and_delivery_resumes() {
    wrong_clock(
        "clock-plus-2-years",
        "+730d",
        Some(365),
        &["expired", "clock"],
    )
    .await;
}

/// Runs Vigil under libfaketime's `faketime` setting with certificates valid
/// for `days`, checks the log names each of `explained`, then restarts it
/// with the right time and judges the delivery.
async fn wrong_clock(name: &str, faketime: &str, days: Option<u32>, explained: &[&str]) {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(lib) = libfaketime() else {
        show(&format!(
            "SKIP {name} test: needs libfaketime (apt-get install faketime)"
        ));
        return;
    };
    let lib = lib.display().to_string();
    let (rig, listeners) = Rig::with_certificates_valid_for(days).await;
    let config = rig.config(listeners.v5.port(), "");
    let vigil = rig
        .start(&config, &[("LD_PRELOAD", &lib), ("FAKETIME", faketime)])
        .await;
    let (stop, devices) = rig.devices(name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Three seconds of readings; on a loaded machine the monitors and
    // Vigil's first failed handshake (and its log line) can take longer:
    // wait for them, then check.
    let explains = |log: &str| explained.iter().all(|word| log.contains(word));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = rig.status().await {
            let queued: u64 = status.backlog.iter().map(|l| l.messages).sum();
            if (queued > 50 && explains(&rig.log())) || Instant::now() > deadline {
                break status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no status while the clock is wrong:\n{}",
            rig.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let queued: u64 = status.backlog.iter().map(|l| l.messages).sum();
    assert_ne!(status.link.to_string(), "online", "{status}");
    assert!(queued > 50, "buffering continues: {status}");
    let log = rig.log();
    for word in explained {
        assert!(
            log.contains(word),
            "the certificate error explains the clock ({word:?}):\n{log}"
        );
    }
    stop.cancel();
    let sent = devices.await.unwrap();
    assert!(vigil.stop().success());
    assert!(
        rig.subscriber.arrived().is_empty(),
        "nothing can have reached the cloud over TLS with a wrong clock"
    );

    // The clock is fixed: the same store, delivered.
    let vigil = rig.start(&config, &[]).await;
    let report = rig.judge(&sent, Duration::from_secs(30)).await;
    show(&report.fault_line(name));
    show(&format!(
        "  {} acknowledged while the clock was wrong ({faketime}), {} queued after 3 s or more",
        report.acknowledged, queued
    ));
    assert!(report.passed(), "{report}");
    assert!(report.acknowledged > 50, "{report}");
    drop(vigil);
}

/// A cloud connection that goes half-open while messages flow (every byte
/// now stalls in both directions; here the fault proxy holds them): Vigil
/// notices within 1.5 keep-alives, says so, and after the link heals
/// delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_cloud_connection_is_detected_within_one_and_a_half_keep_alives() {
    half_open("half-open", Cut::Proxy).await;
}

/// The same with the kernel dropping the packets: iptables DROP rules on the
/// cloud's port, inserted after Vigil connected (no FIN, no RST; TCP keeps
/// retransmitting). Needs root and iptables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iptables_drop_after_connect_is_detected_within_one_and_a_half_keep_alives() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let iptables = std::process::Command::new("iptables")
        .args(["-L", "-n"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !iptables {
        show("SKIP iptables half-open test: needs root and iptables (apt-get install iptables)");
        return;
    }
    half_open("half-open-iptables", Cut::Iptables).await;
}

/// Whether iptables can be used here (root, and the command works).
fn iptables_usable() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    root && std::process::Command::new("iptables")
        .args(["-L", "-n"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A flapping link made by the kernel: iptables DROP rules on the cloud's
/// port go on and off while monitors publish, some cuts shorter than the
/// keep-alive (TCP retransmits across them), some longer (Vigil declares the
/// connection dead and reconnects into the next cut). Nothing is lost, and
/// the link really went down. Needs root and iptables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iptables_flapping_link_loses_nothing() {
    if !iptables_usable() {
        show("SKIP iptables flapping test: needs root and iptables (apt-get install iptables)");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let (rig, listeners) = Rig::new().await;
    // A fixed port of our own between Vigil and the cloud (the proxy in pass
    // mode), so the rules cover only Vigil's uplink.
    let proxy = vigil_sim::proxy::Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), listeners.v5)
        .await
        .unwrap();
    let config = rig.config(
        proxy.addr().port(),
        "keep_alive = \"5s\"\nack_timeout = \"15s\"",
    );
    let vigil = rig.start(&config, &[]).await;
    let (stop, devices) = rig.devices("flapping-iptables");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rig.status().await.expect("status");
    // Cuts (seconds) with 2 s of link between them.
    let cuts = [1.0, 9.0, 0.5, 9.0, 2.0, 0.3, 0.3, 0.3];
    let mut down = Duration::ZERO;
    for cut in cuts {
        let Some(mut rules) = DropRules::insert(proxy.addr().port()) else {
            show("SKIP iptables flapping test: iptables refused to insert a rule");
            stop.cancel();
            let _ = devices.await;
            return;
        };
        let cut = Duration::from_secs_f64(cut);
        tokio::time::sleep(cut).await;
        rules.remove();
        down += cut;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.cancel();
    let sent = devices.await.unwrap();
    let report = rig.judge(&sent, Duration::from_secs(60)).await;
    let after = rig.status().await.expect("status");
    let connections = after.counter("cloud_connections") - before.counter("cloud_connections");
    show(&report.fault_line("flapping-iptables"));
    show(&format!(
        "  {} cuts, {down:.1?} down in all, keep-alive 5 s: {connections} new cloud connections",
        cuts.len()
    ));
    assert!(report.passed(), "{report}");
    assert!(
        connections >= 2,
        "the long cuts made Vigil reconnect: {connections}\n{}",
        rig.log()
    );
    drop(vigil);
}

/// How the link is cut.
#[derive(Clone, Copy)]
enum Cut {
    /// The fault proxy's blackhole.
    Proxy,
    /// iptables DROP on the cloud's port, both directions.
    Iptables,
}

/// iptables rules dropping every packet to and from `port` on loopback;
/// removed on drop.
struct DropRules {
    port: u16,
    active: bool,
}

impl DropRules {
    fn rules(port: u16) -> [Vec<String>; 2] {
        let p = port.to_string();
        [
            [
                "INPUT", "-i", "lo", "-p", "tcp", "--dport", &p, "-j", "DROP",
            ]
            .map(String::from)
            .to_vec(),
            [
                "INPUT", "-i", "lo", "-p", "tcp", "--sport", &p, "-j", "DROP",
            ]
            .map(String::from)
            .to_vec(),
        ]
    }

    /// Inserts the rules; `None` (and nothing left behind) when iptables
    /// refuses, e.g. in a container without NET_ADMIN.
    fn insert(port: u16) -> Option<Self> {
        let mut rules = Self { port, active: true };
        for rule in Self::rules(port) {
            let ok = std::process::Command::new("iptables")
                .arg("-I")
                .args(&rule)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                rules.remove();
                return None;
            }
        }
        Some(rules)
    }

    fn remove(&mut self) {
        if std::mem::take(&mut self.active) {
            for rule in Self::rules(self.port) {
                let _ = std::process::Command::new("iptables")
                    .arg("-D")
                    .args(&rule)
                    .status();
            }
        }
    }
}

impl Drop for DropRules {
    fn drop(&mut self) {
        self.remove();
    }
}

async fn half_open(name: &str, cut_with: Cut) {
    let _one = ONE_AT_A_TIME.lock().await;
    use vigil_sim::proxy::{Mode, Proxy};
    let (rig, listeners) = Rig::new().await;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), listeners.v5)
        .await
        .unwrap();
    let keep_alive = Duration::from_secs(5);
    let config = rig.config(
        proxy.addr().port(),
        "keep_alive = \"5s\"\nack_timeout = \"60s\"",
    );
    let vigil = rig.start(&config, &[]).await;
    let (stop, devices) = rig.devices(name);
    // Online with traffic flowing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = rig.status().await;
        if s.as_ref()
            .is_some_and(|s| s.link.to_string() != "offline" && s.counter("acknowledged") > 20)
        {
            break;
        }
        assert!(Instant::now() < deadline, "never online: {}", rig.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The proxy's own listening port carries Vigil's connection, so the
    // iptables rules go on it; the proxy then sees nothing either way.
    let mut rules = None;
    match cut_with {
        Cut::Proxy => proxy.set(Mode::Blackhole),
        Cut::Iptables => match DropRules::insert(proxy.addr().port()) {
            Some(r) => rules = Some(r),
            None => {
                show("SKIP iptables half-open test: iptables refused to insert a rule");
                stop.cancel();
                let _ = devices.await;
                return;
            }
        },
    }
    let cut = Instant::now();
    let detected = loop {
        if rig
            .status()
            .await
            .is_some_and(|s| s.link.to_string() == "offline")
        {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(60),
            "the half-open connection was never detected"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    match cut_with {
        Cut::Proxy => proxy.set(Mode::Pass),
        Cut::Iptables => {
            if let Some(mut r) = rules.take() {
                r.remove();
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let sent = devices.await.unwrap();
    let report = rig.judge(&sent, Duration::from_secs(30)).await;
    show(&report.fault_line(name));
    show(&format!(
        "  detected after {detected:.2?} with keep-alive {keep_alive:?} (limit 1.5 keep-alives = {:?})",
        keep_alive * 3 / 2
    ));
    assert!(report.passed(), "{report}");
    assert!(
        rig.log().contains("half-open"),
        "the log says what happened:\n{}",
        rig.log()
    );
    // 1.5 keep-alives, plus what reading /status every 25 ms can add.
    assert!(
        detected <= keep_alive * 3 / 2 + Duration::from_millis(250),
        "detected after {detected:?}"
    );
    drop(vigil);
}
