//! `vigil-sim`: how anyone proves, on their own machine, that Vigil loses
//! nothing.
//!
//! * [`pki`]: the development PKI (CA, cloud server, Vigil client, device
//!   certificates), made with rcgen on demand and never committed.
//! * [`cloud`]: the loopback cloud: rumqttd with mutual TLS and a verifying
//!   subscriber that writes the cloud's ledger.
//! * [`devices`]: simulated bedside monitors (vitals, ECG, alarms) that
//!   record what Vigil acknowledged.
//! * [`envelope`]: the cloud's side of Vigil's envelope, written from its
//!   documentation: parse, recover the payload, check the sha256.
//! * [`operator`]: a client of Vigil's `/status` and `/metrics`.
//! * [`pem`]: the PKI's PEM files as rustls types.
//! * [`ledger`]: what each side recorded: devices write what Vigil
//!   acknowledged, the verifying cloud what arrived.
//! * [`ports`]: loopback ports for the processes a test starts, chosen
//!   below the kernel's ephemeral range so no `bind(0)` takes them first.
//! * [`proxy`]: a fault proxy (refuse, reset, blackhole, latency, bandwidth
//!   cap, one byte per write; dropping PUBACKs when it terminates TLS),
//!   switchable while it runs.
//! * [`scenario`]: cloud, proxy, the real `vigil` binary and the devices
//!   under a timeline of faults, then a drain and the report.
//! * [`oracle`]: the verdict from the two ledgers (`DESIGN.md` section 4):
//!   lost and unexpected must be 0; duplicated and reordered are reported.
//! * [`bench`](mod@bench): the performance targets measured in one run against the
//!   real `vigil` binary (optionally beside a Mosquitto bridge), one table.

pub mod bench;
pub mod cloud;
pub mod devices;
pub mod envelope;
pub mod ledger;
pub mod operator;
pub mod oracle;
pub mod pem;
pub mod pki;
pub mod ports;
pub mod proxy;
pub mod scenario;
