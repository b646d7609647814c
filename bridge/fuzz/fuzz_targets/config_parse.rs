//! The configuration parser: any `vigil.toml` gives a configuration or a
//! list of problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut file) = tempfile::Builder::new().suffix(".toml").tempfile() else {
        return;
    };
    if std::io::Write::write_all(&mut file, text.as_bytes()).is_err() {
        return;
    }
    let env = std::collections::HashMap::new();
    if let Ok(config) = vigil::config::VigilConfig::load(Some(file.path()), &env) {
        // What loads must also pass its own checks.
        assert!(config.problems().is_empty());
    }
});
