//! RFC 5424 message formatting:
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG`.
//!
//! Every header field is cut to its RFC length and limited to printable
//! US-ASCII; an empty one becomes the NILVALUE `-`. MSG is sent plain when
//! it is ASCII, and as UTF-8 behind a BOM otherwise: RFC 5424 only says a
//! MSG is UTF-8 when it starts with the BOM, but rsyslog and journald keep
//! the BOM in the text they store, so adding it to every line would put
//! three stray bytes in front of nearly every message for no benefit (pure
//! ASCII reads the same in any encoding).

use std::fmt::Write as _;
use std::time::SystemTime;

/// Longest message sent, header included: rsyslog's default
/// `maxMessageSize` (8 KiB), so a default receiver never truncates or
/// splits one. Longer MSGs are cut at a character boundary.
pub const MAX_MESSAGE: usize = 8192;

/// RFC 5424 severities (section 6.2.1).
pub mod severity {
    pub const ERR: u8 = 3;
    pub const WARNING: u8 = 4;
    pub const INFO: u8 = 6;
    pub const DEBUG: u8 = 7;
}

/// The SD-ID of the event fields. fleetgate has no private enterprise
/// number of its own; 32473 is the one RFC 5612 reserves for
/// documentation and examples, which keeps the SD-ID well-formed
/// (`name@number`) without claiming someone else's.
pub const SD_ID: &str = "fleetgate@32473";

/// What identifies the sender, the same for every message.
#[derive(Debug, Clone)]
pub struct Origin {
    pub facility: u8,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
}

impl Origin {
    pub fn new(facility: u8, app_name: &str) -> Origin {
        Origin {
            facility,
            hostname: header_field(&hostname(), 255),
            app_name: header_field(app_name, 48),
            procid: std::process::id().to_string(),
        }
    }
}

/// One message before formatting. `fields` become the SD-PARAMs of one
/// `SD_ID` element (none: the NILVALUE).
#[derive(Debug, Clone)]
pub struct Record {
    pub time: SystemTime,
    pub severity: u8,
    pub msgid: &'static str,
    pub fields: Vec<(String, String)>,
    pub msg: String,
}

/// The whole RFC 5424 message, without any transport framing.
pub fn format(origin: &Origin, r: &Record, out: &mut Vec<u8>) {
    let mut head = String::with_capacity(128);
    let pri = u16::from(origin.facility) * 8 + u16::from(r.severity.min(7));
    let _ = write!(
        head,
        "<{pri}>1 {} {} {} {} {} ",
        timestamp(r.time),
        origin.hostname,
        origin.app_name,
        origin.procid,
        header_field(r.msgid, 32),
    );
    structured_data(&r.fields, &mut head);
    out.extend_from_slice(head.as_bytes());
    if r.msg.is_empty() {
        return;
    }
    out.push(b' ');
    let room = MAX_MESSAGE.saturating_sub(out.len() + 3);
    let msg = cut(&r.msg, room);
    if !msg.is_ascii() {
        out.extend_from_slice("\u{feff}".as_bytes());
    }
    out.extend_from_slice(msg.as_bytes());
}

/// RFC 3339 in UTC with microseconds (TIME-SECFRAC allows at most six
/// digits), e.g. `2026-12-03T06:56:28.123456Z`.
pub fn timestamp(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// A header field: PRINTUSASCII (33–126) only, at most `max` characters,
/// `-` when nothing is left.
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if f.is_empty() {
        "-".into()
    } else {
        f
    }
}

/// `[SD_ID name="value" ...]`, or `-` without fields.
fn structured_data(fields: &[(String, String)], out: &mut String) {
    if fields.is_empty() {
        out.push('-');
        return;
    }
    out.push('[');
    out.push_str(SD_ID);
    for (name, value) in fields {
        out.push(' ');
        out.push_str(&sd_name(name));
        out.push_str("=\"");
        for c in value.chars() {
            // PARAM-VALUE escapes exactly these three (section 6.3.3).
            if matches!(c, '"' | '\\' | ']') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push(']');
}

/// SD-NAME: 1–32 printable ASCII characters other than `=`, space, `]`
/// and `"`. Tracing field names are identifiers, dotted at most, so this
/// only matters for names that come through the `log` bridge.
fn sd_name(name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"') {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if n.is_empty() {
        "_".into()
    } else {
        n
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The kernel's host name (what `hostname` prints); the NILVALUE when it
/// cannot be read. RFC 5424 prefers an FQDN, but the local name is what
/// the rest of the host's syslog traffic carries.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn origin() -> Origin {
        Origin {
            facility: 3,
            hostname: "lb1".into(),
            app_name: "fleetgate".into(),
            procid: "42".into(),
        }
    }

    fn text(r: &Record) -> String {
        let mut out = Vec::new();
        format(&origin(), r, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn record(msg: &str, fields: &[(&str, &str)]) -> Record {
        Record {
            time: UNIX_EPOCH + Duration::from_micros(1_764_745_000_123_456),
            severity: severity::WARNING,
            msgid: "event",
            fields: fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            msg: msg.into(),
        }
    }

    #[test]
    fn header_and_structured_data() {
        assert_eq!(
            text(&record(
                "backend down",
                &[("pool", "p"), ("why", r#"a "b" \c ]d"#)]
            )),
            r#"<28>1 2025-12-03T06:56:40.123456Z lb1 fleetgate 42 event [fleetgate@32473 pool="p" why="a \"b\" \\c \]d"] backend down"#
        );
    }

    #[test]
    fn nil_values_and_bom() {
        let mut r = record("", &[]);
        r.msgid = "";
        assert_eq!(
            text(&r),
            "<28>1 2025-12-03T06:56:40.123456Z lb1 fleetgate 42 - -"
        );
        let r = record("größe", &[]);
        assert!(text(&r).ends_with(" event - \u{feff}größe"));
    }

    #[test]
    fn limits() {
        assert_eq!(header_field("a b\u{e9}", 48), "a_b_");
        assert_eq!(header_field(&"x".repeat(60), 48).len(), 48);
        assert_eq!(sd_name("log.target"), "log.target");
        assert_eq!(sd_name("a=b c"), "a_b_c");
        let long = "é".repeat(MAX_MESSAGE);
        let t = text(&record(&long, &[]));
        assert!(t.len() <= MAX_MESSAGE, "{}", t.len());
    }
}
