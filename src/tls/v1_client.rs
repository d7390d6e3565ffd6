//! X.509 version 1 client certificates.
//!
//! `openssl x509 -req` without an extensions file makes version 1
//! certificates, and older device PKIs issue nothing else. rustls' webpki
//! refuses them outright (`UnsupportedCertVersion`); nginx and HAProxy
//! (OpenSSL) accept them when a trusted CA issued them. [`V1Fallback`]
//! wraps the WebPKI client verifier: every certificate goes to it first,
//! exactly as before, and only one it refuses *for its version* is checked
//! here, with a deliberately narrow rule:
//!
//! - the certificate is version 1 (no extensions, no unique IDs), DER
//!   without trailing bytes, its inner and outer signature algorithms agree;
//! - it is within its validity period;
//! - it is issued directly by a `client_ca` trust anchor: its issuer name
//!   equals the anchor's subject (byte for byte, as webpki compares names)
//!   and its signature verifies with the anchor's key (x509-parser's
//!   `verify`, which uses ring). SHA-1 signatures are refused, as webpki
//!   refuses them in v3 chains. An anchor with name constraints is not
//!   used: a v1 certificate has no names to check them against.
//!
//! No chain through intermediates is built for a v1 certificate. The
//! handshake's CertificateVerify is then checked with the certificate's
//! public key through webpki's raw-key verification (TLS 1.3 by rustls'
//! `verify_tls13_signature_with_raw_key`, TLS 1.2 the same way with every
//! algorithm of the signature scheme, as rustls does for certificates).

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, PeerMisbehaved,
    RootCertStore, SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;
use x509_parser::x509::SubjectPublicKeyInfo;

/// A v1 certificate that cannot be verified by the narrow rule above, for
/// a reason of its own (the reason label is `client_cert_v1`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V1Refused {
    #[error("X.509 version {0} is not supported")]
    Version(u32),
    #[error("version 1 certificates are accepted only when issued directly by a client_ca certificate, not through intermediates")]
    ThroughIntermediate,
    #[error(
        "its issuer has name constraints, which a version 1 certificate cannot be checked against"
    )]
    ConstrainedIssuer,
}

/// A trust anchor as the v1 check uses it.
#[derive(Debug)]
struct Anchor {
    /// The contents of the subject Name (no tag), as webpki keeps it.
    subject: Vec<u8>,
    /// The SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
    constrained: bool,
}

/// The client verifier with v1 certificates; see the module docs.
#[derive(Debug)]
pub struct V1Fallback {
    inner: Arc<dyn ClientCertVerifier>,
    anchors: Vec<Anchor>,
    algs: WebPkiSupportedAlgorithms,
}

impl V1Fallback {
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        roots: &RootCertStore,
        algs: WebPkiSupportedAlgorithms,
    ) -> Arc<Self> {
        let anchors = roots
            .roots
            .iter()
            .map(|a| Anchor {
                subject: a.subject.as_ref().to_vec(),
                spki: webpki::spki_for_anchor(a).as_ref().to_vec(),
                constrained: a.name_constraints.is_some(),
            })
            .collect();
        Arc::new(V1Fallback {
            inner,
            anchors,
            algs,
        })
    }

    /// The chain step for a certificate webpki refused for its version.
    fn verify_v1(
        &self,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let cert = parse(end_entity)?;
        let version = cert.version().0;
        if version != 0 {
            return Err(other(V1Refused::Version(version + 1)));
        }
        if !cert.extensions().is_empty()
            || cert.issuer_uid.is_some()
            || cert.subject_uid.is_some()
            || cert.tbs_certificate.signature != cert.signature_algorithm
        {
            return Err(CertificateError::BadEncoding.into());
        }
        check_validity(&cert, now)?;
        let issuer = name_contents(cert.issuer().as_raw())?;
        let mut matching = self
            .anchors
            .iter()
            .filter(|a| a.subject == issuer)
            .peekable();
        if matching.peek().is_none() {
            return Err(if intermediates.is_empty() {
                CertificateError::UnknownIssuer.into()
            } else {
                other(V1Refused::ThroughIntermediate)
            });
        }
        if is_sha1(&cert) {
            return Err(unsupported(&cert, &self.algs));
        }
        let mut error: rustls::Error = CertificateError::UnknownIssuer.into();
        for anchor in matching {
            if anchor.constrained {
                error = other(V1Refused::ConstrainedIssuer);
                continue;
            }
            let Ok((_, key)) = SubjectPublicKeyInfo::from_der(&anchor.spki) else {
                continue;
            };
            match cert.verify_signature(Some(&key)) {
                Ok(()) => return Ok(()),
                Err(X509Error::SignatureUnsupportedAlgorithm) => {
                    error = unsupported(&cert, &self.algs)
                }
                Err(_) => error = CertificateError::BadSignature.into(),
            }
        }
        Err(error)
    }
}

