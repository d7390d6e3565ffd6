//! Any bytes as the start of a connection: the ClientHello parser must
//! return, never panic. Whatever it accepts must be self-contained: the
//! first `wire_len` bytes give the same hello, one byte fewer gives
//! "need more", and the server name it reports is a lowercase DNS name.

use fleetgate::tls::client_hello::{parse, parse_with_limit, Parsed};

pub fn run(data: &[u8]) {
    // A cap taken from the input, so small caps are explored too.
    if let [a, b, ..] = data {
        let _ = parse_with_limit(data, usize::from(u16::from_be_bytes([*a, *b])));
    }
    let Ok(Parsed::Hello(info)) = parse(data) else {
        return;
    };
    assert!(info.wire_len > 0 && info.wire_len <= data.len());
    assert_eq!(
        parse(&data[..info.wire_len]),
        Ok(Parsed::Hello(info.clone()))
    );
    assert_eq!(parse(&data[..info.wire_len - 1]), Ok(Parsed::NeedMore));
    if let Some(sni) = &info.sni {
        assert!(!sni.is_empty() && sni.len() <= 253);
        assert!(sni
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)));
    }
    assert!(info.alpn.iter().all(|p| !p.is_empty()));
}
