//! Simulated bedside monitors: each its own MQTT client (3.1.1 or 5) at
//! QoS 1, publishing on Vigil's documented topic scheme:
//!
//! - `devices/<id>/vitals`: heart rate, SpO2, blood pressure, respiratory
//!   rate and temperature as JSON, following bounded random walks, once per
//!   tick (1 Hz at rate 1);
//! - `devices/<id>/waveforms/ecg`: one second of a 250 Hz ECG as 500 bytes
//!   of little-endian i16 samples (binary: it travels base64 in the envelope);
//! - `devices/<id>/alarms/<vital>`: JSON, when a vital crosses its threshold.
//!
//! Every payload carries the device and its counter, so each is unique and
//! its SHA-256 identifies it. Each device records in the ledger what it sent
//! and whether Vigil's PUBACK came (matched through rumqttc's in-order
//! `Outgoing::Publish(pkid)` events).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::envelope::hex;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::ledger::{LedgerError, Sent, Writer};

/// How the devices run.
#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// Vigil's device listener (plain MQTT).
    pub gate: SocketAddr,
    /// Number of monitors (`bed-1` ...).
    pub count: usize,
    /// Ticks per second per device (1.0 = real time); each tick sends vitals
    /// and an ECG chunk.
    pub rate: f64,
    /// Client id prefix.
    pub prefix: String,
    /// Which MQTT version the devices speak. An MQTT 5 PUBACK with a failure
    /// reason (e.g. 0x97, Vigil's store is full) is recorded as not
    /// acknowledged.
    pub protocol: DeviceProtocol,
}

/// MQTT version of the simulated devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum DeviceProtocol {
    /// All MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// All MQTT 5.
    #[serde(rename = "5")]
    V5,
    /// Odd-numbered devices MQTT 3.1.1, even-numbered MQTT 5.
    #[default]
    #[serde(rename = "mixed")]
    Mixed,
}

impl std::str::FromStr for DeviceProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "3.1.1" => Ok(Self::V311),
            "5" => Ok(Self::V5),
            "mixed" => Ok(Self::Mixed),
            _ => Err(format!("{s:?}: use 3.1.1, 5 or mixed")),
        }
    }
}

/// One device's client, either protocol.
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Its event loop.
enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What a poll meant for the ledger.
enum Polled {
    Published(u16),
    /// PUBACK: whether it accepted the message.
    Acked(u16, bool),
    Other,
    Failed,
}

fn connect(id: &str, n: u64, config: &DevicesConfig) -> (Client, Loop) {
    let (host, port) = (config.gate.ip().to_string(), config.gate.port());
    let mqtt5 = match config.protocol {
        DeviceProtocol::V311 => false,
        DeviceProtocol::V5 => true,
        DeviceProtocol::Mixed => n.is_multiple_of(2),
    };
    if mqtt5 {
        let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(Some(64 * 1024));
        let (c, l) = rumqttc::v5::AsyncClient::new(o, 256);
        (Client::V5(c), Loop::V5(Box::new(l)))
    } else {
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_inflight(64);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(64 * 1024, 64 * 1024);
        let (c, l) = rumqttc::AsyncClient::new(o, 256);
        (Client::V4(c), Loop::V4(Box::new(l)))
    }
}

impl Client {
    fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        match self {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .is_ok(),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .is_ok(),
        }
    }

    fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        };
    }
}

impl Loop {
    async fn poll(&mut self) -> Polled {
        match self {
            Loop::V4(l) => match l.poll().await {
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(p))) => Polled::Published(p),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) => {
                    Polled::Acked(a.pkid, true)
                }
                Ok(_) => Polled::Other,
                Err(_) => Polled::Failed,
            },
            Loop::V5(l) => match l.poll().await {
                Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Publish(p))) => {
                    Polled::Published(p)
                }
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a))) => {
                    use rumqttc::v5::mqttbytes::v5::PubAckReason;
                    let ok = matches!(
                        a.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    );
                    Polled::Acked(a.pkid, ok)
                }
                Ok(_) => Polled::Other,
                Err(_) => Polled::Failed,
            },
        }
    }
}

