//! JSON lines: one object per line, every field present (`null` when it
//! does not apply), keys in a fixed order.

use std::io::Write;

use super::record::{civil, put_addr, put_ip, put_padded, put_u64, write_ms, Record};

pub fn write(r: &Record, out: &mut Vec<u8>) {
    let (y, mo, d, h, mi, s, ms) = civil(r.time);
    out.extend_from_slice(b"{\"time\":\"");
    put_padded(out, y as u64, 4);
    for (sep, n) in [(b'-', mo), (b'-', d), (b'T', h), (b':', mi), (b':', s)] {
        out.push(sep);
        put_padded(out, u64::from(n), 2);
    }
    out.push(b'.');
    put_padded(out, u64::from(ms), 3);
    out.extend_from_slice(b"Z\",\"type\":\"");
    out.extend_from_slice(r.kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"listener\":");
    string(out, r.listener.as_bytes());
    out.extend_from_slice(b",\"client_addr\":\"");
    put_ip(out, r.client.ip());
    out.extend_from_slice(b"\",\"client_port\":");
    put_u64(out, u64::from(r.client.port()));
    field_str(out, "tls_version", r.tls_version);
    field_str(out, "tls_cipher", r.tls_cipher);
    field_str(out, "sni", r.sni);
    field_str(out, "client_cert_subject", r.client_cert_subject);
    field_str(out, "client_cert_sha256", r.client_cert_sha256);
    field(out, "host", r.host);
    field_str(out, "method", r.method);
    field_str(out, "path", r.path);
    field_str(out, "protocol", r.protocol);
    out.extend_from_slice(b",\"status\":");
    put_u64(out, u64::from(r.status));
    out.extend_from_slice(b",\"bytes_in\":");
    put_u64(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    put_u64(out, r.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    write_ms(out, r.duration);
    out.extend_from_slice(b",\"upstream\":");
    match r.upstream {
        Some(a) => {
            out.push(b'"');
            put_addr(out, a);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    field_ms(out, "upstream_connect_ms", r.upstream_connect);
    field_ms(out, "upstream_response_ms", r.upstream_response);
    field_str(out, "route", r.route);
    out.extend_from_slice(b",\"retries\":");
    put_u64(out, u64::from(r.retries));
    field_str(out, "close", r.close);
    field(out, "referer", r.referer);
    field(out, "user_agent", r.user_agent);
    out.push(b'}');
}

fn key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

fn field_str(out: &mut Vec<u8>, key: &str, v: Option<&str>) {
    field(out, key, v.map(str::as_bytes))
}

fn field(out: &mut Vec<u8>, name: &str, v: Option<&[u8]>) {
    key(out, name);
    match v {
        Some(v) => string(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn field_ms(out: &mut Vec<u8>, name: &str, v: Option<std::time::Duration>) {
    key(out, name);
    match v {
        Some(d) => write_ms(out, d),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string. Header values may hold any byte: valid UTF-8 is kept,
/// anything else is replaced (U+FFFD), so a line always parses.
fn string(out: &mut Vec<u8>, v: &[u8]) {
    out.push(b'"');
    // Most values need no escaping: copied whole.
    if v.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(v);
        out.push(b'"');
        return;
    }
    for chunk in v.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..=0x1f | 0x7f => {
                    let _ = write!(out, "\\u{b:04x}");
                }
                _ => out.push(b),
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut v = Vec::new();
        string(&mut v, b"a\"b\\c\nd\x01\xffe\xc3\xa9");
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "\"a\\\"b\\\\c\\nd\\u0001\u{fffd}e\u{e9}\""
        );
    }
}
