//! One device connection: CONNECT handling, then a relay to the embedded
//! broker that holds each publish's acknowledgement until the store commit.
//!
//! ```text
//!            device_reader ──raw frames──> broker_writer ──> rumqttd
//!   device <                   │ store.submit (in order)
//!            device_writer <── Out queue <── broker_reader <── rumqttd
//!                 ^ PUBACK  awaits the commit of each PUBACK/PUBREC, in order
//!                 └─ (QoS 1: queued by device_reader)
//! ```
//!
//! Four tasks per connection, joined by bounded channels. Packets pass through
//! as the original bytes, in order, except:
//! - CONNECT, rewritten for rumqttd: credentials removed (the gate checked
//!   them), keep-alive 65535 s whatever the device asked (the gate enforces the
//!   device's; rumqttd refuses 0, and would take a device whose publishes skip
//!   it for a dead one). After an hour with nothing for rumqttd the gate sends
//!   it a PINGREQ of its own and drops the answer;
//! - a QoS 0/1 publish that is not retained, sets or uses no topic alias, and
//!   matches no local subscription ([`super::local`]) is stored and
//!   acknowledged but not passed to rumqttd, which could only drop it;
//! - a device's QoS 1/2 PUBLISH is submitted to the store first and passed on at
//!   once. For QoS 1 the gate queues its own PUBACK to the device at once and
//!   drops rumqttd's: the device's acknowledgement means "on disk", not "routed
//!   to local subscribers", so it does not wait for rumqttd's router (a round
//!   trip through two more threads that used to sit on every PUBACK's path).
//!   For QoS 2 rumqttd's PUBREC is held instead (its PUBREL/PUBCOMP exchange
//!   with the device passes through). Either acknowledgement waits in the
//!   device's queue until the commit, and everything behind it waits too, so
//!   order is kept;
//! - a QoS 1 re-delivery (DUP set) of a publish the store already committed
//!   for this client id is acknowledged by the gate, in order, and neither
//!   stored nor passed on ([`super::resend`]);
//! - MQTT 5 CONNACK gains the gate's Receive Maximum, Maximum Packet Size and
//!   Topic Alias Maximum;
//! - when the store refuses a message (quota full of what cannot be evicted),
//!   an MQTT 5 device gets reason 0x97 in place of rumqttd's success (for QoS 2
//!   the gate also completes rumqttd's side with a PUBREL); an MQTT 3.1.1
//!   device gets no acknowledgement and is disconnected, so its client resends
//!   the message when it reconnects.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::Context;
use super::auth::{PeerCert, Refusal};
use super::frame::{self, Frame, FrameError, FrameReader, Protocol, kind};
use super::resend;
use super::rules::{Class, validate_topic};
use crate::event::{Ingest, Qos, Timestamp, VIGIL_DEVICE};
use crate::store::{PendingAppend, StoreError};

/// How long a closing connection may take to flush before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Time allowed to reach the embedded broker.
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the embedded broker's CONNACK.
const BROKER_CONNACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive sent to rumqttd for every device. The gate enforces the
/// device's own keep-alive; rumqttd's timer must not fire on a device that
/// publishes steadily, since publishes no local client subscribes to never
/// reach rumqttd (it would take the silence for a dead client).
const BROKER_KEEP_ALIVE: u16 = u16::MAX;
/// After this long with nothing sent to rumqttd, the gate sends it a PINGREQ
/// of its own (well inside 1.5 x [`BROKER_KEEP_ALIVE`] seconds) and drops the
/// PINGRESP.
const BROKER_PING_EVERY: Duration = Duration::from_secs(3600);

/// MQTT 5 reason codes the gate sends itself.
mod reason {
    pub const MALFORMED: u8 = 0x81;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
}

/// A device publish waiting for its commit (and, QoS 2, for rumqttd's PUBREC).
struct Held {
    pending: PendingAppend,
    permit: OwnedSemaphorePermit,
}

/// What the device writer sends, in order.
enum Out {
    /// Bytes to pass on as they are.
    Frame(Bytes),
    /// The gate's PUBACK or rumqttd's PUBREC for a device publish: sent once
    /// committed.
    Ack {
        /// rumqttd's PUBREC as it sent it; `None`: the gate's own PUBACK,
        /// written when committed.
        frame: Option<Bytes>,
        pkid: u16,
        qos2: bool,
        held: Held,
        /// A QoS 1 publish's fingerprint, recorded in the connection's
        /// [`resend::Window`] once committed.
        fingerprint: Option<resend::Fingerprint>,
    },
}

/// State the four tasks of one connection share. Locks are never held across
/// an await.
#[derive(Default)]
struct Shared {
    /// Packet id to the device's QoS 2 publishes rumqttd has not sent a
    /// PUBREC for yet.
    held: Mutex<HashMap<u16, VecDeque<Held>>>,
    /// QoS 2 ids the gate completed itself (store refusal): rumqttd's PUBCOMP
    /// for them is not the device's business.
    swallow_pubcomp: Mutex<HashSet<u16>>,
    /// The device has its CONNACK: only then may the gate send a DISCONNECT.
    connack_sent: std::sync::atomic::AtomicBool,
    /// PINGREQs the gate sent rumqttd itself whose PINGRESP has not come.
    gate_pings: std::sync::atomic::AtomicU32,
    /// The client id's committed QoS 1 publishes, kept across its
    /// connections (the default remembers nothing).
    resends: Arc<Mutex<resend::Window>>,
}

/// Locks shared state. The critical sections are plain map operations that
/// cannot leave it inconsistent, so a poisoned lock is recovered rather than
/// letting an acknowledgement slip past its commit.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the device said in its CONNECT.
struct Hello {
    protocol: Protocol,
    client_id: String,
    keep_alive: u16,
    /// Clean session (3.1.1) or clean start (5).
    clean: bool,
    /// The CONNECT to send to rumqttd.
    rewritten: Bytes,
}

