//! libFuzzer entry; the check itself is in `checks/request_head.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetgate_fuzz::request_head::run(data));
