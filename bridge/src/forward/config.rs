//! The forwarder's settings: the `[forward]` table of `vigil.toml`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// MQTT protocol version spoken to the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5: the cloud's Receive Maximum caps the window, its Maximum Packet
    /// Size caps envelopes, and refusals (PUBACK reason >= 0x80) are seen.
    #[default]
    #[serde(rename = "5")]
    V5,
}

/// The window on MQTT 5 when `forward.window` is unset, before the cloud's
/// Receive Maximum caps it. The drain is bounded by the window's round trips:
/// 256 drained 25-35 % faster than 64 in `vigil-sim bench` (session 13).
pub const DEFAULT_WINDOW_MQTT5: u16 = 256;

/// The window on MQTT 3.1.1 when `forward.window` is unset: a 3.1.1 broker
/// cannot announce a limit, and some cap a client's in-flight publishes near
/// 100.
pub const DEFAULT_WINDOW_MQTT311: u16 = 64;

/// Settings of the cloud side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// The cloud broker's host name or IP address.
    pub host: String,
    /// Its port (MQTT over TLS).
    pub port: u16,
    /// MQTT version: `"3.1.1"` or `"5"`.
    pub protocol: Protocol,
    /// Client id Vigil connects with.
    pub client_id: String,
    /// User name sent in CONNECT, for clouds that want one as well as (or
    /// instead of proving identity by) the client certificate: Azure IoT Hub
    /// wants `<hub>.azure-devices.net/<device>/?api-version=...` with X.509,
    /// username/password brokers (EMQX, HiveMQ Cloud, Mosquitto with a
    /// password file) want their account name. Unset: none is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A file holding the password sent with [`Self::username`] (the whole
    /// file, one trailing line break removed; UTF-8, as rumqttc sends it).
    /// Like a private key it must not be readable by group or others, and it
    /// is re-read before every connection attempt, so a rotated password is
    /// used without a restart. The password itself never goes in
    /// `vigil.toml`, the environment or the log. Unset: none is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Certificates: TLS is always on.
    pub tls: UplinkTls,
    /// Messages go to `<topic_prefix>/<device topic>`.
    pub topic_prefix: String,
    /// Publishes in flight at once. Unset: [`DEFAULT_WINDOW_MQTT5`] on MQTT 5,
    /// where the cloud's Receive Maximum caps it (the protocol's own way for a
    /// broker to say how many it takes), [`DEFAULT_WINDOW_MQTT311`] on MQTT
    /// 3.1.1, where a broker cannot say and some cap a client lower. Read it
    /// through [`ForwardConfig::window`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u16>,
    /// Largest MQTT packet Vigil sends (bytes). A message whose envelope would
    /// be larger (or larger than the cloud announces on MQTT 5) goes to
    /// dead-letter instead of blocking its lane.
    pub max_packet_size: u32,
    /// MQTT keep-alive (at least 1 s). A dead link is noticed within twice this.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Time allowed for TCP, TLS and CONNACK, and for each write.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// With messages in flight and no PUBACK for this long, the connection is
    /// dropped and the messages are sent again on a new one.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// First delay before reconnecting; it doubles after each failure.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest delay between reconnects (a random 0-25 % is added).
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// The message at the head of the in-flight window goes to dead-letter
    /// after the cloud closed this many connections in a row while it was in
    /// flight (a message the cloud cannot take would otherwise block its lane
    /// for ever). Timeouts do not count.
    pub max_head_failures: u32,
    /// **Breaks the delivery contract; for the loss oracle's own test only.**
    /// Deletes each message from the store as soon as it is published
    /// instead of on its PUBACK, so a fault loses what was in flight.
    /// `vigil-sim`'s test sets it to show the oracle reports the loss. Vigil
    /// logs an error at start when it is on. Never set it in production.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub testing_only_delete_on_send: bool,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 8883,
            protocol: Protocol::V5,
            client_id: "vigil".into(),
            username: None,
            password_file: None,
            tls: UplinkTls::default(),
            topic_prefix: "vigil".into(),
            window: None,
            max_packet_size: 256 * 1024,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_head_failures: 5,
            testing_only_delete_on_send: false,
        }
    }
}

