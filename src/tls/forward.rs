//! The forms a verified client certificate is handed to backends in, as
//! request headers. They copy nginx's variables byte for byte, so that a
//! backend written behind nginx keeps working behind fleetgate:
//!
//! | here                    | nginx                       |
//! |-------------------------|-----------------------------|
//! | [`escaped_pem`]         | `$ssl_client_escaped_cert`  |
//! | [`pem`]                 | `$ssl_client_raw_cert`      |
//! | [`subject_dn`]          | `$ssl_client_s_dn`          |
//! | [`issuer_dn`]           | `$ssl_client_i_dn`          |
//! | [`serial_hex`]          | `$ssl_client_serial`        |
//! | [`sha1_fingerprint`]    | `$ssl_client_fingerprint`   |
//! | [`sha256_fingerprint`]  | (none; the safer pin)       |

use std::fmt::Write;

use base64::Engine;

use super::{hex_lower, x509};

/// The certificate as OpenSSL's `PEM_write_bio_X509` writes it: base64 in
/// 64-column lines, every line ending in `\n`.
pub fn pem(cert_der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert_der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The PEM certificate URL-escaped exactly as nginx's
/// `$ssl_client_escaped_cert`: `ngx_escape_uri(.., NGX_ESCAPE_URI_COMPONENT)`
/// over the PEM text. Safe in a header value; backends decode it with any
/// URL decoder (`%0A` newlines, `%2B` for `+`, `%2F` for `/`, `%3D` for `=`).
pub fn escaped_pem(cert_der: &[u8]) -> String {
    escape_uri_component(pem(cert_der).as_bytes())
}

/// nginx's `uri_component` table from src/core/ngx_string.c
/// (`ngx_escape_uri`), one bit per byte value, set = escape. It escapes
/// everything except RFC 3986 unreserved characters: ALPHA, DIGIT, `-`,
/// `.`, `_`, `~`.
///
/// ```text
/// 0x00-0x1f  0xffffffff  all control bytes
/// 0x20-0x3f  0xfc009fff  ' ' ! " # $ % & ' ( ) * + , /  : ; < = > ?
///                        (not - . 0-9)
/// 0x40-0x5f  0x78000001  @ [ \ ] ^  (not A-Z _)
/// 0x60-0x7f  0xb8000001  ` { | } DEL  (not a-z ~)
/// 0x80-0xff  0xffffffff  all bytes with the high bit
/// ```
const URI_COMPONENT: [u32; 8] = [
    0xffff_ffff,
    0xfc00_9fff,
    0x7800_0001,
    0xb800_0001,
    0xffff_ffff,
    0xffff_ffff,
    0xffff_ffff,
    0xffff_ffff,
];

/// `ngx_escape_uri` with the uri_component table; uppercase hex as nginx.
pub fn escape_uri_component(input: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(input.len() + input.len() / 8);
    for &b in input {
        if URI_COMPONENT[usize::from(b >> 5)] & (1 << (b & 0x1f)) != 0 {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push(b as char);
        }
    }
    out
}

/// SHA-256 of the DER certificate, lowercase hex without separators.
pub fn sha256_fingerprint(cert_der: &[u8]) -> String {
    hex_lower(ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref())
}

/// SHA-256 of the DER certificate as raw bytes, the revocation list's key.
pub fn sha256(cert_der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// SHA-1 fingerprint, lowercase hex, as nginx's `$ssl_client_fingerprint`;
/// for backends that already compare it. Prefer SHA-256 for new pins.
pub fn sha1_fingerprint(cert_der: &[u8]) -> String {
    hex_lower(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der).as_ref())
}

/// The serial number as nginx's `$ssl_client_serial` (OpenSSL's
/// `i2a_ASN1_INTEGER`): uppercase hex of the value, without DER's leading
/// sign byte, `-` in front of a negative one. `None` if the certificate
/// does not parse.
pub fn serial_hex(cert_der: &[u8]) -> Option<String> {
    let serial = x509::parse_cert(cert_der)?.serial;
    let (negative, magnitude) = serial_magnitude(serial);
    let mut out = String::with_capacity(magnitude.len() * 2 + 1);
    if negative {
        out.push('-');
    }
    for b in &magnitude {
        let _ = write!(out, "{b:02X}");
    }
    if magnitude.is_empty() {
        out.push_str("00");
    }
    Some(out)
}

/// The serial's absolute value as big-endian bytes without leading zeros.
pub(crate) fn serial_magnitude(der_integer: &[u8]) -> (bool, Vec<u8>) {
    let negative = der_integer.first().is_some_and(|b| b & 0x80 != 0);
    let mut bytes = der_integer.to_vec();
    if negative {
        // Two's complement: invert and add one.
        for b in bytes.iter_mut() {
            *b = !*b;
        }
        for b in bytes.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
    }
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    (negative, bytes.split_off(first))
}

/// The subject as nginx's `$ssl_client_s_dn`: OpenSSL's
/// `X509_NAME_print_ex(.., XN_FLAG_RFC2253)`, i.e. RFC 4514/2253 order
/// (last RDN first), `,` between RDNs and `+` inside one. `None` if the
/// certificate does not parse.
pub fn subject_dn(cert_der: &[u8]) -> Option<String> {
    let cert = x509::parse_cert(cert_der)?;
    format_name(&cert.subject)
}

/// The issuer, in the same form as [`subject_dn`] (`$ssl_client_i_dn`).
pub fn issuer_dn(cert_der: &[u8]) -> Option<String> {
    let cert = x509::parse_cert(cert_der)?;
    format_name(&cert.issuer)
}

fn format_name(name: &x509::Tlv<'_>) -> Option<String> {
    let rdns = x509::name_rdns(name)?;
    let mut out = String::new();
    // XN_FLAG_DN_REV reverses the flat list of attributes, so the
    // attributes inside a multi-valued RDN come out reversed as well.
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, (oid, value)) in rdn.iter().rev().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match short_name(oid) {
                Some(name) => {
                    out.push_str(name);
                    out.push('=');
                    push_value(&mut out, value);
                }
                None => {
                    // XN_FLAG_DUMP_UNKNOWN_FIELDS: dotted OID, value as
                    // `#` and the hex of its DER encoding.
                    out.push_str(&x509::oid_string(oid)?);
                    out.push('=');
                    push_hex_dump(&mut out, value.raw);
                }
            }
        }
    }
    Some(out)
}

