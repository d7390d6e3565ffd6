//! A MAC stops random datagrams before the parser; sealing the input with
//! the token first lets the fuzzer explore the parser itself (as a token
//! holder, or a buggy sender, could).

use fleetgate::discovery::{wire, Token};

pub fn run(body: &[u8]) {
    let token = Token::from_bytes([0x42; 32]);
    let sealed = wire::seal(body, &token);
    if let Ok(hb) = wire::decode(&sealed, &token) {
        assert_eq!(
            wire::encode(&hb, &token).expect("decoded heartbeats encode"),
            sealed
        );
    }
}
