//! libFuzzer entry; the check itself is in `checks/config.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetgate_fuzz::config::run(data));
