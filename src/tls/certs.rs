//! Loading certificates and keys from PEM files, checking that a key
//! belongs to its certificate, CA bundles, and self-signed certificates for
//! `cert = "auto"`. Errors name the files: an operator fixing a config
//! needs to know which of the two files to look at.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore};

use super::{forward, x509, TlsError};

/// Every certificate in a PEM file, in file order: for a server or client
/// certificate, its own certificate first and then the intermediates.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = parse_certs_pem(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

pub(crate) fn parse_certs_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, pem::Error> {
    CertificateDer::pem_slice_iter(pem).collect()
}

/// The first private key in a PEM file: PKCS#8 (`PRIVATE KEY`), PKCS#1
/// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    // Encrypted keys would need a passphrase at every start; say so
    // rather than "no key found".
    if contains(&pem, b"ENCRYPTED PRIVATE KEY") || contains(&pem, b"Proc-Type: 4,ENCRYPTED") {
        return Err(TlsError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey {
            path: path.to_path_buf(),
            hint: if contains(&pem, b"BEGIN CERTIFICATE") {
                " (the file holds a certificate: are the certificate and key paths swapped?)"
            } else {
                ""
            },
        }),
        Err(e) => Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// A certificate chain and its key, checked to belong together.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert_path)?;
    let key = load_private_key(key_path)?;
    certified_key(chain, key, cert_path, key_path)
}

/// Pair a chain with its key, failing with both names when the key is not
/// the one the first certificate was issued for. The paths only label
/// errors; nothing is read from them.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::NoCertificates {
            path: cert_path.to_path_buf(),
        });
    }
    let signing_key = super::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_path.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type cannot report its public key; every ring
        // key can, so this is only reached by exotic providers.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
                hint: mismatch_hint(&certified),
            })
        }
        Err(e) => Err(TlsError::Pem {
            path: cert_path.to_path_buf(),
            message: format!("the first certificate does not parse: {e}"),
        }),
    }
}

/// The usual cause of a mismatch is a chain file with the CA first.
fn mismatch_hint(certified: &CertifiedKey) -> String {
    for (i, cert) in certified.cert.iter().enumerate().skip(1) {
        let probe = CertifiedKey::new(vec![cert.clone()], certified.key.clone());
        if probe.keys_match().is_ok() {
            return format!(
                " (the key matches certificate #{} in that file: the certificate it belongs to must come first)",
                i + 1
            );
        }
    }
    String::new()
}

/// A CA bundle: every certificate in the file becomes a trust anchor.
pub fn load_ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for (i, cert) in load_certs(path)?.into_iter().enumerate() {
        store.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            index: i + 1,
            source,
        })?;
    }
    Ok(store)
}

/// The subjectAltName DNS names of a certificate, lowercased; what a
/// certificate can be selected by when no names are configured for it.
pub fn dns_names(cert_der: &[u8]) -> Vec<String> {
    x509::parse_cert(cert_der)
        .map(|c| x509::san_dns_names(&c))
        .unwrap_or_default()
}

/// How long an `auto` certificate lasts. Devices that pin it by
/// fingerprint would break on renewal, so it lasts long; it is trusted by
/// no one by default anyway.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A self-signed certificate and its key, as PEM, not yet written.
#[derive(Clone)]
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the certificate in lowercase hex, for the operator to pin
    /// or compare.
    pub fingerprint: String,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Generate an ECDSA P-256 key and a self-signed server certificate for
/// `names` (DNS names or IP addresses; `localhost` when empty), in memory.
pub fn self_signed(names: &[String]) -> Result<SelfSigned, TlsError> {
    let names: Vec<String> = if names.is_empty() {
        vec!["localhost".to_string()]
    } else {
        names.to_vec()
    };
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.clone())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, names[0].as_str());
    dn.push(rcgen::DnType::OrganizationName, "fleetgate self-signed");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // A day of slack for devices whose clocks run behind.
    let start = now.saturating_sub(Duration::from_secs(24 * 3600));
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + start;
    params.not_after = epoch + now + SELF_SIGNED_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        fingerprint: forward::sha256_fingerprint(cert.der()),
    })
}

