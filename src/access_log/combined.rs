//! nginx's `combined` format, exactly:
//! `$remote_addr - $remote_user [$time_local] "$request" $status
//! $body_bytes_sent "$http_referer" "$http_user_agent"`, with nginx's
//! escaping (`"`, `\`, control and non-ASCII bytes as `\xHH`) and local
//! time taken as UTC. `$remote_user` (HTTP basic authentication) is
//! always `-`.
//!
//! L4 connections (which nginx logs with its own stream formats) fit the
//! same shape so that one parser reads every line: the request is the
//! listener mode and the upstream (`"tcp 10.0.0.5:443"`), the status is
//! nginx stream's, and the bytes are those sent to the client.

use std::io::Write;

use super::record::{civil, put_addr, put_ip, put_padded, put_u64, Kind, Record};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

pub fn write(r: &Record, out: &mut Vec<u8>) {
    let (y, mo, d, h, mi, s, _) = civil(r.time);
    let month = MONTHS[(mo as usize).clamp(1, 12) - 1];
    put_ip(out, r.client.ip());
    out.extend_from_slice(b" - - [");
    put_padded(out, u64::from(d), 2);
    out.push(b'/');
    out.extend_from_slice(month.as_bytes());
    out.push(b'/');
    put_padded(out, y as u64, 4);
    for n in [h, mi, s] {
        out.push(b':');
        put_padded(out, u64::from(n), 2);
    }
    out.extend_from_slice(b" +0000] \"");
    match r.kind {
        Kind::Http | Kind::WebSocket => {
            escaped(out, r.method.unwrap_or("-").as_bytes());
            out.push(b' ');
            escaped(out, r.path.unwrap_or("-").as_bytes());
            out.push(b' ');
            escaped(out, r.protocol.unwrap_or("-").as_bytes());
        }
        Kind::Tcp | Kind::Passthrough => {
            out.extend_from_slice(r.kind.as_str().as_bytes());
            out.push(b' ');
            match r.upstream {
                Some(a) => put_addr(out, a),
                None => out.push(b'-'),
            }
        }
    }
    out.extend_from_slice(b"\" ");
    put_u64(out, u64::from(r.status));
    out.push(b' ');
    put_u64(out, r.bytes_out);
    out.extend_from_slice(b" \"");
    escaped(out, r.referer.unwrap_or(b"-"));
    out.extend_from_slice(b"\" \"");
    escaped(out, r.user_agent.unwrap_or(b"-"));
    out.push(b'"');
}

/// nginx's default `escape=default` for log variables.
fn escaped(out: &mut Vec<u8>, v: &[u8]) {
    for &b in v {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn nginx_line() {
        let mut r = Record::new(Kind::Http, "web", "192.0.2.7:50000".parse().unwrap());
        r.time = SystemTime::UNIX_EPOCH + Duration::from_secs(971_189_736);
        r.method = Some("GET");
        r.path = Some("/a\"b");
        r.protocol = Some("HTTP/1.1");
        r.status = 200;
        r.bytes_out = 2326;
        r.user_agent = Some(b"curl/8.0");
        let mut v = Vec::new();
        write(&r, &mut v);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "192.0.2.7 - - [10/Oct/2000:14:55:36 +0000] \"GET /a\\x22b HTTP/1.1\" 200 2326 \"-\" \"curl/8.0\""
        );
    }
}
