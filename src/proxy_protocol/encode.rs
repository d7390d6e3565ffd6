//! Writing the header we send before a client's bytes to a backend.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use super::parse::V2_SIGNATURE;

/// Which header a pool's backends expect (`send_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    /// The text line, understood by nginx, Apache, Postfix and most others.
    V1,
    /// The binary form: fixed size, cheaper to parse.
    V2,
}

/// The header for a connection from `source` to `destination`.
///
/// Both addresses must be of one family: an IPv4 address next to an IPv6
/// one (a dual-stack listener, or a header received from an IPv6 proxy)
/// is written as its IPv4-mapped IPv6 form, and an IPv4-mapped address
/// next to another IPv4 one as plain IPv4.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        Version::V1 => {
            let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut out = Vec::with_capacity(super::parse::V1_MAX_LEN);
            // Writing to a Vec cannot fail.
            let _ = write!(
                out,
                "PROXY {proto} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            );
            out
        }
        Version::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            // Version 2, command PROXY.
            out.push(0x21);
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    // AF_INET, STREAM; 12 bytes of addresses.
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    // AF_INET6, STREAM; 36 bytes of addresses.
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
            out
        }
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn same_family(s: SocketAddr, d: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(s), canonical(d));
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        let up = |a: SocketAddr| SocketAddr::new(IpAddr::V6(v6(a.ip())), a.port());
        (up(s), up(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::{parse, Addresses, Parsed};

    fn round_trip(v: Version, s: &str, d: &str) -> (Vec<u8>, Option<Addresses>) {
        let wire = encode(v, s.parse().unwrap(), d.parse().unwrap());
        let Ok(Parsed::Complete(h)) = parse(&wire) else {
            panic!("{wire:?} does not parse");
        };
        assert_eq!(h.len, wire.len());
        (wire, h.addresses)
    }

    fn addrs(s: &str, d: &str) -> Option<Addresses> {
        Some(Addresses {
            source: s.parse().unwrap(),
            destination: d.parse().unwrap(),
        })
    }

    #[test]
    fn v1_lines() {
        let (wire, a) = round_trip(Version::V1, "192.0.2.7:5000", "10.0.0.1:443");
        assert_eq!(wire, b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 443\r\n");
        assert_eq!(a, addrs("192.0.2.7:5000", "10.0.0.1:443"));
        let (wire, _) = round_trip(Version::V1, "[2001:db8::7]:1", "[2001:db8::1]:2");
        assert_eq!(wire, b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n");
    }

    #[test]
    fn v2_bytes() {
        let (wire, a) = round_trip(Version::V2, "172.19.0.1:42578", "172.19.0.3:80");
        assert_eq!(
            wire,
            [
                0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
                0x00, 0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50
            ]
        );
        assert_eq!(a, addrs("172.19.0.1:42578", "172.19.0.3:80"));
        let (wire, a) = round_trip(Version::V2, "[2001:db8::7]:1", "[2001:db8::1]:2");
        assert_eq!((wire.len(), wire[13]), (52, 0x21));
        assert_eq!(a, addrs("[2001:db8::7]:1", "[2001:db8::1]:2"));
    }

    #[test]
    fn mixed_families_meet_in_one() {
        // An IPv4 client on a dual-stack socket.
        let (_, a) = round_trip(Version::V1, "[::ffff:192.0.2.7]:1", "10.0.0.1:2");
        assert_eq!(a, addrs("192.0.2.7:1", "10.0.0.1:2"));
        // An IPv6 client declared to an IPv4 listener.
        let (_, a) = round_trip(Version::V2, "[2001:db8::7]:1", "10.0.0.1:2");
        assert_eq!(a, addrs("[2001:db8::7]:1", "[::ffff:10.0.0.1]:2"));
    }
}
