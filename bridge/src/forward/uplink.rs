//! rumqttc behind one face for MQTT 3.1.1 and 5: the driver sees the same few
//! events from either.
//!
//! A fresh client and event loop are made for every connection attempt. That
//! is the strongest form of the clean-up `notes/libraries.md` section 2.4 asks
//! for after an error (rumqttc's pending queue, stale `Outgoing` events and
//! collision state): an old event loop, with whatever it still holds, is
//! dropped whole and never polled again, so nothing of a dead connection can
//! be replayed into a new one or mis-assign a packet id.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PubAckReason;

use super::config::{ForwardConfig, Protocol};
use super::login::Login;

/// What the driver needs to know from one `poll`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    /// CONNACK: the cloud's limits (MQTT 5 only).
    Connected {
        /// Receive Maximum.
        receive_max: Option<u16>,
        /// Maximum Packet Size.
        max_packet_size: Option<u32>,
    },
    /// The oldest publish handed over went out with this packet id.
    Published(u16),
    /// A PUBACK; `reason` is the MQTT 5 reason code.
    PubAck {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 reason code (`None` on 3.1.1).
        reason: Option<u8>,
    },
    /// A PINGREQ went out.
    PingSent,
    /// Any other packet from the cloud (a PINGRESP, ...): the link is alive.
    Heard,
    /// Anything else (other outgoing packets, ...).
    Other,
}

/// A connection failure: the error's text and its `Debug` form.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Display text.
    pub text: String,
    /// Debug form (names the rustls variants).
    pub debug: String,
    /// A timeout (network, flush, keep-alive) rather than the cloud closing
    /// or refusing: not held against the message at the head of the window.
    pub timeout: bool,
}

impl Failure {
    fn of<E: std::fmt::Display + std::fmt::Debug>(e: &E) -> Self {
        let text = e.to_string();
        let debug = format!("{e:?}");
        let timeout = debug.contains("Timeout") || debug.contains("AwaitPingResp");
        Self {
            text,
            debug,
            timeout,
        }
    }
}

/// The sending half of one connection attempt (rumqttc's client).
pub enum Publisher {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop of one connection attempt.
pub enum Events {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A client and event loop that will connect on the first poll, sending
/// `login` in CONNECT when there is one. The request channel holds the whole
/// window, so [`Publisher::publish`] never waits.
pub fn connect(
    config: &ForwardConfig,
    tls: Arc<rustls::ClientConfig>,
    login: Option<Login>,
) -> (Publisher, Events) {
    let window = config.window().max(1);
    let cap = usize::from(window) + 8;
    let transport = rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls));
    let timeout_secs = config.connect_timeout.as_secs().max(1);
    // Validated to 5 s or more; rumqttc's MQTT 5 client panics below that.
    let keep_alive = config.keep_alive.max(Duration::from_secs(5));
    // Incoming packets are only acks and pings.
    let incoming_limit = 64 * 1024;
    // Publishes go out at once: with Nagle on, a small write waits for the
    // cloud's delayed ACK (about 40 ms), which capped a 64-message window at
    // under 8,000 msg/s in `benches/forward.rs`.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(timeout_secs);
    net.set_tcp_nodelay(true);
    // The driver hands over up to a window of publishes at once; the event
    // loop (vendor/rumqttc, VIGIL-PATCH.md) writes those already queued before
    // one flush, so a refill costs one TLS record and one writev per 8 KiB of
    // its write buffer instead of one per publish. Set to the window, not left
    // to the patch's default of 64, so a larger window batches as far too.
    let batch = usize::from(window);
    match config.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&config.client_id, &config.host, config.port);
            o.set_transport(transport)
                .set_keep_alive(keep_alive)
                .set_clean_session(true)
                .set_inflight(window)
                .set_max_request_batch(batch)
                .set_max_packet_size(incoming_limit, config.max_packet_size as usize);
            if let Some(Login { username, password }) = login {
                o.set_credentials(username, password);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(o, cap);
            eventloop.set_network_options(net);
            (Publisher::V4(client), Events::V4(Box::new(eventloop)))
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&config.client_id, &config.host, config.port);
            o.set_transport(transport)
                .set_keep_alive(keep_alive)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(window)
                .set_max_request_batch(batch)
                .set_max_packet_size(Some(incoming_limit as u32))
                .set_network_options(net);
            if let Some(Login { username, password }) = login {
                o.set_credentials(username, password);
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, cap);
            (Publisher::V5(client), Events::V5(Box::new(eventloop)))
        }
    }
}

impl Publisher {
    /// Hands a QoS 1 publish to the event loop, without waiting.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), Failure> {
        match self {
            Self::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .map_err(|e| Failure::of(&e)),
            Self::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    Bytes::from(payload),
                )
                .map_err(|e| Failure::of(&e)),
        }
    }
}

impl Events {
    /// Drives the connection one step.
    pub async fn poll(&mut self) -> Result<Happened, Failure> {
        match self {
            Self::V4(el) => {
                use rumqttc::{Event, Outgoing, Packet};
                match el.poll().await.map_err(|e| Failure::of(&e))? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(Happened::Connected {
                        receive_max: None,
                        max_packet_size: None,
                    }),
                    Event::Incoming(Packet::PubAck(a)) => Ok(Happened::PubAck {
                        pkid: a.pkid,
                        reason: None,
                    }),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ok(Happened::Published(pkid)),
                    Event::Outgoing(Outgoing::PingReq) => Ok(Happened::PingSent),
                    Event::Incoming(_) => Ok(Happened::Heard),
                    _ => Ok(Happened::Other),
                }
            }
            Self::V5(el) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                match el.poll().await.map_err(|e| Failure::of(&e))? {
                    Event::Incoming(Packet::ConnAck(c)) => {
                        let p = c.properties.as_ref();
                        Ok(Happened::Connected {
                            receive_max: p.and_then(|p| p.receive_max),
                            max_packet_size: p.and_then(|p| p.max_packet_size),
                        })
                    }
                    Event::Incoming(Packet::PubAck(a)) => Ok(Happened::PubAck {
                        pkid: a.pkid,
                        reason: Some(reason_code(a.reason)),
                    }),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ok(Happened::Published(pkid)),
                    Event::Outgoing(Outgoing::PingReq) => Ok(Happened::PingSent),
                    Event::Incoming(_) => Ok(Happened::Heard),
                    _ => Ok(Happened::Other),
                }
            }
        }
    }
}

/// The MQTT 5 reason code of a PUBACK reason.
pub fn reason_code(r: PubAckReason) -> u8 {
    match r {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// The name of an MQTT 5 PUBACK reason code, for dead-letter reasons.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        _ => "unknown reason",
    }
}