/// Priorities of Vigil's default topic rules, for the ledger.
fn priority_of(kind: &str) -> u8 {
    match kind {
        "alarms" => 0,
        "vitals" => 1,
        "status" => 2,
        _ => 3,
    }
}

/// A small deterministic generator (xorshift64*), seeded per device.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1].
    fn step(&mut self) -> f64 {
        (self.next() % 2001) as f64 / 1000.0 - 1.0
    }
}

/// One vital: value, walk step, bounds, and alarm thresholds.
struct Vital {
    name: &'static str,
    value: f64,
    step: f64,
    bounds: (f64, f64),
    alarm: (f64, f64),
    alarming: bool,
}

fn vitals() -> Vec<Vital> {
    let v = |name, value, step, bounds, alarm| Vital {
        name,
        value,
        step,
        bounds,
        alarm,
        alarming: false,
    };
    vec![
        v("hr", 75.0, 3.0, (30.0, 200.0), (45.0, 120.0)),
        v("spo2", 97.0, 0.6, (70.0, 100.0), (90.0, 101.0)),
        v("bp_sys", 120.0, 3.0, (60.0, 220.0), (85.0, 170.0)),
        v("bp_dia", 80.0, 2.0, (30.0, 140.0), (45.0, 110.0)),
        v("rr", 16.0, 1.0, (4.0, 50.0), (8.0, 30.0)),
        v("temp", 36.8, 0.1, (33.0, 42.0), (35.0, 38.5)),
    ]
}

/// Runs the devices until `stop`, then waits up to `grace` for outstanding
/// PUBACKs. Returns every message sent, acknowledged or not, and writes
/// each to `ledger` as its outcome becomes final.
pub async fn run(
    config: DevicesConfig,
    ledger: Option<Writer>,
    stop: CancellationToken,
    grace: Duration,
) -> Result<Vec<Sent>, LedgerError> {
    let ledger = Arc::new(Mutex::new((ledger, Vec::new(), None::<LedgerError>)));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 1..=config.count {
        let id = format!("{}-{n}", config.prefix);
        // Seeded by the id, so no two devices (even across runs with other
        // prefixes) send the same waveform: payload hashes identify messages.
        let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        tasks.spawn(device(
            id,
            seed,
            config.clone(),
            ledger.clone(),
            stop.clone(),
            grace,
        ));
    }
    while tasks.join_next().await.is_some() {}
    let mut guard = ledger.lock().map_err(|_| LedgerError::Io {
        path: "ledger".into(),
        source: std::io::Error::other("poisoned"),
    })?;
    if let Some(e) = guard.2.take() {
        return Err(e);
    }
    Ok(std::mem::take(&mut guard.1))
}

type Shared = Arc<Mutex<(Option<Writer>, Vec<Sent>, Option<LedgerError>)>>;

fn record(ledger: &Shared, sent: Sent) {
    if let Ok(mut g) = ledger.lock() {
        if let Some(w) = g.0.as_mut()
            && let Err(e) = w.append(&sent)
        {
            g.2.get_or_insert(e);
        }
        g.1.push(sent);
    }
}