/// Serves one accepted (and, for TLS, handshaken) device connection.
pub(super) async fn serve<S>(ctx: Arc<Context>, stream: S, peer: SocketAddr, cert: Option<PeerCert>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd, ctx.config.max_packet_size, ctx.config.frame_timeout);
    let hello = match tokio::time::timeout(ctx.config.connect_timeout, reader.next()).await {
        Err(_) => {
            ctx.counters.inc(&ctx.counters.connect_timeouts);
            tracing::info!(%peer, timeout = ?ctx.config.connect_timeout, "no CONNECT in time; closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            ctx.counters.inc(match e {
                FrameError::TooLarge { .. } => &ctx.counters.oversized,
                _ => &ctx.counters.protocol_errors,
            });
            tracing::info!(%peer, error = %e, "bad first packet; closing");
            return;
        }
        Ok(Ok(Some(frame))) => match hello(&ctx, &frame, peer, cert.as_ref()).await {
            Ok(hello) => hello,
            Err(Some(refusal)) => {
                let _ = wr.write_all(&refusal).await;
                let _ = wr.shutdown().await;
                return;
            }
            Err(None) => return,
        },
    };
    let broker_addr = match hello.protocol {
        Protocol::V5 => ctx.broker_v5,
        _ => ctx.broker_v4,
    };
    let broker = match tokio::time::timeout(
        BROKER_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(broker_addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        outcome => {
            let error = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_string(),
            };
            tracing::error!(device = %hello.client_id, %broker_addr, %error, "cannot reach the embedded broker; refusing the device");
            return refuse_unavailable(&ctx, hello.protocol, &mut wr).await;
        }
    };
    let _ = broker.set_nodelay(true);
    let (broker_rd, mut broker_wr) = broker.into_split();
    let max = ctx.config.max_packet_size.saturating_mul(2) + 4096;
    let mut broker_rd = FrameReader::new(broker_rd, max, ctx.config.frame_timeout);
    // CONNECT and CONNACK with rumqttd before anything else, and never a hang-up
    // in between, whatever the device does meanwhile: rumqttd 0.20 leaves a
    // dead will handle behind for a connection that ends before its CONNACK is
    // written, and the next CONNECT with that client id then panics and
    // poisons the listener for every device (bytebeamio/rumqtt#1062).
    let connack = match broker_handshake(&hello, &mut broker_wr, &mut broker_rd).await {
        Ok(connack) => connack,
        Err(error) => {
            tracing::error!(device = %hello.client_id, %broker_addr, %error, "the embedded broker did not accept the device's CONNECT; refusing the device");
            return refuse_unavailable(&ctx, hello.protocol, &mut wr).await;
        }
    };
    let connack = match hello.protocol {
        Protocol::V5 => connack_v5(&ctx, connack),
        _ => connack.bytes,
    };
    reader.set_idle(
        (hello.keep_alive > 0).then(|| Duration::from_secs(u64::from(hello.keep_alive)) * 3 / 2),
    );
    tracing::debug!(device = %hello.client_id, %peer, protocol = ?hello.protocol, "device connected");
    ctx.counters.inc(&ctx.counters.sessions);
    let _live = ctx.live_session(&hello.client_id, peer);
    let _local = ctx.local.connected(&hello.client_id, hello.clean);
    relay(
        ctx.clone(),
        hello,
        reader,
        wr,
        connack,
        broker_rd,
        broker_wr,
    )
    .await;
}

/// Counts a device refused because the embedded broker is unavailable and
/// tells it so ("server unavailable": 3.1.1 code 3, MQTT 5 0x88).
async fn refuse_unavailable<W: AsyncWrite + Unpin>(ctx: &Context, protocol: Protocol, wr: &mut W) {
    ctx.counters.inc(&ctx.counters.broker_unavailable);
    let code = match protocol {
        Protocol::V5 => reason::SERVER_UNAVAILABLE,
        _ => 3,
    };
    let _ = wr.write_all(&frame::connack_refusal(protocol, code)).await;
}

