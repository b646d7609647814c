//! The stored-record decoder: any bytes read back from disk must give an
//! error, never a panic: the sealed-record header path (`Seal::open`), and
//! the body decoders that run on what AES-GCM authenticated (every body
//! format of an `Event` and a `DeadLetterEntry` ever written, and the
//! quarantine entry).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::crypto::{DataKey, MasterKey};
use vigil::event::Event;
use vigil::store::record::{self, Body, DeadLetterEntry, Seal};

fuzz_target!(|data: &[u8]| {
    let key = DataKey::derive(&MasterKey::from_bytes([7; 32]), &[1; 16]);
    let seal = Seal {
        key: &key,
        store_id: &[1; 16],
        keyspace: "lane-1",
        seq: 42,
    };
    let _ = seal.open::<Event>(data);
    let _ = record::epoch_of(data);
    let _ = record::seq_of(data);
    let _ = record::decode_quarantine(data);
    if let Some((&format, body)) = data.split_first() {
        let _ = Event::decode(format, body);
        let _ = DeadLetterEntry::decode(format, body);
    }
    if let Ok(event) = postcard::from_bytes::<Event>(data) {
        // Whatever decodes must seal and open again unchanged.
        let sealed = seal.seal(1, &event).expect("seal");
        let opened: Event = seal.open(&sealed).expect("open");
        assert_eq!(opened, event);
    }
});