async fn device(
    id: String,
    seed: u64,
    config: DevicesConfig,
    ledger: Shared,
    stop: CancellationToken,
    grace: Duration,
) {
    let (mut client, mut el) = connect(&id, seed, &config);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut vitals = vitals();
    let mut counter = 0u64;
    let mut handed: VecDeque<Sent> = VecDeque::new();
    let mut by_pkid: HashMap<u16, Sent> = HashMap::new();
    let period = Duration::from_secs_f64(1.0 / config.rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    let mut stopping: Option<tokio::time::Instant> = None;
    loop {
        if let Some(until) = stopping
            && (handed.is_empty() && by_pkid.is_empty() || tokio::time::Instant::now() > until)
        {
            break;
        }
        tokio::select! {
            _ = stop.cancelled(), if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now() + grace);
            }
            _ = tick.tick(), if stopping.is_none() => {
                for (n, topic, payload) in readings(&id, &mut counter, &mut rng, &mut vitals) {
                    let kind = topic.split('/').nth(2).unwrap_or_default();
                    let sent = Sent {
                        device: id.clone(),
                        counter: n,
                        priority: priority_of(kind),
                        sha256: hex(&Sha256::digest(&payload)),
                        acked: false,
                    };
                    if client.publish(topic, payload) {
                        handed.push_back(sent);
                    } else {
                        // The client's queue is full (Vigil is not taking
                        // messages): this one was never sent.
                        record(&ledger, sent);
                    }
                }
            }
            ev = el.poll() => match ev {
                Polled::Published(pkid) => {
                    if let Some(s) = handed.pop_front() {
                        by_pkid.insert(pkid, s);
                    }
                }
                Polled::Acked(pkid, ok) => {
                    if let Some(mut s) = by_pkid.remove(&pkid) {
                        s.acked = ok;
                        record(&ledger, s);
                    }
                }
                Polled::Other => {}
                Polled::Failed => {
                    // Whatever was in flight or queued is not acknowledged.
                    for s in handed.drain(..).chain(by_pkid.drain().map(|(_, s)| s)) {
                        record(&ledger, s);
                    }
                    // A new client, not just a cleaned event loop: publishes
                    // still waiting in the old client's request channel would
                    // go out on the next connection, and the ledger, which
                    // pairs packet ids with messages in the order they are
                    // handed over, would credit each PUBACK to the wrong
                    // message (seen as "lost" messages the device never sent
                    // and "recovered" ones it did).
                    drop(el);
                    (client, el) = connect(&id, seed, &config);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    for s in handed.drain(..).chain(by_pkid.drain().map(|(_, s)| s)) {
        record(&ledger, s);
    }
    client.disconnect();
}

/// One tick's messages: vitals, an ECG chunk, and any new alarms.
fn readings(
    id: &str,
    counter: &mut u64,
    rng: &mut Rng,
    vitals: &mut [Vital],
) -> Vec<(u64, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut alarms = Vec::new();
    let mut fields = Vec::new();
    for v in vitals.iter_mut() {
        v.value = (v.value + v.step * rng.step()).clamp(v.bounds.0, v.bounds.1);
        let out_of_range = v.value < v.alarm.0 || v.value > v.alarm.1;
        if out_of_range && !v.alarming {
            alarms.push((v.name, v.value));
        }
        v.alarming = out_of_range;
        fields.push(format!("\"{}\":{:.1}", v.name, v.value));
    }
    *counter += 1;
    out.push((
        *counter,
        format!("devices/{id}/vitals"),
        format!(
            "{{\"device\":\"{id}\",\"n\":{},{}}}",
            *counter,
            fields.join(",")
        )
        .into_bytes(),
    ));
    *counter += 1;
    let mut ecg = Vec::with_capacity(508);
    ecg.extend_from_slice(&counter.to_le_bytes());
    for i in 0..250u64 {
        let beat = if i % 200 < 8 { 900 } else { 0 };
        let sample = (beat + (rng.next() % 60) as i64 - 30) as i16;
        ecg.extend_from_slice(&sample.to_le_bytes());
    }
    out.push((*counter, format!("devices/{id}/waveforms/ecg"), ecg));
    for (name, value) in alarms {
        *counter += 1;
        out.push((
            *counter,
            format!("devices/{id}/alarms/{name}"),
            format!(
                "{{\"device\":\"{id}\",\"n\":{},\"alarm\":\"{name}\",\"value\":{value:.1}}}",
                *counter
            )
            .into_bytes(),
        ));
    }
    out
}
