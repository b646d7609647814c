//! Gate benchmark: prints figures, asserts nothing about timing.
//!
//! In one run, with 20 devices (rumqttc, MQTT 3.1.1, up to 64 publishes in
//! flight each) publishing 200-byte QoS 1 messages:
//!
//! 1. durable messages per second through the gate (each PUBACK released only
//!    after the store's fsynced commit);
//! 2. the same load straight to the embedded rumqttd's loopback listener
//!    (a bare broker, nothing stored: not durable);
//! 3. the ratio of the two;
//! 4. device PUBACK latency p50/p99/max through the gate at a paced 1,000
//!    messages per second (20 devices x 50/s), measured from `publish()` to the
//!    PUBACK event.
//!
//! ```text
//! cargo bench -p vigil --bench gate
//! ```
//!
//! `VIGIL_BENCH_SCALE` (default 1.0) multiplies the message counts;
//! `VIGIL_BENCH_DIR` picks where the store lives (default: the temp directory).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use vigil::crypto::MasterKey;
use vigil::gate::{Gate, GateConfig};
use vigil::store::{Store, StoreOptions};

const DEVICES: usize = 20;
const PAYLOAD: usize = 200;
const PER_DEVICE: usize = 2_500;
const INFLIGHT: u16 = 64;
const PACED_RATE_PER_DEVICE: u64 = 50;
const PACED_SECONDS: u64 = 10;

fn scale() -> f64 {
    std::env::var("VIGIL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(INFLIGHT);
    o
}

/// Every device publishes `n` messages as fast as its window allows; returns
/// messages per second over the whole run (until the last PUBACK).
async fn throughput(addr: SocketAddr, label: &str, n: usize) -> Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let (client, mut eventloop) = AsyncClient::new(options(addr, &format!("{label}-{d}")), 128);
        let topic = format!("devices/{label}-{d}/vitals/hr");
        tasks.push(tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                let payload = vec![b'v'; PAYLOAD];
                for _ in 0..n {
                    client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                        .await?;
                }
                anyhow::Ok(client)
            });
            let mut acks = 0;
            while acks < n {
                if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
                    acks += 1;
                }
            }
            let client = publisher.await??;
            let _ = client.disconnect().await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((DEVICES * n) as f64 / start.elapsed().as_secs_f64())
}

/// 20 devices at 50 messages/s each; returns every publish-to-PUBACK latency.
async fn paced_latency(addr: SocketAddr, seconds: u64) -> Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let (client, mut eventloop) = AsyncClient::new(options(addr, &format!("paced-{d}")), 128);
        let sent = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::<Instant>::new()));
        let n = (PACED_RATE_PER_DEVICE * seconds) as usize;
        let sent_p = sent.clone();
        tasks.push(tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 / PACED_RATE_PER_DEVICE));
                // Spread the devices over the first period.
                tokio::time::sleep(Duration::from_micros(
                    d as u64 * 1_000_000 / PACED_RATE_PER_DEVICE / DEVICES as u64,
                ))
                .await;
                let payload = vec![b'v'; PAYLOAD];
                for _ in 0..n {
                    tick.tick().await;
                    if let Ok(mut s) = sent_p.lock() {
                        s.push_back(Instant::now());
                    }
                    client
                        .publish(
                            format!("devices/paced-{d}/vitals/hr"),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                        )
                        .await?;
                }
                anyhow::Ok(client)
            });
            let mut latencies = Vec::with_capacity(n);
            while latencies.len() < n {
                match eventloop.poll().await? {
                    Event::Incoming(Packet::PubAck(_)) => {
                        // Acks come back in publish order on one connection.
                        let at = sent.lock().ok().and_then(|mut s| s.pop_front());
                        if let Some(at) = at {
                            latencies.push(at.elapsed());
                        }
                    }
                    Event::Outgoing(Outgoing::Publish(_)) | Event::Outgoing(_) => {}
                    _ => {}
                }
            }
            let client = publisher.await??;
            let _ = client.disconnect().await;
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    Ok(all)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<()> {
    let base = std::env::var_os("VIGIL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).context("bench directory")?;
    let store = Store::open(
        StoreOptions::new(dir.path().join("store")),
        &MasterKey::from_bytes([7; 32]),
    )?;
    let config = GateConfig {
        tcp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..GateConfig::default()
    };
    let gate = Gate::start(config, store.clone()).await?;
    let gate_addr = gate.tcp_addr().context("tcp listener")?;
    let bare_addr = gate.broker_v4_addr();
    let n = ((PER_DEVICE as f64 * scale()) as usize).max(10);
    println!(
        "gate benchmark: {DEVICES} devices, {PAYLOAD}-byte QoS 1 payloads, {INFLIGHT} in flight per device, \
         {n} messages per device; store under {}",
        base.display()
    );
    // Warm-up on both paths.
    throughput(gate_addr, "warm-gate", 20).await?;
    throughput(bare_addr, "warm-bare", 20).await?;

    let durable = throughput(gate_addr, "gate", n).await?;
    let bare = throughput(bare_addr, "bare", n).await?;
    println!("through the gate (durable, fsync before PUBACK): {durable:>10.0} msg/s");
    println!("straight to bare rumqttd (not durable):           {bare:>10.0} msg/s");
    println!(
        "ratio gate / bare:                                {:>10.2}",
        durable / bare
    );
    let stored = store.stats().queued();
    let expected = (DEVICES * (n + 20)) as u64;
    if stored != expected {
        bail!("the store holds {stored} messages, expected {expected}");
    }

    let seconds = ((PACED_SECONDS as f64 * scale()).ceil() as u64).max(1);
    let lat = paced_latency(gate_addr, seconds).await?;
    println!(
        "PUBACK latency through the gate at {} msg/s for {seconds} s ({} samples): \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        PACED_RATE_PER_DEVICE * DEVICES as u64,
        lat.len(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    gate.shutdown().await;
    store.close().await?;
    Ok(())
}
