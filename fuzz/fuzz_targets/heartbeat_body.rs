//! libFuzzer entry; the check itself is in `checks/heartbeat_body.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetgate_fuzz::heartbeat_body::run(data));