/// The uplink's certificates. The files are read again before every
/// connection attempt, so a fixed or renewed file is used without a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkTls {
    /// CA bundle (PEM) the cloud's certificate must chain to.
    pub ca: PathBuf,
    /// Vigil's client certificate chain (PEM), leaf first. Without it Vigil
    /// connects with no client certificate (and warns).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM); must not be readable by group or others.
    pub key: Option<PathBuf>,
    /// Name the cloud's certificate must be valid for, when it differs from
    /// `host` (e.g. connecting by IP address). Defaults to `host`.
    pub server_name: Option<String>,
    /// Certificate revocation lists (PEM) of the cloud's CA: a revoked cloud
    /// certificate is refused. Re-read on every attempt, like the rest. Off
    /// unless set; then the cloud's own certificate is checked (not its
    /// intermediates), and a certificate no list covers is accepted.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl Default for UplinkTls {
    fn default() -> Self {
        Self {
            ca: PathBuf::from("certs/ca.pem"),
            cert: Some(PathBuf::from("certs/vigil.pem")),
            key: Some(PathBuf::from("certs/vigil.key")),
            server_name: None,
            crl: None,
        }
    }
}

impl ForwardConfig {
    /// Publishes allowed in flight: `forward.window`, or the protocol's default
    /// ([`DEFAULT_WINDOW_MQTT5`], [`DEFAULT_WINDOW_MQTT311`]). On MQTT 5 the
    /// cloud's Receive Maximum caps it further once connected.
    pub fn window(&self) -> u16 {
        self.window.unwrap_or(match self.protocol {
            Protocol::V5 => DEFAULT_WINDOW_MQTT5,
            Protocol::V311 => DEFAULT_WINDOW_MQTT311,
        })
    }

    /// The refusal of `testing_only_delete_on_send` when it is set in a
    /// `release` build (debug builds run the oracle's negative control with
    /// it; a release build never acts on it).
    pub fn negative_control_refused(&self, release: bool) -> Option<String> {
        (release && self.testing_only_delete_on_send).then(|| {
            "forward.testing_only_delete_on_send exists only in debug builds, for the \
             oracle's negative control; remove it"
                .into()
        })
    }

