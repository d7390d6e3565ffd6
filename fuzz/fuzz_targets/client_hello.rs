//! libFuzzer entry; the check itself is in `checks/client_hello.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetgate_fuzz::client_hello::run(data));