/// Whether rustls' verifier refused the certificate for its version.
fn refused_for_version(error: &rustls::Error) -> bool {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => matches!(
            o.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::UnsupportedCertVersion)
        ),
        _ => false,
    }
}

fn other(e: V1Refused) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(e))).into()
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, rustls::Error> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        _ => Err(CertificateError::BadEncoding.into()),
    }
}

/// A Name's contents without its SEQUENCE header, as webpki stores an
/// anchor's subject.
fn name_contents(raw: &[u8]) -> Result<&[u8], rustls::Error> {
    let mut input = raw;
    match super::x509::read_tlv(&mut input) {
        Some(tlv) if tlv.tag == 0x30 && input.is_empty() => Ok(tlv.body),
        _ => Err(CertificateError::BadEncoding.into()),
    }
}

fn check_validity(cert: &X509Certificate<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let secs = now.as_secs();
    let at = |t: &ASN1Time| {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.timestamp().max(0) as u64))
    };
    let validity = cert.validity();
    let now_t = i64::try_from(secs).unwrap_or(i64::MAX);
    if now_t < validity.not_before.timestamp() {
        return Err(CertificateError::NotValidYetContext {
            time: now,
            not_before: at(&validity.not_before),
        }
        .into());
    }
    if now_t > validity.not_after.timestamp() {
        return Err(CertificateError::ExpiredContext {
            time: now,
            not_after: at(&validity.not_after),
        }
        .into());
    }
    Ok(())
}

/// sha1WithRSAEncryption and its old OIW alias: webpki accepts neither.
fn is_sha1(cert: &X509Certificate<'_>) -> bool {
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    oid == "1.2.840.113549.1.1.5" || oid == "1.3.14.3.2.29"
}

/// The public key of a v1 certificate that passed [`V1Fallback::verify_v1`]
/// in this handshake (rustls verifies the CertificateVerify only after it).
fn v1_spki(cert: &CertificateDer<'_>) -> Result<SubjectPublicKeyInfoDer<'static>, rustls::Error> {
    let parsed = parse(cert)?;
    if parsed.version().0 != 0 {
        return Err(CertificateError::BadEncoding.into());
    }
    Ok(SubjectPublicKeyInfoDer::from(
        parsed.public_key().raw.to_vec(),
    ))
}

/// TLS 1.2's CertificateVerify with a raw key: every webpki algorithm of
/// the scheme is tried, as rustls' `verify_tls12_signature` does with a
/// certificate.
fn verify_tls12_raw(
    message: &[u8],
    spki: &SubjectPublicKeyInfoDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let candidates = algs
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == dss.scheme)
        .map(|(_, a)| *a)
        .ok_or(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme)?;
    let key = webpki::RawPublicKeyEntity::try_from(spki)
        .map_err(|_| rustls::Error::from(CertificateError::BadEncoding))?;
    for alg in candidates {
        match key.verify_signature(*alg, message, dss.signature()) {
            Ok(()) => return Ok(HandshakeSignatureValid::assertion()),
            Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => continue,
            Err(webpki::Error::InvalidSignatureForPublicKey) => {
                return Err(CertificateError::BadSignature.into())
            }
            Err(e) => return Err(CertificateError::Other(OtherError(Arc::new(e))).into()),
        }
    }
    Err(CertificateError::UnsupportedSignatureAlgorithmContext {
        signature_algorithm_id: Vec::new(),
        supported_algorithms: supported(algs),
    }
    .into())
}