/// Sends the device's CONNECT to rumqttd and reads its CONNACK.
async fn broker_handshake(
    hello: &Hello,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    rd: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
) -> Result<Frame, String> {
    wr.write_all(&hello.rewritten)
        .await
        .map_err(|e| format!("cannot write the CONNECT: {e}"))?;
    match tokio::time::timeout(BROKER_CONNACK_TIMEOUT, rd.next()).await {
        Err(_) => Err(format!("no CONNACK within {BROKER_CONNACK_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("bad answer to the CONNECT: {e}")),
        Ok(Ok(None)) => Err("closed the connection without a CONNACK".into()),
        Ok(Ok(Some(f))) if f.kind() == kind::CONNACK => Ok(f),
        Ok(Ok(Some(f))) => Err(format!(
            "answered the CONNECT with packet type {}",
            f.kind()
        )),
    }
}

/// Checks a CONNECT's will: a topic that is not a valid topic name (or not
/// UTF-8: `None`) closes the connection; a retained will larger than
/// `gate.max_retained_bytes` is kept, but not retained (counted).
fn check_will(
    ctx: &Context,
    peer: SocketAddr,
    topic: Option<&str>,
    retain: &mut bool,
    len: usize,
) -> Result<(), Option<Bytes>> {
    let counters = &ctx.counters;
    if topic.is_none_or(|t| validate_topic(t).is_err()) {
        counters.inc(&counters.protocol_errors);
        tracing::info!(%peer, "will topic is not a valid topic name; closing");
        return Err(None);
    }
    if *retain && len > ctx.config.max_retained_bytes {
        *retain = false;
        counters.inc(&counters.retain_capped);
    }
    Ok(())
}

/// Reads and checks the CONNECT. `Err(Some(bytes))`: send this refusal and
/// close; `Err(None)`: just close.
async fn hello(
    ctx: &Context,
    frame: &Frame,
    peer: SocketAddr,
    cert: Option<&PeerCert>,
) -> Result<Hello, Option<Bytes>> {
    let counters = &ctx.counters;
    if frame.kind() != kind::CONNECT {
        counters.inc(&counters.protocol_errors);
        tracing::info!(%peer, packet_type = frame.kind(), "first packet is not CONNECT; closing");
        return Err(None);
    }
    let protocol = match frame::connect_protocol(frame) {
        Some(p) => p,
        None => {
            counters.inc(&counters.protocol_errors);
            tracing::info!(%peer, "CONNECT with a bad protocol name; closing");
            return Err(None);
        }
    };
    let max = ctx.config.max_packet_size;
    let (client_id, keep_alive, clean, login, rewritten) = match protocol {
        Protocol::Unsupported(level) => {
            counters.inc(&counters.refused_protocol);
            tracing::info!(%peer, level, "CONNECT for an unsupported MQTT level (3.1.1 and 5 are supported)");
            return Err(Some(frame::connack_refusal(
                protocol,
                Refusal::BadProtocol.v4_code(),
            )));
        }
        Protocol::V4 => match v4::Packet::read(&mut frame.to_buf(), max) {
            Ok(v4::Packet::Connect(mut c)) => {
                if let Some(will) = c.last_will.as_mut() {
                    let len = will.message.len();
                    check_will(ctx, peer, Some(&will.topic), &mut will.retain, len)?;
                }
                let login = c.login.take().map(|l| (l.username, l.password));
                let keep_alive = c.keep_alive;
                c.keep_alive = BROKER_KEEP_ALIVE;
                let mut buf = BytesMut::new();
                let id = c.client_id.clone();
                let clean = c.clean_session;
                if v4::Packet::Connect(c).write(&mut buf, usize::MAX).is_err() {
                    return Err(None);
                }
                (id, keep_alive, clean, login, buf.freeze())
            }
            other => {
                counters.inc(&counters.protocol_errors);
                tracing::info!(%peer, error = ?other.err(), "malformed CONNECT; closing");
                return Err(None);
            }
        },
        Protocol::V5 => match v5::Packet::read(&mut frame.to_buf(), None) {
            Ok(v5::Packet::Connect(mut c, mut will, login)) => {
                if let Some(w) = will.as_mut() {
                    let topic = std::str::from_utf8(&w.topic).ok();
                    let len = w.message.len();
                    check_will(ctx, peer, topic, &mut w.retain, len)?;
                }
                let keep_alive = c.keep_alive;
                c.keep_alive = BROKER_KEEP_ALIVE;
                let mut buf = BytesMut::new();
                let id = c.client_id.clone();
                let clean = c.clean_start;
                if v5::Packet::Connect(c, will, None)
                    .write(&mut buf, None)
                    .is_err()
                {
                    return Err(None);
                }
                let login = login.map(|l| (l.username, l.password));
                (id, keep_alive, clean, login, buf.freeze())
            }
            other => {
                counters.inc(&counters.protocol_errors);
                tracing::info!(%peer, error = ?other.err(), "malformed CONNECT; closing");
                return Err(None);
            }
        },
    };
    let refuse = |refusal: Refusal| {
        frame::connack_refusal(
            protocol,
            match protocol {
                Protocol::V5 => refusal.v5_code(),
                _ => refusal.v4_code(),
            },
        )
    };
    if let Err(why) = check_client_id(&client_id, ctx.config.max_client_id_len) {
        counters.inc(&counters.refused_client_id);
        tracing::warn!(%peer, clean_session = clean, "refused a device: {why}");
        return Err(Some(refuse(Refusal::BadClientId)));
    }
    let login_ref = login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    if let Err((refusal, why)) = ctx.auth.check(&client_id, login_ref, cert).await {
        counters.inc(&counters.refused_auth);
        tracing::warn!(device = %client_id, %peer, "refused a device: {why}");
        return Err(Some(refuse(refusal)));
    }
    Ok(Hello {
        protocol,
        client_id,
        keep_alive,
        clean,
        rewritten,
    })
}

/// Vigil numbers each device's messages by client id, so it must be stable,
/// and rumqttd silently refuses ids with `+ # /`.
fn check_client_id(id: &str, max_len: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err(
            "empty client id; Vigil numbers each device's messages by its client id, \
                    so every device needs a stable, non-empty one"
                .into(),
        );
    }
    if id == VIGIL_DEVICE || id.starts_with('$') {
        return Err(format!(
            "client id {id:?} is reserved (ids starting with `$`)"
        ));
    }
    if id.contains(['+', '#', '/']) {
        return Err(format!("client id {id:?} contains `+`, `#` or `/`"));
    }
    if id.len() > max_len {
        return Err(format!(
            "client id of {} bytes is longer than gate.max_client_id_len ({max_len})",
            id.len()
        ));
    }
    Ok(())
}

async fn relay<R, W>(
    ctx: Arc<Context>,
    hello: Hello,
    reader: FrameReader<R>,
    device_wr: W,
    connack: Bytes,
    broker_rd: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    broker_wr: tokio::net::tcp::OwnedWriteHalf,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared {
        resends: ctx.resends.window(&hello.client_id),
        ..Shared::default()
    });
    let inflight = Arc::new(Semaphore::new(usize::from(ctx.config.max_inflight.max(1))));
    let (to_broker, to_broker_rx) = mpsc::channel::<Bytes>(64);
    let (to_device, to_device_rx) =
        mpsc::channel::<Out>(usize::from(ctx.config.max_inflight.max(1)) + 64);
    let device = Arc::<str>::from(hello.client_id.as_str());
    let protocol = hello.protocol;
    // The CONNACK goes first; the queue has room for it.
    let _ = to_device.try_send(Out::Frame(connack));

    let mut device_reader = tokio::spawn(device_reader(
        ctx.clone(),
        device.clone(),
        protocol,
        reader,
        to_broker.clone(),
        to_device.downgrade(),
        shared.clone(),
        inflight,
    ));
    let broker_writer = tokio::spawn(broker_writer(
        broker_wr,
        to_broker_rx,
        shared.clone(),
        BROKER_PING_EVERY,
    ));
    let broker_reader = tokio::spawn(broker_reader(broker_rd, to_device, shared.clone()));
    let mut device_writer = tokio::spawn(device_writer(
        ctx.clone(),
        device.clone(),
        protocol,
        device_wr,
        to_device_rx,
        to_broker.downgrade(),
        shared,
    ));
    drop(to_broker);
    let cancel = ctx.cancel.clone();
    tokio::select! {
        _ = &mut device_writer => {}
        _ = async { let _ = (&mut device_reader).await; tokio::time::sleep(CLOSE_GRACE).await } => {}
        _ = cancel.cancelled() => {}
    }
    for task in [&device_reader, &device_writer] {
        task.abort();
    }
    broker_writer.abort();
    broker_reader.abort();
    tracing::debug!(device = %device, "device disconnected");
}

