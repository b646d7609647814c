//! The gate's settings: the `[gate]` table of `vigil.toml`.
//!
//! Every table refuses unknown keys, so a misspelled setting is an error that
//! names it rather than a default silently used.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rules::TopicRule;
use crate::event::Kind;

/// Settings of the device-facing side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Plain MQTT listener (default 127.0.0.1:1883). `None` turns it off.
    pub tcp_listen: Option<SocketAddr>,
    /// MQTT over TLS listener; off unless configured.
    pub tls: Option<TlsConfig>,
    /// The embedded rumqttd's settings file. `None` uses the built-in copy of
    /// `broker-config/rumqttd.toml`.
    pub broker_config: Option<PathBuf>,
    /// Device connections open at once, across both listeners. A connection
    /// over the limit is closed at once and counted.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed from the TCP (or TLS) connection to a complete CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from the first to the last byte of any one packet, so a
    /// device that claims a large packet and stalls is cut off.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// Largest MQTT packet a device may send (remaining length, bytes). A larger
    /// claim closes the connection before any of it is read.
    pub max_packet_size: usize,
    /// Publishes a device may have waiting for their acknowledgement (QoS 0
    /// ones waiting for their commit count too). Past it the gate stops reading
    /// from that device until a commit frees a slot. Announced to MQTT 5
    /// devices as Receive Maximum.
    pub max_inflight: u16,
    /// Topic aliases an MQTT 5 device may use (announced in CONNACK; 0 turns
    /// them off).
    pub topic_alias_max: u16,
    /// Longest client id accepted (bytes).
    pub max_client_id_len: usize,
    /// Who may connect.
    pub auth: AuthConfig,
    /// Topic filters to kind and priority; the first match wins.
    pub rules: Vec<TopicRule>,
    /// Kind and priority of a message no rule matches (counted).
    pub unmatched: Unmatched,
    /// Who may subscribe to what on the embedded broker; nobody unless a
    /// rule allows it (see [`super::acl`]).
    pub subscribe: Vec<SubscribeRule>,
    /// A device may publish under `devices/` only below its own client id
    /// (`devices/<client id>/...`): one device cannot pass its readings off
    /// as another's. A publish under another id closes the connection (MQTT
    /// 5: DISCONNECT 0x87 "not authorized") and is counted.
    pub bind_topics: bool,
    /// Topics with a retained message the embedded broker may hold; a
    /// retained publish to a new topic past it is relayed as not retained
    /// (still stored and forwarded), and counted.
    pub max_retained_topics: usize,
    /// Largest payload the embedded broker may retain (publishes and wills);
    /// a larger one is relayed as not retained, and counted.
    pub max_retained_bytes: usize,
}

/// Client ids (exact, `prefix*`, or `*`) and the topic filters they may
/// subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRule {
    /// Client ids this rule is for.
    pub clients: Vec<String>,
    /// Filters they may subscribe to (and anything narrower).
    pub filters: Vec<String>,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            tcp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
            tls: None,
            broker_config: None,
            max_connections: 1000,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(60),
            max_packet_size: 256 * 1024,
            max_inflight: 64,
            topic_alias_max: 32,
            max_client_id_len: 128,
            auth: AuthConfig::default(),
            rules: TopicRule::defaults(),
            unmatched: Unmatched::default(),
            subscribe: Vec::new(),
            bind_topics: true,
            max_retained_topics: 10_000,
            max_retained_bytes: 64 * 1024,
        }
    }
}

/// Kind and priority for topics no rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unmatched {
    /// Usually `measurement`.
    pub kind: Kind,
    /// Usually a low priority.
    pub priority: u8,
}

impl Default for Unmatched {
    fn default() -> Self {
        Self {
            kind: Kind::Measurement,
            priority: 2,
        }
    }
}

/// The TLS listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address to listen on, e.g. `0.0.0.0:8883`.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1). Must not be readable
    /// by group or others.
    pub key: PathBuf,
    /// CA bundle (PEM, any number of certificates) that device certificates
    /// must chain to. Without it no client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a device must present a certificate.
    #[serde(default)]
    pub client_certificates: ClientCertificates,
    /// Refuse a device whose certificate's common name differs from its MQTT
    /// client id.
    #[serde(default)]
    pub require_cn_match: bool,
}

/// Whether a TLS device must present a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCertificates {
    /// The handshake fails without a valid certificate.
    #[default]
    Required,
    /// A certificate is checked if presented; devices without one may still
    /// authenticate with a password.
    Optional,
}

/// Who may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// What a device must show.
    pub require: AuthRequire,
    /// Username and password hash (PHC string made by `vigil hash-password`).
    pub users: Vec<User>,
}

/// What a device must show to connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthRequire {
    /// Nothing; a password that is given must still be right. Only sensible
    /// on a loopback listener.
    #[default]
    None,
    /// A username and password from `users`.
    Password,
    /// A client certificate verified against the TLS listener's `client_ca`.
    Certificate,
    /// Either of the two.
    PasswordOrCertificate,
    /// Both.
    PasswordAndCertificate,
}

/// One device account.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The MQTT username.
    pub username: String,
    /// Argon2 PHC string, e.g. `$argon2id$v=19$m=19456,t=2,p=1$...`.
    pub password_hash: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}
