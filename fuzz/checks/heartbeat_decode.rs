//! Any datagram: decode must return, never panic; whatever it accepts
//! must re-encode to the same bytes (the encoding is canonical).

use fleetgate::discovery::{wire, Token};

pub fn run(data: &[u8]) {
    let token = Token::from_bytes([0x42; 32]);
    if let Ok(hb) = wire::decode(data, &token) {
        assert_eq!(
            wire::encode(&hb, &token).expect("decoded heartbeats encode"),
            data
        );
    }
}