/// Device to broker: checks each packet, stores publishes, passes bytes on.
#[allow(clippy::too_many_arguments)]
async fn device_reader<R: AsyncRead + Unpin>(
    ctx: Arc<Context>,
    device: Arc<str>,
    protocol: Protocol,
    mut reader: FrameReader<R>,
    to_broker: mpsc::Sender<Bytes>,
    to_device: mpsc::WeakSender<Out>,
    shared: Arc<Shared>,
    inflight: Arc<Semaphore>,
) {
    let counters = &ctx.counters;
    let mut topics = ConnectionTopics::default();
    let mut memo = super::local::MatchMemo::default();
    let close = |code: u8| {
        if protocol == Protocol::V5
            && shared
                .connack_sent
                .load(std::sync::atomic::Ordering::Acquire)
            && let Some(tx) = to_device.upgrade()
        {
            let _ = tx.try_send(Out::Frame(frame::disconnect_v5(code)));
        }
    };
    loop {
        let mut frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                let code = match &e {
                    FrameError::Io(_) | FrameError::Truncated => return,
                    FrameError::TooLarge { .. } => {
                        counters.inc(&counters.oversized);
                        reason::PACKET_TOO_LARGE
                    }
                    FrameError::Idle(_) => reason::KEEP_ALIVE_TIMEOUT,
                    _ => {
                        counters.inc(&counters.protocol_errors);
                        reason::MALFORMED
                    }
                };
                tracing::info!(%device, error = %e, "closing the device connection");
                close(code);
                return;
            }
        };
        match frame.kind() {
            kind::PUBLISH => match publish(&ctx, &device, protocol, &frame, &mut topics) {
                Ok((ingest, pkid, aliased)) => {
                    // A QoS 1 re-delivery of a publish already committed is
                    // acknowledged, in order, and not stored or relayed
                    // again ([`resend`]). With a topic alias the bytes of
                    // the two copies may differ: stored again, as before.
                    let fingerprint = (ingest.qos == Qos::AtLeastOnce && !aliased)
                        .then(|| resend::fingerprint(&frame.bytes));
                    if let Some(f) = &fingerprint
                        && resend::is_dup(&frame.bytes)
                        && resend::lock(&shared.resends).holds(pkid, f)
                    {
                        counters.inc(&counters.resends_acknowledged);
                        tracing::debug!(%device, pkid, "re-delivery of a committed publish: acknowledged, not stored again");
                        match to_device.upgrade() {
                            Some(tx)
                                if tx
                                    .send(Out::Frame(Bytes::copy_from_slice(&frame::puback(pkid))))
                                    .await
                                    .is_ok() => {}
                            _ => return,
                        }
                        continue;
                    }
                    let mut retained = ingest.retain;
                    if ingest.retain && !ctx.may_retain(&ingest.topic, ingest.payload.len()) {
                        retained = false;
                        // Stored and forwarded as sent; the local broker does
                        // not keep it. The retain flag is bit 0 of the header.
                        let mut bytes = BytesMut::from(&frame.bytes[..]);
                        if let Some(first) = bytes.first_mut() {
                            *first &= !0x01;
                        }
                        frame.bytes = bytes.freeze();
                        counters.inc(&counters.retain_capped);
                        if ctx.log_refusal_now() {
                            tracing::warn!(%device, topic = %ingest.topic, "retained publish relayed as not retained (gate.max_retained_topics or gate.max_retained_bytes); stored and forwarded as usual; logged at most every 10 s");
                        }
                    }
                    let Ok(permit) = inflight.clone().acquire_owned().await else {
                        return;
                    };
                    let qos = ingest.qos;
                    // rumqttd answers QoS 2 itself and must learn every topic
                    // alias; otherwise only local subscribers need the publish.
                    let route = retained
                        || qos == Qos::ExactlyOnce
                        || aliased
                        || memo.any_match(&ctx.local, &ingest.topic);
                    let pending = match ctx.store.submit(ingest).await {
                        Ok(p) => p,
                        Err(e) => {
                            counters.inc(&counters.store_failures);
                            tracing::error!(%device, error = %e, "the store cannot take messages; closing the device connection without acknowledging");
                            close(reason::SERVER_UNAVAILABLE);
                            return;
                        }
                    };
                    match qos {
                        Qos::AtMostOnce => {
                            let ctx = ctx.clone();
                            let device = device.clone();
                            tokio::spawn(async move {
                                let outcome = pending.committed().await;
                                drop(permit);
                                ctx.count_commit(&device, &outcome);
                            });
                        }
                        Qos::AtLeastOnce => {
                            // The gate acknowledges it itself, once committed:
                            // queued now, so PUBACKs leave in publish order.
                            let ack = Out::Ack {
                                frame: None,
                                pkid,
                                qos2: false,
                                held: Held { pending, permit },
                                fingerprint,
                            };
                            match to_device.upgrade() {
                                Some(tx) if tx.send(ack).await.is_ok() => {}
                                _ => return,
                            }
                        }
                        Qos::ExactlyOnce => {
                            // Registered before the publish reaches rumqttd, so its ack finds it.
                            lock(&shared.held)
                                .entry(pkid)
                                .or_default()
                                .push_back(Held { pending, permit });
                        }
                    }
                    if !route {
                        counters.inc(&counters.not_routed_locally);
                        continue;
                    }
                }
                Err((code, why)) => {
                    counters.inc(&counters.protocol_errors);
                    tracing::info!(%device, "bad PUBLISH ({why}); closing the device connection");
                    close(code);
                    return;
                }
            },
            kind::SUBSCRIBE => {
                if let Err(why) = check_packet(protocol, &frame, ctx.config.max_packet_size) {
                    counters.inc(&counters.protocol_errors);
                    tracing::info!(%device, "malformed SUBSCRIBE ({why}); closing the device connection");
                    close(reason::MALFORMED);
                    return;
                }
                match super::acl::subscribe_filters(protocol, &frame) {
                    Ok((pkid, filters)) => {
                        if let Some(denied) =
                            filters.iter().find(|f| !ctx.subscribe.allows(&device, f))
                        {
                            counters.inc(&counters.refused_subscribe);
                            tracing::warn!(%device, filter = %denied, "subscription refused: no gate.subscribe rule allows it");
                            let refusal = super::acl::suback_refusal(protocol, pkid, filters.len());
                            if let (Some(refusal), Some(tx)) = (refusal, to_device.upgrade())
                                && tx.send(Out::Frame(refusal)).await.is_err()
                            {
                                return;
                            }
                            continue;
                        }
                        // Known before rumqttd has it, so no publish that
                        // could match skips the broker from then on.
                        ctx.local.subscribed(&device, &filters);
                    }
                    Err(why) => {
                        counters.inc(&counters.protocol_errors);
                        tracing::info!(%device, "bad SUBSCRIBE ({why}); closing the device connection");
                        close(reason::MALFORMED);
                        return;
                    }
                }
            }
            kind::UNSUBSCRIBE => match super::acl::unsubscribe_filters(protocol, &frame) {
                Ok(filters) => ctx.local.unsubscribed(&device, &filters),
                Err(why) => {
                    counters.inc(&counters.protocol_errors);
                    tracing::info!(%device, "malformed UNSUBSCRIBE ({why}); closing the device connection");
                    close(reason::MALFORMED);
                    return;
                }
            },
            kind::CONNECT => {
                counters.inc(&counters.protocol_errors);
                tracing::info!(%device, "second CONNECT; closing the device connection");
                close(reason::PROTOCOL_ERROR);
                return;
            }
            _ => match check_packet(protocol, &frame, ctx.config.max_packet_size) {
                Ok(()) => {}
                Err(why) => {
                    counters.inc(&counters.protocol_errors);
                    tracing::info!(%device, packet_type = frame.kind(), "malformed packet ({why}); closing the device connection");
                    close(reason::MALFORMED);
                    return;
                }
            },
        }
        let disconnect = frame.kind() == kind::DISCONNECT;
        if to_broker.send(frame.bytes).await.is_err() {
            return;
        }
        if disconnect {
            return;
        }
    }
}

