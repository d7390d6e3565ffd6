//! Just enough DER to read the parts of a certificate that the forwarding
//! headers and the revocation list need: serial, issuer, subject and the
//! subjectAltName DNS names. rustls-webpki validates certificates but
//! keeps these fields private; a full X.509 crate (x509-parser pulls in
//! nom, asn1-rs, der-parser, oid-registry and time) is a lot of code for a
//! walk over five fields. Every read is bounds-checked and returns `None`
//! on anything unexpected: these bytes come from devices.

const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const BOOLEAN: u8 = 0x01;
/// [0] EXPLICIT version, [3] EXPLICIT extensions.
const CTX_VERSION: u8 = 0xa0;
const CTX_EXTENSIONS: u8 = 0xa3;
/// GeneralName dNSName: [2] IMPLICIT IA5String.
const CTX_DNS_NAME: u8 = 0x82;
/// 2.5.29.17, subjectAltName.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// One DER element: its tag, its contents and its whole encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub tag: u8,
    pub body: &'a [u8],
    pub raw: &'a [u8],
}

/// Read one element off the front of `input`.
pub(crate) fn read_tlv<'a>(input: &mut &'a [u8]) -> Option<Tlv<'a>> {
    let all: &'a [u8] = input;
    let (&tag, rest) = all.split_first()?;
    if tag & 0x1f == 0x1f {
        // High tag numbers never occur in the fields read here.
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        // 0 is BER's indefinite length; over 4 bytes is no certificate.
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | usize::from(b))
    };
    let body = rest.get(..len)?;
    let header = all.len() - rest.len();
    let raw = &all[..header + len];
    *input = &rest[len..];
    Some(Tlv { tag, body, raw })
}

fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<Tlv<'a>> {
    let tlv = read_tlv(input)?;
    (tlv.tag == tag).then_some(tlv)
}

/// The fields of a certificate read here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CertFields<'a> {
    /// INTEGER contents, sign byte included.
    pub serial: &'a [u8],
    pub issuer: Tlv<'a>,
    pub subject: Tlv<'a>,
    /// Contents of the Extensions SEQUENCE, when present.
    pub extensions: Option<&'a [u8]>,
}

/// Walk TBSCertificate (RFC 5280 4.1) up to the extensions.
pub(crate) fn parse_cert(der: &[u8]) -> Option<CertFields<'_>> {
    let mut input = der;
    let cert = expect(&mut input, SEQUENCE)?;
    let mut c = cert.body;
    let tbs = expect(&mut c, SEQUENCE)?;
    let mut t = tbs.body;
    let mut field = read_tlv(&mut t)?;
    if field.tag == CTX_VERSION {
        field = read_tlv(&mut t)?;
    }
    if field.tag != INTEGER || field.body.is_empty() {
        return None;
    }
    let serial = field.body;
    expect(&mut t, SEQUENCE)?; // signature algorithm
    let issuer = expect(&mut t, SEQUENCE)?;
    expect(&mut t, SEQUENCE)?; // validity
    let subject = expect(&mut t, SEQUENCE)?;
    expect(&mut t, SEQUENCE)?; // subjectPublicKeyInfo
    let mut extensions = None;
    while !t.is_empty() {
        let f = read_tlv(&mut t)?;
        if f.tag == CTX_EXTENSIONS {
            let mut b = f.body;
            extensions = Some(expect(&mut b, SEQUENCE)?.body);
        }
    }
    Some(CertFields {
        serial,
        issuer,
        subject,
        extensions,
    })
}

/// One AttributeTypeAndValue: the OID's contents and the value element.
pub(crate) type Ava<'a> = (&'a [u8], Tlv<'a>);

