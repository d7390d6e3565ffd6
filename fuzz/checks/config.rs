//! Any text as a configuration file: parsing and validation must return a
//! plan or an error, never panic, and an error must point inside the file
//! (a line that exists, or line 0 for the file as a whole).

use std::path::Path;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A path that names no real directory, so relative paths in the input
    // (certificates, data directories) resolve to nothing on the machine.
    let path = Path::new("/nonexistent-fuzz-dir/fleetgate.toml");
    if let Err(e) = fleetgate::config::parse(text, path) {
        let lines = text.lines().count().max(1) + 1;
        assert!(e.line <= lines, "line {} of {lines}: {e}", e.line);
        assert!(!e.message.is_empty(), "an error says what is wrong");
        let _ = e.to_string();
    }
}
