//! `vigil run` as a process: devices publish through it to a real mTLS cloud;
//! SIGTERM in the middle of the traffic stops it cleanly (exit 0), and after
//! a restart every message it acknowledged reaches the cloud.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cloud::{self as c, Arrivals, Cloud, Subscriber};
use rumqttc::{Event, Packet, QoS};

#[test]
#[ignore = "run by the test below as its cloud broker process"]
fn child_cloud() {
    if let Ok(dir) = std::env::var(c::CLOUD_CHILD_ENV) {
        c::serve_cloud(std::path::Path::new(&dir));
    }
}

use common::process::{KEY_B64, VigilChild, free_port};

fn start_vigil(config: &std::path::Path) -> VigilChild {
    VigilChild(
        Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["run", "--config"])
            .arg(config)
            .env("VIGIL_STORAGE_KEY", KEY_B64)
            .env("VIGIL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Publishes `payload-<i>` for i in `from..`, one at a time, until `stop`
/// or the connection fails; returns the i whose PUBACK arrived.
async fn publish_until_gone(port: u16, from: usize, limit: usize) -> Vec<usize> {
    let mut o = rumqttc::MqttOptions::new(format!("bed-{from}"), "127.0.0.1", port);
    o.set_inflight(1);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    let mut acked = Vec::new();
    let mut next = from;
    let mut waiting = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < from + limit && Instant::now() < deadline {
        if !waiting {
            client
                .publish(
                    format!("devices/bed-{from}/vitals/hr"),
                    QoS::AtLeastOnce,
                    false,
                    format!("{{\"n\":{next}}}"),
                )
                .await
                .unwrap();
            waiting = true;
        }
        match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked.push(next);
                next += 1;
                waiting = false;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    acked
}

/// `GET path` over HTTP/1.0: (status code, body).
async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// /health, /status and /metrics of a running Vigil with traffic flowing.
async fn check_operator_endpoints(port: u16) {
    let (code, body) = http_get(port, "/health").await;
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["forwarder_alive"], true);

    // The cloud has 100 messages, but the counters can trail it: "ingested"
    // is published just after the commit that already woke the forwarder,
    // and "acknowledged" once the cloud's PUBACK is processed and the
    // deletion committed (a broker passes a message on before or after its
    // PUBACK, in either order). Wait for both, then check them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, body) = loop {
        let (code, body) = http_get(port, "/status").await;
        let caught_up = serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|s| {
            s["counters"]["ingested"].as_u64() >= Some(100)
                && s["counters"]["acknowledged"].as_u64() > Some(0)
        });
        if caught_up || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["backlog"].as_array().unwrap().len(), 4, "{body}");
    assert!(
        status["counters"]["ingested"].as_u64().unwrap() >= 100,
        "{body}"
    );
    assert!(
        status["counters"]["acknowledged"].as_u64().unwrap() > 0,
        "{body}"
    );

    let (code, body) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    // Prometheus text: comments, or `name{labels} value` with a number.
    let mut names = std::collections::HashSet::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line}"
        );
        names.insert(name.to_string());
    }
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    // Every metric of the README's table, read from the README itself so
    // the table and the binary cannot drift apart.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let documented: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `vigil_"))
        .filter_map(|l| l.split(['`', '{']).next())
        .collect();
    assert!(documented.len() >= 20, "the README's metrics table");
    for name in documented {
        let name = format!("vigil_{name}");
        assert!(
            names
                .iter()
                .any(|n| *n == name || n.strip_prefix(&name).is_some_and(|r| r.starts_with('_'))),
            "{name} (README) missing from:\n{body}"
        );
    }
    let sample = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
    };
    assert!(sample("vigil_commit_seconds_count ") > 0.0, "{body}");
    let ingested: f64 = (0..4)
        .map(|p| {
            sample(&format!(
                "vigil_ingested_by_priority_total{{priority=\"{p}\"}} "
            ))
        })
        .sum();
    assert!(ingested > 0.0, "{body}");
    assert!(
        body.contains("vigil_link_state{state=\"online\"} 1")
            || body.contains("vigil_link_state{state=\"syncing\"} 1"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_traffic_stops_cleanly_and_loses_nothing_acknowledged() {
    let pki = c::cloud_pki();
    let cloud = Cloud::start(&c::cloud_dir(&pki, "cloud"));
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let _sub = Subscriber::start(&pki, cloud.v4, arrivals.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let http_port = free_port();
    let config = dir.path().join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ndir = \"{store}\"\n\n[gate]\ntcp_listen = \"127.0.0.1:{port}\"\n\n\
             [forward]\nhost = \"127.0.0.1\"\nport = {cloud_port}\nbackoff_max = \"500ms\"\n\n\
             [forward.tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\n\
             [run]\nshutdown_timeout = \"10s\"\n",
            store = dir.path().join("store").display(),
            cloud_port = cloud.v5.port(),
            http = http_port,
            ca = pki.path("ca.pem").display(),
            cert = pki.path("vigil.pem").display(),
            key = pki.path("vigil.key").display(),
        ),
    )
    .unwrap();

    let mut vigil = start_vigil(&config);
    let wait_listening = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < wait_listening, "vigil did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Traffic, and SIGTERM once 100 messages are acknowledged.
    let traffic = tokio::spawn(publish_until_gone(port, 0, 100_000));
    c::eventually(Duration::from_secs(30), "traffic to flow", || {
        arrivals.lock().unwrap().unique() >= 100
    })
    .await;
    check_operator_endpoints(http_port).await;
    let pid = vigil.id();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || vigil.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "vigil exited with {exit:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let acked = traffic.await.unwrap();
    assert!(acked.len() >= 100, "{} acknowledged", acked.len());
    let before_restart = arrivals.lock().unwrap().unique();
    eprintln!(
        "{} acknowledged by vigil before SIGTERM, {before_restart} at the cloud at exit",
        acked.len()
    );

    // Restart: whatever was acknowledged and not yet forwarded goes now.
    let mut vigil = start_vigil(&config);
    let wait_listening = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < wait_listening, "vigil did not restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want: HashSet<usize> = acked.iter().copied().collect();
    let arrived = || -> HashSet<usize> {
        arrivals
            .lock()
            .unwrap()
            .all
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
            .filter_map(|v| v["n"].as_u64())
            .map(|n| n as usize)
            .collect()
    };
    c::eventually(
        Duration::from_secs(30),
        "every acknowledged message",
        || want.is_subset(&arrived()),
    )
    .await;
    assert!(arrivals.lock().unwrap().bad.is_empty());
    let _ = Command::new("kill")
        .args(["-TERM", &vigil.id().to_string()])
        .status();
    let exit = tokio::task::spawn_blocking(move || vigil.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success());
}

/// Fault catalogue B5: the sockets a running `vigil run` listens on, read
/// from /proc (no tools needed): the configured device listener and
/// operator endpoint, and the embedded broker's listeners, which must be on
/// loopback. Nothing on a wildcard address that was not configured, no
/// rumqttd console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vigil_listens_only_where_configured_and_its_broker_only_on_loopback() {
    let (rig, listeners) = common::rig::Rig::new().await;
    let config = rig.config(listeners.v5.port(), "");
    let vigil = rig.start(&config, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.status().await.is_none() {
        assert!(Instant::now() < deadline, "no /status: {}", rig.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = vigil.0.id();
    let listening = listening_sockets(pid);
    assert!(
        !listening.is_empty(),
        "no listening sockets found for {pid}"
    );
    let mut broker = 0;
    for addr in &listening {
        if *addr == rig.gate || *addr == rig.http {
            continue;
        }
        assert!(
            addr.ip().is_loopback(),
            "vigil listens on {addr}, which is neither configured nor loopback: {listening:?}"
        );
        broker += 1;
    }
    assert_eq!(
        broker, 2,
        "the embedded broker's two loopback listeners (MQTT 3.1.1 and 5): {listening:?}"
    );
    assert!(
        listening.contains(&rig.gate) && listening.contains(&rig.http),
        "{listening:?} gate {} http {}",
        rig.gate,
        rig.http
    );
    drop(vigil);
}

/// TCP sockets in LISTEN state owned by `pid`, from /proc.
fn listening_sockets(pid: u32) -> Vec<std::net::SocketAddr> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        if let Ok(target) = std::fs::read_link(fd.unwrap().path()) {
            let t = target.display().to_string();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            let (ip, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            let ip: std::net::IpAddr = if v6 {
                let b: Vec<u8> = (0..16)
                    .map(|i| u8::from_str_radix(&ip[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                let mut a = [0u8; 16];
                for w in 0..4 {
                    for j in 0..4 {
                        a[w * 4 + j] = b[w * 4 + 3 - j];
                    }
                }
                std::net::Ipv6Addr::from(a).into()
            } else {
                let n = u32::from_str_radix(ip, 16).unwrap();
                std::net::Ipv4Addr::from(n.swap_bytes()).into()
            };
            out.push(std::net::SocketAddr::new(ip, port));
        }
    }
    out
}