    /// Every problem at once, each naming the key and the fix.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.host.trim().is_empty() {
            p.push("forward.host is empty: set the cloud broker's host name".into());
        }
        if self.port == 0 {
            p.push("forward.port is 0: set the cloud broker's TLS port (usually 8883)".into());
        }
        if self.client_id.is_empty() || self.client_id.len() > 65535 {
            p.push("forward.client_id must be 1 to 65535 bytes".into());
        }
        match (&self.username, &self.password_file) {
            (Some(u), _) if u.is_empty() || u.len() > 65535 => p.push(
                "forward.username must be 1 to 65535 bytes: set the name the cloud expects, \
                 or remove the key to send none"
                    .into(),
            ),
            (None, Some(_)) => p.push(
                "forward.password_file is set without forward.username: MQTT 3.1.1 sends a \
                 password only with a user name, and clouds that check one check both; set \
                 forward.username"
                    .into(),
            ),
            _ => {}
        }
        let prefix = &self.topic_prefix;
        if prefix.is_empty()
            || prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains(['+', '#', '\0'])
        {
            p.push(format!(
                "forward.topic_prefix {prefix:?} must be a non-empty topic without wildcards \
                 or leading/trailing '/', e.g. \"vigil/ward-3\""
            ));
        }
        if self.window == Some(0) {
            p.push("forward.window is 0: at least 1 publish must be allowed in flight".into());
        }
        if self.max_packet_size < 1024 {
            p.push(format!(
                "forward.max_packet_size {} is too small: an envelope needs room for its \
                 header; use at least 1024 (default 262144)",
                self.max_packet_size
            ));
        }
        // rumqttc panics below 5 s on MQTT 5 (and MQTT counts whole seconds).
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive > Duration::from_secs(65535)
        {
            p.push(format!(
                "forward.keep_alive is {:?}; it must be between 5s and 65535s (e.g. 30s)",
                self.keep_alive
            ));
        }
        if self.connect_timeout < Duration::from_secs(1) {
            p.push("forward.connect_timeout must be at least 1s".into());
        }
        if self.ack_timeout.is_zero() {
            p.push("forward.ack_timeout must be above 0, e.g. 30s".into());
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            p.push("forward.backoff_min must be above 0 and at most forward.backoff_max".into());
        }
        if self.max_head_failures == 0 {
            p.push("forward.max_head_failures must be at least 1".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            p.push("forward.tls.cert and forward.tls.key go together: set both or neither".into());
        }
        if self
            .tls
            .server_name
            .as_deref()
            .is_some_and(|n| rustls::pki_types::ServerName::try_from(n).is_err())
        {
            p.push("forward.tls.server_name is not a valid DNS name or IP address".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_problems_are_all_reported() {
        assert!(ForwardConfig::default().problems().is_empty());
        let bad = ForwardConfig {
            host: String::new(),
            topic_prefix: "a/#".into(),
            window: Some(0),
            max_head_failures: 0,
            tls: UplinkTls {
                key: None,
                ..UplinkTls::default()
            },
            ..ForwardConfig::default()
        };
        let p = bad.problems();
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p.iter().any(|m| m.contains("forward.topic_prefix")));
        assert!(p.iter().any(|m| m.contains("forward.tls.key")));
    }

    /// Unset, the window is the protocol's default; set, it is what was set.
    #[test]
    fn the_window_defaults_by_protocol() {
        let v5 = ForwardConfig::default();
        assert_eq!(
            (v5.protocol, v5.window()),
            (Protocol::V5, DEFAULT_WINDOW_MQTT5)
        );
        let v311 = ForwardConfig {
            protocol: Protocol::V311,
            ..ForwardConfig::default()
        };
        assert_eq!(v311.window(), DEFAULT_WINDOW_MQTT311);
        for protocol in [Protocol::V5, Protocol::V311] {
            let set = ForwardConfig {
                protocol,
                window: Some(10),
                ..ForwardConfig::default()
            };
            assert_eq!(set.window(), 10);
            assert!(set.problems().is_empty());
        }
    }

    /// A password needs a user name to go with it, and a user name must fit
    /// MQTT's 16-bit length.
    #[test]
    fn a_login_must_be_a_user_name_with_an_optional_password_file() {
        let with = |username: Option<&str>, password_file: Option<&str>| ForwardConfig {
            username: username.map(str::to_string),
            password_file: password_file.map(PathBuf::from),
            ..ForwardConfig::default()
        };
        assert!(with(Some("ward-3"), None).problems().is_empty());
        assert!(
            with(Some("ward-3"), Some("/etc/vigil/cloud.pass"))
                .problems()
                .is_empty()
        );
        let none = with(None, Some("/etc/vigil/cloud.pass")).problems();
        assert!(
            none.iter()
                .any(|m| m.contains("forward.password_file") && m.contains("set forward.username")),
            "{none:?}"
        );
        for bad in [String::new(), "u".repeat(65536)] {
            let p = with(Some(&bad), None).problems();
            assert!(
                p.iter().any(|m| m.contains("forward.username must be")),
                "{p:?}"
            );
        }
    }

    /// rumqttc's MQTT 5 client panics on a keep-alive under 5 s: the
    /// configuration refuses it with a message instead.
    #[test]
    fn a_keep_alive_rumqttc_would_panic_on_is_refused() {
        for secs in [0, 1, 4] {
            let c = ForwardConfig {
                keep_alive: Duration::from_secs(secs),
                ..ForwardConfig::default()
            };
            let p = c.problems();
            assert!(
                p.iter()
                    .any(|m| m.contains("forward.keep_alive") && m.contains("5s")),
                "{p:?}"
            );
        }
    }
}
