//! The heartbeat datagram, version 1 (docs/heartbeat.md has the byte
//! table). Big-endian, length-prefixed, with an HMAC-SHA256 tag over
//! everything before it.
//!
//! Decoding reads only the fixed 5-byte prefix and the length before the
//! MAC is verified: junk costs one HMAC and no allocation, and the parser
//! only ever sees bytes a token holder wrote. The parser is still written
//! as if it faced an attacker (no indexing, every length checked), since a
//! leaked token or a buggy sender must not crash a balancer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ring::hmac;

use super::token::Token;
use super::Reason;

pub const MAGIC: [u8; 4] = *b"FGHB";
pub const VERSION: u8 = 1;
/// Fits an IPv6 minimum-MTU packet (1280 − 40 IPv6 − 8 UDP = 1232), so a
/// heartbeat is never fragmented on any path.
pub const MAX_LEN: usize = 1200;
pub const TAG_LEN: usize = 32;
pub const MAX_ID_LEN: usize = 64;
pub const MAX_SERVICES: usize = 16;
pub const MAX_WEIGHT: u16 = 1000;
/// Load figures are permille; this value on the wire means "not reported".
pub const LOAD_NONE: u16 = 0xFFFF;

/// magic, version, state, weight, load, boot id, sequence, sent-at.
const FIXED_LEN: usize = 4 + 1 + 1 + 2 + 2 + 8 + 8 + 8;
/// Fixed part, 1-byte cluster and node ids, no address, no services, tag.
pub const MIN_LEN: usize = FIXED_LEN + 2 + 2 + 1 + 1 + TAG_LEN;

/// What a node says about itself to the balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Takes new connections.
    Normal,
    /// Takes no new connections; established ones finish.
    Draining,
    /// Being updated: used only while no `normal` node is up.
    Update,
    /// Going away: forget it now.
    Leaving,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Normal,
        NodeState::Draining,
        NodeState::Update,
        NodeState::Leaving,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Normal => "normal",
            NodeState::Draining => "draining",
            NodeState::Update => "update",
            NodeState::Leaving => "leaving",
        }
    }

    fn code(self) -> u8 {
        match self {
            NodeState::Normal => 0,
            NodeState::Draining => 1,
            NodeState::Update => 2,
            NodeState::Leaving => 3,
        }
    }

    fn from_code(c: u8) -> Option<NodeState> {
        NodeState::ALL.into_iter().find(|s| s.code() == c)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?} (normal, draining, update, leaving)"))
    }
}

/// One port a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub name: String,
    pub port: u16,
    /// The port speaks TLS (informational: the balancer may pass it through
    /// or pick a TLS-aware pool).
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub cluster: String,
    pub node: String,
    /// Random per process start: tells a restart from a replay.
    pub boot_id: u64,
    /// Increments with every datagram of one boot.
    pub seq: u64,
    /// Sender's wall clock, Unix milliseconds.
    pub sent_at_ms: u64,
    pub state: NodeState,
    /// Relative share of new connections, 1..=1000.
    pub weight: u16,
    /// Load in permille (0..=1000), if the sender reports one.
    pub load: Option<u16>,
    /// Where to connect; `None` means "the address this datagram came from".
    pub addr: Option<IpAddr>,
    pub services: Vec<Service>,
}

/// Why a datagram was refused. `reason()` gives the counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed heartbeat: {0}")]
    Malformed(&'static str),
    #[error("unsupported heartbeat version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("bad MAC: wrong network token, or the datagram was altered")]
    BadMac,
}

impl DecodeError {
    pub fn reason(self) -> Reason {
        match self {
            DecodeError::Malformed(_) => Reason::Malformed,
            DecodeError::UnsupportedVersion(_) => Reason::UnsupportedVersion,
            DecodeError::BadMac => Reason::BadMac,
        }
    }
}

/// A heartbeat that breaks a limit of the format; the message says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat cannot be encoded: {0}")]
pub struct EncodeError(pub String);

