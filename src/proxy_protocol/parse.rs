//! Parsing a PROXY protocol header from the first bytes of a connection.
//!
//! Version 1 is one text line (`PROXY TCP4 SRC DST SPORT DPORT\r\n`, at
//! most 107 bytes); version 2 a 16-byte binary prefix (a 12-byte
//! signature, version and command, family and transport, length) and then
//! that many bytes of addresses and TLVs. Both are told apart by their
//! first byte, and bytes that cannot start either are refused at once,
//! without waiting for more.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Addresses;

/// The longest version 1 header the specification allows, CRLF included.
pub const V1_MAX_LEN: usize = 107;
pub const V1_PREFIX: &[u8] = b"PROXY ";
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family, length.
pub const V2_FIXED_LEN: usize = 16;
/// The largest header accepted, either version. A version 2 length field
/// could announce 64 KiB; addresses take at most 216 bytes and the TLVs
/// that load balancers add (cloud endpoint ids, TLS facts) a few hundred,
/// so more is refused rather than buffered.
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + 2048;

const V2_INET_LEN: usize = 12;
const V2_INET6_LEN: usize = 36;
const V2_UNIX_LEN: usize = 216;

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// The bytes the header takes at the start of the stream.
    pub len: usize,
    /// `None` for what carries no usable address: version 1 `UNKNOWN`,
    /// version 2 `LOCAL` (a health check by the proxy itself), and the
    /// `AF_UNIX` and `AF_UNSPEC` families. The connection then keeps its
    /// own addresses.
    pub addresses: Option<Addresses>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Complete(Header),
    /// More bytes are needed. `total` is the header's full length once
    /// it is known (a version 2 length field has been read).
    Partial {
        total: Option<usize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "not a PROXY protocol header (starts with neither \"PROXY \" nor the version 2 signature)"
    )]
    NotProxy,
    #[error("version 1 header without CRLF within {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("malformed version 1 header: {0}")]
    V1Malformed(&'static str),
    #[error("version 2 signature with version {0} (only 2 exists)")]
    V2Version(u8),
    #[error("version 2 header with command {0} (only LOCAL 0 and PROXY 1 exist)")]
    V2Command(u8),
    #[error("version 2 header with address family {0} (0 to 3 exist)")]
    V2Family(u8),
    #[error("version 2 header with transport {0} for an IP family (only STREAM 1 is served)")]
    V2Transport(u8),
    #[error("version 2 header of {0} bytes (at most {MAX_HEADER_LEN} accepted)")]
    V2TooLong(usize),
    #[error("version 2 header of {len} bytes is too short for its {family} addresses")]
    V2ShortAddress { family: &'static str, len: usize },
    #[error("version 2 header with a malformed TLV: {0}")]
    V2Tlv(&'static str),
}

impl ParseError {
    /// Short label for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::NotProxy => "not_proxy",
            ParseError::V1TooLong => "v1_too_long",
            ParseError::V1Malformed(_) => "v1_malformed",
            ParseError::V2Version(_) => "v2_version",
            ParseError::V2Command(_) => "v2_command",
            ParseError::V2Family(_) => "v2_family",
            ParseError::V2Transport(_) => "v2_transport",
            ParseError::V2TooLong(_) => "v2_too_long",
            ParseError::V2ShortAddress { .. } => "v2_short_address",
            ParseError::V2Tlv(_) => "v2_tlv",
        }
    }
}

/// Parse the header at the start of `data`; bytes after it are not
/// looked at (and never more than [`MAX_HEADER_LEN`] bytes).
pub fn parse(data: &[u8]) -> Result<Parsed, ParseError> {
    let Some(&first) = data.first() else {
        return Ok(Parsed::Partial { total: None });
    };
    if first == V1_PREFIX[0] {
        parse_v1(data)
    } else if first == V2_SIGNATURE[0] {
        parse_v2(data)
    } else {
        Err(ParseError::NotProxy)
    }
}

/// Whether `data` so far agrees with `prefix` (as far as either goes).
fn agrees(data: &[u8], prefix: &[u8]) -> bool {
    let n = data.len().min(prefix.len());
    data[..n] == prefix[..n]
}

