//! The PROXY protocol (versions 1 and 2, as specified in HAProxy's
//! `proxy-protocol.txt`): a header a proxy in front of us puts before the
//! client's bytes to say whose connection it is, and the same header we
//! put before the client's bytes on a backend connection.
//!
//! [`parse`] reads a header from bytes (never panics, never looks past a
//! bounded length), [`encode`] writes one, and [`read`] takes exactly one
//! header off an accepted socket, leaving the bytes after it in place.

pub mod accept;
pub mod encode;
pub mod parse;
pub mod read;

use std::net::SocketAddr;

pub use encode::{encode, Version};
pub use parse::{parse, Header, ParseError, Parsed};
pub use read::{read_header, ReadError};

/// The addresses a header carries: the client (`source`) and the address
/// it connected to (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Run the parser on arbitrary bytes, for fuzzing: it must return, never
/// panic, and whatever it accepts must be self-contained (the header's
/// first `len` bytes alone parse to the same header).
pub fn fuzz_one(data: &[u8]) {
    if let Ok(Parsed::Complete(h)) = parse(data) {
        assert!(h.len > 0 && h.len <= data.len() && h.len <= parse::MAX_HEADER_LEN);
        assert_eq!(parse(&data[..h.len]), Ok(Parsed::Complete(h)));
        if let Some(a) = h.addresses {
            // What we accept we can also send on.
            let v1 = encode(Version::V1, a.source, a.destination);
            let v2 = encode(Version::V2, a.source, a.destination);
            assert!(matches!(parse(&v1), Ok(Parsed::Complete(_))));
            assert!(matches!(parse(&v2), Ok(Parsed::Complete(_))));
        }
    }
}
