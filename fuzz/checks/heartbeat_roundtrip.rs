//! Structured input: every heartbeat the encoder accepts decodes to itself,
//! and the encoder refuses (rather than panics on) everything else.

use std::net::IpAddr;

use arbitrary::{Result, Unstructured};
use fleetgate::discovery::{wire, Heartbeat, NodeState, Service, Token};

fn heartbeat(u: &mut Unstructured) -> Result<Heartbeat> {
    let state = *u.choose(&NodeState::ALL)?;
    let addr = match u.int_in_range(0..=2u8)? {
        0 => None,
        1 => Some(IpAddr::from(u.arbitrary::<[u8; 4]>()?)),
        _ => Some(IpAddr::from(u.arbitrary::<[u8; 16]>()?)),
    };
    let n = u.int_in_range(0..=17usize)?;
    let mut services = Vec::with_capacity(n);
    for _ in 0..n {
        services.push(Service {
            name: u.arbitrary()?,
            port: u.arbitrary()?,
            tls: u.arbitrary()?,
        });
    }
    Ok(Heartbeat {
        cluster: u.arbitrary()?,
        node: u.arbitrary()?,
        boot_id: u.arbitrary()?,
        seq: u.arbitrary()?,
        sent_at_ms: u.arbitrary()?,
        state,
        weight: u.arbitrary()?,
        load: u.arbitrary()?,
        addr,
        services,
    })
}

pub fn run(data: &[u8]) {
    let token = Token::from_bytes([0x42; 32]);
    let Ok(hb) = heartbeat(&mut Unstructured::new(data)) else {
        return;
    };
    if let Ok(bytes) = wire::encode(&hb, &token) {
        assert!(bytes.len() <= wire::MAX_LEN);
        assert_eq!(
            wire::decode(&bytes, &token).expect("encoded heartbeats decode"),
            hb
        );
    }
}