fn parse_v1(data: &[u8]) -> Result<Parsed, ParseError> {
    if !agrees(data, V1_PREFIX) {
        return Err(ParseError::NotProxy);
    }
    let window = &data[..data.len().min(V1_MAX_LEN)];
    // Garbage is refused as soon as it is seen, not after a timeout.
    let Some(cr) = window.iter().position(|&b| !(b' '..=b'~').contains(&b)) else {
        return if window.len() == V1_MAX_LEN {
            Err(ParseError::V1TooLong)
        } else {
            Ok(Parsed::Partial { total: None })
        };
    };
    if window[cr] != b'\r' {
        return Err(ParseError::V1Malformed(
            "a byte that is not printable ASCII",
        ));
    }
    match window.get(cr + 1) {
        None if cr + 1 == V1_MAX_LEN => return Err(ParseError::V1TooLong),
        None => return Ok(Parsed::Partial { total: None }),
        Some(b'\n') => {}
        Some(_) => return Err(ParseError::V1Malformed("CR not followed by LF")),
    }
    // Printable ASCII only, checked above.
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..cr])
        .map_err(|_| ParseError::V1Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    let addresses = match fields.next() {
        // The sender could not tell the addresses: what follows does not
        // matter.
        Some("UNKNOWN") => None,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let v6 = proto == "TCP6";
            let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(ParseError::V1Malformed(
                    "expected PROTO SRC DST SPORT DPORT separated by single spaces",
                ));
            };
            Some(Addresses {
                source: SocketAddr::new(v1_ip(src, v6)?, v1_port(sport)?),
                destination: SocketAddr::new(v1_ip(dst, v6)?, v1_port(dport)?),
            })
        }
        _ => {
            return Err(ParseError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Parsed::Complete(Header {
        version: 1,
        len: cr + 2,
        addresses,
    }))
}

fn v1_ip(s: &str, v6: bool) -> Result<IpAddr, ParseError> {
    if v6 {
        s.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ParseError::V1Malformed("TCP6 address is not an IPv6 address"))
    } else {
        s.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ParseError::V1Malformed("TCP4 address is not a dotted-quad IPv4 address"))
    }
}

fn v1_port(s: &str) -> Result<u16, ParseError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::V1Malformed("port is not a decimal number"));
    }
    s.parse::<u16>()
        .map_err(|_| ParseError::V1Malformed("port is above 65535"))
}

fn parse_v2(data: &[u8]) -> Result<Parsed, ParseError> {
    if !agrees(data, &V2_SIGNATURE) {
        return Err(ParseError::NotProxy);
    }
    if let Some(&ver_cmd) = data.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(ParseError::V2Version(ver_cmd >> 4));
        }
        if ver_cmd & 0x0f > 1 {
            return Err(ParseError::V2Command(ver_cmd & 0x0f));
        }
    }
    if let Some(&fam) = data.get(13) {
        if fam >> 4 > 3 {
            return Err(ParseError::V2Family(fam >> 4));
        }
    }
    if data.len() < V2_FIXED_LEN {
        return Ok(Parsed::Partial { total: None });
    }
    let (ver_cmd, fam) = (data[12], data[13]);
    let total = V2_FIXED_LEN + usize::from(u16::from_be_bytes([data[14], data[15]]));
    if total > MAX_HEADER_LEN {
        return Err(ParseError::V2TooLong(total));
    }
    let Some(block) = data.get(V2_FIXED_LEN..total) else {
        return Ok(Parsed::Partial { total: Some(total) });
    };
    let done = |addresses| {
        Ok(Parsed::Complete(Header {
            version: 2,
            len: total,
            addresses,
        }))
    };
    // LOCAL: the proxy speaking for itself (a health check); whatever the
    // block holds is to be ignored.
    if ver_cmd & 0x0f == 0 {
        return done(None);
    }
    let (family, transport) = (fam >> 4, fam & 0x0f);
    let (name, addr_len) = match family {
        // AF_UNSPEC: no addresses; the block is not ours to read.
        0 => return done(None),
        1 => ("IPv4", V2_INET_LEN),
        2 => ("IPv6", V2_INET6_LEN),
        _ => ("AF_UNIX", V2_UNIX_LEN),
    };
    if block.len() < addr_len {
        return Err(ParseError::V2ShortAddress {
            family: name,
            len: total,
        });
    }
    let (addrs, tlvs) = block.split_at(addr_len);
    check_tlvs(tlvs)?;
    let addresses = match family {
        1 | 2 if transport != 1 => return Err(ParseError::V2Transport(transport)),
        1 => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 4]>::try_from(&addrs[at..at + 4]).unwrap_or_default())
            };
            let port = |at: usize| u16::from_be_bytes([addrs[at], addrs[at + 1]]);
            Some(Addresses {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            })
        }
        2 => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 16]>::try_from(&addrs[at..at + 16]).unwrap_or_default())
            };
            let port = |at: usize| u16::from_be_bytes([addrs[at], addrs[at + 1]]);
            Some(Addresses {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        // AF_UNIX: paths, nothing an IP-based balancer can use.
        _ => None,
    };
    done(addresses)
}

