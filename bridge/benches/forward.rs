//! Forward benchmark: prints figures, asserts nothing about timing.
//!
//! Against rumqttd with mutual TLS on loopback (MQTT 5, the default window of
//! 64, certificates made with rcgen):
//!
//! 1. drain rate: a backlog of 1,000,000 stored messages (200-byte JSON
//!    payloads over three priorities) forwarded until the store is empty,
//!    i.e. every message acknowledged by the cloud and deleted (messages/s);
//! 2. end-to-end latency at a paced 1,000 messages/s: a device publishes to
//!    the gate (PUBACK after the fsynced commit), the forwarder sends it on,
//!    and a subscriber on the cloud receives it; measured from the device's
//!    `publish()` to the subscriber's receipt (p50/p99/max).
//!
//! ```text
//! cargo bench -p vigil --bench forward
//! ```
//!
//! `VIGIL_BENCH_SCALE` (default 1.0) multiplies the message counts;
//! `VIGIL_BENCH_WINDOW` sets the drain's in-flight window (default: Vigil's, 256 on MQTT 5);
//! `VIGIL_BENCH_DIR` picks where the stores live (default: the temp directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use bytes::Bytes;
use common::cloud as c;
use vigil::event::{Ingest, Kind, Qos, Timestamp};
use vigil::forward::Forwarder;
use vigil::forward::config::Protocol;
use vigil::gate::Gate;

const BACKLOG: usize = 1_000_000;
const PACED_RATE: u64 = 1_000;
const PACED_SECONDS: u64 = 10;

fn scale() -> f64 {
    std::env::var("VIGIL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn bench_dir() -> Result<tempfile::TempDir> {
    Ok(match std::env::var_os("VIGIL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    })
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Client sockets without Nagle's algorithm, so the figures are Vigil's and
/// not a delayed ACK's.
fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

fn ingest(i: usize) -> Ingest {
    let priority = (i % 3) as u8;
    let mut payload = format!("{{\"i\":{i},\"hr\":72,\"pad\":\"");
    while payload.len() < 198 {
        payload.push('x');
    }
    payload.push_str("\"}");
    Ingest {
        kind: Kind::Measurement,
        priority,
        device: format!("bed-{}", i % 20),
        topic: format!("devices/bed-{}/vitals/p{priority}", i % 20),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at: Timestamp::now(),
        content_type: None,
        user_properties: Vec::new(),
        payload: Bytes::from(payload),
    }
}

async fn drain(pki: &common::gate::Pki, cloud: std::net::SocketAddr, n: usize) -> Result<()> {
    let dir = bench_dir()?;
    let store = common::open(&dir.path().join("store"));
    let start = Instant::now();
    let mut pending = VecDeque::new();
    for i in 0..n {
        pending.push_back(store.submit(ingest(i)).await?);
        if pending.len() >= 4096
            && let Some(p) = pending.pop_front()
        {
            p.committed().await?;
        }
    }
    for p in pending {
        p.committed().await?;
    }
    let filled = start.elapsed();
    println!(
        "backlog: {n} messages stored in {:.1} s ({:.0} msg/s), {} MiB on disk",
        filled.as_secs_f64(),
        n as f64 / filled.as_secs_f64(),
        store.disk_bytes()? / (1024 * 1024)
    );
    let mut config = c::forward_config(pki, cloud, Protocol::V5);
    if let Some(w) = std::env::var("VIGIL_BENCH_WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
    {
        config.window = Some(w);
    }
    let window = config.window();
    let start = Instant::now();
    let fwd = Forwarder::start(config, store.clone())?;
    let mut last_report = Instant::now();
    while store.stats().queued() > 0 {
        if fwd.is_finished() {
            bail!("the forwarder stopped");
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!("  ... {} left", store.stats().queued());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    let counters = fwd.counters();
    println!(
        "drain: {n} messages to the cloud (mTLS, MQTT 5, window {window}) in {:.1} s: \
         {:.0} msg/s; {} publishes, {} connection failures",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        counters
            .published
            .load(std::sync::atomic::Ordering::Relaxed),
        counters.failures.load(std::sync::atomic::Ordering::Relaxed),
    );
    fwd.stop().await?;
    store.close().await?;
    Ok(())
}

async fn latency(
    pki: &common::gate::Pki,
    v4: std::net::SocketAddr,
    v5: std::net::SocketAddr,
) -> Result<()> {
    let dir = bench_dir()?;
    let store = common::open(&dir.path().join("store"));
    let gate = Gate::start(common::gate::config(), store.clone()).await?;
    let fwd = Forwarder::start(c::forward_config(pki, v5, Protocol::V5), store.clone())?;

    // The cloud subscriber: records receipt time minus the device's send time.
    let samples: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let tls = c::client_tls(pki, "subscriber");
    let mut o = rumqttc::MqttOptions::new("latency-subscriber", "127.0.0.1", v4.port());
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    o.set_max_packet_size(1 << 20, 1 << 16);
    let (sub, mut sub_el) = rumqttc::AsyncClient::new(o, 100);
    sub_el.set_network_options(nodelay());
    let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
    let sink = samples.clone();
    tokio::spawn(async move {
        while let Ok(ev) = sub_el.poll().await {
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                    let _ = sub.try_subscribe("vigil/#", rumqttc::QoS::AtLeastOnce);
                }
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    ready_tx.send_replace(true);
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let now = now_micros();
                    let sent = vigil_sim::envelope::verify(&p.payload)
                        .ok()
                        .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
                        .and_then(|v| v["t"].as_u64());
                    if let Some(t) = sent {
                        sink.lock()
                            .unwrap()
                            .push(Duration::from_micros(now.saturating_sub(t)));
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r)).await??;

    // The device, paced.
    let addr = gate.tcp_addr().unwrap();
    let mut o = rumqttc::MqttOptions::new("bed-latency", addr.ip().to_string(), addr.port());
    o.set_inflight(64);
    let (dev, mut dev_el) = rumqttc::AsyncClient::new(o, 1024);
    dev_el.set_network_options(nodelay());
    tokio::spawn(async move { while dev_el.poll().await.is_ok() {} });
    let n = ((PACED_RATE * PACED_SECONDS) as f64 * scale()) as u64;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PACED_RATE));
    for i in 0..n {
        tick.tick().await;
        let payload = format!("{{\"t\":{},\"i\":{i}}}", now_micros());
        dev.publish(
            "devices/bed-latency/vitals/hr",
            rumqttc::QoS::AtLeastOnce,
            false,
            payload,
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (samples.lock().unwrap().len() as u64) < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} arrived", samples.lock().unwrap().len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = samples.lock().unwrap().clone();
    s.sort();
    let pct = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)];
    println!(
        "end-to-end latency at {PACED_RATE} msg/s ({n} messages, device publish -> gate \
         (fsync) -> store -> forward (mTLS MQTT 5) -> rumqttd -> subscriber): \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        s[s.len() - 1].as_secs_f64() * 1e3
    );
    fwd.stop().await?;
    gate.shutdown().await;
    store.close().await?;
    Ok(())
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let pki = c::cloud_pki();
        let dir = c::cloud_dir(&pki, "cloud");
        let (v4, v5) = c::start_broker(&dir);
        let n = (BACKLOG as f64 * scale()) as usize;
        drain(&pki, v5, n).await?;
        latency(&pki, v4, v5).await
    })
}