/// A Name as its RDNs in encoded order, each a list of attributes.
pub(crate) fn name_rdns<'a>(name: &Tlv<'a>) -> Option<Vec<Vec<Ava<'a>>>> {
    let mut rdns = Vec::new();
    let mut n = name.body;
    while !n.is_empty() {
        let set = expect(&mut n, SET)?;
        let mut s = set.body;
        let mut avas = Vec::new();
        while !s.is_empty() {
            let ava = expect(&mut s, SEQUENCE)?;
            let mut a = ava.body;
            let oid = expect(&mut a, OID)?;
            let value = read_tlv(&mut a)?;
            if !a.is_empty() {
                return None;
            }
            avas.push((oid.body, value));
        }
        if avas.is_empty() {
            return None;
        }
        rdns.push(avas);
    }
    Some(rdns)
}

/// Dotted-decimal form of an OID's contents, e.g. `2.5.4.3`.
pub(crate) fn oid_string(body: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for (i, &b) in body.iter().enumerate() {
        if acc > u64::MAX >> 7 {
            return None;
        }
        acc = acc << 7 | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        } else if i + 1 == body.len() {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    let parts: Vec<String> = arcs.iter().map(u64::to_string).collect();
    Some(parts.join("."))
}

/// The dNSName entries of the subjectAltName extension.
pub(crate) fn san_dns_names(cert: &CertFields<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let Some(mut exts) = cert.extensions else {
        return out;
    };
    while let Some(ext) = expect(&mut exts, SEQUENCE) {
        let mut e = ext.body;
        let Some(oid) = expect(&mut e, OID) else {
            break;
        };
        if oid.body != OID_SAN {
            continue;
        }
        let mut value = read_tlv(&mut e);
        if value.is_some_and(|v| v.tag == BOOLEAN) {
            value = read_tlv(&mut e);
        }
        let Some(value) = value.filter(|v| v.tag == OCTET_STRING) else {
            break;
        };
        let mut inner = value.body;
        let Some(names) = expect(&mut inner, SEQUENCE) else {
            break;
        };
        let mut n = names.body;
        while let Some(name) = read_tlv(&mut n) {
            if name.tag == CTX_DNS_NAME {
                if let Ok(s) = std::str::from_utf8(name.body) {
                    out.push(s.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oid_strings() {
        assert_eq!(oid_string(&[0x55, 0x04, 0x03]).unwrap(), "2.5.4.3");
        assert_eq!(
            oid_string(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]).unwrap(),
            "1.2.840.113549.1.9.1"
        );
        assert_eq!(
            oid_string(&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19]).unwrap(),
            "0.9.2342.19200300.100.1.25"
        );
        assert!(oid_string(&[]).is_none());
        assert!(oid_string(&[0x55, 0x84]).is_none());
        assert!(oid_string(&[0xff; 20]).is_none());
    }

    #[test]
    fn lengths_are_checked() {
        let mut input: &[u8] = &[0x30, 0x05, 1, 2];
        assert!(read_tlv(&mut input).is_none());
        let mut input: &[u8] = &[0x30, 0x82, 0x00];
        assert!(read_tlv(&mut input).is_none());
        let mut input: &[u8] = &[0x30, 0x80, 0, 0];
        assert!(read_tlv(&mut input).is_none());
        let mut input: &[u8] = &[0x04, 0x81, 0x01, 9, 0xff];
        let tlv = read_tlv(&mut input).unwrap();
        assert_eq!((tlv.tag, tlv.body, tlv.raw.len()), (4, &[9u8][..], 4));
        assert_eq!(input, &[0xff]);
    }

    #[test]
    fn garbage_never_panics() {
        let sample = include_bytes!("testdata/sample_client.crt");
        let der = crate::tls::certs::parse_certs_pem(sample)
            .unwrap()
            .remove(0);
        let fields = parse_cert(&der).unwrap();
        assert_eq!(fields.serial, &[0x00, 0xab, 0x12, 0xcd, 0x34]);
        let mut seed = 1u64;
        for i in 0..der.len() {
            let _ = parse_cert(&der[..i]);
            let mut bad = der.to_vec();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            bad[i] ^= (seed >> 33) as u8 | 1;
            if let Some(f) = parse_cert(&bad) {
                let _ = name_rdns(&f.subject);
                let _ = san_dns_names(&f);
            }
        }
    }
}