/// What one connection knows of its topics.
#[derive(Debug, Default)]
struct ConnectionTopics {
    /// The MQTT 5 topic aliases the device set (at most
    /// `gate.topic_alias_max`).
    aliases: HashMap<u16, String>,
    /// The topics that passed the gate's checks, with their class.
    checked: TopicMemo,
}

/// Topics one connection's [`TopicMemo`] remembers: a bedside monitor
/// publishes to a topic per measurement (heart rate, SpO2, blood pressure,
/// ECG, ...) and a few for its alarms and status.
const TOPIC_MEMO_TOPICS: usize = 32;
/// Longest topic a [`TopicMemo`] remembers (longer ones are checked each time).
const TOPIC_MEMO_TOPIC_BYTES: usize = 128;

/// The topics a connection published to that passed the gate's checks
/// (well formed, the device's own under `gate.bind_topics`), each with its
/// class from the topic rules: a device publishes to the same few topics
/// again and again, and the checks and the rules' match were 9 % of Vigil's
/// instructions per message in a fill (callgrind: 22,000 without the memo,
/// 20,100 with it; device-sim/BENCHMARKS.md). Every input to them (the
/// topic, the device, the settings) is fixed for the connection, so a
/// remembered answer is the answer. At most [`TOPIC_MEMO_TOPICS`] topics of
/// at most [`TOPIC_MEMO_TOPIC_BYTES`]: about 6 KiB per connection at worst.
/// A lookup compares each entry's length and last 8 bytes (where a device's
/// topics differ: `.../hr`, `.../spo2`) before the whole topic.
#[derive(Debug, Default)]
struct TopicMemo {
    topics: Vec<MemoEntry>,
    /// The slot the next new topic takes once the memo is full.
    next: usize,
}

#[derive(Debug)]
struct MemoEntry {
    key: TopicKey,
    topic: Box<str>,
    class: Class,
}

/// A topic's length and its last (up to) 8 bytes: equal for equal topics,
/// and for a device's distinct topics nearly always different.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TopicKey {
    len: usize,
    tail: u64,
}

impl TopicKey {
    fn of(topic: &str) -> Self {
        let bytes = topic.as_bytes();
        let tail = bytes
            .get(bytes.len().saturating_sub(8)..)
            .unwrap_or_default()
            .iter()
            .fold(0u64, |k, b| (k << 8) | u64::from(*b));
        Self {
            len: bytes.len(),
            tail,
        }
    }
}

impl TopicMemo {
    /// The class remembered for `topic`, if it passed the checks before.
    fn class_of(&self, topic: &str) -> Option<Class> {
        let key = TopicKey::of(topic);
        self.topics
            .iter()
            .find(|e| e.key == key && &*e.topic == topic)
            .map(|e| e.class)
    }

    /// Remembers that `topic` passed the checks, with its class.
    fn remember(&mut self, topic: &str, class: Class) {
        if topic.len() > TOPIC_MEMO_TOPIC_BYTES {
            return;
        }
        let entry = MemoEntry {
            key: TopicKey::of(topic),
            topic: Box::from(topic),
            class,
        };
        if self.topics.len() < TOPIC_MEMO_TOPICS {
            self.topics.push(entry);
        } else if let Some(slot) = self.topics.get_mut(self.next) {
            *slot = entry;
            self.next = (self.next + 1) % TOPIC_MEMO_TOPICS;
        }
    }
}