/// Serialize and sign. Fails only when `hb` breaks a limit of the format
/// (id lengths, weight, load, service count, total size); the decoder
/// applies the same checks, so anything that encodes also decodes.
pub fn encode(hb: &Heartbeat, token: &Token) -> Result<Vec<u8>, EncodeError> {
    validate(hb).map_err(|e| EncodeError(e.to_string()))?;
    let mut out = Vec::with_capacity(encoded_len(hb));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(hb.state.code());
    out.extend_from_slice(&hb.weight.to_be_bytes());
    out.extend_from_slice(&hb.load.unwrap_or(LOAD_NONE).to_be_bytes());
    out.extend_from_slice(&hb.boot_id.to_be_bytes());
    out.extend_from_slice(&hb.seq.to_be_bytes());
    out.extend_from_slice(&hb.sent_at_ms.to_be_bytes());
    put_str(&mut out, &hb.cluster);
    put_str(&mut out, &hb.node);
    match hb.addr {
        None => out.push(0),
        Some(IpAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.push(hb.services.len() as u8);
    for s in &hb.services {
        put_str(&mut out, &s.name);
        out.extend_from_slice(&s.port.to_be_bytes());
        out.push(u8::from(s.tls));
    }
    let tag = hmac::sign(token.key(), &out);
    out.extend_from_slice(tag.as_ref());
    if out.len() > MAX_LEN {
        return Err(EncodeError(format!(
            "{} bytes, more than {MAX_LEN}: shorten the service names or ids",
            out.len()
        )));
    }
    Ok(out)
}

/// The size `encode` will produce (limits not checked).
pub fn encoded_len(hb: &Heartbeat) -> usize {
    let addr = match hb.addr {
        None => 0,
        Some(IpAddr::V4(_)) => 4,
        Some(IpAddr::V6(_)) => 16,
    };
    let services: usize = hb.services.iter().map(|s| 1 + s.name.len() + 3).sum();
    FIXED_LEN + 1 + hb.cluster.len() + 1 + hb.node.len() + 1 + addr + 1 + services + TAG_LEN
}

/// Verify and parse one datagram.
pub fn decode(buf: &[u8], token: &Token) -> Result<Heartbeat, DecodeError> {
    if buf.len() > MAX_LEN {
        return Err(DecodeError::Malformed("larger than 1200 bytes"));
    }
    let Some((magic, rest)) = buf.split_first_chunk::<4>() else {
        return Err(DecodeError::Malformed("truncated"));
    };
    if *magic != MAGIC {
        return Err(DecodeError::Malformed("bad magic"));
    }
    let Some((&version, _)) = rest.split_first() else {
        return Err(DecodeError::Malformed("truncated"));
    };
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if buf.len() < MIN_LEN {
        return Err(DecodeError::Malformed("truncated"));
    }
    let Some((body, tag)) = buf.split_at_checked(buf.len() - TAG_LEN) else {
        return Err(DecodeError::Malformed("truncated"));
    };
    // Constant-time comparison inside ring.
    hmac::verify(token.key(), body, tag).map_err(|_| DecodeError::BadMac)?;
    let hb = parse(body)?;
    validate(&hb).map_err(DecodeError::Malformed)?;
    Ok(hb)
}

/// Append the tag to a body: `decode(seal(body))` exercises the parser on
/// arbitrary bodies, which the fuzz targets and tests need. Real senders
/// use `encode`.
pub fn seal(body: &[u8], token: &Token) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(hmac::sign(token.key(), body).as_ref());
    out
}

/// Parse an authenticated body (magic and version already checked).
fn parse(body: &[u8]) -> Result<Heartbeat, DecodeError> {
    let mut r = Reader(body);
    r.take::<5>()?; // magic and version
    let state = NodeState::from_code(r.u8()?).ok_or(DecodeError::Malformed("unknown state"))?;
    let weight = r.u16()?;
    let load = match r.u16()? {
        LOAD_NONE => None,
        l => Some(l),
    };
    let boot_id = r.u64()?;
    let seq = r.u64()?;
    let sent_at_ms = r.u64()?;
    let cluster = r.string()?;
    let node = r.string()?;
    let addr = match r.u8()? {
        0 => None,
        4 => Some(IpAddr::V4(Ipv4Addr::from(r.take::<4>()?))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(r.take::<16>()?))),
        _ => return Err(DecodeError::Malformed("unknown address family")),
    };
    let count = usize::from(r.u8()?);
    if count > MAX_SERVICES {
        return Err(DecodeError::Malformed("too many services"));
    }
    let mut services = Vec::with_capacity(count);
    for _ in 0..count {
        let name = r.string()?;
        let port = r.u16()?;
        let tls = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Malformed("unknown service flags")),
        };
        services.push(Service { name, port, tls });
    }
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(Heartbeat {
        cluster,
        node,
        boot_id,
        seq,
        sent_at_ms,
        state,
        weight,
        load,
        addr,
        services,
    })
}

