//! The check of fjall's journal that runs before every open
//! (`store/journal.rs`): any bytes in a journal file must give a result or an
//! error, never a panic, an endless loop or an allocation the file's size does
//! not bound; and what it leaves must check clean a second time (a repair is
//! complete in one pass).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .expect("temp dir");
    std::fs::write(dir.path().join("lock"), b"").expect("lock file");
    std::fs::write(dir.path().join("0.jnl"), data).expect("journal");
    let Ok(first) = vigil::store::check_journal(dir.path()) else {
        return;
    };
    let second = vigil::store::check_journal(dir.path()).expect("second check");
    if first.batches > 0 {
        assert_eq!(second.damaged, 0, "{first:?} then {second:?}");
    }
});