/// Decodes a device PUBLISH into what the store keeps.
fn publish(
    ctx: &Context,
    device: &str,
    protocol: Protocol,
    frame: &Frame,
    topics: &mut ConnectionTopics,
) -> Result<(Ingest, u16, bool), (u8, String)> {
    let max = ctx.config.max_packet_size;
    let malformed = |e: String| (reason::MALFORMED, e);
    let mut aliased = false;
    let (topic, qos, retain, pkid, payload, content_type, user_properties) = match protocol {
        Protocol::V5 => match read_publish_v5(frame) {
            Ok(p) => {
                let mut topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| malformed("topic is not UTF-8".into()))?;
                let (alias, content_type, user_properties) = match p.properties {
                    Some(props) => (props.topic_alias, props.content_type, props.user_properties),
                    None => (None, None, Vec::new()),
                };
                if let Some(alias) = alias {
                    aliased = true;
                    if alias == 0 || alias > ctx.config.topic_alias_max {
                        return Err((
                            reason::TOPIC_ALIAS_INVALID,
                            format!(
                                "topic alias {alias} outside 1..={}",
                                ctx.config.topic_alias_max
                            ),
                        ));
                    }
                    if topic.is_empty() {
                        topic = topics.aliases.get(&alias).cloned().ok_or((
                            reason::PROTOCOL_ERROR,
                            format!("unknown topic alias {alias}"),
                        ))?;
                    } else {
                        topics.aliases.insert(alias, topic.clone());
                    }
                }
                let qos = match p.qos {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
                    rumqttc::v5::mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
                };
                (
                    topic,
                    qos,
                    p.retain,
                    p.pkid,
                    p.payload,
                    content_type,
                    user_properties,
                )
            }
            Err(e) => return Err(malformed(format!("{e:?}"))),
        },
        _ => match read_publish_v4(frame, max) {
            Ok(p) => (
                p.topic,
                match p.qos {
                    rumqttc::mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
                    rumqttc::mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
                    rumqttc::mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
                },
                p.retain,
                p.pkid,
                p.payload,
                None,
                Vec::new(),
            ),
            Err(e) => return Err(malformed(format!("{e:?}"))),
        },
    };
    let class = match topics.checked.class_of(&topic) {
        Some(class) => class,
        None => {
            validate_topic(&topic).map_err(|why| (reason::TOPIC_NAME_INVALID, why.to_string()))?;
            if ctx.config.bind_topics
                && let Some(rest) = topic.strip_prefix("devices/")
                && rest.split('/').next() != Some(device)
            {
                ctx.counters.inc(&ctx.counters.refused_topic);
                return Err((
                    reason::NOT_AUTHORIZED,
                    format!(
                        "publishes under another device's topics ({topic}); gate.bind_topics is on"
                    ),
                ));
            }
            let class = ctx.rules.classify(&topic);
            topics.checked.remember(&topic, class);
            class
        }
    };
    if class.unmatched {
        ctx.counters.inc(&ctx.counters.unmatched_topics);
    }
    Ok((
        Ingest {
            kind: class.kind,
            priority: class.priority,
            device: device.to_string(),
            topic,
            qos,
            retain,
            received_at: Timestamp::now(),
            content_type,
            user_properties,
            payload,
        },
        pkid,
        aliased,
    ))
}

/// Decodes an MQTT 3.1.1 PUBLISH frame as `v4::Packet::read` would, from the
/// frame's own bytes: the payload stays a view of them, not a copy. It keeps
/// the 4 KiB chunk of the connection's read buffer it lies in until the store
/// writer has sealed it; a device's in-flight publishes are consecutive
/// frames, so what stays pinned is about its in-flight bytes plus a chunk.
fn read_publish_v4(frame: &Frame, max: usize) -> Result<v4::Publish, rumqttc::mqttbytes::Error> {
    let header = rumqttc::mqttbytes::check(frame.bytes.iter(), max)?;
    if header.frame_length() != frame.bytes.len() {
        return Err(rumqttc::mqttbytes::Error::MalformedPacket);
    }
    v4::Publish::read(header, frame.bytes.clone())
}

/// The MQTT 5 counterpart of [`read_publish_v4`].
fn read_publish_v5(frame: &Frame) -> Result<v5::Publish, rumqttc::v5::mqttbytes::Error> {
    let header = v5::check(frame.bytes.iter(), None)?;
    if header.frame_length() != frame.bytes.len() {
        return Err(rumqttc::v5::mqttbytes::Error::MalformedPacket);
    }
    v5::Publish::read(header, frame.bytes.clone())
}

/// Decodes a non-PUBLISH device packet to check it is well formed.
fn check_packet(protocol: Protocol, frame: &Frame, max: usize) -> Result<(), String> {
    match protocol {
        Protocol::V5 => v5::Packet::read(&mut frame.to_buf(), None)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => v4::Packet::read(&mut frame.to_buf(), max)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

/// Writes to rumqttd, batching whatever is queued, and pings it when nothing
/// went for a whole `ping_every`.
async fn broker_writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    ping_every: Duration,
) {
    let mut buf = BytesMut::new();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = false;
    loop {
        let first = tokio::select! {
            biased;
            first = rx.recv() => match first {
                Some(first) => {
                    sent = true;
                    first
                }
                None => break,
            },
            _ = tick.tick() => {
                if std::mem::take(&mut sent) {
                    continue;
                }
                // Counted before it leaves, so the reader knows the answer.
                shared
                    .gate_pings
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                frame::pingreq()
            }
        };
        buf.extend_from_slice(&first);
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}

/// Broker to device: finds the acknowledgements to hold.
async fn broker_reader<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    to_device: mpsc::Sender<Out>,
    shared: Arc<Shared>,
) {
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "embedded broker connection ended");
                return;
            }
        };
        let out = match frame.kind() {
            // A second CONNACK is a protocol error on rumqttd's side; the
            // device already has the first.
            kind::CONNACK => continue,
            // The gate acknowledged the device's QoS 1 publish itself
            // after the commit; rumqttd's PUBACK only says it routed it.
            kind::PUBACK => continue,
            kind::PUBREC => {
                let pkid = frame.ack_pkid().unwrap_or(0);
                let held = {
                    let mut map = lock(&shared.held);
                    let first = map.get_mut(&pkid).and_then(VecDeque::pop_front);
                    if map.get(&pkid).is_some_and(VecDeque::is_empty) {
                        map.remove(&pkid);
                    }
                    first
                };
                match held {
                    Some(held) => Out::Ack {
                        frame: Some(frame.bytes),
                        pkid,
                        qos2: true,
                        held,
                        fingerprint: None,
                    },
                    // rumqttd acknowledging a publish the gate never
                    // submitted to the store: passing it on could tell a
                    // device "on disk" about something that is not. Fail
                    // closed: drop it (the device resends what it lacks).
                    None => {
                        tracing::warn!(
                            pkid,
                            "the embedded broker acknowledged a publish the gate did not hold; \
                             not passed to the device"
                        );
                        continue;
                    }
                }
            }
            // The answer to the gate's own ping is not the device's.
            kind::PINGRESP
                if shared
                    .gate_pings
                    .fetch_update(
                        std::sync::atomic::Ordering::AcqRel,
                        std::sync::atomic::Ordering::Acquire,
                        |n| n.checked_sub(1),
                    )
                    .is_ok() =>
            {
                continue;
            }
            kind::PUBCOMP => {
                let pkid = frame.ack_pkid().unwrap_or(0);
                let swallowed = lock(&shared.swallow_pubcomp).remove(&pkid);
                if swallowed {
                    continue;
                }
                Out::Frame(frame.bytes)
            }
            _ => Out::Frame(frame.bytes),
        };
        if to_device.send(out).await.is_err() {
            return;
        }
    }
}

