//! What each fuzz target checks, one file a target. The same functions run
//! under libFuzzer (`fuzz_targets/`, nightly) and, on every input kept in
//! `corpus/`, in the ordinary test suite (`tests/fuzz_corpus.rs`), so a
//! crash once found stays fixed without nightly.
//!
//! Each `run` must return for any input; a panic is a finding.

pub mod client_hello;
pub mod config;
pub mod heartbeat_body;
pub mod heartbeat_decode;
pub mod heartbeat_roundtrip;
pub mod proxy_header;
pub mod request_head;

/// What a target checks on one input.
pub type Check = fn(&[u8]);

/// Every target: its corpus folder name and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("client_hello", client_hello::run),
    ("config", config::run),
    ("heartbeat_body", heartbeat_body::run),
    ("heartbeat_decode", heartbeat_decode::run),
    ("heartbeat_roundtrip", heartbeat_roundtrip::run),
    ("proxy_header", proxy_header::run),
    ("request_head", request_head::run),
];