fn supported(algs: &WebPkiSupportedAlgorithms) -> Vec<rustls::pki_types::AlgorithmIdentifier> {
    algs.all.iter().map(|a| a.signature_alg_id()).collect()
}

/// The certificate's signature algorithm is not one the check takes.
fn unsupported(cert: &X509Certificate<'_>, algs: &WebPkiSupportedAlgorithms) -> rustls::Error {
    CertificateError::UnsupportedSignatureAlgorithmContext {
        signature_algorithm_id: cert.signature_algorithm.algorithm.as_bytes().to_vec(),
        supported_algorithms: supported(algs),
    }
    .into()
}

impl ClientCertVerifier for V1Fallback {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(e) if refused_for_version(&e) => {
                self.verify_v1(end_entity, intermediates, now)?;
                Ok(ClientCertVerified::assertion())
            }
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.inner.verify_tls12_signature(message, cert, dss) {
            Err(e) if refused_for_version(&e) => {
                verify_tls12_raw(message, &v1_spki(cert)?, dss, &self.algs)
            }
            verdict => verdict,
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.inner.verify_tls13_signature(message, cert, dss) {
            Err(e) if refused_for_version(&e) => {
                rustls::crypto::verify_tls13_signature_with_raw_key(
                    message,
                    &v1_spki(cert)?,
                    dss,
                    &self.algs,
                )
            }
            verdict => verdict,
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;

    use super::*;
    use crate::tls::refusal::Reason;
    use crate::tls::revocation::RevocationList;
    use crate::tls::server::{build_server_config, ClientAuth, ServerTlsOptions};
    use crate::tls::testutil::{exchange, handshake, Leaf, Pki};

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    /// A version 1 certificate as `openssl x509 -req` makes it without an
    /// extensions file, issued by the CA in `ca.pem`/`ca.key` in `dir`.
    fn v1_leaf(dir: &Path, cn: &str, key_alg: &str) -> Leaf {
        let key_opt = match key_alg {
            "RSA" => "rsa_keygen_bits:2048",
            _ => "ec_paramgen_curve:P-256",
        };
        let (key, csr, crt) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
        );
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                key_alg,
                "-pkeyopt",
                key_opt,
                "-out",
                &key,
            ],
        );
        let subj = format!("/CN={cn}");
        openssl(
            dir,
            &["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &crt,
            ],
        );
        let cert_pem = std::fs::read_to_string(dir.join(&crt)).unwrap();
        let key_pem = std::fs::read_to_string(dir.join(&key)).unwrap();
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(
            parse(&cert).unwrap().version().0,
            0,
            "openssl made a v1 certificate"
        );
        Leaf {
            cert,
            key: PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            cert_pem,
            key_pem,
        }
    }

    fn write_ca(dir: &Path, pki: &Pki) {
        std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap();
        std::fs::write(dir.join("ca.key"), pki.ca_key_pem()).unwrap();
    }

    fn server(
        pki: &Pki,
        roots: Arc<RootCertStore>,
        list: Option<RevocationList>,
    ) -> Arc<rustls::ServerConfig> {
        let mut opts = ServerTlsOptions::new(pki.server("gw.test").certified());
        opts.client_auth = ClientAuth::Required;
        opts.client_ca = Some(roots);
        opts.revocation = list;
        build_server_config(&opts).unwrap()
    }

    /// Presents `leaf` as it is: rustls' own `with_client_auth_cert`
    /// checks the key against the certificate with webpki, which refuses
    /// v1 (devices use OpenSSL, which does not).
    #[derive(Debug)]
    struct Present(Arc<rustls::sign::CertifiedKey>);

    impl rustls::client::ResolvesClientCert for Present {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }

    fn client(pki: &Pki, leaf: &Leaf, tls12: bool) -> Arc<rustls::ClientConfig> {
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let provider = crate::tls::provider();
        let key = provider
            .key_provider
            .load_private_key(leaf.key.clone_key())
            .unwrap();
        let certified = rustls::sign::CertifiedKey::new(vec![leaf.cert.clone()], key);
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(pki.roots())
                .with_client_cert_resolver(Arc::new(Present(Arc::new(certified)))),
        )
    }

    fn reason(result: std::io::Result<crate::tls::testutil::ServerSide>) -> Reason {
        let err = result.expect_err("the handshake is refused");
        Reason::of_io(&err, true)
    }

    #[tokio::test]
    async fn v1_certificates_from_a_client_ca_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("Device CA");
        write_ca(dir.path(), &pki);
        let list = RevocationList::new();
        let config = server(&pki, pki.roots(), Some(list.clone()));
        for key_alg in ["EC", "RSA"] {
            let leaf = v1_leaf(dir.path(), &format!("legacy-{key_alg}"), key_alg);
            for tls12 in [false, true] {
                let (s, c) = handshake(config.clone(), client(&pki, &leaf, tls12), "gw.test").await;
                let (mut s, mut c) = (s.unwrap(), c.unwrap());
                exchange(&mut s, &mut c).await.unwrap();
                let peer = s.get_ref().1.peer_certificates().unwrap();
                assert_eq!(peer[0], leaf.cert, "{key_alg} tls12={tls12}");
            }
            // Revocation applies to v1 certificates as to any other.
            list.revoke_fingerprint(crate::tls::forward::sha256(&leaf.cert));
            let (s, _) = handshake(config.clone(), client(&pki, &leaf, false), "gw.test").await;
            assert_eq!(reason(s), Reason::ClientCertRevoked, "{key_alg}");
        }
    }

    #[tokio::test]
    async fn v1_refusals_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("Device CA");
        let stranger = Pki::new("Other CA");
        write_ca(dir.path(), &stranger);
        let foreign = v1_leaf(dir.path(), "foreign", "EC");
        let config = server(&pki, pki.roots(), None);
        let (s, _) = handshake(config.clone(), client(&pki, &foreign, false), "gw.test").await;
        assert_eq!(reason(s), Reason::ClientCertUnknownIssuer);

        write_ca(dir.path(), &pki);
        let leaf = v1_leaf(dir.path(), "legacy", "EC");
        let roots = pki.roots();
        let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let algs = crate::tls::provider().signature_verification_algorithms;
        let verifier = V1Fallback::new(webpki, &roots, algs);
        let at = |days: i64| {
            let now = UnixTime::now().as_secs() as i64 + days * 86_400;
            UnixTime::since_unix_epoch(Duration::from_secs(now as u64))
        };
        let verdict = |intermediates: &[CertificateDer<'_>], days| {
            verifier
                .verify_client_cert(&leaf.cert, intermediates, at(days))
                .map(|_| ())
                .map_err(|e| Reason::of_rustls(&e, true))
        };
        assert_eq!(verdict(&[], 0), Ok(()));
        assert_eq!(verdict(&[], 60), Err(Reason::ClientCertExpired));
        assert_eq!(verdict(&[], -2), Err(Reason::ClientCertNotYetValid));
        // Issued by an intermediate the anchors do not know: not supported.
        let foreign_verdict = verifier
            .verify_client_cert(&foreign.cert, &[pki.ca_der()], at(0))
            .map_err(|e| Reason::of_rustls(&e, true));
        assert_eq!(foreign_verdict.err(), Some(Reason::ClientCertV1));
    }

    #[tokio::test]
    async fn a_v1_ca_is_a_trust_anchor() {
        // What older PKIs have: the CA itself is version 1.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ca.key",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=Old CA",
                "-out",
                "ca.csr",
            ],
        );
        openssl(
            d,
            &[
                "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "30", "-out",
                "ca.pem",
            ],
        );
        let ca = crate::tls::certs::load_ca_bundle(&d.join("ca.pem")).unwrap();
        let leaf = v1_leaf(d, "legacy", "EC");
        let pki = Pki::new("Server CA");
        let config = server(&pki, Arc::new(ca), None);
        let (s, c) = handshake(config, client(&pki, &leaf, false), "gw.test").await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        exchange(&mut s, &mut c).await.unwrap();
    }
}
