//! Vigil: a store-and-forward MQTT bridge for hospital wards.
//!
//! # Map of the crate
//!
//! Data flows one way, and only acknowledgements flow back, through the store:
//!
//! ```text
//! device --MQTT--> gate --> store (fjall, encrypted, fsynced) --> forward --mTLS--> cloud
//!                                   ^                                 |
//!                                   +--------- cloud PUBACK: ack -----+
//! ```
//!
//! * [`gate`]: where devices connect: TCP/TLS listeners, authentication,
//!   topic rules, and a relay to the embedded rumqttd that releases each
//!   device's PUBACK only after the store has committed the message.
//! * [`event`]: the unit that flows: a device message with its identity
//!   (UUID v7 id, per-device sequence number, SHA-256 of its canonical encoding).
//! * [`store`]: the durable queue: one lane per priority, group commit with
//!   fsync, deletion only on the cloud's ack, counted eviction under a quota,
//!   dead-letter and quarantine. Its module docs are the storage design.
//! * [`crypto`]: AES-256-GCM sealing of stored records and master-key loading;
//!   used only by the store.
//! * [`forward`]: the cloud side: one task owning a mutual-TLS MQTT
//!   connection, a window of QoS 1 publishes in priority order, each message
//!   wrapped in the versioned [`forward::envelope`] and deleted from the store
//!   only on its PUBACK; refusals and oversize messages go to dead-letter.
//! * [`pem`]: certificate and key files for both TLS ends.
//! * [`state`]: the cloud link state (`offline`, `syncing`, `online`) and its
//!   legal transitions.
//! * [`operator`]: `/health`, `/status` and `/metrics` on a loopback
//!   listener.
//! * [`config`]: `vigil.toml` and `VIGIL__*` overrides, checked as a whole.
//! * [`daemon`]: `vigil run`: store, gate and forwarder together, and the
//!   graceful stop.
//! * [`demo`]: `vigil demo`: a loopback cloud, Vigil and simulated monitors
//!   through a cut link, judged by `vigil-sim`'s oracle.
//! * [`cli`]: the `vigil` command.
//!
//! The delivery contract these modules keep is in the README and in
//! `DESIGN.md` section 1.

pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod demo;
pub mod event;
pub mod forward;
pub mod gate;
pub mod operator;
pub mod pem;
pub mod state;
pub mod store;