/// Write a pair as PEM files, the key with mode 0600, each atomically.
pub fn write_self_signed(
    pair: &SelfSigned,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), TlsError> {
    let key_tmp = write_temp(key_path, pair.key_pem.as_bytes(), 0o600)?;
    let cert_tmp = match write_temp(cert_path, pair.cert_pem.as_bytes(), 0o644) {
        Ok(tmp) => tmp,
        Err(e) => {
            let _ = std::fs::remove_file(&key_tmp);
            return Err(e);
        }
    };
    std::fs::rename(&key_tmp, key_path).map_err(|e| TlsError::io(key_path, e))?;
    std::fs::rename(&cert_tmp, cert_path).map_err(|e| TlsError::io(cert_path, e))
}

/// `self_signed`, written to `cert_path` and `key_path`; returns the
/// certificate's fingerprint.
pub fn generate_self_signed(
    names: &[String],
    cert_path: &Path,
    key_path: &Path,
) -> Result<String, TlsError> {
    let pair = self_signed(names)?;
    write_self_signed(&pair, cert_path, key_path)?;
    Ok(pair.fingerprint)
}

/// Write next to `path` so that the rename into place is atomic.
fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, TlsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(|e| TlsError::io(path, e))?;
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(TlsError::io(path, e));
    }
    Ok(tmp)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::io(path, e))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testutil::Pki;

    fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn loads_pkcs8_pkcs1_and_sec1_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("Test CA");
        let leaf = pki.server("pkcs8.test");
        let cert = write(dir.path(), "p8.crt", leaf.cert_pem.as_bytes());
        let key = write(dir.path(), "p8.key", leaf.key_pem.as_bytes());
        assert!(matches!(
            load_private_key(&key).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
        load_certified_key(&cert, &key).unwrap();

        let cert = write(dir.path(), "rsa.crt", include_bytes!("testdata/rsa.crt"));
        let key = write(
            dir.path(),
            "rsa.key",
            include_bytes!("testdata/rsa_pkcs1.key"),
        );
        assert!(matches!(
            load_private_key(&key).unwrap(),
            PrivateKeyDer::Pkcs1(_)
        ));
        load_certified_key(&cert, &key).unwrap();

        let cert = write(dir.path(), "ec.crt", include_bytes!("testdata/ec.crt"));
        let key = write(dir.path(), "ec.key", include_bytes!("testdata/ec_sec1.key"));
        assert!(matches!(
            load_private_key(&key).unwrap(),
            PrivateKeyDer::Sec1(_)
        ));
        load_certified_key(&cert, &key).unwrap();
    }

    #[test]
    fn chain_files_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("Chain CA");
        let leaf = pki.server("chain.test");
        let both = format!("{}{}", leaf.cert_pem, pki.ca_pem());
        let path = write(dir.path(), "chain.pem", both.as_bytes());
        let certs = load_certs(&path).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0], leaf.cert);
        assert_eq!(certs[1], pki.ca_der());
    }

    #[test]
    fn key_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("Mismatch CA");
        let a = pki.server("a.test");
        let b = pki.server("b.test");
        let cert = write(dir.path(), "a.crt", a.cert_pem.as_bytes());
        let key = write(dir.path(), "b.key", b.key_pem.as_bytes());
        let err = load_certified_key(&cert, &key).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TlsError::KeyMismatch { .. }));
        assert!(text.contains("a.crt") && text.contains("b.key"), "{text}");

        // RSA certificate with an EC key: also a mismatch, not a crash.
        let rsa = write(dir.path(), "rsa.crt", include_bytes!("testdata/rsa.crt"));
        let ec = write(dir.path(), "ec.key", include_bytes!("testdata/ec_sec1.key"));
        let text = load_certified_key(&rsa, &ec).unwrap_err().to_string();
        assert!(
            text.contains("rsa.crt") && text.contains("ec.key"),
            "{text}"
        );

        // CA first, leaf second: the hint says so.
        let swapped = format!("{}{}", pki.ca_pem(), a.cert_pem);
        let cert = write(dir.path(), "swapped.crt", swapped.as_bytes());
        let key = write(dir.path(), "a.key", a.key_pem.as_bytes());
        let text = load_certified_key(&cert, &key).unwrap_err().to_string();
        assert!(text.contains("matches certificate #2"), "{text}");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let text = load_certs(&missing).unwrap_err().to_string();
        assert!(text.contains("missing.pem"), "{text}");

        let empty = write(dir.path(), "empty.pem", b"nothing here\n");
        let err = load_certs(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }));
        assert!(err.to_string().contains("empty.pem"));

        let pki = Pki::new("Err CA");
        let leaf = pki.server("err.test");
        let cert_as_key = write(dir.path(), "cert-as-key.pem", leaf.cert_pem.as_bytes());
        let text = load_private_key(&cert_as_key).unwrap_err().to_string();
        assert!(
            text.contains("cert-as-key.pem") && text.contains("swapped"),
            "{text}"
        );

        let encrypted = write(
            dir.path(),
            "enc.key",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let err = load_private_key(&encrypted).unwrap_err();
        assert!(matches!(err, TlsError::EncryptedKey { .. }), "{err}");

        let broken = write(
            dir.path(),
            "broken.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let text = load_certs(&broken).unwrap_err().to_string();
        assert!(text.contains("broken.pem"), "{text}");

        let truncated = write(
            dir.path(),
            "truncated.pem",
            b"-----BEGIN CERTIFICATE-----\nMIIB\n",
        );
        let text = load_certs(&truncated).unwrap_err().to_string();
        assert!(text.contains("truncated.pem"), "{text}");

        // Well-formed PEM around bytes that are no key.
        let junk_key = write(
            dir.path(),
            "junk.key",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let cert = write(dir.path(), "ok.crt", leaf.cert_pem.as_bytes());
        let err = load_certified_key(&cert, &junk_key).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        assert!(err.to_string().contains("junk.key"));
    }

    #[test]
    fn ca_bundle_loads_every_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::new("CA A");
        let b = Pki::new("CA B");
        let bundle = format!("{}{}", a.ca_pem(), b.ca_pem());
        let path = write(dir.path(), "bundle.pem", bundle.as_bytes());
        assert_eq!(load_ca_bundle(&path).unwrap().len(), 2);

        let bad = write(
            dir.path(),
            "bad-ca.pem",
            format!(
                "{}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                a.ca_pem()
            )
            .as_bytes(),
        );
        let err = load_ca_bundle(&bad).unwrap_err();
        assert!(matches!(err, TlsError::BadCa { index: 2, .. }), "{err}");
        assert!(err.to_string().contains("bad-ca.pem"));
    }

    #[test]
    fn san_names_are_read() {
        let pki = Pki::new("SAN CA");
        let leaf = pki.leaf(
            "x",
            &["Api.Example.com", "*.devices.example.com", "10.0.0.1"],
            false,
        );
        assert_eq!(
            dns_names(&leaf.cert),
            ["api.example.com", "*.devices.example.com"]
        );
        assert!(dns_names(b"not a certificate").is_empty());
    }

    #[test]
    fn self_signed_certificate_is_written_and_usable() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("auto.crt");
        let key = dir.path().join("auto.key");
        let names = ["gw.example.com".to_string(), "127.0.0.1".to_string()];
        let fingerprint = generate_self_signed(&names, &cert, &key).unwrap();
        assert_eq!(fingerprint.len(), 64);
        let certified = load_certified_key(&cert, &key).unwrap();
        let der = certified.end_entity_cert().unwrap();
        assert_eq!(forward::sha256_fingerprint(der), fingerprint);
        assert_eq!(dns_names(der), ["gw.example.com"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        // It verifies against itself as a trust anchor, for the right name.
        use rustls::client::danger::ServerCertVerifier;
        let roots = load_ca_bundle(&cert).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("gw.example.com").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_server_cert(der, &[], &name, &[], now)
            .unwrap();

        // A second run replaces both files with a new pair.
        let again = generate_self_signed(&names, &cert, &key).unwrap();
        assert_ne!(again, fingerprint);
        load_certified_key(&cert, &key).unwrap();
    }

    #[test]
    fn unwritable_destination_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("no-such-dir/auto.crt");
        let key = dir.path().join("auto.key");
        let text = generate_self_signed(&[], &cert, &key)
            .unwrap_err()
            .to_string();
        assert!(text.contains("no-such-dir"), "{text}");
        // The key was never moved into place without its certificate, and
        // no temporary file is left.
        assert!(!key.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
