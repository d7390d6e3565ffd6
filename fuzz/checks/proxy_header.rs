//! Any bytes as the start of a connection from a trusted proxy: the
//! PROXY protocol v1/v2 parser must return, never panic; a header it
//! accepts parses the same from its own bytes and its addresses encode
//! again (src/proxy_protocol/).

pub fn run(data: &[u8]) {
    fleetgate::proxy_protocol::fuzz_one(data);
}
