//! The device CA: created in the data directory on first start, it signs
//! the client certificates that devices present from then on. The offload
//! listener's `client_ca` points at `device-ca.pem`.
//!
//! A CSR is only trusted for its public key (proved by its signature):
//! subject, names and extensions in it are ignored, and the certificate
//! gets ours (CN = the device id, client authentication only), so a device
//! cannot ask for a server certificate or for another device's name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SerialNumber,
};

use super::files;
use super::model::{hex, random_bytes, sha256_hex, CaFiles};

pub const CA_CERT_FILE: &str = "device-ca.pem";
pub const CA_KEY_FILE: &str = "device-ca.key";

/// How long the CA itself is valid: longer than any device will live.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
/// Backdating absorbs devices whose clocks run a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

pub struct DeviceCa {
    /// The CA as rcgen needs it to sign (rebuilt from the stored PEM: only
    /// its name and key matter for signing).
    cert: Certificate,
    key: KeyPair,
    /// The CA certificate as stored and as devices and listeners see it.
    pub cert_pem: String,
    pub key_pem: String,
}

/// A signed device certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    pub fingerprint: String,
    pub serial: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not valid PEM/DER, its signature does not verify, or its key type is unsupported")]
    Invalid,
    #[error("signing failed: {0}")]
    Sign(String),
}

impl DeviceCa {
    /// Load the CA from `dir`, creating it (key 0600) if there is none.
    pub fn load_or_create(dir: &Path, module: &str) -> anyhow::Result<DeviceCa> {
        if let Some(ca) = DeviceCa::load(dir)? {
            return Ok(ca);
        }
        let ca = DeviceCa::generate(module)?;
        ca.save(dir)?;
        tracing::info!(path = %dir.join(CA_CERT_FILE).display(), "devices: created the device CA");
        Ok(ca)
    }

    /// Load the CA from `dir`; `None` when there is none yet. Reads only,
    /// so that checking a configuration never writes.
    pub fn load(dir: &Path) -> anyhow::Result<Option<DeviceCa>> {
        let (cert_path, key_path) = paths(dir);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = std::fs::read_to_string(&cert_path)
                    .with_context(|| format!("reading {}", cert_path.display()))?;
                let key_pem = files::read_private(&key_path)?;
                DeviceCa::from_pem(&cert_pem, &key_pem)
                    .map(Some)
                    .with_context(|| format!("loading the device CA from {}", dir.display()))
            }
            (false, false) => Ok(None),
            // Half a CA: do not silently replace it (devices enrolled with
            // the old one would all be locked out).
            _ => anyhow::bail!(
                "{} and {} must both exist or both be absent",
                cert_path.display(),
                key_path.display()
            ),
        }
    }

    pub fn generate(module: &str) -> anyhow::Result<DeviceCa> {
        let key = KeyPair::generate().context("generating the device CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("fleetgate device CA ({module})"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "fleetgate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(SerialNumber::from_slice(&serial()));
        let cert = params
            .self_signed(&key)
            .context("self-signing the device CA")?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(DeviceCa {
            cert,
            key,
            cert_pem,
            key_pem,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<DeviceCa> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).context("parsing the CA certificate")?;
        // Re-signing gives rcgen an issuer with the stored name and key
        // identifier; the stored PEM stays the one published.
        let cert = params
            .self_signed(&key)
            .context("the CA key does not fit its certificate")?;
        let stored_key = rcgen::PublicKeyData::der_bytes(&key).to_vec();
        let parsed = pem_der(cert_pem).context("parsing the CA certificate")?;
        if !contains(&parsed, &stored_key) {
            anyhow::bail!("the CA key does not belong to the CA certificate");
        }
        Ok(DeviceCa {
            cert,
            key,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    pub fn files(&self) -> CaFiles {
        CaFiles {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }

    /// Write both files (key first: a certificate without its key on disk
    /// would be refused at the next start).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let (cert_path, key_path) = paths(dir);
        files::write_private(&key_path, self.key_pem.as_bytes())?;
        files::write_public(&cert_path, self.cert_pem.as_bytes())
    }

    /// Sign the public key of `csr_pem` into a client certificate for
    /// `device_id`, valid for `validity`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        device_id: &str,
        validity: Duration,
    ) -> Result<Issued, CsrError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| CsrError::Invalid)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "fleetgate devices");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let serial = serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        csr.params = params;
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        Ok(Issued {
            pem: cert.pem(),
            fingerprint: sha256_hex(cert.der()),
            serial: hex(&serial),
        })
    }
}