/// Puts the gate's limits into rumqttd's MQTT 5 CONNACK.
fn connack_v5(ctx: &Context, frame: Frame) -> Bytes {
    let Ok(v5::Packet::ConnAck(mut ack)) = v5::Packet::read(&mut frame.to_buf(), None) else {
        return frame.bytes;
    };
    let props = ack.properties.get_or_insert_with(|| v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    });
    props.receive_max = Some(ctx.config.max_inflight.max(1));
    props.topic_alias_max = Some(ctx.config.topic_alias_max);
    // Maximum Packet Size counts the whole packet: fixed header (at most 5).
    props.max_packet_size = u32::try_from(ctx.config.max_packet_size + 5).ok();
    let mut buf = BytesMut::new();
    match v5::Packet::ConnAck(ack).write(&mut buf, None) {
        Ok(_) => buf.freeze(),
        Err(_) => frame.bytes,
    }
}

/// Writes to the device in order, releasing each held acknowledgement only
/// after its commit.
async fn device_writer<W: AsyncWrite + Unpin>(
    ctx: Arc<Context>,
    device: Arc<str>,
    protocol: Protocol,
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    to_broker: mpsc::WeakSender<Bytes>,
    shared: Arc<Shared>,
) {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Frame(bytes) => {
                    if bytes.first().is_some_and(|b| b >> 4 == kind::CONNACK) {
                        // Set before the bytes leave: a DISCONNECT queued from
                        // now on is behind the CONNACK in this same queue.
                        shared
                            .connack_sent
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                    buf.extend_from_slice(&bytes)
                }
                Out::Ack {
                    frame,
                    pkid,
                    qos2,
                    mut held,
                    fingerprint,
                } => {
                    let outcome = match held.pending.try_committed() {
                        Some(outcome) => outcome,
                        None => {
                            // Not committed yet: send what is ready, then wait.
                            if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
                                return;
                            }
                            buf.clear();
                            held.pending.committed().await
                        }
                    };
                    ctx.count_commit(&device, &outcome);
                    match outcome {
                        Ok(_) => {
                            if let Some(f) = fingerprint {
                                resend::lock(&shared.resends).committed(pkid, f);
                            }
                            match &frame {
                                Some(frame) => buf.extend_from_slice(frame),
                                None => buf.extend_from_slice(&frame::puback(pkid)),
                            }
                        }
                        Err(StoreError::Full { .. } | StoreError::DiskLow { .. })
                            if protocol == Protocol::V5 =>
                        {
                            buf.extend_from_slice(&frame::ack(
                                pkid,
                                qos2,
                                Some(reason::QUOTA_EXCEEDED),
                            ));
                            if qos2 {
                                lock(&shared.swallow_pubcomp).insert(pkid);
                                if let Some(tx) = to_broker.upgrade() {
                                    let _ = tx.send(frame::pubrel(pkid)).await;
                                }
                            }
                        }
                        Err(StoreError::Full { .. } | StoreError::DiskLow { .. }) => {
                            // MQTT 3.1.1 has no negative acknowledgement:
                            // disconnect, so the client resends on reconnect.
                            let _ = wr.write_all(&buf).await;
                            let _ = wr.shutdown().await;
                            return;
                        }
                        Err(_) => {
                            let _ = wr.write_all(&buf).await;
                            if protocol == Protocol::V5 {
                                let _ = wr
                                    .write_all(&frame::disconnect_v5(reason::SERVER_UNAVAILABLE))
                                    .await;
                            }
                            let _ = wr.shutdown().await;
                            return;
                        }
                    }
                    drop(held.permit);
                }
            }
            if buf.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(first: u8, body: &[u8]) -> Frame {
        let mut bytes = vec![first];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            bytes.push(b);
            if len == 0 {
                break;
            }
        }
        let header_len = bytes.len();
        bytes.extend_from_slice(body);
        Frame {
            bytes: Bytes::from(bytes),
            header_len,
        }
    }

    fn class(priority: u8) -> Class {
        Class {
            kind: crate::event::Kind::Measurement,
            priority,
            unmatched: false,
        }
    }

    #[test]
    fn the_topic_memo_answers_only_for_topics_it_was_told() {
        let mut memo = TopicMemo::default();
        assert_eq!(memo.class_of("ward/1/hr"), None);
        memo.remember("ward/1/hr", class(1));
        memo.remember("ward/1/alarm", class(0));
        assert_eq!(memo.class_of("ward/1/hr"), Some(class(1)));
        assert_eq!(memo.class_of("ward/1/alarm"), Some(class(0)));
        // Not a prefix, not a near miss.
        assert_eq!(memo.class_of("ward/1/h"), None);
        assert_eq!(memo.class_of("ward/1/hr/x"), None);
        assert_eq!(memo.class_of("ward/2/hr"), None);
        // Same length and last 8 bytes, different elsewhere.
        memo.remember("a/devices/x/vitals", class(1));
        assert_eq!(memo.class_of("b/devices/x/vitals"), None);
        assert_eq!(
            TopicKey::of("a/devices/x/vitals"),
            TopicKey::of("b/devices/x/vitals")
        );
        assert_eq!(memo.class_of(""), None);
    }

    #[test]
    fn the_topic_memo_is_bounded() {
        let mut memo = TopicMemo::default();
        let long = "t/".repeat(TOPIC_MEMO_TOPIC_BYTES);
        memo.remember(&long, class(1));
        assert_eq!(memo.class_of(&long), None, "too long to remember");
        for i in 0..TOPIC_MEMO_TOPICS * 3 + 1 {
            memo.remember(&format!("ward/{i}"), class(2));
            assert!(memo.topics.len() <= TOPIC_MEMO_TOPICS);
            // The newest is always remembered.
            assert_eq!(memo.class_of(&format!("ward/{i}")), Some(class(2)));
        }
        assert_eq!(memo.topics.len(), TOPIC_MEMO_TOPICS);
        assert_eq!(memo.class_of("ward/0"), None, "the oldest made room");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Whatever a device sends inside a well-framed packet, the decoders
        /// the gate runs return an error at worst; they never panic.
        #[test]
        fn no_packet_body_panics_the_decoders(first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let frame = framed(first, &body);
            let _ = check_packet(Protocol::V4, &frame, 1 << 20);
            let _ = check_packet(Protocol::V5, &frame, 1 << 20);
            let _ = frame::connect_protocol(&frame);
            let _ = frame.ack_pkid();
        }

        /// The same for packets that start like the ones the gate inspects
        /// most (CONNECT, PUBLISH at each QoS, SUBSCRIBE), so the fuzzing
        /// reaches past the first checks.
        #[test]
        fn near_valid_packets_never_panic(
            first in prop::sample::select(vec![0x10u8, 0x30, 0x32, 0x34, 0x36, 0x3b, 0x62, 0x82, 0xa2, 0xe0, 0xf0]),
            prefix in prop::sample::select(vec![
                vec![0u8, 4, b'M', b'Q', b'T', b'T', 4],
                vec![0u8, 4, b'M', b'Q', b'T', b'T', 5],
                vec![0u8, 3, b'a', b'/', b'b', 0, 1],
                vec![0u8, 1],
                vec![],
            ]),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut all = prefix;
            all.extend(body);
            let frame = framed(first, &all);
            let _ = check_packet(Protocol::V4, &frame, 1 << 20);
            let _ = check_packet(Protocol::V5, &frame, 1 << 20);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// The gate decodes PUBLISH frames in place; whatever the frame holds,
        /// it gets what rumqttc's own packet reader gets from a copy of it
        /// (the same publish, or an error where it errs).
        #[test]
        fn publishes_decode_in_place_as_rumqttc_reads_them(
            flags in 0u8..16,
            topic in "[a-z/]{0,12}",
            pkid in any::<u16>(),
            props in prop::sample::select(vec![vec![0u8], vec![3, 0x23, 0, 7], vec![2, 0x01, 1], vec![]]),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            junk in proptest::collection::vec(any::<u8>(), 0..8),
            garble in any::<bool>(),
        ) {
            let mut body = Vec::new();
            body.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            if flags & 0b0110 != 0 {
                body.extend_from_slice(&pkid.to_be_bytes());
            }
            let mut v5_body = body.clone();
            v5_body.extend_from_slice(&props);
            body.extend_from_slice(&payload);
            v5_body.extend_from_slice(&payload);
            if garble {
                body = junk.clone();
                v5_body = junk;
            }
            let frame = framed(0x30 | flags, &body);
            let theirs = match v4::Packet::read(&mut frame.to_buf(), 1 << 20) {
                Ok(v4::Packet::Publish(p)) => Some(p),
                _ => None,
            };
            prop_assert_eq!(read_publish_v4(&frame, 1 << 20).ok(), theirs);
            let frame = framed(0x30 | flags, &v5_body);
            let theirs = match v5::Packet::read(&mut frame.to_buf(), None) {
                Ok(v5::Packet::Publish(p)) => Some(p),
                _ => None,
            };
            prop_assert_eq!(read_publish_v5(&frame).ok(), theirs);
        }
    }

    /// A frame the gate's own PUBACK would be is what `ack` builds.
    #[test]
    fn the_gates_puback_is_an_mqtt_puback() {
        for pkid in [1u16, 0x1234, u16::MAX] {
            assert_eq!(&frame::puback(pkid)[..], &frame::ack(pkid, false, None)[..]);
        }
        assert_eq!(frame::puback(0x0102), [0x40, 0x02, 0x01, 0x02]);
    }

    /// With nothing to relay for a whole interval the writer pings rumqttd
    /// itself, counting each ping before it leaves.
    #[tokio::test]
    async fn the_gate_pings_a_quiet_broker() {
        use tokio::io::AsyncReadExt;
        let shared = Arc::new(Shared::default());
        let (to_broker, rx) = mpsc::channel::<Bytes>(4);
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let writer = tokio::spawn(broker_writer(
            ours,
            rx,
            shared.clone(),
            Duration::from_millis(50),
        ));
        let mut ping = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), theirs.read_exact(&mut ping))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ping, [0xc0, 0x00]);
        let counted = shared.gate_pings.load(std::sync::atomic::Ordering::Acquire);
        assert!(counted >= 1);
        // Relayed bytes still pass as they are.
        to_broker.send(frame::pubrel(7)).await.unwrap();
        drop(to_broker);
        writer.await.unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert!(rest.ends_with(&[0x62, 0x02, 0x00, 0x07]), "{rest:02x?}");
    }

    /// The reader drops as many PINGRESPs as the gate asked for and passes
    /// the device's own on.
    #[tokio::test]
    async fn the_answers_to_the_gates_pings_are_not_the_devices() {
        let shared = Arc::new(Shared::default());
        shared
            .gate_pings
            .store(2, std::sync::atomic::Ordering::Release);
        let (mut broker, reader_side) = tokio::io::duplex(1024);
        let (to_device, mut device) = mpsc::channel::<Out>(8);
        let reader = tokio::spawn(broker_reader(
            FrameReader::new(reader_side, 1024, Duration::from_secs(5)),
            to_device,
            shared.clone(),
        ));
        broker.write_all(&[0xd0, 0x00].repeat(3)).await.unwrap();
        drop(broker);
        reader.await.unwrap();
        let mut passed = 0;
        while let Ok(out) = device.try_recv() {
            assert!(matches!(out, Out::Frame(ref b) if b[..] == [0xd0, 0x00]));
            passed += 1;
        }
        assert_eq!(passed, 1, "only the device's PINGRESP reaches it");
        assert_eq!(
            shared.gate_pings.load(std::sync::atomic::Ordering::Acquire),
            0
        );
    }

    #[test]
    fn client_ids() {
        assert!(check_client_id("bed-12-monitor", 64).is_ok());
        for bad in ["", "$vigil", "$x", "a/b", "a+b", "a#", &"x".repeat(65)] {
            assert!(check_client_id(bad, 64).is_err(), "{bad}");
        }
    }
}
