//! The gate's frame handling: whatever a device sends, the fixed-header
//! parser and the MQTT 3.1.1 / 5 packet decoders the gate runs on a complete
//! frame must return, never panic, and never claim more bytes than exist.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::gate::frame;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, body))) = frame::parse_header(data) else {
        return;
    };
    let total = header.saturating_add(body);
    if total > data.len() {
        return;
    }
    let bytes = &data[..total];
    let mut buf = bytes::BytesMut::from(bytes);
    let _ = rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1 << 20);
    let mut buf = bytes::BytesMut::from(bytes);
    let _ = rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, Some(1 << 20));
});