/// The certificate and key files of the CA kept in `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE))
}

/// A positive 16-byte serial (top bit clear, so DER needs no sign byte and
/// every tool prints the same hex).
fn serial() -> Vec<u8> {
    let mut s = random_bytes(16);
    s[0] &= 0x7f;
    s[0] |= 0x01;
    s
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn csr(cn: &str) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        (p.serialize_request(&key).unwrap().pem().unwrap(), key)
    }

    #[test]
    fn created_once_then_loaded_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = DeviceCa::load_or_create(dir.path(), "devices").unwrap();
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = DeviceCa::load_or_create(dir.path(), "devices").unwrap();
        assert_eq!(a.cert_pem, b.cert_pem);

        // Half a CA is an error, not a reason to make a new one.
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(DeviceCa::load_or_create(dir.path(), "devices").is_err());
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        DeviceCa::load_or_create(dir.path(), "devices").unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = DeviceCa::load_or_create(dir.path(), "devices")
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
    }

    #[test]
    fn a_mismatched_key_is_refused() {
        let a = DeviceCa::generate("a").unwrap();
        let b = DeviceCa::generate("b").unwrap();
        assert!(DeviceCa::from_pem(&a.cert_pem, &b.key_pem).is_err());
    }

    #[test]
    fn signed_certificates_chain_to_the_stored_ca_and_ignore_the_csr_wishes() {
        let dir = tempfile::tempdir().unwrap();
        let created = DeviceCa::load_or_create(dir.path(), "devices").unwrap();
        // Sign with the CA as loaded from disk, verify against the PEM
        // written at creation: what the listener's client_ca holds.
        let ca = DeviceCa::load_or_create(dir.path(), "devices").unwrap();
        let (csr_pem, key) = csr("someone-else");
        let issued = ca
            .sign_csr(&csr_pem, "dev-123", Duration::from_secs(86_400))
            .unwrap();
        assert_eq!(issued.fingerprint.len(), 64);

        let der = pem_der(&issued.pem).unwrap();
        assert_eq!(sha256_hex(&der), issued.fingerprint);
        assert!(contains(&der, rcgen::PublicKeyData::der_bytes(&key)));
        let subject = crate::tls::forward::subject_dn(&der).unwrap();
        assert!(subject.contains("CN=dev-123"), "{subject}");
        assert!(!String::from_utf8_lossy(&der).contains("evil.example"));

        // rustls' WebPKI client verifier accepts it against the CA file.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(pem_der(&created.cert_pem).unwrap().into())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(&der.clone().into(), &[], now)
            .expect("chains to the device CA");
    }

    #[test]
    fn garbage_and_tampered_csrs_are_rejected() {
        let ca = DeviceCa::generate("devices").unwrap();
        assert!(matches!(
            ca.sign_csr("not a csr", "d", Duration::from_secs(60)),
            Err(CsrError::Invalid)
        ));
        let (pem, _) = csr("x");
        // Flip a byte in the middle of the base64 body: the signature no
        // longer verifies (or the DER no longer parses).
        let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
        let mid = lines.len() / 2;
        let flipped: String = lines[mid].chars().rev().collect();
        lines[mid] = flipped;
        assert!(matches!(
            ca.sign_csr(&lines.join("\n"), "d", Duration::from_secs(60)),
            Err(CsrError::Invalid)
        ));
    }
}
