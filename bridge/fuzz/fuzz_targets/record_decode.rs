//! The stored-record decoder: any bytes read back from disk must give an
//! error, never a panic: the sealed-record header path (`Seal::open`), and
//! the body decoder that runs on what AES-GCM authenticated (postcard into
//! an `Event`, and the quarantine entry).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::crypto::{DataKey, MasterKey};
use vigil::event::Event;
use vigil::store::record::{self, EVENT_FORMAT, Seal};

fuzz_target!(|data: &[u8]| {
    let key = DataKey::derive(&MasterKey::from_bytes([7; 32]), &[1; 16]);
    let seal = Seal {
        key: &key,
        store_id: &[1; 16],
        keyspace: "lane-1",
        seq: 42,
    };
    let _ = seal.open::<Event>(EVENT_FORMAT, data);
    let _ = record::epoch_of(data);
    let _ = record::seq_of(data);
    let _ = record::decode_quarantine(data);
    if let Ok(event) = postcard::from_bytes::<Event>(data) {
        // Whatever decodes must seal and open again unchanged.
        let sealed = seal.seal(1, EVENT_FORMAT, &event).expect("seal");
        let opened: Event = seal.open(EVENT_FORMAT, &sealed).expect("open");
        assert_eq!(opened, event);
    }
});
