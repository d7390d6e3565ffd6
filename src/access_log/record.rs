//! The fields of one access-log line, borrowed from the connection that
//! ends: built on the stack, formatted at once, never stored.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// What a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An HTTP request on an offload listener.
    Http,
    /// A WebSocket session on an offload listener, logged when it ends.
    WebSocket,
    /// A connection on a `tcp` listener.
    Tcp,
    /// A connection on a `passthrough` listener.
    Passthrough,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::WebSocket => "websocket",
            Kind::Tcp => "tcp",
            Kind::Passthrough => "passthrough",
        }
    }
}

/// One line. Absent values are written as JSON `null` or nginx's `-`.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub kind: Kind,
    /// When the request or connection ended (nginx logs at the end too).
    pub time: SystemTime,
    pub listener: &'a str,
    pub client: SocketAddr,
    pub tls_version: Option<&'a str>,
    pub tls_cipher: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub client_cert_subject: Option<&'a str>,
    pub client_cert_sha256: Option<&'a str>,
    /// The request's Host (or HTTP/2 `:authority`), as sent.
    pub host: Option<&'a [u8]>,
    pub method: Option<&'a str>,
    /// Path and query, as sent.
    pub path: Option<&'a str>,
    /// `HTTP/1.1`, `HTTP/2.0`...
    pub protocol: Option<&'a str>,
    /// HTTP status; for L4, nginx stream's: 200 (reached a backend), 400
    /// (bad ClientHello), 403 (no route for the name), 502 (no backend).
    pub status: u16,
    /// Client to upstream: the request body (HTTP), every byte (L4, WebSocket).
    pub bytes_in: u64,
    /// Upstream to client: the response body (HTTP), every byte (L4, WebSocket).
    pub bytes_out: u64,
    pub duration: Duration,
    pub upstream: Option<SocketAddr>,
    /// Time to obtain the upstream connection (near zero for a reused one).
    pub upstream_connect: Option<Duration>,
    /// From sending the request to the upstream's response headers.
    pub upstream_response: Option<Duration>,
    pub route: Option<&'a str>,
    /// Attempts after the first: other backends, or a stale keep-alive
    /// connection replaced.
    pub retries: u32,
    /// Why an L4 connection (or WebSocket session) ended.
    pub close: Option<&'a str>,
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
}

impl<'a> Record<'a> {
    /// A line with only what every kind has; the rest is filled in by
    /// the caller.
    pub fn new(kind: Kind, listener: &'a str, client: SocketAddr) -> Record<'a> {
        Record {
            kind,
            time: SystemTime::now(),
            listener,
            client,
            tls_version: None,
            tls_cipher: None,
            sni: None,
            client_cert_subject: None,
            client_cert_sha256: None,
            host: None,
            method: None,
            path: None,
            protocol: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            upstream: None,
            upstream_connect: None,
            upstream_response: None,
            route: None,
            retries: 0,
            close: None,
            referer: None,
            user_agent: None,
        }
    }
}

/// Civil UTC time of `t`: (year, month 1-12, day, hour, minute, second,
/// millisecond).
pub fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis(),
    )
}

// Lines are written without `core::fmt`: formatting machinery was most
// of a line's cost on the connection's thread.

/// A decimal number.
pub fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// A decimal number of at least `width` digits, zero-padded.
pub fn put_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = 1;
    let mut m = n / 10;
    while m > 0 {
        digits += 1;
        m /= 10;
    }
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits)));
    put_u64(out, n);
}

pub fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                put_u64(out, u64::from(o));
            }
        }
        IpAddr::V6(a) => {
            use std::io::Write;
            let _ = write!(out, "{a}");
        }
    }
}

/// `1.2.3.4:80` or `[::1]:80`.
pub fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => put_ip(out, IpAddr::V4(*v4.ip())),
        SocketAddr::V6(v6) => {
            out.push(b'[');
            put_ip(out, IpAddr::V6(*v6.ip()));
            out.push(b']');
        }
    }
    out.push(b':');
    put_u64(out, u64::from(a.port()));
}

/// Milliseconds with microsecond precision: `12.345`.
pub fn write_ms(out: &mut Vec<u8>, d: Duration) {
    let us = d.as_micros() as u64;
    put_u64(out, us / 1000);
    out.push(b'.');
    put_padded(out, us % 1000, 3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_millis(s);
        assert_eq!(civil(at(0)), (1970, 1, 1, 0, 0, 0, 0));
        // 2000-02-29T23:59:59.123Z
        assert_eq!(civil(at(951_868_799_123)), (2000, 2, 29, 23, 59, 59, 123));
        // 2026-12-03T06:56:23Z
        assert_eq!(civil(at(1_796_280_983_000)), (2026, 12, 3, 6, 56, 23, 0));
    }

    #[test]
    fn milliseconds() {
        let mut v = Vec::new();
        write_ms(&mut v, Duration::from_micros(12_345));
        assert_eq!(v, b"12.345");
        v.clear();
        write_ms(&mut v, Duration::from_micros(7));
        assert_eq!(v, b"0.007");
        v.clear();
        put_addr(&mut v, "10.0.255.7:65535".parse().unwrap());
        v.push(b' ');
        put_addr(&mut v, "[2001:db8::1]:80".parse().unwrap());
        v.push(b' ');
        put_padded(&mut v, 7, 4);
        assert_eq!(v, b"10.0.255.7:65535 [2001:db8::1]:80 0007");
    }
}