/// OpenSSL's short names (`OBJ_nid2sn`) for the attributes that occur in
/// device and server certificates. OpenSSL knows more; an attribute not
/// listed here prints as the dotted OID and a hex dump, as OpenSSL does
/// for an OID it does not know.
fn short_name(oid: &[u8]) -> Option<&'static str> {
    const X520: &[u8] = &[0x55, 0x04];
    if let Some(&[arc]) = oid.strip_prefix(X520) {
        return Some(match arc {
            3 => "CN",
            4 => "SN",
            5 => "serialNumber",
            6 => "C",
            7 => "L",
            8 => "ST",
            9 => "street",
            10 => "O",
            11 => "OU",
            12 => "title",
            13 => "description",
            15 => "businessCategory",
            17 => "postalCode",
            20 => "telephoneNumber",
            41 => "name",
            42 => "GN",
            43 => "initials",
            44 => "generationQualifier",
            46 => "dnQualifier",
            65 => "pseudonym",
            97 => "organizationIdentifier",
            _ => return None,
        });
    }
    Some(match oid {
        // 0.9.2342.19200300.100.1.1 / .25
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
        // 1.2.840.113549.1.9.1
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress",
        // 1.3.6.1.4.1.311.60.2.1.1 / .2 / .3 (EV jurisdiction)
        [0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x3c, 0x02, 0x01, 0x01] => "jurisdictionL",
        [0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x3c, 0x02, 0x01, 0x02] => "jurisdictionST",
        [0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x3c, 0x02, 0x01, 0x03] => "jurisdictionC",
        _ => return None,
    })
}

/// A string value with OpenSSL's RFC 2253 escaping (ASN1_STRFLGS_RFC2253):
/// each string type decoded to characters, converted to UTF-8, and then
/// `, + " \ < > ;` backslash-escaped, `#` first and space first or last
/// backslash-escaped, control bytes and every byte of a non-ASCII
/// character written `\XX`. Types that are not strings are dumped as hex.
fn push_value(out: &mut String, value: &x509::Tlv<'_>) {
    let body = value.body;
    let chars: Option<Vec<char>> = match value.tag {
        // UTF8String
        12 => std::str::from_utf8(body).ok().map(|s| s.chars().collect()),
        // Numeric, Printable, T61, IA5, UTCTime, GeneralizedTime, Visible:
        // one byte per character, read as Latin-1 like OpenSSL does.
        18 | 19 | 20 | 22 | 23 | 24 | 26 => Some(body.iter().map(|&b| char::from(b)).collect()),
        // UniversalString (UCS-4)
        28 if body.len().is_multiple_of(4) => body
            .chunks(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        // BMPString (UCS-2)
        30 if body.len().is_multiple_of(2) => body
            .chunks(2)
            .map(|c| char::from_u32(u32::from(u16::from_be_bytes([c[0], c[1]]))))
            .collect(),
        _ => None,
    };
    let Some(chars) = chars else {
        push_hex_dump(out, value.raw);
        return;
    };
    let last = chars.len().saturating_sub(1);
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii() {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "\\{b:02X}");
            }
            continue;
        }
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

