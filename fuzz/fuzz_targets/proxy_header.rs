//! libFuzzer entry; the check itself is in `checks/proxy_header.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetgate_fuzz::proxy_header::run(data));