/// The rules both sides apply. Keeping them in one place keeps the
/// encoding canonical: a decoded heartbeat re-encodes to the same bytes.
fn validate(hb: &Heartbeat) -> Result<(), &'static str> {
    check_id(&hb.cluster).map_err(|_| "cluster id must be 1 to 64 bytes of printable UTF-8")?;
    check_id(&hb.node).map_err(|_| "node id must be 1 to 64 bytes of printable UTF-8")?;
    if !(1..=MAX_WEIGHT).contains(&hb.weight) {
        return Err("weight must be 1 to 1000");
    }
    if hb.load.is_some_and(|l| l > 1000) {
        return Err("load must be 0 to 1000 permille");
    }
    if let Some(a) = hb.addr {
        if a.is_unspecified() || a.is_multicast() || a == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err("advertised address must be a unicast address");
        }
    }
    if hb.services.len() > MAX_SERVICES {
        return Err("too many services (at most 16)");
    }
    for (i, s) in hb.services.iter().enumerate() {
        check_id(&s.name).map_err(|_| "service name must be 1 to 64 bytes of printable UTF-8")?;
        if s.port == 0 {
            return Err("service port must not be 0");
        }
        if hb.services.iter().take(i).any(|o| o.name == s.name) {
            return Err("duplicate service name");
        }
    }
    Ok(())
}

