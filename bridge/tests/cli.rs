//! The `vigil` command as a user runs it: `vigil demo` end to end, `vigil
//! certs dev`, and `vigil status` against nothing listening.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vigil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
}

/// The README's first command: a loopback cloud, Vigil and monitors through a
/// cut link, judged by the oracle. It must finish within a minute and report
/// nothing lost.
#[test]
fn demo_completes_within_a_minute_and_loses_nothing() {
    let started = Instant::now();
    let mut child = vigil()
        .arg("demo")
        .env("TMPDIR", std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut out, &mut text).unwrap();
        text
    });
    // A watchdog so a hang fails the test instead of the CI job.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("vigil demo still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    let text = reader.join().unwrap();
    println!("{text}");
    println!("vigil demo took {elapsed:.1?}");
    assert!(status.success(), "vigil demo failed:\n{text}");
    let figure = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{text}"))
    };
    assert_eq!(figure("lost "), 0);
    assert_eq!(figure("unexpected "), 0);
    assert!(figure("acknowledged ") > 500, "{text}");
    assert!(figure("received ") >= figure("acknowledged "), "{text}");
    assert!(text.contains("verdict       PASS"), "{text}");
    // The live progress showed the link going down and coming back.
    assert!(
        text.contains("offline"),
        "no offline progress line:\n{text}"
    );
    assert!(text.contains("online"), "no online progress line:\n{text}");
    assert!(text.contains("drained:"), "{text}");
    assert!(
        elapsed < Duration::from_secs(60),
        "vigil demo took {elapsed:?}, the promise is under a minute"
    );
}

#[test]
fn certs_dev_writes_a_usable_development_pki() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = vigil()
        .args(["certs", "dev", "--out"])
        .arg(&out)
        .args(["--devices", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("forward.tls"), "{stdout}");
    assert!(vigil::pem::load_roots(&out.join("ca.pem"), "ca").is_ok());
    for stem in [
        "cloud", "vigil", "gateway", "device-1", "device-2", "device-3",
    ] {
        let key = out.join(format!("{stem}.key"));
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{stem}.key must be private");
        vigil::pem::load_key(&key, "key").unwrap();
        vigil::pem::load_certs(&out.join(format!("{stem}.pem")), "cert").unwrap();
    }
    // Refuses to overwrite an existing PKI.
    let again = vigil()
        .args(["certs", "dev", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn status_without_a_running_vigil_says_what_to_check() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = vigil()
        .args(["status", "--addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("/status") && err.contains("http.listen"),
        "{err}"
    );
}

/// A taken operator port stops `vigil run` with a message naming the
/// setting and the fix, once, before the embedded broker takes any free
/// port: bound first, the operator's port cannot be one the broker picked
/// (a CI run once saw the broker take it).
#[test]
fn a_taken_operator_port_is_refused_before_the_embedded_broker_starts() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = vigil()
        .arg("run")
        .env(
            "VIGIL_STORAGE_KEY",
            "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=",
        )
        .env("VIGIL__HTTP__LISTEN", addr.to_string())
        .env("VIGIL__STORE__DIR", dir.path().join("store"))
        .env("VIGIL__GATE__TCP_LISTEN", "127.0.0.1:0")
        .env("VIGIL_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    let line = format!("vigil: http.listen {addr}: ");
    assert!(err.contains(&line), "{err}");
    assert!(err.contains("set http.enabled = false"), "{err}");
    assert_eq!(
        err.matches("os error").count(),
        1,
        "the OS error once:\n{err}"
    );
    assert!(
        !err.contains("embedded broker listening"),
        "the embedded broker started before the operator's port was bound:\n{err}"
    );
}

/// The shipped systemd unit is valid (checked by `systemd-analyze verify`
/// where systemd is installed) and starts `vigil run` as the README says.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../broker-config/vigil.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/vigil run --config /etc/vigil/vigil.toml"));
    assert!(unit.contains("KillSignal=SIGTERM"));
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("SKIP systemd unit verification: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vigil.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/vigil", env!("CARGO_BIN_EXE_vigil")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
