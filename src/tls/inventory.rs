//! The certificates in use: listener certificates (default, SNI and the
//! `auto` one), client CAs, pool CAs and pool client certificates, read
//! from the running plan. The rustls configs a plan holds do not give
//! their certificates back, so validation keeps them next to the configs
//! ([`UsedCerts`]); this module describes them (subject, SANs, SHA-256
//! fingerprint, validity), exports their expiry as a gauge, and warns
//! about the ones that run out soon.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;

use crate::config::{ListenerMode, Plan};
use crate::metrics::Metrics;

/// Certificates with fewer days than this left are highlighted and
/// logged: a month leaves time to renew through a change process.
pub const WARN_DAYS: i64 = 30;

/// What a certificate is used for (the metric's `role` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A listener's own certificate.
    Server,
    /// A trust anchor for the clients of a listener.
    ClientCa,
    /// A trust anchor for the backends of a pool.
    PoolCa,
    /// The certificate a pool presents to its backends.
    PoolClient,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::ClientCa => "client_ca",
            Role::PoolCa => "pool_ca",
            Role::PoolClient => "pool_client",
        }
    }
}

/// One certificate as configured: its role, where it came from (`default`,
/// `sni` or `auto` for a listener certificate, the file or `module:NAME`
/// for a CA) and its DER.
#[derive(Debug, Clone)]
pub struct UsedCert {
    pub role: Role,
    pub origin: String,
    pub der: CertificateDer<'static>,
}

/// The certificates of one listener or pool; cheap to clone with the plan.
#[derive(Debug, Clone, Default)]
pub struct UsedCerts(Arc<Vec<UsedCert>>);

impl UsedCerts {
    pub fn new(certs: Vec<UsedCert>) -> UsedCerts {
        UsedCerts(Arc::new(certs))
    }

    pub fn iter(&self) -> impl Iterator<Item = &UsedCert> {
        self.0.iter()
    }
}

/// A certificate in use, described for the status page and the metric.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CertInfo {
    /// The listener using it; empty for a pool's.
    pub listener: String,
    /// The pool using it; empty for a listener's.
    pub pool: String,
    pub role: &'static str,
    pub origin: String,
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    /// SHA-256 of the DER, lowercase hex (as in the forwarded headers).
    pub fingerprint: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    /// Whole days left at `now` (unix seconds); negative once expired.
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }

    pub fn expired(&self, now: i64) -> bool {
        self.not_after < now
    }

    /// Expired, or fewer than [`WARN_DAYS`] left.
    pub fn expiring(&self, now: i64) -> bool {
        self.not_after - now < WARN_DAYS * 86_400
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every certificate `plan` uses, listeners first in configuration
/// order, then pools; a certificate listed twice for the same use
/// (e.g. as default and SNI certificate) appears once.
pub fn inventory(plan: &Plan) -> Vec<CertInfo> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |listener: &str, pool: &str, used: &UsedCerts| {
        for c in used.iter() {
            let Some(info) = describe(listener, pool, c) else {
                continue;
            };
            let key = (
                info.listener.clone(),
                info.pool.clone(),
                info.role,
                info.fingerprint.clone(),
            );
            if seen.insert(key) {
                out.push(info);
            }
        }
    };
    for l in &plan.listeners {
        if let ListenerMode::Offload(o) = &l.mode {
            add(&l.name, "", &o.certificates);
        }
    }
    for p in &plan.pools {
        if let Some(tls) = &p.tls {
            add("", &p.name, tls.certificates());
        }
    }
    out
}

/// Parse one certificate; `None` for bytes that do not parse (rustls
/// accepted them, so this does not happen with a loaded plan).
fn describe(listener: &str, pool: &str, c: &UsedCert) -> Option<CertInfo> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(c.der.as_ref()).ok()?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(s) => format!("DNS:{s}"),
                GeneralName::IPAddress(b) => format!("IP:{}", ip_text(b)),
                GeneralName::RFC822Name(s) => format!("email:{s}"),
                GeneralName::URI(s) => format!("URI:{s}"),
                other => format!("{other:?}"),
            })
            .collect(),
        _ => Vec::new(),
    };
    let validity = cert.validity();
    Some(CertInfo {
        listener: listener.to_string(),
        pool: pool.to_string(),
        role: c.role.as_str(),
        origin: c.origin.clone(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        fingerprint: super::forward::sha256_fingerprint(c.der.as_ref()),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

fn ip_text(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).expect("4 bytes")).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")).to_string(),
        _ => super::hex_lower(b),
    }
}

/// The label values of one certificate's expiry series.
type SeriesKey = [String; 4];

/// Set the expiry gauge for `certs` and remove the series of certificates
/// that are no longer in use (`before`: what the last call set). Returns
/// what is set now.
pub fn publish(
    metrics: &Metrics,
    certs: &[CertInfo],
    before: &HashSet<SeriesKey>,
) -> HashSet<SeriesKey> {
    let mut now = HashSet::new();
    for c in certs {
        let key = [
            c.listener.clone(),
            c.pool.clone(),
            c.role.to_string(),
            c.fingerprint.clone(),
        ];
        let labels: Vec<&str> = key.iter().map(String::as_str).collect();
        metrics
            .tls_certificate_expiry
            .with_label_values(&labels)
            .set(c.not_after as f64);
        now.insert(key);
    }
    for gone in before.difference(&now) {
        let labels: Vec<&str> = gone.iter().map(String::as_str).collect();
        let _ = metrics.tls_certificate_expiry.remove_label_values(&labels);
    }
    now
}

/// Log a warning for every certificate with fewer than [`WARN_DAYS`]
/// left, an error for every expired one.
pub fn warn_expiring(certs: &[CertInfo], now: i64) {
    for c in certs.iter().filter(|c| c.expiring(now)) {
        let used_by = used_by(c);
        let not_after = humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs(c.not_after.max(0) as u64),
        );
        if c.expired(now) {
            tracing::error!(
                fingerprint = %c.fingerprint,
                "certificate expired: {} ({}, {used_by}) expired on {not_after}",
                c.subject,
                c.role
            );
        } else {
            tracing::warn!(
                fingerprint = %c.fingerprint,
                "certificate expires in {} days: {} ({}, {used_by}) on {not_after}",
                c.days_left(now),
                c.subject,
                c.role
            );
        }
    }
}

fn used_by(c: &CertInfo) -> String {
    if c.pool.is_empty() {
        format!("listener {:?}", c.listener)
    } else {
        format!("pool {:?}", c.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(days: i64) -> (CertificateDer<'static>, i64) {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "inventory test");
        let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        (c.der().clone(), not_after.unix_timestamp())
    }

    #[test]
    fn describes_subject_sans_and_expiry() {
        let (der, not_after) = cert(10);
        let used = UsedCert {
            role: Role::Server,
            origin: "default".into(),
            der: der.clone(),
        };
        let info = describe("web", "", &used).unwrap();
        assert_eq!(info.subject, "CN=inventory test");
        assert_eq!(info.sans, vec!["DNS:a.example".to_string()]);
        assert_eq!(info.not_after, not_after);
        assert_eq!(
            info.fingerprint,
            super::super::forward::sha256_fingerprint(der.as_ref())
        );
        let now = unix_now();
        assert!(info.expiring(now) && !info.expired(now));
        assert!(matches!(info.days_left(now), 9 | 10));
        let (far, _) = cert(400);
        let far = describe(
            "web",
            "",
            &UsedCert {
                role: Role::Server,
                origin: "default".into(),
                der: far,
            },
        )
        .unwrap();
        assert!(!far.expiring(now));
    }
}