/// Ids end up in logs, metric labels and /status: no control characters.
fn check_id(s: &str) -> Result<(), ()> {
    if s.is_empty() || s.len() > MAX_ID_LEN || s.chars().any(char::is_control) {
        return Err(());
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over untrusted bytes: every read is checked, none can panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Malformed("truncated"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(DecodeError::Malformed("truncated"))?;
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.take::<1>()?))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take::<2>()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take::<8>()?))
    }

    /// A u8 length and that many bytes of UTF-8.
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u8()?);
        if n == 0 || n > MAX_ID_LEN {
            return Err(DecodeError::Malformed("bad string length"));
        }
        let raw = self.bytes(n)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Malformed("bad utf-8"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn token() -> Token {
        Token::from_bytes(*b"0123456789abcdef0123456789abcdef")
    }

    pub fn sample() -> Heartbeat {
        Heartbeat {
            cluster: "fleet".into(),
            node: "ums-01".into(),
            boot_id: 0x0102_0304_0506_0708,
            seq: 42,
            sent_at_ms: 1_700_000_000_123,
            state: NodeState::Normal,
            weight: 100,
            load: Some(250),
            addr: Some("192.0.2.10".parse().unwrap()),
            services: vec![
                Service {
                    name: "device-tls".into(),
                    port: 8443,
                    tls: true,
                },
                Service {
                    name: "admin".into(),
                    port: 8080,
                    tls: false,
                },
            ],
        }
    }

    /// The largest heartbeat that fits: maximal ids, an IPv6 address and
    /// 16 services whose names share what is left.
    pub fn largest() -> Heartbeat {
        let mut hb = sample();
        hb.cluster = "c".repeat(64);
        hb.node = "n".repeat(64);
        hb.addr = Some("2001:db8::1".parse().unwrap());
        hb.services = (0..16)
            .map(|i| Service {
                // 10 names of 58 bytes and 6 of 57: exactly 1200 in all.
                name: format!("{i:02}{}", "s".repeat(if i < 10 { 56 } else { 55 })),
                port: 1000 + i,
                tls: i % 2 == 0,
            })
            .collect();
        hb
    }

    #[test]
    fn round_trip() {
        let t = token();
        for hb in [sample(), largest()] {
            let bytes = encode(&hb, &t).unwrap();
            assert_eq!(bytes.len(), encoded_len(&hb));
            assert_eq!(decode(&bytes, &t).unwrap(), hb);
        }
        let mut hb = sample();
        hb.addr = None;
        hb.load = None;
        hb.services.clear();
        hb.state = NodeState::Leaving;
        hb.cluster = "é".into();
        hb.node = "n".into();
        hb.weight = 1000;
        let bytes = encode(&hb, &t).unwrap();
        assert_eq!(bytes.len(), MIN_LEN + 1, "two-byte cluster id");
        assert_eq!(decode(&bytes, &t).unwrap(), hb);
        for state in NodeState::ALL {
            hb.state = state;
            assert_eq!(decode(&encode(&hb, &t).unwrap(), &t).unwrap().state, state);
            assert_eq!(state.as_str().parse::<NodeState>().unwrap(), state);
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        let mut hb = sample();
        hb.services.truncate(1);
        let b = encode(&hb, &token()).unwrap();
        assert_eq!(&b[0..4], b"FGHB");
        assert_eq!(b[4], 1, "version");
        assert_eq!(b[5], 0, "state normal");
        assert_eq!(&b[6..8], &100u16.to_be_bytes());
        assert_eq!(&b[8..10], &250u16.to_be_bytes());
        assert_eq!(&b[10..18], &0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(&b[18..26], &42u64.to_be_bytes());
        assert_eq!(&b[26..34], &1_700_000_000_123u64.to_be_bytes());
        assert_eq!(&b[34..40], b"\x05fleet");
        assert_eq!(&b[40..47], b"\x06ums-01");
        assert_eq!(&b[47..52], &[4, 192, 0, 2, 10]);
        assert_eq!(b[52], 1, "service count");
        assert_eq!(&b[53..64], b"\x0adevice-tls");
        assert_eq!(&b[64..67], &[0x20, 0xfb, 1], "port 8443, tls");
        assert_eq!(b.len(), 67 + 32);
    }

    /// A test vector built from docs/heartbeat.md alone (Python's struct
    /// and hmac modules), token 32 × 0x42: keeps the spec and the code in
    /// step, and gives other implementations something to test against.
    #[test]
    fn independent_test_vector() {
        const HEX: &str = "464748420100006400fa0102030405060708000000000000002a0000018bcfe5687b0566\
                           6c65657406756d732d303104c000020a020a6465766963652d746c7320fb010561646d69\
                           6e1f9000966b3891802acc46090ea82db832f784e1483660904666d7b09a1735ab463349";
        let bytes: Vec<u8> = (0..HEX.len() / 2)
            .map(|i| u8::from_str_radix(&HEX[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let t = Token::from_bytes([0x42; 32]);
        assert_eq!(decode(&bytes, &t).unwrap(), sample());
        assert_eq!(encode(&sample(), &t).unwrap(), bytes);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let t = token();
        for hb in [sample(), largest()] {
            let good = encode(&hb, &t).unwrap();
            let mut buf = good.clone();
            for i in 0..buf.len() * 8 {
                buf[i / 8] ^= 1 << (i % 8);
                let err = decode(&buf, &t).expect_err("flipped bit accepted");
                // The magic and version are read before the MAC; all the
                // rest must fail on the MAC.
                if i / 8 >= 5 {
                    assert_eq!(err, DecodeError::BadMac, "bit {i}");
                }
                buf[i / 8] ^= 1 << (i % 8);
            }
            assert_eq!(buf, good);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let t = token();
        let good = encode(&largest(), &t).unwrap();
        for n in 0..good.len() {
            assert!(decode(&good[..n], &t).is_err(), "prefix of {n} bytes");
            assert!(decode(&good[good.len() - n..], &t).is_err(), "suffix {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long, &t).is_err());
    }

    #[test]
    fn wrong_token_is_a_bad_mac() {
        let bytes = encode(&sample(), &token()).unwrap();
        let other = Token::from_bytes([7; 32]);
        assert_eq!(decode(&bytes, &other), Err(DecodeError::BadMac));
    }

    #[test]
    fn prefix_errors() {
        let t = token();
        let mut b = encode(&sample(), &t).unwrap();
        b[4] = 2;
        assert_eq!(decode(&b, &t), Err(DecodeError::UnsupportedVersion(2)));
        assert_eq!(
            DecodeError::UnsupportedVersion(2).reason(),
            Reason::UnsupportedVersion
        );
        b[0] = b'X';
        assert_eq!(decode(&b, &t), Err(DecodeError::Malformed("bad magic")));
        assert_eq!(
            decode(&[0u8; 1500], &t).unwrap_err().reason(),
            Reason::Malformed
        );
        assert_eq!(
            decode(b"FGHB", &t),
            Err(DecodeError::Malformed("truncated"))
        );
        assert_eq!(
            decode(b"FGHB\x01", &t),
            Err(DecodeError::Malformed("truncated"))
        );
    }

    /// Bodies with a valid MAC but broken content: only a token holder
    /// (or a bug) can produce these, and each must still be refused.
    #[test]
    fn authenticated_but_malformed_bodies() {
        let t = token();
        let good = encode(&sample(), &t).unwrap();
        let body = &good[..good.len() - TAG_LEN];
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = body.to_vec();
            f(&mut b);
            decode(&seal(&b, &t), &t)
        };
        let bad = |what: &'static str| Err(DecodeError::Malformed(what));
        assert_eq!(decode(&seal(body, &t), &t).unwrap(), sample());
        assert_eq!(with(&|b| b[5] = 4), bad("unknown state"));
        assert_eq!(
            with(&|b| b[6..8].copy_from_slice(&[0, 0])),
            bad("weight must be 1 to 1000")
        );
        assert_eq!(
            with(&|b| b[6..8].copy_from_slice(&1001u16.to_be_bytes())),
            bad("weight must be 1 to 1000")
        );
        assert_eq!(
            with(&|b| b[8..10].copy_from_slice(&1001u16.to_be_bytes())),
            bad("load must be 0 to 1000 permille")
        );
        assert_eq!(with(&|b| b[34] = 0), bad("bad string length"));
        assert_eq!(with(&|b| b[34] = 65), bad("bad string length"));
        assert_eq!(with(&|b| b[35] = 0xff), bad("bad utf-8"));
        assert_eq!(
            with(&|b| b[35] = b'\n'),
            bad("cluster id must be 1 to 64 bytes of printable UTF-8")
        );
        assert_eq!(with(&|b| b[47] = 5), bad("unknown address family"));
        assert_eq!(
            with(&|b| b[48..52].copy_from_slice(&[0, 0, 0, 0])),
            bad("advertised address must be a unicast address")
        );
        assert_eq!(with(&|b| b[52] = 17), bad("too many services"));
        assert_eq!(with(&|b| b[52] = 3), bad("truncated"));
        assert_eq!(with(&|b| b[52] = 1), bad("trailing bytes"));
        assert_eq!(with(&|b| b.push(0)), bad("trailing bytes"));
        assert_eq!(with(&|b| b[66] = 2), bad("unknown service flags"));
        assert_eq!(
            with(&|b| b[64..66].copy_from_slice(&[0, 0])),
            bad("service port must not be 0")
        );
        assert_eq!(
            with(&|b| {
                // Rename "admin" to "device-tls".
                b.truncate(67);
                b.extend_from_slice(b"\x0adevice-tls\x1f\x90\x00");
            }),
            bad("duplicate service name")
        );
    }

    #[test]
    fn encode_enforces_the_limits() {
        let t = token();
        let fails = |f: &dyn Fn(&mut Heartbeat)| {
            let mut hb = sample();
            f(&mut hb);
            encode(&hb, &t).is_err()
        };
        assert!(fails(&|h| h.cluster.clear()));
        assert!(fails(&|h| h.node = "x".repeat(65)));
        assert!(fails(&|h| h.weight = 0));
        assert!(fails(&|h| h.weight = 1001));
        assert!(fails(&|h| h.load = Some(1001)));
        assert!(fails(&|h| h.addr = Some("224.0.0.1".parse().unwrap())));
        assert!(fails(&|h| h.addr = Some("::".parse().unwrap())));
        assert!(fails(&|h| h.services[1].name = "device-tls".into()));
        assert!(fails(&|h| h.services[0].port = 0));
        assert!(fails(&|h| {
            h.services = (0..17)
                .map(|i| Service {
                    name: format!("s{i}"),
                    port: 1,
                    tls: false,
                })
                .collect()
        }));
        // Every field within its own limit, but together too large.
        let mut hb = largest();
        hb.services[0].name.push('x');
        let err = encode(&hb, &t).unwrap_err();
        assert!(err.0.contains("1201 bytes"), "{err}");
        assert_eq!(encode(&largest(), &t).unwrap().len(), MAX_LEN);
    }

    /// A cheap in-tree fuzz: random bytes, random mutations of valid
    /// datagrams and random authenticated bodies must never panic, and an
    /// accepted body must re-encode to the same bytes.
    #[test]
    fn random_inputs_never_panic() {
        let t = token();
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let good = encode(&largest(), &t).unwrap();
        let body = good[..good.len() - TAG_LEN].to_vec();
        for _ in 0..20_000 {
            let n = rng.usize(0..1300);
            let junk: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            assert!(decode(&junk, &t).is_err());
            let mut b = body.clone();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(0..3) {
                    0 if !b.is_empty() => {
                        let i = rng.usize(..b.len());
                        b[i] = rng.u8(..);
                    }
                    1 => b.truncate(rng.usize(..=b.len())),
                    _ => b.insert(rng.usize(..=b.len()), rng.u8(..)),
                }
            }
            let sealed = seal(&b, &t);
            if let Ok(hb) = decode(&sealed, &t) {
                assert_eq!(encode(&hb, &t).unwrap(), sealed);
            }
        }
    }
}
