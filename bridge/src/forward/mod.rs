//! Forward: stored messages to the cloud over mutual-TLS MQTT at QoS 1,
//! deleted from the store only on the cloud's PUBACK.
//!
//! Work in progress (issue 4): [`session`] holds the in-flight window, the
//! packet-id mapping and the replay rules as plain state; the driver that owns
//! rumqttc, the TLS set-up, the envelope and dead-lettering come next.

pub mod session;