fn push_hex_dump(out: &mut String, der: &[u8]) {
    out.push('#');
    for b in der {
        let _ = write!(out, "{b:02X}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::parse_certs_pem;
    use crate::tls::testutil::Pki;

    fn sample(pem: &[u8]) -> Vec<u8> {
        parse_certs_pem(pem).unwrap().remove(0).to_vec()
    }

    /// testdata/sample_client.crt was made with `openssl req -x509`; the
    /// expected values below are what OpenSSL 3.0 prints for it
    /// (`openssl x509 -noout -subject -serial -fingerprint -nameopt
    /// RFC2253`), i.e. what nginx puts in its variables.
    #[test]
    fn matches_openssl_for_a_sample_device_certificate() {
        let der = sample(include_bytes!("testdata/sample_client.crt"));
        assert_eq!(
            subject_dn(&der).unwrap(),
            r#"DC=fleet,emailAddress=ops@example.com,CN=device-0001+UID=42,OU=\#devices\ ,OU=a\+b\;c\<d\>\\e=f,O=M\C3\BCller \"&\" S\C3\B6hne\, GmbH,ST=Bayern,C=DE"#
        );
        assert_eq!(issuer_dn(&der), subject_dn(&der));
        assert_eq!(serial_hex(&der).unwrap(), "AB12CD34");
        assert_eq!(
            sha256_fingerprint(&der),
            "04c2b9f6e76e633ee23f5e65a8e1ab49e16d93154eccb343bb96b3ec111d169d"
        );
        assert_eq!(
            sha1_fingerprint(&der),
            "98cbeb45a129779a26cd73e44cc0657894730f42"
        );
    }

    /// T61String (Latin-1), BMPString, a control character and an OID
    /// OpenSSL does not know (printed with `OPENSSL_CONF=/dev/null`).
    #[test]
    fn string_types_and_unknown_attributes_match_openssl() {
        let der = sample(include_bytes!("testdata/sample_strings.crt"));
        assert_eq!(
            subject_dn(&der).unwrap(),
            r"CN=tab\09here,1.3.6.1.4.1.55555.1.2=#130673656E736F72,OU=\E2\82\ACuro 2,O=Caf\C3\A9"
        );
        assert_eq!(serial_hex(&der).unwrap(), "01");
    }

    /// The expected text is Python's `urllib.parse.quote(pem, safe='')`,
    /// which escapes the same set (all but ALPHA DIGIT - . _ ~) in the
    /// same uppercase form.
    #[test]
    fn escaped_pem_matches_nginx() {
        let pem_text = include_str!("testdata/sample_client.crt");
        let der = sample(pem_text.as_bytes());
        assert_eq!(pem(&der), pem_text);
        assert_eq!(
            escaped_pem(&der),
            include_str!("testdata/sample_client.escaped")
        );
        let escaped = escaped_pem(&der);
        assert!(escaped.starts_with("-----BEGIN%20CERTIFICATE-----%0AMIIC"));
        assert!(escaped.ends_with("%0A-----END%20CERTIFICATE-----%0A"));
    }

    #[test]
    fn escape_table_is_exactly_the_unreserved_set() {
        for b in 0u8..=255 {
            let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
            let out = escape_uri_component(&[b]);
            if unreserved {
                assert_eq!(out, (b as char).to_string());
            } else {
                assert_eq!(out, format!("%{b:02X}"));
            }
        }
        assert_eq!(escape_uri_component(b"a b+/=\n"), "a%20b%2B%2F%3D%0A");
    }

    #[test]
    fn serial_magnitudes() {
        assert_eq!(serial_magnitude(&[0x00, 0xab]), (false, vec![0xab]));
        assert_eq!(serial_magnitude(&[0x01, 0x00]), (false, vec![0x01, 0x00]));
        assert_eq!(serial_magnitude(&[0x00]), (false, vec![]));
        assert_eq!(serial_magnitude(&[0xff]), (true, vec![0x01]));
        assert_eq!(serial_magnitude(&[0xff, 0x00]), (true, vec![0x01, 0x00]));
    }

    #[test]
    fn rcgen_certificates_round_trip() {
        let pki = Pki::new("Forward CA");
        let leaf = pki.leaf_with_serial("device-7", &[], true, Some(0x0102_0304));
        assert_eq!(subject_dn(&leaf.cert).unwrap(), "CN=device-7");
        assert_eq!(issuer_dn(&leaf.cert).unwrap(), "CN=Forward CA");
        assert_eq!(serial_hex(&leaf.cert).unwrap(), "01020304");
        assert_eq!(sha256(&leaf.cert).len(), 32);
        assert!(subject_dn(b"junk").is_none());
        assert!(serial_hex(&[]).is_none());
    }
}
