//! What this build of fleetgate can do, for `fleetgate --version` (as
//! `nginx -V` prints its configure flags): an operator or a bug report
//! learns from the binary itself whether L4 relays use splice(2), which TLS
//! versions and suites handshakes offer, which stores the devices module
//! can use.
//!
//! Every line is read from the code that does the work (the `cfg` that
//! compiles the splice relay, the TLS provider and version list listeners
//! are built with, the SQLite library linked in), never written by hand,
//! so it stays true when those change.

use std::fmt::Write as _;

use crate::tls::{self, MinVersion};

/// The feature lines, as (name, description) pairs, in display order.
/// `allocator` is the global allocator's type path, which only the binary
/// knows (see `src/main.rs`).
pub fn features(allocator: &str) -> Vec<(&'static str, String)> {
    vec![
        ("target", target()),
        ("l4 relay", l4_relay().to_string()),
        ("tls", tls_line()),
        (
            "tls 1.3 suites",
            cipher_suites(rustls::ProtocolVersion::TLSv1_3),
        ),
        (
            "tls 1.2 suites",
            cipher_suites(rustls::ProtocolVersion::TLSv1_2),
        ),
        ("tls groups", kx_groups()),
        ("http", "HTTP/1.1, HTTP/2, WebSocket".to_string()),
        ("stores", stores()),
        ("systemd", systemd().to_string()),
        ("allocator", crate_of(allocator).to_string()),
    ]
}

/// The text after `fleetgate ` for `--version`: the version, then one
/// indented `name: description` line per feature.
pub fn long_version(allocator: &str) -> String {
    let mut out = String::from(env!("CARGO_PKG_VERSION"));
    let features = features(allocator);
    let width = features
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    for (name, what) in features {
        let _ = write!(
            out,
            "\n  {:<width$}  {what}",
            format!("{name}:"),
            width = width + 1
        );
    }
    out
}

fn target() -> String {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!(
        "{}-{} ({profile})",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// The same `cfg` that compiles `l4::splice` and the splice path of `l4::way`.
fn l4_relay() -> &'static str {
    if cfg!(target_os = "linux") {
        "splice(2) zero-copy, pooled pipes"
    } else {
        "buffered copy"
    }
}

/// The provider and the versions a listener with the default minimum
/// (`min_version = "1.2"`) offers, newest first.
fn tls_line() -> String {
    let versions: Vec<&str> = MinVersion::default()
        .versions()
        .iter()
        .map(|v| match v.version {
            rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2",
            _ => "other",
        })
        .collect();
    let fips = if tls::provider().fips() { ", FIPS" } else { "" };
    format!("rustls, ring provider{fips}; {}", versions.join(", "))
}

fn cipher_suites(version: rustls::ProtocolVersion) -> String {
    let names: Vec<String> = tls::provider()
        .cipher_suites
        .iter()
        .filter(|s| s.version().version == version)
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    names.join(", ")
}

fn kx_groups() -> String {
    let names: Vec<String> = tls::provider()
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    names.join(", ")
}

/// SQLite is compiled in (rusqlite's `bundled`): its version is the one
/// this binary runs, whatever the system has.
fn stores() -> String {
    format!("sqlite {} (bundled), postgresql", rusqlite::version())
}

fn systemd() -> &'static str {
    "notify (READY, RELOADING, STOPPING, STATUS), watchdog"
}

/// `mimalloc::MiMalloc` → `mimalloc`; `std::alloc::System` → `system`.
fn crate_of(type_path: &str) -> &str {
    match type_path {
        "std::alloc::System" => "system",
        _ => type_path.split("::").next().unwrap_or(type_path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_names_its_crate() {
        assert_eq!(crate_of("mimalloc::MiMalloc"), "mimalloc");
        assert_eq!(crate_of("std::alloc::System"), "system");
    }

    #[test]
    fn default_listener_versions_are_listed_newest_first() {
        assert!(tls_line().ends_with("TLS 1.3, TLS 1.2"), "{}", tls_line());
    }
}
