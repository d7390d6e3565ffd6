//! Any bytes as an offloaded request head: the host, route and header
//! decisions (src/http/head.rs) must keep their promises: one authority,
//! routed and forwarded alike, and no header a backend could mistake for
//! one fleetgate sets.

pub fn run(data: &[u8]) {
    fleetgate::http::head::fuzz_request_head(data);
}