/// TLVs are skipped, but only when they are well formed: a TLV running
/// past the header means the sender and we disagree on where the
/// client's bytes start.
fn check_tlvs(mut rest: &[u8]) -> Result<(), ParseError> {
    while !rest.is_empty() {
        let [_kind, hi, lo, tail @ ..] = rest else {
            return Err(ParseError::V2Tlv("truncated type and length"));
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        rest = tail
            .get(len..)
            .ok_or(ParseError::V2Tlv("value runs past the header"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(data: &[u8]) -> Header {
        match parse(data) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{data:?}: {other:?}"),
        }
    }

    fn addrs(src: &str, dst: &str) -> Option<Addresses> {
        Some(Addresses {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        })
    }

    #[test]
    fn v1_examples_from_the_specification() {
        let h = complete(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n");
        assert_eq!(h.version, 1);
        assert_eq!(h.len, 47);
        assert_eq!(h.addresses, addrs("192.168.0.1:56324", "192.168.0.11:443"));
        // The specification's worst case for TCP4: 56 bytes.
        let h = complete(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
        assert_eq!(h.len, 56);
        assert_eq!(
            h.addresses,
            addrs("255.255.255.255:65535", "255.255.255.255:65535")
        );
    }

    #[test]
    fn v1_tcp6_unknown_and_the_worst_case_length() {
        let h = complete(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n");
        assert_eq!(h.addresses, addrs("[2001:db8::1]:1", "[2001:db8::2]:65535"));
        let h = complete(b"PROXY UNKNOWN\r\n");
        assert_eq!((h.len, h.addresses), (15, None));
        // UNKNOWN may be followed by anything up to the CRLF.
        let h = complete(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\nrest");
        assert_eq!(h.addresses, None);
        // The specification's worst cases: 104 bytes for TCP6, 107 for
        // UNKNOWN with the same fields behind it.
        let ff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {ff} {ff} 65535 65535\r\n");
        assert_eq!(complete(tcp6.as_bytes()).len, 104);
        let unknown = format!("PROXY UNKNOWN {ff} {ff} 65535 65535\r\n");
        assert_eq!(unknown.len(), V1_MAX_LEN);
        assert_eq!(complete(unknown.as_bytes()).len, V1_MAX_LEN);
    }

    #[test]
    fn v1_needs_more_until_the_crlf() {
        let full = b"PROXY TCP4 10.1.2.3 10.0.0.1 4000 80\r\n";
        for n in 0..full.len() {
            assert_eq!(
                parse(&full[..n]),
                Ok(Parsed::Partial { total: None }),
                "{n}"
            );
        }
        assert_eq!(complete(full).len, full.len());
    }

    #[test]
    fn v1_refusals_name_the_problem() {
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\r\n", "not_proxy"),
            (b"PROXZ", "not_proxy"),
            (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "v1_malformed"),
            (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "v1_malformed"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX", "v1_malformed"),
            (b"PROXY TCP4 1.2.3.4\x00", "v1_malformed"),
        ];
        for (data, reason) in cases {
            let err = parse(data).expect_err(&String::from_utf8_lossy(data));
            assert_eq!(
                err.reason(),
                *reason,
                "{:?}: {err}",
                String::from_utf8_lossy(data)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(parse(&long), Err(ParseError::V1TooLong));
        // A CR in the last allowed byte with no room for its LF.
        let mut edge = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 92]].concat();
        edge.push(b'\r');
        assert_eq!(edge.len(), V1_MAX_LEN);
        assert_eq!(parse(&edge), Err(ParseError::V1TooLong));
    }

    /// The 16-byte prefix of a version 2 header.
    fn v2(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([ver_cmd, fam]);
        h.extend((block.len() as u16).to_be_bytes());
        h.extend(block);
        h
    }

    #[test]
    fn v2_tcp4_as_haproxy_sends_it() {
        // haproxy `send-proxy-v2` from 172.19.0.1:42578 to 172.19.0.3:80.
        let wire = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
            0x00, 0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50,
            b'G', b'E', b'T',
        ];
        let h = complete(&wire);
        assert_eq!((h.version, h.len), (2, 28));
        assert_eq!(h.addresses, addrs("172.19.0.1:42578", "172.19.0.3:80"));
    }

    #[test]
    fn v2_tcp6_with_tlvs_skipped() {
        let mut block = Vec::new();
        block.extend("2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend(5000u16.to_be_bytes());
        block.extend(443u16.to_be_bytes());
        // PP2_TYPE_ALPN "h2", then PP2_TYPE_NOOP padding of zero length.
        block.extend([0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        let wire = v2(0x21, 0x21, &block);
        let h = complete(&wire);
        assert_eq!(h.len, wire.len());
        assert_eq!(
            h.addresses,
            addrs("[2001:db8::7]:5000", "[2001:db8::1]:443")
        );
    }

    #[test]
    fn v2_local_unspec_and_unix_keep_the_real_peer() {
        assert_eq!(complete(&v2(0x20, 0x00, &[])).addresses, None);
        // LOCAL ignores whatever address block it has.
        assert_eq!(complete(&v2(0x20, 0x11, &[9; 12])).addresses, None);
        assert_eq!(complete(&v2(0x21, 0x00, &[1, 2, 3])).addresses, None);
        assert_eq!(complete(&v2(0x21, 0x31, &[0; 216])).addresses, None);
    }

    #[test]
    fn v2_needs_more_and_knows_how_much() {
        let wire = v2(0x21, 0x11, &[127, 0, 0, 9, 127, 0, 0, 1, 0, 1, 0, 2]);
        for n in 0..V2_FIXED_LEN {
            assert_eq!(
                parse(&wire[..n]),
                Ok(Parsed::Partial { total: None }),
                "{n}"
            );
        }
        for n in V2_FIXED_LEN..wire.len() {
            assert_eq!(parse(&wire[..n]), Ok(Parsed::Partial { total: Some(28) }));
        }
        assert_eq!(
            complete(&wire).addresses,
            addrs("127.0.0.9:1", "127.0.0.1:2")
        );
    }

    #[test]
    fn v2_refusals_name_the_problem() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\r\n\r\n\0\r\nQUIX".to_vec(), "not_proxy"),
            (v2(0x11, 0x11, &[0; 12]), "v2_version"),
            (v2(0x22, 0x11, &[0; 12]), "v2_command"),
            (v2(0x21, 0x41, &[0; 12]), "v2_family"),
            (v2(0x21, 0x12, &[0; 12]), "v2_transport"),
            (v2(0x21, 0x11, &[0; 11]), "v2_short_address"),
            (v2(0x21, 0x21, &[0; 12]), "v2_short_address"),
            (v2(0x21, 0x11, &[0; 14]), "v2_tlv"),
            (
                v2(0x21, 0x11, &[[0; 12].as_slice(), &[1, 0, 5, 1]].concat()),
                "v2_tlv",
            ),
            (v2(0x21, 0x11, &[0; 3000]), "v2_too_long"),
        ];
        for (data, reason) in cases {
            let err = parse(&data).expect_err(reason);
            assert_eq!(err.reason(), reason, "{data:?}: {err}");
        }
        // A too-long length is refused from the 16 bytes alone.
        let mut prefix = v2(0x21, 0x11, &[]);
        prefix[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            parse(&prefix).unwrap_err(),
            ParseError::V2TooLong(V2_FIXED_LEN + 65535)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let n = rng.usize(0..300);
            let mut data: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            // Half of them start like a header, to get past the first check.
            match rng.u8(0..4) {
                0 => data.splice(0..0, V1_PREFIX.iter().copied()).for_each(drop),
                1 => data.splice(0..0, V2_SIGNATURE).for_each(drop),
                _ => {}
            }
            super::super::fuzz_one(&data);
        }
    }
}
